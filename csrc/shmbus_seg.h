/*
 * shmbus segments: create, attach, map and remove POSIX shared memory, and
 * the return codes every C part of shmbus shares.
 *
 * Segments are created exclusively, mode 0600, with their pages reserved up
 * front (posix_fallocate), so a full /dev/shm is an error at creation rather
 * than a SIGBUS at first touch.
 */
#ifndef SHMBUS_SEG_H
#define SHMBUS_SEG_H

#include <stdint.h>

/* Return codes: 0 or a count on success, one of these on failure. */
#define SHMBUS_OK 0
#define SHMBUS_EAGAIN (-1)   /* full (write) or empty (read), no wait asked */
#define SHMBUS_ETIMEDOUT (-2)
#define SHMBUS_ETOOBIG (-3)  /* larger than the segment accepts */
#define SHMBUS_ECORRUPT (-4) /* a length or position in the segment is impossible */
#define SHMBUS_EINTR (-5)    /* a signal arrived; the caller runs its handlers and retries */
#define SHMBUS_EINVAL (-6)
#define SHMBUS_ESYS (-7)     /* a system call failed: see errno */
#define SHMBUS_EBADSEG (-8)  /* not the kind of segment expected, or another layout version */
#define SHMBUS_ESMALL (-9)   /* the caller's buffer cannot hold the next item */
#define SHMBUS_ESTALE (-10)  /* the routes moved since this route was built: rebuild it */
#define SHMBUS_ECLOSED (-11) /* the ring is sealed: its reader has gone for good */
#define SHMBUS_EFOREIGN (-12) /* not this user's segment, or open to others: never used */

/* Create `name` (a POSIX name, "/..."), `size` bytes, zeroed, and map it. On
 * failure nothing is left behind and errno tells why (SHMBUS_ESYS). */
int shmbus_seg_create(const char *name, uint64_t size, void **base);
/* Map an existing segment whose size must lie in [min_size, max_size]:
 * SHMBUS_EBADSEG otherwise, SHMBUS_ESYS (errno ENOENT) if there is none.
 * Only a segment of this process's effective user with mode 0600 is mapped
 * (SHMBUS_EFOREIGN otherwise): a name anyone could have made first, or that
 * others may write, is never adopted. */
int shmbus_seg_attach(const char *name, uint64_t min_size, uint64_t max_size, void **base,
                      uint64_t *size);
/* Map the first `size` bytes of an existing segment of this user (the same
 * checks as attach, with the segment at least `size` long). */
int shmbus_seg_map_head(const char *name, uint64_t size, void **base);
void shmbus_seg_unmap(void *base, uint64_t size);
int shmbus_seg_unlink(const char *name);

#endif
