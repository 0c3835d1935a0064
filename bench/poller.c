/* poller: the outside observer of bench/budget.sh, independent of the agent.
 *
 *   poller PARENT BUDGET_BYTES [INTERVAL_US=1000]
 *
 * Every INTERVAL_US it sums the memory usage of every workload cgroup directly under PARENT
 * (memory.usage_in_bytes on cgroup v1, memory.current on v2: the same figures the agent adds
 * up) and reads each workload's OOM kill count (v1: memory.oom_control of the workload and
 * every cgroup below it, since v1 counts a kill only in the victim's own cgroup; v2:
 * memory.events, which counts the subtree). It prints, with CLOCK_REALTIME in ns, the reading
 * that saw something and the one before it (the event happened in between):
 *
 *   over  <ns> <bytes> <prev_ns>         the sum went over BUDGET_BYTES
 *   under <ns> <bytes> <prev_ns>         the sum is back at or under it
 *   oom   <ns> <name> <count> <prev_ns>  a workload's OOM kill count rose
 *   gone  <ns> <name> <prev_ns>          a workload's cgroup has no process left
 *   polls <n> gap_p50_us <x> gap_p99_us <y> gap_max_us <z>   on SIGTERM/SIGINT: how often it
 *                                                          really looked
 *
 * Part of device-worker-ng's benchmarks; built by bench/budget.sh. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKLOADS 256
#define MAX_GAPS 4000000

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static long long now_ns(clockid_t c)
{
	struct timespec t;
	clock_gettime(c, &t);
	return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Reads a small file into buf; returns its length, -1 if it cannot be read. */
static int slurp(const char *path, char *buf, int size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	int n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	return n;
}

static unsigned long long keyed(const char *text, const char *key)
{
	size_t k = strlen(key);
	for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : 0)
		if (!strncmp(p, key, k) && p[k] == ' ')
			return strtoull(p + k + 1, 0, 10);
	return 0;
}

static int v1;

static unsigned long long oom_kills(const char *dir)
{
	char path[4096], buf[1024];
	unsigned long long n = 0;
	snprintf(path, sizeof path, "%s/%s", dir, v1 ? "memory.oom_control" : "memory.events");
	if (slurp(path, buf, sizeof buf) > 0)
		n = keyed(buf, "oom_kill");
	if (!v1)
		return n;
	DIR *d = opendir(dir);
	if (!d)
		return n;
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_type == DT_DIR && e->d_name[0] != '.') {
			snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
			n += oom_kills(path);
		}
	closedir(d);
	return n;
}

static struct {
	char name[256];
	unsigned long long ooms;
	int populated;
} seen[MAX_WORKLOADS];
static int nseen;

static int cmp(const void *a, const void *b)
{
	long long x = *(const long long *)a, y = *(const long long *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s PARENT BUDGET_BYTES [INTERVAL_US]\n", argv[0]);
		return 2;
	}
	const char *parent = argv[1];
	unsigned long long budget = strtoull(argv[2], 0, 10);
	long interval = argc > 3 ? atol(argv[3]) : 1000;
	char path[4096], buf[4096];
	snprintf(path, sizeof path, "%s/memory.usage_in_bytes", parent);
	v1 = access(path, F_OK) == 0;
	const char *usage_file = v1 ? "memory.usage_in_bytes" : "memory.current";
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	setvbuf(stdout, 0, _IOLBF, 0);
	static long long gaps[MAX_GAPS];
	long ngaps = 0;
	int over = 0;
	long long last = 0, prev_stamp = now_ns(CLOCK_REALTIME);
	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	while (!stop) {
		long long mono = now_ns(CLOCK_MONOTONIC);
		if (last && ngaps < MAX_GAPS)
			gaps[ngaps++] = mono - last;
		last = mono;
		long long start = now_ns(CLOCK_REALTIME);
		unsigned long long sum = 0;
		DIR *d = opendir(parent);
		struct dirent *e;
		while (d && (e = readdir(d))) {
			if (e->d_type != DT_DIR || e->d_name[0] == '.')
				continue;
			snprintf(path, sizeof path, "%s/%s/%s", parent, e->d_name, usage_file);
			if (slurp(path, buf, sizeof buf) > 0)
				sum += strtoull(buf, 0, 10);
			snprintf(path, sizeof path, "%s/%s", parent, e->d_name);
			unsigned long long n = oom_kills(path);
			int i;
			for (i = 0; i < nseen && strcmp(seen[i].name, e->d_name); i++)
				;
			if (i == nseen && nseen < MAX_WORKLOADS) {
				snprintf(seen[i].name, sizeof seen[i].name, "%s", e->d_name);
				seen[i].ooms = 0;
				seen[i].populated = 0;
				nseen++;
			}
			if (i < nseen && n > seen[i].ooms) {
				printf("oom %lld %s %llu %lld\n", now_ns(CLOCK_REALTIME), e->d_name, n,
				       prev_stamp);
				seen[i].ooms = n;
			}
			snprintf(path, sizeof path, "%s/%s/cgroup.procs", parent, e->d_name);
			int populated = slurp(path, buf, sizeof buf) > 0;
			if (i < nseen && seen[i].populated && !populated)
				printf("gone %lld %s %lld\n", now_ns(CLOCK_REALTIME), e->d_name, prev_stamp);
			if (i < nseen)
				seen[i].populated = populated;
		}
		if (d)
			closedir(d);
		long long stamp = now_ns(CLOCK_REALTIME);
		if (sum > budget && !over) {
			printf("over %lld %llu %lld\n", stamp, sum, prev_stamp);
			over = 1;
		} else if (sum <= budget && over) {
			printf("under %lld %llu %lld\n", stamp, sum, prev_stamp);
			over = 0;
		}
		/* The next event happened after this reading began. */
		prev_stamp = start;
		next.tv_nsec += interval * 1000;
		while (next.tv_nsec >= 1000000000L) {
			next.tv_nsec -= 1000000000L;
			next.tv_sec++;
		}
		/* Behind schedule (preempted): look again at once, then keep the pace from now. */
		if (now_ns(CLOCK_MONOTONIC) > (long long)next.tv_sec * 1000000000LL + next.tv_nsec)
			clock_gettime(CLOCK_MONOTONIC, &next);
		else
			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, 0);
	}
	qsort(gaps, ngaps, sizeof gaps[0], cmp);
	if (ngaps)
		printf("polls %ld gap_p50_us %lld gap_p99_us %lld gap_max_us %lld\n", ngaps + 1,
		       gaps[ngaps / 2] / 1000, gaps[(ngaps * 99) / 100] / 1000, gaps[ngaps - 1] / 1000);
	return 0;
}
