/* sdeefs.fs._capturec: the capture's per-file hot path in C (issue 16).
 *
 * Two functions, all pure helpers over syscalls and bytes: every decision about
 * what the tree is stays in Python (sdeefs.fs.reconcile, sdeefs.fs.capture).  The
 * pure-Python versions they replace stay in those modules: they are the fallback
 * when this extension is not built, and the tests compare the two.
 *
 * note_events(buf, dirs, objects, data, names) -> (events, overflows, unresolved)
 *     Decode a buffer read from a fanotify group (the layout in sdeefs.fs.fanotify's
 *     docstring) and merge what it points at into a Dirty set's containers, as
 *     Capture._note does: entry events (create, delete, rename) mark their
 *     directories (dirs[ino] = handle) and names ((ino, name) in names); object
 *     events (modify, attrib, close_write) mark the object (objects[ino] = handle,
 *     and ino in data for modify and close_write).  Inode numbers come from the
 *     handle (ext4's FILEID_INO32_GEN); an event with a handle of another type is
 *     returned undecided in ``unresolved`` as (mask, pid, handle or None,
 *     ((info type, dir handle, name), ...)), the shape of fanotify.Event's fields,
 *     for the Python path.  Returns how many events the buffer held and how many of
 *     them were queue overflows.  ValueError for a malformed buffer (the Python
 *     decoder's BadEvent).
 *
 * examine(dir_fd, entries) -> list
 *     For each (name, exp_ino, exp_size, exp_mtime, exp_ctime, force) of ``entries``
 *     (names of entries of the directory dir_fd), what Reconciler._examine_entry
 *     looks at, in one call: lstat, the entry's file handle (name_to_handle_at,
 *     b"" where the filesystem has none), its xattrs (sorted (name, value) pairs,
 *     read through /proc/self/fd/DIR/NAME without following a symlink), a symlink's
 *     target, and for a regular file whose lstat differs from the expectation
 *     (force, another inode, size, mtime, or ctime when exp_ctime >= 0) its whole
 *     content (opened O_NOATIME|O_NONBLOCK|O_NOFOLLOW, fstat before and after).
 *     Each item is None (the entry is gone) or the tuple
 *         (mode, uid, gid, size, mtime_ns, ctime_ns, ino, rdev, handle, xattrs,
 *          target, contents)
 *     with contents None (not read, or it could not be opened), False (larger than
 *     MAX_INLINE: the caller reads it) or (data, before_mode, before_ino,
 *     before_ctime_ns, after_mtime_ns, after_ctime_ns).  Other errors raise
 *     OSError.  Nothing is ever written; FIFOs are never opened (O_NONBLOCK is only
 *     a second guard: only S_ISREG entries are opened, and O_NOFOLLOW refuses a
 *     symlink swapped in).
 *
 * (The block sums of the data it reads are not made here: they are BLAKE3's, one
 * Python call per block into the ``blake3`` module with the GIL released, ~5x cheaper
 * than the libsodium BLAKE2b this module once called; sdeefs.blocksums.)
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#define FAN_MODIFY 0x2
#define FAN_ATTRIB 0x4
#define FAN_CLOSE_WRITE 0x8
#define FAN_CREATE 0x100
#define FAN_DELETE 0x200
#define FAN_Q_OVERFLOW 0x4000
#define FAN_RENAME 0x10000000u
#define ENTRY_EVENTS (FAN_CREATE | FAN_DELETE | FAN_RENAME)
#define OBJECT_EVENTS (FAN_MODIFY | FAN_ATTRIB | FAN_CLOSE_WRITE)
#define DATA_EVENTS (FAN_MODIFY | FAN_CLOSE_WRITE)

#define INFO_FID 1
#define INFO_DFID_NAME 2
#define INFO_DFID 3
#define INFO_OLD_DFID_NAME 10
#define INFO_OLD_DFID 11
#define INFO_NEW_DFID_NAME 12
#define INFO_NEW_DFID 13
#define FILEID_INO32_GEN 1
#define METADATA_VERSION 3
#define METADATA_SIZE 24
#define MAX_DIRS 4 /* info records naming a directory per event (a rename has 2) */

