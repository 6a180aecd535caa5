/*
 * sdeefs-prolog and sdeefs-epilog: what slurmd runs as SLURM's Prolog and Epilog (slurm.conf
 * Prolog=/usr/local/sbin/sdeefs-prolog, Epilog=...; docs/admin.md).  This binary under those
 * names (links to sdeefs-enter, like sdeefs-shell).
 *
 * Every job of the site runs them on each of its nodes, environment or not, so they start no
 * Python: the node's resident sdeefs-replicad does the work, already running, already
 * following the user (sdeefs.replication.daemon, ops job-start and job-end;
 * sdeefs.launcher.compute.job.NodeJobs).  This client only asks it, over its control socket
 * (sdeefs.control: one JSON line each way), and says what it answered:
 *
 *   -> {"op": "job-start", "job": "ID", "user": "U", "node": "N"}
 *   <- {"job": "ID", "verdict": "ready"|"bare"|"failed", "message": "..."}   exit 0
 *   -> {"op": "job-end", "job": "ID", "node": "N"}
 *   <- {"job": "ID", "ended": true|false}                                    exit 0
 *   <- {"ok": false, "error": "...", "code": C, ...}    the node's problem: exit C (SLURM
 *                                                      drains the node, as it should)
 *
 * ID, U, N come from slurmd (SLURM_JOB_ID, SLURM_JOB_USER, SLURMD_NODENAME or the short host
 * name).  A user's problem (no environment, a barrier not reached, a skipped record) is in the
 * verdict: one line "sdeefs: job ID: ..." in slurmd's log, exit 0, the job fails on its own
 * (the SPANK plugin or sdeefs-run tells its tasks).
 *
 * The control socket is [replication] control of the site config ($SDEEFS_CONFIG, else
 * /etc/sdeefs/sdeefs.toml; %n = N).  This client reads only that key, and only in its plain
 * form (control = "/path" in the [replication] table).  In every case it cannot serve by
 * itself it runs the Python implementation instead, `sdeefs job-prolog|job-epilog` beside
 * this binary (the same work in-process, the same messages): a config it does not read
 * plainly (or cannot read), a replicad that does not answer (not running: the prolog then
 * fails the node with one line; the epilog still ends the job's environment), a replicad
 * too old to know the ops, a user name that is not plain ASCII.
 */
#include "enter.h"

#include <poll.h>

#include "envns.h"

#define DEFAULT_CONFIG "/etc/sdeefs/sdeefs.toml"
#define DEFAULT_CONTROL "/run/sdeefs-replicad.sock"
#define MAX_CONFIG (256 << 10)
#define ANSWER_TIMEOUT_MS (3600 * 1000) /* the replicad bounds the barrier itself */

static const char *g_which; /* "prolog" or "epilog" */

/* Run `sdeefs job-prolog|job-epilog` (the Python implementation) beside this binary. */
__attribute__((noreturn)) static void fallback(const char *why)
{
    char self[PATH_MAX], tool[PATH_MAX + 16], op[32];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = 0;
        char *slash = strrchr(self, '/');
        if (slash) {
            *slash = 0;
            snprintf(tool, sizeof tool, "%s/sdeefs", self);
            snprintf(op, sizeof op, "job-%s", g_which);
            char *argv[] = {"sdeefs", op, NULL};
            execv(tool, argv);
        }
    }
    fprintf(stderr, "sdeefs job-%s: %s, and sdeefs job-%s cannot run: %s\n", g_which, why,
            g_which, strerror(errno));
    exit(1);
}

static int plain_name(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (!n || n > max || s[0] == '-' || s[0] == '.')
        return 0;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr("._-@", *s))
            return 0;
    return 1;
}

/* [replication] control of the config at path into out (default if absent); 0 if read
 * plainly, -1 if this reader cannot tell (then the Python implementation decides). */
