/*
 * The command router, used after login when public-folder servers are
 * configured.  Each client command is read at the grammar level and sent
 * to the back-end that owns the mailbox it names; responses are streamed
 * back, literals included, never buffered whole.
 *
 * Commands for the server that holds the selected mailbox (FETCH, STORE,
 * SEARCH, UID ..., NOOP, IDLE) are pipelined as the client sends them, as
 * a relay would: they go out without waiting for the answers before them,
 * and that server's answers stream back in its order.  Every other command
 * (one that names a mailbox, merges servers, or changes which server is
 * selected) first waits until those answers are in, then runs alone.  So
 * at any moment client commands are in flight on one server at most, and
 * the client sees each command's responses in order.
 *
 * The home back-end (from "route") is link 0; public-folder servers are
 * opened on first use, and a failed one is left alone for public_holddown
 * seconds.  A failure of a public server costs the command that needed it
 * a NO [UNAVAILABLE], never the session.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>
#include <unistd.h>

#include "imapfe.h"
#include "router.h"

#define TAG_MAX			64
#define SMALL_LITERAL_MAX	65536		/* buffered; larger: streamed */
#define BUFFERED_COMMAND_MAX	(1024 * 1024)
#define REFERRAL_LINKS_MAX	4		/* servers reached by referral */
#define PIPELINE_MAX		4096		/* client commands in flight */
#define POLL_MAX_MS		3600000		/* poll(2) waits at most this */

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
	enum root_seen	 root;		/* in the LIST being merged */
};

/*
 * FORWARD: untagged responses go to the client; DISCARD: nowhere;
 * FILTER_LIST: a server's LIST, LSUB and LIST-STATUS responses go only
 * for names it owns: a public server's under its prefix (it has an INBOX
 * and more of its own to hide), the home server's outside every prefix;
 * NAMESPACE and CAPABILITY: that response is rewritten on its way.
 */
enum mode { FORWARD, DISCARD, FILTER_LIST, REWRITE_NAMESPACE,
    REWRITE_CAPABILITY };

/* A client command sent to a link whose tagged answer is still to come. */
struct inflight {
	char		 tag[TAG_MAX + 1];
	enum mode	 mode;		/* where its untagged answers go */
	struct reply	*keep;		/* its tagged answer is kept here */
	int		 forward;	/* and goes on to the client */
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
	struct inflight		*flight;	/* [fhead, fhead + nflight) */
	int			 fcap;
	int			 fhead;
	int			 nflight;
	int			 busy;		/* the link they are on, or -1 */
	int			 raw_for;	/* a link's "+": its next line */
	int			 want_plus;	/* a literal of ours waits */
	int			 got_plus;
	struct str		 out;		/* pipelined, to the busy link */
	struct reply		*answer;	/* link_pump's, owned */
	int			 relayed;	/* no routing: bytes pass on */
	struct resp_scanner	 client_sc;	/* relayed: the client's */
	int			 pipe[2];	/* splice(2), when it is used */
	int			 splice_off;
	struct cmd_buf		 cb;		/* the command being read */
	size_t			 send_len;	/* bytes of it to send */
	char			*enabled;	/* ENABLE arguments, to replay */
	int64_t			 last_client;
	int			 merging;	/* a LIST over several servers */
	int			 selection_lost;	/* its server went away */
	enum session_end		 end;
};

/* ------------------------------------------------------------------ */
/* the client side */

static int
client_write(struct router *rt, const char *data, size_t len)
{
	rt->client->deadline = deadline_in(rt->cfg->idle_timeout);
	if (iobuf_write(rt->client, data, len) != IO_OK) {
		rt->end = END_CLIENT_GONE;
		return -1;
	}
	return 0;
}

int
client_line(struct router *rt, const char *fmt, ...)
{
	enum io_status st;
	va_list ap;

	rt->client->deadline = deadline_in(rt->cfg->idle_timeout);
	va_start(ap, fmt);
	st = iobuf_vline(rt->client, fmt, ap);
	va_end(ap);
	if (st != IO_OK) {
		rt->end = END_CLIENT_GONE;
		return -1;
	}
	return 0;
}

/* A tagged answer on its way to the client, without a referral code:
 * referrals are for imapfe to follow, never for the client. */
static int
client_reply(struct router *rt, const struct reply *r)
{
	struct status_resp st;
	char tag[TAG_MAX + 1];

	if (r->code != CODE_REFERRAL || r->tag_len > TAG_MAX) {
		if (r->raw != NULL)
			return client_write(rt, r->raw, r->raw_len);
		return client_line(rt, "%s", r->line);
	}
	memcpy(tag, r->line, r->tag_len);
	tag[r->tag_len] = '\0';
	if (status_parse(r->line, r->len, tag, &st) != 0)
		return client_line(rt, "%s", r->line);
	return client_line(rt, "%s %s %.*s", tag, r->status == REPLY_OK ?
	    "OK" : r->status == REPLY_NO ? "NO" : "BAD", (int)st.text_len,
	    st.text);
}

/* ------------------------------------------------------------------ */
/* links */

