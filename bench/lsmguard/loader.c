// SPDX-License-Identifier: GPL-2.0
/* lsmguard-load: load and attach lsmguard.bpf.c for one environment (bench only).
 *
 *   lsmguard-load --userns INUM --uid U --gid G [--group G]... --dev MAJ:MIN [--dev ..]
 *                 [--deny PATTERN]... [--deny-root PREFIX] [--counts FILE] [--probe-d-path]
 *   lsmguard-load --check      (load every program, attach nothing, exit: can this kernel?)
 *   lsmguard-load --body-cost ... (the same map arguments: only the decision's cost program,
 *                                  on the sys_enter BTF tracepoint; it denies nothing)
 *   lsmguard-load --empty-cost ... (an empty program there: the tracepoint's own cost)
 *
 * The programs stay attached as long as this process lives: their links are held by its
 * file descriptors only (nothing is pinned), so killing it (by its PID) detaches them.
 * It prints "ready" on stdout once attached, then waits for stdin to close or SIGTERM /
 * SIGINT.  SIGUSR1, and the exit, write the counters to --counts FILE: one line per hook
 * "NAME CALLS DENIALS" (calls: on host inodes by guarded tasks), and with --probe-d-path
 * the last path bpf_d_path returned in file_open and inode_getattr.  --deny: a deny glob
 * of the subset lsmguard.bpf.c matches (a literal path, or one `*` in the last component),
 * PREFIX (the lower's root as bpf_d_path shows it, no trailing slash) put before it.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <bpf/libbpf.h>
#include <linux/types.h>
#include <bpf/bpf.h>
#include "lsmguard.skel.h"

#include "guard.h" /* struct identity, struct deny_pattern: the product's */

static const char *const HOOKS[] = {"inode_permission", "inode_getattr", "file_open",
				    "inode_getxattr", "inode_listxattr", "inode_readlink",
				    "body_cost", "inode_copy_up"};
#define NHOOKS (sizeof(HOOKS) / sizeof(HOOKS[0]))

static volatile sig_atomic_t stop, dump;
static void on_stop(int sig) { (void)sig; stop = 1; }
static void on_dump(int sig) { (void)sig; dump = 1; }

static void write_counts(struct lsmguard_bpf *skel, const char *path, int probe)
{
	int ncpu = libbpf_num_possible_cpus();
	__u64 *values = calloc(ncpu, sizeof(*values));
	__u64 totals[2 * NHOOKS] = {0};
	char tmp[4096];
	FILE *f;

	if (!values)
		return;
	for (__u32 slot = 0; slot < 2 * NHOOKS; slot++) {
		if (bpf_map__lookup_elem(skel->maps.counts, &slot, sizeof(slot), values,
					 sizeof(*values) * ncpu, 0) == 0)
			for (int c = 0; c < ncpu; c++)
				totals[slot] += values[c];
	}
	free(values);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "w");
	if (!f)
		return;
	for (size_t h = 0; h < NHOOKS; h++)
		fprintf(f, "%s %llu %llu\n", HOOKS[h], (unsigned long long)totals[h],
			(unsigned long long)totals[NHOOKS + h]);
	{
		__u64 sums[4] = {0};
		__u64 *per = calloc(ncpu, sizeof(*per));

		for (__u32 slot = 0; per && slot < 4; slot++)
			if (bpf_map__lookup_elem(skel->maps.body_ns, &slot, sizeof(slot), per,
						 sizeof(*per) * ncpu, 0) == 0)
				for (int c = 0; c < ncpu; c++)
					sums[slot] += per[c];
		free(per);
		fprintf(f, "body_ns_host %llu %llu\nbody_ns_guarded %llu %llu\n",
			(unsigned long long)sums[0], (unsigned long long)sums[1],
			(unsigned long long)sums[2], (unsigned long long)sums[3]);
	}
	if (probe) {
		for (__u32 slot = 0; slot < 2; slot++) {
			char buf[256] = {0};

			bpf_map__lookup_elem(skel->maps.last_path, &slot, sizeof(slot), buf,
					     sizeof(buf), 0);
			buf[255] = 0;
			fprintf(f, "d_path:%s %s\n", slot ? "inode_getattr" : "file_open", buf);
		}
	}
	fclose(f);
	rename(tmp, path);
}

