/*
 * imapfe's own listener (-l), or a listening socket handed over by systemd
 * or a super-server: accept, fork one session process per connection,
 * reap them, and end them all with "* BYE" on SIGTERM.  Each session
 * itself, and what a reload loads, are the caller's (struct
 * listener_hooks): the listener calls nothing above it by name.
 */
#include <sys/epoll.h>
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

/* No SA_RESTART: a signal must interrupt poll() and accept(). */
static void
catch_signal(int sig)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(sig, &sa, NULL);
}

/*
 * Every process: SIGTERM and SIGINT end it (a session with "* BYE").
 * SIGHUP and SIGQUIT are the listener's (reload, drain): a session
 * ignores them, so that one sent to the whole group ends nobody.
 */
void
install_signals(void)
{
	catch_signal(SIGTERM);
	catch_signal(SIGINT);
	catch_signal(SIGCHLD);
	signal(SIGHUP, SIG_IGN);
	signal(SIGQUIT, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	signals_block_outside_waits();
}

/* The listener's own: reload and drain. */
static void
listener_signals(void)
{
	catch_signal(SIGHUP);
	catch_signal(SIGQUIT);
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

/*
 * A listener's children.  With prefork, some wait in accept() under the
 * configuration in force (idle), or under one a reload replaced, leaving
 * (retiring); each serves one connection (a session) and exits.
 */
enum child_state { CHILD_IDLE, CHILD_RETIRING, CHILD_SESSION };

struct child {
	pid_t			 pid;
	enum child_state	 state;
};

struct children {
	struct child	*c;
	int		 n;
	int		 cap;
	int		 idle;
	int		 retiring;
};

/* The listener's state: what it serves with, where, and whom. */
struct listener {
	struct service		*svc;	/* replaced whole on reload */
	const struct options	*opt;
	const struct listener_hooks *hooks;	/* the program it serves */
	int			 lfd;	/* -1 once closed for a drain */
	struct children		 ch;
	/*
	 * Pre-forked children write their pid to taken when they accept;
	 * they leave when the listener closes retire's write end.  -1 when
	 * prefork is off.
	 */
	int			 taken[2];
	int			 retire[2];
};

static int
children_sessions(const struct children *ch)
{
	return ch->n - ch->idle - ch->retiring;
}

static void
children_count(struct children *ch, enum child_state state, int delta)
{
	if (state == CHILD_IDLE)
		ch->idle += delta;
	else if (state == CHILD_RETIRING)
		ch->retiring += delta;
}

static void
children_add(struct children *ch, pid_t pid, enum child_state state)
{
	ch->c[ch->n].pid = pid;
	ch->c[ch->n++].state = state;
	children_count(ch, state, 1);
}

static struct child *
children_find(struct children *ch, pid_t pid)
{
	for (int i = 0; i < ch->n; i++)
		if (ch->c[i].pid == pid)
			return &ch->c[i];
	return NULL;
}

static void
children_forget(struct children *ch, pid_t pid)
{
	struct child *c = children_find(ch, pid);

	if (c == NULL)
		return;
	children_count(ch, c->state, -1);
	*c = ch->c[--ch->n];
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

/*
 * Room for max children: sessions, idle and retiring together never
 * exceed max_sessions (a reload may raise it).
 */
static int
children_reserve(struct children *ch, int max)
{
	struct child *c;

	if (max <= ch->cap)
		return 0;
	if ((c = reallocarray(ch->c, (size_t)max, sizeof(*c))) == NULL)
		return -1;
	ch->c = c;
	ch->cap = max;
	return 0;
}

/* Tell every child to finish (a session with a BYE), and wait for them. */
static void
children_stop(struct children *ch)
{
	for (int i = 0; i < ch->n; i++)
		kill(ch->c[i].pid, SIGTERM);
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
reload_sasl(const struct listener_hooks *h, const struct config *now,
    const struct config *next)
{
	h->sasl_teardown(now);
	if (h->sasl_setup(next) == 0)
		return 0;
	if (h->sasl_setup(now) != 0)
		log_msg(LOG_CRIT, "event=error reason=\"SASL cannot be set up "
		    "again: restart imapfe\"");
	return -1;
}

static void
close_pair(int p[2])
{
	for (int i = 0; i < 2; i++)
		if (p[i] >= 0) {
			close(p[i]);
			p[i] = -1;
		}
}

/*
 * A child, before it serves: nothing of the listener's it does not need
 * (its children, the listener's ends of the pipes, the listener's
 * signals).
 */
static void
child_detach(struct listener *l)
{
	free(l->ch.c);
	l->ch.c = NULL;
	if (l->taken[0] >= 0)
		close(l->taken[0]);
	if (l->retire[1] >= 0)
		close(l->retire[1]);
	session_signals();
}

/* One connection, to the end, in a child; never returns. */
static void __attribute__((noreturn))
child_serve(const struct listener *l, int fd)
{
	int rc;

	rc = l->hooks->session(l->svc, fd);
	close(fd);
	session_exit(rc);
}

/*
 * Where a pre-forked child waits: the listening socket, woken for alone
 * (EPOLLEXCLUSIVE: one idle child per connection, not all of them, which
 * holds for epoll_wait() only), and the retire pipe.  Closed before the
 * child serves.
 */
static int
prefork_waiter(int lfd, int retire)
{
	struct epoll_event lev = { .events = EPOLLIN | EPOLLEXCLUSIVE },
	    rev = { .events = EPOLLIN };
	int ep;

	if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
		return -1;
	lev.data.fd = lfd;
	rev.data.fd = retire;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) != 0 ||
	    epoll_ctl(ep, EPOLL_CTL_ADD, retire, &rev) != 0) {
		close(ep);
		return -1;
	}
	return ep;
}

/*
 * Wait for a connection and accept it; exits instead when retired (the
 * retire pipe's write end closed: a reload or a drain) or told to stop.
 */
static int
prefork_accept(int ep, int lfd, int retire)
{
	for (;;) {
		struct epoll_event ev[2];
		int n, fd;

		if (shutdown_requested)
			session_exit(0);
		if ((n = epoll_wait_signals(ep, ev, 2, -1)) <= 0)
			continue;
		for (int i = 0; i < n; i++)
			if (ev[i].data.fd == retire)
				session_exit(0);
		if ((fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC |
		    SOCK_NONBLOCK)) >= 0)
			return fd;
		if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
			/* out of descriptors or memory: no busy loop */
			log_msg(LOG_ERR, "event=error reason=\"accept: %s\"",
			    strerror(errno));
			poll_wait(NULL, 0, 100);
		}
	}
}

