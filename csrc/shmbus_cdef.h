/* What cffi reads: the subset of shmbus_ring.h that Python calls.
 * Constants are "..." so their values come from the C header, never from here. */
#define SHMBUS_RING_HEADER_SIZE ...
#define SHMBUS_RING_RECORD_HEADER ...
#define SHMBUS_RING_MIN_CAPACITY ...
#define SHMBUS_RING_MAX_CAPACITY ...
#define SHMBUS_RING_LANES ...

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
#define SHMBUS_ESTALE ...
#define SHMBUS_ECLOSED ...
#define SHMBUS_EFOREIGN ...

typedef struct shmbus_ring shmbus_ring_t;

uint64_t shmbus_ring_segment_size(uint64_t capacity);
uint32_t shmbus_ring_default_max_frame(uint64_t capacity);
uint32_t shmbus_ring_limit_max_frame(uint64_t capacity);

int shmbus_ring_create(const char *shm_name, const char *bell_name, uint64_t capacity,
                       uint32_t max_frame, shmbus_ring_t **out);
int shmbus_ring_attach(const char *shm_name, const char *bell_name, shmbus_ring_t **out);
int shmbus_ring_create_lane(const char *shm_name, const char *bell_name, uint64_t capacity,
                            uint32_t max_frame, shmbus_ring_t **out);
int shmbus_ring_link_lane(shmbus_ring_t *r, uint32_t lane, shmbus_ring_t *lane_ring);
uint32_t shmbus_ring_lanes(const shmbus_ring_t *r);
uint32_t shmbus_lane_of(uint32_t priority);
shmbus_ring_t *shmbus_ring_lane(shmbus_ring_t *r, uint32_t lane);
void shmbus_ring_seal(shmbus_ring_t *r);
void shmbus_ring_wake(shmbus_ring_t *r);
int shmbus_ring_sealed(const shmbus_ring_t *r);
/* Drops one reference, and the last unmaps.  retain adds one (for a buffer
 * handed out that must keep the mapping alive). */
void shmbus_ring_close(shmbus_ring_t *r);
void shmbus_ring_retain(shmbus_ring_t *r);
int shmbus_ring_unlink(const char *shm_name);

uint64_t shmbus_ring_capacity(const shmbus_ring_t *r);
uint32_t shmbus_ring_max_frame(const shmbus_ring_t *r);
uint64_t shmbus_ring_used(const shmbus_ring_t *r);
uint64_t shmbus_ring_head(const shmbus_ring_t *r);
uint64_t shmbus_ring_tail(const shmbus_ring_t *r);
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
int shmbus_ring_wait(shmbus_ring_t *r, int64_t timeout_ns, int64_t spin_ns);
int shmbus_ring_peek(shmbus_ring_t *r, int64_t timeout_ns, int64_t spin_ns, char **payload,
                     uint32_t *len);
int shmbus_ring_release(shmbus_ring_t *r);

int shmbus_ring_unblock(shmbus_ring_t *r, int64_t grace_ns);
int shmbus_ring_test_reserve(shmbus_ring_t *r, uint32_t len, int write_padding);
void shmbus_ring_count_reads(shmbus_ring_t *r, uint64_t *frames, uint64_t *bytes);

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

/* shmbus_stats.h */
#define SHMBUS_STATS_HEADER_SIZE ...
#define SHMBUS_STATS_SLOT_SIZE ...
#define SHMBUS_STATS_AGENT_SLOTS ...
#define SHMBUS_STATS_TOPIC_SLOTS ...
#define SHMBUS_STATS_NAME ...
#define SHMBUS_STATS_TOPIC_NAME ...
#define SHMBUS_STATS_HEARTBEAT_AT ...
#define SHMBUS_STAT_SENT ...
#define SHMBUS_STAT_RECEIVED ...
#define SHMBUS_STAT_FAILED ...
#define SHMBUS_STAT_BYTES_SENT ...
#define SHMBUS_STAT_BYTES_RECEIVED ...
#define SHMBUS_STAT_DROPPED ...
#define SHMBUS_STAT_RETRIED ...
#define SHMBUS_STAT_DEAD_LETTERED ...
#define SHMBUS_STAT_OWN ...
#define SHMBUS_STAT_DELIVERED ...
#define SHMBUS_STAT_DELIVERED_BYTES ...
#define SHMBUS_STAT_PUBLISHED ...
#define SHMBUS_STAT_TOPIC_DELIVERED ...
#define SHMBUS_STAT_TOPIC_BYTES ...
#define SHMBUS_STAT_DLQ_SIZE ...
#define SHMBUS_STAT_DLQ_TOTAL ...
#define SHMBUS_STAT_DLQ_EVICTED ...

