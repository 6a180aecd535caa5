/*
 * sdeefs-shell [--engine E] [ARG...]: the login shell (this binary under that name, or
 * "sdeefs-enter shell").  Finds the caller's environment from RUN/USER/init, asks
 * sdeefs-launchd to start one if none runs, and joins it with the user's inner shell.
 *
 * RUN is $SDEEFS_RUN_DIR or /run/sdeefs; both file names here, RUN/USER/init and
 * RUN/launchd.sock, are defined by the launcher (launcher/layout.py).
 */
#include "enter.h"

enum { ENV_RUNNING, ENV_MISSING, ENV_DAMAGED, ENV_GONE };

/* RUN/USER/init ("PID START ENGINE\n", written by the launcher): is that process still the
 * environment's init?  The pid must still be the same process: compare its start time. */
static int find_env(const char *run_dir, const char *user, unsigned long *pid, char engine[16],
                    char path[PATH_MAX])
{
    char buf[128], stat_buf[1024], proc[64];
    snprintf(path, PATH_MAX, "%s/%s/init", run_dir, user);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ENV_MISSING;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    unsigned long long start = 0, now_start = 0;
    engine[0] = 0;
    if (n <= 0 || (buf[n] = 0, sscanf(buf, "%lu %llu %15s", pid, &start, engine) < 2) || !*pid)
        return ENV_DAMAGED;
    snprintf(proc, sizeof proc, "/proc/%lu/stat", *pid);
    fd = open(proc, O_RDONLY | O_CLOEXEC);
    n = fd < 0 ? -1 : read(fd, stat_buf, sizeof stat_buf - 1);
    if (fd >= 0)
        close(fd);
    char *after = n > 0 ? (stat_buf[n] = 0, strrchr(stat_buf, ')')) : NULL;
    if (!after || sscanf(after + 2, "%*c %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s "
                                    "%*s %*s %*s %*s %*s %llu", &now_start) != 1 ||
        now_start != start)
        return ENV_GONE;
    return ENV_RUNNING;
}

/* The one JSON client of this program: one request to RUN/launchd.sock (sdeefs-launchd,
 * launcher/login/service.py, a JSON-line control socket: sdeefs/control.py), 0 once it started
 * the caller's environment, -1 if no service listens.  Its refusal is printed (one line) and
 * ends us with its exit code.  The reply is Python's json.dumps of a flat object: the fields
 * read here are "ok": true, or "error": "<one line>" and "code": <exit code>. */
static int ask_launchd(const char *run_dir, const char *engine)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (snprintf(addr.sun_path, sizeof addr.sun_path, "%s/launchd.sock", run_dir) >=
        (int)sizeof addr.sun_path)
        return -1;
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(sock);
        return -1;
    }
    char req[96], reply[4096];
    int len = snprintf(req, sizeof req, engine ? "{\"op\": \"start\", \"engine\": \"%s\"}\n"
                                               : "{\"op\": \"start\"}\n", engine);
    size_t got = 0;
    if (write(sock, req, (size_t)len) != len) {
        close(sock);
        return -1;
    }
    for (;;) {
        ssize_t n = read(sock, reply + got, sizeof reply - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
        if (memchr(reply, '\n', got) || got == sizeof reply - 1)
            break;
    }
    close(sock);
    reply[got] = 0;
    if (strstr(reply, "\"ok\": true"))
        return 0;
    /* {"ok": false, "error": "...", "code": N}: print the error, unescaping \" and \\ */
    const char *err = strstr(reply, "\"error\": \"");
    const char *code = strstr(reply, "\"code\": ");
    fputs("sdeefs-shell: ", stderr);
    for (const char *c = err ? err + 10 : "sdeefs-launchd gave no answer\""; *c && *c != '"'; c++) {
        if (*c == '\\' && c[1])
            c++;
        fputc(*c, stderr);
    }
    fputc('\n', stderr);
    int status = code ? atoi(code + 8) : 1;
    exit(status > 0 && status < 126 ? status : 1);
}

/* ------------------------------------------------------------------------------------------ */
/* The login shell                                                                            */

int cmd_shell(int argc, char **argv, int login)
{
    const char *run_dir = getenv("SDEEFS_RUN_DIR");
    if (!run_dir || !*run_dir)
        run_dir = "/run/sdeefs";
    struct passwd *pw = getpwuid(getuid());
    if (!pw)
        fail("shell: uid %u has no passwd entry", (unsigned)getuid());
    /* --engine E: join only an environment of that engine (all sessions share one, so the
     * engine is chosen when it starts: config, or `sdeefs start USER --engine E`). */
    const char *want_engine = NULL;
    if (argc >= 2 && !strcmp(argv[0], "--engine")) {
        want_engine = argv[1];
        if (strcmp(want_engine, "hybrid") && strcmp(want_engine, "fuse") &&
            strcmp(want_engine, "overlay"))
            usage("shell: --engine must be hybrid, fuse or overlay, not %s", want_engine);
        argc -= 2;
        argv += 2;
    }
    unsigned long pid = 0;
    char engine[16] = "", path[PATH_MAX];
    int found = find_env(run_dir, pw->pw_name, &pid, engine, path);
    if (found == ENV_RUNNING && (!want_engine || !strcmp(want_engine, engine))) {
        /* Running: tell sdeefs-launchd anyway, if it runs, so that this session joins the
         * environment's limits (launcher/limits.py) as a login through the PAM hook does;
         * a start it finds running costs it a lock and a statfs per daemon. */
        if (ask_launchd(run_dir, NULL) == 0)
            found = find_env(run_dir, pw->pw_name, &pid, engine, path);
    }
    if (found != ENV_RUNNING) {
        /* No running environment: the resident service (sdeefs-launchd) starts one, if it runs. */
        if (ask_launchd(run_dir, want_engine) == 0)
            found = find_env(run_dir, pw->pw_name, &pid, engine, path);
        if (found == ENV_MISSING)
            fail("shell: no environment for %s (%s: %s); is the sdeefs PAM hook installed?",
                 pw->pw_name, path, strerror(ENOENT));
        if (found == ENV_DAMAGED)
            fail("shell: %s is damaged", path);
        if (found == ENV_GONE)
            fail("shell: the environment of %s is not running (log in again)", pw->pw_name);
    }
    if (want_engine && strcmp(want_engine, engine)) {
        fprintf(stderr, "sdeefs-shell: your environment runs the %s engine, not %s (all your "
                "sessions share it: end them, or ask an admin for `sdeefs stop %s`, and start it "
                "with `sdeefs start %s --engine %s`)\n", *engine ? engine : "unknown",
                want_engine, pw->pw_name, pw->pw_name, want_engine);
        exit(3);
    }

    const char *inner = getenv("SDEEFS_SHELL");
    if (!inner || !*inner)
        inner = "/bin/bash";
    const char *forced = getenv("SSH_ORIGINAL_COMMAND");  /* sshd ForceCommand */
    char pid_arg[32];
    snprintf(pid_arg, sizeof pid_arg, "%lu", pid);
    char **jargv = calloc((size_t)argc + 8, sizeof *jargv);
    if (!jargv)
        FAIL("calloc");
    int j = 0;
    jargv[j++] = "--pid";
    jargv[j++] = pid_arg;
    jargv[j++] = "--";
    jargv[j++] = (char *)inner;
    if (forced && *forced && argc == 0) {
        jargv[j++] = "-c";
        jargv[j++] = (char *)forced;
    } else if (login && argc == 0) {
        jargv[j++] = "-l";
    }
    for (int k = 0; k < argc; k++)
        jargv[j++] = argv[k];
    return cmd_join(j, jargv);
}

