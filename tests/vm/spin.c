/* spin: burn CPU in a busy loop for N seconds of wall-clock time.
 *
 *   spin SECONDS
 *
 * Prints the CPU time it actually got, e.g. "spin: wall 2.00s cpu 0.412s":
 * under cpu.max "20000 100000" the CPU time is ~20% of the wall time.
 * Part of the device-worker-ng cgroup v2 guest harness (tests/vm/guest.sh). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s SECONDS\n", argv[0]);
		return 2;
	}
	double secs = atof(argv[1]);
	double start = now(CLOCK_MONOTONIC), wall;
	volatile unsigned long counter = 0;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("spin: spinning for %.2fs\n", secs);
	do {
		for (int i = 0; i < 100000; i++)
			counter++;
		wall = now(CLOCK_MONOTONIC) - start;
	} while (wall < secs);
	printf("spin: wall %.2fs cpu %.3fs\n", wall, now(CLOCK_PROCESS_CPUTIME_ID));
	return 0;
}
