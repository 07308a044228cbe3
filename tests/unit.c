/*
 * Unit tests for the pure parts of imapfe: the command parser, literal
 * announcements, IMAP string quoting, base64, SASL PLAIN, capability
 * filtering, the response scanner, the reader of client commands (over
 * pipes), LDAP filter escaping and the shared state's tables.  Ends with "N passed, N failed".
 */
#include <sys/wait.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "imapfe.h"

static int passed, failed;

#define CHECK(cond) check((cond), #cond, __FILE__, __LINE__)

static void
check(int ok, const char *what, const char *file, int line)
{
	if (ok) {
		passed++;
		return;
	}
	failed++;
	printf("FAIL %s:%d: %s\n", file, line, what);
}

/* Parse text (a C string, literals inline) into cmd. */
static enum parse_status
parse(const char *text, size_t len, struct command *cmd, char **keep)
{
	const char *why;

	*keep = malloc(len + 1);
	memcpy(*keep, text, len);
	return parse_command(*keep, len, cmd, &why);
}

static int
tok_is(const struct token *t, enum tok_type type, const char *s)
{
	return t->type == type && t->len == strlen(s) &&
	    memcmp(t->s, s, t->len) == 0;
}

static void
test_parser(void)
{
	struct command *c = malloc(sizeof(*c));
	char *b;

	CHECK(parse("a1 login alice secret", 21, c, &b) == PARSE_OK);
	CHECK(strcmp(c->tag, "a1") == 0 && strcmp(c->name, "LOGIN") == 0);
	CHECK(c->ntok == 2 && tok_is(&c->tok[0], TOK_ATOM, "alice") &&
	    tok_is(&c->tok[1], TOK_ATOM, "secret"));
	free(b);

	CHECK(parse("t LOGIN \"a\\\"b\\\\c\" \"\"", 20, c, &b) == PARSE_OK);
	CHECK(c->ntok == 2 && tok_is(&c->tok[0], TOK_QUOTED, "a\"b\\c") &&
	    tok_is(&c->tok[1], TOK_QUOTED, ""));
	free(b);

	/* a literal holding CR LF and a quote, then a non-sync literal */
	const char lit[] = "x LOGIN {5}\r\na\r\n\"b {2+}\r\npw";
	CHECK(parse(lit, sizeof(lit) - 1, c, &b) == PARSE_OK);
	CHECK(c->ntok == 2 && tok_is(&c->tok[0], TOK_LITERAL, "a\r\n\"b") &&
	    tok_is(&c->tok[1], TOK_LITERAL, "pw"));
	free(b);

	CHECK(parse("i ID (\"name\" \"x\" \"v\" NIL)", 25, c, &b) ==
	    PARSE_OK);
	CHECK(c->ntok == 6 && c->tok[0].type == TOK_LPAREN &&
	    c->tok[4].type == TOK_NIL && c->tok[5].type == TOK_RPAREN);
	free(b);

	CHECK(parse("n NOOP", 6, c, &b) == PARSE_OK && c->ntok == 0 &&
	    strcmp(c->name, "NOOP") == 0);
	free(b);

	/* malformed input */
	CHECK(parse("NOOP", 4, c, &b) == PARSE_NOTAG);
	free(b);
	CHECK(parse("+x NOOP", 7, c, &b) == PARSE_NOTAG);
	free(b);
	CHECK(parse("a{ NOOP", 7, c, &b) == PARSE_NOTAG);
	free(b);
	CHECK(parse("a ", 2, c, &b) == PARSE_BAD);
	free(b);
	CHECK(parse("a LOGIN \"open", 13, c, &b) == PARSE_BAD);
	free(b);
	CHECK(parse("a LOGIN \"bad\\q\"", 15, c, &b) == PARSE_BAD);
	free(b);
	CHECK(parse("a ID (\"x\"", 9, c, &b) == PARSE_BAD);
	free(b);
	CHECK(parse("a ID \"x\")", 9, c, &b) == PARSE_BAD);
	free(b);
	CHECK(parse("a LOGIN  x", 10, c, &b) == PARSE_BAD);
	free(b);
	CHECK(parse("a LOGIN x\xff", 10, c, &b) == PARSE_BAD);
	free(b);
	CHECK(parse("a LOGIN x\001y", 11, c, &b) == PARSE_BAD);
	free(b);
	CHECK(parse("a LOGIN {5}\r\nab", 15, c, &b) == PARSE_BAD);
	free(b);
	CHECK(parse("a LOGIN \"x\0y\"", 13, c, &b) == PARSE_BAD);
	free(b);

	/* too many tokens */
	{
		size_t n = 2 + 3 * (CMD_MAX_TOKENS + 1);
		char *many = malloc(n + 1);

		memcpy(many, "a X", 3);
		for (size_t i = 3; i + 2 < n; i += 2)
			memcpy(many + i, " y", 2);
		n = 3 + 2 * (CMD_MAX_TOKENS + 1);
		CHECK(parse(many, n, c, &b) == PARSE_BAD);
		free(b);
		free(many);
	}
	free(c);
}

static void
test_literal_at_end(void)
{
	uint64_t n = 0;

	CHECK(literal_at_end("a LOGIN {5}", 11, &n) == LIT_SYNC && n == 5);
	CHECK(literal_at_end("a LOGIN {5+}", 12, &n) == LIT_NONSYNC && n == 5);
	CHECK(literal_at_end("a LOGIN {0}", 11, &n) == LIT_SYNC && n == 0);
	CHECK(literal_at_end("a {4294967295}", 14, &n) == LIT_SYNC &&
	    n == 4294967295ULL);
	CHECK(literal_at_end("a {4294967296}", 14, &n) == LIT_INVALID);
	CHECK(literal_at_end("a {-1}", 6, &n) == LIT_INVALID);
	CHECK(literal_at_end("a {12x}", 7, &n) == LIT_INVALID);
	CHECK(literal_at_end("a {}", 4, &n) == LIT_INVALID);
	CHECK(literal_at_end("a {+}", 5, &n) == LIT_INVALID);
	CHECK(literal_at_end("a {99999999999999999999}", 24, &n) ==
	    LIT_INVALID);
	CHECK(literal_at_end("a NOOP", 6, &n) == LIT_NONE);
	CHECK(literal_at_end("a \"x}\"", 6, &n) == LIT_NONE);
	CHECK(literal_at_end("}", 1, &n) == LIT_NONE);
}

static void
test_quoting(void)
{
	struct str b = { 0 };

	CHECK(imap_append_string(&b, "plain", 5, 0) == 0 &&
	    strcmp(b.s, "\"plain\"") == 0);
	str_free(&b);
	CHECK(imap_append_string(&b, "a\"b\\c", 5, 0) == 0 &&
	    strcmp(b.s, "\"a\\\"b\\\\c\"") == 0);
	str_free(&b);
	CHECK(imap_append_string(&b, "", 0, 0) == 0 && strcmp(b.s, "\"\"") == 0);
	str_free(&b);
	CHECK(imap_append_string(&b, "x\r\ny", 4, 0) == 1 &&
	    strcmp(b.s, "{4}\r\nx\r\ny") == 0);
	str_free(&b);
	CHECK(imap_append_string(&b, "j\xc3\xbcrgen", 7, 1) == 1 &&
	    strcmp(b.s, "{7+}\r\nj\xc3\xbcrgen") == 0);
	str_free(&b);
	CHECK(imap_append_string(&b, "a\0b", 3, 0) == -1);
	str_free(&b);
}

static void
test_base64(void)
{
	char out[64];
	size_t n;

	CHECK(base64_decode("AGFsaWNlAHNlY3JldA==", 20, out, sizeof(out), &n)
	    == 0 && n == 13 && memcmp(out, "\0alice\0secret", 13) == 0);
	CHECK(base64_decode("", 0, out, sizeof(out), &n) == 0 && n == 0);
	CHECK(base64_decode("YQ==", 4, out, sizeof(out), &n) == 0 && n == 1);
	CHECK(base64_decode("YWI=", 4, out, sizeof(out), &n) == 0 && n == 2);
	CHECK(base64_decode("YQ=", 3, out, sizeof(out), &n) != 0);
	CHECK(base64_decode("Y===", 4, out, sizeof(out), &n) != 0);
	CHECK(base64_decode("YQ==YQ==", 8, out, sizeof(out), &n) != 0);
	CHECK(base64_decode("Y!==", 4, out, sizeof(out), &n) != 0);
	/* found by fuzz_sasl: non-zero pad bits (RFC 4648 3.5) are refused */
	CHECK(base64_decode("AGFsWaW=", 8, out, sizeof(out), &n) != 0);
	CHECK(base64_decode("YR==", 4, out, sizeof(out), &n) != 0);
	CHECK(base64_decode("YQ\0=", 4, out, sizeof(out), &n) != 0);
	CHECK(base64_decode("YWJj", 4, out, 2, &n) != 0);
	CHECK(base64_encode((const unsigned char *)"ab", 2, out, sizeof(out))
	    == 4 && strcmp(out, "YWI=") == 0);
	CHECK(base64_encode((const unsigned char *)"", 0, out, sizeof(out))
	    == 0 && out[0] == '\0');
	CHECK(base64_encode((const unsigned char *)"abc", 3, out, 4) == 0);
}

