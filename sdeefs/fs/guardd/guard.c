/* sdeefs-guard: the guard layer of a login view (sdeefs/fs/guard.py) on libfuse3's low-level API.
 *
 * The reference model is sdeefs/fs/guard.py (its docstring says what the guard answers and
 * why); this daemon applies the same rules, with the parameters the Python side computes
 * (sdeefs.fs.guard.guard_argv: the user's ids and the deny globs) and is checked against it
 * by tests/fs/test_guard_c.py over the same trees.  What it adds is speed: no Python per
 * request, and the kernel's caches used wherever a change on the host reaches us:
 *
 *   - every directory handed to the kernel is watched (inotify); a change of an entry in it
 *     (created, deleted, moved, chmod/chown) invalidates the kernel's dentry of that name and
 *     the directory's cached listing and attributes (fuse_lowlevel_notify_inval_*), so the
 *     kernel may keep directories and whiteouts for long;
 *   - a name the host does not have is answered ENOENT, not cached: every lookup of it
 *     decides afresh ("a late root-only file is hidden at its first lookup"; overlayfs keeps
 *     its own dentries, positive and negative, so a cached one here saved nothing);
 *   - a visible non-directory (the lower below shows it) is answered ENOENT too, not cached
 *     (but for looking ahead, below); once the kernel listed a directory (READDIRPLUS), or
 *     after LIST_AFTER lookups in it, its visible non-directories are answered from that
 *     listing without a syscall (before: openat2, fstat, fstatat, close each), until a change
 *     in it drops the listing (inotify; the answer goes out under the lock the watcher takes
 *     to drop it).  So a listed file the host tightens is hidden once the watcher reads the
 *     change (the bound every cached answer has); a new name is never in a listing: asked;
 *   - OPENDIR is answered ENOSYS: the kernel opens directories without asking and caches
 *     their listings (the whiteouts) in its page cache until we invalidate them;
 *   - READDIRPLUS hands the whiteouts out with their attributes (no LOOKUP each);
 *   - GETXATTR is answered ENOSYS, once: the kernel then answers every later one EOPNOTSUPP
 *     itself.  overlayfs asks two per directory it looks up (opaque? redirect?) and takes
 *     EOPNOTSUPP as "no".  LISTXATTR answers an empty list, so that tools that copy extended
 *     attributes (cp -a, rsync -X, tar) find none and ask no further, as before; asking for
 *     one by name gives EOPNOTSUPP where the Python guard said ENODATA.
 *
 * A directory that cannot be watched (inotify limits) gets the short timeout (--timeout) and
 * no cached negative entries: the Python guard's behaviour.  A lost event (queue overflow)
 * falls back to the short timeout for everything handed out later and drops every cached
 * listing and attribute the kernel holds.
 *
 * Usage (sdeefs/fs/mount.py runs it in the detached daemon process it forked):
 *   sdeefs-guard --lower-fd N --ready-fd N --mountpoint DIR [--timeout S] [--pid-file F]
 *                --uid U --gid G [--groups G1,G2..] --subuid S --subgid T --count N
 *                --system M [--deny GLOB]...
 * The lower fd is a detached clone of the lower's mount (open_tree), resolved beneath with
 * openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_XDEV).  It
 * reports "ok" or "<exit code> <reason>" on the ready fd (sdeefs.fs.daemon.report), errors
 * as one line.  The process started is the keeper (its pid in the pid file); it forks the
 * server, and a new one if the server dies ("surviving a crash" below).
 * SDEEFS_GUARD_KEEPER=0: one process, which mounts and serves (its death ends the view).
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/openat2.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/vfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Node ids, as guard.py: a visible directory keeps its host inode number; whiteouts and
 * numbers the host cannot lend come from these ranges. */
#define ROOT_INO 1ULL
#define GUARD_ID_BASE (1ULL << 48)
#define WHITEOUT_BASE (1ULL << 49)
#define STALE_WHITEOUT (WHITEOUT_BASE - 1)
#define LIST_AFTER 8        /* lookups in an unlisted watched directory before it is listed */
#define LISTING_TTL 60.0   /* unwatched directories: a listing reused while mtime is the same */
#define LONG_TIMEOUT 86400.0 /* watched: the kernel keeps it until we invalidate it */
#define PATH_CHUNK 4000
#define WATCH_MASK (IN_ATTRIB | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | \
                    IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)

/* -- the policy (sdeefs.identity.Identity, sdeefs.fs.guard.DenyPatterns) ------------------- */

struct pattern {
    size_t n;
    char **parts;
};

struct policy {
    uid_t uid;
    gid_t gid;
    gid_t *groups;
    size_t ngroups;
    uint64_t subuid, subgid, count, system;
    struct pattern *deny;
    size_t ndeny;
};

static bool in_groups(const struct policy *p, gid_t gid)
{
    for (size_t i = 0; i < p->ngroups; i++)
        if (p->groups[i] == gid)
            return true;
    return false;
}

/* Identity.host_readable */
static bool host_readable(const struct policy *p, const struct stat *st)
{
    mode_t mode = st->st_mode, bits;
    if (S_ISLNK(mode))
        return true;
    mode_t need = S_ISDIR(mode) ? 05 : 04;
    if (st->st_uid == p->uid || (st->st_uid >= p->subuid && st->st_uid - p->subuid < p->count))
        bits = mode >> 6; /* Identity.owns_uid: U's subordinate uids are U's */
    else if (st->st_gid == p->gid || in_groups(p, st->st_gid) ||
             (st->st_gid >= p->subgid && st->st_gid - p->subgid < p->count))
        bits = mode >> 3;
    else
        bits = mode;
    return (bits & need) == need;
}

/* Identity.shown_uid / shown_gid */
static uint64_t shown_uid(const struct policy *p, uint64_t uid)
{
    uint64_t limit = p->system < p->count ? p->system : p->count;
    return uid < limit && uid != p->uid ? p->subuid + uid : uid;
}

static uint64_t shown_gid(const struct policy *p, uint64_t gid)
{
    if (gid == p->gid || in_groups(p, (gid_t)gid))
        return gid;
    uint64_t limit = p->system < p->count ? p->system : p->count;
    return gid < limit ? p->subgid + gid : gid;
}

/* Python's fnmatch.fnmatchcase for one component: * ? [seq] [!seq]; no escapes (a backslash
 * is itself); an unclosed [ is itself; in a set, a leading ] is itself, a-z a range. */
static bool match_set(const char *pat, char c, const char **end)
{
    const char *q = pat + 1;
    bool negate = false, found = false;
    if (*q == '!') {
        negate = true;
        q++;
    }
    const char *start = q;
    if (*q == ']')
        q++;
    while (*q && *q != ']')
        q++;
    if (*q != ']')
        return false; /* unclosed: caller treats [ literally */
    for (const char *s = start; s < q; s++) {
        if (s + 2 < q && s[1] == '-') {
            if ((unsigned char)s[0] <= (unsigned char)c && (unsigned char)c <= (unsigned char)s[2])
                found = true;
            s += 2;
        } else if (*s == c) {
            found = true;
        }
    }
    *end = q + 1;
    return found != negate;
}

static bool set_closed(const char *pat)
{
    const char *q = pat + 1;
    if (*q == '!')
        q++;
    if (*q == ']')
        q++;
    while (*q && *q != ']')
        q++;
    return *q == ']';
}

static bool fnmatch_py(const char *pat, const char *name)
{
    while (*pat) {
        if (*pat == '*') {
            while (*pat == '*')
                pat++;
            if (!*pat)
                return true;
            for (const char *n = name; ; n++) {
                if (fnmatch_py(pat, n))
                    return true;
                if (!*n)
                    return false;
            }
        }
        if (!*name)
            return false;
        if (*pat == '?') {
            pat++;
            name++;
        } else if (*pat == '[' && set_closed(pat)) {
            const char *end;
            if (!match_set(pat, *name, &end))
                return false;
            pat = end;
            name++;
        } else {
            if (*pat != *name)
                return false;
            pat++;
            name++;
        }
    }
    return !*name;
}

static bool component_matches(const char *name, const char *pattern)
{
    if (!strpbrk(pattern, "*?["))
        return strcmp(name, pattern) == 0;
    if (name[0] == '.' && pattern[0] != '.')
        return false;
    return fnmatch_py(pattern, name);
}

/* DenyPatterns.matches: rel is lower-relative, no leading slash (any length) */
static bool deny_matches(const struct policy *p, const char *rel)
{
    if (p->ndeny == 0)
        return false;
    size_t nparts = 1;
    for (const char *c = rel; *c; c++)
        nparts += *c == '/';
    for (size_t i = 0; i < p->ndeny; i++) {
        const struct pattern *pat = &p->deny[i];
        if (pat->n != nparts)
            continue;
        const char *part = rel;
        bool all = true;
        for (size_t k = 0; k < nparts && all; k++) {
            const char *end = strchrnul(part, '/');
            char name[NAME_MAX + 1];
            size_t len = (size_t)(end - part);
            if (len > NAME_MAX) /* not a name the host can have: never matched by a glob */
                len = NAME_MAX;
            memcpy(name, part, len);
            name[len] = 0;
            all = component_matches(name, pat->parts[k]);
            part = *end ? end + 1 : end;
        }
        if (all)
            return true;
    }
    return false;
}

static bool hides(const struct policy *p, const char *rel, const struct stat *st)
{
    return !host_readable(p, st) || deny_matches(p, rel);
}

/* -- surviving a crash: the keeper and the node table's log --------------------------------
 *
 * The process the launcher starts is the keeper: it opens /dev/fuse, mounts, and forks the
 * server, which serves the mount with that descriptor.  The keeper does nothing else (it
 * waits for the server), so it has nothing to crash on.  If the server dies of anything but
 * the end of its mount (kill -9, a signal, a crash), the keeper forks a new one on the same
 * descriptor: the kernel's connection never closed, so the view never saw the death; its
 * requests waited in the connection's queue.  The new server
 *
 *   - takes up the session without a new INIT from the kernel (which sends only one): it
 *     feeds libfuse the INIT the first server read (kept below), and swallows the reply,
 *     so it negotiates what the kernel already agreed to (fuse_session_custom_io);
 *   - resolves every node id the kernel still holds: the servers log every change of the
 *     node table (node made, moved, lookup count) into a memfd the keeper holds, before the
 *     reply that hands the node out; the new server replays it.  A crash between the log
 *     and the reply leaves a count one too high: the node is never forgotten, nothing worse;
 *   - asks the kernel to send again the requests the dead server had read but not answered
 *     (FUSE_NOTIFY_RESEND, Linux >= 6.9);
 *   - watches every directory again and drops every answer the kernel holds (entries,
 *     attributes, listings): what the host changed while nobody watched is decided afresh.
 *
 * Fail closed: a log that cannot be trusted (overflowed, unreadable), a first server that
 * dies before it serves (nothing to take over), or more than KEEP_BURST restarts within
 * KEEP_WINDOW seconds (a request that kills every server it is sent to again: the kernel
 * resends it each time) end the keeper: its descriptor closes with
 * the server's, the kernel aborts the connection, and the view fails with ENOTCONN until the
 * next login remounts it - as without a keeper.  A node id the log does not know is ESTALE.
 * kill -9 of the keeper: the server goes on serving (it holds the descriptor too) and names
 * itself in the pid file (the environment's stop ends it); a later death of the server then
 * closes the last descriptor: fail closed as above.  (A new keeper cannot be attached: the
 * descriptor would have to be handed over, and the server's own death is the case to cover.)
 *
 * The log (one memfd: a header page, two regions; memory stores, no syscall per record):
 * records of 8-aligned length, "len" stored last (release), so that a record cut short by a
 * kill is not there.  When the log grows past KEEP_SLACK + 4 x (nodes x 256), the live table
 * is written into the other region, then "active" flips to it: a crash at any point leaves
 * one complete log. */

