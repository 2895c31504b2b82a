/*
 * shmbus frame: the fixed header every bus message starts with.
 *
 * A frame is one ring record's payload: this 64-byte header, then the
 * sender's name, the recipient's name, the topic (UTF-8, lengths in the
 * header) and the payload (msgpack, or raw bytes when FLAG_RAW is set).
 * Everything a router or a counter needs is in the header, readable from C
 * without decoding the payload.  Little-endian.
 *
 *   0       2     3     4     5     6       8            12           16
 *   +-------+-----+-----+-----+-----+-------+------------+------------+
 *   | magic | ver | type| prio|flags|attempt| sender id  | recipient  |
 *   +-------+-----+-----+-----+-----+-------+------------+------------+
 *   16                        24                        32
 *   | message id (u64)        | request id (u64)        |
 *   32                        40                        48
 *   | correlation id (u64)    | timestamp ns (i64, wall)|
 *   48           52   53   54      56           60           64
 *   | ttl ms     |slen|rlen| tlen  | payload len | reserved   |
 *   +------------+----+----+-------+-------------+------------+
 *   | sender | recipient | topic | payload ...
 */
#ifndef SHMBUS_FRAME_H
#define SHMBUS_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define SHMBUS_FRAME_MAGIC 0x4253 /* "SB" */
#define SHMBUS_FRAME_VERSION 1
#define SHMBUS_FRAME_HEADER_SIZE 64
#define SHMBUS_FRAME_FLAG_ACK 1 /* the sender wants an ACK */
#define SHMBUS_FRAME_FLAG_RAW 2 /* the payload is raw bytes, not msgpack */
#define SHMBUS_FRAME_MAX_NAME 255
#define SHMBUS_FRAME_MAX_TOPIC 1024

/* The same layout in Python's struct notation, so Python never spells it
 * out itself; tests/core/test_message.py checks it field by field against
 * shmbus_frame_offsets(). */
#define SHMBUS_FRAME_STRUCT "<HBBBBHIIQQQqIBBHII"

typedef struct {
    uint16_t magic;
    uint8_t version;
    uint8_t type;
    uint8_t priority;
    uint8_t flags;
    uint16_t attempts;
    uint32_t sender_id;
    uint32_t recipient_id;
    uint64_t id;
    uint64_t request_id;
    uint64_t correlation_id;
    int64_t timestamp_ns;
    uint32_t ttl_ms;
    uint8_t sender_len;
    uint8_t recipient_len;
    uint16_t topic_len;
    uint32_t payload_len;
    uint32_t reserved;
} shmbus_frame_header;

const char *shmbus_frame_struct(void);
/* Writes the offset of each header field, in order, then the header size;
 * returns how many numbers it wrote (at most n). */
size_t shmbus_frame_offsets(uint32_t *out, size_t n);

#endif
