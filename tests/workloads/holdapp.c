/*
 * holdapp: holds what pre-flight looks for, then waits to be moved or killed.
 *   holdapp io_uring      an io_uring instance (CRIU 4.2.1 cannot dump it)
 *   holdapp flock PATH    an exclusive flock on PATH (created if missing)
 * Prints "ready" once it holds it.
 */
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc >= 2 && !strcmp(argv[1], "io_uring")) {
		struct io_uring_params params;

		memset(&params, 0, sizeof(params));
		if (syscall(__NR_io_uring_setup, 4, &params) < 0) {
			perror("io_uring_setup");
			return 1;
		}
	} else if (argc >= 3 && !strcmp(argv[1], "flock")) {
		int fd = open(argv[2], O_RDWR | O_CREAT, 0644);

		if (fd < 0 || flock(fd, LOCK_EX) < 0) {
			perror(argv[2]);
			return 1;
		}
	} else {
		fprintf(stderr, "usage: holdapp io_uring | holdapp flock PATH\n");
		return 2;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;)
		pause();
}