#define KEEP_MAGIC 0x316570656b647373ULL /* "ssdkepe1" */
#define KEEP_PAGE 4096UL
#define KEEP_REGION (256UL << 20) /* sparse: pages are used only as the log fills them */
#define KEEP_SLACK (4UL << 20)
#define KEEP_BURST 5
#define KEEP_WINDOW 30.0
#define KEEP_INIT_MAX 256
#define REC_NODE 1
#define REC_COUNT 2
/* the synthetic INIT's id: no request's (the kernel's are even and never 0; an interrupt's is
 * its request's + 1), and its reply is the first the new server sends */
#define SYNTH_UNIQUE 1ULL

/* the kernel's framing (include/uapi/linux/fuse.h; the installed header may predate 7.40) */
struct k_in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
struct k_out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};
#define K_FUSE_INIT 26
#define K_NOTIFY_RESEND 7
#define K_UNIQUE_RESEND (1ULL << 63) /* the kernel marks a request it sends again */

struct keep_header {
    uint64_t magic;
    uint32_t trusted;  /* 0: the log is incomplete: no restart (fail closed) */
    uint32_t active;   /* the region holding the log */
    uint32_t serving;  /* a server serves (it reached its loop): worth restarting */
    uint32_t init_len; /* the INIT body the first server read */
    uint64_t restarts;
    uint8_t init[KEEP_INIT_MAX];
};

struct rec_node {
    uint32_t len, type;
    uint64_t ino, host_ino, lookups;
    uint32_t whiteout, rel_len;
    struct stat st;
    char rel[];
};

struct rec_count {
    uint32_t len, type;
    uint64_t ino, lookups;
};

struct keep {
    int fd;                  /* the memfd (-1: no keeper, nothing logged) */
    struct keep_header *hdr;
    char *regions;           /* both regions, mapped */
    size_t used;             /* bytes of the active region written */
    size_t slack;            /* compact past this many bytes ($SDEEFS_GUARD_LOG_SLACK, tests) */
    bool resume;             /* this server takes over a dead one's session */
    bool resend;             /* ... and has yet to ask for the requests it left */
    bool swallow;            /* the synthetic INIT's reply is not the kernel's */
};

/* -- nodes (guard.py GuardNode, NodeTable) ------------------------------------------------- */

struct hidden {
    char *name;
    struct stat st;
};

struct node {
    uint64_t ino;
    char *rel;          /* below the lower root ("" = the root) */
    uint64_t host_ino;  /* UINT64_MAX: the shared stale whiteout */
    bool whiteout;
    struct stat st;     /* the host entry when last seen (whiteouts: their own) */
    uint64_t lookups;
    int wd;             /* inotify watch of a directory, -1 if none */
    bool recheck;       /* after a takeover: its entry may no longer be a visible directory */
    /* listing cache: hidden entries */
    bool listed;
    struct timespec list_mtime;
    double list_expiry;
    struct hidden *list;
    size_t nlist;
    /* ... and the names of its visible non-directories (watched directories only), sorted:
     * a lookup of one is answered from here ("nothing here") while the listing stands */
    char **shown;
    size_t nshown;
    unsigned asked;     /* lookups in it since its listing went: at LIST_AFTER, list it */
    bool ahead;         /* its names are (being) looked up ahead, see "looking ahead" */
    struct node *next_ino, *next_key, *next_wd;
};

struct table {
    struct node **by_ino, **by_key, **by_wd; /* key: (whiteout, host ino); inotify watch */
    size_t size, count;
};

/* Requests answered, by kind ($SDEEFS_GUARD_COUNTS=FILE: a file of COUNT_KINDS native
 * uint64 counters, shared by the keeper's servers; tests/fs/test_guard_c.py reads it with
 * struct "<12Q" to pin how many requests a walk costs; benches print it) */
enum count_kind {
    COUNT_LOOKUP, COUNT_GETATTR, COUNT_READDIR, COUNT_READDIRPLUS, COUNT_OPENDIR,
    COUNT_RELEASEDIR, COUNT_GETXATTR, COUNT_LISTXATTR, COUNT_STATFS, COUNT_FORGET,
    COUNT_NEGATIVE /* LOOKUPs answered "nothing here" */,
    COUNT_LISTED /* ... of them from the directory's listing, without asking the host */,
    COUNT_KINDS
};

struct guard {
    int lower_fd;
    uint64_t *counts;           /* $SDEEFS_GUARD_COUNTS mapped, or NULL */
    struct prefetch *prefetch;  /* see "looking ahead", NULL: off */
    const char *mountpoint;
    struct policy policy;
    double timeout;
    struct table t;
    uint64_t fresh;
    pthread_mutex_t lock;
    int inotify_fd;
    bool lost_events;           /* an inotify overflow happened: no long timeouts any more */
    struct fuse_session *se;
    bool stateless_dirs;
    bool no_shown;              /* $SDEEFS_GUARD_LISTED_LOOKUPS=0: every lookup asks the host */
    struct keep keep;           /* the node table's log, for a restarted server */
    const char *pid_file;       /* the keeper's; a server whose keeper died writes its own */
};

static void tally(struct guard *g, enum count_kind kind)
{
    if (g->counts)
        __atomic_add_fetch(&g->counts[kind], 1, __ATOMIC_RELAXED);
}

static size_t hash64(uint64_t v, size_t size)
{
    v ^= v >> 33;
    v *= 0xff51afd7ed558ccdULL;
    v ^= v >> 33;
    return (size_t)(v & (size - 1));
}

static uint64_t key_of(bool whiteout, uint64_t host_ino)
{
    return host_ino * 2 + (whiteout ? 1 : 0);
}

static uint64_t node_key(const struct node *n)
{
    return key_of(n->whiteout, n->host_ino);
}

static struct node *by_ino(struct guard *g, uint64_t ino)
{
    for (struct node *n = g->t.by_ino[hash64(ino, g->t.size)]; n; n = n->next_ino)
        if (n->ino == ino)
            return n;
    return NULL;
}

static struct node *by_key(struct guard *g, bool whiteout, uint64_t host_ino)
{
    uint64_t key = key_of(whiteout, host_ino);
    for (struct node *n = g->t.by_key[hash64(key, g->t.size)]; n; n = n->next_key)
        if (node_key(n) == key)
            return n;
    return NULL;
}

static void table_insert(struct table *t, struct node *n)
{
    size_t i = hash64(n->ino, t->size), k = hash64(node_key(n), t->size);
    n->next_ino = t->by_ino[i];
    t->by_ino[i] = n;
    n->next_key = t->by_key[k];
    t->by_key[k] = n;
    t->count++;
}

static void table_init(struct table *t, size_t size)
{
    t->size = size;
    t->count = 0;
    t->by_ino = calloc(size, sizeof *t->by_ino);
    t->by_key = calloc(size, sizeof *t->by_key);
    t->by_wd = calloc(size, sizeof *t->by_wd);
    if (!t->by_ino || !t->by_key || !t->by_wd) {
        fprintf(stderr, "sdeefs-guard: out of memory\n");
        exit(1);
    }
}

static void wd_insert(struct table *t, struct node *n)
{
    size_t i = hash64((uint64_t)n->wd, t->size);
    n->next_wd = t->by_wd[i];
    t->by_wd[i] = n;
}

static void wd_remove(struct table *t, struct node *n)
{
    struct node **p = &t->by_wd[hash64((uint64_t)n->wd, t->size)];
    while (*p && *p != n)
        p = &(*p)->next_wd;
    if (*p)
        *p = n->next_wd;
    n->wd = -1;
}

static void table_grow(struct table *t)
{
    struct table bigger;
    table_init(&bigger, t->size * 2);
    for (size_t i = 0; i < t->size; i++)
        for (struct node *n = t->by_ino[i], *next; n; n = next) {
            next = n->next_ino;
            table_insert(&bigger, n);
            if (n->wd >= 0)
                wd_insert(&bigger, n);
        }
    free(t->by_ino);
    free(t->by_key);
    free(t->by_wd);
    *t = bigger;
}

static void add_node(struct guard *g, struct node *n)
{
    if (g->t.count >= g->t.size)
        table_grow(&g->t);
    table_insert(&g->t, n);
}

