/*
 * percall: what one 4 KiB pwrite(2) / pread(2) costs on a file, in ns per call.
 *
 *   percall FILE SIZE_MIB CALLS [ro]
 *   percall FILE SIZE_MIB CALLS seq
 *
 * Opens FILE read-write (created if missing, extended to SIZE_MIB), then CALLS pwrite(2)s of
 * 4 KiB at random 4 KiB-aligned offsets, then CALLS pread(2)s at other random offsets; prints
 * one line "pwrite NS pread NS" (mean ns per call, CLOCK_MONOTONIC).  With "ro": opened
 * read-only (a file of an overlay's lower stays there: no copy-up), preads only, pwrite 0.  No fsync: the page
 * cache, as fio's psync modes without --direct.  bench/jobs/percall.py runs it on a plain
 * directory and through kernel overlayfs, alternately.
 *
 * With "seq" (an existing file of SIZE_MIB, as a user's file a job writes into): the open(2)
 * for writing timed on its own (through an overlay, a lower file's copy-up happens in it),
 * then CALLS pwrite(2)s of 1 MiB, sequential, wrapping at SIZE_MIB (fio's write mode), then
 * 64 * CALLS pwrite(2)s of 4 KiB at random offsets; prints "open NS seqwrite NS pwrite NS" (the
 * open in ns, each write mean ns per call).
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

/* "seq": the open (copy-up), 1 MiB sequential writes, 4 KiB random writes, timed apart. */
static int seq(const char *path, off_t blocks, long calls)
{
    static char big[1 << 20];
    memset(big, 0x5a, sizeof big);
    double t0 = now_ns();
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    double t1 = now_ns();
    if (fd < 0 || blocks < 256 || calls <= 0) {
        perror(path);
        return 1;
    }
    off_t mibs = blocks / 256;
    for (long i = 0; i < calls; i++)
        if (pwrite(fd, big, sizeof big, (off_t)(i % mibs) << 20) != (ssize_t)sizeof big) {
            perror("pwrite 1 MiB");
            return 1;
        }
    double t2 = now_ns();
    uint64_t s = 88172645463325252ULL;
    for (long i = 0; i < 64 * calls; i++)
        if (pwrite(fd, big, 4096, (off_t)(next(&s) % (uint64_t)blocks) * 4096) != 4096) {
            perror("pwrite 4 KiB");
            return 1;
        }
    double t3 = now_ns();
    printf("open %.0f seqwrite %.0f pwrite %.0f\n", t1 - t0, (t2 - t1) / (double)calls,
           (t3 - t2) / (double)(64 * calls));
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 4 && !(argc == 5 && (!strcmp(argv[4], "ro") || !strcmp(argv[4], "seq")))) {
        fprintf(stderr, "usage: percall FILE SIZE_MIB CALLS [ro|seq]\n");
        return 2;
    }
    off_t blocks = (off_t)atol(argv[2]) * 256;
    long calls = atol(argv[3]);
    if (argc == 5 && !strcmp(argv[4], "seq"))
        return seq(argv[1], blocks, calls);
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
