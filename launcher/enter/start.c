/*
 * sdeefs-enter start (as root; prints the init pid): the namespaces and the root of an
 * environment, and its init.  Options in enter.h.  A failed start leaves nothing behind: the
 * processes it forked are killed.
 *
 * Processes of "start" (P = the root process that was called, A and B its descendants):
 *
 *   P (host root)                     A (drops to U)                   B (PID 1 of the new pid ns)
 *   fork A  ------------------------> setsid; setgroups(0); setresgid(G); setresuid(U)
 *                                     unshare(NEWUSER)   -- "U" -->
 *   write uid_map, gid_map (setgroups)       <-- "M" --
 *                                     unshare(NEWNS|NEWPID); / rslave   -- "N" -->
 *   setns(A's mnt ns); open O_PATH layer fds; setns back; send fds --> (SCM_RIGHTS)
 *                                     fork B  -- "P<pid>" -->          scratch tmpfs on /tmp,
 *                                     wait for B, exit with it          overlay, pivot, mounts,
 *   print pid, exit 0        <----------------------------------------- "R" (or "E<error line>")
 *
 * Why P opens the layer fds *inside A's mount namespace* (deviation from "open them first"):
 * overlayfs clones every layer with clone_private_mount(), which refuses (EINVAL, "failed to clone
 * upperpath") a mount that belongs to another mount namespace.  Fds opened before A's unshare
 * point at the host's mounts, so both mount(2) with /proc/self/fd/N and fsconfig(FSCONFIG_SET_FD)
 * fail with them (verified on 6.18).  Host root can traverse the root-owned 0700 parents; U,
 * even as root of its user namespace, cannot (those inodes are not mapped in it).
 *
 * B's mounts follow bubblewrap: a scratch tmpfs is mounted on /tmp, the overlay at
 * /tmp/newroot, then pivot_root(scratch, scratch/oldroot) so the host tree (including its real
 * /tmp) stays reachable as /oldroot for bind sources while /newroot is filled in; /oldroot is
 * detached, then chdir(/newroot), pivot_root(".", "."), umount2(".", MNT_DETACH), chdir("/").
 */
#include "enter.h"

#define MAX_LAYERS 128 /* lowers + upper + work must fit one SCM_RIGHTS message (max 253) */
#define MAX_MOUNTS 256
#define SETUP_TIMEOUT_S 60

/* ------------------------------------------------------------------------------------------ */
/* Helpers                                                                                    */

static int sys_pivot_root(const char *new_root, const char *put_old)
{
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}
static int sys_fsopen(const char *fs, unsigned flags)
{
    return (int)syscall(SYS_fsopen, fs, flags);
}
static int sys_fsconfig(int fd, unsigned cmd, const char *key, const void *value, int aux)
{
    return (int)syscall(SYS_fsconfig, fd, cmd, key, value, aux);
}
static int sys_fsmount(int fd, unsigned flags, unsigned attrs)
{
    return (int)syscall(SYS_fsmount, fd, flags, attrs);
}

/* An absolute path without "." or ".." components (they could climb out of /newroot). */
static void check_abs_path(const char *opt, const char *p)
{
    if (p[0] != '/')
        usage("%s: not an absolute path: %s", opt, p);
    for (const char *c = p; *c;) {
        while (*c == '/')
            c++;
        size_t len = strcspn(c, "/");
        if ((len == 1 && c[0] == '.') || (len == 2 && c[0] == '.' && c[1] == '.'))
            usage("%s: '.' and '..' are not allowed: %s", opt, p);
        c += len;
    }
}

static void send_msg(int sock, const char *msg)
{
    if (send(sock, msg, strlen(msg), MSG_NOSIGNAL) < 0)
        FAIL("send to parent");
}

/* Receive one message (and any fds) from the peer.  Returns the length; 0 means the peer is gone.
 * A message starting with 'E' is an error line from the peer: print it and fail. */
static size_t recv_msg(int sock, char *buf, size_t size, int *fds, int *nfds, const char *step)
{
    char cbuf[CMSG_SPACE(sizeof(int) * MAX_LAYERS)];
    struct iovec iov = {buf, size - 1};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                        .msg_controllen = sizeof cbuf};
    ssize_t n;
    do
        n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            fail("%s: timed out after %d s", step, SETUP_TIMEOUT_S);
        FAIL("%s", step);
    }
    buf[n] = 0;
    if (nfds)
        *nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            if (fds && nfds) {
                memcpy(fds, CMSG_DATA(c), sizeof(int) * (size_t)count);
                *nfds = count;
            }
        }
    if (n > 0 && buf[0] == 'E') {
        /* The peer already formatted the whole line. */
        g_report = -1;
        emit_line(buf + 1);
        cleanup_children();
        _exit(1);
    }
    return (size_t)n;
}

