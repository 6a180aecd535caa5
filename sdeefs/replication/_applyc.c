/* sdeefs.replication._applyc: a replica's most common records applied in C (issue 16).
 *
 * A cold stream is tens of thousands of records, nearly all of three kinds: Mknod of a
 * regular file, Write, Setattr of a file just made; from the default (kernel) engine's
 * capture, Create: a small file whole, in one record, and Extent: a big file's data.
 * Decoding each into a Python object, judging it and applying it through os.* cost more
 * CPU than the syscalls (bench/RESULTS.md, branch coldfast).  This module takes those
 * off the Python path, for the batch applier (sdeefs/replication/applier.py) only:
 *
 * apply(payload, dirs, files, applier, uids, gids) -> bool
 *     ``payload`` is a RECORD payload (sdeefs.replication.wire: rtype u16, record length
 *     u32, the record in encoding 3 of sdeefs.records, then a Write's data).  False:
 *     not taken, nothing was done or looked up (the caller decodes it and applies it the
 *     Python way: BatchApplier.apply).  True: applied exactly as BatchApplier.apply
 *     applies it.  OSError (with the name, as os.open gives it) when a syscall of the
 *     application failed: what BatchApplier.apply turns into a skip or a retry.
 *
 * apply_run(entries, index, applied, dirs, files, applier, uids, gids)
 *         -> (index, applied, error)
 *     The records of a run (``entries``: wire.split_run's list of (seq, flags, payload),
 *     the run checked whole) applied in order from ``entries[index]`` as ``apply`` applies
 *     each, with no Python call per record (a cold stream's runs are ~20,000 records a
 *     GB): records at or below ``applied`` are passed over (Replica.accept's rule), every
 *     record taken moves ``applied`` to its seq.  It stops at the first record not taken
 *     (returned: its index, nothing done for it: Python applies it the Python way) or at
 *     one whose application failed with an OSError (returned as ``error``, not raised:
 *     Python turns it into the skip or retry ``apply``'s would have been, for that
 *     record's seq).  ``index`` == len(entries): all applied.  Any other exception is
 *     raised.
 *
 * What is taken: it decides ONLY to take or not to take, never to refuse.  A record is
 * taken when it is certainly one that sdeefs.records.decode_record accepts,
 * sdeefs.replication.wire.sanitize leaves as it is apart from set-ID bits, and
 * sdeefs.replicable.refusal carries for the user of ``uids``/``gids``; anything else,
 * including anything doubtful, is left to the Python path, which refuses or applies it
 * with its one set of rules (tests/replication/test_applyc.py compares the two on
 * hostile inputs: what this takes, Python takes and applies to the same tree):
 *
 *   Mknod (2)    mode exactly S_IFREG | permission bits; path with a component below
 *                ``upper/`` or ``work/`` (records.check_path: components of 1-255 bytes,
 *                no NUL, not . or ..); uid and gid one of the user's and not 0 (the
 *                whiteout and work/ 0/0 exceptions of replicable.owner_refusal are left
 *                to Python), no data; and only if the file is new: ``O_CREAT|O_EXCL``
 *                fails with EEXIST (replayed after a crash, perhaps one before its
 *                chown) -> not taken (its parent resolved and cached, nothing else
 *                done): Python gives an existing file of its kind its owner and mode
 *                (sdeefs.apply.settle_existing), one rule for both paths
 *   Write (11)   handle at most 136 bytes, offset + length < 2^62, data at most length
 *   Extent (18)  as a Write (the Python path applies it as the Write it is), and its own
 *                fields as records.Extent.validate has them: a size (not used by a
 *                replica), sums a whole number of 16-byte sums, at most 4096 of them,
 *                offset a multiple of EXTENT_BLOCK; nothing after them.  The default
 *                engine's data: a 1 GiB cold stream's ~1,000 frames, each decoded into
 *                a Python object before (bench/RESULTS.md, branch coldcpu)
 *   Setattr (8)  mask within SET_ALL, mode within 07777, size below 2^63, owner (with
 *                SET_OWNER) one of the user's; only of a file the applier holds open
 *   Create (21)  path and owner as Mknod, mode exactly S_IFREG | permission bits,
 *                handle at most 136 bytes, NO xattrs (an empty list: xattrs are judged
 *                one by one in Python), data at most MAX_INLINE bytes, nothing after
 *                the record; and only if the file is new: its parent is resolved (an
 *                OSError there) or ``O_CREAT|O_EXCL`` fails (it exists: replayed after
 *                a crash) -> not taken, Python applies it as the records it means
 *                (``records.Create.expand``) with their own reasons.  Taken, it is
 *                what that expansion does to a new file: created (perm), chown,
 *                chmod, the data written at 0, mtime set (atime left as is: UTIME_OMIT;
 *                its size is its data's length already: no ftruncate); the file is then
 *                held, as after a Mknod.
 *
 * ``uids``/``gids`` None: the user is not known here (replicable.NOBODY: owners are not
 * checked); otherwise tuples of (start, stop) ranges (replicable.UserIds, step 1).
 * ``dirs`` and ``files`` are the applier's dicts (layer path -> fd) and ``applier``
 * the BatchApplier: a directory not in ``dirs`` is resolved by applier._dir(path)
 * (openat2 beneath the layer root, in Python: resolution stays in one place), a new
 * file is held by applier._hold(path, fd), a file to write not held is opened by
 * applier._file(path).  Names are opened with O_NOFOLLOW in directories so resolved.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define T_MKNOD 2
#define T_SETATTR 8
#define T_WRITE 11
#define T_EXTENT 18
#define T_CREATE 21
#define EXTENT_BLOCK 65536
#define SUM_SIZE 16
#define MAX_SUMS 4096
#define MAX_INLINE 65536
#define RECORD_HEAD 6
#define MAX_PATH (1 << 16)
#define MAX_BLOB 65536
#define MAX_HANDLE 136
#define MAX_NAME 255
#define SET_MODE 1
#define SET_OWNER 2
#define SET_SIZE 4
#define SET_ATIME 8
#define SET_MTIME 16
#define SET_ALL 31
#define NSEC 1000000000LL
/* Bytes per pwrite of a record's data.  ext4 (large folios, since Linux 6.16) sizes the
 * page-cache folios a write allocates by the write's length: a 1 MiB pwrite takes 1 MiB
 * folios, carved from the allocator's high-order free blocks (or compacted for), while
 * 64 KiB pieces take 64 KiB folios.  On a VM whose balloon hands free 2 MiB blocks back to
 * the host (free page reporting), the first write into such a block faults it in again on
 * the host, inside the copy: a 2 GiB cold stream's copy into the page cache took 2.6 s of
 * the applier's CPU instead of 0.7, and the replica's CPU fell from 3.2-4.9 s to 1.8-2.5 s
 * with 64 KiB pieces (bench/RESULTS.md, branch applyext4).  tar writes 10 KiB blocks.
 * 16 pwrites a MiB instead of 1 cost ~0.03 s a GiB; the data is the same. */
