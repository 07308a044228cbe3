/*
 * Back-ends: which one serves a user, how imapfe connects to it, and the
 * login conversation, a small sequence of named steps (connect, greeting,
 * capabilities, authenticate, post-login capabilities) each of which may
 * end the attempt with a reason for the log.
 */
#include <sys/socket.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>
#include <unistd.h>

#include "imapfe.h"

#define BACKEND_BUFSIZE	(64 * 1024)

/* ------------------------------------------------------------------ */
/* routing */

static int
route_matches(const char *pattern, const char *user)
{
	const char *at;

	if (strcmp(pattern, "*") == 0)
		return 1;
	if (strncmp(pattern, "*@", 2) == 0) {
		at = strrchr(user, '@');
		return at != NULL && strcasecmp(at + 1, pattern + 2) == 0;
	}
	return strcmp(pattern, user) == 0;
}

/* The first route whose pattern matches the user, or NULL. */
const struct route *
route_lookup(const struct config *cfg, const char *user)
{
	for (const struct route *r = cfg->routes; r != NULL; r = r->next)
		if (route_matches(r->pattern, user))
			return r;
	return NULL;
}

/* Which kind of route line a pattern is, for route_order. */
static enum route_source
route_kind(const char *pattern)
{
	if (strcmp(pattern, "*") == 0)
		return SRC_DEFAULT;
	return strncmp(pattern, "*@", 2) == 0 ? SRC_DOMAIN : SRC_USER;
}

static const struct route *
route_lookup_kind(const struct config *cfg, const char *user,
    enum route_source kind)
{
	for (const struct route *r = cfg->routes; r != NULL; r = r->next)
		if (route_kind(r->pattern) == kind &&
		    route_matches(r->pattern, user))
			return r;
	return NULL;
}

/*
 * The directory's answer, allowed only when it names a configured
 * back-end: a directory entry cannot send imapfe anywhere else.
 */
static enum route_status
route_from_directory(const struct config *cfg, const char *tmpl,
    const char *key, const struct route **out, char *why, size_t whylen)
{
	char host[DIR_HOST_MAX], port[DIR_PORT_MAX], clean[DIR_HOST_MAX];

	switch (directory_lookup(cfg, tmpl, key, host, port, why, whylen)) {
	case DIR_UNKNOWN:
		return ROUTE_UNKNOWN;
	case DIR_UNAVAILABLE:
		return ROUTE_UNAVAILABLE;
	case DIR_FOUND:
		break;
	}
	if ((*out = listed_server(cfg, host, port)) != NULL)
		return ROUTE_FOUND;
	sanitize(clean, sizeof(clean), host, strlen(host));
	snprintf(why, whylen, "directory names %s:%s, which is not a "
	    "configured server", clean, port);
	return ROUTE_UNAVAILABLE;
}

/*
 * The user's back-end from the sources in route_order; the first that
 * knows the user decides.  A failing source ends the search: answering
 * from a later one (a "*" default, say) would send the user to a server
 * that does not hold the mailbox.
 */
enum route_status
route_find(const struct config *cfg, const char *user,
    const struct route **out, char *why, size_t whylen)
{
	snprintf(why, whylen, "no route for user");
	for (size_t i = 0; i < cfg->route_order_len; i++) {
		enum route_source src = cfg->route_order[i];
		enum route_status st;

		if (src == SRC_LDAP) {
			st = route_from_directory(cfg, cfg->ldap_filter, user,
			    out, why, whylen);
			if (st != ROUTE_UNKNOWN)
				return st;
			continue;
		}
		*out = src == SRC_ROUTES ? route_lookup(cfg, user) :
		    route_lookup_kind(cfg, user, src);
		if (*out != NULL)
			return ROUTE_FOUND;
	}
	return ROUTE_UNKNOWN;
}

/*
 * The server of a "public PREFIX ldap" line, as the directory names it
 * now: the listed server's line, with the public line's prefix.  *out is
 * a copy that borrows every string from the configuration.
 */
enum route_status
public_from_directory(const struct config *cfg, const struct route *pub,
    struct route *out, char *why, size_t whylen)
{
	const struct route *listed;
	enum route_status st;

	st = route_from_directory(cfg, cfg->ldap_public_filter, pub->pattern,
	    &listed, why, whylen);
	if (st == ROUTE_UNKNOWN)
		return ROUTE_UNAVAILABLE;	/* the prefix still has no server */
	if (st == ROUTE_FOUND) {
		*out = *listed;
		out->pattern = pub->pattern;
		out->next = NULL;
	}
	return st;
}

/* "143" and "0143" are one port; service names compare as written. */
static int
same_port(const char *a, const char *b)
{
	char *enda, *endb;
	long pa = strtol(a, &enda, 10), pb = strtol(b, &endb, 10);

	if (*a != '\0' && *enda == '\0' && *b != '\0' && *endb == '\0')
		return pa == pb;
	return strcmp(a, b) == 0;
}

static const struct route *
find_in(const struct route *r, const char *host, const char *port)
{
	for (; r != NULL; r = r->next)
		for (const struct route *a = r; a != NULL; a = a->alt)
			if (!a->from_directory &&
			    strcasecmp(a->host, host) == 0 &&
			    same_port(a->port, port))
				return a;
	return NULL;
}

/*
 * The configured back-end at HOST:PORT (a route, public or server line),
 * or NULL.  Anything imapfe learns at run time (a referral, a directory
 * answer) may lead only to a server found here, with that line's options.
 */
const struct route *
listed_server(const struct config *cfg, const char *host, const char *port)
{
	const struct route *r;

	if ((r = find_in(cfg->routes, host, port)) != NULL ||
	    (r = find_in(cfg->publics, host, port)) != NULL)
		return r;
	return find_in(cfg->servers, host, port);
}

/* ------------------------------------------------------------------ */
/* the connection */

const char *
backend_next_tag(struct backend *be)
{
	snprintf(be->tagbuf, sizeof(be->tagbuf), "F%u", ++be->tagseq);
	return be->tagbuf;
}

static int
connect_one(const struct addrinfo *ai, int64_t deadline)
{
	struct pollfd pfd;
	socklen_t elen = sizeof(int);
	int fd, err = 0, one = 1;

	fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK |
	    SOCK_CLOEXEC, ai->ai_protocol);
	if (fd < 0)
		return -1;
	if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
		if (errno != EINPROGRESS)
			goto fail;
		pfd.fd = fd;
		pfd.events = POLLOUT;
		for (;;) {
			int64_t left = deadline - now_ms();
			int n;

			if (left <= 0) {
				errno = ETIMEDOUT;
				goto fail;
			}
			n = poll_wait(&pfd, 1, (int)left);
			if (n > 0)
				break;
			if (n < 0 && errno != EINTR)
				goto fail;
		}
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0)
			goto fail;
		if (err != 0) {
			errno = err;
			goto fail;
		}
	}
	/* Commands and replies are small and interactive. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
fail:
	err = errno;
	close(fd);
	errno = err;
	return -1;
}

/* The server's fault, not this host's (out of descriptors, say). */
static int
server_down_errno(int e)
{
	return e == ECONNREFUSED || e == ETIMEDOUT || e == EHOSTUNREACH ||
	    e == ENETUNREACH || e == EHOSTDOWN;
}

