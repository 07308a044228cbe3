/*
 * The command router, used after login when public-folder servers are
 * configured.  Each client command is read at the grammar level and sent
 * to the back-end that owns the mailbox it names; responses are streamed
 * back, literals included, never buffered whole.  Commands run one at a
 * time: a pipelined command waits (in the client's socket) until the one
 * before it is answered, so no command can reach the wrong back-end.
 *
 * The home back-end (from "route") is link 0; public-folder servers are
 * opened on first use, and a failed one is left alone for public_holddown
 * seconds.  A failure of a public server costs the command that needed it
 * a NO [UNAVAILABLE], never the session.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include "imapfe.h"

#define TAG_MAX			64
#define SMALL_LITERAL_MAX	65536		/* buffered; larger: streamed */
#define BUFFERED_COMMAND_MAX	(1024 * 1024)
#define MAX_PIECES		1024		/* literals in one command */
#define REFERRAL_LINKS_MAX	4		/* servers reached by referral */

/* Where a link's response stream is: line starts, literals. */
struct scan {
	int		 at_line_start;
	uint64_t	 literal_left;
	char		 tail[32];	/* the end of the current line */
	size_t		 tail_len;
	int		 saw_bye;
};

/* What a LIST over several servers learnt of a public prefix's root. */
enum root_seen {
	ROOT_UNASKED,		/* its server has not answered this LIST */
	ROOT_MISSING,		/* it answered without listing the root */
	ROOT_LISTED
};

struct link {
	int64_t		 last_used;	/* for keepalives */
	const struct route *route;	/* NULL for the home back-end */
	const struct route *conf;	/* its public (or server) line */
	struct route	 found;		/* what the directory named for it */
	int		 public;	/* a public line's, not a referral's */
	struct backend	*be;		/* home: the session's; else &own */
	struct backend	 own;
	int		 up;
	int64_t		 retry_after;	/* hold-down after a failure */
	struct scan	 sc;
	enum root_seen	 root;		/* in the LIST being merged */
};

struct router {
	const struct config	*cfg;
	struct iobuf		*client;
	const struct credentials *cr;
	const struct client_info *ci;
	const char		*user;		/* sanitized, for logs */
	struct link		*links;	/* never moved: links point into it */
	int			 nlinks;
	int			 npublic;	/* links[1 .. npublic-1] */
	int			 maxlinks;
	int			 selected;	/* link index, or -1 */
	struct str		 cmd;		/* the command being read */
	size_t			 cuts[MAX_PIECES];	/* after each "{n}\r\n" */
	int			 ncuts;
	size_t			 send_len;	/* bytes of cmd to send */
	uint64_t		 stream_left;	/* literal to stream, if any */
	int			 stream_sync;
	char			*enabled;	/* ENABLE arguments, to replay */
	int64_t			 last_client;
	int			 merging;	/* a LIST over several servers */
	int			 selection_lost;	/* its server went away */
	enum router_end		 end;
};

/* What reading from a link produced. */
enum link_event {
	EV_MORE,		/* the buffer is used up */
	EV_TAGGED,		/* the tagged completion, in the caller's buffer */
	EV_CONTINUATION,	/* a "+" line, in the caller's buffer */
	EV_CLIENT_GONE
};

/*
 * FORWARD: untagged responses go to the client; DISCARD: nowhere;
 * FILTER_LIST: a server's LIST, LSUB and LIST-STATUS responses go only
 * for names it owns: a public server's under its prefix (it has an INBOX
 * and more of its own to hide), the home server's outside every prefix.
 */
enum mode { FORWARD, DISCARD, FILTER_LIST };

/* In FILTER_LIST mode, what becomes of one untagged response. */
enum list_verdict { LIST_KEEP, LIST_DROP, LIST_MORE };

/* ------------------------------------------------------------------ */
/* the client side */

static int
client_write(struct router *rt, const char *data, size_t len)
{
	rt->client->deadline = now_ms() + (int64_t)rt->cfg->idle_timeout *
	    1000;
	if (iobuf_write(rt->client, data, len) != IO_OK) {
		rt->end = ROUTER_CLIENT_GONE;
		return -1;
	}
	return 0;
}

