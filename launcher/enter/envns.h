/*
 * Joining an environment's namespaces (envns.c): what "sdeefs-enter join" and the SPANK
 * plugin share.  No function exits or prints; each returns -1 with one line in err.
 */
#ifndef SDEEFS_ENVNS_H
#define SDEEFS_ENVNS_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define ENV_INIT_NAME "sdeefs-init" /* the environment's init: start.c names it */

struct env_ns {
    int user, mnt, pid; /* O_RDONLY fds of /proc/PID/ns/{user,mnt,pid}, -1 when closed */
};

/* The namespaces of the environment whose init is pid, after checking that it is one
 * (its name) and, with owner >= 0, that its user namespace belongs to uid owner. */
int env_ns_open(long pid, long owner, struct env_ns *ns, char *err, size_t len);
void env_ns_close(struct env_ns *ns);
/* setns into its user namespace: 1 if joined, 0 if already in it, -1 on error. */
int env_ns_join_user(const struct env_ns *ns, char *err, size_t len);
/* setns into its mount namespace (cwd and root become its root), and its PID namespace
 * for our children when it has one of its own. */
int env_ns_join_rest(const struct env_ns *ns, char *err, size_t len);
/* 1 if the environment's PID namespace is not this process's own (a login's), else 0. */
int env_has_own_pid_ns(const struct env_ns *ns);
/* A small file's content, NUL-terminated (name relative to dirfd, not followed if a
 * symlink): its length, or -1 with errno. */
ssize_t env_read_small(int dirfd, const char *name, char *buf, size_t size);
/* Keep only the capabilities in keep (bounding, ambient, permitted, effective). */
int drop_capabilities(uint64_t keep, char *err, size_t len);

/* The string value of "key" in a one-line JSON object as Python's json.dumps writes it
 * (ASCII, ": " after keys, \" \\ \n \uXXXX escapes): "" if absent; newlines and tabs become
 * spaces, non-ASCII escapes '?'.  For the prolog's files (spank.c) and the replicad's
 * answers (jobhook.c), never for anything a user wrote unescaped. */
void env_json_string(const char *json, const char *key, char *out, size_t size);
/* path with every %n replaced by node (the config's per-node paths: the replicad's control
 * socket for jobhook.c, job_dir for spank.c), cut to fit size. */
void env_substitute_node(const char *path, const char *node, char *out, size_t size);

#endif
