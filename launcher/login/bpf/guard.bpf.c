// SPDX-License-Identifier: GPL-2.0
/* The login view's guard in the kernel: a BPF LSM program (issue 16; launcher/login/bpfguard.py
 * loads it, pins it and fills its maps; its design is that module's docstring).
 *
 * What it enforces.  For a task of a guarded environment (below), an entry of a view whose
 * lower entry is an inode of the host's filesystem (its superblock's s_dev is in
 * `host_devs`; view_only: what is reached through overlayfs, not a bound home) that the
 * environment's user could not read on the host fails with ENOENT: stat (inode_getattr, on overlayfs' lower entry:
 * decide_stat), copy-up (inode_copy_up), open (file_open: also exec, opendir, copy-up's
 * read), a path walk through it (inode_permission), its extended attributes
 * (inode_getxattr / inode_listxattr, except overlayfs' own "*.overlay.*" names).  "Could
 * not read" is sdeefs.identity.Identity.host_readable: owner, group and other bits
 * against the user's uid, gid and groups (the first class that applies); a directory
 * needs r and x; a symlink is always readable.  Decided at every access, from the inode
 * as it is now: an entry created or chmod-ed on the host after the environment started
 * is hidden at its next access (the verdicts are cached per inode, keyed with the fields
 * they were made from: view_guard, at the end).  And the deny globs of a subset, matched
 * late (below).
 *
 * Which tasks.  A task is guarded when its user namespace, or one of that namespace's
 * ancestors, is a key of `guarded` by its owner's uid (key_by_owner: the user's uid, put
 * there by bpfguard.py before the environment's namespace is made).  The
 * task's *real* credentials are read (task->real_cred), not current_cred(): overlayfs
 * calls the lower layer's inode_permission, open and copy-up with the mounter's
 * credentials (ovl_override_creds), so current_cred() at the real inode's hook is the
 * mounter's.  The ancestors are walked because root inside may unshare a user namespace
 * of its own.  Every other task of the machine returns 0 at the first test (its
 * namespace's level is 0, or no key matches): the program denies nothing outside the
 * environments in the map.
 *
 * What it cannot do: hide a name from a listing (no LSM hook sees directory entries),
 * so `ls` of a directory shows a hidden entry's name, and lstat of it says ENOENT.
 * (The login's mask hides, by name, what was root-only when the environment started.)
 *
 * Counters (`counts`, per CPU): per hook, the calls on host inodes by guarded tasks and
 * the denials (bench/lsmguard/hooks.py reads them: "which hooks fire").
 *
 * bench/lsmguard/lsmguard.bpf.c includes this file and adds the bench's own programs.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "guard.h"

char LICENSE[] SEC("license") = "GPL";

#define ENOENT 2
#define MAX_NS_DEPTH 33 /* user namespaces nest at most 32 deep */

#define S_IFMT 00170000
#define S_IFDIR 0040000
#define S_IFLNK 0120000


struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, GUARDED_MAX);
	__type(key, __u32); /* user namespace inode number */
	__type(value, struct identity);
} guarded SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEVS_MAX);
	__type(key, __u32); /* sb->s_dev, the kernel's encoding (major << 20 | minor) */
	__type(value, __u8);
} host_devs SEC(".maps");

enum hook { H_PERMISSION, H_GETATTR, H_OPEN, H_GETXATTR, H_LISTXATTR, H_READLINK, H_BODY,
	    H_COPY_UP, H_COUNT };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * H_COUNT); /* [hook] calls, [H_COUNT + hook] denials */
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *value = bpf_map_lookup_elem(&counts, &slot);

	if (value)
		*value += 1;
}

/* What a key of `guarded` is (fixed at load): 1 (the product, bpfguard.py) the uid that
 * owns the user namespace, i.e. the user: sdeefs-enter start makes the environment's
 * namespace as the user (so that the user can join it), and the key can be in the map
 * before the namespace exists, so there is no moment in which the user could join an
 * environment the program does not guard yet; it also guards every other namespace the
 * user makes (a rootless container: the same rule as the host's permissions, for the
 * user's own files, its subordinate ids' included: the container's layers are theirs).  0 (bench/lsmguard's loader): the namespace's inode number. */
const volatile __u32 key_by_owner = 0;

/* The identity of the environment the current task belongs to, or NULL.  Plain loads
 * through the task's BTF pointers (the JIT makes each one instruction with an exception
 * entry): the non-sleepable programs'.  guarded_identity_probe() is the same with
 * bpf_probe_read_kernel, for the sleepable ones (where __rcu pointers need more). */
