/*
 * The IMAP grammar, as pure functions over byte strings: the client command
 * parser, the one function that turns a string into an IMAP string, and the
 * scanner that finds line starts in a stream of responses.  Nothing here
 * does I/O, so the unit tests and the fuzzers drive it directly.
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "imapfe.h"

#define IMAP_NUMBER_MAX	4294967295ULL	/* RFC 9051: number is 32 bits */

/* ATOM-CHAR: any CHAR except atom-specials (RFC 9051 section 9). */
int
is_atom_char(unsigned char c)
{
	if (c <= 0x20 || c >= 0x7f)
		return 0;
	return strchr("(){%*\"\\]", c) == NULL;
}

/* ASTRING-CHAR, as arguments use it: ATOM-CHAR or "]". */
static int
is_astring_char(unsigned char c)
{
	return c == ']' || is_atom_char(c);
}

/*
 * The tag of a command not yet parsed (or not parseable), for an early
 * answer: its first word if that is a valid tag, else "*".
 */
void
early_tag(const char *s, size_t len, char *tag, size_t taglen)
{
	size_t n = 0;

	while (n < len && n + 1 < taglen && s[n] != ' ')
		n++;
	if (n == 0 || !tag_is_valid(s, n)) {
		snprintf(tag, taglen, "*");
		return;
	}
	memcpy(tag, s, n);
	tag[n] = '\0';
}

/* tag = 1*<any ASTRING-CHAR except "+"> */
int
tag_is_valid(const char *s, size_t len)
{
	size_t i;

	if (len == 0)
		return 0;
	for (i = 0; i < len; i++)
		if (s[i] == '+' || !is_astring_char((unsigned char)s[i]))
			return 0;
	return 1;
}

static int
parse_number(const char *s, size_t len, uint64_t *out)
{
	uint64_t v = 0;
	size_t i;

	if (len == 0 || len > 10)
		return -1;
	for (i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (uint64_t)(s[i] - '0');
	}
	if (v > IMAP_NUMBER_MAX)
		return -1;
	*out = v;
	return 0;
}

/*
 * Does this line (CRLF already removed) end in a literal announcement?
 * "{n}" is synchronizing, "{n+}" (RFC 7888) is not.  Anything that ends in
 * "}" and opens with "{" but is not a valid 32-bit number is LIT_INVALID,
 * so that "{-1}", "{12x}" and "{4294967296}" are refused, never guessed at.
 */
enum literal_kind
literal_at_end(const char *line, size_t len, uint64_t *size)
{
	const char *open;
	size_t digits;
	int nonsync;

	if (len < 3 || line[len - 1] != '}')
		return LIT_NONE;
	open = NULL;
	for (size_t i = len - 1; i-- > 0;) {
		if (line[i] == '{') {
			open = line + i;
			break;
		}
		if (line[i] == ' ' || line[i] == '"' || line[i] == ')')
			break;
	}
	if (open == NULL)
		return LIT_NONE;
	digits = (size_t)(line + len - 1 - open - 1);
	nonsync = digits > 0 && open[digits] == '+';
	if (nonsync)
		digits--;
	if (parse_number(open + 1, digits, size) != 0)
		return LIT_INVALID;
	return nonsync ? LIT_NONSYNC : LIT_SYNC;
}

static void
upcase(char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		s[i] = (char)toupper((unsigned char)s[i]);
}

struct cursor {
	char	*p;
	char	*end;
};

static int
add_token(struct command *cmd, enum tok_type type, char *s, size_t len)
{
	if (cmd->ntok == CMD_MAX_TOKENS)
		return -1;
	cmd->tok[cmd->ntok].type = type;
	cmd->tok[cmd->ntok].s = s;
	cmd->tok[cmd->ntok].len = len;
	cmd->ntok++;
	return 0;
}