static void expect_msg(int sock, char tag, char *buf, size_t size, const char *step)
{
    size_t n = recv_msg(sock, buf, size, NULL, NULL, step);
    if (n == 0)
        fail("%s: the environment exited during setup", step);
    if (buf[0] != tag)
        fail("%s: unexpected message from the environment", step);
}

/* mkdir -p; ENOENT-free afterwards (an existing non-directory is left to the mount to report).
 * What it creates is inside root's (B runs as the user's own uid, which has CAP_CHOWN in
 * the namespace), as the rest of the view's system directories. */
static void mkdir_p(const char *path, mode_t mode)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        fail("mkdir %s: path too long", path);
    for (char *c = buf + 1;; c++) {
        if (*c == '/' || *c == 0) {
            char saved = *c;
            *c = 0;
            if (mkdir(buf, mode) < 0) {
                if (errno != EEXIST)
                    FAIL("mkdir %s", buf);
            } else if (lchown(buf, 0, 0) < 0)
                FAIL("chown %s", buf);
            *c = saved;
            if (!saved)
                break;
        }
    }
}

/* Make the mountpoint DST exist: a directory if the source is one, else an empty file. */
static void ensure_mountpoint(const char *dst, int is_dir)
{
    struct stat st;
    if (stat(dst, &st) == 0)
        return;
    if (errno != ENOENT)
        FAIL("stat %s", dst);
    if (is_dir) {
        mkdir_p(dst, 0755);
        return;
    }
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", dst);
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
        *slash = 0;
        mkdir_p(parent, 0755);
    }
    int fd = open(dst, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
        FAIL("create mountpoint %s", dst);
    if (fchown(fd, 0, 0) < 0)
        FAIL("chown mountpoint %s", dst);
    close(fd);
}

static void bind_mount(const char *src, const char *dst, const char *what)
{
    if (mount(src, dst, NULL, MS_BIND | MS_REC, NULL) < 0)
        FAIL("%s: bind %s on %s", what, src, dst);
}

static void set_mount_attr(const char *path, unsigned long long attrs, int recursive,
                           const char *what)
{
    struct mount_attr a = {.attr_set = attrs};
    if (sys_mount_setattr(AT_FDCWD, path, recursive ? AT_RECURSIVE : 0, &a) < 0)
        FAIL("%s: make %s read-only", what, path);
}

/* ------------------------------------------------------------------------------------------ */
/* Options                                                                                    */

struct bind_spec {
    const char *src, *dst;
    int ro;
};

struct start_opts {
    unsigned uid, gid;
    struct id_map uid_map, gid_map; /* --uid-map/--gid-map, or "0 U 1"/"0 G 1" */
    const char *lower[MAX_LAYERS];
    int nlower;
    const char *upper, *work, *home, *tmp_size;
    const char *tmp_dir; /* --tmp-dir: this host directory is /tmp, not a tmpfs (jobs) */
    const char *view; /* --root-view: bind this mount as the root instead of an overlay */
    struct bind_spec binds[MAX_MOUNTS];
    int nbinds;
    const char *hide[MAX_MOUNTS];
    int nhide;
    int host_pids; /* --host-pids: no PID namespace of its own, the host's /proc (jobs) */
    int scratch;   /* --volatile: the upper is scratch, mounted "volatile" (jobs) */
};


static void parse_bind(struct start_opts *o, const char *opt, char *arg, int ro)
{
    if (o->nbinds >= MAX_MOUNTS)
        usage("too many binds");
    char *colon = strchr(arg, ':');
    struct bind_spec *b = &o->binds[o->nbinds++];
    b->src = arg;
    b->dst = arg;
    b->ro = ro;
    if (colon) {
        *colon = 0;
        b->dst = colon + 1;
    }
    check_abs_path(opt, b->src);
    check_abs_path(opt, b->dst);
}

static void check_tmp_size(const char *s)
{
    size_t digits = strspn(s, "0123456789");
    if (digits == 0 || (s[digits] && (s[digits + 1] || !strchr("kKmMgG%", s[digits]))))
        usage("--tmp-size: expected a number with an optional k/m/g/%% suffix: %s", s);
}

