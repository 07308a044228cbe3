/*
 * COPY and MOVE to a mailbox on another server: imapfe carries the
 * messages over itself, fetching each from the source and appending it
 * to the destination, its body streamed through, never held whole.
 *
 * All or nothing, as RFC 9051 6.4.7 asks of COPY: where the destination
 * offers MULTIAPPEND (RFC 3502) every message goes in one APPEND, which
 * the server stores whole or not at all; elsewhere each message is its
 * own APPEND, and after a failure the copies already stored are removed
 * again by their APPENDUID UIDs (RFC 4315).  A MOVE expunges exactly the
 * originals that were copied, and only once every copy is stored.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include "engine.h"

#define CROSS_COPY_MAX		100000	/* messages in one command */
#define UIDS_PER_COMMAND	200	/* keeps each line well under limits */
#define UID_SET_LOG_MAX		512	/* of a UID set in a log line */
#define COPYUID_MAX		(TAGGED_LINE_MAX - 256)

struct msg_meta {
	uint32_t	 uid;
	char		 flags[256];	/* "\Seen $x", without \Recent */
	char		 date[40];	/* INTERNALDATE's, or "" */
};

/* How a cross-server copy ended. */
enum copy_result {
	COPY_DONE,
	COPY_BAD_SET,		/* the source refused the set */
	COPY_TOO_MANY,		/* more than CROSS_COPY_MAX messages */
	COPY_SOURCE_FAILED,	/* the source refused a message's body */
	COPY_SOURCE_LOST,	/* the source's connection is gone */
	COPY_REFUSED,		/* the destination said NO or BAD: in dest */
	COPY_DEST_LOST,		/* the destination's connection is gone */
	COPY_NOMEM
};

/* One COPY or MOVE between servers, from start to answer. */
struct copy_run {
	struct engine		*eng;
	const char		*tag;
	const char		*what;		/* "COPY" or "MOVE" */
	int			 from;
	int			 to;
	const struct token	*mbox;
	int			 multi;		/* one MULTIAPPEND for all */
	struct msg_meta		*meta;		/* the set's messages, owned */
	size_t			 count;
	int			 over;		/* the set named too many */
	int			 nomem;
	int			 unreadable;	/* a FETCH imapfe cannot read */
	const struct token	*set;		/* the client's */
	int			 by_uid;	/* set holds UIDs */
	int			 dest_broken;	/* left inside a literal */
	char			 atag[16];	/* the open APPEND's, or "" */
	struct uid_list		 src;		/* originals sent, in order */
	struct uid_list		 dst;		/* their copies' UIDs */
	uint32_t		 uidvalidity;	/* the destination's */
	int			 uids_known;	/* dst matches stored */
	size_t			 stored;	/* copies the destination holds */
	size_t			 pending;	/* in the open MULTIAPPEND */
	struct reply		*dest;		/* its last answer, owned */
};

/* ------------------------------------------------------------------ */
/* the messages of the set: UID, flags and arrival date */

/* "* n FETCH (": an untagged FETCH response (RFC 9051 message-data). */
static int
is_fetch(const char *line, size_t len)
{
	size_t k = 2;

	if (len < 2 || line[0] != '*' || line[1] != ' ')
		return 0;
	while (k < len && line[k] >= '0' && line[k] <= '9')
		k++;
	return k > 2 && len - k >= 8 && strncasecmp(line + k, " FETCH (", 8)
	    == 0;
}

/*
 * An untagged FETCH response, "* n FETCH (...)", parsed as a command
 * ("x n FETCH (...)") into c; buf holds the copy the tokens point into.
 * Returns the index of the token after "(", or 0 when it is no FETCH.
 */
static size_t
fetch_parse(const char *line, size_t len, struct str *buf,
    struct command *c)
{
	const char *why;

	str_wipe(buf);
	if (len < 4 || line[0] != '*' || line[1] != ' ' ||
	    str_adds(buf, "x") != 0 || str_add(buf, line + 1, len - 1) != 0 ||
	    str_add(buf, "", 1) != 0 ||
	    parse_command(buf->s, len, c, &why) != PARSE_OK)
		return 0;
	if (c->ntok < 3 || c->tok[0].type != TOK_ATOM || c->tok[0].len != 5 ||
	    strncasecmp(c->tok[0].s, "FETCH", 5) != 0 ||
	    c->tok[1].type != TOK_LPAREN)
		return 0;
	return 2;
}

static int
token_is(const struct token *t, const char *word)
{
	return t->type == TOK_ATOM && t->len == strlen(word) &&
	    strncasecmp(t->s, word, t->len) == 0;
}

/* A UID token's value, or 0. */
static uint32_t
token_uid(const struct token *t)
{
	struct uid_list l = { 0 };
	uint32_t uid = 0;

	if (t->type == TOK_ATOM && uid_set_parse(t->s, t->len, 2, &l) == 0 &&
	    l.n == 1)
		uid = l.uid[0];
	uid_list_free(&l);
	return uid;
}

