/* shmbus send: see shmbus_send.h. */
#define _GNU_SOURCE
#include "shmbus_send.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "shmbus_frame.h"
#include "shmbus_stats.h"

#define MAX_KIND 10     /* MessageType.CONTROL */
#define MAX_PRIORITY 100
#define KNOWN_FLAGS (SHMBUS_FRAME_FLAG_ACK | SHMBUS_FRAME_FLAG_RAW)

struct shmbus_sender {
    uint64_t id_base;
    _Atomic uint64_t seq;
    uint64_t *counters;
    const shmbus_table_t *routes;
    uint32_t agent_id;
    uint32_t name_len;
    char name[SHMBUS_FRAME_MAX_NAME];
};

struct shmbus_route {
    shmbus_sender_t *me;
    uint64_t version;
    uint64_t *topic_counters;
    uint64_t last_id;
    uint32_t recipient_id;
    uint32_t targets;
    uint32_t names_len; /* sender + recipient + topic */
    uint8_t recipient_len;
    uint16_t topic_len;
    shmbus_ring_t **rings;
    uint64_t **counters;
    uint32_t *written;
    int32_t *errors;
    uint8_t *lossy; /* see shmbus_route_lossy */
    /* The last send's frames when it went through the scratch (a publish,
     * or send_many), kept so shmbus_route_resume can finish it. */
    char *scratch;
    uint64_t scratch_cap;
    uint32_t *frame_lens;
    uint32_t lens_cap;
    uint32_t last_count;
    uint32_t last_lane; /* the last send's priority lane, for resume */
    /* cffi lets go of the GIL: two threads sending through one route must
     * not share (or realloc under each other) the scratch. */
    pthread_mutex_t lock;
    char names[]; /* sender, recipient, topic: copied after each header */
};

static inline void add(uint64_t *counters, uint32_t index, uint64_t n)
{
    if (counters && n)
        atomic_fetch_add_explicit((_Atomic uint64_t *)&counters[index], n, memory_order_relaxed);
}

shmbus_sender_t *shmbus_sender_new(uint32_t agent_id, const char *name, uint32_t name_len,
                                   uint64_t *counters, const shmbus_table_t *routes)
{
    if (name_len > SHMBUS_FRAME_MAX_NAME || agent_id >= (1u << 23) || !routes)
        return NULL;
    shmbus_sender_t *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->id_base = (uint64_t)agent_id << 40;
    s->agent_id = agent_id;
    s->counters = counters;
    s->routes = routes;
    s->name_len = name_len;
    memcpy(s->name, name, name_len);
    return s;
}

void shmbus_sender_free(shmbus_sender_t *s) { free(s); }

/* n consecutive ids; the first is returned. */
static inline uint64_t take_ids(shmbus_sender_t *s, uint64_t n)
{
    return s->id_base | (atomic_fetch_add_explicit(&s->seq, n, memory_order_relaxed) + 1);
}

uint64_t shmbus_sender_next_id(shmbus_sender_t *s) { return take_ids(s, 1); }

shmbus_route_t *shmbus_route_new(shmbus_sender_t *s, uint64_t version, uint32_t recipient_id,
                                 const char *recipient, uint32_t recipient_len, const char *topic,
                                 uint32_t topic_len, uint64_t *topic_counters, uint32_t targets)
{
    if (!s || recipient_len > SHMBUS_FRAME_MAX_NAME || topic_len > SHMBUS_FRAME_MAX_TOPIC ||
        targets > (1u << 20))
        return NULL;
    uint32_t names_len = s->name_len + recipient_len + topic_len;
    shmbus_route_t *rt = calloc(1, sizeof *rt + names_len);
    if (!rt)
        return NULL;
    rt->rings = calloc(targets ? targets : 1, sizeof *rt->rings);
    rt->counters = calloc(targets ? targets : 1, sizeof *rt->counters);
    rt->written = calloc(targets ? targets : 1, sizeof *rt->written);
    rt->errors = calloc(targets ? targets : 1, sizeof *rt->errors);
    rt->lossy = calloc(targets ? targets : 1, sizeof *rt->lossy);
    if (!rt->rings || !rt->counters || !rt->written || !rt->errors || !rt->lossy) {
        shmbus_route_free(rt);
        return NULL;
    }
    pthread_mutex_init(&rt->lock, NULL);
    rt->me = s;
    rt->version = version;
    rt->topic_counters = topic_counters;
    rt->recipient_id = recipient_id;
    rt->targets = targets;
    rt->names_len = names_len;
    rt->recipient_len = (uint8_t)recipient_len;
    rt->topic_len = (uint16_t)topic_len;
    memcpy(rt->names, s->name, s->name_len);
    memcpy(rt->names + s->name_len, recipient, recipient_len);
    memcpy(rt->names + s->name_len + recipient_len, topic, topic_len);
    return rt;
}