/* Met again, this failure would cost a wait (not an immediate answer). */
static int
failure_waits(int e)
{
	return e != ECONNREFUSED && e != ENETUNREACH;
}

/*
 * What every process shares about host:port: marked down when it refused
 * a connection or did not answer (no connection, or no greeting, in
 * time), for backend_down_time; up again when it greeted.  One session
 * at a time retries it once the time is up.
 */
static void
server_down(const struct config *cfg, const char *host, const char *port,
    int timed_out)
{
	state_backend_failed(cfg->state, cfg, host, port, timed_out);
	log_msg(LOG_WARNING, "event=backend-down backend=%s:%s retry_in=%ds",
	    host, port, cfg->backend_down_time);
}

static void
server_up(const struct config *cfg, const char *host, const char *port)
{
	if (state_backend_up(cfg->state, cfg, host, port))
		log_msg(LOG_NOTICE, "event=backend-up backend=%s:%s", host,
		    port);
}

/* Connect to every address of host:port in turn, within connect_timeout. */
static int
backend_connect(const struct route *r, const struct config *cfg, char *why,
    size_t whylen)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res, *ai;
	int64_t deadline = now_ms() + (int64_t)cfg->connect_timeout * 1000;
	int fd = -1, rc, err;

	/* A numeric address needs no resolver, nor AI_ADDRCONFIG's look at
	 * the interfaces (a netlink round trip for every login). */
	hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
	rc = getaddrinfo(r->host, r->port, &hints, &res);
	if (rc == EAI_NONAME) {
		hints.ai_flags = AI_ADDRCONFIG;
		rc = getaddrinfo(r->host, r->port, &hints, &res);
	}
	if (rc != 0) {
		snprintf(why, whylen, "cannot resolve: %s", gai_strerror(rc));
		return -1;
	}
	for (ai = res; ai != NULL && fd < 0; ai = ai->ai_next)
		fd = connect_one(ai, deadline);
	err = errno;
	if (fd < 0)
		snprintf(why, whylen, "connect: %s", strerror(err));
	freeaddrinfo(res);
	if (fd < 0 && server_down_errno(err))
		server_down(cfg, r->host, r->port, failure_waits(err));
	return fd;
}

/* ------------------------------------------------------------------ */
/* capabilities */

static char *
dup_range(const char *s, size_t len)
{
	char *p = malloc(len + 1);

	if (p != NULL) {
		memcpy(p, s, len);
		p[len] = '\0';
	}
	return p;
}

/*
 * Take the capability list from an untagged CAPABILITY response or from a
 * [CAPABILITY ...] response code, when the line has either.
 */
void
backend_note_caps(struct backend *be, const char *line, size_t len)
{
	static const char code[] = "[CAPABILITY ";
	static const char untagged[] = "* CAPABILITY ";
	const char *p, *end;
	char *caps;
	size_t tl = strlen(be->id_tag);

	/* A pipelined ID's answer comes in with the login's: whatever it
	 * says, it is not the capabilities the login is checked against. */
	if (tl > 0 && len >= 5 && strncasecmp(line, "* ID ", 5) == 0)
		return;
	if (tl > 0 && len > tl && strncmp(line, be->id_tag, tl) == 0 &&
	    line[tl] == ' ') {
		be->id_tag[0] = '\0';
		return;
	}
	if (len >= sizeof(untagged) - 1 &&
	    strncasecmp(line, untagged, sizeof(untagged) - 1) == 0) {
		p = line + sizeof(untagged) - 1;
		end = line + len;
	} else {
		p = memchr(line, '[', len);
		if (p == NULL || (size_t)(line + len - p) < sizeof(code) - 1 ||
		    strncasecmp(p, code, sizeof(code) - 1) != 0)
			return;
		p += sizeof(code) - 1;
		end = memchr(p, ']', (size_t)(line + len - p));
		if (end == NULL)
			return;
	}
	if ((caps = dup_range(p, (size_t)(end - p))) == NULL)
		return;
	free(be->caps);
	be->caps = caps;
	be->caps_seq++;
}

/*
 * What the client is told after login: the back-end's capabilities less
 * those that belong to the back-end link itself or that imapfe cannot
 * relay (compression would hide the stream from imapfe).
 */
char *
caps_for_client(const char *backend_caps, int routed)
{
	static const char *const drop[] = { "STARTTLS", "LOGINDISABLED",
	    "SASL-IR", "LOGIN-REFERRALS" };
	/*
	 * With public-folder servers, extensions whose commands span
	 * mailboxes would reach only one server.  (CATENATE and URLAUTH stay:
	 * the router runs their commands where their URLs point, imapurl.c.)
	 */
	static const char *const drop_routed[] = { "NOTIFY", "MULTISEARCH",
	    "MAILBOX-REFERRALS" };
	static const char *const drop_prefix[] = { "AUTH=", "COMPRESS=" };
	struct str out = { 0 };
	const char *p = backend_caps;

	while (p != NULL && *p != '\0') {
		size_t wl, i;
		int keep = 1;

		while (*p == ' ')
			p++;
		wl = strcspn(p, " ");
		for (i = 0; i < sizeof(drop) / sizeof(*drop); i++)
			if (wl == strlen(drop[i]) &&
			    strncasecmp(p, drop[i], wl) == 0)
				keep = 0;
		for (i = 0; routed && i < sizeof(drop_routed) /
		    sizeof(*drop_routed); i++)
			if (wl == strlen(drop_routed[i]) &&
			    strncasecmp(p, drop_routed[i], wl) == 0)
				keep = 0;
		for (i = 0; i < sizeof(drop_prefix) / sizeof(*drop_prefix); i++)
			if (strncasecmp(p, drop_prefix[i],
			    strlen(drop_prefix[i])) == 0)
				keep = 0;
		if (keep && wl > 0 && ((out.len > 0 && str_add(&out, " ", 1)) ||
		    str_add(&out, p, wl))) {
			str_free(&out);
			return NULL;
		}
		p += wl;
	}
	if (out.s == NULL && str_adds(&out, "IMAP4rev1") != 0)
		return NULL;
	return out.s;
}

/* ------------------------------------------------------------------ */
/* responses: the one reader of a back-end's stream */

/* Fill r from a tagged status line (or an untagged BYE) as received. */
static void
reply_set(struct reply *r, const char *line, size_t len)
{
	struct status_resp st;
	char tag[TAGGED_LINE_MAX];
	size_t tl = 0;

	while (tl < len && line[tl] != ' ')
		tl++;
	r->raw = NULL;
	r->raw_len = 0;
	r->sink_failed = 0;
	r->truncated = len >= sizeof(r->line);
	r->len = r->truncated ? sizeof(r->line) - 1 : len;
	memcpy(r->line, line, r->len);
	r->line[r->len] = '\0';
	r->tag_len = tl < r->len ? tl : r->len;
	memcpy(tag, line, r->tag_len);
	tag[r->tag_len] = '\0';
	r->status = REPLY_BAD;		/* a tagged line that is no status */
	r->code = CODE_NONE;
	if (status_parse(r->line, r->len, tag, &st) == 0) {
		static const enum reply_status kinds[] = {
			[RESP_OK] = REPLY_OK, [RESP_NO] = REPLY_NO,
			[RESP_BAD] = REPLY_BAD, [RESP_BYE] = REPLY_BYE,
			[RESP_PREAUTH] = REPLY_OK };

		r->status = kinds[st.kind];
		r->code = st.code;
	}
	sanitize(r->why, sizeof(r->why), line, len);
}