/*
 * The flag list starting at tok[k] ("("), \Recent left out: the
 * server's to set.  -1 when it does not fit.
 */
static int
meta_flags(const struct command *c, size_t k, struct msg_meta *m)
{
	size_t used = 0;

	m->flags[0] = '\0';
	for (k++; k < c->ntok && c->tok[k].type == TOK_ATOM; k++) {
		const struct token *t = &c->tok[k];

		if (token_is(t, "\\Recent"))
			continue;
		if (used + t->len + 2 > sizeof(m->flags))
			return -1;
		used += (size_t)snprintf(m->flags + used, sizeof(m->flags) -
		    used, "%s%.*s", used ? " " : "", (int)t->len, t->s);
	}
	return k < c->ntok && c->tok[k].type == TOK_RPAREN ? 0 : -1;
}

/*
 * UID, FLAGS and INTERNALDATE of a FETCH response's items, from tok[k]
 * (other items, MODSEQ say, skipped; a server that gives no date gets
 * none back).  0 with a UID; 1 without: an unsolicited FETCH (flags
 * changed), not an answer to ours; -1 when the flags do not fit.
 */
static int
meta_items(const struct command *c, size_t k, struct msg_meta *m)
{
	memset(m, 0, sizeof(*m));
	while (k + 1 < c->ntok && c->tok[k].type == TOK_ATOM) {
		const struct token *t = &c->tok[k], *v = &c->tok[k + 1];

		if (token_is(t, "UID"))
			m->uid = token_uid(v);
		else if (token_is(t, "INTERNALDATE") && v->type == TOK_QUOTED &&
		    v->len < sizeof(m->date))
			snprintf(m->date, sizeof(m->date), "%.*s", (int)v->len,
			    v->s);
		else if (token_is(t, "FLAGS") && v->type == TOK_LPAREN &&
		    meta_flags(c, k + 1, m) != 0)
			return -1;
		k = token_group_end(c, k + 1);
	}
	return m->uid != 0 ? 0 : 1;
}

/* A number of a sequence set, "*" the largest there can be. */
static int
set_number(const char **p, const char *end, uint32_t *out)
{
	if (*p < end && **p == '*') {
		(*p)++;
		*out = UINT32_MAX;
		return 0;
	}
	return nz_number_parse(p, end, out);
}

/*
 * Is v in the client's sequence set (RFC 9051 sequence-set: "2,4:7,9:*")?
 * A FETCH answer outside it is no answer to the collecting FETCH.
 */
static int
in_set(const struct token *set, uint32_t v)
{
	const char *p = set->s, *end = set->s + set->len;
	uint32_t lo, hi;

	while (p < end) {
		if (set_number(&p, end, &lo) != 0)
			return 0;
		hi = lo;
		if (p < end && *p == ':') {
			p++;
			if (set_number(&p, end, &hi) != 0)
				return 0;
		}
		if ((v >= lo && v <= hi) || (v >= hi && v <= lo))
			return 1;
		if (p < end && *p++ != ',')
			return 0;
	}
	return 0;
}

/* The message sequence number of a parsed "x n FETCH ...", or 0. */
static uint32_t
fetch_seq(const struct command *c)
{
	const char *p = c->name;
	uint32_t n = 0;

	return set_number(&p, p + strlen(p), &n) == 0 && *p == '\0' &&
	    n != UINT32_MAX ? n : 0;
}

static int
meta_uid_order(const void *a, const void *b)
{
	const struct msg_meta *x = a, *y = b;

	if (x->uid != y->uid)
		return x->uid < y->uid ? -1 : 1;
	/* the one with a date (the answer to imapfe's FETCH) first */
	return (y->date[0] != '\0') - (x->date[0] != '\0');
}

/*
 * The messages in UID order, each once: a server may send a FETCH of a
 * message of the set on its own too (a flag change, with its UID under
 * QRESYNC), besides its answer.
 */
static void
meta_unique(struct copy_run *run)
{
	size_t kept = 0;

	if (run->count == 0)
		return;
	qsort(run->meta, run->count, sizeof(*run->meta), meta_uid_order);
	for (size_t k = 1; k < run->count; k++)
		if (run->meta[k].uid != run->meta[kept].uid)
			run->meta[++kept] = run->meta[k];
	run->count = kept + 1;
}

/* What collecting the messages of a COPY needs. */
struct meta_ctx {
	struct copy_run	*run;
	size_t		 cap;
	struct str	 buf;
	struct command	 c;
};

/*
 * A FETCH answer with a UID is the collecting FETCH's, kept here; any
 * other response is the selected mailbox's news, the client's.
 */