int shmbus_route_set(shmbus_route_t *rt, uint32_t target, shmbus_ring_t *ring, uint64_t *counters)
{
    if (!rt || !ring || target >= rt->targets || rt->rings[target])
        return SHMBUS_EINVAL;
    shmbus_ring_retain(ring);
    rt->rings[target] = ring;
    rt->counters[target] = counters;
    return SHMBUS_OK;
}

int shmbus_route_lossy(shmbus_route_t *rt, uint32_t target)
{
    if (!rt || target >= rt->targets)
        return SHMBUS_EINVAL;
    rt->lossy[target] = 1;
    return SHMBUS_OK;
}

void shmbus_route_free(shmbus_route_t *rt)
{
    if (!rt)
        return;
    for (uint32_t i = 0; rt->rings && i < rt->targets; i++)
        shmbus_ring_close(rt->rings[i]);
    free(rt->rings);
    free(rt->counters);
    free(rt->written);
    free(rt->errors);
    free(rt->lossy);
    free(rt->scratch);
    free(rt->frame_lens);
    pthread_mutex_destroy(&rt->lock);
    free(rt);
}

uint32_t shmbus_route_written(const shmbus_route_t *rt, uint32_t target)
{
    return target < rt->targets ? rt->written[target] : 0;
}

int shmbus_route_error(const shmbus_route_t *rt, uint32_t target)
{
    return target < rt->targets ? rt->errors[target] : SHMBUS_EINVAL;
}

uint64_t shmbus_route_last_id(const shmbus_route_t *rt) { return rt->last_id; }

static inline int64_t wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Header and names at `out`; returns where the payload goes. */
static inline char *put_header(const shmbus_route_t *rt, char *out, uint32_t kind, uint32_t flags,
                               uint32_t priority, uint32_t ttl_ms, uint32_t len, uint64_t id,
                               int64_t now, uint64_t request_id, uint64_t correlation_id,
                               uint32_t attempts)
{
    shmbus_frame_header h = {
        .magic = SHMBUS_FRAME_MAGIC,
        .version = SHMBUS_FRAME_VERSION,
        .type = (uint8_t)kind,
        .priority = (uint8_t)priority,
        .flags = (uint8_t)flags,
        .attempts = (uint16_t)attempts,
        .sender_id = rt->me->agent_id,
        .recipient_id = rt->recipient_id,
        .id = id,
        .request_id = request_id,
        .correlation_id = correlation_id,
        .timestamp_ns = now,
        .ttl_ms = ttl_ms,
        .sender_len = (uint8_t)rt->me->name_len,
        .recipient_len = rt->recipient_len,
        .topic_len = rt->topic_len,
        .payload_len = len,
        .reserved = 0,
    };
    memcpy(out, &h, sizeof h);
    memcpy(out + sizeof h, rt->names, rt->names_len);
    return out + sizeof h + rt->names_len;
}

static inline int check(const shmbus_route_t *rt, uint32_t kind, uint32_t priority,
                        uint32_t attempts)
{
    if (!rt)
        return SHMBUS_EINVAL;
    if (kind == 0 || kind > MAX_KIND || priority > MAX_PRIORITY || attempts > 0xFFFF)
        return SHMBUS_EINVAL;
    if (shmbus_table_version(rt->me->routes) != rt->version)
        return SHMBUS_ESTALE;
    return SHMBUS_OK;
}

/* Write the last send's frames that target t has not taken yet, from the
 * scratch, and count what it took. */
static int deliver(shmbus_route_t *rt, uint32_t t, int64_t timeout_ns)
{
    uint32_t done = rt->written[t], written = 0;
    const char *from = rt->scratch;
    for (uint32_t i = 0; i < done; i++)
        from += rt->frame_lens[i];
    int rc = shmbus_ring_write_many(shmbus_ring_lane(rt->rings[t], rt->last_lane), from, rt->frame_lens + done,
                                    rt->last_count - done, timeout_ns, &written);
    uint64_t bytes = 0;
    for (uint32_t i = done; i < done + written; i++)
        bytes += rt->frame_lens[i];
    rt->written[t] = done + written;
    rt->errors[t] = rc;
    add(rt->me->counters, SHMBUS_STAT_SENT, written);
    add(rt->me->counters, SHMBUS_STAT_BYTES_SENT, bytes);
    add(rt->counters[t], SHMBUS_STAT_DELIVERED, written);
    add(rt->counters[t], SHMBUS_STAT_DELIVERED_BYTES, bytes);
    add(rt->topic_counters, SHMBUS_STAT_TOPIC_DELIVERED, written);
    return rc;
}

