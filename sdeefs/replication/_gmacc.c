/* sdeefs.replication._gmacc: a frame's AES-256-GMAC checked (or sealed) in one C call.
 *
 * sdeefs.replication.mac checks a frame's MAC field through ctypes: seven foreign calls
 * (context, init, two updates, final, tag, free), each a few microseconds of argument
 * conversion, then a compare in Python: ~12 us a frame besides the hashing, for every
 * frame a replica receives (bench/RESULTS.md, branch coldfast).  This is the same check
 * as mac.matches, in one call, with the GIL released while libcrypto hashes:
 *
 * matches(derived_key, field, header, payload) -> bool
 *     ``derived_key``: the 32-byte AES key mac derives from a link's key (mac.derived);
 *     ``field``: the frame's MAC field (32 bytes: nonce 12, tag 16, four zero bytes);
 *     True if ``field`` is well formed and its tag is the GMAC of header + payload under
 *     that key and the field's nonce (compared in constant time: CRYPTO_memcmp).  False
 *     for anything else, including a field of the wrong size; an exception only if
 *     libcrypto fails (MemoryError) or the key is not 32 bytes (ValueError).
 *
 * Whether the nonce is the one due on the link is wire.LinkKey's check, after this one,
 * as after mac.matches.  tests/replication/test_coldreplica.py compares both on random
 * and damaged frames.
 *
 * seal(derived_key, nonce, frame, end) -> None
 *     The sender's side (mac.seal, in one call: the origin seals every frame it sends,
 *     seven ctypes calls each, bench/RESULTS.md, branch originlean): the MAC field of
 *     the frame whose header and payload are ``frame[:end]``, written into
 *     ``frame[end:end + 32]``: ``nonce`` (12 bytes), the GMAC tag of ``frame[:end]``
 *     under that key and nonce, four zero bytes.  ``frame`` is a writable buffer of
 *     exactly end + 32 bytes; ValueError otherwise (or for a key not 32 bytes, a nonce
 *     not 12), MemoryError if libcrypto fails.  The GIL is released while libcrypto
 *     hashes, as for matches.  tests/replication/test_originlean.py compares it with
 *     mac.seal.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <string.h>

#define KEY_SIZE 32
#define NONCE_SIZE 12
#define TAG_SIZE 16
#define FIELD_SIZE (NONCE_SIZE + TAG_SIZE + 4)

/* The GMAC of a + b under key and nonce into tag; 0 on success. */
static int gmac(const unsigned char *key, const unsigned char *nonce,
                const unsigned char *a, size_t a_len, const unsigned char *b, size_t b_len,
                unsigned char *tag)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return -1;
    int ok = EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, nonce) == 1;
    int out_len = 0;
    const unsigned char *parts[2] = {a, b};
    size_t lens[2] = {a_len, b_len};
    for (int i = 0; i < 2 && ok; i++) {
        const unsigned char *p = parts[i];
        size_t left = lens[i];
        while (left > 0 && ok) { /* EVP takes an int length */
            int n = left > (size_t)INT_MAX ? INT_MAX : (int)left;
            ok = EVP_EncryptUpdate(ctx, NULL, &out_len, p, n) == 1;
            p += n;
            left -= (size_t)n;
        }
    }
    unsigned char none[16];
    ok = ok && EVP_EncryptFinal_ex(ctx, none, &out_len) == 1;
    ok = ok && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_SIZE, tag) == 1;
    EVP_CIPHER_CTX_free(ctx);
    return ok ? 0 : -1;
}

static PyObject *matches(PyObject *self, PyObject *args)
{
    Py_buffer key, field, header, payload;
    if (!PyArg_ParseTuple(args, "y*y*y*y*", &key, &field, &header, &payload))
        return NULL;
    PyObject *result = NULL;
    if (key.len != KEY_SIZE) {
        PyErr_SetString(PyExc_ValueError, "a derived GMAC key is 32 bytes");
        goto out;
    }
    static const unsigned char zero[4] = {0, 0, 0, 0};
    const unsigned char *f = field.buf;
    if (field.len != FIELD_SIZE || memcmp(f + NONCE_SIZE + TAG_SIZE, zero, 4) != 0) {
        result = Py_NewRef(Py_False);
        goto out;
    }
    unsigned char tag[TAG_SIZE];
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = gmac(key.buf, f, header.buf, (size_t)header.len, payload.buf,
                  (size_t)payload.len, tag);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_SetString(PyExc_MemoryError, "libcrypto failed to compute an AES-GMAC");
        goto out;
    }
    result = Py_NewRef(CRYPTO_memcmp(tag, f + NONCE_SIZE, TAG_SIZE) == 0 ? Py_True : Py_False);
out:
    PyBuffer_Release(&key);
    PyBuffer_Release(&field);
    PyBuffer_Release(&header);
    PyBuffer_Release(&payload);
    return result;
}

static PyObject *seal(PyObject *self, PyObject *args)
{
    Py_buffer key, nonce, frame;
    Py_ssize_t end;
    if (!PyArg_ParseTuple(args, "y*y*w*n", &key, &nonce, &frame, &end))
        return NULL;
    PyObject *result = NULL;
    if (key.len != KEY_SIZE || nonce.len != NONCE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "a derived GMAC key is 32 bytes, a nonce 12");
        goto out;
    }
    if (end < 0 || frame.len != end + FIELD_SIZE) {
        PyErr_SetString(PyExc_ValueError, "a frame to seal ends in its 32-byte MAC field");
        goto out;
    }
    unsigned char *f = frame.buf;
    unsigned char tag[TAG_SIZE];
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = gmac(key.buf, nonce.buf, f, (size_t)end, NULL, 0, tag);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_SetString(PyExc_MemoryError, "libcrypto failed to compute an AES-GMAC");
        goto out;
    }
    memcpy(f + end, nonce.buf, NONCE_SIZE);
    memcpy(f + end + NONCE_SIZE, tag, TAG_SIZE);
    memset(f + end + NONCE_SIZE + TAG_SIZE, 0, 4);
    result = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&key);
    PyBuffer_Release(&nonce);
    PyBuffer_Release(&frame);
    return result;
}

static PyMethodDef methods[] = {
    {"matches", matches, METH_VARARGS,
     "matches(derived_key, field, header, payload) -> bool: a frame's GMAC field checked "
     "(see the source's comment)."},
    {"seal", seal, METH_VARARGS,
     "seal(derived_key, nonce, frame, end) -> None: a frame's GMAC field written into "
     "frame[end:] (see the source's comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_gmacc",
    "A frame's AES-256-GMAC checked, or sealed, in one call (see the source's comment).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__gmacc(void)
{
    return PyModule_Create(&module);
}