static enum sink_verdict
meta_line(void *ctx, const char *line, size_t len)
{
	struct meta_ctx *mc = ctx;
	struct copy_run *run = mc->run;
	struct msg_meta m, *grown;
	size_t k;
	int rc;

	if (!is_fetch(line, len))
		return link_untagged(run->eng, run->from, line, len);
	k = fetch_parse(line, len, &mc->buf, &mc->c);
	if ((rc = k == 0 ? -1 : meta_items(&mc->c, k, &m)) == 1 ||
	    (rc == 0 && !in_set(run->set, run->by_uid ? m.uid :
	    fetch_seq(&mc->c))))
		return link_untagged(run->eng, run->from, line, len);
	if (rc != 0) {
		/* never a message of the set left out unnoticed */
		run->unreadable = 1;
		return SINK_DROP;
	}
	if (run->count == CROSS_COPY_MAX) {
		run->over = 1;
		return SINK_DROP;
	}
	if (run->count == mc->cap) {
		size_t cap = mc->cap ? mc->cap * 2 : 16;

		if ((grown = reallocarray(run->meta, cap, sizeof(m))) == NULL) {
			run->nomem = 1;
			return SINK_FAIL;
		}
		run->meta = grown;
		mc->cap = cap;
	}
	run->meta[run->count++] = m;
	return SINK_DROP;
}

/* The messages the client's set names on the source. */
static enum copy_result
collect_meta(struct copy_run *run)
{
	struct meta_ctx *mc = calloc(1, sizeof(*mc));
	struct resp_sink sink = { .out = run->eng->client,
	    .line = meta_line, .long_lines = 1, .ctx = mc };
	struct str text = { 0 };
	struct reply *r = malloc(sizeof(*r));
	enum reply_status rs = REPLY_LOST;

	if (mc == NULL || r == NULL) {
		free(mc);
		free(r);
		return COPY_NOMEM;
	}
	mc->run = run;
	if (str_printf(&text, "%sFETCH %.*s (UID FLAGS INTERNALDATE)",
	    run->by_uid ? "UID " : "", (int)run->set->len, run->set->s) == 0)
		rs = backend_simple(run->eng->links[run->from].be,
		    run->eng->cfg, text.s, &sink, r);
	str_free(&text);
	str_free(&mc->buf);
	free(mc);
	free(r);
	if (run->nomem)
		return COPY_NOMEM;
	if (rs == REPLY_NO || rs == REPLY_BAD)
		return COPY_BAD_SET;
	if (rs != REPLY_OK)
		return COPY_SOURCE_LOST;
	if (run->unreadable)
		return COPY_SOURCE_FAILED;
	if (run->over)
		return COPY_TOO_MANY;
	meta_unique(run);
	return COPY_DONE;
}

/* ------------------------------------------------------------------ */
/* the destination's APPEND */

static struct backend *
dest_backend(const struct copy_run *run)
{
	return run->eng->links[run->to].be;
}

static enum copy_result
dest_write(struct copy_run *run, const char *p, size_t n)
{
	struct backend *be = dest_backend(run);

	be->io.deadline = deadline_in(run->eng->cfg->backend_timeout);
	return iobuf_write(&be->io, p, n) == IO_OK ? COPY_DONE :
	    COPY_DEST_LOST;
}

/*
 * The destination's tagged answer to the APPEND: with OK it holds the
 * messages sent in it, and its APPENDUID names their UIDs in the order
 * sent (RFC 4315 3).  Without an APPENDUID, or one that does not fit,
 * the copies cannot be named: no COPYUID, and no removal.
 */
static void
append_answered(struct copy_run *run)
{
	struct status_resp st;
	struct uid_list got = { 0 };
	uint32_t validity = 0;
	size_t sent = run->pending;

	run->pending = 0;
	if (run->dest->status != REPLY_OK) {
		run->src.n = run->stored;	/* they were not stored */
		return;
	}
	run->stored += sent;
	if (status_parse(run->dest->line, run->dest->len, run->atag, &st)
	    != 0 || appenduid_parse(&st, sent + 1, &validity, &got) != 0 ||
	    got.n != sent ||
	    (run->dst.n > 0 && validity != run->uidvalidity))
		run->uids_known = 0;
	for (size_t k = 0; run->uids_known && k < got.n; k++)
		if (uid_list_add(&run->dst, got.uid[k]) != 0)
			run->uids_known = 0;
	run->uidvalidity = validity;
	uid_list_free(&got);
}

/* Wait for the destination's "+" or its tagged answer. */
static enum copy_result
append_await(struct copy_run *run)
{
	enum reply_status rs = backend_await(dest_backend(run),
	    run->eng->cfg, run->atag, NULL, run->dest);

	if (rs == REPLY_PLUS)
		return COPY_DONE;
	if (rs == REPLY_LOST || rs == REPLY_BYE) {
		run->src.n = run->stored;
		run->pending = 0;
		return COPY_DEST_LOST;
	}
	append_answered(run);
	run->atag[0] = '\0';
	return rs == REPLY_OK ? COPY_DONE : COPY_REFUSED;
}

/*
 * The part of the APPEND before message m's body, of size octets: the
 * command itself for the first message, " (flags) date {n}" for the next
 * ones of a MULTIAPPEND.  COPY_DONE once the destination says "+".
 */