static int config_control(const char *path, char *out, size_t size)
{
    snprintf(out, size, "%s", DEFAULT_CONTROL);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT && !strcmp(path, DEFAULT_CONFIG) ? 0 : -1;
    char *text = malloc(MAX_CONFIG + 1);
    size_t len = 0;
    ssize_t n;
    while (text && len < MAX_CONFIG && (n = read(fd, text + len, MAX_CONFIG - len)) > 0)
        len += (size_t)n;
    close(fd);
    if (!text || len >= MAX_CONFIG || memchr(text, 0, len)) {
        free(text);
        return -1;
    }
    text[len] = 0;
    int ok = 0, found = 0, in_replication = 0;
    for (char *line = text, *next; line && ok == 0; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        while (*line == ' ' || *line == '\t')
            line++;
        if (strstr(line, "'''") || strstr(line, "\"\"\"")) { /* multi-line strings */
            ok = -1;
            break;
        }
        if (*line == '[') {
            char name[64];
            if (line[1] == '[') {
                in_replication = 0;
                continue;
            }
            if (sscanf(line, "[ %63[A-Za-z0-9_-] ]", name) != 1 || strchr(line, '.') ||
                strchr(line, '"') || strchr(line, '\'')) {
                ok = -1; /* a dotted or quoted table name: not this reader's */
                break;
            }
            in_replication = !strcmp(name, "replication");
            continue;
        }
        size_t key = strcspn(line, " \t=");
        int is_control = in_replication && key == 7 && !strncmp(line, "control", 7);
        /* dotted keys or an inline table that could set replication.control */
        if (!is_control && ((!in_replication && !strncmp(line, "replication", 11) &&
                             (line[11] == '.' || line[11] == ' ' || line[11] == '=' ||
                              line[11] == '\t')) ||
                            (in_replication && !strncmp(line, "control", 7) && key != 7) ||
                            (in_replication && !strncmp(line, "\"control\"", 9)) ||
                            (in_replication && !strncmp(line, "'control'", 9)))) {
            ok = -1;
            break;
        }
        if (!is_control)
            continue;
        const char *v = line + key;
        v += strspn(v, " \t");
        if (*v++ != '=') {
            ok = -1;
            break;
        }
        v += strspn(v, " \t");
        const char *end = *v == '"' ? strpbrk(v + 1, "\"\\") : NULL;
        if (found || !end || *end != '"' || v[1] != '/' || (size_t)(end - v - 1) >= size) {
            ok = -1; /* escapes, another quoting, twice, relative, too long */
            break;
        }
        const char *rest = end + 1 + strspn(end + 1, " \t");
        if (*rest && *rest != '#' && *rest != '\r') {
            ok = -1;
            break;
        }
        snprintf(out, size, "%.*s", (int)(end - v - 1), v + 1);
        found = 1;
    }
    free(text);
    return ok;
}

int cmd_jobhook(const char *which)
{
    g_which = which;
    const char *job = getenv("SLURM_JOB_ID");
    if (!job || !*job)
        job = getenv("SLURM_JOBID");
    const char *user = getenv("SLURM_JOB_USER");
    char node[256] = "";
    const char *slurm_node = getenv("SLURMD_NODENAME");
    if (slurm_node && *slurm_node)
        snprintf(node, sizeof node, "%s", slurm_node);
    else {
        gethostname(node, sizeof node - 1);
        node[strcspn(node, ".")] = 0;
    }
    if (!job || !*job || strspn(job, "0123456789") != strlen(job) || strlen(job) > 20)
        fallback("SLURM_JOB_ID is not a job id"); /* the Python side says it as it does */
    if (!strcmp(which, "prolog") && (!user || !plain_name(user, 64)))
        fallback("SLURM_JOB_USER is not a plain user name");
    if (!plain_name(node, 255) || strchr(node, '@'))
        fallback("the node's name is not plain");

    const char *config = getenv("SDEEFS_CONFIG");
    char control[PATH_MAX], sock_path[PATH_MAX];
    if (config_control(config && *config ? config : DEFAULT_CONFIG, control, sizeof control) < 0)
        fallback("the config is not read here");
    env_substitute_node(control, node, sock_path, sizeof sock_path);

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(sock_path) >= sizeof addr.sun_path)
        fallback("the control socket's path is too long");
    strcpy(addr.sun_path, sock_path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
        fallback("sdeefs-replicad does not answer");

    char request[512];
    int len = !strcmp(which, "prolog")
                  ? snprintf(request, sizeof request,
                             "{\"op\": \"job-start\", \"job\": \"%s\", \"user\": \"%s\", "
                             "\"node\": \"%s\"}\n",
                             job, user, node)
                  : snprintf(request, sizeof request,
                             "{\"op\": \"job-end\", \"job\": \"%s\", \"node\": \"%s\"}\n", job,
                             node);
    for (int sent = 0; sent < len;) {
        ssize_t n = send(sock, request + sent, (size_t)(len - sent), MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fallback("sdeefs-replicad does not answer");
        sent += (int)n;
    }
    char answer[16384];
    size_t got = 0;
    while (got + 1 < sizeof answer && !memchr(answer, '\n', got)) {
        struct pollfd p = {.fd = sock, .events = POLLIN};
        int r = poll(&p, 1, ANSWER_TIMEOUT_MS);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            fprintf(stderr, "sdeefs job-%s: sdeefs-replicad did not answer within %d s (%s)\n",
                    which, ANSWER_TIMEOUT_MS / 1000, sock_path);
            return 1;
        }
        ssize_t n = recv(sock, answer + got, sizeof answer - 1 - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(sock);
    answer[got] = 0;
    if (!memchr(answer, '\n', got)) {
        fprintf(stderr, "sdeefs job-%s: sdeefs-replicad closed the connection without an "
                "answer (%s)\n", which, sock_path);
        return 1;
    }
    char error[4096], message[4096];
    env_json_string(answer, "error", error, sizeof error);
    if (strstr(answer, "\"ok\": false")) {
        if (strstr(error, "bad request: unknown op")) /* a replicad of before these ops */
            fallback("sdeefs-replicad does not know job-start/job-end");
        const char *code = strstr(answer, "\"code\": ");
        int status = code ? atoi(code + 8) : 1;
        fprintf(stderr, "sdeefs job-%s: %s\n", which, *error ? error : "sdeefs-replicad failed");
        return status > 0 && status < 256 ? status : 1;
    }
    env_json_string(answer, "message", message, sizeof message);
    if (*message)
        fprintf(stderr, "sdeefs: job %s: %s\n", job, message);
    return 0;
}
