/* shmbus bridge link: see shmbus_bridge.h. */
#define _GNU_SOURCE
#include "shmbus_bridge.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include <sys/uio.h>
#include <time.h>

#include "shmbus_frame.h"
#include "shmbus_stats.h"

/* Record layout (wire.py): u32 body | u32 count | u32 info | u32 taken |
 * u32 granted | count x u32 length | frames.  Limits as wire.py's. */
#define HEAD SHMBUS_LINK_HEAD
#define MAX_RECORD (64u << 20)
#define MAX_COUNT (1u << 16)
#define FOREVER_MS ((1u << 30) - 1)
#define BLOCK 256        /* frames per record down */
#define AHEAD 8          /* records sent and not yet taken, at most */
#define DIRECT_RUN 64    /* frames: a run this long is a record worth sending alone */
#define SLICE_NS 100000000LL /* how often a wait looks whether it must stop */
#define BUCKETS 256
#define MAX_ROUTES 4096

struct target {
    shmbus_ring_t *ring;
    shmbus_link_t *peer; /* its link, when the recipient is on the uds transport too */
    uint64_t *counters;
    uint32_t written;
    int32_t rc;
    uint8_t lossy;
    uint8_t name_len;
    char name[SHMBUS_FRAME_MAX_NAME];
};

struct route {
    struct route *next;
    uint64_t version;
    uint64_t *topic_counters;
    uint32_t targets;
    uint8_t is_topic;
    uint8_t known;
    uint16_t where_len;
    char where[SHMBUS_FRAME_MAX_TOPIC];
    struct target t[];
};

struct record {
    uint32_t seq;
    uint32_t count;
    uint64_t bytes;
    uint64_t cap;
    char *frames;
    uint32_t lens[BLOCK];
    uint32_t head[HEAD / 4];
};

struct frame_info {
    uint64_t at; /* offset in the buffer */
    struct route *route;
    uint32_t len;
    uint8_t kind;
    uint8_t lane;
    uint16_t where_len;
    uint64_t where_at;
};

struct shmbus_link {
    int fd;
    uint32_t agent_id;
    uint64_t types;
    uint64_t *counters;
    uint64_t *beat;
    const shmbus_table_t *table;
    shmbus_ring_t *inbox;
    uint32_t name_len;
    char name[SHMBUS_FRAME_MAX_NAME];

    _Atomic int stop;
    _Atomic int eof;
    /* The agent is gone (shmbus_link_drain): up reads what its socket holds,
     * delivers it (waiting for room until drain_until at most), and ends
     * where the bytes end. */
    _Atomic int draining;
    _Atomic int64_t drain_until; /* mono ns: no wait for room goes past it */
    _Atomic int closed; /* the socket is going: nobody may send on it (set under mu) */
    _Atomic int refs;   /* the coordinator's, and each route's that sends straight here */
    _Atomic uint32_t taken, granted; /* the agent's counts of our records */
    /* Held by whoever sends on the socket: our down thread (also while the
     * socket is full, until the agent reads), another link's up thread
     * sending straight to us (try_direct: trylock, never waits), or our up
     * thread sending a verdict (the agent waits for it, so it reads).  Not
     * held while waiting for records or counts. */
    pthread_mutex_t mu;
    sem_t credit;        /* posted when the counts move while down waits for them */
    _Atomic int starved; /* down waits for counts (without mu) */

    char reason[256];
    int err;

    /* up: its state is the up thread's, or the hub's while it reads the
     * socket (owner, under up_mu) */
    pthread_mutex_t up_mu;
    _Atomic int owner;    /* HUB: the hub reads the socket; OWN: the up thread */
    int own_fd;           /* eventfd: the up thread's turn (or a stop) */
    shmbus_hub_t *hub;
    int pending;          /* what the hub met for the up thread to return (EOF, BAD, IOERR) */
    uint32_t records_in; /* records of the agent's, this one included */
    /* The verdict on a record of policy "error", which its sender waits
     * for: the first failure (a SHMBUS_DEAD_* code, 0: none), the frames
     * delivered before it, and the full lane's number and fill (percent). */
    uint32_t v_code, v_done, v_lane, v_pct;
    char *buf;
    uint64_t cap, start, end;
    int in_record;
    uint32_t body, count, policy, wait_ms;
    uint32_t *lens;
    uint32_t lens_cap;
    struct frame_info *frames;
    struct route *buckets[BUCKETS];
    uint32_t routes;
    uint32_t misses; /* routes asked for by this record */
    struct route *installing;
    const char *miss_where;
    uint32_t miss_len;
    int miss_topic;
    shmbus_dead_t *dead;
    uint32_t dead_n, dead_cap;

    /* down (under mu) */
    struct record *recs[AHEAD];
    uint32_t first, outstanding; /* the oldest record's slot, how many are out */
    uint32_t seq;                /* records sent */
    struct record *sending;      /* a record the socket has taken only part of */
    uint64_t sent;               /* of it, in bytes */
};

enum { HUB = 0, OWN = 1 };

struct shmbus_hub {
    int ep;             /* epoll: every link's socket (one-shot), and kick */
    int kick;           /* eventfd: unhub wants mu now, not after the wait */
    pthread_mutex_t mu; /* held while events are served: a link leaves only between */
    pthread_cond_t turn;     /* unhub's turn at mu: the hub waits while one wants it */
    _Atomic int wanting;     /* unhub calls waiting for mu */
    int64_t spin_ns;
    _Atomic int64_t active; /* when a record last went through */
    _Atomic int stop;
};

static inline int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline uint32_t rd32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline void add(uint64_t *counters, uint32_t index, uint64_t n)
{
    if (counters && n)
        atomic_fetch_add_explicit((_Atomic uint64_t *)&counters[index], n, memory_order_relaxed);
}

static inline void beat(shmbus_link_t *l)
{
    if (l->beat)
        atomic_store_explicit((_Atomic uint64_t *)l->beat, (uint64_t)mono_ns(),
                              memory_order_relaxed);
}

static int bad(shmbus_link_t *l, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(l->reason, sizeof l->reason, fmt, ap);
    va_end(ap);
    return SHMBUS_LINK_BAD;
}

