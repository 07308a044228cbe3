/*
 * Fuzz target: the SASL data imapfe decodes itself: base64 (strictly, and
 * back again) and the PLAIN message split into credentials.
 */
#include "fuzz_common.h"

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
	}
	(void)credentials_acceptable((const char *)data, size);
	free(dec);
	return 0;
}