#define MAX_HANDLE 128
#define MAX_INLINE (1 << 20) /* bytes of a file read here; larger ones: the caller */

static uint32_t get_u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static int32_t get_i32(const unsigned char *p) { int32_t v; memcpy(&v, p, 4); return v; }
static uint16_t get_u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint64_t get_u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int is_dir_info(int t)
{
    return t == INFO_DFID_NAME || t == INFO_DFID || t == INFO_OLD_DFID_NAME
        || t == INFO_OLD_DFID || t == INFO_NEW_DFID_NAME || t == INFO_NEW_DFID;
}

static int is_named_info(int t)
{
    return t == INFO_DFID_NAME || t == INFO_OLD_DFID_NAME || t == INFO_NEW_DFID_NAME;
}

/* A handle's inode number (ext4: type 1, u32 ino, u32 generation); -1 otherwise. */
static long long handle_ino(const unsigned char *h, size_t len)
{
    if (len != 16 || get_u32(h) != 8 || get_i32(h + 4) != FILEID_INO32_GEN)
        return -1;
    return (long long)get_u32(h + 8);
}

struct dir_ref {
    int type;
    const unsigned char *handle;
    size_t handle_len;
    const unsigned char *name;
    size_t name_len;
};

static PyObject *unresolved_event(uint64_t mask, int32_t pid, const unsigned char *h,
                                  size_t hlen, struct dir_ref *dirs, int ndirs)
{
    PyObject *tuple = PyTuple_New(ndirs);
    if (tuple == NULL)
        return NULL;
    for (int i = 0; i < ndirs; i++) {
        PyObject *item = Py_BuildValue("(iy#y#)", dirs[i].type, dirs[i].handle,
                                       (Py_ssize_t)dirs[i].handle_len, dirs[i].name,
                                       (Py_ssize_t)dirs[i].name_len);
        if (item == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, i, item);
    }
    PyObject *handle;
    if (h != NULL)
        handle = PyBytes_FromStringAndSize((const char *)h, (Py_ssize_t)hlen);
    else
        handle = Py_NewRef(Py_None);
    if (handle == NULL) {
        Py_DECREF(tuple);
        return NULL;
    }
    return Py_BuildValue("(KiNN)", (unsigned long long)mask, (int)pid, handle, tuple);
}

static int put_handle(PyObject *dict, long long ino, const unsigned char *h, size_t len)
{
    PyObject *key = PyLong_FromLongLong(ino);
    PyObject *value = PyBytes_FromStringAndSize((const char *)h, (Py_ssize_t)len);
    int ret = (key && value) ? PyDict_SetItem(dict, key, value) : -1;
    Py_XDECREF(key);
    Py_XDECREF(value);
    return ret;
}

