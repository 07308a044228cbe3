/*
 * The session after login: one loop for every session, relayed or routed.
 *
 * Relayed (no public or server lines: one back-end, nothing to route),
 * the client's bytes go on to the back-end as they come, read only by the
 * scanner that follows the literals they announce, and the back-end's
 * answers come back through the one response reader, long literals by
 * splice(2).  Routed, the client's commands are read with the reader of
 * the pre-login state and handed to the router (router.c), one by one.
 * Either way the links (link.c) stream the back-ends' answers back, and
 * the session ends once, with one of enum session_end.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include "engine.h"

/* ------------------------------------------------------------------ */
/* reading a client command */

enum read_result { RD_COMMAND, RD_ANSWERED, RD_END };

/* The client's next command, or the end of the session. */
static enum read_result
read_command(struct engine *eng)
{
	struct cmd_limits lim;
	enum cmd_status st;

	routed_limits(eng, &lim);
	eng->client->deadline = eng->last_client +
	    (int64_t)eng->cfg->idle_timeout * 1000;
	eng->cb.continuing = 0;
	st = cmd_read(eng->client, &lim, &eng->cb);
	eng->last_client = now_ms();
	eng->send_len = eng->cb.text.len;
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
	if (eng->cb.bye != NULL)
		engine_bye(eng, eng->cb.end, eng->cb.bye);
	eng->end = eng->cb.end;
	return RD_END;
}

/* ------------------------------------------------------------------ */
/* the loop */

/* What the links have sent: the selected server's goes to the client. */
static int
drain_links(struct engine *eng)
{
	for (int i = 0; i < eng->nlinks && eng->end == END_NONE; i++)
		if (eng->links[i].up && link_pump(eng, i) != 0)
			return -1;
	return eng->end == END_NONE ? 0 : -1;
}

/*
 * A server that is not in use still must not time the session out: each
 * gets a NOOP after KEEPALIVE_MS of quiet (servers wait 30 minutes at the
 * least, RFC 9051).
 */
#define KEEPALIVE_MS	(5 * 60 * 1000)