static int
client_line(struct router *rt, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int
client_line(struct router *rt, const char *fmt, ...)
{
	enum io_status st;
	va_list ap;

	rt->client->deadline = now_ms() + (int64_t)rt->cfg->idle_timeout *
	    1000;
	va_start(ap, fmt);
	st = iobuf_vline(rt->client, fmt, ap);
	va_end(ap);
	if (st != IO_OK) {
		rt->end = ROUTER_CLIENT_GONE;
		return -1;
	}
	return 0;
}

/* ------------------------------------------------------------------ */
/* links */

/* A public server that failed is left alone for public_holddown. */
static void
hold_down(struct router *rt, struct link *l)
{
	l->retry_after = now_ms() + (int64_t)rt->cfg->public_holddown * 1000;
}

static void
link_init(struct link *l, const struct route *r)
{
	l->route = l->conf = r;
	l->be = &l->own;
	l->own.io.rfd = l->own.io.wfd = -1;
}

/* For logs: a public line's link, or one opened to follow a referral. */
static const char *
link_kind(const struct link *l)
{
	return l->public ? "public" : "referral";
}

static const char *
link_prefix(const struct link *l)
{
	return l->public ? l->route->pattern : "";
}

static void
link_down(struct router *rt, int i, const char *why)
{
	struct link *l = &rt->links[i];

	if (l->up)
		log_msg(LOG_ERR, "event=%s-error user=\"%s\" prefix=\"%s\" "
		    "backend=%s:%s reason=\"%s\"", link_kind(l), rt->user,
		    link_prefix(l), l->route->host, l->route->port, why);
	backend_close(l->be);
	l->up = 0;
	hold_down(rt, l);
	memset(&l->sc, 0, sizeof(l->sc));
	l->sc.at_line_start = 1;
	/* The client still thinks a mailbox is selected: keep saying why not. */
	if (rt->selected == i)
		rt->selection_lost = 1;
}

/* Send a command of imapfe's own and throw away all it brings back. */
static int
link_internal(struct router *rt, int i, const char *verb, const char *args);

/* Open public link i if it is not open and not held down. */
static int
link_up(struct router *rt, int i)
{
	struct link *l = &rt->links[i];
	char why[256];
	enum login_result res;

	if (l->up)
		return 0;
	if (now_ms() < l->retry_after)
		return -1;
	if (l->conf->from_directory &&
	    public_from_directory(rt->cfg, l->conf, &l->found, why,
	    sizeof(why)) != ROUTE_FOUND) {
		log_msg(LOG_ERR, "event=public-failed user=\"%s\" prefix=\"%s\" "
		    "reason=\"%s\" retry_in=%d", rt->user, l->conf->pattern, why,
		    rt->cfg->public_holddown);
		hold_down(rt, l);
		return -1;
	}
	if (l->conf->from_directory)
		l->route = &l->found;
	res = backend_login(l->be, rt->cfg, l->route, rt->cr, rt->ci, rt->user,
	    why, sizeof(why));
	if (res != LOGIN_OK) {
		log_msg(LOG_ERR, "event=%s-failed user=\"%s\" prefix=\"%s\" "
		    "backend=%s:%s reason=\"%s\" retry_in=%d", link_kind(l),
		    rt->user, link_prefix(l), l->route->host, l->route->port,
		    why, rt->cfg->public_holddown);
		hold_down(rt, l);
		return -1;
	}
	l->up = 1;
	l->last_used = now_ms();
	memset(&l->sc, 0, sizeof(l->sc));
	l->sc.at_line_start = 1;
	log_msg(LOG_INFO, "event=%s-login user=\"%s\" prefix=\"%s\" "
	    "backend=%s:%s", link_kind(l), rt->user, link_prefix(l),
	    l->be->host, l->be->port);
	if (rt->enabled != NULL &&
	    link_internal(rt, i, "ENABLE", rt->enabled) != 0)
		return -1;
	return 0;
}

/*
 * Does a name (or a pattern) start with INBOX as a whole level?  INBOX is
 * case-insensitive (RFC 9051 5.1), "inbox/x" included.
 */
static int
leading_inbox(const char *s, size_t len)
{
	return len >= 5 && strncasecmp(s, "INBOX", 5) == 0 &&
	    (len == 5 || !isalnum((unsigned char)s[5]));
}

/* Do the first n bytes of two names agree, a leading INBOX in any case? */
static int
name_head_equal(const char *a, size_t alen, const char *b, size_t blen,
    size_t n)
{
	int fold = leading_inbox(a, alen) && leading_inbox(b, blen);

	for (size_t i = 0; i < n; i++) {
		if (fold && i < 5 ? toupper((unsigned char)a[i]) !=
		    toupper((unsigned char)b[i]) : a[i] != b[i])
			return 0;
	}
	return 1;
}

/* The root a prefix names: "Public Folders" for "Public Folders/". */
static size_t
prefix_root_len(const char *prefix)
{
	size_t pl = strlen(prefix);

	return pl > 1 && !isalnum((unsigned char)prefix[pl - 1]) ? pl - 1 : pl;
}

/* Is name the root of prefix, the prefix without its delimiter? */
static int
name_is_root(const char *name, size_t len, const char *prefix)
{
	size_t pl = strlen(prefix), rl = prefix_root_len(prefix);

	return rl < pl && len == rl && name_head_equal(name, len, prefix, pl,
	    rl);
}

/*
 * The link that owns a mailbox name: the public prefix it is under or
 * whose root it is, the longest when prefixes nest; the home server's
 * otherwise.  A prefix belongs to its server alone.
 */
static int
mailbox_link(const struct router *rt, const char *name, size_t len)
{
	size_t best = 0;
	int owner = 0;

	for (int i = 1; i < rt->npublic; i++) {
		const char *p = rt->links[i].route->pattern;
		size_t pl = strlen(p);

		if (pl > best && ((len >= pl && name_head_equal(name, len, p,
		    pl, pl)) || name_is_root(name, len, p))) {
			best = pl;
			owner = i;
		}
	}
	return owner;
}

/* ------------------------------------------------------------------ */
/* reading a link's responses */

static int	is_mailbox_token(const struct token *);

/* Is the untagged response at p one that names a mailbox per line? */
static int
is_list_response(const char *p, size_t len)
{
	static const char *const names[] = { "* LIST ", "* LSUB ",
	    "* STATUS " };

	for (size_t i = 0; i < sizeof(names) / sizeof(*names); i++)
		if (len > strlen(names[i]) &&
		    strncasecmp(p, names[i], strlen(names[i])) == 0)
			return 1;
	return 0;
}

/*
 * The length of the response at p, its literals and final CRLF included,
 * once all of it is among the n bytes there; 0 until then.
 */
static size_t
response_length(const char *p, size_t n)
{
	size_t at = 0;

	for (;;) {
		const char *lf = memchr(p + at, '\n', n - at);
		enum literal_kind k;
		size_t end, len;
		uint64_t size;

		if (lf == NULL)
			return 0;
		end = (size_t)(lf - p) + 1;
		len = end - 1 - at;
		if (len > 0 && p[at + len - 1] == '\r')
			len--;
		k = literal_at_end(p + at, len, &size);
		if (k != LIT_SYNC && k != LIT_NONSYNC)
			return end;
		if (size > n - end)
			return 0;
		at = end + (size_t)size;
	}
}

/*
 * Copy the response at p (len bytes, without its final CRLF) for the
 * command parser: "x" for its "*", and a space between two parenthesized
 * lists where the response abuts them (NAMESPACE's "(..)(..)"), which a
 * command never does; quoted strings and literals are copied as they are.
 */
static int
untagged_copy(const char *p, size_t len, struct str *copy)
{
	size_t line = 0;
	int quoted = 0, after_rparen = 0, rc = str_adds(copy, "x");

	for (size_t i = 1; i < len && rc == 0; i++) {
		enum literal_kind k;
		uint64_t n;
		size_t ll;

		if (quoted) {
			if (p[i] == '\\' && i + 1 < len)
				rc = str_add(copy, p + i++, 1);
			else if (p[i] == '"')
				quoted = 0;
		} else if (p[i] == '"')
			quoted = 1;
		else if (p[i] == '(' && after_rparen)
			rc = str_adds(copy, " ");
		else if (p[i] == '\n') {
			ll = i - line - (i > line && p[i - 1] == '\r');
			k = literal_at_end(p + line, ll, &n);
			if ((k == LIT_SYNC || k == LIT_NONSYNC) && n < len - i) {
				rc = str_add(copy, p + i, (size_t)n + 1);
				i += (size_t)n;
				line = i + 1;
				after_rparen = 0;
				continue;
			}
		}
		after_rparen = !quoted && p[i] == ')';
		if (rc == 0)
			rc = str_add(copy, p + i, 1);
	}
	return rc;
}

/*
 * Parse the untagged response at p (len bytes, without its final CRLF)
 * with the command parser: "* LIST ..." is read as the command
 * "x LIST ...", so names come out as tokens, literals and escapes undone.
 */
static int
parse_untagged(const char *p, size_t len, struct str *copy,
    struct command *c)
{
	const char *why;

	str_wipe(copy);
	if (len < 3 || p[0] != '*' || p[1] != ' ' ||
	    untagged_copy(p, len, copy) != 0)
		return -1;
	return parse_command(copy->s, copy->len, c, &why) == PARSE_OK ? 0 : -1;
}

/* The mailbox a LIST, LSUB or STATUS response names, or NULL. */
static const struct token *
listed_mailbox(const struct command *c)
{
	size_t i = 0;

	if (strcmp(c->name, "STATUS") == 0)
		return c->ntok > 0 && is_mailbox_token(&c->tok[0]) ?
		    &c->tok[0] : NULL;
	/* "(flags) delimiter name [extended data]" */
	if (c->ntok == 0 || c->tok[0].type != TOK_LPAREN)
		return NULL;
	while (i < c->ntok && c->tok[i].type != TOK_RPAREN)
		i++;
	i += 2;
	if (i >= c->ntok || (c->tok[i - 1].type != TOK_QUOTED &&
	    c->tok[i - 1].type != TOK_NIL))
		return NULL;
	return is_mailbox_token(&c->tok[i]) ? &c->tok[i] : NULL;
}

/* Does the response naming mailbox t go to the client from link self? */
static int
listed_name_wanted(struct router *rt, int self, const struct token *t)
{
	int owner = mailbox_link(rt, t->s, t->len);
	struct link *o = &rt->links[owner];

	if (owner == 0 || !name_is_root(t->s, t->len, o->route->pattern))
		return owner == self;
	/*
	 * The root of a prefix ("Public Folders", \Noselect on most servers)
	 * is its server's to list, with that server's flags; the home
	 * server's copy goes only where that server answered without one.
	 */
	if (owner == self) {
		o->root = ROOT_LISTED;
		return 1;
	}
	return self == 0 && o->root == ROOT_MISSING;
}

/*
 * In FILTER_LIST mode, the verdict on the untagged response at p (n bytes
 * buffered): a LIST, LSUB or LIST-STATUS response is judged whole, a name
 * sent as a literal too, and *whole is its length.  Anything else, or a
 * response too long to hold, goes to the client.
 */
static enum list_verdict
list_response_verdict(struct router *rt, struct link *l, const char *p,
    size_t n, size_t *whole)
{
	const char *lf = memchr(p, '\n', n);
	const struct token *name;
	struct str copy = { 0 };
	struct command *c;
	enum list_verdict v = LIST_KEEP;
	size_t len;

	if (lf == NULL)
		return n <= TAGGED_LINE_MAX ? LIST_MORE : LIST_KEEP;
	if (!is_list_response(p, (size_t)(lf - p)))
		return LIST_KEEP;
	if ((len = response_length(p, n)) == 0)
		return n <= TAGGED_LINE_MAX ? LIST_MORE : LIST_KEEP;
	*whole = len;
	len -= len >= 2 && p[len - 2] == '\r' ? 2 : 1;
	if ((c = malloc(sizeof(*c))) == NULL)
		return LIST_KEEP;
	if (parse_untagged(p, len, &copy, c) == 0 &&
	    (name = listed_mailbox(c)) != NULL &&
	    !listed_name_wanted(rt, (int)(l - rt->links), name))
		v = LIST_DROP;
	str_free(&copy);
	free(c);
	return v;
}

/* A whole line at the start of the buffer, copied out without CRLF. */
static int
take_line(struct iobuf *io, char *out, size_t outlen)
{
	const char *p = io->buf + io->start;
	const char *lf = memchr(p, '\n', iobuf_pending(io));
	size_t len;

	if (lf == NULL)
		return 0;
	len = (size_t)(lf - p);
	if (len > 0 && p[len - 1] == '\r')
		len--;
	snprintf(out, outlen, "%.*s", (int)(len < outlen ? len : outlen - 1),
	    p);
	iobuf_consume(io, (size_t)(lf - p) + 1);
	return 1;
}

/*
 * Move what link l has buffered: untagged responses to the client (or
 * nowhere), up to the tagged completion for tag or a "+" continuation,
 * which are handed to the caller in line.  tag NULL: no command is in
 * flight, everything is untagged.
 */
static enum link_event
link_input(struct router *rt, struct link *l, const char *tag, enum mode m,
    char *line, size_t linelen)
{
	struct iobuf *io = &l->be->io;
	struct scan *sc = &l->sc;

	for (;;) {
		const char *p = io->buf + io->start, *lf;
		size_t n = iobuf_pending(io), k;

		if (n == 0)
			return EV_MORE;
		if (sc->literal_left > 0) {
			k = n < sc->literal_left ? n : (size_t)sc->literal_left;
			if (m != DISCARD && client_write(rt, p, k) != 0)
				return EV_CLIENT_GONE;
			iobuf_consume(io, k);
			sc->literal_left -= k;
			continue;
		}
		if (sc->at_line_start) {
			lf = memchr(p, '\n', n);
			if (tag != NULL && p[0] != '*') {
				size_t tl = strlen(tag);
				int tagged = n > tl && memcmp(p, tag, tl) == 0 &&
				    p[tl] == ' ';

				if (lf == NULL && n <= TAGGED_LINE_MAX &&
				    (tagged || p[0] == '+' || n <= tl))
					return EV_MORE;
				if (lf != NULL && (tagged || p[0] == '+')) {
					take_line(io, line, linelen);
					return tagged ? EV_TAGGED :
					    EV_CONTINUATION;
				}
			}
			if (n >= 5 && strncasecmp(p, "* BYE", 5) == 0) {
				sc->saw_bye = 1;
				/*
				 * A public server's BYE ends only its own
				 * link; the client's session goes on.
				 */
				if (l != rt->links && m != DISCARD) {
					if (lf == NULL && n <= TAGGED_LINE_MAX)
						return EV_MORE;
					if (lf != NULL) {
						iobuf_consume(io, (size_t)(lf -
						    p) + 1);
						continue;
					}
				}
			}
			if (m == FILTER_LIST && p[0] == '*') {
				enum list_verdict v;

				v = list_response_verdict(rt, l, p, n, &k);
				if (v == LIST_MORE)
					return EV_MORE;
				if (v == LIST_DROP) {
					iobuf_consume(io, k);
					continue;
				}
			}
			sc->at_line_start = 0;
			sc->tail_len = 0;
		}
		lf = memchr(p, '\n', n);
		k = lf != NULL ? (size_t)(lf - p) + 1 : n;
		keep_tail(sc->tail, sizeof(sc->tail), &sc->tail_len, p, k);
		if (m != DISCARD && client_write(rt, p, k) != 0)
			return EV_CLIENT_GONE;
		iobuf_consume(io, k);
		if (lf != NULL) {
			uint64_t size;
			size_t tl = sc->tail_len;

			while (tl > 0 && (sc->tail[tl - 1] == '\n' ||
			    sc->tail[tl - 1] == '\r'))
				tl--;
			if (literal_at_end(sc->tail, tl, &size) == LIT_SYNC ||
			    literal_at_end(sc->tail, tl, &size) == LIT_NONSYNC)
				sc->literal_left = size;
			else
				sc->at_line_start = 1;
			sc->tail_len = 0;
		}
	}
}

/* Outcome of waiting for a link's answer. */
enum wait_result {
	W_TAGGED,
	W_CONTINUATION,
	W_LINK_DOWN,
	W_CLIENT_GONE,
	W_TIMEOUT
};

/*
 * Wait for link i's tagged answer to tag (or its continuation, when
 * stop_at_continuation).  A continuation otherwise goes to the client,
 * whose next line then goes to the link: that is how IDLE's DONE travels.
 */
static enum wait_result
link_wait(struct router *rt, int i, const char *tag, enum mode m,
    int stop_at_continuation, char *line, size_t linelen)
{
	struct link *l = &rt->links[i];
	struct iobuf *io = &l->be->io;
	int client_may_speak = 0;

	for (;;) {
		struct pollfd pfd[2];
		enum link_event ev;
		enum io_status st;
		int64_t left;

		ev = link_input(rt, l, tag, m, line, linelen);
		if (ev == EV_TAGGED)
			return W_TAGGED;
		if (ev == EV_CLIENT_GONE)
			return W_CLIENT_GONE;
		if (ev == EV_CONTINUATION) {
			if (stop_at_continuation)
				return W_CONTINUATION;
			if (client_line(rt, "%s", line) != 0)
				return W_CLIENT_GONE;
			client_may_speak = 1;
			continue;
		}
		if (client_may_speak && iobuf_pending(rt->client) > 0) {
			char *cl;
			size_t cllen;

			rt->client->deadline = now_ms() +
			    (int64_t)rt->cfg->idle_timeout * 1000;
			if (iobuf_getline(rt->client, rt->cfg->max_line_length,
			    &cl, &cllen) != IO_OK)
				return W_CLIENT_GONE;
			io->deadline = now_ms() +
			    (int64_t)rt->cfg->backend_timeout * 1000;
			if (iobuf_write(io, cl, cllen) != IO_OK ||
			    iobuf_write(io, "\r\n", 2) != IO_OK)
				return W_LINK_DOWN;
			rt->last_client = now_ms();
			client_may_speak = 0;
			continue;
		}
		if (iobuf_has_decrypted(io))
			left = 0;
		else
			left = rt->last_client + (int64_t)rt->cfg->idle_timeout *
			    1000 - now_ms();
		if (left < 0)
			return W_TIMEOUT;
		pfd[0] = (struct pollfd){ .fd = io->rfd, .events = POLLIN };
		pfd[1] = (struct pollfd){ .fd = client_may_speak ?
		    rt->client->rfd : -1, .events = POLLIN };
		if (client_may_speak && iobuf_has_decrypted(rt->client))
			left = 0;
		if (poll_wait(pfd, 2, (int)(left > 3600000 ? 3600000 :
		    left)) < 0) {
			if (errno == EINTR && shutdown_requested)
				return W_CLIENT_GONE;
			continue;
		}
		if (pfd[0].revents != 0 || iobuf_has_decrypted(io)) {
			st = iobuf_try_fill(io);
			if (st != IO_OK && st != IO_AGAIN)
				return W_LINK_DOWN;
		}
		if (client_may_speak && (pfd[1].revents != 0 ||
		    iobuf_has_decrypted(rt->client))) {
			st = iobuf_try_fill(rt->client);
			if (st != IO_OK && st != IO_AGAIN)
				return W_CLIENT_GONE;
		}
	}
}

/* Send a command of imapfe's own to link i, in one write; its tag. */
static const char *
internal_send(struct router *rt, int i, const char *text)
{
	struct iobuf *io = &rt->links[i].be->io;
	const char *tag = backend_next_tag(rt->links[i].be);
	struct str cmd = { 0 };
	enum io_status st = IO_ERROR;

	io->deadline = now_ms() + (int64_t)rt->cfg->backend_timeout * 1000;
	if (str_printf(&cmd, "%s %s\r\n", tag, text) == 0)
		st = iobuf_write(io, cmd.s, cmd.len);
	str_free(&cmd);
	return st == IO_OK ? tag : NULL;
}

static int
link_internal(struct router *rt, int i, const char *verb, const char *args)
{
	char line[TAGGED_LINE_MAX];
	struct str text = { 0 };
	const char *tag = NULL;
	int rc = -1;

	if (str_printf(&text, "%s%s%s", verb, args ? " " : "",
	    args ? args : "") == 0)
		tag = internal_send(rt, i, text.s);
	if (tag != NULL && link_wait(rt, i, tag, DISCARD, 0, line,
	    sizeof(line)) == W_TAGGED)
		rc = 0;
	str_free(&text);
	if (rc != 0 && i > 0)
		link_down(rt, i, "no answer to an internal command");
	return rc;
}

/* ------------------------------------------------------------------ */
/* reading a client command */

enum read_result { RD_COMPLETE, RD_STREAM, RD_ANSWERED, RD_END };

/*
 * Add one line (CRLF removed) to the command; a literal announcement at
 * its end is rewritten synchronizing, since imapfe, not the client,
 * decides when the back-end gets the bytes.
 */
static int
add_line(struct router *rt, const char *line, size_t len, enum literal_kind k,
    uint64_t n)
{
	if (k == LIT_NONSYNC) {
		const char *open = memrchr(line, '{', len);

		len = (size_t)(open - line);
		return str_add(&rt->cmd, line, len) != 0 ||
		    str_printf(&rt->cmd, "{%llu}\r\n",
		    (unsigned long long)n) != 0 ? -1 : 0;
	}
	if (str_add(&rt->cmd, line, len) != 0 || str_add(&rt->cmd, "\r\n", 2))
		return -1;
	return 0;
}

/*
 * A literal over max_literal_size: refused with TOOBIG (RFC 9051) before
 * the client sends it when it waits for "+", or with BYE when it is on its
 * way already.
 */
static enum read_result
literal_too_large(struct router *rt, enum literal_kind k, uint64_t n)
{
	char tag[TAG_MAX + 2];

	log_msg(LOG_NOTICE, "event=limit reason=\"literal of %llu bytes, more "
	    "than max_literal_size\"", (unsigned long long)n);
	if (k == LIT_SYNC) {
		early_tag(rt->cmd.s, rt->cmd.len, tag, sizeof(tag));
		client_line(rt, "%s NO [TOOBIG] Literal too large.", tag);
		return RD_ANSWERED;
	}
	client_line(rt, "* BYE Literal too large.");
	rt->end = ROUTER_LIMIT;
	return RD_END;
}

static enum read_result
read_command(struct router *rt)
{
	enum literal_kind k;
	enum io_status st;
	char *line, tag[TAG_MAX + 2];
	size_t len;
	uint64_t n;

	str_wipe(&rt->cmd);
	rt->ncuts = 0;
	rt->stream_left = 0;
	for (;;) {
		rt->client->deadline = rt->last_client +
		    (int64_t)rt->cfg->idle_timeout * 1000;
		/* After login, long UID sets are normal: the buffer is the limit. */
		st = iobuf_getline(rt->client, rt->client->cap - 2, &line, &len);
		if (st == IO_TIMEOUT) {
			client_line(rt, "* BYE Disconnected for inactivity.");
			rt->end = ROUTER_TIMEOUT;
			return RD_END;
		}
		if (st == IO_TOOLONG) {
			client_line(rt, "* BYE Command line too long.");
			rt->end = ROUTER_LIMIT;
			return RD_END;
		}
		if (st != IO_OK) {
			if (shutdown_requested) {
				client_line(rt, "* BYE Server shutting down.");
				rt->end = ROUTER_SHUTDOWN;
			} else
				rt->end = ROUTER_CLIENT_GONE;
			return RD_END;
		}
		rt->last_client = now_ms();
		k = literal_at_end(line, len, &n);
		if (k == LIT_INVALID) {
			early_tag(rt->cmd.len ? rt->cmd.s : line, rt->cmd.len ?
			    rt->cmd.len : len, tag, sizeof(tag));
			client_line(rt, "%s BAD Invalid literal size.", tag);
			return RD_ANSWERED;
		}
		if (rt->cmd.len + len + 32 > BUFFERED_COMMAND_MAX ||
		    rt->ncuts == MAX_PIECES) {
			client_line(rt, "* BYE Command too long.");
			rt->end = ROUTER_LIMIT;
			return RD_END;
		}
		if (add_line(rt, line, len, k, n) != 0)
			goto oom;
		rt->send_len = rt->cmd.len;
		if (k == LIT_NONE)
			return RD_COMPLETE;
		rt->cuts[rt->ncuts++] = rt->cmd.len;
		if (n > rt->cfg->max_literal_size)
			return literal_too_large(rt, k, n);
		if (n > SMALL_LITERAL_MAX ||
		    rt->cmd.len + n > BUFFERED_COMMAND_MAX) {
			rt->stream_left = n;
			rt->stream_sync = k == LIT_SYNC;
			return RD_STREAM;
		}
		if (k == LIT_SYNC && client_line(rt, "+ Ready for literal "
		    "data") != 0)
			return RD_END;
		if ((st = iobuf_read_into(rt->client, n, &rt->cmd)) == IO_NOMEM)
			goto oom;
		if (st != IO_OK) {
			rt->end = ROUTER_CLIENT_GONE;
			return RD_END;
		}
	}
oom:
	client_line(rt, "* BYE Out of memory.");
	rt->end = ROUTER_LIMIT;
	return RD_END;
}

/* ------------------------------------------------------------------ */
/* sending a command */

/*
 * Send the buffered command to link i, piece by piece: after each literal
 * announcement the link must say "+" before the literal goes.  A tagged
 * answer instead ends the command early; it is put in line.  Returns
 * W_CONTINUATION when everything went.
 */
static enum wait_result
send_buffered(struct router *rt, int i, const char *tag, size_t len,
    char *line, size_t linelen)
{
	struct iobuf *io = &rt->links[i].be->io;
	size_t from = 0;
	enum wait_result w;

	for (int c = 0; c <= rt->ncuts; c++) {
		size_t to = c < rt->ncuts ? rt->cuts[c] : len;

		if (to > len)
			to = len;
		io->deadline = now_ms() + (int64_t)rt->cfg->backend_timeout *
		    1000;
		if (to > from && iobuf_write(io, rt->cmd.s + from, to - from) !=
		    IO_OK)
			return W_LINK_DOWN;
		from = to;
		if (c == rt->ncuts || to == len)
			break;
		w = link_wait(rt, i, tag, FORWARD, 1, line, linelen);
		if (w != W_CONTINUATION)
			return w;
	}
	return W_CONTINUATION;
}

/*
 * Copy n bytes from src to dst (NULL: nowhere) as they arrive, waiting up
 * to wait_s seconds for each piece.  Returns 0, -1 when src failed, -2
 * when dst did.
 */
static int
pump(struct router *rt, struct iobuf *src, int wait_s, struct iobuf *dst,
    uint64_t n)
{
	while (n > 0) {
		size_t avail = iobuf_pending(src);

		if (avail == 0) {
			src->deadline = now_ms() + (int64_t)wait_s * 1000;
			if (iobuf_fill(src) != IO_OK)
				return -1;
			continue;
		}
		if (avail > n)
			avail = (size_t)n;
		if (dst != NULL) {
			dst->deadline = now_ms() +
			    (int64_t)rt->cfg->backend_timeout * 1000;
			if (iobuf_write(dst, src->buf + src->start, avail) !=
			    IO_OK)
				return -2;
		}
		iobuf_consume(src, avail);
		n -= avail;
	}
	return 0;
}

/*
 * The rest of a command whose literal is too big to hold: each literal
 * streams from the client to the link once the link said "+".
 */
static enum wait_result
stream_rest(struct router *rt, int i, const char *tag, char *line,
    size_t linelen)
{
	enum wait_result w;
	enum literal_kind k;
	char *cl;
	size_t cllen;
	uint64_t n;
	int rc;

	for (;;) {
		w = link_wait(rt, i, tag, FORWARD, 1, line, linelen);
		if (w != W_CONTINUATION)
			return w;
		if (rt->stream_sync && client_line(rt, "+ Ready for literal "
		    "data") != 0)
			return W_CLIENT_GONE;
		rc = pump(rt, rt->client, rt->cfg->idle_timeout,
		    &rt->links[i].be->io, rt->stream_left);
		if (rc != 0)
			return rc == -1 ? W_CLIENT_GONE : W_LINK_DOWN;
		rt->last_client = now_ms();
		if (iobuf_getline(rt->client, rt->cfg->max_line_length, &cl,
		    &cllen) != IO_OK)
			return W_CLIENT_GONE;
		k = literal_at_end(cl, cllen, &n);
		str_wipe(&rt->cmd);
		if (k == LIT_INVALID)
			k = LIT_NONE;	/* the back-end will refuse it */
		if (add_line(rt, cl, cllen, k, n) != 0)
			return W_CLIENT_GONE;
		rt->links[i].be->io.deadline = now_ms() +
		    (int64_t)rt->cfg->backend_timeout * 1000;
		if (iobuf_write(&rt->links[i].be->io, rt->cmd.s, rt->cmd.len) !=
		    IO_OK)
			return W_LINK_DOWN;
		if (k == LIT_NONE)
			return W_CONTINUATION;
		rt->stream_left = n;
		rt->stream_sync = k == LIT_SYNC;
	}
}

/* ------------------------------------------------------------------ */
/* running one command on one link */

/*
 * BYE after link i failed, where the client can read it as one: a partial
 * response line of the link's is ended first, and inside one of its
 * literals no BYE is sent at all, since it would become message data.
 */
static void
bye_after_link(struct router *rt, int i, const char *text)
{
	const struct scan *sc = &rt->links[i].sc;

	if (sc->literal_left > 0) {
		log_msg(LOG_NOTICE, "event=bye-withheld reason=\"inside a "
		    "literal of the back-end's\"");
		return;
	}
	if (!sc->at_line_start && client_write(rt, "\r\n", 2) != 0)
		return;
	client_line(rt, "* BYE %s", text);
}

static void
command_failed_on_link(struct router *rt, int i, const char *tag,
    enum wait_result w)
{
	if (w == W_CLIENT_GONE) {
		rt->end = ROUTER_CLIENT_GONE;
		return;
	}
	if (w == W_TIMEOUT) {
		bye_after_link(rt, i, "Disconnected for inactivity.");
		rt->end = ROUTER_TIMEOUT;
		return;
	}
	if (i == 0) {
		if (!rt->links[0].sc.saw_bye)
			bye_after_link(rt, 0, "Back-end server closed the "
			    "connection.");
		rt->end = rt->links[0].sc.saw_bye ? ROUTER_LOGOUT :
		    ROUTER_BACKEND_GONE;
		return;
	}
	if (rt->links[i].sc.literal_left > 0) {
		/* The client is inside the lost server's literal: no answer
		 * can reach it as one, so the session ends here. */
		bye_after_link(rt, i, "");
		link_down(rt, i, "connection lost");
		rt->end = ROUTER_BACKEND_GONE;
		return;
	}
	link_down(rt, i, "connection lost");
	if (rt->merging)	/* the home server's answer is still to come */
		client_line(rt, "* NO [UNAVAILABLE] The server for \"%s\" was "
		    "lost.", rt->links[i].route->pattern);
	else
		client_line(rt, "%s NO [UNAVAILABLE] Public folder server "
		    "connection lost.", tag);
}

/* "tag NO [REFERRAL url] text" becomes "tag NO text": a plain NO. */
static void
strip_referral(char *line)
{
	char *code = strcasestr(line, "[REFERRAL "), *p;

	if (code == NULL)
		return;
	for (p = code + strlen("[REFERRAL "); *p != '\0' && *p != ']'; p++)
		if (*p == '[' && (p = strchr(p, ']')) == NULL) {
			*code = '\0';		/* cut short: drop the rest */
			return;
		}
	if (*p == ']')
		p++;
	while (*p == ' ')
		p++;
	memmove(code, p, strlen(p) + 1);
}

enum outcome { OUT_OK, OUT_NO, OUT_BAD, OUT_FAILED };

/* What a tagged answer says. */
static enum outcome
outcome_of(const char *line, const char *tag)
{
	size_t rest;
	const char *st = resp_status(line, strlen(line), tag, &rest);

	if (st != NULL && strcmp(st, "OK") == 0)
		return OUT_OK;
	return st != NULL && strcmp(st, "NO") == 0 ? OUT_NO : OUT_BAD;
}

/*
 * Send the current command to link i and relay the answer.  The tagged
 * line goes to the client unless keep_tagged (then it is left in line).
 */
static enum outcome
run_on_link_as(struct router *rt, int i, const char *tag, enum mode m,
    int keep_tagged, char *line, size_t linelen)
{
	enum wait_result w;

	rt->links[i].last_used = now_ms();
	w = send_buffered(rt, i, tag, rt->send_len, line, linelen);
	if (w == W_CONTINUATION && rt->stream_left > 0)
		w = stream_rest(rt, i, tag, line, linelen);
	if (w == W_CONTINUATION)
		w = link_wait(rt, i, tag, m, 0, line, linelen);
	if (w != W_TAGGED) {
		command_failed_on_link(rt, i, tag, w);
		return OUT_FAILED;
	}
	if (!keep_tagged) {
		strip_referral(line);	/* referrals only reach imapfe */
		if (client_line(rt, "%s", line) != 0)
			return OUT_FAILED;
	}
	return outcome_of(line, tag);
}

static enum outcome
run_on_link(struct router *rt, int i, const char *tag, int keep_tagged,
    char *line, size_t linelen)
{
	return run_on_link_as(rt, i, tag, FORWARD, keep_tagged, line, linelen);
}

/* ------------------------------------------------------------------ */
/* what goes where */

/*
 * Parse a copy of the command (the parser writes into its buffer, and the
 * original bytes are what the back-end gets).  For a command whose literal
 * streams, the part before that literal is what there is to parse.
 */
static enum parse_status
parse_copy(struct router *rt, struct str *copy, struct command *c,
    const char **why)
{
	size_t len = rt->send_len;

	if (rt->stream_left > 0) {
		const char *open = memrchr(rt->cmd.s, '{', len);

		len = open != NULL ? (size_t)(open - rt->cmd.s) : 0;
	} else
		len -= 2;		/* the final CRLF */
	while (len > 0 && rt->cmd.s[len - 1] == ' ')
		len--;
	str_wipe(copy);
	if (str_add(copy, rt->cmd.s, len) != 0 || str_add(copy, "", 1) != 0)
		return PARSE_NOTAG;
	copy->len--;
	return parse_command(copy->s, copy->len, c, why);
}

static int
is_mailbox_token(const struct token *t)
{
	return t->type == TOK_ATOM || t->type == TOK_QUOTED ||
	    t->type == TOK_LITERAL;
}

/* Commands whose first argument is a mailbox name. */
static int
names_mailbox(const char *name)
{
	static const char *const names[] = { "SELECT", "EXAMINE", "STATUS",
	    "CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE", "APPEND",
	    "GETACL", "SETACL", "DELETEACL", "MYRIGHTS", "LISTRIGHTS",
	    "GETQUOTAROOT" };

	for (size_t i = 0; i < sizeof(names) / sizeof(*names); i++)
		if (strcmp(name, names[i]) == 0)
			return 1;
	return 0;
}

/* The link where a mailbox is selected, or home when none is. */
static int
current_link(const struct router *rt)
{
	return rt->selected >= 0 ? rt->selected : 0;
}

/* Leave link i unselected, quietly: UNSELECT, or a SELECT bound to fail. */
static void
deselect(struct router *rt, int i)
{
	if (caps_has(rt->links[i].be->caps, "UNSELECT"))
		link_internal(rt, i, "UNSELECT", NULL);
	else
		link_internal(rt, i, "EXAMINE", "\"imapfe/no such mailbox\"");
	if (rt->selected == i)
		rt->selected = -1;
}

/*
 * Leave the selected mailbox before selecting on another server.  The new
 * server has nothing to close, so a QRESYNC client hears [CLOSED] from
 * imapfe (RFC 7162 3.2.11), as it would from one server.
 */
static void
leave_selected(struct router *rt)
{
	int i = rt->selected;

	if (rt->links[i].up)
		deselect(rt, i);
	rt->selected = -1;
	if (rt->enabled != NULL && strcasestr(rt->enabled, "QRESYNC") != NULL)
		client_line(rt, "* OK [CLOSED] Previous mailbox closed.");
}

static int
public_unavailable(struct router *rt, int i, const char *tag)
{
	if (link_up(rt, i) == 0)
		return 0;
	client_line(rt, "%s NO [UNAVAILABLE] The server for \"%s\" is "
	    "unavailable, try again later.", tag, rt->links[i].route->pattern);
	return 1;
}

/* ------------------------------------------------------------------ */
/* mailbox referrals (RFC 2193) */

/* Where the mailbox argument t ends in the command as the client sent it. */
static size_t
raw_token_end(const struct router *rt, const struct str *copy,
    const struct token *t)
{
	size_t at = (size_t)(t->s - copy->s);

	if (t->type != TOK_QUOTED)
		return at + t->len;
	for (; at < rt->send_len; at++) {	/* from the opening quote on */
		if (rt->cmd.s[at] == '\\')
			at++;
		else if (rt->cmd.s[at] == '"')
			return at + 1;
	}
	return rt->send_len;
}

/* The link for a server reached by referral: its open one, or a new one. */
static int
referral_link(struct router *rt, const struct route *r)
{
	for (int i = 1; i < rt->nlinks; i++)
		if (rt->links[i].route == r)
			return i;
	if (rt->nlinks == rt->maxlinks)
		return -1;
	link_init(&rt->links[rt->nlinks], r);
	return rt->nlinks++;
}

static int
is_home(const struct router *rt, const struct route *r)
{
	const struct backend *be = rt->links[0].be;

	return strcasecmp(be->host, r->host) == 0 &&
	    strcmp(be->port, r->port) == 0;
}

static int
printable_ascii(const char *s)
{
	for (; *s != '\0'; s++)
		if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e)
			return 0;
	return 1;
}