static void
test_plain(void)
{
	struct credentials cr = { 0 };

	CHECK(sasl_plain_split("\0alice\0secret", 13, &cr) == PLAIN_OK &&
	    strcmp(cr.user, "alice") == 0 && strcmp(cr.pass, "secret") == 0);
	credentials_clear(&cr);
	CHECK(sasl_plain_split("alice\0alice\0pw", 14, &cr) == PLAIN_OK);
	credentials_clear(&cr);
	CHECK(sasl_plain_split("bob\0alice\0pw", 12, &cr) == PLAIN_AUTHZID);
	CHECK(sasl_plain_split("\0alice", 6, &cr) == PLAIN_MALFORMED);
	CHECK(sasl_plain_split("\0\0pw", 4, &cr) == PLAIN_MALFORMED);
	CHECK(sasl_plain_split("\0a\0p\0w", 6, &cr) == PLAIN_MALFORMED);
	CHECK(sasl_plain_split("", 0, &cr) == PLAIN_MALFORMED);
	CHECK(credentials_acceptable("ok", 2) &&
	    !credentials_acceptable("a\rb", 3) &&
	    !credentials_acceptable("a\nb", 3) &&
	    !credentials_acceptable("a\0b", 3));
}

/* What imapfe sends a back-end for PLAIN, and what a server reads in it. */
static void
test_plain_response(void)
{
	struct credentials cr = { 0 }, back = { 0 };
	struct str b64 = { 0 };
	char msg[64];
	size_t len;

	CHECK(credentials_set(&cr, "alice", 5, "secret", 6) == 0 &&
	    plain_response(&cr, &b64) == 0 &&
	    strcmp(b64.s, "AGFsaWNlAHNlY3JldA==") == 0);
	CHECK(base64_decode(b64.s, b64.len, msg, sizeof(msg), &len) == 0 &&
	    sasl_plain_split(msg, len, &back) == PLAIN_OK &&
	    strcmp(back.user, "alice") == 0 && strcmp(back.pass, "secret") == 0);
	credentials_clear(&back);
	str_free(&b64);
	/* as the proxy user, for alice: she is the authorization identity */
	CHECK(credentials_set(&cr, "proxy", 5, "pw", 2) == 0 &&
	    credentials_set_authzid(&cr, "alice") == 0 &&
	    plain_response(&cr, &b64) == 0 &&
	    strcmp(b64.s, "YWxpY2UAcHJveHkAcHc=") == 0);
	str_free(&b64);
	credentials_clear(&cr);
}

/* bearer_split of a C string literal (its length without the NUL). */
#define BEARER(kind, lit, cr, why) bearer_split(kind, lit, sizeof(lit) - 1, \
    cr, why)

static void
test_bearer(void)
{
	struct credentials cr = { 0 }, again = { 0 };
	struct str msg = { 0 };
	const char *why;

	CHECK(BEARER(CRED_OAUTHBEARER, "n,a=al=2Cice=3D,\1host=h\1port=143\1"
	    "auth=Bearer tok.en-_~+/==\1\1", &cr, &why) == BEARER_OK &&
	    strcmp(cr.user, "al,ice=") == 0 &&
	    strcmp(cr.pass, "tok.en-_~+/==") == 0 &&
	    cr.kind == CRED_OAUTHBEARER);
	/* what imapfe sends a back-end reads back the same */
	CHECK(bearer_message(&cr, "mail", "993", &msg) == 0 &&
	    memcmp(msg.s, "n,a=al=2Cice=3D,\1host=mail\1port=993\1", 35) == 0 &&
	    bearer_split(CRED_OAUTHBEARER, msg.s, msg.len, &again, &why) ==
	    BEARER_OK && strcmp(again.user, cr.user) == 0 &&
	    strcmp(again.pass, cr.pass) == 0);
	str_free(&msg);
	credentials_clear(&again);
	credentials_clear(&cr);
	CHECK(BEARER(CRED_XOAUTH2, "user=bob\1auth=bearer  t\1\1", &cr, &why) ==
	    BEARER_OK && strcmp(cr.user, "bob") == 0 &&
	    strcmp(cr.pass, "t") == 0 && cr.kind == CRED_XOAUTH2);
	CHECK(bearer_message(&cr, "h", "1", &msg) == 0 && msg.len == 24 &&
	    memcmp(msg.s, "user=bob\1auth=Bearer t\1\1", 24) == 0);
	str_free(&msg);
	credentials_clear(&cr);
	CHECK(BEARER(CRED_OAUTHBEARER, "n,,\1auth=Bearer t\1\1", &cr, &why) ==
	    BEARER_NOUSER && cr.user == NULL);
	CHECK(BEARER(CRED_XOAUTH2, "auth=Bearer t\1\1", &cr, &why) ==
	    BEARER_NOUSER);
	CHECK(BEARER(CRED_OAUTHBEARER, "n,a=x,auth=Bearer t", &cr, &why) ==
	    BEARER_MALFORMED && strcmp(why, "no \\x01 separator") == 0);
	CHECK(BEARER(CRED_OAUTHBEARER, "p=x,a=x,\1auth=Bearer t\1\1", &cr,
	    &why) == BEARER_MALFORMED);
	CHECK(BEARER(CRED_OAUTHBEARER, "n,a=x=4,\1auth=Bearer t\1\1", &cr,
	    &why) == BEARER_MALFORMED);
	CHECK(BEARER(CRED_OAUTHBEARER, "n,a=x\0y,\1auth=Bearer t\1\1", &cr,
	    &why) == BEARER_MALFORMED);
	CHECK(BEARER(CRED_XOAUTH2, "user=x\0y\1auth=Bearer t\1\1", &cr,
	    &why) == BEARER_MALFORMED);
	CHECK(BEARER(CRED_XOAUTH2, "user=x\1auth=Bearer t\1", &cr, &why) ==
	    BEARER_MALFORMED);
	CHECK(BEARER(CRED_XOAUTH2, "user=x\1auth=Bearer t\1\1\1", &cr, &why) ==
	    BEARER_MALFORMED);
	CHECK(BEARER(CRED_XOAUTH2, "user=x\1auth=Bearer t u\1\1", &cr,
	    &why) == BEARER_MALFORMED);
	CHECK(BEARER(CRED_XOAUTH2, "user=x\1auth=Basic dTpw\1\1", &cr,
	    &why) == BEARER_MALFORMED);
	CHECK(BEARER(CRED_XOAUTH2, "user=x\1\1", &cr, &why) ==
	    BEARER_MALFORMED && strcmp(why, "no auth=Bearer pair") == 0);
	CHECK(BEARER(CRED_OAUTHBEARER, "\1", &cr, &why) == BEARER_MALFORMED);
	CHECK(bearer_kind("OAUTHBEARER") == CRED_OAUTHBEARER &&
	    bearer_kind("XOAUTH2") == CRED_XOAUTH2 &&
	    bearer_kind("PLAIN") == CRED_PASSWORD);
}

static void
test_caps(void)
{
	const char *backend = "IMAP4rev1 SASL-IR AUTH=PLAIN IDLE NOTIFY "
	    "STARTTLS LOGINDISABLED COMPRESS=DEFLATE MOVE auth=login CATENATE";
	char *c = caps_for_client(backend, 0);

	CHECK(c != NULL && strcmp(c, "IMAP4rev1 IDLE NOTIFY MOVE CATENATE") ==
	    0);
	free(c);
	/* routed: no extension that would span servers; CATENATE and
	 * URLAUTH do not, as the router runs them where their URLs point */
	c = caps_for_client(backend, 1);
	CHECK(c != NULL && strcmp(c, "IMAP4rev1 IDLE MOVE CATENATE") == 0);
	free(c);
	c = caps_for_client("IMAP4rev1 MULTISEARCH URLAUTH URLAUTH=BINARY "
	    "URL-PARTIAL MAILBOX-REFERRALS", 1);
	CHECK(c != NULL && strcmp(c, "IMAP4rev1 URLAUTH URLAUTH=BINARY "
	    "URL-PARTIAL") == 0);
	free(c);
	CHECK(caps_has("IMAP4rev1 LITERAL+ IDLE", "literal+"));
	CHECK(!caps_has("IMAP4rev1 LITERAL+X", "LITERAL+"));
}

