/*
 * shmbus._decode: frames to Message records, in C.
 *
 * The one piece of shmbus written against the CPython API rather than cffi,
 * because its whole job is to make Python objects: a receiver's cost is
 * building one Message per frame, and cffi can hand Python only numbers and
 * pointers.  It reads a block of frames straight from the ring reader's
 * scratch buffer (no bytes object per frame), checks every length before it
 * reads, and builds each record with the same values Python's
 * shmbus.core.message.decode_frame would.  A frame that fails a check becomes a
 * str saying why, in its place, for the caller to log and skip.
 *
 * decode_block(scratch, lens, count, state) -> list
 *   scratch: a buffer holding `count` frames back to back
 *   lens:    a buffer of `count` native uint32 frame lengths
 *   state:   (Message class, types tuple of 256, names cache dict,
 *             unpackb, (keyword names, keyword values), cache limit)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "shmbus_frame.h"

enum { N_FIELDS = 13 };

typedef struct {
    PyTypeObject *cls;
    PyObject *types;   /* tuple: MessageType member or None, by type code */
    PyObject *names;   /* dict: raw names -> (sender, recipient, topic) */
    PyObject *unpackb; /* msgpack.unpackb */
    PyObject *kwnames;  /* its keyword arguments' names (a tuple) */
    PyObject *kwvalues; /* and their values (a tuple as long) */
    Py_ssize_t names_limit;
} decode_state;

static PyObject *bad(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    PyObject *s = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    return s;
}

/* The cache key: the header's three name lengths (bytes 52..55), then the
 * names, so ("ab", "c") and ("a", "bc") never share an entry.  Python's
 * decode_frame builds the same key: they share the dict. */
static PyObject *names_of(decode_state *st, const char *frame, uint32_t slen, uint32_t rlen,
                          uint32_t tlen)
{
    const char *p = frame + SHMBUS_FRAME_HEADER_SIZE;
    Py_ssize_t n = (Py_ssize_t)slen + rlen + tlen;
    PyObject *key = PyBytes_FromStringAndSize(NULL, 4 + n);
    if (!key)
        return NULL;
    memcpy(PyBytes_AS_STRING(key), frame + offsetof(shmbus_frame_header, sender_len), 4);
    memcpy(PyBytes_AS_STRING(key) + 4, p, (size_t)n);
    PyObject *hit = PyDict_GetItemWithError(st->names, key);
    if (hit && PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 3) {
        Py_INCREF(hit);
        Py_DECREF(key);
        return hit;
    }
    if (PyErr_Occurred()) { /* a key that cannot be compared: not ours */
        Py_DECREF(key);
        return NULL;
    }
    PyObject *s = PyUnicode_DecodeUTF8(p, slen, NULL);
    PyObject *r = s ? PyUnicode_DecodeUTF8(p + slen, rlen, NULL) : NULL;
    PyObject *t = r ? PyUnicode_DecodeUTF8(p + slen + rlen, tlen, NULL) : NULL;
    PyObject *names = t ? PyTuple_Pack(3, s, r, t) : NULL;
    Py_XDECREF(s);
    Py_XDECREF(r);
    Py_XDECREF(t);
    if (!names) {
        Py_DECREF(key);
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            return Py_None; /* borrowed marker: not valid UTF-8 */
        }
        return NULL;
    }
    if (PyDict_GET_SIZE(st->names) >= st->names_limit)
        PyDict_Clear(st->names); /* many distinct topics: start over, do not grow */
    if (PyDict_SetItem(st->names, key, names) < 0) {
        Py_DECREF(key);
        Py_DECREF(names);
        return NULL;
    }
    Py_DECREF(key);
    return names;
}

/* ------------------------------------------------------------ msgpack
 *
 * The common subset of msgpack (nil, bools, ints, floats, str, bin, array,
 * map), decoded here because calling msgpack.unpackb costs more than the
 * decoding of a small payload.  The rule that keeps it exactly msgpack's:
 * anything else (an ext type, a reserved byte, bad UTF-8, an unhashable key,
 * too deep, too short, bytes left over) is not decided here: the decoder
 * bails out, and msgpack.unpackb decodes the payload or says why not. */

enum { MP_MAX_DEPTH = 64 };

typedef struct {
    const uint8_t *p, *end;
    int bail; /* not for this decoder: let msgpack.unpackb decide */
} mp_reader;

static int mp_need(mp_reader *r, size_t n)
{
    if ((size_t)(r->end - r->p) < n) {
        r->bail = 1;
        return 0;
    }
    return 1;
}

static uint64_t mp_be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static PyObject *mp_value(mp_reader *r, int depth);

