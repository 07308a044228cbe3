/*
 * Credentials: what a client's LOGIN or AUTHENTICATE yields (the exchange
 * with the client included), how it is checked, and how imapfe logs in to a back-end with it through Cyrus
 * SASL's client library.  Secrets are wiped in the function that is done
 * with them.
 */
#include <sys/stat.h>

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include <sasl/sasl.h>

#include "imapfe.h"

static int	add_base64(struct str *, const char *, unsigned, int);

/*
 * A credential may not hold NUL, CR or LF: no back-end protocol carries
 * them intact, and refusing them here keeps them from ever reaching one.
 */
int
credentials_acceptable(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (s[i] == '\0' || s[i] == '\r' || s[i] == '\n')
			return 0;
	return 1;
}

void
credentials_clear(struct credentials *cr)
{
	if (cr->user != NULL) {
		wipe(cr->user, cr->user_len);
		free(cr->user);
	}
	if (cr->pass != NULL) {
		wipe(cr->pass, cr->pass_len);
		free(cr->pass);
	}
	free(cr->authzid);
	memset(cr, 0, sizeof(*cr));
}

void
credentials_drop_password(struct credentials *cr)
{
	if (cr->pass != NULL) {
		wipe(cr->pass, cr->pass_len);
		cr->pass[0] = '\0';
		cr->pass_len = 0;
	}
}

int
credentials_set_authzid(struct credentials *cr, const char *authzid)
{
	char *p = strdup(authzid);

	if (p == NULL)
		return -1;
	free(cr->authzid);
	cr->authzid = p;
	return 0;
}

static char *
memdup_z(const char *s, size_t len)
{
	char *p = malloc(len + 1);

	if (p != NULL) {
		memcpy(p, s, len);
		p[len] = '\0';
	}
	return p;
}

int
credentials_set(struct credentials *cr, const char *user, size_t ulen,
    const char *pass, size_t plen)
{
	credentials_clear(cr);
	cr->user = memdup_z(user, ulen);
	cr->pass = memdup_z(pass, plen);
	if (cr->user == NULL || cr->pass == NULL) {
		credentials_clear(cr);
		return -1;
	}
	cr->user_len = ulen;
	cr->pass_len = plen;
	return 0;
}

/* ------------------------------------------------------------------ */
/* base64 (RFC 4648), strict: padding required, nothing outside the set */

static const char b64chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int
b64val(unsigned char c)
{
	const char *p;

	if (c == '\0' || (p = strchr(b64chars, c)) == NULL)
		return -1;
	return (int)(p - b64chars);
}

int
base64_decode(const char *in, size_t inlen, char *out, size_t outcap,
    size_t *outlen)
{
	size_t o = 0;

	if (inlen % 4 != 0)
		return -1;
	for (size_t i = 0; i < inlen; i += 4) {
		int v[4], pad = 0;
		unsigned long w;

		for (int k = 0; k < 4; k++) {
			if (in[i + k] == '=' && i + 4 == inlen && k >= 2) {
				v[k] = 0;
				pad++;
				continue;
			}
			if (pad > 0 || (v[k] = b64val((unsigned char)in[i + k])) < 0)
				return -1;
		}
		w = ((unsigned long)v[0] << 18) | ((unsigned long)v[1] << 12) |
		    ((unsigned long)v[2] << 6) | (unsigned long)v[3];
		/* Bits beyond the data must be zero: one text per value. */
		if ((pad == 1 && (w & 0xff) != 0) ||
		    (pad == 2 && (w & 0xffff) != 0))
			return -1;
		if (o + 3 - (size_t)pad > outcap)
			return -1;
		out[o++] = (char)(w >> 16);
		if (pad < 2)
			out[o++] = (char)(w >> 8 & 0xff);
		if (pad < 1)
			out[o++] = (char)(w & 0xff);
	}
	*outlen = o;
	return 0;
}

/* Returns the encoded length (NUL-terminated), or 0 if out is too small. */
size_t
base64_encode(const unsigned char *in, size_t inlen, char *out,
    size_t outcap)
{
	size_t o = 0;

	if ((inlen + 2) / 3 * 4 + 1 > outcap)
		return 0;
	for (size_t i = 0; i < inlen; i += 3) {
		unsigned long w = (unsigned long)in[i] << 16;
		size_t left = inlen - i;

		if (left > 1)
			w |= (unsigned long)in[i + 1] << 8;
		if (left > 2)
			w |= in[i + 2];
		out[o++] = b64chars[w >> 18 & 63];
		out[o++] = b64chars[w >> 12 & 63];
		out[o++] = left > 1 ? b64chars[w >> 6 & 63] : '=';
		out[o++] = left > 2 ? b64chars[w & 63] : '=';
	}
	out[o] = '\0';
	return o;
}

/*
 * Split a SASL PLAIN message (RFC 4616): [authzid] NUL authcid NUL passwd.
 * An authorization identity other than the user itself cannot be honoured
 * by a pass-through login, so it is refused rather than dropped.
 */
enum plain_status
sasl_plain_split(const char *msg, size_t len, struct credentials *cr)
{
	const char *z1, *z2, *user, *pass;
	size_t azlen, ulen, plen;

	z1 = memchr(msg, '\0', len);
	if (z1 == NULL)
		return PLAIN_MALFORMED;
	azlen = (size_t)(z1 - msg);
	user = z1 + 1;
	z2 = memchr(user, '\0', len - azlen - 1);
	if (z2 == NULL)
		return PLAIN_MALFORMED;
	ulen = (size_t)(z2 - user);
	pass = z2 + 1;
	plen = len - azlen - ulen - 2;
	if (ulen == 0 || memchr(pass, '\0', plen) != NULL)
		return PLAIN_MALFORMED;
	if (azlen > 0 && (azlen != ulen || memcmp(msg, user, ulen) != 0))
		return PLAIN_AUTHZID;
	if (credentials_set(cr, user, ulen, pass, plen) != 0)
		return PLAIN_MALFORMED;
	return PLAIN_OK;
}

