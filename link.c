/*
 * The links to back-ends after login: the home server's (link 0), and
 * the public-folder servers' and those reached by referral, opened on
 * first use and left alone for public_holddown after a failure.
 *
 * A client command sent to a link is "in flight" until its tagged answer
 * comes; many may be in flight on one link (pipelined), on one link at a
 * time.  Their answers stream to the client through backend_dispatch, in
 * one write per burst, through the router's filter where it set one.
 * Whatever imapfe writes to the client itself goes between two of a
 * back-end's responses, never inside one: a BYE that cannot is withheld.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include "engine.h"

/* ------------------------------------------------------------------ */
/* the client side */

int
client_write(struct engine *eng, const char *data, size_t len)
{
	eng->client->deadline = deadline_in(eng->cfg->idle_timeout);
	if (iobuf_write(eng->client, data, len) != IO_OK) {
		eng->end = END_CLIENT_GONE;
		return -1;
	}
	return 0;
}

int
client_line(struct engine *eng, const char *fmt, ...)
{
	enum io_status st;
	va_list ap;

	eng->client->deadline = deadline_in(eng->cfg->idle_timeout);
	va_start(ap, fmt);
	st = iobuf_vline(eng->client, fmt, ap);
	va_end(ap);
	if (st != IO_OK) {
		eng->end = END_CLIENT_GONE;
		return -1;
	}
	return 0;
}

/* A tagged answer on its way to the client, without a referral code:
 * referrals are for imapfe to follow, never for the client. */
int
client_reply(struct engine *eng, const struct reply *r)
{
	struct status_resp st;
	char tag[TAG_MAX + 1];

	if (r->code != CODE_REFERRAL || r->tag_len > TAG_MAX) {
		if (r->raw != NULL)
			return client_write(eng, r->raw, r->raw_len);
		return client_line(eng, "%s", r->line);
	}
	memcpy(tag, r->line, r->tag_len);
	tag[r->tag_len] = '\0';
	if (status_parse(r->line, r->len, tag, &st) != 0)
		return client_line(eng, "%s", r->line);
	return client_line(eng, "%s %s %.*s", tag, r->status == REPLY_OK ?
	    "OK" : r->status == REPLY_NO ? "NO" : "BAD", (int)st.text_len,
	    st.text);
}

/* ------------------------------------------------------------------ */
/* links */

/* A public server that failed is left alone for public_holddown. */
static void
hold_down(struct engine *eng, struct link *l)
{
	l->retry_after = deadline_in(eng->cfg->public_holddown);
}

void
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
int
current_link(const struct engine *eng)
{
	return eng->selected >= 0 ? eng->selected : 0;
}

void
link_down(struct engine *eng, int i, const char *why)
{
	struct link *l = &eng->links[i];

	if (l->up)
		log_msg(LOG_ERR, "event=%s-error user=\"%s\" prefix=\"%s\" "
		    "backend=%s:%s reason=\"%s\"", link_kind(l), eng->user,
		    link_prefix(l), l->route->host, l->route->port, why);
	backend_close(l->be);
	l->up = 0;
	hold_down(eng, l);
	/* The client still thinks a mailbox is selected: keep saying why not. */
	if (eng->selected == i)
		eng->selection_lost = 1;
}

/* A command of imapfe's own; whatever it brings back goes nowhere. */
int
link_internal(struct engine *eng, int i, const char *verb, const char *args)
{
	struct str text = { 0 };
	struct reply r;
	int rc = -1;

	if (str_printf(&text, "%s%s%s", verb, args ? " " : "",
	    args ? args : "") == 0 &&
	    backend_simple(eng->links[i].be, eng->cfg, text.s, NULL, &r) <
	    REPLY_PLUS)
		rc = 0;
	str_free(&text);
	eng->links[i].last_used = now_ms();
	if (rc != 0 && i > 0)
		link_down(eng, i, "no answer to an internal command");
	return rc;
}