/*
 * Why a mailbox referral to r cannot be followed, or NULL.  Re-issuing
 * the command needs all of it at hand (no literal), a mailbox name that
 * needs no conversion, and a server other than the one that referred.
 */
static const char *
referral_unfollowable(const struct router *rt, const struct referral *ref,
    const struct route *r)
{
	if (ref->mailbox[0] == '\0' || !printable_ascii(ref->mailbox))
		return "no mailbox name, or not ASCII";
	if (rt->ncuts > 0 || rt->stream_left > 0)
		return "the command carries a literal";
	if (is_home(rt, r))
		return "loop";
	return NULL;
}

/* Run the command on link j for the mailbox a referral names. */
static enum outcome
run_referred(struct router *rt, const struct command *c, size_t name_end,
    int j, const char *mailbox, char *line, size_t linelen)
{
	struct iobuf *io = &rt->links[j].be->io;
	struct str cmd = { 0 };
	enum wait_result w = W_LINK_DOWN;

	rt->links[j].last_used = now_ms();
	io->deadline = now_ms() + (int64_t)rt->cfg->backend_timeout * 1000;
	if (str_printf(&cmd, "%s %s ", c->tag, c->name) == 0 &&
	    imap_append_string(&cmd, mailbox, strlen(mailbox), 0) == 0 &&
	    str_add(&cmd, rt->cmd.s + name_end, rt->send_len - name_end) ==
	    0 && iobuf_write(io, cmd.s, cmd.len) == IO_OK)
		w = link_wait(rt, j, c->tag, FORWARD, 0, line, linelen);
	str_free(&cmd);
	if (w != W_TAGGED) {
		command_failed_on_link(rt, j, c->tag, w);
		return OUT_FAILED;
	}
	return outcome_of(line, c->tag);
}