static __always_inline struct identity *guarded_identity(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct user_namespace *ns = task->real_cred->user_ns;

	for (int i = 0; i < MAX_NS_DEPTH; i++) {
		if (!ns || ns->level == 0)
			return NULL; /* the host's namespace: never guarded */
		__u32 key = key_by_owner ? ns->owner.val : ns->ns.inum;
		struct identity *id = bpf_map_lookup_elem(&guarded, &key);

		if (id)
			return id;
		ns = ns->parent;
	}
	return NULL;
}

static __always_inline struct identity *guarded_identity_probe(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct user_namespace *ns = BPF_CORE_READ(task, real_cred, user_ns);

	for (int i = 0; i < MAX_NS_DEPTH; i++) {
		if (!ns || BPF_CORE_READ(ns, level) == 0)
			return NULL;
		__u32 key = key_by_owner ? BPF_CORE_READ(ns, owner.val) : BPF_CORE_READ(ns, ns.inum);
		struct identity *id = bpf_map_lookup_elem(&guarded, &key);

		if (id)
			return id;
		ns = BPF_CORE_READ(ns, parent);
	}
	return NULL;
}

static __always_inline int in_groups(const struct identity *id, __u32 gid)
{
	for (int i = 0; i < MAX_GROUPS; i++) {
		if (i >= id->ngroups)
			break;
		if (id->groups[i] == gid)
			return 1;
	}
	return 0;
}

/* 0, or -ENOENT: the rule on the fields of a host inode (identity.host_readable). */
static __always_inline int decide_fields(struct identity *id, __u32 mode, __u32 uid, __u32 gid,
					 enum hook hook)
{
	count(hook);
	if ((mode & S_IFMT) == S_IFLNK)
		return 0;
	__u32 need = (mode & S_IFMT) == S_IFDIR ? 5 : 4;
	__u32 bits;

	if (uid == id->uid || uid - id->subuid < id->count) /* (unsigned: below wraps) */
		bits = mode >> 6;
	else if (gid == id->gid || in_groups(id, gid) || gid - id->subgid < id->count)
		bits = mode >> 3;
	else
		bits = mode;
	if ((bits & need) == need)
		return 0;
	count(H_COUNT + hook);
	return -ENOENT;
}

/* What is decided (fixed at load): 1 (the product) only what a task reaches through an
 * overlayfs view, on the view's lower entry; an inode of the host reached directly (the
 * user's home, /scratch: bound into the environment, the user's own business as on the
 * host, and files there made by root inside with mode 0600 are the user's own) is not
 * the guard's.  0 (bench/lsmguard): every host inode, also the real inodes overlayfs
 * passes to the hooks itself. */
const volatile __u32 view_only = 0;

/* 0, or -ENOENT if `inode` (a hook's argument: plain loads) is a host inode the identity
 * could not read on the host. */
static __always_inline int decide_host(struct inode *inode, enum hook hook)
{
	struct identity *id = guarded_identity();

	if (!id || !inode)
		return 0;
	__u32 dev = inode->i_sb->s_dev;

	if (!bpf_map_lookup_elem(&host_devs, &dev))
		return 0;
	return decide_fields(id, inode->i_mode, inode->i_uid.val, inode->i_gid.val, hook);
}

/* The same for an inode reached through overlayfs' own structures (read with
 * bpf_probe_read_kernel: such a pointer is not a BTF one; bpf_rdonly_cast, which would
 * make it one, came in 6.2). */
static __always_inline int decide_read(struct inode *inode, enum hook hook)
{
	struct identity *id = guarded_identity();

	if (!id || !inode)
		return 0;
	__u32 dev = BPF_CORE_READ(inode, i_sb, s_dev);

	if (!bpf_map_lookup_elem(&host_devs, &dev))
		return 0;
	return decide_fields(id, BPF_CORE_READ(inode, i_mode), BPF_CORE_READ(inode, i_uid.val),
			     BPF_CORE_READ(inode, i_gid.val), hook);
}

#define OVERLAYFS_SUPER_MAGIC 0x794c7630

static __always_inline struct inode *ovl_lower(struct inode *inode);