shmbus_link_t *shmbus_link_new(int fd, const char *name, uint32_t name_len, uint32_t agent_id,
                               uint64_t types, uint64_t *counters, uint64_t *beat_at,
                               const shmbus_table_t *routes, shmbus_ring_t *inbox)
{
    if (name_len > SHMBUS_FRAME_MAX_NAME || !routes || !inbox)
        return NULL;
    shmbus_link_t *l = calloc(1, sizeof *l);
    if (!l)
        return NULL;
    l->fd = fd;
    l->agent_id = agent_id;
    l->types = types;
    l->counters = counters;
    l->beat = beat_at;
    l->table = routes;
    l->inbox = inbox;
    shmbus_ring_retain(inbox);
    l->name_len = name_len;
    memcpy(l->name, name, name_len);
    atomic_store(&l->refs, 1);
    atomic_store(&l->owner, OWN); /* until shmbus_link_hub */
    l->own_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (l->own_fd < 0) {
        shmbus_ring_close(inbox);
        free(l);
        return NULL;
    }
    pthread_mutex_init(&l->up_mu, NULL);
    pthread_mutex_init(&l->mu, NULL);
    sem_init(&l->credit, 0, 0);
    return l;
}

static void release(shmbus_link_t *l);

static void route_free(struct route *r)
{
    for (uint32_t i = 0; i < r->targets; i++) {
        if (r->t[i].ring)
            shmbus_ring_close(r->t[i].ring);
        if (r->t[i].peer)
            release(r->t[i].peer);
    }
    free(r);
}

static void routes_clear(shmbus_link_t *l)
{
    for (int b = 0; b < BUCKETS; b++) {
        while (l->buckets[b]) {
            struct route *r = l->buckets[b];
            l->buckets[b] = r->next;
            route_free(r);
        }
    }
    l->routes = 0;
}

void shmbus_link_close(shmbus_link_t *l)
{
    pthread_mutex_lock(&l->mu);
    atomic_store(&l->closed, 1);
    pthread_mutex_unlock(&l->mu);
}

void shmbus_link_free(shmbus_link_t *l)
{
    if (!l)
        return;
    shmbus_link_close(l);
    routes_clear(l); /* its references on other links go now, not with the last of ours */
    release(l);
}

static void release(shmbus_link_t *l)
{
    if (atomic_fetch_sub(&l->refs, 1) != 1)
        return;
    for (int i = 0; i < AHEAD; i++) {
        if (l->recs[i]) {
            free(l->recs[i]->frames);
            free(l->recs[i]);
        }
    }
    shmbus_ring_close(l->inbox);
    free(l->buf);
    free(l->lens);
    free(l->frames);
    free(l->dead);
    pthread_mutex_destroy(&l->mu);
    sem_destroy(&l->credit);
    pthread_mutex_destroy(&l->up_mu);
    close(l->own_fd);
    free(l);
}

/* Never takes mu: the down thread may hold it while it waits for this very
 * agent to read (a post it does not need only makes it look once more). */
static void wake_down(shmbus_link_t *l) { sem_post(&l->credit); }

static void own_turn(shmbus_link_t *l)
{
    uint64_t one = 1;
    ssize_t n = write(l->own_fd, &one, sizeof one);
    (void)n; /* a full counter is a post already */
}

void shmbus_link_drain(shmbus_link_t *l, int64_t wait_ns)
{
    atomic_store(&l->drain_until, mono_ns() + wait_ns);
    atomic_store(&l->draining, 1); /* seq_cst: drain_until is set when this is seen */
    own_turn(l); /* the up thread reads the rest, whoever had the socket */
}

void shmbus_link_stop(shmbus_link_t *l)
{
    atomic_store(&l->stop, 1);
    wake_down(l);
    own_turn(l);
    shmbus_ring_wake(l->inbox);
}

const char *shmbus_link_reason(const shmbus_link_t *l) { return l->reason; }
int shmbus_link_errno(const shmbus_link_t *l) { return l->err; }

/* ------------------------------------------------------------------ routes */

static uint32_t hash(int is_topic, const char *p, uint32_t n)
{
    uint32_t h = 2166136261u ^ (uint32_t)is_topic;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)p[i]) * 16777619u;
    return h % BUCKETS;
}

static struct route **find(shmbus_link_t *l, int is_topic, const char *where, uint32_t len)
{
    struct route **at = &l->buckets[hash(is_topic, where, len)];
    for (; *at; at = &(*at)->next) {
        struct route *r = *at;
        if (r->is_topic == is_topic && r->where_len == len && !memcmp(r->where, where, len))
            return at;
    }
    return at;
}

int shmbus_link_miss(const shmbus_link_t *l, const char **where, uint32_t *len)
{
    *where = l->miss_where;
    *len = l->miss_len;
    return l->miss_topic;
}

int shmbus_link_route(shmbus_link_t *l, int is_topic, const char *where, uint32_t len,
                      uint64_t version, int known, uint64_t *topic_counters, uint32_t targets)
{
    if (len > SHMBUS_FRAME_MAX_TOPIC || targets > (1u << 16) || (!is_topic && targets > 1))
        return SHMBUS_EINVAL;
    struct route *r = calloc(1, sizeof *r + targets * sizeof(struct target));
    if (!r)
        return SHMBUS_ESYS;
    r->version = version;
    r->topic_counters = topic_counters;
    r->targets = targets;
    r->is_topic = (uint8_t)is_topic;
    r->known = (uint8_t)known;
    r->where_len = (uint16_t)len;
    memcpy(r->where, where, len);
    if (l->routes >= MAX_ROUTES)
        routes_clear(l);
    struct route **at = find(l, is_topic, where, len);
    if (*at) { /* replace the stale one */
        struct route *old = *at;
        *at = old->next;
        route_free(old);
        l->routes--;
        at = find(l, is_topic, where, len);
    }
    *at = r;
    l->routes++;
    l->installing = r;
    return SHMBUS_OK;
}

int shmbus_link_route_target(shmbus_link_t *l, uint32_t i, shmbus_ring_t *ring,
                             uint64_t *counters, const char *name, uint32_t name_len, int lossy)
{
    struct route *r = l->installing;
    if (!r || i >= r->targets || !ring || r->t[i].ring || name_len > SHMBUS_FRAME_MAX_NAME)
        return SHMBUS_EINVAL;
    shmbus_ring_retain(ring);
    r->t[i].ring = ring;
    r->t[i].counters = counters;
    r->t[i].lossy = (uint8_t)!!lossy;
    r->t[i].name_len = (uint8_t)name_len;
    memcpy(r->t[i].name, name, name_len);
    return SHMBUS_OK;
}

int shmbus_link_route_peer(shmbus_link_t *l, uint32_t i, shmbus_link_t *peer)
{
    struct route *r = l->installing;
    if (!r || i >= r->targets || !peer || r->t[i].peer || peer == l)
        return SHMBUS_EINVAL;
    atomic_fetch_add(&peer->refs, 1);
    r->t[i].peer = peer;
    return SHMBUS_OK;
}

/* -------------------------------------------------------------------- up */