/*
 * A mailbox command that link *at answered "NO [REFERRAL imap://server/
 * mailbox]": run it there, if the server is configured, for clients that
 * know nothing of referrals, and so on for a few hops.  *at becomes the
 * link that answered last; its tagged line is in line.
 */
static enum outcome
follow_mailbox_referral(struct router *rt, const struct command *c,
    size_t name_end, int *at, char *line, size_t linelen)
{
	const struct route *tried[REFERRAL_HOPS_MAX + 1] = {
	    rt->links[*at].route };
	enum outcome o = OUT_NO;
	int hops = 0;

	while (o == OUT_NO && strcasestr(line, "[REFERRAL ") != NULL) {
		const struct route *r;
		struct referral ref;
		const char *why;
		int j;

		if ((r = referral_target(rt->cfg, line, &ref, rt->user)) ==
		    NULL)
			break;
		if ((why = referral_unfollowable(rt, &ref, r)) != NULL) {
			referral_refused(rt->user, &ref, why);
			break;
		}
		if (!referral_allowed(rt->cfg, tried, hops, r, &ref, rt->user))
			break;
		if ((j = referral_link(rt, r)) < 0) {
			referral_refused(rt->user, &ref, "too many servers "
			    "reached by referral");
			break;
		}
		if (link_up(rt, j) != 0) {
			snprintf(line, linelen, "%s NO [UNAVAILABLE] The server "
			    "holding this mailbox is unavailable.", c->tag);
			return OUT_NO;
		}
		log_msg(LOG_INFO, "event=referral kind=mailbox user=\"%s\" "
		    "to=%s:%s", rt->user, r->host, r->port);
		o = run_referred(rt, c, name_end, j, ref.mailbox, line,
		    linelen);
		tried[++hops] = r;
		*at = j;
	}
	return o;
}