static void parse_start(struct start_opts *o, int argc, char **argv)
{
    long uid = -1, gid = -1;
    memset(o, 0, sizeof *o);
    o->tmp_size = "25%";
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--host-pids")) {
            o->host_pids = 1;
            continue;
        }
        if (!strcmp(a, "--volatile")) {
            o->scratch = 1;
            continue;
        }
        if (i + 1 >= argc)
            usage("start: %s needs a value (or is unknown)", a);
        char *v = argv[++i];
        if (!strcmp(a, "--uid"))
            uid = parse_id(a, v);
        else if (!strcmp(a, "--gid"))
            gid = parse_id(a, v);
        else if (!strcmp(a, "--uid-map"))
            parse_id_map(a, v, &o->uid_map);
        else if (!strcmp(a, "--gid-map"))
            parse_id_map(a, v, &o->gid_map);
        else if (!strcmp(a, "--root-lower")) {
            if (o->nlower >= MAX_LAYERS - 3) /* + upper, work, --tmp-dir */
                usage("too many --root-lower");
            o->lower[o->nlower++] = v;
        } else if (!strcmp(a, "--root-view"))
            o->view = v;
        else if (!strcmp(a, "--root-upper"))
            o->upper = v;
        else if (!strcmp(a, "--root-work"))
            o->work = v;
        else if (!strcmp(a, "--home")) {
            check_abs_path(a, v);
            o->home = v;
        } else if (!strcmp(a, "--bind"))
            parse_bind(o, a, v, 0);
        else if (!strcmp(a, "--ro-bind"))
            parse_bind(o, a, v, 1);
        else if (!strcmp(a, "--hide")) {
            check_abs_path(a, v);
            if (o->nhide >= MAX_MOUNTS)
                usage("too many --hide");
            o->hide[o->nhide++] = v;
        } else if (!strcmp(a, "--tmp-size")) {
            check_tmp_size(v);
            o->tmp_size = v;
        } else if (!strcmp(a, "--tmp-dir")) {
            check_abs_path(a, v);
            o->tmp_dir = v;
        } else
            usage("start: unknown option %s", a);
    }
    int layers = o->nlower && o->upper && o->work;
    if (o->view && (o->nlower || o->upper || o->work || o->scratch))
        usage("start: --root-view excludes --root-lower, --root-upper, --root-work and "
              "--volatile");
    if (uid < 0 || gid < 0 || !(layers || o->view) || !o->home)
        usage("start --uid U --gid G (--root-lower DIR [...] --root-upper DIR --root-work DIR | "
              "--root-view DIR) --home HOSTDIR [--bind SRC:DST] [--ro-bind SRC:DST] "
              "[--hide PATH] [--tmp-size S | --tmp-dir HOSTDIR] [--host-pids] [--volatile]");
    if (uid == 0 || gid == 0)
        usage("start: refusing uid/gid 0 (the environment's root would be host root)");
    if (o->uid_map.set != o->gid_map.set)
        usage("start: --uid-map and --gid-map go together");
    o->uid = (unsigned)uid;
    o->gid = (unsigned)gid;
    if (!o->uid_map.set) {
        single_id_map(&o->uid_map, o->uid);
        single_id_map(&o->gid_map, o->gid);
    }
}

/* ---- B: build the root and become init ---- */

/* Path of P inside the future root (under /newroot) or the host tree (under /oldroot). */
static const char *in_root(const char *prefix, const char *p, char *buf)
{
    if (snprintf(buf, PATH_MAX, "%s%s", prefix, p) >= PATH_MAX)
        fail("%s%s: path too long", prefix, p);
    return buf;
}

/* lowerdir=/proc/self/fd/N paths: the kernel follows the magic links straight to the fds'
 * directories without walking their (root-owned, 0700) parents.  "scratch" (--volatile, a
 * job's upper, discarded at its end): overlayfs' "volatile", no sync of the upper (a copy-up
 * does not fsync the file it copied, an fsync inside does not wait for the node's disk;
 * Documentation/filesystems/overlayfs.rst). */
static int mount_overlay_legacy(const char *target, const int *fds, int nlower, int scratch)
{
    char opts[4096];
    size_t n = (size_t)snprintf(opts, sizeof opts, "userxattr%s,lowerdir=",
                                scratch ? ",volatile" : "");
    for (int i = 0; i < nlower && n < sizeof opts; i++)
        n += (size_t)snprintf(opts + n, sizeof opts - n, "%s/proc/self/fd/%d", i ? ":" : "",
                              fds[i]);
    if (n < sizeof opts)
        n += (size_t)snprintf(opts + n, sizeof opts - n,
                              ",upperdir=/proc/self/fd/%d,workdir=/proc/self/fd/%d", fds[nlower],
                              fds[nlower + 1]);
    if (n >= sizeof opts) {
        errno = E2BIG;
        return -1;
    }
    return mount("overlay", target, "overlay", MS_NOSUID, opts);
}

