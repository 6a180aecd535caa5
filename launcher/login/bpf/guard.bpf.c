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
 * is hidden at its next access.  And the deny globs of a subset, matched late (below).
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

SEC("lsm/inode_permission")
int BPF_PROG(guard_permission, struct inode *inode, int mask, int ret)
{
	if (ret)
		return ret;
	return decide(inode, H_PERMISSION);
}

SEC("lsm/inode_getattr")
int BPF_PROG(guard_getattr, const struct path *path, int ret)
{
	if (ret)
		return ret;
	return decide_stat(path->dentry->d_inode, H_GETATTR);
}

SEC("lsm/file_open")
int BPF_PROG(guard_open, struct file *file, int ret)
{
	if (ret)
		return ret;
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
	return decide(dentry->d_inode, H_GETXATTR);
}

SEC("lsm/inode_listxattr")
int BPF_PROG(guard_listxattr, struct dentry *dentry, int ret)
{
	if (ret)
		return ret;
	return decide(dentry->d_inode, H_LISTXATTR);
}

SEC("lsm/inode_readlink")
int BPF_PROG(guard_readlink, struct dentry *dentry, int ret)
{
	if (ret)
		return ret;
	return decide(dentry->d_inode, H_READLINK); /* a symlink: counted only */
}

/* Deny globs matched late: a subset (bpfguard.py writes the `deny` map; sleepable programs on
 * file_open and inode_getattr, the hooks with a path, where bpf_d_path may be called).
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

static __always_inline int denied_path(const struct path *path, enum hook hook)
{
	struct path_buf buf = {};

	struct identity *id = guarded_identity_probe();

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
	long len = bpf_d_path((struct path *)path, buf.s, sizeof(buf.s));

	if (len <= 1)
		return 0; /* (too long for the buffer: not matched; a prototype's limit) */
	len -= 1; /* bpf_d_path counts the NUL */
	for (__u32 i = 0; i < DENY_MAX; i++) {
		if (i >= deny_count)
			break;
		__u32 key = i;
		struct deny_pattern *p = bpf_map_lookup_elem(&deny, &key);

		if (p && pattern_matches(&buf, (__u32)len, p)) {
			count(H_COUNT + hook);
			return -ENOENT;
		}
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