static PyObject *note_events(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    PyObject *dirs, *objects, *data, *names;
    if (!PyArg_ParseTuple(args, "y*O!O!O!O!", &buf, &PyDict_Type, &dirs, &PyDict_Type,
                          &objects, &PySet_Type, &data, &PySet_Type, &names))
        return NULL;
    const unsigned char *p = buf.buf;
    size_t total = (size_t)buf.len, off = 0;
    long events = 0, overflows = 0;
    PyObject *unresolved = PyList_New(0);
    if (unresolved == NULL)
        goto fail;
    while (off + METADATA_SIZE <= total) {
        uint32_t event_len = get_u32(p + off);
        unsigned vers = p[off + 4];
        uint16_t meta_len = get_u16(p + off + 6);
        uint64_t mask = get_u64(p + off + 8);
        int32_t fd = get_i32(p + off + 16);
        int32_t pid = get_i32(p + off + 20);
        if (vers != METADATA_VERSION || event_len < meta_len || meta_len < METADATA_SIZE
            || event_len > total - off) {
            PyErr_Format(PyExc_ValueError, "fanotify event version %u, length %u", vers,
                         event_len);
            goto fail;
        }
        if (fd >= 0)
            close(fd); /* never with FID reporting; do not leak one */
        size_t end = off + event_len, pos = off + meta_len;
        const unsigned char *h = NULL;
        size_t hlen = 0;
        struct dir_ref refs[MAX_DIRS];
        int nrefs = 0;
        while (pos + 4 <= end) {
            int itype = p[pos];
            uint16_t ilen = get_u16(p + pos + 2);
            if (ilen < 4 || ilen > end - pos) {
                PyErr_Format(PyExc_ValueError, "fanotify info record of length %u", ilen);
                goto fail;
            }
            if (itype == INFO_FID || is_dir_info(itype)) {
                if (ilen < 20) {
                    PyErr_SetString(PyExc_ValueError, "fanotify FID record too short");
                    goto fail;
                }
                uint32_t hbytes = get_u32(p + pos + 12);
                size_t hstart = pos + 12, hend = hstart + 8 + (size_t)hbytes;
                if (hbytes > 4096 || hend > pos + ilen) {
                    PyErr_SetString(PyExc_ValueError,
                                    "fanotify file handle runs past its info record");
                    goto fail;
                }
                if (itype == INFO_FID) {
                    h = p + hstart;
                    hlen = hend - hstart;
                } else if (nrefs < MAX_DIRS) {
                    struct dir_ref *r = &refs[nrefs++];
                    r->type = itype;
                    r->handle = p + hstart;
                    r->handle_len = hend - hstart;
                    r->name = p + hend;
                    r->name_len = 0;
                    if (is_named_info(itype)) {
                        const unsigned char *nul = memchr(p + hend, 0, pos + ilen - hend);
                        r->name_len = nul ? (size_t)(nul - (p + hend)) : pos + ilen - hend;
                    }
                } else {
                    PyErr_SetString(PyExc_ValueError, "fanotify event names too many dirs");
                    goto fail;
                }
            }
            pos += ilen;
        }
        events++;
        off = end;
        if (mask & FAN_Q_OVERFLOW) {
            overflows++;
            continue;
        }
        /* decodable?  every handle this event uses must carry its inode number */
        int plain = 1;
        const unsigned char *oh = h;
        size_t ohlen = hlen;
        if (mask & ENTRY_EVENTS)
            for (int i = 0; i < nrefs; i++)
                if (handle_ino(refs[i].handle, refs[i].handle_len) < 0)
                    plain = 0;
        if (mask & OBJECT_EVENTS) {
            if (oh == NULL)
                for (int i = 0; i < nrefs; i++)
                    if (refs[i].name_len == 1 && refs[i].name[0] == '.') {
                        oh = refs[i].handle;
                        ohlen = refs[i].handle_len;
                        break;
                    }
            if (oh != NULL && handle_ino(oh, ohlen) < 0)
                plain = 0;
        }
        if (!plain) {
            PyObject *ev = unresolved_event(mask, pid, h, hlen, refs, nrefs);
            if (ev == NULL || PyList_Append(unresolved, ev) < 0) {
                Py_XDECREF(ev);
                goto fail;
            }
            Py_DECREF(ev);
            continue;
        }
        if (mask & ENTRY_EVENTS) {
            for (int i = 0; i < nrefs; i++) {
                long long ino = handle_ino(refs[i].handle, refs[i].handle_len);
                if (put_handle(dirs, ino, refs[i].handle, refs[i].handle_len) < 0)
                    goto fail;
                if (refs[i].name_len) {
                    PyObject *pair = Py_BuildValue("(Ly#)", ino, refs[i].name,
                                                   (Py_ssize_t)refs[i].name_len);
                    if (pair == NULL || PySet_Add(names, pair) < 0) {
                        Py_XDECREF(pair);
                        goto fail;
                    }
                    Py_DECREF(pair);
                }
            }
        }
        if ((mask & OBJECT_EVENTS) && oh != NULL) {
            long long ino = handle_ino(oh, ohlen);
            if (put_handle(objects, ino, oh, ohlen) < 0)
                goto fail;
            if (mask & DATA_EVENTS) {
                PyObject *key = PyLong_FromLongLong(ino);
                if (key == NULL || PySet_Add(data, key) < 0) {
                    Py_XDECREF(key);
                    goto fail;
                }
                Py_DECREF(key);
            }
        }
    }
    PyBuffer_Release(&buf);
    return Py_BuildValue("(llN)", events, overflows, unresolved);
fail:
    Py_XDECREF(unresolved);
    PyBuffer_Release(&buf);
    return NULL;
}