#define WRITE_PIECE (64 * 1024)

struct cursor {
    const unsigned char *p;
    size_t left;
};

static int take(struct cursor *c, size_t n, const unsigned char **out)
{
    if (c->left < n)
        return -1;
    *out = c->p;
    c->p += n;
    c->left -= n;
    return 0;
}

static int get_u32(struct cursor *c, uint32_t *v)
{
    const unsigned char *p;
    if (take(c, 4, &p))
        return -1;
    memcpy(v, p, 4);
    return 0;
}

static int get_u64(struct cursor *c, uint64_t *v)
{
    const unsigned char *p;
    if (take(c, 8, &p))
        return -1;
    memcpy(v, p, 8);
    return 0;
}

/* A path field (u32 length + bytes); -1 if it runs past the record or is too long. */
static int get_path(struct cursor *c, const unsigned char **path, size_t *len)
{
    uint32_t n;
    if (get_u32(c, &n) || n > MAX_PATH || take(c, n, path))
        return -1;
    *len = n;
    return 0;
}

/* Is ``p`` a layer path records.check_path accepts, with at least one component below
 * upper/ or work/?  ``*slash``: the offset of its last "/". */
static int safe_path(const unsigned char *p, size_t n, size_t *slash)
{
    size_t i;
    if (n >= 6 && memcmp(p, "upper/", 6) == 0)
        i = 5;
    else if (n >= 5 && memcmp(p, "work/", 5) == 0)
        i = 4;
    else
        return 0;
    while (i < n) { /* p[i] == '/' */
        size_t start = i + 1, j = start;
        while (j < n && p[j] != '/') {
            if (p[j] == 0)
                return 0;
            j++;
        }
        size_t len = j - start;
        if (len == 0 || len > MAX_NAME)
            return 0;
        if (p[start] == '.' && (len == 1 || (len == 2 && p[start + 1] == '.')))
            return 0;
        *slash = i;
        i = j;
    }
    return 1;
}

