/* shmbus stats: see shmbus_stats.h. */
#define _GNU_SOURCE
#include "shmbus_stats.h"

#include <errno.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define STATE_FREE 0
#define STATE_CLAIMING 1
#define STATE_READY 2

typedef struct {
    alignas(128) struct {
        uint64_t magic;
        uint32_t version;
        uint32_t header_size;
        uint32_t agent_slots;
        uint32_t topic_slots;
        uint32_t slot_size;
    } meta;
    alignas(128) _Atomic uint64_t bus[16];
} stats_header;

typedef struct {
    alignas(128) _Atomic uint64_t state;
    uint64_t id;
    int64_t pid;
    uint32_t name_len;
    char name[SHMBUS_STATS_NAME];
    _Atomic uint64_t heartbeat; /* CLOCK_MONOTONIC ns, stored by the agent's beat thread */
    alignas(128) _Atomic uint64_t own[16];
    alignas(128) _Atomic uint64_t others[16];
} agent_slot;

typedef struct {
    alignas(128) _Atomic uint32_t state;
    uint32_t hash;
    uint32_t name_len;
    char name[SHMBUS_STATS_TOPIC_NAME];
    alignas(128) _Atomic uint64_t counters[16];
} topic_slot;

_Static_assert(sizeof(stats_header) == SHMBUS_STATS_HEADER_SIZE, "header size");
_Static_assert(sizeof(agent_slot) == SHMBUS_STATS_SLOT_SIZE, "agent slot size");
_Static_assert(sizeof(topic_slot) == SHMBUS_STATS_SLOT_SIZE, "topic slot size");
_Static_assert(offsetof(agent_slot, own) == 128, "own counters at 128");
_Static_assert(offsetof(agent_slot, heartbeat) == SHMBUS_STATS_HEARTBEAT_AT, "heartbeat at 96");
_Static_assert(offsetof(agent_slot, others) == 256, "senders' counters at 256");
_Static_assert(offsetof(topic_slot, counters) == 256, "topic counters at 256");
/* own + 16 is others[0], so one pointer reaches both lines. */
_Static_assert(offsetof(agent_slot, others) - offsetof(agent_slot, own) ==
                   SHMBUS_STAT_DELIVERED * sizeof(uint64_t),
               "delivered is own[16]");

struct shmbus_stats {
    void *base;
    stats_header *header;
    agent_slot *agents;
    topic_slot *topics;
};

uint64_t shmbus_stats_segment_size(void)
{
    return SHMBUS_STATS_HEADER_SIZE +
           (uint64_t)SHMBUS_STATS_SLOT_SIZE * (SHMBUS_STATS_AGENT_SLOTS + SHMBUS_STATS_TOPIC_SLOTS);
}

static shmbus_stats_t *view(void *base)
{
    shmbus_stats_t *s = malloc(sizeof *s);
    if (s) {
        s->base = base;
        s->header = base;
        s->agents = (agent_slot *)((char *)base + SHMBUS_STATS_HEADER_SIZE);
        s->topics = (topic_slot *)(s->agents + SHMBUS_STATS_AGENT_SLOTS);
    }
    return s;
}

int shmbus_stats_create(const char *name, shmbus_stats_t **out)
{
    uint64_t size = shmbus_stats_segment_size();
    void *base;
    int rc = shmbus_seg_create(name, size, &base);
    if (rc != SHMBUS_OK)
        return rc;
    shmbus_stats_t *s = view(base);
    if (!s) {
        shmbus_seg_unmap(base, size);
        shmbus_seg_unlink(name);
        errno = ENOMEM;
        return SHMBUS_ESYS;
    }
    stats_header *h = s->header;
    h->meta.version = SHMBUS_STATS_VERSION;
    h->meta.header_size = SHMBUS_STATS_HEADER_SIZE;
    h->meta.agent_slots = SHMBUS_STATS_AGENT_SLOTS;
    h->meta.topic_slots = SHMBUS_STATS_TOPIC_SLOTS;
    h->meta.slot_size = SHMBUS_STATS_SLOT_SIZE;
    /* M1: the magic last, with release; pairs with M2 in shmbus_stats_attach. */
    atomic_store_explicit((_Atomic uint64_t *)&h->meta.magic, SHMBUS_STATS_MAGIC,
                          memory_order_release);
    *out = s;
    return SHMBUS_OK;
}

int shmbus_stats_attach(const char *name, shmbus_stats_t **out)
{
    uint64_t size = shmbus_stats_segment_size(), got;
    void *base;
    int rc = shmbus_seg_attach(name, size, size, &base, &got);
    if (rc != SHMBUS_OK)
        return rc;
    stats_header *h = base;
    uint64_t magic = atomic_load_explicit((_Atomic uint64_t *)&h->meta.magic,
                                          memory_order_acquire); /* M2 */
    shmbus_stats_t *s = NULL;
    if (magic == SHMBUS_STATS_MAGIC && h->meta.version == SHMBUS_STATS_VERSION &&
        h->meta.header_size == SHMBUS_STATS_HEADER_SIZE &&
        h->meta.agent_slots == SHMBUS_STATS_AGENT_SLOTS &&
        h->meta.topic_slots == SHMBUS_STATS_TOPIC_SLOTS &&
        h->meta.slot_size == SHMBUS_STATS_SLOT_SIZE)
        s = view(base);
    if (!s) {
        shmbus_seg_unmap(base, size);
        return SHMBUS_EBADSEG;
    }
    *out = s;
    return SHMBUS_OK;
}

void shmbus_stats_close(shmbus_stats_t *s)
{
    if (!s)
        return;
    shmbus_seg_unmap(s->base, shmbus_stats_segment_size());
    free(s);
}