/* A quoted string, unescaped in place (the result is never longer). */
static int
parse_quoted(struct cursor *c, struct command *cmd)
{
	char *start = ++c->p, *out = start;

	while (c->p < c->end) {
		unsigned char ch = (unsigned char)*c->p++;

		if (ch == '"') {
			*out = '\0';
			return add_token(cmd, TOK_QUOTED, start,
			    (size_t)(out - start));
		}
		if (ch == '\r' || ch == '\n' || ch == '\0')
			return -1;
		if (ch == '\\') {
			if (c->p == c->end || (*c->p != '"' && *c->p != '\\'))
				return -1;
			ch = (unsigned char)*c->p++;
		}
		*out++ = (char)ch;
	}
	return -1;
}

/* "{n}" or "{n+}", CRLF, then n bytes, as the command reader stored it. */
static int
parse_literal(struct cursor *c, struct command *cmd)
{
	char *close = memchr(c->p, '}', (size_t)(c->end - c->p));
	size_t digits;
	uint64_t n;

	if (close == NULL)
		return -1;
	digits = (size_t)(close - c->p - 1);
	if (digits > 0 && close[-1] == '+')
		digits--;
	if (parse_number(c->p + 1, digits, &n) != 0)
		return -1;
	c->p = close + 1;
	if (c->end - c->p < 2 || c->p[0] != '\r' || c->p[1] != '\n')
		return -1;
	c->p += 2;
	if ((uint64_t)(c->end - c->p) < n)
		return -1;
	if (add_token(cmd, TOK_LITERAL, c->p, (size_t)n) != 0)
		return -1;
	c->p += n;
	return 0;
}

/*
 * An argument word: ASTRING-CHARs, the list wildcards, which LIST
 * patterns (list-char) and sequence sets ("1:*") carry unquoted, and the
 * backslash that starts a flag ("\Seen").
 */
static int
is_word_char(unsigned char c)
{
	return c == '%' || c == '*' || c == '\\' || is_astring_char(c);
}

/*
 * The "]" that closes a FETCH section opened at p, when the section holds
 * blanks or parentheses ("BODY.PEEK[HEADER.FIELDS (SUBJECT)]", RFC 9051
 * section-msgtext): the section then belongs to the atom, as a server's
 * parser takes it.  NULL for a plain "[" ("[Gmail]" is an atom anyway).
 */
static const char *
section_end(const char *p, const char *end)
{
	int wide = 0;

	for (p++; p < end; p++) {
		if (*p == ']')
			return wide ? p : NULL;
		if (*p == ' ' || *p == '(' || *p == ')')
			wide = 1;
		else if (*p == '"') {
			for (p++; p < end && *p != '"'; p++)
				if (*p == '\\' && p + 1 < end)
					p++;
			if (p == end)
				return NULL;
		} else if (!is_word_char((unsigned char)*p))
			return NULL;
	}
	return NULL;
}

static int
parse_atom(struct cursor *c, struct command *cmd)
{
	char *start = c->p;
	const char *close;

	while (c->p < c->end) {
		if (*c->p == '[' && (close = section_end(c->p, c->end)) != NULL)
			c->p = (char *)close;	/* a FETCH section, whole */
		else if (!is_word_char((unsigned char)*c->p))
			break;
		c->p++;
	}
	if (c->p == start)
		return -1;
	if (c->p - start == 3 && strncasecmp(start, "NIL", 3) == 0)
		return add_token(cmd, TOK_NIL, start, 3);
	return add_token(cmd, TOK_ATOM, start, (size_t)(c->p - start));
}

static int
parse_arguments(struct cursor *c, struct command *cmd, const char **why)
{
	int depth = 0, need_space = 1;

	while (c->p < c->end) {
		int rc;

		if (*c->p == ')') {
			if (depth == 0 || add_token(cmd, TOK_RPAREN, c->p, 1))
				goto bad;
			depth--;
			c->p++;
			need_space = 1;
			continue;
		}
		if (need_space) {
			if (*c->p != ' ')
				goto bad;
			c->p++;
		}
		need_space = 1;
		switch (*c->p) {
		case '(':
			if (add_token(cmd, TOK_LPAREN, c->p++, 1) != 0)
				goto bad;
			depth++;
			need_space = 0;
			continue;
		case '"':
			rc = parse_quoted(c, cmd);
			break;
		case '{':
			rc = parse_literal(c, cmd);
			break;
		default:
			rc = parse_atom(c, cmd);
			break;
		}
		if (rc != 0)
			goto bad;
	}
	if (depth == 0)
		return 0;
bad:
	*why = cmd->ntok == CMD_MAX_TOKENS ? "Too many arguments" :
	    depth > 0 && c->p >= c->end ? "Unbalanced parentheses" :
	    "Invalid arguments";
	return -1;
}