/* Open public link i if it is not open and not held down. */
int
link_up(struct engine *eng, int i)
{
	struct link *l = &eng->links[i];
	char why[256];
	enum login_result res;

	if (l->up)
		return 0;
	if (now_ms() < l->retry_after)
		return -1;
	if (l->conf->from_directory &&
	    public_from_directory(eng->cfg, l->conf, &l->found, why,
	    sizeof(why)) != ROUTE_FOUND) {
		log_msg(LOG_ERR, "event=public-failed user=\"%s\" prefix=\"%s\" "
		    "reason=\"%s\" retry_in=%d", eng->user, l->conf->pattern, why,
		    eng->cfg->public_holddown);
		hold_down(eng, l);
		return -1;
	}
	if (l->conf->from_directory)
		l->route = &l->found;
	res = backend_login(l->be, eng->cfg, l->route, eng->cr, eng->ci, eng->user,
	    why, sizeof(why));
	if (res != LOGIN_OK) {
		log_msg(LOG_ERR, "event=%s-failed user=\"%s\" prefix=\"%s\" "
		    "backend=%s:%s reason=\"%s\" retry_in=%d", link_kind(l),
		    eng->user, link_prefix(l), l->route->host, l->route->port,
		    why, eng->cfg->public_holddown);
		hold_down(eng, l);
		return -1;
	}
	l->up = 1;
	l->last_used = now_ms();
	log_msg(LOG_INFO, "event=%s-login user=\"%s\" prefix=\"%s\" "
	    "backend=%s:%s", link_kind(l), eng->user, link_prefix(l),
	    l->be->host, l->be->port);
	if (eng->enabled != NULL &&
	    link_internal(eng, i, "ENABLE", eng->enabled) != 0)
		return -1;
	return 0;
}

/*
 * Open link i, or answer the client's command tag that it cannot be
 * reached.  Returns 1 when it answered.
 */
int
link_unavailable(struct engine *eng, int i, const char *tag)
{
	if (link_up(eng, i) == 0)
		return 0;
	client_line(eng, "%s NO [UNAVAILABLE] The server for \"%s\" is "
	    "unavailable, try again later.", tag, eng->links[i].route->pattern);
	return 1;
}

/* Leave link i unselected, quietly: UNSELECT, or a SELECT bound to fail. */
void
link_unselect(struct engine *eng, int i)
{
	if (caps_has(eng->links[i].be->caps, "UNSELECT"))
		link_internal(eng, i, "UNSELECT", NULL);
	else
		link_internal(eng, i, "EXAMINE", "\"imapfe/no such mailbox\"");
	if (eng->selected == i)
		eng->selected = -1;
}

/* ------------------------------------------------------------------ */
/* reading a link's responses */

/* An untagged BYE: "* BYE" and a space or the end. */
int
line_is_bye(const char *line, size_t len)
{
	return len >= 5 && strncasecmp(line, "* BYE", 5) == 0 &&
	    (len == 5 || line[5] == ' ');
}

/*
 * The first line of each untagged response of a link, before it goes to
 * the client: a public server's BYE ends only its own link, so the client
 * never sees it; then the router's filter, if it set one.
 */
static enum sink_verdict
response_line(void *ctx, const char *line, size_t len)
{
	struct sink_ctx *sc = ctx;

	if (sc->l != sc->eng->links && line_is_bye(line, len))
		return SINK_DROP;
	if (sc->filter == NULL)
		return SINK_KEEP;
	return sc->filter->line(sc->eng, sc->l, line, len);
}

/* The k-th command of those in flight, the oldest first. */
static struct inflight *
flight_at(const struct engine *eng, int k)
{
	return &eng->flight[eng->fhead + k];
}

static int flight_find(const struct engine *, const struct reply *);
static void flight_pop(struct engine *, int);

/*
 * A tagged answer that may go to the client with the responses around
 * it, in one write: one the client's command waits for (or, relayed,
 * any), without a referral for imapfe to follow or a caller to keep it.
 */