typedef struct shmbus_stats shmbus_stats_t;

uint64_t shmbus_stats_segment_size(void);
int shmbus_stats_create(const char *name, shmbus_stats_t **out);
int shmbus_stats_attach(const char *name, shmbus_stats_t **out);
void shmbus_stats_close(shmbus_stats_t *s);
const void *shmbus_stats_base(const shmbus_stats_t *s);
uint64_t *shmbus_stats_agent(shmbus_stats_t *s, uint32_t slot);
int shmbus_stats_agent_open(shmbus_stats_t *s, uint32_t slot, uint64_t agent_id, int64_t pid,
                            const char *name, uint32_t name_len);
int shmbus_stats_agent_close(shmbus_stats_t *s, uint32_t slot);
uint64_t *shmbus_stats_topic(shmbus_stats_t *s, const char *topic, uint32_t len);
uint64_t *shmbus_stats_heartbeat(shmbus_stats_t *s, uint32_t slot);
uint64_t *shmbus_stats_bus(shmbus_stats_t *s);
void shmbus_stats_add(uint64_t *counters, uint32_t index, uint64_t n);
void shmbus_stats_set(uint64_t *counters, uint32_t index, uint64_t value);

/* shmbus_send.h */
typedef struct shmbus_sender shmbus_sender_t;
typedef struct shmbus_route shmbus_route_t;

shmbus_sender_t *shmbus_sender_new(uint32_t agent_id, const char *name, uint32_t name_len,
                                   uint64_t *counters, const shmbus_table_t *routes);
void shmbus_sender_free(shmbus_sender_t *s);
uint64_t shmbus_sender_next_id(shmbus_sender_t *s);
shmbus_route_t *shmbus_route_new(shmbus_sender_t *s, uint64_t version, uint32_t recipient_id,
                                 const char *recipient, uint32_t recipient_len, const char *topic,
                                 uint32_t topic_len, uint64_t *topic_counters, uint32_t targets);
int shmbus_route_set(shmbus_route_t *rt, uint32_t target, shmbus_ring_t *ring,
                     uint64_t *counters);
int shmbus_route_lossy(shmbus_route_t *rt, uint32_t target);
void shmbus_route_free(shmbus_route_t *rt);
uint32_t shmbus_route_written(const shmbus_route_t *rt, uint32_t target);
int shmbus_route_error(const shmbus_route_t *rt, uint32_t target);
uint64_t shmbus_route_last_id(const shmbus_route_t *rt);
int shmbus_route_resume(shmbus_route_t *rt, uint32_t target, int64_t timeout_ns);
int64_t shmbus_send(shmbus_route_t *rt, uint32_t kind, uint32_t flags, uint32_t priority,
                    uint32_t ttl_ms, const char *payload, uint32_t len, int64_t timeout_ns);
int64_t shmbus_send_ex(shmbus_route_t *rt, uint32_t kind, uint32_t flags, uint32_t priority,
                       uint32_t ttl_ms, const char *payload, uint32_t len, int64_t timeout_ns,
                       uint64_t request_id, uint64_t correlation_id, uint32_t attempts);
int64_t shmbus_send_many(shmbus_route_t *rt, uint32_t kind, uint32_t priority, uint32_t ttl_ms,
                         const char *blob, const uint32_t *lens, const uint8_t *flags,
                         uint32_t count, int64_t timeout_ns);

/* shmbus_bridge.h */
#define SHMBUS_LINK_STOP ...
#define SHMBUS_LINK_EOF ...
#define SHMBUS_LINK_BAD ...
#define SHMBUS_LINK_IOERR ...
#define SHMBUS_LINK_MISS ...
#define SHMBUS_LINK_DEAD ...
#define SHMBUS_LINK_PUBLISH ...
#define SHMBUS_DEAD_NOAGENT ...
#define SHMBUS_DEAD_LEFT ...
#define SHMBUS_DEAD_FULL ...
#define SHMBUS_DEAD_TOOBIG ...
#define SHMBUS_DEAD_FAILED ...

