/*
 * sdeefs_spank.so: the SLURM SPANK plugin that runs every task of a job in the user's sdeefs
 * environment on its node, with no wrapper: the batch script, each srun step, MPI ranks that
 * srun starts, `srun --pty`, salloc's interactive step.  plugstack.conf (written by
 * `sdeefs install-slurm`, docs/admin.md):
 *
 *   required /opt/sdeefs/lib/sdeefs/sdeefs_spank.so job_dir=/var/lib/sdeefs-jobs
 *
 * job_dir is [replication] job_dir of the site config (%n: the node's SLURM name).  The
 * option `--sdeefs=on|off` (sbatch, salloc, srun) picks it per job or step: off runs bare.
 *
 * What sdeefs-prolog (launcher/compute/job.py) left for the job on this node decides:
 *
 *   JOB_DIR/JOBID.problem "bare"    the user has no environment: the task runs as usual;
 *   JOB_DIR/JOBID.problem "failed"  the user's environment cannot serve the job: the task
 *                                   fails with that one line on its stderr (exit 1); the
 *                                   node stays in service;
 *   JOB_DIR/JOBID.run/init          the environment's init: the task joins it.
 *
 * How a task joins (slurmstepd forks each task as root, then, in the child:
 * task_init_privileged as root, setgroups/setgid/setuid to the user, chdir to the job's
 * directory, task_init as the user, execve):
 *
 * - task_init_privileged (root, host mount namespace) only clones the batch script's
 *   directory (open_tree) for the batch step: slurmd's spool is hidden inside (the deny
 *   list), and the script must show at its own path.  Nothing else runs as root: joining
 *   the environment's mount namespace here, as pyxis does, would run the rest of
 *   slurmstepd's root code (initgroups and its NSS modules when gids are not in the
 *   credential, other plugins) over a tree the user controls.
 * - task_init (the user): setns into the environment's user namespace (the user owns it,
 *   so the kernel grants that) and mount namespace (its root and cwd become the
 *   environment's); the script's directory is attached at its path; cwd is the job's
 *   directory inside (else HOME, else /); no_new_privs, every capability dropped.  A bare
 *   program name (srun --multi-prog) is found inside too (tests/cluster/test_spank.py).
 *   The task runs as "inside u": the user's own uid, which DAC treats as the user, so
 *   root-only host files are closed to it whenever they were made (docs/identity.md).
 *
 * PID namespaces: setns(CLONE_NEWPID) moves only a process's children, and the task is
 * the process SLURM waits for, tracks and signals.  So a job's environment has no PID
 * namespace of its own (sdeefs-enter start --host-pids): its /proc is the host's, bound,
 * and /proc/self, ps and MPI's process lookups see the task as it is.  The epilog ends
 * the environment's processes by their mount namespace (launcher/env.py).  SLURM's step
 * cgroups and process tracking still hold every task: the plugin moves none.
 *
 * Errors: a task that cannot join prints one line "sdeefs: ..." on its stderr (srun and the
 * job's output file show it) and exits 1; an error of task_init_privileged is kept and
 * told there (pyxis's deferral: slurmstepd's stderr is not the task's yet).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

#include "envns.h"

SPANK_PLUGIN(sdeefs, 1);

static int g_enabled = 1;                             /* --sdeefs=on|off */
static char g_job_dir[PATH_MAX] = "/var/lib/sdeefs-jobs"; /* job_dir= of plugstack.conf */
static int g_script_tree = -1;                        /* batch step: clone of the script's dir */
static char g_script_dir[PATH_MAX];
static char g_deferred[PATH_MAX + 200];                       /* task_init_privileged's error */

static int option_sdeefs(int val, const char *optarg, int remote)
{
    (void)val;
    (void)remote;
    if (optarg && !strcmp(optarg, "on"))
        g_enabled = 1;
    else if (optarg && !strcmp(optarg, "off"))
        g_enabled = 0;
    else {
        slurm_error("sdeefs: --sdeefs: expected on or off, not %s", optarg ? optarg : "nothing");
        return -1;
    }
    return 0;
}

static struct spank_option g_options[] = {
    {"sdeefs", "on|off",
     "run the tasks in your sdeefs environment (on, the default) or on the bare node (off)", 1,
     0, option_sdeefs},
    SPANK_OPTIONS_TABLE_END};

