/*
 * imapfe's own listener (-l), or a listening socket handed over by systemd
 * or a super-server: accept, fork one session process per connection,
 * reap them, and end them all with "* BYE" on SIGTERM.  Each session
 * itself is imapfe.c's session_run().
 */
#include <sys/socket.h>
#include <sys/wait.h>

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include "imapfe.h"

#ifdef UNDER_ASAN
#include <sanitizer/lsan_interface.h>
#endif

/*
 * A forked session ends here rather than back through main().  What it
 * inherited (configuration, SASL and OpenSSL state) is the listener's:
 * freeing it would copy the listener's pages into this process only to
 * write free lists on them just before the kernel drops them all (a fifth
 * of a session's page faults), and the listener's exit handlers are not
 * this process's to run.  The session has freed its own memory by now,
 * and the leak checkers still look: valgrind at _exit, LeakSanitizer here.
 */
static void __attribute__((noreturn))
session_exit(int rc)
{
#ifdef UNDER_ASAN
	__lsan_do_leak_check();
#endif
	log_close();
	_exit(rc);
}

static volatile sig_atomic_t child_exited;

static void
on_signal(int sig)
{
	if (sig == SIGCHLD)
		child_exited = 1;
	else
		shutdown_requested = 1;
}

void
install_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	/* No SA_RESTART: a signal must interrupt poll() and accept(). */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGCHLD, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	signals_block_outside_waits();
}

int
listen_on(const char *spec)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM,
	    .ai_flags = AI_PASSIVE | AI_NUMERICHOST }, *res;
	char *host = NULL, *port = NULL, why[128];
	int fd = -1, one = 1, rc;

	if (split_hostport(spec, 1, &host, &port, why, sizeof(why)) != 0) {
		fprintf(stderr, "imapfe: -l %s: %s\n", spec, why);
		return -1;
	}
	rc = getaddrinfo(strcmp(host, "*") == 0 ? NULL : host, port, &hints,
	    &res);
	if (rc != 0) {
		fprintf(stderr, "imapfe: %s: %s\n", spec, gai_strerror(rc));
		goto out;
	}
	fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC |
	    SOCK_NONBLOCK, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one,
	    sizeof(one)) != 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 ||
	    listen(fd, 512) != 0) {
		fprintf(stderr, "imapfe: %s: %s\n", spec, strerror(errno));
		if (fd >= 0)
			close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
out:
	free(host);
	free(port);
	return fd;
}

struct children {
	pid_t	*pid;
	int	 n;
	int	 max;
};

static void
children_reap(struct children *ch)
{
	pid_t pid;
	int status;

	child_exited = 0;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
		for (int i = 0; i < ch->n; i++)
			if (ch->pid[i] == pid) {
				ch->pid[i] = ch->pid[--ch->n];
				break;
			}
}

/* Tell every session to finish, and wait for them. */
static void
children_stop(struct children *ch)
{
	for (int i = 0; i < ch->n; i++)
		kill(ch->pid[i], SIGTERM);
	while (ch->n > 0) {
		pid_t pid = waitpid(-1, NULL, 0);

		if (pid < 0 && errno != EINTR)
			break;
		for (int i = 0; i < ch->n; i++)
			if (ch->pid[i] == pid) {
				ch->pid[i] = ch->pid[--ch->n];
				break;
			}
	}
}

int
serve_listener(const struct config *cfg, SSL_CTX *tls_ctx, int lfd)
{
	struct children ch = { .max = cfg->max_sessions };
	int fd;
	pid_t pid;

	if ((ch.pid = calloc((size_t)ch.max, sizeof(pid_t))) == NULL)
		return 1;
	log_msg(LOG_INFO, "event=listening max_sessions=%d", ch.max);
	while (!shutdown_requested) {
		struct pollfd pfd = { .fd = lfd, .events = POLLIN };

		if (child_exited)
			children_reap(&ch);
		if (poll_wait(&pfd, 1, -1) <= 0)
			continue;
		fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno != EINTR && errno != ECONNABORTED &&
			    errno != EAGAIN)
				log_msg(LOG_ERR, "event=error reason=\"accept: "
				    "%s\"", strerror(errno));
			continue;
		}
		/*
		 * While connections keep arriving, ppoll() returns ready
		 * without delivering the pending SIGCHLD, so the count is
		 * brought up to date here, not only on the signal.
		 */
		children_reap(&ch);
		if (ch.n >= ch.max) {
			static const char full[] =
			    "* BYE Too many connections, try again later.\r\n";

			log_msg(LOG_WARNING, "event=refused reason=\"max_sessions "
			    "reached\"");
			if (write(fd, full, sizeof(full) - 1) < 0) {
				/* the client is gone already */
			}
			close(fd);
			continue;
		}
		if ((pid = fork()) == 0) {
			int rc;

			close(lfd);
			free(ch.pid);
			signal(SIGCHLD, SIG_DFL);
			rc = session_run(cfg, tls_ctx, fd, fd);
			close(fd);
			session_exit(rc);
		}
		if (pid < 0)
			log_msg(LOG_ERR, "event=error reason=\"fork: %s\"",
			    strerror(errno));
		else
			ch.pid[ch.n++] = pid;
		close(fd);
	}
	children_reap(&ch);
	log_msg(LOG_INFO, "event=shutdown sessions=%d", ch.n);
	children_stop(&ch);
	free(ch.pid);
	return 0;
}

/*
 * A listening socket handed over instead of a connection: systemd's
 * Accept=no (LISTEN_FDS/LISTEN_PID, the first descriptor from 3 on; the
 * sd_listen_fds protocol, without libsystemd), or a super-server's "wait"
 * service with the socket on stdin.  Returns it, or -1 for an ordinary
 * connection (or pipe) on stdin.
 */
int
inherited_listener(void)
{
	const char *fds = getenv("LISTEN_FDS"), *pid = getenv("LISTEN_PID");
	int fd = -1, listening = 0;
	socklen_t sl = sizeof(listening);

	if (fds != NULL && pid != NULL && atol(fds) >= 1 &&
	    atol(pid) == (long)getpid())
		fd = 3;
	/* Not for children: the variables were meant for this process. */
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDNAMES");
	if (fd < 0)
		fd = 0;
	if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &sl) != 0 ||
	    !listening)
		return -1;
	fcntl(fd, F_SETFD, FD_CLOEXEC);
	nonblocking(fd);
	return fd;
}
