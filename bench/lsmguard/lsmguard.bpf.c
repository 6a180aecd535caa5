// SPDX-License-Identifier: GPL-2.0
/* The BPF LSM guard, with the bench's own programs (issue 16; bench only).
 *
 * The guard itself is the product's, launcher/login/bpf/guard.bpf.c, included here (its
 * comment says what it enforces); this file adds what only the bench loads: a probe of
 * bpf_d_path in the sleepable hooks (loader.c --probe-d-path, hooks.py) and the decision's
 * cost at every system call's entry (--body-cost, --empty-cost: hookcost.py).  loader.c
 * (lsmguard-load) holds the programs attached while it lives: the prototype's model,
 * not the product's (launcher/login/bpfguard.py pins them).
 */
#include "../../launcher/login/bpf/guard.bpf.c"

/* A probe for bench/lsmguard/hooks.py: may a sleepable program on these hooks call
 * bpf_d_path (what a deny glob matched late needs)?  Loaded only with --probe-d-path;
 * it records the last path it saw for a guarded task. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, char[256]);
} last_path SEC(".maps");

static __always_inline void record_path(const struct path *path, __u32 slot)
{
	char *buf = bpf_map_lookup_elem(&last_path, &slot);

	if (buf && guarded_identity_probe())
		bpf_d_path((struct path *)path, buf, 256);
}

SEC("lsm.s/file_open")
int BPF_PROG(probe_open_path, struct file *file, int ret)
{
	record_path(&file->f_path, 0);
	return ret;
}

SEC("lsm.s/inode_getattr")
int BPF_PROG(probe_getattr_path, const struct path *path, int ret)
{
	record_path(path, 1);
	return ret;
}

/* The program's own work, measured where no LSM program can be attached (bench/lsmguard/
 * hookcost.py --body): the decision above, for the task's working directory (a host
 * inode when it is on the host's filesystem), at every system call's entry (a BTF
 * tracepoint: no trampoline, no text patching; it cannot deny anything).  Loaded only
 * with the loader's --body-cost, and then alone. */
#define BODY_REPEAT 32

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4); /* ns spent in BODY_REPEAT decisions, how many times: [0], [1]
				 * for tasks not guarded, [2], [3] for guarded ones */
	__type(key, __u32);
	__type(value, __u64);
} body_ns SEC(".maps");

SEC("tp_btf/sys_enter")
int BPF_PROG(body_cost, struct pt_regs *regs, long id)
{
	struct task_struct *task = bpf_get_current_task_btf();
	/* the working directory, through overlayfs' lower entry if it is in a view: the
	 * inode_getattr program's path (decide_stat), its mapping done once, before the
	 * loop (in the loop, clang hoisted the 6.1 layout's address arithmetic above the
	 * layout test, where the relocation this kernel cannot resolve became reachable) */
	struct inode *inode = task->fs->pwd.dentry->d_inode;
	int overlay = inode && inode->i_sb->s_magic == OVERLAYFS_SUPER_MAGIC;
	struct inode *lower = overlay ? ovl_lower(inode) : NULL;
	__u32 k0 = guarded_identity() ? 2 : 0, k1 = k0 + 1;
	__u64 start = bpf_ktime_get_ns();

#pragma clang loop unroll(disable)
	for (int i = 0; i < BODY_REPEAT; i++)
		overlay ? decide_read(lower, H_BODY) : decide_host(inode, H_BODY);
	__u64 spent = bpf_ktime_get_ns() - start;
	__u64 *total = bpf_map_lookup_elem(&body_ns, &k0), *times = bpf_map_lookup_elem(&body_ns, &k1);

	if (total && times) {
		*total += spent;
		*times += 1;
	}
	return 0;
}

/* The same tracepoint with nothing to do: what attaching to sys_enter costs by itself
 * (every task's system calls take the traced entry path), to subtract (--empty-cost). */
SEC("tp_btf/sys_enter")
int BPF_PROG(empty_cost, struct pt_regs *regs, long id)
{
	return 0;
}