/* After a socket call on the link failed (errno): SHMBUS_OK to try again,
 * once the socket is ready for `events` or a slice passed (with `wait`), or
 * what to return: SHMBUS_EAGAIN (without `wait`), a stop, a broken socket. */
static int io_again(shmbus_link_t *l, short events, int wait)
{
    if (errno == EINTR)
        return SHMBUS_OK;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
        l->err = errno;
        return SHMBUS_LINK_IOERR;
    }
    /* Draining, an empty socket is the end: a dead writer's bytes were all
     * queued to us before it died (an AF_UNIX write copies into our queue). */
    if (!wait || (events == POLLIN && atomic_load(&l->draining)))
        return SHMBUS_EAGAIN;
    if (atomic_load(&l->stop))
        return SHMBUS_LINK_STOP;
    struct pollfd p = {.fd = l->fd, .events = events};
    poll(&p, 1, (int)(SLICE_NS / 1000000));
    return atomic_load(&l->stop) ? SHMBUS_LINK_STOP : SHMBUS_OK;
}

/* A whole record at buf[start]; reads the socket until there is one. */
static int fill_record(shmbus_link_t *l, int wait)
{
    for (;;) {
        uint64_t avail = l->end - l->start, need = 4;
        if (avail >= 4) {
            uint32_t body = rd32(l->buf + l->start);
            if (body > MAX_RECORD)
                return bad(l, "a record of %u bytes (limit %u)", body, MAX_RECORD);
            if (body < HEAD - 4)
                return bad(l, "a record of %u bytes, shorter than its header", body);
            need = 4 + (uint64_t)body;
            if (avail >= need)
                return SHMBUS_OK;
        }
        if (l->cap - l->start < need || l->cap - l->end < 65536) {
            if (l->start) {
                memmove(l->buf, l->buf + l->start, avail);
                l->start = 0;
                l->end = avail;
            }
            if (l->cap < need + 65536) {
                uint64_t cap = need + (1u << 20);
                char *grown = realloc(l->buf, cap);
                if (!grown)
                    return bad(l, "no memory for a record of %llu bytes", (unsigned long long)need);
                l->buf = grown;
                l->cap = cap;
            }
        }
        ssize_t n = recv(l->fd, l->buf + l->end, l->cap - l->end, MSG_DONTWAIT);
        if (n > 0) {
            l->end += (uint64_t)n;
            beat(l);
            continue;
        }
        /* ECONNRESET: it closed with our records unread in its socket; what
         * it wrote came first, so this is its end as EOF is. */
        if (n == 0 || (n < 0 && errno == ECONNRESET)) {
            if (avail)
                return bad(l, "the connection ended inside a record (%llu bytes)",
                           (unsigned long long)avail);
            atomic_store(&l->eof, 1);
            wake_down(l);
            shmbus_ring_wake(l->inbox);
            return SHMBUS_LINK_EOF;
        }
        int rc = io_again(l, POLLIN, wait);
        if (rc != SHMBUS_OK)
            return rc;
    }
}

/* Every length and header field of the record at buf[start], before any is used. */
static int check_record(shmbus_link_t *l)
{
    const char *b = l->buf + l->start + 4;
    uint32_t body = rd32(l->buf + l->start);
    uint32_t count = rd32(b), info = rd32(b + 4);
    if (count > MAX_COUNT)
        return bad(l, "a record of %u frames (limit %u)", count, MAX_COUNT);
    uint64_t at = 16 + 4 * (uint64_t)count;
    if (at > body)
        return bad(l, "a record of %u frames has no room for their lengths", count);
    if ((info & 3) == 3)
        return bad(l, "a record with policy code 3");
    if (count > l->lens_cap) {
        uint32_t cap = count < 256 ? 256 : count;
        uint32_t *lens = realloc(l->lens, cap * sizeof *lens);
        struct frame_info *fi = realloc(l->frames, cap * sizeof *fi);
        if (lens)
            l->lens = lens;
        if (fi)
            l->frames = fi;
        if (!lens || !fi)
            return bad(l, "no memory for a record of %u frames", count);
        l->lens_cap = cap;
    }
    memcpy(l->lens, b + 16, 4 * (size_t)count);
    uint64_t sum = 0;
    for (uint32_t i = 0; i < count; i++)
        sum += l->lens[i];
    if (sum != body - at)
        return bad(l, "a record whose frame lengths do not add up to its size");
    uint64_t pos = l->start + 4 + at;
    for (uint32_t i = 0; i < count; i++) {
        uint32_t len = l->lens[i];
        if (len < SHMBUS_FRAME_HEADER_SIZE)
            return bad(l, "a frame of %u bytes, shorter than its header", len);
        shmbus_frame_header h;
        memcpy(&h, l->buf + pos, sizeof h);
        if (h.magic != SHMBUS_FRAME_MAGIC || h.version != SHMBUS_FRAME_VERSION)
            return bad(l, "a frame with magic %#x version %u: not a frame", h.magic, h.version);
        if (h.type >= 64 || !(l->types >> h.type & 1) || h.priority > 100)
            return bad(l, "a frame of type %u priority %u", h.type, h.priority);
        if ((uint64_t)SHMBUS_FRAME_HEADER_SIZE + h.sender_len + h.recipient_len + h.topic_len +
                h.payload_len != len)
            return bad(l, "a frame whose field lengths do not add up to its size");
        uint64_t names = pos + SHMBUS_FRAME_HEADER_SIZE;
        if (h.sender_len != l->name_len || h.sender_id != l->agent_id ||
            memcmp(l->buf + names, l->name, l->name_len))
            return bad(l, "a frame that names another sender");
        struct frame_info *f = &l->frames[i];
        f->at = pos;
        f->len = len;
        f->kind = h.type;
        f->lane = (uint8_t)shmbus_lane_of(h.priority);
        f->route = NULL;
        if (h.type == SHMBUS_LINK_PUBLISH) {
            if (!h.topic_len || h.recipient_len)
                return bad(l, "a publish without a topic, or with a recipient");
            if (h.topic_len > SHMBUS_FRAME_MAX_TOPIC)
                return bad(l, "a topic of %u bytes (limit %u)", h.topic_len,
                           SHMBUS_FRAME_MAX_TOPIC);
            f->where_at = names + h.sender_len + h.recipient_len;
            f->where_len = h.topic_len;
        } else {
            if (!h.recipient_len)
                return bad(l, "a direct frame without a recipient");
            f->where_at = names + h.sender_len;
            f->where_len = h.recipient_len;
        }
        if (h.attempts)
            add(l->counters, SHMBUS_STAT_RETRIED, 1);
        pos += len;
    }
    l->body = body;
    l->count = count;
    l->misses = 0;
    l->records_in++;
    l->v_code = l->v_done = l->v_lane = l->v_pct = 0;
    l->policy = info & 3;
    l->wait_ms = info >> 2;
    uint32_t taken = rd32(b + 8), granted = rd32(b + 12);
    if (taken != atomic_load(&l->taken) || granted != atomic_load(&l->granted)) {
        atomic_store(&l->taken, taken); /* seq_cst: pairs with the down thread's */
        atomic_store(&l->granted, granted);
        if (atomic_load(&l->starved))
            wake_down(l);
    }
    return SHMBUS_OK;
}