static void unlink_node(struct guard *g, struct node *n)
{
    struct node **p = &g->t.by_ino[hash64(n->ino, g->t.size)];
    while (*p && *p != n)
        p = &(*p)->next_ino;
    if (*p)
        *p = n->next_ino;
    p = &g->t.by_key[hash64(node_key(n), g->t.size)];
    while (*p && *p != n)
        p = &(*p)->next_key;
    if (*p)
        *p = n->next_key;
    if (n->wd >= 0) {
        inotify_rm_watch(g->inotify_fd, n->wd);
        wd_remove(&g->t, n);
    }
    g->t.count--;
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool is_shown(const struct node *n, const char *name)
{
    return n->nshown && bsearch(&name, n->shown, n->nshown, sizeof *n->shown, cmp_name);
}

static void drop_shown(struct node *n)
{
    for (size_t i = 0; i < n->nshown; i++)
        free(n->shown[i]);
    free(n->shown);
    n->shown = NULL;
    n->nshown = 0;
}

static void drop_listing(struct node *n)
{
    for (size_t i = 0; i < n->nlist; i++)
        free(n->list[i].name);
    free(n->list);
    n->list = NULL;
    n->nlist = 0;
    drop_shown(n);
    n->listed = false;
    n->ahead = false;
}

static void free_node(struct node *n)
{
    drop_listing(n);
    free(n->rel);
    free(n);
}

static struct node *new_node(uint64_t ino, const char *rel, uint64_t host_ino, bool whiteout,
                             const struct stat *st)
{
    struct node *n = calloc(1, sizeof *n);
    if (!n || !(n->rel = strdup(rel))) {
        free(n);
        return NULL;
    }
    n->ino = ino;
    n->host_ino = host_ino;
    n->whiteout = whiteout;
    n->st = *st;
    n->wd = -1;
    return n;
}

/* -- the node table's log (see "surviving a crash") ------------------------------------------ */

static char *keep_region(const struct keep *k, uint32_t which)
{
    return k->regions + (size_t)which * KEEP_REGION;
}

static bool keep_on(const struct keep *k)
{
    return k->fd >= 0 && __atomic_load_n(&k->hdr->trusted, __ATOMIC_ACQUIRE);
}

/* append a record to a region with ``*used`` bytes written; its length goes in last: a
 * record cut short by a kill is not in the log.  false: the region is full */
static bool put_node(char *region, size_t *used, const struct node *n)
{
    size_t rel_len = strlen(n->rel);
    size_t size = (sizeof(struct rec_node) + rel_len + 1 + 7) & ~(size_t)7;
    if (*used + size + sizeof(uint64_t) > KEEP_REGION || rel_len > UINT32_MAX / 2)
        return false;
    struct rec_node *r = (struct rec_node *)(region + *used);
    r->type = REC_NODE;
    r->ino = n->ino;
    r->host_ino = n->host_ino;
    r->lookups = n->lookups;
    r->whiteout = n->whiteout;
    r->rel_len = (uint32_t)rel_len;
    r->st = n->st;
    memcpy(r->rel, n->rel, rel_len + 1);
    __atomic_store_n(&r->len, (uint32_t)size, __ATOMIC_RELEASE);
    *used += size;
    return true;
}

static bool put_count(char *region, size_t *used, const struct node *n)
{
    size_t size = sizeof(struct rec_count);
    if (*used + size + sizeof(uint64_t) > KEEP_REGION)
        return false;
    struct rec_count *r = (struct rec_count *)(region + *used);
    r->type = REC_COUNT;
    r->ino = n->ino;
    r->lookups = n->lookups;
    __atomic_store_n(&r->len, (uint32_t)size, __ATOMIC_RELEASE);
    *used += size;
    return true;
}

static void keep_lost(struct guard *g, const char *why)
{
    if (!keep_on(&g->keep))
        return;
    fprintf(stderr, "sdeefs-guard: %s: a crash of this server now ends the view (ENOTCONN) "
            "instead of a restart\n", why);
    __atomic_store_n(&g->keep.hdr->trusted, 0, __ATOMIC_RELEASE);
}

/* zero a region (its pages are freed) */
static bool punch(const struct keep *k, uint32_t which)
{
    return fallocate(k->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     (off_t)(KEEP_PAGE + (size_t)which * KEEP_REGION), (off_t)KEEP_REGION) == 0;
}

/* the live table into the other region, then "active" flips to it */
static void keep_compact(struct guard *g)
{
    struct keep *k = &g->keep;
    if (!keep_on(k))
        return;
    uint32_t old = k->hdr->active, other = 1 - old;
    char *region = keep_region(k, other);
    if (!punch(k, other)) {
        keep_lost(g, "the node table's log cannot be compacted");
        return;
    }
    size_t used = 0;
    for (size_t i = 0; i < g->t.size; i++)
        for (struct node *n = g->t.by_ino[i]; n; n = n->next_ino)
            if (n->ino != ROOT_INO && n->lookups && !put_node(region, &used, n)) {
                keep_lost(g, "the node table outgrew its log");
                return;
            }
    __atomic_store_n(&k->hdr->active, other, __ATOMIC_RELEASE);
    punch(k, old); /* else its pages stay until the next compaction punches it */
    k->used = used;
}

/* log a node's change (full: made or moved; else its lookup count), before the reply that
 * hands it to the kernel */
static void keep_log(struct guard *g, const struct node *n, bool full)
{
    struct keep *k = &g->keep;
    if (!keep_on(k) || n->ino == ROOT_INO)
        return;
    if (k->used > (k->slack ? k->slack : KEEP_SLACK + g->t.count * 1024))
        keep_compact(g);
    for (int attempt = 0; attempt < 2 && keep_on(k); attempt++) {
        char *region = keep_region(k, k->hdr->active);
        if (full ? put_node(region, &k->used, n) : put_count(region, &k->used, n))
            return;
        keep_compact(g);
    }
    keep_lost(g, "the node table outgrew its log");
}

/* -- the host ------------------------------------------------------------------------------ */

static int openat2_one(int dir_fd, const char *path, int flags)
{
    struct open_how how = {
        .flags = (uint64_t)(flags | O_CLOEXEC),
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
    };
    return (int)syscall(SYS_openat2, dir_fd, path, &how, sizeof how);
}

/* sysio.openat2_beneath: paths longer than one syscall takes are walked in pieces */
static int openat2_beneath(int dir_fd, const char *path, int flags)
{
    if (!*path)
        path = ".";
    size_t len = strlen(path);
    if (len <= PATH_CHUNK)
        return openat2_one(dir_fd, path, flags);
    char *copy = strdup(path);
    if (!copy)
        return -1;
    int fd = dir_fd;
    char *piece = copy;
    while (strlen(piece) > PATH_CHUNK) {
        char *cut = piece + PATH_CHUNK;
        while (cut > piece && *cut != '/')
            cut--;
        if (cut == piece) {
            errno = ENAMETOOLONG;
            goto fail;
        }
        *cut = 0;
        int step = openat2_one(fd, piece, O_PATH | O_DIRECTORY);
        if (step < 0)
            goto fail;
        if (fd != dir_fd)
            close(fd);
        fd = step;
        piece = cut + 1;
    }
    int result = openat2_one(fd, piece, flags);
    int saved = errno;
    if (fd != dir_fd)
        close(fd);
    free(copy);
    errno = saved;
    return result;
fail:
    saved = errno;
    if (fd != dir_fd)
        close(fd);
    free(copy);
    errno = saved;
    return -1;
}

/* GuardView._open: the node's host directory, -1 with errno 0 once its path leads elsewhere
 * (fail closed), -1 with errno set on another error. */
static int open_dir(struct guard *g, const struct node *n, int flags)
{
    int fd = openat2_beneath(g->lower_fd, n->rel, flags | O_DIRECTORY);
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR || errno == ELOOP || errno == EXDEV ||
            errno == EACCES)
            errno = 0;
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_ino != n->host_ino) {
        close(fd);
        errno = 0;
        return -1;
    }
    return fd;
}