/* ------------------------------------------------------------------ */
/* commands */

/* A command for the mailbox on link i (SELECT and friends included). */
static void
cmd_mailbox(struct router *rt, const struct command *c, int i,
    size_t name_end)
{
	char line[TAGGED_LINE_MAX];
	int selecting = strcmp(c->name, "SELECT") == 0 ||
	    strcmp(c->name, "EXAMINE") == 0;
	enum outcome o;

	if (selecting) {
		/* Even a failed SELECT leaves nothing selected (RFC 9051). */
		if (rt->selected >= 0 && (rt->selected != i ||
		    rt->selection_lost))
			leave_selected(rt);
		rt->selection_lost = 0;
	}
	if (i > 0 && public_unavailable(rt, i, c->tag))
		return;
	o = run_on_link(rt, i, c->tag, 1, line, sizeof(line));
	if (o == OUT_NO && strcmp(c->name, "APPEND") != 0)
		o = follow_mailbox_referral(rt, c, name_end, &i, line,
		    sizeof(line));
	if (o != OUT_FAILED) {
		strip_referral(line);
		client_line(rt, "%s", line);
	}
	if (selecting)
		rt->selected = o == OUT_OK ? i : -1;
}

/*
 * Could a LIST pattern (reference and mailbox joined) match names under
 * prefix, or its root?  Wildcards are taken generously: asking a server
 * that then lists nothing costs a round trip, missing one would hide
 * folders.
 */
static int
pattern_reaches(const char *pat, size_t plen, const char *prefix)
{
	size_t j = 0, pl = strlen(prefix);

	for (size_t i = 0; i < plen; i++, j++) {
		if (pat[i] == '*' || pat[i] == '%')
			return 1;
		if (j == pl)
			return 1;
		if (!name_head_equal(pat, plen, prefix, pl, i + 1))
			return 0;
	}
	return j >= prefix_root_len(prefix);	/* the root, or all of it */
}

/* Does the pattern stay inside prefix, so the home server has no part? */
static int
pattern_inside(const char *pat, size_t plen, const char *prefix)
{
	size_t pl = strlen(prefix);

	return plen >= pl && name_head_equal(pat, plen, prefix, pl, pl);
}

/*
 * The arguments of a LIST or LSUB: the reference's token, and the
 * patterns' [*first, *end) -- one, or a LIST-EXTENDED list of them --
 * after any selection options.  -1 for a command not understood.
 */
static int
list_arguments(const struct command *c, size_t *ref, size_t *first,
    size_t *end)
{
	size_t i = 0;

	if (c->ntok > 0 && c->tok[0].type == TOK_LPAREN) {
		while (i < c->ntok && c->tok[i].type != TOK_RPAREN)
			i++;
		i++;
	}
	if (i + 1 >= c->ntok || !is_mailbox_token(&c->tok[i]))
		return -1;
	*ref = i++;
	if (c->tok[i].type != TOK_LPAREN) {
		*first = i;
		*end = i + 1;
		return is_mailbox_token(&c->tok[i]) ? 0 : -1;
	}
	*first = ++i;
	while (i < c->ntok && is_mailbox_token(&c->tok[i]))
		i++;
	*end = i;
	return i > *first && i < c->ntok && c->tok[i].type == TOK_RPAREN ?
	    0 : -1;
}

/* Pattern k joined to the reference, as a server joins them. */
static size_t
list_pattern(const struct command *c, size_t ref, size_t k, char *pat,
    size_t patlen)
{
	int n = snprintf(pat, patlen, "%.*s%.*s", (int)c->tok[ref].len,
	    c->tok[ref].s, (int)c->tok[k].len, c->tok[k].s);

	return n < 0 ? 0 : (size_t)n >= patlen ? patlen - 1 : (size_t)n;
}

/*
 * Which servers a LIST or LSUB needs.  Link i > 0: does a pattern reach
 * its prefix?  Link 0: does a pattern reach outside every prefix?  A
 * command not understood goes everywhere, each server answers it as it
 * would.
 */
static int
list_needs(const struct router *rt, const struct command *c, int i)
{
	size_t ref, first, end, plen;
	char pat[1024];

	if (list_arguments(c, &ref, &first, &end) != 0)
		return 1;
	for (size_t k = first; k < end; k++) {
		int inside = 0;

		plen = list_pattern(c, ref, k, pat, sizeof(pat));
		if (i > 0 && pattern_reaches(pat, plen,
		    rt->links[i].route->pattern))
			return 1;
		for (int j = 1; i == 0 && j < rt->npublic; j++)
			if (pattern_inside(pat, plen,
			    rt->links[j].route->pattern))
				inside = 1;
		if (i == 0 && !inside)
			return 1;
	}
	return 0;
}

/*
 * LSUB, or LIST (SUBSCRIBED ...): the home server's root of a prefix then
 * comes from its own subscriptions, which say nothing of the public
 * server's folders, so it is never shown in place of that server's.
 */
static int
lists_subscriptions(const struct command *c)
{
	if (strcmp(c->name, "LSUB") == 0)
		return 1;
	for (size_t i = 1; c->ntok > 0 && c->tok[0].type == TOK_LPAREN &&
	    i < c->ntok && c->tok[i].type == TOK_ATOM; i++)
		if (c->tok[i].len == 10 &&
		    strncasecmp(c->tok[i].s, "SUBSCRIBED", 10) == 0)
			return 1;
	return 0;
}

/*
 * LIST and LSUB: every server whose names the patterns can match answers
 * in turn, public servers first, and each passes only the names it owns
 * (FILTER_LIST): the client sees every mailbox once and one tagged
 * answer, the home server's when it took part.
 */