/* A current route for every frame of the record, or the first that has none. */
static int resolve(shmbus_link_t *l)
{
    uint64_t version = shmbus_table_version(l->table);
    struct route *last = NULL;
    for (uint32_t i = 0; i < l->count; i++) {
        struct frame_info *f = &l->frames[i];
        int is_topic = f->kind == SHMBUS_LINK_PUBLISH;
        const char *where = l->buf + f->where_at;
        if (last && last->is_topic == is_topic && last->where_len == f->where_len &&
            !memcmp(last->where, where, f->where_len)) {
            f->route = last;
            continue;
        }
        struct route *r = *find(l, is_topic, where, f->where_len);
        if (!r || r->version != version) {
            l->miss_where = where;
            l->miss_len = f->where_len;
            l->miss_topic = is_topic;
            return SHMBUS_LINK_MISS;
        }
        f->route = last = r;
    }
    return SHMBUS_OK;
}

static int dead(shmbus_link_t *l, const struct frame_info *f, int why, int rc,
                const struct target *t, shmbus_ring_t *lane)
{
    if (l->dead_n == l->dead_cap) {
        uint32_t cap = l->dead_cap ? 2 * l->dead_cap : 64;
        shmbus_dead_t *grown = realloc(l->dead, cap * sizeof *grown);
        if (!grown)
            return SHMBUS_ESYS;
        l->dead = grown;
        l->dead_cap = cap;
    }
    shmbus_dead_t *d = &l->dead[l->dead_n++];
    memset(d, 0, sizeof *d);
    d->frame = l->buf + f->at;
    d->len = f->len;
    d->why = why;
    d->rc = rc;
    d->policy = l->policy;
    d->wait_ms = l->wait_ms;
    if (t) {
        d->name = t->name;
        d->name_len = t->name_len;
    }
    if (lane) {
        d->used = shmbus_ring_used(lane);
        d->capacity = shmbus_ring_capacity(lane);
    }
    add(l->counters, l->policy == 2 && why == SHMBUS_DEAD_FULL ? SHMBUS_STAT_DROPPED
                                                                : SHMBUS_STAT_FAILED, 1);
    return SHMBUS_OK;
}

static void count_written(shmbus_link_t *l, struct route *r, struct target *t, uint32_t from,
                          uint32_t n)
{
    uint64_t bytes = 0;
    for (uint32_t i = from; i < from + n; i++)
        bytes += l->lens[i];
    add(l->counters, SHMBUS_STAT_SENT, n);
    add(l->counters, SHMBUS_STAT_BYTES_SENT, bytes);
    add(t->counters, SHMBUS_STAT_DELIVERED, n);
    add(t->counters, SHMBUS_STAT_DELIVERED_BYTES, bytes);
    if (r->is_topic)
        add(r->topic_counters, SHMBUS_STAT_TOPIC_DELIVERED, n);
}

static bool try_direct(shmbus_link_t *l, shmbus_link_t *p, uint32_t first, uint32_t n);

/* The record's first failure, for its verdict: `done` frames of the run
 * before it went. */
static void note(shmbus_link_t *l, uint32_t why, uint32_t done, shmbus_ring_t *lane,
                 uint32_t lane_no)
{
    if (l->v_code)
        return;
    l->v_code = why;
    l->v_done += done;
    l->v_lane = lane_no;
    if (lane) {
        uint64_t cap = shmbus_ring_capacity(lane);
        l->v_pct = cap ? (uint32_t)(100 * shmbus_ring_used(lane) / cap) : 0;
    }
}

static int send_rest(shmbus_link_t *l, int wait);

/* Write frames[first, first+n) (one run: one route, one lane) into target t,
 * from what it has taken so far, waiting up to `left_ns` (0: a look). */
static int write_run(shmbus_link_t *l, struct route *r, struct target *t, uint32_t first,
                     uint32_t n, int64_t left_ns)
{
    shmbus_ring_t *lane = shmbus_ring_lane(t->ring, l->frames[first].lane);
    for (;;) {
        uint32_t done = t->written;
        if (done == n)
            return t->rc = SHMBUS_OK;
        uint32_t written = 0;
        const char *from = l->buf + l->frames[first + done].at;
        int rc = shmbus_ring_write_many(lane, from, l->lens + first + done, n - done, left_ns,
                                        &written);
        t->written = done + written;
        count_written(l, r, t, first + done, written);
        if (rc == SHMBUS_ETOOBIG && !t->lossy) {
            /* That one frame goes to the DLQ; the run goes on after it. */
            note(l, SHMBUS_DEAD_TOOBIG, t->written, NULL, l->frames[first].lane);
            dead(l, &l->frames[first + t->written], SHMBUS_DEAD_TOOBIG, rc, t, lane);
            t->written++;
            continue;
        }
        if (rc == SHMBUS_EINTR && t->written < n)
            continue;
        return t->rc = t->written == n ? SHMBUS_OK : rc;
    }
}

/* One run of frames to every target of its route: each is tried without
 * waiting first, so one full subscriber does not hold up the others; then
 * the full ones again under the policy, sharing one deadline (as the shm
 * sender's publish does). */
