/* probe: try TCP connections to every ADDRESS:PORT given, all at once, and say how each went.
 *
 *   probe TIMEOUT_MS ADDRESS:PORT...
 *
 * One line per target, in order: "ADDRESS:PORT open", "... refused", "... timeout",
 * "... unreachable" or "... error:ERRNO". Static, so the same binary runs in a container's
 * busybox rootfs and on the host, and parallel, so a dozen dropped SYNs cost one timeout.
 * IPv4 only. Exits 0 when every target was tried, 2 on bad arguments.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_TARGETS 256

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static const char *verdict(int err, char *buf, size_t len) {
    switch (err) {
    case 0: return "open";
    case ECONNREFUSED: return "refused";
    case ETIMEDOUT: return "timeout";
    case EHOSTUNREACH:
    case ENETUNREACH: return "unreachable";
    default: snprintf(buf, len, "error:%d", err); return buf;
    }
}

static int parse(const char *arg, struct sockaddr_in *sa) {
    char host[64];
    const char *colon = strrchr(arg, ':');
    if (colon == NULL || (size_t)(colon - arg) >= sizeof host) return -1;
    memcpy(host, arg, colon - arg);
    host[colon - arg] = '\0';
    long port = strtol(colon + 1, NULL, 10);
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((unsigned short)port);
    if (port < 1 || port > 65535 || inet_pton(AF_INET, host, &sa->sin_addr) != 1) return -1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc - 2 > MAX_TARGETS) {
        fprintf(stderr, "usage: probe TIMEOUT_MS ADDRESS:PORT...\n");
        return 2;
    }
    long timeout = strtol(argv[1], NULL, 10);
    int n = argc - 2;
    struct pollfd fds[MAX_TARGETS];
    int result[MAX_TARGETS];
    for (int i = 0; i < n; i++) {
        struct sockaddr_in sa;
        if (parse(argv[i + 2], &sa) != 0) {
            fprintf(stderr, "probe: bad target %s\n", argv[i + 2]);
            return 2;
        }
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        fds[i].fd = fd;
        fds[i].events = POLLOUT;
        result[i] = -1; /* pending */
        if (fd < 0) {
            result[i] = errno;
            fds[i].fd = -1;
        } else if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            result[i] = 0;
        } else if (errno != EINPROGRESS) {
            result[i] = errno;
        }
        if (fd >= 0 && result[i] != -1) {
            close(fd);
            fds[i].fd = -1;
        }
    }
    long deadline = now_ms() + timeout;
    for (;;) {
        int pending = 0;
        for (int i = 0; i < n; i++) pending += result[i] == -1;
        long left = deadline - now_ms();
        if (pending == 0 || left <= 0) break;
        if (poll(fds, n, (int)left) < 0 && errno != EINTR) break;
        for (int i = 0; i < n; i++) {
            if (fds[i].fd < 0 || fds[i].revents == 0) continue;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(fds[i].fd, SOL_SOCKET, SO_ERROR, &err, &len);
            result[i] = err;
            close(fds[i].fd);
            fds[i].fd = -1; /* poll ignores it from now on */
        }
    }
    for (int i = 0; i < n; i++) {
        char buf[32];
        int err = result[i] == -1 ? ETIMEDOUT : result[i];
        printf("%s %s\n", argv[i + 2], verdict(err, buf, sizeof buf));
    }
    return 0;
}