static void
cmd_list(struct router *rt, const struct command *c)
{
	char line[TAGGED_LINE_MAX], answer[TAGGED_LINE_MAX] = "";
	int home = list_needs(rt, c, 0);
	enum outcome o;

	for (int i = 1; i < rt->npublic; i++) {
		struct link *l = &rt->links[i];

		l->root = ROOT_UNASKED;
		if (!list_needs(rt, c, i))
			continue;
		if (link_up(rt, i) != 0) {
			client_line(rt, "* NO [UNAVAILABLE] The server for "
			    "\"%s\" is unavailable.", l->route->pattern);
			continue;
		}
		rt->merging = 1;
		o = run_on_link_as(rt, i, c->tag, FILTER_LIST, 1, line,
		    sizeof(line));
		rt->merging = 0;
		if (rt->end != ROUTER_NONE)
			return;
		if (o == OUT_OK && l->root == ROOT_UNASKED &&
		    !lists_subscriptions(c))
			l->root = ROOT_MISSING;
		if (o != OUT_FAILED)
			memcpy(answer, line, sizeof(answer));
	}
	if (home && run_on_link_as(rt, 0, c->tag, FILTER_LIST, 1, answer,
	    sizeof(answer)) == OUT_FAILED)
		return;
	if (answer[0] != '\0')
		client_line(rt, "%s", answer);
	else
		client_line(rt, "%s NO [UNAVAILABLE] The public folder servers "
		    "are unavailable, try again later.", c->tag);
}

/*
 * Append tokens [from, to) -- one NAMESPACE item -- to out, strings quoted
 * again (or sent as literals) by imap_append_string.  Namespace
 * descriptions follow each other without a space: "(("" "/")("x/" "/"))".
 */
static int
append_tokens(struct str *out, const struct token *t, size_t from,
    size_t to)
{
	for (size_t i = from; i < to; i++) {
		int rc;

		if (i > from && t[i].type != TOK_RPAREN &&
		    t[i - 1].type != TOK_LPAREN &&
		    !(t[i - 1].type == TOK_RPAREN && t[i].type == TOK_LPAREN) &&
		    str_adds(out, " ") != 0)
			return -1;
		switch (t[i].type) {
		case TOK_LPAREN:
			rc = str_adds(out, "(");
			break;
		case TOK_RPAREN:
			rc = str_adds(out, ")");
			break;
		case TOK_NIL:
			rc = str_adds(out, "NIL");
			break;
		case TOK_ATOM:
			rc = str_add(out, t[i].s, t[i].len);
			break;
		default:
			rc = imap_append_string(out, t[i].s, t[i].len, 0) < 0;
			break;
		}
		if (rc != 0)
			return -1;
	}
	return 0;
}

/* The index after the token at i, or after the list it opens. */
static size_t
group_end(const struct command *c, size_t i)
{
	int depth = 0;

	do {
		if (c->tok[i].type == TOK_LPAREN)
			depth++;
		else if (c->tok[i].type == TOK_RPAREN)
			depth--;
		i++;
	} while (i < c->ntok && depth > 0);
	return i;
}

/*
 * The public link whose prefix a namespace description names: the same
 * prefix, or the same root with another delimiter ("Public Folders." for
 * "Public Folders/"), for LIST shows that root once, the public
 * server's.  0 for none.
 */
static int
namespace_owner(const struct router *rt, const struct token *t)
{
	for (int i = 1; i < rt->npublic; i++) {
		const char *p = rt->links[i].route->pattern;
		size_t pl = strlen(p), rl = prefix_root_len(p);

		if (t->len == pl && name_head_equal(t->s, t->len, p, pl, pl))
			return i;
		if (rl < pl && t->len == pl &&
		    !isalnum((unsigned char)t->s[rl]) &&
		    name_head_equal(t->s, t->len, p, pl, rl))
			return i;
	}
	return 0;
}

/* A public prefix's namespace description: its delimiter ends it. */
static int
append_public_namespace(struct str *out, const char *pfx)
{
	char delim = pfx[strlen(pfx) - 1];

	if (isalnum((unsigned char)delim))
		delim = '/';
	if (str_adds(out, "(") != 0 ||
	    imap_append_string(out, pfx, strlen(pfx), 0) < 0)
		return -1;
	return str_printf(out, " \"%s%c\")", delim == '"' || delim == '\\' ?
	    "\\" : "", delim);
}

/*
 * The shared namespaces (the third item, at tok[at]) with every public
 * prefix once: a description of the home server's that names one is
 * replaced where it stands, the others are added at the end.
 */
static int
append_shared_namespaces(struct router *rt, const struct command *c,
    size_t at, struct str *out)
{
	char *shown = calloc((size_t)rt->npublic, 1);
	int rc = -1;

	if (shown == NULL || str_adds(out, "(") != 0)
		goto out;
	for (size_t j = at + 1; c->tok[at].type == TOK_LPAREN &&
	    j < c->ntok && c->tok[j].type == TOK_LPAREN;) {
		size_t next = group_end(c, j);
		int owner = j + 1 < next && is_mailbox_token(&c->tok[j + 1]) ?
		    namespace_owner(rt, &c->tok[j + 1]) : 0;

		if (owner == 0 && append_tokens(out, c->tok, j, next) != 0)
			goto out;
		if (owner > 0 && !shown[owner] && append_public_namespace(out,
		    rt->links[owner].route->pattern) != 0)
			goto out;
		if (owner > 0)
			shown[owner] = 1;
		j = next;
	}
	for (int i = 1; i < rt->npublic; i++)
		if (!shown[i] && append_public_namespace(out,
		    rt->links[i].route->pattern) != 0)
			goto out;
	rc = str_adds(out, ")");
out:
	free(shown);
	return rc;
}

/*
 * NAMESPACE: the home server's personal and other users' namespaces as
 * they are, its shared ones with each public prefix once.  A line that
 * does not parse goes as it came.
 */
static int
rewrite_namespace(struct router *rt, const char *line, size_t len,
    struct str *out)
{
	struct command *c = malloc(sizeof(*c));
	struct str copy = { 0 };
	size_t second, third;
	int rc;

	if (c == NULL || parse_untagged(line, len, &copy, c) != 0 ||
	    strcmp(c->name, "NAMESPACE") != 0 || c->ntok == 0 ||
	    (second = group_end(c, 0)) >= c->ntok ||
	    (third = group_end(c, second)) >= c->ntok ||
	    group_end(c, third) != c->ntok)
		rc = str_add(out, line, len);
	else
		rc = str_adds(out, "* NAMESPACE ") != 0 ||
		    append_tokens(out, c->tok, 0, second) != 0 ||
		    str_adds(out, " ") != 0 ||
		    append_tokens(out, c->tok, second, third) != 0 ||
		    str_adds(out, " ") != 0 ||
		    append_shared_namespaces(rt, c, third, out) != 0 ? -1 : 0;
	str_free(&copy);
	free(c);
	return rc;
}

/* CAPABILITY after login: what the router can honour, as at login. */
static int
rewrite_capability(struct router *rt, const char *line, size_t len,
    struct str *out)
{
	char *caps, *list = strndup(line + 13, len - 13);
	int rc;

	(void)rt;
	if (list == NULL)
		return -1;
	caps = caps_for_client(list, 1);
	free(list);
	if (caps == NULL)
		return -1;
	rc = str_printf(out, "* CAPABILITY %s", caps);
	free(caps);
	return rc;
}

/*
 * Run a command on the home server, its untagged answers line by line,
 * those starting with "match" rewritten.  For small answers only.
 */
static void
run_rewriting(struct router *rt, const struct command *c, const char *match,
    int (*rewrite)(struct router *, const char *, size_t, struct str *))
{
	struct link *l = &rt->links[0];
	size_t tl = strlen(c->tag), len;
	char *line;

	l->be->io.deadline = now_ms() + (int64_t)rt->cfg->backend_timeout *
	    1000;
	if (iobuf_write(&l->be->io, rt->cmd.s, rt->send_len) != IO_OK)
		goto gone;
	for (;;) {
		struct str out = { 0 };
		int rc;

		l->be->io.deadline = now_ms() +
		    (int64_t)rt->cfg->backend_timeout * 1000;
		if (iobuf_getline(&l->be->io, MAX_BACKEND_LINE, &line, &len) !=
		    IO_OK)
			goto gone;
		if (len > strlen(match) && strncasecmp(line, match,
		    strlen(match)) == 0)
			rc = rewrite(rt, line, len, &out);
		else
			rc = str_add(&out, line, len);
		rc = rc != 0 || str_add(&out, "\r\n", 2) != 0 ? -1 :
		    client_write(rt, out.s, out.len);
		str_free(&out);
		if (rc != 0)
			return;
		if (len > tl && memcmp(line, c->tag, tl) == 0 &&
		    line[tl] == ' ')
			return;
	}
gone:
	command_failed_on_link(rt, 0, c->tag, W_LINK_DOWN);
}

/* RENAME stays on one server; across servers it cannot be done. */
static int
rename_link(struct router *rt, const struct command *c)
{
	int a, b;

	if (c->ntok != 2 || !is_mailbox_token(&c->tok[0]) ||
	    !is_mailbox_token(&c->tok[1]))
		return 0;
	a = mailbox_link(rt, c->tok[0].s, c->tok[0].len);
	b = mailbox_link(rt, c->tok[1].s, c->tok[1].len);
	if (a == b)
		return a;
	client_line(rt, "%s NO [CANNOT] Cannot rename a mailbox between "
	    "servers.", c->tag);
	return -1;
}

/* ------------------------------------------------------------------ */
/* COPY and MOVE between servers */

#define CROSS_COPY_MAX	100000		/* messages in one command */

struct msg_meta {
	unsigned long	 uid;
	char		 flags[256];
	char		 date[40];
};

static enum io_status
internal_line(struct router *rt, int i, char **line, size_t *len)
{
	struct iobuf *io = &rt->links[i].be->io;

	io->deadline = now_ms() + (int64_t)rt->cfg->backend_timeout * 1000;
	return iobuf_getline(io, MAX_BACKEND_LINE, line, len);
}

static int
is_tagged(const char *line, size_t len, const char *tag)
{
	size_t tl = strlen(tag);

	return len > tl && memcmp(line, tag, tl) == 0 && line[tl] == ' ';
}

/* The value after "NAME " or "NAME (" in a FETCH response line. */
static void
fetch_item(const char *line, const char *name, char open, char close,
    char *out, size_t outlen)
{
	const char *p = strstr(line, name), *end;

	out[0] = '\0';
	if (p == NULL || (p = strchr(p + strlen(name), open)) == NULL)
		return;
	p++;
	if ((end = strchr(p, close)) == NULL)
		return;
	snprintf(out, outlen, "%.*s", (int)(end - p), p);
}

/* \Recent is the server's to set; the rest of the flags travel. */
static void
strip_recent(char *flags)
{
	char *r;

	while ((r = strcasestr(flags, "\\Recent")) != NULL)
		memmove(r, r + 7, strlen(r + 7) + 1);
}

