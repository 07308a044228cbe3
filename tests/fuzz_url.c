/*
 * Fuzz target: IMAP URLs in commands (imapurl.c).  The input as one URL,
 * as an APPEND's arguments (whole, and cut in two at a point the input
 * chooses, as after a streamed literal), and as URLFETCH and GENURLAUTH
 * arguments; what NO [BADURL] would carry is checked for what
 * resp-text-code allows.
 */
#include "fuzz_common.h"

/* "Public Folders/" is on server 1, as a router would have it. */
static int
mailbox_server(void *ctx, const char *name, size_t len)
{
	(void)ctx;
	return len >= 14 && memcmp(name, "Public Folders", 14) == 0;
}

static void
route_init(struct url_route *ur, int selected, int server)
{
	static struct config cfg;

	memset(ur, 0, sizeof(*ur));
	ur->mailbox_server = mailbox_server;
	ur->cfg = &cfg;
	ur->user = "alice";
	ur->selected = selected;
	ur->server = server;
}

/* A refused URL's text fits the code: no CTL, no "]", NUL-terminated. */
static void
check_bad(const struct url_route *ur)
{
	size_t n = strnlen(ur->bad, sizeof(ur->bad));

	if (!ur->refused)
		return;
	if (n == 0 || n == sizeof(ur->bad))
		abort();
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)ur->bad[i];

		if (c < 0x21 || c == 0x7f || c == 0xff || c == ']')
			abort();
	}
}

static void
commands(const char *name, const char *buf, size_t size)
{
	struct command *c = malloc(sizeof(*c));
	struct url_route ur;
	struct str text = { 0 };
	const char *why;

	if (c == NULL)
		return;
	if (str_printf(&text, "a %s ", name) == 0 &&
	    str_add(&text, buf, size) == 0 && str_add(&text, "", 1) == 0 &&
	    parse_command(text.s, text.len - 1, c, &why) == PARSE_OK) {
		route_init(&ur, 1, -1);
		if (url_command_server(&ur, c) < 0 && !ur.refused)
			abort();
		check_bad(&ur);
	}
	str_free(&text);
	free(c);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *buf = fuzz_copy(data, size);
	size_t cut = size > 0 ? data[0] % (size + 1) : 0;
	struct imap_url u;
	struct url_route ur;

	if (buf == NULL)
		return 0;
	if (imap_url_parse(buf, size, &u) == 0 &&
	    (strnlen(u.mailbox, sizeof(u.mailbox)) == sizeof(u.mailbox) ||
	    (u.relative && (u.has_mailbox || u.has_server))))
		abort();
	route_init(&ur, 0, 0);
	(void)url_server(&ur, buf, size);
	(void)url_append_check(&ur, buf, size);
	check_bad(&ur);
	route_init(&ur, -1, 1);
	(void)url_append_check(&ur, buf, cut);
	(void)url_append_check(&ur, buf + cut, size - cut);
	check_bad(&ur);
	(void)args_open_lists(buf, size);
	commands("URLFETCH", buf, size);
	commands("GENURLAUTH", buf, size);
	free(buf);
	return 0;
}