/* ------------------------------------------------------------------ */
/* OAuth 2.0 bearer tokens: OAUTHBEARER (RFC 7628) and XOAUTH2 */

/*
 * The error challenges imapfe sends itself when it refuses a token it
 * cannot route (no user, or one no source knows): Dovecot's, so that the
 * client hears the same as for a token the back-end refused.
 */
static const char bearer_refusal_oauthbearer[] =
    "{\"status\":\"invalid_token\"}";
static const char bearer_refusal_xoauth2[] =
    "{\"status\":\"401\",\"schemes\":\"bearer\",\"scope\":\"mail\"}";

enum cred_kind
bearer_kind(const char *mech)
{
	if (strcmp(mech, "OAUTHBEARER") == 0)
		return CRED_OAUTHBEARER;
	if (strcmp(mech, "XOAUTH2") == 0)
		return CRED_XOAUTH2;
	return CRED_PASSWORD;
}

const char *
bearer_mech_name(enum cred_kind kind)
{
	return kind == CRED_XOAUTH2 ? "XOAUTH2" : "OAUTHBEARER";
}

/* One key=value pair of a bearer message, the kvsep (\x01) after it cut. */
struct kvpair {
	const char	*key;
	size_t		 keylen;
	const char	*value;
	size_t		 valuelen;
};

/*
 * The next pair from *p, moving *p past its \x01.  Returns 0 for a pair,
 * 1 at the empty pair that ends the message (it must be its last byte),
 * -1 for anything else.  Values are RFC 7628's: printable, space, tab,
 * CR and LF; never NUL.
 */
static int
next_kvpair(const char **p, const char *end, struct kvpair *kv)
{
	const char *sep, *eq;

	if (*p >= end)
		return -1;
	if (**p == '\x01')
		return *p + 1 == end ? 1 : -1;
	if ((sep = memchr(*p, '\x01', (size_t)(end - *p))) == NULL ||
	    (eq = memchr(*p, '=', (size_t)(sep - *p))) == NULL || eq == *p)
		return -1;
	for (const char *c = *p; c < eq; c++)
		if (!isalpha((unsigned char)*c))
			return -1;
	for (const char *c = eq + 1; c < sep; c++)
		if (*c == '\0' || ((unsigned char)*c < 0x20 && *c != '\t' &&
		    *c != '\r' && *c != '\n') || *c == 0x7f)
			return -1;
	kv->key = *p;
	kv->keylen = (size_t)(eq - *p);
	kv->value = eq + 1;
	kv->valuelen = (size_t)(sep - eq - 1);
	*p = sep + 1;
	return 0;
}

static int
key_is(const struct kvpair *kv, const char *key)
{
	return kv->keylen == strlen(key) && memcmp(kv->key, key,
	    kv->keylen) == 0;
}

/* RFC 6750's b64token: the token's characters. */
static int
is_b64token(const char *s, size_t len)
{
	size_t i = 0;

	while (i < len && (isalnum((unsigned char)s[i]) ||
	    (s[i] != '\0' && strchr("-._~+/", s[i]) != NULL)))
		i++;
	if (i == 0)
		return 0;
	while (i < len && s[i] == '=')
		i++;
	return i == len;
}

/*
 * The token of an auth pair, "Bearer" (any case), spaces, b64token.
 * Returns the token's start, or NULL.
 */
static const char *
bearer_token(const struct kvpair *kv, size_t *len)
{
	const char *p = kv->value, *end = kv->value + kv->valuelen;

	if (kv->valuelen < 7 || strncasecmp(p, "Bearer", 6) != 0 ||
	    p[6] != ' ')
		return NULL;
	for (p += 6; p < end && *p == ' '; p++)
		;
	*len = (size_t)(end - p);
	return is_b64token(p, *len) ? p : NULL;
}

/*
 * The GS2 header's authorization identity (RFC 5801 saslname: "," and
 * "=" written =2C and =3D), decoded into out (as long as the name).
 * Returns its length, or -1 when it is not a saslname.
 */
static long
saslname_decode(const char *s, size_t len, char *out)
{
	size_t o = 0;

	for (size_t i = 0; i < len; i++) {
		if (s[i] == '\0' || s[i] == ',')
			return -1;
		if (s[i] != '=')
			out[o++] = s[i];
		else if (i + 2 < len && s[i + 1] == '2' && s[i + 2] == 'C')
			out[o++] = ',', i += 2;
		else if (i + 2 < len && s[i + 1] == '3' && s[i + 2] == 'D')
			out[o++] = '=', i += 2;
		else
			return -1;
	}
	return (long)o;
}

/*
 * OAUTHBEARER's GS2 header, "n,a=user," or "n,,", up to the first \x01
 * (channel binding, "p=", is not supported: RFC 7628 3.1).  The user,
 * decoded, goes to user (len + 1 bytes); *ulen is 0 without one.
 */
static int
gs2_header(const char *h, size_t len, char *user, size_t *ulen)
{
	long n;

	*ulen = 0;
	if (len < 3 || (h[0] != 'n' && h[0] != 'y') || h[1] != ',' ||
	    h[len - 1] != ',')
		return -1;
	if (len == 3)
		return 0;
	if (len < 6 || h[2] != 'a' || h[3] != '=' ||
	    (n = saslname_decode(h + 4, len - 5, user)) <= 0)
		return -1;
	*ulen = (size_t)n;
	return 0;
}

/*
 * Split a client's OAUTHBEARER or XOAUTH2 message into the user name and
 * the token, kept in cr as kind (pass holds the token).  Host, port and
 * unknown keys are passed over (RFC 7628 3.1).  why names the fault of a
 * malformed message for the log; nothing of the message itself.
 */
