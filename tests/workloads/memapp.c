/*
 * memapp — a workload whose state lives only in memory, for Ferry's tests.
 *
 * At start it draws a random token (never written anywhere), fills a buffer
 * of BUF_MIB MiB with bytes derived from that token, and then serves, on TCP
 * PORT, one JSON line per request line ("\n") it receives:
 *   {"token":"…","ticks":N,"requests":N,"buffer_mib":N,"buffer_ok":true,"pid":N}
 * `ticks` grows by one per 100 ms of *running* time (frozen time does not
 * count), `requests` by one per answered request over the process lifetime,
 * and `buffer_ok` re-checks every byte of the buffer against the token.
 * A connection stays open until the client closes it, so tests can hold one
 * across a migration.
 *
 * usage: memapp PORT [BUF_MIB]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 64
#define TICK_NS 100000000LL

static uint64_t token;
static unsigned char *buffer;
static size_t buffer_len;

static uint64_t next_byte_state(uint64_t x) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

static void fill_buffer(void) {
    uint64_t state = token | 1;
    for (size_t i = 0; i < buffer_len; i++) {
        state = next_byte_state(state);
        buffer[i] = (unsigned char)state;
    }
}

static int buffer_ok(void) {
    uint64_t state = token | 1;
    for (size_t i = 0; i < buffer_len; i++) {
        state = next_byte_state(state);
        if (buffer[i] != (unsigned char)state) return 0;
    }
    return 1;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: memapp PORT [BUF_MIB]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    long buf_mib = argc > 2 ? atol(argv[2]) : 0;
    signal(SIGPIPE, SIG_IGN);

    if (getrandom(&token, sizeof token, 0) != sizeof token) {
        perror("getrandom");
        return 1;
    }
    buffer_len = (size_t)buf_mib << 20;
    if (buffer_len) {
        buffer = malloc(buffer_len);
        if (!buffer) {
            perror("malloc");
            return 1;
        }
        fill_buffer();
    }

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 16)) {
        perror("bind/listen");
        return 1;
    }

    struct pollfd fds[MAX_CLIENTS + 1];
    int nfds = 1;
    fds[0] = (struct pollfd){.fd = listener, .events = POLLIN};
    unsigned long long ticks = 0, requests = 0;
    long long last_tick = now_ns();

    for (;;) {
        int ready = poll(fds, nfds, 20);
        long long t = now_ns();
        /* One tick per elapsed period at most: time spent frozen is not counted. */
        if (t - last_tick >= TICK_NS) {
            ticks++;
            last_tick = t;
        }
        if (ready <= 0) continue;
        if ((fds[0].revents & POLLIN) && nfds <= MAX_CLIENTS) {
            int c = accept(listener, NULL, NULL);
            if (c >= 0) fds[nfds++] = (struct pollfd){.fd = c, .events = POLLIN};
        }
        for (int i = 1; i < nfds; i++) {
            if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            char in[512];
            ssize_t n = read(fds[i].fd, in, sizeof in);
            if (n <= 0) {
                close(fds[i].fd);
                fds[i--] = fds[--nfds];
                continue;
            }
            for (ssize_t k = 0; k < n; k++) {
                if (in[k] != '\n') continue;
                requests++;
                char out[256];
                int len = snprintf(out, sizeof out,
                                   "{\"token\":\"%016llx\",\"ticks\":%llu,\"requests\":%llu,"
                                   "\"buffer_mib\":%ld,\"buffer_ok\":%s,\"pid\":%d}\n",
                                   (unsigned long long)token, ticks, requests, buf_mib,
                                   buffer_ok() ? "true" : "false", (int)getpid());
                if (write(fds[i].fd, out, len) != len) break;
            }
        }
    }
}