static int
answer_inline(void *ctx, const struct reply *r)
{
	struct sink_ctx *sc = ctx;
	struct engine *eng = sc->eng;
	int i = (int)(sc->l - eng->links), k;

	if (eng->relayed)
		return 1;
	if (r->code == CODE_REFERRAL || i != eng->busy ||
	    (k = flight_find(eng, r)) < 0 || !flight_at(eng, k)->forward ||
	    flight_at(eng, k)->keep != NULL)
		return 0;
	flight_pop(eng, k);
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

/*
 * Where link l's untagged responses go: to the client, through filter
 * when it is set; or, discard, nowhere.
 */
static const struct resp_sink *
sink_for(struct engine *eng, struct link *l, int discard,
    const struct resp_filter *filter, struct sink_ctx *ctx,
    struct resp_sink *sink)
{
	static const struct resp_sink nowhere = { .data = swallow,
	    .long_lines = 1 };

	if (discard)
		return &nowhere;
	*ctx = (struct sink_ctx){ eng, l, filter };
	*sink = (struct resp_sink){ .out = eng->client, .ctx = ctx,
	    .line = l != eng->links || filter != NULL ? response_line : NULL,
	    .tagged = answer_inline, .long_lines = 1,
	    .whole_max = filter != NULL ? filter->whole_max : 0 };
	return sink;
}

/* Link l's untagged responses, to the client as they are. */
const struct resp_sink *
link_client_sink(struct engine *eng, struct link *l, struct sink_ctx *ctx,
    struct resp_sink *sink)
{
	return sink_for(eng, l, 0, NULL, ctx, sink);
}

/*
 * Where link i's untagged responses go now: those of the client command
 * answered first, by its filter; with none in flight, the selected
 * mailbox's server's to the client (its EXISTS and EXPUNGE), the others'
 * nowhere.
 */
static const struct resp_sink *
sink_now(struct engine *eng, int i, struct sink_ctx *ctx,
    struct resp_sink *sink)
{
	struct link *l = &eng->links[i];

	if (eng->busy == i && eng->nflight > 0)
		return sink_for(eng, l, 0, flight_at(eng, 0)->filter, ctx,
		    sink);
	return sink_for(eng, l, i != current_link(eng), NULL, ctx, sink);
}

/* Do link i's responses go to the client now, as they are? */
int
link_forwards_all(const struct engine *eng, int i)
{
	if (eng->busy == i && eng->nflight > 0)
		return flight_at(eng, 0)->filter == NULL;
	return i == current_link(eng);
}

/* Do link i's responses go to the client now, at all? */
static int
link_discards(const struct engine *eng, int i)
{
	return !(eng->busy == i && eng->nflight > 0) &&
	    i != current_link(eng);
}

/*
 * Command k of those in flight is answered.  Answers come in order, so
 * the first one mostly: that costs nothing, however deep the pipeline.
 */
static void
flight_pop(struct engine *eng, int k)
{
	if (k == 0)
		eng->fhead++;
	else
		memmove(flight_at(eng, k), flight_at(eng, k + 1),
		    (size_t)(eng->nflight - k - 1) * sizeof(*eng->flight));
	if (--eng->nflight == 0) {
		eng->fhead = 0;
		eng->busy = -1;
	}
}

static int
flight_find(const struct engine *eng, const struct reply *r)
{
	for (int k = 0; k < eng->nflight; k++)
		if (reply_is(r, flight_at(eng, k)->tag))
			return k;
	return -1;
}

/* A tagged answer from link i: the client's, or the one a caller keeps. */
static int
tagged_answer(struct engine *eng, int i, const struct reply *r)
{
	int k = i == eng->busy ? flight_find(eng, r) : -1, forward;
	struct reply *keep;

	if (k < 0)	/* no command of the client's: as a relay would */
		return i == current_link(eng) ? client_reply(eng, r) : 0;
	keep = flight_at(eng, k)->keep;
	forward = flight_at(eng, k)->forward;
	flight_pop(eng, k);
	if (keep != NULL) {
		*keep = *r;
		keep->raw = NULL;	/* the buffer it points to moves on */
	}
	return forward ? client_reply(eng, r) : 0;
}

/*
 * A "+" from link i: what a literal of imapfe's waits for, or else the
 * server's to the client (IDLE's "+ idling"), whose next line then goes
 * to the link as it is (IDLE's DONE).
 */
static int
link_continuation(struct engine *eng, int i, const struct reply *r)
{
	if (eng->relayed)	/* the client's bytes pass on anyway */
		return client_reply(eng, r);
	if (eng->want_plus && i == eng->busy) {
		eng->got_plus = 1;
		return 0;
	}
	if (i != current_link(eng) && i != eng->busy)
		return 0;
	eng->raw_for = i;
	return client_reply(eng, r);
}

/* Move what link i has buffered on, by the rules above. */
int
link_pump(struct engine *eng, int i)
{
	struct link *l = &eng->links[i];
	struct sink_ctx ctx;
	struct resp_sink sink;
	struct reply *r = eng->answer;
	int rc = 0;

	while (rc == 0 && eng->end == END_NONE) {
		enum dispatch d = backend_dispatch(l->be, sink_now(eng, i,
		    &ctx, &sink), r);

		if (d == DISPATCH_MORE || d == DISPATCH_TOOLONG)
			break;
		if (d == DISPATCH_FAILED)
			rc = -1;
		else if (d == DISPATCH_TAGGED)
			rc = tagged_answer(eng, i, r);
		else
			rc = link_continuation(eng, i, r);
	}
	if (rc != 0 && eng->end == END_NONE)
		eng->end = END_CLIENT_GONE;
	return rc;
}

/*
 * Pipelined commands wait in eng->out and leave for the busy link in one
 * write, before anything waits: one segment and one wake-up of the
 * server for a burst, as a relay would pass the burst on.
 */
int
flush_out(struct engine *eng)
{
	struct iobuf *io;
	enum io_status st;

	if (eng->out.len == 0 || eng->busy < 0) {
		eng->out.len = 0;
		return 0;
	}
	io = &eng->links[eng->busy].be->io;
	io->deadline = deadline_in(eng->cfg->backend_timeout);
	st = iobuf_write(io, eng->out.s, eng->out.len);
	eng->out.len = 0;
	return st == IO_OK ? 0 : -1;
}

/* The client's next line, as it is, to link i: after a "+" of the link's. */
int
raw_line_to_link(struct engine *eng, int i)
{
	struct iobuf *io = &eng->links[i].be->io;
	char *cl;
	size_t cllen;

	eng->raw_for = -1;
	if (flush_out(eng) != 0)
		return -2;
	eng->client->deadline = deadline_in(eng->cfg->idle_timeout);
	if (iobuf_getline(eng->client, eng->cfg->max_line_length, &cl,
	    &cllen) != IO_OK) {
		eng->end = END_CLIENT_GONE;
		return -1;
	}
	eng->last_client = now_ms();
	io->deadline = deadline_in(eng->cfg->backend_timeout);
	if (iobuf_write(io, cl, cllen) != IO_OK ||
	    iobuf_write(io, "\r\n", 2) != IO_OK)
		return -2;
	return 0;
}


static int
flight_has(const struct engine *eng, const char *tag)
{
	for (int k = 0; k < eng->nflight; k++)
		if (strcmp(flight_at(eng, k)->tag, tag) == 0)
			return 1;
	return 0;
}

/* Has what the caller waits for come: tag's answer, a "+", or calm? */
static int
wait_over(const struct engine *eng, int i, const char *tag)
{
	if (eng->want_plus)
		return eng->got_plus || (tag != NULL && !flight_has(eng, tag));
	if (tag != NULL)
		return !flight_has(eng, tag);
	return eng->busy != i;
}

/*
 * Wait on link i until tag is answered (or, with want_plus, until the
 * link says "+"; tag NULL: until no client command is in flight there).
 * A "+" the link sends to the client in between lets the client's next
 * line through: that is how IDLE's DONE travels.
 */
static enum wait_result
link_wait(struct engine *eng, int i, const char *tag)
{
	struct iobuf *io = &eng->links[i].be->io;

	if (flush_out(eng) != 0)
		return W_LINK_DOWN;
	for (;;) {
		struct pollfd pfd[2];
		int client = eng->raw_for == i;
		enum io_status st;
		int64_t left;

		if (link_pump(eng, i) != 0)
			return W_CLIENT_GONE;
		if (wait_over(eng, i, tag))
			return W_DONE;
		if (client && iobuf_pending(eng->client) > 0 &&
		    memchr(eng->client->buf + eng->client->start, '\n',
		    iobuf_pending(eng->client)) != NULL) {
			int rc = raw_line_to_link(eng, i);

			if (rc != 0)
				return rc == -1 ? W_CLIENT_GONE : W_LINK_DOWN;
			continue;
		}
		left = eng->last_client + (int64_t)eng->cfg->idle_timeout *
		    1000 - now_ms();
		if (left < 0)
			return W_TIMEOUT;
		if (iobuf_has_decrypted(io) || (client &&
		    iobuf_has_decrypted(eng->client)))
			left = 0;
		pfd[0] = (struct pollfd){ .fd = io->rfd, .events = POLLIN };
		pfd[1] = (struct pollfd){ .fd = client ? eng->client->rfd : -1,
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
		    iobuf_has_decrypted(eng->client))) {
			st = iobuf_try_fill(eng->client);
			if (st != IO_OK && st != IO_AGAIN)
				return W_CLIENT_GONE;
		}
	}
}

