/*
 * sdeefs-enter join --pid PID [--cwd DIR] [--keep-cap NAME ...] -- CMD [ARG...] (as U or root):
 * run CMD inside the environment whose init is PID (user, mount and PID namespaces), with
 * no_new_privs and a reduced capability set.  U may join only U's environments; host root
 * becomes U on the way in.
 */
#include "enter.h"
#include "envns.h"

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

    char err[600];
    struct env_ns ns;
    /* U may join only U's environments (the owner of their user namespace); root any. */
    long owner = (getuid() != 0 || geteuid() != 0) ? (long)getuid() : -1;
    if (env_ns_open(pid, owner, &ns, err, sizeof err) < 0)
        fail("%s", err);
    /* Host root would keep its supplementary groups (0 among them) otherwise; the
     * environment's setgroups is "deny", so this is the last moment to drop them. */
    if (geteuid() == 0 && setgroups(0, NULL) < 0)
        FAIL("setgroups");
    int joined = env_ns_join_user(&ns, err, sizeof err);
    if (joined < 0)
        fail("%s", err);
    if (joined) {
        /* Inside root: host S, the user's first subordinate id (docs/identity.md), or
         * host U in an environment of the old one-line map. */
        if (setresgid(0, 0, 0) < 0)
            FAIL("setresgid");
        if (setresuid(0, 0, 0) < 0)
            FAIL("setresuid");
    }
    if (env_ns_join_rest(&ns, err, sizeof err) < 0)
        fail("%s", err);
    env_ns_close(&ns);

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
        if (drop_capabilities(keep, err, sizeof err) < 0)
            fail("%s", err);
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