static char *join(const char *rel, const char *name)
{
    size_t a = strlen(rel), b = strlen(name);
    char *out = malloc(a + b + 2);
    if (!out)
        return NULL;
    if (a) {
        memcpy(out, rel, a);
        out[a] = '/';
        memcpy(out + a + 1, name, b + 1);
    } else {
        memcpy(out, name, b + 1);
    }
    return out;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* -- answers -------------------------------------------------------------------------------- */

static void whiteout_stat(struct stat *st, uint64_t ino, const struct policy *p)
{
    memset(st, 0, sizeof *st);
    st->st_mode = S_IFCHR;
    st->st_ino = ino;
    st->st_nlink = 1;
    st->st_uid = (uid_t)p->subuid;
    st->st_gid = (gid_t)p->subgid;
    st->st_blksize = 4096;
}

static struct node *node_of_wd(struct guard *g, int wd)
{
    for (struct node *n = g->t.by_wd[hash64((uint64_t)wd, g->t.size)]; n; n = n->next_wd)
        if (n->wd == wd)
            return n;
    return NULL;
}

static bool watched(const struct guard *g, const struct node *n)
{
    return n->wd >= 0 && !g->lost_events;
}

/* the attributes the kernel gets (guard.py _attr + ops.entry_attributes) */
static void attr_of(const struct guard *g, const struct node *n, struct stat *out)
{
    *out = n->st;
    out->st_ino = n->ino;
    if (!n->whiteout) {
        out->st_uid = (uid_t)shown_uid(&g->policy, n->st.st_uid);
        out->st_gid = (gid_t)shown_gid(&g->policy, n->st.st_gid);
    }
}

/* attr_timeout: a directory's attributes (its mtime tells the kernel that its cached listing
 * is stale) are kept long only while it is watched; unwatched, the kernel asks again at every
 * listing, as the Python guard re-reads a listing whose mtime changed. */
static double attr_timeout(const struct guard *g, const struct node *n, double entry_timeout)
{
    if (n->whiteout)
        return entry_timeout;
    return watched(g, n) ? LONG_TIMEOUT : 0.0;
}

static void entry_of(const struct guard *g, const struct node *n, double timeout,
                     struct fuse_entry_param *e)
{
    memset(e, 0, sizeof *e);
    e->ino = n->ino;
    e->generation = 0;
    attr_of(g, n, &e->attr);
    e->attr_timeout = attr_timeout(g, n, timeout);
    e->entry_timeout = timeout;
}

/* A whiteout node (one per hidden host inode; stale: the shared one) */
static struct node *remember_whiteout(struct guard *g, bool stale, uint64_t host_ino,
                                      const char *rel)
{
    struct node *n;
    if (stale) {
        n = by_ino(g, STALE_WHITEOUT);
        host_ino = UINT64_MAX;
    } else {
        n = by_key(g, true, host_ino);
    }
    bool made = !n;
    if (made) {
        uint64_t ino = stale ? STALE_WHITEOUT : WHITEOUT_BASE + ++g->fresh;
        struct stat st;
        whiteout_stat(&st, ino, &g->policy);
        n = new_node(ino, rel, host_ino, true, &st);
        if (!n)
            return NULL;
        add_node(g, n);
    }
    n->lookups++;
    keep_log(g, n, made);
    return n;
}

static void watch(struct guard *g, struct node *n, int fd)
{
    if (g->inotify_fd < 0 || n->wd >= 0)
        return;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int wd = inotify_add_watch(g->inotify_fd, path, WATCH_MASK);
    if (wd < 0) { /* ENOSPC (limits): unwatched, short timeouts */
        static bool said;
        if (!said)
            fprintf(stderr, "sdeefs-guard: cannot watch %s/ (%s): directories beyond the "
                    "inotify limit get the short timeout\n", *n->rel ? n->rel : ".",
                    strerror(errno));
        said = true;
        return;
    }
    /* Another node may hold this watch (a directory whose old node the kernel keeps): the
     * watch then belongs to the newer one. */
    struct node *old = node_of_wd(g, wd);
    if (old)
        wd_remove(&g->t, old);
    n->wd = wd;
    wd_insert(&g->t, n);
}

/* GuardView._answer, for an entry seen by fstat of ``fd`` (or fstatat when fd < 0) */
static struct node *answer(struct guard *g, const char *rel, const struct stat *st, int fd,
                           int *err)
{
    if (hides(&g->policy, rel, st))
        return remember_whiteout(g, false, st->st_ino, rel);
    if (!S_ISDIR(st->st_mode)) {
        *err = ENOENT;
        return NULL;
    }
    struct node *n = by_key(g, false, st->st_ino);
    bool changed = !n;
    if (!n) {
        uint64_t ino = 1 < st->st_ino && st->st_ino < GUARD_ID_BASE
                           ? (uint64_t)st->st_ino : GUARD_ID_BASE + ++g->fresh;
        struct node *old = by_ino(g, ino);
        if (old && old->host_ino == st->st_ino && !old->whiteout) {
            n = old;
        } else {
            n = new_node(ino, rel, st->st_ino, false, st);
            if (!n) {
                *err = ENOMEM;
                return NULL;
            }
            add_node(g, n);
        }
    }
    if (strcmp(n->rel, rel) != 0) { /* the same directory may have moved: follow it */
        char *copy = strdup(rel);
        if (copy) {
            free(n->rel);
            n->rel = copy;
        }
        drop_listing(n);
        changed = true;
    }
    n->st = *st;
    n->lookups++;
    keep_log(g, n, changed);
    if (fd >= 0)
        watch(g, n, fd);
    return n;
}

static struct node *dir_node(struct guard *g, fuse_ino_t ino, int *err)
{
    struct node *n = by_ino(g, ino);
    if (!n) {
        *err = ESTALE;
        return NULL;
    }
    if (n->whiteout) {
        *err = ENOTDIR;
        return NULL;
    }
    return n;
}

/* -- the kernel's questions ----------------------------------------------------------------- */

static void forget_one(struct guard *g, fuse_ino_t ino, uint64_t count);
static int scan_hidden(struct guard *g, struct node *n);
static void prefetch_dir(struct guard *g, struct node *n);
static bool pf_asking(struct guard *g, pid_t pid);

static void op_lookup(fuse_req_t req, fuse_ino_t parent_ino, const char *name)
{
    struct guard *g = fuse_req_userdata(req);
    tally(g, COUNT_LOOKUP);
    size_t len = strlen(name);
    if (len > 255) {
        fuse_reply_err(req, ENAMETOOLONG);
        return;
    }
    if (!len || !strcmp(name, ".") || !strcmp(name, "..") || strchr(name, '/')) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    pthread_mutex_lock(&g->lock);
    int err = 0;
    bool visible = false; /* a host entry the view shows from the lower below */
    struct fuse_entry_param e;
    struct node *parent = dir_node(g, parent_ino, &err), *n = NULL;
    char *rel = NULL;
    if (!parent)
        goto out;
    /* A walker that looks up names without listing first (git status: its index's paths)
     * gets the directory listed at its LIST_AFTER-th lookup (once: a change drops it) */
    if (watched(g, parent) && !parent->listed && ++parent->asked >= LIST_AFTER &&
        !g->no_shown) {
        parent->asked = 0;
        if (scan_hidden(g, parent) == 0) /* on failure: not listed, asked as before */
            prefetch_dir(g, parent);
    }
    if (watched(g, parent) && parent->listed && is_shown(parent, name)) {
        /* a visible non-directory of the listing the kernel holds (READDIRPLUS): what the
         * host says of it now, unless a change the watcher has yet to read (which drops
         * this answer after it, as any other: sent under the lock) */
        err = ENOENT;
        visible = true;
        tally(g, COUNT_LISTED);
        goto out;
    }
    rel = join(parent->rel, name);
    if (!rel) {
        err = ENOMEM;
        goto out;
    }
    int dfd = open_dir(g, parent, O_PATH);
    if (dfd < 0) {
        if (errno) {
            err = errno;
            goto out;
        }
        n = remember_whiteout(g, true, 0, rel);
        if (!n)
            err = ENOMEM;
        goto out;
    }
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
        err = errno == ENOTDIR ? ENOENT : errno;
        close(dfd);
        goto out;
    }
    /* a visible directory is opened, to watch it (if it is still the one stat'ed) */
    int fd = -1;
    if (S_ISDIR(st.st_mode) && g->inotify_fd >= 0 && !hides(&g->policy, rel, &st)) {
        struct stat again;
        fd = openat(dfd, name, O_PATH | O_NOFOLLOW | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0 && (fstat(fd, &again) < 0 || again.st_ino != st.st_ino)) {
            close(fd);
            fd = -1;
        }
    }
    close(dfd);
    n = answer(g, rel, &st, fd, &err);
    visible = !n && err == ENOENT;
    if (fd >= 0)
        close(fd);
out:
    /* a walker that listed the parent looks this directory up: it will likely read it next
     * (find, du, cp -r: a directory's entries first, then each subdirectory) */
    if (n && g->prefetch && !n->whiteout && watched(g, n) && parent->listed && !n->listed &&
        !n->ahead && !pf_asking(g, fuse_req_ctx(req)->pid))
        prefetch_dir(g, n);
    if (n) {
        double timeout = watched(g, parent) && (n->whiteout ? true : watched(g, n))
                             ? LONG_TIMEOUT : g->timeout;
        if (n->ino == STALE_WHITEOUT)
            timeout = g->timeout;
        entry_of(g, n, timeout, &e);
        pthread_mutex_unlock(&g->lock);
        free(rel);
        if (fuse_reply_entry(req, &e) != 0) {
            /* the kernel did not take it: undo the lookup count */
            pthread_mutex_lock(&g->lock);
            forget_one(g, e.ino, 1);
            pthread_mutex_unlock(&g->lock);
        }
        return;
    }
    if (err == ENOENT)
        tally(g, COUNT_NEGATIVE);
    if (visible && g->prefetch && parent && watched(g, parent) && parent->ino == parent_ino) {
        /* looking ahead: a visible non-directory's "nothing here" is kept by the kernel (the
         * walker finds it there) until a host change of this name drops it (inotify), and
         * at most --timeout: a server that takes over a session does not know these names,
         * so what changed while nobody watched shows within that.  Sent under the lock: a
         * change the watcher reads from now on is invalidated after this reply reaches the
         * kernel, not before. */
        memset(&e, 0, sizeof e);
        e.entry_timeout = g->timeout;
        fuse_reply_entry(req, &e);
        pthread_mutex_unlock(&g->lock);
        free(rel);
        return;
    }
    pthread_mutex_unlock(&g->lock);
    free(rel);
    fuse_reply_err(req, err);
}

static void forget_one(struct guard *g, fuse_ino_t ino, uint64_t count)
{
    struct node *n = by_ino(g, ino);
    if (!n || ino == ROOT_INO)
        return;
    n->lookups = n->lookups > count ? n->lookups - count : 0;
    keep_log(g, n, false);
    if (n->lookups)
        return;
    unlink_node(g, n);
    free_node(n);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    struct guard *g = fuse_req_userdata(req);
    tally(g, COUNT_FORGET);
    pthread_mutex_lock(&g->lock);
    forget_one(g, ino, nlookup);
    pthread_mutex_unlock(&g->lock);
    fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    struct guard *g = fuse_req_userdata(req);
    tally(g, COUNT_FORGET);
    pthread_mutex_lock(&g->lock);
    for (size_t i = 0; i < count; i++)
        forget_one(g, forgets[i].ino, forgets[i].nlookup);
    pthread_mutex_unlock(&g->lock);
    fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)fi;
    struct guard *g = fuse_req_userdata(req);
    tally(g, COUNT_GETATTR);
    pthread_mutex_lock(&g->lock);
    struct node *n = by_ino(g, ino);
    if (!n) {
        pthread_mutex_unlock(&g->lock);
        fuse_reply_err(req, ESTALE);
        return;
    }
    if (!n->whiteout) {
        int fd = open_dir(g, n, O_PATH);
        if (fd >= 0) {
            fstat(fd, &n->st);
            close(fd);
        }
    }
    struct stat st;
    attr_of(g, n, &st);
    double timeout = attr_timeout(g, n, n->whiteout ? LONG_TIMEOUT : g->timeout);
    pthread_mutex_unlock(&g->lock);
    fuse_reply_attr(req, &st, timeout);
}