/* Room for one more command in flight: the array moved down or grown. */
static int
flight_room(struct engine *eng)
{
	struct inflight *f;
	int cap;

	if (eng->fhead + eng->nflight < eng->fcap)
		return 0;
	if (eng->fhead > 0) {
		memmove(eng->flight, flight_at(eng, 0), (size_t)eng->nflight *
		    sizeof(*eng->flight));
		eng->fhead = 0;
		return 0;
	}
	cap = eng->fcap > 0 ? eng->fcap * 2 : 16;
	if ((f = realloc(eng->flight, (size_t)cap * sizeof(*f))) == NULL)
		return -1;
	eng->flight = f;
	eng->fcap = cap;
	return 0;
}

/* Record a client command as sent to link i. */
static int
flight_add(struct engine *eng, int i, const char *tag,
    const struct resp_filter *filter,
    struct reply *keep, int forward)
{
	struct inflight *f;

	if (eng->nflight == PIPELINE_MAX || strlen(tag) > TAG_MAX ||
	    (eng->busy >= 0 && eng->busy != i) || flight_room(eng) != 0)
		return -1;
	f = flight_at(eng, eng->nflight++);
	snprintf(f->tag, sizeof(f->tag), "%s", tag);
	f->filter = filter;
	f->keep = keep;
	f->forward = forward;
	eng->busy = i;
	eng->links[i].last_used = now_ms();
	return 0;
}

