/* guest-bench: the guest's side of `bench net-guest` and `bench p9-guest` (tests/src/bin/bench/).
 *
 * Not in the test initramfs: the bench builds it (gcc -O2 -static) and appends it, with the
 * current init.sh, to a copy of the initramfs as a second cpio archive. One process, no forks:
 * where guest kernel mode is emulated every fork+exec costs seconds, which would swamp what is
 * measured.
 *
 *   guest-bench net PORT   TCP server, one connection at a time. Each starts with a command
 *                          byte and a little-endian u64 N:
 *                            'S' sink: read N bytes, then answer one byte 'K'
 *                            'G' generate: write N bytes
 *                            'E' echo: write back what arrives until the peer closes
 *                            'Q' quit: exit 0 (init then powers off)
 *                          Prints GUEST_BENCH_READY once listening.
 *   guest-bench fs DIR MIB FILES
 *                          On DIR (a 9p mount): writes DIR/seq (MIB MiB in 1 MiB writes, then
 *                          fsync), reads it back, then creates, fstats, closes and unlinks
 *                          FILES files; prints GUEST_P9_BENCH write_mbps=.. read_mbps=..
 *                          files_per_s=.. with the guest's own clock (CLOCK_MONOTONIC).
 *                          Before and after each phase (outside the timed parts) it prints
 *                          GUEST_P9_SNAP PHASE cpu=USER,NICE,SYSTEM,IDLE,IOWAIT,IRQ,SOFTIRQ,STEAL
 *                          (/proc/stat, in ticks) and each virtio interrupt's count
 *                          (/proc/interrupts), to tell where the guest's time goes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)

static char buf[CHUNK];

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Moves all n bytes through read(2) or write(2); -1 on an error or end of file. */
static int full(int fd, char *p, size_t n, int writing) {
	while (n) {
		ssize_t r = writing ? write(fd, p, n) : read(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		n -= r;
	}
	return 0;
}

static int read_full(int fd, void *p, size_t n) { return full(fd, p, n, 0); }

static int write_full(int fd, const void *p, size_t n) { return full(fd, (char *)p, n, 1); }

/* One connection; returns 1 when told to quit. */
static int serve(int c) {
	unsigned char hdr[9];
	uint64_t n = 0;
	if (read_full(c, hdr, sizeof hdr))
		return 0;
	for (int i = 8; i >= 1; i--)
		n = n << 8 | hdr[i];
	switch (hdr[0]) {
	case 'S':
		while (n) {
			ssize_t r = read(c, buf, n < CHUNK ? n : CHUNK);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				return 0;
			n -= r;
		}
		write_full(c, "K", 1);
		return 0;
	case 'G':
		while (n) {
			size_t len = n < CHUNK ? n : CHUNK;
			if (write_full(c, buf, len))
				return 0;
			n -= len;
		}
		return 0;
	case 'E':
		for (;;) {
			ssize_t r = read(c, buf, CHUNK);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0 || write_full(c, buf, r))
				return 0;
		}
	case 'Q':
		return 1;
	}
	return 0;
}

static int net(int port) {
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (s < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
	    bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) {
		perror("guest-bench: listen");
		return 1;
	}
	for (size_t i = 0; i < sizeof buf; i++)
		buf[i] = (char)(i * 131 + 7);
	printf("GUEST_BENCH_READY port=%d\n", port);
	fflush(stdout);
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0)
			continue;
		/* Round trips of a few bytes must not wait for Nagle. */
		setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		int quit = serve(c);
		close(c);
		if (quit)
			return 0;
	}
}

static int fail(const char *what) {
	printf("GUEST_P9_BENCH=fail %s: %s\n", what, strerror(errno));
	return 1;
}

/* One GUEST_P9_SNAP line: the guest's CPU ticks and its virtio interrupt counts. */
static void snap(const char *phase) {
	char line[1024];
	printf("GUEST_P9_SNAP %s", phase);
	FILE *f = fopen("/proc/stat", "r");
	if (f) {
		unsigned long long v[8] = {0};
		if (fgets(line, sizeof line, f) &&
		    sscanf(line, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
			   &v[3], &v[4], &v[5], &v[6], &v[7]) == 8)
			printf(" cpu=%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu", v[0], v[1], v[2], v[3], v[4],
			       v[5], v[6], v[7]);
		fclose(f);
	}
	f = fopen("/proc/interrupts", "r");
	if (f) {
		while (fgets(line, sizeof line, f)) {
			if (!strstr(line, "virtio"))
				continue;
			/* "  NN:  count [count...]  chip  hwirq-edge  name": the counts follow the label. */
			char *p = strchr(line, ':'), *end;
			unsigned long long total = 0;
			if (!p)
				continue;
			for (p++;;) {
				unsigned long long n = strtoull(p, &end, 10);
				if (end == p)
					break;
				total += n;
				p = end;
			}
			char *name = strrchr(line, ' ');
			name = name ? name + 1 : line;
			name[strcspn(name, "\n")] = 0;
			printf(" %s=%llu", name, total);
		}
		fclose(f);
	}
	printf("\n");
	fflush(stdout);
}

static int fs(const char *dir, long mib, long files) {
	char path[4096];
	snprintf(path, sizeof path, "%s/seq", dir);
	for (size_t i = 0; i < sizeof buf; i++)
		buf[i] = (char)(i * 131 + 7);
	int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
	if (fd < 0)
		return fail("create seq");
	snap("start");
	double t0 = now();
	for (long i = 0; i < mib; i++)
		if (write_full(fd, buf, CHUNK))
			return fail("write seq");
	if (fsync(fd))
		return fail("fsync seq");
	double t1 = now();
	close(fd);
	snap("written");
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return fail("open seq");
	double t2 = now();
	for (long i = 0; i < mib; i++)
		if (read_full(fd, buf, CHUNK))
			return fail("read seq");
	double t3 = now();
	close(fd);
	snap("read");
	double t4 = now();
	for (long i = 0; i < files; i++) {
		struct stat st;
		snprintf(path, sizeof path, "%s/small-%ld", dir, i);
		fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0644);
		if (fd < 0)
			return fail("create small");
		if (fstat(fd, &st))
			return fail("fstat small");
		close(fd);
		if (unlink(path))
			return fail("unlink small");
	}
	double t5 = now();
	snap("files");
	double mb = mib * (double)CHUNK / 1e6;
	printf("GUEST_P9_BENCH write_mbps=%.2f read_mbps=%.2f files_per_s=%.1f write_s=%.3f "
	       "read_s=%.3f files_s=%.3f\n",
	       mb / (t1 - t0), mb / (t3 - t2), files / (t5 - t4), t1 - t0, t3 - t2, t5 - t4);
	return 0;
}

int main(int argc, char **argv) {
	if (argc == 3 && !strcmp(argv[1], "net"))
		return net(atoi(argv[2]));
	if (argc == 5 && !strcmp(argv[1], "fs"))
		return fs(argv[2], atol(argv[3]), atol(argv[4]));
	fprintf(stderr, "usage: guest-bench net PORT | fs DIR MIB FILES\n");
	return 2;
}