/* ENOSYS: the kernel answers every later one EOPNOTSUPP itself (see the top) */
static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    (void)ino;
    (void)name;
    (void)size;
    tally(fuse_req_userdata(req), COUNT_GETXATTR);
    fuse_reply_err(req, ENOSYS);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    struct guard *g = fuse_req_userdata(req);
    tally(g, COUNT_LISTXATTR);
    pthread_mutex_lock(&g->lock);
    bool known = by_ino(g, ino) != NULL;
    pthread_mutex_unlock(&g->lock);
    if (!known)
        fuse_reply_err(req, ESTALE);
    else if (size == 0)
        fuse_reply_xattr(req, 0);
    else
        fuse_reply_buf(req, NULL, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    (void)ino;
    struct guard *g = fuse_req_userdata(req);
    tally(g, COUNT_STATFS);
    struct statvfs sv;
    if (fstatvfs(g->lower_fd, &sv) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    sv.f_namemax = 255;
    fuse_reply_statfs(req, &sv);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct guard *g = fuse_req_userdata(req);
    tally(g, COUNT_OPENDIR);
    if (g->stateless_dirs) {
        fuse_reply_err(req, ENOSYS); /* the kernel opens directories without asking from now */
        return;
    }
    pthread_mutex_lock(&g->lock);
    int err = 0;
    struct node *n = dir_node(g, ino, &err);
    pthread_mutex_unlock(&g->lock);
    if (!n) {
        fuse_reply_err(req, err);
        return;
    }
    fi->fh = 0;
    fi->cache_readdir = 1;
    fi->keep_cache = 1;
    fuse_reply_open(req, fi);
}

static int cmp_hidden(const void *a, const void *b)
{
    return strcmp(((const struct hidden *)a)->name, ((const struct hidden *)b)->name);
}

/* GuardView.scan_hidden: the hidden entries of a directory (its listing), sorted */
static int scan_hidden(struct guard *g, struct node *n)
{
    drop_listing(n);
    int fd = open_dir(g, n, O_RDONLY);
    if (fd < 0) {
        if (errno)
            return errno;
        n->listed = true; /* moved: an empty listing */
        n->list_expiry = now() + LISTING_TTL;
        return 0;
    }
    struct stat dst;
    fstat(fd, &dst);
    DIR *dir = fdopendir(fd);
    if (!dir) {
        int err = errno;
        close(fd);
        return err;
    }
    size_t cap = 0, shown_cap = 0;
    bool keep_shown = watched(g, n) && !g->no_shown;
    struct dirent *de;
    while ((de = readdir(dir))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        struct stat st;
        if (fstatat(dirfd(dir), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
            continue;
        char *rel = join(n->rel, de->d_name);
        if (!rel)
            break;
        bool hidden = hides(&g->policy, rel, &st);
        free(rel);
        if (!hidden) {
            if (keep_shown && !S_ISDIR(st.st_mode)) {
                if (n->nshown == shown_cap) {
                    shown_cap = shown_cap ? shown_cap * 2 : 16;
                    char **more = realloc(n->shown, shown_cap * sizeof *more);
                    if (!more) {
                        keep_shown = false;
                        continue;
                    }
                    n->shown = more;
                }
                if ((n->shown[n->nshown] = strdup(de->d_name)))
                    n->nshown++;
            }
            continue;
        }
        if (n->nlist == cap) {
            cap = cap ? cap * 2 : 8;
            struct hidden *more = realloc(n->list, cap * sizeof *more);
            if (!more)
                break;
            n->list = more;
        }
        n->list[n->nlist].name = strdup(de->d_name);
        n->list[n->nlist].st = st;
        if (n->list[n->nlist].name)
            n->nlist++;
    }
    closedir(dir);
    qsort(n->list, n->nlist, sizeof *n->list, cmp_hidden);
    if (keep_shown)
        qsort(n->shown, n->nshown, sizeof *n->shown, cmp_name);
    else
        drop_shown(n);
    n->listed = true;
    n->list_mtime = dst.st_mtim;
    n->list_expiry = now() + LISTING_TTL;
    return 0;
}

/* GuardView.cached_hidden: is the cached listing still the directory's? */
static bool listing_fresh(struct guard *g, struct node *n)
{
    if (!n->listed)
        return false;
    if (watched(g, n))
        return true; /* a change in it dropped the listing */
    if (n->list_expiry < now())
        return false;
    int fd = open_dir(g, n, O_PATH);
    if (fd < 0)
        return false;
    struct stat st;
    bool same = fstat(fd, &st) == 0 && st.st_mtim.tv_sec == n->list_mtime.tv_sec &&
                st.st_mtim.tv_nsec == n->list_mtime.tv_nsec;
    close(fd);
    return same;
}

static void prefetch_dir(struct guard *g, struct node *n);

static void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, bool plus)
{
    struct guard *g = fuse_req_userdata(req);
    tally(g, plus ? COUNT_READDIRPLUS : COUNT_READDIR);
    pthread_mutex_lock(&g->lock);
    int err = 0;
    struct node *n = dir_node(g, ino, &err);
    if (!n)
        goto fail;
    if (off == 0 ? !listing_fresh(g, n) : !n->listed) {
        err = scan_hidden(g, n);
        if (err)
            goto fail;
        if (plus && off == 0 && watched(g, n))
            prefetch_dir(g, n);
    }
    char *buf = malloc(size);
    if (!buf) {
        err = ENOMEM;
        goto fail;
    }
    size_t used = 0;
    for (size_t i = (size_t)off; i < n->nlist; i++) {
        struct hidden *h = &n->list[i];
        size_t need;
        if (plus) {
            char *rel = join(n->rel, h->name);
            struct node *w = rel ? remember_whiteout(g, false, h->st.st_ino, rel) : NULL;
            free(rel);
            if (!w)
                break;
            struct fuse_entry_param e;
            entry_of(g, w, watched(g, n) ? LONG_TIMEOUT : g->timeout, &e);
            need = fuse_add_direntry_plus(req, buf + used, size - used, h->name, &e,
                                          (off_t)(i + 1));
            if (need > size - used) {
                forget_one(g, w->ino, 1); /* not delivered: not a lookup */
                break;
            }
        } else {
            struct stat st;
            memset(&st, 0, sizeof st);
            st.st_mode = S_IFCHR;
            need = fuse_add_direntry(req, buf + used, size - used, h->name, &st,
                                     (off_t)(i + 1));
            if (need > size - used)
                break;
        }
        used += need;
    }
    pthread_mutex_unlock(&g->lock);
    fuse_reply_buf(req, buf, used);
    free(buf);
    return;
fail:
    pthread_mutex_unlock(&g->lock);
    fuse_reply_err(req, err);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    (void)fi;
    do_readdir(req, ino, size, off, false);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                           struct fuse_file_info *fi)
{
    (void)fi;
    do_readdir(req, ino, size, off, true);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    tally(fuse_req_userdata(req), COUNT_RELEASEDIR);
    fuse_reply_err(req, 0);
}

/* -- looking ahead ---------------------------------------------------------------------------
 *
 * A first walk of a tree asks the guard about every name once (overlayfs looks each name
 * up in the guard's layer before the host's), and a walker that waits for each answer pays
 * a round trip per entry.  When the kernel first lists a directory (READDIRPLUS), a few
 * threads of this daemon look up its names through the mount themselves, several at once:
 * the kernel keeps the answers (a visible entry's "nothing here" until a host change of that
 * name drops it, see op_lookup), so the walker's own lookups find them and ask nothing.
 * A directory is looked ahead once the kernel lists it, once it is listed after LIST_AFTER
 * lookups, or once a walker that listed its parent looks it up (find, du, cp -r read a
 * directory's entries, then each subdirectory): the thread's own lookups do not look further.
 * The answers are the ones a walker would have got (same requests, same rules); only their
 * time moves, so it pays only where a CPU is idle (walker, server and threads each want one):
 * on 2 loaded cores it cost more than it saved (bench/RESULTS.md, issue 16).
 * $SDEEFS_GUARD_PREFETCH: how many threads (default 0: none). */

#define PREFETCH_CHUNK 4 /* names per turn: a directory's are looked up by every thread at once */
#define PREFETCH_QUEUE 4096 /* directories waiting; beyond it, new ones are not looked ahead */

struct pf_dir { /* a listed directory, in a clone of the mount, shared by its chunks */
    int fd;
    size_t refs; /* under prefetch.lock */
};

struct pf_job {
    char *rel;
    char **names; /* NULL: list the directory first */
    size_t n;
    struct pf_dir *dir;
    struct pf_job *next;
};

struct prefetch {
    pthread_mutex_t lock;
    pthread_cond_t more;
    struct pf_job *head, *tail;
    size_t queued;
    dev_t dev;   /* the mount's device, learned from the first clone (0: not yet) */
    pid_t tids[16]; /* the threads': their lookups do not look further ahead */
    int ntids;
};

#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef OPEN_TREE_CLOEXEC
#define OPEN_TREE_CLOEXEC O_CLOEXEC
#endif
#define FUSE_MAGIC 0x65735546

/* The mount, as a detached clone for one chunk of names: the same superblock (the kernel's
 * answers land in the cache the view uses), but not the view's mount, which stays free to
 * be unmounted (plain umount) while a chunk is looked up; a clone made after that finds
 * another device there and is not used.  -1: none. */
static int pf_open_mount(struct guard *g, struct prefetch *pf)
{
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, g->mountpoint,
                          OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (fd < 0)
        return -1;
    struct stat st;
    pthread_mutex_lock(&pf->lock);
    dev_t dev = pf->dev;
    pthread_mutex_unlock(&pf->lock);
    if (!dev) { /* the first clone: is it the guard's mount? (STATFS asks us, once) */
        struct statfs sf;
        if (fstatfs(fd, &sf) != 0 || sf.f_type != FUSE_MAGIC || fstat(fd, &st) != 0) {
            close(fd);
            return -1;
        }
        pthread_mutex_lock(&pf->lock);
        if (!pf->dev)
            pf->dev = st.st_dev;
        dev = pf->dev;
        pthread_mutex_unlock(&pf->lock);
    } else if (fstat(fd, &st) != 0) {
        close(fd);
        return -1;
    }
    bool ours = dev == st.st_dev;
    if (!ours) {
        close(fd);
        return -1;
    }
    return fd;
}

static void pf_push(struct prefetch *pf, struct pf_job *job, bool front)
{
    job->next = NULL;
    if (front) {
        job->next = pf->head;
        pf->head = job;
        if (!pf->tail)
            pf->tail = job;
    } else {
        if (pf->tail)
            pf->tail->next = job;
        else
            pf->head = job;
        pf->tail = job;
    }
    pf->queued++;
    pthread_cond_signal(&pf->more);
}

/* is ``pid`` (a request's) one of the threads looking ahead? */
static bool pf_asking(struct guard *g, pid_t pid)
{
    struct prefetch *pf = g->prefetch;
    bool ours = false;
    pthread_mutex_lock(&pf->lock);
    for (int i = 0; i < pf->ntids && !ours; i++)
        ours = pf->tids[i] == pid;
    pthread_mutex_unlock(&pf->lock);
    return ours;
}

/* a directory the kernel lists for the first time: look its names up ahead of the walker */
static void prefetch_dir(struct guard *g, struct node *n)
{
    struct prefetch *pf = g->prefetch;
    if (!pf || n->ahead)
        return;
    n->ahead = true;
    const char *rel = n->rel;
    struct pf_job *job = calloc(1, sizeof *job);
    if (!job || !(job->rel = strdup(rel))) {
        free(job);
        return;
    }
    pthread_mutex_lock(&pf->lock);
    if (pf->queued < PREFETCH_QUEUE) {
        pf_push(pf, job, false);
        job = NULL;
    }
    pthread_mutex_unlock(&pf->lock);
    if (job) {
        free(job->rel);
        free(job);
    }
}

static void pf_release(struct prefetch *pf, struct pf_dir *dir)
{
    if (!dir)
        return;
    pthread_mutex_lock(&pf->lock);
    bool last = --dir->refs == 0;
    pthread_mutex_unlock(&pf->lock);
    if (last) {
        close(dir->fd);
        free(dir);
    }
}

static void pf_free(struct pf_job *job)
{
    for (size_t i = 0; i < job->n; i++)
        free(job->names[i]);
    free(job->names);
    free(job->rel);
    free(job);
}

/* the host directory's names, queued in chunks (the first returned to do here) */
static struct pf_job *pf_split(struct guard *g, struct pf_job *job)
{
    int fd = openat2_beneath(g->lower_fd, job->rel, O_RDONLY | O_DIRECTORY);
    DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
    if (!dir) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    struct pf_job *chunks = NULL, **tail = &chunks, *cur = NULL;
    struct dirent *de;
    while ((de = readdir(dir))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        if (!cur || cur->n == PREFETCH_CHUNK) {
            cur = calloc(1, sizeof *cur);
            if (!cur || !(cur->rel = strdup(job->rel)) ||
                !(cur->names = calloc(PREFETCH_CHUNK, sizeof *cur->names))) {
                if (cur) {
                    free(cur->rel);
                    free(cur);
                }
                break;
            }
            *tail = cur;
            tail = &cur->next;
        }
        if ((cur->names[cur->n] = strdup(de->d_name)))
            cur->n++;
    }
    closedir(dir);
    if (!chunks)
        return NULL;
    struct prefetch *pf = g->prefetch;
    struct pf_dir *shared = calloc(1, sizeof *shared);
    int root = pf_open_mount(g, pf);
    shared = root >= 0 ? shared : (free(shared), NULL);
    if (shared) {
        shared->fd = *job->rel ? openat(root, job->rel, O_PATH | O_DIRECTORY | O_NOFOLLOW |
                                        O_CLOEXEC) : dup(root);
        if (shared->fd < 0) {
            free(shared);
            shared = NULL;
        }
    }
    if (root >= 0)
        close(root);
    if (!shared) {
        while (chunks) {
            struct pf_job *next = chunks->next;
            pf_free(chunks);
            chunks = next;
        }
        return NULL;
    }
    for (struct pf_job *c = chunks; c; c = c->next) {
        c->dir = shared;
        shared->refs++; /* not yet shared: no lock needed */
    }
    pthread_mutex_lock(&pf->lock);
    /* the rest go first in the queue, in order: other threads take them up at once */
    struct pf_job *rest = chunks->next, *reversed = NULL;
    while (rest) {
        struct pf_job *next = rest->next;
        rest->next = reversed;
        reversed = rest;
        rest = next;
    }
    while (reversed) {
        struct pf_job *next = reversed->next;
        pf->queued--; /* pf_push counts it; a chunk is not a directory */
        pf_push(pf, reversed, true);
        reversed = next;
    }
    pthread_mutex_unlock(&pf->lock);
    chunks->next = NULL;
    return chunks;
}

static void *prefetch_thread(void *arg)
{
    struct guard *g = arg;
    struct prefetch *pf = g->prefetch;
    pthread_mutex_lock(&pf->lock);
    if (pf->ntids < (int)(sizeof pf->tids / sizeof *pf->tids))
        pf->tids[pf->ntids++] = (pid_t)syscall(SYS_gettid);
    pthread_mutex_unlock(&pf->lock);
    for (;;) {
        pthread_mutex_lock(&pf->lock);
        while (!pf->head)
            pthread_cond_wait(&pf->more, &pf->lock);
        struct pf_job *job = pf->head;
        pf->head = job->next;
        if (!pf->head)
            pf->tail = NULL;
        if (!job->names)
            pf->queued--;
        pthread_mutex_unlock(&pf->lock);
        if (!job->names) {
            struct pf_job *first = pf_split(g, job);
            pf_free(job);
            job = first;
            if (!job)
                continue;
        }
        struct stat st;
        for (size_t i = 0; i < job->n; i++)
            fstatat(job->dir->fd, job->names[i], &st, AT_SYMLINK_NOFOLLOW);
        pf_release(pf, job->dir);
        pf_free(job);
    }
    return NULL;
}

static void start_prefetch(struct guard *g)
{
    const char *env = getenv("SDEEFS_GUARD_PREFETCH");
    long threads = env ? strtol(env, NULL, 10) : 0;
    if (threads <= 0 || !g->mountpoint)
        return;
    struct prefetch *pf = calloc(1, sizeof *pf);
    if (!pf)
        return;
    pthread_mutex_init(&pf->lock, NULL);
    pthread_cond_init(&pf->more, NULL);
    g->prefetch = pf;
    for (long i = 0; i < threads && i < 16; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, prefetch_thread, g) == 0)
            pthread_detach(t);
    }
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    struct guard *g = userdata;
    if (conn->capable & FUSE_CAP_READDIRPLUS)
        conn->want |= FUSE_CAP_READDIRPLUS;
    conn->want &= ~(unsigned)FUSE_CAP_READDIRPLUS_AUTO;
    if (conn->capable & FUSE_CAP_AUTO_INVAL_DATA)
        conn->want |= FUSE_CAP_AUTO_INVAL_DATA;
    /* every request through the custom io (the keeper's INIT and resend need it) */
    conn->want &= ~(unsigned)(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
                              FUSE_CAP_SPLICE_MOVE);
    g->stateless_dirs = (conn->capable & FUSE_CAP_NO_OPENDIR_SUPPORT) != 0;
    /* the first server: the session can be taken over once its INIT is kept */
    if (g->keep.fd >= 0 && !g->keep.resume && g->keep.hdr->init_len)
        __atomic_store_n(&g->keep.hdr->serving, 1, __ATOMIC_RELEASE);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .getxattr = op_getxattr,
    .listxattr = op_listxattr,
    .statfs = op_statfs,
    .opendir = op_opendir,
    .readdir = op_readdir,
    .readdirplus = op_readdirplus,
    .releasedir = op_releasedir,
};

