/*
 * Buffered I/O over one descriptor pair (a socket, or inetd's stdin and
 * stdout), every wait bounded by the stream's deadline.  Descriptors are
 * non-blocking; poll(2) does the waiting so that a peer that stops reading
 * or writing cannot hold the process past its deadline.
 */
#include <sys/epoll.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "imapfe.h"

#define TLS_READ_AHEAD	(64 * 1024)

int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The deadline a number of seconds from now, on now_ms()'s clock. */
int64_t
deadline_in(int seconds)
{
	return now_ms() + (int64_t)seconds * 1000;
}

static int
poll_timeout(int64_t deadline)
{
	int64_t left;

	if (deadline == 0)
		return -1;
	left = deadline - now_ms();
	if (left <= 0)
		return 0;
	return left > 3600000 ? 3600000 : (int)left;
}

volatile sig_atomic_t	shutdown_requested;

static sigset_t wait_sigmask;

void
signals_block_outside_waits(void)
{
	sigset_t block;

	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGCHLD);
	sigaddset(&block, SIGHUP);
	sigaddset(&block, SIGQUIT);
	sigprocmask(SIG_BLOCK, &block, &wait_sigmask);
}

/* epoll_wait(2), the other place they are delivered. */
int
epoll_wait_signals(int ep, struct epoll_event *ev, int n, int timeout_ms)
{
	return epoll_pwait(ep, ev, n, timeout_ms, &wait_sigmask);
}

/* poll(2) that is the only place the blocked signals are delivered. */
int
poll_wait(struct pollfd *pfd, nfds_t n, int timeout_ms)
{
	struct timespec ts, *tsp = NULL;

	if (timeout_ms >= 0) {
		ts.tv_sec = timeout_ms / 1000;
		ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000;
		tsp = &ts;
	}
	return ppoll(pfd, n, tsp, &wait_sigmask);
}

/* Wait until fd is ready for events or the deadline passes. */
static enum io_status
wait_for(int fd, short events, int64_t deadline)
{
	struct pollfd pfd = { .fd = fd, .events = events };
	int n;

	for (;;) {
		n = poll_wait(&pfd, 1, poll_timeout(deadline));
		if (n > 0)
			return IO_OK;
		if (n == 0) {
			if (deadline != 0 && now_ms() >= deadline)
				return IO_TIMEOUT;
			continue;
		}
		if (errno != EINTR || shutdown_requested)
			return IO_ERROR;
	}
}

int
wait_readable(int fd, int64_t deadline)
{
	return wait_for(fd, POLLIN, deadline) == IO_OK;
}

/* A descriptor for poll(2): reads and writes that never block. */
void
nonblocking(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl >= 0 && (fl & O_NONBLOCK) == 0)
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

int
iobuf_init(struct iobuf *io, int rfd, int wfd, size_t cap)
{
	memset(io, 0, sizeof(*io));
	io->rfd = rfd;
	io->wfd = wfd;
	io->buf = malloc(cap);
	if (io->buf == NULL)
		return -1;
	io->cap = cap;
	return 0;
}

void
iobuf_free(struct iobuf *io)
{
	SSL_free(io->ssl);
	io->ssl = NULL;
	free(io->buf);
	io->buf = NULL;
	io->cap = io->start = io->end = 0;
}

size_t
iobuf_pending(const struct iobuf *io)
{
	return io->end - io->start;
}

void
iobuf_consume(struct iobuf *io, size_t n)
{
	io->start += n;
	if (io->start >= io->end)
		io->start = io->end = 0;
}

/* Forget everything buffered: used where pipelined input must not run. */
void
iobuf_discard(struct iobuf *io)
{
	io->start = io->end = 0;
}

/*
 * Hold what is written next in the socket until the next read: a command
 * whose answer need not be awaited then leaves in one segment with the one
 * after it, one wake-up of the peer instead of two round trips.  Where the
 * descriptor is no TCP socket, writes simply go out at once.
 */
void
iobuf_cork(struct iobuf *io)
{
	int on = 1;

	if (!io->corked && setsockopt(io->wfd, IPPROTO_TCP, TCP_CORK, &on,
	    sizeof(on)) == 0)
		io->corked = 1;
}

