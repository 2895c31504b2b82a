/*
 * shmbus waiter: an inbox's doorbell made pollable, for an event loop.
 *
 * The inbox's doorbell is a futex word, which no event loop can select
 * on.  A waiter is one small C thread (no Python, so no GIL to win back
 * when it wakes) that, each time it is armed, waits for a record on any
 * lane of the inbox with the ring's own protocol (spin, raise the sleeping
 * flags, look again, sleep on the bell; shmbus_ring_wait_once), then makes
 * an eventfd readable and disarms itself.  The loop selects on the eventfd,
 * reads the ring itself without waiting, and arms the waiter again once the
 * ring is empty:
 *
 *     loop                              waiter thread
 *     ----                              -------------
 *     read the ring until empty
 *     arm ---------------------------->  wait_once ... a record is there
 *     (select: asleep)                   disarm
 *     eventfd readable  <--------------  write the eventfd
 *     clear, read the ring until empty
 *     arm ---------------------------->  ...
 *
 * No wake-up is lost: the loop arms only after a read that found nothing,
 * and the waiter looks at every lane after it is armed (and again after it
 * raised the sleeping flags), so a record committed at any point after the
 * loop's read is either seen by the waiter or rings the bell.  Idle, the
 * thread sleeps on the bell or on its arming condition: no busy core.
 *
 * The waiter holds a reference on the ring (shmbus_ring_retain) until it
 * is freed; shmbus_waiter_free stops and joins the thread and closes the
 * eventfd.  One reader per inbox still holds: the waiter never reads.
 */
#ifndef SHMBUS_WAITER_H
#define SHMBUS_WAITER_H

#include <stdint.h>

#include "shmbus_ring.h"

typedef struct shmbus_waiter shmbus_waiter_t;

/* A waiter on `inbox` (its linked lanes included), not armed yet.
 * SHMBUS_ESYS (errno set) if no thread or eventfd could be had. */
int shmbus_waiter_new(shmbus_ring_t *inbox, shmbus_waiter_t **out);
/* The eventfd to select on (readable once a record is there after arming). */
int shmbus_waiter_fd(const shmbus_waiter_t *w);
/* Wait for the next record, spinning up to spin_ns before the thread sleeps
 * (0 when the loop has just spun itself).  Call it after a read of the ring
 * found nothing.  Arming an armed waiter does nothing.  SHMBUS_ESYS if the
 * thread ended on an error (the eventfd was made readable as it did). */
int shmbus_waiter_arm(shmbus_waiter_t *w, int64_t spin_ns);
/* Make the eventfd unreadable again; 1 if it was readable. */
int shmbus_waiter_clear(shmbus_waiter_t *w);
/* Stop and join the thread, close the eventfd, drop the ring's reference. */
void shmbus_waiter_free(shmbus_waiter_t *w);

#endif
