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
 * It also listens on TCP PORT (the same number), for clients that keep one connection:
 *   the same requests, one per line, answered in order on that connection;
 *   "PUSH\n"   from then on the app writes "tick <seq>\n" on it every millisecond (seq
 *              counts that connection's ticks; a tick that finds the socket full is skipped,
 *              as is any tick missed while the process was frozen: never a burst)
 * A connection the client closes is closed; nothing else ever closes one.
 *
 * Single-threaded: one poll() loop with a 1 ms timeout; between polls the writer catches up
 * with its pace, in small slices so a request never waits long.
 *
 * usage: dirtyapp PORT MIB [DIRTY_MIB_PER_S]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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
#define MAX_CONNS 64
#define TICK_NS 1000000LL
#define CONN_BUF 4096
#define MAX_REPLY 256 /* the longest reply (S) is ~190 bytes */

static uint64_t *mem;
static size_t pages;
static size_t next_dirty;
static unsigned long long dirtied_pages, requests, bad_pages_seen;
static long mib;

/* One kept TCP connection: what came in but is not a whole line yet, what is not sent yet. */
struct conn {
    int fd;
    int push;                    /* asked for ticks */
    long long next_tick;         /* monotonic ns */
    unsigned long long ticks;
    size_t in_len, out_len;
    char in[CONN_BUF], out[CONN_BUF];
};
static struct conn conns[MAX_CONNS];
static int nconns;

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

/* The reply to one request (UDP datagram or TCP line) in `out`; returns its length. */
static int answer(const char *in, char *out, size_t size) {
    requests++;
    if (in[0] == 'P') {
        unsigned long long asked = strtoull(in + 1, NULL, 10);
        size_t p = (size_t)(asked % pages);
        if (page_ok(p))
            return snprintf(out, size, "ok %llu %llu %llu\n", asked,
                            (unsigned long long)mem[p * WORDS], requests);
        bad_pages_seen++;
        return snprintf(out, size, "bad %llu\n", asked);
    }
    if (in[0] == 'S') {
        unsigned long long gen_sum = 0;
        for (size_t p = 0; p < pages; p++) gen_sum += mem[p * WORDS];
        return snprintf(out, size,
                        "{\"pages\":%zu,\"mib\":%ld,\"bad_pages_seen\":%llu,"
                        "\"generation_sum\":%llu,\"requests\":%llu,"
                        "\"dirtied_pages\":%llu,\"pid\":%d}\n",
                        pages, mib, bad_pages_seen, gen_sum, requests, dirtied_pages,
                        (int)getpid());
    }
    if (in[0] == 'C') {
        unsigned long long bad = 0;
        for (size_t p = 0; p < pages; p++) bad += !page_ok(p);
        bad_pages_seen += bad;
        return snprintf(out, size, "{\"pages_checked\":%zu,\"bad_pages\":%llu}\n", pages, bad);
    }
    return snprintf(out, size, "error unknown request\n");
}

static void conn_close(int i) {
    close(conns[i].fd);
    conns[i] = conns[--nconns];
}