/* Every read may wait for an answer: what is corked must go first. */
static void
uncork(struct iobuf *io)
{
	int off = 0;

	if (io->corked) {
		(void)setsockopt(io->wfd, IPPROTO_TCP, TCP_CORK, &off,
		    sizeof(off));
		io->corked = 0;
	}
}

/* Note why TLS failed, for the session's log line. */
static enum io_status
tls_failure(struct iobuf *io, int err, const char *doing)
{
	char why[128];

	if (err == SSL_ERROR_ZERO_RETURN) {
		/* With unexpected EOFs ignored, a bare close looks like this. */
		ERR_clear_error();
		snprintf(io->tls_why, sizeof(io->tls_why), "connection closed "
		    "during %s", doing);
		io->tls_failed = 1;
		return IO_CLOSED;
	}
	if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
		ERR_clear_error();
		if (errno == 0 || errno == ECONNRESET || errno == EPIPE) {
			snprintf(io->tls_why, sizeof(io->tls_why), "connection "
			    "closed during %s", doing);
			io->tls_failed = 1;
			return IO_CLOSED;
		}
		snprintf(why, sizeof(why), "%s", strerror(errno));
	} else
		tls_error_text(why, sizeof(why));
	snprintf(io->tls_why, sizeof(io->tls_why), "%s: %s", doing, why);
	io->tls_failed = 1;
	return IO_ERROR;
}

/*
 * One read attempt into the free space of the buffer: IO_OK with at least
 * one byte, IO_AGAIN when the descriptor (or TLS, which may need more of a
 * record) has nothing yet, or how the stream ended.
 */
static enum io_status
read_once(struct iobuf *io, short *want)
{
	size_t room = io->cap - io->end;
	ssize_t n;

	*want = POLLIN;
	uncork(io);
	if (io->ssl != NULL) {
		int rc, err;

		ERR_clear_error();
		rc = SSL_read(io->ssl, io->buf + io->end, (int)(room > INT32_MAX ?
		    INT32_MAX : room));
		if (rc > 0) {
			n = rc;
			io->tls_short = 0;
			goto got;
		}
		err = SSL_get_error(io->ssl, rc);
		if (err == SSL_ERROR_WANT_READ) {
			io->tls_short = 1;
			return IO_AGAIN;
		}
		if (err == SSL_ERROR_WANT_WRITE) {
			*want = POLLOUT;
			return IO_AGAIN;
		}
		if (err == SSL_ERROR_ZERO_RETURN)
			return IO_CLOSED;
		return tls_failure(io, err, "read");
	}
	do
		n = read(io->rfd, io->buf + io->end, room);
	while (n < 0 && errno == EINTR);
	if (n == 0)
		return IO_CLOSED;
	if (n < 0)
		return errno == EAGAIN || errno == EWOULDBLOCK ? IO_AGAIN :
		    IO_ERROR;
got:
	if (io->trace_name != NULL)
		trace_data("from", io->trace_name, io->buf + io->end, (size_t)n,
		    io->trace_secret);
	io->end += (size_t)n;
	io->bytes_in += (uint64_t)n;
	return IO_OK;
}

/* Make room at the end of the buffer; IO_TOOLONG when it is full. */
static enum io_status
make_room(struct iobuf *io)
{
	if (io->start > 0 && io->end == io->cap) {
		memmove(io->buf, io->buf + io->start, io->end - io->start);
		io->end -= io->start;
		io->start = 0;
	}
	return io->end == io->cap ? IO_TOOLONG : IO_OK;
}

/* Read once more into the buffer, waiting; at least one byte on IO_OK. */
enum io_status
iobuf_fill(struct iobuf *io)
{
	enum io_status st;
	short want;

	if ((st = make_room(io)) != IO_OK)
		return st;
	while ((st = read_once(io, &want)) == IO_AGAIN)
		if ((st = wait_for(io->rfd, want, io->deadline)) != IO_OK)
			return st;
	return st;
}

/*
 * Read what is there without waiting for more; for the relay, which polls
 * both sides itself.  A TLS record that is only half in yet gives IO_AGAIN.
 */