/*
 * A pre-forked child: wait for a connection (unless retired first), say
 * so to the listener, and serve it alone, as a child forked for it
 * would.
 */
static void __attribute__((noreturn))
prefork_child(struct listener *l)
{
	int fd, retire = l->retire[0], taken = l->taken[1], ep;
	pid_t me = getpid();

	child_detach(l);
	if ((ep = prefork_waiter(l->lfd, retire)) < 0)
		session_exit(1);
	fd = prefork_accept(ep, l->lfd, retire);
	close(ep);
	if (write(taken, &me, sizeof(me)) != sizeof(me)) {
		/* the listener counts it when it is reaped instead */
	}
	close(taken);
	close(retire);
	close(l->lfd);
	child_serve(l, fd);
}

/*
 * Keep min(prefork, what max_sessions leaves) children waiting to accept
 * with the configuration in force.
 */
static void
prefork_fill(struct listener *l)
{
	const struct config *cfg = &l->svc->cfg;
	int room = cfg->max_sessions - children_sessions(&l->ch) -
	    l->ch.retiring - l->ch.idle;
	int want = cfg->prefork - l->ch.idle;

	if (l->taken[0] < 0)
		return;
	if (want > room)
		want = room;
	while (want-- > 0 && l->ch.n < l->ch.cap) {
		pid_t pid = fork();

		if (pid == 0)
			prefork_child(l);
		if (pid < 0) {
			log_msg(LOG_ERR, "event=error reason=\"fork: %s\"",
			    strerror(errno));
			return;
		}
		children_add(&l->ch, pid, CHILD_IDLE);
	}
}

/* The pre-forked children that took a connection are sessions now. */
static void
prefork_taken(struct listener *l)
{
	pid_t pids[64];
	ssize_t got;

	while ((got = read(l->taken[0], pids, sizeof(pids))) > 0)
		for (size_t i = 0; i < (size_t)got / sizeof(*pids); i++) {
			struct child *c = children_find(&l->ch, pids[i]);

			if (c == NULL || c->state == CHILD_SESSION)
				continue;	/* ended, and reaped, already */
			children_count(&l->ch, c->state, -1);
			c->state = CHILD_SESSION;
		}
}

/*
 * The idle children leave: they never serve with a configuration a
 * reload replaced, nor accept during a drain.  With again, a new pipe
 * for the next ones.
 */
