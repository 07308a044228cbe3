/*
 * COPY and MOVE to a mailbox on another server: imapfe carries the
 * messages over itself, fetching each from the source and appending it
 * to the destination, its body streamed through.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include "imapfe.h"
#include "router.h"

#define CROSS_COPY_MAX	100000		/* messages in one command */

struct msg_meta {
	unsigned long	 uid;
	char		 flags[256];
	char		 date[40];
};

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

/* What collecting the messages of a COPY needs. */
struct meta_ctx {
	struct router	*rt;
	int		 from;
	struct msg_meta	*meta;
	size_t		 count;
	size_t		 cap;
	int		 over;		/* more than CROSS_COPY_MAX */
	int		 failed;	/* out of memory */
};

/* A FETCH answer of the collecting FETCH is kept, not passed on. */
static enum sink_verdict
meta_keep(struct meta_ctx *mc, const char *line)
{
	struct msg_meta *m;

	if (strstr(line, " FETCH (") == NULL || strstr(line, "UID ") == NULL)
		/* the selected mailbox's news */
		return router_untagged(mc->rt, mc->from, line, strlen(line));
	if (mc->count == CROSS_COPY_MAX) {
		mc->over = 1;
		return SINK_DROP;
	}
	if (mc->count == mc->cap) {
		size_t cap = mc->cap ? mc->cap * 2 : 16;

		if ((m = realloc(mc->meta, cap * sizeof(*m))) == NULL) {
			mc->failed = 1;
			return SINK_FAIL;
		}
		mc->meta = m;
		mc->cap = cap;
	}
	m = &mc->meta[mc->count++];
	m->uid = strtoul(strstr(line, "UID ") + 4, NULL, 10);
	fetch_item(line, "FLAGS", '(', ')', m->flags, sizeof(m->flags));
	strip_recent(m->flags);
	fetch_item(line, "INTERNALDATE", '"', '"', m->date, sizeof(m->date));
	return SINK_DROP;
}

static enum sink_verdict
meta_line(void *ctx, const char *raw, size_t len)
{
	struct meta_ctx *mc = ctx;
	char *line;
	enum sink_verdict v;

	/* the response as a string of its own: it ends where its line does */
	if ((line = strndup(raw, len)) == NULL) {
		mc->failed = 1;
		return SINK_FAIL;
	}
	v = meta_keep(mc, line);
	free(line);
	return v;
}


/*
 * The messages a client's sequence set names on the source: UID, flags
 * and arrival date, from a FETCH whose answers imapfe keeps.  Untagged
 * answers of other kinds belong to the client's selected mailbox.
 * Returns 0, -1 on failure, -2 when the source refused the set, -3 when
 * the set names more than CROSS_COPY_MAX messages.
 */
static int
collect_meta(struct router *rt, int from, const struct token *set, int uid,
    struct msg_meta **meta, size_t *count)
{
	struct meta_ctx mc = { .rt = rt, .from = from };
	struct resp_sink sink = { .out = router_client(rt), .line = meta_line,
	    .long_lines = 1, .ctx = &mc };
	struct str text = { 0 };
	struct reply *r = malloc(sizeof(*r));
	enum reply_status rs = REPLY_LOST;

	if (r != NULL && str_printf(&text, "%sFETCH %.*s (UID FLAGS "
	    "INTERNALDATE)", uid ? "UID " : "", (int)set->len, set->s) == 0)
		rs = backend_simple(router_backend(rt, from),
		    router_config(rt), text.s, &sink, r);
	str_free(&text);
	free(r);
	*meta = mc.meta;
	*count = mc.count;
	if (rs == REPLY_NO || rs == REPLY_BAD)
		return -2;
	if (rs != REPLY_OK || mc.failed)
		return -1;
	return mc.over ? -3 : 0;
}

