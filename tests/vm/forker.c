/* forker: try to fork N children that each sleep, count the failed forks.
 *
 *   forker N [CHILD_SLEEP_SECONDS]      (default sleep: 2 s)
 *
 * Attempts all N forks (it does not stop at the first failure), waits for the
 * children and prints one summary line:
 *   "forker: requested N forked OK failed F (first error: ...)"
 * Exit status 0 either way; the summary line is the result.
 * Part of the device-worker-ng cgroup v2 guest harness (tests/vm/guest.sh). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s N [CHILD_SLEEP_SECONDS]\n", argv[0]);
		return 2;
	}
	int n = atoi(argv[1]);
	unsigned nap = argc > 2 ? (unsigned)atoi(argv[2]) : 2;
	int ok = 0, failed = 0, first_errno = 0;
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 0; i < n; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			if (!failed)
				first_errno = errno;
			failed++;
		} else if (pid == 0) {
			sleep(nap);
			_exit(0);
		} else {
			ok++;
		}
	}
	printf("forker: requested %d forked %d failed %d (first error: %s)\n",
	       n, ok, failed, failed ? strerror(first_errno) : "none");
	while (wait(NULL) > 0)
		;
	return 0;
}