static int
prefork_retire(struct listener *l, int again)
{
	if (l->taken[0] < 0)
		return 0;
	close_pair(l->retire);
	for (int i = 0; i < l->ch.n; i++)
		if (l->ch.c[i].state == CHILD_IDLE) {
			l->ch.c[i].state = CHILD_RETIRING;
			l->ch.idle--;
			l->ch.retiring++;
		}
	if (again && pipe2(l->retire, O_CLOEXEC) != 0) {
		log_msg(LOG_ERR, "event=error reason=\"pipe: %s\"",
		    strerror(errno));
		close_pair(l->taken);	/* a fork per connection, then */
		return -1;
	}
	return 0;
}

/* The pipes of prefork, or none: a fork per connection. */
static void
prefork_start(struct listener *l)
{
	l->taken[0] = l->taken[1] = l->retire[0] = l->retire[1] = -1;
	if (l->svc->cfg.prefork == 0)
		return;
	if (pipe2(l->taken, O_CLOEXEC | O_NONBLOCK) != 0 ||
	    pipe2(l->retire, O_CLOEXEC) != 0) {
		log_msg(LOG_ERR, "event=error reason=\"pipe: %s\"",
		    strerror(errno));
		close_pair(l->taken);
		close_pair(l->retire);
	}
}

/*
 * Wait for the retiring children to be gone (they leave at once, unless
 * one took a connection as it was told: a session then), for up to
 * RETIRE_WAIT_MS.
 */
#define RETIRE_WAIT_MS	2000

static void
prefork_wait_retired(struct listener *l)
{
	int64_t deadline = now_ms() + RETIRE_WAIT_MS;

	while (l->ch.retiring > 0 && !shutdown_requested) {
		struct pollfd pfd = { .fd = l->taken[0], .events = POLLIN };
		int64_t left = deadline - now_ms();

		if (left <= 0)
			break;
		if (poll_wait(&pfd, 1, (int)left) > 0)
			prefork_taken(l);
		children_reap(&l->ch);
	}
}

/*
 * A new connection the listener accepts itself (prefork off, or no idle
 * child left): refused with a BYE when full, else a session.
 */
static int
listener_accept(struct listener *l)
{
	struct service *svc = l->svc;
	int fd;
	pid_t pid;

	fd = accept4(l->lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0) {
		if (errno != EINTR && errno != ECONNABORTED && errno != EAGAIN)
			log_msg(LOG_ERR, "event=error reason=\"accept: %s\"",
			    strerror(errno));
		return -1;
	}
	/*
	 * While connections keep arriving, ppoll() returns ready without
	 * delivering the pending SIGCHLD, so the count is brought up to date
	 * here, not only on the signal.
	 */
	children_reap(&l->ch);
	if (l->ch.n >= svc->cfg.max_sessions || l->ch.n >= l->ch.cap) {
		static const char full[] =
		    "* BYE Too many connections, try again later.\r\n";

		log_msg(LOG_WARNING, "event=refused reason=\"max_sessions "
		    "reached\"");
		if (write(fd, full, sizeof(full) - 1) < 0) {
			/* the client is gone already */
		}
		close(fd);
		return 0;
	}
	if ((pid = fork()) == 0) {
		child_detach(l);
		if (l->taken[1] >= 0)
			close(l->taken[1]);
		if (l->retire[0] >= 0)
			close(l->retire[0]);
		close(l->lfd);
		child_serve(l, fd);
	}
	if (pid < 0)
		log_msg(LOG_ERR, "event=error reason=\"fork: %s\"",
		    strerror(errno));
	else
		children_add(&l->ch, pid, CHILD_SESSION);
	close(fd);
	return 0;
}

/*
 * SIGHUP: read the configuration and every file it names again, check it
 * all as -t does, and serve the connections accepted from now on with it:
 * the idle pre-forked children leave, new ones are forked.  Anything
 * wrong, and the old one stays in force.  Sessions running keep what
 * they were forked with.
 */
