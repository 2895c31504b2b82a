/* What cffi reads: the subset of shmbus_ring.h that Python calls.
 * Constants are "..." so their values come from the C header, never from here. */
#define SHMBUS_RING_HEADER_SIZE ...
#define SHMBUS_RING_RECORD_HEADER ...
#define SHMBUS_RING_MIN_CAPACITY ...
#define SHMBUS_RING_MAX_CAPACITY ...

#define SHMBUS_OK ...
#define SHMBUS_EAGAIN ...
#define SHMBUS_ETIMEDOUT ...
#define SHMBUS_ETOOBIG ...
#define SHMBUS_ECORRUPT ...
#define SHMBUS_EINTR ...
#define SHMBUS_EINVAL ...
#define SHMBUS_ESYS ...
#define SHMBUS_EBADSEG ...
#define SHMBUS_ESMALL ...

typedef struct shmbus_ring shmbus_ring_t;

uint64_t shmbus_ring_segment_size(uint64_t capacity);
uint32_t shmbus_ring_default_max_frame(uint64_t capacity);
uint32_t shmbus_ring_limit_max_frame(uint64_t capacity);

int shmbus_ring_create(const char *shm_name, const char *bell_name, uint64_t capacity,
                       uint32_t max_frame, shmbus_ring_t **out);
int shmbus_ring_attach(const char *shm_name, const char *bell_name, shmbus_ring_t **out);
/* Drops one reference, and the last unmaps.  retain adds one (for a buffer
 * handed out that must keep the mapping alive). */
void shmbus_ring_close(shmbus_ring_t *r);
void shmbus_ring_retain(shmbus_ring_t *r);
int shmbus_ring_unlink(const char *shm_name, const char *bell_name);

uint64_t shmbus_ring_capacity(const shmbus_ring_t *r);
uint32_t shmbus_ring_max_frame(const shmbus_ring_t *r);
uint64_t shmbus_ring_used(const shmbus_ring_t *r);
int64_t shmbus_ring_heartbeat(const shmbus_ring_t *r);
uint64_t shmbus_ring_next_correlation(shmbus_ring_t *r);

int shmbus_ring_write(shmbus_ring_t *r, const char *data, uint32_t len, int64_t timeout_ns);
int shmbus_ring_write_many(shmbus_ring_t *r, const char *blob, const uint32_t *lens, uint32_t count,
                           int64_t timeout_ns, uint32_t *written);

int shmbus_ring_claim(shmbus_ring_t *r, uint32_t len, int64_t timeout_ns, int64_t *index,
                      char **payload);
int shmbus_ring_commit(shmbus_ring_t *r, int64_t index);
int shmbus_ring_abort(shmbus_ring_t *r, int64_t index);

int shmbus_ring_read_many(shmbus_ring_t *r, char *out, uint64_t out_cap, uint32_t *lens,
                          uint32_t max_count, int64_t timeout_ns, int64_t spin_ns,
                          uint32_t *count, uint64_t *bytes);
/* One frame: returns its length (0 is a valid empty frame) or a negative code. */
int64_t shmbus_ring_read_one(shmbus_ring_t *r, char *out, uint64_t out_cap, int64_t timeout_ns,
                             int64_t spin_ns);
int shmbus_ring_peek(shmbus_ring_t *r, int64_t timeout_ns, int64_t spin_ns, char **payload,
                     uint32_t *len);
int shmbus_ring_release(shmbus_ring_t *r);

int shmbus_ring_unblock(shmbus_ring_t *r, int64_t grace_ns);
int shmbus_ring_test_reserve(shmbus_ring_t *r, uint32_t len, int write_padding);

/* shmbus_frame.h */
#define SHMBUS_FRAME_MAGIC ...
#define SHMBUS_FRAME_VERSION ...
#define SHMBUS_FRAME_HEADER_SIZE ...
#define SHMBUS_FRAME_FLAG_ACK ...
#define SHMBUS_FRAME_FLAG_RAW ...
#define SHMBUS_FRAME_MAX_NAME ...
#define SHMBUS_FRAME_MAX_TOPIC ...

const char *shmbus_frame_struct(void);
size_t shmbus_frame_offsets(uint32_t *out, size_t n);

/* shmbus_table.h */
#define SHMBUS_TABLE_MAX_CAPACITY ...

typedef struct shmbus_table shmbus_table_t;

int shmbus_table_create(const char *name, uint64_t capacity, shmbus_table_t **out);
int shmbus_table_attach(const char *name, shmbus_table_t **out);
void shmbus_table_close(shmbus_table_t *t);
uint64_t shmbus_table_capacity(const shmbus_table_t *t);
uint64_t shmbus_table_version(const shmbus_table_t *t);
int shmbus_table_write(shmbus_table_t *t, const char *data, uint64_t len, uint64_t *version);
int shmbus_table_read(shmbus_table_t *t, char *out, uint64_t cap, uint64_t *len,
                      uint64_t *version);

/* shmbus_seg.h */
int shmbus_seg_unlink(const char *name);
