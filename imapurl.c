/*
 * IMAP URLs (RFC 5092) in commands: which mailbox a URL names, and so
 * which server must execute a command that carries it.
 *
 * A routed session may run CATENATE (RFC 4469) and URLAUTH (RFC 4467)
 * commands only where every URL they carry names a mailbox on the server
 * that executes the command: the back-end resolves the URL itself, and a
 * name under a public prefix means another server's mailbox to imapfe but
 * possibly a mailbox of the back-end's own to the back-end.  Anything
 * else is refused with NO [BADURL url] (RFC 4469 section 6) before any
 * server is asked.
 *
 * The server part of an absolute URL (imap://user@host:port/...) is not
 * compared with anything here: the client knows imapfe under a name of
 * its choosing, the back-end checks the host against its own idea of its
 * public name (Dovecot's imap_urlauth_host), and a URL is routed by its
 * mailbox alone.  A user part naming another user (a submission server
 * fetching with URLFETCH, say) is that user's mailbox: it is accepted for
 * a personal name only when the configuration routes that user to the
 * session's home server.
 *
 * Pure functions over bytes, unit-tested and fuzzed on their own.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "imapfe.h"

/* ------------------------------------------------------------------ */
/* parsing one URL */

/* bchar (RFC 5092): achar / ":" / "@" / "/"; "%" starts an escape. */
static int
is_bchar(unsigned char c)
{
	return isalnum(c) || strchr("-._~!$'()*+,&=:@/%", c) != NULL;
}

static int
all_digits(const char *p, const char *end)
{
	if (p == end)
		return 0;
	for (; p < end; p++)
		if (!isdigit((unsigned char)*p))
			return 0;
	return 1;
}

/* An nz-number (RFC 9051) that fits 32 bits; 0 when it is not one. */
static uint32_t
nz_number(const char *p, const char *end)
{
	uint64_t v = 0;

	if (!all_digits(p, end) || *p == '0' || end - p > 10)
		return 0;
	for (; p < end; p++)
		v = v * 10 + (uint64_t)(*p - '0');
	return v <= UINT32_MAX ? (uint32_t)v : 0;
}

/* Does [p, end) start with key, in any case? */
static int
starts(const char *p, const char *end, const char *key)
{
	size_t kl = strlen(key);

	return (size_t)(end - p) >= kl && strncasecmp(p, key, kl) == 0;
}

/* The end of a run of bchars from p. */
static const char *
bchars_end(const char *p, const char *end)
{
	while (p < end && is_bchar((unsigned char)*p))
		p++;
	return p;
}

/*
 * What follows the mailbox: [";UIDVALIDITY=" n] ["/" ";UID=" n]
 * ["/" ";SECTION=" s] ["/" ";PARTIAL=" r] [";EXPIRE=" t] [";URLAUTH=" a],
 * or "?" and a search.  In a relative URL without a mailbox the first
 * part has no "/" before it.
 */
static int
url_tail_parse(const char *p, const char *end, struct imap_url *u)
{
	const char *v;

	if (p < end && *p == '?') {
		u->search = 1;
		return bchars_end(p + 1, end) == end && p + 1 < end ? 0 : -1;
	}
	if (u->has_mailbox && starts(p, end, ";UIDVALIDITY=")) {
		p += 13;
		v = p;
		while (p < end && *p != '/' && *p != ';' && *p != '?')
			p++;
		if ((u->uidvalidity = nz_number(v, p)) == 0)
			return -1;
		if (p < end && *p == '?')
			return url_tail_parse(p, end, u);
	}
	if (p < end && *p == '/' && (u->has_mailbox || u->uidvalidity != 0))
		p++;
	if (starts(p, end, ";UID=")) {
		p += 5;
		v = p;
		while (p < end && *p != '/' && *p != ';')
			p++;
		if ((u->uid = nz_number(v, p)) == 0)
			return -1;
		if (p < end && *p == '/')
			p++;
	}
	if (starts(p, end, ";SECTION=")) {
		p += 9;
		v = p;
		while (p < end && *p != ';' && is_bchar((unsigned char)*p))
			p++;
		if (p < end && p[-1] == '/' && starts(p, end, ";PARTIAL="))
			p--;
		if (p == v)
			return -1;
		u->has_section = 1;
		if (p < end && *p == '/')
			p++;
	}
	if (starts(p, end, ";PARTIAL=")) {
		const char *dot;

		p += 9;
		v = p;
		while (p < end && *p != ';')
			p++;
		dot = memchr(v, '.', (size_t)(p - v));
		if (dot == NULL ? !all_digits(v, p) :
		    !all_digits(v, dot) || nz_number(dot + 1, p) == 0)
			return -1;
		u->has_partial = 1;
	}
	if (starts(p, end, ";EXPIRE=")) {
		p += 8;
		while (p < end && *p != ';')
			p++;
		if (!starts(p, end, ";URLAUTH="))
			return -1;
	}
	if (starts(p, end, ";URLAUTH=")) {
		/* access [":" mechanism ":" token]: the back-end's to check */
		u->has_urlauth = 1;
		p += 9;
		if (p == end)
			return -1;
		while (p < end && (is_bchar((unsigned char)*p) || *p == ';'))
			p++;
	}
	return p == end ? 0 : -1;
}

