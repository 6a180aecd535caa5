/*
 * sdeefs-enter: create, and join, an sdeefs environment (the launcher's C helper).
 *
 * An environment gives the HPC user U (host uid U, gid G) "root inside" but never more than U on
 * the host: a user namespace owned by U that maps inside 0.. to U's subordinate ids and U's own
 * ids to themselves (--uid-map/--gid-map, docs/identity.md), a mount namespace and a PID
 * namespace, whose root is a kernel overlayfs mounted *inside* the user namespace (userxattr) over
 * an idmapped bind of the host "/" (system ids shown as U's subordinate ones) and an upper that
 * belongs to U's ids.
 *
 *   sdeefs-enter idmap --uid U --gid G [--uid-map M --gid-map M] SRC DST  (as root)   idmap.c
 *   sdeefs-enter start --uid U --gid G [--uid-map M --gid-map M]
 *                      --root-lower DIR [...] --root-upper DIR --root-work DIR
 *                      --home HOSTDIR [--bind SRC:DST ...] [--ro-bind SRC:DST ...] [--hide PATH ...]
 *                      [--tmp-size SIZE | --tmp-dir HOSTDIR] [--host-pids] [--volatile]
 *                      (as root; prints the init pid)                                start.c
 *                      (--host-pids: no PID namespace of its own and the host's /proc: a job's,
 *                      whose tasks SLURM forks and the SPANK plugin moves in, spank.c;
 *                      --tmp-dir: /tmp is that host directory, bound, not a tmpfs: a job's;
 *                      --volatile: the upper is scratch, overlayfs "volatile": never synced,
 *                      a copy-up does not fsync: a job's, discarded at its end)
 *   sdeefs-enter start --uid U --gid G --root-view DIR --home HOSTDIR [...]
 *                      (the root is a bind of an existing view, the pure FUSE engine's mount,
 *                      instead of an overlay mounted inside the user namespace)
 *   sdeefs-enter join --pid PID [--cwd DIR] [--keep-cap NAME ...] -- CMD [ARG...]   (as U or root)
 *                                                                                    join.c
 *   sdeefs-shell [--engine E] [ARG...]   (the login shell: this binary under that name)  shell.c
 *   sbatch, srun ... (SLURM client shims inside: this binary bound over them)       asuser.c
 *   sdeefs-prolog, sdeefs-epilog (SLURM's Prolog/Epilog: this binary under those names; they
 *                      ask the node's sdeefs-replicad to start/end the job's environment) jobhook.c
 *   sdeefs_spank.so: the SLURM SPANK plugin (spank.c), not part of this binary; it shares
 *   envns.c (joining an environment) with join.c
 *
 * Id maps (--uid-map/--gid-map "INSIDE:HOST:COUNT,...", of start and idmap) come from
 * sdeefs/identity.py; without them, inside 0 is U (the one-line map of old).
 *
 * Every error is one line on stderr, "sdeefs-enter: <step>: <reason>", and exit status 1 (2 for
 * usage errors).  A failed start leaves nothing behind: the processes it forked are killed.
 *
 * This header declares what the commands share (common.c): the error reporting, the few
 * syscall wrappers more than one command uses, id parsing and the id maps.  Built by the
 * Makefile beside it (scripts/setup.sh), into .venv/bin/sdeefs-enter.
 */
#ifndef SDEEFS_ENTER_H
#define SDEEFS_ENTER_H

#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/nsfs.h>
#include <sys/ioctl.h>
#include <sys/mount.h> /* glibc 2.36: includes <linux/mount.h> (new mount API constants) */
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define INIT_NAME "sdeefs-init" /* the environment's PID 1: start.c names it, join.c checks it */

/* ---- Errors (common.c) ---- */

extern int g_report;       /* in A and B of start: socket to P; errors go there as "E<line>" */
extern pid_t g_child;      /* in P: our child (A, or idmap's helper) to kill and reap */
extern pid_t g_grandchild; /* in P: B, once known; A reaps it */

/* Kill and reap what we forked (g_child, g_grandchild). */
void cleanup_children(void);
/* One error line: to P through g_report when there is one, else to stderr. */
void emit_line(const char *line);
/* "sdeefs-enter: <message>", then cleanup_children() and exit 1. */
__attribute__((noreturn, format(printf, 1, 2))) void fail(const char *fmt, ...);
/* The step failed with errno: "sdeefs-enter: <step>: <strerror>". */
#define FAIL(...) fail_errno(errno, __VA_ARGS__)
__attribute__((noreturn, format(printf, 2, 3))) void fail_errno(int err, const char *fmt, ...);
/* "sdeefs-enter: usage: <message>" and exit 2. */
__attribute__((noreturn, format(printf, 1, 2))) void usage(const char *fmt, ...);

/* ---- Shared helpers (common.c) ---- */

int sys_open_tree(int dfd, const char *path, unsigned flags);
int sys_move_mount(int from_dfd, const char *from, int to_dfd, const char *to, unsigned flags);
int sys_mount_setattr(int dfd, const char *path, unsigned flags, struct mount_attr *attr);
int sys_close_range(unsigned first, unsigned last);

/* A decimal id below 2^32 - 1, or a usage error naming the option. */
unsigned parse_id(const char *opt, const char *s);
/* An id map as /proc/PID/uid_map takes it ("INSIDE HOST COUNT\n" lines). */
#define MAX_MAP_LINES 340 /* the kernel's limit */
struct id_map {
    int set;
    char text[MAX_MAP_LINES * 34];
};
/* --uid-map/--gid-map "INSIDE:HOST:COUNT,..." into m (a usage error if malformed). */
void parse_id_map(const char *opt, const char *text, struct id_map *m);
/* The one-line map "0 ID 1" (inside root = ID), when no map was given. */
void single_id_map(struct id_map *m, unsigned id);
/* The maps of process PID's user namespace; setgroups "deny" unless the gid map has more
 * than one line. */
void write_id_maps(pid_t pid, const struct id_map *uid_map, const struct id_map *gid_map);

/* ---- The commands ---- */

extern int g_argc;     /* main's: start.c renames the init by overwriting argv in place */
extern char **g_argv;

int cmd_idmap(int argc, char **argv);             /* idmap.c */
int cmd_start(int argc, char **argv);             /* start.c */
int cmd_join(int argc, char **argv);              /* join.c */
int cmd_shell(int argc, char **argv, int login);  /* shell.c */
int cmd_jobhook(const char *which);                /* jobhook.c: "prolog" or "epilog" */
/* Where the launcher binds the host's real SLURM clients inside an environment. */
#define SLURM_REAL_DIR "/run/sdeefs/slurm"
int is_slurm_client(const char *name);             /* asuser.c */
int cmd_asuser(const char *name, int argc, char **argv);

#endif
