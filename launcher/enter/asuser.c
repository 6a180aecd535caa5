/*
 * sdeefs-enter asuser (the SLURM client shims): inside an environment, the launcher binds this
 * binary over each SLURM client (/usr/bin/sbatch, srun, squeue ...) and the host's real client
 * at SLURM_REAL_DIR/NAME (in the environment's own /run).  Run as NAME, it execs the real
 * client as the user's own uid: munge vouches for host uid u, so slurmctld accepts only
 * requests made as u, and inside root is a subordinate id (docs/identity.md).
 *
 *   euid 0 (inside root): groups, gid, uid become the user's (initgroups, setresgid,
 *   setresuid: inside root has CAP_SETUID/CAP_SETGID in its namespace; nothing crosses
 *   it), USER/LOGNAME/HOME are the user's; any other caller (the user itself, a job) runs
 *   the client unchanged.
 *
 * The user is the one uid the namespace maps to itself (the "u u 1" line of uid_map, see
 * sdeefs/identity.py); its name, primary group and home come from the passwd database as
 * the environment sees it (the host's, with nscd/sssd sockets bound in).  The real client
 * runs in the caller's own process: stdio, the tty, signals and the exit status are its.
 */
#include "enter.h"

static const char *const slurm_clients[] = {"sbatch",  "srun",     "salloc", "squeue",
                                            "scancel", "sinfo",    "scontrol", "sacct",
                                            "sattach", "sbcast",   "sstat"};

int is_slurm_client(const char *name)
{
    for (size_t i = 0; i < sizeof slurm_clients / sizeof *slurm_clients; i++)
        if (!strcmp(name, slurm_clients[i]))
            return 1;
    return 0;
}

/* The uid this user namespace maps to itself (the user), or -1. */
static long identity_uid(void)
{
    FILE *f = fopen("/proc/self/uid_map", "re");
    if (!f)
        FAIL("asuser: open /proc/self/uid_map");
    unsigned long inside, host, count;
    long found = -1;
    while (fscanf(f, "%lu %lu %lu", &inside, &host, &count) == 3)
        if (inside == host && count == 1 && inside != 0)
            found = (long)inside;
    fclose(f);
    return found;
}

int cmd_asuser(const char *name, int argc, char **argv)
{
    (void)argc;
    char real[PATH_MAX];
    if (snprintf(real, sizeof real, "%s/%s", SLURM_REAL_DIR, name) >= (int)sizeof real)
        fail("asuser: %s: name too long", name);
    if (geteuid() == 0) {
        long uid = identity_uid();
        if (uid < 0)
            fail("asuser: %s: this environment maps no user id of its own (started before "
                 "the id map of docs/identity.md: log out of every session and in again)",
                 name);
        struct passwd *pw = getpwuid((uid_t)uid);
        if (!pw)
            fail("asuser: %s: uid %ld has no passwd entry", name, uid);
        if (initgroups(pw->pw_name, pw->pw_gid) < 0)
            FAIL("asuser: %s: initgroups %s", name, pw->pw_name);
        if (setresgid(pw->pw_gid, pw->pw_gid, pw->pw_gid) < 0)
            FAIL("asuser: %s: setresgid %u", name, (unsigned)pw->pw_gid);
        if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) < 0)
            FAIL("asuser: %s: setresuid %ld", name, uid);
        if (setenv("USER", pw->pw_name, 1) < 0 || setenv("LOGNAME", pw->pw_name, 1) < 0 ||
            setenv("HOME", pw->pw_dir, 1) < 0)
            FAIL("asuser: setenv");
    }
    argv[0] = (char *)name;
    execv(real, argv);
    FAIL("asuser: exec %s", real);
}