enum bearer_status
bearer_split(enum cred_kind kind, const char *msg, size_t len,
    struct credentials *cr, const char **why)
{
	const char *end = msg + len, *p = msg, *token = NULL, *sep;
	enum bearer_status st = BEARER_MALFORMED;
	size_t ulen = 0, tlen = 0;
	struct kvpair kv;
	char *user;
	int rc;

	*why = "no \\x01 separator";
	if ((sep = memchr(msg, '\x01', len)) == NULL)
		return BEARER_MALFORMED;
	*why = "out of memory";
	if ((user = malloc(len + 1)) == NULL)
		return BEARER_MALFORMED;
	*why = "bad GS2 header";
	if (kind == CRED_OAUTHBEARER) {
		if (gs2_header(msg, (size_t)(sep - msg), user, &ulen) != 0)
			goto out;
		p = sep + 1;
	}
	*why = "bad key=value pair";
	while ((rc = next_kvpair(&p, end, &kv)) == 0) {
		if (key_is(&kv, "auth") && (token = bearer_token(&kv,
		    &tlen)) == NULL) {
			*why = "auth is not \"Bearer\" and a token";
			goto out;
		}
		if (kind == CRED_XOAUTH2 && key_is(&kv, "user")) {
			memcpy(user, kv.value, kv.valuelen);
			ulen = kv.valuelen;
		}
	}
	if (rc != 1)
		goto out;
	*why = "no auth=Bearer pair";
	if (token == NULL)
		goto out;
	*why = "token too long";
	st = BEARER_TOOLONG;
	if (tlen > BEARER_TOKEN_MAX)
		goto out;
	*why = "no user name";
	st = BEARER_NOUSER;
	if (ulen == 0)
		goto out;
	*why = "out of memory";
	st = BEARER_MALFORMED;
	if (credentials_set(cr, user, ulen, token, tlen) == 0) {
		cr->kind = kind;
		st = BEARER_OK;
	}
out:
	free(user);
	return st;
}

/* Append a GS2 saslname: "," and "=" as =2C and =3D (RFC 5801). */
static int
add_saslname(struct str *out, const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		const char *esc = s[i] == ',' ? "=2C" : s[i] == '=' ? "=3D" :
		    NULL;

		if ((esc != NULL ? str_adds(out, esc) : str_add(out, s + i,
		    1)) != 0)
			return -1;
	}
	return 0;
}

/*
 * The message imapfe sends a back-end for cr (a bearer credential), not
 * yet in base64: the client's user and token, and for OAUTHBEARER the
 * server's own host and port.  out is the caller's to wipe.
 */
int
bearer_message(const struct credentials *cr, const char *host,
    const char *port, struct str *out)
{
	if (cr->kind == CRED_XOAUTH2)
		return str_adds(out, "user=") != 0 ||
		    str_add(out, cr->user, cr->user_len) != 0 ||
		    str_adds(out, "\x01" "auth=Bearer ") != 0 ||
		    str_add(out, cr->pass, cr->pass_len) != 0 ||
		    str_add(out, "\x01\x01", 2) != 0 ? -1 : 0;
	return str_adds(out, "n,a=") != 0 ||
	    add_saslname(out, cr->user, cr->user_len) != 0 ||
	    str_printf(out, ",\x01host=%s\x01port=%s\x01" "auth=Bearer ",
	    host, port) != 0 ||
	    str_add(out, cr->pass, cr->pass_len) != 0 ||
	    str_add(out, "\x01\x01", 2) != 0 ? -1 : 0;
}

/* bearer_message, in base64, appended to out (which the caller wipes). */
int
bearer_response(const struct credentials *cr, const char *host,
    const char *port, struct str *out)
{
	struct str msg = { 0 };
	int rc;

	rc = bearer_message(cr, host, port, &msg) != 0 ||
	    add_base64(out, msg.s, (unsigned)msg.len, 0) != 0 ? -1 : 0;
	str_free(&msg);
	return rc;
}

/*
 * The PLAIN message (RFC 4616) for cr, in base64, appended to out (which
 * the caller wipes): the authorization identity (empty but when acting
 * for a client, as the proxy user), the user and the password, each
 * after a NUL.
 */
int
plain_response(const struct credentials *cr, struct str *out)
{
	struct str msg = { 0 };
	int rc;

	rc = (cr->authzid != NULL && str_adds(&msg, cr->authzid) != 0) ||
	    str_add(&msg, "", 1) != 0 ||
	    str_add(&msg, cr->user, cr->user_len) != 0 ||
	    str_add(&msg, "", 1) != 0 ||
	    str_add(&msg, cr->pass, cr->pass_len) != 0 ||
	    add_base64(out, msg.s, (unsigned)msg.len, 0) != 0 ? -1 : 0;
	str_free(&msg);
	return rc;
}

/*
 * The proxy identity's password: the first line of a file only the
 * service user should be able to read (a warning is logged otherwise).
 */
int
credentials_load_password(struct credentials *cr, const char *user,
    const char *file, char *err, size_t errlen)
{
	char buf[1024];
	struct stat st;
	size_t len;
	FILE *f;

	if ((f = fopen(file, "re")) == NULL) {
		snprintf(err, errlen, "%s: %s", file, strerror(errno));
		return -1;
	}
	if (fstat(fileno(f), &st) == 0 && (st.st_mode & 077) != 0)
		log_msg(LOG_WARNING, "event=warning reason=\"%s is accessible "
		    "to group or others\"", file);
	if (fgets(buf, sizeof(buf), f) == NULL)
		buf[0] = '\0';
	fclose(f);
	len = strcspn(buf, "\r\n");
	if (len == 0) {
		snprintf(err, errlen, "%s: no password on the first line", file);
		wipe(buf, sizeof(buf));
		return -1;
	}
	if (credentials_set(cr, user, strlen(user), buf, len) != 0) {
		snprintf(err, errlen, "out of memory");
		wipe(buf, sizeof(buf));
		return -1;
	}
	wipe(buf, sizeof(buf));
	return 0;
}