/*
 * The path after "/": enc-mailbox and what follows it.  The mailbox runs
 * to the first ";" or "?"; a "/" before ";UID=" belongs to the UID.
 */
static int
url_path_parse(const char *p, const char *end, struct imap_url *u)
{
	const char *me = p;

	while (me < end && *me != ';' && *me != '?') {
		if (!is_bchar((unsigned char)*me))
			return -1;
		me++;
	}
	if (me < end && me > p && me[-1] == '/' && starts(me, end, ";UID="))
		me--;
	if (me > p) {
		if (url_decode(p, me, u->mailbox, sizeof(u->mailbox)) != 0)
			return -1;
		u->has_mailbox = 1;
	}
	return url_tail_parse(me, end, u);
}

/*
 * Parse one IMAP URL: absolute ("imap://iserver/..."), network-path
 * ("//iserver/..."), absolute-path ("/mailbox...") or relative without a
 * mailbox (";UID=n...", ";SECTION=...", ";PARTIAL=...", the selected
 * mailbox's).  A relative path that starts with a mailbox ("sub/;UID=1")
 * is refused: where it points depends on the selected mailbox's name,
 * path segments merged (RFC 3986 5.2), which imapfe does not follow.
 * Returns 0, or -1 for anything else.
 */
int
imap_url_parse(const char *s, size_t len, struct imap_url *u)
{
	const char *p = s, *end = s + len, *auth;

	memset(u, 0, sizeof(*u));
	if (len >= 7 && strncasecmp(p, "imap://", 7) == 0)
		p += 5;
	if (end - p >= 2 && p[0] == '/' && p[1] == '/') {
		auth = p += 2;
		while (p < end && *p != '/')
			if (*p++ == '[')	/* an IPv6 literal, whole */
				while (p < end && *p != ']')
					p++;
		if (url_iserver_parse(auth, p, u->user, sizeof(u->user),
		    u->host, sizeof(u->host), u->port, sizeof(u->port)) != 0)
			return -1;
		u->has_server = 1;
		if (p == end)
			return 0;
	}
	if (p < end && *p == '/')
		return url_path_parse(p + 1, end, u);
	if (u->has_server || p == end || *p != ';')
		return -1;
	u->relative = 1;
	return url_tail_parse(p, end, u);
}

/* ------------------------------------------------------------------ */
/* which server */

/* Is user's mailbox on the session's home server, as configured? */
static int
user_at_home(const struct url_route *ur, const char *user)
{
	const struct route *r;

	if (ur->user != NULL && strcmp(user, ur->user) == 0)
		return 1;
	r = route_lookup(ur->cfg, user);
	return r != NULL && ur->home_host != NULL && ur->home_port != NULL &&
	    strcasecmp(r->host, ur->home_host) == 0 &&
	    strcmp(r->port, ur->home_port) == 0;
}

/*
 * A URL's mailbox is UTF-8 (RFC 5092), a prefix in the configuration is
 * as the servers name it, modified UTF-7 ("&" starts a shift).  Where
 * both hold more than ASCII they cannot be compared byte for byte, and
 * the URL is not placed by guess.
 */
static int
names_incomparable(const struct config *cfg, const char *mailbox)
{
	int eight_bit = 0;

	for (const char *p = mailbox; *p != '\0'; p++)
		if ((unsigned char)*p >= 0x80)
			eight_bit = 1;
	for (const struct route *r = cfg->publics; eight_bit && r != NULL;
	    r = r->next)
		if (strchr(r->pattern, '&') != NULL)
			return 1;
	return 0;
}

/*
 * The server (a link index of the router's) that holds the mailbox a URL
 * names, or -1 when imapfe cannot tell, or knows it is on no server of
 * this session.
 */