const void *shmbus_stats_base(const shmbus_stats_t *s) { return s->base; }

uint64_t *shmbus_stats_agent(shmbus_stats_t *s, uint32_t slot)
{
    if (!s || slot == 0 || slot >= SHMBUS_STATS_AGENT_SLOTS)
        return NULL;
    return (uint64_t *)s->agents[slot].own;
}

int shmbus_stats_agent_open(shmbus_stats_t *s, uint32_t slot, uint64_t agent_id, int64_t pid,
                            const char *name, uint32_t name_len)
{
    if (!s || slot == 0 || slot >= SHMBUS_STATS_AGENT_SLOTS || name_len > SHMBUS_STATS_NAME)
        return SHMBUS_EINVAL;
    agent_slot *a = &s->agents[slot];
    atomic_store_explicit(&a->state, STATE_CLAIMING, memory_order_relaxed);
    for (int i = 0; i < 16; i++) {
        atomic_store_explicit(&a->own[i], 0, memory_order_relaxed);
        atomic_store_explicit(&a->others[i], 0, memory_order_relaxed);
    }
    a->id = agent_id;
    a->pid = pid;
    atomic_store_explicit(&a->heartbeat, 0, memory_order_relaxed);
    a->name_len = name_len;
    memset(a->name, 0, sizeof a->name);
    memcpy(a->name, name, name_len);
    /* Readers that see READY see the identity written above. */
    atomic_store_explicit(&a->state, STATE_READY, memory_order_release);
    return SHMBUS_OK;
}

int shmbus_stats_agent_close(shmbus_stats_t *s, uint32_t slot)
{
    if (!s || slot == 0 || slot >= SHMBUS_STATS_AGENT_SLOTS)
        return SHMBUS_EINVAL;
    agent_slot *a = &s->agents[slot], *departed = &s->agents[0];
    atomic_store_explicit(&a->state, STATE_FREE, memory_order_release);
    for (int i = 0; i < 16; i++) {
        /* exchange, not load + store: a sender still adding to "delivered"
         * lands either in the total or in the next fold, never nowhere. */
        atomic_fetch_add_explicit(&departed->own[i],
                                  atomic_exchange_explicit(&a->own[i], 0, memory_order_relaxed),
                                  memory_order_relaxed);
        atomic_fetch_add_explicit(&departed->others[i],
                                  atomic_exchange_explicit(&a->others[i], 0, memory_order_relaxed),
                                  memory_order_relaxed);
    }
    return SHMBUS_OK;
}

static uint32_t fnv1a(const char *p, uint32_t len)
{
    uint32_t h = 2166136261u;
    for (uint32_t i = 0; i < len; i++)
        h = (h ^ (uint8_t)p[i]) * 16777619u;
    return h;
}

uint64_t *shmbus_stats_topic(shmbus_stats_t *s, const char *topic, uint32_t len)
{
    const uint32_t usable = SHMBUS_STATS_TOPIC_SLOTS - 1; /* the last is overflow */
    topic_slot *overflow = &s->topics[usable];
    if (len > SHMBUS_STATS_TOPIC_NAME)
        return (uint64_t *)overflow->counters;
    uint32_t hash = fnv1a(topic, len);
    for (uint32_t probe = 0; probe < usable; probe++) {
        topic_slot *t = &s->topics[(hash + probe) % usable];
        uint32_t state = atomic_load_explicit(&t->state, memory_order_acquire);
        if (state == STATE_FREE) {
            uint32_t expected = STATE_FREE;
            if (atomic_compare_exchange_strong_explicit(&t->state, &expected, STATE_CLAIMING,
                                                        memory_order_acquire,
                                                        memory_order_relaxed)) {
                t->hash = hash;
                t->name_len = len;
                memcpy(t->name, topic, len);
                atomic_store_explicit(&t->state, STATE_READY, memory_order_release);
                return (uint64_t *)t->counters;
            }
            state = expected;
        }
        /* Another publisher is naming this slot: give it a moment, then
         * move on (it may have died half-way; the name decides). */
        for (int spin = 0; state == STATE_CLAIMING && spin < 1000; spin++) {
            sched_yield();
            state = atomic_load_explicit(&t->state, memory_order_acquire);
        }
        if (state == STATE_READY && t->hash == hash && t->name_len == len &&
            memcmp(t->name, topic, len) == 0)
            return (uint64_t *)t->counters;
    }
    return (uint64_t *)overflow->counters;
}

uint64_t *shmbus_stats_bus(shmbus_stats_t *s) { return (uint64_t *)s->header->bus; }

uint64_t *shmbus_stats_heartbeat(shmbus_stats_t *s, uint32_t slot)
{
    if (!s || slot == 0 || slot >= SHMBUS_STATS_AGENT_SLOTS)
        return NULL;
    return (uint64_t *)&s->agents[slot].heartbeat;
}

void shmbus_stats_add(uint64_t *counters, uint32_t index, uint64_t n)
{
    /* Topic and bus pointers have 16 counters, an agent's 32 (own + senders'). */
    if (counters &&
        (index < 16 || index == SHMBUS_STAT_DELIVERED || index == SHMBUS_STAT_DELIVERED_BYTES))
        atomic_fetch_add_explicit((_Atomic uint64_t *)&counters[index], n, memory_order_relaxed);
}

void shmbus_stats_set(uint64_t *counters, uint32_t index, uint64_t value)
{
    if (counters && index < 16)
        atomic_store_explicit((_Atomic uint64_t *)&counters[index], value, memory_order_relaxed);
}
