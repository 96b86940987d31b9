/*
 * fusedisk bench guest probe: O_DIRECT I/O on the guest's virtio disk, results on the console.
 *
 * Runs inside the tiny guest that bench/guest.py boots (it is started by the
 * initramfs's /init once /dev/vda exists). Everything it needs comes from the
 * kernel command line (/proc/cmdline), every result goes to stdout (the serial
 * console) as lines starting with "FDPROBE ", and the last line it prints is
 * "FDPROBE END rc=N". Parameters (fdprobe.NAME=VALUE):
 *
 *   mode=gap|rounds   what to do (default gap)
 *   dev=PATH          the disk (default /dev/vda)
 *   seconds=S         stop after S seconds (default 600)
 *   iterations=N      gap mode: stop after N iterations (default: no limit)
 *   interval_us=U     gap mode: one iteration every U µs (default 1000)
 *   report_ms=M       one interval line every M ms (default 100)
 *   slow_us=U         gap mode: also a line for every iteration of U µs or more (default 0: none)
 *   ops=N             rounds mode: I/Os per round (default 64)
 *   flush_every=N     rounds mode: a flush (fdatasync) every N writes (default 32)
 *   seed=N            rounds mode: random seed (default 1)
 *
 * The probe also stops when it reads a 'q' on stdin (the host types it on the
 * serial line). Time is CLOCK_MONOTONIC in ns; the host aligns it with its
 * own clock from the arrival times of the interval lines.
 *
 * gap mode: every interval, a 4 KiB O_DIRECT pwrite of a block holding a
 * sequence number, then a pread of it back (checked: a mismatch counts as
 * "bad"); the iteration's latency (write start to read end) is the I/O gap the
 * guest sees. Lines:
 *   FDPROBE I <now_ns> <start_ns> <iterations> <max_us> <max_at_ns> <errors>   per interval
 *   FDPROBE S <start_ns> <latency_us>                                  each slow iteration (slow_us)
 *   FDPROBE TOP <rank> <latency_us> <at_ns>                           the 10 longest
 *   FDPROBE SUMMARY mode=gap iterations=N errors=E bad=B max_us=.. p50_us=.. p99_us=.. last_seq=N slow_us=U
 *
 * rounds mode: rounds of `ops` random I/Os, 70 % reads / 30 % writes, 4-64 KiB
 * (4 KiB multiples) at random 4 KiB-aligned offsets beyond the first 4 MiB, a
 * flush every `flush_every` writes. Lines:
 *   FDPROBE R <now_ns> <rounds>                                        per interval
 *   FDPROBE SUMMARY mode=rounds rounds=N ops=N bytes=N flushes=N seconds=S rounds_per_s=R errors=E
 *
 * Both modes end by writing a 4 KiB marker block "FDPROBE-DONE mode=... count=..."
 * at offset 0 and flushing it, so the host can find the guest's data on the store.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define MAX_IO (64 * 1024)
#define GAP_BASE (1 << 20)   /* gap mode writes in [1 MiB, 2 MiB) */
#define GAP_SLOTS 256
#define ROUNDS_BASE (4 << 20) /* rounds mode stays beyond 4 MiB */
#define TOP 10

static char cmdline[4096];

static const char *param(const char *name, const char *fallback)
{
	static char value[256];
	char key[64];
	snprintf(key, sizeof key, "fdprobe.%s=", name);
	size_t klen = strlen(key);
	for (char *p = cmdline; (p = strstr(p, key)) != NULL; p += klen) {
		if (p != cmdline && p[-1] != ' ')
			continue;
		size_t n = strcspn(p + klen, " \n");
		if (n >= sizeof value)
			n = sizeof value - 1;
		memcpy(value, p + klen, n);
		value[n] = '\0';
		return value;
	}
	return fallback;
}