static void
test_scanner(void)
{
	struct resp_scanner sc;
	const char *s1 = "* 1 FETCH (BODY[] {14}\r\n* BYE in body\r\n)\r\n";

	resp_scanner_init(&sc);
	resp_scan(&sc, s1, strlen(s1));
	CHECK(!sc.saw_bye && sc.literal_left == 0);
	/* the same, split at every byte */
	resp_scanner_init(&sc);
	for (size_t i = 0; i < strlen(s1); i++)
		resp_scan(&sc, s1 + i, 1);
	CHECK(!sc.saw_bye);
	resp_scan(&sc, "* BYE Logging out\r\n", 19);
	CHECK(sc.saw_bye);
	resp_scanner_init(&sc);
	resp_scan(&sc, "* bye\r\n", 7);
	CHECK(sc.saw_bye);
	resp_scanner_init(&sc);
	resp_scan(&sc, "* BYEBYE\r\n", 10);
	CHECK(!sc.saw_bye);
}

/* A FETCH section with blanks belongs to its atom, as servers parse it. */
static void
test_fetch_section(void)
{
	struct command c;
	const char *why;
	char b1[] = "a UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT "
	    "\"X-A B\")]<0.10>)";
	char b2[] = "a SELECT [Gmail]/Sent";
	char b3[] = "a FETCH 1 BODY[HEADER.FIELDS (A)";
	char b4[] = "a FETCH 1 (BODY[1.MIME] BODY[HEADER.FIELDS.NOT (B C)])";

	CHECK(parse_command(b1, strlen(b1), &c, &why) == PARSE_OK &&
	    c.ntok == 6 && c.tok[4].type == TOK_ATOM &&
	    c.tok[4].len == strlen("BODY.PEEK[HEADER.FIELDS (SUBJECT "
	    "\"X-A B\")]<0.10>"));
	CHECK(parse_command(b2, strlen(b2), &c, &why) == PARSE_OK &&
	    c.ntok == 1 && c.tok[0].len == 12);
	/* unclosed: "[" is an atom's byte, as before; the server judges */
	CHECK(parse_command(b3, strlen(b3), &c, &why) == PARSE_OK &&
	    c.ntok == 5 && c.tok[1].len == strlen("BODY[HEADER.FIELDS"));
	CHECK(parse_command(b4, strlen(b4), &c, &why) == PARSE_OK &&
	    c.ntok == 5 && c.tok[3].len == strlen("BODY[HEADER.FIELDS.NOT "
	    "(B C)]"));
}

static void
test_resp_status(void)
{
	struct status_resp st;
	const char *l;

	CHECK(status_parse("F1 OK done", 10, "F1", &st) == 0 &&
	    st.kind == RESP_OK && st.code == CODE_NONE && st.text_len == 4);
	CHECK(status_parse("* BYE", 5, "*", &st) == 0 && st.kind == RESP_BYE);
	CHECK(status_parse("F12 OK", 6, "F1", &st) != 0);
	CHECK(status_parse("F1 OKAY", 7, "F1", &st) != 0);
	l = "a NO [REFERRAL imap://h/x] go there";
	CHECK(status_parse(l, strlen(l), "a", &st) == 0 && st.kind == RESP_NO &&
	    st.code == CODE_REFERRAL && st.code_arg_len == 10 &&
	    memcmp(st.code_arg, "imap://h/x", 10) == 0 &&
	    strcmp(st.text, "go there") == 0);
	l = "a no [unavailable] later";
	CHECK(status_parse(l, strlen(l), "a", &st) == 0 && st.kind == RESP_NO &&
	    st.code == CODE_UNAVAILABLE);
	l = "a NO [X-SOMETHING 1 2] what";
	CHECK(status_parse(l, strlen(l), "a", &st) == 0 &&
	    st.code == CODE_OTHER);
	l = "a NO [TRYCREATE no close";
	CHECK(status_parse(l, strlen(l), "a", &st) == 0 &&
	    st.code == CODE_NONE && st.text == l + 5);
}

static void
test_appenduid(void)
{
	struct status_resp st;
	struct uid_list l = { 0 };
	uint32_t v = 0;
	const char *s;

	s = "a OK [APPENDUID 38505 3955:3957,12] Append completed.";
	CHECK(status_parse(s, strlen(s), "a", &st) == 0 &&
	    st.code_span_len == 30 && memcmp(st.code_span, "[APPENDUID", 10)
	    == 0 && appenduid_parse(&st, 100, &v, &l) == 0 && v == 38505 &&
	    l.n == 4 && l.uid[0] == 3955 && l.uid[2] == 3957 &&
	    l.uid[3] == 12);
	uid_list_free(&l);
	s = "a OK [APPENDUID 1 2:*] no star";
	CHECK(status_parse(s, strlen(s), "a", &st) == 0 &&
	    appenduid_parse(&st, 100, &v, &l) != 0);
	uid_list_free(&l);
	s = "a OK [APPENDUID 1 1:4294967295] too many";
	CHECK(status_parse(s, strlen(s), "a", &st) == 0 &&
	    appenduid_parse(&st, 100, &v, &l) != 0);
	uid_list_free(&l);
	s = "a OK [APPENDUID 0 5] zero validity";
	CHECK(status_parse(s, strlen(s), "a", &st) == 0 &&
	    appenduid_parse(&st, 100, &v, &l) != 0);
	uid_list_free(&l);
	s = "a OK no code";
	CHECK(status_parse(s, strlen(s), "a", &st) == 0 &&
	    appenduid_parse(&st, 100, &v, &l) != 0 && l.n == 0);
	s = "a NO [OVERQUOTA] Quota exceeded";
	CHECK(status_parse(s, strlen(s), "a", &st) == 0 &&
	    st.code == CODE_OVERQUOTA && st.code_span_len == 11 &&
	    appenduid_parse(&st, 100, &v, &l) != 0);
	uid_list_free(&l);
}

/* The dispatcher over a stream in memory: what goes where. */
struct collected {
	struct str	 lines;
	struct str	 data;
};

static enum sink_verdict
collect_line(void *ctx, const char *line, size_t len)
{
	struct collected *c = ctx;

	str_add(&c->lines, line, len);
	str_add(&c->lines, "|", 1);
	return len > 7 && memcmp(line, "* LIST ", 7) == 0 ? SINK_DROP :
	    SINK_KEEP;
}

static int
collect_data(void *ctx, const char *p, size_t n)
{
	struct collected *c = ctx;

	return str_add(&c->data, p, n);
}

static void
test_dispatch(void)
{
	static const char stream[] = "* 1 FETCH (BODY[] {12}\r\n"
	    "a1 OK fake\r\n)\r\n* LIST () \"/\" {3}\r\nabc\r\n"
	    "+ go on\r\n* BYE bye\r\na1 NO [TRYCREATE] no\r\n";
	struct collected c = { { 0 }, { 0 } };
	struct resp_sink sink = { .line = collect_line, .data = collect_data,
	    .ctx = &c };
	struct backend be;
	struct reply r;

	memset(&be, 0, sizeof(be));
	resp_scanner_init(&be.sc);
	CHECK(iobuf_init(&be.io, -1, -1, 4096) == 0);
	memcpy(be.io.buf, stream, sizeof(stream) - 1);
	be.io.end = sizeof(stream) - 1;
	CHECK(backend_dispatch(&be, &sink, &r) == DISPATCH_CONTINUATION &&
	    r.len == 7 && memcmp(r.line, "+ go on", 7) == 0);
	/* the literal's "a1 OK" is data, the LIST response dropped whole */
	CHECK(c.data.len == 39 && memcmp(c.data.s + 24, "a1 OK fake",
	    10) == 0);
	CHECK(backend_dispatch(&be, &sink, &r) == DISPATCH_TAGGED &&
	    reply_is(&r, "a1") && r.status == REPLY_NO &&
	    r.code == CODE_TRYCREATE);
	CHECK(be.bye != NULL && be.bye->status == REPLY_BYE && be.sc.saw_bye);
	CHECK(backend_dispatch(&be, &sink, &r) == DISPATCH_MORE);
	/* a line that has not ended yet waits */
	memcpy(be.io.buf, "a2 OK do", 8);
	be.io.start = 0;
	be.io.end = 8;
	CHECK(backend_dispatch(&be, &sink, &r) == DISPATCH_MORE &&
	    iobuf_pending(&be.io) == 8);
	iobuf_free(&be.io);
	free(be.bye);
	free(be.caps);
	str_free(&c.lines);
	str_free(&c.data);
}

/* cmd_read over pipes: the client's bytes sent whole, then its end. */
struct reader_bed {
	struct iobuf	 io;
	int		 answers;	/* what the reader wrote, to read back */
	struct cmd_buf	 cb;
	char		 said[512];
};

static const struct cmd_limits prelogin_limits = { .line_max = 1000,
    .command_max = 65536, .literal_max = 4096, .hold_max = 4096,
    .literal_name = "max_prelogin_literal" };
static const struct cmd_limits routed_limits = { .line_max = 1000,
    .command_max = 65536, .literal_max = 100, .hold_max = 16, .toobig = 1,
    .literal_name = "max_literal_size" };

