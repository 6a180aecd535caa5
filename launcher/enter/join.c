/*
 * sdeefs-enter join --pid PID [--cwd DIR] [--keep-cap NAME ...] -- CMD [ARG...] (as U or root):
 * run CMD inside the environment whose init is PID (user, mount and PID namespaces), with
 * no_new_privs and a reduced capability set.  U may join only U's environments; host root
 * becomes U on the way in.
 */
#include "enter.h"

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

static const char *const cap_names[] = {
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
    "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
    "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore"};
#define NCAP_NAMES ((int)(sizeof cap_names / sizeof *cap_names))

static int cap_from_name(const char *name)
{
    if (!strncasecmp(name, "cap_", 4))
        name += 4;
    for (int i = 0; i < NCAP_NAMES; i++)
        if (!strcasecmp(name, cap_names[i]))
            return i;
    return -1;
}

static volatile sig_atomic_t g_join_child = -1;

static void forward_signal(int sig, siginfo_t *si, void *uctx)
{
    (void)uctx;
    /* Only what someone sent us with kill(2): the terminal's signals (si_code SI_KERNEL)
     * already reach the child, which is in our process group. */
    if (si->si_code <= 0 && g_join_child > 0)
        kill(g_join_child, sig);
}

static ssize_t read_at(int dirfd, const char *name, char *buf, size_t size)
{
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    int err = errno;
    close(fd);
    errno = err;
    if (n >= 0)
        buf[n] = 0;
    return n;
}

/* Root's PATH (Debian's ENV_SUPATH) first, then whatever else the caller's PATH holds:
 * inside, the user is root, and ldconfig, useradd, apt's helpers live in sbin. */
static void root_path(void)
{
    static const char base[] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    const char *old = getenv("PATH");
    char path[8192];
    size_t n = (size_t)snprintf(path, sizeof path, "%s", base);
    char copy[8192];
    snprintf(copy, sizeof copy, "%s", old ? old : "");
    char *save = NULL;
    for (char *dir = strtok_r(copy, ":", &save); dir; dir = strtok_r(NULL, ":", &save)) {
        char padded[8200], haystack[sizeof base + 2];
        snprintf(padded, sizeof padded, ":%s:", dir);
        snprintf(haystack, sizeof haystack, ":%s:", base);
        if (strstr(haystack, padded) || n + strlen(dir) + 2 >= sizeof path)
            continue;
        n += (size_t)snprintf(path + n, sizeof path - n, ":%s", dir);
    }
    if (setenv("PATH", path, 1) < 0)
        FAIL("setenv PATH");
}

static void drop_capabilities(const uint64_t keep)
{
    for (int cap = 0; cap < 64; cap++) {
        if (keep & (1ULL << cap))
            continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) {
            if (errno == EINVAL)
                break; /* beyond the kernel's last capability */
            FAIL("drop %s from the bounding set", cap < NCAP_NAMES ? cap_names[cap] : "cap");
        }
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        FAIL("clear ambient capabilities");
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) < 0)
        FAIL("capget");
    for (int i = 0; i < 2; i++) {
        uint32_t k = (uint32_t)(keep >> (32 * i));
        data[i].permitted &= k;
        data[i].effective &= k;
        data[i].inheritable = 0;
    }
    if (syscall(SYS_capset, &hdr, data) < 0)
        FAIL("capset");
}