/* ------------------------------------------------------------------ */
/* Client authentication with Cyrus SASL's server library (auth proxy) */

/* libsasl2's own messages, into imapfe's log; its debug chatter dropped. */
static int
cb_server_log(void *context, int level, const char *message)
{
	char clean[256];

	(void)context;
	if (level > SASL_LOG_NOTE || message == NULL)
		return SASL_OK;
	sanitize(clean, sizeof(clean), message, strlen(message));
	log_msg(level <= SASL_LOG_ERR ? LOG_ERR : LOG_NOTICE,
	    "event=sasl message=\"%s\"", clean);
	return SASL_OK;
}

static const sasl_callback_t server_callbacks[] = {
	{ SASL_CB_LOG, (int (*)(void))(void (*)(void))cb_server_log, NULL },
	{ SASL_CB_LIST_END, NULL, NULL }
};

/*
 * Once per process (before the listener forks): the SASL configuration
 * comes from sasl_config_path/<sasl_service>.conf.
 */
int
sasl_server_setup(const struct config *cfg, char *err, size_t errlen)
{
	int rc;

	if (cfg->sasl_config_path != NULL &&
	    (rc = sasl_set_path(SASL_PATH_TYPE_CONFIG,
	    cfg->sasl_config_path)) != SASL_OK) {
		snprintf(err, errlen, "sasl_config_path: %s",
		    sasl_errstring(rc, NULL, NULL));
		return -1;
	}
	if ((rc = sasl_server_init(server_callbacks, cfg->sasl_service)) !=
	    SASL_OK) {
		snprintf(err, errlen, "SASL server initialisation: %s",
		    sasl_errstring(rc, NULL, NULL));
		return -1;
	}
	return 0;
}

void
sasl_server_teardown(void)
{
	sasl_server_done();
}

/*
 * A server connection for one authentication attempt.  No security layer
 * is ever negotiated (TLS protects the link); mechanisms that send the
 * password in the clear are withheld unless plaintext is allowed here.
 */
static sasl_conn_t *
sasl_server_conn(const struct config *cfg, int plaintext_ok)
{
	sasl_security_properties_t props = {
		.min_ssf = 0,
		.max_ssf = 0,
		.maxbufsize = 0,
		.security_flags = SASL_SEC_NOANONYMOUS |
		    (plaintext_ok ? 0 : SASL_SEC_NOPLAINTEXT),
	};
	sasl_conn_t *conn = NULL;

	if (sasl_server_new(cfg->sasl_service, NULL, NULL, NULL, NULL, NULL,
	    0, &conn) != SASL_OK)
		return NULL;
	if (sasl_setprop(conn, SASL_SEC_PROPS, &props) != SASL_OK) {
		sasl_dispose(&conn);
		return NULL;
	}
	return conn;
}

/*
 * Append " AUTH=<mech>" for each mechanism of list (space-separated).
 * A bearer token is a credential in the clear: OAUTHBEARER and XOAUTH2,
 * should a plug-in provide them, go only where plaintext is allowed, and
 * only when configured.
 */
static int
add_mechs(const struct config *cfg, int plaintext_ok, const char *list,
    size_t len, struct str *caps)
{
	const char *p = list, *end = list + len;
	char mech[SASL_MECHNAMEMAX + 1];

	while (p < end) {
		size_t n = strcspn(p, " ");

		if (n > (size_t)(end - p))
			n = (size_t)(end - p);
		if (n > 0 && n < sizeof(mech)) {
			memcpy(mech, p, n);
			mech[n] = '\0';
			if ((bearer_kind(mech) == CRED_PASSWORD ||
			    (cfg->oauth_bearer && plaintext_ok)) &&
			    str_printf(caps, " AUTH=%s", mech) != 0)
				return -1;
		}
		p += n + 1;
	}
	return 0;
}

/* Append " AUTH=<mech>" for every mechanism offered here. */
int
sasl_server_mechs(const struct config *cfg, int plaintext_ok,
    struct str *caps)
{
	sasl_conn_t *conn = sasl_server_conn(cfg, plaintext_ok);
	const char *list;
	unsigned len;
	int count, rc = -1;

	if (conn == NULL)
		return -1;
	if (sasl_listmech(conn, NULL, "", " ", "", &list, &len, &count) ==
	    SASL_OK)
		rc = count > 0 ? add_mechs(cfg, plaintext_ok, list, len, caps) :
		    0;
	sasl_dispose(&conn);
	return rc;
}

/* ------------------------------------------------------------------ */
/* The client's side: LOGIN's password and AUTHENTICATE's exchange */

/*
 * The mechanism an AUTHENTICATE names, upper-cased into mech.  Returns -1
 * when the name is too long to be any mechanism's.
 */
int
auth_mech_name(const char *s, size_t len, char *mech, size_t size)
{
	if (len >= size)
		return -1;
	for (size_t i = 0; i < len; i++)
		mech[i] = (char)toupper((unsigned char)s[i]);
	mech[len] = '\0';
	return 0;
}

/* Mechanisms that carry the password itself. */
int
auth_mech_plaintext(const char *mech)
{
	return strcmp(mech, "PLAIN") == 0 || strcmp(mech, "LOGIN") == 0;
}

/*
 * auth proxy: LOGIN's password, checked by the SASL configuration.
 * Returns a SASL code, SASL_OK when the password is right.
 */
