/* Event channel round trips in C, the baseline for xenlab's Python ones
 * (xenlab/agent/evtchn.py: fast_pingpong / fast_echo): the same protocol and
 * the same system calls on /dev/xen/evtchn (Linux uapi xen/evtchn.h), so the
 * ratio of the two is what Python costs.
 *
 *   xlping ping REMOTE_DOMID COUNT WARMUP [VCPU]  offer a port, print {"port":P}, wait for
 *                                           the peer's hello, time COUNT round trips
 *                                           (VCPU: deliver the port's interrupt there; run it
 *                                           under xenlab_agent.placement for the rest)
 *   xlping pong REMOTE_DOMID PORT COUNT     bind, say hello, answer COUNT events
 *
 * Built static on the host (bench/evtchn_c_bench.py), so it runs in dom0 and
 * in a busybox domU alike. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

/* _IOC(_IOC_NONE, 'E', nr, size), as in xen/evtchn.h */
#define EVTCHN_IOC(nr, size) ((unsigned long)(((size) << 16) | ('E' << 8) | (nr)))
#define IOCTL_EVTCHN_BIND_INTERDOMAIN EVTCHN_IOC(1, 8)
#define IOCTL_EVTCHN_BIND_UNBOUND_PORT EVTCHN_IOC(2, 4)
#define IOCTL_EVTCHN_NOTIFY EVTCHN_IOC(4, 4)

static void die(const char *what)
{
	fprintf(stderr, "xlping: %s: %s\n", what, strerror(errno));
	exit(2);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void notify(int fd, uint32_t port)
{
	if (ioctl(fd, IOCTL_EVTCHN_NOTIFY, &port) < 0)
		die("notify");
}

static uint32_t wait_event(int fd)
{
	uint32_t fired;
	if (read(fd, &fired, sizeof fired) != sizeof fired)
		die("read");
	return fired;
}

static void unmask(int fd, uint32_t fired)
{
	if (write(fd, &fired, sizeof fired) != sizeof fired)
		die("unmask");
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

/* Deliver our handle's interrupt to `vcpu`: the evtchn driver names it
 * "evtchn:<comm>" (as xenlab's placement.py route_interrupt does). */
static void route_interrupt(const char *comm, int vcpu)
{
	char line[512], want[64], path[64];
	snprintf(want, sizeof want, "evtchn:%s", comm);
	FILE *f = fopen("/proc/interrupts", "r");
	if (!f)
		die("open /proc/interrupts");
	while (fgets(line, sizeof line, f)) {
		line[strcspn(line, "\n")] = 0;
		size_t n = strlen(line), w = strlen(want);
		while (n && line[n - 1] == ' ')
			line[--n] = 0;
		if (n >= w && !strcmp(line + n - w, want)) {
			snprintf(path, sizeof path, "/proc/irq/%d/smp_affinity_list", atoi(line));
			FILE *irq = fopen(path, "w");
			if (!irq || fprintf(irq, "%d\n", vcpu) < 0 || fclose(irq))
				die(path);
			fclose(f);
			return;
		}
	}
	fprintf(stderr, "xlping: no interrupt named %s\n", want);
	exit(2);
}

static int ping(int fd, uint32_t remote, int count, int warmup, const char *comm, int vcpu)
{
	uint32_t arg = remote;
	int port = ioctl(fd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &arg);
	if (port < 0)
		die("bind unbound port");
	if (vcpu >= 0)
		route_interrupt(comm, vcpu);
	printf("{\"port\": %d, \"pid\": %d}\n", port, getpid());
	fflush(stdout);
	struct pollfd pfd = {.fd = fd, .events = POLLIN};
	if (poll(&pfd, 1, 60000) != 1) {
		fprintf(stderr, "xlping: the peer never said hello\n");
		return 2;
	}
	unmask(fd, wait_event(fd));
	double *samples = calloc(count, sizeof *samples);
	for (int i = 0; i < warmup; i++) {
		notify(fd, port);
		unmask(fd, wait_event(fd));
	}
	double start = now();
	for (int i = 0; i < count; i++) {
		double t0 = now();
		notify(fd, port);
		uint32_t fired = wait_event(fd);
		samples[i] = now() - t0;
		unmask(fd, fired);
	}
	double overall = (now() - start) / count;
	qsort(samples, count, sizeof *samples, cmp);
	double sum = 0;
	for (int i = 0; i < count; i++)
		sum += samples[i];
	printf("{\"count\": %d, \"mean_us\": %.1f, \"p50_us\": %.1f, \"p90_us\": %.1f, \"min_us\": %.1f, \"overall_mean_us\": %.1f}\n",
	       count, sum / count * 1e6, samples[count / 2] * 1e6, samples[count * 9 / 10] * 1e6, samples[0] * 1e6, overall * 1e6);
	return 0;
}

static int pong(int fd, uint32_t remote, uint32_t remote_port, int count)
{
	uint32_t arg[2] = {remote, remote_port};
	int port = ioctl(fd, IOCTL_EVTCHN_BIND_INTERDOMAIN, arg);
	if (port < 0)
		die("bind interdomain");
	/* Binding leaves our new port pending: take that event first. */
	struct pollfd pfd = {.fd = fd, .events = POLLIN};
	if (poll(&pfd, 1, 500) == 1)
		unmask(fd, wait_event(fd));
	notify(fd, port);
	for (int i = 0; i < count; i++) {
		uint32_t fired = wait_event(fd);
		notify(fd, port);
		unmask(fd, fired);
	}
	printf("{\"local_port\": %d, \"answered\": %d}\n", port, count);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 5 || (strcmp(argv[1], "ping") && strcmp(argv[1], "pong"))) {
		fprintf(stderr, "usage: xlping ping REMOTE COUNT WARMUP [ROUTE_TO_VCPU] | xlping pong REMOTE PORT COUNT\n");
		return 1;
	}
	/* A unique name before the open, so our interrupt can be found by it. */
	char comm[16];
	snprintf(comm, sizeof comm, "xlc%d", getpid());
	prctl(PR_SET_NAME, comm);
	int fd = open("/dev/xen/evtchn", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open /dev/xen/evtchn");
	if (!strcmp(argv[1], "ping")) {
		/* One vCPU, as the Python side does: vCPU clocks under TCG are not in step. */
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(sched_getcpu(), &set);
		sched_setaffinity(0, sizeof set, &set);
		return ping(fd, atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), comm, argc > 5 ? atoi(argv[5]) : -1);
	}
	return pong(fd, atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
}
