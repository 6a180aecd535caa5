/* ringproto: what a FUSE round trip costs here, over /dev/fuse and over io_uring (issue 16).
 *
 * A bench prototype, not part of sdeefs: a read-only FUSE layer that answers as the guard
 * (sdeefs/fs/guardd/guard.c) answers for a tree with nothing to hide, so that kernel
 * overlayfs stacked on it makes the same requests a login view makes on a first walk:
 *   LOOKUP     a directory: a positive entry (kept by the kernel: entry and attributes for a
 *              day); anything else: ENOENT (not cached: the guard decides at every lookup)
 *   READDIRPLUS  an empty listing (no whiteouts); OPENDIR ENOSYS (the kernel stops asking);
 *   GETXATTR ENOSYS; GETATTR, STATFS, LISTXATTR answered; FORGET counted only.
 * It does the host work the guard's "asking" path does at least (one fstatat per lookup) and
 * no policy: the difference between its two transports is the transport's.
 *
 *   ringproto read|ring LOWER MOUNTPOINT [--pin 0|1] [--entries N] [--defer 0|1] [--shown 1]
 *
 * --shown 1: a different layer, to measure a different design: every host entry is a
 *   positive entry (LOOKUP answers files too) and READDIRPLUS lists every entry with its
 *   attributes, so that the kernel holds a dentry for each name once a directory is listed
 *   and a walker's lstat of a listed name makes no request.  Files' data: OPEN, READ,
 *   READLINK answered from the host file (enough for git status; a real layer would hand
 *   the host file to the kernel: FUSE passthrough).
 *
 * read: one thread, read(2)/writev(2) on /dev/fuse (what libfuse 3.14's loop does).
 * ring: FUSE over io_uring (Linux >= 6.14 with fuse.enable_uring=1): one thread per possible
 *   CPU, each with its own ring holding N entries of its CPU's queue (the kernel hands a
 *   request to the queue of the CPU its caller runs on), pinned to that CPU unless --pin 0;
 *   a commit of a reply and the fetch of the next request are one io_uring_enter(2).
 *   FORGET and INTERRUPT still come through /dev/fuse (the kernel sends only requests through
 *   the ring): a reader thread takes them.
 * The process mounts (as root), forks, and the parent exits 0 once the child serves; the
 * child ends at unmount.  SIGUSR1 prints the request counts to stderr.
 *
 * The kernel's framing is written out here (include/uapi/linux/fuse.h, ABI 7.42 for the
 * ring); the installed header is older.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

/* -- the kernel's framing ------------------------------------------------------------------- */

enum {
    OP_READLINK = 5, OP_OPEN = 14, OP_READ = 15, OP_RELEASE = 18, OP_FLUSH = 25,
    OP_LOOKUP = 1, OP_FORGET = 2, OP_GETATTR = 3, OP_STATFS = 17, OP_RELEASEDIR = 29,
    OP_GETXATTR = 22, OP_LISTXATTR = 23, OP_INIT = 26, OP_OPENDIR = 27, OP_READDIR = 28,
    OP_INTERRUPT = 36, OP_DESTROY = 38, OP_BATCH_FORGET = 42, OP_READDIRPLUS = 44,
};

struct in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};
struct k_attr {
    uint64_t ino, size, blocks, atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};
struct entry_out {
    uint64_t nodeid, generation, entry_valid, attr_valid;
    uint32_t entry_valid_nsec, attr_valid_nsec;
    struct k_attr attr;
};
struct attr_out {
    uint64_t attr_valid;
    uint32_t attr_valid_nsec, dummy;
    struct k_attr attr;
};
struct init_in {
    uint32_t major, minor, max_readahead, flags, flags2, unused[11];
};
struct init_out {
    uint32_t major, minor, max_readahead, flags;
    uint16_t max_background, congestion_threshold;
    uint32_t max_write, time_gran;
    uint16_t max_pages, map_alignment;
    uint32_t flags2, max_stack_depth;
    uint16_t request_timeout;
    uint16_t unused[11];
};
struct kstatfs {
    uint64_t blocks, bfree, bavail, files, ffree;
    uint32_t bsize, namelen, frsize, padding, spare[6];
};
struct getxattr_out {
    uint32_t size, padding;
};