static int
reader_open(struct reader_bed *rb, const char *client)
{
	size_t len = strlen(client);
	int in[2], out[2];

	memset(rb, 0, sizeof(*rb));
	if (pipe(in) != 0)
		return -1;
	if (pipe2(out, O_NONBLOCK) != 0) {
		close(in[0]);
		close(in[1]);
		return -1;
	}
	if (write(in[1], client, len) != (ssize_t)len ||
	    iobuf_init(&rb->io, in[0], out[1], 1024) != 0) {
		close(in[0]);
		close(in[1]);
		close(out[0]);
		close(out[1]);
		return -1;
	}
	close(in[1]);
	rb->answers = out[0];
	return 0;
}

/* Everything the reader has written since the last look. */
static const char *
reader_said(struct reader_bed *rb)
{
	ssize_t n = read(rb->answers, rb->said, sizeof(rb->said) - 1);

	rb->said[n > 0 ? n : 0] = '\0';
	return rb->said;
}

static int
reader_text_is(const struct reader_bed *rb, const char *s)
{
	return rb->cb.text.len == strlen(s) &&
	    memcmp(rb->cb.text.s, s, rb->cb.text.len) == 0;
}

static void
reader_close(struct reader_bed *rb)
{
	close(rb->io.rfd);
	close(rb->io.wfd);
	close(rb->answers);
	iobuf_free(&rb->io);
	cmd_buf_free(&rb->cb);
}

static void
test_cmd_read_literals(void)
{
	struct reader_bed rb;

	/* a synchronizing literal gets its "+" and is held as sent */
	CHECK(reader_open(&rb, "a LOGIN {5}\r\nalice {6}\r\nsecret\r\n") == 0);
	CHECK(cmd_read(&rb.io, &prelogin_limits, &rb.cb) == CMD_COMPLETE);
	CHECK(reader_text_is(&rb, "a LOGIN {5}\r\nalice {6}\r\nsecret\r\n"));
	CHECK(rb.cb.ncuts == 2 && rb.cb.cuts[0] == 13 && rb.cb.cuts[1] == 24);
	CHECK(strcmp(reader_said(&rb), "+ Ready for literal data\r\n"
	    "+ Ready for literal data\r\n") == 0);
	CHECK(strcmp(rb.cb.tag, "a") == 0);
	reader_close(&rb);
	/* a non-synchronizing one is held synchronizing, without a "+" */
	CHECK(reader_open(&rb, "b LOGIN {05+}\r\nalice pw\nc NOOP\r\n") == 0);
	CHECK(cmd_read(&rb.io, &prelogin_limits, &rb.cb) == CMD_COMPLETE);
	CHECK(reader_text_is(&rb, "b LOGIN {5}\r\nalice pw\r\n"));
	CHECK(rb.cb.ncuts == 1 && rb.cb.cuts[0] == 13);
	CHECK(strcmp(reader_said(&rb), "") == 0);
	CHECK(cmd_read(&rb.io, &prelogin_limits, &rb.cb) == CMD_COMPLETE);
	CHECK(reader_text_is(&rb, "c NOOP\r\n") && rb.cb.ncuts == 0);
	reader_close(&rb);
	/* an invalid size is refused, and the next command read */
	CHECK(reader_open(&rb, "d LOGIN {x}\r\ne NOOP\r\n") == 0);
	CHECK(cmd_read(&rb.io, &prelogin_limits, &rb.cb) == CMD_BAD_LITERAL);
	CHECK(strcmp(reader_said(&rb), "d BAD Invalid literal size.\r\n") == 0);
	CHECK(cmd_read(&rb.io, &prelogin_limits, &rb.cb) == CMD_COMPLETE);
	CHECK(reader_text_is(&rb, "e NOOP\r\n"));
	reader_close(&rb);
}

/* A command of n empty literals, each announced on a line of its own. */
static enum cmd_status
read_many_literals(int n)
{
	struct reader_bed rb;
	struct str in = { 0 };
	enum cmd_status st = CMD_END;
	int ok = str_adds(&in, "a X") == 0;

	for (int i = 0; ok && i < n; i++)
		ok = str_adds(&in, " {0}\r\n") == 0;
	if (ok && str_adds(&in, "\r\n") == 0 && reader_open(&rb, in.s) == 0) {
		st = cmd_read(&rb.io, &prelogin_limits, &rb.cb);
		CHECK(rb.cb.ncuts <= CMD_MAX_LITERALS);
		reader_close(&rb);
	}
	str_free(&in);
	return st;
}

static void
test_cmd_read_limits(void)
{
	struct reader_bed rb;
	struct str scratch = { 0 };

	/* after login, a synchronizing literal over the limit: TOOBIG */
	CHECK(reader_open(&rb, "a APPEND INBOX {1000}\r\nb NOOP\r\n") == 0);
	CHECK(cmd_read(&rb.io, &routed_limits, &rb.cb) == CMD_ANSWERED);
	CHECK(strcmp(reader_said(&rb), "a NO [TOOBIG] Literal too large.\r\n")
	    == 0);
	CHECK(cmd_read(&rb.io, &routed_limits, &rb.cb) == CMD_COMPLETE);
	CHECK(reader_text_is(&rb, "b NOOP\r\n"));
	reader_close(&rb);
	/* before login the same literal ends the session */
	CHECK(reader_open(&rb, "a APPEND INBOX {5000}\r\n") == 0);
	CHECK(cmd_read(&rb.io, &prelogin_limits, &rb.cb) == CMD_END);
	CHECK(rb.cb.end == END_LIMIT && rb.cb.bye != NULL &&
	    strcmp(rb.cb.bye, "Literal too large.") == 0);
	CHECK(strcmp(reader_said(&rb), "") == 0);
	reader_close(&rb);
	/* over hold_max: the caller streams it, then reads the rest */
	CHECK(reader_open(&rb, "c APPEND INBOX {20}\r\n"
	    "01234567890123456789 {2+}\r\nok\r\n") == 0);
	CHECK(cmd_read(&rb.io, &routed_limits, &rb.cb) == CMD_STREAM);
	CHECK(rb.cb.stream_left == 20 && rb.cb.stream_sync == 1);
	CHECK(reader_text_is(&rb, "c APPEND INBOX {20}\r\n") &&
	    rb.cb.ncuts == 1 && rb.cb.cuts[0] == rb.cb.text.len);
	CHECK(strcmp(reader_said(&rb), "") == 0);
	CHECK(iobuf_read_into(&rb.io, rb.cb.stream_left, &scratch) == IO_OK &&
	    scratch.len == 20 && memcmp(scratch.s, "01234567890123456789",
	    20) == 0);
	rb.cb.continuing = 1;
	CHECK(cmd_read(&rb.io, &routed_limits, &rb.cb) == CMD_COMPLETE);
	CHECK(reader_text_is(&rb, " {2}\r\nok\r\n") && rb.cb.ncuts == 1);
	CHECK(strcmp(rb.cb.tag, "c") == 0);
	str_free(&scratch);
	reader_close(&rb);
	/* a line over line_max ends the session with a BYE */
	CHECK(reader_open(&rb, "a NOOP") == 0);
	CHECK(cmd_read(&rb.io, &(struct cmd_limits){ .line_max = 4,
	    .command_max = 100 }, &rb.cb) == CMD_END);
	CHECK(rb.cb.end == END_LIMIT && rb.cb.bye != NULL &&
	    strcmp(rb.cb.bye, "Command line too long.") == 0);
	reader_close(&rb);
	/* the literals of one command are counted */
	CHECK(read_many_literals(CMD_MAX_LITERALS - 1) == CMD_COMPLETE);
	CHECK(read_many_literals(CMD_MAX_LITERALS + 1) == CMD_END);
}

static void
test_cmd_read_end(void)
{
	struct reader_bed rb;

	/* the client's end, between commands or inside one: no BYE */
	CHECK(reader_open(&rb, "") == 0);
	CHECK(cmd_read(&rb.io, &prelogin_limits, &rb.cb) == CMD_END);
	CHECK(rb.cb.end == END_CLIENT_GONE && rb.cb.bye == NULL);
	reader_close(&rb);
	CHECK(reader_open(&rb, "a LOGIN {10}\r\nalice") == 0);
	CHECK(cmd_read(&rb.io, &prelogin_limits, &rb.cb) == CMD_END);
	CHECK(rb.cb.end == END_CLIENT_GONE && rb.cb.bye == NULL);
	CHECK(strcmp(reader_said(&rb), "+ Ready for literal data\r\n") == 0);
	reader_close(&rb);
}

static void
test_sanitize(void)
{
	char out[16];

	sanitize(out, sizeof(out), "a\r\nb\x01", 5);
	CHECK(strcmp(out, "a??b?") == 0);
	sanitize(out, sizeof(out), "0123456789abcdefghij", 20);
	CHECK(strlen(out) == 15 && strcmp(out + 12, "...") == 0);
}