/* Send what is queued; returns -1 when the connection is gone. */
static int conn_flush(struct conn *c) {
    while (c->out_len > 0) {
        ssize_t n = send(c->fd, c->out, c->out_len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        memmove(c->out, c->out + n, c->out_len - (size_t)n);
        c->out_len -= (size_t)n;
    }
    return 0;
}

/* Answer the whole lines that came in, while their replies fit in `out`. */
static void conn_serve(struct conn *c) {
    char *line = c->in, *end;
    while ((end = memchr(line, '\n', c->in_len - (size_t)(line - c->in))) != NULL) {
        if (end - line == 4 && memcmp(line, "PUSH", 4) == 0) {
            c->push = 1;
            c->next_tick = now_ns();
        } else {
            if (sizeof c->out - c->out_len < MAX_REPLY) break; /* waits for the client */
            *end = 0;
            int len = answer(line, c->out + c->out_len, MAX_REPLY);
            c->out_len += (size_t)len < MAX_REPLY ? (size_t)len : MAX_REPLY - 1;
        }
        line = end + 1;
    }
    c->in_len -= (size_t)(line - c->in);
    memmove(c->in, line, c->in_len);
}

/* Read what came (while there is room), answer, send; -1 when the connection is gone. */
static int conn_io(struct conn *c, short revents) {
    if ((revents & (POLLIN | POLLHUP)) && c->in_len < sizeof c->in) {
        ssize_t n = recv(c->fd, c->in + c->in_len, sizeof c->in - c->in_len, MSG_DONTWAIT);
        if (n == 0) return -1;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
        if (n > 0) c->in_len += (size_t)n;
    }
    conn_serve(c);
    if (c->in_len == sizeof c->in && !memchr(c->in, '\n', c->in_len))
        return -1; /* a line longer than any request */
    return conn_flush(c);
}

/* A tick when one is due; missed ones are skipped, and so is a tick with no room. */
static int conn_tick(struct conn *c, long long t) {
    if (!c->push || t < c->next_tick) return 0;
    c->next_tick += TICK_NS;
    if (c->next_tick < t) c->next_tick = t + TICK_NS;
    char tick[64];
    int len = snprintf(tick, sizeof tick, "tick %llu\n", c->ticks++);
    if (c->out_len + (size_t)len <= sizeof c->out) {
        memcpy(c->out + c->out_len, tick, (size_t)len);
        c->out_len += (size_t)len;
    }
    return conn_flush(c);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: dirtyapp PORT MIB [DIRTY_MIB_PER_S]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    mib = atol(argv[2]);
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
    int one = 1;
    int tcp = socket(AF_INET, SOCK_STREAM, 0);
    if (tcp < 0 || setsockopt(tcp, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        bind(tcp, (struct sockaddr *)&addr, sizeof addr) || listen(tcp, 16)) {
        perror("listen tcp");
        return 1;
    }
    struct pollfd fds[2 + MAX_CONNS];
    double pages_per_ns = dirty_rate * (1024.0 * 1024.0 / PAGE) / 1e9;
    long long paced_since = now_ns();
    double owed = 0; /* pages the writer is behind its pace */

    for (;;) {
        fds[0] = (struct pollfd){.fd = udp, .events = POLLIN};
        fds[1] = (struct pollfd){.fd = tcp, .events = POLLIN};
        for (int i = 0; i < nconns; i++)
            fds[2 + i] = (struct pollfd){
                .fd = conns[i].fd,
                .events = (short)((conns[i].in_len < CONN_BUF ? POLLIN : 0) |
                                  (conns[i].out_len ? POLLOUT : 0))};
        int polled = nconns;
        int ready = poll(fds, (nfds_t)(2 + polled), 1);
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
        /* Ticks first (their pace is the point), then whatever came in; from the last
         * connection down, so closing one (the last moves into its slot) skips none. */
        for (int i = polled - 1; i >= 0; i--) {
            short ev = fds[2 + i].revents;
            if (conn_tick(&conns[i], t) < 0 || (ev & (POLLERR | POLLNVAL)) ||
                ((ev || conns[i].in_len) && conn_io(&conns[i], ev) < 0))
                conn_close(i);
        }
        if (ready > 0 && (fds[1].revents & POLLIN)) {
            int fd = accept(tcp, NULL, NULL);
            if (fd >= 0 && nconns == MAX_CONNS) {
                close(fd);
            } else if (fd >= 0) {
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                conns[nconns++] = (struct conn){.fd = fd};
            }
        }
        if (ready <= 0 || !(fds[0].revents & POLLIN)) continue;

        for (int burst = 0; burst < 64; burst++) {
            char in[128], out[512];
            struct sockaddr_in from;
            socklen_t fromlen = sizeof from;
            ssize_t n = recvfrom(udp, in, sizeof in - 1, MSG_DONTWAIT, (struct sockaddr *)&from,
                                 &fromlen);
            if (n <= 0) break;
            in[n] = 0;
            int len = answer(in, out, sizeof out);
            sendto(udp, out, (size_t)len, 0, (struct sockaddr *)&from, fromlen);
        }
    }
}