/* The new mount API with the layers given as fds ("lowerdir+", 6.8+).  On failure, writes a
 * description (with the kernel's own message from the fs context when there is one) to err. */
static int mount_overlay_fsopen(const char *target, const int *fds, int nlower, int scratch,
                                char *err, size_t errlen)
{
    const char *step = "fsopen";
    int mfd = -1, fs = sys_fsopen("overlay", FSOPEN_CLOEXEC);
    if (fs < 0)
        goto out;
    step = "fsconfig userxattr";
    if (sys_fsconfig(fs, FSCONFIG_SET_FLAG, "userxattr", NULL, 0) < 0)
        goto out;
    step = "fsconfig volatile";
    if (scratch && sys_fsconfig(fs, FSCONFIG_SET_FLAG, "volatile", NULL, 0) < 0)
        goto out;
    step = "fsconfig lowerdir+";
    for (int i = 0; i < nlower; i++)
        if (sys_fsconfig(fs, FSCONFIG_SET_FD, "lowerdir+", NULL, fds[i]) < 0)
            goto out;
    step = "fsconfig upperdir";
    if (sys_fsconfig(fs, FSCONFIG_SET_FD, "upperdir", NULL, fds[nlower]) < 0)
        goto out;
    step = "fsconfig workdir";
    if (sys_fsconfig(fs, FSCONFIG_SET_FD, "workdir", NULL, fds[nlower + 1]) < 0)
        goto out;
    step = "fsconfig create";
    if (sys_fsconfig(fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0)
        goto out;
    step = "fsmount";
    if ((mfd = sys_fsmount(fs, FSMOUNT_CLOEXEC, MOUNT_ATTR_NOSUID)) < 0)
        goto out;
    step = "move_mount";
    if (sys_move_mount(mfd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH) < 0)
        goto out;
    close(mfd);
    close(fs);
    return 0;
out:;
    int saved = errno;
    char klog[256] = "";
    if (fs >= 0) { /* the fs context's message log: "e overlayfs: ..." */
        int fl = fcntl(fs, F_GETFL);
        fcntl(fs, F_SETFL, fl | O_NONBLOCK);
        ssize_t k = read(fs, klog, sizeof klog - 1);
        klog[k > 0 ? k : 0] = 0;
        klog[strcspn(klog, "\n")] = 0;
        close(fs);
    }
    if (mfd >= 0)
        close(mfd);
    snprintf(err, errlen, "%s: %s%s%s%s", step, strerror(saved), *klog ? " (" : "", klog,
             *klog ? ")" : "");
    errno = saved;
    return -1;
}

/* Tests build a second binary with -DSDEEFS_TEST_FSOPEN_ONLY to cover the fallback. */
#ifdef SDEEFS_TEST_FSOPEN_ONLY
#define TRY_LEGACY_OVERLAY 0
#else
#define TRY_LEGACY_OVERLAY 1
#endif

/* How many layer fds P sends: the overlay's lowers, upper and work, or the one view. */
static int layer_count(const struct start_opts *o)
{
    return o->view ? 1 : o->nlower + 2;
}

/* ... and all fds it sends: the layers, then --tmp-dir's directory if given. */
static int fd_count(const struct start_opts *o)
{
    return layer_count(o) + (o->tmp_dir ? 1 : 0);
}

static void bind_view(const char *target, int view_fd)
{
    int tree = sys_open_tree(view_fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH);
    if (tree < 0)
        FAIL("clone the view's mount");
    if (sys_move_mount(tree, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH) < 0)
        FAIL("mount the view at %s", target);
    close(tree);
}

static void mount_overlay(const char *target, const int *fds, int nlower, int scratch)
{
    char err[400];
    int legacy = ENOSYS;
    if (TRY_LEGACY_OVERLAY) {
        if (mount_overlay_legacy(target, fds, nlower, scratch) == 0)
            return;
        legacy = errno;
    }
    if (mount_overlay_fsopen(target, fds, nlower, scratch, err, sizeof err) == 0)
        return;
    fail("mount overlay: %s; fallback %s", strerror(legacy), err);
}

/* The environment's /proc: its own PID namespace's, or (host_pids: a job's, whose tasks
 * SLURM forks in the host's PID namespace and which cannot move into another one) the
 * host's, bound, so that /proc/self of a task names the task. */
static void setup_proc(int host_pids)
{
    static const char *masked[] = {"kcore", "keys", "timer_list", "sysrq-trigger", "sched_debug"};
    static const char *readonly[] = {"sys", "irq", "bus", "fs"};
    char path[PATH_MAX];
    mkdir_p("/newroot/proc", 0555);
    if (host_pids) {
        bind_mount("/oldroot/proc", "/newroot/proc", "/proc");
    } else if (mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        FAIL("mount proc");
    for (size_t i = 0; i < sizeof masked / sizeof *masked; i++) {
        snprintf(path, sizeof path, "/newroot/proc/%s", masked[i]);
        if (access(path, F_OK) < 0)
            continue;
        if (mount("/oldroot/dev/null", path, NULL, MS_BIND, NULL) < 0)
            FAIL("mask %s", path + 8);
        set_mount_attr(path, MOUNT_ATTR_RDONLY, 0, "mask /proc");
    }
    for (size_t i = 0; i < sizeof readonly / sizeof *readonly; i++) {
        snprintf(path, sizeof path, "/newroot/proc/%s", readonly[i]);
        if (access(path, F_OK) < 0)
            continue;
        bind_mount(path, path, "read-only /proc");
        set_mount_attr(path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV |
                                 MOUNT_ATTR_NOEXEC,
                       1, "read-only /proc");
    }
}

static void setup_dev(void)
{
    static const char *nodes[] = {"null", "zero", "full", "random", "urandom", "tty"};
    static const char *links[][2] = {{"/proc/self/fd", "fd"},       {"/proc/self/fd/0", "stdin"},
                                     {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"},
                                     {"pts/ptmx", "ptmx"}};
    char src[PATH_MAX], dst[PATH_MAX];
    mkdir_p("/newroot/dev", 0755);
    if (mount("tmpfs", "/newroot/dev", "tmpfs", MS_NOSUID, "mode=0755,uid=0,gid=0") < 0)
        FAIL("mount tmpfs on /dev");
    /* mknod is refused in a user namespace: bind the host's nodes onto empty files. */
    for (size_t i = 0; i < sizeof nodes / sizeof *nodes; i++) {
        snprintf(src, sizeof src, "/oldroot/dev/%s", nodes[i]);
        snprintf(dst, sizeof dst, "/newroot/dev/%s", nodes[i]);
        int fd = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0)
            FAIL("create %s", dst + 8);
        close(fd);
        if (mount(src, dst, NULL, MS_BIND, NULL) < 0)
            FAIL("bind %s", dst + 8);
    }
    if (mkdir("/newroot/dev/pts", 0755) < 0)
        FAIL("mkdir /dev/pts");
    if (mount("devpts", "/newroot/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620") < 0)
        FAIL("mount devpts on /dev/pts");
    if (mkdir("/newroot/dev/shm", 01777) < 0)
        FAIL("mkdir /dev/shm");
    if (mount("tmpfs", "/newroot/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
              "mode=1777,uid=0,gid=0") < 0)
        FAIL("mount tmpfs on /dev/shm");
    for (size_t i = 0; i < sizeof links / sizeof *links; i++) {
        snprintf(dst, sizeof dst, "/newroot/dev/%s", links[i][1]);
        if (symlink(links[i][0], dst) < 0)
            FAIL("symlink %s", dst + 8);
    }
}

static void setup_sys(void)
{
    mkdir_p("/newroot/sys", 0555);
    bind_mount("/oldroot/sys", "/newroot/sys", "/sys");
    set_mount_attr("/newroot/sys",
                   MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, 1,
                   "/sys");
}

/* /tmp: a tmpfs of its own (logins), or (--tmp-dir, jobs) the host directory P opened,
 * bound: a plain directory of the node's local filesystem, no overlay in its I/O path
 * (launcher/compute/job.py).  It is bound by its fd, opened by host root in this mount
 * namespace: B, the user here, could not walk the root-only directories above it, and no
 * path the user controls is resolved. */
static void setup_tmp(const char *size, int dir_fd)
{
    char opts[64];
    mkdir_p("/newroot/tmp", 01777);
    if (dir_fd >= 0) {
        bind_view("/newroot/tmp", dir_fd);
        set_mount_attr("/newroot/tmp", MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, "/tmp");
        close(dir_fd);
        return;
    }
    snprintf(opts, sizeof opts, "mode=1777,uid=0,gid=0,size=%s", size);
    if (mount("tmpfs", "/newroot/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts) < 0)
        FAIL("mount tmpfs on /tmp");
}

/* The environment's own /run (as a container's): the host's is hidden, sockets the user
 * needs are bound into it (--bind, [sdeefs] sockets), and nothing written there reaches
 * the user's layer. */
static void setup_run(void)
{
    mkdir_p("/newroot/run", 0755);
    if (mount("tmpfs", "/newroot/run", "tmpfs", MS_NOSUID | MS_NODEV,
              "mode=0755,size=16m,uid=0,gid=0") < 0)
        FAIL("mount tmpfs on /run");
    if (mkdir("/newroot/run/lock", 01777) < 0 || chmod("/newroot/run/lock", 01777) < 0 ||
        lchown("/newroot/run/lock", 0, 0) < 0)
        FAIL("mkdir /run/lock");
}

static void setup_bind(const char *src_host, const char *dst_view, int ro, const char *what)
{
    char src[PATH_MAX], dst[PATH_MAX];
    struct stat st;
    in_root("/oldroot", src_host, src);
    in_root("/newroot", dst_view, dst);
    if (stat(src, &st) < 0)
        FAIL("%s: source %s", what, src_host);
    ensure_mountpoint(dst, S_ISDIR(st.st_mode));
    bind_mount(src, dst, what);
    if (ro)
        set_mount_attr(dst, MOUNT_ATTR_RDONLY, 1, what);
}

static void setup_hide(const char *view_path)
{
    char dst[PATH_MAX];
    struct stat st;
    in_root("/newroot", view_path, dst);
    if (stat(dst, &st) < 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            return; /* nothing to hide */
        FAIL("hide %s: stat", view_path);
    }
    if (S_ISDIR(st.st_mode)) {
        if (mount("tmpfs", dst, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "mode=0755,size=4k") < 0)
            FAIL("hide %s: mount tmpfs", view_path);
    } else {
        if (mount("/oldroot/dev/null", dst, NULL, MS_BIND, NULL) < 0)
            FAIL("hide %s: bind /dev/null", view_path);
        set_mount_attr(dst, MOUNT_ATTR_RDONLY, 0, "hide");
    }
}

static void set_init_name(void)
{
    if (prctl(PR_SET_NAME, INIT_NAME, 0, 0, 0) < 0)
        FAIL("prctl PR_SET_NAME");
    /* argv[0]..argv[argc-1] are contiguous: overwrite them so that cmdline shows the name too. */
    char *start = g_argv[0];
    char *end = g_argv[g_argc - 1] + strlen(g_argv[g_argc - 1]);
    size_t len = (size_t)(end - start);
    memset(start, 0, len);
    memcpy(start, INIT_NAME, len < sizeof INIT_NAME - 1 ? len : sizeof INIT_NAME - 1);
}

__attribute__((noreturn)) static void run_init(void)
{
    /* Without a PID namespace of its own (--host-pids) the init is an ordinary process:
     * kill(-1) would reach every process its uid may signal, other jobs' among them.  It
     * only holds the namespaces; the epilog ends the processes of its mount namespace. */
    int own_pid_ns = getpid() == 1;
    sigset_t all, wanted;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    sigemptyset(&wanted);
    sigaddset(&wanted, SIGCHLD);
    sigaddset(&wanted, SIGTERM);
    sigaddset(&wanted, SIGINT);
    for (;;) {
        /* Blocked signals are queued even for PID 1 with SIG_DFL, so sigwaitinfo sees them. */
        int sig = sigwaitinfo(&wanted, NULL);
        if (sig == SIGTERM || sig == SIGINT) {
            if (own_pid_ns)
                kill(-1, SIGKILL); /* every other process of the PID namespace */
            _exit(0);
        }
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
    }
}

__attribute__((noreturn)) static void run_b(const struct start_opts *o, const int *fds)
{
    char path[PATH_MAX];
    umask(022);
    /* Until ready, die with A: a launcher that gave up must not leave a half-built root. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        FAIL("prctl PR_SET_PDEATHSIG");
    if (setsid() < 0)
        FAIL("setsid");
    /* Scratch, only in this namespace: holds the overlay until the final pivot_root. */
    if (mount("sdeefs-scratch", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k") < 0)
        FAIL("mount scratch tmpfs on /tmp");
    if (mkdir("/tmp/newroot", 0755) < 0 || mkdir("/tmp/oldroot", 0755) < 0)
        FAIL("mkdir scratch");
    if (o->view)
        bind_view("/tmp/newroot", fds[0]);
    else
        mount_overlay("/tmp/newroot", fds, o->nlower, o->scratch);
    for (int i = 0; i < layer_count(o); i++)
        close(fds[i]);
    if (chdir("/tmp") < 0)
        FAIL("chdir /tmp");
    if (sys_pivot_root(".", "oldroot") < 0)
        FAIL("pivot_root to scratch");
    if (chdir("/") < 0)
        FAIL("chdir /");

    setup_proc(o->host_pids);
    setup_dev();
    setup_sys();
    setup_tmp(o->tmp_size, o->tmp_dir ? fds[layer_count(o)] : -1);
    setup_run();
    setup_bind(o->home, o->home, 0, "home");
    for (int i = 0; i < o->nbinds; i++) {
        snprintf(path, sizeof path, "%s %s", o->binds[i].ro ? "ro-bind" : "bind", o->binds[i].dst);
        setup_bind(o->binds[i].src, o->binds[i].dst, o->binds[i].ro, path);
    }
    for (int i = 0; i < o->nhide; i++)
        setup_hide(o->hide[i]);

    if (umount2("/oldroot", MNT_DETACH) < 0)
        FAIL("detach host root");
    if (chdir("/newroot") < 0)
        FAIL("chdir /newroot");
    if (sys_pivot_root(".", ".") < 0)
        FAIL("pivot_root");
    if (umount2(".", MNT_DETACH) < 0)
        FAIL("detach scratch");
    if (chdir("/") < 0)
        FAIL("chdir /");

    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0)
        FAIL("open /dev/null");
    if (dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0)
        FAIL("dup2 /dev/null");
    /* Nothing of the host may stay reachable through /proc/1/fd. */
    if (g_report > 3)
        sys_close_range(3, (unsigned)g_report - 1);
    sys_close_range((unsigned)g_report + 1, ~0U);
    /* The init is inside root, as an init is (B ran as the user's own uid so far, which
     * the full map keeps as itself: docs/identity.md); its capabilities stay. */
    if (setresgid(0, 0, 0) < 0 || setresuid(0, 0, 0) < 0)
        FAIL("become inside root");
    if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) < 0) /* the uid change cleared it; see run_a */
        FAIL("prctl PR_SET_DUMPABLE");
    set_init_name();
    if (prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0) < 0) /* from now on B *is* the environment */
        FAIL("prctl PR_SET_PDEATHSIG");
    send_msg(g_report, "R");
    close(g_report);
    g_report = -1;
    run_init();
}

/* ---- A: become U, own the user namespace, create the mount and PID namespaces ---- */

__attribute__((noreturn)) static void run_a(const struct start_opts *o, int sock)
{
    char buf[64];
    int fds[MAX_LAYERS], nfds = 0;
    g_report = sock;
    if (setsid() < 0)
        FAIL("setsid");
    /* A outlives this call, in the environment's mount namespace: a cwd in the host tree (the
     * caller's, e.g. slurmd's spool) would keep B's detached copy of every host mount alive,
     * and with it the FUSE daemons of users who logged out.  At "/", B's pivot_root moves it. */
    if (chdir("/") < 0)
        FAIL("chdir /");
    if (setgroups(0, NULL) < 0)
        FAIL("setgroups");
    if (setresgid(o->gid, o->gid, o->gid) < 0)
        FAIL("setresgid");
    if (setresuid(o->uid, o->uid, o->uid) < 0)
        FAIL("setresuid");
    /* After the uid change: the namespace is owned by U, who can setns into it later. */
    if (unshare(CLONE_NEWUSER) < 0)
        FAIL("unshare user namespace");
    send_msg(sock, "U");
    expect_msg(sock, 'M', buf, sizeof buf, "wait for id maps");
    if (unshare(CLONE_NEWNS | (o->host_pids ? 0 : CLONE_NEWPID)) < 0)
        FAIL("unshare mount and pid namespaces");
    if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0)
        FAIL("make / a recursive slave");
    send_msg(sock, "N");
    if (recv_msg(sock, buf, sizeof buf, fds, &nfds, "receive layer fds") == 0)
        fail("receive layer fds: the launcher exited");
    if (buf[0] != 'F' || nfds != fd_count(o))
        fail("receive layer fds: got %d fds, expected %d", nfds, fd_count(o));
    /* The uid change made us non-dumpable: /proc/<init>/ns/ files would then be root-only and
     * U could not join.  B inherits the flag through fork. */
    if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) < 0)
        FAIL("prctl PR_SET_DUMPABLE");
    int null = open("/dev/null", O_RDWR | O_CLOEXEC); /* before B's pivot_root changes our root */
    if (null < 0)
        FAIL("open /dev/null");
    pid_t b = fork();
    if (b < 0)
        FAIL("fork init");
    if (b == 0) {
        close(null);
        run_b(o, fds);
    }
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
    snprintf(buf, sizeof buf, "P%d", (int)b);
    if (send(sock, buf, strlen(buf), MSG_NOSIGNAL) < 0) {
        kill(b, SIGKILL);
        _exit(1);
    }
    close(sock);
    g_report = -1;
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    sys_close_range(3, ~0U);
    int status;
    while (waitpid(b, &status, 0) < 0)
        if (errno != EINTR)
            _exit(1);
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
}

