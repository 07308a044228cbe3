/*
 * HAProxy's PROXY protocol, versions 1 and 2, on the client side: a load
 * balancer in front of imapfe opens each connection with a header that
 * names the real client.  Only connections from configured addresses may
 * (and must) carry one; see proxy_protocol_trusted in imapfe(8).
 *
 * The header is read with exact-length reads, never past its end: what
 * follows (a TLS ClientHello, say) belongs to the session.
 */
#include <sys/socket.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "imapfe.h"

#define PP_V1_MAX	107	/* the specification's longest v1 line */
#define PP_V2_HEAD	16
#define PP_V2_BODY_MAX	4096	/* addresses plus TLVs imapfe will skip */

static const unsigned char pp_v2_sig[12] = {
	0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a
};

/* ------------------------------------------------------------------ */
/* address lists */

/* "ADDRESS/BITS" or a bare address (all bits). */
int
cidr_parse(const char *s, struct cidr *out)
{
	char addr[INET6_ADDRSTRLEN + 1];
	const char *slash = strchr(s, '/');
	size_t alen = slash != NULL ? (size_t)(slash - s) : strlen(s);
	int maxbits;

	if (alen == 0 || alen >= sizeof(addr))
		return -1;
	memcpy(addr, s, alen);
	addr[alen] = '\0';
	memset(out, 0, sizeof(*out));
	if (inet_pton(AF_INET, addr, out->addr) == 1) {
		out->family = AF_INET;
		maxbits = 32;
	} else if (inet_pton(AF_INET6, addr, out->addr) == 1) {
		out->family = AF_INET6;
		maxbits = 128;
	} else
		return -1;
	out->bits = maxbits;
	if (slash != NULL) {
		char *end;
		long bits;

		errno = 0;
		bits = strtol(slash + 1, &end, 10);
		if (errno != 0 || end == slash + 1 || *end != '\0' ||
		    bits < 0 || bits > maxbits)
			return -1;
		out->bits = (int)bits;
	}
	return 0;
}

/* The address bytes of ss; an IPv4-mapped IPv6 address counts as IPv4. */
static int
address_bytes(const struct sockaddr_storage *ss, unsigned char out[16])
{
	if (ss->ss_family == AF_INET) {
		memcpy(out, &((const struct sockaddr_in *)(const void *)ss)->
		    sin_addr, 4);
		return AF_INET;
	}
	if (ss->ss_family == AF_INET6) {
		const struct in6_addr *a =
		    &((const struct sockaddr_in6 *)(const void *)ss)->sin6_addr;

		if (IN6_IS_ADDR_V4MAPPED(a)) {
			memcpy(out, a->s6_addr + 12, 4);
			return AF_INET;
		}
		memcpy(out, a->s6_addr, 16);
		return AF_INET6;
	}
	return AF_UNSPEC;
}

static int
cidr_contains(const struct cidr *c, int family, const unsigned char *a)
{
	int full = c->bits / 8, rest = c->bits % 8;

	if (c->family != family || memcmp(c->addr, a, (size_t)full) != 0)
		return 0;
	if (rest == 0)
		return 1;
	return ((c->addr[full] ^ a[full]) & (0xff << (8 - rest)) & 0xff) == 0;
}

int
cidr_list_match(const struct cidr *list, size_t n,
    const struct sockaddr_storage *ss)
{
	unsigned char a[16];
	int family = address_bytes(ss, a);

	for (size_t i = 0; i < n; i++)
		if (cidr_contains(&list[i], family, a))
			return 1;
	return 0;
}

/* ------------------------------------------------------------------ */
/* parsing (pure: unit-tested and fuzzed on its own) */

static int
v1_address(const char *s, int family, uint16_t port,
    struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (family == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)(void *)ss;

		in->sin_family = AF_INET;
		in->sin_port = htons(port);
		return inet_pton(AF_INET, s, &in->sin_addr) == 1 ? 0 : -1;
	}
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)(void *)ss;

	in6->sin6_family = AF_INET6;
	in6->sin6_port = htons(port);
	return inet_pton(AF_INET6, s, &in6->sin6_addr) == 1 ? 0 : -1;
}

