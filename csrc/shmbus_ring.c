/* shmbus ring: see shmbus_ring.h for the layout and the algorithm. */
#define _GNU_SOURCE
#include "shmbus_ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint64_t capacity;
    uint32_t max_frame;
    uint32_t reserved;
} ring_meta;

typedef struct {
    alignas(SHMBUS_RING_LINE) ring_meta meta;
    alignas(SHMBUS_RING_LINE) _Atomic uint64_t tail;
    alignas(SHMBUS_RING_LINE) _Atomic uint64_t head_cache;
    alignas(SHMBUS_RING_LINE) _Atomic uint64_t head;
    alignas(SHMBUS_RING_LINE) _Atomic uint64_t correlation;
    alignas(SHMBUS_RING_LINE) _Atomic int64_t heartbeat;
    alignas(SHMBUS_RING_LINE) _Atomic uint32_t sleeping;
    _Atomic uint32_t bell; /* lane 0's is the inbox's doorbell: a futex word */
    alignas(SHMBUS_RING_LINE) _Atomic uint32_t sealed;
    alignas(SHMBUS_RING_HEADER_SIZE) uint8_t data[];
} ring_segment;

_Static_assert(offsetof(ring_segment, meta) == 0, "meta at 0");
_Static_assert(offsetof(ring_segment, tail) == 128, "tail at 128");
_Static_assert(offsetof(ring_segment, head_cache) == 256, "head cache at 256");
_Static_assert(offsetof(ring_segment, head) == 384, "head at 384");
_Static_assert(offsetof(ring_segment, correlation) == 512, "correlation at 512");
_Static_assert(offsetof(ring_segment, heartbeat) == 640, "heartbeat at 640");
_Static_assert(offsetof(ring_segment, sleeping) == 768, "sleeping at 768");
_Static_assert(offsetof(ring_segment, bell) == 772, "the doorbell beside it");
_Static_assert(offsetof(ring_segment, sealed) == 896, "sealed at 896");
_Static_assert(offsetof(ring_segment, data) == SHMBUS_RING_HEADER_SIZE, "data after the header");
_Static_assert(sizeof(_Atomic int32_t) == 4 && alignof(_Atomic int32_t) == 4,
               "record lengths are plain 32-bit words in the data area");
_Static_assert(sizeof(_Atomic uint64_t) == 8, "positions are 64-bit words");

/* The process-local view of a mapped ring. */
struct shmbus_ring {
    ring_segment *seg;
    uint8_t *data;
    uint64_t capacity;
    uint64_t mask;
    uint32_t max_frame;
    uint64_t map_size;
    /* The inbox's doorbell: &seg->bell for lane 0; for a lane, the word in
     * lane 0's header, mapped on its own (bell_map) so that it lives as long
     * as this view whatever becomes of lane 0's. */
    _Atomic uint32_t *bell;
    void *bell_map;
    int64_t peeked; /* data index of the record handed out by peek, or -1 */
    /* The reader's last look at the tail: tails only grow, so it stays a
     * valid bound, and the producers' contended line is read only when a
     * record reaches past it. */
    uint64_t tail_seen;
    /* Holders of this mapping: the ring object itself and every buffer it
     * handed out (a claim or a read_view, and whatever Python derived from
     * them), so no view outlives the munmap however long it is kept. */
    _Atomic int refs;
    _Atomic uint64_t *count_frames, *count_bytes; /* see shmbus_ring_count_reads */
    /* Lanes 1.. of this inbox (lane[0] unused: it is this ring), linked in
     * order, so lanes - 1 are set; the peek of a record on a lane remembers
     * which ring it came from. */
    struct shmbus_ring *lane[SHMBUS_RING_LANES];
    uint32_t lanes;
    struct shmbus_ring *peeked_ring;
};

#define ALIGN_UP(x) (((x) + (SHMBUS_RING_ALIGNMENT - 1)) & ~(uint64_t)(SHMBUS_RING_ALIGNMENT - 1))

static inline _Atomic int32_t *length_at(const shmbus_ring_t *r, uint64_t index)
{
    return (_Atomic int32_t *)(void *)(r->data + index);
}

