/*
 * What every fuzz target shares; each links the files below imapfe.c as
 * they are.  Included once per target.
 */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "imapfe.h"

/* The input as a NUL-terminated copy with one spare byte after it. */
static inline char *
fuzz_copy(const uint8_t *data, size_t size)
{
	char *p = malloc(size + 2);

	if (p != NULL) {
		memcpy(p, data, size);
		p[size] = p[size + 1] = '\0';
	}
	return p;
}

int LLVMFuzzerTestOneInput(const uint8_t *, size_t);

#endif
