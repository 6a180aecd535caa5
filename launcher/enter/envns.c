/*
 * Joining an environment's namespaces, shared by "sdeefs-enter join" (join.c) and the SLURM
 * SPANK plugin (spank.c, built into sdeefs_spank.so).  Nothing here exits or prints: every
 * function returns 0, or -1 with one line in err (the step and the reason), so that the
 * command can fail() and the plugin can report through SLURM.
 */
#include "envns.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/nsfs.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

static int errf(char *err, size_t len, int errnum, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err, len, fmt, ap);
    va_end(ap);
    if (errnum && n >= 0 && (size_t)n < len)
        snprintf(err + n, len - (size_t)n, ": %s", strerror(errnum));
    return -1;
}

ssize_t env_read_small(int dirfd, const char *name, char *buf, size_t size)
{
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    int saved = errno;
    close(fd);
    errno = saved;
    if (n >= 0)
        buf[n] = 0;
    return n;
}

void env_ns_close(struct env_ns *ns)
{
    int *fds[] = {&ns->user, &ns->mnt, &ns->pid};
    for (size_t i = 0; i < sizeof fds / sizeof *fds; i++)
        if (*fds[i] >= 0) {
            close(*fds[i]);
            *fds[i] = -1;
        }
}

int env_ns_open(long pid, long owner, struct env_ns *ns, char *err, size_t len)
{
    ns->user = ns->mnt = ns->pid = -1;
    /* Everything through one /proc/PID directory fd: if the pid is recycled meanwhile, the
     * reads fail instead of describing another process. */
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld", pid);
    int pdir = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (pdir < 0)
        return errno == ENOENT ? errf(err, len, 0, "check pid %ld: no such process", pid)
                               : errf(err, len, errno, "check pid %ld", pid);
    char buf[256];
    if (env_read_small(pdir, "comm", buf, sizeof buf) < 0) {
        int saved = errno;
        close(pdir);
        return errf(err, len, saved, "check pid %ld: read comm", pid);
    }
    if (strcmp(buf, ENV_INIT_NAME "\n")) {
        close(pdir);
        return errf(err, len, 0, "check pid %ld: not an sdeefs environment (its name is %.*s)",
                    pid, (int)strcspn(buf, "\n"), buf);
    }
    ns->user = openat(pdir, "ns/user", O_RDONLY | O_CLOEXEC);
    if (ns->user < 0) {
        int saved = errno;
        close(pdir);
        if (saved == EACCES || saved == EPERM)
            return errf(err, len, 0, "check pid %ld: the environment does not belong to uid %u "
                        "(its namespaces are closed to it)", pid, (unsigned)getuid());
        return errf(err, len, saved, "open /proc/%ld/ns/user", pid);
    }
    if (owner >= 0) {
        /* Whose environment: the owner of its user namespace (the user the launcher made it
         * for; its init runs as inside root, a subordinate id, docs/identity.md). */
        uid_t found;
        if (ioctl(ns->user, NS_GET_OWNER_UID, &found) < 0) {
            int saved = errno;
            close(pdir);
            env_ns_close(ns);
            return errf(err, len, saved, "check pid %ld: the owner of its user namespace", pid);
        }
        if ((long)found != owner) {
            close(pdir);
            env_ns_close(ns);
            return errf(err, len, 0, "check pid %ld: the environment belongs to uid %u, not to "
                        "uid %ld", pid, (unsigned)found, owner);
        }
    }
    const char *names[] = {"ns/mnt", "ns/pid"};
    int *fds[] = {&ns->mnt, &ns->pid};
    for (int i = 0; i < 2; i++)
        if ((*fds[i] = openat(pdir, names[i], O_RDONLY | O_CLOEXEC)) < 0) {
            int saved = errno;
            close(pdir);
            env_ns_close(ns);
            return errf(err, len, saved, "open /proc/%ld/%s", pid, names[i]);
        }
    close(pdir);
    return 0;
}

/* Is the namespace behind fd the one this process is in (of the kind named by self)? */
static int same_ns(int fd, const char *self)
{
    struct stat theirs, ours;
    if (fstat(fd, &theirs) < 0 || stat(self, &ours) < 0)
        return -1;
    return theirs.st_ino == ours.st_ino && theirs.st_dev == ours.st_dev;
}

int env_ns_join_user(const struct env_ns *ns, char *err, size_t len)
{
    int same = same_ns(ns->user, "/proc/self/ns/user");
    if (same < 0)
        return errf(err, len, errno, "stat user namespaces");
    if (same)
        return 0;
    if (setns(ns->user, CLONE_NEWUSER) < 0)
        return errf(err, len, errno, "setns user");
    return 1;
}

int env_ns_join_rest(const struct env_ns *ns, char *err, size_t len)
{
    /* A job's environment has no PID namespace of its own (start --host-pids: tasks that
     * SLURM forked cannot move into one, see spank.c).  Asked before the mount namespace
     * changes: a login's /proc is its own PID namespace's, where we are not. */
    int same = same_ns(ns->pid, "/proc/self/ns/pid_for_children");
    if (same < 0)
        return errf(err, len, errno, "stat pid namespaces");
    if (setns(ns->mnt, CLONE_NEWNS) < 0)
        return errf(err, len, errno, "setns mnt");
    if (!same && setns(ns->pid, CLONE_NEWPID) < 0)
        return errf(err, len, errno, "setns pid");
    return 0;
}

int env_has_own_pid_ns(const struct env_ns *ns)
{
    return same_ns(ns->pid, "/proc/self/ns/pid") == 0;
}

int drop_capabilities(uint64_t keep, char *err, size_t len)
{
    for (int cap = 0; cap < 64; cap++) {
        if (keep & (1ULL << cap))
            continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) {
            if (errno == EINVAL)
                break; /* beyond the kernel's last capability */
            return errf(err, len, errno, "drop capability %d from the bounding set", cap);
        }
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
        return errf(err, len, errno, "clear ambient capabilities");
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) < 0)
        return errf(err, len, errno, "capget");
    for (int i = 0; i < 2; i++) {
        uint32_t k = (uint32_t)(keep >> (32 * i));
        data[i].permitted &= k;
        data[i].effective &= k;
        data[i].inheritable = 0;
    }
    if (syscall(SYS_capset, &hdr, data) < 0)
        return errf(err, len, errno, "capset");
    return 0;
}

void env_json_string(const char *json, const char *key, char *out, size_t size)
{
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\": \"", key);
    const char *p = strstr(json, pattern);
    size_t n = 0;
    if (p)
        for (p += strlen(pattern); *p && *p != '"' && n + 1 < size; p++) {
            char c = *p;
            if (c == '\\' && p[1]) {
                c = *++p;
                if (c == 'n' || c == 't' || c == 'r')
                    c = ' ';
                else if (c == 'u') {
                    unsigned v = 0;
                    if (sscanf(p + 1, "%4x", &v) == 1)
                        p += 4;
                    c = v >= 0x20 && v < 0x7f ? (char)v : '?';
                }
            }
            out[n++] = c;
        }
    out[n] = 0;
}

void env_substitute_node(const char *path, const char *node, char *out, size_t size)
{
    size_t n = 0;
    for (const char *p = path; *p && n + 1 < size; p++) {
        if (p[0] == '%' && p[1] == 'n') {
            n += (size_t)snprintf(out + n, size - n, "%s", node);
            if (n >= size)
                n = size - 1;
            p++;
        } else
            out[n++] = *p;
    }
    out[n] = 0;
}