/* -- host changes (inotify) ------------------------------------------------------------------ */

struct inval {
    fuse_ino_t ino;
    char *name; /* NULL: the directory itself (attributes, listing) */
};


/* Tell the kernel, then free the list: called outside g->lock, as the kernel may wait for
 * a lookup this guard is answering. */
static void send_invals(struct guard *g, struct inval *todo, size_t ntodo)
{
    for (size_t i = 0; i < ntodo; i++) {
        if (todo[i].name) {
            fuse_lowlevel_notify_inval_entry(g->se, todo[i].ino, todo[i].name,
                                             strlen(todo[i].name));
            free(todo[i].name);
        } else {
            fuse_lowlevel_notify_inval_inode(g->se, todo[i].ino, 0, 0);
        }
    }
    free(todo);
}

static void invalidate_all(struct guard *g, struct inval **todo, size_t *ntodo, size_t *cap)
{
    for (size_t i = 0; i < g->t.size; i++)
        for (struct node *n = g->t.by_ino[i]; n; n = n->next_ino) {
            if (n->whiteout)
                continue;
            drop_listing(n);
            if (*ntodo == *cap) {
                *cap = *cap ? *cap * 2 : 64;
                *todo = realloc(*todo, *cap * sizeof **todo);
                if (!*todo)
                    exit(1);
            }
            (*todo)[(*ntodo)++] = (struct inval){n->ino, NULL};
        }
}

static void *watch_host(void *arg)
{
    struct guard *g = arg;
    char buf[64 * 1024] __attribute__((aligned(__alignof__(struct inotify_event))));
    for (;;) {
        ssize_t len = read(g->inotify_fd, buf, sizeof buf);
        if (len < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        struct inval *todo = NULL;
        size_t ntodo = 0, cap = 0;
        pthread_mutex_lock(&g->lock);
        for (char *p = buf; p < buf + len;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            p += sizeof *ev + ev->len;
            if (ev->mask & IN_Q_OVERFLOW) {
                fprintf(stderr, "sdeefs-guard: host change events were lost (inotify "
                        "overflow): short timeouts from now on\n");
                g->lost_events = true;
                invalidate_all(g, &todo, &ntodo, &cap);
                continue;
            }
            if (ev->mask & IN_IGNORED) {
                struct node *n = node_of_wd(g, ev->wd);
                if (n)
                    wd_remove(&g->t, n);
                continue;
            }
            struct node *n = node_of_wd(g, ev->wd);
            if (!n)
                continue;
            drop_listing(n);
            if (ntodo + 2 > cap) {
                cap = cap ? cap * 2 : 64;
                todo = realloc(todo, cap * sizeof *todo);
                if (!todo)
                    exit(1);
            }
            todo[ntodo++] = (struct inval){n->ino, NULL};
            if (ev->len && ev->name[0])
                todo[ntodo++] = (struct inval){n->ino, strdup(ev->name)};
        }
        pthread_mutex_unlock(&g->lock);
        send_invals(g, todo, ntodo); /* outside the lock: see send_invals */
    }
}

/* -- taking over a dead server's session (see "surviving a crash") ---------------------------- */

/* The log into the node table; every directory in it watched again.  -1: not to be trusted. */
static int keep_replay(struct guard *g)
{
    struct keep *k = &g->keep;
    struct keep_header *h = k->hdr;
    double began = now();
    if (h->magic != KEEP_MAGIC || !__atomic_load_n(&h->trusted, __ATOMIC_ACQUIRE) ||
        h->active > 1 || !h->init_len || h->init_len > KEEP_INIT_MAX)
        return -1;
    char *region = keep_region(k, h->active);
    size_t pos = 0;
    while (pos + sizeof(uint64_t) <= KEEP_REGION) {
        uint32_t len = __atomic_load_n((uint32_t *)(region + pos), __ATOMIC_ACQUIRE);
        if (!len)
            break;
        if (len < sizeof(struct rec_count) || len % 8 || len > KEEP_REGION - pos)
            return -1;
        uint32_t type = ((uint32_t *)(region + pos))[1];
        if (type == REC_NODE) {
            struct rec_node *r = (struct rec_node *)(region + pos);
            if (len < sizeof *r || r->rel_len >= len - sizeof *r || r->rel[r->rel_len] ||
                r->ino == ROOT_INO)
                return -1;
            struct node *n = by_ino(g, r->ino);
            if (n) {
                unlink_node(g, n);
                free_node(n);
            }
            if (r->lookups) {
                n = new_node(r->ino, r->rel, r->host_ino, r->whiteout, &r->st);
                if (!n)
                    return -1;
                n->lookups = r->lookups;
                add_node(g, n);
            }
        } else if (type == REC_COUNT) {
            struct rec_count *r = (struct rec_count *)(region + pos);
            struct node *n = by_ino(g, r->ino);
            if (!n) {
                if (r->lookups) /* a count of a node never made */
                    return -1;
                pos += len;  /* forgotten as the log was compacted: already gone */
                continue;
            }
            n->lookups = r->lookups;
            if (!n->lookups) {
                unlink_node(g, n);
                free_node(n);
            }
        } else {
            return -1;
        }
        pos += len;
    }
    size_t nodes = 0;
    for (size_t i = 0; i < g->t.size; i++)
        for (struct node *n = g->t.by_ino[i]; n; n = n->next_ino) {
            nodes++;
            uint64_t base = n->ino >= WHITEOUT_BASE ? WHITEOUT_BASE
                            : n->ino >= GUARD_ID_BASE ? GUARD_ID_BASE : 0;
            if (base && n->ino != STALE_WHITEOUT && n->ino - base > g->fresh)
                g->fresh = n->ino - base;
            if (n->whiteout || n->ino == ROOT_INO)
                continue;
            /* Did the host change it while no server watched?  Moved or replaced (its
             * names fail closed, as before), or now hidden: the kernel's entry must go.
             * Else only its attributes and listing (invalidate_after_takeover). */
            int fd = open_dir(g, n, O_PATH);
            struct stat st;
            if (fd >= 0 && fstat(fd, &st) == 0) {
                n->st = st;
                n->recheck = hides(&g->policy, n->rel, &st);
                watch(g, n, fd);
            } else {
                n->recheck = true;
            }
            if (fd >= 0)
                close(fd);
        }
    keep_compact(g); /* a fresh log: this server's own */
    fprintf(stderr, "sdeefs-guard: took over the session (restart %" PRIu64 "): %zu nodes the "
            "kernel holds, replayed and watched in %.1f ms\n", h->restarts, nodes,
            (now() - began) * 1e3);
    return keep_on(k) ? 0 : -1;
}

struct dir_rel {
    const char *rel;
    fuse_ino_t ino;
};

static int cmp_dir_rel(const void *a, const void *b)
{
    return strcmp(((const struct dir_rel *)a)->rel, ((const struct dir_rel *)b)->rel);
}

/* After a takeover: what changed on the host while no server watched is decided afresh.
 * The kernel's answers are dropped: every directory's attributes and listing (its
 * whiteouts), every whiteout's entry, and the entry of every directory that is no longer a
 * visible directory at its path (keep_replay looked).  The entries of the directories that
 * still are stay: overlayfs keeps its own dentries on them (a walk costs what it did). */
static void *invalidate_after_takeover(void *arg)
{
    struct guard *g = arg;
    struct inval *todo = NULL;
    struct dir_rel *dirs = NULL;
    size_t ntodo = 0, ndirs = 0;
    pthread_mutex_lock(&g->lock);
    todo = calloc(2 * g->t.count + 1, sizeof *todo);
    dirs = calloc(g->t.count + 1, sizeof *dirs);
    if (!todo || !dirs) {
        pthread_mutex_unlock(&g->lock);
        fprintf(stderr, "sdeefs-guard: out of memory after a takeover\n");
        exit(1); /* the keeper decides: a new server, or fail closed */
    }
    for (size_t i = 0; i < g->t.size; i++)
        for (struct node *n = g->t.by_ino[i]; n; n = n->next_ino)
            if (!n->whiteout) {
                drop_listing(n);
                dirs[ndirs++] = (struct dir_rel){n->rel, n->ino};
                todo[ntodo++] = (struct inval){n->ino, NULL};
            }
    qsort(dirs, ndirs, sizeof *dirs, cmp_dir_rel);
    for (size_t i = 0; i < g->t.size; i++)
        for (struct node *n = g->t.by_ino[i]; n; n = n->next_ino) {
            if (n->ino == ROOT_INO || n->ino == STALE_WHITEOUT || (!n->whiteout && !n->recheck))
                continue;
            const char *slash = strrchr(n->rel, '/');
            char *parent = strndup(n->rel, slash ? (size_t)(slash - n->rel) : 0);
            if (!parent)
                continue;
            struct dir_rel key = {parent, 0};
            struct dir_rel *found = bsearch(&key, dirs, ndirs, sizeof *dirs, cmp_dir_rel);
            free(parent);
            if (found)
                todo[ntodo++] = (struct inval){found->ino, strdup(slash ? slash + 1 : n->rel)};
        }
    pthread_mutex_unlock(&g->lock);
    free(dirs);
    send_invals(g, todo, ntodo);
    return NULL;
}

/* libfuse's reads and writes of /dev/fuse (fuse_session_custom_io): the first server keeps
 * the kernel's INIT; a new one is handed that INIT instead of a read, its reply swallowed,
 * then asks the kernel to resend what the dead one left. */
static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    struct guard *g = userdata;
    struct keep *k = &g->keep;
    if (k->resume) {
        k->resume = false;
        size_t body = k->hdr->init_len, total = sizeof(struct k_in_header) + body;
        if (len < total) {
            errno = EIO;
            return -1;
        }
        struct k_in_header h = {.len = (uint32_t)total, .opcode = K_FUSE_INIT,
                                .unique = SYNTH_UNIQUE};
        memcpy(buf, &h, sizeof h);
        memcpy((char *)buf + sizeof h, k->hdr->init, body);
        __atomic_store_n(&k->swallow, true, __ATOMIC_RELEASE);
        k->resend = true;
        return (ssize_t)total;
    }
    if (k->resend) { /* the INIT is through: the kernel's own requests from now on */
        k->resend = false;
        struct k_out_header note = {.len = sizeof note, .error = K_NOTIFY_RESEND, .unique = 0};
        if (write(fd, &note, sizeof note) != (ssize_t)sizeof note)
            fprintf(stderr, "sdeefs-guard: the kernel cannot resend the requests the dead "
                    "server had read (%s; Linux >= 6.9 can): they wait\n", strerror(errno));
        pthread_t t;
        if (pthread_create(&t, NULL, invalidate_after_takeover, g) == 0)
            pthread_detach(t);
        else
            exit(1); /* nothing invalidated: not to be served (the keeper decides) */
        __atomic_store_n(&k->hdr->serving, 1, __ATOMIC_RELEASE);
    }
    ssize_t n = read(fd, buf, len);
    if (k->fd >= 0 && n >= (ssize_t)sizeof(struct k_in_header) &&
        (((const struct k_in_header *)buf)->unique & K_UNIQUE_RESEND))
        fprintf(stderr, "sdeefs-guard: request %" PRIu64 " (opcode %u) the dead server had "
                "read: sent again by the kernel\n",
                (uint64_t)(((const struct k_in_header *)buf)->unique & ~K_UNIQUE_RESEND),
                ((const struct k_in_header *)buf)->opcode);
    if (k->fd >= 0 && !k->hdr->init_len && n >= (ssize_t)sizeof(struct k_in_header)) {
        const struct k_in_header *h = buf;
        size_t body = (size_t)n - sizeof *h;
        if (h->opcode == K_FUSE_INIT && body <= KEEP_INIT_MAX) {
            memcpy(k->hdr->init, (const char *)buf + sizeof *h, body);
            __atomic_store_n(&k->hdr->init_len, (uint32_t)body, __ATOMIC_RELEASE);
        }
    }
    return n;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    struct guard *g = userdata;
    if (__atomic_load_n(&g->keep.swallow, __ATOMIC_ACQUIRE) && count > 0 &&
        iov[0].iov_len >= sizeof(struct k_out_header) &&
        ((const struct k_out_header *)iov[0].iov_base)->unique == SYNTH_UNIQUE) {
        __atomic_store_n(&g->keep.swallow, false, __ATOMIC_RELEASE);
        ssize_t total = 0;
        for (int i = 0; i < count; i++)
            total += (ssize_t)iov[i].iov_len;
        return total; /* the kernel agreed to all this with the first server */
    }
    return writev(fd, iov, count);
}