int
url_server(const struct url_route *ur, const char *url, size_t len)
{
	struct imap_url u;
	int server;

	if (imap_url_parse(url, len, &u) != 0)
		return -1;
	if (u.relative)
		return ur->selected;
	if (!u.has_mailbox || names_incomparable(ur->cfg, u.mailbox))
		return -1;
	server = ur->mailbox_server(ur->ctx, u.mailbox, strlen(u.mailbox));
	if (server == 0 && u.user[0] != '\0' && !user_at_home(ur, u.user))
		return -1;
	return server;
}

/*
 * The text of NO [BADURL text]: the URL as the client sent it, where
 * resp-text-code allows (no CTL, no "]"); other bytes %-escaped, as a
 * URL holds them anyway.  Cut at size.
 */
void
url_badurl_text(char *out, size_t size, const char *url, size_t len)
{
	size_t n = 0;

	for (size_t i = 0; i < len && n + 4 < size; i++) {
		unsigned char c = (unsigned char)url[i];

		if (c < 0x21 || c == 0x7f || c == 0xff || c == ']')
			n += (size_t)snprintf(out + n, size - n, "%%%02X", c);
		else
			out[n++] = (char)c;
	}
	if (n == 0 && size > 2)
		out[n++] = '-';		/* an empty URL: the code needs text */
	if (size > 0)
		out[n < size ? n : size - 1] = '\0';
}

/* Refuse url in ur, once: the first bad one is the one named. */
static int
url_refuse(struct url_route *ur, const char *url, size_t len)
{
	if (ur->refused == 0)
		url_badurl_text(ur->bad, sizeof(ur->bad), url, len);
	ur->refused = 1;
	return -1;
}

/* Check one URL against the executing server. */
static int
url_check_one(struct url_route *ur, const char *url, size_t len)
{
	if (ur->server < 0 || url_server(ur, url, len) != ur->server)
		return url_refuse(ur, url, len);
	return 0;
}

/* ------------------------------------------------------------------ */
/* the URLs in commands */

/*
 * A command whose arguments are URLs: URLFETCH url or (url params) ...
 * (RFC 4467, RFC 5524); GENURLAUTH url mechanism ...  Its executing
 * server is the first URL's, and every other must be on the same.
 * Returns that server, or -1 with ur->bad set.
 */
int
url_command_server(struct url_route *ur, const struct command *c)
{
	int genurlauth = strcmp(c->name, "GENURLAUTH") == 0;
	size_t k = 0;

	ur->server = -1;
	if (c->ntok == 0)
		return url_refuse(ur, "", 0);
	while (k < c->ntok) {
		const struct token *t = &c->tok[k++];

		if (!genurlauth && t->type == TOK_LPAREN && k < c->ntok) {
			t = &c->tok[k++];	/* the URL, then its options */
			while (k < c->ntok && c->tok[k].type != TOK_RPAREN)
				k++;
			k++;
		} else if (genurlauth)
			k++;			/* the mechanism */
		if (t->type != TOK_ATOM && t->type != TOK_QUOTED &&
		    t->type != TOK_LITERAL)
			return url_refuse(ur, t->s, t->len);
		if (ur->server < 0)
			ur->server = url_server(ur, t->s, t->len);
		if (url_check_one(ur, t->s, t->len) != 0)
			return -1;
	}
	return ur->server;
}

int
url_command(const char *name)
{
	return strcmp(name, "URLFETCH") == 0 || strcmp(name, "GENURLAUTH") == 0;
}

/*
 * The arguments of an APPEND, after its mailbox, as on the wire: tokens
 * read from raw bytes, literals skipped (or their data taken, for a URL).
 */
enum arg_kind { ARG_END, ARG_ATOM, ARG_STRING, ARG_OPEN, ARG_CLOSE,
    ARG_CUT };

struct arg_cursor {
	const char	*p;
	const char	*end;
	const char	*val;		/* ARG_ATOM, ARG_STRING: the value */
	size_t		 len;
	char		 unquoted[URL_MAX];	/* a quoted string's value */
};

/* A literal, "{n}" "{n+}" "~{n}", CRLF and n bytes; ARG_CUT when its data
 * is not all there (a literal still to stream). */
static enum arg_kind
arg_literal(struct arg_cursor *ac)
{
	const char *q = ac->p, *digits;
	uint64_t n = 0;

	if (*q == '~')
		q++;
	digits = ++q;
	while (q < ac->end && isdigit((unsigned char)*q) && n < UINT32_MAX)
		n = n * 10 + (uint64_t)(*q++ - '0');
	if (q == digits || q >= ac->end)
		return ARG_CUT;
	if (*q == '+')
		q++;
	if (ac->end - q < 3 || q[0] != '}' || q[1] != '\r' || q[2] != '\n')
		return ARG_CUT;
	q += 3;
	if ((uint64_t)(ac->end - q) < n)
		return ARG_CUT;
	ac->val = q;
	ac->len = (size_t)n;
	ac->p = q + n;
	return ARG_STRING;
}