/*
 * Parse one complete client command held in buf (literals inline, each
 * after its "{n}\r\n", the final CRLF removed).  buf must have room for
 * one byte more than len.  Tokens point into buf, which is modified in
 * place: the tag, the name and quoted strings are NUL-terminated.
 */
/*
 * The index after the token at i of a parsed command, or, when it opens a
 * parenthesized list, after the list: a value skipped whole.
 */
size_t
token_group_end(const struct command *c, size_t i)
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

enum parse_status
parse_command(char *buf, size_t len, struct command *cmd, const char **why)
{
	struct cursor c = { buf, buf + len };
	char *sp, *name_end;

	memset(cmd, 0, sizeof(*cmd));
	*why = "Invalid command";
	sp = memchr(buf, ' ', len);
	if (sp == NULL || !tag_is_valid(buf, (size_t)(sp - buf))) {
		*why = sp == NULL ? "Missing command" : "Invalid tag";
		return PARSE_NOTAG;
	}
	*sp = '\0';
	cmd->tag = buf;
	c.p = sp + 1;
	cmd->name = c.p;
	while (c.p < c.end && is_atom_char((unsigned char)*c.p))
		c.p++;
	if (c.p == cmd->name) {
		*why = "Missing command";
		return PARSE_BAD;
	}
	upcase(cmd->name, (size_t)(c.p - cmd->name));
	name_end = c.p;
	if (c.p < c.end && *c.p != ' ')
		return PARSE_BAD;
	if (parse_arguments(&c, cmd, why) != 0)
		return PARSE_BAD;
	/* Only now may the space after the name become its terminator. */
	*name_end = '\0';
	return PARSE_OK;
}

/* ------------------------------------------------------------------ */

/* A wipe the compiler cannot remove as a dead store (glibc 2.25). */
void
wipe(void *p, size_t len)
{
	if (p != NULL && len > 0)
		explicit_bzero(p, len);
}

int
str_add(struct str *b, const void *data, size_t len)
{
	if (b->len + len + 1 > b->cap) {
		size_t ncap = b->cap ? b->cap : 256;
		char *n;

		while (ncap < b->len + len + 1)
			ncap *= 2;
		if ((n = malloc(ncap)) == NULL)
			return -1;
		if (b->s != NULL) {
			memcpy(n, b->s, b->len);
			/* The old block may hold a credential: wipe, then free. */
			wipe(b->s, b->cap);
			free(b->s);
		}
		b->s = n;
		b->cap = ncap;
	}
	memcpy(b->s + b->len, data, len);
	b->len += len;
	b->s[b->len] = '\0';
	return 0;
}

int
str_adds(struct str *b, const char *s)
{
	return str_add(b, s, strlen(s));
}

int
str_printf(struct str *b, const char *fmt, ...)
{
	char tmp[512], *big;
	va_list ap;
	int n, rc;

	va_start(ap, fmt);
	n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n < 0)
		return -1;
	if ((size_t)n < sizeof(tmp))
		return str_add(b, tmp, (size_t)n);
	/* Longer than the stack buffer (UID sets, say): format again. */
	if ((big = malloc((size_t)n + 1)) == NULL)
		return -1;
	va_start(ap, fmt);
	vsnprintf(big, (size_t)n + 1, fmt, ap);
	va_end(ap);
	rc = str_add(b, big, (size_t)n);
	wipe(big, (size_t)n);
	free(big);
	return rc;
}

void
str_wipe(struct str *b)
{
	if (b->s != NULL)
		wipe(b->s, b->cap);
	b->len = 0;
}

void
str_free(struct str *b)
{
	str_wipe(b);
	free(b->s);
	b->s = NULL;
	b->cap = 0;
}