/* A decimal port, 0..65535, without sign, leading zeros or spaces. */
static int
v1_port(const char *s, uint16_t *port)
{
	unsigned long v = 0;

	if (s[0] == '\0' || strlen(s) > 5 || (s[0] == '0' && s[1] != '\0'))
		return -1;
	for (const char *p = s; *p != '\0'; p++) {
		if (*p < '0' || *p > '9')
			return -1;
		v = v * 10 + (unsigned long)(*p - '0');
	}
	if (v > 65535)
		return -1;
	*port = (uint16_t)v;
	return 0;
}

/*
 * "PROXY TCP4 src dst sport dport\r\n", "PROXY TCP6 ...", or
 * "PROXY UNKNOWN ...\r\n" (addresses not known: the connection's own are
 * kept).  line holds the whole header including CRLF.
 */
int
proxy_v1_parse(const char *line, size_t len, struct proxy_header *out,
    const char **why)
{
	char buf[PP_V1_MAX + 1], *w[7], *save = NULL;
	int n = 0, family;
	uint16_t sport, dport;

	memset(out, 0, sizeof(*out));
	*why = "malformed v1 header";
	if (len < 8 || len > PP_V1_MAX || line[len - 2] != '\r' ||
	    line[len - 1] != '\n' || memchr(line, '\0', len) != NULL)
		return -1;
	memcpy(buf, line, len - 2);
	buf[len - 2] = '\0';
	/* Single spaces only, as the specification writes them. */
	if (strstr(buf, "  ") != NULL || buf[len - 3] == ' ')
		return -1;
	for (char *t = strtok_r(buf, " ", &save); t != NULL && n < 7;
	    t = strtok_r(NULL, " ", &save))
		w[n++] = t;
	if (n < 2 || strcmp(w[0], "PROXY") != 0)
		return -1;
	if (strcmp(w[1], "UNKNOWN") == 0) {
		out->local = 1;
		return 0;
	}
	if (strcmp(w[1], "TCP4") == 0)
		family = AF_INET;
	else if (strcmp(w[1], "TCP6") == 0)
		family = AF_INET6;
	else
		return -1;
	if (n != 6 || v1_port(w[4], &sport) != 0 || v1_port(w[5], &dport) != 0 ||
	    v1_address(w[2], family, sport, &out->src) != 0 ||
	    v1_address(w[3], family, dport, &out->dst) != 0)
		return -1;
	return 0;
}

/* Length of the v2 header whose first 16 bytes are head, or -1. */
long
proxy_v2_length(const unsigned char *head, const char **why)
{
	size_t body = ((size_t)head[14] << 8) | head[15];

	*why = "malformed v2 header";
	if (memcmp(head, pp_v2_sig, sizeof(pp_v2_sig)) != 0)
		return -1;
	if ((head[12] & 0xf0) != 0x20) {
		*why = "unsupported v2 version";
		return -1;
	}
	if (body > PP_V2_BODY_MAX) {
		*why = "v2 header too long";
		return -1;
	}
	return (long)(PP_V2_HEAD + body);
}

/*
 * A whole v2 header (hdr, len bytes, as proxy_v2_length() sized it).
 * LOCAL (a health check) and unspecified or non-IP families keep the
 * connection's own addresses; TLVs after the addresses are skipped.
 */
