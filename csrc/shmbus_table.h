/*
 * shmbus table: a versioned blob in shared memory, written by one process
 * (the coordinator: routes and subscriptions) and read by many (the agents)
 * without asking the writer.  A seqlock: the sequence is odd while a write
 * is under way, and a reader keeps a copy only if the sequence was even and
 * the same before and after it copied.
 *
 *   0      +---------------------------------------------+
 *          | meta: magic, layout version, capacity       |
 *   128    +---------------------------------------------+
 *          | sequence (u64), length (u64)                |
 *   256    +---------------------------------------------+
 *          | blob: capacity bytes                        |
 *          +---------------------------------------------+
 *
 * The version a reader sees is sequence / 2: it moves once per write.
 */
#ifndef SHMBUS_TABLE_H
#define SHMBUS_TABLE_H

#include <stdint.h>

#include "shmbus_seg.h"

#define SHMBUS_TABLE_MAGIC 0x6C6261547568536DULL /* "mShuTabl" */
#define SHMBUS_TABLE_VERSION 1
#define SHMBUS_TABLE_HEADER_SIZE 256
#define SHMBUS_TABLE_MAX_CAPACITY (1ULL << 28)

typedef struct shmbus_table shmbus_table_t;

int shmbus_table_create(const char *name, uint64_t capacity, shmbus_table_t **out);
int shmbus_table_attach(const char *name, shmbus_table_t **out);
void shmbus_table_close(shmbus_table_t *t);
uint64_t shmbus_table_capacity(const shmbus_table_t *t);
/* The current version: one atomic load, for "has it moved since I looked?". */
uint64_t shmbus_table_version(const shmbus_table_t *t);
int shmbus_table_write(shmbus_table_t *t, const char *data, uint64_t len, uint64_t *version);
/* Copy a consistent blob into out; SHMBUS_ESMALL with *len set if out is too
 * small, SHMBUS_EAGAIN if writes kept racing past the retry limit. */
int shmbus_table_read(shmbus_table_t *t, char *out, uint64_t cap, uint64_t *len,
                      uint64_t *version);

#endif