int
imap_append_string(struct str *b, const char *s, size_t len, int nonsync)
{
	int literal = 0;
	size_t i;

	for (i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '\0')
			return -1;
		if (c == '\r' || c == '\n' || c >= 0x80)
			literal = 1;
	}
	if (literal) {
		if (str_printf(b, nonsync ? "{%zu+}\r\n" : "{%zu}\r\n",
		    len) != 0 || str_add(b, s, len) != 0)
			return -1;
		return 1;
	}
	if (str_add(b, "\"", 1) != 0)
		return -1;
	for (i = 0; i < len; i++) {
		if ((s[i] == '"' || s[i] == '\\') && str_add(b, "\\", 1) != 0)
			return -1;
		if (str_add(b, s + i, 1) != 0)
			return -1;
	}
	return str_add(b, "\"", 1) == 0 ? 0 : -1;
}

/*
 * Copy remote or client text for a log line: printable ASCII only, bounded.
 * Returns the length written (dst is always NUL-terminated).
 */
size_t
sanitize(char *dst, size_t dstsize, const char *src, size_t len)
{
	size_t i, o = 0;

	if (dstsize == 0)
		return 0;
	for (i = 0; i < len && o + 1 < dstsize; i++) {
		unsigned char c = (unsigned char)src[i];

		dst[o++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
	}
	if (i < len && dstsize > 4) {
		o = o > dstsize - 4 ? dstsize - 4 : o;
		memcpy(dst + o, "...", 3);
		o += 3;
	}
	dst[o] = '\0';
	return o;
}

/* Is this response line tagged with tag (followed by a space)? */
int
resp_is_tagged(const char *line, size_t len, const char *tag)
{
	size_t tl = strlen(tag);

	return len > tl && memcmp(line, tag, tl) == 0 && line[tl] == ' ';
}

/* The response codes imapfe acts on; the rest are CODE_OTHER. */
static const struct {
	const char	*name;
	enum resp_code	 code;
} code_names[] = {
	{ "ALERT", CODE_ALERT },
	{ "APPENDUID", CODE_APPENDUID },
	{ "AUTHENTICATIONFAILED", CODE_AUTHENTICATIONFAILED },
	{ "AUTHORIZATIONFAILED", CODE_AUTHORIZATIONFAILED },
	{ "CANNOT", CODE_CANNOT },
	{ "CAPABILITY", CODE_CAPABILITY },
	{ "CLOSED", CODE_CLOSED },
	{ "CONTACTADMIN", CODE_CONTACTADMIN },
	{ "COPYUID", CODE_COPYUID },
	{ "INUSE", CODE_INUSE },
	{ "LIMIT", CODE_LIMIT },
	{ "OVERQUOTA", CODE_OVERQUOTA },
	{ "REFERRAL", CODE_REFERRAL },
	{ "SERVERBUG", CODE_SERVERBUG },
	{ "TOOBIG", CODE_TOOBIG },
	{ "TRYCREATE", CODE_TRYCREATE },
	{ "UNAVAILABLE", CODE_UNAVAILABLE },
};

static enum resp_code
code_by_name(const char *p, size_t len)
{
	for (size_t i = 0; i < sizeof(code_names) / sizeof(*code_names); i++)
		if (strlen(code_names[i].name) == len &&
		    strncasecmp(p, code_names[i].name, len) == 0)
			return code_names[i].code;
	return CODE_OTHER;
}

/*
 * A status response (RFC 9051 7.1) tagged with tag ("*" for untagged):
 * its kind, its response code with the code's argument, and its text, all
 * pointing into line.  Returns -1 when the line is not one.  A code whose
 * "]" is missing counts as none, the whole rest as text.
 */
int
status_parse(const char *line, size_t len, const char *tag,
    struct status_resp *st)
{
	static const struct {
		const char	*word;
		enum resp_kind	 kind;
	} words[] = { { "OK", RESP_OK }, { "NO", RESP_NO },
	    { "BAD", RESP_BAD }, { "BYE", RESP_BYE },
	    { "PREAUTH", RESP_PREAUTH } };
	const char *p, *end = line + len, *close;
	size_t i, n, wl;

	memset(st, 0, sizeof(*st));
	if (!resp_is_tagged(line, len, tag))
		return -1;
	p = line + strlen(tag) + 1;
	n = (size_t)(end - p);
	for (i = 0; i < sizeof(words) / sizeof(*words); i++) {
		wl = strlen(words[i].word);
		if (n >= wl && strncasecmp(p, words[i].word, wl) == 0 &&
		    (n == wl || p[wl] == ' '))
			break;
	}
	if (i == sizeof(words) / sizeof(*words))
		return -1;
	st->kind = words[i].kind;
	p += wl;
	while (p < end && *p == ' ')
		p++;
	if (p < end && *p == '[' &&
	    (close = memchr(p, ']', (size_t)(end - p))) != NULL) {
		const char *name = p + 1;
		size_t nl = strcspn(name, " ]");

		if (name + nl > close)
			nl = (size_t)(close - name);
		st->code = code_by_name(name, nl);
		st->code_span = p;
		st->code_span_len = (size_t)(close + 1 - p);
		st->code_arg = name + nl;
		while (st->code_arg < close && *st->code_arg == ' ')
			st->code_arg++;
		st->code_arg_len = (size_t)(close - st->code_arg);
		p = close + 1;
		while (p < end && *p == ' ')
			p++;
	}
	st->text = p;
	st->text_len = (size_t)(end - p);
	return 0;
}

int
uid_list_add(struct uid_list *l, uint32_t uid)
{
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 16;
		uint32_t *v = reallocarray(l->uid, cap, sizeof(*v));

		if (v == NULL)
			return -1;
		l->uid = v;
		l->cap = cap;
	}
	l->uid[l->n++] = uid;
	return 0;
}

