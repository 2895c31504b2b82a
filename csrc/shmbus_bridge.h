/*
 * shmbus bridge link: the coordinator's data path for one agent on the uds
 * transport (shmbus/coordinator/bridge.py owns the links; shmbus/transport/wire.py
 * describes the records).
 *
 * Two threads of the coordinator run each link, each inside one call that
 * never holds the GIL:
 *
 * - shmbus_link_down: the agent's inbox -> its socket.  Reads a block from
 *   the highest lane with frames, sends it as one record (sendmsg, no copy
 *   of the frames), and keeps it until the agent counts it taken, so what a
 *   dying agent never took goes to the DLQ (shmbus_link_lost).  It sends
 *   only the records the agent asked for (credits), so a backlog waits in
 *   the lanes, in priority order, not in the socket.
 * - shmbus_link_up: the socket -> the recipients' inboxes.  Reads whole
 *   records, checks every length and header field before it uses any (the
 *   peer is untrusted), and writes runs of frames with one write_many per
 *   destination lane, counting as an shm sender counts.  It returns to its
 *   Python caller only for what C cannot decide alone: a destination it has
 *   no route for (SHMBUS_LINK_MISS: Python resolves the name or topic from
 *   the routes table and installs the route), frames it could not deliver
 *   (SHMBUS_LINK_DEAD: Python dead-letters them with the reason), a broken
 *   peer, or the end.
 *
 * Routes are cached per destination and checked against the routes table's
 * version (one atomic load per record); each holds a reference on the rings
 * it writes to.
 */
#ifndef SHMBUS_BRIDGE_H
#define SHMBUS_BRIDGE_H

#include <stdint.h>

#include "shmbus_ring.h"
#include "shmbus_table.h"

/* What shmbus_link_up and shmbus_link_down return. */
#define SHMBUS_LINK_STOP 1  /* shmbus_link_stop was called */
#define SHMBUS_LINK_EOF 2   /* the agent finished writing (it leaves) */
#define SHMBUS_LINK_BAD 3   /* the peer broke the format, or the inbox broke: see reason */
#define SHMBUS_LINK_IOERR 4 /* the socket failed: see errno */
#define SHMBUS_LINK_MISS 5  /* up: install a route for shmbus_link_miss, then call again */
#define SHMBUS_LINK_DEAD 6  /* up: take the undelivered frames, then call again */

/* MessageType.PUBLISH (shmbus/core/message.py; the bridge checks they agree). */
#define SHMBUS_LINK_PUBLISH 2

/* Why a frame was not delivered. */
#define SHMBUS_DEAD_NOAGENT 1 /* no agent of that name on the bus */
#define SHMBUS_DEAD_LEFT 2    /* its inbox is sealed: it left */
#define SHMBUS_DEAD_FULL 3    /* its lane stayed full for the policy's wait */
#define SHMBUS_DEAD_TOOBIG 4  /* larger than its inbox takes */
#define SHMBUS_DEAD_FAILED 5  /* its ring returned the error in rc */

typedef struct shmbus_link shmbus_link_t;
typedef struct shmbus_hub shmbus_hub_t;

typedef struct {
    const char *frame; /* valid until the next shmbus_link_up */
    uint32_t len;
    int32_t why;
    int32_t rc;
    uint32_t policy; /* 0 block, 1 error, 2 drop */
    uint32_t wait_ms;
    uint32_t name_len;
    uint64_t used; /* of the full lane, for the reason */
    uint64_t capacity;
    const char *name; /* the recipient's (or the subscriber's) */
} shmbus_dead_t;

/* `types` has bit k set for each valid message type k; `counters` and
 * `beat` (the agent's heartbeat word) may be NULL. */
shmbus_link_t *shmbus_link_new(int fd, const char *name, uint32_t name_len, uint32_t agent_id,
                               uint64_t types, uint64_t *counters, uint64_t *beat,
                               const shmbus_table_t *routes, shmbus_ring_t *inbox);
/* The agent is gone: its up thread delivers what the socket holds, waiting
 * for room as the frames' policy says but not past `wait_ns` from now (then
 * dead-lettered), and returns SHMBUS_LINK_EOF where the bytes end.  Then stop. */
void shmbus_link_drain(shmbus_link_t *l, int64_t wait_ns);
void shmbus_link_stop(shmbus_link_t *l);
/* No more sends on its socket from here on (by another link's direct send
 * either): call it before closing the socket.  free does it too. */
void shmbus_link_close(shmbus_link_t *l);
void shmbus_link_free(shmbus_link_t *l);

