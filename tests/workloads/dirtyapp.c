/*
 * dirtyapp — a workload that keeps dirtying its memory, for `make bench`.
 *
 * It allocates MIB MiB, touches every page and then keeps rewriting pages round-robin at
 * DIRTY_MIB_PER_S MiB/s (default 8; 0 = never), so a migration always has pages that changed
 * since the last look. Every page checks itself: word 0 holds the page's generation, every
 * other 8-byte word holds pattern(page index, generation, word index). A writer bumps a
 * page's generation and rewrites the whole page.
 *
 * It answers on UDP PORT, one datagram per request:
 *   "P <n>\n"  checks page n % pages against its generation and replies
 *              "ok <n> <generation> <seq>\n", or "bad <n>\n" if any word is wrong
 *   "S\n"      {"pages":N,"mib":N,"bad_pages_seen":N,"generation_sum":N,"requests":N,
 *               "dirtied_pages":N,"pid":N}
 *   "C\n"      checks every page: {"pages_checked":N,"bad_pages":N}
 * `seq` counts the requests answered over the process lifetime. A reply only reads memory,
 * so it works the same while the process is restored under lazy pages (a page that is not
 * here yet is fetched by the kernel's userfaultfd on first touch).
 *
 * Single-threaded: one poll() loop with a 1 ms timeout; between polls the writer catches up
 * with its pace, in small slices so a request never waits long.
 *
 * usage: dirtyapp PORT MIB [DIRTY_MIB_PER_S]
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MAX_SLICE_PAGES 64 /* at most 256 KiB rewritten between two polls */

static uint64_t *mem;
static size_t pages;
static size_t next_dirty;
static unsigned long long dirtied_pages, requests, bad_pages_seen;

static uint64_t pattern(uint64_t page, uint64_t gen, uint64_t word) {
    uint64_t x = (page + 1) * 0x9E3779B97F4A7C15ULL ^ (gen + 1) * 0xC2B2AE3D27D4EB4FULL ^ word;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 29;
    return x;
}

static void write_page(size_t p, uint64_t gen) {
    uint64_t *w = mem + p * WORDS;
    for (uint64_t i = 1; i < WORDS; i++) w[i] = pattern(p, gen, i);
    w[0] = gen;
}

static int page_ok(size_t p) {
    const uint64_t *w = mem + p * WORDS;
    uint64_t gen = w[0];
    for (uint64_t i = 1; i < WORDS; i++)
        if (w[i] != pattern(p, gen, i)) return 0;
    return 1;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void dirty_one(void) {
    size_t p = next_dirty;
    write_page(p, mem[p * WORDS] + 1);
    next_dirty = (next_dirty + 1) % pages;
    dirtied_pages++;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: dirtyapp PORT MIB [DIRTY_MIB_PER_S]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    long mib = atol(argv[2]);
    double dirty_rate = argc > 3 ? atof(argv[3]) : 8.0;
    if (mib <= 0 || port <= 0 || dirty_rate < 0) {
        fprintf(stderr, "dirtyapp: PORT and MIB must be positive, DIRTY_MIB_PER_S >= 0\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    pages = (size_t)mib * (1024 * 1024 / PAGE);
    mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (size_t p = 0; p < pages; p++) write_page(p, 0);

    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (udp < 0 || bind(udp, (struct sockaddr *)&addr, sizeof addr)) {
        perror("bind udp");
        return 1;
    }
    struct pollfd fd = {.fd = udp, .events = POLLIN};
    double pages_per_ns = dirty_rate * (1024.0 * 1024.0 / PAGE) / 1e9;
    long long paced_since = now_ns();
    double owed = 0; /* pages the writer is behind its pace */

    for (;;) {
        int ready = poll(&fd, 1, 1);
        long long t = now_ns();
        /* Time spent frozen (or anything longer than 100 ms) is not made up for afterwards. */
        long long elapsed = t - paced_since;
        paced_since = t;
        if (elapsed > 100000000LL) elapsed = 100000000LL;
        owed += (double)elapsed * pages_per_ns;
        int slice = 0;
        while (owed >= 1.0 && slice < MAX_SLICE_PAGES) {
            dirty_one();
            owed -= 1.0;
            slice++;
        }
        if (owed > MAX_SLICE_PAGES * 16) owed = MAX_SLICE_PAGES * 16; /* never a long burst */
        if (ready <= 0 || !(fd.revents & POLLIN)) continue;

        for (int burst = 0; burst < 64; burst++) {
            char in[128], out[512];
            struct sockaddr_in from;
            socklen_t fromlen = sizeof from;
            ssize_t n = recvfrom(udp, in, sizeof in - 1, MSG_DONTWAIT, (struct sockaddr *)&from,
                                 &fromlen);
            if (n <= 0) break;
            in[n] = 0;
            requests++;
            int len;
            if (in[0] == 'P') {
                unsigned long long asked = strtoull(in + 1, NULL, 10);
                size_t p = (size_t)(asked % pages);
                if (page_ok(p)) {
                    len = snprintf(out, sizeof out, "ok %llu %llu %llu\n", asked,
                                   (unsigned long long)mem[p * WORDS], requests);
                } else {
                    bad_pages_seen++;
                    len = snprintf(out, sizeof out, "bad %llu\n", asked);
                }
            } else if (in[0] == 'S') {
                unsigned long long gen_sum = 0;
                for (size_t p = 0; p < pages; p++) gen_sum += mem[p * WORDS];
                len = snprintf(out, sizeof out,
                               "{\"pages\":%zu,\"mib\":%ld,\"bad_pages_seen\":%llu,"
                               "\"generation_sum\":%llu,\"requests\":%llu,"
                               "\"dirtied_pages\":%llu,\"pid\":%d}\n",
                               pages, mib, bad_pages_seen, gen_sum, requests, dirtied_pages,
                               (int)getpid());
            } else if (in[0] == 'C') {
                unsigned long long bad = 0;
                for (size_t p = 0; p < pages; p++) bad += !page_ok(p);
                bad_pages_seen += bad;
                len = snprintf(out, sizeof out, "{\"pages_checked\":%zu,\"bad_pages\":%llu}\n",
                               pages, bad);
            } else {
                len = snprintf(out, sizeof out, "error unknown request\n");
            }
            sendto(udp, out, (size_t)len, 0, (struct sockaddr *)&from, fromlen);
        }
    }
}