static void
listener_reload(struct listener *l)
{
	struct service next;
	char err[512];
	int was_prefork = l->svc->cfg.prefork > 0;

	reload_requested = 0;
	if (l->hooks->load(&next, l->opt, 1, err, sizeof(err)) != 0)
		goto failed;
	if (reload_allowed(&l->svc->cfg, &next.cfg, err, sizeof(err)) != 0)
		goto unused;
	if (children_reserve(&l->ch, next.cfg.max_sessions) != 0) {
		snprintf(err, sizeof(err), "out of memory");
		goto unused;
	}
	if (reload_sasl(l->hooks, &l->svc->cfg, &next.cfg) != 0) {
		snprintf(err, sizeof(err), "the SASL set-up failed");
		goto unused;
	}
	l->hooks->free(l->svc);
	*l->svc = next;
	log_open(l->svc->cfg.syslog_facility, l->opt->to_stderr);
	if (was_prefork) {
		prefork_retire(l, l->svc->cfg.prefork > 0);
		prefork_wait_retired(l);
		/*
		 * A retiring child may have been the one woken for a
		 * connection (EPOLLEXCLUSIVE) and left without it: what
		 * waits, the listener takes, with the new configuration.
		 */
		while (listener_accept(l) == 0)
			continue;
	}
	if (l->taken[0] >= 0 && l->svc->cfg.prefork == 0)
		close_pair(l->taken);
	else if (l->taken[0] < 0 && l->svc->cfg.prefork > 0)
		prefork_start(l);
	log_msg(LOG_NOTICE, "event=reload config=%s max_sessions=%d "
	    "prefork=%d sessions=%d", l->opt->config_path,
	    l->svc->cfg.max_sessions, l->svc->cfg.prefork,
	    children_sessions(&l->ch));
	return;
unused:
	l->hooks->free(&next);
failed:
	log_msg(LOG_ERR, "event=reload-failed reason=\"%s\"", err);
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
	/* the socket is closed once the idle children's copies are, too */
	prefork_retire(l, 0);
	prefork_wait_retired(l);
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
 * What every session would otherwise do for the first time on its own,
 * done once here so that the children inherit it done.  Found by
 * profiling a login: a child faults in every page it touches that the
 * listener has not (fork copies no page tables of file mappings), and
 * these were the avoidable ones.
 * - calloc is bound lazily in libc (it may be interposed), and its first
 *   call, in every child, looked it up through the symbol tables of
 *   every library loaded: about a tenth of a login's page faults.
 * - libsasl2's sasl_client_new looks up this host's canonical name on
 *   every login; the first lookup in a process also reads the
 *   resolver's configuration and finds out that nscd is absent.
 */
static void
listener_warm(void)
{
	struct addrinfo hints = { .ai_flags = AI_CANONNAME }, *res;
	char host[256];

	free(calloc(1, 1));
	if (gethostname(host, sizeof(host) - 1) != 0)
		return;
	host[sizeof(host) - 1] = '\0';
	if (getaddrinfo(host, NULL, &hints, &res) == 0)
		freeaddrinfo(res);
}

/*
 * Accept until told to stop (SIGTERM, or SIGQUIT's drain), reloading on
 * SIGHUP; then end every session left.  With prefork, idle children
 * accept and the listener only keeps their number up, accepting itself
 * when none is left (max_sessions reached: the BYE).  Takes lfd over.
 */
int
serve_listener(struct service *svc, const struct options *opt,
    const struct listener_hooks *hooks, int lfd)
{
	struct listener l = { .svc = svc, .opt = opt, .hooks = hooks,
	    .lfd = lfd };

	if (children_reserve(&l.ch, svc->cfg.max_sessions) != 0) {
		close(lfd);
		return 1;
	}
	listener_warm();
	prefork_start(&l);
	listener_signals();
	log_msg(LOG_INFO, "event=listening max_sessions=%d prefork=%d",
	    svc->cfg.max_sessions, svc->cfg.prefork);
	while (!shutdown_requested && !drain_requested) {
		struct pollfd pfd[2] = { { .fd = l.taken[0], .events = POLLIN },
		    { .fd = l.lfd, .events = POLLIN } };

		if (child_exited)
			children_reap(&l.ch);
		if (reload_requested)
			listener_reload(&l);
		prefork_fill(&l);
		if (l.ch.idle > 0)
			pfd[1].fd = -1;		/* theirs to accept */
		if (poll_wait(pfd, 2, -1) <= 0)
			continue;
		if (pfd[0].revents != 0)
			prefork_taken(&l);
		if (pfd[1].revents != 0)
			listener_accept(&l);
	}
	if (drain_requested && !shutdown_requested)
		listener_drain(&l);
	if (l.lfd >= 0)
		close(l.lfd);
	children_reap(&l.ch);
	log_msg(LOG_INFO, "event=shutdown sessions=%d", children_sessions(&l.ch));
	children_stop(&l.ch);
	close_pair(l.taken);
	close_pair(l.retire);
	free(l.ch.c);
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
