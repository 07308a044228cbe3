/*
 * Fuzz target: the reader of client commands (cmd_read), fed through a
 * pipe as a client's bytes arrive, command after command until the end,
 * with the limits before login or after chosen by the input's first
 * bytes.  Streamed literals are read off as the router does.  What each
 * call holds is checked against what was sent, line by line and literal
 * by literal, and what it answered against what it held.
 */
#include <fcntl.h>
#include <syslog.h>
#include <unistd.h>

#include "fuzz_common.h"

#define LIMIT_BYTES	5	/* the limits, then what the client sends */
#define READY		"+ Ready for literal data\r\n"

/* What the client sent, after the limit bytes. */
struct feed {
	const uint8_t	*in;
	size_t		 size;
};

static void
require(int ok)
{
	if (!ok)
		abort();
}

/* The limits, from the input's first bytes: small enough to be met. */
static void
limits_from(const uint8_t *b, struct cmd_limits *lim, size_t *cap)
{
	int login = b[0] & 1;

	memset(lim, 0, sizeof(*lim));
	lim->line_max = 4 + (size_t)b[1] * 4;
	lim->command_max = 16 + (size_t)b[2] * 16;
	lim->literal_max = (uint64_t)b[3] * 8;
	/* Before login nothing is streamed: the hold limit is the limit. */
	lim->hold_max = login ? (uint64_t)b[4] * 4 : lim->literal_max;
	lim->toobig = login;
	lim->literal_name = login ? "max_literal_size" : "max_prelogin_literal";
	*cap = lim->line_max + 2 + (size_t)(b[0] >> 1 & 7) * 64;
}

static size_t
taken(const struct iobuf *io)
{
	return (size_t)io->bytes_in - iobuf_pending(io);
}

/* Everything the reader wrote since the last call, in ans. */
static void
drain(int fd, struct str *ans)
{
	char buf[4096];
	ssize_t n;

	ans->len = 0;
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		require(str_add(ans, buf, (size_t)n) == 0);
}

/* What holds whatever a call returned. */
static void
check_shape(const struct cmd_limits *lim, const struct cmd_buf *cb)
{
	size_t prev = 0;

	require(cb->text.len <= lim->command_max);
	require(cb->ncuts >= 0 && cb->ncuts <= CMD_MAX_LITERALS);
	for (int i = 0; i < cb->ncuts; i++) {
		size_t c = cb->cuts[i];

		require(c > prev && c <= cb->text.len && c >= 3);
		require(memcmp(cb->text.s + c - 3, "}\r\n", 3) == 0);
		prev = c;
	}
	require(memchr(cb->tag, '\0', sizeof(cb->tag)) != NULL);
}

/* The input line at *at, CR LF or LF removed; -1 when none is whole. */
static int
input_line(const struct feed *f, size_t *at, const char **line, size_t *len)
{
	const uint8_t *nl;

	if (*at > f->size)
		return -1;
	nl = memchr(f->in + *at, '\n', f->size - *at);
	if (nl == NULL)
		return -1;
	*line = (const char *)f->in + *at;
	*len = (size_t)(nl - f->in) - *at;
	if (*len > 0 && (*line)[*len - 1] == '\r')
		(*len)--;
	*at = (size_t)(nl - f->in) + 1;
	return 0;
}

/*
 * One text line (CRLF ended) must be the input line as sent, except a
 * non-synchronizing announcement, which becomes "{n}".
 */
static void
check_line(const char *t, size_t tlen, const char *line, size_t len,
    enum literal_kind k, uint64_t n)
{
	char lit[32];
	size_t keep = len, litlen = 0;

	if (k == LIT_NONSYNC) {
		keep = (size_t)((const char *)memrchr(line, '{', len) - line);
		litlen = (size_t)snprintf(lit, sizeof(lit), "{%llu}",
		    (unsigned long long)n);
	}
	require(tlen == keep + litlen + 2);
	require(memcmp(t, line, keep) == 0);
	require(memcmp(t + keep, lit, litlen) == 0);
	require(memcmp(t + tlen - 2, "\r\n", 2) == 0);
}