void
uid_list_free(struct uid_list *l)
{
	free(l->uid);
	*l = (struct uid_list){ 0 };
}

/* A non-zero number (RFC 9051 nz-number) at *p, which it passes. */
int
nz_number_parse(const char **p, const char *end, uint32_t *out)
{
	uint64_t v = 0;

	if (*p == end || **p < '1' || **p > '9')
		return -1;
	while (*p < end && **p >= '0' && **p <= '9') {
		v = v * 10 + (uint64_t)(**p - '0');
		if (v > UINT32_MAX)
			return -1;
		(*p)++;
	}
	*out = (uint32_t)v;
	return 0;
}

/*
 * A uid-set (RFC 4315: "5,7:9"), each UID added to l in the order
 * written, a range from its lower end up.  At most max UIDs; -1 when the
 * set is malformed or larger ("*" has no place in one).
 */
int
uid_set_parse(const char *s, size_t len, size_t max, struct uid_list *l)
{
	const char *p = s, *end = s + len;
	uint32_t lo, hi, t;

	for (;;) {
		if (nz_number_parse(&p, end, &lo) != 0)
			return -1;
		hi = lo;
		if (p < end && *p == ':') {
			p++;
			if (nz_number_parse(&p, end, &hi) != 0)
				return -1;
			if (hi < lo) {
				t = lo;
				lo = hi;
				hi = t;
			}
		}
		if (l->n + ((size_t)hi - lo) >= max)
			return -1;
		for (uint64_t u = lo; u <= hi; u++)
			if (uid_list_add(l, (uint32_t)u) != 0)
				return -1;
		if (p == end)
			return 0;
		if (*p++ != ',')
			return -1;
	}
}

/* "[APPENDUID uidvalidity uid-set]": both, or -1. */
int
appenduid_parse(const struct status_resp *st, size_t max,
    uint32_t *uidvalidity, struct uid_list *l)
{
	const char *p = st->code_arg, *end;

	if (st->code != CODE_APPENDUID)
		return -1;
	end = p + st->code_arg_len;
	if (nz_number_parse(&p, end, uidvalidity) != 0 || p == end || *p++ != ' ')
		return -1;
	return uid_set_parse(p, (size_t)(end - p), max, l);
}