int
auth_check_password(const struct config *cfg, int plaintext_ok,
    const struct credentials *cr)
{
	sasl_conn_t *conn = sasl_server_conn(cfg, plaintext_ok);
	int rc = SASL_FAIL;

	if (conn != NULL && credentials_acceptable(cr->user, cr->user_len) &&
	    credentials_acceptable(cr->pass, cr->pass_len))
		rc = sasl_checkpass(conn, cr->user, (unsigned)cr->user_len,
		    cr->pass, (unsigned)cr->pass_len);
	else if (conn != NULL)
		rc = SASL_BADAUTH;
	sasl_dispose(&conn);
	return rc;
}

static void
free_secret(char *p, size_t len)
{
	if (p != NULL) {
		wipe(p, len);
		free(p);
	}
}

/*
 * "+ " and the challenge in base64, in one write.  The trace shows the
 * "+" alone: the challenge may hold what a mechanism keeps secret.
 */
static enum auth_status
send_challenge(struct auth_client *ac, const char *data, size_t len)
{
	size_t need = (len + 2) / 3 * 4 + 1;
	char *line = malloc(2 + need + 2);
	size_t n;
	enum io_status st;

	if (line == NULL)
		return AUTH_NOMEM;
	memcpy(line, "+ ", 2);
	n = 2 + base64_encode((const unsigned char *)data, len, line + 2, need);
	memcpy(line + n, "\r\n", 2);
	ac->io->deadline = deadline_in(ac->idle_timeout);
	trace_data("to", "client", line, 1, 0);
	st = iobuf_write(ac->io, line, n + 2);
	free(line);
	return st == IO_OK ? AUTH_OK : AUTH_CLIENT_GONE;
}

/*
 * One response of the client's, base64-decoded into a fresh buffer the
 * caller wipes and frees: the initial response ir when there is one,
 * else the line the client answers the challenge with.
 */
static enum auth_status
client_response(struct auth_client *ac, const char *challenge, size_t clen,
    const struct token *ir, char **out, size_t *outlen)
{
	enum auth_status st;
	enum io_status io;
	const char *b64;
	size_t len;
	char *line;

	*out = NULL;
	*outlen = 0;
	if (ir != NULL) {
		b64 = ir->s;
		len = ir->len;
	} else {
		if ((st = send_challenge(ac, challenge, clen)) != AUTH_OK)
			return st;
		if ((io = iobuf_getline(ac->io, ac->max_line, &line, &len)) !=
		    IO_OK) {
			ac->io_status = io;
			return AUTH_READ_END;
		}
		trace_data("from", "client", "<masked>", 8, 0);
		b64 = line;
	}
	if (len == 1 && b64[0] == '*')
		return AUTH_CANCELLED;
	if (len == 1 && b64[0] == '=' && ir != NULL)
		len = 0;	/* SASL-IR: "=" is an empty initial response */
	/* Memory short for the decoding is answered as bad data, too. */
	if ((*out = malloc(len / 4 * 3 + 1)) == NULL ||
	    base64_decode(b64, len, *out, len / 4 * 3 + 1, outlen) != 0) {
		free(*out);
		*out = NULL;
		return AUTH_BAD_BASE64;
	}
	return AUTH_OK;
}

static enum auth_status
auth_plain(struct auth_client *ac, const struct token *ir,
    struct credentials *cr)
{
	enum plain_status ps;
	enum auth_status st;
	char *msg;
	size_t len;

	if ((st = client_response(ac, "", 0, ir, &msg, &len)) != AUTH_OK)
		return st;
	ps = sasl_plain_split(msg, len, cr);
	free_secret(msg, len);
	if (ps == PLAIN_AUTHZID)
		return AUTH_PLAIN_AUTHZID;
	return ps == PLAIN_OK ? AUTH_OK : AUTH_PLAIN_MALFORMED;
}

/* SASL LOGIN: user name, then password, each its own continuation. */
static enum auth_status
auth_login(struct auth_client *ac, const struct token *ir,
    struct credentials *cr)
{
	char *user, *pass;
	size_t ulen, plen;
	enum auth_status st;

	if ((st = client_response(ac, "Username:", 9, ir, &user, &ulen)) !=
	    AUTH_OK)
		return st;
	st = client_response(ac, "Password:", 9, NULL, &pass, &plen);
	if (st == AUTH_OK && credentials_set(cr, user, ulen, pass, plen) != 0)
		st = AUTH_NOMEM;
	free_secret(user, ulen);
	free_secret(pass, plen);
	return st;
}

/*
 * OAUTHBEARER or XOAUTH2 in auth passthrough: the user and the token,
 * which the back-end checks.  A malformed message is answered by the
 * caller, with why (never the message) in the log.
 */
static enum auth_status
auth_bearer(struct auth_client *ac, enum cred_kind kind,
    const struct token *ir, struct credentials *cr)
{
	enum bearer_status bs;
	enum auth_status st;
	char *msg;
	size_t len;

	if ((st = client_response(ac, "", 0, ir, &msg, &len)) != AUTH_OK)
		return st;
	bs = bearer_split(kind, msg, len, cr, &ac->why);
	free_secret(msg, len);
	if (bs == BEARER_OK)
		return AUTH_OK;
	return bs == BEARER_NOUSER ? AUTH_BEARER_NOUSER : AUTH_BEARER_MALFORMED;
}

/*
 * Refuse a bearer token as its mechanism refuses one (RFC 7628 3.2.2):
 * the error challenge, which the client answers with a dummy response
 * that is read and dropped.  The tagged NO is the caller's.
 */
enum auth_status
auth_bearer_refusal(struct auth_client *ac, enum cred_kind kind)
{
	const char *json = kind == CRED_XOAUTH2 ? bearer_refusal_xoauth2 :
	    bearer_refusal_oauthbearer;
	enum auth_status st;
	char *reply;
	size_t len;

	st = client_response(ac, json, strlen(json), NULL, &reply, &len);
	free_secret(reply, len);
	return st == AUTH_READ_END || st == AUTH_CLIENT_GONE ||
	    st == AUTH_NOMEM ? st : AUTH_OK;
}