/* Where the walk over one call's text and its input has got to. */
struct walk {
	size_t		 in;		/* input offset */
	size_t		 text;		/* text offset */
	int		 synced;	/* held synchronizing literals */
	enum literal_kind last_kind;	/* of the last announcement */
	uint64_t	 last_n;
};

/*
 * The text's lines up to each cut, against the input from w->in: each
 * announces a literal, and the first held ones are in the text as sent.
 */
static void
walk_cuts(const struct feed *f, const struct cmd_limits *lim,
    const struct cmd_buf *cb, int held, struct walk *w)
{
	const char *line;
	size_t len;

	for (int i = 0; i < cb->ncuts; i++) {
		size_t cut = cb->cuts[i];

		require(input_line(f, &w->in, &line, &len) == 0);
		w->last_kind = literal_at_end(line, len, &w->last_n);
		require(w->last_kind == LIT_SYNC ||
		    w->last_kind == LIT_NONSYNC);
		check_line(cb->text.s + w->text, cut - w->text, line, len,
		    w->last_kind, w->last_n);
		w->text = cut;
		if (i >= held)
			break;
		/* held: within every limit, and the bytes as sent */
		require(w->last_n <= lim->hold_max &&
		    w->last_n <= lim->literal_max);
		require(cut + w->last_n + 2 <= lim->command_max);
		require(w->last_n <= f->size - w->in);
		require(memcmp(cb->text.s + cut, f->in + w->in,
		    (size_t)w->last_n) == 0);
		w->in += (size_t)w->last_n;
		w->text += (size_t)w->last_n;
		w->synced += w->last_kind == LIT_SYNC;
	}
}

/* ans must be n "+ Ready" lines and then rest (or nothing). */
static void
check_answers(const struct str *ans, int n, const char *rest)
{
	size_t rl = strlen(READY), tail = rest != NULL ? strlen(rest) : 0;

	require(ans->len == (size_t)n * rl + tail);
	for (int i = 0; i < n; i++)
		require(memcmp(ans->s + (size_t)i * rl, READY, rl) == 0);
	require(tail == 0 || memcmp(ans->s + (size_t)n * rl, rest, tail) == 0);
}

static void
check_complete(const struct feed *f, const struct cmd_limits *lim,
    const struct cmd_buf *cb, size_t before, size_t after,
    const struct str *ans)
{
	struct walk w = { .in = before };
	const char *line;
	size_t len;
	uint64_t n;
	enum literal_kind k;

	walk_cuts(f, lim, cb, cb->ncuts, &w);
	require(input_line(f, &w.in, &line, &len) == 0);
	k = literal_at_end(line, len, &n);
	require(k == LIT_NONE || (k == LIT_INVALID && cb->continuing));
	check_line(cb->text.s + w.text, cb->text.len - w.text, line, len,
	    LIT_NONE, 0);
	require(w.in == after);
	check_answers(ans, w.synced, NULL);
}

static void
check_stream(const struct feed *f, const struct cmd_limits *lim,
    const struct cmd_buf *cb, size_t before, size_t after,
    const struct str *ans)
{
	struct walk w = { .in = before };

	require(lim->hold_max != lim->literal_max && cb->ncuts > 0);
	walk_cuts(f, lim, cb, cb->ncuts - 1, &w);
	require(w.text == cb->text.len && w.in == after);
	require(cb->stream_left == w.last_n &&
	    cb->stream_sync == (w.last_kind == LIT_SYNC));
	require(w.last_n <= lim->literal_max);
	require(w.last_n > lim->hold_max ||
	    cb->text.len + w.last_n + 2 > lim->command_max);
	check_answers(ans, w.synced, NULL);
}

static void
check_bad(const struct feed *f, const struct cmd_limits *lim,
    const struct cmd_buf *cb, size_t before, size_t after,
    const struct str *ans)
{
	struct walk w = { .in = before };
	char want[128];
	const char *line;
	size_t len;
	uint64_t n;

	require(!cb->continuing);
	walk_cuts(f, lim, cb, cb->ncuts, &w);
	require(w.text == cb->text.len);
	require(input_line(f, &w.in, &line, &len) == 0);
	require(literal_at_end(line, len, &n) == LIT_INVALID);
	require(w.in == after);
	snprintf(want, sizeof(want), "%s BAD Invalid literal size.\r\n",
	    cb->tag);
	check_answers(ans, w.synced, want);
}