enum io_status
iobuf_try_fill(struct iobuf *io)
{
	enum io_status st;
	short want;

	if ((st = make_room(io)) != IO_OK)
		return st;
	st = read_once(io, &want);
	if (st == IO_AGAIN && want == POLLOUT) {
		/* TLS must write before it can read (a key update): let it. */
		if ((st = wait_for(io->wfd, POLLOUT, io->deadline)) == IO_OK)
			st = read_once(io, &want);
	}
	/* TLS hands out one record a read (4 KiB from some servers): take
	 * every record already in, so the relay writes them on in one go
	 * rather than polling and writing once per record. */
	while (st == IO_OK && io->end < io->cap && iobuf_has_decrypted(io))
		if (read_once(io, &want) != IO_OK)
			break;
	return st;
}

/*
 * True when TLS holds bytes that poll(2) cannot see, so the relay must
 * read again before it waits: decrypted ones, or whole records read
 * ahead.  After a read that wanted more, what is buffered is part of a
 * record that only the descriptor can complete.
 */
int
iobuf_has_decrypted(const struct iobuf *io)
{
	return io->ssl != NULL && (SSL_pending(io->ssl) > 0 ||
	    (!io->tls_short && SSL_has_pending(io->ssl)));
}

/*
 * Run the TLS handshake on the connection, as server or client, within
 * io->deadline.  The iobuf owns ssl from here on, whatever the outcome.
 */
enum io_status
iobuf_tls_handshake(struct iobuf *io, SSL *ssl, int server)
{
	enum io_status st;
	int rc, err;

	io->ssl = ssl;
	/* Read as much as there is (several records at once), not each
	 * record's header and body in two read(2) calls. */
	SSL_set_read_ahead(ssl, 1);
	SSL_set_default_read_buffer_len(ssl, TLS_READ_AHEAD);
	if (SSL_set_rfd(ssl, io->rfd) != 1 || SSL_set_wfd(ssl, io->wfd) != 1)
		return tls_failure(io, SSL_ERROR_SSL, "handshake");
	for (;;) {
		ERR_clear_error();
		rc = server ? SSL_accept(ssl) : SSL_connect(ssl);
		if (rc == 1)
			return IO_OK;
		err = SSL_get_error(ssl, rc);
		if (err == SSL_ERROR_WANT_READ)
			st = wait_for(io->rfd, POLLIN, io->deadline);
		else if (err == SSL_ERROR_WANT_WRITE)
			st = wait_for(io->wfd, POLLOUT, io->deadline);
		else {
			st = tls_failure(io, err, "handshake");
			if (!server && SSL_get_verify_result(ssl) != X509_V_OK)
				snprintf(io->tls_why, sizeof(io->tls_why),
				    "certificate verify failed: %s",
				    X509_verify_cert_error_string(
				    SSL_get_verify_result(ssl)));
			return st;
		}
		if (st == IO_TIMEOUT) {
			snprintf(io->tls_why, sizeof(io->tls_why),
			    "handshake timeout");
			io->tls_failed = 1;
		}
		if (st != IO_OK)
			return st;
	}
}

/* Say close_notify if the connection is still sound, and drop TLS. */
void
iobuf_tls_close(struct iobuf *io)
{
	if (io->ssl == NULL)
		return;
	if (!io->tls_failed && SSL_is_init_finished(io->ssl)) {
		ERR_clear_error();
		SSL_shutdown(io->ssl);	/* one try: never wait for the reply */
	}
	ERR_clear_error();
	SSL_free(io->ssl);
	io->ssl = NULL;
}

/* Read exactly n bytes, as they arrive, onto the end of out. */
enum io_status
iobuf_read_into(struct iobuf *io, uint64_t n, struct str *out)
{
	enum io_status st;

	while (n > 0) {
		size_t avail = iobuf_pending(io);

		if (avail == 0) {
			if ((st = iobuf_fill(io)) != IO_OK)
				return st;
			continue;
		}
		if (avail > n)
			avail = (size_t)n;
		if (str_add(out, io->buf + io->start, avail) != 0)
			return IO_NOMEM;
		iobuf_consume(io, avail);
		n -= avail;
	}
	return IO_OK;
}

