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
#include <limits.h>
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
static volatile sig_atomic_t reload_requested;	/* SIGHUP */
static volatile sig_atomic_t drain_requested;	/* SIGQUIT */

static void
on_signal(int sig)
{
	switch (sig) {
	case SIGCHLD:
		child_exited = 1;
		break;
	case SIGHUP:
		reload_requested = 1;
		break;
	case SIGQUIT:
		drain_requested = 1;
		break;
	default:
		shutdown_requested = 1;
	}
}

/*
 * Every process: SIGTERM and SIGINT end it (a session with "* BYE").
 * SIGHUP and SIGQUIT are the listener's (reload, drain): a session
 * ignores them, so that one sent to the whole group ends nobody.
 */
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
	signal(SIGHUP, SIG_IGN);
	signal(SIGQUIT, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	signals_block_outside_waits();
}

/* The listener's own: reload and drain. */
static void
listener_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGHUP, &sa, NULL);
	sigaction(SIGQUIT, &sa, NULL);
}

/* A forked session's, before it serves: the listener's are not its. */
static void
session_signals(void)
{
	signal(SIGCHLD, SIG_DFL);
	signal(SIGHUP, SIG_IGN);
	signal(SIGQUIT, SIG_IGN);
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
	int	 cap;
};

/* The listener's state: what it serves with, where, and whom. */
struct listener {
	struct service		*svc;	/* replaced whole on reload */
	const struct options	*opt;
	int			 lfd;	/* -1 once closed for a drain */
	struct children		 ch;
};

static void
children_forget(struct children *ch, pid_t pid)
{
	for (int i = 0; i < ch->n; i++)
		if (ch->pid[i] == pid) {
			ch->pid[i] = ch->pid[--ch->n];
			return;
		}
}

static void
children_reap(struct children *ch)
{
	pid_t pid;
	int status;

	child_exited = 0;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
		children_forget(ch, pid);
}

/* Room for max sessions (a reload may raise max_sessions). */
static int
children_reserve(struct children *ch, int max)
{
	pid_t *pid;

	if (max <= ch->cap)
		return 0;
	if ((pid = reallocarray(ch->pid, (size_t)max, sizeof(*pid))) == NULL)
		return -1;
	ch->pid = pid;
	ch->cap = max;
	return 0;
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
		children_forget(ch, pid);
	}
}

static int
same_setting(const char *a, const char *b)
{
	if (a == NULL || b == NULL)
		return a == b;
	return strcmp(a, b) == 0;
}

/*
 * What only a start can change: who the sessions run as and where.  The
 * listener gave root up for good, so a reload that asks for another
 * user, group or chroot is refused rather than half applied.
 */
static int
reload_allowed(const struct config *now, const struct config *next,
    char *err, size_t errlen)
{
	const char *which = NULL;

	if (!same_setting(now->run_user, next->run_user))
		which = "user";
	else if (!same_setting(now->run_group, next->run_group))
		which = "group";
	else if (!same_setting(now->chroot_dir, next->chroot_dir))
		which = "chroot";
	if (which == NULL)
		return 0;
	snprintf(err, errlen, "%s changed: it takes effect only when imapfe "
	    "is restarted", which);
	return -1;
}

/* The SASL libraries set up for next, or again for now if next fails. */
static int
reload_sasl(const struct config *now, const struct config *next)
{
	service_sasl_teardown(now);
	if (service_sasl_setup(next) == 0)
		return 0;
	if (service_sasl_setup(now) != 0)
		log_msg(LOG_CRIT, "event=error reason=\"SASL cannot be set up "
		    "again: restart imapfe\"");
	return -1;
}

/*
 * SIGHUP: read the configuration and every file it names again, check it
 * all as -t does, and serve the connections accepted from now on with it.
 * Anything wrong, and the old one stays in force.  Sessions running keep
 * what they were forked with.
 */