static int usage(void)
{
	fprintf(stderr, "usage: lsmguard-load --userns INUM --uid U --gid G [--group G]... "
			"--dev MAJ:MIN [--dev ...] [--counts FILE] [--probe-d-path]\n");
	return 2;
}

int main(int argc, char **argv)
{
	struct identity id = {0};
	unsigned long userns = 0;
	unsigned devs[16];
	int ndevs = 0, probe = 0, have_uid = 0, have_gid = 0, err;
	const char *counts = NULL, *deny_root = "", *denies[DENY_MAX];
	int ndeny = 0, check = 0, body = 0, empty = 0;
	struct deny_pattern patterns[DENY_MAX];
	struct lsmguard_bpf *skel;

	for (int i = 1; i < argc; i++) {
		const char *arg = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(arg, "--probe-d-path")) {
			probe = 1;
			continue;
		}
		if (!strcmp(arg, "--body-cost")) {
			body = 1;
			continue;
		}
		if (!strcmp(arg, "--empty-cost")) {
			empty = 1;
			continue;
		}
		if (!strcmp(arg, "--check")) {
			check = probe = 1;
			continue;
		}
		if (!val)
			return usage();
		i++;
		if (!strcmp(arg, "--userns"))
			userns = strtoul(val, NULL, 10);
		else if (!strcmp(arg, "--uid"))
			id.uid = strtoul(val, NULL, 10), have_uid = 1;
		else if (!strcmp(arg, "--gid"))
			id.gid = strtoul(val, NULL, 10), have_gid = 1;
		else if (!strcmp(arg, "--group") && id.ngroups < MAX_GROUPS)
			id.groups[id.ngroups++] = strtoul(val, NULL, 10);
		else if (!strcmp(arg, "--dev") && ndevs < 16) {
			unsigned maj, min;

			if (sscanf(val, "%u:%u", &maj, &min) != 2)
				return usage();
			devs[ndevs++] = (maj << 20) | min; /* the kernel's MKDEV */
		} else if (!strcmp(arg, "--counts"))
			counts = val;
		else if (!strcmp(arg, "--deny") && ndeny < DENY_MAX)
			denies[ndeny++] = val;
		else if (!strcmp(arg, "--deny-root"))
			deny_root = val;
		else
			return usage();
	}
	/* Refuse to guard the host's own namespace (its level is 0 and the program would
	 * ignore it, but a wrong number must not reach the map at all). */
	if (check) {
		ndeny = 1; /* load the deny programs too */
		memset(patterns, 0, sizeof(patterns));
		skel = lsmguard_bpf__open();
		if (!skel)
			return 1;
		skel->rodata->deny_count = 1;
		bpf_program__set_autoload(skel->progs.body_cost, 0);
		bpf_program__set_autoload(skel->progs.empty_cost, 0);
		err = lsmguard_bpf__load(skel);
		if (err)
			fprintf(stderr, "lsmguard-load: load: %s\n", strerror(-err));
		else
			printf("loadable\n");
		lsmguard_bpf__destroy(skel);
		return err ? 1 : 0;
	}
	if (!userns || !have_uid || !have_gid || !ndevs)
		return usage();
	{
		struct stat st;
		char self[64];

		snprintf(self, sizeof(self), "/proc/1/ns/user");
		if (stat(self, &st) == 0 && st.st_ino == userns) {
			fprintf(stderr, "lsmguard-load: %lu is the host's user namespace\n", userns);
			return 2;
		}
	}
	memset(patterns, 0, sizeof(patterns));
	for (int i = 0; i < ndeny; i++) {
		char full[512];
		const char *star;
		struct deny_pattern *p = &patterns[i];

		snprintf(full, sizeof(full), "%s%s", deny_root, denies[i]);
		star = strchr(full, '*');
		if (star && (strchr(star + 1, '*') || strchr(star, '/') || strchr(full, '?') ||
			     strchr(full, '['))) {
			fprintf(stderr, "lsmguard-load: %s: not in the subset (one * in the last "
					"component)\n", denies[i]);
			return 2;
		}
		p->star = star != NULL;
		p->prefix_len = star ? (__u32)(star - full) : (__u32)strlen(full);
		if (p->prefix_len >= DENY_LEN || (star && strlen(star + 1) >= SUFFIX_LEN)) {
			fprintf(stderr, "lsmguard-load: %s: too long\n", denies[i]);
			return 2;
		}
		memcpy(p->prefix, full, p->prefix_len);
		if (star) {
			p->suffix_len = strlen(star + 1);
			/* right-aligned: lsmguard.bpf.c's pattern_matches */
			memcpy(p->suffix + SUFFIX_LEN - p->suffix_len, star + 1, p->suffix_len);
		}
	}
	signal(SIGTERM, on_stop);
	signal(SIGINT, on_stop);
	signal(SIGUSR1, on_dump);
	signal(SIGPIPE, SIG_IGN);

	skel = lsmguard_bpf__open();
	if (!skel) {
		fprintf(stderr, "lsmguard-load: open: %s\n", strerror(errno));
		return 1;
	}
	bpf_program__set_autoload(skel->progs.probe_open_path, probe);
	bpf_program__set_autoload(skel->progs.probe_getattr_path, probe);
	bpf_program__set_autoload(skel->progs.deny_open, ndeny > 0);
	bpf_program__set_autoload(skel->progs.deny_getattr, ndeny > 0);
	skel->rodata->deny_count = ndeny;
	if (body || empty) {
		struct bpf_program *prog, *only = body ? skel->progs.body_cost
						       : skel->progs.empty_cost;

		bpf_object__for_each_program(prog, skel->obj)
			bpf_program__set_autoload(prog, prog == only);
	} else {
		bpf_program__set_autoload(skel->progs.body_cost, 0);
		bpf_program__set_autoload(skel->progs.empty_cost, 0);
	}
	err = lsmguard_bpf__load(skel);
	if (err) {
		fprintf(stderr, "lsmguard-load: load: %s\n", strerror(-err));
		goto out;
	}
	{
		__u32 key = (__u32)userns;
		__u8 one = 1;

		err = bpf_map__update_elem(skel->maps.guarded, &key, sizeof(key), &id, sizeof(id),
					   BPF_ANY);
		for (int i = 0; !err && i < ndevs; i++)
			err = bpf_map__update_elem(skel->maps.host_devs, &devs[i], sizeof(devs[i]),
						   &one, sizeof(one), BPF_ANY);
		for (__u32 i = 0; !err && i < (__u32)ndeny; i++)
			err = bpf_map__update_elem(skel->maps.deny, &i, sizeof(i), &patterns[i],
						   sizeof(patterns[i]), BPF_ANY);
		if (err) {
			fprintf(stderr, "lsmguard-load: map: %s\n", strerror(-err));
			goto out;
		}
	}
	err = lsmguard_bpf__attach(skel);
	if (err) {
		fprintf(stderr, "lsmguard-load: attach: %s\n", strerror(-err));
		goto out;
	}
	printf("ready\n");
	fflush(stdout);
	while (!stop) {
		struct pollfd pfd = {.fd = 0, .events = POLLIN};
		int n = poll(&pfd, 1, 1000);

		if (dump && counts) {
			dump = 0;
			write_counts(skel, counts, probe);
		}
		if (n > 0) {
			char buf[64];

			if (read(0, buf, sizeof(buf)) <= 0)
				break; /* stdin closed: our parent is done */
		}
	}
	if (counts)
		write_counts(skel, counts, probe);
out:
	lsmguard_bpf__destroy(skel); /* detaches every link */
	return err ? 1 : 0;
}
