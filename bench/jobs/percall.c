/*
 * percall: what one 4 KiB pwrite(2) / pread(2) costs on a file, in ns per call.
 *
 *   percall FILE SIZE_MIB CALLS [ro]
 *
 * Opens FILE read-write (created if missing, extended to SIZE_MIB), then CALLS pwrite(2)s of
 * 4 KiB at random 4 KiB-aligned offsets, then CALLS pread(2)s at other random offsets; prints
 * one line "pwrite NS pread NS" (mean ns per call, CLOCK_MONOTONIC).  With "ro": opened
 * read-only (a file of an overlay's lower stays there: no copy-up), preads only, pwrite 0.  No fsync: the page
 * cache, as fio's psync modes without --direct.  bench/jobs/percall.py runs it on a plain
 * directory and through kernel overlayfs, alternately.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static uint64_t next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 4 && !(argc == 5 && !strcmp(argv[4], "ro"))) {
        fprintf(stderr, "usage: percall FILE SIZE_MIB CALLS [ro]\n");
        return 2;
    }
    off_t blocks = (off_t)atol(argv[2]) * 256;
    long calls = atol(argv[3]);
    int ro = argc == 5;
    int fd = ro ? open(argv[1], O_RDONLY | O_CLOEXEC)
                : open(argv[1], O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 || blocks <= 0 || calls <= 0) {
        perror(argv[1]);
        return 1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 ||
        (!ro && st.st_size < blocks * 4096 && ftruncate(fd, blocks * 4096) < 0)) {
        perror("size");
        return 1;
    }
    static char buf[4096];
    memset(buf, 0x5a, sizeof buf);
    uint64_t s = 88172645463325252ULL;
    double t0 = now_ns();
    for (long i = 0; !ro && i < calls; i++)
        if (pwrite(fd, buf, sizeof buf, (off_t)(next(&s) % (uint64_t)blocks) * 4096) !=
            (ssize_t)sizeof buf) {
            perror("pwrite");
            return 1;
        }
    double t1 = now_ns();
    for (long i = 0; i < calls; i++)
        if (pread(fd, buf, sizeof buf, (off_t)(next(&s) % (uint64_t)blocks) * 4096) !=
            (ssize_t)sizeof buf) {
            perror("pread");
            return 1;
        }
    double t2 = now_ns();
    printf("pwrite %.0f pread %.0f\n", ro ? 0.0 : (t1 - t0) / (double)calls,
           (t2 - t1) / (double)calls);
    return 0;
}