static inline int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Every target without waiting first, so a full subscriber does not hold up
 * the others; then the full ones again, sharing one deadline (a publish
 * waits `timeout` in all, not per full subscriber).  The first error left.
 * A lossy target is tried once and its error ignored: with no coordinator
 * to read the history inbox, it fills and stays full. */
static int deliver_all(shmbus_route_t *rt, int64_t timeout_ns)
{
    int full = 0;
    for (uint32_t t = 0; t < rt->targets; t++) {
        rt->written[t] = 0;
        int rc = deliver(rt, t, 0);
        full |= rc == SHMBUS_EAGAIN;
    }
    if (full && timeout_ns != 0) {
        int64_t deadline = timeout_ns < 0 ? -1 : mono_ns() + timeout_ns;
        for (uint32_t t = 0; t < rt->targets; t++) {
            if (rt->errors[t] != SHMBUS_EAGAIN || rt->lossy[t])
                continue;
            int64_t left = -1;
            if (deadline >= 0) {
                left = deadline - mono_ns();
                if (left < 1)
                    left = 1; /* one more look, no wait */
            }
            deliver(rt, t, left);
        }
    }
    for (uint32_t t = 0; t < rt->targets; t++)
        if (rt->errors[t] != SHMBUS_OK && !rt->lossy[t])
            return rt->errors[t];
    return SHMBUS_OK;
}

int shmbus_route_resume(shmbus_route_t *rt, uint32_t target, int64_t timeout_ns)
{
    if (!rt || target >= rt->targets || !rt->last_count)
        return SHMBUS_EINVAL;
    pthread_mutex_lock(&rt->lock);
    int rc = rt->written[target] == rt->last_count ? SHMBUS_OK : deliver(rt, target, timeout_ns);
    pthread_mutex_unlock(&rt->lock);
    return rc;
}

/* Room in the scratch for `count` frames of `total` bytes. */
static int reserve(shmbus_route_t *rt, uint32_t count, uint64_t total)
{
    if (total > rt->scratch_cap) {
        char *grown = realloc(rt->scratch, total);
        if (!grown)
            return SHMBUS_ESYS;
        rt->scratch = grown;
        rt->scratch_cap = total;
    }
    if (count > rt->lens_cap) {
        uint32_t *grown = realloc(rt->frame_lens, count * sizeof *grown);
        if (!grown)
            return SHMBUS_ESYS;
        rt->frame_lens = grown;
        rt->lens_cap = count;
    }
    return SHMBUS_OK;
}

/* A direct send: the frame is built in place in the one inbox, no copy. */
static int64_t send_in_place(shmbus_route_t *rt, uint32_t kind, uint32_t flags, uint32_t priority,
                             uint32_t ttl_ms, const char *payload, uint32_t len,
                             uint64_t frame_len, int64_t timeout_ns, uint64_t request_id,
                             uint64_t correlation_id, uint32_t attempts)
{
    int64_t index;
    char *at;
    shmbus_ring_t *ring = shmbus_ring_lane(rt->rings[0], shmbus_lane_of(priority));
    rt->last_count = 0; /* nothing to resume: a failed direct send wrote nothing */
    rt->written[0] = 0;
    rt->errors[0] = shmbus_ring_claim(ring, (uint32_t)frame_len, timeout_ns, &index, &at);
    int rc = rt->errors[0];
    if (rc != SHMBUS_OK)
        return rc;
    uint64_t id = take_ids(rt->me, 1);
    rt->last_id = id;
    memcpy(put_header(rt, at, kind, flags, priority, ttl_ms, len, id, wall_ns(), request_id,
                      correlation_id, attempts),
           payload, len);
    rt->errors[0] = rc = shmbus_ring_commit(ring, index);
    if (rc != SHMBUS_OK)
        return rc; /* lost to unblock(): the reader has skipped it */
    rt->written[0] = 1;
    add(rt->me->counters, SHMBUS_STAT_SENT, 1);
    add(rt->me->counters, SHMBUS_STAT_BYTES_SENT, frame_len);
    add(rt->counters[0], SHMBUS_STAT_DELIVERED, 1);
    add(rt->counters[0], SHMBUS_STAT_DELIVERED_BYTES, frame_len);
    return (int64_t)id;
}