static void
test_referral(void)
{
	struct referral r;

	CHECK(referral_parse("a NO [REFERRAL imap://;AUTH=*@SERVER2/] Try "
	    "SERVER2.", &r) == 0);
	CHECK(strcmp(r.host, "SERVER2") == 0 && strcmp(r.port, "143") == 0 &&
	    r.user[0] == '\0' && r.mailbox[0] == '\0');
	CHECK(referral_parse("a NO [REFERRAL imap://fred;AUTH=PLAIN@10.0.0.2:"
	    "1143/] x", &r) == 0);
	CHECK(strcmp(r.host, "10.0.0.2") == 0 && strcmp(r.port, "1143") == 0 &&
	    strcmp(r.user, "fred") == 0);
	CHECK(referral_parse("a NO [referral IMAP://[::1]:993/Public%20Folders"
	    "/News;UIDVALIDITY=7] Remote", &r) == 0);
	CHECK(strcmp(r.host, "::1") == 0 && strcmp(r.port, "993") == 0 &&
	    strcmp(r.mailbox, "Public Folders/News") == 0);
	CHECK(referral_parse("a NO [REFERRAL imap://h/Foo] Remote", &r) == 0 &&
	    strcmp(r.mailbox, "Foo") == 0);
	CHECK(referral_parse("a NO [REFERRAL imap://h] x", &r) == 0 &&
	    strcmp(r.host, "h") == 0);
	CHECK(referral_parse("a NO nothing to see", &r) == -1);
	/* what imapfe cannot or must not use */
	CHECK(referral_parse("a NO [REFERRAL http://h/] x", &r) == -2);
	CHECK(referral_parse("a NO [REFERRAL imap://u:pw@h/] x", &r) == -2);
	CHECK(referral_parse("a NO [REFERRAL imap://h:0/] x", &r) == -2);
	CHECK(referral_parse("a NO [REFERRAL imap://h:65536/] x", &r) == -2);
	CHECK(referral_parse("a NO [REFERRAL imap://h:14x/] x", &r) == -2);
	CHECK(referral_parse("a NO [REFERRAL imap://h/a%0D%0AX] x", &r) == -2);
	CHECK(referral_parse("a NO [REFERRAL imap://h/a%00] x", &r) == -2);
	CHECK(referral_parse("a NO [REFERRAL imap://h/a%4] x", &r) == -2);
	CHECK(referral_parse("a NO [REFERRAL imap://h\"x/] x", &r) == -2);
	CHECK(referral_parse("a NO [REFERRAL imap://[::1/] x", &r) == -2);
	CHECK(referral_parse("a NO [REFERRAL imap:///] x", &r) == -2);
}

/* The one host[:port] parser, as directory values use it. */
static int
hostport_is(const char *s, const char *host, const char *port)
{
	char h[256], p[8];

	if (hostport_parse(s, s + strlen(s), h, sizeof(h), p, sizeof(p)) != 0)
		return host == NULL;
	return host != NULL && strcmp(h, host) == 0 && strcmp(p, port) == 0;
}

static void
test_hostport(void)
{
	CHECK(hostport_is("mail1.example.org", "mail1.example.org", ""));
	CHECK(hostport_is("mail_1:1143", "mail_1", "1143"));
	CHECK(hostport_is("[2001:db8::1]:993", "2001:db8::1", "993"));
	CHECK(hostport_is("2001:db8::1", "2001:db8::1", ""));
	CHECK(hostport_is("h:99999", NULL, NULL));
	CHECK(hostport_is("h:", NULL, NULL));
	CHECK(hostport_is("bad host!", NULL, NULL));
	CHECK(hostport_is("[::1]x", NULL, NULL));
	CHECK(hostport_is("", NULL, NULL));
}

static int
v1(const char *line, struct proxy_header *ph)
{
	const char *why;

	return proxy_v1_parse(line, strlen(line), ph, &why);
}

static void
test_proxy_v1(void)
{
	struct proxy_header ph;
	const struct sockaddr_in *src =
	    (const struct sockaddr_in *)(const void *)&ph.src;

	CHECK(v1("PROXY TCP4 192.0.2.1 198.51.100.2 40000 143\r\n", &ph) == 0);
	CHECK(src->sin_family == AF_INET && ntohs(src->sin_port) == 40000 &&
	    ntohl(src->sin_addr.s_addr) == 0xc0000201 && !ph.local);
	CHECK(v1("PROXY TCP6 2001:db8::1 ::1 1 2\r\n", &ph) == 0);
	CHECK(ph.src.ss_family == AF_INET6);
	CHECK(v1("PROXY UNKNOWN\r\n", &ph) == 0 && ph.local);
	CHECK(v1("PROXY UNKNOWN ffff::1 ::1 1 2\r\n", &ph) == 0 && ph.local);
	CHECK(v1("PROXY TCP4 192.0.2.1 198.51.100.2 40000 143\n", &ph) != 0);
	CHECK(v1("PROXY TCP4 192.0.2.1 198.51.100.2 040000 143\r\n", &ph) != 0);
	CHECK(v1("PROXY TCP4 192.0.2.1 198.51.100.2 65536 143\r\n", &ph) != 0);
	CHECK(v1("PROXY TCP4 192.0.2.1 198.51.100.2 -1 143\r\n", &ph) != 0);
	CHECK(v1("PROXY TCP4 ::1 ::1 1 143\r\n", &ph) != 0);
	CHECK(v1("PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n", &ph) != 0);
	CHECK(v1("PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n", &ph) != 0);
	CHECK(v1("PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n", &ph) != 0);
	CHECK(v1("PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n", &ph) != 0);
}

static void
test_proxy_v2(void)
{
	unsigned char h[16 + 36] = "\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c"
	    "\xc0\x00\x02\x01\x7f\x00\x00\x01\x9c\x40\x00\x8f";
	struct proxy_header ph;
	const char *why;

	CHECK(proxy_v2_length(h, &why) == 28);
	CHECK(proxy_v2_parse(h, 28, &ph, &why) == 0 &&
	    ph.src.ss_family == AF_INET && !ph.local &&
	    ntohs(((struct sockaddr_in *)(void *)&ph.src)->sin_port) == 40000);
	CHECK(proxy_v2_parse(h, 27, &ph, &why) != 0);	/* length lies */
	h[15] = 4;					/* too short for TCP4 */
	CHECK(proxy_v2_parse(h, 20, &ph, &why) != 0);
	h[12] = 0x20;					/* LOCAL */
	CHECK(proxy_v2_parse(h, 20, &ph, &why) == 0 && ph.local);
	h[12] = 0x22;					/* no such command */
	CHECK(proxy_v2_parse(h, 20, &ph, &why) != 0);
	h[12] = 0x21;
	h[14] = 0xff;					/* over the bound */
	CHECK(proxy_v2_length(h, &why) < 0);
	h[14] = 0;
	h[0] = 'X';
	CHECK(proxy_v2_length(h, &why) < 0);
}

static void
test_cidr(void)
{
	struct cidr c[2];
	struct sockaddr_storage ss;
	struct sockaddr_in *in = (struct sockaddr_in *)(void *)&ss;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)(void *)&ss;

	CHECK(cidr_parse("10.1.0.0/15", &c[0]) == 0);
	CHECK(cidr_parse("2001:db8::/32", &c[1]) == 0);
	CHECK(cidr_parse("10.0.0.0/33", &c[0]) != 0);
	CHECK(cidr_parse("10.0.0.0/", &c[0]) != 0);
	CHECK(cidr_parse("host", &c[0]) != 0);
	CHECK(cidr_parse("10.1.0.0/15", &c[0]) == 0);
	memset(&ss, 0, sizeof(ss));
	in->sin_family = AF_INET;
	inet_pton(AF_INET, "10.1.255.1", &in->sin_addr);
	CHECK(cidr_list_match(c, 2, &ss));
	inet_pton(AF_INET, "10.2.0.1", &in->sin_addr);
	CHECK(!cidr_list_match(c, 2, &ss));
	memset(&ss, 0, sizeof(ss));
	in6->sin6_family = AF_INET6;
	inet_pton(AF_INET6, "::ffff:10.0.0.9", &in6->sin6_addr);
	CHECK(cidr_list_match(c, 2, &ss));		/* v4-mapped */
	inet_pton(AF_INET6, "2001:db8:ffff::1", &in6->sin6_addr);
	CHECK(cidr_list_match(c, 2, &ss));
	inet_pton(AF_INET6, "2001:db9::1", &in6->sin6_addr);
	CHECK(!cidr_list_match(c, 2, &ss));
}

static void
test_trace_mask(void)
{
	const char *l = "a1 LOGIN alice secret";

	CHECK(trace_credential_prefix(l, strlen(l)) == 8);
	l = "a1 authenticate PLAIN AGFsaWNl";
	CHECK(trace_credential_prefix(l, strlen(l)) == 21);
	l = "a1 AUTHENTICATE PLAIN";
	CHECK(trace_credential_prefix(l, strlen(l)) == 0);
	l = "a1 SELECT INBOX";
	CHECK(trace_credential_prefix(l, strlen(l)) == 0);
	l = "a1 LOGINX alice";
	CHECK(trace_credential_prefix(l, strlen(l)) == 0);
}

