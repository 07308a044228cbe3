/*
 * Routing policy, for sessions after login when public-folder or referral
 * servers are configured: which server each client command goes to, and
 * what the commands that span servers become.  The engine (engine.c) has
 * read the command at the grammar level; the links (link.c) carry it to
 * its server and stream the answers back, literals included, never
 * buffered whole.
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include "engine.h"

/* ------------------------------------------------------------------ */
/* mailbox names and the servers that own them */

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
mailbox_link(const struct engine *eng, const char *name, size_t len)
{
	size_t best = 0;
	int owner = 0;

	for (int i = 1; i < eng->npublic; i++) {
		const char *p = eng->links[i].route->pattern;
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
listed_name_wanted(struct engine *eng, int self, const struct token *t)
{
	int owner = mailbox_link(eng, t->s, t->len);
	struct link *o = &eng->links[owner];

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
 * In a LIST being merged: does the untagged response at p (len bytes, whole,
 * literals and all, its final CRLF removed) go to the client from link l?
 * A LIST, LSUB or LIST-STATUS response is parsed; anything else, or one
 * that does not parse, passes.
 */
static int
list_response_wanted(struct engine *eng, struct link *l, const char *p,
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
	    !listed_name_wanted(eng, (int)(l - eng->links), name))
		wanted = 0;
	str_free(&copy);
	free(c);
	return wanted;
}

static enum sink_verdict
list_line(struct engine *eng, struct link *l, const char *line, size_t len)
{
	return list_response_wanted(eng, l, line, len) ? SINK_KEEP : SINK_DROP;
}

/*
 * A LIST or LSUB over several servers: a server's LIST, LSUB and
 * LIST-STATUS responses go only for names it owns, a public server's
 * under its prefix (it has an INBOX and more of its own to hide), the
 * home server's outside every prefix.
 */
static const struct resp_filter list_filter = { list_line,
    TAGGED_LINE_MAX };

static int rewrite_namespace(struct engine *, const char *, size_t,
    struct str *);
static int rewrite_capability(struct engine *, const char *, size_t,
    struct str *);

static int
starts_with(const char *line, size_t len, const char *word)
{
	size_t wl = strlen(word);

	return len > wl && strncasecmp(line, word, wl) == 0;
}

/* A response line that the router writes on itself, rewritten. */
static enum sink_verdict
rewritten(struct engine *eng, const char *line, size_t len,
    int (*rewrite)(struct engine *, const char *, size_t, struct str *))
{
	struct str out = { 0 };
	int rc;

	rc = rewrite(eng, line, len, &out) != 0 || str_add(&out, "\r\n", 2) !=
	    0 ? -1 : client_write(eng, out.s, out.len);
	str_free(&out);
	return rc == 0 ? SINK_DROP : SINK_FAIL;
}

static enum sink_verdict
namespace_line(struct engine *eng, struct link *l, const char *line,
    size_t len)
{
	(void)l;
	if (starts_with(line, len, "* NAMESPACE "))
		return rewritten(eng, line, len, rewrite_namespace);
	return SINK_KEEP;
}

static enum sink_verdict
capability_line(struct engine *eng, struct link *l, const char *line,
    size_t len)
{
	(void)l;
	if (starts_with(line, len, "* CAPABILITY "))
		return rewritten(eng, line, len, rewrite_capability);
	return SINK_KEEP;
}

/* The home server's NAMESPACE and CAPABILITY, rewritten on their way. */
static const struct resp_filter namespace_filter = { namespace_line, 0 };
static const struct resp_filter capability_filter = { capability_line, 0 };

/* ------------------------------------------------------------------ */
/* what goes where */

/*
 * Parse a copy of the command (the parser writes into its buffer, and the
 * original bytes are what the back-end gets).  For a command whose literal
 * streams, the part before that literal is what there is to parse.
 */
static enum parse_status
parse_copy(struct engine *eng, struct str *copy, struct command *c,
    const char **why)
{
	size_t len = eng->send_len;

	if (eng->cb.stream_left > 0) {
		const char *open = memrchr(eng->cb.text.s, '{', len);

		len = open != NULL ? (size_t)(open - eng->cb.text.s) : 0;
	} else
		len -= 2;		/* the final CRLF */
	while (len > 0 && eng->cb.text.s[len - 1] == ' ')
		len--;
	str_wipe(copy);
	if (str_add(copy, eng->cb.text.s, len) != 0)
		return PARSE_NOTAG;
	/* a literal that streams inside a list: the lists closed, to parse */
	for (size_t n = eng->cb.stream_left > 0 ? args_open_lists(copy->s,
	    copy->len) : 0; n > 0; n--)
		if (str_add(copy, ")", 1) != 0)
			return PARSE_NOTAG;
	if (str_add(copy, "", 1) != 0)
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

/*
 * Commands whose first argument is a mailbox name (GETMETADATA's after
 * its options; METADATA's "" is the server's own, the home server's).
 */
static int
names_mailbox(const char *name)
{
	static const char *const names[] = { "SELECT", "EXAMINE", "STATUS",
	    "CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE", "APPEND",
	    "GETACL", "SETACL", "DELETEACL", "MYRIGHTS", "LISTRIGHTS",
	    "GETQUOTAROOT", "GETMETADATA", "SETMETADATA", "RESETKEY" };

	for (size_t i = 0; i < sizeof(names) / sizeof(*names); i++)
		if (strcmp(name, names[i]) == 0)
			return 1;
	return 0;
}

/*
 * Leave the selected mailbox before selecting on another server.  The new
 * server has nothing to close, so a QRESYNC client hears [CLOSED] from
 * imapfe (RFC 7162 3.2.11), as it would from one server.
 */
static void
leave_selected(struct engine *eng)
{
	int i = eng->selected;

	if (eng->links[i].up)
		link_unselect(eng, i);
	eng->selected = -1;
	if (eng->enabled != NULL && strcasestr(eng->enabled, "QRESYNC") != NULL)
		client_line(eng, "* OK [CLOSED] Previous mailbox closed.");
}

/* ------------------------------------------------------------------ */
/* mailbox referrals (RFC 2193) */

/* Where the mailbox argument t ends in the command as the client sent it. */
static size_t
raw_token_end(const struct engine *eng, const struct str *copy,
    const struct token *t)
{
	size_t at = (size_t)(t->s - copy->s);

	if (t->type != TOK_QUOTED)
		return at + t->len;
	for (; at < eng->send_len; at++) {	/* from the opening quote on */
		if (eng->cb.text.s[at] == '\\')
			at++;
		else if (eng->cb.text.s[at] == '"')
			return at + 1;
	}
	return eng->send_len;
}

/* The link for a server reached by referral: its open one, or a new one. */
static int
referral_link(struct engine *eng, const struct route *r)
{
	for (int i = 1; i < eng->nlinks; i++)
		if (eng->links[i].route == r)
			return i;
	if (eng->nlinks == eng->maxlinks)
		return -1;
	link_init(&eng->links[eng->nlinks], r);
	return eng->nlinks++;
}

static int
is_home(const struct engine *eng, const struct route *r)
{
	const struct backend *be = eng->links[0].be;

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
referral_unfollowable(const struct engine *eng, const struct referral *ref,
    const struct route *r)
{
	if (ref->mailbox[0] == '\0' || !printable_ascii(ref->mailbox))
		return "no mailbox name, or not ASCII";
	if (eng->cb.ncuts > 0 || eng->cb.stream_left > 0)
		return "the command carries a literal";
	if (is_home(eng, r))
		return "loop";
	return NULL;
}
/* Run the command on link j for the mailbox a referral names. */
static enum reply_status
run_referred(struct engine *eng, const struct command *c, size_t name_end,
    int j, const char *mailbox, struct reply *r)
{
	struct str cmd = { 0 };
	enum reply_status rs = REPLY_LOST;

	if (str_printf(&cmd, "%s %s ", c->tag, c->name) == 0 &&
	    imap_append_string(&cmd, mailbox, strlen(mailbox), 0) == 0 &&
	    str_add(&cmd, eng->cb.text.s + name_end, eng->send_len - name_end) == 0)
		rs = run_text_on_link(eng, j, c->tag, &cmd, r);
	else {
		engine_bye(eng, END_LIMIT, "Out of memory.");
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
follow_mailbox_referral(struct engine *eng, const struct command *c,
    size_t name_end, int *at, struct reply *r)
{
	const struct route *tried[REFERRAL_HOPS_MAX + 1] = {
	    eng->links[*at].route };
	enum reply_status rs = r->status;
	int hops = 0;

	while (rs == REPLY_NO && r->code == CODE_REFERRAL) {
		const struct route *next;
		struct referral ref;
		const char *why;
		int j;

		if ((next = referral_target(eng->cfg, r->line, &ref,
		    eng->user)) == NULL)
			break;
		if ((why = referral_unfollowable(eng, &ref, next)) != NULL) {
			referral_refused(eng->user, &ref, why);
			break;
		}
		if (!referral_allowed(eng->cfg, tried, hops, next, &ref,
		    eng->user))
			break;
		if ((j = referral_link(eng, next)) < 0) {
			referral_refused(eng->user, &ref, "too many servers "
			    "reached by referral");
			break;
		}
		if (link_up(eng, j) != 0) {
			client_line(eng, "%s NO [UNAVAILABLE] The server "
			    "holding this mailbox is unavailable.", c->tag);
			return REPLY_LOST;
		}
		log_msg(LOG_INFO, "event=referral kind=mailbox user=\"%s\" "
		    "to=%s:%s", eng->user, next->host, next->port);
		rs = run_referred(eng, c, name_end, j, ref.mailbox, r);
		tried[++hops] = next;
		*at = j;
	}
	return rs;
}

/* ------------------------------------------------------------------ */
/* IMAP URLs in commands: where they point is imapurl.c's to say */

static int
url_mailbox_link(void *ctx, const char *name, size_t len)
{
	return mailbox_link(ctx, name, len);
}

/* What imapurl.c needs to place URLs for a command run on link server. */
static void
url_route_init(struct engine *eng, struct url_route *ur, int server)
{
	memset(ur, 0, sizeof(*ur));
	ur->mailbox_server = url_mailbox_link;
	ur->ctx = eng;
	ur->cfg = eng->cfg;
	if (eng->cr != NULL)
		ur->user = eng->cr->authzid != NULL ? eng->cr->authzid :
		    eng->cr->user;
	ur->home_host = eng->links[0].be->host;
	ur->home_port = eng->links[0].be->port;
	ur->selected = eng->selection_lost ? -1 : eng->selected;
	ur->server = server;
}

static void
client_badurl(struct engine *eng, const char *tag, const struct url_route *ur)
{
	client_line(eng, "%s NO [BADURL %s] The URL does not name a mailbox on "
	    "the server that runs this command.", tag, ur->bad);
}

/*
 * URLFETCH and GENURLAUTH run on the server of their URLs' mailboxes,
 * when that is one server.
 */
static void
cmd_urls(struct engine *eng, const struct command *c)
{
	struct url_route ur;
	int i;

	url_route_init(eng, &ur, -1);
	if ((i = url_command_server(&ur, c)) < 0)
		client_badurl(eng, c->tag, &ur);
	else if (i == 0 || !link_unavailable(eng, i, c->tag))
		run_on_link(eng, i, c->tag, NULL);
}

/* ------------------------------------------------------------------ */
/* commands */

/* A command for the mailbox on link i (SELECT and friends included). */
static void
cmd_mailbox(struct engine *eng, const struct command *c, int i,
    size_t name_end)
{
	int selecting = strcmp(c->name, "SELECT") == 0 ||
	    strcmp(c->name, "EXAMINE") == 0;
	int append = strcmp(c->name, "APPEND") == 0;
	struct url_route ur;
	struct reply *r;
	enum reply_status rs;

	if (append) {
		/* CATENATE's URLs (those read so far) must point at link i */
		url_route_init(eng, &ur, i);
		if (url_append_check(&ur, eng->cb.text.s + name_end,
		    eng->send_len - name_end) != 0) {
			client_badurl(eng, c->tag, &ur);
			return;
		}
	}

	if (selecting) {
		/* Even a failed SELECT leaves nothing selected (RFC 9051). */
		if (eng->selected >= 0 && (eng->selected != i ||
		    eng->selection_lost))
			leave_selected(eng);
		eng->selection_lost = 0;
	}
	if (i > 0 && link_unavailable(eng, i, c->tag))
		return;
	if ((r = malloc(sizeof(*r))) == NULL) {
		engine_bye(eng, END_LIMIT, "Out of memory.");
		return;
	}
	eng->urls = append ? &ur : NULL;
	rs = run_on_link(eng, i, c->tag, r);
	eng->urls = NULL;
	if (append && ur.refused && rs != REPLY_LOST) {
		client_badurl(eng, c->tag, &ur);
		rs = REPLY_LOST;	/* answered */
	}
	if (rs == REPLY_NO && !append)
		rs = follow_mailbox_referral(eng, c, name_end, &i, r);
	if (rs != REPLY_LOST)
		client_reply(eng, r);
	if (selecting)
		eng->selected = rs == REPLY_OK ? i : -1;
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
list_needs(const struct engine *eng, const struct command *c, int i)
{
	size_t ref, first, end, plen;
	char pat[1024];

	if (list_arguments(c, &ref, &first, &end) != 0)
		return 1;
	for (size_t k = first; k < end; k++) {
		int inside = 0;

		plen = list_pattern(c, ref, k, pat, sizeof(pat));
		if (i > 0 && pattern_reaches(pat, plen,
		    eng->links[i].route->pattern))
			return 1;
		for (int j = 1; i == 0 && j < eng->npublic; j++)
			if (pattern_inside(pat, plen,
			    eng->links[j].route->pattern))
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
 * (list_filter): the client sees every mailbox once and one tagged
 * answer, the home server's when it took part.
 */
static void
cmd_list(struct engine *eng, const struct command *c)
{
	struct reply *r = malloc(2 * sizeof(*r)), *answer = r + 1;
	int home = list_needs(eng, c, 0);
	enum reply_status rs;

	if (r == NULL) {
		engine_bye(eng, END_LIMIT, "Out of memory.");
		return;
	}
	answer->status = REPLY_LOST;
	for (int i = 1; i < eng->npublic; i++) {
		struct link *l = &eng->links[i];

		l->root = ROOT_UNASKED;
		if (!list_needs(eng, c, i))
			continue;
		if (link_up(eng, i) != 0) {
			client_line(eng, "* NO [UNAVAILABLE] The server for "
			    "\"%s\" is unavailable.", l->route->pattern);
			continue;
		}
		eng->merging = 1;
		rs = run_on_link_as(eng, i, c->tag, &list_filter, r);
		eng->merging = 0;
		if (eng->end != END_NONE)
			goto out;
		if (rs == REPLY_OK && l->root == ROOT_UNASKED &&
		    !lists_subscriptions(c))
			l->root = ROOT_MISSING;
		if (rs != REPLY_LOST)
			*answer = *r;
	}
	if (home && run_on_link_as(eng, 0, c->tag, &list_filter, answer) ==
	    REPLY_LOST)
		goto out;
	if (answer->status != REPLY_LOST)
		client_reply(eng, answer);
	else
		client_line(eng, "%s NO [UNAVAILABLE] The public folder servers "
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

/*
 * The public link whose prefix a namespace description names: the same
 * prefix, or the same root with another delimiter ("Public Folders." for
 * "Public Folders/"), for LIST shows that root once, the public
 * server's.  0 for none.
 */
static int
namespace_owner(const struct engine *eng, const struct token *t)
{
	for (int i = 1; i < eng->npublic; i++) {
		const char *p = eng->links[i].route->pattern;
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
append_shared_namespaces(struct engine *eng, const struct command *c,
    size_t at, struct str *out)
{
	char *shown = calloc((size_t)eng->npublic, 1);
	int rc = -1;

	if (shown == NULL || str_adds(out, "(") != 0)
		goto out;
	for (size_t j = at + 1; c->tok[at].type == TOK_LPAREN &&
	    j < c->ntok && c->tok[j].type == TOK_LPAREN;) {
		size_t next = token_group_end(c, j);
		int owner = j + 1 < next && is_mailbox_token(&c->tok[j + 1]) ?
		    namespace_owner(eng, &c->tok[j + 1]) : 0;

		if (owner == 0 && append_tokens(out, c->tok, j, next) != 0)
			goto out;
		if (owner > 0 && !shown[owner] && append_public_namespace(out,
		    eng->links[owner].route->pattern) != 0)
			goto out;
		if (owner > 0)
			shown[owner] = 1;
		j = next;
	}
	for (int i = 1; i < eng->npublic; i++)
		if (!shown[i] && append_public_namespace(out,
		    eng->links[i].route->pattern) != 0)
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
rewrite_namespace(struct engine *eng, const char *line, size_t len,
    struct str *out)
{
	struct command *c = malloc(sizeof(*c));
	struct str copy = { 0 };
	size_t second, third;
	int rc;

	if (c == NULL || parse_untagged(line, len, &copy, c) != 0 ||
	    strcmp(c->name, "NAMESPACE") != 0 || c->ntok == 0 ||
	    (second = token_group_end(c, 0)) >= c->ntok ||
	    (third = token_group_end(c, second)) >= c->ntok ||
	    token_group_end(c, third) != c->ntok)
		rc = str_add(out, line, len);
	else
		rc = str_adds(out, "* NAMESPACE ") != 0 ||
		    append_tokens(out, c->tok, 0, second) != 0 ||
		    str_adds(out, " ") != 0 ||
		    append_tokens(out, c->tok, second, third) != 0 ||
		    str_adds(out, " ") != 0 ||
		    append_shared_namespaces(eng, c, third, out) != 0 ? -1 : 0;
	str_free(&copy);
	free(c);
	return rc;
}

/* CAPABILITY after login: what the router can honour, as at login. */
static int
rewrite_capability(struct engine *eng, const char *line, size_t len,
    struct str *out)
{
	char *caps, *list = strndup(line + 13, len - 13);
	int rc;

	(void)eng;
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
rename_link(struct engine *eng, const struct command *c)
{
	int a, b;

	if (c->ntok != 2 || !is_mailbox_token(&c->tok[0]) ||
	    !is_mailbox_token(&c->tok[1]))
		return 0;
	a = mailbox_link(eng, c->tok[0].s, c->tok[0].len);
	b = mailbox_link(eng, c->tok[1].s, c->tok[1].len);
	if (a == b)
		return a;
	client_line(eng, "%s NO [CANNOT] Cannot rename a mailbox between "
	    "servers.", c->tag);
	return -1;
}

/* ------------------------------------------------------------------ */
/* COPY and MOVE: within a server, or carried across by copy.c */

/*
 * COPY and MOVE (and their UID forms) go to the selected mailbox's
 * server, or are carried across when the destination lives elsewhere.
 */
static int
copy_link(struct engine *eng, const struct command *c, size_t first,
    const char *name)
{
	const struct token *dst;
	int from = current_link(eng), to;

	if (c->ntok < first + 2 || eng->selected < 0 ||
	    !is_mailbox_token(&c->tok[c->ntok - 1]) ||
	    c->tok[first].type != TOK_ATOM)
		return from;
	dst = &c->tok[c->ntok - 1];
	if ((to = mailbox_link(eng, dst->s, dst->len)) == from)
		return from;
	cross_copy(eng, c, first, from, to, strcasecmp(name, "MOVE") == 0);
	return -1;
}

/* LOGOUT: every public server is left politely, then the home one. */
static void
cmd_logout(struct engine *eng, const struct command *c)
{
	for (int i = 1; i < eng->nlinks; i++)
		if (eng->links[i].up) {
			link_internal(eng, i, "LOGOUT", NULL);
			backend_close(eng->links[i].be);
			eng->links[i].up = 0;
		}
	if (run_on_link(eng, 0, c->tag, NULL) != REPLY_LOST &&
	    eng->end == END_NONE)
		eng->end = END_LOGOUT;
}

/*
 * ENABLE runs at home and is remembered for servers reached later: its
 * capability names, atoms all (RFC 5161), composed anew; anything else
 * in the command is not replayed.
 */
static void
cmd_enable(struct engine *eng, const struct command *c)
{
	struct str args = { 0 };
	int ok = 1;

	if (run_on_link(eng, 0, c->tag, NULL) != REPLY_OK)
		return;
	for (size_t k = 0; k < c->ntok && ok; k++)
		if (c->tok[k].type == TOK_ATOM)
			ok = (args.len == 0 || str_add(&args, " ", 1) == 0) &&
			    str_add(&args, c->tok[k].s, c->tok[k].len) == 0;
	free(eng->enabled);
	eng->enabled = NULL;
	if (ok && args.len > 0 && str_add(&args, "", 1) == 0) {
		eng->enabled = args.s;	/* the router owns it from here */
		args.s = NULL;
	}
	str_free(&args);
	for (int i = 1; i < eng->nlinks && eng->enabled != NULL; i++)
		if (eng->links[i].up)
			link_internal(eng, i, "ENABLE", eng->enabled);
}

/* The mailbox a command names as its first argument, or NULL. */
static const struct token *
mailbox_argument(const struct command *c, const char *name, size_t first)
{
	size_t k = first;

	if (!names_mailbox(name) || c->ntok <= k)
		return NULL;
	if (strcmp(name, "GETMETADATA") == 0 && c->tok[k].type == TOK_LPAREN)
		k = token_group_end(c, k);	/* (MAXSIZE n DEPTH d) */
	return k < c->ntok && is_mailbox_token(&c->tok[k]) ? &c->tok[k] :
	    NULL;
}

/*
 * REPLACE (RFC 8508) appends to a mailbox and expunges from the selected
 * one, on one server: a destination elsewhere is refused, as RFC 8508
 * lets a server refuse, rather than sent where it names another mailbox.
 */
static int
replace_link(struct engine *eng, const struct command *c, size_t first)
{
	const struct token *dst = c->ntok > first + 1 ? &c->tok[first + 1] :
	    NULL;
	int from = current_link(eng);

	if (dst == NULL || !is_mailbox_token(dst) ||
	    mailbox_link(eng, dst->s, dst->len) == from)
		return from;
	log_msg(LOG_NOTICE, "event=refused user=\"%s\" command=REPLACE "
	    "reason=\"destination on another server\"", eng->user);
	client_line(eng, "%s NO [CANNOT] REPLACE into a mailbox on another "
	    "server is not supported; use APPEND, then EXPUNGE.", c->tag);
	return -1;
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
	return names_mailbox(name) || url_command(name);
}

/*
 * May this command go to the selected mailbox's server at once, behind
 * the commands in flight there?  Only when it needs no other server, all
 * of it is at hand, and nothing about the selection is in question.
 */
static int
pipelinable(const struct engine *eng, const struct command *c,
    const char *name, size_t first)
{
	int cur = current_link(eng);

	if (eng->cb.ncuts > 0 || eng->cb.stream_left > 0 || eng->selection_lost ||
	    !eng->links[cur].up || eng->raw_for >= 0 || runs_alone(name) ||
	    (eng->busy >= 0 && eng->busy != cur) ||
	    eng->nflight == PIPELINE_MAX)
		return 0;
	if (strcmp(name, "COPY") == 0 || strcmp(name, "MOVE") == 0) {
		const struct token *dst = &c->tok[c->ntok - 1];

		return c->ntok >= first + 2 && is_mailbox_token(dst) &&
		    mailbox_link(eng, dst->s, dst->len) == cur;
	}
	return 1;
}


/* Run the command the engine has read where it belongs. */
void
route_command(struct engine *eng)
{
	const struct token *mbox;
	struct str copy = { 0 };
	struct command *c = malloc(sizeof(*c));
	const char *why, *name;
	char sub[16];
	enum parse_status ps;
	int target = -2;
	size_t first = 0;

	if (c == NULL) {
		engine_bye(eng, END_LIMIT, "Out of memory.");
		return;
	}
	ps = parse_copy(eng, &copy, c, &why);
	if (ps != PARSE_OK || strlen(c->tag) > TAG_MAX) {
		/* the current server answers malformed commands as it would */
		char tag[TAG_MAX + 2];

		early_tag(eng->cb.text.s, eng->send_len, tag, sizeof(tag));
		if (wait_idle(eng) != 0)
			;
		else if (ps == PARSE_NOTAG || strlen(tag) > TAG_MAX ||
		    strcmp(tag, "*") == 0)
			client_line(eng, "* BAD %s", ps == PARSE_OK ?
			    "Tag too long." : why);
		else
			run_on_link(eng, current_link(eng), tag, NULL);
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
	if (pipelinable(eng, c, name, first)) {
		send_pipelined(eng, current_link(eng), c->tag);
		goto out;
	}
	if (wait_idle(eng) != 0)
		goto out;
	if (url_command(name)) {
		cmd_urls(eng, c);
		goto out;
	}
	if ((mbox = mailbox_argument(c, name, first)) != NULL) {
		cmd_mailbox(eng, c, mailbox_link(eng, mbox->s, mbox->len),
		    raw_token_end(eng, &copy, mbox));
		goto out;
	}
	if (strcmp(name, "LIST") == 0 || strcmp(name, "LSUB") == 0)
		cmd_list(eng, c);
	else if (strcmp(name, "NAMESPACE") == 0)
		run_on_link_as(eng, 0, c->tag, &namespace_filter, NULL);
	else if (strcmp(name, "CAPABILITY") == 0)
		run_on_link_as(eng, 0, c->tag, &capability_filter, NULL);
	else if (strcmp(name, "LOGOUT") == 0)
		cmd_logout(eng, c);
	else if (strcmp(name, "ENABLE") == 0)
		cmd_enable(eng, c);
	else if (strcmp(name, "RENAME") == 0)
		target = rename_link(eng, c);
	else if (strcasecmp(name, "COPY") == 0 || strcasecmp(name, "MOVE") == 0)
		target = copy_link(eng, c, first, name);
	else if (strcmp(name, "REPLACE") == 0)
		target = replace_link(eng, c, first);
	else
		target = current_link(eng);
	if (target >= 0 && eng->selection_lost && target == eng->selected) {
		if (strcmp(name, "CLOSE") == 0 || strcmp(name, "UNSELECT") == 0) {
			eng->selected = -1;
			eng->selection_lost = 0;
			client_line(eng, "%s OK %s completed.", c->tag, name);
		} else
			client_line(eng, "%s NO [UNAVAILABLE] The server of the "
			    "selected mailbox was lost; select a mailbox "
			    "again.", c->tag);
		target = -1;
	}
	if (target >= 0 && (target == 0 || !link_unavailable(eng, target,
	    c->tag))) {
		int closing = strcmp(name, "CLOSE") == 0 ||
		    strcmp(name, "UNSELECT") == 0;

		if (run_on_link(eng, target, c->tag, NULL) == REPLY_OK &&
		    closing)
			eng->selected = -1;
	}
out:
	if (eng->cb.stream_left > 0 && eng->end == END_NONE)
		discard_rest(eng);
	str_free(&copy);
	free(c);
}

/* ------------------------------------------------------------------ */