static enum copy_result
append_message(struct copy_run *run, const struct msg_meta *m,
    uint64_t size)
{
	struct str text = { 0 };
	enum copy_result rc = COPY_NOMEM;
	int open = run->atag[0] != '\0';

	if (!open)
		snprintf(run->atag, sizeof(run->atag), "%s",
		    backend_next_tag(dest_backend(run)));
	if ((open || (str_printf(&text, "%s APPEND ", run->atag) == 0 &&
	    imap_append_string(&text, run->mbox->s, run->mbox->len, 0) >= 0)) &&
	    str_printf(&text, " (%s)%s%s%s {%llu}\r\n", m->flags,
	    m->date[0] ? " \"" : "", m->date, m->date[0] ? "\"" : "",
	    (unsigned long long)size) == 0 &&
	    uid_list_add(&run->src, m->uid) == 0) {
		run->pending++;
		rc = dest_write(run, text.s, text.len);
	}
	str_free(&text);
	if (rc == COPY_NOMEM && open)
		return rc;	/* nothing sent: the APPEND is still open */
	if (rc != COPY_DONE) {
		run->atag[0] = '\0';
		return rc;
	}
	rc = append_await(run);
	if (rc == COPY_DONE && run->atag[0] == '\0')
		return COPY_DEST_LOST;	/* OK before the body: not IMAP */
	return rc;
}

/* The end of the APPEND: CRLF, and the destination's answer. */
static enum copy_result
append_end(struct copy_run *run, const char *end)
{
	enum copy_result rc;

	if (run->atag[0] == '\0')
		return COPY_DONE;
	if ((rc = dest_write(run, end, strlen(end))) != COPY_DONE) {
		run->atag[0] = '\0';
		return rc;
	}
	rc = append_await(run);
	if (rc == COPY_DONE && run->atag[0] != '\0') {
		/* a "+" after the end: the server is lost to us */
		run->atag[0] = '\0';
		return COPY_DEST_LOST;
	}
	return rc;
}

/*
 * Give up an open APPEND after a message's literal: an argument where
 * the next message or the end must be makes the whole command fail, and
 * a failed APPEND or MULTIAPPEND stores nothing (RFC 3502 6.3.11).
 * Should the server store anyway, the copies count as stored, to be
 * removed as any.
 */
static enum copy_result
append_abort(struct copy_run *run)
{
	return append_end(run, " NIL\r\n");
}

/* ------------------------------------------------------------------ */
/* one message: the source's FETCH streamed into the destination */

struct body_copy {
	struct copy_run		*run;
	const struct msg_meta	*m;
	enum copy_result	 dest_rc;	/* the APPEND's, once begun */
	uint64_t		 left;		/* of the body, still to send */
	int			 first;		/* the next piece: the line */
	enum { BODY_WAIT, BODY_SENDING, BODY_SENT, BODY_REFUSED,
	    BODY_BROKEN }	 state;
};

/* A FETCH with a literal at the end: the one bringing the body. */
static int
is_fetch_with_literal(const char *line, size_t len, uint64_t *size)
{
	enum literal_kind lk;

	if (!is_fetch(line, len))
		return 0;
	lk = literal_at_end(line, len, size);
	return lk == LIT_SYNC || lk == LIT_NONSYNC;
}

/*
 * The FETCH line announcing the body: the message's part of the APPEND
 * goes to the destination with the same size, and once it says "+" the
 * body follows, piece by piece, as the source sends it.
 */