/* Is this overlayfs superblock an environment's own view (with key_by_owner)?  The
 * environment's overlay is mounted in its user namespace, which the user owns (sdeefs-enter
 * start makes it as the user); an overlay a container inside mounts is in a namespace
 * root inside made, owned by root inside's host uid (a subordinate one), so its layers
 * (in the bound home, say: the user's own business, as on the host) are not the guard's.
 * Nothing of the host is reachable through such an overlay but through the view (decided
 * there) or the binds (never decided).  The bench's loader (key: the namespace) decides all. */
static __always_inline int env_view(const struct super_block *sb, const struct identity *id)
{
	if (!key_by_owner)
		return 1;
	return BPF_CORE_READ(sb, s_user_ns, owner.val) == id->uid;
}

/* The decision of the inode hooks: with view_only, on an overlayfs inode's lower entry
 * (none: an entry with an upper, the user's own) of an environment's view; else on a host
 * inode itself. */
static __always_inline int decide(struct inode *inode, enum hook hook)
{
	struct identity *id;

	if (!view_only)
		return decide_host(inode, hook);
	if (!inode || inode->i_sb->s_magic != OVERLAYFS_SUPER_MAGIC)
		return 0;
	id = guarded_identity();
	if (!id || !env_view(inode->i_sb, id))
		return 0;
	return decide_read(ovl_lower(inode), hook);
}

/* overlayfs' structures, as much of them as the program reads, defined here: on Debian
 * overlayfs is a module, so the build host's vmlinux.h (from /sys/kernel/btf/vmlinux)
 * lacks them; CO-RE matches them by name (the "___" suffix is dropped) in the running
 * kernel's BTF, the overlay module's included, and relocates each field. */
struct ovl_path___sdeefs {
	const void *layer;
	struct dentry *dentry;
} __attribute__((preserve_access_index));

/* since 6.5: the lower stack in an ovl_entry the inode points to */
struct ovl_entry___sdeefs {
	unsigned int __numlower;
	struct ovl_path___sdeefs __lowerstack[];
} __attribute__((preserve_access_index));

struct ovl_inode___sdeefs {
	struct ovl_entry___sdeefs *oe;
	struct dentry *__upperdentry;
	struct inode vfs_inode;
} __attribute__((preserve_access_index));

/* before 6.5 (Debian 12's 6.1): the lower entry in the inode itself */
struct ovl_inode___pre65 {
	struct inode vfs_inode;
	struct dentry *__upperdentry;
	struct ovl_path___sdeefs lowerpath;
} __attribute__((preserve_access_index));

/* The host inode behind an overlayfs inode, from overlayfs' own inode (CO-RE, both
 * layouts: the relocations of the one this kernel lacks are left unreachable); NULL for
 * an entry with an upper (copied up: the user's own) or no lower. */
static __always_inline struct inode *ovl_lower(struct inode *inode)
{
	if (bpf_core_field_exists(struct ovl_inode___sdeefs, oe)) {
		struct ovl_inode___sdeefs *oi = (void *)inode -
			bpf_core_field_offset(struct ovl_inode___sdeefs, vfs_inode);

		if (BPF_CORE_READ(oi, __upperdentry))
			return NULL;
		struct ovl_entry___sdeefs *oe = BPF_CORE_READ(oi, oe);

		if (!oe || BPF_CORE_READ(oe, __numlower) == 0)
			return NULL;
		return BPF_CORE_READ(oe, __lowerstack[0].dentry, d_inode);
	}
	struct ovl_inode___pre65 *old = (void *)inode -
					bpf_core_field_offset(struct ovl_inode___pre65, vfs_inode);

	if (BPF_CORE_READ(old, __upperdentry))
		return NULL;
	return BPF_CORE_READ(old, lowerpath.dentry, d_inode);
}

/* A stat's decision.  Since ovl_getattr() asks the layer with vfs_getattr_nosec() (patch
 * "fs: Simplify getattr interface function checking AT_GETATTR_NOSEC flag", Nov 2024), no
 * inode_getattr hook fires on the host inode for a stat through overlayfs, so the overlay
 * inode's call decides on its lower entry.  (Before that, as on 6.1, the real inode's own
 * call decides too.) */
static __always_inline int decide_stat(struct inode *inode, enum hook hook)
{
	if (inode && inode->i_sb->s_magic == OVERLAYFS_SUPER_MAGIC) {
		struct identity *id = guarded_identity();

		return id && env_view(inode->i_sb, id) ? decide_read(ovl_lower(inode), hook) : 0;
	}
	return view_only ? 0 : decide_host(inode, hook);
}