/* The connection failed before a tagged answer: BYE if one came. */
static enum reply_status
reply_lost(struct backend *be, struct reply *r, const char *why)
{
	if (be->bye != NULL) {
		*r = *be->bye;
		return r->status;
	}
	r->raw = NULL;
	r->sink_failed = 0;
	r->status = REPLY_LOST;
	r->code = CODE_NONE;
	r->len = r->tag_len = 0;
	r->line[0] = '\0';
	snprintf(r->why, sizeof(r->why), "%s", why);
	return REPLY_LOST;
}

int
reply_is(const struct reply *r, const char *tag)
{
	return r->tag_len == strlen(tag) && memcmp(r->line, tag,
	    r->tag_len) == 0;
}

/* "* OK", "* NO", "* BAD", "* BYE", "* PREAUTH": text, no literal. */
static int
is_status_line(const char *p, size_t k)
{
	struct status_resp st;

	if (k > 0 && p[k - 1] == '\n')
		k--;
	if (k > 0 && p[k - 1] == '\r')
		k--;
	return status_parse(p, k, "*", &st) == 0;
}

/* Untagged lines that may carry capabilities, told apart cheaply. */
static void
note_caps_if_any(struct backend *be, const char *line, size_t len)
{
	if ((len > 6 && strncasecmp(line, "* OK [", 6) == 0) ||
	    (len > 13 && strncasecmp(line, "* CAPABILITY ", 13) == 0) ||
	    (len > 7 && strncasecmp(line, "* PREAUTH [", 7) == 0))
		backend_note_caps(be, line, len);
}

struct run {
	const char	*p;		/* a run of bytes for sink->out */
	size_t		 len;
};

static int
run_flush(struct run *run, const struct resp_sink *sink)
{
	enum io_status st = IO_OK;

	if (run->len > 0)
		st = iobuf_write(sink->out, run->p, run->len);
	run->len = 0;
	return st == IO_OK ? 0 : -1;
}

/* Pass k bytes of a kept response on; runs for sink->out are joined. */
static int
deliver(struct backend *be, const struct resp_sink *sink, struct run *run,
    const char *p, size_t k)
{
	if (be->dropping || sink == NULL)
		return 0;
	if (sink->out != NULL) {
		if (run->len > 0 && run->p + run->len != p &&
		    run_flush(run, sink) != 0)
			return -1;
		if (run->len == 0)
			run->p = p;
		run->len += k;
		return 0;
	}
	return sink->data != NULL ? sink->data(sink->ctx, p, k) : 0;
}

/*
 * The first line of an untagged response: noted, shown to the sink's
 * line filter, kept or dropped whole (its literals and all).
 */
static int
untagged_start(struct backend *be, const struct resp_sink *sink,
    struct run *run, const char *p, size_t k)
{
	size_t len = k;
	enum sink_verdict v = SINK_KEEP;

	if (len > 0 && p[len - 1] == '\n')
		len--;
	if (len > 0 && p[len - 1] == '\r')
		len--;
	note_caps_if_any(be, p, len);
	if (len >= 5 && strncasecmp(p, "* BYE", 5) == 0 &&
	    (len == 5 || p[5] == ' ') && (be->bye != NULL ||
	    (be->bye = malloc(sizeof(*be->bye))) != NULL))
		reply_set(be->bye, p, len);
	if (sink != NULL && sink->line != NULL) {
		if (run_flush(run, sink) != 0)
			return -1;
		v = sink->line(sink->ctx, p, len);
	}
	if (v == SINK_FAIL)
		return -1;
	be->dropping = v == SINK_DROP;
	return 0;
}

/*
 * How long the response at p is, its literals and the rest of its lines
 * included, when all of it is among the n bytes there; 0 until then.
 */
static size_t
response_extent(const struct resp_scanner *sc, const char *p, size_t n)
{
	struct resp_scanner ahead = *sc;
	size_t at = 0, k;

	while (at < n && (k = resp_scan_piece(&ahead, p + at, n - at)) > 0) {
		resp_scan(&ahead, p + at, k);
		at += k;
		if (resp_scan_at_start(&ahead))
			return at;
	}
	return 0;
}

/*
 * Follow what back-end be has buffered: untagged responses go to the
 * sink as they come (NULL: nowhere), up to the next tagged answer or "+"
 * continuation, which end up in r.  Never reads: DISPATCH_MORE asks the
 * caller to, when it wants more.  The one place that reads a back-end's
 * responses, for imapfe's own commands and the client's alike.
 */
enum dispatch
backend_dispatch(struct backend *be, const struct resp_sink *sink,
    struct reply *r)
{
	struct iobuf *io = &be->io;
	struct run run = { NULL, 0 };
	enum dispatch d = DISPATCH_MORE;

	for (;;) {
		const char *p = io->buf + io->start;
		size_t n = iobuf_pending(io), k;
		int start = resp_scan_at_start(&be->sc);

		if (n == 0)
			break;
		k = resp_scan_piece(&be->sc, p, n);
		if (k == 0 && n < io->cap && (start || sink == NULL ||
		    !sink->long_lines))
			break;		/* the rest of the line is to come */
		if (k == 0 && (sink == NULL || !sink->long_lines)) {
			d = DISPATCH_TOOLONG;	/* imapfe reads whole lines */
			break;
		}
		if (k == 0)
			k = n;		/* a line longer than the buffer */
		if (start && p[0] != '*') {
			size_t len = k;

			while (len > 0 && (p[len - 1] == '\n' ||
			    p[len - 1] == '\r'))
				len--;
			reply_set(r, p, len);
			r->raw = p;
			r->raw_len = k;
			if (p[0] != '+')	/* "tag OK [CAPABILITY ...]" */
				backend_note_caps(be, p, len);
			resp_scan(&be->sc, p, k);
			resp_scan_text_line(&be->sc);
			iobuf_consume(io, k);
			if (p[0] != '+' && sink != NULL && sink->out != NULL &&
			    sink->tagged != NULL && sink->tagged(sink->ctx, r)) {
				/* on with the run, one write for many answers */
				be->dropping = 0;
				if (deliver(be, sink, &run, p, k) != 0) {
					d = DISPATCH_FAILED;
					break;
				}
				continue;
			}
			if (run_flush(&run, sink) != 0) {
				d = DISPATCH_FAILED;
				break;
			}
			d = p[0] == '+' ? DISPATCH_CONTINUATION :
			    DISPATCH_TAGGED;
			break;
		}
		if (start) {
			size_t whole = 0;

			if (sink != NULL && sink->whole_max > 0 &&
			    (whole = response_extent(&be->sc, p, n)) == 0 &&
			    n < sink->whole_max && n < io->cap)
				break;	/* the rest of the response is to come */
			be->dropping = 0;
			if (untagged_start(be, sink, &run, p, whole > 0 ? whole :
			    k) != 0) {
				d = DISPATCH_FAILED;
				break;
			}
			if (be->dropping && whole > 0) {
				resp_scan(&be->sc, p, whole);
				iobuf_consume(io, whole);
				continue;
			}
		}
		if (deliver(be, sink, &run, p, k) != 0) {
			d = DISPATCH_FAILED;
			break;
		}
		resp_scan(&be->sc, p, k);
		if (start && is_status_line(p, k))
			resp_scan_text_line(&be->sc);
		iobuf_consume(io, k);
	}
	if (sink != NULL && sink->out != NULL && run_flush(&run, sink) != 0)
		d = DISPATCH_FAILED;
	return d;
}

