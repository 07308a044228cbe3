/*
 * Fuzz target: what back-ends send.  The stream scanner (lines, literals,
 * BYE) over the input cut in two at a point the input chooses, status
 * parsing of each line, referral URLs, and capability handling.
 */
#include "fuzz_common.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct backend be;
	struct resp_scanner sc;
	struct referral ref;
	char *buf = fuzz_copy(data, size), *caps;
	size_t cut = size > 0 ? data[0] % (size + 1) : 0, rest;
	const char *p, *end;

	if (buf == NULL)
		return 0;
	resp_scanner_init(&sc);
	resp_scan(&sc, buf, cut);
	resp_scan(&sc, buf + cut, size - cut);
	(void)referral_parse(buf, &ref);	/* fuzz_copy ends buf with NUL */
	memset(&be, 0, sizeof(be));
	for (p = buf, end = buf + size; p < end;) {
		const char *lf = memchr(p, '\n', (size_t)(end - p));
		size_t l = lf != NULL ? (size_t)(lf - p) : (size_t)(end - p);

		(void)resp_status(p, l, "F1", &rest);
		(void)resp_is_tagged(p, l, "*");
		backend_note_caps(&be, p, l);
		p += l + 1;
	}
	if (be.caps != NULL) {
		caps = caps_for_client(be.caps, data[0] & 1);
		if (caps == NULL)
			abort();
		(void)caps_has(caps, "IMAP4rev1");
		free(caps);
	}
	free(be.caps);
	free(buf);
	return 0;
}