static __always_inline int view_guard(struct inode *inode, const struct path *path,
				      enum hook hook);

SEC("lsm/inode_permission")
int BPF_PROG(guard_permission, struct inode *inode, int mask, int ret)
{
	if (ret)
		return ret;
	if (view_only)
		return view_guard(inode, NULL, H_PERMISSION);
	return decide(inode, H_PERMISSION);
}

SEC("lsm/inode_getattr")
int BPF_PROG(guard_getattr, const struct path *path, int ret)
{
	if (ret)
		return ret;
	if (view_only)
		return view_guard(path->dentry->d_inode, path, H_GETATTR);
	return decide_stat(path->dentry->d_inode, H_GETATTR);
}

SEC("lsm/file_open")
int BPF_PROG(guard_open, struct file *file, int ret)
{
	if (ret)
		return ret;
	if (view_only)
		return view_guard(file->f_inode, &file->f_path, H_OPEN);
	return decide(file->f_inode, H_OPEN);
}

/* copy-up (ovl_copy_up_one) passes the lower dentry: a directory's copy-up opens nothing,
 * so without this its owner, mode and times would reach the upper */
SEC("lsm/inode_copy_up")
int BPF_PROG(guard_copy_up, struct dentry *src, struct cred **new, int ret)
{
	if (ret)
		return ret;
	return decide_host(src->d_inode, H_COPY_UP); /* the lower's own dentry */
}

/* overlayfs' own attributes of a layer (user.overlay.*, trusted.overlay.*) stay readable:
 * it reads them while it looks names up, before any decision about the user's access. */
static __always_inline int overlay_xattr(const char *name)
{
	char buf[16] = {};

	bpf_probe_read_kernel_str(buf, sizeof(buf), name);
	if (buf[0] == 'u' && buf[1] == 's' && buf[2] == 'e' && buf[3] == 'r' && buf[4] == '.')
		return buf[5] == 'o' && buf[6] == 'v' && buf[7] == 'e' && buf[8] == 'r' &&
		       buf[9] == 'l' && buf[10] == 'a' && buf[11] == 'y' && buf[12] == '.';
	if (buf[0] == 't' && buf[1] == 'r' && buf[2] == 'u' && buf[3] == 's' && buf[4] == 't' &&
	    buf[5] == 'e' && buf[6] == 'd' && buf[7] == '.')
		return buf[8] == 'o' && buf[9] == 'v' && buf[10] == 'e' && buf[11] == 'r' &&
		       buf[12] == 'l' && buf[13] == 'a' && buf[14] == 'y';
	return 0;
}

SEC("lsm/inode_getxattr")
int BPF_PROG(guard_getxattr, struct dentry *dentry, const char *name, int ret)
{
	if (ret || overlay_xattr(name))
		return ret;
	if (view_only)
		return view_guard(dentry->d_inode, NULL, H_GETXATTR);
	return decide(dentry->d_inode, H_GETXATTR);
}

SEC("lsm/inode_listxattr")
int BPF_PROG(guard_listxattr, struct dentry *dentry, int ret)
{
	if (ret)
		return ret;
	if (view_only)
		return view_guard(dentry->d_inode, NULL, H_LISTXATTR);
	return decide(dentry->d_inode, H_LISTXATTR);
}

SEC("lsm/inode_readlink") /* a symlink: counted only */
int BPF_PROG(guard_readlink, struct dentry *dentry, int ret)
{
	if (ret)
		return ret;
	if (view_only)
		return view_guard(dentry->d_inode, NULL, H_READLINK);
	return decide(dentry->d_inode, H_READLINK);
}

/* Deny globs matched late: a subset (bpfguard.py writes the `deny` map; on file_open and
 * inode_getattr, the hooks with a path, where bpf_d_path may be called: the product's in
 * view_guard, below, the bench's in the sleepable deny_open and deny_getattr).
 * A pattern is a literal absolute path (the entry and everything below it is denied), or
 * one `*` inside its last component ("/etc/ssh/ssh_host_*_key": that component's name
 * starts and ends as given, a leading dot only if the pattern's component has one).  No
 * `?`, `[...]`, or several stars: sdeefs' DEFAULT_DENY needs none of them (bpfguard.py:
 * deny_subset, which also writes the map).  The path is bpf_d_path's: for a stat the
 * overlay path as the task sees it ("/etc/..." from the login's root), for the open of
 * the backing file the path on overlayfs' private clone of the lower's mount ("/etc/..."
 * again, from the lower's root), so the patterns apply as written. */