#define F_ASYNC_READ (1u << 0)
#define F_BIG_WRITES (1u << 5)
#define F_DO_READDIRPLUS (1u << 13)
#define F_PARALLEL_DIROPS (1u << 18)
#define F_MAX_PAGES (1u << 22)
#define F_INIT_EXT (1u << 30)
#define F2_OVER_IO_URING (1u << (41 - 32))

/* the ring (ABI 7.42) */
#define URING_IN_OUT_HEADER_SZ 128
#define URING_OP_IN_OUT_SZ 128
struct uring_ent_in_out {
    uint64_t flags, commit_id;
    uint32_t payload_sz, padding;
    uint64_t reserved;
};
struct uring_req_header {
    char in_out[URING_IN_OUT_HEADER_SZ];
    char op_in[URING_OP_IN_OUT_SZ];
    struct uring_ent_in_out ent;
};
struct uring_cmd_req {
    uint64_t flags, commit_id;
    uint16_t qid;
    uint8_t padding[6];
};
#define URING_CMD_REGISTER 1
#define URING_CMD_COMMIT_AND_FETCH 2

/* -- nodes: a host directory each (O_PATH), node id = index + 1 ----------------------------- */

struct listed {
    char *name;
    struct stat st;
};

struct node {
    int fd;            /* O_PATH of a directory; -1: not opened yet (--shown), or a file */
    uint64_t host_ino;
    uint64_t parent;   /* --shown: where to open it from */
    char *name;
    struct stat st;
    struct listed *list; /* --shown: the directory's entries, listed at READDIRPLUS */
    size_t nlist;
    bool listed;
};

static struct {
    pthread_mutex_t lock;
    struct node *nodes;
    size_t count, cap;
    uint64_t *slots; /* open addressing: host ino -> node id, 0 empty */
    size_t nslots;
} table = {.lock = PTHREAD_MUTEX_INITIALIZER};

static uint64_t counts[64], ring_served; /* ring_served: requests through a ring */

static size_t slot_of(uint64_t ino, size_t n)
{
    ino ^= ino >> 33;
    ino *= 0xff51afd7ed558ccdULL;
    ino ^= ino >> 33;
    return (size_t)(ino & (n - 1));
}

static void slots_put(uint64_t id)
{
    size_t i = slot_of(table.nodes[id - 1].host_ino, table.nslots);
    while (table.slots[i])
        i = (i + 1) & (table.nslots - 1);
    table.slots[i] = id;
}

/* the node of a host directory (opened by the caller: ``fd`` is kept or closed) */
static uint64_t node_for(int fd, uint64_t ino)
{
    pthread_mutex_lock(&table.lock);
    for (size_t i = slot_of(ino, table.nslots); table.slots[i]; i = (i + 1) & (table.nslots - 1))
        if (table.nodes[table.slots[i] - 1].host_ino == ino) {
            uint64_t id = table.slots[i];
            pthread_mutex_unlock(&table.lock);
            close(fd);
            return id;
        }
    if (table.count == table.cap) {
        table.cap *= 2;
        table.nodes = realloc(table.nodes, table.cap * sizeof *table.nodes);
    }
    if (2 * (table.count + 1) > table.nslots) {
        free(table.slots);
        table.nslots *= 2;
        table.slots = calloc(table.nslots, sizeof *table.slots);
        for (uint64_t id = 1; id <= table.count; id++)
            slots_put(id);
    }
    table.nodes[table.count] = (struct node){.fd = fd, .host_ino = ino};
    uint64_t id = ++table.count;
    slots_put(id);
    pthread_mutex_unlock(&table.lock);
    return id;
}

/* --shown: the node of a host entry ``name`` of directory node ``parent`` (made if new) */
static uint64_t node_entry_locked(uint64_t parent, const char *name, const struct stat *st)
{
    for (size_t i = slot_of(st->st_ino, table.nslots); table.slots[i];
         i = (i + 1) & (table.nslots - 1))
        if (table.nodes[table.slots[i] - 1].host_ino == st->st_ino) {
            uint64_t id = table.slots[i];
            table.nodes[id - 1].st = *st;
            return id;
        }
    if (table.count == table.cap) {
        table.cap *= 2;
        table.nodes = realloc(table.nodes, table.cap * sizeof *table.nodes);
    }
    if (2 * (table.count + 1) > table.nslots) {
        free(table.slots);
        table.nslots *= 2;
        table.slots = calloc(table.nslots, sizeof *table.slots);
        for (uint64_t id = 1; id <= table.count; id++)
            slots_put(id);
    }
    table.nodes[table.count] = (struct node){.fd = -1, .host_ino = st->st_ino, .parent = parent,
                                             .name = strdup(name), .st = *st};
    uint64_t id = ++table.count;
    slots_put(id);
    return id;
}

