/*
 * Fuzz target: the SASL data imapfe decodes itself: base64 (strictly, and
 * back again), the PLAIN message split into credentials, and OAUTHBEARER
 * and XOAUTH2 messages, whose user and token must survive the message
 * imapfe composes from them for a back-end.
 */
#include "fuzz_common.h"

static void
bearer_round_trip(enum cred_kind kind, const char *msg, size_t len)
{
	struct credentials cr = { 0 }, again = { 0 };
	struct str out = { 0 };
	const char *why;

	if (bearer_split(kind, msg, len, &cr, &why) == BEARER_OK) {
		if (cr.user == NULL || cr.pass == NULL || cr.kind != kind ||
		    bearer_message(&cr, "host", "143", &out) != 0 ||
		    bearer_split(kind, out.s, out.len, &again, &why) !=
		    BEARER_OK || strcmp(again.user, cr.user) != 0 ||
		    strcmp(again.pass, cr.pass) != 0)
			abort();
	}
	str_free(&out);
	credentials_clear(&again);
	credentials_clear(&cr);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct credentials cr = { 0 };
	size_t cap = size / 4 * 3 + 1, len, elen;
	char *dec = malloc(cap), *enc;

	if (dec == NULL)
		return 0;
	if (base64_decode((const char *)data, size, dec, cap, &len) == 0) {
		/* what decodes must encode back to the same text */
		if ((enc = malloc(size + 1)) == NULL)
			abort();
		elen = base64_encode((const unsigned char *)dec, len, enc,
		    size + 1);
		if (elen != size || memcmp(enc, data, size) != 0)
			abort();
		free(enc);
		if (sasl_plain_split(dec, len, &cr) == PLAIN_OK &&
		    (cr.user == NULL || cr.pass == NULL))
			abort();
		credentials_clear(&cr);
		bearer_round_trip(CRED_OAUTHBEARER, dec, len);
		bearer_round_trip(CRED_XOAUTH2, dec, len);
	}
	(void)credentials_acceptable((const char *)data, size);
	free(dec);
	return 0;
}