int cmd_join(int argc, char **argv)
{
    long pid = -1;
    const char *cwd = NULL;
    uint64_t keep = (1ULL << CAP_CHOWN) | (1ULL << CAP_DAC_OVERRIDE) | (1ULL << CAP_FOWNER) |
                    (1ULL << CAP_FSETID) | (1ULL << CAP_KILL) | (1ULL << CAP_SETGID) |
                    (1ULL << CAP_SETUID) | (1ULL << CAP_SETFCAP) |
                    (1ULL << CAP_NET_BIND_SERVICE) | (1ULL << CAP_AUDIT_WRITE);
    int i = 0;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        if (argv[i][0] != '-')
            break;
        if (i + 1 >= argc)
            usage("join: %s needs a value", argv[i]);
        if (!strcmp(argv[i], "--pid")) {
            unsigned v = parse_id("--pid", argv[++i]);
            if (v == 0 || v > INT_MAX)
                usage("--pid: not a pid: %s", argv[i]);
            pid = v;
        } else if (!strcmp(argv[i], "--cwd"))
            cwd = argv[++i];
        else if (!strcmp(argv[i], "--keep-cap")) {
            int cap = cap_from_name(argv[++i]);
            if (cap < 0)
                usage("--keep-cap: unknown capability %s", argv[i]);
            keep |= 1ULL << cap;
        } else
            usage("join: unknown option %s", argv[i]);
    }
    if (pid < 0 || i >= argc)
        usage("join --pid PID [--cwd DIR] [--keep-cap NAME ...] -- CMD [ARG...]");
    char **cmd = argv + i;

    /* Everything through one /proc/PID directory fd: if the pid is recycled meanwhile, the
     * reads fail instead of describing another process. */
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld", pid);
    int pdir = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (pdir < 0) {
        if (errno == ENOENT)
            fail("check pid %ld: no such process", pid);
        FAIL("check pid %ld", pid);
    }
    char buf[4096];
    if (read_at(pdir, "comm", buf, sizeof buf) < 0)
        FAIL("check pid %ld: read comm", pid);
    if (strcmp(buf, INIT_NAME "\n"))
        fail("check pid %ld: not an sdeefs environment (its name is %.*s)", pid,
             (int)strcspn(buf, "\n"), buf);
    uid_t me = getuid();
    int ns_user = openat(pdir, "ns/user", O_RDONLY | O_CLOEXEC);
    if (ns_user < 0 && (errno == EACCES || errno == EPERM))
        fail("check pid %ld: the environment does not belong to uid %u (its namespaces are "
             "closed to it)",
             pid, (unsigned)me);
    if (ns_user < 0)
        FAIL("open /proc/%ld/ns/user", pid);
    if (me != 0 || geteuid() != 0) {
        /* Whose environment: the owner of its user namespace (the user the launcher made it
         * for; its init runs as inside root, a subordinate id, docs/identity.md). */
        uid_t owner;
        if (ioctl(ns_user, NS_GET_OWNER_UID, &owner) < 0)
            FAIL("check pid %ld: the owner of its user namespace", pid);
        if (owner != me)
            fail("check pid %ld: the environment belongs to uid %u, not to uid %u", pid,
                 (unsigned)owner, (unsigned)me);
    }
    int ns_mnt = openat(pdir, "ns/mnt", O_RDONLY | O_CLOEXEC);
    if (ns_mnt < 0)
        FAIL("open /proc/%ld/ns/mnt", pid);
    int ns_pid = openat(pdir, "ns/pid", O_RDONLY | O_CLOEXEC);
    if (ns_pid < 0)
        FAIL("open /proc/%ld/ns/pid", pid);
    close(pdir);

    struct stat theirs, ours;
    if (fstat(ns_user, &theirs) < 0 || stat("/proc/self/ns/user", &ours) < 0)
        FAIL("stat user namespaces");
    if (theirs.st_ino != ours.st_ino || theirs.st_dev != ours.st_dev) {
        /* Host root would keep its supplementary groups (0 among them) otherwise; the
         * environment's setgroups is "deny", so this is the last moment to drop them. */
        if (geteuid() == 0 && setgroups(0, NULL) < 0)
            FAIL("setgroups");
        if (setns(ns_user, CLONE_NEWUSER) < 0)
            FAIL("setns user");
        /* Inside root: host S, the user's first subordinate id (docs/identity.md), or
         * host U in an environment of the old one-line map. */
        if (setresgid(0, 0, 0) < 0)
            FAIL("setresgid");
        if (setresuid(0, 0, 0) < 0)
            FAIL("setresuid");
    }
    if (setns(ns_mnt, CLONE_NEWNS) < 0)
        FAIL("setns mnt");
    if (setns(ns_pid, CLONE_NEWPID) < 0)
        FAIL("setns pid");
    close(ns_user);
    close(ns_mnt);
    close(ns_pid);

    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    pid_t child = fork();
    if (child < 0)
        FAIL("fork");
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &old, NULL);
        if (cwd) {
            if (chdir(cwd) < 0)
                FAIL("chdir %s", cwd);
        } else {
            const char *home = getenv("HOME");
            if (!home || !*home || chdir(home) < 0)
                if (chdir("/") < 0)
                    FAIL("chdir /");
        }
        if (geteuid() == 0)
            root_path();
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
            FAIL("prctl PR_SET_NO_NEW_PRIVS");
        drop_capabilities(keep);
        sys_close_range(3, ~0U);
        execvp(cmd[0], cmd);
        FAIL("exec %s", cmd[0]);
    }
    g_join_child = child;
    struct sigaction sa = {.sa_sigaction = forward_signal, .sa_flags = SA_SIGINFO | SA_RESTART};
    sigemptyset(&sa.sa_mask);
    int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
    for (size_t k = 0; k < sizeof forwarded / sizeof *forwarded; k++)
        sigaction(forwarded[k], &sa, NULL);
    sigprocmask(SIG_SETMASK, &old, NULL);
    int status;
    while (waitpid(child, &status, 0) < 0)
        if (errno != EINTR)
            FAIL("waitpid");
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

