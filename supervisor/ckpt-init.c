/*
 * ckpt-init: pid 1 of the pid namespace of `ckpt-supervise --pidns`. Runs
 * the program as its child, reaps every process that comes to it (orphans),
 * passes SIGTERM/SIGINT/SIGHUP/SIGQUIT on to the program (pid 1 ignores
 * signals it has no handler for), and exits as the program did; the kernel
 * then ends whatever else is left in the namespace.
 *
 * usage: ckpt-init prog args...
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

static volatile pid_t child;

static void forward(int sig)
{
	if (child > 0) kill(child, sig);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: ckpt-init prog args...\n");
		return 127;
	}
	struct sigaction sa = { .sa_handler = forward, .sa_flags = SA_RESTART };
	int sigs[] = { SIGTERM, SIGINT, SIGHUP, SIGQUIT };
	for (unsigned i = 0; i < sizeof sigs / sizeof *sigs; i++) sigaction(sigs[i], &sa, NULL);
	child = fork();
	if (child < 0) { perror("ckpt-init: fork"); return 127; }
	if (child == 0) {
		execvp(argv[1], argv + 1);
		fprintf(stderr, "ckpt-init: cannot run %s: %s\n", argv[1], strerror(errno));
		_exit(127);
	}
	for (;;) {
		int st;
		pid_t p = wait(&st);
		if (p < 0 && errno == EINTR) continue;
		if (p < 0) return 127; /* the program was never seen to exit */
		if (p == child) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	}
}