#define PATH_LEN 256
#define COMPONENT_LEN 64


struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DENY_MAX);
	__type(key, __u32);
	__type(value, struct deny_pattern);
} deny SEC(".maps");

const volatile __u32 deny_count = 0;

struct path_buf {
	char s[PATH_LEN];
};

/* A global (not inlined) function: the verifier checks it once, on its own, for any
 * arguments, not once per pattern and per state of the caller.  Its loops have constant
 * bounds and branch only on bytes, never on a length, so the verifier's walk stays
 * linear: bpfguard.py zero-fills the prefix past prefix_len and stores the suffix
 * right-aligned (zeros before it), and a zero byte of the pattern matches anything.
 * (Written with loops bounded by prefix_len and suffix_len, the walk took more than the
 * verifier's 1,000,000 instructions on Debian 12's 6.12 kernel: bench/lsmguard/vm.py.) */
__noinline int pattern_matches(const struct path_buf *buf, __u32 len,
			       const struct deny_pattern *p)
{
	if (!buf || !p)
		return 0;
	const char *path = buf->s; /* NUL at path[len], zeros after it */
	__u32 plen = p->prefix_len, slen = p->suffix_len, e = 0, found = 0;

	if (len >= PATH_LEN || plen >= DENY_LEN || slen >= SUFFIX_LEN || len < plen)
		return 0;
	for (__u32 j = 0; j < DENY_LEN; j++) {
		char c = p->prefix[j];

		if (c && c != path[j])
			return 0;
	}
	if (!p->star) /* the entry itself, or below it */
		return len == plen || path[plen & (PATH_LEN - 1)] == '/';
	/* the rest of this component: path[plen .. e), at most COMPONENT_LEN bytes */
	for (__u32 j = 0; j < COMPONENT_LEN; j++) {
		char c = path[(plen + j) & (PATH_LEN - 1)];

		if (c == '/' || c == 0) {
			e = plen + j;
			found = 1;
			break;
		}
	}
	if (!found)
		return 0; /* longer: not matched (a prototype's limit) */
	if (plen > 0 && path[(plen - 1) & (PATH_LEN - 1)] == '/' &&
	    path[plen & (PATH_LEN - 1)] == '.')
		return 0; /* a wildcard matches no leading dot */
	if (e < plen + slen)
		return 0;
	for (__u32 j = 0; j < SUFFIX_LEN; j++) {
		char c = p->suffix[j];

		if (c && c != path[(e - SUFFIX_LEN + j) & (PATH_LEN - 1)])
			return 0;
	}
	return 1; /* the component matches: it, or an entry below it */
}

static __noinline int deny_match(const struct path *path);

static __always_inline int denied_path(const struct path *path, enum hook hook)
{
	struct identity *id;

	if (view_only)
		return 0; /* the product's view_guard matches the globs itself (below) */
	id = guarded_identity_probe();
	if (!deny_count || !id)
		return 0;
	/* a stat's path is the overlay's (see decide_stat): the entry is a host one if
	 * overlayfs' lower entry is; the path matched is the one given */
	struct inode *inode = BPF_CORE_READ(path, dentry, d_inode);

	if (inode && BPF_CORE_READ(inode, i_sb, s_magic) == OVERLAYFS_SUPER_MAGIC) {
		if (!env_view(BPF_CORE_READ(inode, i_sb), id))
			return 0; /* a container's overlay: not a view of the host */
		inode = ovl_lower(inode);
	}
	else if (view_only)
		return 0; /* not through a view: a bound home's "/home/..." is not denied */
	if (!inode)
		return 0;
	__u32 dev = BPF_CORE_READ(inode, i_sb, s_dev);

	if (!bpf_map_lookup_elem(&host_devs, &dev))
		return 0;
	if (deny_match(path)) {
		count(H_COUNT + hook);
		return -ENOENT;
	}
	return 0;
}

SEC("lsm.s/file_open")
int BPF_PROG(deny_open, struct file *file, int ret)
{
	if (ret)
		return ret;
	return denied_path(&file->f_path, H_OPEN);
}

SEC("lsm.s/inode_getattr")
int BPF_PROG(deny_getattr, const struct path *path, int ret)
{
	if (ret)
		return ret;
	return denied_path(path, H_GETATTR);
}