/*
 * A back-end's challenge during a bearer login (base64, as it came after
 * "+ "), put to the client, and the client's reply as the line to send
 * back, CRLF included: the error exchange of RFC 7628 3.2.2 end to end,
 * so that the client's token refresh works through imapfe.
 * AUTH_BAD_BASE64 is the back-end's fault, AUTH_CANCELLED the client's
 * "*"; either way the caller cancels the exchange.
 */
enum auth_status
auth_client_relay(struct auth_client *ac, const char *chal, size_t len,
    struct str *answer)
{
	size_t cap = len / 4 * 3 + 1, declen, outlen;
	char *dec = malloc(cap), *out;
	enum auth_status st;

	if (dec == NULL)
		return AUTH_NOMEM;
	if (base64_decode(chal, len, dec, cap, &declen) != 0) {
		free(dec);
		return AUTH_BAD_BASE64;
	}
	st = client_response(ac, dec, declen, NULL, &out, &outlen);
	free(dec);
	if (st == AUTH_OK && (add_base64(answer, out, (unsigned)outlen, 0) !=
	    0 || str_add(answer, "\r\n", 2) != 0))
		st = AUTH_NOMEM;
	free_secret(out, outlen);
	return st;
}

/*
 * Run a SASL server exchange to its end, the library's verdict in *rc.
 * Each client response is wiped and freed as soon as the library has
 * taken it.
 */
static enum auth_status
server_exchange(struct auth_client *ac, sasl_conn_t *conn, const char *mech,
    const struct token *ir, int *rc)
{
	const char *out = NULL;
	unsigned outlen = 0;
	char *in = NULL;
	size_t inlen = 0;
	enum auth_status st;

	if (ir != NULL &&
	    (st = client_response(ac, NULL, 0, ir, &in, &inlen)) != AUTH_OK)
		return st;
	/*
	 * Without SASL_SUCCESS_DATA (IMAP has no success data) libsasl2 itself
	 * turns a mechanism's final server message into one more challenge,
	 * so every message to send comes with SASL_CONTINUE; what is left in
	 * out after SASL_OK is stale and must not be sent.
	 */
	*rc = sasl_server_start(conn, mech, in, (unsigned)inlen, &out, &outlen);
	free_secret(in, inlen);
	while (*rc == SASL_CONTINUE) {
		if ((st = client_response(ac, out, outlen, NULL, &in,
		    &inlen)) != AUTH_OK)
			return st;
		*rc = sasl_server_step(conn, in, (unsigned)inlen, &out, &outlen);
		free_secret(in, inlen);
	}
	return AUTH_OK;
}

/*
 * auth proxy: AUTHENTICATE with any mechanism the SASL configuration
 * offers.  Success yields the identity to act as: the authorization
 * identity, which SASL's policy has allowed.  The connection object lives
 * for this one attempt.
 */
static enum auth_status
auth_sasl_server(struct auth_client *ac, const struct config *cfg,
    int plaintext_ok, const char *mech, const struct token *ir,
    struct credentials *cr)
{
	sasl_conn_t *conn = sasl_server_conn(cfg, plaintext_ok);
	const char *user = NULL;
	enum auth_status st = AUTH_OK;
	int rc = SASL_FAIL;

	if (conn != NULL)
		st = server_exchange(ac, conn, mech, ir, &rc);
	if (st == AUTH_OK && rc == SASL_OK && (sasl_getprop(conn,
	    SASL_USERNAME, (const void **)&user) != SASL_OK || user == NULL))
		rc = SASL_FAIL;
	if (st == AUTH_OK && rc == SASL_OK &&
	    credentials_set(cr, user, strlen(user), "", 0) != 0)
		rc = SASL_NOMEM;
	sasl_dispose(&conn);
	if (st != AUTH_OK || rc == SASL_OK)
		return st;
	if (rc == SASL_NOMECH)
		return AUTH_NOMECH;
	ac->sasl_code = rc;
	return AUTH_SASL_REFUSED;
}

/*
 * The client's AUTHENTICATE with mech (upper-cased) and its initial
 * response ir, if any: PLAIN and LOGIN, and OAUTHBEARER and XOAUTH2 when
 * configured, checked by the back-end, when passing through; whatever the SASL configuration offers in auth proxy
 * mode.  AUTH_OK leaves the credentials in cr.
 */
enum auth_status
auth_client_exchange(struct auth_client *ac, const struct config *cfg,
    int plaintext_ok, const char *mech, const struct token *ir,
    struct credentials *cr)
{
	enum cred_kind bearer = bearer_kind(mech);

	/* SASL plug-ins may have them: offered only when configured. */
	if (bearer != CRED_PASSWORD && !ac->oauth_bearer)
		return AUTH_NOMECH;
	if (cfg->auth == AUTH_PROXY)
		return auth_sasl_server(ac, cfg, plaintext_ok, mech, ir, cr);
	if (bearer != CRED_PASSWORD)
		return auth_bearer(ac, bearer, ir, cr);
	if (strcmp(mech, "PLAIN") == 0)
		return auth_plain(ac, ir, cr);
	if (strcmp(mech, "LOGIN") == 0)
		return auth_login(ac, ir, cr);
	return AUTH_NOMECH;
}

/* ------------------------------------------------------------------ */
/* Back-end login with Cyrus SASL's client library */

/* What one authentication attempt owns; released by attempt_release(). */
struct sasl_attempt {
	const struct credentials *cr;
	sasl_conn_t	*conn;
	sasl_secret_t	*secret;
	sasl_callback_t	 callbacks[4];
};