/* A public server that failed is left alone for public_holddown. */
static void
hold_down(struct router *rt, struct link *l)
{
	l->retry_after = deadline_in(rt->cfg->public_holddown);
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

/* The link where a mailbox is selected, or home when none is. */
static int
current_link(const struct router *rt)
{
	return rt->selected >= 0 ? rt->selected : 0;
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
	/* The client still thinks a mailbox is selected: keep saying why not. */
	if (rt->selected == i)
		rt->selection_lost = 1;
}

/* A command of imapfe's own; whatever it brings back goes nowhere. */
static int
link_internal(struct router *rt, int i, const char *verb, const char *args)
{
	struct str text = { 0 };
	struct reply r;
	int rc = -1;

	if (str_printf(&text, "%s%s%s", verb, args ? " " : "",
	    args ? args : "") == 0 &&
	    backend_simple(rt->links[i].be, rt->cfg, text.s, NULL, &r) <
	    REPLY_PLUS)
		rc = 0;
	str_free(&text);
	rt->links[i].last_used = now_ms();
	if (rc != 0 && i > 0)
		link_down(rt, i, "no answer to an internal command");
	return rc;
}

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
/* LIST lines */

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
 * In FILTER_LIST mode: does the untagged response at p (len bytes, whole,
 * literals and all, its final CRLF removed) go to the client from link l?
 * A LIST, LSUB or LIST-STATUS response is parsed; anything else, or one
 * that does not parse, passes.
 */
static int
list_response_wanted(struct router *rt, struct link *l, const char *p,
    size_t len)
{
	const struct token *name;
	struct str copy = { 0 };
	struct command *c;
	int wanted = 1;

	if (!is_list_response(p, len) || (c = malloc(sizeof(*c))) == NULL)
		return 1;
	if (parse_untagged(p, len, &copy, c) == 0 &&
	    (name = listed_mailbox(c)) != NULL &&
	    !listed_name_wanted(rt, (int)(l - rt->links), name))
		wanted = 0;
	str_free(&copy);
	free(c);
	return wanted;
}

/* ------------------------------------------------------------------ */
/* reading a link's responses */

static int rewrite_namespace(struct router *, const char *, size_t,
    struct str *);
static int rewrite_capability(struct router *, const char *, size_t,
    struct str *);

/* What a line filter needs to know: whose responses these are, and how. */
struct sink_ctx {
	struct router	*rt;
	struct link	*l;
	enum mode	 mode;
};

/* A response line that the router writes on itself, rewritten. */
static enum sink_verdict
rewritten(struct router *rt, const char *line, size_t len,
    int (*rewrite)(struct router *, const char *, size_t, struct str *))
{
	struct str out = { 0 };
	int rc;

	rc = rewrite(rt, line, len, &out) != 0 || str_add(&out, "\r\n", 2) !=
	    0 ? -1 : client_write(rt, out.s, out.len);
	str_free(&out);
	return rc == 0 ? SINK_DROP : SINK_FAIL;
}

/* An untagged BYE: "* BYE" and a space or the end. */
static int
is_bye(const char *line, size_t len)
{
	return len >= 5 && strncasecmp(line, "* BYE", 5) == 0 &&
	    (len == 5 || line[5] == ' ');
}

static int
starts_with(const char *line, size_t len, const char *word)
{
	size_t wl = strlen(word);

	return len > wl && strncasecmp(line, word, wl) == 0;
}

/*
 * The first line of each untagged response of a link, before it goes to
 * the client: a public server's BYE ends only its own link, so the client
 * never sees it; LIST filtering and rewriting by mode.
 */
static enum sink_verdict
response_line(void *ctx, const char *line, size_t len)
{
	struct sink_ctx *sc = ctx;

	if (sc->l != sc->rt->links && is_bye(line, len))
		return SINK_DROP;
	switch (sc->mode) {
	case FILTER_LIST:
		return list_response_wanted(sc->rt, sc->l, line, len) ?
		    SINK_KEEP : SINK_DROP;
	case REWRITE_NAMESPACE:
		if (starts_with(line, len, "* NAMESPACE "))
			return rewritten(sc->rt, line, len, rewrite_namespace);
		return SINK_KEEP;
	case REWRITE_CAPABILITY:
		if (starts_with(line, len, "* CAPABILITY "))
			return rewritten(sc->rt, line, len,
			    rewrite_capability);
		return SINK_KEEP;
	default:
		return SINK_KEEP;
	}
}

/* The k-th command of those in flight, the oldest first. */
static struct inflight *
flight_at(const struct router *rt, int k)
{
	return &rt->flight[rt->fhead + k];
}

static int flight_find(const struct router *, const struct reply *);
static void flight_pop(struct router *, int);

/*
 * A tagged answer that may go to the client with the responses around
 * it, in one write: one the client's command waits for (or, relayed,
 * any), without a referral for imapfe to follow or a caller to keep it.
 */
static int
answer_inline(void *ctx, const struct reply *r)
{
	struct sink_ctx *sc = ctx;
	struct router *rt = sc->rt;
	int i = (int)(sc->l - rt->links), k;

	if (rt->relayed)
		return 1;
	if (r->code == CODE_REFERRAL || i != rt->busy ||
	    (k = flight_find(rt, r)) < 0 || !flight_at(rt, k)->forward ||
	    flight_at(rt, k)->keep != NULL)
		return 0;
	flight_pop(rt, k);
	return 1;
}

static int
swallow(void *ctx, const char *p, size_t n)
{
	(void)ctx;
	(void)p;
	(void)n;
	return 0;
}

/* Where link l's untagged responses go in mode m. */
static const struct resp_sink *
sink_for(struct router *rt, struct link *l, enum mode m,
    struct sink_ctx *ctx, struct resp_sink *sink)
{
	static const struct resp_sink nowhere = { .data = swallow,
	    .long_lines = 1 };

	if (m == DISCARD)
		return &nowhere;
	*ctx = (struct sink_ctx){ rt, l, m };
	*sink = (struct resp_sink){ .out = rt->client, .ctx = ctx,
	    .line = l != rt->links || m != FORWARD ? response_line : NULL,
	    .tagged = answer_inline, .long_lines = 1,
	    .whole_max = m == FILTER_LIST ? TAGGED_LINE_MAX : 0 };
	return sink;
}

/* Where link i's untagged responses go now. */
static enum mode
mode_now(const struct router *rt, int i)
{
	if (rt->busy == i && rt->nflight > 0)
		return flight_at(rt, 0)->mode;
	return i == current_link(rt) ? FORWARD : DISCARD;
}

/*
 * Command k of those in flight is answered.  Answers come in order, so
 * the first one mostly: that costs nothing, however deep the pipeline.
 */
static void
flight_pop(struct router *rt, int k)
{
	if (k == 0)
		rt->fhead++;
	else
		memmove(flight_at(rt, k), flight_at(rt, k + 1),
		    (size_t)(rt->nflight - k - 1) * sizeof(*rt->flight));
	if (--rt->nflight == 0) {
		rt->fhead = 0;
		rt->busy = -1;
	}
}

static int
flight_find(const struct router *rt, const struct reply *r)
{
	for (int k = 0; k < rt->nflight; k++)
		if (reply_is(r, flight_at(rt, k)->tag))
			return k;
	return -1;
}

/* A tagged answer from link i: the client's, or the one a caller keeps. */
static int
tagged_answer(struct router *rt, int i, const struct reply *r)
{
	int k = i == rt->busy ? flight_find(rt, r) : -1, forward;
	struct reply *keep;

	if (k < 0)	/* no command of the client's: as a relay would */
		return i == current_link(rt) ? client_reply(rt, r) : 0;
	keep = flight_at(rt, k)->keep;
	forward = flight_at(rt, k)->forward;
	flight_pop(rt, k);
	if (keep != NULL) {
		*keep = *r;
		keep->raw = NULL;	/* the buffer it points to moves on */
	}
	return forward ? client_reply(rt, r) : 0;
}

/*
 * A "+" from link i: what a literal of imapfe's waits for, or else the
 * server's to the client (IDLE's "+ idling"), whose next line then goes
 * to the link as it is (IDLE's DONE).
 */
static int
link_continuation(struct router *rt, int i, const struct reply *r)
{
	if (rt->relayed)	/* the client's bytes pass on anyway */
		return client_reply(rt, r);
	if (rt->want_plus && i == rt->busy) {
		rt->got_plus = 1;
		return 0;
	}
	if (i != current_link(rt) && i != rt->busy)
		return 0;
	rt->raw_for = i;
	return client_reply(rt, r);
}

/* Move what link i has buffered on, by the rules above. */
static int
link_pump(struct router *rt, int i)
{
	struct link *l = &rt->links[i];
	struct sink_ctx ctx;
	struct resp_sink sink;
	struct reply *r = rt->answer;
	int rc = 0;

	while (rc == 0 && rt->end == END_NONE) {
		enum dispatch d = backend_dispatch(l->be, sink_for(rt, l,
		    mode_now(rt, i), &ctx, &sink), r);

		if (d == DISPATCH_MORE || d == DISPATCH_TOOLONG)
			break;
		if (d == DISPATCH_FAILED)
			rc = -1;
		else if (d == DISPATCH_TAGGED)
			rc = tagged_answer(rt, i, r);
		else
			rc = link_continuation(rt, i, r);
	}
	if (rc != 0 && rt->end == END_NONE)
		rt->end = END_CLIENT_GONE;
	return rc;
}

/*
 * Pipelined commands wait in rt->out and leave for the busy link in one
 * write, before anything waits: one segment and one wake-up of the
 * server for a burst, as a relay would pass the burst on.
 */
static int
flush_out(struct router *rt)
{
	struct iobuf *io;
	enum io_status st;

	if (rt->out.len == 0 || rt->busy < 0) {
		rt->out.len = 0;
		return 0;
	}
	io = &rt->links[rt->busy].be->io;
	io->deadline = deadline_in(rt->cfg->backend_timeout);
	st = iobuf_write(io, rt->out.s, rt->out.len);
	rt->out.len = 0;
	return st == IO_OK ? 0 : -1;
}

/* The client's next line, as it is, to link i: after a "+" of the link's. */
static int
raw_line_to_link(struct router *rt, int i)
{
	struct iobuf *io = &rt->links[i].be->io;
	char *cl;
	size_t cllen;

	rt->raw_for = -1;
	if (flush_out(rt) != 0)
		return -2;
	rt->client->deadline = deadline_in(rt->cfg->idle_timeout);
	if (iobuf_getline(rt->client, rt->cfg->max_line_length, &cl,
	    &cllen) != IO_OK) {
		rt->end = END_CLIENT_GONE;
		return -1;
	}
	rt->last_client = now_ms();
	io->deadline = deadline_in(rt->cfg->backend_timeout);
	if (iobuf_write(io, cl, cllen) != IO_OK ||
	    iobuf_write(io, "\r\n", 2) != IO_OK)
		return -2;
	return 0;
}


/* Outcome of waiting for a link's answer. */
enum wait_result {
	W_DONE,			/* what was waited for came */
	W_LINK_DOWN,
	W_CLIENT_GONE,
	W_TIMEOUT
};

static int
flight_has(const struct router *rt, const char *tag)
{
	for (int k = 0; k < rt->nflight; k++)
		if (strcmp(flight_at(rt, k)->tag, tag) == 0)
			return 1;
	return 0;
}

/* Has what the caller waits for come: tag's answer, a "+", or calm? */
static int
wait_over(const struct router *rt, int i, const char *tag)
{
	if (rt->want_plus)
		return rt->got_plus || (tag != NULL && !flight_has(rt, tag));
	if (tag != NULL)
		return !flight_has(rt, tag);
	return rt->busy != i;
}

/*
 * Wait on link i until tag is answered (or, with want_plus, until the
 * link says "+"; tag NULL: until no client command is in flight there).
 * A "+" the link sends to the client in between lets the client's next
 * line through: that is how IDLE's DONE travels.
 */
static enum wait_result
link_wait(struct router *rt, int i, const char *tag)
{
	struct iobuf *io = &rt->links[i].be->io;

	if (flush_out(rt) != 0)
		return W_LINK_DOWN;
	for (;;) {
		struct pollfd pfd[2];
		int client = rt->raw_for == i;
		enum io_status st;
		int64_t left;

		if (link_pump(rt, i) != 0)
			return W_CLIENT_GONE;
		if (wait_over(rt, i, tag))
			return W_DONE;
		if (client && iobuf_pending(rt->client) > 0 &&
		    memchr(rt->client->buf + rt->client->start, '\n',
		    iobuf_pending(rt->client)) != NULL) {
			int rc = raw_line_to_link(rt, i);

			if (rc != 0)
				return rc == -1 ? W_CLIENT_GONE : W_LINK_DOWN;
			continue;
		}
		left = rt->last_client + (int64_t)rt->cfg->idle_timeout *
		    1000 - now_ms();
		if (left < 0)
			return W_TIMEOUT;
		if (iobuf_has_decrypted(io) || (client &&
		    iobuf_has_decrypted(rt->client)))
			left = 0;
		pfd[0] = (struct pollfd){ .fd = io->rfd, .events = POLLIN };
		pfd[1] = (struct pollfd){ .fd = client ? rt->client->rfd : -1,
		    .events = POLLIN };
		if (poll_wait(pfd, 2, (int)(left > POLL_MAX_MS ? POLL_MAX_MS :
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
		if (client && (pfd[1].revents != 0 ||
		    iobuf_has_decrypted(rt->client))) {
			st = iobuf_try_fill(rt->client);
			if (st != IO_OK && st != IO_AGAIN)
				return W_CLIENT_GONE;
		}
	}
}

/* Room for one more command in flight: the array moved down or grown. */
static int
flight_room(struct router *rt)
{
	struct inflight *f;
	int cap;

	if (rt->fhead + rt->nflight < rt->fcap)
		return 0;
	if (rt->fhead > 0) {
		memmove(rt->flight, flight_at(rt, 0), (size_t)rt->nflight *
		    sizeof(*rt->flight));
		rt->fhead = 0;
		return 0;
	}
	cap = rt->fcap > 0 ? rt->fcap * 2 : 16;
	if ((f = realloc(rt->flight, (size_t)cap * sizeof(*f))) == NULL)
		return -1;
	rt->flight = f;
	rt->fcap = cap;
	return 0;
}

/* Record a client command as sent to link i. */
static int
flight_add(struct router *rt, int i, const char *tag, enum mode m,
    struct reply *keep, int forward)
{
	struct inflight *f;

	if (rt->nflight == PIPELINE_MAX || strlen(tag) > TAG_MAX ||
	    (rt->busy >= 0 && rt->busy != i) || flight_room(rt) != 0)
		return -1;
	f = flight_at(rt, rt->nflight++);
	snprintf(f->tag, sizeof(f->tag), "%s", tag);
	f->mode = m;
	f->keep = keep;
	f->forward = forward;
	rt->busy = i;
	rt->links[i].last_used = now_ms();
	return 0;
}

/* Forget what was in flight on link i: it is gone. */
static void
flight_drop(struct router *rt, int i)
{
	if (rt->busy != i)
		return;
	rt->nflight = rt->fhead = 0;
	rt->busy = -1;
	rt->want_plus = 0;
	if (rt->raw_for == i)
		rt->raw_for = -1;
}

/* ------------------------------------------------------------------ */
/* reading a client command */

/* Routed, after login: literals are held up to SMALL_LITERAL_MAX, larger
 * ones streamed; long UID sets are normal, the buffer is the line limit. */
static void
routed_limits(const struct router *rt, struct cmd_limits *lim)
{
	*lim = (struct cmd_limits){ .line_max = rt->client->cap - 2,
	    .command_max = BUFFERED_COMMAND_MAX,
	    .literal_max = rt->cfg->max_literal_size,
	    .hold_max = SMALL_LITERAL_MAX, .toobig = 1,
	    .literal_name = "max_literal_size" };
}

enum read_result { RD_COMMAND, RD_ANSWERED, RD_END };

/* The client's next command, or the end of the session. */
static enum read_result
read_command(struct router *rt)
{
	struct cmd_limits lim;
	enum cmd_status st;

	routed_limits(rt, &lim);
	rt->client->deadline = rt->last_client +
	    (int64_t)rt->cfg->idle_timeout * 1000;
	rt->cb.continuing = 0;
	st = cmd_read(rt->client, &lim, &rt->cb);
	rt->last_client = now_ms();
	rt->send_len = rt->cb.text.len;
	switch (st) {
	case CMD_COMPLETE:
	case CMD_STREAM:
		return RD_COMMAND;
	case CMD_BAD_LITERAL:
	case CMD_ANSWERED:
		return RD_ANSWERED;
	case CMD_END:
		break;
	}
	if (rt->cb.bye != NULL)
		router_bye(rt, rt->cb.end, rt->cb.bye);
	rt->end = rt->cb.end;
	return RD_END;
}

/* ------------------------------------------------------------------ */
/* sending a command */

/* Wait for link i's "+" to a literal of ours, or the command's answer. */
static enum wait_result
wait_plus(struct router *rt, int i, const char *tag, int *answered)
{
	enum wait_result w;

	rt->want_plus = 1;
	rt->got_plus = 0;
	w = link_wait(rt, i, tag);
	rt->want_plus = 0;
	*answered = w == W_DONE && !rt->got_plus;
	return w;
}

/*
 * Send the buffered command to link i, piece by piece: after each literal
 * announcement the link must say "+" before the literal goes.  A tagged
 * answer instead ends the command early (*answered).
 */
static enum wait_result
send_buffered(struct router *rt, int i, const char *tag, int *answered)
{
	struct iobuf *io = &rt->links[i].be->io;
	size_t from = 0, len = rt->send_len;
	enum wait_result w;

	*answered = 0;
	for (int c = 0; c <= rt->cb.ncuts; c++) {
		size_t to = c < rt->cb.ncuts ? rt->cb.cuts[c] : len;

		if (to > len)
			to = len;
		io->deadline = deadline_in(rt->cfg->backend_timeout);
		if (to > from && iobuf_write(io, rt->cb.text.s + from, to - from) !=
		    IO_OK)
			return W_LINK_DOWN;
		from = to;
		if (c == rt->cb.ncuts || to == len)
			break;
		if ((w = wait_plus(rt, i, tag, answered)) != W_DONE ||
		    *answered)
			return w;
	}
	return W_DONE;
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
			src->deadline = deadline_in(wait_s);
			if (iobuf_fill(src) != IO_OK)
				return -1;
			continue;
		}
		if (avail > n)
			avail = (size_t)n;
		if (dst != NULL) {
			dst->deadline = deadline_in(rt->cfg->backend_timeout);
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
 * BYE after link i failed, where the client can read it as one: a partial
 * response line of the link's is ended first, and inside one of its
 * literals no BYE is sent at all, since it would become message data.
 */
static void
bye_after_link(struct router *rt, int i, const char *text)
{
	const struct resp_scanner *sc = &rt->links[i].be->sc;

	if (sc->literal_left > 0) {
		log_msg(LOG_NOTICE, "event=bye-withheld reason=\"inside a "
		    "literal of the back-end's\"");
		return;
	}
	if (!resp_scan_at_start(sc) && client_write(rt, "\r\n", 2) != 0)
		return;
	client_line(rt, "* BYE %s", text);
}

/* The link whose answers the client is reading now. */
static int
answering_link(const struct router *rt)
{
	return rt->busy >= 0 ? rt->busy : current_link(rt);
}

/* End the session with a BYE the client can read as one. */
void
router_bye(struct router *rt, enum session_end end, const char *text)
{
	bye_after_link(rt, answering_link(rt), text);
	rt->end = end;
}

/*
 * What a lost link left of a response line goes on to the client, when
 * the client was reading that link's answers, as a relay would pass it:
 * what imapfe says next then ends that line first.
 */
static void
link_flush_partial(struct router *rt, int i)
{
	struct backend *be = rt->links[i].be;
	const char *p = be->io.buf + be->io.start;
	size_t n = iobuf_pending(&be->io);

	if (n == 0 || be->dropping || i != answering_link(rt) ||
	    mode_now(rt, i) == DISCARD || client_write(rt, p, n) != 0)
		return;
	resp_scan(&be->sc, p, n);
	iobuf_consume(&be->io, n);
}

/*
 * The rest of a command whose literal is too big to hold: each such
 * literal streams from the client to the link once the link said "+",
 * and what follows it is read and sent as any command is.
 */
static enum wait_result
stream_rest(struct router *rt, int i, const char *tag, int *answered)
{
	struct cmd_limits lim;
	enum wait_result w;
	enum cmd_status st;
	int rc;

	routed_limits(rt, &lim);
	do {
		if ((w = wait_plus(rt, i, tag, answered)) != W_DONE ||
		    *answered)
			return w;
		if (rt->cb.stream_sync && client_line(rt, "+ Ready for literal "
		    "data") != 0)
			return W_CLIENT_GONE;
		rc = pump(rt, rt->client, rt->cfg->idle_timeout,
		    &rt->links[i].be->io, rt->cb.stream_left);
		if (rc != 0)
			return rc == -1 ? W_CLIENT_GONE : W_LINK_DOWN;
		rt->last_client = now_ms();
		rt->cb.continuing = 1;
		st = cmd_read(rt->client, &lim, &rt->cb);
		rt->cb.continuing = 0;
		if (st == CMD_END) {
			/* the link holds half a command: the session ends */
			if (rt->cb.bye != NULL)
				bye_after_link(rt, i, rt->cb.bye);
			rt->end = rt->cb.end;
			return W_CLIENT_GONE;
		}
		rt->send_len = rt->cb.text.len;
		if ((w = send_buffered(rt, i, tag, answered)) != W_DONE ||
		    *answered)
			return w;
	} while (st == CMD_STREAM);
	return W_DONE;	/* (cmd_read left stream_left 0: all of it went) */
}

/* ------------------------------------------------------------------ */
/* running one command on one link */


/* Every client command in flight on lost public link i gets its NO. */
static void
flight_unavailable(struct router *rt, int i, const char *tag)
{
	int had = rt->busy == i ? rt->nflight : 0;

	for (int k = 0; k < had; k++)
		if (tag == NULL || strcmp(flight_at(rt, k)->tag, tag) != 0)
			client_line(rt, "%s NO [UNAVAILABLE] Public folder "
			    "server connection lost.", flight_at(rt, k)->tag);
	flight_drop(rt, i);
	if (tag != NULL)
		client_line(rt, "%s NO [UNAVAILABLE] Public folder server "
		    "connection lost.", tag);
}

static void
command_failed_on_link(struct router *rt, int i, const char *tag,
    enum wait_result w)
{
	const struct resp_scanner *sc = &rt->links[i].be->sc;

	if (w == W_CLIENT_GONE) {
		if (rt->end == END_NONE)
			rt->end = END_CLIENT_GONE;
		return;
	}
	if (w == W_TIMEOUT) {
		bye_after_link(rt, i, "Disconnected for inactivity.");
		rt->end = END_TIMEOUT;
		return;
	}
	link_flush_partial(rt, i);
	if (i == 0) {
		if (rt->links[0].be->io.tls_why[0] != '\0')
			log_msg(LOG_NOTICE, "event=tls-error side=backend "
			    "reason=\"%s\"", rt->links[0].be->io.tls_why);
		if (!sc->saw_bye)
			bye_after_link(rt, 0, "Back-end server closed the "
			    "connection.");
		rt->end = sc->saw_bye ? END_LOGOUT : END_BACKEND_GONE;
		return;
	}
	if (sc->literal_left > 0) {
		/* The client is inside the lost server's literal: no answer
		 * can reach it as one, so the session ends here. */
		bye_after_link(rt, i, "");
		link_down(rt, i, "connection lost");
		rt->end = END_BACKEND_GONE;
		return;
	}
	if (!resp_scan_at_start(sc) && client_write(rt, "\r\n", 2) != 0)
		return;
	link_down(rt, i, "connection lost");
	if (rt->merging) {	/* the home server's answer is still to come */
		flight_drop(rt, i);
		client_line(rt, "* NO [UNAVAILABLE] The server for \"%s\" was "
		    "lost.", rt->links[i].route->pattern);
	}
	else
		flight_unavailable(rt, i, tag);
}

/*
 * A command whose streamed literal did not go (refused before the "+",
 * its server unavailable or lost): what the client sends of it anyway,
 * a non-synchronizing literal and the rest of the command, is read and
 * dropped, so that none of it is taken for a command.  A synchronizing
 * one the client never sends: it has its answer.
 */
static void
discard_rest(struct router *rt)
{
	struct cmd_limits lim;
	enum cmd_status st = CMD_STREAM;

	routed_limits(rt, &lim);
	while (st == CMD_STREAM && rt->cb.stream_left > 0 &&
	    !rt->cb.stream_sync && rt->end == END_NONE) {
		if (pump(rt, rt->client, rt->cfg->idle_timeout, NULL,
		    rt->cb.stream_left) != 0) {
			rt->end = END_CLIENT_GONE;
			break;
		}
		rt->cb.continuing = 1;
		st = cmd_read(rt->client, &lim, &rt->cb);
		rt->cb.continuing = 0;
		if (st == CMD_END) {
			if (rt->cb.bye != NULL)
				router_bye(rt, rt->cb.end, rt->cb.bye);
			rt->end = rt->cb.end;
		}
	}
	rt->cb.stream_left = 0;
}

/* The commands in flight are answered: the next may run alone. */
static int
wait_idle(struct router *rt)
{
	enum wait_result w;
	int i = rt->busy;

	if (i < 0)
		return 0;
	if ((w = link_wait(rt, i, NULL)) == W_DONE)
		return 0;
	command_failed_on_link(rt, i, NULL, w);
	return -1;
}

/*
 * Send the current command to link i and relay its answers in mode m.
 * The tagged answer goes to the client, unless keep (then it is left
 * there).  Waits first for the client commands in flight elsewhere.
 */
static enum reply_status
run_on_link_as(struct router *rt, int i, const char *tag, enum mode m,
    struct reply *keep)
{
	struct reply *r = keep != NULL ? keep : malloc(sizeof(*r));
	enum wait_result w;
	int answered = 0;

	if (r == NULL) {
		router_bye(rt, END_LIMIT, "Out of memory.");
		return REPLY_LOST;
	}
	r->status = REPLY_LOST;
	if (wait_idle(rt) != 0)
		;
	else if (flight_add(rt, i, tag, m, r, keep == NULL) != 0)
		client_line(rt, "%s BAD Tag too long.", tag);
	else {
		w = send_buffered(rt, i, tag, &answered);
		if (w == W_DONE && !answered && rt->cb.stream_left > 0)
			w = stream_rest(rt, i, tag, &answered);
		if (w == W_DONE && !answered)
			w = link_wait(rt, i, tag);
		if (w != W_DONE) {
			command_failed_on_link(rt, i, tag, w);
			r->status = REPLY_LOST;
		}
	}
	if (keep == NULL) {
		enum reply_status rs = r->status;

		free(r);
		return rs;
	}
	return r->status;
}

static enum reply_status
run_on_link(struct router *rt, int i, const char *tag, struct reply *keep)
{
	return run_on_link_as(rt, i, tag, FORWARD, keep);
}

/*
 * A command for link i that need not wait for the answers before it:
 * written at once, its answers streamed back when they come.
 */
static void
send_pipelined(struct router *rt, int i, const char *tag)
{
	flight_add(rt, i, tag, FORWARD, NULL, 1);
	if (str_add(&rt->out, rt->cb.text.s, rt->send_len) != 0) {
		router_bye(rt, END_LIMIT, "Out of memory.");
	}
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

	if (rt->cb.stream_left > 0) {
		const char *open = memrchr(rt->cb.text.s, '{', len);

		len = open != NULL ? (size_t)(open - rt->cb.text.s) : 0;
	} else
		len -= 2;		/* the final CRLF */
	while (len > 0 && rt->cb.text.s[len - 1] == ' ')
		len--;
	str_wipe(copy);
	if (str_add(copy, rt->cb.text.s, len) != 0 || str_add(copy, "", 1) != 0)
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

int
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
		if (rt->cb.text.s[at] == '\\')
			at++;
		else if (rt->cb.text.s[at] == '"')
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
	if (rt->cb.ncuts > 0 || rt->cb.stream_left > 0)
		return "the command carries a literal";
	if (is_home(rt, r))
		return "loop";
	return NULL;
}

/*
 * Send a command composed by the router for the client (its tag) to link
 * i, and wait for the answer, kept in keep.  The command holds no literal.
 */
static enum reply_status
run_text_on_link(struct router *rt, int i, const char *tag,
    const struct str *text, struct reply *keep)
{
	struct iobuf *io = &rt->links[i].be->io;
	enum wait_result w = W_LINK_DOWN;

	keep->status = REPLY_LOST;
	if (flight_add(rt, i, tag, FORWARD, keep, 0) != 0)
		return REPLY_LOST;
	io->deadline = deadline_in(rt->cfg->backend_timeout);
	if (iobuf_write(io, text->s, text->len) == IO_OK)
		w = link_wait(rt, i, tag);
	if (w != W_DONE) {
		command_failed_on_link(rt, i, tag, w);
		return REPLY_LOST;
	}
	return keep->status;
}

/* Run the command on link j for the mailbox a referral names. */
static enum reply_status
run_referred(struct router *rt, const struct command *c, size_t name_end,
    int j, const char *mailbox, struct reply *r)
{
	struct str cmd = { 0 };
	enum reply_status rs = REPLY_LOST;

	if (str_printf(&cmd, "%s %s ", c->tag, c->name) == 0 &&
	    imap_append_string(&cmd, mailbox, strlen(mailbox), 0) == 0 &&
	    str_add(&cmd, rt->cb.text.s + name_end, rt->send_len - name_end) == 0)
		rs = run_text_on_link(rt, j, c->tag, &cmd, r);
	else {
		router_bye(rt, END_LIMIT, "Out of memory.");
	}
	str_free(&cmd);
	return rs;
}

/*
 * A mailbox command that link *at answered "NO [REFERRAL imap://server/
 * mailbox]": run it there, if the server is configured, for clients that
 * know nothing of referrals, and so on for a few hops.  *at becomes the
 * link that answered last; its answer is in r.  REPLY_LOST: the client
 * has had its answer already, or the session is over.
 */
static enum reply_status
follow_mailbox_referral(struct router *rt, const struct command *c,
    size_t name_end, int *at, struct reply *r)
{
	const struct route *tried[REFERRAL_HOPS_MAX + 1] = {
	    rt->links[*at].route };
	enum reply_status rs = r->status;
	int hops = 0;

	while (rs == REPLY_NO && r->code == CODE_REFERRAL) {
		const struct route *next;
		struct referral ref;
		const char *why;
		int j;

		if ((next = referral_target(rt->cfg, r->line, &ref,
		    rt->user)) == NULL)
			break;
		if ((why = referral_unfollowable(rt, &ref, next)) != NULL) {
			referral_refused(rt->user, &ref, why);
			break;
		}
		if (!referral_allowed(rt->cfg, tried, hops, next, &ref,
		    rt->user))
			break;
		if ((j = referral_link(rt, next)) < 0) {
			referral_refused(rt->user, &ref, "too many servers "
			    "reached by referral");
			break;
		}
		if (link_up(rt, j) != 0) {
			client_line(rt, "%s NO [UNAVAILABLE] The server "
			    "holding this mailbox is unavailable.", c->tag);
			return REPLY_LOST;
		}
		log_msg(LOG_INFO, "event=referral kind=mailbox user=\"%s\" "
		    "to=%s:%s", rt->user, next->host, next->port);
		rs = run_referred(rt, c, name_end, j, ref.mailbox, r);
		tried[++hops] = next;
		*at = j;
	}
	return rs;
}

/* ------------------------------------------------------------------ */
/* commands */

/* A command for the mailbox on link i (SELECT and friends included). */
static void
cmd_mailbox(struct router *rt, const struct command *c, int i,
    size_t name_end)
{
	int selecting = strcmp(c->name, "SELECT") == 0 ||
	    strcmp(c->name, "EXAMINE") == 0;
	struct reply *r;
	enum reply_status rs;

	if (selecting) {
		/* Even a failed SELECT leaves nothing selected (RFC 9051). */
		if (rt->selected >= 0 && (rt->selected != i ||
		    rt->selection_lost))
			leave_selected(rt);
		rt->selection_lost = 0;
	}
	if (i > 0 && public_unavailable(rt, i, c->tag))
		return;
	if ((r = malloc(sizeof(*r))) == NULL) {
		router_bye(rt, END_LIMIT, "Out of memory.");
		return;
	}
	rs = run_on_link(rt, i, c->tag, r);
	if (rs == REPLY_NO && strcmp(c->name, "APPEND") != 0)
		rs = follow_mailbox_referral(rt, c, name_end, &i, r);
	if (rs != REPLY_LOST)
		client_reply(rt, r);
	if (selecting)
		rt->selected = rs == REPLY_OK ? i : -1;
	free(r);
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
	struct reply *r = malloc(2 * sizeof(*r)), *answer = r + 1;
	int home = list_needs(rt, c, 0);
	enum reply_status rs;

	if (r == NULL) {
		router_bye(rt, END_LIMIT, "Out of memory.");
		return;
	}
	answer->status = REPLY_LOST;
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
		rs = run_on_link_as(rt, i, c->tag, FILTER_LIST, r);
		rt->merging = 0;
		if (rt->end != END_NONE)
			goto out;
		if (rs == REPLY_OK && l->root == ROOT_UNASKED &&
		    !lists_subscriptions(c))
			l->root = ROOT_MISSING;
		if (rs != REPLY_LOST)
			*answer = *r;
	}
	if (home && run_on_link_as(rt, 0, c->tag, FILTER_LIST, answer) ==
	    REPLY_LOST)
		goto out;
	if (answer->status != REPLY_LOST)
		client_reply(rt, answer);
	else
		client_line(rt, "%s NO [UNAVAILABLE] The public folder servers "
		    "are unavailable, try again later.", c->tag);
out:
	free(r);
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
/* what copy.c (COPY and MOVE between servers) uses */

struct backend *
router_backend(struct router *rt, int i)
{
	return rt->links[i].be;
}

const struct config *
router_config(const struct router *rt)
{
	return rt->cfg;
}

struct iobuf *
router_client(struct router *rt)
{
	return rt->client;
}

const char *
router_user(const struct router *rt)
{
	return rt->user;
}

/* Link i was lost in the middle of the command tagged tag. */
void
router_link_lost(struct router *rt, int i, const char *tag)
{
	command_failed_on_link(rt, i, tag, W_LINK_DOWN);
}

/* An untagged response of link i's that no client command asked for. */
enum sink_verdict
router_untagged(struct router *rt, int i, const char *line, size_t len)
{
	struct sink_ctx sc = { rt, &rt->links[i], FORWARD };

	return response_line(&sc, line, len);
}

/* One internal command on link i, its untagged answers to the client. */
enum reply_status
router_link_command(struct router *rt, int i, const char *text)
{
	struct sink_ctx ctx;
	struct resp_sink sink;
	struct reply *r = malloc(sizeof(*r));
	enum reply_status rs = REPLY_LOST;

	if (r != NULL)
		rs = backend_simple(rt->links[i].be, rt->cfg, text,
		    sink_for(rt, &rt->links[i], FORWARD, &ctx, &sink), r);
	free(r);
	return rs;
}

/* Leave link i (not the client's selected one) with nothing selected. */
void
router_unselect(struct router *rt, int i)
{
	deselect(rt, i);
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
	for (int i = 1; i < rt->nlinks; i++)
		if (rt->links[i].up) {
			link_internal(rt, i, "LOGOUT", NULL);
			backend_close(rt->links[i].be);
			rt->links[i].up = 0;
		}
	if (run_on_link(rt, 0, c->tag, NULL) != REPLY_LOST &&
	    rt->end == END_NONE)
		rt->end = END_LOGOUT;
}

/*
 * ENABLE runs at home and is remembered for servers reached later: its
 * capability names, atoms all (RFC 5161), composed anew; anything else
 * in the command is not replayed.
 */
static void
cmd_enable(struct router *rt, const struct command *c)
{
	struct str args = { 0 };
	int ok = 1;

	if (run_on_link(rt, 0, c->tag, NULL) != REPLY_OK)
		return;
	for (size_t k = 0; k < c->ntok && ok; k++)
		if (c->tok[k].type == TOK_ATOM)
			ok = (args.len == 0 || str_add(&args, " ", 1) == 0) &&
			    str_add(&args, c->tok[k].s, c->tok[k].len) == 0;
	free(rt->enabled);
	rt->enabled = NULL;
	if (ok && args.len > 0 && str_add(&args, "", 1) == 0) {
		rt->enabled = args.s;	/* the router owns it from here */
		args.s = NULL;
	}
	str_free(&args);
	for (int i = 1; i < rt->nlinks && rt->enabled != NULL; i++)
		if (rt->links[i].up)
			link_internal(rt, i, "ENABLE", rt->enabled);
}

/* Commands that may change which server is selected, or span servers. */
static int
runs_alone(const char *name)
{
	static const char *const names[] = { "LIST", "LSUB", "NAMESPACE",
	    "CAPABILITY", "LOGOUT", "ENABLE", "RENAME", "CLOSE", "UNSELECT",
	    "SELECT", "EXAMINE" };

	for (size_t i = 0; i < sizeof(names) / sizeof(*names); i++)
		if (strcmp(name, names[i]) == 0)
			return 1;
	return names_mailbox(name);
}

/*
 * May this command go to the selected mailbox's server at once, behind
 * the commands in flight there?  Only when it needs no other server, all
 * of it is at hand, and nothing about the selection is in question.
 */
static int
pipelinable(const struct router *rt, const struct command *c,
    const char *name, size_t first)
{
	int cur = current_link(rt);

	if (rt->cb.ncuts > 0 || rt->cb.stream_left > 0 || rt->selection_lost ||
	    !rt->links[cur].up || rt->raw_for >= 0 || runs_alone(name) ||
	    (rt->busy >= 0 && rt->busy != cur) ||
	    rt->nflight == PIPELINE_MAX)
		return 0;
	if (strcmp(name, "COPY") == 0 || strcmp(name, "MOVE") == 0) {
		const struct token *dst = &c->tok[c->ntok - 1];

		return c->ntok >= first + 2 && is_mailbox_token(dst) &&
		    mailbox_link(rt, dst->s, dst->len) == cur;
	}
	return 1;
}


static void
dispatch(struct router *rt)
{
	struct str copy = { 0 };
	struct command *c = malloc(sizeof(*c));
	const char *why, *name;
	char sub[16];
	enum parse_status ps;
	int target = -2;
	size_t first = 0;

	if (c == NULL) {
		router_bye(rt, END_LIMIT, "Out of memory.");
		return;
	}
	ps = parse_copy(rt, &copy, c, &why);
	if (ps != PARSE_OK || strlen(c->tag) > TAG_MAX) {
		/* the current server answers malformed commands as it would */
		char tag[TAG_MAX + 2];

		early_tag(rt->cb.text.s, rt->send_len, tag, sizeof(tag));
		if (wait_idle(rt) != 0)
			;
		else if (ps == PARSE_NOTAG || strlen(tag) > TAG_MAX ||
		    strcmp(tag, "*") == 0)
			client_line(rt, "* BAD %s", ps == PARSE_OK ?
			    "Tag too long." : why);
		else
			run_on_link(rt, current_link(rt), tag, NULL);
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
	if (pipelinable(rt, c, name, first)) {
		send_pipelined(rt, current_link(rt), c->tag);
		goto out;
	}
	if (wait_idle(rt) != 0)
		goto out;
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
		run_on_link_as(rt, 0, c->tag, REWRITE_NAMESPACE, NULL);
	else if (strcmp(name, "CAPABILITY") == 0)
		run_on_link_as(rt, 0, c->tag, REWRITE_CAPABILITY, NULL);
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

		if (run_on_link(rt, target, c->tag, NULL) == REPLY_OK &&
		    closing)
			rt->selected = -1;
	}
out:
	if (rt->cb.stream_left > 0 && rt->end == END_NONE)
		discard_rest(rt);
	str_free(&copy);
	free(c);
}

/* ------------------------------------------------------------------ */
/* the loop */

/* What the links have sent: the selected server's goes to the client. */
static int
drain_links(struct router *rt)
{
	for (int i = 0; i < rt->nlinks && rt->end == END_NONE; i++)
		if (rt->links[i].up && link_pump(rt, i) != 0)
			return -1;
	return rt->end == END_NONE ? 0 : -1;
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

	for (int i = 0; i < rt->nlinks && rt->end == END_NONE; i++) {
		struct link *l = &rt->links[i];

		if (!l->up || i == current_link(rt) || i == rt->busy)
			continue;
		if (now - l->last_used >= KEEPALIVE_MS) {
			if (link_internal(rt, i, "NOOP", NULL) != 0 && i == 0) {
				command_failed_on_link(rt, 0, NULL,
				    W_LINK_DOWN);
				return 0;
			}
			l->last_used = now;
		}
		if (l->last_used + KEEPALIVE_MS < next)
			next = l->last_used + KEEPALIVE_MS;
	}
	return next - now;
}

/* A link whose connection failed while the router waited for input. */
static void
link_failed(struct router *rt, int i)
{
	if (i == 0) {
		command_failed_on_link(rt, 0, NULL, W_LINK_DOWN);
		return;
	}
	if (rt->busy == i)
		command_failed_on_link(rt, i, NULL, W_LINK_DOWN);
	else
		link_down(rt, i, "connection closed");
}

/*
 * The literal the client's next whole line announces (LIT_NONE without
 * one), or -1 while no whole line is buffered.
 */
static int
next_line_literal(const struct router *rt)
{
	const struct iobuf *c = rt->client;
	const char *p = c->buf + c->start;
	const char *lf = memchr(p, '\n', iobuf_pending(c));
	size_t len;
	uint64_t n;

	if (lf == NULL)
		return -1;
	len = (size_t)(lf - p);
	if (len > 0 && p[len - 1] == '\r')
		len--;
	return (int)literal_at_end(p, len, &n);
}

/*
 * Can the client's next command be taken now?  A line that announces a
 * literal makes imapfe answer it ("+", or a refusal): not while the
 * answers in flight stand inside a response, where that would land.
 * Other lines are read at once, the pipeline kept full.  (The client's
 * bytes meanwhile wait in the socket.)
 */
static int
client_may_send(const struct router *rt)
{
	int i = answering_link(rt);

	if (rt->relayed)	/* bytes, passed on as they come */
		return 1;
	if (rt->nflight == PIPELINE_MAX)
		return 0;
	return next_line_literal(rt) == LIT_NONE || !rt->links[i].up ||
	    resp_scan_at_start(&rt->links[i].be->sc);
}

/* Literal bodies at least this long go from a plain back-end to a plain
 * client through a pipe with splice(2); shorter ones are not worth it. */
#define SPLICE_MIN	(16 * 1024)
#define SPLICE_MAX	(1024 * 1024)

/* May link i's next bytes go to the client by splice(2), uncopied? */
static int
can_splice(const struct router *rt, int i)
{
	const struct backend *be = rt->links[i].be;

	/* (-D traces what passes through the buffers: none of splice) */
	return !rt->splice_off && !protocol_trace && be->io.ssl == NULL &&
	    rt->client->ssl == NULL && iobuf_pending(&be->io) == 0 &&
	    be->sc.literal_left >= SPLICE_MIN && !be->dropping &&
	    i == current_link(rt) && mode_now(rt, i) == FORWARD;
}

/*
 * Read from link i: into its buffer, or, inside a long literal bound for
 * the client, straight on to the client (the scanner needs the count).
 */
static enum io_status
link_read(struct router *rt, int i)
{
	struct backend *be = rt->links[i].be;
	size_t moved;
	int to_failed;
	enum io_status st;

	if (!can_splice(rt, i))
		return iobuf_try_fill(&be->io);
	if (rt->pipe[0] < 0 && pipe2(rt->pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
		rt->splice_off = 1;
		return iobuf_try_fill(&be->io);
	}
	rt->client->deadline = deadline_in(rt->cfg->idle_timeout);
	st = iobuf_splice(&be->io, rt->client, rt->pipe,
	    be->sc.literal_left > SPLICE_MAX ? SPLICE_MAX :
	    (size_t)be->sc.literal_left, &moved, &to_failed);
	be->sc.literal_left -= moved;
	if (st == IO_UNSUPPORTED) {
		rt->splice_off = 1;
		return iobuf_try_fill(&be->io);
	}
	if (to_failed) {
		rt->end = END_CLIENT_GONE;
		return IO_ERROR;
	}
	return st;
}

static void
wait_for_input(struct router *rt, struct pollfd *pfd, int *map)
{
	int n = 0;
	int64_t keep, left = rt->last_client +
	    (int64_t)rt->cfg->idle_timeout * 1000 - now_ms();

	if (left <= 0) {
		router_bye(rt, END_TIMEOUT, "Disconnected for inactivity.");
		return;
	}
	if ((keep = keepalives(rt)) < left)
		left = keep;
	if (rt->end == END_NONE && flush_out(rt) != 0)
		link_failed(rt, rt->busy);
	if (rt->end != END_NONE)
		return;
	pfd[n] = (struct pollfd){ .fd = client_may_send(rt) ?
	    rt->client->rfd : -1, .events = POLLIN };
	map[n++] = -1;
	for (int i = 0; i < rt->nlinks; i++)
		if (rt->links[i].up) {
			if (iobuf_has_decrypted(&rt->links[i].be->io))
				left = 0;
			pfd[n] = (struct pollfd){ .fd = rt->links[i].be->io.rfd,
			    .events = POLLIN };
			map[n++] = i;
		}
	if (client_may_send(rt) && iobuf_has_decrypted(rt->client))
		left = 0;
	if (poll_wait(pfd, (nfds_t)n, (int)(left > POLL_MAX_MS ? POLL_MAX_MS :
	    left)) < 0) {
		if (errno == EINTR && shutdown_requested)
			router_bye(rt, END_SHUTDOWN, "Server shutting down.");
		return;
	}
	for (int k = 1; k < n && rt->end == END_NONE; k++) {
		int i = map[k];
		enum io_status st;

		if (pfd[k].revents == 0 &&
		    !iobuf_has_decrypted(&rt->links[i].be->io))
			continue;
		st = link_read(rt, i);
		if (st == IO_OK || st == IO_AGAIN)
			continue;
		if (rt->end != END_NONE)
			break;
		if (link_pump(rt, i) == 0)
			link_failed(rt, i);
	}
	if (rt->end == END_NONE && (pfd[0].revents != 0 ||
	    (client_may_send(rt) && iobuf_has_decrypted(rt->client)))) {
		enum io_status st = iobuf_try_fill(rt->client);

		if (st == IO_OK)
			rt->last_client = now_ms();
		else if (st != IO_AGAIN)
			rt->end = END_CLIENT_GONE;
	}
}

/* ------------------------------------------------------------------ */
/* the relay: one back-end, nothing to route */

/* A run of the client's bytes, on to the back-end. */
static int
relay_to_backend(struct router *rt, const char *p, size_t n)
{
	struct iobuf *b = &rt->links[0].be->io;

	if (n == 0)
		return 0;
	b->deadline = deadline_in(rt->cfg->backend_timeout);
	if (iobuf_write(b, p, n) == IO_OK)
		return 0;
	link_failed(rt, 0);
	return -1;
}

/*
 * A literal over max_literal_size, announced at the end of the client's
 * line: refused with TOOBIG (RFC 9051 7.1) when the client waits for "+"
 * before sending it and nothing of its command has gone on yet, as when
 * routed; with BYE when it is on its way, or the back-end holds half a
 * command.  Returns 0 when the session goes on.
 */
static int
relay_literal_too_large(struct router *rt, const char *line, size_t len,
    enum literal_kind k, uint64_t n)
{
	char tag[TAG_MAX + 2];

	log_msg(LOG_NOTICE, "event=limit reason=\"literal of %llu bytes, more "
	    "than max_literal_size\"", (unsigned long long)n);
	if (k == LIT_SYNC && resp_scan_at_start(&rt->client_sc)) {
		early_tag(line, len, tag, sizeof(tag));
		return client_line(rt, "%s NO [TOOBIG] Literal too large.",
		    tag);
	}
	bye_after_link(rt, 0, "Literal too large.");
	rt->end = END_LIMIT;
	return -1;
}

/*
 * Relayed, the client's bytes go to the back-end as they come, in one
 * write for all that is whole, read only by the scanner that follows the
 * literals they announce.
 */
static void
relay_client(struct router *rt)
{
	struct iobuf *c = rt->client;
	const char *p = c->buf + c->start;
	size_t n = iobuf_pending(c), used = 0, from = 0;

	while (used < n && rt->end == END_NONE) {
		size_t k = resp_scan_piece(&rt->client_sc, p + used, n - used);
		enum literal_kind lk = LIT_NONE;
		uint64_t size = 0;

		if (k == 0 && n - used < c->cap / 2)
			break;		/* the rest of the line is to come */
		if (k == 0)
			k = n - used;	/* a very long line: on it goes */
		else if (rt->client_sc.literal_left == 0) {
			size_t len = k - 1 - (k > 1 && p[used + k - 2] == '\r');

			lk = literal_at_end(p + used, len, &size);
		}
		if ((lk == LIT_SYNC || lk == LIT_NONSYNC) &&
		    size > rt->cfg->max_literal_size &&
		    !resp_scan_at_start(&rt->links[0].be->sc))
			break;	/* answered once the back-end's response ends */
		if ((lk == LIT_SYNC || lk == LIT_NONSYNC) &&
		    size > rt->cfg->max_literal_size) {
			if (relay_to_backend(rt, p + from, used - from) != 0 ||
			    relay_literal_too_large(rt, p + used, k, lk,
			    size) != 0)
				break;
			used += k;
			from = used;	/* that line goes nowhere */
			continue;
		}
		resp_scan(&rt->client_sc, p + used, k);
		used += k;
	}
	if (rt->end == END_NONE && rt->client_sc.largest_literal >
	    rt->cfg->max_literal_size) {
		/* announced at the end of a line too long to hold */
		relay_literal_too_large(rt, p, 0, LIT_NONSYNC,
		    rt->client_sc.largest_literal);
	} else if (rt->end == END_NONE)
		relay_to_backend(rt, p + from, used - from);
	iobuf_consume(c, used);
}

/* Is a whole line of the client's buffered? */
static int
client_has_line(const struct router *rt)
{
	const struct iobuf *c = rt->client;

	return memchr(c->buf + c->start, '\n', iobuf_pending(c)) != NULL;
}

static void
router_loop(struct router *rt, struct pollfd *pfd, int *map)
{
	while (rt->end == END_NONE) {
		if (drain_links(rt) != 0)
			break;
		if (rt->relayed) {
			relay_client(rt);
			if (rt->end == END_NONE)
				wait_for_input(rt, pfd, map);
			continue;
		}
		if (rt->raw_for >= 0 && client_has_line(rt)) {
			int i = rt->raw_for;

			if (raw_line_to_link(rt, i) == -2)
				link_failed(rt, i);
			continue;
		}
		if (rt->raw_for >= 0 || !client_may_send(rt) ||
		    next_line_literal(rt) < 0) {
			wait_for_input(rt, pfd, map);
			continue;
		}
		/* the reader may wait for a literal: what is queued goes first */
		if (next_line_literal(rt) != LIT_NONE && flush_out(rt) != 0) {
			link_failed(rt, rt->busy);
			continue;
		}
		switch (read_command(rt)) {
		case RD_COMMAND:
			dispatch(rt);
			break;
		case RD_ANSWERED:
		case RD_END:
			break;
		}
	}
}

enum session_end
router_run(const struct config *cfg, struct iobuf *client,
    struct backend *home, const struct credentials *cr,
    const struct client_info *ci, const char *user)
{
	struct router rt = { .cfg = cfg, .client = client, .cr = cr, .ci = ci,
	    .user = user, .selected = -1, .busy = -1, .raw_for = -1,
	    .relayed = !config_routed(cfg), .pipe = { -1, -1 },
	    .end = END_NONE };
	struct pollfd *pfd;
	int n = 1, *map;

	for (const struct route *r = cfg->publics; r != NULL; r = r->next)
		n++;
	/* relayed, referrals reach the client: no link but home */
	rt.maxlinks = rt.relayed ? 1 : n + REFERRAL_LINKS_MAX;
	rt.links = calloc((size_t)rt.maxlinks, sizeof(*rt.links));
	rt.answer = malloc(sizeof(*rt.answer));
	pfd = calloc((size_t)rt.maxlinks + 1, sizeof(*pfd));
	map = calloc((size_t)rt.maxlinks + 1, sizeof(*map));
	if (rt.links == NULL || pfd == NULL || map == NULL ||
	    rt.answer == NULL) {
		client_line(&rt, "* BYE Out of memory.");
		rt.end = END_LIMIT;
		n = 0;
	}
	rt.nlinks = rt.npublic = n;
	if (n > 0) {
		rt.links[0].be = home;
		rt.links[0].up = 1;
		rt.links[0].last_used = now_ms();
	}
	n = 1;
	for (const struct route *r = cfg->publics; r != NULL &&
	    rt.links != NULL; r = r->next) {
		rt.links[n].public = 1;
		link_init(&rt.links[n++], r);
	}
	rt.last_client = now_ms();
	resp_scanner_init(&rt.client_sc);
	router_loop(&rt, pfd, map);
	/* After the back-end's BYE (a LOGOUT, mostly) either side may close. */
	if (home->sc.saw_bye && (rt.end == END_BACKEND_GONE ||
	    rt.end == END_CLIENT_GONE))
		rt.end = END_LOGOUT;
	for (int i = 1; i < rt.nlinks; i++)
		backend_close(rt.links[i].be);
	if (rt.pipe[0] >= 0) {
		close(rt.pipe[0]);
		close(rt.pipe[1]);
	}
	cmd_buf_free(&rt.cb);
	str_free(&rt.out);
	free(rt.flight);
	free(rt.answer);
	free(rt.enabled);
	free(rt.links);
	free(pfd);
	free(map);
	return rt.end;
}