/* -- The product's path (view_only): one program a hook, the verdicts cached -------------
 *
 * Every hook call of a guarded task on a view's inode used to walk the identity twice, read
 * overlayfs' and the lower inode's fields one bpf_probe_read_kernel each, and (stat, open)
 * run a second, sleepable program for bpf_d_path and the deny patterns: ~2,000 + ~5,000
 * instructions a call (bench/RESULTS.md, issue 16).  Now one program a hook (bpf_d_path is
 * allowed in any LSM program of a sleepable hook: file_open, inode_getattr), the identity
 * looked up once (an unguarded task: the namespace's level, one load, then 0), the lower
 * entry read in as few probe reads as its layout allows, and both verdicts cached on the
 * overlay inode (inode local storage, freed with the inode):
 *
 * * the decision, keyed with everything it was made from: the lower inode (its address;
 *   overlayfs holds it as long as the overlay inode lives), its i_mode, i_uid, i_gid as
 *   read at this access, and the identity (the address of its value in `guarded`: a new
 *   one whenever bpfguard.py writes the key).  A chmod or chown on the host changes the
 *   fields read at the next access: a miss, decided anew;
 * * the deny verdict (the path's, by the globs), valid while `deny_gen` has the value it
 *   had before bpf_d_path was called: fexit programs on vfs_rename and vfs_link bump it
 *   after every rename or link on a host filesystem or an overlayfs (the only ways an
 *   inode of the view gets another path), so a verdict made before a rename's d_move
 *   ends is invalid after it.  The verdict is the inode's, not the path's: an inode with
 *   two paths (a hard link, a bind mount inside) gets the first path's; either path reads
 *   the same inode, so nothing becomes readable that is not readable by a path the globs
 *   do not deny (which the late matching cannot stop either).
 *
 * A verdict is written under `seq` (odd while written; a writer claims it with a
 * compare-and-swap, a reader that sees it odd or changed treats it as a miss), so two CPUs
 * deciding the same inode never leave one's key with the other's verdict. */

struct verdict {
	__u64 seq;        /* (64 bits: the BPF ISA's atomics before v3) */
	__u64 lower;      /* the lower inode (its address) */
	__u64 id;         /* the identity (its value's address) */
	__u64 deny_gen;   /* the deny verdict is for this value of deny_gen */
	__s32 decision;   /* 0 or -ENOENT, for lower, id and: */
	__u32 mode;       /* the lower's i_mode, i_uid, i_gid */
	__u32 uid;
	__u32 gid;
	__u32 host;       /* the lower is on a host filesystem (host_devs) */
	__u32 deny_state; /* 0: none, 1: not denied, 2: denied */
};

struct {
	__uint(type, BPF_MAP_TYPE_INODE_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct verdict);
} verdicts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} deny_gen SEC(".maps");

#define barrier() asm volatile("" ::: "memory")
#define READ_ONCE_U64(x) (*(volatile __u64 *)&(x))

/* The lower inode behind an overlayfs inode and its mode, uid, gid; NULL for an entry with
 * an upper (the user's own) or none.  Adjacent fields are read together (one
 * bpf_probe_read_kernel each), where this kernel's layout has them adjacent (CO-RE
 * offsets; else ovl_lower's reads). */
struct lower_fields {
	__u32 mode, uid, gid;
};

static __always_inline int lower_head(struct inode *lower, struct lower_fields *f);

static __always_inline struct inode *ovl_lower_fields(struct inode *inode,
						      struct lower_fields *f)
{
	struct inode *lower = NULL;
	__u64 w[4] = {};