static void deliver_run(shmbus_link_t *l, uint32_t first, uint32_t n)
{
    struct route *r = l->frames[first].route;
    if (r->is_topic) {
        uint64_t bytes = 0;
        for (uint32_t i = first; i < first + n; i++)
            bytes += l->lens[i];
        add(r->topic_counters, SHMBUS_STAT_PUBLISHED, n);
        add(r->topic_counters, SHMBUS_STAT_TOPIC_BYTES, bytes);
    } else if (!r->known) {
        note(l, SHMBUS_DEAD_NOAGENT, 0, NULL, 0);
        for (uint32_t i = first; i < first + n; i++)
            dead(l, &l->frames[i], SHMBUS_DEAD_NOAGENT, 0, NULL, NULL);
        return;
    }
    int full = 0;
    for (uint32_t k = 0; k < r->targets; k++) {
        struct target *t = &r->t[k];
        t->written = 0;
        if (t->peer && try_direct(l, t->peer, first, n)) {
            t->written = n;
            t->rc = SHMBUS_OK;
            count_written(l, r, t, first, n);
            continue;
        }
        full |= write_run(l, r, t, first, n, 0) == SHMBUS_EAGAIN && !t->lossy;
    }
    if (full && l->policy == 0) {
        bool forever = l->wait_ms == FOREVER_MS;
        int64_t deadline = forever ? INT64_MAX : mono_ns() + (int64_t)l->wait_ms * 1000000;
        for (uint32_t k = 0; k < r->targets; k++) {
            struct target *t = &r->t[k];
            while (t->rc == SHMBUS_EAGAIN && !t->lossy && !atomic_load(&l->stop)) {
                int64_t until = deadline;
                if (atomic_load(&l->draining) && atomic_load(&l->drain_until) < until)
                    until = atomic_load(&l->drain_until); /* its sender is gone */
                int64_t left = until - mono_ns();
                if (left <= 0)
                    break;
                beat(l); /* blocked on a full inbox is alive, as an shm sender is */
                write_run(l, r, t, first, n, left < SLICE_NS ? left : SLICE_NS);
                if (t->rc == SHMBUS_ETIMEDOUT)
                    t->rc = SHMBUS_EAGAIN;
            }
        }
    }
    for (uint32_t k = 0; k < r->targets; k++) {
        struct target *t = &r->t[k];
        if (t->written == n || t->lossy)
            continue;
        shmbus_ring_t *lane = shmbus_ring_lane(t->ring, l->frames[first].lane);
        int why = t->rc == SHMBUS_ECLOSED                              ? SHMBUS_DEAD_LEFT
                  : t->rc == SHMBUS_EAGAIN || t->rc == SHMBUS_ETIMEDOUT ? SHMBUS_DEAD_FULL
                                                                        : SHMBUS_DEAD_FAILED;
        note(l, why, t->written, lane, l->frames[first].lane);
        if (why == SHMBUS_DEAD_FULL && l->policy == 1 && !r->is_topic &&
            !atomic_load(&l->draining)) {
            /* "error": its sender raises, and keeps the message, as an shm sender does */
            add(l->counters, SHMBUS_STAT_FAILED, n - t->written);
            continue;
        }
        for (uint32_t i = first + t->written; i < first + n; i++)
            dead(l, &l->frames[i], why, t->rc, t, lane);
    }
    if (!l->v_code)
        l->v_done += n;
}

/* Tell the agent the verdict on its record of policy "error" (it waits for
 * it): a record of no frames, kind 1 in its info word (wire.py).  After any
 * record the socket took only in part. */
static int send_verdict(shmbus_link_t *l)
{
    uint32_t v[HEAD / 4] = {HEAD - 4, 0, 1u | l->v_code << 2 | l->v_lane << 5 | l->v_pct << 7,
                            l->records_in, l->v_done};
    int rc = SHMBUS_OK;
    pthread_mutex_lock(&l->mu);
    if (l->sending)
        rc = send_rest(l, 1);
    size_t at = 0;
    while (rc == SHMBUS_OK && at < sizeof v) {
        ssize_t k = send(l->fd, (char *)v + at, sizeof v - at, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k >= 0)
            at += (size_t)k;
        else
            rc = io_again(l, POLLOUT, 1);
    }
    pthread_mutex_unlock(&l->mu);
    return rc;
}

/* ------------------------------------------------------------------ hub */

static void rearm(shmbus_link_t *l)
{
    struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.ptr = l};
    epoll_ctl(l->hub->ep, EPOLL_CTL_MOD, l->fd, &ev);
}

/* The up thread has nothing to do: the hub reads the socket again. */
static void hand_back(shmbus_link_t *l)
{
    /* An answer to what went through may come: the hub looks for it.  Not
     * after each record of a stream: the hub would spin beside it. */
    atomic_store(&l->hub->active, mono_ns());
    atomic_store(&l->owner, HUB);
    pthread_mutex_unlock(&l->up_mu);
    rearm(l);
}

/* Wait for the up thread's turn, then hold up_mu: at once without a hub. */
static int take_turn(shmbus_link_t *l)
{
    for (;;) {
        if (atomic_load(&l->stop))
            return SHMBUS_LINK_STOP;
        if (atomic_load(&l->owner) == OWN) {
            pthread_mutex_lock(&l->up_mu);
            return SHMBUS_OK;
        }
        if (atomic_load(&l->draining)) { /* the hub lets go of it (serve) */
            pthread_mutex_lock(&l->up_mu);
            atomic_store(&l->owner, OWN);
            return SHMBUS_OK;
        }
        struct pollfd p = {.fd = l->own_fd, .events = POLLIN};
        if (poll(&p, 1, (int)(SLICE_NS / 1000000)) > 0) {
            uint64_t n;
            ssize_t k = read(l->own_fd, &n, sizeof n);
            (void)k;
        }
    }
}

/* The hub's share: records it can deliver at once, without waiting and
 * without Python (in a ping-pong, every one): a single frame into an inbox
 * with room, or a run straight to a uds recipient.  1 when a record needs
 * the up thread (it is left as it is, nothing of it delivered). */
static int serve_fast(shmbus_link_t *l)
{
    for (;;) {
        if (!l->in_record) {
            int rc = fill_record(l, 0);
            if (rc == SHMBUS_EAGAIN)
                return 0;
            if (rc == SHMBUS_OK)
                rc = check_record(l);
            if (rc != SHMBUS_OK) {
                l->pending = rc;
                return 1;
            }
            l->in_record = 1;
        }
        if (!l->count && l->policy != 1) { /* its counts, or a heartbeat: check_record took them */
            l->in_record = 0;
            l->start += 4 + (uint64_t)l->body;
            continue;
        }
        if (l->policy == 1 || resolve(l) != SHMBUS_OK)
            return 1;
        struct frame_info *f = &l->frames[0];
        struct route *r = f->route;
        if (r->is_topic || !r->known || r->targets != 1)
            return 1;
        /* One run, or the up thread splits it: a frame between two to one
         * recipient may be another's (a client sends one per record; a
         * hostile one need not). */
        for (uint32_t i = 1; i < l->count; i++)
            if (f[i].route != r || f[i].lane != f->lane)
                return 1;
        struct target *t = &r->t[0];
        bool done = false;
        if (t->peer && try_direct(l, t->peer, 0, l->count)) {
            done = true;
        } else if (l->count == 1) {
            uint32_t written = 0;
            int rc = shmbus_ring_write_many(shmbus_ring_lane(t->ring, f->lane), l->buf + f->at,
                                            l->lens, 1, 0, &written);
            done = rc == SHMBUS_OK && written == 1;
        }
        if (!done)
            return 1;
        t->written = l->count;
        t->rc = SHMBUS_OK;
        count_written(l, r, t, 0, l->count);
        l->in_record = 0;
        l->start += 4 + (uint64_t)l->body;
        atomic_store(&l->hub->active, mono_ns());
    }
}