/* One message on its way from the source's FETCH to the destination. */
struct body_copy {
	struct router		*rt;
	int			 to;
	const struct token	*mbox;
	const struct msg_meta	*m;
	struct reply		*dest;	/* the destination's answer */
	char			 atag[16];
	uint64_t		 left;	/* of the body, still to send */
	int			 first;	/* the next piece is the FETCH line */
	enum { BODY_WAIT, BODY_SENDING, BODY_SENT, BODY_REFUSED,
	    BODY_BROKEN }	 state;
};

/*
 * The FETCH line announcing the body: the APPEND goes to the destination
 * with the same size, and once it says "+" the body follows, piece by
 * piece, as the source sends it.
 */
static enum sink_verdict
body_line(void *ctx, const char *line, size_t len)
{
	struct body_copy *bc = ctx;
	struct backend *to = router_backend(bc->rt, bc->to);
	const struct msg_meta *m = bc->m;
	struct str append = { 0 };
	enum reply_status rs = REPLY_LOST;
	uint64_t size;
	enum literal_kind k = literal_at_end(line, len, &size);

	if (bc->state != BODY_WAIT || memmem(line, len, " FETCH (", 8) == NULL ||
	    (k != LIT_SYNC && k != LIT_NONSYNC))
		return SINK_DROP;
	snprintf(bc->atag, sizeof(bc->atag), "%s", backend_next_tag(to));
	if (str_printf(&append, "%s APPEND ", bc->atag) == 0 &&
	    imap_append_string(&append, bc->mbox->s, bc->mbox->len, 0) >= 0 &&
	    str_printf(&append, " (%s)%s%s%s {%llu}\r\n", m->flags,
	    m->date[0] ? " \"" : "", m->date, m->date[0] ? "\"" : "",
	    (unsigned long long)size) == 0) {
		to->io.deadline = deadline_in(router_config(bc->rt)->backend_timeout);
		if (iobuf_write(&to->io, append.s, append.len) == IO_OK)
			rs = backend_await(to, router_config(bc->rt), bc->atag, NULL,
			    bc->dest);
	}
	str_free(&append);
	if (rs != REPLY_PLUS) {
		/* refused: the body on its way from the source goes nowhere */
		bc->state = rs == REPLY_NO || rs == REPLY_BAD ? BODY_REFUSED :
		    BODY_BROKEN;
		return SINK_DROP;
	}
	bc->state = BODY_SENDING;
	bc->left = size;
	bc->first = 1;
	return SINK_KEEP;
}

static int
body_data(void *ctx, const char *p, size_t n)
{
	struct body_copy *bc = ctx;
	struct iobuf *io = &router_backend(bc->rt, bc->to)->io;

	if (bc->first) {		/* the FETCH line itself */
		bc->first = 0;
		return 0;
	}
	if (bc->state != BODY_SENDING)
		return 0;		/* ")" and the rest of the response */
	if (n > bc->left)
		n = (size_t)bc->left;
	io->deadline = deadline_in(router_config(bc->rt)->backend_timeout);
	if (iobuf_write(io, p, n) != IO_OK) {
		bc->state = BODY_BROKEN;
		return -1;
	}
	if ((bc->left -= n) == 0) {
		bc->state = BODY_BROKEN;
		if (iobuf_write(io, "\r\n", 2) != IO_OK)
			return -1;
		bc->state = BODY_SENT;
	}
	return 0;
}

/*
 * One message: FETCH its body from the source and APPEND it to the
 * destination at the same time, the literal flowing straight through.
 * Returns 0; 1 when the message is gone from the source; -1 on failure
 * of the source; -3 when the destination refused it (its answer in
 * dest); -4 when the destination was left inside the APPEND.
 */