	if (bpf_core_field_exists(struct ovl_inode___sdeefs, oe)) {
		__u32 up = bpf_core_field_offset(struct ovl_inode___sdeefs, __upperdentry);
		__u32 oe = bpf_core_field_offset(struct ovl_inode___sdeefs, oe);
		__u32 vfs = bpf_core_field_offset(struct ovl_inode___sdeefs, vfs_inode);
		__u32 n = bpf_core_field_offset(struct ovl_entry___sdeefs, __numlower);
		__u32 st = bpf_core_field_offset(struct ovl_entry___sdeefs, __lowerstack);
		__u32 d = bpf_core_field_offset(struct ovl_path___sdeefs, dentry);

		if (oe == up + 8 && n == 0 && (st + d) % 8 == 0 && st + d < 32) {
			if (bpf_probe_read_kernel(w, 16, (void *)inode - vfs + up) || w[0] || !w[1])
				return NULL;
			void *entry = (void *)w[1];

			if (bpf_probe_read_kernel(w, 32, entry) || (__u32)w[0] == 0)
				return NULL;
			struct dentry *dentry = (void *)w[((st + d) / 8) & 3];

			lower = BPF_CORE_READ(dentry, d_inode);
		} else {
			lower = ovl_lower(inode);
		}
	} else {
		__u32 up = bpf_core_field_offset(struct ovl_inode___pre65, __upperdentry);
		__u32 lp = bpf_core_field_offset(struct ovl_inode___pre65, lowerpath);
		__u32 vfs = bpf_core_field_offset(struct ovl_inode___pre65, vfs_inode);
		__u32 d = bpf_core_field_offset(struct ovl_path___sdeefs, dentry);

		if (lp > up && (lp + d - up) % 8 == 0 && lp + d - up < 32) {
			if (bpf_probe_read_kernel(w, 32, (void *)inode - vfs + up) || w[0])
				return NULL;
			struct dentry *dentry = (void *)w[((lp + d - up) / 8) & 3];

			lower = BPF_CORE_READ(dentry, d_inode);
		} else {
			lower = ovl_lower(inode);
		}
	}
	if (!lower || lower_head(lower, f))
		return NULL;
	return lower;
}

/* 1 if overlayfs' inode has an upper entry (one probe read: __upperdentry) */
static __always_inline int ovl_has_upper(struct inode *inode)
{
	void *upper = NULL;

	if (bpf_core_field_exists(struct ovl_inode___sdeefs, oe)) {
		__u32 up = bpf_core_field_offset(struct ovl_inode___sdeefs, __upperdentry);
		__u32 vfs = bpf_core_field_offset(struct ovl_inode___sdeefs, vfs_inode);

		if (bpf_probe_read_kernel(&upper, sizeof(upper), (void *)inode - vfs + up))
			return 1;
	} else {
		__u32 up = bpf_core_field_offset(struct ovl_inode___pre65, __upperdentry);
		__u32 vfs = bpf_core_field_offset(struct ovl_inode___pre65, vfs_inode);

		if (bpf_probe_read_kernel(&upper, sizeof(upper), (void *)inode - vfs + up))
			return 1;
	}
	return upper != NULL;
}

/* The lower inode's mode, uid, gid (one probe read where they are in its first 16 bytes);
 * nonzero if unreadable. */
static __always_inline int lower_head(struct inode *lower, struct lower_fields *f)
{
	__u32 m = bpf_core_field_offset(struct inode, i_mode);
	__u32 u = bpf_core_field_offset(struct inode, i_uid);
	__u32 g = bpf_core_field_offset(struct inode, i_gid);

	if (m == 0 && u % 4 == 0 && g % 4 == 0 && u < 16 && g < 16) {
		__u32 words[4] = {};

		if (bpf_probe_read_kernel(words, sizeof(words), lower))
			return 1;
		f->mode = words[0] & 0xffff;
		f->uid = words[(u / 4) & 3];
		f->gid = words[(g / 4) & 3];
	} else {
		f->mode = BPF_CORE_READ(lower, i_mode);
		f->uid = BPF_CORE_READ(lower, i_uid.val);
		f->gid = BPF_CORE_READ(lower, i_gid.val);
	}
	return 0;
}

/* 1 if the path is denied by a glob (bpf_d_path: the path as the task sees it) */
static __noinline int deny_match(const struct path *path)
{
	struct path_buf buf = {};

	if (!path)
		return 0;
	long len = bpf_d_path((struct path *)path, buf.s, sizeof(buf.s));

	if (len <= 1)
		return 0; /* (too long for the buffer: not matched; a prototype's limit) */
	len -= 1; /* bpf_d_path counts the NUL */
	for (__u32 i = 0; i < DENY_MAX; i++) {
		if (i >= deny_count)
			break;
		__u32 key = i;
		struct deny_pattern *p = bpf_map_lookup_elem(&deny, &key);

		if (p && pattern_matches(&buf, (__u32)len, p))
			return 1;
	}
	return 0;
}

static __always_inline int view_guard(struct inode *inode, const struct path *path,
				      enum hook hook)
{
	if (!inode)
		return 0;
	struct super_block *sb = inode->i_sb;

	if (sb->s_magic != OVERLAYFS_SUPER_MAGIC)
		return 0; /* not through a view: a bound home, the host's own tasks' files */
	struct identity *id = guarded_identity();