static PyObject *mp_str(mp_reader *r, size_t n)
{
    if (!mp_need(r, n))
        return NULL;
    PyObject *s = PyUnicode_DecodeUTF8((const char *)r->p, (Py_ssize_t)n, NULL);
    if (!s) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            r->bail = 1;
        }
        return NULL;
    }
    r->p += n;
    return s;
}

static PyObject *mp_bin(mp_reader *r, size_t n)
{
    if (!mp_need(r, n))
        return NULL;
    PyObject *b = PyBytes_FromStringAndSize((const char *)r->p, (Py_ssize_t)n);
    r->p += n;
    return b;
}

static PyObject *mp_array(mp_reader *r, size_t n, int depth)
{
    if ((size_t)(r->end - r->p) < n) { /* each element takes a byte at least */
        r->bail = 1;
        return NULL;
    }
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *v = mp_value(r, depth + 1);
        if (!v) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    return list;
}

static PyObject *mp_map(mp_reader *r, size_t n, int depth)
{
    if ((size_t)(r->end - r->p) / 2 < n) {
        r->bail = 1;
        return NULL;
    }
    PyObject *dict = PyDict_New();
    if (!dict)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *k = mp_value(r, depth + 1);
        if (!k) {
            Py_DECREF(dict);
            return NULL;
        }
        if (PyList_CheckExact(k) || PyDict_CheckExact(k)) { /* unhashable: msgpack's call */
            Py_DECREF(k);
            Py_DECREF(dict);
            r->bail = 1;
            return NULL;
        }
        PyObject *v = mp_value(r, depth + 1);
        int rc = v ? PyDict_SetItem(dict, k, v) : -1;
        Py_DECREF(k);
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(dict);
            return NULL;
        }
    }
    return dict;
}

static PyObject *mp_value(mp_reader *r, int depth)
{
    if (depth > MP_MAX_DEPTH || !mp_need(r, 1)) {
        r->bail = 1;
        return NULL;
    }
    uint8_t b = *r->p++;
    if (b <= 0x7f)
        return PyLong_FromLong(b);
    if (b >= 0xe0)
        return PyLong_FromLong((int8_t)b);
    if ((b & 0xf0) == 0x80)
        return mp_map(r, b & 0x0f, depth);
    if ((b & 0xf0) == 0x90)
        return mp_array(r, b & 0x0f, depth);
    if ((b & 0xe0) == 0xa0)
        return mp_str(r, b & 0x1f);
    static const int width[] = {
        /* 0xc0 .. 0xdf: bytes of the length or value that follow, -1: bail */
        0, -1, 0, 0, 1, 2, 4, -1, -1, -1, 4, 8, 1, 2, 4, 8,
        1, 2, 4, 8, -1, -1, -1, -1, -1, 1, 2, 4, 2, 4, 2, 4,
    };
    int w = width[b - 0xc0];
    if (w < 0 || !mp_need(r, (size_t)w)) {
        r->bail = 1;
        return NULL;
    }
    uint64_t v = mp_be(r->p, w);
    r->p += w;
    switch (b) {
    case 0xc0:
        Py_RETURN_NONE;
    case 0xc2:
        Py_RETURN_FALSE;
    case 0xc3:
        Py_RETURN_TRUE;
    case 0xc4: case 0xc5: case 0xc6:
        return mp_bin(r, v);
    case 0xca: {
        uint32_t u = (uint32_t)v;
        float f;
        memcpy(&f, &u, sizeof f);
        return PyFloat_FromDouble(f);
    }
    case 0xcb: {
        double d;
        memcpy(&d, &v, sizeof d);
        return PyFloat_FromDouble(d);
    }
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
        return PyLong_FromUnsignedLongLong(v);
    case 0xd0:
        return PyLong_FromLong((int8_t)v);
    case 0xd1:
        return PyLong_FromLong((int16_t)v);
    case 0xd2:
        return PyLong_FromLong((int32_t)v);
    case 0xd3:
        return PyLong_FromLongLong((int64_t)v);
    case 0xd9: case 0xda: case 0xdb:
        return mp_str(r, v);
    case 0xdc: case 0xdd:
        return mp_array(r, v, depth);
    case 0xde: case 0xdf:
        return mp_map(r, v, depth);
    }
    r->bail = 1; /* not reached: every byte with a width is handled above */
    return NULL;
}

/* The payload if this decoder is sure of it; NULL with *bail set if msgpack
 * must decide; NULL with a Python error for an error of ours (no memory). */