/*
 * Where the next piece of a command ends: after the CRLF of a
 * synchronizing literal announcement (*data then holds its size), or at
 * the end.  The piece starts with *data bytes of the previous one's
 * literal.  Literal data is skipped, so bytes inside a literal (a
 * message's) are never taken for an announcement.
 */
static const char *
next_sync_literal(const char *p, const char *end, uint64_t *data)
{
	const char *line, *lf;
	enum literal_kind k;
	uint64_t n;

	p = (uint64_t)(end - p) < *data ? end : p + *data;
	*data = 0;
	line = p;
	while ((lf = memchr(p, '\n', (size_t)(end - p))) != NULL) {
		const char *this_line = line;

		line = p = lf + 1;
		if (lf == this_line || lf[-1] != '\r')
			continue;
		k = literal_at_end(this_line, (size_t)(lf - 1 - this_line), &n);
		if (k == LIT_SYNC) {
			*data = n;
			return p;
		}
		if (k == LIT_NONSYNC)
			line = p = (uint64_t)(end - p) < n ? end : p + n;
	}
	return end;
}

/*
 * Read to the tagged answer to tag, sending what is left of the command
 * (from p to end, starting with data bytes of a literal) a piece at a
 * time, as the back-end says "+" to each synchronizing literal.  A "+" with nothing left to send goes to
 * sink->continuation, or, without one, ends the wait as REPLY_PLUS.
 * Tagged answers to other tags (a pipelined ID's) are passed over.
 */
static enum reply_status
await_answer(struct backend *be, const struct config *cfg, const char *tag,
    const char *p, const char *end, uint64_t data,
    const struct resp_sink *sink, struct reply *r)
{
	for (;;) {
		enum dispatch d = backend_dispatch(be, sink, r);
		const char *piece;
		enum io_status st;

		if (d == DISPATCH_TAGGED && reply_is(r, tag))
			return r->status;
		if (d == DISPATCH_TAGGED && be->id_tag[0] != '\0' &&
		    reply_is(r, be->id_tag))
			be->id_tag[0] = '\0';	/* the pipelined ID's */
		if (d == DISPATCH_CONTINUATION && p < end) {
			piece = next_sync_literal(p, end, &data);
			be->io.deadline = deadline_in(cfg->backend_timeout);
			if (iobuf_write(&be->io, p, (size_t)(piece - p)) !=
			    IO_OK)
				return reply_lost(be, r, "connection lost "
				    "sending a literal");
			p = piece;
		} else if (d == DISPATCH_CONTINUATION && (sink == NULL ||
		    sink->continuation == NULL)) {
			r->status = REPLY_PLUS;
			return REPLY_PLUS;
		} else if (d == DISPATCH_CONTINUATION && sink->continuation(
		    sink->ctx, be, r->line, r->len) != 0)
			return reply_lost(be, r, "connection lost answering "
			    "a challenge");
		else if (d == DISPATCH_FAILED) {
			reply_lost(be, r, "the sink could not write");
			r->status = REPLY_LOST;
			r->sink_failed = 1;
			return REPLY_LOST;
		}
		else if (d == DISPATCH_TOOLONG)
			return reply_lost(be, r, "a response line longer than "
			    "imapfe reads");
		else if (d == DISPATCH_MORE) {
			be->io.deadline = deadline_in(cfg->backend_timeout);
			if ((st = iobuf_fill(&be->io)) != IO_OK)
				return reply_lost(be, r, st == IO_TIMEOUT ?
				    "timed out" : "connection lost");
		}
	}
}

/*
 * Run a command on a back-end and read to its tagged answer: the one
 * "send a command, read to its tagged reply" of imapfe.  cmd is whole,
 * CRLF and all, and may hold synchronizing literals, each of which waits
 * for the back-end's "+".  Untagged responses go to sink; a "+" that no
 * literal waits for goes to sink->continuation, which answers it.
 * Returns the answer's status; r holds it, typed, with a sanitized copy
 * for logs.
 */
enum reply_status
backend_command(struct backend *be, const struct config *cfg,
    const struct str *cmd, const char *tag, const struct resp_sink *sink,
    struct reply *r)
{
	const char *end = cmd->s + cmd->len;
	uint64_t data = 0;
	const char *piece = next_sync_literal(cmd->s, end, &data);

	free(be->bye);
	be->bye = NULL;
	be->io.deadline = deadline_in(cfg->backend_timeout);
	if (iobuf_write(&be->io, cmd->s, (size_t)(piece - cmd->s)) != IO_OK)
		return reply_lost(be, r, "connection lost sending a command");
	return await_answer(be, cfg, tag, piece, end, data, sink, r);
}

/* The answer to a command sent already, or its "+" (REPLY_PLUS). */
enum reply_status
backend_await(struct backend *be, const struct config *cfg, const char *tag,
    const struct resp_sink *sink, struct reply *r)
{
	return await_answer(be, cfg, tag, NULL, NULL, 0, sink, r);
}

/* A command of imapfe's own, without literals: "TAG text\r\n". */
enum reply_status
backend_simple(struct backend *be, const struct config *cfg,
    const char *text, const struct resp_sink *sink, struct reply *r)
{
	struct str cmd = { 0 };
	const char *tag = backend_next_tag(be);
	enum reply_status rs;

	if (str_printf(&cmd, "%s %s\r\n", tag, text) != 0)
		return reply_lost(be, r, "out of memory");
	rs = backend_command(be, cfg, &cmd, tag, sink, r);
	str_free(&cmd);
	return rs;
}

static enum login_result
run_capability(struct backend *be, const struct config *cfg, char *why,
    size_t whylen)
{
	struct reply r;

	if (backend_simple(be, cfg, "CAPABILITY", NULL, &r) != REPLY_OK ||
	    be->caps == NULL) {
		snprintf(why, whylen, "%s", r.why);
		return LOGIN_UNAVAILABLE;
	}
	return LOGIN_OK;
}

/*
 * How a refused login is reported to the client: a refused credential is
 * the user's failure; anything else (the server is in trouble, or will
 * not have us) is the service's, and a referral is followed.
 */
static enum login_result
login_outcome(const struct reply *r, char *why, size_t whylen)
{
	if (r->status == REPLY_OK)
		return LOGIN_OK;
	snprintf(why, whylen, "server said: %s", r->why);
	if (r->code == CODE_REFERRAL)
		return LOGIN_REFERRAL;
	if (r->status != REPLY_NO)
		return LOGIN_UNAVAILABLE;
	switch (r->code) {
	case CODE_UNAVAILABLE:
	case CODE_SERVERBUG:
	case CODE_INUSE:
	case CODE_LIMIT:
	case CODE_AUTHORIZATIONFAILED:
	case CODE_CONTACTADMIN:
		return LOGIN_UNAVAILABLE;
	default:
		return LOGIN_BADCREDS;
	}
}