	if (!id || sb->s_user_ns->owner.val != id->uid) /* env_view, with plain loads */
		return 0;
	struct lower_fields f;
	struct inode *lower;
	/* An overlay inode's lower entry is fixed for its life (overlayfs sets it when it
	 * makes the inode): once cached, only whether an upper appeared (a copy-up) and the
	 * lower's fields are read again. */
	struct verdict *v = bpf_inode_storage_get(&verdicts, inode, 0, 0);
	__u64 known = v ? READ_ONCE_U64(v->lower) : 0;

	if (known) {
		lower = (struct inode *)known;
		if (ovl_has_upper(inode) || lower_head(lower, &f))
			return 0;
	} else {
		lower = ovl_lower_fields(inode, &f);
		if (!lower)
			return 0;
		v = bpf_inode_storage_get(&verdicts, inode, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	}
	__u32 k0 = 0, host = 0, deny_state = 0;
	__u64 *gen = bpf_map_lookup_elem(&deny_gen, &k0);
	__u64 seq = 0, gen_now = gen ? READ_ONCE_U64(*gen) : 0;
	__s32 decision = 0;
	int hit = 0;

	if (v) {
		seq = READ_ONCE_U64(v->seq);
		barrier();
		if (!(seq & 1) && v->lower == (__u64)lower && v->id == (__u64)id &&
		    v->mode == f.mode && v->uid == f.uid && v->gid == f.gid) {
			decision = v->decision;
			host = v->host;
			if (v->deny_gen == gen_now)
				deny_state = v->deny_state;
			barrier();
			hit = READ_ONCE_U64(v->seq) == seq;
		}
		if (!hit)
			deny_state = 0;
	}
	if (!hit) {
		__u32 dev = BPF_CORE_READ(lower, i_sb, s_dev);

		host = bpf_map_lookup_elem(&host_devs, &dev) != NULL;
		decision = host ? decide_fields(id, f.mode, f.uid, f.gid, hook) : 0;
	} else if (host) {
		count(hook);
		if (decision)
			count(H_COUNT + hook);
	}
	if (!host)
		return 0;
	if (!decision && path && deny_count && !deny_state) {
		deny_state = deny_match(path) ? 2 : 1;
		if (deny_state == 2)
			count(H_COUNT + hook);
	} else if (deny_state == 2) {
		count(H_COUNT + hook);
	}
	/* store what was decided anew (a writer at a time: the one whose CAS took seq) */
	if (v && (!hit || (path && deny_count && !decision && v->deny_gen != gen_now))) {
		__u64 s = READ_ONCE_U64(v->seq);

		if (!(s & 1) && __sync_val_compare_and_swap(&v->seq, s, s + 1) == s) {
			v->decision = decision;
			v->lower = (__u64)lower;
			v->id = (__u64)id;
			v->mode = f.mode;
			v->uid = f.uid;
			v->gid = f.gid;
			v->host = host;
			v->deny_gen = gen_now;
			v->deny_state = deny_state;
			barrier();
			__sync_fetch_and_add(&v->seq, 1);
		}
	}
	/* (-ENOENT, not the cached value: the verifier wants a return in [-4095, 0]) */
	return decision || deny_state == 2 ? -ENOENT : 0;
}

/* deny_gen's bumps: after every rename or link on a host filesystem or an overlayfs (a
 * verdict read deny_gen before its bpf_d_path, so one made during the d_move is stale at
 * once).  fexit: after the new name is in place, not before (an LSM hook's moment). */
static __always_inline void bump_deny_gen(struct dentry *dentry)
{
	if (!view_only || !deny_count || !dentry)
		return;
	struct super_block *sb = dentry->d_sb;

	if (sb->s_magic != OVERLAYFS_SUPER_MAGIC) {
		__u32 dev = sb->s_dev;

		if (!bpf_map_lookup_elem(&host_devs, &dev))
			return;
	}
	__u32 k0 = 0;
	__u64 *gen = bpf_map_lookup_elem(&deny_gen, &k0);

	if (gen)
		__sync_fetch_and_add(gen, 1);
}

SEC("fexit/vfs_rename")
int BPF_PROG(renamed, struct renamedata *rd, int ret)
{
	bump_deny_gen(rd->old_dentry);
	return 0;
}

SEC("fexit/vfs_link")
int BPF_PROG(linked, struct dentry *old_dentry)
{
	bump_deny_gen(old_dentry);
	return 0;
}