static void
check_toobig(const struct feed *f, const struct cmd_limits *lim,
    const struct cmd_buf *cb, size_t before, size_t after,
    const struct str *ans)
{
	struct walk w = { .in = before };
	char want[128];

	require(lim->toobig && !cb->continuing && cb->ncuts > 0);
	walk_cuts(f, lim, cb, cb->ncuts - 1, &w);
	require(w.text == cb->text.len && w.in == after);
	require(w.last_kind == LIT_SYNC);
	require(w.last_n > lim->literal_max ||
	    (lim->hold_max == lim->literal_max && (w.last_n > lim->hold_max ||
	    cb->text.len + w.last_n + 2 > lim->command_max)));
	snprintf(want, sizeof(want), "%s NO [TOOBIG] Literal too large.\r\n",
	    cb->tag);
	check_answers(ans, w.synced, want);
}

/* The literal the caller streams: its bytes, as sent. */
static int
stream_literal(struct iobuf *io, const struct feed *f, uint64_t n)
{
	struct str scratch = { 0 };
	size_t at = taken(io);
	int rc = -1;

	if (iobuf_read_into(io, n, &scratch) == IO_OK) {
		require(scratch.len == n && n <= f->size - at);
		require(n == 0 || memcmp(scratch.s, f->in + at, n) == 0);
		rc = 0;
	}
	str_free(&scratch);
	return rc;
}

/* Commands until the end, as a session reads them. */
static void
read_all(struct iobuf *io, int answers, const struct feed *f,
    const struct cmd_limits *lim)
{
	struct cmd_buf *cb = calloc(1, sizeof(*cb));
	struct str ans = { 0 };
	enum cmd_status st;
	size_t before, after;

	require(cb != NULL);
	do {
		before = taken(io);
		st = cmd_read(io, lim, cb);
		after = taken(io);
		drain(answers, &ans);
		check_shape(lim, cb);
		require(after > before || st == CMD_END);
		switch (st) {
		case CMD_COMPLETE:
			check_complete(f, lim, cb, before, after, &ans);
			break;
		case CMD_STREAM:
			check_stream(f, lim, cb, before, after, &ans);
			break;
		case CMD_BAD_LITERAL:
			check_bad(f, lim, cb, before, after, &ans);
			break;
		case CMD_ANSWERED:
			check_toobig(f, lim, cb, before, after, &ans);
			break;
		case CMD_END:
			require(cb->end != END_NONE);
			break;
		default:
			abort();
		}
		cb->continuing = 0;
		if (st == CMD_STREAM) {
			if (stream_literal(io, f, cb->stream_left) != 0)
				break;
			cb->continuing = 1;
		}
	} while (st != CMD_END);
	cmd_buf_free(cb);
	str_free(&ans);
	free(cb);
}

int LLVMFuzzerInitialize(int *, char ***);

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	/* Over-limit literals are logged: not thousands a second to syslog. */
	setlogmask(LOG_MASK(LOG_EMERG));
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct cmd_limits lim;
	struct feed f;
	struct iobuf io;
	int in[2], out[2];
	size_t cap;

	/* All of it must fit in the pipe, so no writer need wait. */
	if (size < LIMIT_BYTES || size > 60000)
		return 0;
	limits_from(data, &lim, &cap);
	f.in = data + LIMIT_BYTES;
	f.size = size - LIMIT_BYTES;
	require(pipe2(in, O_NONBLOCK) == 0 && pipe2(out, O_NONBLOCK) == 0);
	require(write(in[1], f.in, f.size) == (ssize_t)f.size);
	close(in[1]);
	require(iobuf_init(&io, in[0], out[1], cap) == 0);
	read_all(&io, out[0], &f, &lim);
	iobuf_free(&io);
	close(in[0]);
	close(out[0]);
	close(out[1]);
	return 0;
}