static int64_t
keepalives(struct engine *eng)
{
	int64_t now = now_ms(), next = now + KEEPALIVE_MS;

	for (int i = 0; i < eng->nlinks && eng->end == END_NONE; i++) {
		struct link *l = &eng->links[i];

		if (!l->up || i == current_link(eng) || i == eng->busy)
			continue;
		if (now - l->last_used >= KEEPALIVE_MS) {
			if (link_internal(eng, i, "NOOP", NULL) != 0 && i == 0) {
				command_failed_on_link(eng, 0, NULL,
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

/* A link whose connection failed while the engine waited for input. */
static void
link_failed(struct engine *eng, int i)
{
	if (i == 0) {
		command_failed_on_link(eng, 0, NULL, W_LINK_DOWN);
		return;
	}
	if (eng->busy == i)
		command_failed_on_link(eng, i, NULL, W_LINK_DOWN);
	else
		link_down(eng, i, "connection closed");
}

/*
 * The literal the client's next whole line announces (LIT_NONE without
 * one), or -1 while no whole line is buffered.
 */
static int
next_line_literal(const struct engine *eng)
{
	const struct iobuf *c = eng->client;
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
client_may_send(const struct engine *eng)
{
	int i = answering_link(eng);

	if (eng->relayed)	/* bytes, passed on as they come */
		return 1;
	if (eng->nflight == PIPELINE_MAX)
		return 0;
	return next_line_literal(eng) == LIT_NONE || !eng->links[i].up ||
	    resp_scan_at_start(&eng->links[i].be->sc);
}

/* Literal bodies at least this long go from a plain back-end to a plain
 * client through a pipe with splice(2); shorter ones are not worth it. */
#define SPLICE_MIN	(16 * 1024)
#define SPLICE_MAX	(1024 * 1024)

/* May link i's next bytes go to the client by splice(2), uncopied? */
static int
can_splice(const struct engine *eng, int i)
{
	const struct backend *be = eng->links[i].be;

	/* (-D traces what passes through the buffers: none of splice) */
	return !eng->splice_off && !protocol_trace && be->io.ssl == NULL &&
	    eng->client->ssl == NULL && iobuf_pending(&be->io) == 0 &&
	    be->sc.literal_left >= SPLICE_MIN && !be->dropping &&
	    i == current_link(eng) && link_forwards_all(eng, i);
}

/*
 * Read from link i: into its buffer, or, inside a long literal bound for
 * the client, straight on to the client (the scanner needs the count).
 */
static enum io_status
link_read(struct engine *eng, int i)
{
	struct backend *be = eng->links[i].be;
	size_t moved;
	int to_failed;
	enum io_status st;

	if (!can_splice(eng, i))
		return iobuf_try_fill(&be->io);
	if (eng->pipe[0] < 0 && pipe2(eng->pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
		eng->splice_off = 1;
		return iobuf_try_fill(&be->io);
	}
	eng->client->deadline = deadline_in(eng->cfg->idle_timeout);
	st = iobuf_splice(&be->io, eng->client, eng->pipe,
	    be->sc.literal_left > SPLICE_MAX ? SPLICE_MAX :
	    (size_t)be->sc.literal_left, &moved, &to_failed);
	be->sc.literal_left -= moved;
	if (st == IO_UNSUPPORTED) {
		eng->splice_off = 1;
		return iobuf_try_fill(&be->io);
	}
	if (to_failed) {
		eng->end = END_CLIENT_GONE;
		return IO_ERROR;
	}
	return st;
}

static void
wait_for_input(struct engine *eng, struct pollfd *pfd, int *map)
{
	int n = 0;
	int64_t keep, left = eng->last_client +
	    (int64_t)eng->cfg->idle_timeout * 1000 - now_ms();

	if (left <= 0) {
		engine_bye(eng, END_TIMEOUT, "Disconnected for inactivity.");
		return;
	}
	if ((keep = keepalives(eng)) < left)
		left = keep;
	if (eng->end == END_NONE && flush_out(eng) != 0)
		link_failed(eng, eng->busy);
	if (eng->end != END_NONE)
		return;
	pfd[n] = (struct pollfd){ .fd = client_may_send(eng) ?
	    eng->client->rfd : -1, .events = POLLIN };
	map[n++] = -1;
	for (int i = 0; i < eng->nlinks; i++)
		if (eng->links[i].up) {
			if (iobuf_has_decrypted(&eng->links[i].be->io))
				left = 0;
			pfd[n] = (struct pollfd){ .fd = eng->links[i].be->io.rfd,
			    .events = POLLIN };
			map[n++] = i;
		}
	if (client_may_send(eng) && iobuf_has_decrypted(eng->client))
		left = 0;
	if (poll_wait(pfd, (nfds_t)n, (int)(left > POLL_MAX_MS ? POLL_MAX_MS :
	    left)) < 0) {
		if (errno == EINTR && shutdown_requested)
			engine_bye(eng, END_SHUTDOWN, "Server shutting down.");
		return;
	}
	for (int k = 1; k < n && eng->end == END_NONE; k++) {
		int i = map[k];
		enum io_status st;

		if (pfd[k].revents == 0 &&
		    !iobuf_has_decrypted(&eng->links[i].be->io))
			continue;
		st = link_read(eng, i);
		if (st == IO_OK || st == IO_AGAIN)
			continue;
		if (eng->end != END_NONE)
			break;
		if (link_pump(eng, i) == 0)
			link_failed(eng, i);
	}
	if (eng->end == END_NONE && (pfd[0].revents != 0 ||
	    (client_may_send(eng) && iobuf_has_decrypted(eng->client)))) {
		enum io_status st = iobuf_try_fill(eng->client);

		if (st == IO_OK)
			eng->last_client = now_ms();
		else if (st != IO_AGAIN)
			eng->end = END_CLIENT_GONE;
	}
}

/* ------------------------------------------------------------------ */
/* the relay: one back-end, nothing to route */

/* A run of the client's bytes, on to the back-end. */
static int
relay_to_backend(struct engine *eng, const char *p, size_t n)
{
	struct iobuf *b = &eng->links[0].be->io;

	if (n == 0)
		return 0;
	b->deadline = deadline_in(eng->cfg->backend_timeout);
	if (iobuf_write(b, p, n) == IO_OK)
		return 0;
	link_failed(eng, 0);
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
relay_literal_too_large(struct engine *eng, const char *line, size_t len,
    enum literal_kind k, uint64_t n)
{
	char tag[TAG_MAX + 2];

	log_msg(LOG_NOTICE, "event=limit reason=\"literal of %llu bytes, more "
	    "than max_literal_size\"", (unsigned long long)n);
	if (k == LIT_SYNC && resp_scan_at_start(&eng->client_sc)) {
		early_tag(line, len, tag, sizeof(tag));
		return client_line(eng, "%s NO [TOOBIG] Literal too large.",
		    tag);
	}
	bye_after_link(eng, 0, "Literal too large.");
	eng->end = END_LIMIT;
	return -1;
}

/*
 * Relayed, the client's bytes go to the back-end as they come, in one
 * write for all that is whole, read only by the scanner that follows the
 * literals they announce.
 */
static void
relay_client(struct engine *eng)
{
	struct iobuf *c = eng->client;
	const char *p = c->buf + c->start;
	size_t n = iobuf_pending(c), used = 0, from = 0;

	while (used < n && eng->end == END_NONE) {
		size_t k = resp_scan_piece(&eng->client_sc, p + used, n - used);
		enum literal_kind lk = LIT_NONE;
		uint64_t size = 0;

		if (k == 0 && n - used < c->cap / 2)
			break;		/* the rest of the line is to come */
		if (k == 0)
			k = n - used;	/* a very long line: on it goes */
		else if (eng->client_sc.literal_left == 0) {
			size_t len = k - 1 - (k > 1 && p[used + k - 2] == '\r');

			lk = literal_at_end(p + used, len, &size);
		}
		if ((lk == LIT_SYNC || lk == LIT_NONSYNC) &&
		    size > eng->cfg->max_literal_size &&
		    !resp_scan_at_start(&eng->links[0].be->sc))
			break;	/* answered once the back-end's response ends */
		if ((lk == LIT_SYNC || lk == LIT_NONSYNC) &&
		    size > eng->cfg->max_literal_size) {
			if (relay_to_backend(eng, p + from, used - from) != 0 ||
			    relay_literal_too_large(eng, p + used, k, lk,
			    size) != 0)
				break;
			used += k;
			from = used;	/* that line goes nowhere */
			continue;
		}
		resp_scan(&eng->client_sc, p + used, k);
		used += k;
	}
	if (eng->end == END_NONE && eng->client_sc.largest_literal >
	    eng->cfg->max_literal_size) {
		/* announced at the end of a line too long to hold */
		relay_literal_too_large(eng, p, 0, LIT_NONSYNC,
		    eng->client_sc.largest_literal);
	} else if (eng->end == END_NONE)
		relay_to_backend(eng, p + from, used - from);
	iobuf_consume(c, used);
}

/* Is a whole line of the client's buffered? */
static int
client_has_line(const struct engine *eng)
{
	const struct iobuf *c = eng->client;

	return memchr(c->buf + c->start, '\n', iobuf_pending(c)) != NULL;
}

static void
engine_loop(struct engine *eng, struct pollfd *pfd, int *map)
{
	while (eng->end == END_NONE) {
		if (drain_links(eng) != 0)
			break;
		if (eng->relayed) {
			relay_client(eng);
			if (eng->end == END_NONE)
				wait_for_input(eng, pfd, map);
			continue;
		}
		if (eng->raw_for >= 0 && client_has_line(eng)) {
			int i = eng->raw_for;

			if (raw_line_to_link(eng, i) == -2)
				link_failed(eng, i);
			continue;
		}
		if (eng->raw_for >= 0 || !client_may_send(eng) ||
		    next_line_literal(eng) < 0) {
			wait_for_input(eng, pfd, map);
			continue;
		}
		/* the reader may wait for a literal: what is queued goes first */
		if (next_line_literal(eng) != LIT_NONE && flush_out(eng) != 0) {
			link_failed(eng, eng->busy);
			continue;
		}
		switch (read_command(eng)) {
		case RD_COMMAND:
			route_command(eng);
			break;
		case RD_ANSWERED:
		case RD_END:
			break;
		}
	}
}

enum session_end
engine_run(const struct config *cfg, struct iobuf *client,
    struct backend *home, const struct credentials *cr,
    const struct client_info *ci, const char *user)
{
	struct engine eng = { .cfg = cfg, .client = client, .cr = cr, .ci = ci,
	    .user = user, .selected = -1, .busy = -1, .raw_for = -1,
	    .relayed = !config_routed(cfg), .pipe = { -1, -1 },
	    .end = END_NONE };
	struct pollfd *pfd;
	int n = 1, *map;

	for (const struct route *r = cfg->publics; r != NULL; r = r->next)
		n++;
	/* relayed, referrals reach the client: no link but home */
	eng.maxlinks = eng.relayed ? 1 : n + REFERRAL_LINKS_MAX;
	eng.links = calloc((size_t)eng.maxlinks, sizeof(*eng.links));
	eng.answer = malloc(sizeof(*eng.answer));
	pfd = calloc((size_t)eng.maxlinks + 1, sizeof(*pfd));
	map = calloc((size_t)eng.maxlinks + 1, sizeof(*map));
	if (eng.links == NULL || pfd == NULL || map == NULL ||
	    eng.answer == NULL) {
		client_line(&eng, "* BYE Out of memory.");
		eng.end = END_LIMIT;
		n = 0;
	}
	eng.nlinks = eng.npublic = n;
	if (n > 0) {
		eng.links[0].be = home;
		eng.links[0].up = 1;
		eng.links[0].last_used = now_ms();
	}
	n = 1;
	for (const struct route *r = cfg->publics; r != NULL &&
	    eng.links != NULL; r = r->next) {
		eng.links[n].public = 1;
		link_init(&eng.links[n++], r);
	}
	eng.last_client = now_ms();
	resp_scanner_init(&eng.client_sc);
	engine_loop(&eng, pfd, map);
	/* After the back-end's BYE (a LOGOUT, mostly) either side may close. */
	if (home->sc.saw_bye && (eng.end == END_BACKEND_GONE ||
	    eng.end == END_CLIENT_GONE))
		eng.end = END_LOGOUT;
	for (int i = 1; i < eng.nlinks; i++)
		backend_close(eng.links[i].be);
	if (eng.pipe[0] >= 0) {
		close(eng.pipe[0]);
		close(eng.pipe[1]);
	}
	cmd_buf_free(&eng.cb);
	str_free(&eng.out);
	free(eng.flight);
	free(eng.answer);
	free(eng.enabled);
	free(eng.links);
	free(pfd);
	free(map);
	return eng.end;
}