/* Case-insensitive search for a whole word in a space-separated list. */
int
caps_has(const char *caps, const char *cap)
{
	size_t cl = strlen(cap);
	const char *p = caps;

	while (p != NULL && *p != '\0') {
		size_t wl;

		while (*p == ' ')
			p++;
		wl = strcspn(p, " ");
		if (wl == cl && strncasecmp(p, cap, cl) == 0)
			return 1;
		p += wl;
	}
	return 0;
}

/* ------------------------------------------------------------------ */

void
resp_scanner_init(struct resp_scanner *sc)
{
	memset(sc, 0, sizeof(*sc));
}

static void
scanner_line_end(struct resp_scanner *sc)
{
	enum literal_kind k;
	uint64_t size;
	size_t tl = sc->tail_len;

	if (!sc->mid_response && sc->head_len >= 5 &&
	    memcmp(sc->head, "* ", 2) == 0 &&
	    strncasecmp(sc->head + 2, "BYE", 3) == 0 &&
	    (sc->head_len == 5 || sc->head[5] == ' ' || sc->head[5] == '\r'))
		sc->saw_bye = 1;
	if (tl > 0 && sc->tail[tl - 1] == '\r')
		tl--;
	k = literal_at_end(sc->tail, tl, &size);
	sc->mid_response = k == LIT_SYNC || k == LIT_NONSYNC;
	if (sc->mid_response) {
		sc->literal_left = size;
		if (size > sc->largest_literal)
			sc->largest_literal = size;
	}
	sc->head_len = sc->tail_len = 0;
}

static void
scanner_keep(struct resp_scanner *sc, const char *p, size_t n)
{
	size_t k = sizeof(sc->head) - sc->head_len;

	if (k > n)
		k = n;
	memcpy(sc->head + sc->head_len, p, k);
	sc->head_len += k;
	keep_tail(sc->tail, sizeof(sc->tail), &sc->tail_len, p, n);
}

/* Keep the last cap bytes seen of a line, as chunks of it go by. */
void
keep_tail(char *tail, size_t cap, size_t *len, const char *p, size_t n)
{
	if (n >= cap) {
		memcpy(tail, p + n - cap, cap);
		*len = cap;
		return;
	}
	if (*len + n > cap) {
		size_t drop = *len + n - cap;

		memmove(tail, tail + drop, *len - drop);
		*len -= drop;
	}
	memcpy(tail + *len, p, n);
	*len += n;
}

/*
 * Follow a stream of server responses chunk by chunk: skip literal bodies
 * and notice an untagged BYE, without copying or buffering the stream.
 */
void
resp_scan(struct resp_scanner *sc, const char *p, size_t n)
{
	while (n > 0) {
		const char *nl;
		size_t seg;

		if (sc->literal_left > 0) {
			seg = sc->literal_left < n ? (size_t)sc->literal_left : n;
			sc->literal_left -= seg;
			p += seg;
			n -= seg;
			continue;
		}
		nl = memchr(p, '\n', n);
		seg = nl != NULL ? (size_t)(nl - p) : n;
		scanner_keep(sc, p, seg);
		if (nl == NULL)
			return;
		scanner_line_end(sc);
		p += seg + 1;
		n -= seg + 1;
	}
}

/*
 * The line just scanned was text (a status response, a "+"): resp-text
 * holds no literal (RFC 9051 9), so a "{5}" at its end announces none.
 */
void
resp_scan_text_line(struct resp_scanner *sc)
{
	if (sc->head_len == 0 && sc->tail_len == 0) {
		sc->literal_left = 0;
		sc->mid_response = 0;
	}
}

/* Is the scanner where a new response (or command) begins? */
int
resp_scan_at_start(const struct resp_scanner *sc)
{
	return sc->literal_left == 0 && !sc->mid_response &&
	    sc->head_len == 0 && sc->tail_len == 0;
}

/*
 * How many of the n bytes at p make the next piece of the stream, without
 * moving past them (resp_scan does): literal bytes, or the rest of a line
 * with its LF.  0 when the line's LF has not arrived yet.
 */