/* tmpl composed with user (len bytes) is want; want NULL: refused. */
static int
filter_is(const char *tmpl, const char *user, size_t len, const char *want)
{
	struct str out = { 0 };
	int rc = ldap_filter_compose(&out, tmpl, user, len), ok;

	ok = want == NULL ? rc == -1 :
	    rc == 0 && out.s != NULL && strcmp(out.s, want) == 0;
	str_free(&out);
	return ok;
}

static void
test_ldap_filter(void)
{
	/* RFC 4515: each special byte becomes \XX; nothing else changes. */
	CHECK(filter_is("(uid=%u)", "alice", 5, "(uid=alice)"));
	CHECK(filter_is("(uid=%u)", "*", 1, "(uid=\\2a)"));
	CHECK(filter_is("(uid=%u)", "a)(uid=*", 8,
	    "(uid=a\\29\\28uid=\\2a)"));
	CHECK(filter_is("(uid=%u)", "back\\slash", 10, "(uid=back\\5cslash)"));
	CHECK(filter_is("(uid=%u)", "a\0b", 3, "(uid=a\\00b)"));
	CHECK(filter_is("(uid=%u)", "a\r\n", 3, "(uid=a\\0d\\0a)"));
	CHECK(filter_is("(uid=%u)", "m\xc3\xbcller", 7, "(uid=m\xc3\xbcller)"));
	CHECK(filter_is("(uid=%u)", "", 0, "(uid=)"));
	/* %n and %d split at the last '@'; %% is a '%'. */
	CHECK(filter_is("(&(uid=%n)(dc=%d))", "a@b@c.org", 9,
	    "(&(uid=a@b)(dc=c.org))"));
	CHECK(filter_is("(&(uid=%n)(dc=%d))", "plain", 5,
	    "(&(uid=plain)(dc=))"));
	CHECK(filter_is("(&(uid=%n)(dc=%d))", "*@(", 3,
	    "(&(uid=\\2a)(dc=\\28))"));
	CHECK(filter_is("(x=100%%)", "u", 1, "(x=100%)"));
	CHECK(filter_is("(uid=%x)", "u", 1, NULL));
	CHECK(filter_is("(uid=%", "u", 1, NULL));
}

/* ------------------------------------------------------------------ */
/* IMAP URLs (imapurl.c) */

static int
url_is(const char *url, int server, const char *user, const char *host,
    const char *port, const char *mailbox)
{
	struct imap_url u;

	return imap_url_parse(url, strlen(url), &u) == 0 &&
	    u.has_server == server && strcmp(u.user, user) == 0 &&
	    strcmp(u.host, host) == 0 && strcmp(u.port, port) == 0 &&
	    strcmp(u.mailbox, mailbox) == 0 && u.has_mailbox == (*mailbox != 0);
}

static int
url_bad(const char *url)
{
	struct imap_url u;

	return imap_url_parse(url, strlen(url), &u) == -1;
}

static void
test_imapurl_parse(void)
{
	struct imap_url u;
	const char *full = "imap://alice;AUTH=*@imap.example.org:143/Public%20"
	    "Folders/News;UIDVALIDITY=385759045/;UID=20/;SECTION=1.2.MIME/;"
	    "PARTIAL=0.1024;EXPIRE=2026-12-01T00:00:00Z;URLAUTH=submit+bob:"
	    "INTERNAL:91354a473744909de610943775f92038";

	CHECK(imap_url_parse(full, strlen(full), &u) == 0);
	CHECK(u.has_server && strcmp(u.user, "alice") == 0 &&
	    strcmp(u.host, "imap.example.org") == 0 &&
	    strcmp(u.port, "143") == 0 && !u.relative);
	CHECK(strcmp(u.mailbox, "Public Folders/News") == 0 &&
	    u.uidvalidity == 385759045 && u.uid == 20 && u.has_section &&
	    u.has_partial && u.has_urlauth);
	CHECK(url_is("imap://h/INBOX;UIDVALIDITY=1/;UID=5", 1, "", "h", "",
	    "INBOX"));
	CHECK(url_is("IMAP://[::1]:993/a/b/;UID=5", 1, "", "::1", "993",
	    "a/b"));
	CHECK(url_is("imap://h/a/b/", 1, "", "h", "", "a/b/"));
	CHECK(url_is("imap://h", 1, "", "h", "", ""));
	CHECK(url_is("imap://h/", 1, "", "h", "", ""));
	CHECK(url_is("//u@h/Drafts/;UID=1", 1, "u", "h", "", "Drafts"));
	CHECK(url_is("/INBOX;UIDVALIDITY=9/;UID=1/;SECTION=TEXT", 0, "", "",
	    "", "INBOX"));
	CHECK(url_is("/%E2%82%AC%20x/;UID=1", 0, "", "", "",
	    "\xe2\x82\xac x"));
	CHECK(url_is("/INBOX?SUBJECT%20x", 0, "", "", "", "INBOX"));
	CHECK(url_is("imap://h/INBOX;URLAUTH=anonymous", 1, "", "h", "",
	    "INBOX"));
	/* relative, the selected mailbox's */
	CHECK(imap_url_parse(";UID=3", 6, &u) == 0 && u.relative &&
	    u.uid == 3 && !u.has_mailbox);
	CHECK(imap_url_parse(";UID=3/;SECTION=1", 17, &u) == 0 &&
	    u.relative && u.has_section);
	CHECK(imap_url_parse(";SECTION=HEADER", 15, &u) == 0 && u.relative);
	CHECK(imap_url_parse(";PARTIAL=10", 11, &u) == 0 && u.relative);
	/* not IMAP URLs, or not ones imapfe can place */
	CHECK(url_bad(""));
	CHECK(url_bad("http://h/INBOX"));
	CHECK(url_bad("imap:/INBOX"));
	CHECK(url_bad("INBOX/;UID=1"));		/* relative to a name */
	CHECK(url_bad("sub;UIDVALIDITY=1/;UID=1"));
	CHECK(url_bad("imap://u:pw@h/INBOX"));
	CHECK(url_bad("imap://u;x=y@h/INBOX"));
	CHECK(url_bad("imap://h:0/INBOX"));
	CHECK(url_bad("imap://h:70000/INBOX"));
	CHECK(url_bad("imap://h/IN BOX"));
	CHECK(url_bad("imap://h/INBOX#frag"));
	CHECK(url_bad("imap://h/a%0D%0Ab/;UID=1"));
	CHECK(url_bad("imap://h/a%00/;UID=1"));
	CHECK(url_bad("imap://h/a%2/;UID=1"));
	CHECK(url_bad("imap://h/INBOX/;UID=0"));
	CHECK(url_bad("imap://h/INBOX/;UID=4294967296"));
	CHECK(url_bad("imap://h/INBOX/;UID=1x"));
	CHECK(url_bad("imap://h/INBOX;UIDVALIDITY=/;UID=1"));
	CHECK(url_bad("imap://h/INBOX/;UID=1/;PARTIAL=1.0"));
	CHECK(url_bad("imap://h/INBOX/;UID=1;FOO=1"));
	CHECK(url_bad("imap://h/INBOX/;UID=1;EXPIRE=x"));
	CHECK(url_bad("imap://h/INBOX/;UID=1;URLAUTH="));
	CHECK(url_bad(";UIDVALIDITY=1/;UID=1"));
	CHECK(url_bad("imap://[::1/INBOX"));
}

/* The router's view for the tests: "Public Folders/" on server 1. */
static int
test_mailbox_server(void *ctx, const char *name, size_t len)
{
	static const char pfx[] = "Public Folders";

	(void)ctx;
	return len >= sizeof(pfx) - 1 && memcmp(name, pfx, sizeof(pfx) - 1) ==
	    0 && (len == sizeof(pfx) - 1 || name[sizeof(pfx) - 1] == '/');
}

static void
url_route_for_test(struct url_route *ur, struct config *cfg, int selected,
    int server)
{
	memset(ur, 0, sizeof(*ur));
	ur->mailbox_server = test_mailbox_server;
	ur->cfg = cfg;
	ur->user = "alice";
	ur->home_host = "home.example.org";
	ur->home_port = "143";
	ur->selected = selected;
	ur->server = server;
}

static int
append_ok(int selected, int server, const char *args)
{
	struct config cfg = { 0 };
	struct url_route ur;

	url_route_for_test(&ur, &cfg, selected, server);
	return url_append_check(&ur, args, strlen(args)) == 0;
}

/* An APPEND refused, naming bad in BADURL. */
static int
append_refused(int selected, int server, const char *args, const char *bad)
{
	struct config cfg = { 0 };
	struct url_route ur;

	url_route_for_test(&ur, &cfg, selected, server);
	return url_append_check(&ur, args, strlen(args)) == -1 &&
	    ur.refused && strcmp(ur.bad, bad) == 0;
}