/* Is ``id`` in one of the (start, stop) ranges of ``ranges`` and not 0?  -1: error. */
static int has_id(PyObject *ranges, uint32_t id)
{
    if (id == 0)
        return 0;
    Py_ssize_t count = PyTuple_GET_SIZE(ranges);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyTuple_GET_ITEM(ranges, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "id ranges are (start, stop) pairs");
            return -1;
        }
        long long start = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 0));
        long long stop = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 1));
        if ((start == -1 || stop == -1) && PyErr_Occurred())
            return -1;
        if (start <= (long long)id && (long long)id < stop)
            return 1;
    }
    return 0;
}

/* 1: both ids are the user's (or owners are not checked); 0: not; -1: error. */
static int owner_ok(PyObject *uids, PyObject *gids, uint32_t uid, uint32_t gid)
{
    /* (uid_t)-1 means "leave it": os.fchown refuses it (OverflowError); not taken */
    if (uid == UINT32_MAX || gid == UINT32_MAX)
        return 0;
    if (uids == Py_None)
        return 1;
    int ok = has_id(uids, uid);
    if (ok != 1)
        return ok;
    return has_id(gids, gid);
}

static PyObject *os_error(PyObject *name)
{
    if (name != NULL)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* An fd from a Python int result (a new reference, consumed); -1 with an exception. */
static int fd_of(PyObject *obj)
{
    if (obj == NULL)
        return -1;
    long fd = PyLong_AsLong(obj);
    Py_DECREF(obj);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad fd");
        return -1;
    }
    return (int)fd;
}

/* The fd of the directory ``path[:len]``: the one held, or applier._dir(path). */
static int dir_fd(PyObject *dirs, PyObject *applier, const unsigned char *path, size_t len)
{
    PyObject *key = PyBytes_FromStringAndSize((const char *)path, (Py_ssize_t)len);
    if (key == NULL)
        return -1;
    PyObject *held = PyDict_GetItemWithError(dirs, key);
    if (held != NULL) {
        Py_DECREF(key);
        Py_INCREF(held);
        return fd_of(held);
    }
    if (PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    PyObject *got = PyObject_CallMethod(applier, "_dir", "O", key);
    Py_DECREF(key);
    return fd_of(got);
}

/* A Mknod of a regular file: 1 taken (made, held, owned), 0 not taken (it exists: nothing
 * done but its parent resolved and cached), -1 an exception. */
static int mknod_file(PyObject *dirs, PyObject *applier, PyObject *path_obj,
                      const unsigned char *path, size_t slash, size_t len,
                      uint32_t perm, uint32_t uid, uint32_t gid)
{
    int parent = dir_fd(dirs, applier, path, slash);
    if (parent < 0)
        return -1;
    PyObject *name = PyBytes_FromStringAndSize((const char *)path + slash + 1,
                                               (Py_ssize_t)(len - slash - 1));
    if (name == NULL)
        return -1;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = openat(parent, PyBytes_AS_STRING(name),
                O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, perm);
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        if (errno == EEXIST) {
            /* already there: applied before a crash, which may have come before the
             * chown.  Python's (BatchApplier._mknod: settle_existing): one rule for what
             * an existing entry gets, not two */
            Py_DECREF(name);
            return 0;
        }
        os_error(name);
        Py_DECREF(name);
        return -1;
    }
    Py_DECREF(name);
    PyObject *held = PyObject_CallMethod(applier, "_hold", "Oi", path_obj, fd);
    if (held == NULL) {
        close(fd);
        return -1;
    }
    Py_DECREF(held);
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = fchown(fd, uid, gid) || fchmod(fd, perm); /* chmod after chown: set-ID bits */
    Py_END_ALLOW_THREADS
    if (failed) {
        os_error(NULL);
        return -1;
    }
    return 1;
}

