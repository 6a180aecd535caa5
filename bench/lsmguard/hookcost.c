// SPDX-License-Identifier: GPL-2.0
/* hookcost: ns per lstat or open+close of one path, best of ROUNDS rounds of N calls (bench).
 *   hookcost stat|open PATH N ROUNDS */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: hookcost stat|open PATH N ROUNDS\n");
		return 2;
	}
	int open_mode = !strcmp(argv[1], "open");
	const char *path = argv[2];
	long n = atol(argv[3]), rounds = atol(argv[4]);
	double best = 1e9;
	struct stat st;

	for (long r = 0; r < rounds; r++) {
		double start = now();

		for (long i = 0; i < n; i++) {
			if (open_mode) {
				int fd = open(path, O_RDONLY | O_CLOEXEC);

				if (fd < 0) {
					perror(path);
					return 1;
				}
				close(fd);
			} else if (lstat(path, &st) < 0) {
				perror(path);
				return 1;
			}
		}
		double per = (now() - start) / n * 1e9;

		if (per < best)
			best = per;
	}
	printf("%.1f\n", best);
	return 0;
}