static int64_t send_one(shmbus_route_t *rt, uint32_t kind, uint32_t flags, uint32_t priority,
                        uint32_t ttl_ms, const char *payload, uint32_t len, int64_t timeout_ns,
                        uint64_t request_id, uint64_t correlation_id, uint32_t attempts)
{
    int rc = check(rt, kind, priority, attempts);
    if (rc != SHMBUS_OK)
        return rc;
    if (flags & ~(uint32_t)KNOWN_FLAGS)
        return SHMBUS_EINVAL;
    uint64_t frame_len = SHMBUS_FRAME_HEADER_SIZE + (uint64_t)rt->names_len + len;
    if (frame_len > UINT32_MAX)
        return SHMBUS_ETOOBIG;
    if (rt->targets == 1 && !rt->topic_counters) /* a publish must be resumable */
        return send_in_place(rt, kind, flags, priority, ttl_ms, payload, len, frame_len,
                             timeout_ns, request_id, correlation_id, attempts);
    /* Several inboxes (a publish): build the frame once, copy it to each. */
    pthread_mutex_lock(&rt->lock);
    rc = reserve(rt, 1, frame_len);
    if (rc != SHMBUS_OK) {
        pthread_mutex_unlock(&rt->lock);
        return rc;
    }
    uint64_t id = take_ids(rt->me, 1);
    rt->last_id = id;
    rt->last_count = 1;
    rt->last_lane = shmbus_lane_of(priority);
    rt->frame_lens[0] = (uint32_t)frame_len;
    memcpy(put_header(rt, rt->scratch, kind, flags, priority, ttl_ms, len, id, wall_ns(),
                      request_id, correlation_id, attempts),
           payload, len);
    add(rt->topic_counters, SHMBUS_STAT_PUBLISHED, 1);
    add(rt->topic_counters, SHMBUS_STAT_TOPIC_BYTES, len);
    rc = deliver_all(rt, timeout_ns);
    pthread_mutex_unlock(&rt->lock);
    return rc == SHMBUS_OK ? (int64_t)id : rc;
}

int64_t shmbus_send(shmbus_route_t *rt, uint32_t kind, uint32_t flags, uint32_t priority,
                    uint32_t ttl_ms, const char *payload, uint32_t len, int64_t timeout_ns)
{
    return send_one(rt, kind, flags, priority, ttl_ms, payload, len, timeout_ns, 0, 0, 0);
}

int64_t shmbus_send_ex(shmbus_route_t *rt, uint32_t kind, uint32_t flags, uint32_t priority,
                       uint32_t ttl_ms, const char *payload, uint32_t len, int64_t timeout_ns,
                       uint64_t request_id, uint64_t correlation_id, uint32_t attempts)
{
    return send_one(rt, kind, flags, priority, ttl_ms, payload, len, timeout_ns, request_id,
                    correlation_id, attempts);
}

int64_t shmbus_send_many(shmbus_route_t *rt, uint32_t kind, uint32_t priority, uint32_t ttl_ms,
                         const char *blob, const uint32_t *lens, const uint8_t *flags,
                         uint32_t count, int64_t timeout_ns)
{
    int rc = check(rt, kind, priority, 0);
    if (rc != SHMBUS_OK)
        return rc;
    uint64_t total = 0, payload_total = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (flags[i] & ~(uint32_t)KNOWN_FLAGS)
            return SHMBUS_EINVAL;
        uint64_t frame_len = SHMBUS_FRAME_HEADER_SIZE + (uint64_t)rt->names_len + lens[i];
        if (frame_len > UINT32_MAX)
            return SHMBUS_ETOOBIG;
        total += frame_len;
        payload_total += lens[i];
    }
    pthread_mutex_lock(&rt->lock);
    rc = reserve(rt, count, total);
    if (rc != SHMBUS_OK) {
        pthread_mutex_unlock(&rt->lock);
        return rc;
    }
    uint64_t first = take_ids(rt->me, count);
    int64_t now = wall_ns();
    rt->last_id = first;
    rt->last_count = count;
    rt->last_lane = shmbus_lane_of(priority);
    char *out = rt->scratch;
    for (uint32_t i = 0; i < count; i++) {
        char *p = put_header(rt, out, kind, flags[i], priority, ttl_ms, lens[i], first + i, now, 0,
                             0, 0);
        memcpy(p, blob, lens[i]);
        blob += lens[i];
        rt->frame_lens[i] = (uint32_t)(SHMBUS_FRAME_HEADER_SIZE + rt->names_len + lens[i]);
        out += rt->frame_lens[i];
    }
    add(rt->topic_counters, SHMBUS_STAT_PUBLISHED, count);
    add(rt->topic_counters, SHMBUS_STAT_TOPIC_BYTES, payload_total);
    rc = deliver_all(rt, timeout_ns);
    pthread_mutex_unlock(&rt->lock);
    return rc == SHMBUS_OK ? (int64_t)first : rc;
}