/* ---- examine ------------------------------------------------------------------------- */

struct handle_buf {
    unsigned int handle_bytes;
    int handle_type;
    unsigned char f_handle[MAX_HANDLE];
};

static PyObject *raise_errno(int err, const char *what, const char *name)
{
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "isy", err, what, name);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* Sorted ((name, value), ...) of the xattrs of ``fd`` (if >= 0) or of ``path`` (not
 * following a symlink); NULL with an exception set.  ENOTSUP/ENOENT on listing: none. */
static PyObject *read_xattrs(const char *path, int fd)
{
    char list[65536];
    ssize_t n = fd >= 0 ? flistxattr(fd, list, sizeof list) : llistxattr(path, list, sizeof list);
    if (n < 0) {
        if (errno == ENOTSUP || errno == ENOENT)
            return PyTuple_New(0);
        if (errno == ERANGE) { /* larger than a list can be (XATTR_LIST_MAX): refuse */
            errno = E2BIG;
        }
        return raise_errno(errno, "listxattr", path);
    }
    if (n == 0)
        return PyTuple_New(0);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    static char value[65536];
    for (ssize_t at = 0; at < n;) {
        const char *name = list + at;
        size_t len = strnlen(name, (size_t)(n - at));
        at += (ssize_t)len + 1;
        ssize_t vlen = fd >= 0 ? fgetxattr(fd, name, value, sizeof value)
                               : lgetxattr(path, name, value, sizeof value);
        if (vlen < 0) {
            if (errno == ENODATA || errno == ENOENT)
                continue;
            Py_DECREF(out);
            return raise_errno(errno, "getxattr", path);
        }
        PyObject *pair = Py_BuildValue("(y#y#)", name, (Py_ssize_t)len, value,
                                       (Py_ssize_t)vlen);
        if (pair == NULL || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(pair);
    }
    if (PyList_Sort(out) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *tuple = PyList_AsTuple(out);
    Py_DECREF(out);
    return tuple;
}

/* Read the regular file open at ``fd`` (``before``: its fstat) whole: the contents
 * tuple, or Py_False (too large); NULL on errors.  Closes nothing. */
static PyObject *read_contents(int fd, const struct stat *bp, const char *name)
{
    struct stat before = *bp, after;
    size_t cap = before.st_size > 0 && before.st_size < MAX_INLINE
        ? (size_t)before.st_size + 1 : 4096;
    PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap);
    if (data == NULL)
        return NULL;
    size_t size = 0;
    for (;;) {
        if (size == cap) {
            if (cap >= MAX_INLINE) {
                Py_DECREF(data);
                Py_RETURN_FALSE;
            }
            cap = cap * 2 > MAX_INLINE ? MAX_INLINE : cap * 2;
            if (_PyBytes_Resize(&data, (Py_ssize_t)cap) < 0)
                return NULL;
        }
        ssize_t got;
        int err;
        char *into = PyBytes_AS_STRING(data) + size; /* ours alone: no GIL needed */
        Py_BEGIN_ALLOW_THREADS
        got = pread(fd, into, cap - size, (off_t)size);
        err = errno;
        Py_END_ALLOW_THREADS
        if (got < 0) {
            if (err == EINTR)
                continue;
            Py_DECREF(data);
            return raise_errno(err, "read", name);
        }
        if (got == 0)
            break;
        size += (size_t)got;
    }
    if (fstat(fd, &after) < 0) {
        int err = errno;
        Py_DECREF(data);
        return raise_errno(err, "fstat", name);
    }
    if (_PyBytes_Resize(&data, (Py_ssize_t)size) < 0)
        return NULL;
    long long b_ctime = (long long)before.st_ctim.tv_sec * 1000000000LL + before.st_ctim.tv_nsec;
    long long a_mtime = (long long)after.st_mtim.tv_sec * 1000000000LL + after.st_mtim.tv_nsec;
    long long a_ctime = (long long)after.st_ctim.tv_sec * 1000000000LL + after.st_ctim.tv_nsec;
    return Py_BuildValue("(NIKLLL)", data, (unsigned)before.st_mode,
                         (unsigned long long)before.st_ino, b_ctime, a_mtime, a_ctime);
}

static PyObject *file_handle(int fd, const char *name, int flags, const char *what)
{
    struct handle_buf hb;
    int mount_id, ret, err;
    hb.handle_bytes = MAX_HANDLE;
    hb.handle_type = 0;
    Py_BEGIN_ALLOW_THREADS
    ret = name_to_handle_at(fd, name, (struct file_handle *)&hb, &mount_id, flags);
    err = errno;
    Py_END_ALLOW_THREADS
    if (ret == 0)
        return PyBytes_FromStringAndSize((const char *)&hb, 8 + (Py_ssize_t)hb.handle_bytes);
    if (err == ENOENT)
        Py_RETURN_NONE; /* gone */
    if (err == EOPNOTSUPP || err == ENOSYS)
        return PyBytes_FromStringAndSize("", 0);
    return raise_errno(err, "name_to_handle_at", what);
}

/* A regular file to read: open it (never following a symlink, never waiting on a FIFO
 * swapped in) and fstat it; -1 (and nothing raised) if it cannot be opened or is no
 * longer the inode ``st`` describes: the caller then looks at it by name, unread. */
static int open_same_file(int dir_fd, const char *name, const struct stat *st,
                          struct stat *before, int *err)
{
    int fd;
    *err = 0;
    Py_BEGIN_ALLOW_THREADS
    fd = openat(dir_fd, name, O_RDONLY | O_NOATIME | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        *err = errno;
    } else if (fstat(fd, before) < 0) {
        *err = errno;
        close(fd);
        fd = -1;
    } else if (!S_ISREG(before->st_mode) || before->st_ino != st->st_ino
               || before->st_dev != st->st_dev) {
        close(fd);
        fd = -1;
    }
    Py_END_ALLOW_THREADS
    if (fd < 0 && *err != 0 && *err != ENOENT && *err != ELOOP && *err != ENXIO
        && *err != EACCES)
        return -2;
    return fd;
}

static PyObject *examine_one(int dir_fd, const char *name, Py_ssize_t name_len,
                             unsigned long long exp_ino, unsigned long long exp_size,
                             long long exp_mtime, long long exp_ctime, int force)
{
    if ((Py_ssize_t)strlen(name) != name_len || name_len == 0 || name_len > 255)
        return raise_errno(EINVAL, "examine: bad name", name);
    struct stat st, before;
    int stat_ret, err = 0;
    Py_BEGIN_ALLOW_THREADS
    stat_ret = fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW);
    err = errno;
    Py_END_ALLOW_THREADS
    if (stat_ret < 0) {
        if (err == ENOENT)
            Py_RETURN_NONE;
        return raise_errno(err, "lstat", name);
    }
    long long mtime = (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
    long long ctime = (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec;
    int fd = -1;
    if (S_ISREG(st.st_mode) && (force || st.st_ino != exp_ino
                                || (unsigned long long)st.st_size != exp_size
                                || mtime != exp_mtime || (exp_ctime >= 0 && ctime != exp_ctime))) {
        fd = open_same_file(dir_fd, name, &st, &before, &err);
        if (fd == -2)
            return raise_errno(err, "open", name);
    }
    /* With the file open, its handle and xattrs come from the descriptor (the inode that
     * is read); otherwise by name, below the directory, not following a symlink. */
    PyObject *handle = NULL, *xattrs = NULL, *target = NULL, *contents = NULL;
    if (fd >= 0) {
        handle = file_handle(fd, "", AT_EMPTY_PATH, name);
        if (handle != NULL && handle != Py_None)
            xattrs = read_xattrs(name, fd);
        if (xattrs != NULL)
            contents = read_contents(fd, &before, name);
        close(fd);
    } else {
        handle = file_handle(dir_fd, name, 0, name);
        if (handle != NULL && handle != Py_None) {
            char path[64 + 256];
            snprintf(path, sizeof path, "/proc/self/fd/%d/%s", dir_fd, name);
            xattrs = read_xattrs(path, -1);
        }
        if (xattrs != NULL)
            contents = Py_NewRef(Py_None);
    }
    if (handle == Py_None) { /* gone meanwhile */
        Py_DECREF(handle);
        return Py_NewRef(Py_None);
    }
    if (contents != NULL && S_ISLNK(st.st_mode)) {
        char buf[4097];
        ssize_t n = readlinkat(dir_fd, name, buf, sizeof buf);
        if (n < 0) {
            err = errno;
            Py_XDECREF(handle);
            Py_XDECREF(xattrs);
            Py_XDECREF(contents);
            if (err == ENOENT || err == EINVAL) /* gone, or no longer a symlink */
                Py_RETURN_NONE;
            return raise_errno(err, "readlink", name);
        }
        target = PyBytes_FromStringAndSize(buf, n);
    } else if (contents != NULL) {
        target = PyBytes_FromStringAndSize("", 0);
    }
    if (target == NULL) {
        Py_XDECREF(handle);
        Py_XDECREF(xattrs);
        Py_XDECREF(contents);
        return NULL;
    }
    return Py_BuildValue("(IIIKLLKKNNNN)", (unsigned)st.st_mode, (unsigned)st.st_uid,
                         (unsigned)st.st_gid, (unsigned long long)st.st_size, mtime, ctime,
                         (unsigned long long)st.st_ino, (unsigned long long)st.st_rdev,
                         handle, xattrs, target, contents);
}

static PyObject *examine(PyObject *self, PyObject *args)
{
    int dir_fd;
    PyObject *entries;
    if (!PyArg_ParseTuple(args, "iO!", &dir_fd, &PyList_Type, &entries))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(entries);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *name;
        Py_ssize_t name_len;
        unsigned long long exp_ino, exp_size;
        long long exp_mtime, exp_ctime;
        int force;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(entries, i), "y#KKLLp", &name, &name_len,
                              &exp_ino, &exp_size, &exp_mtime, &exp_ctime, &force)) {
            Py_DECREF(out);
            return NULL;
        }
        PyObject *item = examine_one(dir_fd, name, name_len, exp_ino, exp_size, exp_mtime,
                                     exp_ctime, force);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"note_events", note_events, METH_VARARGS,
     "Decode fanotify events into a Dirty set's containers (see the module source)."},
    {"examine", examine, METH_VARARGS,
     "lstat, handle, xattrs, target and (if changed) contents of directory entries."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_capturec",
    "The capture's per-file hot path in C (sdeefs/fs/_capturec.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__capturec(void)
{
    return PyModule_Create(&module);
}
