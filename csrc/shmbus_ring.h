/*
 * shmbus ring: a many-to-one ring buffer in one POSIX shared-memory segment.
 *
 * The algorithm is Agrona's ManyToOneRingBuffer: free-running 64-bit
 * positions, producers reserve space with a CAS on the tail, a record's
 * length is stored negative while it is being filled and positive (release)
 * to commit it, a padding record fills the space left at the wrap, and the
 * single consumer zeroes what it has read before it moves the head.
 *
 * Segment (every control field on its own pair of cache lines, so that
 * producers hammering the tail never share a line with the consumer's head;
 * 128 bytes because the adjacent-line prefetcher pulls lines in pairs):
 *
 *   0      +--------------------------------------------------+
 *          | meta: magic, version, header size, capacity,     |
 *          |       max frame (written once by the creator)    |
 *   128    +--------------------------------------------------+
 *          | tail          (producers: CAS)                   |
 *   256    +--------------------------------------------------+
 *          | head cache    (producers: last head seen)        |
 *   384    +--------------------------------------------------+
 *          | head          (consumer)                         |
 *   512    +--------------------------------------------------+
 *          | correlation counter (anyone: fetch-add)          |
 *   640    +--------------------------------------------------+
 *          | consumer heartbeat (consumer: MONOTONIC_COARSE) |
 *   768    +--------------------------------------------------+
 *          | sleeping flag (consumer sets, a producer clears) |
 *   896    +--------------------------------------------------+
 *          | sealed flag (set once, when the reader has gone) |
 *   1024   +--------------------------------------------------+
 *          | data: capacity bytes (a power of two)            |
 *          +--------------------------------------------------+
 *
 * Record (8-byte aligned, little-endian):
 *
 *    0                   1                   2                   3
 *    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
 *   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
 *   |R|                 Length (header + payload)                   |
 *   +-+-------------------------------------------------------------+
 *   |                 Type (SHMBUS_RING_PADDING for padding)        |
 *   +---------------------------------------------------------------+
 *   |                 Payload                                      ...
 *  ...                                                              |
 *   +---------------------------------------------------------------+
 *
 * Length < 0: being written.  0: nothing there yet.  > 0: committed.
 *
 * The doorbell is a futex word in the header (lane 0's `bell`, beside its
 * `sleeping` flag), rung with FUTEX_WAKE, not a POSIX semaphore: anything
 * written over it by a crashed or hostile process can only cost this inbox a
 * spurious or a late wake-up (a sleep never lasts longer than a second),
 * whereas glibc aborts any process whose sem_post meets a corrupt semaphore.
 *
 * Every length and position read from shared memory is checked before it is
 * used: a corrupt segment yields SHMBUS_ECORRUPT, never a read outside the
 * mapping or an endless loop.
 *
 * Lanes (priorities).  An inbox is up to SHMBUS_RING_LANES rings: lane 0 is
 * the ring itself, lanes 1.. are rings of their own segments that share its
 * doorbell (shmbus_ring_create_lane) and are linked to it in the reader's
 * and the writers' processes (shmbus_ring_link_lane).  The reader's calls on
 * the linked ring take the highest lane that has a record first, FIFO within
 * a lane; a reader going to sleep raises the sleeping flag of every lane, so
 * a producer on any lane rings the one bell.  Writers pick the lane of a
 * priority with shmbus_ring_lane(ring, shmbus_lane_of(priority)).  A ring
 * with no lanes linked behaves exactly as before.
 */
#ifndef SHMBUS_RING_H
#define SHMBUS_RING_H

#include <stddef.h>
#include <stdint.h>

#include "shmbus_seg.h"

#define SHMBUS_RING_MAGIC 0x676E6952756D6853ULL /* "ShmuRing" */
#define SHMBUS_RING_VERSION 2 /* 2: the doorbell is a futex word in the header */
#define SHMBUS_RING_HEADER_SIZE 1024
#define SHMBUS_RING_LINE 128
#define SHMBUS_RING_ALIGNMENT 8
#define SHMBUS_RING_RECORD_HEADER 8
#define SHMBUS_RING_PADDING (-1)
#define SHMBUS_RING_MIN_CAPACITY 4096
#define SHMBUS_RING_MAX_CAPACITY (1ULL << 30)
#define SHMBUS_RING_LANES 3

/* Timeouts are in nanoseconds: 0 = do not wait, negative = wait forever.
 * The consumer heartbeat is CLOCK_MONOTONIC_COARSE nanoseconds. */

typedef struct shmbus_ring shmbus_ring_t;