/*
 * Return the next line (without CRLF; a bare LF ends a line too) in
 * line and len, NUL-terminated in place.  The line stays valid until the
 * next call that reads.  A line longer than max gives IO_TOOLONG.
 */
enum io_status
iobuf_getline(struct iobuf *io, size_t max, char **line, size_t *len)
{
	size_t scanned = 0, n;
	enum io_status st;
	char *p, *nl;

	for (;;) {
		p = io->buf + io->start;
		n = io->end - io->start;
		nl = memchr(p + scanned, '\n', n - scanned);
		if (nl != NULL) {
			size_t l = (size_t)(nl - p);

			io->start += l + 1;
			if (l > 0 && p[l - 1] == '\r')
				l--;
			if (l > max)
				return IO_TOOLONG;
			p[l] = '\0';
			*line = p;
			*len = l;
			return IO_OK;
		}
		scanned = n;
		if (n > max + 1)
			return IO_TOOLONG;
		if (io->start > 0) {
			memmove(io->buf, p, n);
			io->start = 0;
			io->end = n;
		}
		if ((st = iobuf_fill(io)) != IO_OK)
			return st;
	}
}

/* One write attempt: bytes written, or -1 with *want or *st set. */
static ssize_t
write_once(struct iobuf *io, const char *p, size_t len, short *want,
    enum io_status *st)
{
	int rc, err;

	*want = POLLOUT;
	if (io->ssl == NULL)
		return write(io->wfd, p, len);
	ERR_clear_error();
	rc = SSL_write(io->ssl, p, (int)(len > INT32_MAX ? INT32_MAX : len));
	if (rc > 0)
		return rc;
	err = SSL_get_error(io->ssl, rc);
	errno = EAGAIN;
	if (err == SSL_ERROR_WANT_READ)
		*want = POLLIN;
	else if (err != SSL_ERROR_WANT_WRITE) {
		*st = tls_failure(io, err, "write");
		errno = EIO;
	}
	return -1;
}