/* The LOGIN command, for back-ends that offer no usable SASL mechanism. */
static enum login_result
login_command(struct backend *be, const struct config *cfg,
    const struct credentials *cr, struct reply *r, char *why, size_t whylen)
{
	struct str cmd = { 0 };
	const char *tag = backend_next_tag(be);
	int plus = caps_has(be->caps, "LITERAL+");
	int minus = caps_has(be->caps, "LITERAL-");
	enum login_result res;

	if (str_printf(&cmd, "%s LOGIN ", tag) != 0 ||
	    imap_append_string(&cmd, cr->user, cr->user_len,
	    plus || (minus && cr->user_len <= 4096)) < 0 ||
	    str_add(&cmd, " ", 1) != 0 ||
	    imap_append_string(&cmd, cr->pass, cr->pass_len,
	    plus || (minus && cr->pass_len <= 4096)) < 0 ||
	    str_add(&cmd, "\r\n", 2) != 0) {
		snprintf(why, whylen, "cannot compose LOGIN");
		str_free(&cmd);
		return LOGIN_UNAVAILABLE;
	}
	backend_command(be, cfg, &cmd, tag, NULL, r);
	str_free(&cmd);		/* wipes the password */
	res = login_outcome(r, why, whylen);
	if (res == LOGIN_OK)
		snprintf(why, whylen, "%s", r->why);
	return res;
}

/* What a SASL exchange's continuations need. */
struct sasl_run {
	struct sasl_client	*client;
	const struct config	*cfg;
	char			 why[160];	/* set when imapfe cancelled */
};

/* The back-end's challenge: answered, or cancelled with "*". */
static int
sasl_challenge(void *ctx, struct backend *be, const char *line, size_t len)
{
	struct sasl_run *run = ctx;
	struct str answer = { 0 };
	size_t skip = len > 1 ? 2 : 1;		/* "+ " */
	enum io_status st;

	if (sasl_client_answer(run->client, line + skip, len - skip, &answer,
	    run->why, sizeof(run->why)) != 0) {
		str_wipe(&answer);
		str_adds(&answer, "*\r\n");
	}
	be->io.deadline = deadline_in(run->cfg->backend_timeout);
	st = iobuf_write(&be->io, answer.s, answer.len);
	str_free(&answer);		/* wipes the response */
	return st == IO_OK ? 0 : -1;
}

/*
 * AUTHENTICATE with one mechanism, the command and its initial response
 * in one write.  Returns -1 when libsasl2 has no plugin for mech, so the
 * caller tries the next; otherwise 0 and the outcome in *res.
 */
static int
authenticate_mech(struct backend *be, const struct config *cfg,
    const struct credentials *cr, const char *mech, struct reply *r,
    enum login_result *res, char *why, size_t whylen)
{
	struct sasl_run run = { .cfg = cfg };
	struct resp_sink sink = { .continuation = sasl_challenge,
	    .ctx = &run };
	struct str cmd = { 0 };
	const char *tag = backend_next_tag(be);
	enum sasl_begin b;

	*res = LOGIN_UNAVAILABLE;
	if (str_printf(&cmd, "%s AUTHENTICATE ", tag) != 0) {
		snprintf(why, whylen, "out of memory");
		return 0;
	}
	b = sasl_client_begin(&run.client, be->host, cr, mech,
	    caps_has(be->caps, "SASL-IR"), &cmd);
	if (b == SASL_BEGIN_NOMECH) {
		str_free(&cmd);
		return -1;
	}
	if (b == SASL_BEGIN_OK && str_add(&cmd, "\r\n", 2) == 0) {
		backend_command(be, cfg, &cmd, tag, &sink, r);
		*res = login_outcome(r, why, whylen);
		if (run.why[0] != '\0')
			snprintf(why, whylen, "%s", run.why);
		else if (*res == LOGIN_OK &&
		    !sasl_client_complete(run.client)) {
			snprintf(why, whylen, "server said OK before the "
			    "exchange completed: %s", r->why);
			*res = LOGIN_UNAVAILABLE;
		} else if (*res == LOGIN_OK)
			snprintf(why, whylen, "%s", r->why);
	} else
		snprintf(why, whylen, "SASL client set-up failed");
	str_free(&cmd);
	sasl_client_end(run.client);
	return 0;
}

/* What a bearer login's continuations need. */
struct bearer_run {
	const struct config	*cfg;
	const struct credentials *cr;
	struct str		*initial;	/* without SASL-IR: its line */
	struct login_relay	*relay;
	int			 challenged;	/* the error challenge came */
};

/*
 * The back-end's "+": the message, where SASL-IR did not carry it; then
 * the error challenge, answered by the client through the relay or with
 * the mechanism's dummy reply (\x01 for OAUTHBEARER, empty for XOAUTH2);
 * anything more is cancelled.
 */
static int
bearer_continuation(void *ctx, struct backend *be, const char *line,
    size_t len)
{
	struct bearer_run *run = ctx;
	struct str answer = { 0 };
	size_t skip = len > 1 ? 2 : 1;		/* "+ " */
	enum io_status st;
	int rc = 0;

	if (run->initial != NULL) {
		rc = str_add(&answer, run->initial->s, run->initial->len);
		run->initial = NULL;
	} else if (run->challenged)
		rc = str_adds(&answer, "*\r\n");
	else if (run->relay != NULL) {
		run->challenged = 1;
		if (run->relay->challenge(run->relay->ctx, line + skip,
		    len - skip, &answer) != 0) {
			str_wipe(&answer);
			rc = str_adds(&answer, "*\r\n");
		}
	} else {
		run->challenged = 1;
		rc = str_adds(&answer, run->cr->kind == CRED_OAUTHBEARER ?
		    "AQ==\r\n" : "\r\n");
	}
	be->io.deadline = deadline_in(run->cfg->backend_timeout);
	st = rc == 0 ? iobuf_write(&be->io, answer.s, answer.len) : IO_NOMEM;
	str_free(&answer);		/* wipes a message or a reply */
	return st == IO_OK ? 0 : -1;
}

/*
 * The client's bearer token, to the back-end with the client's mechanism:
 * a token is good for no other, and the back-end alone can check it.
 * With SASL-IR the message goes with the command, else after its "+".
 */
static enum login_result
authenticate_bearer(struct backend *be, const struct config *cfg,
    const struct credentials *cr, struct login_relay *relay,
    struct reply *r, char *why, size_t whylen)
{
	const char *mech = bearer_mech_name(cr->kind), *tag;
	struct str msg = { 0 }, cmd = { 0 };
	struct bearer_run run = { .cfg = cfg, .cr = cr, .relay = relay };
	struct resp_sink sink = { .continuation = bearer_continuation,
	    .ctx = &run };
	int sasl_ir = caps_has(be->caps, "SASL-IR");
	char cap[32];