/* ---- P: the root process that was called ---- */

int cmd_start(int argc, char **argv)
{
    struct start_opts o;
    parse_start(&o, argc, argv);

    /* Absolute paths now: after setns our cwd is the namespace's root. */
    char *paths[MAX_LAYERS];
    int npaths = 0;
    const char *given[MAX_LAYERS];
    memcpy(given, o.lower, sizeof(char *) * (size_t)o.nlower);
    given[o.nlower] = o.upper;
    given[o.nlower + 1] = o.work;
    if (o.view)
        given[0] = o.view;
    given[layer_count(&o)] = o.tmp_dir; /* (past the layers: not sent without --tmp-dir) */
    for (int i = 0; i < fd_count(&o); i++)
        if (!(paths[npaths++] = realpath(given[i], NULL)))
            FAIL("layer %s", given[i]);

    int host_mnt = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC);
    if (host_mnt < 0)
        FAIL("open /proc/self/ns/mnt");
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        FAIL("socketpair");
    struct timeval tv = {SETUP_TIMEOUT_S, 0};
    if (setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0)
        FAIL("setsockopt");
    fflush(NULL);
    pid_t a = fork();
    if (a < 0)
        FAIL("fork");
    if (a == 0) {
        close(sv[0]);
        close(host_mnt);
        run_a(&o, sv[1]);
    }
    g_child = a;
    close(sv[1]);
    int sock = sv[0];
    char buf[1200];

    expect_msg(sock, 'U', buf, sizeof buf, "create user namespace");
    write_id_maps(a, &o.uid_map, &o.gid_map);
    send_msg(sock, "M");
    expect_msg(sock, 'N', buf, sizeof buf, "create mount and pid namespaces");

    /* Open the layers as host root but inside A's new mount namespace (see the header). */
    char nspath[64];
    snprintf(nspath, sizeof nspath, "/proc/%d/ns/mnt", (int)a);
    int env_mnt = open(nspath, O_RDONLY | O_CLOEXEC);
    if (env_mnt < 0)
        FAIL("open %s", nspath);
    if (setns(env_mnt, CLONE_NEWNS) < 0)
        FAIL("setns into the environment's mount namespace");
    int fds[MAX_LAYERS];
    for (int i = 0; i < npaths; i++) {
        fds[i] = open(paths[i], O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fds[i] < 0) {
            int err = errno;
            setns(host_mnt, CLONE_NEWNS);
            fail_errno(err, "open layer %s", given[i]);
        }
    }
    if (setns(host_mnt, CLONE_NEWNS) < 0)
        FAIL("setns back to the host mount namespace");
    close(env_mnt);
    close(host_mnt);

    char cbuf[CMSG_SPACE(sizeof(int) * MAX_LAYERS)];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = {"F", 1};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                        .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)npaths)};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)npaths);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)npaths);
    if (sendmsg(sock, &mh, MSG_NOSIGNAL) < 0)
        FAIL("send layer fds");
    for (int i = 0; i < npaths; i++)
        close(fds[i]);

    /* A sends P<pid> right after its fork and B sends R once it is set up: two processes,
     * so either may come first (on a loaded node B once finished before A was scheduled
     * again, and its R was taken for a wrong answer: "unexpected message"). */
    pid_t b = 0;
    int ready = 0;
    while (b <= 0 || !ready) {
        const char *step = b > 0 ? "set up the environment" : "fork init";
        if (recv_msg(sock, buf, sizeof buf, NULL, NULL, step) == 0)
            fail("%s: the environment exited during setup", step);
        if (buf[0] == 'P' && b <= 0) {
            b = (pid_t)atoi(buf + 1);
            if (b <= 0)
                fail("fork init: bad pid from the environment");
            g_grandchild = b;
        } else if (buf[0] == 'R' && !ready) {
            ready = 1;
        } else {
            fail("%s: unexpected message from the environment", step);
        }
    }
    printf("%d\n", (int)b);
    if (fflush(stdout) != 0)
        FAIL("write pid");
    return 0; /* A is left running as B's parent; it reaps B and exits with it */
}