int
proxy_v2_parse(const unsigned char *hdr, size_t len, struct proxy_header *out,
    const char **why)
{
	const unsigned char *body = hdr + PP_V2_HEAD;
	size_t blen;
	long want;

	memset(out, 0, sizeof(*out));
	if (len < PP_V2_HEAD || (want = proxy_v2_length(hdr, why)) < 0 ||
	    (size_t)want != len)
		return -1;
	blen = len - PP_V2_HEAD;
	*why = "malformed v2 header";
	switch (hdr[12] & 0x0f) {
	case 0x0:			/* LOCAL */
		out->local = 1;
		return 0;
	case 0x1:			/* PROXY */
		break;
	default:
		*why = "unsupported v2 command";
		return -1;
	}
	switch (hdr[13]) {
	case 0x11: {			/* TCP over IPv4 */
		struct sockaddr_in *s = (struct sockaddr_in *)(void *)&out->src;
		struct sockaddr_in *d = (struct sockaddr_in *)(void *)&out->dst;

		if (blen < 12)
			return -1;
		s->sin_family = d->sin_family = AF_INET;
		memcpy(&s->sin_addr, body, 4);
		memcpy(&d->sin_addr, body + 4, 4);
		memcpy(&s->sin_port, body + 8, 2);
		memcpy(&d->sin_port, body + 10, 2);
		return 0;
	}
	case 0x21: {			/* TCP over IPv6 */
		struct sockaddr_in6 *s =
		    (struct sockaddr_in6 *)(void *)&out->src;
		struct sockaddr_in6 *d =
		    (struct sockaddr_in6 *)(void *)&out->dst;

		if (blen < 36)
			return -1;
		s->sin6_family = d->sin6_family = AF_INET6;
		memcpy(&s->sin6_addr, body, 16);
		memcpy(&d->sin6_addr, body + 16, 16);
		memcpy(&s->sin6_port, body + 32, 2);
		memcpy(&d->sin6_port, body + 34, 2);
		return 0;
	}
	case 0x00:			/* UNSPEC: addresses unknown */
		out->local = 1;
		return 0;
	default:
		*why = "unsupported v2 address family";
		return -1;
	}
}

/* ------------------------------------------------------------------ */
/* reading the header off the connection */

static enum io_status
read_exact(int fd, unsigned char *buf, size_t n, int64_t deadline)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);

		if (r > 0) {
			got += (size_t)r;
			continue;
		}
		if (r == 0)
			return IO_CLOSED;
		if (errno != EAGAIN && errno != EINTR)
			return IO_ERROR;
		if (shutdown_requested)
			return IO_CLOSED;
		if (!wait_readable(fd, deadline))
			return IO_TIMEOUT;
	}
	return IO_OK;
}

static const char *
io_why(enum io_status st)
{
	return st == IO_TIMEOUT ? "timeout" : st == IO_CLOSED ?
	    "closed before the header ended" : "read error";
}

static int
read_v1(int fd, unsigned char *buf, int64_t deadline,
    struct proxy_header *out, const char **why)
{
	size_t len = 8;
	enum io_status st;

	/* Byte by byte, so that nothing past the LF is consumed. */
	while (buf[len - 1] != '\n') {
		if (len == PP_V1_MAX) {
			*why = "v1 header too long";
			return -1;
		}
		if ((st = read_exact(fd, buf + len, 1, deadline)) != IO_OK) {
			*why = io_why(st);
			return -1;
		}
		len++;
	}
	return proxy_v1_parse((const char *)buf, len, out, why);
}

static int
read_v2(int fd, unsigned char *buf, int64_t deadline,
    struct proxy_header *out, const char **why)
{
	enum io_status st;
	long len;

	if ((st = read_exact(fd, buf + 8, PP_V2_HEAD - 8, deadline)) != IO_OK) {
		*why = io_why(st);
		return -1;
	}
	if ((len = proxy_v2_length(buf, why)) < 0)
		return -1;
	if ((st = read_exact(fd, buf + PP_V2_HEAD, (size_t)len - PP_V2_HEAD,
	    deadline)) != IO_OK) {
		*why = io_why(st);
		return -1;
	}
	return proxy_v2_parse(buf, (size_t)len, out, why);
}

/* Read and parse the header at the start of fd, within timeout_s. */
int
proxy_header_read(int fd, int timeout_s, struct proxy_header *out,
    const char **why)
{
	unsigned char buf[PP_V2_HEAD + PP_V2_BODY_MAX];
	int64_t deadline = deadline_in(timeout_s);
	enum io_status st;

	memset(out, 0, sizeof(*out));
	if ((st = read_exact(fd, buf, 8, deadline)) != IO_OK) {
		*why = io_why(st);
		return -1;
	}
	if (memcmp(buf, "PROXY ", 6) == 0)
		return read_v1(fd, buf, deadline, out, why);
	if (memcmp(buf, pp_v2_sig, 8) == 0)
		return read_v2(fd, buf, deadline, out, why);
	*why = "no PROXY header";
	return -1;
}