/*
 * PLAIN is built here (plain_response) rather than by libsasl2: the client
 * set-up of libsasl2, sasl_client_new, looks up this host's canonical
 * name on every login (gethostname, nsswitch, /etc/hosts), which cost a
 * tenth of a login's CPU and page faults under -l, for a message of
 * three fields.  Every other mechanism is libsasl2's.
 */
static int
mech_is_plain(const char *mech)
{
	return strcasecmp(mech, "PLAIN") == 0;
}

/*
 * Whether a mechanism plugin's stem ("scram" of libscram.so) can provide
 * mechanism mech ("SCRAM-SHA-256"): one, lower-cased without dashes, is a
 * prefix of the other ("gssapiv2" serves GSSAPI, "gs2" GS2-KRB5).
 */
static int
plugin_serves(const char *stem, size_t stemlen, const char *mech)
{
	size_t i = 0;

	for (; *mech != '\0' && i < stemlen; mech++) {
		if (*mech == '-')
			continue;
		if (tolower((unsigned char)*mech) != stem[i++])
			return 0;
	}
	return i == stemlen || *mech == '\0';
}

/*
 * libsasl2 would load every plugin in its directory (GSSAPI with Kerberos,
 * sasldb with Berkeley DB, ...) in every process: under inetd that was
 * half the start-up time.  Only plugins for backend_mechanisms are loaded,
 * and not PLAIN's, which imapfe speaks itself.
 */
static int
cb_verifyfile(void *context, const char *file, sasl_verify_type_t type)
{
	const char *mechs = context, *base = strrchr(file, '/');
	char mech[64];
	size_t stemlen, n;

	if (type != SASL_VRFY_PLUGIN)
		return SASL_OK;
	base = base != NULL ? base + 1 : file;
	if (strncmp(base, "lib", 3) == 0)
		base += 3;
	stemlen = strcspn(base, ".");
	while (*mechs != '\0') {
		mechs += strspn(mechs, " ,");
		n = strcspn(mechs, " ,");
		if (n > 0 && n < sizeof(mech)) {
			memcpy(mech, mechs, n);
			mech[n] = '\0';
			if (!mech_is_plain(mech) &&
			    plugin_serves(base, stemlen, mech))
				return SASL_OK;
		}
		mechs += n;
	}
	return SASL_CONTINUE;
}

int
sasl_client_setup(const char *mechanisms)
{
	static sasl_callback_t callbacks[2];

	callbacks[0] = (sasl_callback_t){ SASL_CB_VERIFYFILE,
	    (int (*)(void))(void (*)(void))cb_verifyfile, (void *)mechanisms };
	callbacks[1] = (sasl_callback_t){ SASL_CB_LIST_END, NULL, NULL };
	return sasl_client_init(callbacks) == SASL_OK ? 0 : -1;
}

void
sasl_client_teardown(void)
{
	sasl_client_done();
}

static int
cb_simple(void *context, int id, const char **result, unsigned *len)
{
	struct sasl_attempt *at = context;

	switch (id) {
	case SASL_CB_AUTHNAME:
		*result = at->cr->user;
		break;
	case SASL_CB_USER:
		/* Whom to act as: the client, when logging in as the proxy. */
		*result = at->cr->authzid != NULL ? at->cr->authzid : "";
		break;
	default:
		return SASL_BADPARAM;
	}
	if (len != NULL)
		*len = (unsigned)strlen(*result);
	return SASL_OK;
}

static int
cb_pass(sasl_conn_t *conn, void *context, int id, sasl_secret_t **psecret)
{
	struct sasl_attempt *at = context;
	size_t len = at->cr->pass_len;

	(void)conn;
	if (id != SASL_CB_PASS)
		return SASL_BADPARAM;
	if (at->secret == NULL) {
		at->secret = malloc(sizeof(sasl_secret_t) + len);
		if (at->secret == NULL)
			return SASL_NOMEM;
		at->secret->len = len;
		memcpy(at->secret->data, at->cr->pass, len);
		at->secret->data[len] = '\0';
	}
	*psecret = at->secret;
	return SASL_OK;
}

static void
attempt_release(struct sasl_attempt *at)
{
	if (at->conn != NULL)
		sasl_dispose(&at->conn);
	if (at->secret != NULL) {
		wipe(at->secret, sizeof(sasl_secret_t) + at->secret->len);
		free(at->secret);
		at->secret = NULL;
	}
}

static int
attempt_start(struct sasl_attempt *at, const char *host,
    const struct credentials *cr)
{
	sasl_security_properties_t props = {
		.min_ssf = 0,
		.max_ssf = 0,	/* no security layer: TLS protects the link */
		.maxbufsize = 0,
		.security_flags = SASL_SEC_NOANONYMOUS,
	};

	memset(at, 0, sizeof(*at));
	at->cr = cr;
	at->callbacks[0] = (sasl_callback_t){ SASL_CB_AUTHNAME,
	    (int (*)(void))(void (*)(void))cb_simple, at };
	at->callbacks[1] = (sasl_callback_t){ SASL_CB_USER,
	    (int (*)(void))(void (*)(void))cb_simple, at };
	at->callbacks[2] = (sasl_callback_t){ SASL_CB_PASS,
	    (int (*)(void))(void (*)(void))cb_pass, at };
	at->callbacks[3] = (sasl_callback_t){ SASL_CB_LIST_END, NULL, NULL };
	/*
	 * Acting for someone else: a mechanism that cannot carry the
	 * authorization identity (LOGIN, CRAM-MD5) would log in as the proxy
	 * itself, so libsasl2 must offer only those that can.
	 */
	if (sasl_client_new("imap", host, NULL, NULL, at->callbacks,
	    cr->authzid != NULL ? SASL_NEED_PROXY : 0,
	    &at->conn) != SASL_OK)
		return -1;
	if (sasl_setprop(at->conn, SASL_SEC_PROPS, &props) != SASL_OK)
		return -1;
	return 0;
}