/* pwrite all of ``data`` (at least one call, as os.pwrite makes one for no data too;
 * a short write is continued where os.pwrite would leave the rest unwritten), in pieces
 * of at most WRITE_PIECE bytes (see its comment). */
static int write_all(int fd, const unsigned char *data, size_t len, uint64_t offset)
{
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    do {
        ssize_t n = pwrite(fd, data, len < WRITE_PIECE ? len : WRITE_PIECE, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            failed = 1;
            break;
        }
        if (n == 0 && len > 0) {
            errno = EIO;
            failed = 1;
            break;
        }
        data += n;
        len -= (size_t)n;
        offset += (uint64_t)n;
    } while (len > 0);
    Py_END_ALLOW_THREADS
    if (failed) {
        os_error(NULL);
        return -1;
    }
    return 0;
}

static void to_timespec(int64_t ns, struct timespec *ts)
{
    int64_t sec = ns / NSEC, rem = ns % NSEC;
    if (rem < 0) { /* floor, as os.utime(ns=...) splits */
        rem += NSEC;
        sec -= 1;
    }
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = (long)rem;
}

/* applier._setattr_fd: size, owner, mode, times, on an open regular file. */
static int setattr_fd(int fd, uint32_t mask, uint32_t mode, uint32_t uid, uint32_t gid,
                      uint64_t size, int64_t atime, int64_t mtime)
{
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    if (mask & SET_SIZE && ftruncate(fd, (off_t)size))
        failed = 1;
    else if (mask & SET_OWNER && fchown(fd, uid, gid))
        failed = 1;
    else if (mask & SET_MODE && fchmod(fd, mode))
        failed = 1;
    else if (mask & (SET_ATIME | SET_MTIME)) {
        struct timespec times[2];
        struct stat st;
        memset(&st, 0, sizeof st);
        if ((mask & (SET_ATIME | SET_MTIME)) != (SET_ATIME | SET_MTIME) && fstat(fd, &st))
            failed = 1;
        else {
            if (mask & SET_ATIME)
                to_timespec(atime, &times[0]);
            else
                times[0] = st.st_atim;
            if (mask & SET_MTIME)
                to_timespec(mtime, &times[1]);
            else
                times[1] = st.st_mtim;
            failed = futimens(fd, times) != 0;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        os_error(NULL);
        return -1;
    }
    return 0;
}

/* A Create of a new file (see the top comment); 1 taken, 0 not taken (nothing done:
 * at most a directory resolved and cached), -1 an exception. */
static int create_file(PyObject *dirs, PyObject *applier, PyObject *path_obj,
                       const unsigned char *path, size_t slash, size_t len, uint32_t perm,
                       uint32_t uid, uint32_t gid, const unsigned char *data, size_t data_len,
                       int64_t mtime)
{
    int parent = dir_fd(dirs, applier, path, slash);
    if (parent < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OSError))
            return -1;
        PyErr_Clear(); /* Python resolves it again and says why */
        return 0;
    }
    PyObject *name = PyBytes_FromStringAndSize((const char *)path + slash + 1,
                                               (Py_ssize_t)(len - slash - 1));
    if (name == NULL)
        return -1;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = openat(parent, PyBytes_AS_STRING(name),
                O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, perm);
    Py_END_ALLOW_THREADS
    Py_DECREF(name);
    if (fd < 0)
        return 0; /* it exists, or cannot be made: Python's way, with its reasons */
    PyObject *held = PyObject_CallMethod(applier, "_hold", "Oi", path_obj, fd);
    if (held == NULL) {
        close(fd);
        return -1;
    }
    Py_DECREF(held);
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = fchown(fd, uid, gid) || fchmod(fd, perm); /* chmod after chown: set-ID bits */
    Py_END_ALLOW_THREADS
    if (failed) {
        os_error(NULL);
        return -1;
    }
    if (write_all(fd, data, data_len, 0))
        return -1;
    /* The expansion's Setattr(SET_SIZE|SET_MTIME), without the syscalls that do nothing
     * here: the file is new (O_EXCL) and now holds exactly data_len bytes from 0, so its
     * size is data_len already (no ftruncate), and its atime is left as it is by
     * UTIME_OMIT (no fstat to read it back first): two of a Create's eight syscalls. */
    struct timespec times[2];
    times[0].tv_sec = 0;
    times[0].tv_nsec = UTIME_OMIT;
    to_timespec(mtime, &times[1]);
    Py_BEGIN_ALLOW_THREADS
    failed = futimens(fd, times) != 0;
    Py_END_ALLOW_THREADS
    if (failed) {
        os_error(NULL);
        return -1;
    }
    return 1;
}