/*
 * The messages a client's sequence set names on the source: UID, flags
 * and arrival date, from a FETCH whose answers imapfe keeps.  Untagged
 * answers of other kinds belong to the client's selected mailbox.
 */
static int
collect_meta(struct router *rt, int from, const struct token *set, int uid,
    struct msg_meta **meta, size_t *count)
{
	struct str text = { 0 };
	const char *tag = NULL;
	size_t len, cap = 0;
	int over = 0;
	char *line;

	if (str_printf(&text, "%sFETCH %.*s (UID FLAGS INTERNALDATE)",
	    uid ? "UID " : "", (int)set->len, set->s) == 0)
		tag = internal_send(rt, from, text.s);
	str_free(&text);
	if (tag == NULL)
		return -1;
	for (;;) {
		if (internal_line(rt, from, &line, &len) != IO_OK)
			return -1;
		if (is_tagged(line, len, tag)) {
			if (strncmp(line + strlen(tag), " OK", 3) != 0)
				return -2;
			return over ? -3 : 0;
		}
		if (strstr(line, " FETCH (") == NULL || strstr(line, "UID ") ==
		    NULL) {
			if (client_write(rt, line, len) != 0 ||
			    client_write(rt, "\r\n", 2) != 0)
				return -1;
			continue;
		}
		if (*count == CROSS_COPY_MAX) {
			over = 1;
			continue;
		}
		if (*count == cap) {
			struct msg_meta *m;

			cap = cap ? cap * 2 : 16;
			if ((m = realloc(*meta, cap * sizeof(**meta))) == NULL)
				return -1;
			*meta = m;
		}
		(*meta)[*count].uid = strtoul(strstr(line, "UID ") + 4, NULL,
		    10);
		fetch_item(line, "FLAGS", '(', ')', (*meta)[*count].flags,
		    sizeof((*meta)[*count].flags));
		strip_recent((*meta)[*count].flags);
		fetch_item(line, "INTERNALDATE", '"', '"',
		    (*meta)[*count].date, sizeof((*meta)[*count].date));
		(*count)++;
	}
}

/* The rest of the source's answer to an internal FETCH, up to its tag. */
static int
finish_fetch(struct router *rt, int from, const char *ftag)
{
	size_t len;
	char *line;

	for (;;) {
		if (internal_line(rt, from, &line, &len) != IO_OK)
			return -1;
		if (is_tagged(line, len, ftag))
			return 0;
	}
}

/*
 * One message: FETCH its body from the source and APPEND it to the
 * destination at the same time, the literal flowing straight through.
 * Returns 0, 1 when the message is gone from the source, -1 on failure.
 */
static int
copy_one(struct router *rt, int from, int to, const struct token *mbox,
    const struct msg_meta *m, char *reply, size_t replylen)
{
	char text[64], *line;
	const char *ftag, *atag;
	struct str append = { 0 };
	uint64_t size = 0;
	size_t len;
	int rc = -1;

	snprintf(text, sizeof(text), "UID FETCH %lu BODY.PEEK[]", m->uid);
	if ((ftag = internal_send(rt, from, text)) == NULL)
		return -1;
	for (;;) {		/* up to the body literal, or the end */
		if (internal_line(rt, from, &line, &len) != IO_OK)
			return -1;
		if (is_tagged(line, len, ftag))
			return 1;
		if (strstr(line, " FETCH (") != NULL &&
		    literal_at_end(line, len, &size) != LIT_NONE &&
		    literal_at_end(line, len, &size) != LIT_INVALID) {
			break;
		}
	}
	atag = backend_next_tag(rt->links[to].be);
	if (str_printf(&append, "%s APPEND ", atag) != 0 ||
	    imap_append_string(&append, mbox->s, mbox->len, 0) < 0 ||
	    str_printf(&append, " (%s)%s%s%s {%llu}\r\n", m->flags,
	    m->date[0] ? " \"" : "", m->date, m->date[0] ? "\"" : "",
	    (unsigned long long)size) != 0)
		goto out;
	rt->links[to].be->io.deadline = now_ms() +
	    (int64_t)rt->cfg->backend_timeout * 1000;
	if (iobuf_write(&rt->links[to].be->io, append.s, append.len) != IO_OK)
		goto out;
	switch (link_wait(rt, to, atag, DISCARD, 1, reply, replylen)) {
	case W_CONTINUATION:
		break;
	case W_TAGGED:
		/* refused: the body on its way from the source goes nowhere */
		if (pump(rt, &rt->links[from].be->io, rt->cfg->backend_timeout,
		    NULL, size) == 0 &&
		    finish_fetch(rt, from, ftag) == 0)
			rc = -3;
		goto out;
	default:
		goto out;
	}
	if (pump(rt, &rt->links[from].be->io, rt->cfg->backend_timeout,
	    &rt->links[to].be->io, size) != 0 ||
	    iobuf_write(&rt->links[to].be->io, "\r\n", 2) != IO_OK)
		goto out;
	if (finish_fetch(rt, from, ftag) != 0)
		goto out;
	if (link_wait(rt, to, atag, DISCARD, 0, reply, replylen) ==
	    W_TAGGED)
		rc = strncmp(reply + strlen(atag), " OK", 3) == 0 ? 0 : -3;
out:
	str_free(&append);
	return rc;
}

/* One internal command on the source, its untagged answers to the client. */
static int
source_command(struct router *rt, int from, const char *text)
{
	char reply[TAGGED_LINE_MAX];
	const char *tag = internal_send(rt, from, text);

	if (tag == NULL || link_wait(rt, from, tag, FORWARD, 0, reply,
	    sizeof(reply)) != W_TAGGED)
		return -1;
	return strncmp(reply + strlen(tag), " OK", 3) == 0 ? 0 : -1;
}

#define UIDS_PER_COMMAND	200	/* keeps each line well under limits */

/* After a MOVE's copies: the originals go, and the client sees it. */
static int
remove_originals(struct router *rt, int from, const struct msg_meta *meta,
    size_t count)
{
	struct str set = { 0 }, cmd = { 0 };
	int rc = 0;

	for (size_t k = 0; rc == 0 && k < count; k += UIDS_PER_COMMAND) {
		str_wipe(&set);
		for (size_t j = k; j < count && j < k + UIDS_PER_COMMAND; j++)
			if (str_printf(&set, "%s%lu", j > k ? "," : "",
			    meta[j].uid) != 0)
				rc = -1;
		str_wipe(&cmd);
		if (rc == 0 && (str_printf(&cmd, "UID STORE %s +FLAGS.SILENT "
		    "(\\Deleted)", set.s) != 0 ||
		    source_command(rt, from, cmd.s) != 0))
			rc = -1;
		str_wipe(&cmd);
		if (rc == 0 && (str_printf(&cmd, "UID EXPUNGE %s", set.s) != 0 ||
		    source_command(rt, from, cmd.s) != 0))
			rc = -1;
	}
	str_free(&set);
	str_free(&cmd);
	return rc;
}

/*
 * COPY or MOVE to a mailbox on another server: each message is fetched
 * from the source and appended to the destination, body streamed; MOVE
 * then removes the originals.  Not atomic: a failure part-way leaves the
 * messages copied so far, and a MOVE's originals untouched.
 */
static void
cross_copy(struct router *rt, const struct command *c, size_t first,
    int from, int to, int move)
{
	const struct token *mbox = &c->tok[c->ntok - 1];
	const char *what = move ? "MOVE" : "COPY";
	char reply[TAGGED_LINE_MAX] = "";
	struct msg_meta *meta = NULL;
	size_t count = 0, copied = 0;
	int rc;

	if (move && !caps_has(rt->links[from].be->caps, "UIDPLUS")) {
		client_line(rt, "%s NO [CANNOT] MOVE between servers needs "
		    "UIDPLUS on the source server.", c->tag);
		return;
	}
	if (to > 0 && public_unavailable(rt, to, c->tag))
		return;
	rc = collect_meta(rt, from, &c->tok[first], first == 1, &meta, &count);
	for (size_t k = 0; rc == 0 && k < count; k++) {
		rc = copy_one(rt, from, to, mbox, &meta[k], reply,
		    sizeof(reply));
		if (rc == 0)
			copied++;
		else if (rc == 1)
			rc = 0;		/* expunged meanwhile: nothing to copy */
	}
	if (rc == 0 && move)
		rc = remove_originals(rt, from, meta, count);
	free(meta);
	if (rc == -2)
		client_line(rt, "%s NO Invalid message set.", c->tag);
	else if (rc == -3 && count > CROSS_COPY_MAX - 1 && copied == 0)
		client_line(rt, "%s NO [LIMIT] At most %d messages can be "
		    "copied between servers at once.", c->tag, CROSS_COPY_MAX);
	else if (rc == -3 && strstr(reply, "[TRYCREATE]") != NULL &&
	    copied == 0)
		client_line(rt, "%s NO [TRYCREATE] The destination mailbox does "
		    "not exist.", c->tag);
	else if (rc != 0) {
		log_msg(LOG_ERR, "event=copy-failed user=\"%s\" copied=%zu "
		    "of=%zu", rt->user, copied, count);
		client_line(rt, "%s NO [%s] %s between servers failed after %zu "
		    "of %zu messages.", c->tag, rc == -3 ? "CANNOT" :
		    "UNAVAILABLE", what, copied, count);
	} else
		client_line(rt, "%s OK %s completed.", c->tag, what);
}

/*
 * COPY and MOVE (and their UID forms) go to the selected mailbox's
 * server, or are carried across when the destination lives elsewhere.
 */
static int
copy_link(struct router *rt, const struct command *c, size_t first,
    const char *name)
{
	const struct token *dst;
	int from = current_link(rt), to;

	if (c->ntok < first + 2 || rt->selected < 0 ||
	    !is_mailbox_token(&c->tok[c->ntok - 1]) ||
	    c->tok[first].type != TOK_ATOM)
		return from;
	dst = &c->tok[c->ntok - 1];
	if ((to = mailbox_link(rt, dst->s, dst->len)) == from)
		return from;
	cross_copy(rt, c, first, from, to, strcasecmp(name, "MOVE") == 0);
	return -1;
}