static PyObject *mp_unpack(const char *p, uint32_t len, int *bail)
{
    mp_reader r = {(const uint8_t *)p, (const uint8_t *)p + len, 0};
    PyObject *v = mp_value(&r, 0);
    if (v && r.p != r.end) { /* bytes left over: msgpack says ExtraData */
        Py_DECREF(v);
        v = NULL;
        r.bail = 1;
    }
    if (!v && r.bail && PyErr_Occurred())
        return NULL; /* an error of ours on the way down, not a bail */
    *bail = r.bail;
    return v;
}

/* One frame: a new Message, a str (why it is corrupt), or NULL (an error). */
static PyObject *decode_one(decode_state *st, const char *f, uint32_t size)
{
    if (size < SHMBUS_FRAME_HEADER_SIZE)
        return bad("frame of %u bytes is shorter than the %d-byte header", size,
                   SHMBUS_FRAME_HEADER_SIZE);
    shmbus_frame_header h;
    memcpy(&h, f, sizeof h);
    if (h.magic != SHMBUS_FRAME_MAGIC || h.version != SHMBUS_FRAME_VERSION)
        return bad("not a shmbus frame of version %d (magic 0x%x, v%u)", SHMBUS_FRAME_VERSION,
                   (unsigned)h.magic, (unsigned)h.version);
    uint64_t names_len = (uint64_t)h.sender_len + h.recipient_len + h.topic_len;
    if (SHMBUS_FRAME_HEADER_SIZE + names_len + h.payload_len != size)
        return bad("frame lengths do not add up: header %d + names %u+%u+%u + payload %u != %u "
                   "bytes",
                   SHMBUS_FRAME_HEADER_SIZE, (unsigned)h.sender_len, (unsigned)h.recipient_len,
                   (unsigned)h.topic_len, (unsigned)h.payload_len, size);
    PyObject *kind = PyTuple_GET_ITEM(st->types, h.type);
    if (kind == Py_None || h.priority > 100 || h.topic_len > SHMBUS_FRAME_MAX_TOPIC)
        return bad("frame has type %u, priority %u, topic length %u: out of range",
                   (unsigned)h.type, (unsigned)h.priority, (unsigned)h.topic_len);
    const char *names_at = f + SHMBUS_FRAME_HEADER_SIZE;
    PyObject *names = names_of(st, f, h.sender_len, h.recipient_len, h.topic_len);
    if (!names)
        return NULL;
    if (names == Py_None)
        return bad("frame names are not valid UTF-8");
    const char *payload_at = names_at + names_len;
    PyObject *payload;
    if (h.flags & SHMBUS_FRAME_FLAG_RAW) {
        payload = PyBytes_FromStringAndSize(payload_at, h.payload_len);
    } else {
        int bail = 0;
        payload = mp_unpack(payload_at, h.payload_len, &bail);
        if (!payload && !bail) {
            Py_DECREF(names);
            return NULL;
        }
    }
    if (!payload && !(h.flags & SHMBUS_FRAME_FLAG_RAW)) {
        /* A bytes copy, not a memoryview of the scratch: no view can outlive
         * the read, and it is cheaper than making and releasing a view. */
        PyObject *packed = PyBytes_FromStringAndSize(payload_at, h.payload_len);
        if (!packed) {
            Py_DECREF(names);
            return NULL;
        }
        /* unpackb(packed, **kwargs) without building a dict per call. */
        Py_ssize_t nkw = PyTuple_GET_SIZE(st->kwnames);
        PyObject *argv[1 + 8];
        argv[0] = packed;
        for (Py_ssize_t k = 0; k < nkw; k++)
            argv[1 + k] = PyTuple_GET_ITEM(st->kwvalues, k);
        payload = PyObject_Vectorcall(st->unpackb, argv, 1, st->kwnames);
        Py_DECREF(packed);
        if (!payload) {
            /* shmbus.core.message's ext_hook raises CorruptFrame, msgpack its own
             * errors: every one of them makes this frame corrupt, nothing
             * more (MemoryError and KeyboardInterrupt stay errors). */
            if (PyErr_ExceptionMatches(PyExc_MemoryError) ||
                PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
                Py_DECREF(names);
                return NULL;
            }
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            PyObject *why = value ? PyObject_Str(value) : NULL;
            if (!why)
                PyErr_Clear(); /* an exception whose str() fails: say less */
            PyObject *msg = bad("payload is not valid msgpack: %s: %S",
                                type ? ((PyTypeObject *)type)->tp_name : "?",
                                why ? why : Py_None);
            Py_XDECREF(why);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            PyErr_Clear();
            Py_DECREF(names);
            return msg;
        }
    }
    if (!payload) {
        Py_DECREF(names);
        return NULL;
    }
    int64_t whole = h.timestamp_ns / 1000000000, frac = h.timestamp_ns % 1000000000;
    if (frac < 0) { /* Python's divmod floors */
        frac += 1000000000;
        whole -= 1;
    }
    PyObject *items[N_FIELDS] = {
        PyLong_FromUnsignedLongLong(h.id),
        Py_NewRef(kind),
        Py_NewRef(PyTuple_GET_ITEM(names, 0)),
        Py_NewRef(PyTuple_GET_ITEM(names, 1)),
        Py_NewRef(PyTuple_GET_ITEM(names, 2)),
        PyLong_FromUnsignedLongLong(h.request_id),
        payload,
        PyLong_FromLong(h.priority),
        PyFloat_FromDouble((double)whole + (double)frac / 1e9),
        PyLong_FromUnsignedLongLong(h.correlation_id),
        PyLong_FromLong(h.attempts),
        Py_NewRef((h.flags & SHMBUS_FRAME_FLAG_ACK) ? Py_True : Py_False),
        h.ttl_ms ? PyFloat_FromDouble(h.ttl_ms / 1000.0) : Py_NewRef(Py_None),
    };
    Py_DECREF(names);
    PyObject *msg = NULL;
    int ok = 1;
    for (int i = 0; i < N_FIELDS; i++)
        ok = ok && items[i];
    if (ok)
        msg = st->cls->tp_alloc(st->cls, N_FIELDS);
    if (!msg) {
        for (int i = 0; i < N_FIELDS; i++)
            Py_XDECREF(items[i]);
        return NULL;
    }
    for (int i = 0; i < N_FIELDS; i++)
        PyTuple_SET_ITEM(msg, i, items[i]);
    return msg;
}