static enum sink_verdict
body_line(void *ctx, const char *line, size_t len)
{
	struct body_copy *bc = ctx;
	uint64_t size;

	if (bc->state != BODY_WAIT || !is_fetch_with_literal(line, len, &size))
		return SINK_DROP;
	bc->dest_rc = append_message(bc->run, bc->m, size);
	if (bc->dest_rc != COPY_DONE) {
		/* refused: the body on its way from the source goes nowhere */
		bc->state = BODY_REFUSED;
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

	if (bc->first) {		/* the FETCH line itself */
		bc->first = 0;
		return 0;
	}
	if (bc->state != BODY_SENDING)
		return 0;		/* ")" and the rest of the response */
	if (n > bc->left)
		n = (size_t)bc->left;
	if (dest_write(bc->run, p, n) != COPY_DONE) {
		bc->state = BODY_BROKEN;
		return -1;
	}
	if ((bc->left -= n) == 0)
		bc->state = BODY_SENT;
	return 0;
}

/*
 * One message: FETCH its body from the source and send it into the
 * destination's APPEND at the same time, the literal flowing straight
 * through.  Alone (no MULTIAPPEND), its APPEND then ends here.  A message
 * gone from the source meanwhile is skipped.
 */
static enum copy_result
copy_one(struct copy_run *run, const struct msg_meta *m)
{
	struct body_copy bc = { .run = run, .m = m, .state = BODY_WAIT };
	struct resp_sink sink = { .line = body_line, .data = body_data,
	    .ctx = &bc };
	struct reply *r = malloc(sizeof(*r));
	char text[64];
	enum reply_status rs = REPLY_LOST;

	if (r == NULL)
		return COPY_NOMEM;
	snprintf(text, sizeof(text), "UID FETCH %lu BODY.PEEK[]",
	    (unsigned long)m->uid);
	rs = backend_simple(run->eng->links[run->from].be,
	    run->eng->cfg, text, &sink, r);
	free(r);
	switch (bc.state) {
	case BODY_WAIT:
		if (rs == REPLY_OK)
			return COPY_DONE;	/* expunged meanwhile */
		return rs == REPLY_LOST || rs == REPLY_BYE ? COPY_SOURCE_LOST :
		    COPY_SOURCE_FAILED;
	case BODY_REFUSED:
		return bc.dest_rc;
	case BODY_SENDING:
	case BODY_BROKEN:
		/* the destination is inside a literal it cannot finish */
		run->dest_broken = 1;
		run->atag[0] = '\0';
		run->src.n = run->stored;
		run->pending = 0;
		return rs == REPLY_LOST || rs == REPLY_BYE ? COPY_SOURCE_LOST :
		    COPY_DEST_LOST;
	case BODY_SENT:
		break;
	}
	if (rs != REPLY_OK)
		return rs == REPLY_LOST || rs == REPLY_BYE ? COPY_SOURCE_LOST :
		    COPY_SOURCE_FAILED;
	return run->multi ? COPY_DONE : append_end(run, "\r\n");
}

/* Every message of the set, in one MULTIAPPEND or one APPEND each. */
static enum copy_result
copy_all(struct copy_run *run)
{
	enum copy_result rc = COPY_DONE;

	for (size_t k = 0; rc == COPY_DONE && k < run->count; k++)
		rc = copy_one(run, &run->meta[k]);
	if (rc == COPY_DONE)
		return append_end(run, "\r\n");
	/* an APPEND still open (between two messages, or alone with its
	 * body sent but not ended) must store nothing */
	if (run->atag[0] != '\0')
		(void)append_abort(run);
	return rc;
}

/* ------------------------------------------------------------------ */
/* UID sets */

/* "5,7:9" for 5, 7, 8, 9: runs of consecutive UIDs as ranges. */
static int
uid_set_format(struct str *out, const uint32_t *uid, size_t n)
{
	for (size_t k = 0; k < n;) {
		size_t run = 1;

		while (k + run < n && uid[k + run] == uid[k] + run &&
		    uid[k + run] != 0)
			run++;
		if (str_printf(out, "%s%lu", k ? "," : "",
		    (unsigned long)uid[k]) != 0 || (run > 1 &&
		    str_printf(out, ":%lu", (unsigned long)uid[k + run - 1])
		    != 0))
			return -1;
		k += run;
	}
	return 0;
}

/*
 * "UID STORE set +FLAGS.SILENT (\Deleted)" and "UID EXPUNGE set" for
 * the UIDs in l, in slices; run_one runs each command on its link.
 */
static enum reply_status
expunge_uids(struct copy_run *run, const struct uid_list *l, int link,
    enum reply_status (*run_one)(struct copy_run *, int, const char *))
{
	struct str set = { 0 }, cmd = { 0 };
	enum reply_status rs = REPLY_OK;

	for (size_t k = 0; rs == REPLY_OK && k < l->n; k += UIDS_PER_COMMAND) {
		size_t n = l->n - k < UIDS_PER_COMMAND ? l->n - k :
		    UIDS_PER_COMMAND;

		str_wipe(&set);
		str_wipe(&cmd);
		if (uid_set_format(&set, l->uid + k, n) != 0 ||
		    str_printf(&cmd, "UID STORE %s +FLAGS.SILENT (\\Deleted)",
		    set.s) != 0) {
			rs = REPLY_LOST;
			break;
		}
		if ((rs = run_one(run, link, cmd.s)) != REPLY_OK)
			break;
		str_wipe(&cmd);
		if (str_printf(&cmd, "UID EXPUNGE %s", set.s) != 0)
			rs = REPLY_LOST;
		else
			rs = run_one(run, link, cmd.s);
	}
	str_free(&set);
	str_free(&cmd);
	return rs;
}

/* A command on the destination, whatever it says besides going nowhere. */
static enum reply_status
dest_command(struct copy_run *run, int link, const char *text)
{
	struct reply *r = malloc(sizeof(*r));
	enum reply_status rs = REPLY_LOST;

	if (r != NULL)
		rs = backend_simple(run->eng->links[link].be,
		    run->eng->cfg, text, NULL, r);
	free(r);
	return rs;
}

/* A command on the source: its EXPUNGEs are the client's to see. */
static enum reply_status
source_command(struct copy_run *run, int link, const char *text)
{
	return link_command(run->eng, link, text);
}

/* What a "UID SEARCH UID set" after a removal found. */
struct search_ctx {
	struct copy_run	*run;
	int		 link;
	int		 forward;	/* other news: the client's */
	struct str	 buf;
	struct command	 c;
	int		 found;		/* a UID of the set is still there */
};

static enum sink_verdict
search_line(void *ctx, const char *line, size_t len)
{
	struct search_ctx *sc = ctx;
	const char *why;

	str_wipe(&sc->buf);
	if (len > 2 && line[0] == '*' && str_adds(&sc->buf, "x") == 0 &&
	    str_add(&sc->buf, line + 1, len - 1) == 0 &&
	    str_add(&sc->buf, "", 1) == 0 &&
	    parse_command(sc->buf.s, len, &sc->c, &why) == PARSE_OK &&
	    strcmp(sc->c.name, "SEARCH") == 0) {
		if (sc->c.ntok > 0)
			sc->found = 1;
		return SINK_DROP;
	}
	return sc->forward ? link_untagged(sc->run->eng, sc->link, line, len) :
	    SINK_DROP;
}

/*
 * A server may answer OK to UID EXPUNGE and keep the messages (Dovecot
 * does when an ACL denies the user expunging): only a search that finds
 * none of them shows they are gone.  0 when none of l is left on link,
 * 1 when some are, -1 when the search failed.  On the client's selected
 * mailbox (forward), the news besides goes to the client.
 */
static int
uids_left(struct copy_run *run, int link, const struct uid_list *l,
    int forward)
{
	struct search_ctx *sc = calloc(1, sizeof(*sc));
	struct resp_sink sink = { .line = search_line, .long_lines = 1,
	    .ctx = sc, .out = forward ? run->eng->client : NULL };
	struct str set = { 0 }, cmd = { 0 };
	struct reply *r = malloc(sizeof(*r));
	int rc = -1;

	if (sc != NULL && r != NULL) {
		*sc = (struct search_ctx){ .run = run, .link = link,
		    .forward = forward };
		rc = 0;
		for (size_t k = 0; rc == 0 && !sc->found && k < l->n;
		    k += UIDS_PER_COMMAND) {
			size_t n = l->n - k < UIDS_PER_COMMAND ? l->n - k :
			    UIDS_PER_COMMAND;

			str_wipe(&set);
			str_wipe(&cmd);
			if (uid_set_format(&set, l->uid + k, n) != 0 ||
			    str_printf(&cmd, "UID SEARCH UID %s", set.s) != 0 ||
			    backend_simple(run->eng->links[link].be,
			    run->eng->cfg, cmd.s, &sink, r) != REPLY_OK)
				rc = -1;
		}
		if (rc == 0 && sc->found)
			rc = 1;
		str_free(&sc->buf);
	}
	str_free(&set);
	str_free(&cmd);
	free(sc);
	free(r);
	return rc;
}

/* What became of the copies a failed COPY had stored. */
enum undo_result {
	UNDO_DONE,		/* none stays: the destination is as it was */
	UNDO_KEPT,		/* they stay: unnamed, or the server kept them */
	UNDO_LOST		/* they stay: the destination's connection is gone */
};

/*
 * Take back the copies a failed COPY stored one APPEND at a time: select
 * the destination mailbox on the destination's connection, expunge
 * exactly their UIDs, check they are gone, and leave it with nothing
 * selected again, as the router keeps every server but the selected
 * mailbox's.
 */
static enum undo_result
undo_copies(struct copy_run *run)
{
	struct str cmd = { 0 };
	enum reply_status rs = REPLY_LOST;

	if (run->stored == 0)
		return UNDO_DONE;
	if (!run->uids_known || run->dst.n != run->stored)
		return UNDO_KEPT;
	if (str_adds(&cmd, "SELECT ") == 0 &&
	    imap_append_string(&cmd, run->mbox->s, run->mbox->len, 0) >= 0 &&
	    (rs = dest_command(run, run->to, cmd.s)) == REPLY_OK)
		rs = expunge_uids(run, &run->dst, run->to, dest_command);
	str_free(&cmd);
	if (rs == REPLY_LOST || rs == REPLY_BYE)
		return UNDO_LOST;
	if (rs == REPLY_OK && uids_left(run, run->to, &run->dst, 0) != 0)
		rs = REPLY_NO;
	link_unselect(run->eng, run->to);
	if (rs != REPLY_OK)
		return UNDO_KEPT;
	run->stored = 0;
	run->dst.n = 0;
	return UNDO_DONE;
}

/* ------------------------------------------------------------------ */
/* the answer */

/* A response code of the destination's that the client may see as is. */
static int
code_for_client(const struct reply *r, const char *tag,
    struct status_resp *st)
{
	if (status_parse(r->line, r->len, tag, st) != 0)
		return 0;
	switch (st->code) {
	case CODE_NONE:
	case CODE_REFERRAL:	/* imapfe's to follow, never the client's */
	case CODE_CAPABILITY:
	case CODE_APPENDUID:
	case CODE_COPYUID:
	case CODE_CLOSED:
		return 0;
	default:
		break;
	}
	for (size_t k = 0; k < st->code_span_len; k++)
		if (st->code_span[k] < ' ' || st->code_span[k] > '~')
			return 0;
	return 1;
}

static void
log_left(const struct copy_run *run, const char *why)
{
	struct str set = { 0 };

	if (uid_set_format(&set, run->dst.uid, run->dst.n) != 0)
		str_free(&set);
	log_msg(LOG_ERR, "event=copy-undo-failed user=\"%s\" command=%s "
	    "left=%zu uidvalidity=%lu uids=\"%.*s%s\" reason=\"%s\"",
	    run->eng->user, run->what, run->stored,
	    (unsigned long)run->uidvalidity, UID_SET_LOG_MAX,
	    set.s ? set.s : "", set.len > UID_SET_LOG_MAX ? "..." : "", why);
	str_free(&set);
}

static const char *
result_name(enum copy_result rc)
{
	static const char *const names[] = {
		[COPY_DONE] = "done", [COPY_BAD_SET] = "bad-set",
		[COPY_TOO_MANY] = "too-many",
		[COPY_SOURCE_FAILED] = "source-refused",
		[COPY_SOURCE_LOST] = "source-lost",
		[COPY_REFUSED] = "destination-refused",
		[COPY_DEST_LOST] = "destination-lost",
		[COPY_NOMEM] = "out-of-memory" };

	return names[rc];
}

/* The response code of the client's NO. */
static int
failure_code(const struct copy_run *run, enum copy_result rc,
    const char *dtag, const char **code)
{
	struct status_resp st;

	if (rc == COPY_REFUSED && code_for_client(run->dest, dtag, &st)) {
		*code = st.code_span;
		return (int)st.code_span_len;
	}
	*code = rc == COPY_REFUSED ? "[CANNOT]" : "[UNAVAILABLE]";
	return (int)strlen(*code);
}

/* The copy failed: the destination as it was, if it can be; then say so. */
static void
copy_failed(struct copy_run *run, enum copy_result rc, const char *dtag)
{
	enum undo_result undo = UNDO_DONE;
	int dest_lost = rc == COPY_DEST_LOST || run->dest_broken;
	/*
	 * Lost after an APPEND's whole message went out, before its answer:
	 * whether the server stored it, nobody can tell.  (Broken inside its
	 * literal, it cannot have.)
	 */
	int maybe_one_more = rc == COPY_DEST_LOST && !run->dest_broken;
	const char *code;
	int codelen;

	if (rc == COPY_BAD_SET) {
		client_line(run->eng, "%s NO Invalid message set.", run->tag);
		return;
	}
	if (rc == COPY_TOO_MANY) {
		client_line(run->eng, "%s NO [LIMIT] At most %d messages can be "
		    "copied between servers at once.", run->tag,
		    CROSS_COPY_MAX);
		return;
	}
	if (dest_lost)
		undo = run->stored > 0 ? UNDO_LOST : UNDO_DONE;
	else
		undo = undo_copies(run);
	if (undo != UNDO_DONE)
		log_left(run, undo == UNDO_LOST ? maybe_one_more ? "the "
		    "destination's connection was lost awaiting an APPEND's "
		    "answer, whose message may stay too" : "the destination's "
		    "connection was lost" : run->uids_known ? "the destination "
		    "would not expunge them" : "the destination gave no "
		    "APPENDUID");
	log_msg(LOG_ERR, "event=copy-failed user=\"%s\" command=%s "
	    "messages=%zu reason=%s%s%s%s left=%zu", run->eng->user,
	    run->what, run->count, result_name(rc),
	    rc == COPY_REFUSED ? " said=\"" : "",
	    rc == COPY_REFUSED ? run->dest->why : "",
	    rc == COPY_REFUSED ? "\"" : "",
	    undo != UNDO_DONE ? run->stored : 0);
	/*
	 * A lost server's connection is answered as the router does; but
	 * when copies stay on the lost destination the client hears how many,
	 * so that it does not retry into doubles.
	 */
	if (rc == COPY_DEST_LOST || run->dest_broken || undo == UNDO_LOST)
		command_failed_on_link(run->eng, run->to, rc == COPY_SOURCE_LOST ||
		    undo == UNDO_LOST ? NULL : run->tag, W_LINK_DOWN);
	if (rc == COPY_SOURCE_LOST)
		command_failed_on_link(run->eng, run->from, run->tag, W_LINK_DOWN);
	if (undo == UNDO_LOST && rc != COPY_SOURCE_LOST &&
	    run->eng->end == END_NONE)
		client_line(run->eng, "%s NO [UNAVAILABLE] %s between servers "
		    "failed, the destination's server was lost; copies left in "
		    "the destination: %zu%s.", run->tag, run->what, run->stored,
		    maybe_one_more ? ", and perhaps the one being stored" : "");
	if (rc == COPY_DEST_LOST || rc == COPY_SOURCE_LOST ||
	    run->dest_broken || undo == UNDO_LOST)
		return;
	codelen = failure_code(run, rc, dtag, &code);
	if (undo != UNDO_DONE)
		client_line(run->eng, "%s NO %.*s %s between servers failed; "
		    "copies left in the destination: %zu.", run->tag, codelen,
		    code, run->what, run->stored);
	else
		client_line(run->eng, "%s NO %.*s %s between servers failed; "
		    "the destination is unchanged.", run->tag, codelen, code,
		    run->what);
}

/* Every copy stored, and the originals not (all) expunged: both stay. */
static void
log_move_kept(const struct copy_run *run, const char *why)
{
	struct str set = { 0 };

	if (uid_set_format(&set, run->src.uid, run->src.n) != 0)
		str_free(&set);
	log_msg(LOG_ERR, "event=move-expunge-failed user=\"%s\" copied=%zu "
	    "originals=\"%.*s%s\" reason=\"%s\"", run->eng->user,
	    run->stored, UID_SET_LOG_MAX, set.s ? set.s : "",
	    set.len > UID_SET_LOG_MAX ? "..." : "", why);
	str_free(&set);
}

/*
 * "[COPYUID v source-uids dest-uids] " into out when the destination
 * named each copy (else out stays empty); -1 when it cannot be sent.
 */
static int
copyuid(const struct copy_run *run, struct str *out)
{
	if (!run->uids_known || run->src.n == 0 || run->dst.n != run->src.n ||
	    !caps_has(dest_backend(run)->caps, "UIDPLUS"))
		return 0;
	if (str_printf(out, "[COPYUID %lu ", (unsigned long)run->uidvalidity)
	    != 0 || uid_set_format(out, run->src.uid, run->src.n) != 0 ||
	    str_adds(out, " ") != 0 ||
	    uid_set_format(out, run->dst.uid, run->dst.n) != 0 ||
	    str_adds(out, "] ") != 0)
		return -1;
	/* a status line is at most TAGGED_LINE_MAX long: none rather than
	 * one cut short (a client copes without, RFC 4315 3) */
	return out->len > COPYUID_MAX ? -1 : 0;
}

/*
 * Every copy is stored.  A MOVE now expunges exactly the originals that
 * were copied, the client seeing the EXPUNGEs; its COPYUID comes first,
 * untagged, as RFC 6851 4.3 has it, a COPY's in the tagged OK.
 */
static void
copy_done(struct copy_run *run, int move)
{
	struct str code = { 0 };
	enum reply_status rs = REPLY_OK;

	if (copyuid(run, &code) != 0)
		str_free(&code);	/* no COPYUID, then */
	if (move) {
		if (code.len > 0)
			client_line(run->eng, "* OK %sMoved.", code.s);
		str_free(&code);
		rs = expunge_uids(run, &run->src, run->from, source_command);
	}
	if (rs == REPLY_OK && move &&
	    uids_left(run, run->from, &run->src, 1) != 0)
		rs = REPLY_NO;
	if (rs != REPLY_OK)
		log_move_kept(run, rs == REPLY_LOST ? "the source was lost" :
		    "the source would not expunge them");
	if (rs == REPLY_LOST)
		command_failed_on_link(run->eng, run->from, run->tag, W_LINK_DOWN);
	else if (rs != REPLY_OK)
		client_line(run->eng, "%s OK MOVE stored every copy, but the "
		    "originals could not be removed: both stay.", run->tag);
	else
		client_line(run->eng, "%s OK %s%s completed.", run->tag,
		    code.s != NULL ? code.s : "", run->what);
	str_free(&code);
}

/*
 * COPY or MOVE (first: the index of the set's token) from the selected
 * mailbox on link from to a mailbox on link to.
 */
void
cross_copy(struct engine *eng, const struct command *c, size_t first,
    int from, int to, int move)
{
	struct copy_run run = { .eng = eng, .tag = c->tag, .from = from,
	    .to = to, .mbox = &c->tok[c->ntok - 1], .uids_known = 1,
	    .what = move ? "MOVE" : "COPY" };
	enum copy_result rc;
	char dtag[sizeof(run.atag)];

	if ((run.dest = malloc(sizeof(*run.dest))) == NULL) {
		engine_bye(eng, END_LIMIT, "Out of memory.");
		return;
	}
	run.dest->status = REPLY_LOST;
	run.dest->code = CODE_NONE;
	run.dest->why[0] = '\0';
	if (move && !caps_has(eng->links[from].be->caps, "UIDPLUS")) {
		client_line(eng, "%s NO [CANNOT] MOVE between servers needs "
		    "UIDPLUS on the source server.", c->tag);
		free(run.dest);
		return;
	}
	if (to > 0 && link_unavailable(eng, to, c->tag)) {
		free(run.dest);
		return;
	}
	run.multi = caps_has(dest_backend(&run)->caps, "MULTIAPPEND");
	run.set = &c->tok[first];
	run.by_uid = first == 1;
	rc = collect_meta(&run);
	dtag[0] = '\0';
	if (rc == COPY_DONE)
		rc = copy_all(&run);
	if (rc == COPY_REFUSED)
		snprintf(dtag, sizeof(dtag), "%.*s", (int)run.dest->tag_len,
		    run.dest->line);
	if (rc == COPY_DONE)
		copy_done(&run, move);
	else
		copy_failed(&run, rc, dtag);
	free(run.meta);
	uid_list_free(&run.src);
	uid_list_free(&run.dst);
	free(run.dest);
}
