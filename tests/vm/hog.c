/* hog: allocate N MiB, touching every page, reporting progress.
 *
 *   hog MIB [HOLD_SECONDS]
 *
 * Prints "hog: N MiB" every 16 MiB (unbuffered, so the last line before an
 * OOM kill survives even when stdout is a pipe or file), then
 * "hog: allocated N MiB" and optionally holds the memory for HOLD_SECONDS.
 * Part of the device-worker-ng cgroup v2 guest harness (tests/vm/guest.sh). */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s MIB [HOLD_SECONDS]\n", argv[0]);
		return 2;
	}
	long mib = strtol(argv[1], NULL, 10);
	long hold = argc > 2 ? strtol(argv[2], NULL, 10) : 0;
	long page = sysconf(_SC_PAGESIZE);
	setvbuf(stdout, NULL, _IONBF, 0);
	printf("hog: pid %d allocating %ld MiB\n", (int)getpid(), mib);
	for (long i = 1; i <= mib; i++) {
		volatile char *p = malloc(1 << 20);
		if (!p) {
			printf("hog: malloc failed after %ld MiB\n", i - 1);
			return 1;
		}
		for (long off = 0; off < (1 << 20); off += page)
			p[off] = (char)i; /* fault in every page */
		if (i % 16 == 0)
			printf("hog: %ld MiB\n", i);
	}
	printf("hog: allocated %ld MiB\n", mib);
	if (hold > 0)
		sleep((unsigned)hold);
	return 0;
}
