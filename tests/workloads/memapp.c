/*
 * memapp — a workload whose state lives only in memory, for Ferry's tests.
 *
 * At start it draws a random token (never written anywhere), fills a buffer
 * of BUF_MIB MiB with bytes derived from that token, and then serves, on TCP
 * PORT, one JSON line per request line ("\n") it receives:
 *   {"token":"…","ticks":N,"requests":N,"udp_requests":N,"unix_roundtrips":N,
 *    "unix_ok":true,"buffer_mib":N,"buffer_ok":true,"pid":N}
 * `ticks` grows by one per 100 ms of *running* time (frozen time does not
 * count), `requests` by one per answered request over the process lifetime,
 * and `buffer_ok` re-checks every byte of the buffer against the token.
 * A connection stays open until the client closes it, so tests can hold one
 * across a migration. The same line is the answer to any datagram on UDP PORT+1
 * ("udp_requests" counts them). At start the process forks a child that it talks to over
 * a unix stream connection accepted on /tmp/memapp.sock; every request makes one round
 * trip through it ("unix_roundtrips", "unix_ok"), so unix sockets and a second process
 * must survive a move too.
 *
 * usage: memapp PORT [BUF_MIB]   (UDP on PORT+1)
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
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 64
#define TICK_NS 100000000LL

static uint64_t token;
static int unix_conn = -1;
static unsigned long long unix_roundtrips;
static int unix_ok = 1;

/* The child: echoes every byte back, plus one, until the connection closes. */
static void echo_child(const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    while (connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) usleep(1000);
    unsigned char b;
    while (read(s, &b, 1) == 1) {
        b++;
        if (write(s, &b, 1) != 1) break;
    }
    _exit(0);
}

static int start_unix_pair(void) {
    const char *path = "/tmp/memapp.sock";
    unlink(path);
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    if (bind(l, (struct sockaddr *)&addr, sizeof addr) || listen(l, 1)) return -1;
    if (fork() == 0) echo_child(path);
    unix_conn = accept(l, NULL, NULL);
    return l; /* the listening socket stays open: it has to survive the move as well */
}

static void unix_roundtrip(void) {
    unsigned char out = (unsigned char)unix_roundtrips, in = 0;
    if (write(unix_conn, &out, 1) != 1 || read(unix_conn, &in, 1) != 1 ||
        in != (unsigned char)(out + 1))
        unix_ok = 0;
    unix_roundtrips++;
}
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

static int status(char *out, size_t size, unsigned long long ticks, unsigned long long requests,
                  unsigned long long udp_requests, long buf_mib) {
    return snprintf(out, size,
                    "{\"token\":\"%016llx\",\"ticks\":%llu,\"requests\":%llu,"
                    "\"udp_requests\":%llu,\"unix_roundtrips\":%llu,\"unix_ok\":%s,"
                    "\"buffer_mib\":%ld,\"buffer_ok\":%s,\"pid\":%d}\n",
                    (unsigned long long)token, ticks, requests, udp_requests, unix_roundtrips,
                    unix_ok ? "true" : "false", buf_mib, buffer_ok() ? "true" : "false",
                    (int)getpid());
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: memapp PORT [BUF_MIB]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    long buf_mib = argc > 2 ? atol(argv[2]) : 0;
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN);

    /* Fork the unix-socket child first, so it shares no copy-on-write buffer pages. */
    if (start_unix_pair() < 0 || unix_conn < 0) {
        perror("unix pair");
        return 1;
    }
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

    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in uaddr = addr;
    uaddr.sin_port = htons(port + 1);
    if (bind(udp, (struct sockaddr *)&uaddr, sizeof uaddr)) {
        perror("bind udp");
        return 1;
    }
    struct pollfd fds[MAX_CLIENTS + 2];
    int nfds = 2;
    fds[0] = (struct pollfd){.fd = listener, .events = POLLIN};
    fds[1] = (struct pollfd){.fd = udp, .events = POLLIN};
    unsigned long long ticks = 0, requests = 0, udp_requests = 0;
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
        if (fds[1].revents & POLLIN) {
            char in[512];
            struct sockaddr_in from;
            socklen_t fromlen = sizeof from;
            if (recvfrom(udp, in, sizeof in, 0, (struct sockaddr *)&from, &fromlen) >= 0) {
                udp_requests++;
                unix_roundtrip();
                char out[512];
                int len = status(out, sizeof out, ticks, requests, udp_requests, buf_mib);
                sendto(udp, out, len, 0, (struct sockaddr *)&from, fromlen);
            }
        }
        for (int i = 2; i < nfds; i++) {
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
                unix_roundtrip();
                char out[512];
                int len = status(out, sizeof out, ticks, requests, udp_requests, buf_mib);
                if (write(fds[i].fd, out, len) != len) break;
            }
        }
    }
}
