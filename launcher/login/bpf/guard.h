/* SPDX-License-Identifier: GPL-2.0 */
/* The layouts shared by guard.bpf.c (after vmlinux.h), the loader (after linux/types.h)
 * and launcher/login/bpfguard.py, which writes the maps' values itself: IDENTITY and
 * DENY_PATTERN there are these structs pinned with `struct` (native byte order, no
 * padding: every field is a __u32 or a char array), and tests/launcher/test_bpfguard.py
 * compiles this header to check that they match.  Change one, change both. */
#ifndef SDEEFS_BPF_GUARD_H
#define SDEEFS_BPF_GUARD_H

#define MAX_GROUPS 64    /* a user's groups the rule sees (a user in more: no BPF guard) */
#define GUARDED_MAX 4096 /* environments of one host at a time */
#define DEVS_MAX 16      /* host filesystems (the lower's) */
#define DENY_MAX 16      /* deny patterns */
#define DENY_LEN 192     /* a pattern's bytes before its star (or all of them) */
#define SUFFIX_LEN 32    /* its bytes after the star */

/* `guarded`'s value, under the key: the uid owning the namespace (guard.bpf.c: key_by_owner) */
struct identity {
	__u32 uid; /* first, in every build: an older set's keys are read by it (bpfguard.py) */
	__u32 gid;
	__u32 ngroups;
	__u32 subuid; /* U's subordinate ranges: [subuid, subuid + count) and the same of */
	__u32 subgid; /* gids count as U's own (sdeefs.identity: owns_uid, owns_gid) */
	__u32 count;
	__u32 groups[MAX_GROUPS];
};

/* `deny`'s value: one pattern of the subset (guard.bpf.c, pattern_matches) */
struct deny_pattern {
	__u32 prefix_len; /* bytes of prefix: everything before the star, or all of it */
	__u32 suffix_len; /* bytes after the star */
	__u32 star;       /* 1: one star, between prefix and suffix */
	char prefix[DENY_LEN];   /* zero-filled past prefix_len */
	char suffix[SUFFIX_LEN]; /* right-aligned: zeros before it */
};

#endif