static int
copy_one(struct router *rt, int from, int to, const struct token *mbox,
    const struct msg_meta *m, struct reply *dest)
{
	struct body_copy bc = { .rt = rt, .to = to, .mbox = mbox, .m = m,
	    .dest = dest, .state = BODY_WAIT };
	struct resp_sink sink = { .line = body_line, .data = body_data,
	    .ctx = &bc };
	struct reply *r = malloc(sizeof(*r));
	char text[64];
	enum reply_status rs = REPLY_LOST;

	snprintf(text, sizeof(text), "UID FETCH %lu BODY.PEEK[]", m->uid);
	if (r != NULL)
		rs = backend_simple(router_backend(rt, from), router_config(rt), text, &sink,
		    r);
	free(r);
	switch (bc.state) {
	case BODY_WAIT:
		return rs == REPLY_OK ? 1 : -1;
	case BODY_REFUSED:
		return rs == REPLY_OK ? -3 : -1;
	case BODY_SENDING:
	case BODY_BROKEN:
		return -4;
	case BODY_SENT:
		break;
	}
	rs = backend_await(router_backend(rt, to), router_config(rt), bc.atag, NULL, dest);
	if (rs == REPLY_OK)
		return 0;
	return rs == REPLY_NO || rs == REPLY_BAD ? -3 : -4;
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
		    router_link_command(rt, from, cmd.s) != 0))
			rc = -1;
		str_wipe(&cmd);
		if (rc == 0 && (str_printf(&cmd, "UID EXPUNGE %s", set.s) != 0 ||
		    router_link_command(rt, from, cmd.s) != 0))
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
void
cross_copy(struct router *rt, const struct command *c, size_t first,
    int from, int to, int move)
{
	const struct token *mbox = &c->tok[c->ntok - 1];
	const char *what = move ? "MOVE" : "COPY";
	struct reply *dest = malloc(sizeof(*dest));
	struct msg_meta *meta = NULL;
	size_t count = 0, copied = 0;
	int rc;

	if (dest == NULL) {
		router_bye(rt, END_LIMIT, "Out of memory.");
		return;
	}
	dest->code = CODE_NONE;
	if (move && !caps_has(router_backend(rt, from)->caps, "UIDPLUS")) {
		client_line(rt, "%s NO [CANNOT] MOVE between servers needs "
		    "UIDPLUS on the source server.", c->tag);
		free(dest);
		return;
	}
	if (to > 0 && public_unavailable(rt, to, c->tag)) {
		free(dest);
		return;
	}
	rc = collect_meta(rt, from, &c->tok[first], first == 1, &meta, &count);
	for (size_t k = 0; rc == 0 && k < count; k++) {
		rc = copy_one(rt, from, to, mbox, &meta[k], dest);
		if (rc == 0)
			copied++;
		else if (rc == 1)
			rc = 0;		/* expunged meanwhile: nothing to copy */
	}
	if (rc == 0 && move)
		rc = remove_originals(rt, from, meta, count);
	free(meta);
	if (rc == -4) {
		/* inside an APPEND it cannot finish: that connection is lost */
		router_link_lost(rt, to, c->tag);
		free(dest);
		return;
	}
	if (rc == -2)
		client_line(rt, "%s NO Invalid message set.", c->tag);
	else if (rc == -3 && count > CROSS_COPY_MAX - 1 && copied == 0)
		client_line(rt, "%s NO [LIMIT] At most %d messages can be "
		    "copied between servers at once.", c->tag, CROSS_COPY_MAX);
	else if (rc == -3 && dest->code == CODE_TRYCREATE && copied == 0)
		client_line(rt, "%s NO [TRYCREATE] The destination mailbox does "
		    "not exist.", c->tag);
	else if (rc != 0) {
		log_msg(LOG_ERR, "event=copy-failed user=\"%s\" copied=%zu "
		    "of=%zu", router_user(rt), copied, count);
		client_line(rt, "%s NO [%s] %s between servers failed after %zu "
		    "of %zu messages.", c->tag, rc == -3 ? "CANNOT" :
		    "UNAVAILABLE", what, copied, count);
	} else
		client_line(rt, "%s OK %s completed.", c->tag, what);
	free(dest);
}