int slurm_spank_init(spank_t sp, int ac, char **av)
{
    spank_context_t ctx = spank_context();
    if (ctx != S_CTX_LOCAL && ctx != S_CTX_REMOTE && ctx != S_CTX_ALLOCATOR)
        return 0;
    for (int i = 0; i < ac; i++) {
        if (!strncmp(av[i], "job_dir=", 8) && av[i][8] == '/' &&
            strlen(av[i] + 8) < sizeof g_job_dir)
            strcpy(g_job_dir, av[i] + 8);
        else {
            slurm_error("sdeefs: plugstack.conf: unknown argument %s (expected job_dir=/PATH)",
                        av[i]);
            return -1;
        }
    }
    if (spank_option_register(sp, &g_options[0]) != ESPANK_SUCCESS) {
        slurm_error("sdeefs: cannot register --sdeefs");
        return -1;
    }
    return 0;
}

/* One line on the task's stderr, and the task ends (exit 1): SLURM reports the step failed. */
__attribute__((noreturn, format(printf, 1, 2))) static void task_fail(const char *fmt, ...)
{
    char line[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    for (char *c = line; *c; c++)
        if (*c == '\n')
            *c = ' ';
    dprintf(STDERR_FILENO, "sdeefs: %s\n", line);
    _exit(1);
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
    (void)ac;
    (void)av;
    uint32_t step;
    if (spank_context() != S_CTX_REMOTE || !g_enabled)
        return 0;
    if (spank_get_item(sp, S_JOB_STEPID, &step) != ESPANK_SUCCESS || step != SLURM_BATCH_SCRIPT)
        return 0;
    int argc = 0;
    char **argv = NULL;
    if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1 ||
        !argv[0] || argv[0][0] != '/') {
        snprintf(g_deferred, sizeof g_deferred, "the batch script's path is unknown");
        return 0;
    }
    snprintf(g_script_dir, sizeof g_script_dir, "%s", argv[0]);
    char *slash = strrchr(g_script_dir, '/');
    if (slash == g_script_dir)
        slash[1] = 0;
    else
        *slash = 0;
    g_script_tree = (int)syscall(SYS_open_tree, AT_FDCWD, g_script_dir,
                                 OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (g_script_tree < 0)
        snprintf(g_deferred, sizeof g_deferred, "clone %s (the batch script's directory): %s",
                 g_script_dir, strerror(errno));
    return 0;
}

/* Make DIR (absolute) exist inside, a directory at each step (no symlink followed), and
 * attach the batch script's directory there. */
static void attach_script_dir(const char *dir)
{
    int fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        task_fail("open / inside the environment: %s", strerror(errno));
    char copy[PATH_MAX];
    snprintf(copy, sizeof copy, "%s", dir);
    char *save = NULL;
    for (char *name = strtok_r(copy, "/", &save); name; name = strtok_r(NULL, "/", &save)) {
        int next = openat(fd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (next < 0 && errno == ENOENT) {
            /* Inside root's, as the environment's other system directories (we hold the
             * namespace's capabilities until the end of task_init). */
            if (mkdirat(fd, name, 0755) < 0 && errno != EEXIST)
                task_fail("make %s inside the environment (for the batch script): %s", dir,
                          strerror(errno));
            if (fchownat(fd, name, 0, 0, AT_SYMLINK_NOFOLLOW) < 0)
                task_fail("chown %s inside the environment: %s", dir, strerror(errno));
            next = openat(fd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        }
        if (next < 0)
            task_fail("%s inside the environment (for the batch script): %s", dir,
                      strerror(errno));
        close(fd);
        fd = next;
    }
    if (syscall(SYS_move_mount, g_script_tree, "", fd, "",
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0)
        task_fail("attach the batch script's directory at %s inside the environment: %s", dir,
                  strerror(errno));
    close(fd);
    close(g_script_tree);
    g_script_tree = -1;
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
    (void)ac;
    (void)av;
    if (spank_context() != S_CTX_REMOTE)
        return 0;
    /* SDEEFS_JOB_ENV says "this task is in the environment": only for a task this plugin
     * moved in.  A step's environment comes from srun's, and srun typed in a task that is
     * inside passes it on: a step run --sdeefs=off (or one left bare) must not keep it, or
     * sdeefs-run there would run its command bare instead of joining. */
    spank_unsetenv(sp, "SDEEFS_JOB_ENV");
    if (!g_enabled) {
        if (g_script_tree >= 0)
            close(g_script_tree);
        return 0;
    }
    uint32_t job, step;
    uid_t uid;
    if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_STEPID, &step) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_JOB_UID, &uid) != ESPANK_SUCCESS)
        task_fail("cannot read the job's id, step and user from SLURM");
    if (step == SLURM_EXTERN_CONT)
        return 0;
    char node[256] = "";
    if (spank_getenv(sp, "SLURMD_NODENAME", node, sizeof node) != ESPANK_SUCCESS || !*node) {
        gethostname(node, sizeof node - 1);
        node[strcspn(node, ".")] = 0;
    }
    char dir[PATH_MAX], path[PATH_MAX + 64], text[4096];
    env_substitute_node(g_job_dir, node, dir, sizeof dir);

    /* The prolog's verdict for this job on this node. */
    snprintf(path, sizeof path, "%s/%u.problem", dir, job);
    if (env_read_small(AT_FDCWD, path, text, sizeof text) >= 0) {
        char kind[32], message[2048];
        env_json_string(text, "kind", kind, sizeof kind);
        env_json_string(text, "message", message, sizeof message);
        if (!strcmp(kind, "bare"))
            return 0; /* no environment: the task runs as usual */
        task_fail("job %u on %s: %s", job, node,
                  *message ? message : "the job's environment could not be prepared");
    }
    snprintf(path, sizeof path, "%s/%u.run/init", dir, job);
    if (env_read_small(AT_FDCWD, path, text, sizeof text) < 0)
        task_fail("no sdeefs environment for job %u on %s (%s: %s; is sdeefs-prolog SLURM's "
                  "Prolog here, with PrologFlags=Alloc?)",
                  job, node, path, strerror(errno));
    long pid = strtol(text, NULL, 10);
    if (pid <= 1)
        task_fail("job %u on %s: %s holds no pid", job, node, path);
    if (g_deferred[0])
        task_fail("job %u on %s: %s", job, node, g_deferred);

    char err[PATH_MAX + 200], cwd[PATH_MAX];
    struct env_ns ns;
    if (env_ns_open(pid, (long)uid, &ns, err, sizeof err) < 0)
        task_fail("job %u on %s: %s", job, node, err);
    if (env_has_own_pid_ns(&ns))
        task_fail("job %u on %s: the environment has a PID namespace of its own (started by an "
                  "older sdeefs-prolog): resubmit the job", job, node);
    if (!getcwd(cwd, sizeof cwd))
        cwd[0] = 0;
    int joined = env_ns_join_user(&ns, err, sizeof err);
    if (joined == 0)
        task_fail("job %u on %s: already in the environment's user namespace", job, node);
    if (joined < 0 || env_ns_join_rest(&ns, err, sizeof err) < 0)
        task_fail("job %u on %s: join the environment: %s", job, node, err);
    env_ns_close(&ns);
    if (g_script_tree >= 0)
        attach_script_dir(g_script_dir);

    /* slurmstepd's chdir to the job's directory happened on the host: again, inside. */
    if (!cwd[0] || chdir(cwd) < 0) {
        char home[PATH_MAX] = "/";
        if (spank_getenv(sp, "HOME", home, sizeof home) != ESPANK_SUCCESS || chdir(home) < 0) {
            strcpy(home, "/");
            if (chdir("/") < 0)
                task_fail("chdir / inside the environment: %s", strerror(errno));
        }
        dprintf(STDERR_FILENO, "sdeefs: %s does not exist in your environment on %s: "
                "running in %s\n", cwd, node, home);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        task_fail("prctl PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
    if (drop_capabilities(0, err, sizeof err) < 0)
        task_fail("%s", err);
    /* sdeefs-run (the explicit form) in such a task runs its command as it is. */
    snprintf(text, sizeof text, "%u", job);
    spank_setenv(sp, "SDEEFS_JOB_ENV", text, 1);
    return 0;
}
