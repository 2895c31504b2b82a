/* shmbus frame header: see shmbus_frame.h. */
#include "shmbus_frame.h"

_Static_assert(sizeof(shmbus_frame_header) == SHMBUS_FRAME_HEADER_SIZE, "header is 64 bytes");
_Static_assert(offsetof(shmbus_frame_header, type) == 3, "type at 3");
_Static_assert(offsetof(shmbus_frame_header, attempts) == 6, "attempts at 6");
_Static_assert(offsetof(shmbus_frame_header, sender_id) == 8, "sender id at 8");
_Static_assert(offsetof(shmbus_frame_header, id) == 16, "id at 16");
_Static_assert(offsetof(shmbus_frame_header, request_id) == 24, "request id at 24");
_Static_assert(offsetof(shmbus_frame_header, correlation_id) == 32, "correlation id at 32");
_Static_assert(offsetof(shmbus_frame_header, timestamp_ns) == 40, "timestamp at 40");
_Static_assert(offsetof(shmbus_frame_header, ttl_ms) == 48, "ttl at 48");
_Static_assert(offsetof(shmbus_frame_header, sender_len) == 52, "lengths at 52");
_Static_assert(offsetof(shmbus_frame_header, payload_len) == 56, "payload length at 56");

const char *shmbus_frame_struct(void) { return SHMBUS_FRAME_STRUCT; }

size_t shmbus_frame_offsets(uint32_t *out, size_t n)
{
    static const uint32_t offsets[] = {
        offsetof(shmbus_frame_header, magic),          offsetof(shmbus_frame_header, version),
        offsetof(shmbus_frame_header, type),           offsetof(shmbus_frame_header, priority),
        offsetof(shmbus_frame_header, flags),          offsetof(shmbus_frame_header, attempts),
        offsetof(shmbus_frame_header, sender_id),      offsetof(shmbus_frame_header, recipient_id),
        offsetof(shmbus_frame_header, id),             offsetof(shmbus_frame_header, request_id),
        offsetof(shmbus_frame_header, correlation_id), offsetof(shmbus_frame_header, timestamp_ns),
        offsetof(shmbus_frame_header, ttl_ms),         offsetof(shmbus_frame_header, sender_len),
        offsetof(shmbus_frame_header, recipient_len),  offsetof(shmbus_frame_header, topic_len),
        offsetof(shmbus_frame_header, payload_len),    offsetof(shmbus_frame_header, reserved),
        sizeof(shmbus_frame_header),
    };
    size_t count = sizeof offsets / sizeof offsets[0];
    if (count > n)
        count = n;
    for (size_t i = 0; i < count; i++)
        out[i] = offsets[i];
    return count;
}