static uint64_t node_entry(uint64_t parent, const char *name, const struct stat *st)
{
    pthread_mutex_lock(&table.lock);
    uint64_t id = node_entry_locked(parent, name, st);
    pthread_mutex_unlock(&table.lock);
    return id;
}

static int node_fd_locked(uint64_t id)
{
    if (id < 1 || id > table.count)
        return -1;
    struct node *n = &table.nodes[id - 1];
    if (n->fd < 0 && n->name && S_ISDIR(n->st.st_mode)) {
        int pfd = node_fd_locked(n->parent);
        n = &table.nodes[id - 1];
        if (pfd >= 0)
            n->fd = openat(pfd, n->name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    }
    return n->fd;
}

static int node_fd(uint64_t id)
{
    pthread_mutex_lock(&table.lock);
    int fd = node_fd_locked(id);
    pthread_mutex_unlock(&table.lock);
    return fd;
}

static void to_attr(const struct stat *st, uint64_t ino, struct k_attr *a)
{
    memset(a, 0, sizeof *a);
    a->ino = ino;
    a->size = (uint64_t)st->st_size;
    a->blocks = (uint64_t)st->st_blocks;
    a->atime = (uint64_t)st->st_atim.tv_sec;
    a->mtime = (uint64_t)st->st_mtim.tv_sec;
    a->ctime = (uint64_t)st->st_ctim.tv_sec;
    a->atimensec = (uint32_t)st->st_atim.tv_nsec;
    a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
    a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
    a->mode = st->st_mode;
    a->nlink = (uint32_t)st->st_nlink;
    a->uid = st->st_uid;
    a->gid = st->st_gid;
    a->blksize = 4096;
}


/* -- answers (the same for both transports) -------------------------------------------------- */

#define DAY 86400

static bool use_ring;
static int shown; /* --shown 1: every host entry a positive entry, READDIRPLUS lists them */
#define OUT_SIZE (128 * 1024) /* a reply's body at most (a READ's: max_write) */

static size_t put_entry(char *out, size_t room, uint64_t id, const struct stat *st,
                        const char *name, uint64_t off)
{
    size_t len = strlen(name), need = (sizeof(struct entry_out) + 24 + len + 7) & ~(size_t)7;
    if (need > room)
        return 0;
    memset(out, 0, need);
    struct entry_out *e = (void *)out;
    e->nodeid = id;
    e->entry_valid = e->attr_valid = 86400;
    to_attr(st, st->st_ino, &e->attr);
    char *d = out + sizeof *e;
    uint64_t ino = st->st_ino;
    uint32_t namelen = (uint32_t)len, type = (st->st_mode & S_IFMT) >> 12;
    memcpy(d, &ino, 8);
    memcpy(d + 8, &off, 8);
    memcpy(d + 16, &namelen, 4);
    memcpy(d + 20, &type, 4);
    memcpy(d + 24, name, len);
    return need;
}

/* --shown: READDIRPLUS hands out every host entry, with its attributes */
static int list_shown(const struct in_header *h, const char *arg, char *out, size_t room)
{
    uint64_t off;
    uint32_t size;
    memcpy(&off, arg + 8, 8);
    memcpy(&size, arg + 16, 4);
    if (size < room)
        room = size;
    pthread_mutex_lock(&table.lock);
    int dfd = node_fd_locked(h->nodeid);
    if (dfd < 0) {
        pthread_mutex_unlock(&table.lock);
        return -ESTALE;
    }
    struct node *n = &table.nodes[h->nodeid - 1];
    if (!n->listed || off == 0) {
        for (size_t i = 0; i < n->nlist; i++)
            free(n->list[i].name);
        free(n->list);
        n->list = NULL;
        n->nlist = 0;
        size_t cap = 0;
        int fd = openat(dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
        struct dirent *de;
        while (dir && (de = readdir(dir))) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
                continue;
            struct stat st;
            if (fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
                continue;
            if (n->nlist == cap) {
                cap = cap ? 2 * cap : 16;
                n->list = realloc(n->list, cap * sizeof *n->list);
            }
            n->list[n->nlist++] = (struct listed){strdup(de->d_name), st};
        }
        if (dir)
            closedir(dir);
        n->listed = true;
    }
    size_t used = 0;
    for (size_t i = (size_t)off; i < table.nodes[h->nodeid - 1].nlist; i++) {
        struct listed *l = &table.nodes[h->nodeid - 1].list[i];
        uint64_t id = node_entry_locked(h->nodeid, l->name, &l->st);
        l = &table.nodes[h->nodeid - 1].list[i]; /* the table may have moved */
        size_t put = put_entry(out + used, room - used, id, &l->st, l->name, i + 1);
        if (!put)
            break;
        used += put;
    }
    pthread_mutex_unlock(&table.lock);
    return (int)used;
}

/* op_size: bytes of the opcode's first argument (the ring's op_in; /dev/fuse: the body's start) */
static size_t op_size(uint32_t opcode)
{
    switch (opcode) {
    case OP_GETATTR: return 16;
    case OP_READDIR: case OP_READDIRPLUS: return 40;
    case OP_OPENDIR: return 8;
    case OP_RELEASEDIR: return 24;
    case OP_GETXATTR: case OP_LISTXATTR: return 8;
    case OP_OPEN: return 8;
    case OP_READ: return 40;
    case OP_RELEASE: case OP_FLUSH: return 24;
    case OP_FORGET: case OP_BATCH_FORGET: return 8;
    case OP_INIT: return sizeof(struct init_in);
    default: return 0;
    }
}

/* Answer one request: the reply's body into ``out`` (its size returned), or -errno;
 * *none: no reply at all (FORGET). */
static int answer(const struct in_header *h, const char *arg, const char *rest, char *out,
                  bool *none)
{
    *none = false;
    __atomic_add_fetch(&counts[h->opcode & 63], 1, __ATOMIC_RELAXED);
    switch (h->opcode) {
    case OP_INIT: {
        const struct init_in *in = (const void *)arg;
        struct init_out *o = (void *)out;
        memset(o, 0, sizeof *o);
        o->major = 7;
        o->minor = in->minor < 42 ? in->minor : 42;
        o->max_readahead = in->max_readahead;
        o->flags = (in->flags & (F_DO_READDIRPLUS | F_PARALLEL_DIROPS | F_ASYNC_READ |
                                 F_BIG_WRITES | F_MAX_PAGES)) | F_INIT_EXT;
        o->flags2 = use_ring ? F2_OVER_IO_URING : 0;
        o->max_background = 16;
        o->congestion_threshold = 12;
        o->max_write = 128 * 1024;
        o->time_gran = 1;
        o->max_pages = 32;
        return (int)sizeof *o;
    }
    case OP_LOOKUP: {
        int dfd = node_fd(h->nodeid);
        if (dfd < 0)
            return -ESTALE;
        struct stat st;
        if (fstatat(dfd, rest, &st, AT_SYMLINK_NOFOLLOW) != 0)
            return -ENOENT;
        if (shown) { /* every entry a positive one: kept by the kernel */
            struct entry_out *e = (void *)out;
            memset(e, 0, sizeof *e);
            e->nodeid = node_entry(h->nodeid, rest, &st);
            e->entry_valid = e->attr_valid = DAY;
            to_attr(&st, st.st_ino, &e->attr);
            return (int)sizeof *e;
        }
        if (!S_ISDIR(st.st_mode))
            return -ENOENT; /* a visible non-directory: the lower below shows it */
        int fd = openat(dfd, rest, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            return -ENOENT;
        struct entry_out *e = (void *)out;
        memset(e, 0, sizeof *e);
        e->nodeid = node_for(fd, st.st_ino);
        e->entry_valid = e->attr_valid = DAY;
        to_attr(&st, e->nodeid, &e->attr);
        return (int)sizeof *e;
    }
    case OP_GETATTR: {
        int fd = node_fd(h->nodeid);
        struct stat st;
        if (fd < 0 && shown && h->nodeid <= table.count) { /* a file: as last listed */
            pthread_mutex_lock(&table.lock);
            st = table.nodes[h->nodeid - 1].st;
            pthread_mutex_unlock(&table.lock);
        } else if (fd < 0 || fstat(fd, &st) != 0) {
            return -ESTALE;
        }
        struct attr_out *a = (void *)out;
        memset(a, 0, sizeof *a);
        a->attr_valid = DAY;
        to_attr(&st, h->nodeid, &a->attr);
        return (int)sizeof *a;
    }
    case OP_READDIRPLUS:
        if (shown)
            return list_shown(h, arg, out, OUT_SIZE);
        return 0; /* nothing hidden: no whiteouts */
    case OP_READDIR:
        return 0;
    case OP_OPENDIR: case OP_GETXATTR:
        return -ENOSYS;
    case OP_RELEASEDIR:
        return 0;
    case OP_LISTXATTR: {
        if (((const struct getxattr_out *)arg)->size) /* the list itself: empty */
            return 0;
        struct getxattr_out *x = (void *)out;
        memset(x, 0, sizeof *x);
        return (int)sizeof *x;
    }
    case OP_STATFS: {
        struct kstatfs *s = (void *)out;
        memset(s, 0, 80);
        s->bsize = s->frsize = 4096;
        s->namelen = 255;
        return 80;
    }
    case OP_FORGET: case OP_BATCH_FORGET: case OP_INTERRUPT:
        *none = true;
        return 0;
    case OP_OPEN: case OP_READLINK: { /* --shown: a file's data, from the host */
        pthread_mutex_lock(&table.lock);
        int pfd = -1;
        char *name = NULL;
        if (h->nodeid >= 1 && h->nodeid <= table.count && table.nodes[h->nodeid - 1].name) {
            pfd = node_fd_locked(table.nodes[h->nodeid - 1].parent);
            name = strdup(table.nodes[h->nodeid - 1].name);
        }
        pthread_mutex_unlock(&table.lock);
        if (pfd < 0 || !name) {
            free(name);
            return -ESTALE;
        }
        int r;
        if (h->opcode == OP_READLINK) {
            ssize_t n = readlinkat(pfd, name, out, OUT_SIZE);
            r = n < 0 ? -errno : (int)n;
        } else {
            int fd = openat(pfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
            if (fd < 0) {
                r = -errno;
            } else {
                uint64_t fh = (uint64_t)fd;
                memset(out, 0, 16);
                memcpy(out, &fh, 8);
                r = 16;
            }
        }
        free(name);
        return r;
    }
    case OP_READ: {
        uint64_t fh, off;
        uint32_t size;
        memcpy(&fh, arg, 8);
        memcpy(&off, arg + 8, 8);
        memcpy(&size, arg + 16, 4);
        ssize_t n = pread((int)fh, out, size < OUT_SIZE ? size : OUT_SIZE, (off_t)off);
        return n < 0 ? -errno : (int)n;
    }
    case OP_RELEASE: {
        uint64_t fh;
        memcpy(&fh, arg, 8);
        close((int)fh);
        return 0;
    }
    case OP_FLUSH:
        return 0;
    case OP_DESTROY:
        return 0;
    default:
        return -ENOSYS;
    }
}

/* -- /dev/fuse -------------------------------------------------------------------------------- */

static int fuse_fd;
#define BUFSIZE (1 << 20) /* >= the kernel's minimum read buffer */

static void *read_loop(void *arg)
{
    (void)arg;
    char *buf = malloc(BUFSIZE), *out = malloc(OUT_SIZE);
    for (;;) {
        ssize_t n = read(fuse_fd, buf, BUFSIZE);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue;
            if (errno == ENODEV) /* unmounted */
                exit(0);
            perror("ringproto: read /dev/fuse");
            exit(1);
        }
        const struct in_header *h = (const void *)buf;
        const char *body = buf + sizeof *h;
        bool none;
        int r = answer(h, body, body + op_size(h->opcode), out, &none);
        if (none)
            continue;
        struct out_header o = {.len = sizeof o + (uint32_t)(r > 0 ? r : 0),
                               .error = r < 0 ? r : 0, .unique = h->unique};
        struct iovec iov[2] = {{&o, sizeof o}, {out, r > 0 ? (size_t)r : 0}};
        if (writev(fuse_fd, iov, r > 0 ? 2 : 1) < 0 && errno != ENOENT)
            perror("ringproto: write /dev/fuse");
        if (h->opcode == OP_DESTROY)
            exit(0);
    }
    return NULL;
}

/* -- io_uring ---------------------------------------------------------------------------------- */

static int pin = 1, entries = 2, defer = 1, ncpus;
static size_t payload_size;

struct ring {
    int fd, qid;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes; /* 128 bytes each (SQE128) */
    struct io_uring_cqe *cqes;
    unsigned to_submit;
    struct uring_req_header *headers;
    char **payloads;
    struct iovec *iovs; /* 2 per entry */
};

static int ring_setup(struct ring *r, unsigned depth)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SQE128 | (defer ? IORING_SETUP_SINGLE_ISSUER |
                                     IORING_SETUP_DEFER_TASKRUN : 0);
    r->fd = (int)syscall(__NR_io_uring_setup, depth, &p);
    if (r->fd < 0)
        return -1;
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    size_t len = sq_len > cq_len ? sq_len : cq_len;
    char *sq = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    IORING_OFF_SQ_RING);
    if (sq == MAP_FAILED)
        return -1;
    char *cq = (p.features & IORING_FEAT_SINGLE_MMAP) ? sq
               : mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                      IORING_OFF_CQ_RING);
    if (cq == MAP_FAILED)
        return -1;
    r->sqes = mmap(NULL, p.sq_entries * 128, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED)
        return -1;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;
}