static void serve(shmbus_link_t *l)
{
    if (atomic_load(&l->owner) != HUB || atomic_load(&l->draining))
        return; /* the up thread has it, and re-arms when it hands it back */
    if (pthread_mutex_trylock(&l->up_mu)) {
        rearm(l); /* the up thread is just handing it back */
        return;
    }
    if (atomic_load(&l->stop) || !serve_fast(l)) {
        pthread_mutex_unlock(&l->up_mu);
        if (!atomic_load(&l->stop))
            rearm(l);
        return;
    }
    atomic_store(&l->owner, OWN);
    pthread_mutex_unlock(&l->up_mu);
    own_turn(l);
}

shmbus_hub_t *shmbus_hub_new(int64_t spin_ns)
{
    shmbus_hub_t *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->ep = epoll_create1(EPOLL_CLOEXEC);
    h->kick = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (h->ep < 0 || h->kick < 0 || epoll_ctl(h->ep, EPOLL_CTL_ADD, h->kick, &ev)) {
        if (h->ep >= 0)
            close(h->ep);
        if (h->kick >= 0)
            close(h->kick);
        free(h);
        return NULL;
    }
    h->spin_ns = spin_ns;
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->turn, NULL);
    return h;
}

void shmbus_hub_stop(shmbus_hub_t *h)
{
    atomic_store(&h->stop, 1);
    uint64_t one = 1;
    ssize_t r = write(h->kick, &one, sizeof one);
    (void)r;
}

void shmbus_hub_free(shmbus_hub_t *h)
{
    if (!h)
        return;
    close(h->ep);
    close(h->kick);
    pthread_cond_destroy(&h->turn);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

int shmbus_hub_run(shmbus_hub_t *h)
{
    struct epoll_event ev[32];
    while (!atomic_load(&h->stop)) {
        bool spinning = mono_ns() - atomic_load(&h->active) < h->spin_ns;
        /* mu from the wait to the last event served: an event names a link
         * that unhub (which takes mu) has not let go of. */
        pthread_mutex_lock(&h->mu);
        /* The hub takes mu back at once after each round: an unhub that wants
         * it would lose that race round after round. */
        while (atomic_load(&h->wanting))
            pthread_cond_wait(&h->turn, &h->mu);
        int n = epoll_wait(h->ep, ev, 32, spinning ? 0 : (int)(SLICE_NS / 1000000));
        for (int i = 0; i < n; i++) {
            if (ev[i].data.ptr) {
                serve(ev[i].data.ptr);
            } else {
                uint64_t k;
                ssize_t r = read(h->kick, &k, sizeof k);
                (void)r;
            }
        }
        pthread_mutex_unlock(&h->mu);
        if (n <= 0 && spinning)
            sched_yield(); /* a thread that has work takes the CPU first */
    }
    return SHMBUS_OK;
}

int shmbus_link_hub(shmbus_link_t *l, shmbus_hub_t *h)
{
    if (l->hub || !h)
        return SHMBUS_EINVAL;
    pthread_mutex_lock(&l->up_mu);
    l->hub = h;
    atomic_store(&l->owner, HUB);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.ptr = l};
    int rc = epoll_ctl(h->ep, EPOLL_CTL_ADD, l->fd, &ev);
    if (rc) {
        l->hub = NULL;
        atomic_store(&l->owner, OWN);
    }
    pthread_mutex_unlock(&l->up_mu);
    return rc ? SHMBUS_ESYS : SHMBUS_OK;
}

void shmbus_link_unhub(shmbus_link_t *l)
{
    shmbus_hub_t *h = l->hub;
    if (!h)
        return;
    atomic_fetch_add(&h->wanting, 1);
    uint64_t one = 1;
    ssize_t r = write(h->kick, &one, sizeof one); /* out of its wait */
    (void)r;
    pthread_mutex_lock(&h->mu); /* not while the hub serves it */
    epoll_ctl(h->ep, EPOLL_CTL_DEL, l->fd, NULL);
    atomic_fetch_sub(&h->wanting, 1);
    pthread_cond_broadcast(&h->turn);
    pthread_mutex_unlock(&h->mu);
}

/* -------------------------------------------------------------------- up */

int shmbus_link_up(shmbus_link_t *l)
{
    l->dead_n = 0; /* the caller took them */
    int rc = take_turn(l);
    if (rc != SHMBUS_OK)
        return rc;
    for (;;) {
        if (atomic_load(&l->stop)) {
            rc = SHMBUS_LINK_STOP;
            break;
        }
        if (l->pending) { /* the hub met it */
            rc = l->pending;
            l->pending = 0;
            break;
        }
        if (!l->in_record) {
            rc = fill_record(l, !l->hub);
            if (rc == SHMBUS_EAGAIN && atomic_load(&l->draining)) {
                rc = SHMBUS_LINK_EOF; /* all it wrote is delivered */
                break;
            }
            if (rc == SHMBUS_EAGAIN) { /* nothing for us: the hub reads until there is */
                hand_back(l);
                rc = take_turn(l);
                if (rc != SHMBUS_OK)
                    return rc;
                continue;
            }
            if (rc == SHMBUS_OK)
                rc = check_record(l);
            if (rc != SHMBUS_OK)
                break;
            l->in_record = 1;
        }
        rc = resolve(l);
        /* Its routes would evict each other for ever (a client sends one
         * destination per record; a change of the table costs a few more). */
        if (rc == SHMBUS_LINK_MISS && ++l->misses > MAX_ROUTES)
            rc = bad(l, "a record to more destinations than %u", MAX_ROUTES);
        if (rc != SHMBUS_OK)
            break;
        for (uint32_t i = 0; i < l->count;) {
            uint32_t j = i + 1;
            while (j < l->count && l->frames[j].route == l->frames[i].route &&
                   l->frames[j].lane == l->frames[i].lane)
                j++;
            deliver_run(l, i, j - i);
            i = j;
        }
        l->in_record = 0;
        l->start += 4 + (uint64_t)l->body; /* the bytes stay until the next call */
        /* Of no frames: a barrier (the client's sync), answered once all it
         * sent before is delivered or, for the DLQ, handed to Python. */
        if (l->policy == 1 && !atomic_load(&l->draining)) {
            rc = send_verdict(l);
            if (rc != SHMBUS_OK)
                break;
        }
        if (l->dead_n) {
            rc = SHMBUS_LINK_DEAD;
            break;
        }
    }
    pthread_mutex_unlock(&l->up_mu); /* still its turn: the hub leaves it alone */
    return rc;
}