static int load_state(PyObject *state, decode_state *st)
{
    if (!PyTuple_Check(state) || PyTuple_GET_SIZE(state) != 6) {
        PyErr_SetString(PyExc_TypeError, "state must be a 6-tuple");
        return -1;
    }
    PyObject *cls = PyTuple_GET_ITEM(state, 0);
    st->types = PyTuple_GET_ITEM(state, 1);
    st->names = PyTuple_GET_ITEM(state, 2);
    st->unpackb = PyTuple_GET_ITEM(state, 3);
    PyObject *kwargs = PyTuple_GET_ITEM(state, 4);
    st->names_limit = PyLong_AsSsize_t(PyTuple_GET_ITEM(state, 5));
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type) ||
        !PyTuple_Check(st->types) || PyTuple_GET_SIZE(st->types) != 256 ||
        !PyDict_Check(st->names) || !PyCallable_Check(st->unpackb) || !PyTuple_Check(kwargs) ||
        PyTuple_GET_SIZE(kwargs) != 2 || st->names_limit < 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "bad decode state");
        return -1;
    }
    st->kwnames = PyTuple_GET_ITEM(kwargs, 0);
    st->kwvalues = PyTuple_GET_ITEM(kwargs, 1);
    if (!PyTuple_Check(st->kwnames) || !PyTuple_Check(st->kwvalues) ||
        PyTuple_GET_SIZE(st->kwnames) != PyTuple_GET_SIZE(st->kwvalues) ||
        PyTuple_GET_SIZE(st->kwnames) > 8) {
        PyErr_SetString(PyExc_TypeError, "bad decode state: keyword arguments");
        return -1;
    }
    st->cls = (PyTypeObject *)cls;
    return 0;
}

static PyObject *decode_block(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data, lens;
    Py_ssize_t count;
    PyObject *state;
    if (!PyArg_ParseTuple(args, "y*y*nO", &data, &lens, &count, &state))
        return NULL;
    PyObject *out = NULL;
    decode_state st;
    if (load_state(state, &st) < 0)
        goto done;
    if (count < 0 || (size_t)count > (size_t)lens.len / sizeof(uint32_t)) {
        PyErr_SetString(PyExc_ValueError, "count is larger than lens holds");
        goto done;
    }
    out = PyList_New(count);
    if (!out)
        goto done;
    const uint32_t *len_at = lens.buf;
    Py_ssize_t pos = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t size;
        memcpy(&size, len_at + i, sizeof size);
        if ((size_t)size > (size_t)(data.len - pos)) {
            PyErr_SetString(PyExc_ValueError, "frame lengths exceed the buffer");
            Py_CLEAR(out);
            goto done;
        }
        PyObject *msg = decode_one(&st, (const char *)data.buf + pos, size);
        if (!msg) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, msg);
        pos += size;
    }
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&lens);
    return out;
}

static PyMethodDef methods[] = {
    {"decode_block", decode_block, METH_VARARGS,
     "decode_block(scratch, lens, count, state) -> list of Message or str (why corrupt)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shmbus._decode", "Frames to Message records, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__decode(void) { return PyModule_Create(&module); }
