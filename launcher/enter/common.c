/* What the commands share: error reporting, syscall wrappers, ids and id maps (see enter.h). */
#include "enter.h"

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                     */

int g_report = -1;
pid_t g_child = -1;
pid_t g_grandchild = -1;

/* Kill what we forked.  B first, and let A reap it (A exits as soon as B is gone): killing A
 * first would orphan B to the host's PID 1, which need not reap it. */
void cleanup_children(void)
{
    if (g_grandchild > 0 && g_child > 0) {
        kill(g_grandchild, SIGKILL);
        for (int i = 0; i < 2000; i++) { /* up to 2 s */
            pid_t r = waitpid(g_child, NULL, WNOHANG);
            if (r == g_child || (r < 0 && errno != EINTR))
                return;
            usleep(1000);
        }
    }
    if (g_child > 0) {
        kill(g_child, SIGKILL);
        while (waitpid(g_child, NULL, 0) < 0 && errno == EINTR)
            ;
    }
}

void emit_line(const char *line)
{
    if (g_report >= 0) {
        char msg[1100];
        int n = snprintf(msg, sizeof msg, "E%s", line);
        if (send(g_report, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1,
                 MSG_NOSIGNAL) >= 0)
            return;
    }
    fprintf(stderr, "%s\n", line);
}

void fail(const char *fmt, ...)
{
    char line[1024];
    int n = snprintf(line, sizeof line, "sdeefs-enter: ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    for (char *c = line; *c; c++) /* exactly one line */
        if (*c == '\n')
            *c = ' ';
    emit_line(line);
    cleanup_children();
    _exit(1);
}

void fail_errno(int err, const char *fmt, ...)
{
    char step[700];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(step, sizeof step, fmt, ap);
    va_end(ap);
    fail("%s: %s", step, strerror(err));
}

void usage(const char *fmt, ...)
{
    char msg[700];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "sdeefs-enter: usage: %s\n", msg);
    _exit(2);
}

/* ------------------------------------------------------------------------------------------ */
/* Syscalls without a glibc wrapper, ids, id maps                                            */

int sys_open_tree(int dfd, const char *path, unsigned flags)
{
    return (int)syscall(SYS_open_tree, dfd, path, flags);
}
int sys_move_mount(int from_dfd, const char *from, int to_dfd, const char *to, unsigned flags)
{
    return (int)syscall(SYS_move_mount, from_dfd, from, to_dfd, to, flags);
}
int sys_mount_setattr(int dfd, const char *path, unsigned flags, struct mount_attr *attr)
{
    return (int)syscall(SYS_mount_setattr, dfd, path, flags, attr, sizeof *attr);
}
int sys_close_range(unsigned first, unsigned last)
{
    return (int)syscall(SYS_close_range, first, last, 0);
}

unsigned parse_id(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (!*s || *end || errno || v >= UINT32_MAX || !isdigit((unsigned char)*s))
        usage("%s: not a numeric id: %s", opt, s);
    return (unsigned)v;
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        FAIL("open %s", path);
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len)
        FAIL("write %s", path);
    if (close(fd) < 0)
        FAIL("write %s", path);
}

/* "INSIDE:HOST:COUNT,..." (sdeefs/identity.py's format_map) into /proc/PID/uid_map's
 * format, one line each; the kernel itself refuses overlapping lines. */
void parse_id_map(const char *opt, const char *text, struct id_map *m)
{
    size_t n = 0;
    int lines = 0;
    const char *c = text;
    while (*c) {
        unsigned long v[3];
        for (int k = 0; k < 3; k++) {
            char *end;
            if (!isdigit((unsigned char)*c))
                usage("%s: expected INSIDE:HOST:COUNT[,...]: %s", opt, text);
            errno = 0;
            v[k] = strtoul(c, &end, 10);
            int sep_ok = k < 2 ? *end == ':' : (*end == ',' && end[1]) || *end == 0;
            if (errno || v[k] >= UINT32_MAX || !sep_ok)
                usage("%s: expected INSIDE:HOST:COUNT[,...]: %s", opt, text);
            c = *end ? end + 1 : end;
        }
        if (v[2] == 0 || ++lines > MAX_MAP_LINES)
            usage("%s: an empty line, or more than %d lines: %s", opt, MAX_MAP_LINES, text);
        if (v[1] == 0) /* nothing inside may ever be host root (uid or gid 0) */
            usage("%s: refusing a map to host id 0: %s", opt, text);
        n += (size_t)snprintf(m->text + n, sizeof m->text - n, "%lu %lu %lu\n", v[0], v[1], v[2]);
        if (n >= sizeof m->text)
            usage("%s: too long", opt);
    }
    if (!lines)
        usage("%s: empty", opt);
    m->set = 1;
}

void single_id_map(struct id_map *m, unsigned id)
{
    snprintf(m->text, sizeof m->text, "0 %u 1\n", id);
    m->set = 1;
}

/* A map of one line (the old "0 U 1") keeps setgroups "deny", as an unprivileged writer
 * would have to.  A full map (identity.md) allows setgroups: apt, sshd and su drop or
 * switch groups inside, and every group the map holds is the user's own or a subordinate
 * one (as newgidmap allows for rootless containers). */
void write_id_maps(pid_t pid, const struct id_map *uid_map, const struct id_map *gid_map)
{
    char path[64];
    if (!strchr(gid_map->text, '\n') || !strchr(strchr(gid_map->text, '\n') + 1, '\n')) {
        snprintf(path, sizeof path, "/proc/%d/setgroups", (int)pid);
        write_file(path, "deny");
    }
    snprintf(path, sizeof path, "/proc/%d/uid_map", (int)pid);
    write_file(path, uid_map->text);
    snprintf(path, sizeof path, "/proc/%d/gid_map", (int)pid);
    write_file(path, gid_map->text);
}