/* Apply the RECORD payload p[0:total] if it is taken (see the top comment): 1 taken and
 * applied, 0 not taken (nothing done), -1 an exception. */
static int apply_record(const unsigned char *p, size_t total, PyObject *dirs, PyObject *files,
                        PyObject *applier, PyObject *uids, PyObject *gids)
{
    int result = 0;
    PyObject *path_obj = NULL;
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    return 0; /* fields are read by memcpy in host order: the wire's is little endian */
#endif
    if (total < RECORD_HEAD)
        goto done;
    uint16_t rtype;
    uint32_t rlen;
    memcpy(&rtype, p, 2);
    memcpy(&rlen, p + 2, 4);
    if ((size_t)rlen > total - RECORD_HEAD)
        goto done;
    struct cursor c = {p + RECORD_HEAD, rlen};
    const unsigned char *data = p + RECORD_HEAD + rlen;
    size_t data_len = total - RECORD_HEAD - rlen;
    const unsigned char *path;
    size_t path_len, slash;
    if (rtype != T_MKNOD && rtype != T_WRITE && rtype != T_SETATTR && rtype != T_CREATE
        && rtype != T_EXTENT)
        goto done;
    if (get_path(&c, &path, &path_len) || !safe_path(path, path_len, &slash))
        goto done;

    if (rtype == T_MKNOD) {
        uint32_t mode, uid, gid;
        if (get_u32(&c, &mode) || get_u32(&c, &uid) || get_u32(&c, &gid) || c.left
            || data_len || (mode & ~07777u) != S_IFREG)
            goto done;
        int ok = owner_ok(uids, gids, uid, gid);
        if (ok < 0)
            goto error;
        if (!ok)
            goto done;
        path_obj = PyBytes_FromStringAndSize((const char *)path, (Py_ssize_t)path_len);
        if (path_obj == NULL)
            goto error;
        int made = mknod_file(dirs, applier, path_obj, path, slash, path_len,
                              mode & 07777 & ~06000u, uid, gid);
        if (made < 0)
            goto error;
        result = made;
    } else if (rtype == T_WRITE || rtype == T_EXTENT) {
        uint32_t handle_len;
        const unsigned char *handle;
        uint64_t offset, length;
        if (get_u32(&c, &handle_len) || handle_len > MAX_HANDLE
            || take(&c, handle_len, &handle) || get_u64(&c, &offset)
            || get_u64(&c, &length))
            goto done;
        if (rtype == T_EXTENT) { /* then size u64 (not used here) and the sums blob */
            uint64_t size;
            uint32_t sums_len;
            const unsigned char *sums;
            if (get_u64(&c, &size) || get_u32(&c, &sums_len) || sums_len % SUM_SIZE
                || sums_len > SUM_SIZE * MAX_SUMS || take(&c, sums_len, &sums)
                || offset % EXTENT_BLOCK)
                goto done;
            (void)size;
            (void)sums; /* the login node's check (records: the Extent rule), not a replica's */
        }
        if (c.left)
            goto done;
        (void)handle; /* the data is applied by path here, as the batch applier does */
        if (offset >= (1ULL << 62) || length >= (1ULL << 62)
            || offset + length >= (1ULL << 62) || data_len > length)
            goto done;
        path_obj = PyBytes_FromStringAndSize((const char *)path, (Py_ssize_t)path_len);
        if (path_obj == NULL)
            goto error;
        PyObject *held = PyDict_GetItemWithError(files, path_obj);
        int fd;
        if (held != NULL) {
            Py_INCREF(held);
            fd = fd_of(held);
        } else if (PyErr_Occurred()) {
            goto error;
        } else {
            PyObject *got = PyObject_CallMethod(applier, "_file", "O", path_obj);
            if (got == NULL)
                goto error;
            if (got == Py_None) { /* no such file: nothing to do, as Python */
                Py_DECREF(got);
                result = 1;
                goto done;
            }
            fd = fd_of(got);
        }
        if (fd < 0 || write_all(fd, data, data_len, offset))
            goto error;
        result = 1;
    } else if (rtype == T_CREATE) {
        uint32_t mode, uid, gid, handle_len, xattrs_len, inline_len;
        uint64_t mtime;
        const unsigned char *handle, *inline_data;
        if (get_u32(&c, &mode) || get_u32(&c, &uid) || get_u32(&c, &gid)
            || get_u64(&c, &mtime) || get_u32(&c, &handle_len) || handle_len > MAX_HANDLE
            || take(&c, handle_len, &handle) || get_u32(&c, &xattrs_len) || xattrs_len
            || get_u32(&c, &inline_len) || inline_len > MAX_INLINE
            || take(&c, inline_len, &inline_data) || c.left || data_len
            || (mode & ~07777u) != S_IFREG)
            goto done;
        (void)handle; /* applied by path, as the batch applier does */
        int ok = owner_ok(uids, gids, uid, gid);
        if (ok < 0)
            goto error;
        if (!ok)
            goto done;
        path_obj = PyBytes_FromStringAndSize((const char *)path, (Py_ssize_t)path_len);
        if (path_obj == NULL)
            goto error;
        int made = create_file(dirs, applier, path_obj, path, slash, path_len,
                               mode & 07777 & ~06000u, uid, gid, inline_data, inline_len,
                               (int64_t)mtime);
        if (made < 0)
            goto error;
        result = made;
    } else { /* T_SETATTR */
        uint32_t mask, mode, uid, gid;
        uint64_t size, atime, mtime;
        if (get_u32(&c, &mask) || get_u32(&c, &mode) || get_u32(&c, &uid)
            || get_u32(&c, &gid) || get_u64(&c, &size) || get_u64(&c, &atime)
            || get_u64(&c, &mtime) || c.left || data_len)
            goto done;
        if (mask & ~(uint32_t)SET_ALL || mode & ~07777u || size > (uint64_t)INT64_MAX)
            goto done;
        if (mask & SET_OWNER) {
            int ok = owner_ok(uids, gids, uid, gid);
            if (ok < 0)
                goto error;
            if (!ok)
                goto done;
        }
        path_obj = PyBytes_FromStringAndSize((const char *)path, (Py_ssize_t)path_len);
        if (path_obj == NULL)
            goto error;
        PyObject *held = PyDict_GetItemWithError(files, path_obj);
        if (held == NULL) {
            if (PyErr_Occurred())
                goto error;
            goto done; /* not held: the Python path (a directory, a file made before) */
        }
        Py_INCREF(held);
        int fd = fd_of(held);
        if (fd < 0 || setattr_fd(fd, mask, mode & ~06000u, uid, gid, size, (int64_t)atime,
                                 (int64_t)mtime))
            goto error;
        result = 1;
    }
done:
    Py_XDECREF(path_obj);
    return result;
error:
    Py_XDECREF(path_obj);
    return -1;
}