static long long param_ll(const char *name, long long fallback)
{
	const char *v = param(name, NULL);
	return v ? strtoll(v, NULL, 10) : fallback;
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t t_ns)
{
	struct timespec ts = {.tv_sec = t_ns / 1000000000LL, .tv_nsec = t_ns % 1000000000LL};
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

/* Whether the host typed 'q' on the console (never blocks). */
static int quit_requested(void)
{
	struct pollfd p = {.fd = 0, .events = POLLIN};
	char buf[64];
	while (poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) {
		ssize_t n = read(0, buf, sizeof buf);
		if (n <= 0)
			return 0;
		if (memchr(buf, 'q', (size_t)n))
			return 1;
	}
	return 0;
}

static uint64_t rng_state;

static uint64_t rng(void)
{
	/* xorshift64*: fast, good enough for picking offsets */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 2685821657736338717ULL;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

static int write_marker(int fd, char *buf, const char *mode, long long count)
{
	memset(buf, 0, BLOCK);
	snprintf(buf, BLOCK, "FDPROBE-DONE mode=%s count=%lld\n", mode, count);
	if (pwrite(fd, buf, BLOCK, 0) != BLOCK || fdatasync(fd) != 0) {
		printf("FDPROBE ERROR marker write: %s\n", strerror(errno));
		return 1;
	}
	return 0;
}

static int gap_mode(int fd, char *buf, char *check)
{
	long long seconds = param_ll("seconds", 600);
	long long limit = param_ll("iterations", -1);
	int64_t interval = param_ll("interval_us", 1000) * 1000;
	int64_t report = param_ll("report_ms", 100) * 1000000;
	long long slow_us = param_ll("slow_us", 0);
	size_t cap = (size_t)(seconds * 1000000000LL / (interval > 0 ? interval : 1)) + 16;
	if (limit >= 0 && (size_t)limit < cap)
		cap = (size_t)limit + 16;
	uint32_t *lat_us = malloc(cap * sizeof *lat_us);
	int64_t top_at[TOP] = {0};
	uint32_t top_us[TOP] = {0};
	if (!lat_us) {
		printf("FDPROBE ERROR out of memory for %zu samples\n", cap);
		return 1;
	}
	int64_t start = now_ns(), end = start + seconds * 1000000000LL;
	int64_t next = start, slot_start = start;
	long long n = 0, errors = 0, bad = 0, slot_n = 0, slot_errors = 0;
	uint32_t slot_max = 0;
	int64_t slot_max_at = start;
	uint64_t seq = 0;
	for (;;) {
		int64_t t0 = now_ns();
		if (t0 - slot_start >= report) {
			printf("FDPROBE I %lld %lld %lld %u %lld %lld\n", (long long)t0,
			       (long long)slot_start, slot_n,
			       slot_max, (long long)slot_max_at, slot_errors);
			fflush(stdout);
			slot_start = t0;
			slot_n = slot_errors = 0;
			slot_max = 0;
			slot_max_at = t0;
			if (quit_requested())
				break;
		}
		if (t0 >= end || (limit >= 0 && n >= limit) || (size_t)n >= cap)
			break;
		seq++;
		off_t offset = GAP_BASE + (off_t)(seq % GAP_SLOTS) * BLOCK;
		memset(buf, 0, 64);
		snprintf(buf, 64, "FDPROBE-GAP seq=%llu\n", (unsigned long long)seq);
		int ok = pwrite(fd, buf, BLOCK, offset) == BLOCK &&
			 pread(fd, check, BLOCK, offset) == BLOCK;
		int64_t t1 = now_ns();
		if (!ok) {
			errors++;
			slot_errors++;
		} else if (memcmp(buf, check, 64) != 0) {
			bad++;
		}
		uint32_t us = (uint32_t)((t1 - t0) / 1000);
		lat_us[n++] = us;
		slot_n++;
		if (slow_us > 0 && us >= slow_us)
			printf("FDPROBE S %lld %u\n", (long long)t0, us);
		if (us > slot_max) {
			slot_max = us;
			slot_max_at = t0;
		}
		for (int i = 0; i < TOP; i++) {
			if (us > top_us[i]) {
				memmove(top_us + i + 1, top_us + i, (TOP - 1 - i) * sizeof *top_us);
				memmove(top_at + i + 1, top_at + i, (TOP - 1 - i) * sizeof *top_at);
				top_us[i] = us;
				top_at[i] = t0;
				break;
			}
		}
		next += interval;
		if (next < t1)
			next = t1; /* no catch-up burst after a stall */
		sleep_until(next);
	}
	for (int i = 0; i < TOP && top_us[i]; i++)
		printf("FDPROBE TOP %d %u %lld\n", i + 1, top_us[i], (long long)top_at[i]);
	uint32_t max = 0, p50 = 0, p99 = 0;
	if (n > 0) {
		qsort(lat_us, (size_t)n, sizeof *lat_us, cmp_u32);
		max = lat_us[n - 1];
		p50 = lat_us[n / 2];
		p99 = lat_us[(n * 99) / 100];
	}
	printf("FDPROBE SUMMARY mode=gap iterations=%lld errors=%lld bad=%lld max_us=%u "
	       "p50_us=%u p99_us=%u last_seq=%llu slow_us=%lld seconds=%.3f\n",
	       n, errors, bad, max, p50, p99, (unsigned long long)seq, slow_us,
	       (now_ns() - start) / 1e9);
	free(lat_us);
	return write_marker(fd, buf, "gap", n) || errors || bad;
}

static int rounds_mode(int fd, char *buf, uint64_t size)
{
	long long seconds = param_ll("seconds", 10);
	long long ops = param_ll("ops", 64);
	long long flush_every = param_ll("flush_every", 32);
	int64_t report = param_ll("report_ms", 1000) * 1000000;
	rng_state = (uint64_t)param_ll("seed", 1) * 0x9E3779B97F4A7C15ULL + 1;
	if (size < ROUNDS_BASE + MAX_IO * 2) {
		printf("FDPROBE ERROR disk of %llu bytes is too small for rounds\n",
		       (unsigned long long)size);
		return 1;
	}
	uint64_t span_blocks = (size - ROUNDS_BASE - MAX_IO) / BLOCK;
	for (int i = 0; i < MAX_IO; i++)
		buf[i] = (char)rng();
	int64_t start = now_ns(), end = start + seconds * 1000000000LL, slot = start;
	long long rounds = 0, done_ops = 0, bytes = 0, flushes = 0, writes = 0, errors = 0;
	for (;;) {
		int64_t t = now_ns();
		if (t - slot >= report) {
			printf("FDPROBE R %lld %lld\n", (long long)t, rounds);
			fflush(stdout);
			slot = t;
			if (quit_requested())
				break;
		}
		if (t >= end)
			break;
		for (long long i = 0; i < ops; i++) {
			uint64_t r = rng();
			size_t len = BLOCK * (1 + (size_t)(r % 16));
			off_t offset = ROUNDS_BASE + (off_t)((r >> 8) % span_blocks) * BLOCK;
			ssize_t got;
			if ((r >> 40) % 10 < 7) {
				got = pread(fd, buf, len, offset);
			} else {
				got = pwrite(fd, buf, len, offset);
				if (++writes % flush_every == 0) {
					if (fdatasync(fd) != 0)
						errors++;
					flushes++;
				}
			}
			if (got != (ssize_t)len)
				errors++;
			else
				bytes += len;
			done_ops++;
		}
		rounds++;
	}
	double elapsed = (now_ns() - start) / 1e9;
	printf("FDPROBE SUMMARY mode=rounds rounds=%lld ops=%lld bytes=%lld flushes=%lld "
	       "seconds=%.3f rounds_per_s=%.3f errors=%lld\n",
	       rounds, done_ops, bytes, flushes, elapsed, elapsed > 0 ? rounds / elapsed : 0.0,
	       errors);
	return write_marker(fd, buf, "rounds", rounds) || errors;
}

/* The console must not echo the host's 'q' into the middle of a result line, and must
 * hand it over without waiting for a newline. */
static void quiet_console(void)
{
	struct termios t;
	if (tcgetattr(0, &t) != 0)
		return;
	t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL | ICANON);
	t.c_cc[VMIN] = 0;
	t.c_cc[VTIME] = 0;
	tcsetattr(0, TCSANOW, &t);
}

int main(void)
{
	int rc = 1;
	setvbuf(stdout, NULL, _IOLBF, 0);
	quiet_console();
	int cfd = open("/proc/cmdline", O_RDONLY);
	if (cfd >= 0) {
		ssize_t n = read(cfd, cmdline, sizeof cmdline - 1);
		cmdline[n > 0 ? n : 0] = '\0';
		close(cfd);
	}
	const char *mode = param("mode", "gap");
	char dev[256];
	snprintf(dev, sizeof dev, "%s", param("dev", "/dev/vda"));
	int fd = open(dev, O_RDWR | O_DIRECT);
	char *buf = NULL, *check = NULL;
	uint64_t size = 0;
	if (fd < 0) {
		printf("FDPROBE ERROR open %s: %s\n", dev, strerror(errno));
		goto out;
	}
	if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
		printf("FDPROBE ERROR BLKGETSIZE64 %s: %s\n", dev, strerror(errno));
		goto out;
	}
	if (posix_memalign((void **)&buf, BLOCK, MAX_IO) || posix_memalign((void **)&check, BLOCK, BLOCK)) {
		printf("FDPROBE ERROR out of memory\n");
		goto out;
	}
	printf("FDPROBE START mode=%s dev=%s bytes=%llu t=%lld\n", mode, dev,
	       (unsigned long long)size, (long long)now_ns());
	if (size < 2 * GAP_BASE) {
		printf("FDPROBE ERROR disk of %llu bytes is too small\n", (unsigned long long)size);
	} else if (strcmp(mode, "gap") == 0) {
		rc = gap_mode(fd, buf, check);
	} else if (strcmp(mode, "rounds") == 0) {
		rc = rounds_mode(fd, buf, size);
	} else {
		printf("FDPROBE ERROR unknown mode %s\n", mode);
	}
out:
	printf("FDPROBE END rc=%d\n", rc);
	fflush(stdout);
	return rc;
}
