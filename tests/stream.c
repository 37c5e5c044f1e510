/* The memory ceiling of decoding, measured: how fast this machine reads a model file mapped the
 * way ./run maps it (MAP_POPULATE), start to end. Decoding one token reads every weight once, so
 * file bytes x decode tokens/s can be set beside this (tests/bench.py does, for make bench).
 *
 *     tests/stream FILE [THREADS]     prints "SUSTAINED BEST": GB/s over all passes, and of the
 *                                     fastest pass
 *
 * It reads the file over and over, at least 10 times and for at least half a second: SUSTAINED is
 * all the bytes over all the time, what a decoding run (a mean over its tokens, for about as
 * long) can be set beside; BEST, the fastest single pass, catches this shared machine's quiet
 * moments and ran 20-60% above it in docs/speed.md's tables. THREADS (default 1) read contiguous shares, as ./run's
 * threads take contiguous rows. */
#define _DEFAULT_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* the sum of n 64-bit words: the loads are the work, the sum keeps them from being dropped */
static uint64_t sum_words(const uint64_t *p, size_t n) {
    uint64_t s = 0;
    #pragma omp simd reduction(+:s)
    for (size_t i = 0; i < n; i++) s += p[i];
    return s;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s FILE [THREADS]\n", argv[0]);
        return 2;
    }
    int threads = argc == 3 ? atoi(argv[2]) : 1;
    if (threads < 1 || threads > 1024) {
        fprintf(stderr, "stream: THREADS must be 1..1024, not %s\n", argv[2]);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size < 64) {
        fprintf(stderr, "stream: cannot read %s (or it is under 64 bytes)\n", argv[1]);
        return 1;
    }
    size_t words = (size_t)st.st_size / 8;
    const uint64_t *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "stream: cannot map %s\n", argv[1]);
        return 1;
    }
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
    double best = 0, start = now_seconds();
    volatile uint64_t sink = 0;
    int pass = 0;
    for (; pass < 10 || now_seconds() - start < 0.5; pass++) {
        uint64_t total = 0;
        double t0 = now_seconds();
        #pragma omp parallel for reduction(+:total)
        for (int t = 0; t < threads; t++) {
            size_t w0 = words * (size_t)t / (size_t)threads, w1 = words * (size_t)(t + 1) / (size_t)threads;
            total += sum_words(p + w0, w1 - w0);
        }
        double gbs = (double)words * 8 / (now_seconds() - t0) / 1e9;
        if (gbs > best) best = gbs;
        sink += total;
    }
    (void)sink;
    printf("%.2f %.2f\n", (double)words * 8 * pass / (now_seconds() - start) / 1e9, best);
    return 0;
}