/* Forget what was in flight on link i: it is gone. */
static void
flight_drop(struct engine *eng, int i)
{
	if (eng->busy != i)
		return;
	eng->nflight = eng->fhead = 0;
	eng->busy = -1;
	eng->want_plus = 0;
	if (eng->raw_for == i)
		eng->raw_for = -1;
}

/* ------------------------------------------------------------------ */
/* the limits of a routed command */

/* Routed, after login: literals are held up to SMALL_LITERAL_MAX, larger
 * ones streamed; long UID sets are normal, the buffer is the line limit. */
void
routed_limits(const struct engine *eng, struct cmd_limits *lim)
{
	*lim = (struct cmd_limits){ .line_max = eng->client->cap - 2,
	    .command_max = BUFFERED_COMMAND_MAX,
	    .literal_max = eng->cfg->max_literal_size,
	    .hold_max = SMALL_LITERAL_MAX, .toobig = 1,
	    .literal_name = "max_literal_size" };
}

static enum wait_result
wait_plus(struct engine *eng, int i, const char *tag, int *answered)
{
	enum wait_result w;

	eng->want_plus = 1;
	eng->got_plus = 0;
	w = link_wait(eng, i, tag);
	eng->want_plus = 0;
	*answered = w == W_DONE && !eng->got_plus;
	return w;
}

/*
 * Send the buffered command to link i, piece by piece: after each literal
 * announcement the link must say "+" before the literal goes.  A tagged
 * answer instead ends the command early (*answered).
 */