/*
 * One SASL client exchange with a back-end: what the conversation needs
 * from libsasl2, and nothing of the connection it runs on (backend.c
 * sends and reads).  Owned by whoever began it, released by
 * sasl_client_end().
 */
struct sasl_client {
	struct sasl_attempt	 at;	/* no conn for PLAIN */
	int			 plain;		/* PLAIN, built by imapfe */
	int			 complete;	/* the last message is sent */
};

/* Append data as base64, "=" for an empty initial response. */
static int
add_base64(struct str *out, const char *data, unsigned len, int initial)
{
	size_t need = ((size_t)len + 2) / 3 * 4 + 1;
	char *b64;
	int rc;

	if (len == 0 && initial)
		return str_adds(out, "=");
	if ((b64 = malloc(need)) == NULL)
		return -1;
	base64_encode((const unsigned char *)data, len, b64, need);
	rc = str_adds(out, b64);
	wipe(b64, need);
	free(b64);
	return rc;
}

/*
 * Start mechanism mech for cr on a server host.  On SASL_BEGIN_OK, args
 * holds what follows "AUTHENTICATE ": the mechanism, and the initial
 * response in base64 when sasl_ir (the server offers SASL-IR) and the
 * mechanism has one.  SASL_BEGIN_NOMECH: libsasl2 has no plugin for it.
 */
enum sasl_begin
sasl_client_begin(struct sasl_client **out, const char *host,
    const struct credentials *cr, const char *mech, int sasl_ir,
    struct str *args)
{
	struct sasl_client *sc = calloc(1, sizeof(*sc));
	const char *ir = NULL, *chosen = NULL;
	unsigned irlen = 0;
	int rc;

	*out = NULL;
	if (sc == NULL)
		return SASL_BEGIN_FAILED;
	if (mech_is_plain(mech)) {
		sc->plain = 1;
		sc->at.cr = cr;
		sc->complete = sasl_ir;
		if (str_adds(args, "PLAIN") != 0 || (sasl_ir &&
		    (str_adds(args, " ") != 0 || plain_response(cr, args) != 0))) {
			sasl_client_end(sc);
			return SASL_BEGIN_FAILED;
		}
		*out = sc;
		return SASL_BEGIN_OK;
	}
	if (attempt_start(&sc->at, host, cr) != 0) {
		sasl_client_end(sc);
		return SASL_BEGIN_FAILED;
	}
	rc = sasl_client_start(sc->at.conn, mech, NULL, sasl_ir ? &ir : NULL,
	    sasl_ir ? &irlen : NULL, &chosen);
	if (rc != SASL_OK && rc != SASL_CONTINUE) {
		sasl_client_end(sc);
		return SASL_BEGIN_NOMECH;
	}
	/* A server-first mechanism has no initial response even with SASL-IR. */
	sc->complete = ir != NULL && rc == SASL_OK;
	if (str_adds(args, chosen) != 0 || (ir != NULL &&
	    (str_adds(args, " ") != 0 || add_base64(args, ir, irlen, 1) != 0))) {
		sasl_client_end(sc);
		return SASL_BEGIN_FAILED;
	}
	*out = sc;
	return SASL_BEGIN_OK;
}

/*
 * PLAIN without SASL-IR: the server's one challenge, empty, is answered
 * with the message; anything else is not PLAIN.
 */
static int
plain_answer(struct sasl_client *sc, size_t chal_len, struct str *line,
    char *why, size_t whylen)
{
	if (sc->complete || chal_len != 0) {
		snprintf(why, whylen, "unexpected challenge to PLAIN");
		return -1;
	}
	if (plain_response(sc->at.cr, line) != 0 ||
	    str_add(line, "\r\n", 2) != 0) {
		snprintf(why, whylen, "out of memory");
		return -1;
	}
	sc->complete = 1;
	return 0;
}

/*
 * The answer to a server challenge (base64, as it came after "+ "), as
 * the base64 line to send, CRLF included.  -1 with why set when the
 * challenge is malformed or libsasl2 refuses it: the caller cancels.
 */
int
sasl_client_answer(struct sasl_client *sc, const char *chal, size_t len,
    struct str *line, char *why, size_t whylen)
{
	size_t cap = len / 4 * 3 + 1, declen;
	char *dec;
	const char *out = NULL;
	unsigned outlen = 0;
	int rc = -1, st;

	if (sc->plain)
		return plain_answer(sc, len, line, why, whylen);
	if ((dec = malloc(cap)) == NULL ||
	    base64_decode(chal, len, dec, cap, &declen) != 0)
		snprintf(why, whylen, "malformed base64 challenge");
	else if ((st = sasl_client_step(sc->at.conn, dec, (unsigned)declen,
	    NULL, &out, &outlen)) != SASL_OK && st != SASL_CONTINUE)
		snprintf(why, whylen, "SASL: %s", sasl_errstring(st, NULL,
		    NULL));
	else if (add_base64(line, out, outlen, 0) != 0 ||
	    str_add(line, "\r\n", 2) != 0)
		snprintf(why, whylen, "out of memory");
	else {
		sc->complete = st == SASL_OK;
		rc = 0;
	}
	if (dec != NULL) {
		wipe(dec, cap);	/* the whole allocation, not what decoded */
		free(dec);
	}
	return rc;
}

/* Has the client side of the exchange finished (its last message sent)? */
int
sasl_client_complete(const struct sasl_client *sc)
{
	return sc->complete;
}

void
sasl_client_end(struct sasl_client *sc)
{
	if (sc == NULL)
		return;
	attempt_release(&sc->at);
	free(sc);
}
