/* mkfiles ROOT NFILES NDIRS SIZE: the small-file creation workload of bench/install.
 *
 * Makes ROOT (if missing) and NDIRS directories ROOT/dNNNN in it, then NFILES
 * files of SIZE bytes, file i in directory i % NDIRS (round robin, so that no
 * directory is finished while the next is filled: the worst case for per-directory
 * caches, as the prototype measured in the notes did).  Each file:
 * open(O_CREAT|O_EXCL|O_WRONLY), one write, close; every error is fatal.
 *
 * Prints the seconds it spent between its first mkdir and its last close on
 * stdout; the harness times the whole process instead (same for every view), and
 * runs it on tmpfs to report the program's own cost (the floor).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what, const char *path)
{
    fprintf(stderr, "mkfiles: %s %s: %s\n", what, path, strerror(errno));
    exit(1);
}

static long number(const char *text, long low, long high)
{
    char *end;
    long value = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || value < low || value > high) {
        fprintf(stderr, "mkfiles: bad number %s\n", text);
        exit(2);
    }
    return value;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: mkfiles ROOT NFILES NDIRS SIZE\n");
        return 2;
    }
    long nfiles = number(argv[2], 0, 100000000);
    long ndirs = number(argv[3], 1, 1000000);
    long size = number(argv[4], 0, 1 << 20);
    char *data = malloc(size ? size : 1);
    if (data == NULL)
        die("malloc", "");
    memset(data, 'x', size);

    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (mkdir(argv[1], 0755) != 0 && errno != EEXIST)
        die("mkdir", argv[1]);
    int root = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root < 0)
        die("open", argv[1]);
    char path[64];
    for (long d = 0; d < ndirs; d++) {
        snprintf(path, sizeof path, "d%04ld", d);
        if (mkdirat(root, path, 0755) != 0)
            die("mkdir", path);
    }
    for (long i = 0; i < nfiles; i++) {
        snprintf(path, sizeof path, "d%04ld/f%ld", i % ndirs, i);
        int fd = openat(root, path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0)
            die("create", path);
        if (size && write(fd, data, size) != size)
            die("write", path);
        if (close(fd) != 0)
            die("close", path);
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    printf("%.6f\n", (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9);
    return 0;
}