uint32_t shmbus_link_dead_count(const shmbus_link_t *l) { return l->dead_n; }

const shmbus_dead_t *shmbus_link_dead(const shmbus_link_t *l, uint32_t i)
{
    return i < l->dead_n ? &l->dead[i] : NULL;
}

/* ------------------------------------------------------------------ down */

static struct record *slot(shmbus_link_t *l, uint32_t k)
{
    uint32_t i = (l->first + k) % AHEAD;
    if (!l->recs[i]) {
        struct record *rec = calloc(1, sizeof *rec);
        uint64_t cap = 1u << 20, most = 0;
        for (uint32_t lane = 0; lane < SHMBUS_RING_LANES; lane++) {
            uint64_t m = shmbus_ring_max_frame(shmbus_ring_lane(l->inbox, lane));
            most = m > most ? m : most;
        }
        cap = most > cap ? most : cap;
        if (rec)
            rec->frames = malloc(cap);
        if (!rec || !rec->frames) {
            free(rec);
            return NULL;
        }
        rec->cap = cap;
        l->recs[i] = rec;
    }
    return l->recs[i];
}

/* Send what is left of a record (l->sending, from l->sent bytes), under mu.
 * With `wait` 0 it never blocks: what the socket did not take stays for
 * the down thread, which finishes it before anything else. */
static int send_rest(shmbus_link_t *l, int wait)
{
    struct record *rec = l->sending;
    struct iovec iov[3] = {
        {.iov_base = rec->head, .iov_len = HEAD},
        {.iov_base = rec->lens, .iov_len = 4 * (size_t)rec->count},
        {.iov_base = rec->frames, .iov_len = rec->bytes},
    };
    uint64_t skip = l->sent;
    int at = 0;
    while (at < 3 && skip >= iov[at].iov_len)
        skip -= iov[at++].iov_len;
    if (at < 3) {
        iov[at].iov_base = (char *)iov[at].iov_base + skip;
        iov[at].iov_len -= skip;
    }
    while (at < 3) {
        struct msghdr m = {.msg_iov = iov + at, .msg_iovlen = (size_t)(3 - at)};
        ssize_t n = sendmsg(l->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            int rc = io_again(l, POLLOUT, wait);
            if (rc != SHMBUS_OK)
                return rc;
            continue;
        }
        l->sent += (uint64_t)n;
        while (at < 3 && (size_t)n >= iov[at].iov_len) {
            n -= (ssize_t)iov[at].iov_len;
            at++;
        }
        if (at < 3) {
            iov[at].iov_base = (char *)iov[at].iov_base + n;
            iov[at].iov_len -= (size_t)n;
        }
    }
    l->sending = NULL;
    return SHMBUS_OK;
}

/* Drop the records the agent counts taken; is there credit for one more? (under mu) */
static bool may_send(shmbus_link_t *l)
{
    uint32_t taken = atomic_load(&l->taken), granted = atomic_load(&l->granted);
    while (l->outstanding && (int32_t)(taken - l->recs[l->first]->seq) >= 0) {
        /* Received when the agent took it, as an shm reader counts: what
         * waits in its socket is still pending. */
        add(l->counters, SHMBUS_STAT_RECEIVED, l->recs[l->first]->count);
        add(l->counters, SHMBUS_STAT_BYTES_RECEIVED, l->recs[l->first]->bytes);
        l->first = (l->first + 1) % AHEAD;
        l->outstanding--;
    }
    return (int32_t)(granted - l->seq) > 0 && l->outstanding < AHEAD;
}

/* The record just filled in goes out (under mu). */
static int send_new(shmbus_link_t *l, struct record *rec, uint32_t count, uint64_t bytes, int wait)
{
    rec->seq = ++l->seq;
    rec->count = count;
    rec->bytes = bytes;
    uint32_t head[HEAD / 4] = {(uint32_t)(16 + 4 * (uint64_t)count + bytes), count, 0, 0, 0};
    memcpy(rec->head, head, HEAD);
    l->outstanding++;
    l->sending = rec;
    l->sent = 0;
    return send_rest(l, wait);
}

static bool lanes_empty(shmbus_ring_t *inbox)
{
    for (uint32_t k = 0; k < SHMBUS_RING_LANES; k++)
        if (shmbus_ring_used(shmbus_ring_lane(inbox, k)))
            return false;
    return true;
}

/* Frames [first, first + n) of this record straight to the socket of a
 * recipient on the uds transport, sparing its down thread a wake-up: only
 * when nothing of it is in its inbox (so its order holds), it asked for a
 * record, and nobody else sends to it now.  And, for a short run, only when
 * it has taken all we sent: one that is behind gets short runs through its
 * inbox, where its down thread gathers many into a record (a stream of
 * single sends would otherwise reach it one frame per record).  Never
 * waits.  Returns whether they went (or are the down thread's to finish). */
static bool try_direct(shmbus_link_t *l, shmbus_link_t *p, uint32_t first, uint32_t n)
{
    if (n > BLOCK || pthread_mutex_trylock(&p->mu))
        return false;
    bool sent = false;
    uint64_t bytes = 0;
    for (uint32_t i = first; i < first + n; i++)
        bytes += l->lens[i];
    struct record *rec;
    if (!atomic_load(&p->closed) && !atomic_load(&p->stop) && !atomic_load(&p->eof) &&
        !p->sending && may_send(p) && (!p->outstanding || n >= DIRECT_RUN) &&
        lanes_empty(p->inbox) &&
        (rec = slot(p, p->outstanding)) && bytes <= rec->cap) {
        memcpy(rec->frames, l->buf + l->frames[first].at, bytes);
        memcpy(rec->lens, l->lens + first, 4 * (size_t)n);
        int rc = send_new(p, rec, n, bytes, 0);
        if (rc == SHMBUS_EAGAIN)
            shmbus_ring_wake(p->inbox); /* its down thread finishes the record */
        /* A broken socket: its down thread finds out; the record is among
         * the ones never taken, for the DLQ. */
        sent = true;
    }
    pthread_mutex_unlock(&p->mu);
    return sent;
}

