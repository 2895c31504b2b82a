/*
 * shmbus stats: the bus's counters in one shared-memory segment.
 *
 * The coordinator creates it and hands each agent a slot; agents bump their
 * own counters (and a recipient's "delivered") with relaxed atomic adds in
 * the send and read paths, so counting costs no system call and no message
 * to anyone, and `shmbus stats` reads every counter without asking the
 * coordinator.  Counters are exact for live agents; when an agent leaves,
 * the coordinator folds its slot into slot 0 ("departed") so totals stay.
 *
 *   0        +-------------------------------------------------+
 *            | meta: magic, version, agent slots, topic slots  |
 *   128      +-------------------------------------------------+
 *            | bus: DLQ size, DLQ total, DLQ evicted, ...      |
 *   256      +-------------------------------------------------+
 *            | agent slots (384 bytes each; slot 0: departed)  |
 *            |   0   identity: state, id, pid, name, heartbeat |
 *            |   128 counters the agent writes (its own line)  |
 *            |   256 counters its senders write (delivered)    |
 *            +-------------------------------------------------+
 *            | topic slots (384 bytes each; the last: overflow)|
 *            |   0   state, hash, name                         |
 *            |   256 published, delivered, bytes               |
 *            +-------------------------------------------------+
 *
 * Topic slots are claimed by publishers with a CAS (open addressing on an
 * FNV-1a hash); a topic longer than SHMBUS_STATS_TOPIC_NAME bytes, or one
 * that finds the table full, is counted in the overflow slot.
 */
#ifndef SHMBUS_STATS_H
#define SHMBUS_STATS_H

#include <stdint.h>

#include "shmbus_seg.h"

#define SHMBUS_STATS_MAGIC 0x74617453756D6853ULL /* "ShmuStat" */
#define SHMBUS_STATS_VERSION 1
#define SHMBUS_STATS_HEADER_SIZE 256
#define SHMBUS_STATS_SLOT_SIZE 384
#define SHMBUS_STATS_AGENT_SLOTS 1024
#define SHMBUS_STATS_TOPIC_SLOTS 1024
#define SHMBUS_STATS_NAME 64        /* agent names are at most 64 bytes */
#define SHMBUS_STATS_TOPIC_NAME 240 /* longer topics count as overflow */
#define SHMBUS_STATS_HEARTBEAT_AT 96 /* in an agent slot: its last beat */

/* Counter indices.  An agent's own line: */
#define SHMBUS_STAT_SENT 0
#define SHMBUS_STAT_RECEIVED 1
#define SHMBUS_STAT_FAILED 2
#define SHMBUS_STAT_BYTES_SENT 3
#define SHMBUS_STAT_BYTES_RECEIVED 4
#define SHMBUS_STAT_DROPPED 5
#define SHMBUS_STAT_RETRIED 6
#define SHMBUS_STAT_DEAD_LETTERED 7
#define SHMBUS_STAT_OWN 8
/* Its senders' line (offset 16 counters from the first own counter): */
#define SHMBUS_STAT_DELIVERED 16
#define SHMBUS_STAT_DELIVERED_BYTES 17
/* A topic's counters: */
#define SHMBUS_STAT_PUBLISHED 0
#define SHMBUS_STAT_TOPIC_DELIVERED 1
#define SHMBUS_STAT_TOPIC_BYTES 2
/* The bus line: */
#define SHMBUS_STAT_DLQ_SIZE 0
#define SHMBUS_STAT_DLQ_TOTAL 1
#define SHMBUS_STAT_DLQ_EVICTED 2

typedef struct shmbus_stats shmbus_stats_t;

uint64_t shmbus_stats_segment_size(void);
int shmbus_stats_create(const char *name, shmbus_stats_t **out);
int shmbus_stats_attach(const char *name, shmbus_stats_t **out);
void shmbus_stats_close(shmbus_stats_t *s);
/* The mapping, for readers that take a snapshot of every slot at once. */
const void *shmbus_stats_base(const shmbus_stats_t *s);

/* An agent slot's first own counter (slot 1..AGENT_SLOTS-1), or NULL. */
uint64_t *shmbus_stats_agent(shmbus_stats_t *s, uint32_t slot);
/* The coordinator: take a slot for an agent, and give it back (its counters
 * are folded into slot 0 first). */
int shmbus_stats_agent_open(shmbus_stats_t *s, uint32_t slot, uint64_t agent_id, int64_t pid,
                            const char *name, uint32_t name_len);
int shmbus_stats_agent_close(shmbus_stats_t *s, uint32_t slot);
/* A topic's counters, claiming its slot on first use; never NULL. */
uint64_t *shmbus_stats_topic(shmbus_stats_t *s, const char *topic, uint32_t len);
/* An agent's heartbeat: CLOCK_MONOTONIC ns of its last beat (0: none yet),
 * stored by a thread of the agent and read by the coordinator, which calls
 * an agent hung when it stays old (a stopped or wedged process). */
uint64_t *shmbus_stats_heartbeat(shmbus_stats_t *s, uint32_t slot);
/* The bus line (DLQ figures, written by the coordinator). */
uint64_t *shmbus_stats_bus(shmbus_stats_t *s);
void shmbus_stats_add(uint64_t *counters, uint32_t index, uint64_t n);
void shmbus_stats_set(uint64_t *counters, uint32_t index, uint64_t value);

#endif
