/*
 * shmbus send: an agent's send path in one C call.
 *
 * A route is what an agent knows about one destination: the inbox rings it
 * writes to (one for a direct send, one per subscriber for a publish), the
 * names that go in every frame, the counters to bump, and the routes-table
 * version it was built from.  shmbus_send checks that version (one atomic
 * load), builds the 64-byte header, claims space in each inbox, writes the
 * frame in place, commits it and counts it.  Python's share of a send is one
 * dictionary hit and this one call.
 *
 * A route holds a reference on each ring it writes to (shmbus_ring_retain),
 * so freeing the route is what lets a departed peer's mapping go.
 */
#ifndef SHMBUS_SEND_H
#define SHMBUS_SEND_H

#include <stdint.h>

#include "shmbus_ring.h"
#include "shmbus_table.h"

typedef struct shmbus_sender shmbus_sender_t;
typedef struct shmbus_route shmbus_route_t;

/* The sending agent: its id and name (in every frame's header), its
 * counters (NULL: none) and the routes table whose version routes check. */
shmbus_sender_t *shmbus_sender_new(uint32_t agent_id, const char *name, uint32_t name_len,
                                   uint64_t *counters, const shmbus_table_t *routes);
void shmbus_sender_free(shmbus_sender_t *s);
/* A fresh message id (agent id << 40 | sequence): unique on the bus. */
uint64_t shmbus_sender_next_id(shmbus_sender_t *s);

/* A route to `targets` inboxes; recipient and topic go in every frame
 * (recipient_id 0 and an empty recipient for a publish). */
shmbus_route_t *shmbus_route_new(shmbus_sender_t *s, uint64_t version, uint32_t recipient_id,
                                 const char *recipient, uint32_t recipient_len, const char *topic,
                                 uint32_t topic_len, uint64_t *topic_counters, uint32_t targets);
int shmbus_route_set(shmbus_route_t *rt, uint32_t target, shmbus_ring_t *ring,
                     uint64_t *counters);
/* Make target i best-effort (the coordinator's history inbox): a send never
 * waits for room in it, and what it refused is no error of the send. */
int shmbus_route_lossy(shmbus_route_t *rt, uint32_t target);
void shmbus_route_free(shmbus_route_t *rt);
/* After a send that returned an error: how many frames target i took and
 * the error it gave (0 for none); resume writes the rest of the last send
 * (a publish or a send_many) to target i, after a signal or a timeout.  A
 * direct send that failed wrote nothing and is simply sent again. */
uint32_t shmbus_route_written(const shmbus_route_t *rt, uint32_t target);
int shmbus_route_error(const shmbus_route_t *rt, uint32_t target);
/* The id of the first message of the last send, also when it failed. */
uint64_t shmbus_route_last_id(const shmbus_route_t *rt);
int shmbus_route_resume(shmbus_route_t *rt, uint32_t target, int64_t timeout_ns);

/* One message to every target; returns its id, or a negative code:
 * SHMBUS_ESTALE before anything is written, SHMBUS_EINVAL for a field out of
 * range, SHMBUS_ETOOBIG, or the first target's error (SHMBUS_EAGAIN or
 * SHMBUS_ETIMEDOUT for a full inbox, SHMBUS_EINTR) once every target was
 * tried.  Counts sent, bytes and delivered; failures are the caller's to
 * count, once it has decided what a failure is. */
int64_t shmbus_send(shmbus_route_t *rt, uint32_t kind, uint32_t flags, uint32_t priority,
                    uint32_t ttl_ms, const char *payload, uint32_t len, int64_t timeout_ns);
/* The same with the request and correlation ids a reply or a resend carries. */
int64_t shmbus_send_ex(shmbus_route_t *rt, uint32_t kind, uint32_t flags, uint32_t priority,
                       uint32_t ttl_ms, const char *payload, uint32_t len, int64_t timeout_ns,
                       uint64_t request_id, uint64_t correlation_id, uint32_t attempts);
/* `count` messages, payloads back to back in `blob` with their lengths and
 * flags; ids are consecutive from the returned one. */
int64_t shmbus_send_many(shmbus_route_t *rt, uint32_t kind, uint32_t priority, uint32_t ttl_ms,
                         const char *blob, const uint32_t *lens, const uint8_t *flags,
                         uint32_t count, int64_t timeout_ns);

#endif