int shmbus_link_down(shmbus_link_t *l)
{
    int rc = SHMBUS_OK;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        if (atomic_load(&l->stop)) {
            rc = SHMBUS_LINK_STOP;
            break;
        }
        if (atomic_load(&l->eof)) {
            may_send(l); /* what its last record counts taken is received */
            l->outstanding = 0; /* it dead-lettered what it had not read, and left */
            shutdown(l->fd, SHUT_WR);
            rc = SHMBUS_LINK_EOF;
            break;
        }
        if (l->sending) { /* what a direct send left */
            rc = send_rest(l, 1);
            if (rc != SHMBUS_OK)
                break;
            continue;
        }
        if (!may_send(l)) {
            /* Not asked for more: the backlog waits in the lanes. */
            uint32_t taken = atomic_load(&l->taken), granted = atomic_load(&l->granted);
            atomic_store(&l->starved, 1); /* seq_cst: pairs with check_record's */
            if (atomic_load(&l->taken) == taken && atomic_load(&l->granted) == granted &&
                !atomic_load(&l->stop) && !atomic_load(&l->eof)) {
                struct timespec ts;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                ts.tv_nsec += SLICE_NS;
                if (ts.tv_nsec >= 1000000000L) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000L;
                }
                pthread_mutex_unlock(&l->mu); /* a direct send may come meanwhile */
                sem_clockwait(&l->credit, CLOCK_MONOTONIC, &ts);
                pthread_mutex_lock(&l->mu);
            }
            atomic_store(&l->starved, 0);
            continue;
        }
        struct record *rec = slot(l, l->outstanding);
        if (!rec) {
            rc = bad(l, "no memory for a record");
            break;
        }
        uint32_t count = 0;
        uint64_t bytes = 0;
        rc = shmbus_ring_read_many(l->inbox, rec->frames, rec->cap, rec->lens, BLOCK, 0, 0,
                                   &count, &bytes);
        if (rc == SHMBUS_EAGAIN) {
            /* Sleep without mu: a direct send may come meanwhile. */
            pthread_mutex_unlock(&l->mu);
            shmbus_ring_wait(l->inbox, SLICE_NS, 0);
            pthread_mutex_lock(&l->mu);
            continue;
        }
        if (rc == SHMBUS_EINTR)
            continue;
        if (rc < 0) {
            rc = bad(l, "its inbox failed: error %d", rc);
            break;
        }
        rc = send_new(l, rec, count, bytes, 1);
        if (rc != SHMBUS_OK)
            break;
    }
    /* Nobody sends here any more, however this ended: what is out stays as
     * it is for shmbus_link_lost. */
    atomic_store(&l->closed, 1);
    pthread_mutex_unlock(&l->mu);
    return rc;
}

uint32_t shmbus_link_lost_count(const shmbus_link_t *l) { return l->outstanding; }

int shmbus_link_lost(const shmbus_link_t *l, uint32_t i, const char **frames,
                     const uint32_t **lens, uint32_t *count)
{
    if (i >= l->outstanding)
        return SHMBUS_EINVAL;
    const struct record *rec = l->recs[(l->first + i) % AHEAD];
    *frames = rec->frames;
    *lens = rec->lens;
    *count = rec->count;
    return SHMBUS_OK;
}

/* ---------------------------------------------------------------- client */

int64_t shmbus_record_build(const char *names, uint32_t sender_len, uint32_t recipient_len,
                            uint32_t topic_len, uint32_t sender_id, uint32_t recipient_id,
                            uint32_t kind, uint32_t priority, uint32_t ttl_ms, uint32_t info,
                            uint64_t first_id, uint64_t request_id, uint64_t correlation_id,
                            int64_t timestamp_ns, const char *blob, const uint32_t *lens,
                            const uint8_t *flags, uint32_t count, char *out, uint64_t cap)
{
    uint32_t names_len = sender_len + recipient_len + topic_len;
    if (sender_len > SHMBUS_FRAME_MAX_NAME || recipient_len > SHMBUS_FRAME_MAX_NAME ||
        topic_len > SHMBUS_FRAME_MAX_TOPIC || kind > 255 || priority > 100 || count > MAX_COUNT)
        return SHMBUS_EINVAL;
    uint64_t size = HEAD + 4 * (uint64_t)count;
    for (uint32_t i = 0; i < count; i++)
        size += SHMBUS_FRAME_HEADER_SIZE + (uint64_t)names_len + lens[i];
    if (size > cap)
        return SHMBUS_ESMALL;
    if (size - 4 > MAX_RECORD)
        return SHMBUS_ETOOBIG;
    if (!timestamp_ns) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        timestamp_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    }
    uint32_t head[HEAD / 4] = {(uint32_t)(size - 4), count, info, 0, 0};
    memcpy(out, head, HEAD);
    char *len_at = out + HEAD, *p = len_at + 4 * (uint64_t)count;
    shmbus_frame_header h = {
        .magic = SHMBUS_FRAME_MAGIC,
        .version = SHMBUS_FRAME_VERSION,
        .type = (uint8_t)kind,
        .priority = (uint8_t)priority,
        .sender_id = sender_id,
        .recipient_id = recipient_id,
        .request_id = request_id,
        .correlation_id = correlation_id,
        .timestamp_ns = timestamp_ns,
        .ttl_ms = ttl_ms,
        .sender_len = (uint8_t)sender_len,
        .recipient_len = (uint8_t)recipient_len,
        .topic_len = (uint16_t)topic_len,
    };
    for (uint32_t i = 0; i < count; i++) {
        uint32_t frame_len = SHMBUS_FRAME_HEADER_SIZE + names_len + lens[i];
        memcpy(len_at + 4 * (uint64_t)i, &frame_len, 4);
        h.flags = flags[i];
        h.id = first_id + i;
        h.payload_len = lens[i];
        memcpy(p, &h, sizeof h);
        memcpy(p + sizeof h, names, names_len);
        memcpy(p + sizeof h + names_len, blob, lens[i]);
        blob += lens[i];
        p += frame_len;
    }
    return (int64_t)size;
}

int64_t shmbus_record_send(int fd, uint32_t taken, uint32_t granted, const char *names,
                           uint32_t sender_len, uint32_t recipient_len, uint32_t topic_len,
                           uint32_t sender_id, uint32_t recipient_id, uint32_t kind,
                           uint32_t priority, uint32_t ttl_ms, uint32_t info, uint64_t id,
                           uint64_t request_id, uint64_t correlation_id, const char *payload,
                           uint32_t len, uint32_t flags, char *out, uint64_t cap, int64_t *sent)
{
    uint8_t flag = (uint8_t)flags;
    int64_t size = shmbus_record_build(names, sender_len, recipient_len, topic_len, sender_id,
                                       recipient_id, kind, priority, ttl_ms, info, id, request_id,
                                       correlation_id, 0, payload, &len, &flag, 1, out, cap);
    if (size < 0)
        return size;
    uint32_t counts[2] = {taken, granted};
    memcpy(out + 12, counts, sizeof counts);
    ssize_t n;
    do
        n = send(fd, out, (size_t)size, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    *sent = n < 0 ? -(int64_t)errno : (int64_t)n;
    return size;
}
