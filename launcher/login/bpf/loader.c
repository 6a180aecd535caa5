// SPDX-License-Identifier: GPL-2.0
/* sdeefs-bpfguard: load guard.bpf.c into the kernel (launcher/login/bpfguard.py runs it, as root).
 *
 *   sdeefs-bpfguard check
 *       load every program, attach nothing, exit 0 ("loadable"), or 1 with one line on
 *       stderr saying why this kernel refuses them
 *   sdeefs-bpfguard attach DIR DENY_COUNT
 *       load (with DENY_COUNT deny patterns: 0 leaves the deny programs out), attach every
 *       program, and pin into DIR (made here, 0700; in bpffs) the maps as map_NAME and the
 *       links as link_NAME, then exit 0 ("attached").  The links being pinned, the programs
 *       stay attached when this process exits, until bpfguard.py unpins them: nothing a
 *       user can kill detaches them.  On any failure what was pinned is unpinned, DIR
 *       removed, and the exit status is 1 with one line on stderr naming the step.
 *
 * The maps are left empty: bpfguard.py fills them (host_devs, deny, then guarded), since
 * it owns their values' layouts (guard.h).  With `guarded` empty the programs deny nothing.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <linux/types.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include "guard.h"
#include "guard.skel.h"

#define MAX_PINS 64

static char pinned[MAX_PINS][512];
static int npinned;

static int fail(const char *step, int err)
{
	fprintf(stderr, "sdeefs-bpfguard: %s: %s\n", step, strerror(err < 0 ? -err : err));
	return 1;
}

static void unpin_all(const char *dir)
{
	while (npinned > 0)
		unlink(pinned[--npinned]);
	rmdir(dir);
}

static int remember(const char *dir, const char *kind, const char *name, char *path, size_t size)
{
	if (npinned >= MAX_PINS)
		return -E2BIG;
	if ((size_t)snprintf(path, size, "%s/%s_%s", dir, kind, name) >= size)
		return -ENAMETOOLONG;
	return 0;
}

static int check(void)
{
	struct guard_bpf *skel = guard_bpf__open();
	int err;

	if (!skel)
		return fail("open", errno);
	skel->rodata->deny_count = 1; /* the deny globs' code is checked too */
	skel->rodata->key_by_owner = 1;
	skel->rodata->view_only = 1;
	bpf_program__set_autoload(skel->progs.deny_open, 0); /* view_only: guard_* match */
	bpf_program__set_autoload(skel->progs.deny_getattr, 0);
	err = guard_bpf__load(skel);
	guard_bpf__destroy(skel);
	if (err)
		return fail("load", err);
	printf("loadable\n");
	return 0;
}

static int attach(const char *dir, unsigned deny_count)
{
	struct guard_bpf *skel;
	struct bpf_program *prog;
	struct bpf_map *map;
	int err;

	if (deny_count > DENY_MAX)
		return fail("deny count", E2BIG);
	if (mkdir(dir, 0700) < 0)
		return fail(dir, errno);
	skel = guard_bpf__open();
	if (!skel) {
		err = errno;
		rmdir(dir);
		return fail("open", err);
	}
	skel->rodata->deny_count = deny_count;
	skel->rodata->key_by_owner = 1; /* guarded: the namespace owner's uid (guard.bpf.c) */
	skel->rodata->view_only = 1;    /* decided: what a task reaches through a view */
	/* the sleepable deny programs are the bench's (bench/lsmguard): with view_only the
	 * guard's own programs match the globs (guard.bpf.c, view_guard) */
	bpf_program__set_autoload(skel->progs.deny_open, 0);
	bpf_program__set_autoload(skel->progs.deny_getattr, 0);
	err = guard_bpf__load(skel);
	if (err) {
		guard_bpf__destroy(skel);
		rmdir(dir);
		return fail("load", err);
	}
	bpf_object__for_each_map(map, skel->obj) {
		if (bpf_map__is_internal(map))
			continue; /* .rodata: deny_count, fixed at load */
		char *path = pinned[npinned];

		err = remember(dir, "map", bpf_map__name(map), path, sizeof(pinned[0]));
		if (!err)
			err = bpf_map__pin(map, path);
		if (err) {
			fail("pin map", err);
			goto out;
		}
		npinned++;
	}
	bpf_object__for_each_program(prog, skel->obj) {
		if (!bpf_program__autoload(prog))
			continue;
		char *path = pinned[npinned];
		struct bpf_link *link = bpf_program__attach(prog);

		if (!link) {
			err = -errno;
			fail(bpf_program__name(prog), err);
			goto out;
		}
		err = remember(dir, "link", bpf_program__name(prog), path, sizeof(pinned[0]));
		if (!err)
			err = bpf_link__pin(link, path);
		bpf_link__destroy(link); /* closes our descriptor; the pin holds the link */
		if (err) {
			fail("pin link", err);
			goto out;
		}
		npinned++;
	}
	printf("attached\n");
out:
	if (err)
		unpin_all(dir);
	guard_bpf__destroy(skel);
	return err ? 1 : 0;
}

int main(int argc, char **argv)
{
	libbpf_set_strict_mode(LIBBPF_STRICT_ALL);
	if (argc == 2 && !strcmp(argv[1], "check"))
		return check();
	if (argc == 4 && !strcmp(argv[1], "attach")) {
		char *end;
		unsigned long count = strtoul(argv[3], &end, 10);

		if (*end || end == argv[3])
			return fail("DENY_COUNT", EINVAL);
		return attach(argv[2], (unsigned)count);
	}
	fprintf(stderr, "usage: sdeefs-bpfguard check | attach DIR DENY_COUNT\n");
	return 2;
}