/* queue a FUSE ring command for entry ``i`` */
static void ring_cmd(struct ring *r, int i, uint32_t op, uint64_t commit_id)
{
    unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = (struct io_uring_sqe *)((char *)r->sqes + (size_t)idx * 128);
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_fd;
    sqe->cmd_op = op;
    sqe->addr = (uint64_t)(uintptr_t)&r->iovs[2 * i];
    sqe->len = 2;
    sqe->user_data = (uint64_t)i;
    struct uring_cmd_req *req = (struct uring_cmd_req *)sqe->cmd;
    req->commit_id = commit_id;
    req->qid = (uint16_t)r->qid;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->to_submit++;
}

static void *ring_loop(void *arg)
{
    struct ring *r = arg;
    if (pin) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(r->qid, &set);
        sched_setaffinity(0, sizeof set, &set);
    }
    if (ring_setup(r, (unsigned)(2 * entries)) != 0) {
        perror("ringproto: io_uring_setup");
        exit(1);
    }
    r->headers = aligned_alloc(4096, ((sizeof *r->headers * (size_t)entries) + 4095) & ~4095UL);
    r->payloads = calloc((size_t)entries, sizeof *r->payloads);
    r->iovs = calloc(2 * (size_t)entries, sizeof *r->iovs);
    for (int i = 0; i < entries; i++) {
        r->payloads[i] = aligned_alloc(4096, payload_size);
        r->iovs[2 * i] = (struct iovec){&r->headers[i], sizeof r->headers[i]};
        r->iovs[2 * i + 1] = (struct iovec){r->payloads[i], payload_size};
        ring_cmd(r, i, URING_CMD_REGISTER, 0);
    }
    char *out = malloc(OUT_SIZE);
    for (;;) {
        int got = (int)syscall(__NR_io_uring_enter, r->fd, r->to_submit, 1,
                               IORING_ENTER_GETEVENTS, NULL, 0);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            perror("ringproto: io_uring_enter");
            exit(1);
        }
        r->to_submit -= (unsigned)got < r->to_submit ? (unsigned)got : r->to_submit;
        unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            int i = (int)cqe->user_data;
            if (cqe->res < 0) {
                if (cqe->res == -ENOTCONN || cqe->res == -ECONNABORTED)
                    exit(0); /* unmounted */
                fprintf(stderr, "ringproto: ring command: %s\n", strerror(-cqe->res));
                exit(1);
            }
            __atomic_add_fetch(&ring_served, 1, __ATOMIC_RELAXED);
            struct uring_req_header *hd = &r->headers[i];
            const struct in_header *h = (const void *)hd->in_out;
            struct in_header copy = *h;
            bool none;
            int res = answer(&copy, hd->op_in, r->payloads[i], out, &none);
            struct out_header *o = (void *)hd->in_out;
            size_t size = res > 0 ? (size_t)res : 0;
            memcpy(r->payloads[i], out, size);
            o->len = (uint32_t)(sizeof *o + size);
            o->error = res < 0 ? res : 0;
            o->unique = copy.unique;
            hd->ent.payload_sz = (uint32_t)size;
            ring_cmd(r, i, URING_CMD_COMMIT_AND_FETCH, copy.unique);
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    }
    return NULL;
}