static enum arg_kind
arg_quoted(struct arg_cursor *ac)
{
	size_t n = 0;

	for (ac->p++; ac->p < ac->end; ac->p++) {
		char ch = *ac->p;

		if (ch == '"') {
			ac->p++;
			ac->val = ac->unquoted;
			ac->len = n;
			return ARG_STRING;
		}
		if (ch == '\\' && ac->p + 1 < ac->end)
			ch = *++ac->p;
		if (ch == '\r' || ch == '\n' || n == sizeof(ac->unquoted))
			return ARG_CUT;
		ac->unquoted[n++] = ch;
	}
	return ARG_CUT;
}

static enum arg_kind
arg_next(struct arg_cursor *ac)
{
	const char *start;

	while (ac->p < ac->end && (*ac->p == ' ' || *ac->p == '\r' ||
	    *ac->p == '\n'))
		ac->p++;
	if (ac->p == ac->end)
		return ARG_END;
	switch (*ac->p) {
	case '(':
		ac->p++;
		return ARG_OPEN;
	case ')':
		ac->p++;
		return ARG_CLOSE;
	case '"':
		return arg_quoted(ac);
	case '{':
		return arg_literal(ac);
	case '~':
		if (ac->end - ac->p > 1 && ac->p[1] == '{')
			return arg_literal(ac);
		break;
	}
	start = ac->p++;	/* an atom: at least this byte, whatever it is */
	while (ac->p < ac->end && memchr(" ()\"{\r\n", *ac->p, 7) == NULL)
		ac->p++;
	ac->val = start;
	ac->len = (size_t)(ac->p - start);
	return ARG_ATOM;
}

static int
atom_is(const struct arg_cursor *ac, const char *word)
{
	return ac->len == strlen(word) && strncasecmp(ac->val, word,
	    ac->len) == 0;
}

/*
 * How many lists are open at the end of [p, len): a command cut before
 * a literal that streams inside one (CATENATE's TEXT) needs that many
 * ")" to parse.
 */
size_t
args_open_lists(const char *p, size_t len)
{
	struct arg_cursor *ac = malloc(sizeof(*ac));
	enum arg_kind k;
	size_t depth = 0;

	if (ac == NULL)
		return 0;
	ac->p = p;
	ac->end = p + len;
	while ((k = arg_next(ac)) != ARG_END && k != ARG_CUT)
		if (k == ARG_OPEN)
			depth++;
		else if (k == ARG_CLOSE && depth > 0)
			depth--;
	free(ac);
	return depth;
}

/*
 * Check the CATENATE URLs in a piece of an APPEND's arguments: those
 * after the mailbox as first read, or a piece that follows a streamed
 * literal (a message, or a TEXT part inside CATENATE's list).  A piece
 * needs no state from the one before: a "URL" atom outside any list the
 * piece opened, or in a list opened after "CATENATE", starts a URL part
 * (outside a CATENATE list "URL" is no valid argument anyway); a ")" the
 * piece did not open closes the CATENATE list it began in.  Returns 0
 * when every URL is on ur->server, -1 with ur->bad naming the first that
 * is not.
 */
int
url_append_check(struct url_route *ur, const char *p, size_t len)
{
	struct arg_cursor *ac = malloc(sizeof(*ac));
	enum arg_kind k;
	int depth = 0, cat_depth = 0, after_catenate = 0, want_url = 0;
	int rc = 0;

	if (ac == NULL)
		return url_refuse(ur, "", 0);
	ac->p = p;
	ac->end = p + len;
	while (rc == 0 && (k = arg_next(ac)) != ARG_END) {
		if (want_url)
			rc = k == ARG_STRING || k == ARG_ATOM ?
			    url_check_one(ur, ac->val, ac->len) :
			    url_refuse(ur, "", 0);
		else if (k == ARG_OPEN) {
			depth++;
			if (after_catenate)
				cat_depth = depth;
		} else if (k == ARG_CLOSE) {
			if (depth == cat_depth)
				cat_depth = 0;
			if (depth > 0)
				depth--;
		} else if (k == ARG_CUT)
			break;		/* a literal to stream: not a URL */
		want_url = !want_url && k == ARG_ATOM && atom_is(ac, "URL") &&
		    (depth == 0 || depth == cat_depth);
		after_catenate = k == ARG_ATOM && atom_is(ac, "CATENATE");
	}
	free(ac);
	return rc;
}
