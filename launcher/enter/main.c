/* sdeefs-enter's entry point: which command (see enter.h). */
#include "enter.h"

int g_argc;
char **g_argv;

int main(int argc, char **argv)
{
    g_argc = argc;
    g_argv = argv;
    /* With a closed 0, 1 or 2, a socket could land there and be clobbered by a later dup2. */
    int fd = open("/dev/null", O_RDWR); /* no O_CLOEXEC: it may become a stdio fd */
    while (fd >= 0 && fd <= 2)
        fd = dup(fd);
    if (fd > 2)
        close(fd);
    const char *base = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    if (!strcmp(base, "sdeefs-shell") || !strcmp(base, "-sdeefs-shell"))
        return cmd_shell(argc - 1, argv + 1, base[0] == '-');
    if (!strcmp(base, "sdeefs-prolog") || !strcmp(base, "sdeefs-epilog"))
        return cmd_jobhook(base + 7);
    if (is_slurm_client(base))
        return cmd_asuser(base, argc, argv);
    if (argc < 2)
        usage("sdeefs-enter idmap|start|join|shell ...");
    if (!strcmp(argv[1], "shell"))
        return cmd_shell(argc - 2, argv + 2, 0);
    if (!strcmp(argv[1], "idmap"))
        return cmd_idmap(argc - 2, argv + 2);
    if (!strcmp(argv[1], "start"))
        return cmd_start(argc - 2, argv + 2);
    if (!strcmp(argv[1], "join"))
        return cmd_join(argc - 2, argv + 2);
    usage("unknown command %s (expected idmap, start or join)", argv[1]);
}