uint64_t shmbus_ring_segment_size(uint64_t capacity);
uint32_t shmbus_ring_default_max_frame(uint64_t capacity);
uint32_t shmbus_ring_limit_max_frame(uint64_t capacity);

/* `bell_name` is NULL for a ring that is its own doorbell (lane 0), and the
 * segment name of lane 0 for a lane, whose doorbell is lane 0's. */
int shmbus_ring_create(const char *shm_name, const char *bell_name, uint64_t capacity,
                       uint32_t max_frame, shmbus_ring_t **out);
int shmbus_ring_attach(const char *shm_name, const char *bell_name, shmbus_ring_t **out);
/* A lane: a ring whose doorbell is the existing one of its inbox's lane 0
 * (`bell_name`: lane 0's segment; attach a lane with that same name). */
int shmbus_ring_create_lane(const char *shm_name, const char *bell_name, uint64_t capacity,
                            uint32_t max_frame, shmbus_ring_t **out);
/* Link `lane_ring` as lane `lane` of `r` (lanes go in order: 1, then 2);
 * `r` holds a reference on it until it is closed. */
int shmbus_ring_link_lane(shmbus_ring_t *r, uint32_t lane, shmbus_ring_t *lane_ring);
uint32_t shmbus_ring_lanes(const shmbus_ring_t *r);
/* Priority 0-33 -> lane 0, 34-66 -> lane 1, 67-100 -> lane 2. */
uint32_t shmbus_lane_of(uint32_t priority);
/* The ring a writer uses for `lane`: the linked lane, or the highest linked
 * one below it (the ring itself when none is linked). */
shmbus_ring_t *shmbus_ring_lane(shmbus_ring_t *r, uint32_t lane);

/* Seal the ring and its linked lanes: its reader has gone for good (the
 * coordinator seals a departed agent's inbox before it drains it).  From
 * then on every reservation fails with SHMBUS_ECLOSED, a producer waiting
 * for room stops waiting, and a producer that reserved just as the seal
 * came turns its space into padding.  So once the reader has consumed up
 * to the tail it read after sealing, nothing more can ever be committed:
 * a drain that gets that far has everything (X1/X2 below). */
void shmbus_ring_seal(shmbus_ring_t *r);
/* Ring the bell once, whether or not the reader sleeps: a thread asleep in
 * shmbus_ring_wait_once or shmbus_ring_wait returns (to look at a flag of
 * its own, say).  A thread that read the bell (shmbus_ring_bell) before this
 * and waits with that value returns at once. */
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
/* Free-running positions: what the consumer has read up to, what producers
 * have reserved up to (the coordinator watches a dead writer's records go). */
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
/* Wait until a lane has a frame (SHMBUS_OK), without taking it: for a
 * reader that must not hold its lock while it sleeps. */
int shmbus_ring_wait(shmbus_ring_t *r, int64_t timeout_ns, int64_t spin_ns);
int shmbus_ring_peek(shmbus_ring_t *r, int64_t timeout_ns, int64_t spin_ns, char **payload,
                     uint32_t *len);
int shmbus_ring_release(shmbus_ring_t *r);

int shmbus_ring_unblock(shmbus_ring_t *r, int64_t grace_ns);

/* Count what this reader consumes: each read adds the frames to *frames and
 * their bytes to *bytes (relaxed atomic adds; NULL stops counting).  The
 * bus points these at the agent's counters in the stats segment. */
void shmbus_ring_count_reads(shmbus_ring_t *r, uint64_t *frames, uint64_t *bytes);

/* Test support: reserve space with the CAS and write nothing, as a producer
 * killed between its CAS and its first store would leave it (with
 * write_padding 0, even before the padding record a wrap needs). */
int shmbus_ring_test_reserve(shmbus_ring_t *r, uint32_t len, int write_padding);

/* For a thread that waits on behalf of a reader that never waits (an event
 * loop's, see shmbus_waiter.h): spin up to spin_ns while no lane has a
 * record, then raise every lane's sleeping flag, look again and sleep on the
 * bell once, unless it no longer reads `seq` (from shmbus_ring_bell, read
 * before the caller looked at its own flags: a shmbus_ring_wake after that
 * look is never missed).  SHMBUS_OK when a lane has a record; SHMBUS_EAGAIN
 * when woken with none (a stale ring, shmbus_ring_wake, or the one-second
 * nap's end); SHMBUS_EINTR.  It never reads: records are the reader's. */
uint32_t shmbus_ring_bell(const shmbus_ring_t *r);
int shmbus_ring_wait_once(shmbus_ring_t *r, int64_t spin_ns, uint32_t seq);

#endif
