/*
 * Fuzz target: the client command grammar, as imapfe meets it before
 * login (and in the router after): line splitting, literal announcements,
 * tags and the parser proper.
 */
#include "fuzz_common.h"

static void
each_line(const char *buf, size_t len)
{
	const char *p = buf, *end = buf + len;

	while (p < end) {
		const char *lf = memchr(p, '\n', (size_t)(end - p));
		size_t l = lf != NULL ? (size_t)(lf - p) : (size_t)(end - p);
		uint64_t n;

		if (literal_at_end(p, l, &n) != LIT_INVALID)
			(void)tag_is_valid(p, l);
		p += l + 1;
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct command *cmd = malloc(sizeof(*cmd));
	char *buf = fuzz_copy(data, size);
	const char *why;

	if (cmd != NULL && buf != NULL) {
		each_line(buf, size);
		if (parse_command(buf, size, cmd, &why) == PARSE_OK) {
			/* every token must lie inside the buffer */
			for (size_t i = 0; i < cmd->ntok; i++)
				if (cmd->tok[i].s < buf || cmd->tok[i].s +
				    cmd->tok[i].len > buf + size + 1)
					abort();
		}
	}
	free(buf);
	free(cmd);
	return 0;
}
