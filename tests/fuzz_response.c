/*
 * Fuzz target: what back-ends send.  The stream scanner (lines, literals,
 * BYE) over the input cut in two at a point the input chooses, status
 * parsing of each line, referral URLs, and capability handling.
 */
#include "fuzz_common.h"

static enum sink_verdict
drop_some(void *ctx, const char *line, size_t len)
{
	(void)ctx;
	return len % 3 == 0 ? SINK_DROP : SINK_KEEP;
}

static int
take_data(void *ctx, const char *p, size_t n)
{
	size_t *total = ctx;

	(void)p;
	*total += n;
	return 0;
}

/* The dispatcher over the whole input: every byte used, none twice. */
static void
dispatch_all(const char *buf, size_t size, int filter)
{
	struct backend be;
	struct reply r;
	size_t total = 0;
	struct resp_sink sink = { .line = filter ? drop_some : NULL,
	    .data = take_data, .long_lines = filter, .ctx = &total };
	enum dispatch d;

	memset(&be, 0, sizeof(be));
	resp_scanner_init(&be.sc);
	if (iobuf_init(&be.io, -1, -1, size + 1) != 0)
		return;
	memcpy(be.io.buf, buf, size);
	be.io.end = size;
	while ((d = backend_dispatch(&be, &sink, &r)) != DISPATCH_MORE &&
	    d != DISPATCH_TOOLONG)
		if (d == DISPATCH_FAILED || r.len >= sizeof(r.line))
			abort();
	if (iobuf_pending(&be.io) > size)
		abort();
	iobuf_free(&be.io);
	free(be.bye);
	free(be.caps);	/* a "[CAPABILITY ...]" code is noted as it goes by */
}

/* An APPENDUID's UIDs: bounded, and each one a real UID. */
static void
fuzz_appenduid(const struct status_resp *st)
{
	struct uid_list l = { 0 };
	uint32_t validity;

	if (appenduid_parse(st, 1000, &validity, &l) == 0 &&
	    (validity == 0 || l.n == 0 || l.n > 1000))
		abort();
	for (size_t k = 0; k < l.n; k++)
		if (l.uid[k] == 0)
			abort();
	uid_list_free(&l);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct backend be;
	struct resp_scanner sc;
	struct referral ref;
	struct status_resp st;
	char *buf = fuzz_copy(data, size), *caps;
	size_t cut = size > 0 ? data[0] % (size + 1) : 0;
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

		if (status_parse(p, l, "F1", &st) == 0)
			fuzz_appenduid(&st);
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
	dispatch_all(buf, size, data[0] & 2);
	free(buf);
	return 0;
}
