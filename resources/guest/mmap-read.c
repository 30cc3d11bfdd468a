/* mmap-read -- the DAX read benchmark run inside the guest (init mode test=mmap-read).
 *
 * Maps FILE read-only and sums it, 8 bytes at a time. The first pass takes a page fault per
 * page (guest kernel work: emulated, and slow, on PVM hosts); the passes after it read mapped
 * pages only, in guest user mode, so they measure how fast guest loads reach the image through
 * the VMM's mapping (repeated for at least a second). Prints one line:
 *   GUEST_MMAP_READ=<MiB> first_mbps=<MB/s> second_mbps=<MB/s> sum=<hex>
 * Build: gcc -O2 -static -o mmap-read mmap-read.c
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t sum(const uint64_t *p, size_t words)
{
	uint64_t s = 0;
	for (size_t i = 0; i < words; i++)
		s += p[i];
	return s;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: mmap-read FILE\n");
		return 2;
	}
	int fd = open(argv[1], O_RDONLY);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0 || st.st_size < 8) {
		printf("GUEST_MMAP_READ=fail open\n");
		return 1;
	}
	size_t len = (size_t)st.st_size & ~(size_t)7;
	const uint64_t *p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		printf("GUEST_MMAP_READ=fail mmap\n");
		return 1;
	}
	double mb = len / 1e6;
	double t0 = now();
	uint64_t s1 = sum(p, len / 8);
	double t1 = now(), t2;
	uint64_t s2;
	int passes = 0;
	do {
		s2 = sum(p, len / 8);
		passes++;
		t2 = now();
	} while (t2 - t1 < 1.0 && passes < 1000);
	printf("GUEST_MMAP_READ=%zu first_mbps=%.2f second_mbps=%.0f sum=%llx%s\n", len >> 20,
	       mb / (t1 - t0), mb * passes / (t2 - t1), (unsigned long long)s2,
	       s1 == s2 ? "" : " MISMATCH");
	return 0;
}