static void
test_imapurl_route(void)
{
	struct config cfg = { 0 };
	struct route bob = { .pattern = "bob", .host = "HOME.example.org",
	    .port = "143" }, carol = { .pattern = "carol", .host = "other",
	    .port = "143" };
	struct url_route ur;
	char out[64];

	bob.next = &carol;
	cfg.routes = &bob;
	url_route_for_test(&ur, &cfg, 1, -1);
	CHECK(url_server(&ur, "/INBOX/;UID=1", 13) == 0);
	CHECK(url_server(&ur, "/Public%20Folders/News/;UID=1", 29) == 1);
	CHECK(url_server(&ur, "/Public%20Folders/;UID=1", 24) == 1);
	CHECK(url_server(&ur, ";UID=1", 6) == 1);	/* the selected */
	ur.selected = -1;
	CHECK(url_server(&ur, ";UID=1", 6) == -1);
	CHECK(url_server(&ur, "imap://h/", 9) == -1);	/* no mailbox */
	/* another user's mailbox: at home only where routes say so */
	CHECK(url_server(&ur, "imap://alice@h/INBOX/;UID=1", 27) == 0);
	CHECK(url_server(&ur, "imap://bob@h/INBOX/;UID=1", 25) == 0);
	CHECK(url_server(&ur, "imap://carol@h/INBOX/;UID=1", 27) == -1);
	CHECK(url_server(&ur, "imap://dave@h/INBOX/;UID=1", 26) == -1);
	CHECK(url_server(&ur, "imap://dave@h/Public%20Folders/x/;UID=1",
	    39) == 1);

	/* UTF-8 in a URL, modified UTF-7 in a prefix: not compared */
	CHECK(url_server(&ur, "/%C3%A9t%C3%A9/;UID=1", 21) == 0);
	bob.pattern = "&AMk-t&AOk-/";	/* "été/" */
	cfg.publics = &bob;
	CHECK(url_server(&ur, "/%C3%A9t%C3%A9/;UID=1", 21) == -1);
	CHECK(url_server(&ur, "/INBOX/;UID=1", 13) == 0);
	cfg.publics = NULL;
	bob.pattern = "bob";

	/* CATENATE parts, whole or in pieces after a streamed literal */
	CHECK(append_ok(-1, 0, " CATENATE (URL \"/INBOX;UIDVALIDITY=1/;UID=2\""
	    " TEXT {3}\r\nabc)\r\n"));
	CHECK(append_ok(-1, 0, " (\\Seen) \"1-Jan-2026 00:00:00 +0000\" "
	    "CATENATE (TEXT {3}\r\nabc URL imap://h/Drafts/;UID=2)\r\n"));
	CHECK(append_ok(0, 0, " CATENATE (URL {6}\r\n;UID=1)\r\n"));
	CHECK(append_ok(-1, 1, " CATENATE (URL \"/Public%20Folders/News/;UID="
	    "1\")\r\n"));
	CHECK(append_refused(-1, 0, " CATENATE (URL \"/Public%20Folders/News/"
	    ";UID=1\")\r\n", "/Public%20Folders/News/;UID=1"));
	CHECK(append_refused(1, 0, " CATENATE (TEXT {1}\r\nx URL \";UID=1\")"
	    "\r\n", ";UID=1"));
	CHECK(append_refused(-1, 0, " CATENATE (URL \"sub/;UID=1\")\r\n",
	    "sub/;UID=1"));
	/* a message, no URL: nothing to check, literal contents unread */
	CHECK(append_ok(-1, 0, " (URL) {24}\r\nCATENATE (URL \"imap://x\")"
	    "\r\n"));
	CHECK(append_ok(-1, 0, " {100000}\r\n"));	/* to stream */
	CHECK(append_ok(-1, 0, " CATENATE (TEXT {100000}\r\n"));
	/* the piece after a streamed TEXT literal, still in the list */
	CHECK(append_ok(-1, 0, " URL \"/INBOX/;UID=1\")\r\n"));
	CHECK(append_refused(-1, 0, " URL \"/Public%20Folders/x/;UID=1\")\r\n",
	    "/Public%20Folders/x/;UID=1"));
	/* after a streamed message of a MULTIAPPEND, another message */
	CHECK(append_refused(-1, 0, " (\\Seen) CATENATE (URL \"/Public%20Fol"
	    "ders/x/;UID=1\")\r\n", "/Public%20Folders/x/;UID=1"));
	CHECK(append_ok(-1, 0, ") {5}\r\nhello\r\n"));
	/* a URL literal still to stream cannot be checked: refused */
	CHECK(append_refused(-1, 0, " CATENATE (URL {100000}\r\n", "-"));
	/* the first bad URL is named, sanitized for resp-text-code */
	CHECK(append_refused(-1, 0, " CATENATE (URL \"a]b\" URL \"/Public%20"
	    "Folders/x/;UID=1\")\r\n", "a%5Db"));

	/* lists open where a command is cut before a streamed literal */
	CHECK(args_open_lists("a APPEND x CATENATE (TEXT ", 26) == 1);
	CHECK(args_open_lists("a APPEND \"(\" (\\Seen) ", 21) == 0);
	CHECK(args_open_lists("a\0(", 3) == 1);	/* odd bytes are atoms */
	CHECK(args_open_lists("a APPEND x {3}\r\n(((", 20) == 0);
	CHECK(args_open_lists("a APPEND x {3}\r\n))) CATENATE (", 30) == 1);

	url_badurl_text(out, sizeof(out), "x\r\n]", 4);
	CHECK(strcmp(out, "x%0D%0A%5D") == 0);
	url_badurl_text(out, 8, "0123456789", 10);
	CHECK(strlen(out) < 8);
}

static int
urlcmd_server(const char *text, int selected, char *bad, size_t badsize)
{
	struct config cfg = { 0 };
	struct command *c = malloc(sizeof(*c));
	struct url_route ur;
	char *b;
	int rc = -2;

	url_route_for_test(&ur, &cfg, selected, -1);
	if (parse(text, strlen(text), c, &b) == PARSE_OK)
		rc = url_command_server(&ur, c);
	snprintf(bad, badsize, "%s", ur.refused ? ur.bad : "");
	free(b);
	free(c);
	return rc;
}

static void
test_imapurl_commands(void)
{
	char bad[1024];

	CHECK(url_command("URLFETCH") && url_command("GENURLAUTH") &&
	    !url_command("APPEND"));
	CHECK(urlcmd_server("a URLFETCH imap://h/INBOX/;UID=1;URLAUTH=anonymous"
	    ":INTERNAL:0123456789abcdef0123456789abcdef", -1, bad,
	    sizeof(bad)) == 0);
	CHECK(urlcmd_server("a URLFETCH \"imap://h/Public%20Folders/a/;UID=1\" "
	    "\"imap://h/Public%20Folders/b/;UID=2\"", -1, bad, sizeof(bad)) ==
	    1);
	CHECK(urlcmd_server("a URLFETCH (\"imap://h/INBOX/;UID=1\" BINARY "
	    "BODYPARTSTRUCTURE) imap://h/Drafts/;UID=2", -1, bad,
	    sizeof(bad)) == 0);
	CHECK(urlcmd_server("a URLFETCH imap://h/INBOX/;UID=1 \"imap://h/"
	    "Public%20Folders/a/;UID=1\"", -1, bad, sizeof(bad)) == -1 &&
	    strcmp(bad, "imap://h/Public%20Folders/a/;UID=1") == 0);
	CHECK(urlcmd_server("a GENURLAUTH \"imap://h/Public%20Folders/a/;UID=1"
	    ";URLAUTH=anonymous\" INTERNAL", -1, bad, sizeof(bad)) == 1);
	CHECK(urlcmd_server("a GENURLAUTH \"imap://h/INBOX/;UID=1;URLAUTH="
	    "anonymous\" INTERNAL \"imap://h/Public%20Folders/a/;UID=1;"
	    "URLAUTH=anonymous\" INTERNAL", -1, bad, sizeof(bad)) == -1 &&
	    strncmp(bad, "imap://h/Public", 15) == 0);
	CHECK(urlcmd_server("a URLFETCH", -1, bad, sizeof(bad)) == -1);
	CHECK(urlcmd_server("a URLFETCH ;UID=1", 1, bad, sizeof(bad)) == 1);
	CHECK(urlcmd_server("a URLFETCH garbage", 1, bad, sizeof(bad)) == -1 &&
	    strcmp(bad, "garbage") == 0);
}

/* state.c: the shared tables, on a file of the test's own */

static struct sockaddr_storage
addr_of(const char *text)
{
	struct sockaddr_storage ss;

	memset(&ss, 0, sizeof(ss));
	if (strchr(text, ':') != NULL) {
		ss.ss_family = AF_INET6;
		inet_pton(AF_INET6, text,
		    &((struct sockaddr_in6 *)(void *)&ss)->sin6_addr);
	} else {
		ss.ss_family = AF_INET;
		inet_pton(AF_INET, text,
		    &((struct sockaddr_in *)(void *)&ss)->sin_addr);
	}
	return ss;
}