static void
listener_reload(struct listener *l)
{
	struct service next;
	char err[512];

	reload_requested = 0;
	if (service_load(&next, l->opt, 1, err, sizeof(err)) != 0)
		goto failed;
	if (reload_allowed(&l->svc->cfg, &next.cfg, err, sizeof(err)) != 0)
		goto unused;
	if (children_reserve(&l->ch, next.cfg.max_sessions) != 0) {
		snprintf(err, sizeof(err), "out of memory");
		goto unused;
	}
	if (reload_sasl(&l->svc->cfg, &next.cfg) != 0) {
		snprintf(err, sizeof(err), "the SASL set-up failed");
		goto unused;
	}
	service_free(l->svc);
	*l->svc = next;
	log_open(l->svc->cfg.syslog_facility, l->opt->to_stderr);
	log_msg(LOG_NOTICE, "event=reload config=%s max_sessions=%d "
	    "sessions=%d", l->opt->config_path, l->svc->cfg.max_sessions,
	    l->ch.n);
	return;
unused:
	service_free(&next);
failed:
	log_msg(LOG_ERR, "event=reload-failed reason=\"%s\"", err);
}

/* A new connection: refused with a BYE when full, else a session. */
static void
listener_accept(struct listener *l)
{
	struct service *svc = l->svc;
	int fd;
	pid_t pid;

	fd = accept4(l->lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0) {
		if (errno != EINTR && errno != ECONNABORTED && errno != EAGAIN)
			log_msg(LOG_ERR, "event=error reason=\"accept: %s\"",
			    strerror(errno));
		return;
	}
	/*
	 * While connections keep arriving, ppoll() returns ready without
	 * delivering the pending SIGCHLD, so the count is brought up to date
	 * here, not only on the signal.
	 */
	children_reap(&l->ch);
	if (l->ch.n >= svc->cfg.max_sessions) {
		static const char full[] =
		    "* BYE Too many connections, try again later.\r\n";

		log_msg(LOG_WARNING, "event=refused reason=\"max_sessions "
		    "reached\"");
		if (write(fd, full, sizeof(full) - 1) < 0) {
			/* the client is gone already */
		}
		close(fd);
		return;
	}
	if ((pid = fork()) == 0) {
		int rc;

		close(l->lfd);
		free(l->ch.pid);
		session_signals();
		rc = session_run(&svc->cfg, svc->tls_ctx, fd, fd);
		close(fd);
		session_exit(rc);
	}
	if (pid < 0)
		log_msg(LOG_ERR, "event=error reason=\"fork: %s\"",
		    strerror(errno));
	else
		l->ch.pid[l->ch.n++] = pid;
	close(fd);
}

/*
 * SIGQUIT: accept no more, and let the sessions end on their own for up
 * to drain_timeout seconds; the rest then get "* BYE" as on SIGTERM.  A
 * SIGTERM meanwhile cuts the wait short.
 */
static void
listener_drain(struct listener *l)
{
	int64_t deadline = deadline_in(l->svc->cfg.drain_timeout);

	close(l->lfd);
	l->lfd = -1;
	children_reap(&l->ch);
	log_msg(LOG_NOTICE, "event=drain-start sessions=%d timeout=%d",
	    l->ch.n, l->svc->cfg.drain_timeout);
	while (l->ch.n > 0 && !shutdown_requested) {
		int64_t left = deadline - now_ms();

		if (left <= 0)
			break;
		poll_wait(NULL, 0, left > INT_MAX ? INT_MAX : (int)left);
		children_reap(&l->ch);
		reload_requested = 0;	/* nothing new to serve */
	}
	log_msg(LOG_NOTICE, "event=drain-end sessions=%d", l->ch.n);
}

/*
 * Accept until told to stop (SIGTERM, or SIGQUIT's drain), reloading on
 * SIGHUP; then end every session left.  Takes lfd over.
 */
int
serve_listener(struct service *svc, const struct options *opt, int lfd)
{
	struct listener l = { .svc = svc, .opt = opt, .lfd = lfd };

	if (children_reserve(&l.ch, svc->cfg.max_sessions) != 0) {
		close(lfd);
		return 1;
	}
	listener_signals();
	log_msg(LOG_INFO, "event=listening max_sessions=%d",
	    svc->cfg.max_sessions);
	while (!shutdown_requested && !drain_requested) {
		struct pollfd pfd = { .fd = l.lfd, .events = POLLIN };

		if (child_exited)
			children_reap(&l.ch);
		if (reload_requested)
			listener_reload(&l);
		if (poll_wait(&pfd, 1, -1) > 0)
			listener_accept(&l);
	}
	if (drain_requested && !shutdown_requested)
		listener_drain(&l);
	if (l.lfd >= 0)
		close(l.lfd);
	children_reap(&l.ch);
	log_msg(LOG_INFO, "event=shutdown sessions=%d", l.ch.n);
	children_stop(&l.ch);
	free(l.ch.pid);
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