	snprintf(cap, sizeof(cap), "AUTH=%s", mech);
	if (!caps_has(be->caps, cap)) {
		snprintf(why, whylen, "the back-end does not offer %s", cap);
		return LOGIN_UNAVAILABLE;
	}
	tag = backend_next_tag(be);
	if (str_printf(&cmd, "%s AUTHENTICATE %s%s", tag, mech,
	    sasl_ir ? " " : "\r\n") != 0 ||
	    bearer_response(cr, be->host, be->port, sasl_ir ? &cmd : &msg) !=
	    0 || str_add(sasl_ir ? &cmd : &msg, "\r\n", 2) != 0) {
		str_free(&msg);
		str_free(&cmd);
		snprintf(why, whylen, "out of memory");
		return LOGIN_UNAVAILABLE;
	}
	run.initial = sasl_ir ? NULL : &msg;
	backend_command(be, cfg, &cmd, tag, &sink, r);
	str_free(&msg);		/* both wipe the token */
	str_free(&cmd);
	return login_outcome(r, why, whylen);
}

/*
 * Log in with the first mechanism of backend_mechanisms that the back-end
 * offers and libsasl2 has; with none, the LOGIN command, where allowed.
 * A bearer token goes with its own mechanism.
 */
static enum login_result
authenticate_masked(struct backend *be, const struct config *cfg,
    const struct credentials *cr, struct login_relay *relay,
    struct reply *r, char *why, size_t whylen)
{
	char *list, *mech, *save = NULL, cap[64];
	enum login_result res;

	if (cr->kind != CRED_PASSWORD)
		return authenticate_bearer(be, cfg, cr, relay, r, why, whylen);
	if ((list = strdup(cfg->backend_mechanisms)) == NULL) {
		snprintf(why, whylen, "out of memory");
		return LOGIN_UNAVAILABLE;
	}
	for (mech = strtok_r(list, " ,", &save); mech != NULL;
	    mech = strtok_r(NULL, " ,", &save)) {
		snprintf(cap, sizeof(cap), "AUTH=%s", mech);
		if (caps_has(be->caps, cap) && authenticate_mech(be, cfg, cr,
		    mech, r, &res, why, whylen) == 0) {
			free(list);
			return res;
		}
	}
	free(list);
	if (cr->authzid != NULL) {
		snprintf(why, whylen, "no SASL mechanism in common that can "
		    "carry an authorization identity (backend_mechanisms)");
		return LOGIN_UNAVAILABLE;
	}
	if (caps_has(be->caps, "LOGINDISABLED")) {
		snprintf(why, whylen, "no authentication mechanism in common "
		    "and LOGIN disabled");
		return LOGIN_UNAVAILABLE;
	}
	return login_command(be, cfg, cr, r, why, whylen);
}

/* Log in; under -D the trace hides everything imapfe sends meanwhile. */
static enum login_result
authenticate(struct backend *be, const struct config *cfg,
    const struct credentials *cr, struct login_relay *relay, struct reply *r,
    char *why, size_t whylen)
{
	enum login_result res;

	be->io.trace_secret = 1;	/* until the login's answer is read */
	res = authenticate_masked(be, cfg, cr, relay, r, why, whylen);
	be->io.trace_secret = 0;
	return res;
}

/* ------------------------------------------------------------------ */
/* the login conversation */

static enum login_result
read_greeting(struct backend *be, const struct config *cfg, struct reply *r,
    char *why, size_t whylen)
{
	struct status_resp st;
	enum io_status ios;
	size_t len;
	char *line;

	be->io.deadline = deadline_in(cfg->backend_timeout);
	if ((ios = iobuf_getline(&be->io, MAX_BACKEND_LINE, &line, &len)) !=
	    IO_OK) {
		snprintf(why, whylen, "no greeting%s", ios == IO_TIMEOUT ?
		    " within backend_timeout" : "");
		if (ios == IO_TIMEOUT)
			server_down(cfg, be->host, be->port, 1);
		return LOGIN_UNAVAILABLE;
	}
	if (status_parse(line, len, "*", &st) != 0 || st.kind != RESP_OK) {
		reply_set(r, line, len);
		snprintf(why, whylen, "unexpected greeting: %s", r->why);
		return st.code == CODE_REFERRAL && st.kind == RESP_BYE ?
		    LOGIN_REFERRAL : LOGIN_UNAVAILABLE;
	}
	if (memmem(line, len, IMAPFE_GREETING_MARK,
	    strlen(IMAPFE_GREETING_MARK)) != NULL) {
		snprintf(why, whylen, "the back-end is imapfe itself: "
		    "configuration loop");
		return LOGIN_LOOP;
	}
	backend_note_caps(be, line, len);
	return LOGIN_OK;
}

/* The TLS handshake with the back-end, certificate verified. */
static enum login_result
start_tls(struct backend *be, const struct config *cfg, const struct route *r,
    char *why, size_t whylen)
{
	char err[200];
	SSL *ssl;

	if ((ssl = tls_backend_ssl(cfg, r, err, sizeof(err))) == NULL) {
		snprintf(why, whylen, "TLS set-up: %s", err);
		return LOGIN_UNAVAILABLE;
	}
	be->io.deadline = deadline_in(cfg->backend_timeout);
	if (iobuf_tls_handshake(&be->io, ssl, 0) != IO_OK) {
		snprintf(why, whylen, "TLS: %s", be->io.tls_why);
		return LOGIN_UNAVAILABLE;
	}
	return LOGIN_OK;
}

/*
 * STARTTLS towards the back-end.  A back-end that does not offer it is
 * refused rather than used in the clear, and anything it sends after its
 * OK and before the handshake (a response-injection attempt) ends the
 * attempt.  What it said about itself before TLS is forgotten.
 */
static enum login_result
backend_starttls(struct backend *be, const struct config *cfg,
    const struct route *r, char *why, size_t whylen)
{
	struct reply rep;
	enum login_result res;

	if (be->caps == NULL &&
	    (res = run_capability(be, cfg, why, whylen)) != LOGIN_OK)
		return res;
	if (!caps_has(be->caps, "STARTTLS")) {
		snprintf(why, whylen, "the back-end does not offer STARTTLS");
		return LOGIN_UNAVAILABLE;
	}
	if (backend_simple(be, cfg, "STARTTLS", NULL, &rep) != REPLY_OK) {
		snprintf(why, whylen, "STARTTLS refused: %s", rep.why);
		return LOGIN_UNAVAILABLE;
	}
	if (iobuf_pending(&be->io) > 0) {
		snprintf(why, whylen, "the back-end sent data after its "
		    "STARTTLS reply");
		return LOGIN_UNAVAILABLE;
	}
	free(be->caps);
	be->caps = NULL;
	if ((res = start_tls(be, cfg, r, why, whylen)) != LOGIN_OK)
		return res;
	return run_capability(be, cfg, why, whylen);
}

/* One "field" "value" pair of an ID list, after "(" or a space. */
static int
id_pair(struct str *s, const char *field, const char *value)
{
	return (s->s[s->len - 1] != '(' && str_add(s, " ", 1) != 0) ||
	    imap_append_string(s, field, strlen(field), 0) < 0 ||
	    str_add(s, " ", 1) != 0 ||
	    imap_append_string(s, value, strlen(value), 0) < 0 ? -1 : 0;
}

/*
 * ID before login: who the client really is (a back-end on a trusted
 * network logs and limits by it), and how many proxy hops remain.  The
 * answer does not matter (a back-end that refuses ID still gets a login),
 * so it is not awaited: the ID is corked and leaves with the login command
 * in one segment, and the login's reader passes over its answer.  Only an
 * ID with a synchronizing literal (a client's non-ASCII value) waits, as
 * its "+" would otherwise be taken for the login's.
 */