size_t
resp_scan_piece(const struct resp_scanner *sc, const char *p, size_t n)
{
	const char *nl;

	if (sc->literal_left > 0)
		return sc->literal_left < n ? (size_t)sc->literal_left : n;
	if ((nl = memchr(p, '\n', n)) == NULL)
		return 0;
	return (size_t)(nl - p) + 1;
}

/* ------------------------------------------------------------------ */
/* referrals (RFC 2193, RFC 2221): IMAP URLs (RFC 5092), the parts used */

static int
hex_value(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = tolower(c);
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/*
 * Percent-decode [p, end) into out.  Refuses what no mailbox or host name
 * may hold once decoded: control characters, NUL among them.
 */
int
url_decode(const char *p, const char *end, char *out, size_t outsize)
{
	size_t n = 0;

	for (; p < end; p++) {
		int c = (unsigned char)*p;

		if (c == '%') {
			int hi, lo;

			if (end - p < 3 || (hi = hex_value(p[1])) < 0 ||
			    (lo = hex_value(p[2])) < 0)
				return -1;
			c = hi << 4 | lo;
			p += 2;
		}
		if (c < 0x20 || c == 0x7f || n + 1 >= outsize)
			return -1;
		out[n++] = (char)c;
	}
	out[n] = '\0';
	return 0;
}

/*
 * iserver: [enc-user [";AUTH=" ...] "@"] host [":" port], the whole of
 * [p, end).  The user is decoded; "" when there is none.
 */
int
url_iserver_parse(const char *p, const char *end, char *user,
    size_t usersize, char *host, size_t hostsize, char *port,
    size_t portsize)
{
	const char *at = NULL, *ue;

	for (const char *q = p; q < end; q++)
		if (*q == '@')
			at = q;
	user[0] = '\0';
	if (at != NULL) {
		for (ue = p; ue < at && *ue != ';'; ue++)
			if (*ue == ':')
				return -1;	/* a password has no place */
		if (ue < at && ((size_t)(at - ue) < 6 ||
		    strncasecmp(ue, ";AUTH=", 6) != 0))
			return -1;
		if (url_decode(p, ue, user, usersize) != 0)
			return -1;
		p = at + 1;
	}
	return hostport_parse(p, end, host, hostsize, port, portsize);
}

static int
host_char(int c, int bracketed)
{
	return isalnum(c) || c == '-' || c == '.' || c == '_' ||
	    (bracketed && c == ':');
}

/* A port number, 1 to 65535, in decimal digits only. */
int
port_is_valid(const char *s, size_t len)
{
	unsigned long v = 0;

	if (len == 0 || len > 5)
		return 0;
	for (size_t i = 0; i < len; i++) {
		if (!isdigit((unsigned char)s[i]))
			return 0;
		v = v * 10 + (unsigned long)(s[i] - '0');
	}
	return v >= 1 && v <= 65535;
}

/*
 * A server named by a back-end or a directory: "host", "host:port",
 * "[v6]" or "[v6]:port", or a bare IPv6 address; [p, end) holds nothing
 * else.  Host names may hold letters, digits, '.', '-' and '_' only.  The
 * port is "" when none is given.  Returns 0, or -1 for anything else.
 */
int
hostport_parse(const char *p, const char *end, char *host, size_t hostsize,
    char *port, size_t portsize)
{
	const char *h = p, *he, *colon = memchr(p, ':', (size_t)(end - p));
	int bracketed = p < end && *p == '[';
	int bare_v6 = !bracketed && colon != NULL &&
	    memchr(colon + 1, ':', (size_t)(end - colon - 1)) != NULL;
	size_t hl;

	if (bracketed) {
		h = ++p;
		while (p < end && *p != ']')
			p++;
		if (p == end)
			return -1;
		he = p++;
	} else
		p = he = bare_v6 || colon == NULL ? end : colon;
	hl = (size_t)(he - h);
	if (hl == 0 || hl >= hostsize)
		return -1;
	for (const char *q = h; q < he; q++)
		if (!host_char((unsigned char)*q, bracketed || bare_v6))
			return -1;
	memcpy(host, h, hl);
	host[hl] = '\0';
	port[0] = '\0';
	if (p == end)
		return 0;
	if (*p++ != ':' || !port_is_valid(p, (size_t)(end - p)) ||
	    (size_t)(end - p) >= portsize)
		return -1;
	memcpy(port, p, (size_t)(end - p));
	port[end - p] = '\0';
	return 0;
}

#define BAD_PORT	"the port must be a number from 1 to 65535"

/* Why word is not HOST:PORT, hostport_parse having refused it. */
static const char *
hostport_fault(const char *word)
{
	const char *close, *port = NULL;

	if (word[0] == '[') {
		if ((close = strchr(word, ']')) == NULL)
			return "no ']' after the IPv6 address";
		if (close[1] != '\0' && close[1] != ':')
			return "only :PORT may follow ']'";
		if (close[1] == ':')
			port = close + 2;
	} else if ((port = strchr(word, ':')) != NULL &&
	    strchr(port + 1, ':') == NULL)
		port++;
	else
		port = NULL;
	if (port != NULL && !port_is_valid(port, strlen(port)))
		return BAD_PORT;
	return "the host must be a name or an address";
}

/*
 * "host:port" or "[v6addr]:port", the port a number from 1 to 65535;
 * "*:port" too when wildcard_ok (any address, for -l).  The same parser
 * as for the servers that referrals and the directory name, but with
 * the port required.  On failure err says why.
 */
int
split_hostport(const char *word, int wildcard_ok, char **host, char **port,
    char *err, size_t errlen)
{
	char h[256], p[8];
	const char *why = NULL;

	*host = *port = NULL;
	if (wildcard_ok && strncmp(word, "*:", 2) == 0) {
		snprintf(h, sizeof(h), "*");
		if (!port_is_valid(word + 2, strlen(word + 2)))
			why = BAD_PORT;
		else
			snprintf(p, sizeof(p), "%s", word + 2);
	} else if (hostport_parse(word, word + strlen(word), h, sizeof(h), p,
	    sizeof(p)) != 0)
		why = hostport_fault(word);
	else if (p[0] == '\0')
		why = word[0] != '[' && strchr(word, ':') != NULL ?
		    "an IPv6 address goes in brackets: [ADDRESS]:PORT" :
		    "the port is missing: HOST:PORT";
	if (why != NULL) {
		snprintf(err, errlen, "%s", why);
		return -1;
	}
	if ((*host = strdup(h)) == NULL || (*port = strdup(p)) == NULL) {
		free(*host);
		*host = NULL;
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	return 0;
}

/*
 * The first "[REFERRAL imap://...]" in a response's text: server, user
 * and mailbox of its first URL.  Returns 0, -1 when there is no referral,
 * -2 when there is one imapfe cannot use (not imap://, malformed).
 */
int
referral_parse(const char *text, struct referral *ref)
{
	const char *p = strcasestr(text, "[REFERRAL "), *auth, *end;

	memset(ref, 0, sizeof(*ref));
	if (p == NULL)
		return -1;
	p += strlen("[REFERRAL ");
	if (strncasecmp(p, "imap://", 7) != 0)
		return -2;
	auth = p += 7;
	while (*p != '\0' && *p != '/' && *p != ' ' && *p != ']')
		if (*p++ == '[') {	/* an IPv6 literal, "]" and all */
			while (*p != '\0' && *p != ']')
				p++;
			if (*p++ == '\0')
				return -2;
		}
	if (url_iserver_parse(auth, p, ref->user, sizeof(ref->user),
	    ref->host, sizeof(ref->host), ref->port, sizeof(ref->port)) != 0)
		return -2;
	if (ref->port[0] == '\0')
		snprintf(ref->port, sizeof(ref->port), "143");
	if (*p != '/')
		return 0;
	for (end = ++p; *end != '\0' && *end != ';' && *end != '?' &&
	    *end != ']' && *end != ' '; end++)
		;
	return url_decode(p, end, ref->mailbox, sizeof(ref->mailbox)) == 0 ?
	    0 : -2;
}