/* -- start ----------------------------------------------------------------------------------- */

/* The kernel's struct sched_attr (sched_setattr(2)); glibc 2.36 has no wrapper. */
struct sched_attr_v1 {
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
    uint32_t sched_util_min, sched_util_max;
};

/* A short time slice (EEVDF, Linux >= 6.12: sched_runtime of a SCHED_OTHER thread): every
 * request wakes this thread while the asking process waits, and a short slice lets the
 * wakeup preempt at once instead of after the running task's slice.  It asks for no more CPU
 * than before (weight unchanged).  Older kernels refuse or ignore it: nothing else changes. */
static void short_slice(void)
{
    const char *env = getenv("SDEEFS_GUARD_SLICE_US");
    uint64_t us = env ? strtoull(env, NULL, 10) : 100;
    if (!us)
        return;
    struct sched_attr_v1 attr = {.size = sizeof attr, .sched_policy = 0 /* SCHED_OTHER */,
                                 .sched_runtime = us * 1000};
    if (syscall(SYS_sched_setattr, 0, &attr, 0) != 0)
        fprintf(stderr, "sdeefs-guard: no short time slice (%s)\n", strerror(errno));
}

static int ready_fd = -1;
static void fail(int code, const char *fmt, ...);

/* $SDEEFS_GUARD_COUNTS: the request counters, in a file others read (see enum count_kind) */
static void open_counts(struct guard *g)
{
    const char *path = getenv("SDEEFS_GUARD_COUNTS");
    if (!path || !*path)
        return;
    size_t size = COUNT_KINDS * sizeof(uint64_t);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0)
        fail(1, "cannot keep request counts in %s: %s", path, strerror(errno));
    void *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        fail(1, "cannot keep request counts in %s: %s", path, strerror(errno));
    g->counts = map;
}

static void fail(int code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (ready_fd >= 0) {
        dprintf(ready_fd, "%d %s\n", code, msg);
        close(ready_fd);
        ready_fd = -1;
    }
    fprintf(stderr, "sdeefs-guard: %s\n", msg);
    exit(code);
}

static void parse_ids(const char *text, struct policy *p)
{
    p->ngroups = 0;
    if (!*text)
        return;
    size_t cap = 1;
    for (const char *c = text; *c; c++)
        cap += *c == ',';
    p->groups = calloc(cap, sizeof *p->groups);
    char *copy = strdup(text), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
        p->groups[p->ngroups++] = (gid_t)strtoul(tok, NULL, 10);
    free(copy);
}

static void add_deny(struct policy *p, const char *glob)
{
    struct pattern pat = {0, NULL};
    char *copy = strdup(glob), *save = NULL;
    for (char *tok = strtok_r(copy, "/", &save); tok; tok = strtok_r(NULL, "/", &save)) {
        pat.parts = realloc(pat.parts, (pat.n + 1) * sizeof *pat.parts);
        pat.parts[pat.n++] = strdup(tok);
    }
    free(copy);
    if (!pat.n)
        return;
    p->deny = realloc(p->deny, (p->ndeny + 1) * sizeof *p->deny);
    p->deny[p->ndeny++] = pat;
}

static uint64_t number(const char *opt, const char *text)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || !*text || *end)
        fail(2, "%s wants a number, not %s", opt, text);
    return v;
}

static unsigned long long start_time(void)
{
    FILE *f = fopen("/proc/self/stat", "r");
    if (!f)
        return 0;
    char line[1024];
    size_t n = fread(line, 1, sizeof line - 1, f);
    fclose(f);
    line[n] = 0;
    char *p = strrchr(line, ')');
    if (!p)
        return 0;
    unsigned long long v = 0;
    int field = 2; /* the state is field 3 */
    for (char *tok = strtok(p + 1, " "); tok; tok = strtok(NULL, " ")) {
        if (++field == 22) {
            v = strtoull(tok, NULL, 10);
            break;
        }
    }
    return v;
}

/* daemon.write_pid_file: "PID START\n", atomically */
static bool put_pid_file(const char *path)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s.tmp%d", path, getpid());
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%d %llu\n", getpid(), start_time()) < 0 || fflush(f) ||
        fsync(fileno(f)) || fclose(f) || rename(tmp, path)) {
        unlink(tmp);
        return false;
    }
    return true;
}

static void write_pid_file(const char *path)
{
    if (!put_pid_file(path))
        fail(1, "cannot write %s: %s", path, strerror(errno));
}

/* A server whose keeper died (kill -9: PR_SET_PDEATHSIG sends SIGUSR2) serves on alone: its
 * own death then ends the view (fail closed).  It names itself in the pid file, so that the
 * environment's stop still finds and ends it (daemon.end_process). */
static void *await_keeper_death(void *arg)
{
    struct guard *g = arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    int sig;
    while (sigwait(&set, &sig) != 0)
        ;
    fprintf(stderr, "sdeefs-guard: the keeper is gone: this server (pid %d) serves on alone; "
            "its death now ends the view (ENOTCONN) until the next login\n", getpid());
    if (g->pid_file && !put_pid_file(g->pid_file))
        fprintf(stderr, "sdeefs-guard: cannot write %s: %s\n", g->pid_file, strerror(errno));
    return NULL;
}