/* LOGOUT: every public server is left politely, then the home one. */
static void
cmd_logout(struct router *rt, const struct command *c)
{
	char line[TAGGED_LINE_MAX];

	for (int i = 1; i < rt->nlinks; i++)
		if (rt->links[i].up) {
			link_internal(rt, i, "LOGOUT", NULL);
			backend_close(rt->links[i].be);
			rt->links[i].up = 0;
		}
	if (run_on_link(rt, 0, c->tag, 0, line, sizeof(line)) != OUT_FAILED &&
	    rt->end == ROUTER_NONE)
		rt->end = ROUTER_LOGOUT;
}

/* ENABLE runs at home and is remembered for servers reached later. */
static void
cmd_enable(struct router *rt, const struct command *c)
{
	char line[TAGGED_LINE_MAX];
	const char *args = rt->cmd.s + strlen(c->tag) + 1 + strlen("ENABLE");

	if (run_on_link(rt, 0, c->tag, 0, line, sizeof(line)) != OUT_OK)
		return;
	while (*args == ' ')
		args++;
	free(rt->enabled);
	rt->enabled = strndup(args, strcspn(args, "\r\n"));
	for (int i = 1; i < rt->nlinks && rt->enabled != NULL; i++)
		if (rt->links[i].up)
			link_internal(rt, i, "ENABLE", rt->enabled);
}

static void
dispatch(struct router *rt)
{
	char line[TAGGED_LINE_MAX];
	struct str copy = { 0 };
	struct command *c = malloc(sizeof(*c));
	const char *why, *name;
	char sub[16];
	enum parse_status ps;
	int target = -2;
	size_t first = 0;

	if (c == NULL) {
		client_line(rt, "* BYE Out of memory.");
		rt->end = ROUTER_LIMIT;
		return;
	}
	ps = parse_copy(rt, &copy, c, &why);
	if (ps != PARSE_OK || strlen(c->tag) > TAG_MAX) {
		/* the current server answers malformed commands as it would */
		char tag[TAG_MAX + 2];

		early_tag(rt->cmd.s, rt->send_len, tag, sizeof(tag));
		if (ps == PARSE_NOTAG || strlen(tag) > TAG_MAX ||
		    strcmp(tag, "*") == 0)
			client_line(rt, "* BAD %s", ps == PARSE_OK ?
			    "Tag too long." : why);
		else
			run_on_link(rt, current_link(rt), tag, 0, line,
			    sizeof(line));
		goto out;
	}
	name = c->name;
	if (strcmp(name, "UID") == 0 && c->ntok > 0 &&
	    c->tok[0].type == TOK_ATOM && c->tok[0].len < sizeof(sub)) {
		/* atoms are not NUL-terminated in the parse buffer */
		for (size_t k = 0; k < c->tok[0].len; k++)
			sub[k] = (char)toupper((unsigned char)c->tok[0].s[k]);
		sub[c->tok[0].len] = '\0';
		name = sub;
		first = 1;
	}
	if (names_mailbox(name) && c->ntok > first &&
	    is_mailbox_token(&c->tok[first])) {
		cmd_mailbox(rt, c, mailbox_link(rt, c->tok[first].s,
		    c->tok[first].len), raw_token_end(rt, &copy,
		    &c->tok[first]));
		goto out;
	}
	if (strcmp(name, "LIST") == 0 || strcmp(name, "LSUB") == 0)
		cmd_list(rt, c);
	else if (strcmp(name, "NAMESPACE") == 0)
		run_rewriting(rt, c, "* NAMESPACE ", rewrite_namespace);
	else if (strcmp(name, "CAPABILITY") == 0)
		run_rewriting(rt, c, "* CAPABILITY ", rewrite_capability);
	else if (strcmp(name, "LOGOUT") == 0)
		cmd_logout(rt, c);
	else if (strcmp(name, "ENABLE") == 0)
		cmd_enable(rt, c);
	else if (strcmp(name, "RENAME") == 0)
		target = rename_link(rt, c);
	else if (strcasecmp(name, "COPY") == 0 || strcasecmp(name, "MOVE") == 0)
		target = copy_link(rt, c, first, name);
	else
		target = current_link(rt);
	if (target >= 0 && rt->selection_lost && target == rt->selected) {
		if (strcmp(name, "CLOSE") == 0 || strcmp(name, "UNSELECT") == 0) {
			rt->selected = -1;
			rt->selection_lost = 0;
			client_line(rt, "%s OK %s completed.", c->tag, name);
		} else
			client_line(rt, "%s NO [UNAVAILABLE] The server of the "
			    "selected mailbox was lost; select a mailbox "
			    "again.", c->tag);
		target = -1;
	}
	if (target >= 0 && (target == 0 || !public_unavailable(rt, target,
	    c->tag))) {
		int closing = strcmp(name, "CLOSE") == 0 ||
		    strcmp(name, "UNSELECT") == 0;

		if (run_on_link(rt, target, c->tag, 0, line, sizeof(line)) ==
		    OUT_OK && closing)
			rt->selected = -1;
	}
out:
	str_free(&copy);
	free(c);
}

/* ------------------------------------------------------------------ */
/* the loop */

/* Unsolicited data: the selected server's goes to the client. */
static int
drain_links(struct router *rt)
{
	char line[TAGGED_LINE_MAX];

	for (int i = 0; i < rt->nlinks; i++) {
		struct link *l = &rt->links[i];

		if (!l->up)
			continue;
		if (link_input(rt, l, NULL, i == current_link(rt) ? FORWARD :
		    DISCARD, line, sizeof(line)) == EV_CLIENT_GONE) {
			rt->end = ROUTER_CLIENT_GONE;
			return -1;
		}
	}
	return 0;
}

/*
 * A server that is not in use still must not time the session out: each
 * gets a NOOP after KEEPALIVE_MS of quiet (servers wait 30 minutes at the
 * least, RFC 9051).
 */
#define KEEPALIVE_MS	(5 * 60 * 1000)

static int64_t
keepalives(struct router *rt)
{
	int64_t now = now_ms(), next = now + KEEPALIVE_MS;

	for (int i = 0; i < rt->nlinks && rt->end == ROUTER_NONE; i++) {
		struct link *l = &rt->links[i];

		if (!l->up || i == current_link(rt))
			continue;
		if (now - l->last_used >= KEEPALIVE_MS) {
			if (link_internal(rt, i, "NOOP", NULL) != 0 && i == 0) {
				command_failed_on_link(rt, 0, "*", W_LINK_DOWN);
				return 0;
			}
			l->last_used = now;
		}
		if (l->last_used + KEEPALIVE_MS < next)
			next = l->last_used + KEEPALIVE_MS;
	}
	return next - now;
}

static void
wait_for_input(struct router *rt)
{
	struct pollfd pfd[1 + 16];
	int n = 0, map[1 + 16];
	int64_t left = rt->last_client + (int64_t)rt->cfg->idle_timeout *
	    1000 - now_ms();

	int64_t keep;

	if (iobuf_pending(rt->client) > 0 || iobuf_has_decrypted(rt->client))
		return;
	if (left <= 0) {
		client_line(rt, "* BYE Disconnected for inactivity.");
		rt->end = ROUTER_TIMEOUT;
		return;
	}
	if ((keep = keepalives(rt)) < left)
		left = keep;
	if (rt->end != ROUTER_NONE)
		return;
	pfd[n] = (struct pollfd){ .fd = rt->client->rfd, .events = POLLIN };
	map[n++] = -1;
	for (int i = 0; i < rt->nlinks && n < 17; i++)
		if (rt->links[i].up) {
			if (iobuf_has_decrypted(&rt->links[i].be->io))
				left = 0;
			pfd[n] = (struct pollfd){ .fd = rt->links[i].be->io.rfd,
			    .events = POLLIN };
			map[n++] = i;
		}
	if (poll_wait(pfd, (nfds_t)n, (int)(left > 3600000 ? 3600000 :
	    left)) < 0) {
		if (errno == EINTR && shutdown_requested) {
			client_line(rt, "* BYE Server shutting down.");
			rt->end = ROUTER_SHUTDOWN;
		}
		return;
	}
	for (int k = 1; k < n; k++) {
		int i = map[k];
		enum io_status st;

		if (pfd[k].revents == 0 &&
		    !iobuf_has_decrypted(&rt->links[i].be->io))
			continue;
		st = iobuf_try_fill(&rt->links[i].be->io);
		if (st == IO_OK || st == IO_AGAIN)
			continue;
		if (i == 0) {
			drain_links(rt);
			command_failed_on_link(rt, 0, "*", W_LINK_DOWN);
			return;
		}
		link_down(rt, i, "connection closed");
	}
	if (pfd[0].revents != 0) {
		enum io_status st = iobuf_try_fill(rt->client);

		if (st != IO_OK && st != IO_AGAIN)
			rt->end = ROUTER_CLIENT_GONE;
	}
}

enum router_end
router_run(const struct config *cfg, struct iobuf *client,
    struct backend *home, const struct credentials *cr,
    const struct client_info *ci, const char *user)
{
	struct router rt = { .cfg = cfg, .client = client, .cr = cr, .ci = ci,
	    .user = user, .selected = -1, .end = ROUTER_NONE };
	int n = 1;

	for (const struct route *r = cfg->publics; r != NULL; r = r->next)
		n++;
	rt.maxlinks = n + REFERRAL_LINKS_MAX;
	if ((rt.links = calloc((size_t)rt.maxlinks, sizeof(*rt.links))) ==
	    NULL)
		return ROUTER_LIMIT;
	rt.nlinks = rt.npublic = n;
	rt.links[0].be = home;
	rt.links[0].up = 1;
	rt.links[0].last_used = now_ms();
	rt.links[0].sc.at_line_start = 1;
	n = 1;
	for (const struct route *r = cfg->publics; r != NULL; r = r->next) {
		rt.links[n].public = 1;
		link_init(&rt.links[n++], r);
	}
	rt.last_client = now_ms();
	while (rt.end == ROUTER_NONE) {
		if (drain_links(&rt) != 0)
			break;
		if (iobuf_pending(client) == 0 &&
		    !iobuf_has_decrypted(client)) {
			wait_for_input(&rt);
			continue;
		}
		switch (read_command(&rt)) {
		case RD_COMPLETE:
		case RD_STREAM:
			dispatch(&rt);
			break;
		case RD_ANSWERED:
		case RD_END:
			break;
		}
	}
	for (int i = 1; i < rt.nlinks; i++)
		backend_close(rt.links[i].be);
	str_wipe(&rt.cmd);
	str_free(&rt.cmd);
	free(rt.enabled);
	free(rt.links);
	return rt.end;
}