typedef struct shmbus_link shmbus_link_t;
typedef struct shmbus_hub shmbus_hub_t;

typedef struct {
    const char *frame;
    uint32_t len;
    int32_t why;
    int32_t rc;
    uint32_t policy;
    uint32_t wait_ms;
    uint32_t name_len;
    uint64_t used;
    uint64_t capacity;
    const char *name;
} shmbus_dead_t;

shmbus_link_t *shmbus_link_new(int fd, const char *name, uint32_t name_len, uint32_t agent_id,
                               uint64_t types, uint64_t *counters, uint64_t *beat,
                               const shmbus_table_t *routes, shmbus_ring_t *inbox);
void shmbus_link_drain(shmbus_link_t *l, int64_t wait_ns);
void shmbus_link_stop(shmbus_link_t *l);
void shmbus_link_close(shmbus_link_t *l);
void shmbus_link_free(shmbus_link_t *l);
int shmbus_link_up(shmbus_link_t *l);
int shmbus_link_down(shmbus_link_t *l);
const char *shmbus_link_reason(const shmbus_link_t *l);
int shmbus_link_errno(const shmbus_link_t *l);
shmbus_hub_t *shmbus_hub_new(int64_t spin_ns);
int shmbus_hub_run(shmbus_hub_t *h);
void shmbus_hub_stop(shmbus_hub_t *h);
void shmbus_hub_free(shmbus_hub_t *h);
int shmbus_link_hub(shmbus_link_t *l, shmbus_hub_t *h);
void shmbus_link_unhub(shmbus_link_t *l);
int shmbus_link_miss(const shmbus_link_t *l, const char **where, uint32_t *len);
int shmbus_link_route(shmbus_link_t *l, int is_topic, const char *where, uint32_t len,
                      uint64_t version, int known, uint64_t *topic_counters, uint32_t targets);
int shmbus_link_route_target(shmbus_link_t *l, uint32_t i, shmbus_ring_t *ring,
                             uint64_t *counters, const char *name, uint32_t name_len, int lossy);
int shmbus_link_route_peer(shmbus_link_t *l, uint32_t i, shmbus_link_t *peer);
uint32_t shmbus_link_dead_count(const shmbus_link_t *l);
const shmbus_dead_t *shmbus_link_dead(const shmbus_link_t *l, uint32_t i);
uint32_t shmbus_link_lost_count(const shmbus_link_t *l);
int shmbus_link_lost(const shmbus_link_t *l, uint32_t i, const char **frames, const uint32_t **lens,
                     uint32_t *count);
#define SHMBUS_LINK_HEAD ...
int64_t shmbus_record_build(const char *names, uint32_t sender_len, uint32_t recipient_len,
                            uint32_t topic_len, uint32_t sender_id, uint32_t recipient_id,
                            uint32_t kind, uint32_t priority, uint32_t ttl_ms, uint32_t info,
                            uint64_t first_id, uint64_t request_id, uint64_t correlation_id,
                            int64_t timestamp_ns, const char *blob, const uint32_t *lens,
                            const uint8_t *flags, uint32_t count, char *out, uint64_t cap);
int64_t shmbus_record_send(int fd, uint32_t taken, uint32_t granted, const char *names,
                           uint32_t sender_len, uint32_t recipient_len, uint32_t topic_len,
                           uint32_t sender_id, uint32_t recipient_id, uint32_t kind,
                           uint32_t priority, uint32_t ttl_ms, uint32_t info, uint64_t id,
                           uint64_t request_id, uint64_t correlation_id, const char *payload,
                           uint32_t len, uint32_t flags, char *out, uint64_t cap, int64_t *sent);

/* shmbus_ring.h: waiting beside the reader (shmbus_waiter.h) */
uint32_t shmbus_ring_bell(const shmbus_ring_t *r);
int shmbus_ring_wait_once(shmbus_ring_t *r, int64_t spin_ns, uint32_t seq);

/* shmbus_waiter.h */
typedef struct shmbus_waiter shmbus_waiter_t;

int shmbus_waiter_new(shmbus_ring_t *inbox, shmbus_waiter_t **out);
int shmbus_waiter_fd(const shmbus_waiter_t *w);
int shmbus_waiter_arm(shmbus_waiter_t *w, int64_t spin_ns);
int shmbus_waiter_clear(shmbus_waiter_t *w);
void shmbus_waiter_free(shmbus_waiter_t *w);