static enum wait_result
send_buffered(struct engine *eng, int i, const char *tag, int *answered)
{
	struct iobuf *io = &eng->links[i].be->io;
	size_t from = 0, len = eng->send_len;
	enum wait_result w;

	*answered = 0;
	for (int c = 0; c <= eng->cb.ncuts; c++) {
		size_t to = c < eng->cb.ncuts ? eng->cb.cuts[c] : len;

		if (to > len)
			to = len;
		io->deadline = deadline_in(eng->cfg->backend_timeout);
		if (to > from && iobuf_write(io, eng->cb.text.s + from, to - from) !=
		    IO_OK)
			return W_LINK_DOWN;
		from = to;
		if (c == eng->cb.ncuts || to == len)
			break;
		if ((w = wait_plus(eng, i, tag, answered)) != W_DONE ||
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
pump(struct engine *eng, struct iobuf *src, int wait_s, struct iobuf *dst,
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
			dst->deadline = deadline_in(eng->cfg->backend_timeout);
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
void
bye_after_link(struct engine *eng, int i, const char *text)
{
	const struct resp_scanner *sc = &eng->links[i].be->sc;

	if (sc->literal_left > 0) {
		log_msg(LOG_NOTICE, "event=bye-withheld reason=\"inside a "
		    "literal of the back-end's\"");
		return;
	}
	if (!resp_scan_at_start(sc) && client_write(eng, "\r\n", 2) != 0)
		return;
	client_line(eng, "* BYE %s", text);
}

/* The link whose answers the client is reading now. */
int
answering_link(const struct engine *eng)
{
	return eng->busy >= 0 ? eng->busy : current_link(eng);
}

/* End the session with a BYE the client can read as one. */
void
engine_bye(struct engine *eng, enum session_end end, const char *text)
{
	bye_after_link(eng, answering_link(eng), text);
	eng->end = end;
}

/*
 * What a lost link left of a response line goes on to the client, when
 * the client was reading that link's answers, as a relay would pass it:
 * what imapfe says next then ends that line first.
 */
static void
link_flush_partial(struct engine *eng, int i)
{
	struct backend *be = eng->links[i].be;
	const char *p = be->io.buf + be->io.start;
	size_t n = iobuf_pending(&be->io);

	if (n == 0 || be->dropping || i != answering_link(eng) ||
	    link_discards(eng, i) || client_write(eng, p, n) != 0)
		return;
	resp_scan(&be->sc, p, n);
	iobuf_consume(&be->io, n);
}

/*
 * A CATENATE URL for another server after a streamed literal: the link
 * holds half an APPEND, which must fail there.  What it gets instead of
 * the rest is no argument APPEND knows, in a list or out (Dovecot answers
 * BAD and saves nothing, of a MULTIAPPEND neither); the client gets
 * NO [BADURL] for that answer (cmd_mailbox), and what it sends of the
 * command yet is dropped (discard_rest).
 */
static enum wait_result
url_refused_midway(struct engine *eng, int i)
{
	struct iobuf *io = &eng->links[i].be->io;

	io->deadline = deadline_in(eng->cfg->backend_timeout);
	return iobuf_puts(io, " X-IMAPFE-BADURL\r\n") == IO_OK ? W_DONE :
	    W_LINK_DOWN;
}

/*
 * The rest of a command whose literal is too big to hold: each such
 * literal streams from the client to the link once the link said "+",
 * and what follows it is read and sent as any command is.
 */
static enum wait_result
stream_rest(struct engine *eng, int i, const char *tag, int *answered)
{
	struct cmd_limits lim;
	enum wait_result w;
	enum cmd_status st;
	int rc;

	routed_limits(eng, &lim);
	do {
		if ((w = wait_plus(eng, i, tag, answered)) != W_DONE ||
		    *answered)
			return w;
		if (eng->cb.stream_sync && client_line(eng, "+ Ready for literal "
		    "data") != 0)
			return W_CLIENT_GONE;
		rc = pump(eng, eng->client, eng->cfg->idle_timeout,
		    &eng->links[i].be->io, eng->cb.stream_left);
		if (rc != 0)
			return rc == -1 ? W_CLIENT_GONE : W_LINK_DOWN;
		eng->last_client = now_ms();
		eng->cb.continuing = 1;
		st = cmd_read(eng->client, &lim, &eng->cb);
		eng->cb.continuing = 0;
		if (st == CMD_END) {
			/* the link holds half a command: the session ends */
			if (eng->cb.bye != NULL)
				bye_after_link(eng, i, eng->cb.bye);
			eng->end = eng->cb.end;
			return W_CLIENT_GONE;
		}
		eng->send_len = eng->cb.text.len;
		if (eng->urls != NULL && url_append_check(eng->urls,
		    eng->cb.text.s, eng->send_len) != 0)
			return url_refused_midway(eng, i);
		if ((w = send_buffered(eng, i, tag, answered)) != W_DONE ||
		    *answered)
			return w;
	} while (st == CMD_STREAM);
	return W_DONE;	/* (cmd_read left stream_left 0: all of it went) */
}

/* ------------------------------------------------------------------ */
/* running one command on one link */


/* Every client command in flight on lost public link i gets its NO. */
static void
flight_unavailable(struct engine *eng, int i, const char *tag)
{
	int had = eng->busy == i ? eng->nflight : 0;

	for (int k = 0; k < had; k++)
		if (tag == NULL || strcmp(flight_at(eng, k)->tag, tag) != 0)
			client_line(eng, "%s NO [UNAVAILABLE] Public folder "
			    "server connection lost.", flight_at(eng, k)->tag);
	flight_drop(eng, i);
	if (tag != NULL)
		client_line(eng, "%s NO [UNAVAILABLE] Public folder server "
		    "connection lost.", tag);
}

void
command_failed_on_link(struct engine *eng, int i, const char *tag,
    enum wait_result w)
{
	const struct resp_scanner *sc = &eng->links[i].be->sc;

	if (w == W_CLIENT_GONE) {
		if (eng->end == END_NONE)
			eng->end = END_CLIENT_GONE;
		return;
	}
	if (w == W_TIMEOUT) {
		bye_after_link(eng, i, "Disconnected for inactivity.");
		eng->end = END_TIMEOUT;
		return;
	}
	link_flush_partial(eng, i);
	if (i == 0) {
		if (eng->links[0].be->io.tls_why[0] != '\0')
			log_msg(LOG_NOTICE, "event=tls-error side=backend "
			    "reason=\"%s\"", eng->links[0].be->io.tls_why);
		if (!sc->saw_bye)
			bye_after_link(eng, 0, "Back-end server closed the "
			    "connection.");
		eng->end = sc->saw_bye ? END_LOGOUT : END_BACKEND_GONE;
		return;
	}
	if (sc->literal_left > 0) {
		/* The client is inside the lost server's literal: no answer
		 * can reach it as one, so the session ends here. */
		bye_after_link(eng, i, "");
		link_down(eng, i, "connection lost");
		eng->end = END_BACKEND_GONE;
		return;
	}
	if (!resp_scan_at_start(sc) && client_write(eng, "\r\n", 2) != 0)
		return;
	link_down(eng, i, "connection lost");
	if (eng->merging) {	/* the home server's answer is still to come */
		flight_drop(eng, i);
		client_line(eng, "* NO [UNAVAILABLE] The server for \"%s\" was "
		    "lost.", eng->links[i].route->pattern);
	}
	else
		flight_unavailable(eng, i, tag);
}

/*
 * A command whose streamed literal did not go (refused before the "+",
 * its server unavailable or lost): what the client sends of it anyway,
 * a non-synchronizing literal and the rest of the command, is read and
 * dropped, so that none of it is taken for a command.  A synchronizing
 * one the client never sends: it has its answer.
 */
void
discard_rest(struct engine *eng)
{
	struct cmd_limits lim;
	enum cmd_status st = CMD_STREAM;

	routed_limits(eng, &lim);
	while (st == CMD_STREAM && eng->cb.stream_left > 0 &&
	    !eng->cb.stream_sync && eng->end == END_NONE) {
		if (pump(eng, eng->client, eng->cfg->idle_timeout, NULL,
		    eng->cb.stream_left) != 0) {
			eng->end = END_CLIENT_GONE;
			break;
		}
		eng->cb.continuing = 1;
		st = cmd_read(eng->client, &lim, &eng->cb);
		eng->cb.continuing = 0;
		if (st == CMD_END) {
			if (eng->cb.bye != NULL)
				engine_bye(eng, eng->cb.end, eng->cb.bye);
			eng->end = eng->cb.end;
		}
	}
	eng->cb.stream_left = 0;
}

/* The commands in flight are answered: the next may run alone. */
int
wait_idle(struct engine *eng)
{
	enum wait_result w;
	int i = eng->busy;

	if (i < 0)
		return 0;
	if ((w = link_wait(eng, i, NULL)) == W_DONE)
		return 0;
	command_failed_on_link(eng, i, NULL, w);
	return -1;
}

/*
 * Run a command whose text is all at hand (its small literals included)
 * on idle link i as imapfe runs its own, with backend_command: its
 * untagged answers go to the client through filter, its tagged answer
 * into r, and on to the client when forward.  A "+" that no literal of
 * the command waits for (IDLE's) goes to the client, and the command is
 * then in flight as a pipelined one is: the client's next line (DONE)
 * goes to the link, the answers stream back, and link_wait waits.
 */
static void
run_whole(struct engine *eng, int i, const char *tag, const struct str *text,
    const struct resp_filter *filter, struct reply *r, int forward)
{
	struct link *l = &eng->links[i];
	struct sink_ctx ctx;
	struct resp_sink sink;
	enum wait_result w = W_DONE;
	enum reply_status rs;

	l->last_used = now_ms();
	rs = backend_command(l->be, eng->cfg, text, tag, sink_for(eng, l, 0,
	    filter, &ctx, &sink), r);
	if (rs == REPLY_PLUS) {
		if (flight_add(eng, i, tag, filter, r, forward) != 0) {
			engine_bye(eng, END_LIMIT, "Out of memory.");
			r->status = REPLY_LOST;
			return;
		}
		eng->raw_for = i;
		if (client_reply(eng, r) != 0)
			w = W_CLIENT_GONE;
		else
			w = link_wait(eng, i, tag);
		forward = 0;	/* (the wait has passed it on) */
	} else if (rs == REPLY_LOST || rs == REPLY_BYE)
		w = r->sink_failed ? W_CLIENT_GONE : W_LINK_DOWN;
	if (w == W_LINK_DOWN && shutdown_requested) {
		bye_after_link(eng, i, "Server shutting down.");
		eng->end = END_SHUTDOWN;
		w = W_CLIENT_GONE;
	}
	if (w != W_DONE) {
		command_failed_on_link(eng, i, tag, w);
		r->status = REPLY_LOST;
	} else if (forward && client_reply(eng, r) != 0)
		r->status = REPLY_LOST;
	r->raw = NULL;		/* the buffer it points to moves on */
}

/*
 * A command whose literal is too big to hold: sent piece by piece, each
 * streamed literal after the link's "+", as a command in flight.
 */
static void
run_streamed(struct engine *eng, int i, const char *tag,
    const struct resp_filter *filter, struct reply *r, int forward)
{
	enum wait_result w;
	int answered = 0;

	if (flight_add(eng, i, tag, filter, r, forward) != 0) {
		client_line(eng, "%s BAD Too many commands in flight.", tag);
		return;
	}
	w = send_buffered(eng, i, tag, &answered);
	if (w == W_DONE && !answered)
		w = stream_rest(eng, i, tag, &answered);
	if (w == W_DONE && !answered)
		w = link_wait(eng, i, tag);
	if (w != W_DONE) {
		command_failed_on_link(eng, i, tag, w);
		r->status = REPLY_LOST;
	}
}

/*
 * Send the current command to link i and relay its answers through
 * filter (NULL: as they are).  The tagged answer goes to the client,
 * unless keep (then it is left there).  Waits first for the client
 * commands in flight.
 */
enum reply_status
run_on_link_as(struct engine *eng, int i, const char *tag,
    const struct resp_filter *filter, struct reply *keep)
{
	struct reply *r = keep != NULL ? keep : malloc(sizeof(*r));
	const struct str text = { .s = eng->cb.text.s, .len = eng->send_len };
	enum reply_status rs;

	if (r == NULL) {
		engine_bye(eng, END_LIMIT, "Out of memory.");
		return REPLY_LOST;
	}
	r->status = REPLY_LOST;
	if (wait_idle(eng) != 0)
		;
	else if (strlen(tag) > TAG_MAX)
		client_line(eng, "%s BAD Tag too long.", tag);
	else if (eng->cb.stream_left > 0)
		run_streamed(eng, i, tag, filter, r, keep == NULL);
	else
		run_whole(eng, i, tag, &text, filter, r, keep == NULL);
	rs = r->status;
	if (keep == NULL)
		free(r);
	return rs;
}

enum reply_status
run_on_link(struct engine *eng, int i, const char *tag, struct reply *keep)
{
	return run_on_link_as(eng, i, tag, NULL, keep);
}

/*
 * A command for link i that need not wait for the answers before it:
 * written at once, its answers streamed back when they come.
 */
void
send_pipelined(struct engine *eng, int i, const char *tag)
{
	flight_add(eng, i, tag, NULL, NULL, 1);
	if (str_add(&eng->out, eng->cb.text.s, eng->send_len) != 0) {
		engine_bye(eng, END_LIMIT, "Out of memory.");
	}
}

/*
 * An untagged response of link i's that no client command asked for:
 * what link_pump would do with it (a public server's BYE goes nowhere).
 */
enum sink_verdict
link_untagged(struct engine *eng, int i, const char *line, size_t len)
{
	struct sink_ctx sc = { eng, &eng->links[i], NULL };

	return response_line(&sc, line, len);
}

/* A command of imapfe's own on link i, its untagged answers to the client. */
enum reply_status
link_command(struct engine *eng, int i, const char *text)
{
	struct sink_ctx ctx;
	struct resp_sink sink;
	struct reply *r = malloc(sizeof(*r));
	enum reply_status rs = REPLY_LOST;

	if (r != NULL)
		rs = backend_simple(eng->links[i].be, eng->cfg, text,
		    link_client_sink(eng, &eng->links[i], &ctx, &sink), r);
	eng->links[i].last_used = now_ms();
	free(r);
	return rs;
}

/* ------------------------------------------------------------------ */
/* a command the router composed for the client */

/*
 * Send a command composed by the router for the client (its tag) to link
 * i, and wait for the answer, kept in keep.  The command holds no literal.
 */
enum reply_status
run_text_on_link(struct engine *eng, int i, const char *tag,
    const struct str *text, struct reply *keep)
{
	keep->status = REPLY_LOST;
	if (wait_idle(eng) == 0)
		run_whole(eng, i, tag, text, NULL, keep, 0);
	return keep->status;
}