enum io_status
iobuf_write(struct iobuf *io, const void *data, size_t len)
{
	const char *p = data;
	enum io_status st = IO_ERROR;
	short want;
	ssize_t n;

	if (io->trace_name != NULL)
		trace_data("to", io->trace_name, data, len, io->trace_secret);
	while (len > 0) {
		n = write_once(io, p, len, &want, &st);
		if (n > 0) {
			p += n;
			len -= (size_t)n;
			io->bytes_out += (uint64_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EIO && io->ssl != NULL)
			return st;
		if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
			return errno == EPIPE || errno == ECONNRESET ?
			    IO_CLOSED : IO_ERROR;
		if (want == POLLIN)
			uncork(io);	/* TLS wants the peer's answer first */
		if ((st = wait_for(want == POLLIN ? io->rfd : io->wfd, want,
		    io->deadline)) != IO_OK)
			return st;
	}
	return IO_OK;
}

/* Write one formatted line, CRLF added; overlong lines are cut short. */
enum io_status
iobuf_vline(struct iobuf *io, const char *fmt, va_list ap)
{
	char line[TAGGED_LINE_MAX + 2];
	int n = vsnprintf(line, sizeof(line) - 2, fmt, ap);

	if (n < 0)
		return IO_ERROR;
	if ((size_t)n > sizeof(line) - 3)
		n = (int)sizeof(line) - 3;
	memcpy(line + n, "\r\n", 3);
	return iobuf_write(io, line, (size_t)n + 2);
}

enum io_status
iobuf_puts(struct iobuf *io, const char *s)
{
	return iobuf_write(io, s, strlen(s));
}

/*
 * Move up to max bytes from one plain stream to another through a pipe
 * with splice(2): the kernel hands the pages on, this process never
 * copies them.  Reads once without waiting, then writes all it read,
 * waiting within to->deadline.  IO_OK with *moved > 0; IO_AGAIN when
 * nothing was there; IO_CLOSED at from's end; IO_UNSUPPORTED when these
 * descriptors cannot splice (nothing was consumed: use iobuf_try_fill);
 * *to_failed set when it was the writing side that failed.
 */
enum io_status
iobuf_splice(struct iobuf *from, struct iobuf *to, int pipefd[2], size_t max,
    size_t *moved, int *to_failed)
{
	ssize_t in, out;
	size_t left;
	enum io_status st;

	*moved = 0;
	*to_failed = 0;
	do
		in = splice(from->rfd, NULL, pipefd[1], NULL, max,
		    SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
	while (in < 0 && errno == EINTR);
	if (in == 0)
		return IO_CLOSED;
	if (in < 0)
		return errno == EAGAIN ? IO_AGAIN : errno == EINVAL ?
		    IO_UNSUPPORTED : IO_ERROR;
	from->bytes_in += (uint64_t)in;
	for (left = (size_t)in; left > 0; ) {
		out = splice(pipefd[0], NULL, to->wfd, NULL, left,
		    SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
		if (out > 0) {
			left -= (size_t)out;
			to->bytes_out += (uint64_t)out;
			continue;
		}
		if (out < 0 && errno == EINTR)
			continue;
		if (out == 0 || errno != EAGAIN)
			st = IO_CLOSED;
		else
			st = wait_for(to->wfd, POLLOUT, to->deadline);
		if (st != IO_OK) {
			*to_failed = 1;
			return st;
		}
	}
	*moved = (size_t)in;
	return IO_OK;
}

/* ------------------------------------------------------------------ */
/* reading a client's command: lines and the literals they announce */

/* Write what the reader answers itself, traced like any line. */
static enum io_status
cmd_answer(struct iobuf *io, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static enum io_status
cmd_answer(struct iobuf *io, const char *fmt, ...)
{
	enum io_status st;
	va_list ap;

	va_start(ap, fmt);
	st = iobuf_vline(io, fmt, ap);
	va_end(ap);
	return st;
}

/*
 * How an I/O status on the client's side ends the session, and the BYE
 * it gets (NULL: none, the client is gone): the one table of it.
 */
enum session_end
io_status_end(enum io_status st, const char **bye)
{
	switch (st) {
	case IO_TIMEOUT:
		*bye = "Disconnected for inactivity.";
		return END_TIMEOUT;
	case IO_TOOLONG:
		*bye = "Command line too long.";
		return END_LIMIT;
	case IO_NOMEM:
		*bye = "Out of memory.";
		return END_LIMIT;
	default:
		*bye = shutdown_requested ? "Server shutting down." : NULL;
		return shutdown_requested ? END_SHUTDOWN : END_CLIENT_GONE;
	}
}

static enum cmd_status
cmd_io_end(struct cmd_buf *cb, enum io_status st)
{
	cb->end = io_status_end(st, &cb->bye);
	return CMD_END;
}

static enum cmd_status
cmd_limit(struct cmd_buf *cb, const char *bye)
{
	cb->bye = bye;
	cb->end = END_LIMIT;
	return CMD_END;
}

/*
 * Add one line (CRLF removed) to the command; a literal announcement at
 * its end is written synchronizing, since imapfe, not the client, decides
 * when the next hop gets the bytes.
 */
static int
cmd_add_line(struct cmd_buf *cb, const char *line, size_t len,
    enum literal_kind k, uint64_t n)
{
	if (k == LIT_NONSYNC) {
		len = (size_t)((const char *)memrchr(line, '{', len) - line);
		return str_add(&cb->text, line, len) != 0 ||
		    str_printf(&cb->text, "{%llu}\r\n",
		    (unsigned long long)n) != 0 ? -1 : 0;
	}
	return str_add(&cb->text, line, len) != 0 ||
	    str_add(&cb->text, "\r\n", 2) != 0 ? -1 : 0;
}

/* Where a literal's bytes start, noted; the array grows as needed. */
static int
cmd_add_cut(struct cmd_buf *cb)
{
	if (cb->ncuts == cb->cuts_cap) {
		int cap = cb->cuts_cap > 0 ? cb->cuts_cap * 2 : 4;
		size_t *c = realloc(cb->cuts, (size_t)cap * sizeof(*c));

		if (c == NULL)
			return -1;
		cb->cuts = c;
		cb->cuts_cap = cap;
	}
	cb->cuts[cb->ncuts++] = cb->text.len;
	return 0;
}

void
cmd_buf_free(struct cmd_buf *cb)
{
	str_free(&cb->text);	/* wipes: before login, a password maybe */
	free(cb->cuts);
	cb->cuts = NULL;
	cb->ncuts = cb->cuts_cap = 0;
}

/* A literal over the limit: TOOBIG where the client waits, else BYE. */
static enum cmd_status
cmd_too_large(struct iobuf *io, const struct cmd_limits *lim,
    struct cmd_buf *cb, enum literal_kind k, uint64_t n)
{
	log_msg(LOG_NOTICE, "event=limit reason=\"literal of %llu bytes, more "
	    "than %s\"", (unsigned long long)n, lim->literal_name);
	/* Half a command gone on already cannot be refused alone. */
	if (k != LIT_SYNC || !lim->toobig || cb->continuing)
		return cmd_limit(cb, "Literal too large.");
	if (cmd_answer(io, "%s NO [TOOBIG] Literal too large.", cb->tag) !=
	    IO_OK)
		return cmd_io_end(cb, IO_ERROR);
	return CMD_ANSWERED;
}

/*
 * Read one client command, within lim: its lines, and the literals they
 * announce, into cb->text as it goes on the wire (CRLFs included, every
 * literal synchronizing, cb->cuts after each announcement).  A literal
 * over lim->hold_max is left to the caller to stream (CMD_STREAM, size in
 * cb->stream_left); with cb->continuing set, the next call reads the rest
 * of that command.  Synchronizing literals get their "+" here, once their
 * size is acceptable.  The one reader of client commands, before login
 * and after.
 */
enum cmd_status
cmd_read(struct iobuf *io, const struct cmd_limits *lim, struct cmd_buf *cb)
{
	enum literal_kind k;
	enum io_status st;
	char *line;
	size_t len;
	uint64_t n;

	cb->text.len = 0;	/* before login the caller wipes it */
	cb->longest = 0;
	cb->ncuts = 0;
	cb->stream_left = 0;
	cb->bye = NULL;
	cb->end = END_NONE;
	for (;;) {
		if ((st = iobuf_getline(io, lim->line_max, &line, &len)) !=
		    IO_OK)
			return cmd_io_end(cb, st);
		if (len > cb->longest)
			cb->longest = len;
		if (cb->text.len == 0 && !cb->continuing)
			early_tag(line, len, cb->tag, sizeof(cb->tag));
		k = literal_at_end(line, len, &n);
		if (k == LIT_INVALID && cb->continuing)
			k = LIT_NONE;	/* the back-end will refuse it */
		if (k == LIT_INVALID) {
			if (cmd_answer(io, "%s BAD Invalid literal size.",
			    cb->tag) != IO_OK)
				return cmd_io_end(cb, IO_ERROR);
			return CMD_BAD_LITERAL;
		}
		if (cb->text.len + len + 32 > lim->command_max ||
		    (k != LIT_NONE && cb->ncuts == CMD_MAX_LITERALS))
			return cmd_limit(cb, "Command too long.");
		if (cmd_add_line(cb, line, len, k, n) != 0)
			return cmd_io_end(cb, IO_NOMEM);
		if (k == LIT_NONE)
			return CMD_COMPLETE;
		if (cmd_add_cut(cb) != 0)
			return cmd_io_end(cb, IO_NOMEM);
		if (n > lim->literal_max)
			return cmd_too_large(io, lim, cb, k, n);
		if (n > lim->hold_max || cb->text.len + n + 2 > lim->command_max) {
			if (lim->hold_max == lim->literal_max)
				return cmd_too_large(io, lim, cb, k, n);
			cb->stream_left = n;
			cb->stream_sync = k == LIT_SYNC;
			return CMD_STREAM;
		}
		if (k == LIT_SYNC && cmd_answer(io, "+ Ready for literal data") !=
		    IO_OK)
			return cmd_io_end(cb, IO_ERROR);
		if ((st = iobuf_read_into(io, n, &cb->text)) != IO_OK)
			return cmd_io_end(cb, st);
	}
}