static inline _Atomic int32_t *type_at(const shmbus_ring_t *r, uint64_t index)
{
    return (_Atomic int32_t *)(void *)(r->data + index + 4);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The consumer's heartbeat needs liveness, not precision: the coarse clock
 * (one tick, a few ms) costs a fraction of the precise one on every read. */
static inline void beat(shmbus_ring_t *r)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    atomic_store_explicit(&r->seg->heartbeat, (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec,
                          memory_order_relaxed);
}

static inline int64_t deadline_after(int64_t timeout_ns)
{
    return timeout_ns < 0 ? INT64_MAX : now_ns() + timeout_ns;
}

/* ------------------------------------------------------------------ sizes */

uint64_t shmbus_ring_segment_size(uint64_t capacity)
{
    return SHMBUS_RING_HEADER_SIZE + capacity;
}

/* Largest payload for which an empty ring always has room wherever its tail
 * stands: a record must fit either before the end or before the head. */
uint32_t shmbus_ring_limit_max_frame(uint64_t capacity)
{
    uint64_t limit = capacity / 2 - SHMBUS_RING_RECORD_HEADER;
    return limit > INT32_MAX - 64 ? (uint32_t)(INT32_MAX - 64) : (uint32_t)limit;
}

/* Agrona's choice: an eighth of the ring, so one frame never starves others. */
uint32_t shmbus_ring_default_max_frame(uint64_t capacity)
{
    return (uint32_t)(capacity / 8 - SHMBUS_RING_RECORD_HEADER);
}

static bool capacity_ok(uint64_t capacity)
{
    return capacity >= SHMBUS_RING_MIN_CAPACITY && capacity <= SHMBUS_RING_MAX_CAPACITY &&
           (capacity & (capacity - 1)) == 0;
}

/* ------------------------------------------------------ create and attach */

/* The page of lane 0's header that holds the doorbell, for a lane. */
#define BELL_MAP_SIZE 4096
_Static_assert(SHMBUS_RING_HEADER_SIZE <= BELL_MAP_SIZE, "the bell's page holds the header");

/* The doorbell of a ring: its own word (bell_name NULL, lane 0), or lane
 * 0's, mapped from the segment bell_name (a lane). */
static int open_bell(ring_segment *seg, const char *bell_name, _Atomic uint32_t **bell, void **map)
{
    *map = NULL;
    if (!bell_name) {
        *bell = &seg->bell;
        return SHMBUS_OK;
    }
    int rc = shmbus_seg_map_head(bell_name, BELL_MAP_SIZE, map);
    if (rc != SHMBUS_OK)
        return rc;
    ring_segment *lane0 = *map;
    if (atomic_load_explicit((_Atomic uint64_t *)&lane0->meta.magic, memory_order_acquire) !=
        SHMBUS_RING_MAGIC) {
        shmbus_seg_unmap(*map, BELL_MAP_SIZE);
        *map = NULL;
        return SHMBUS_EBADSEG;
    }
    *bell = &lane0->bell;
    return SHMBUS_OK;
}

static shmbus_ring_t *new_view(ring_segment *seg, uint64_t map_size, uint64_t capacity,
                               uint32_t max_frame, _Atomic uint32_t *bell, void *bell_map)
{
    shmbus_ring_t *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->bell_map = bell_map;
    r->seg = seg;
    r->data = seg->data;
    r->capacity = capacity;
    r->mask = capacity - 1;
    r->max_frame = max_frame;
    r->map_size = map_size;
    r->bell = bell;
    r->peeked = -1;
    r->lanes = 1;
    atomic_init(&r->refs, 1);
    return r;
}

static int create_ring(const char *shm_name, const char *bell_name, uint64_t capacity,
                       uint32_t max_frame, bool own_bell, shmbus_ring_t **out)
{
    if (!capacity_ok(capacity) || max_frame == 0 || max_frame > shmbus_ring_limit_max_frame(capacity))
        return SHMBUS_EINVAL;
    uint64_t size = shmbus_ring_segment_size(capacity);
    void *base;
    int rc = shmbus_seg_create(shm_name, size, &base);
    if (rc != SHMBUS_OK)
        return rc;
    ring_segment *seg = base;
    _Atomic uint32_t *bell;
    void *bell_map;
    /* Lane 0 rings its own word; a lane, lane 0's (which must exist). */
    rc = open_bell(seg, own_bell ? NULL : bell_name, &bell, &bell_map);
    shmbus_ring_t *r = NULL;
    if (rc == SHMBUS_OK) {
        r = new_view(seg, size, capacity, max_frame, bell, bell_map);
        if (!r) {
            shmbus_seg_unmap(bell_map, BELL_MAP_SIZE);
            errno = ENOMEM;
            rc = SHMBUS_ESYS;
        }
    }
    if (!r) {
        int saved = errno;
        shmbus_seg_unmap(seg, size);
        shmbus_seg_unlink(shm_name);
        errno = saved;
        return rc;
    }
    seg->meta.version = SHMBUS_RING_VERSION;
    seg->meta.header_size = SHMBUS_RING_HEADER_SIZE;
    seg->meta.capacity = capacity;
    seg->meta.max_frame = max_frame;
    /* M1: the magic goes last, with release: an attacher that sees it
     * (acquire, M2 in shmbus_ring_attach) sees the rest of the meta. */
    atomic_store_explicit((_Atomic uint64_t *)&seg->meta.magic, SHMBUS_RING_MAGIC,
                          memory_order_release);
    *out = r;
    return SHMBUS_OK;
}

int shmbus_ring_create(const char *shm_name, const char *bell_name, uint64_t capacity,
                       uint32_t max_frame, shmbus_ring_t **out)
{
    return create_ring(shm_name, bell_name, capacity, max_frame, true, out);
}

int shmbus_ring_create_lane(const char *shm_name, const char *bell_name, uint64_t capacity,
                            uint32_t max_frame, shmbus_ring_t **out)
{
    return create_ring(shm_name, bell_name, capacity, max_frame, false, out);
}

int shmbus_ring_link_lane(shmbus_ring_t *r, uint32_t lane, shmbus_ring_t *lane_ring)
{
    if (!r || !lane_ring || lane_ring == r || lane != r->lanes || lane >= SHMBUS_RING_LANES ||
        lane_ring->lanes != 1)
        return SHMBUS_EINVAL;
    shmbus_ring_retain(lane_ring);
    r->lane[lane] = lane_ring;
    r->lanes = lane + 1;
    return SHMBUS_OK;
}

uint32_t shmbus_ring_lanes(const shmbus_ring_t *r) { return r->lanes; }

uint32_t shmbus_lane_of(uint32_t priority) { return priority >= 67 ? 2 : priority >= 34 ? 1 : 0; }

shmbus_ring_t *shmbus_ring_lane(shmbus_ring_t *r, uint32_t lane)
{
    if (lane >= r->lanes)
        lane = r->lanes - 1;
    return lane ? r->lane[lane] : r;
}

void shmbus_ring_seal(shmbus_ring_t *r)
{
    /* X1: store the seal, then (the caller) load the tail, both seq_cst;
     * pairs with X2 in claim_capacity_ex. */
    for (uint32_t k = 0; k < r->lanes; k++)
        atomic_store_explicit(&(k ? r->lane[k] : r)->seg->sealed, 1, memory_order_seq_cst);
}

int shmbus_ring_sealed(const shmbus_ring_t *r)
{
    return (int)atomic_load_explicit(&r->seg->sealed, memory_order_relaxed);
}

/* Lane k of a reader's ring: the ring itself for 0. */
static inline shmbus_ring_t *lane_ring(shmbus_ring_t *r, uint32_t k) { return k ? r->lane[k] : r; }

int shmbus_ring_attach(const char *shm_name, const char *bell_name, shmbus_ring_t **out)
{
    void *base;
    uint64_t size;
    int rc = shmbus_seg_attach(shm_name, SHMBUS_RING_HEADER_SIZE + SHMBUS_RING_MIN_CAPACITY,
                               SHMBUS_RING_HEADER_SIZE + SHMBUS_RING_MAX_CAPACITY, &base, &size);
    if (rc != SHMBUS_OK)
        return rc;
    ring_segment *seg = base;
    /* M2: pairs with M1 in shmbus_ring_create. */
    uint64_t magic = atomic_load_explicit((_Atomic uint64_t *)&seg->meta.magic, memory_order_acquire);
    ring_meta meta = seg->meta;
    _Atomic uint32_t *bell = NULL;
    void *bell_map = NULL;
    rc = SHMBUS_EBADSEG;
    if (magic == SHMBUS_RING_MAGIC && meta.version == SHMBUS_RING_VERSION &&
        meta.header_size == SHMBUS_RING_HEADER_SIZE && capacity_ok(meta.capacity) &&
        shmbus_ring_segment_size(meta.capacity) == size && meta.max_frame != 0 &&
        meta.max_frame <= shmbus_ring_limit_max_frame(meta.capacity))
        rc = open_bell(seg, bell_name, &bell, &bell_map);
    shmbus_ring_t *r = NULL;
    if (rc == SHMBUS_OK) {
        r = new_view(seg, size, meta.capacity, meta.max_frame, bell, bell_map);
        if (!r) {
            shmbus_seg_unmap(bell_map, BELL_MAP_SIZE);
            errno = ENOMEM;
            rc = SHMBUS_ESYS;
        }
    }
    if (!r) {
        shmbus_seg_unmap(seg, size);
        return rc;
    }
    *out = r;
    return SHMBUS_OK;
}

void shmbus_ring_retain(shmbus_ring_t *r)
{
    atomic_fetch_add_explicit(&r->refs, 1, memory_order_relaxed);
}

void shmbus_ring_close(shmbus_ring_t *r)
{
    if (!r)
        return;
    /* acq_rel: every use by a holder happens before the unmap by the last. */
    if (atomic_fetch_sub_explicit(&r->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (uint32_t k = 1; k < r->lanes; k++)
        shmbus_ring_close(r->lane[k]);
    shmbus_seg_unmap(r->bell_map, BELL_MAP_SIZE);
    shmbus_seg_unmap(r->seg, r->map_size);
    free(r);
}

int shmbus_ring_unlink(const char *shm_name) { return shmbus_seg_unlink(shm_name); }

/* ------------------------------------------------------------ accessors */

uint64_t shmbus_ring_capacity(const shmbus_ring_t *r) { return r->capacity; }
uint32_t shmbus_ring_max_frame(const shmbus_ring_t *r) { return r->max_frame; }

uint64_t shmbus_ring_used(const shmbus_ring_t *r)
{
    uint64_t head = atomic_load_explicit(&r->seg->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&r->seg->tail, memory_order_acquire);
    uint64_t used = tail - head;
    return used > r->capacity ? r->capacity : used;
}

uint64_t shmbus_ring_head(const shmbus_ring_t *r)
{
    return atomic_load_explicit(&r->seg->head, memory_order_acquire);
}

uint64_t shmbus_ring_tail(const shmbus_ring_t *r)
{
    /* seq_cst: after shmbus_ring_seal, this is X1's load of the tail. */
    return atomic_load_explicit(&r->seg->tail, memory_order_seq_cst);
}

int64_t shmbus_ring_heartbeat(const shmbus_ring_t *r)
{
    return atomic_load_explicit(&r->seg->heartbeat, memory_order_relaxed);
}

uint64_t shmbus_ring_next_correlation(shmbus_ring_t *r)
{
    return atomic_fetch_add_explicit(&r->seg->correlation, 1, memory_order_relaxed) + 1;
}

/* ------------------------------------------------------------- doorbell */

/* The doorbell is a futex word in shared memory, not a POSIX semaphore:
 * whatever another process writes over it (a crashed or hostile one), the
 * kernel only compares and wakes, so the worst it can do is a spurious or
 * a missed wake-up of this one inbox, never abort a process that rings it
 * (glibc's sem_post aborts on a corrupt semaphore).  A missed wake-up costs
 * at most BELL_NAP: no sleep on the bell is longer. */
#define BELL_NAP_NS 1000000000LL

static void bell_ring(_Atomic uint32_t *bell)
{
    /* Release: a sleeper whose load of the word (acquire) sees this
     * increment sees what was committed before it. */
    atomic_fetch_add_explicit(bell, 1, memory_order_release);
    syscall(SYS_futex, (uint32_t *)bell, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static inline uint32_t bell_seq(const shmbus_ring_t *r)
{
    return atomic_load_explicit(r->bell, memory_order_acquire);
}

/* Sleep while the bell still reads `seq`, up to `deadline` (CLOCK_MONOTONIC
 * ns, INT64_MAX for ever) and at most BELL_NAP_NS.  SHMBUS_EINTR on a signal,
 * else SHMBUS_OK (woken, moved on, or timed out: the caller looks again). */
static int bell_sleep(shmbus_ring_t *r, uint32_t seq, int64_t deadline)
{
    int64_t until = now_ns() + BELL_NAP_NS;
    if (deadline < until)
        until = deadline;
    struct timespec ts = {.tv_sec = until / 1000000000LL, .tv_nsec = until % 1000000000LL};
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time; no private
     * flag: the word is shared between processes. */
    long rc = syscall(SYS_futex, (uint32_t *)r->bell, FUTEX_WAIT_BITSET, seq, &ts, NULL,
                      FUTEX_BITSET_MATCH_ANY);
    return rc != 0 && errno == EINTR ? SHMBUS_EINTR : SHMBUS_OK;
}

void shmbus_ring_wake(shmbus_ring_t *r)
{
    if (r)
        bell_ring(r->bell);
}

/* Called by a producer after it committed.  D1 pairs with S1 in
 * wait_for_data: both sides store, fence, then load the other's word, so
 * either the consumer sees the committed length or we see it sleeping. */
static inline void ring_doorbell(shmbus_ring_t *r)
{
    atomic_thread_fence(memory_order_seq_cst); /* D1 */
    if (atomic_load_explicit(&r->seg->sleeping, memory_order_relaxed) &&
        atomic_exchange_explicit(&r->seg->sleeping, 0, memory_order_relaxed))
        bell_ring(r->bell);
}

static inline bool has_data(const shmbus_ring_t *r)
{
    uint64_t head = atomic_load_explicit(&r->seg->head, memory_order_relaxed);
    uint64_t index = head & r->mask & ~(uint64_t)(SHMBUS_RING_ALIGNMENT - 1);
    return atomic_load_explicit(length_at(r, index), memory_order_relaxed) > 0;
}

static inline bool any_data(shmbus_ring_t *r)
{
    for (uint32_t k = r->lanes; k-- > 0;)
        if (has_data(lane_ring(r, k)))
            return true;
    return false;
}

/* Every lane's flag: a producer on any lane must see it (S1/D1 per lane). */
static inline void set_sleeping(shmbus_ring_t *r, uint32_t value)
{
    for (uint32_t k = 0; k < r->lanes; k++)
        atomic_store_explicit(&lane_ring(r, k)->seg->sleeping, value, memory_order_relaxed);
}

/* Look at the lanes until spin_until; true once one has a record.  Yield
 * now and then while spinning: when the writer we wait for shares our CPU
 * (a loaded or small machine), pure spinning would keep it from running for
 * the whole spin; with a CPU to ourselves, a yield returns at once. */
static bool spin_for_data(shmbus_ring_t *r, int64_t spin_until)
{
    for (unsigned i = 0;; i++) {
        if (any_data(r))
            return true;
        if ((i & 63) == 0) {
            if (now_ns() >= spin_until)
                return false;
            sched_yield();
        }
        cpu_relax();
    }
}

/* Spin until spin_ns has passed, then sleep on the bell until deadline.
 * The lanes share the bell, so one wait covers them all. */
static int wait_for_data(shmbus_ring_t *r, int64_t deadline, int64_t spin_ns)
{
    int64_t now = now_ns();
    int64_t spin_until = spin_ns > 0 ? now + spin_ns : now;
    if (spin_until > deadline)
        spin_until = deadline;
    if (spin_for_data(r, spin_until))
        return SHMBUS_OK;
    for (;;) {
        beat(r);
        set_sleeping(r, 1);
        /* The word before the look: a ring after it makes the sleep return. */
        uint32_t seq = bell_seq(r);
        atomic_thread_fence(memory_order_seq_cst); /* S1: pairs with D1 in ring_doorbell */
        if (any_data(r)) {
            set_sleeping(r, 0);
            return SHMBUS_OK;
        }
        if (now_ns() >= deadline) {
            set_sleeping(r, 0);
            return SHMBUS_ETIMEDOUT;
        }
        int rc = bell_sleep(r, seq, deadline);
        set_sleeping(r, 0);
        if (rc == SHMBUS_EINTR)
            return SHMBUS_EINTR;
        /* Woken, timed out, a nap's end or a stale ring: look again. */
    }
}

int shmbus_ring_wait(shmbus_ring_t *r, int64_t timeout_ns, int64_t spin_ns)
{
    if (!r)
        return SHMBUS_EINVAL;
    if (any_data(r))
        return SHMBUS_OK;
    if (timeout_ns == 0)
        return SHMBUS_EAGAIN;
    beat(r);
    return wait_for_data(r, deadline_after(timeout_ns), spin_ns);
}

/* Back off while the ring is full: spin, yield, then sleep up to 1 ms, so a
 * blocked producer never burns a core. */
static int backoff(unsigned attempt, int64_t deadline)
{
    int64_t now = now_ns();
    if (now >= deadline)
        return SHMBUS_ETIMEDOUT;
    if (attempt < 16) {
        for (int i = 0; i < 32; i++)
            cpu_relax();
        return SHMBUS_OK;
    }
    if (attempt < 32) {
        sched_yield();
        return SHMBUS_OK;
    }
    unsigned shift = attempt - 32 > 10 ? 10 : attempt - 32;
    int64_t pause = 1000LL << shift; /* 1 us .. ~1 ms */
    if (pause > deadline - now)
        pause = deadline - now;
    struct timespec ts = {.tv_sec = 0, .tv_nsec = pause};
    if (nanosleep(&ts, NULL) != 0 && errno == EINTR)
        return SHMBUS_EINTR;
    return SHMBUS_OK;
}

/* -------------------------------------------------------------- writing */

/* Reserve `required` aligned bytes; returns the data index of the record or
 * a negative code.  Agrona's claimCapacity, with every position checked. */
static inline int64_t claim_capacity_ex(shmbus_ring_t *r, uint64_t required, bool write_padding)
{
    ring_segment *seg = r->seg;
    const uint64_t capacity = r->capacity;
    /* H1: acquire, pairs with H2 below in another producer, which itself
     * acquired the head (H3) that the consumer released (C2) after zeroing:
     * space we reuse is zeroed before we write to it. */
    uint64_t head = atomic_load_explicit(&seg->head_cache, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&seg->tail, memory_order_relaxed);
    uint64_t padding, tail_index;
    for (;;) {
        if (tail & (SHMBUS_RING_ALIGNMENT - 1))
            return SHMBUS_ECORRUPT; /* tails only ever move by aligned steps */
        if (tail - head > capacity || required > capacity - (tail - head)) {
            head = atomic_load_explicit(&seg->head, memory_order_acquire); /* H3 */
            if (tail - head > capacity || required > capacity - (tail - head)) {
                /* Judge only a current tail: while we were away, other
                 * producers may have moved it and the consumer followed,
                 * so the head can be past our snapshot of the tail. */
                uint64_t now = atomic_load_explicit(&seg->tail, memory_order_relaxed);
                if (now != tail) {
                    tail = now;
                    continue;
                }
                return tail - head > capacity ? SHMBUS_ECORRUPT : SHMBUS_EAGAIN;
            }
            atomic_store_explicit(&seg->head_cache, head, memory_order_release); /* H2 */
        }
        padding = 0;
        tail_index = tail & r->mask;
        uint64_t to_end = capacity - tail_index;
        if (required > to_end) {
            /* The record goes at index 0 and must end before the head.  With
             * max_frame <= capacity / 2 an empty ring always passes one of
             * the two checks, so this never refuses an empty ring. */
            if (required > (head & r->mask)) {
                head = atomic_load_explicit(&seg->head, memory_order_acquire); /* H3 */
                if (tail - head > capacity || required > (head & r->mask)) {
                    uint64_t now = atomic_load_explicit(&seg->tail, memory_order_relaxed);
                    if (now != tail) {
                        tail = now; /* stale snapshot, as above */
                        continue;
                    }
                    return tail - head > capacity ? SHMBUS_ECORRUPT : SHMBUS_EAGAIN;
                }
                atomic_store_explicit(&seg->head_cache, head, memory_order_release); /* H2 */
            }
            padding = to_end;
        }
        /* A1: the CAS makes [tail, tail + padding + required) ours alone; on
         * failure it reloads tail and we judge again.  seq_cst on success for
         * X2 below (on x86 the same locked instruction as relaxed). */
        if (atomic_compare_exchange_weak_explicit(&seg->tail, &tail, tail + required + padding,
                                                  memory_order_seq_cst, memory_order_relaxed))
            break;
    }
    if (padding && write_padding) {
        atomic_store_explicit(type_at(r, tail_index), SHMBUS_RING_PADDING, memory_order_relaxed);
        /* W2: release, pairs with C1 in read_block. */
        atomic_store_explicit(length_at(r, tail_index), (int32_t)padding, memory_order_release);
    }
    uint64_t index = padding ? 0 : tail_index;
    /* X2: pairs with X1 in shmbus_ring_seal (both seq_cst): either the sealer's
     * load of the tail saw our CAS, so its drain waits for this record, or we
     * see the seal here and hand the space back as padding, never to commit. */
    if (write_padding && atomic_load_explicit(&seg->sealed, memory_order_seq_cst)) {
        atomic_store_explicit(type_at(r, index), SHMBUS_RING_PADDING, memory_order_relaxed);
        atomic_store_explicit(length_at(r, index), (int32_t)required, memory_order_release);
        ring_doorbell(r);
        return SHMBUS_ECLOSED;
    }
    return (int64_t)index;
}

static int64_t claim_capacity(shmbus_ring_t *r, uint64_t required)
{
    return claim_capacity_ex(r, required, true);
}

/* Start a record: its length goes in negative so the consumer waits for it
 * and unblock() can tell it from free space. */
static inline void begin_record(shmbus_ring_t *r, uint64_t index, int32_t record_len)
{
    atomic_store_explicit(length_at(r, index), -record_len, memory_order_relaxed);
    /* W1: the negative length is visible before any payload byte. */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(type_at(r, index), 1, memory_order_relaxed);
}

static inline void commit_record(shmbus_ring_t *r, uint64_t index, int32_t record_len)
{
    /* W2: release, pairs with C1 in read_block: payload before length. */
    atomic_store_explicit(length_at(r, index), record_len, memory_order_release);
}

static int claim_wait(shmbus_ring_t *r, uint64_t required, int64_t timeout_ns, int64_t *deadline,
                      unsigned *attempt, int64_t *index)
{
    for (;;) {
        int64_t idx = claim_capacity(r, required);
        if (idx >= 0) {
            *index = idx;
            return SHMBUS_OK;
        }
        if (idx != SHMBUS_EAGAIN || timeout_ns == 0)
            return (int)idx;
        if (atomic_load_explicit(&r->seg->sealed, memory_order_relaxed))
            return SHMBUS_ECLOSED; /* no reader will ever make the room */
        if (*deadline == 0)
            *deadline = deadline_after(timeout_ns);
        /* Wake the consumer before we wait: it must run to make the room we
         * wait for, and records this batch already committed would
         * otherwise sit unannounced until the batch ends. */
        ring_doorbell(r);
        int rc = backoff((*attempt)++, *deadline);
        if (rc != SHMBUS_OK)
            return rc;
    }
}

int shmbus_ring_write_many(shmbus_ring_t *r, const char *blob, const uint32_t *lens, uint32_t count,
                           int64_t timeout_ns, uint32_t *written)
{
    if (!r)
        return SHMBUS_EINVAL; /* closed */
    for (uint32_t i = 0; i < count; i++)
        if (lens[i] > r->max_frame)
            return SHMBUS_ETOOBIG;
    int64_t deadline = 0;
    unsigned attempt = 0;
    uint32_t done = 0;
    int rc = SHMBUS_OK;
    for (; done < count; done++) {
        uint32_t len = lens[done];
        int32_t record_len = (int32_t)(len + SHMBUS_RING_RECORD_HEADER);
        int64_t index;
        rc = claim_wait(r, ALIGN_UP((uint64_t)record_len), timeout_ns, &deadline, &attempt, &index);
        if (rc != SHMBUS_OK)
            break;
        begin_record(r, (uint64_t)index, record_len);
        memcpy(r->data + index + SHMBUS_RING_RECORD_HEADER, blob, len);
        commit_record(r, (uint64_t)index, record_len);
        blob += len;
    }
    *written = done;
    if (done)
        ring_doorbell(r);
    return done == count ? SHMBUS_OK : rc;
}

int shmbus_ring_write(shmbus_ring_t *r, const char *data, uint32_t len, int64_t timeout_ns)
{
    uint32_t written;
    return shmbus_ring_write_many(r, data, &len, 1, timeout_ns, &written);
}

int shmbus_ring_claim(shmbus_ring_t *r, uint32_t len, int64_t timeout_ns, int64_t *index,
                      char **payload)
{
    if (!r)
        return SHMBUS_EINVAL; /* closed */
    if (len > r->max_frame)
        return SHMBUS_ETOOBIG;
    int32_t record_len = (int32_t)(len + SHMBUS_RING_RECORD_HEADER);
    int64_t deadline = 0;
    unsigned attempt = 0;
    int rc = claim_wait(r, ALIGN_UP((uint64_t)record_len), timeout_ns, &deadline, &attempt, index);
    if (rc != SHMBUS_OK)
        return rc;
    begin_record(r, (uint64_t)*index, record_len);
    *payload = (char *)r->data + *index + SHMBUS_RING_RECORD_HEADER;
    return SHMBUS_OK;
}

static int claimed_length(shmbus_ring_t *r, int64_t index, int32_t *record_len)
{
    if (index < 0 || (uint64_t)index > r->capacity - SHMBUS_RING_RECORD_HEADER ||
        (index & (SHMBUS_RING_ALIGNMENT - 1)))
        return SHMBUS_EINVAL;
    int32_t len = atomic_load_explicit(length_at(r, (uint64_t)index), memory_order_relaxed);
    if (len > -SHMBUS_RING_RECORD_HEADER || len == INT32_MIN)
        return SHMBUS_EINVAL; /* not a record in progress (committed, aborted or unblocked) */
    *record_len = -len;
    return SHMBUS_OK;
}

int shmbus_ring_commit(shmbus_ring_t *r, int64_t index)
{
    if (!r)
        return SHMBUS_EINVAL; /* closed */
    int32_t record_len;
    int rc = claimed_length(r, index, &record_len);
    if (rc != SHMBUS_OK)
        return rc;
    commit_record(r, (uint64_t)index, record_len);
    ring_doorbell(r);
    return SHMBUS_OK;
}

int shmbus_ring_abort(shmbus_ring_t *r, int64_t index)
{
    if (!r)
        return SHMBUS_EINVAL; /* closed */
    int32_t record_len;
    int rc = claimed_length(r, index, &record_len);
    if (rc != SHMBUS_OK)
        return rc;
    atomic_store_explicit(type_at(r, (uint64_t)index), SHMBUS_RING_PADDING, memory_order_relaxed);
    commit_record(r, (uint64_t)index, record_len);
    ring_doorbell(r);
    return SHMBUS_OK;
}

int shmbus_ring_test_reserve(shmbus_ring_t *r, uint32_t len, int write_padding)
{
    if (!r)
        return SHMBUS_EINVAL; /* closed */
    if (len > r->max_frame)
        return SHMBUS_ETOOBIG;
    int64_t idx = claim_capacity_ex(r, ALIGN_UP((uint64_t)len + SHMBUS_RING_RECORD_HEADER),
                                    write_padding != 0);
    return idx < 0 ? (int)idx : SHMBUS_OK;
}

/* -------------------------------------------------------------- reading */

/* Validate the committed record at `index`; returns its aligned length or
 * SHMBUS_ECORRUPT.  `tail_seen` caches the tail to check the record lies
 * inside what producers have reserved. */
static int64_t check_record(shmbus_ring_t *r, uint64_t head, uint64_t index, int32_t len,
                            int32_t type, uint64_t *tail_seen)
{
    uint64_t aligned = ALIGN_UP((uint64_t)len);
    if (len < SHMBUS_RING_RECORD_HEADER || aligned > r->capacity - index)
        return SHMBUS_ECORRUPT;
    if (type != SHMBUS_RING_PADDING && (uint32_t)len - SHMBUS_RING_RECORD_HEADER > r->max_frame)
        return SHMBUS_ECORRUPT;
    uint64_t end = head + aligned;
    if (end - *tail_seen < (uint64_t)1 << 63 && end != *tail_seen) {
        /* Beyond the tail we knew: look again.  C3 acquire: the producer CAS'd
         * the tail before its commit (W2), which C1 synchronised with, so a
         * committed record always lies inside the tail we load here. */
        *tail_seen = atomic_load_explicit(&r->seg->tail, memory_order_acquire);
        if (end - *tail_seen < (uint64_t)1 << 63 && end != *tail_seen)
            return SHMBUS_ECORRUPT;
    }
    return (int64_t)aligned;
}

static inline void count_reads(shmbus_ring_t *r, uint64_t frames, uint64_t bytes)
{
    if (r->count_frames) {
        atomic_fetch_add_explicit(r->count_frames, frames, memory_order_relaxed);
        atomic_fetch_add_explicit(r->count_bytes, bytes, memory_order_relaxed);
    }
}

/* Hand the consumed block back to producers: zero it, then move the head. */
static inline void consume(shmbus_ring_t *r, uint64_t head, uint64_t head_index, uint64_t bytes)
{
    memset(r->data + head_index, 0, bytes);
    /* C2: release, pairs with H3 in claim_capacity. */
    atomic_store_explicit(&r->seg->head, head + bytes, memory_order_release);
}

/* Read committed records from the head up to the end of the buffer.
 * Returns the number of payload records copied, or a negative code. */
static int read_block(shmbus_ring_t *r, char *out, uint64_t out_cap, uint32_t *lens,
                      uint32_t max_count, uint64_t *used, bool *at_end)
{
    uint64_t head = atomic_load_explicit(&r->seg->head, memory_order_relaxed);
    if (head & (SHMBUS_RING_ALIGNMENT - 1))
        return SHMBUS_ECORRUPT;
    uint64_t head_index = head & r->mask;
    uint64_t block = r->capacity - head_index;
    uint64_t consumed = 0, tail_seen = r->tail_seen;
    uint32_t n = 0;
    int rc = SHMBUS_OK;
    while (consumed < block && n < max_count) {
        uint64_t index = head_index + consumed;
        /* C1: acquire, pairs with W2: the payload is there once the length is. */
        int32_t len = atomic_load_explicit(length_at(r, index), memory_order_acquire);
        if (len <= 0)
            break;
        int32_t type = atomic_load_explicit(type_at(r, index), memory_order_relaxed);
        int64_t aligned = check_record(r, head + consumed, index, len, type, &tail_seen);
        if (aligned < 0) {
            rc = (int)aligned;
            break;
        }
        if (type != SHMBUS_RING_PADDING) {
            uint32_t plen = (uint32_t)len - SHMBUS_RING_RECORD_HEADER;
            if (*used + plen > out_cap) {
                if (n == 0 && *used == 0)
                    rc = SHMBUS_ESMALL;
                break;
            }
            memcpy(out + *used, r->data + index + SHMBUS_RING_RECORD_HEADER, plen);
            lens[n++] = plen;
            *used += plen;
        }
        consumed += (uint64_t)aligned;
    }
    r->tail_seen = tail_seen;
    if (consumed)
        consume(r, head, head_index, consumed);
    if (rc != SHMBUS_OK && n == 0)
        return rc;
    *at_end = consumed == block; /* the caller goes round the wrap */
    return (int)n;
}

/* What one ring (one lane) has now: how many records, or a negative code. */
static int read_ring(shmbus_ring_t *r, char *out, uint64_t out_cap, uint32_t *lens,
                     uint32_t max_count, uint64_t *used)
{
    uint32_t n = 0;
    /* At most two blocks: up to the end of the buffer, then from 0. */
    for (int pass = 0; pass < 2 && n < max_count; pass++) {
        bool at_end = false;
        int got = read_block(r, out, out_cap, lens + n, max_count - n, used, &at_end);
        if (got < 0) {
            if (n)
                break; /* hand over what we have; the error comes next call */
            return got;
        }
        n += (uint32_t)got;
        if (!at_end)
            break;
    }
    return (int)n;
}

int shmbus_ring_read_many(shmbus_ring_t *r, char *out, uint64_t out_cap, uint32_t *lens,
                          uint32_t max_count, int64_t timeout_ns, int64_t spin_ns,
                          uint32_t *count, uint64_t *bytes)
{
    if (!r)
        return SHMBUS_EINVAL; /* closed */
    *count = 0;
    *bytes = 0;
    if (r->peeked >= 0)
        return SHMBUS_EINVAL; /* a peeked record is still out: release it first */
    beat(r);
    int64_t deadline = timeout_ns == 0 ? 0 : deadline_after(timeout_ns);
    for (;;) {
        uint64_t used = 0;
        int n = 0;
        /* The highest lane with a record, and only that one: a block never
         * mixes lanes, so the order handed over is the order of priority.  A
         * look at an upper lane's head costs a load; lane 0 is read outright. */
        for (uint32_t k = r->lanes; k-- > 0 && n == 0;) {
            shmbus_ring_t *l = lane_ring(r, k);
            if (k == 0 || has_data(l))
                n = read_ring(l, out, out_cap, lens, max_count, &used);
        }
        if (n < 0)
            return n;
        if (n) {
            *count = (uint32_t)n;
            *bytes = used;
            count_reads(r, (uint64_t)n, used);
            return n;
        }
        if (timeout_ns == 0)
            return SHMBUS_EAGAIN;
        int rc = wait_for_data(r, deadline, spin_ns);
        if (rc != SHMBUS_OK)
            return rc;
    }
}

int64_t shmbus_ring_read_one(shmbus_ring_t *r, char *out, uint64_t out_cap, int64_t timeout_ns,
                             int64_t spin_ns)
{
    uint32_t len, count;
    uint64_t bytes;
    int rc = shmbus_ring_read_many(r, out, out_cap, &len, 1, timeout_ns, spin_ns, &count, &bytes);
    return rc > 0 ? (int64_t)len : rc;
}

/* The record at one ring's head, consuming any padding before it:
 * SHMBUS_OK with its index, SHMBUS_EAGAIN when there is none. */
static int peek_ring(shmbus_ring_t *l, int64_t *index_out, char **payload, uint32_t *len_out)
{
    for (;;) {
        uint64_t head = atomic_load_explicit(&l->seg->head, memory_order_relaxed);
        if (head & (SHMBUS_RING_ALIGNMENT - 1))
            return SHMBUS_ECORRUPT;
        uint64_t index = head & l->mask;
        int32_t len = atomic_load_explicit(length_at(l, index), memory_order_acquire); /* C1 */
        if (len <= 0)
            return SHMBUS_EAGAIN;
        int32_t type = atomic_load_explicit(type_at(l, index), memory_order_relaxed);
        int64_t aligned = check_record(l, head, index, len, type, &l->tail_seen);
        if (aligned < 0)
            return (int)aligned;
        if (type == SHMBUS_RING_PADDING) {
            consume(l, head, index, (uint64_t)aligned);
            continue;
        }
        *index_out = (int64_t)index;
        *payload = (char *)l->data + index + SHMBUS_RING_RECORD_HEADER;
        *len_out = (uint32_t)len - SHMBUS_RING_RECORD_HEADER;
        return SHMBUS_OK;
    }
}

int shmbus_ring_peek(shmbus_ring_t *r, int64_t timeout_ns, int64_t spin_ns, char **payload,
                     uint32_t *len_out)
{
    if (!r)
        return SHMBUS_EINVAL; /* closed */
    if (r->peeked >= 0)
        return SHMBUS_EINVAL;
    beat(r);
    int64_t deadline = timeout_ns == 0 ? 0 : deadline_after(timeout_ns);
    for (;;) {
        for (uint32_t k = r->lanes; k-- > 0;) {
            shmbus_ring_t *l = lane_ring(r, k);
            int64_t index = -1;
            int rc = peek_ring(l, &index, payload, len_out);
            if (rc == SHMBUS_OK) {
                r->peeked = index;
                r->peeked_ring = l;
                return SHMBUS_OK;
            }
            if (rc != SHMBUS_EAGAIN)
                return rc;
        }
        if (timeout_ns == 0)
            return SHMBUS_EAGAIN;
        int rc = wait_for_data(r, deadline, spin_ns);
        if (rc != SHMBUS_OK)
            return rc;
    }
}

int shmbus_ring_release(shmbus_ring_t *r)
{
    if (!r)
        return SHMBUS_EINVAL; /* closed */
    if (r->peeked < 0)
        return SHMBUS_EINVAL;
    uint64_t index = (uint64_t)r->peeked;
    shmbus_ring_t *l = r->peeked_ring;
    r->peeked = -1;
    uint64_t head = atomic_load_explicit(&l->seg->head, memory_order_relaxed);
    int32_t len = atomic_load_explicit(length_at(l, index), memory_order_relaxed);
    uint64_t aligned = ALIGN_UP((uint64_t)(len > 0 ? len : 0));
    if ((head & l->mask) != index || len < SHMBUS_RING_RECORD_HEADER || aligned > l->capacity - index)
        return SHMBUS_ECORRUPT; /* overwritten while it was out */
    consume(l, head, index, aligned);
    count_reads(r, 1, (uint64_t)len - SHMBUS_RING_RECORD_HEADER);
    return SHMBUS_OK;
}

void shmbus_ring_count_reads(shmbus_ring_t *r, uint64_t *frames, uint64_t *bytes)
{
    if (!r)
        return;
    r->count_frames = (_Atomic uint64_t *)frames;
    r->count_bytes = (_Atomic uint64_t *)bytes;
}

/* ------------------------------------------------------------- unblock */

/* Are the length words in [from, to) all still zero?  Looked at again after
 * the forward scan, in case a slow (live) producer has written meanwhile. */
static bool still_zeroed(const shmbus_ring_t *r, uint64_t from, uint64_t to)
{
    for (uint64_t i = from; i < to; i += SHMBUS_RING_ALIGNMENT)
        if (atomic_load_explicit(length_at(r, i), memory_order_acquire) != 0)
            return false;
    return true;
}

static bool head_moved(const shmbus_ring_t *r, uint64_t head)
{
    return atomic_load_explicit(&r->seg->head, memory_order_acquire) != head;
}

static void make_padding(shmbus_ring_t *r, uint64_t index, uint64_t length)
{
    atomic_store_explicit(type_at(r, index), SHMBUS_RING_PADDING, memory_order_relaxed);
    atomic_store_explicit(length_at(r, index), (int32_t)length, memory_order_release); /* W2 */
    ring_doorbell(r);
}

/* Agrona's unblock: turn a record left behind by a dead producer into
 * padding.  Call it only once that producer's death is certain. Returns 1 if
 * it unblocked, 0 if there was nothing to do, or a negative code. */
int shmbus_ring_unblock(shmbus_ring_t *r, int64_t grace_ns)
{
    if (!r)
        return SHMBUS_EINVAL; /* closed */
    /* Another process (the coordinator) calls this while the consumer may
     * be reading, so every decision below rests on a head that did not move:
     * a consumer that moves is not blocked, and a head read before the tail
     * could lag a tail that has lapped it (the stale-snapshot trap). */
    uint64_t head = atomic_load_explicit(&r->seg->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&r->seg->tail, memory_order_acquire);
    if (atomic_load_explicit(&r->seg->head, memory_order_acquire) != head)
        return 0;
    if (head == tail)
        return 0;
    if (tail - head > r->capacity || (head & (SHMBUS_RING_ALIGNMENT - 1)))
        return SHMBUS_ECORRUPT;
    uint64_t consumer_index = head & r->mask;
    uint64_t producer_index = tail & r->mask;
    int32_t len = atomic_load_explicit(length_at(r, consumer_index), memory_order_acquire);
    if (head_moved(r, head))
        return 0; /* consumed meanwhile: the length we read may be freed space */
    if (len > 0)
        return 0; /* committed: the consumer can move on by itself */
    /* A live writer between its CAS and its first store, or between its
     * first store and its commit, looks just like a dead one: act only if
     * nothing moves for the grace period (Aeron's unblock timeout), which a
     * live writer crosses in nanoseconds unless it is descheduled for all
     * of it. */
    if (grace_ns > 0) {
        struct timespec ts = {.tv_sec = grace_ns / 1000000000LL, .tv_nsec = grace_ns % 1000000000LL};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        if (head_moved(r, head) ||
            atomic_load_explicit(length_at(r, consumer_index), memory_order_acquire) != len ||
            atomic_load_explicit(&r->seg->tail, memory_order_acquire) != tail)
            return 0;
    }
    if (len < 0) {
        /* The producer died after writing its negative length; the consumer
         * cannot pass a negative length, so the head stays put from here. */
        uint64_t aligned = ALIGN_UP((uint64_t)-(int64_t)len);
        if (-(int64_t)len < SHMBUS_RING_RECORD_HEADER || aligned > r->capacity - consumer_index ||
            aligned > tail - head)
            return SHMBUS_ECORRUPT;
        make_padding(r, consumer_index, (uint64_t)-(int64_t)len);
        return 1;
    }
    /* The producer died between its CAS and its first store: the length is
     * unknown, so pad up to the next record that has started. */
    bool wrapped = producer_index <= consumer_index;
    uint64_t limit = wrapped ? r->capacity : producer_index;
    for (uint64_t i = consumer_index + SHMBUS_RING_ALIGNMENT; i < limit; i += SHMBUS_RING_ALIGNMENT) {
        if (atomic_load_explicit(length_at(r, i), memory_order_acquire) != 0) {
            if (!still_zeroed(r, consumer_index, i) || head_moved(r, head))
                return 0;
            make_padding(r, consumer_index, i - consumer_index);
            return 1;
        }
    }
    /* Nothing started after it up to the end of the buffer while the tail
     * is already in the next lap: the whole rest of this lap was reserved
     * (by the dead producer, or as its wrap padding).  Agrona stops here;
     * padding to the end lets the consumer reach the records at index 0. */
    if (wrapped && still_zeroed(r, consumer_index, r->capacity) && !head_moved(r, head)) {
        make_padding(r, consumer_index, r->capacity - consumer_index);
        return 1;
    }
    return 0;
}

/* ---------------------------------------------- a waiter beside the reader */

/* One round of wait_for_data, for a thread that waits on behalf of a reader
 * that never waits itself (shmbus_waiter.c: an event loop's).  It only
 * looks at the lanes and sleeps on the bell; the reader reads. */
uint32_t shmbus_ring_bell(const shmbus_ring_t *r) { return bell_seq(r); }

int shmbus_ring_wait_once(shmbus_ring_t *r, int64_t spin_ns, uint32_t seq)
{
    if (!r)
        return SHMBUS_EINVAL;
    if (spin_for_data(r, now_ns() + (spin_ns > 0 ? spin_ns : 0)))
        return SHMBUS_OK;
    beat(r);
    set_sleeping(r, 1);
    atomic_thread_fence(memory_order_seq_cst); /* S2: pairs with D1 in ring_doorbell */
    if (any_data(r)) {
        set_sleeping(r, 0);
        return SHMBUS_OK;
    }
    int rc = bell_sleep(r, seq, INT64_MAX);
    set_sleeping(r, 0);
    if (rc == SHMBUS_EINTR)
        return SHMBUS_EINTR;
    /* A ring for a record the reader took meanwhile, shmbus_ring_wake, or a
     * ring since `seq` was read: the caller looks at why, then waits again. */
    return any_data(r) ? SHMBUS_OK : SHMBUS_EAGAIN;
}