int shmbus_link_up(shmbus_link_t *l);
int shmbus_link_down(shmbus_link_t *l);
const char *shmbus_link_reason(const shmbus_link_t *l);
int shmbus_link_errno(const shmbus_link_t *l);

/* The hub: one thread (shmbus_hub_run) that reads every hubbed link's
 * socket and delivers what needs neither a wait nor Python (a single frame
 * into an inbox with room, a run straight to a uds recipient), handing the
 * rest to the link's up thread, which hands the socket back once it has
 * nothing left.  After a record went through it polls all the sockets for
 * spin_ns (yielding) before it sleeps: in a round trip between uds agents
 * the answer, then the next request, reach a thread that is awake, not one
 * that must be woken.  A link leaves the hub (unhub) before it is closed. */
shmbus_hub_t *shmbus_hub_new(int64_t spin_ns);
int shmbus_hub_run(shmbus_hub_t *h);
void shmbus_hub_stop(shmbus_hub_t *h);
void shmbus_hub_free(shmbus_hub_t *h);
int shmbus_link_hub(shmbus_link_t *l, shmbus_hub_t *h);
void shmbus_link_unhub(shmbus_link_t *l);

/* After SHMBUS_LINK_MISS: the destination (1 for a topic, 0 for an agent). */
int shmbus_link_miss(const shmbus_link_t *l, const char **where, uint32_t *len);
/* A route to `where` built from table `version`: `known` 0 for an agent that
 * is not on the bus; then each of its `targets` (an agent's inbox, or each
 * subscriber's).  A lossy target is tried once and never dead-lettered. */
int shmbus_link_route(shmbus_link_t *l, int is_topic, const char *where, uint32_t len,
                      uint64_t version, int known, uint64_t *topic_counters, uint32_t targets);
int shmbus_link_route_target(shmbus_link_t *l, uint32_t i, shmbus_ring_t *ring,
                             uint64_t *counters, const char *name, uint32_t name_len, int lossy);

/* Target i of the route being installed is on the uds transport, through
 * `peer`: a run of frames may go straight to its socket (its inbox empty, a
 * record asked for), sparing its down thread a wake-up.  The route holds a
 * reference on the peer until it goes. */
int shmbus_link_route_peer(shmbus_link_t *l, uint32_t i, shmbus_link_t *peer);

/* After SHMBUS_LINK_DEAD. */
uint32_t shmbus_link_dead_count(const shmbus_link_t *l);
const shmbus_dead_t *shmbus_link_dead(const shmbus_link_t *l, uint32_t i);

/* After shmbus_link_down returned: the records sent and never taken, oldest first. */
uint32_t shmbus_link_lost_count(const shmbus_link_t *l);
int shmbus_link_lost(const shmbus_link_t *l, uint32_t i, const char **frames, const uint32_t **lens,
                     uint32_t *count);

/* A record (wire.py) of `count` frames built at `out`, as a uds agent sends
 * them: one header per payload (ids from `first_id`, `timestamp_ns` 0: now),
 * the names (sender, recipient, topic) after each.  Returns the record's
 * size, or SHMBUS_ESMALL when `cap` cannot hold it (the size is
 * SHMBUS_LINK_HEAD + 4 * count + count * (64 + names) + payload bytes). */
#define SHMBUS_LINK_HEAD 20
int64_t shmbus_record_build(const char *names, uint32_t sender_len, uint32_t recipient_len,
                            uint32_t topic_len, uint32_t sender_id, uint32_t recipient_id,
                            uint32_t kind, uint32_t priority, uint32_t ttl_ms, uint32_t info,
                            uint64_t first_id, uint64_t request_id, uint64_t correlation_id,
                            int64_t timestamp_ns, const char *blob, const uint32_t *lens,
                            const uint8_t *flags, uint32_t count, char *out, uint64_t cap);

/* One frame's record, built as shmbus_record_build builds it (the payload's
 * length and flags for its arrays) with the client's counts, then sent on
 * `fd` without waiting: a uds send in one call.  Returns the record's size,
 * or the build's error; `*sent` is what the socket took of it, or -errno. */
int64_t shmbus_record_send(int fd, uint32_t taken, uint32_t granted, const char *names,
                           uint32_t sender_len, uint32_t recipient_len, uint32_t topic_len,
                           uint32_t sender_id, uint32_t recipient_id, uint32_t kind,
                           uint32_t priority, uint32_t ttl_ms, uint32_t info, uint64_t id,
                           uint64_t request_id, uint64_t correlation_id, const char *payload,
                           uint32_t len, uint32_t flags, char *out, uint64_t cap, int64_t *sent);

#endif