static void
state_test_config(struct config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->auth_penalty = 1;
	cfg->auth_penalty_first = 100;
	cfg->auth_penalty_max = 400;
	cfg->client_ipv6_prefix = 64;
	cfg->connect_timeout = 10;
	cfg->backend_down_time = 10;
}

static void
test_state_penalty(const char *path)
{
	struct config cfg;
	struct shared_state *st = state_open(path, (uid_t)-1, (gid_t)-1);
	struct sockaddr_storage a = addr_of("192.0.2.1"),
	    b = addr_of("192.0.2.2"), v6 = addr_of("2001:db8:1:2::1"),
	    v6same = addr_of("2001:db8:1:2:ffff::9"),
	    v6other = addr_of("2001:db8:1:3::1"), mapped, v4;
	struct credentials cr = { .user = "u", .user_len = 1, .pass = "p",
	    .pass_len = 1 };
	uint16_t p1 = state_password_print(st, &cr), p2;
	int64_t w;

	state_test_config(&cfg);
	cr.pass = "q";
	p2 = state_password_print(st, &cr);
	CHECK(p1 != 0 && p2 != 0 && p1 != p2);
	CHECK(state_penalty_ms(st, &cfg, &a) == 0);
	CHECK(state_login_failed(st, &cfg, &a, p1) == 100);
	w = state_penalty_ms(st, &cfg, &a);
	CHECK(w > 90 && w <= 100);
	CHECK(state_penalty_ms(st, &cfg, &b) == 0);
	/* the same password again: no change; others double to the cap */
	CHECK(state_login_failed(st, &cfg, &a, p1) == -1);
	CHECK(state_login_failed(st, &cfg, &a, p2) == 200);
	CHECK(state_login_failed(st, &cfg, &a, 0) == 400);
	CHECK(state_login_failed(st, &cfg, &a, 0) == 400);
	state_login_ok(st, &cfg, &a);
	CHECK(state_penalty_ms(st, &cfg, &a) == 0);
	/* IPv6 by its /64 */
	CHECK(state_login_failed(st, &cfg, &v6, 0) == 100);
	CHECK(state_penalty_ms(st, &cfg, &v6same) > 0);
	CHECK(state_penalty_ms(st, &cfg, &v6other) == 0);
	/* an IPv4 client on a dual-stack socket is the IPv4 address */
	mapped = addr_of("::ffff:192.0.2.77");
	v4 = addr_of("192.0.2.77");
	CHECK(state_login_failed(st, &cfg, &mapped, 0) == 100);
	CHECK(state_penalty_ms(st, &cfg, &v4) > 0);
	/* off, or an exempt address */
	cfg.auth_penalty = 0;
	CHECK(state_penalty_ms(st, &cfg, &v6) == 0);
	cfg.auth_penalty = 1;
	/* a full table forgets its oldest: b first, then 4096 others */
	CHECK(state_login_failed(st, &cfg, &b, 0) == 100);
	usleep(5000);		/* b is older than the rest by a clock tick */
	for (unsigned i = 0; i < 4096; i++) {
		struct sockaddr_in *in = (struct sockaddr_in *)(void *)&a;

		in->sin_addr.s_addr = htonl(0x0a000000u + i);
		state_login_failed(st, &cfg, &a, 0);
	}
	CHECK(state_penalty_ms(st, &cfg, &b) == 0);
	CHECK(state_penalty_ms(st, &cfg, &a) > 0);
	state_close(st);
}

static void
test_state_sessions(const char *path)
{
	struct config cfg;
	struct shared_state *st = state_open(path, (uid_t)-1, (gid_t)-1);
	struct sockaddr_storage a = addr_of("192.0.2.1");
	pid_t child;
	int status;

	state_test_config(&cfg);
	cfg.max_sessions_per_ip = 2;
	cfg.max_sessions_per_user = 1;
	/* a process that counted itself and died is not counted */
	if ((child = fork()) == 0) {
		struct shared_state *cs = state_open(path, (uid_t)-1,
		    (gid_t)-1);

		_exit(state_session_begin(cs, &cfg, &a) == STATE_ADMITTED ?
		    0 : 1);
	}
	CHECK(child > 0 && waitpid(child, &status, 0) == child &&
	    WIFEXITED(status) && WEXITSTATUS(status) == 0);
	CHECK(state_session_begin(st, &cfg, &a) == STATE_ADMITTED);
	CHECK(state_session_begin(st, &cfg, &a) == STATE_ADMITTED);
	CHECK(state_session_begin(st, &cfg, &a) == STATE_REFUSED);
	CHECK(state_session_user(st, &cfg, "alice", 5) == STATE_ADMITTED);
	CHECK(state_session_user(st, &cfg, "alice", 5) == STATE_REFUSED);
	CHECK(state_session_user(st, &cfg, "bob", 3) == STATE_ADMITTED);
	state_session_end(st);
	state_close(st);
}

static void
test_state_servers(const char *path)
{
	struct config cfg;
	struct shared_state *st = state_open(path, (uid_t)-1, (gid_t)-1);
	int64_t since;

	state_test_config(&cfg);
	CHECK(state_backend_may_try(st, &cfg, "mx", "143", 0, &since) == 1);
	state_backend_failed(st, &cfg, "mx", "143", 0);
	/* a refusal: skipped while there is another, tried as the last */
	CHECK(state_backend_may_try(st, &cfg, "mx", "143", 0, &since) == 0);
	CHECK(state_backend_may_try(st, &cfg, "mx", "143", 1, &since) == 1);
	CHECK(since >= 0 && since < 1000);
	/* a timeout: skipped even as the last */
	state_backend_failed(st, &cfg, "mx", "143", 1);
	CHECK(state_backend_may_try(st, &cfg, "mx", "143", 1, &since) == 0);
	CHECK(state_backend_may_try(st, &cfg, "mx", "993", 0, &since) == 1);
	CHECK(state_backend_up(st, &cfg, "mx", "143") == 1);
	CHECK(state_backend_may_try(st, &cfg, "mx", "143", 0, &since) == 1);
	CHECK(state_backend_up(st, &cfg, "mx", "143") == 0);
	state_close(st);
}

/* Whatever the file holds, every call answers as if nothing were known. */
static void
test_state_fail_open(const char *path)
{
	struct config cfg;
	struct shared_state *st;
	struct sockaddr_storage a = addr_of("192.0.2.1");
	char junk[4096];
	int64_t since;
	int fd;

	state_test_config(&cfg);
	cfg.max_sessions_per_ip = 1;
	memset(junk, 'x', sizeof(junk));
	fd = open(path, O_WRONLY | O_TRUNC);
	CHECK(fd >= 0 && write(fd, junk, sizeof(junk)) == sizeof(junk));
	close(fd);
	st = state_open(path, (uid_t)-1, (gid_t)-1);
	CHECK(st != NULL);
	CHECK(state_login_failed(st, &cfg, &a, 0) == -1);
	CHECK(state_penalty_ms(st, &cfg, &a) == 0);
	CHECK(state_session_begin(st, &cfg, &a) == STATE_ADMITTED);
	CHECK(state_session_begin(st, &cfg, &a) == STATE_ADMITTED);
	CHECK(state_backend_may_try(st, &cfg, "mx", "143", 0, &since) == 1);
	state_close(st);
	CHECK(state_penalty_ms(NULL, &cfg, &a) == 0);

	/* made anew, then cut short while mapped: no fault, no penalty */
	unlink(path);
	st = state_open(path, (uid_t)-1, (gid_t)-1);
	CHECK(state_login_failed(st, &cfg, &a, 0) == 100);
	CHECK(truncate(path, 100) == 0);
	CHECK(state_penalty_ms(st, &cfg, &a) == 0);
	CHECK(state_login_failed(st, &cfg, &a, 0) == -1);
	state_close(st);
	unlink(path);
}

static void
test_state(void)
{
	char path[] = "/tmp/imapfe-unit-state-XXXXXX";
	int fd = mkstemp(path);

	CHECK(fd >= 0);
	close(fd);		/* empty: state_open makes it a state file */
	test_state_penalty(path);
	test_state_sessions(path);
	test_state_servers(path);
	test_state_fail_open(path);
}

int
main(void)
{
	test_parser();
	test_literal_at_end();
	test_quoting();
	test_base64();
	test_plain();
	test_plain_response();
	test_bearer();
	test_caps();
	test_scanner();
	test_resp_status();
	test_appenduid();
	test_fetch_section();
	test_dispatch();
	test_cmd_read_literals();
	test_cmd_read_limits();
	test_cmd_read_end();
	test_sanitize();
	test_referral();
	test_hostport();
	test_proxy_v1();
	test_proxy_v2();
	test_cidr();
	test_trace_mask();
	test_ldap_filter();
	test_imapurl_parse();
	test_imapurl_route();
	test_imapurl_commands();
	test_state();
	printf("%d passed, %d failed\n", passed, failed);
	return failed == 0 ? 0 : 1;
}