static enum login_result
send_id(struct backend *be, const struct config *cfg,
    const struct client_info *ci, char *why, size_t whylen)
{
	struct str cmd = { 0 };
	const char *tag = backend_next_tag(be);
	uint64_t data = 0;
	char ttl[16];
	int rc;

	snprintf(ttl, sizeof(ttl), "%d", ci->ttl - 1);	/* one hop: us */
	rc = str_printf(&cmd, "%s ID (", tag) != 0 ||
	    (ci->ip[0] && id_pair(&cmd, "x-originating-ip", ci->ip) != 0) ||
	    (ci->port[0] && id_pair(&cmd, "x-originating-port", ci->port)) ||
	    (ci->local_ip[0] && id_pair(&cmd, "x-connected-ip", ci->local_ip)) ||
	    (ci->local_port[0] && id_pair(&cmd, "x-connected-port",
	    ci->local_port) != 0) ||
	    id_pair(&cmd, "x-session-id", ci->session) != 0 ||
	    id_pair(&cmd, "x-proxy-ttl", ttl) != 0 ||
	    (ci->id_fields.len > 0 && (str_add(&cmd, " ", 1) != 0 ||
	    str_add(&cmd, ci->id_fields.s, ci->id_fields.len) != 0)) ||
	    str_add(&cmd, ")\r\n", 3) != 0;
	if (rc == 0 && next_sync_literal(cmd.s, cmd.s + cmd.len, &data) !=
	    cmd.s + cmd.len) {
		struct reply rep;

		rc = backend_command(be, cfg, &cmd, tag, NULL, &rep) >=
		    REPLY_BYE;
		str_free(&cmd);
		if (rc != 0)
			snprintf(why, whylen, "no answer to ID");
		return rc != 0 ? LOGIN_UNAVAILABLE : LOGIN_OK;
	}
	if (rc == 0) {
		be->io.deadline = deadline_in(cfg->backend_timeout);
		iobuf_cork(&be->io);
		snprintf(be->id_tag, sizeof(be->id_tag), "%s", tag);
		rc = iobuf_write(&be->io, cmd.s, cmd.len) != IO_OK;
	}
	str_free(&cmd);
	if (rc != 0) {
		snprintf(why, whylen, "connection lost sending ID");
		return LOGIN_UNAVAILABLE;
	}
	return LOGIN_OK;
}

void
backend_close(struct backend *be)
{
	iobuf_tls_close(&be->io);
	iobuf_free(&be->io);
	if (be->io.rfd >= 0)
		close(be->io.rfd);
	free(be->host);
	free(be->port);
	free(be->caps);
	free(be->bye);
	memset(be, 0, sizeof(*be));
	be->io.rfd = be->io.wfd = -1;
}

/*
 * Connect to the route's back-end and log in as the user.  On LOGIN_OK the
 * backend is ready for relaying with be->caps holding its post-login
 * capabilities; on failure everything the attempt held is released, and r
 * holds the back-end's last answer (a referral's URL, a response code).
 */
static enum login_result
backend_open(struct backend *be, const struct config *cfg,
    const struct route *r, const struct credentials *cr,
    const struct client_info *ci, struct login_relay *relay,
    struct reply *rep, char *why, size_t whylen)
{
	enum login_result res = LOGIN_UNAVAILABLE;
	unsigned seq;
	int fd;

	memset(be, 0, sizeof(*be));
	be->io.rfd = be->io.wfd = -1;
	rep->status = REPLY_LOST;
	rep->code = CODE_NONE;
	rep->len = rep->tag_len = 0;
	rep->line[0] = '\0';
	if ((be->host = strdup(r->host)) == NULL ||
	    (be->port = strdup(r->port)) == NULL)
		snprintf(why, whylen, "out of memory");
	else if ((fd = backend_connect(r, cfg, why, whylen)) < 0)
		;
	else if (iobuf_init(&be->io, fd, fd, BACKEND_BUFSIZE) != 0) {
		close(fd);
		snprintf(why, whylen, "out of memory");
	} else
		res = LOGIN_OK;
	if (res != LOGIN_OK) {
		backend_close(be);
		return res;
	}
	be->io.trace_name = be->host;
	resp_scanner_init(&be->sc);
	res = r->tls == TLS_IMPLICIT ? start_tls(be, cfg, r, why, whylen) :
	    LOGIN_OK;
	if (res == LOGIN_OK)
		res = read_greeting(be, cfg, rep, why, whylen);
	if (res == LOGIN_OK)
		server_up(cfg, r->host, r->port);
	if (res == LOGIN_OK && r->tls == TLS_STARTTLS)
		res = backend_starttls(be, cfg, r, why, whylen);
	if (res == LOGIN_OK && be->caps == NULL)
		res = run_capability(be, cfg, why, whylen);
	if (res == LOGIN_OK && ci != NULL && cfg->forward_id &&
	    caps_has(be->caps, "ID"))
		res = send_id(be, cfg, ci, why, whylen);
	seq = be->caps_seq;
	if (res == LOGIN_OK)
		res = authenticate(be, cfg, cr, relay, rep, why, whylen);
	/* Servers may widen their capabilities after login; ask if unsaid. */
	if (res == LOGIN_OK && be->caps_seq == seq) {
		char text[160];

		res = run_capability(be, cfg, text, sizeof(text));
		if (res != LOGIN_OK)
			snprintf(why, whylen, "CAPABILITY after login: %s", text);
	}
	if (res != LOGIN_OK)
		backend_close(be);
	return res;
}

/* In proxy mode a refusal is the proxy identity's, and it says so. */
static void
blame_proxy_identity(char *why, size_t whylen)
{
	static const char prefix[] = "the back-end refused the proxy "
	    "identity or its authorization (check proxy_user and the "
	    "back-end's proxy rules): ";
	size_t keep;

	if (whylen <= sizeof(prefix))
		return;
	keep = strnlen(why, whylen - sizeof(prefix));
	memmove(why + sizeof(prefix) - 1, why, keep);
	memcpy(why, prefix, sizeof(prefix) - 1);
	why[sizeof(prefix) - 1 + keep] = '\0';
}

/*
 * Log in to a back-end for the user: with the client's own credentials
 * (passthrough), or as the proxy identity acting for the client (proxy).
 * In proxy mode the client is already authenticated, so a refusal is the
 * service's fault, never the user's.
 */
static enum login_result
backend_open_as(struct backend *be, const struct config *cfg,
    const struct route *r, const struct credentials *user,
    const struct client_info *ci, struct login_relay *relay,
    struct reply *rep, char *why, size_t whylen)
{
	struct credentials proxy = { 0 };
	enum login_result res;

