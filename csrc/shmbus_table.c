/* shmbus table: see shmbus_table.h. */
#define _GNU_SOURCE
#include "shmbus_table.h"

#include <errno.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    alignas(128) struct {
        uint64_t magic;
        uint32_t version;
        uint32_t header_size;
        uint64_t capacity;
    } meta;
    alignas(128) _Atomic uint64_t sequence;
    _Atomic uint64_t length;
    alignas(256) char blob[];
} table_segment;

_Static_assert(offsetof(table_segment, sequence) == 128, "sequence at 128");
_Static_assert(offsetof(table_segment, length) == 136, "length at 136");
_Static_assert(offsetof(table_segment, blob) == SHMBUS_TABLE_HEADER_SIZE, "blob after the header");

struct shmbus_table {
    table_segment *seg;
    uint64_t size;
    uint64_t capacity;
};

static shmbus_table_t *view(table_segment *seg, uint64_t size, uint64_t capacity)
{
    shmbus_table_t *t = malloc(sizeof *t);
    if (t) {
        t->seg = seg;
        t->size = size;
        t->capacity = capacity;
    }
    return t;
}

int shmbus_table_create(const char *name, uint64_t capacity, shmbus_table_t **out)
{
    if (capacity == 0 || capacity > SHMBUS_TABLE_MAX_CAPACITY)
        return SHMBUS_EINVAL;
    uint64_t size = SHMBUS_TABLE_HEADER_SIZE + capacity;
    void *base;
    int rc = shmbus_seg_create(name, size, &base);
    if (rc != SHMBUS_OK)
        return rc;
    table_segment *seg = base;
    shmbus_table_t *t = view(seg, size, capacity);
    if (!t) {
        shmbus_seg_unmap(seg, size);
        shmbus_seg_unlink(name);
        errno = ENOMEM;
        return SHMBUS_ESYS;
    }
    seg->meta.version = SHMBUS_TABLE_VERSION;
    seg->meta.header_size = SHMBUS_TABLE_HEADER_SIZE;
    seg->meta.capacity = capacity;
    /* M1: the magic last, with release; pairs with M2 in shmbus_table_attach. */
    atomic_store_explicit((_Atomic uint64_t *)&seg->meta.magic, SHMBUS_TABLE_MAGIC,
                          memory_order_release);
    *out = t;
    return SHMBUS_OK;
}

int shmbus_table_attach(const char *name, shmbus_table_t **out)
{
    void *base;
    uint64_t size;
    int rc = shmbus_seg_attach(name, SHMBUS_TABLE_HEADER_SIZE + 1,
                               SHMBUS_TABLE_HEADER_SIZE + SHMBUS_TABLE_MAX_CAPACITY, &base, &size);
    if (rc != SHMBUS_OK)
        return rc;
    table_segment *seg = base;
    uint64_t magic = atomic_load_explicit((_Atomic uint64_t *)&seg->meta.magic,
                                          memory_order_acquire); /* M2 */
    shmbus_table_t *t = NULL;
    if (magic == SHMBUS_TABLE_MAGIC && seg->meta.version == SHMBUS_TABLE_VERSION &&
        seg->meta.header_size == SHMBUS_TABLE_HEADER_SIZE &&
        seg->meta.capacity == size - SHMBUS_TABLE_HEADER_SIZE)
        t = view(seg, size, seg->meta.capacity);
    if (!t) {
        shmbus_seg_unmap(seg, size);
        return SHMBUS_EBADSEG;
    }
    *out = t;
    return SHMBUS_OK;
}

void shmbus_table_close(shmbus_table_t *t)
{
    if (!t)
        return;
    shmbus_seg_unmap(t->seg, t->size);
    free(t);
}

uint64_t shmbus_table_capacity(const shmbus_table_t *t) { return t->capacity; }

uint64_t shmbus_table_version(const shmbus_table_t *t)
{
    /* R1: acquire, pairs with W2: a reader that sees a new version and then
     * reads sees at least that write. */
    return atomic_load_explicit(&t->seg->sequence, memory_order_acquire) / 2;
}

int shmbus_table_write(shmbus_table_t *t, const char *data, uint64_t len, uint64_t *version)
{
    if (!t)
        return SHMBUS_EINVAL;
    if (len > t->capacity)
        return SHMBUS_ETOOBIG;
    table_segment *seg = t->seg;
    uint64_t seq = atomic_load_explicit(&seg->sequence, memory_order_relaxed);
    seq += seq & 1; /* a writer that died mid-write left it odd: start over even */
    atomic_store_explicit(&seg->sequence, seq + 1, memory_order_relaxed);
    /* W1: the odd sequence is visible before any byte of the blob changes;
     * pairs with R3 in shmbus_table_read. */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&seg->length, len, memory_order_relaxed);
    memcpy(seg->blob, data, len);
    /* W2: release: the blob before the even sequence; pairs with R2 and R1. */
    atomic_store_explicit(&seg->sequence, seq + 2, memory_order_release);
    *version = (seq + 2) / 2;
    return SHMBUS_OK;
}

int shmbus_table_read(shmbus_table_t *t, char *out, uint64_t cap, uint64_t *len,
                      uint64_t *version)
{
    if (!t)
        return SHMBUS_EINVAL;
    table_segment *seg = t->seg;
    for (unsigned attempt = 0; attempt < 10000; attempt++) {
        uint64_t before = atomic_load_explicit(&seg->sequence, memory_order_acquire); /* R2 */
        if (before & 1) {
            sched_yield();
            continue;
        }
        uint64_t n = atomic_load_explicit(&seg->length, memory_order_relaxed);
        if (n > t->capacity) {
            /* Torn (re-check) or corrupt: only a stable value is an error. */
            atomic_thread_fence(memory_order_acquire);
            if (atomic_load_explicit(&seg->sequence, memory_order_relaxed) == before)
                return SHMBUS_ECORRUPT;
            continue;
        }
        if (n > cap) {
            *len = n;
            return SHMBUS_ESMALL;
        }
        memcpy(out, seg->blob, n);
        /* R3: acquire fence: the copy is done before the sequence is looked
         * at again; pairs with W1. */
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&seg->sequence, memory_order_relaxed) == before) {
            *len = n;
            *version = before / 2;
            return SHMBUS_OK;
        }
    }
    return SHMBUS_EAGAIN;
}