/* Serve the mount: on ``fuse_fd`` (the keeper's, -1: mount ``mountpoint`` here) */
static int serve(struct guard *g, const char *mountpoint, const char *pid_file, int fuse_fd)
{
    struct stat root_st;
    if (fstat(g->lower_fd, &root_st) < 0)
        fail(1, "the lower is gone: %s", strerror(errno));
    table_init(&g->t, 1024);
    pthread_mutex_init(&g->lock, NULL);
    struct node *root = new_node(ROOT_INO, "", root_st.st_ino, false, &root_st);
    root->lookups = 1;
    add_node(g, root);
    /* SDEEFS_GUARD_NO_INOTIFY=1: as if no directory could be watched (the tests check that
     * fallback; an admin may use it to spare inotify watches) */
    const char *no_inotify = getenv("SDEEFS_GUARD_NO_INOTIFY");
    g->inotify_fd = no_inotify && *no_inotify == '1' ? -1 : inotify_init1(IN_CLOEXEC);
    if (no_inotify && *no_inotify == '1')
        fprintf(stderr, "sdeefs-guard: SDEEFS_GUARD_NO_INOTIFY=1: short timeouts\n");
    else if (g->inotify_fd < 0)
        fprintf(stderr, "sdeefs-guard: no inotify (%s): short timeouts\n", strerror(errno));
    else
        watch(g, root, g->lower_fd);
    if (g->keep.resume && keep_replay(g) != 0) {
        fprintf(stderr, "sdeefs-guard: the node table's log cannot be trusted: the view "
                "fails closed\n");
        __atomic_store_n(&g->keep.hdr->trusted, 0, __ATOMIC_RELEASE);
        return 3;
    }

    char *fuse_argv[] = {
        "sdeefs-guard", "-o",
        "fsname=sdeefs-guard,subtype=sdeefs-guard,ro,default_permissions,allow_other,nodev,"
        "nosuid,noexec",
        NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, fuse_argv);
    g->se = fuse_session_new(&args, &ops, sizeof ops, g);
    if (!g->se)
        fail(1, "cannot mount the guard: fuse_session_new failed");
    if (fuse_set_signal_handlers(g->se) != 0)
        fail(1, "cannot mount the guard: signal handlers");
    if (fuse_fd >= 0) {
        static const struct fuse_custom_io io = {.read = io_read, .writev = io_writev};
        if (fuse_session_custom_io(g->se, &io, fuse_fd) != 0)
            fail(1, "cannot serve the guard: fuse_session_custom_io failed");
    } else {
        if (fuse_session_mount(g->se, mountpoint) != 0)
            fail(1, "cannot mount the guard at %s", mountpoint);
        if (pid_file)
            write_pid_file(pid_file);
    }
    pthread_t watcher;
    if (fuse_fd >= 0 && pthread_create(&watcher, NULL, await_keeper_death, g) != 0)
        fail(1, "cannot serve the guard: no thread");
    if (g->inotify_fd >= 0 && pthread_create(&watcher, NULL, watch_host, g) != 0) {
        fprintf(stderr, "sdeefs-guard: no watcher thread: short timeouts\n");
        g->lost_events = true;
    }
    if (ready_fd >= 0) {
        if (write(ready_fd, "ok\n", 3) != 3)
            fprintf(stderr, "sdeefs-guard: nobody waits for the report\n");
        close(ready_fd);
        ready_fd = -1;
    }
    g->mountpoint = mountpoint;
    start_prefetch(g);
    short_slice();
    int ret = fuse_session_loop(g->se);
    fuse_session_unmount(g->se);
    fuse_remove_signal_handlers(g->se);
    fuse_session_destroy(g->se);
    return ret < 0 ? 1 : 0;
}

/* the mount's device in this mount namespace (/proc/self/mountinfo), 0 if none */
static dev_t mount_dev(const char *mountpoint)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f)
        return 0;
    char *line = NULL;
    size_t cap = 0;
    dev_t dev = 0;
    while (getline(&line, &cap, f) > 0) {
        unsigned major, minor;
        char point[PATH_MAX];
        if (sscanf(line, "%*u %*u %u:%u %*s %4095s", &major, &minor, point) == 3 &&
            !strcmp(point, mountpoint))
            dev = makedev(major, minor);
    }
    free(line);
    fclose(f);
    return dev;
}

static volatile sig_atomic_t keeper_child, keeper_stop;

static void keeper_signal(int sig)
{
    keeper_stop = 1;
    if (keeper_child > 0)
        kill(keeper_child, sig); /* the server ends its session: the keeper follows */
}

/* The keeper (see "surviving a crash"): mount, then a server, and a new one whenever one
 * dies while its session lives. */
static int keeper(struct guard *g, const char *mountpoint, const char *pid_file)
{
    int fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fuse_fd < 0)
        fail(1, "cannot mount the guard: /dev/fuse: %s", strerror(errno));
    struct stat mst;
    if (stat(mountpoint, &mst) < 0)
        fail(1, "cannot mount the guard at %s: %s", mountpoint, strerror(errno));
    char opts[256];
    snprintf(opts, sizeof opts, "fd=%d,rootmode=%o,user_id=%u,group_id=%u,"
             "default_permissions,allow_other", fuse_fd, mst.st_mode & S_IFMT, getuid(),
             getgid());
    if (mount("sdeefs-guard", mountpoint, "fuse.sdeefs-guard",
              MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, opts) != 0)
        fail(1, "cannot mount the guard at %s: %s", mountpoint, strerror(errno));
    dev_t dev = mount_dev(mountpoint);
    struct keep *k = &g->keep;
    k->fd = memfd_create("sdeefs-guard-nodes", MFD_CLOEXEC);
    if (k->fd < 0 || ftruncate(k->fd, (off_t)(KEEP_PAGE + 2 * KEEP_REGION)) != 0 ||
        (k->hdr = mmap(NULL, KEEP_PAGE + 2 * KEEP_REGION, PROT_READ | PROT_WRITE, MAP_SHARED,
                       k->fd, 0)) == MAP_FAILED) {
        umount2(mountpoint, MNT_DETACH);
        fail(1, "cannot keep the guard's node table: %s", strerror(errno));
    }
    k->regions = (char *)k->hdr + KEEP_PAGE;
    const char *slack = getenv("SDEEFS_GUARD_LOG_SLACK"); /* tests: compact all the time */
    k->slack = slack ? strtoul(slack, NULL, 10) : 0;
    k->hdr->magic = KEEP_MAGIC;
    k->hdr->trusted = 1;
    if (pid_file)
        write_pid_file(pid_file);
    struct sigaction sa = {.sa_handler = keeper_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    bool ever_served = false, ended = false;
    pid_t keeper_pid = getpid();
    double window = now();
    int burst = 0;
    for (;;) {
        __atomic_store_n(&k->hdr->serving, 0, __ATOMIC_RELEASE);
        pid_t pid = fork();
        if (pid == 0) {
            signal(SIGTERM, SIG_DFL); /* libfuse sets its handlers only over the defaults */
            signal(SIGINT, SIG_DFL);
            signal(SIGHUP, SIG_DFL);
            signal(SIGPIPE, SIG_DFL);
            sigset_t usr2; /* for await_keeper_death, in every thread */
            sigemptyset(&usr2);
            sigaddset(&usr2, SIGUSR2);
            pthread_sigmask(SIG_BLOCK, &usr2, NULL);
            if (prctl(PR_SET_PDEATHSIG, SIGUSR2) != 0 || getppid() != keeper_pid)
                raise(SIGUSR2);
            g->pid_file = pid_file;
            _exit(serve(g, mountpoint, NULL, fuse_fd));
        }
        if (pid < 0) {
            fprintf(stderr, "sdeefs-guard: no server (fork: %s): the view fails closed\n",
                    strerror(errno));
            break;
        }
        keeper_child = pid;
        if (keeper_stop)
            kill(pid, SIGTERM);
        if (ready_fd >= 0) { /* the first server reports */
            close(ready_fd);
            ready_fd = -1;
        }
        int status = 0;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        keeper_child = 0;
        ever_served |= __atomic_load_n(&k->hdr->serving, __ATOMIC_ACQUIRE) != 0;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            ended = true; /* unmounted, or ended by a signal: the session is over */
            break;
        }
        char how[64];
        if (WIFSIGNALED(status))
            snprintf(how, sizeof how, "was killed by signal %d", WTERMSIG(status));
        else
            snprintf(how, sizeof how, "exited with %d", WEXITSTATUS(status));
        if (keeper_stop || !ever_served || !keep_on(k)) {
            fprintf(stderr, "sdeefs-guard: the server (pid %d) %s%s: the view fails closed\n",
                    pid, how, keeper_stop ? " while stopping" : !ever_served
                    ? " before it served" : " and its node table's log is incomplete");
            break;
        }
        if (now() - window > KEEP_WINDOW) {
            window = now();
            burst = 0;
        }
        if (++burst > KEEP_BURST) {
            fprintf(stderr, "sdeefs-guard: the server (pid %d) %s, the %d. time within %.0f s: "
                    "the view fails closed\n", pid, how, burst, KEEP_WINDOW);
            break;
        }
        k->hdr->restarts++;
        fprintf(stderr, "sdeefs-guard: the server (pid %d) %s: a new one takes over its "
                "session\n", pid, how);
        k->resume = true;
    }
    /* ours to unmount if its session ended (or never began) and it is still ours here */
    if ((ended || !ever_served) && dev && mount_dev(mountpoint) == dev) {
        struct pollfd pfd = {.fd = fuse_fd, .events = 0};
        if (!(poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLERR))) {
            close(fuse_fd);
            umount2(mountpoint, MNT_DETACH);
        }
    }
    return ended ? 0 : 1;
}

int main(int argc, char **argv)
{
    static struct guard g;
    const char *mountpoint = NULL, *pid_file = NULL;
    bool have[6] = {false};
    g.lower_fd = -1;
    g.timeout = 10.0;
    for (int i = 1; i < argc; i++) {
        const char *opt = argv[i];
        if (i + 1 >= argc)
            fail(2, "%s needs a value", opt);
        const char *val = argv[++i];
        if (!strcmp(opt, "--ready-fd"))
            ready_fd = (int)number(opt, val);
        else if (!strcmp(opt, "--lower-fd"))
            g.lower_fd = (int)number(opt, val);
        else if (!strcmp(opt, "--mountpoint"))
            mountpoint = val;
        else if (!strcmp(opt, "--pid-file"))
            pid_file = val;
        else if (!strcmp(opt, "--timeout"))
            g.timeout = strtod(val, NULL);
        else if (!strcmp(opt, "--uid"))
            g.policy.uid = (uid_t)number(opt, val), have[0] = true;
        else if (!strcmp(opt, "--gid"))
            g.policy.gid = (gid_t)number(opt, val), have[1] = true;
        else if (!strcmp(opt, "--groups"))
            parse_ids(val, &g.policy);
        else if (!strcmp(opt, "--subuid"))
            g.policy.subuid = number(opt, val), have[2] = true;
        else if (!strcmp(opt, "--subgid"))
            g.policy.subgid = number(opt, val), have[3] = true;
        else if (!strcmp(opt, "--count"))
            g.policy.count = number(opt, val), have[4] = true;
        else if (!strcmp(opt, "--system"))
            g.policy.system = number(opt, val), have[5] = true;
        else if (!strcmp(opt, "--deny"))
            add_deny(&g.policy, val);
        else
            fail(2, "unknown option %s", opt);
    }
    for (size_t k = 0; k < sizeof have / sizeof *have; k++)
        if (!have[k])
            fail(2, "--uid, --gid, --subuid, --subgid, --count and --system are required");
    if (!mountpoint || g.lower_fd < 0)
        fail(2, "--mountpoint and --lower-fd are required");

    struct stat root_st;
    if (fstat(g.lower_fd, &root_st) < 0 || !S_ISDIR(root_st.st_mode))
        fail(2, "--lower-fd %d is not a directory", g.lower_fd);
    g.keep.fd = -1;
    open_counts(&g);
    const char *listed_lookups = getenv("SDEEFS_GUARD_LISTED_LOOKUPS");
    g.no_shown = listed_lookups && *listed_lookups == '0';
    /* SDEEFS_GUARD_KEEPER=0: no keeper, the server mounts itself (its death ends the view;
     * for comparisons) */
    const char *keeper_env = getenv("SDEEFS_GUARD_KEEPER");
    if (keeper_env && *keeper_env == '0') {
        fprintf(stderr, "sdeefs-guard: SDEEFS_GUARD_KEEPER=0: no keeper\n");
        return serve(&g, mountpoint, pid_file, -1);
    }
    return keeper(&g, mountpoint, pid_file);
}
