/*
 * sdeefs-enter idmap --uid U --gid G [--uid-map MAP --gid-map MAP] SRC DST (as root): an
 * idmapped, read-only, nosuid, nodev bind of SRC at DST.  Without maps, host uid/gid 0 show as
 * U/G; with them (sdeefs/identity.py: system ids -> the user's subordinate ids, the user's own
 * ids -> themselves, nothing else), each on-disk id INSIDE shows as host id HOST.  The launcher
 * mounts the host root this way as an environment's lowest layer: system files are inside
 * root's to change (the change is a copy-up into the user's upper), never on the host.
 */
#include "enter.h"

/* A user namespace with these maps, as an fd: a child unshares CLONE_NEWUSER, we write its
 * maps and open its ns/user, then the child is killed. */
static int make_idmap_userns(const struct id_map *uid_map, const struct id_map *gid_map)
{
    int ready[2];
    if (pipe2(ready, O_CLOEXEC) < 0)
        FAIL("userns: pipe");
    pid_t child = fork();
    if (child < 0)
        FAIL("userns: fork");
    if (child == 0) {
        close(ready[0]);
        if (unshare(CLONE_NEWUSER) < 0)
            _exit(1);
        if (write(ready[1], "u", 1) != 1)
            _exit(1);
        pause(); /* until killed */
        _exit(0);
    }
    g_child = child;
    close(ready[1]);
    char c;
    ssize_t n;
    do
        n = read(ready[0], &c, 1);
    while (n < 0 && errno == EINTR);
    if (n != 1)
        fail("userns: unshare(CLONE_NEWUSER) failed in the helper child");
    close(ready[0]);
    write_id_maps(child, uid_map, gid_map);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/ns/user", (int)child);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        FAIL("open %s", path);
    cleanup_children(); /* the fd keeps the namespace alive */
    g_child = -1;
    return fd;
}

int cmd_idmap(int argc, char **argv)
{
    long uid = -1, gid = -1;
    struct id_map uid_map = {0}, gid_map = {0};
    const char *pos[2];
    int npos = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--uid") && i + 1 < argc)
            uid = parse_id("--uid", argv[++i]);
        else if (!strcmp(argv[i], "--gid") && i + 1 < argc)
            gid = parse_id("--gid", argv[++i]);
        else if (!strcmp(argv[i], "--uid-map") && i + 1 < argc)
            parse_id_map("--uid-map", argv[++i], &uid_map);
        else if (!strcmp(argv[i], "--gid-map") && i + 1 < argc)
            parse_id_map("--gid-map", argv[++i], &gid_map);
        else if (argv[i][0] != '-' && npos < 2)
            pos[npos++] = argv[i];
        else
            usage("idmap --uid U --gid G SRC DST (unexpected %s)", argv[i]);
    }
    if (uid < 0 || gid < 0 || npos != 2 || uid_map.set != gid_map.set)
        usage("idmap --uid U --gid G [--uid-map MAP --gid-map MAP] SRC DST");
    if (!uid_map.set) {
        single_id_map(&uid_map, (unsigned)uid);
        single_id_map(&gid_map, (unsigned)gid);
    }

    int tree = sys_open_tree(AT_FDCWD, pos[0], OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (tree < 0)
        FAIL("open_tree %s", pos[0]);
    int userns = make_idmap_userns(&uid_map, &gid_map);
    struct mount_attr attr = {
        .attr_set = MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        .userns_fd = (uint64_t)userns,
    };
    if (sys_mount_setattr(tree, "", AT_EMPTY_PATH, &attr) < 0)
        FAIL("mount_setattr idmap");
    if (sys_move_mount(tree, "", AT_FDCWD, pos[1], MOVE_MOUNT_F_EMPTY_PATH) < 0)
        FAIL("move_mount %s", pos[1]);
    return 0;
}
