/*
 * shmbus._decode: frames to Message records, in C.
 *
 * The one piece of shmbus written against the CPython API rather than cffi,
 * because its whole job is to make Python objects: a receiver's cost is
 * building one Message per frame, and cffi can hand Python only numbers and
 * pointers.  It reads a block of frames straight from the ring reader's
 * scratch buffer (no bytes object per frame), checks every length before it
 * reads, and builds each record with the same values Python's
 * shmbus.message.decode_frame would.  A frame that fails a check becomes a
 * str saying why, in its place, for the caller to log and skip.
 *
 * decode_block(scratch, lens, count, state) -> list
 *   scratch: a buffer holding `count` frames back to back
 *   lens:    a buffer of `count` native uint32 frame lengths
 *   state:   (Message class, types tuple of 256, names cache dict,
 *             unpackb, unpackb kwargs dict, cache limit)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "shmbus_frame.h"

enum { N_FIELDS = 13 };

typedef struct {
    PyTypeObject *cls;
    PyObject *types;   /* tuple: MessageType member or None, by type code */
    PyObject *names;   /* dict: raw names -> (sender, recipient, topic) */
    PyObject *unpackb; /* msgpack.unpackb */
    PyObject *kwargs;  /* its keyword arguments */
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

static PyObject *names_of(decode_state *st, const char *p, uint32_t slen, uint32_t rlen,
                          uint32_t tlen)
{
    PyObject *key = PyBytes_FromStringAndSize(p, (Py_ssize_t)slen + rlen + tlen);
    if (!key)
        return NULL;
    PyObject *hit = PyDict_GetItemWithError(st->names, key);
    if (hit || PyErr_Occurred()) {
        Py_XINCREF(hit);
        Py_DECREF(key);
        return hit;
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
    PyObject *names = names_of(st, names_at, h.sender_len, h.recipient_len, h.topic_len);
    if (!names)
        return NULL;
    if (names == Py_None)
        return bad("frame names are not valid UTF-8");
    const char *payload_at = names_at + names_len;
    PyObject *payload;
    if (h.flags & SHMBUS_FRAME_FLAG_RAW) {
        payload = PyBytes_FromStringAndSize(payload_at, h.payload_len);
    } else {
        PyObject *view = PyMemoryView_FromMemory((char *)payload_at, h.payload_len, PyBUF_READ);
        PyObject *args = view ? PyTuple_Pack(1, view) : NULL;
        payload = args ? PyObject_Call(st->unpackb, args, st->kwargs) : NULL;
        Py_XDECREF(args);
        if (view) {
            /* the scratch is reused: nothing may keep pointing into it */
            PyObject *r = PyObject_CallMethod(view, "release", NULL);
            Py_XDECREF(r);
            Py_DECREF(view);
        }
        if (!payload) {
            /* shmbus.message's ext_hook raises CorruptFrame, msgpack its own
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
    st->kwargs = PyTuple_GET_ITEM(state, 4);
    st->names_limit = PyLong_AsSsize_t(PyTuple_GET_ITEM(state, 5));
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type) ||
        !PyTuple_Check(st->types) || PyTuple_GET_SIZE(st->types) != 256 ||
        !PyDict_Check(st->names) || !PyCallable_Check(st->unpackb) || !PyDict_Check(st->kwargs) ||
        st->names_limit < 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "bad decode state");
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