static int check_ids(PyObject *uids, PyObject *gids)
{
    if ((uids != Py_None || gids != Py_None) && !(PyTuple_Check(uids) && PyTuple_Check(gids))) {
        PyErr_SetString(PyExc_TypeError, "uids and gids: tuples of ranges, or both None");
        return -1;
    }
    return 0;
}

static PyObject *apply(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    PyObject *dirs, *files, *applier, *uids, *gids;
    if (!PyArg_ParseTuple(args, "y*O!O!OOO", &buf, &PyDict_Type, &dirs, &PyDict_Type, &files,
                          &applier, &uids, &gids))
        return NULL;
    int taken = check_ids(uids, gids) ? -1
        : apply_record(buf.buf, (size_t)buf.len, dirs, files, applier, uids, gids);
    PyBuffer_Release(&buf);
    if (taken < 0)
        return NULL;
    return Py_NewRef(taken ? Py_True : Py_False);
}

/* apply_run: see the top comment. */
static PyObject *apply_run(PyObject *self, PyObject *args)
{
    PyObject *entries, *dirs, *files, *applier, *uids, *gids;
    Py_ssize_t index;
    unsigned long long applied;
    if (!PyArg_ParseTuple(args, "O!nKO!O!OOO", &PyList_Type, &entries, &index, &applied,
                          &PyDict_Type, &dirs, &PyDict_Type, &files, &applier, &uids, &gids))
        return NULL;
    if (check_ids(uids, gids))
        return NULL;
    if (index < 0)
        index = 0;
    PyObject *failed = Py_None;
    for (; index < PyList_GET_SIZE(entries); index++) {
        PyObject *entry = PyList_GET_ITEM(entries, index);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3) {
            PyErr_SetString(PyExc_TypeError, "run entries are (seq, flags, payload)");
            return NULL;
        }
        unsigned long long seq = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(entry, 0));
        if (seq == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
        if (seq <= applied)
            continue; /* held already: passed over, as Replica.accept does */
        Py_buffer buf;
        Py_INCREF(entry); /* held while Python code (applier._dir ...) runs */
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(entry, 2), &buf, PyBUF_SIMPLE)) {
            Py_DECREF(entry);
            return NULL;
        }
        int taken = apply_record(buf.buf, (size_t)buf.len, dirs, files, applier, uids, gids);
        PyBuffer_Release(&buf);
        Py_DECREF(entry);
        if (taken == 1) {
            applied = seq;
            continue;
        }
        if (taken < 0) {
            if (!PyErr_ExceptionMatches(PyExc_OSError))
                return NULL;
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyErr_NormalizeException(&type, &value, &traceback);
            Py_XDECREF(type);
            Py_XDECREF(traceback);
            if (value == NULL)
                return NULL;
            failed = value;
            PyObject *result = Py_BuildValue("nKN", index, applied, failed);
            return result;
        }
        break; /* not taken: Python's */
    }
    return Py_BuildValue("nKO", index, applied, failed);
}

static PyMethodDef methods[] = {
    {"apply", apply, METH_VARARGS,
     "apply(payload, dirs, files, applier, uids, gids) -> bool: a common record applied "
     "in C (True), or not taken (False: nothing done)."},
    {"apply_run", apply_run, METH_VARARGS,
     "apply_run(entries, index, applied, dirs, files, applier, uids, gids) -> (index, "
     "applied, error): a run's records applied in C from entries[index] while taken."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_applyc",
    "A replica's most common records applied in C (see the source's comment).", -1, methods,
};

PyMODINIT_FUNC PyInit__applyc(void)
{
    PyObject *mod = PyModule_Create(&module);
    if (mod != NULL && PyModule_AddIntConstant(mod, "WRITE_PIECE", WRITE_PIECE)) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