static int possible_cpus(void)
{
    FILE *f = fopen("/sys/devices/system/cpu/possible", "r");
    int lo = 0, hi = 0;
    if (!f || fscanf(f, "%d-%d", &lo, &hi) < 1)
        hi = lo = 0;
    if (f)
        fclose(f);
    return (hi > lo ? hi : lo) + 1;
}

static void on_usr1(int sig)
{
    (void)sig;
    char line[256];
    int n = snprintf(line, sizeof line, "ringproto: lookup %lu getattr %lu readdirplus %lu "
                     "forget %lu batch_forget %lu statfs %lu; through a ring %lu\n", counts[OP_LOOKUP],
                     counts[OP_GETATTR], counts[OP_READDIRPLUS], counts[OP_FORGET],
                     counts[OP_BATCH_FORGET], counts[OP_STATFS], ring_served);
    if (write(2, line, (size_t)n) < 0)
        return;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: ringproto read|ring LOWER MOUNTPOINT [--pin 0|1] "
                "[--entries N] [--defer 0|1]\n");
        return 2;
    }
    use_ring = !strcmp(argv[1], "ring");
    for (int i = 4; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--pin"))
            pin = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--entries"))
            entries = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--defer"))
            defer = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--shown"))
            shown = atoi(argv[i + 1]);
    }
    int lower = open(argv[2], O_PATH | O_DIRECTORY | O_CLOEXEC);
    struct stat st;
    if (lower < 0 || fstat(lower, &st) != 0) {
        perror("ringproto: lower");
        return 1;
    }
    table.cap = 1024;
    table.nodes = malloc(table.cap * sizeof *table.nodes);
    table.nslots = 4096;
    table.slots = calloc(table.nslots, sizeof *table.slots);
    node_for(lower, 1); /* the root: node 1; keyed by a number no directory has */
    table.nodes[0].host_ino = 1;
    table.nodes[0].st = st;
    fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fuse_fd < 0) {
        perror("ringproto: /dev/fuse");
        return 1;
    }
    char opts[256];
    snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,"
             "default_permissions,allow_other", fuse_fd);
    if (mount("ringproto", argv[3], "fuse.ringproto", MS_RDONLY | MS_NOSUID | MS_NODEV |
              MS_NOEXEC, opts) != 0) {
        perror("ringproto: mount");
        return 1;
    }
    int ready[2];
    if (pipe(ready) != 0)
        return 1;
    pid_t pid = fork();
    if (pid > 0) { /* the parent: wait until the child serves */
        close(ready[1]);
        char c;
        return read(ready[0], &c, 1) == 1 && c == 'k' ? 0 : 1;
    }
    close(ready[0]);
    setsid();
    signal(SIGUSR1, on_usr1);
    /* INIT over /dev/fuse (always): its reply says whether the ring is wanted */
    char *buf = malloc(BUFSIZE), *out = malloc(OUT_SIZE);
    ssize_t n = read(fuse_fd, buf, BUFSIZE);
    const struct in_header *h = (const void *)buf;
    if (n < (ssize_t)sizeof *h || h->opcode != OP_INIT) {
        fprintf(stderr, "ringproto: no INIT\n");
        return 1;
    }
    const struct init_in *in = (const void *)(buf + sizeof *h);
    if (use_ring && (in->flags & F_INIT_EXT) == 0) {
        fprintf(stderr, "ringproto: the kernel offers no extended INIT\n");
        return 1;
    }
    bool none;
    int r = answer(h, (const char *)in, NULL, out, &none);
    struct out_header o = {.len = sizeof o + (uint32_t)r, .error = 0, .unique = h->unique};
    struct iovec iov[2] = {{&o, sizeof o}, {out, (size_t)r}};
    if (writev(fuse_fd, iov, 2) < 0) {
        perror("ringproto: INIT reply");
        return 1;
    }
    payload_size = 128 * 1024 + 4096; /* max(FUSE_MIN_READ_BUFFER, max_write, max_pages) */
    if (use_ring) {
        ncpus = possible_cpus();
        for (int q = 0; q < ncpus; q++) {
            struct ring *ring = calloc(1, sizeof *ring);
            ring->qid = q;
            pthread_t t;
            if (pthread_create(&t, NULL, ring_loop, ring) != 0)
                return 1;
        }
    }
    if (write(ready[1], "k", 1) != 1)
        return 1;
    close(ready[1]);
    read_loop(NULL); /* FORGET and INTERRUPT when the ring serves; everything otherwise */
    return 0;
}