	if (cfg->auth != AUTH_PROXY)
		return backend_open(be, cfg, r, user, ci, relay, rep, why,
		    whylen);
	if (credentials_set(&proxy, cfg->proxy->user, cfg->proxy->user_len,
	    cfg->proxy->pass, cfg->proxy->pass_len) != 0 ||
	    credentials_set_authzid(&proxy, user->user) != 0) {
		credentials_clear(&proxy);
		snprintf(why, whylen, "out of memory");
		return LOGIN_UNAVAILABLE;
	}
	res = backend_open(be, cfg, r, &proxy, ci, NULL, rep, why, whylen);
	credentials_clear(&proxy);
	if (res == LOGIN_BADCREDS || (res == LOGIN_UNAVAILABLE &&
	    rep->code == CODE_AUTHORIZATIONFAILED))
		blame_proxy_identity(why, whylen);
	if (res == LOGIN_BADCREDS)
		res = LOGIN_UNAVAILABLE;
	return res;
}

/*
 * The configured server that a referral in a back-end's answer (text)
 * points to.  NULL when there is no referral, or one imapfe must not
 * follow: that is logged, and the answer's URL never is (it may name
 * users), only the server it points to.
 */
const struct route *
referral_target(const struct config *cfg, const char *text,
    struct referral *ref, const char *user)
{
	const struct route *r;
	int rc = referral_parse(text, ref);

	if (rc == -1)
		return NULL;
	if (rc == -2)
		log_msg(LOG_WARNING, "event=referral-refused user=\"%s\" "
		    "reason=\"not an IMAP URL imapfe can follow\"", user);
	else if ((r = listed_server(cfg, ref->host, ref->port)) == NULL)
		referral_refused(user, ref, "not a configured server");
	else if (cfg->referral_hops == 0)
		referral_refused(user, ref, "referral_hops is 0");
	else
		return r;
	return NULL;
}

void
referral_refused(const char *user, const struct referral *ref,
    const char *why)
{
	log_msg(LOG_WARNING, "event=referral-refused user=\"%s\" target=%s:%s "
	    "reason=\"%s\"", user, ref->host, ref->port, why);
}

/*
 * May a referral to next be followed, after hops referrals in a row
 * through tried[0 .. hops]?  Not to a server already tried, nor past
 * referral_hops; a refusal is logged.
 */
int
referral_allowed(const struct config *cfg, const struct route *const *tried,
    int hops, const struct route *next, const struct referral *ref,
    const char *user)
{
	char why[32];

	for (int k = 0; k <= hops; k++)
		if (tried[k] == next) {
			referral_refused(user, ref, "loop");
			return 0;
		}
	if (hops < cfg->referral_hops)
		return 1;
	snprintf(why, sizeof(why), "more than %d hops", hops);
	referral_refused(user, ref, why);
	return 0;
}

/* FNV-1a: the same number for a name in every process, for order=hash. */
static size_t
name_hash(const char *s)
{
	uint32_t h = 2166136261u;

	for (; *s != '\0'; s++)
		h = (h ^ (unsigned char)*s) * 16777619u;
	return h;
}

/*
 * The servers of one line in turn (a replicated pair, say), from the
 * first or, with order=hash, from the user's own, so that a user stays
 * on one server while it is up.  The next is tried only when one is
 * unavailable (down, marked down, failing TLS or its greeting), never
 * after it refused the credentials: that would try a guess twice.
 */
static enum login_result
backend_open_any(struct backend *be, const struct config *cfg,
    const struct route *first, const struct credentials *user,
    const struct client_info *ci, struct login_relay *relay,
    struct reply *rep, const char *who, char *why, size_t whylen)
{
	const struct route *r;
	enum login_result res = LOGIN_UNAVAILABLE;
	size_t n = 0, start = 0;

	for (r = first; r != NULL; r = r->alt)
		n++;
	if (first->hash_order && user->user != NULL)
		start = name_hash(user->user) % n;
	for (size_t i = 0; i < n; i++) {
		int64_t down_ms;

		r = first;
		for (size_t k = (start + i) % n; k > 0; k--)
			r = r->alt;
		if (!state_backend_may_try(cfg->state, cfg, r->host, r->port,
		    i + 1 == n, &down_ms)) {
			snprintf(why, whylen, "marked down (refused or timed out "
			    "%lld ms ago; backend_down_time)",
			    (long long)down_ms);
			res = LOGIN_UNAVAILABLE;
		} else
			res = backend_open_as(be, cfg, r, user, ci, relay, rep,
			    why, whylen);
		if (res != LOGIN_UNAVAILABLE || i + 1 == n)
			break;
		log_msg(LOG_WARNING, "event=failover user=\"%s\" from=%s:%s "
		    "reason=\"%s\"", who, r->host, r->port, why);
	}
	return res;
}

/*
 * Log in as backend_open_as does, following login referrals (RFC 2221:
 * "NO [REFERRAL imap://...]" to the login, or "* BYE [REFERRAL ...]" as
 * the greeting) to configured servers, at most referral_hops in a row
 * and never to a server already tried.  A referral not followed fails
 * the login as UNAVAILABLE: the user exists, just not here.
 */
enum login_result
backend_login(struct backend *be, const struct config *cfg,
    const struct route *r, const struct credentials *user,
    const struct client_info *ci, const char *who, char *why, size_t whylen)
{
	return backend_login_relayed(be, cfg, r, user, ci, who, NULL, why,
	    whylen);
}

/*
 * The back-end's own refusal of a bearer token (its NO or BAD, a
 * referral's excepted, which imapfe follows or refuses itself), kept for
 * the client, which hears it as given.
 */
static void
keep_refusal(struct login_relay *relay, const struct reply *rep,
    enum login_result res)
{
	relay->refused = (res == LOGIN_BADCREDS || res == LOGIN_UNAVAILABLE) &&
	    (rep->status == REPLY_NO || rep->status == REPLY_BAD) &&
	    rep->code != CODE_REFERRAL && !rep->truncated &&
	    rep->tag_len > 0 && rep->tag_len < rep->len && rep->line[0] != '*';
	if (relay->refused)
		relay->refusal = *rep;
}

/*
 * backend_login, with the client on hand for a bearer login's error
 * exchange (relay, when not NULL).
 */
enum login_result
backend_login_relayed(struct backend *be, const struct config *cfg,
    const struct route *r, const struct credentials *user,
    const struct client_info *ci, const char *who, struct login_relay *relay,
    char *why, size_t whylen)
{
	const struct route *tried[REFERRAL_HOPS_MAX + 1] = { r };
	struct referral ref;
	struct reply *rep = malloc(sizeof(*rep));
	enum login_result res;
	int hops = 0;

	if (rep == NULL) {
		snprintf(why, whylen, "out of memory");
		return LOGIN_UNAVAILABLE;
	}
	for (;;) {
		const struct route *next;

		res = backend_open_any(be, cfg, r, user, ci, relay, rep, who,
		    why, whylen);
		if (res != LOGIN_REFERRAL)
			break;
		/* why the referral was not followed is logged already */
		if ((next = referral_target(cfg, rep->line, &ref, who)) ==
		    NULL ||
		    !referral_allowed(cfg, tried, hops, next, &ref, who)) {
			snprintf(why, whylen, "login referral not followed");
			res = LOGIN_UNAVAILABLE;
			break;
		}
		log_msg(LOG_INFO, "event=referral kind=login user=\"%s\" "
		    "from=%s:%s to=%s:%s", who, r->host, r->port, next->host,
		    next->port);
		tried[++hops] = r = next;
	}
	if (relay != NULL)
		keep_refusal(relay, rep, res);
	free(rep);
	return res;
}
