/*
 * TLS contexts: the one imapfe presents to clients (certificate, protocol
 * floor, session tickets shared by every process through a key file) and
 * the ones it uses towards back-ends (always verified).  The handshakes and
 * the record I/O themselves live in iobuf.c, beside the plain I/O.
 */
#include <sys/stat.h>

#include <arpa/inet.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "imapfe.h"

/*
 * Ticket keys: 80 bytes each, as nginx lays them out (name, HMAC secret,
 * AES key), so one "openssl rand 80" file can serve both.  The first key
 * seals new tickets; the others still open tickets sealed before the admin
 * rotated the file.
 */
#define TICKET_KEY_LEN	80
#define TICKET_KEYS_MAX	8

struct ticket_key {
	unsigned char	 name[16];
	unsigned char	 hmac[32];
	unsigned char	 aes[32];
};

/*
 * A context's keys, hung on it (ex_data) and freed with it: a listener
 * that reloads holds the old context and the new one at once, and each
 * must seal with its own keys.
 */
struct ticket_keys {
	struct ticket_key	 key[TICKET_KEYS_MAX];
	int			 count;
};

static int ticket_keys_index = -1;

/* The most useful words OpenSSL has about what just failed, then clear. */
void
tls_error_text(char *buf, size_t len)
{
	unsigned long e = ERR_peek_last_error();
	const char *reason = e != 0 ? ERR_reason_error_string(e) : NULL;

	if (reason != NULL)
		snprintf(buf, len, "%s", reason);
	else if (e != 0)
		snprintf(buf, len, "OpenSSL error %lx", e);
	else
		snprintf(buf, len, "unknown TLS error");
	ERR_clear_error();
}

static void
ticket_keys_free(struct ticket_keys *tk)
{
	if (tk == NULL)
		return;
	wipe(tk, sizeof(*tk));
	free(tk);
}

static int
ticket_keys_load(struct ticket_keys *tk, const char *path, char *err,
    size_t errlen)
{
	unsigned char raw[TICKET_KEY_LEN * TICKET_KEYS_MAX + 1];
	struct stat st;
	ssize_t n;
	size_t got = 0;
	int fd;

	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) == 0 && (st.st_mode & 077) != 0)
		log_msg(LOG_WARNING, "event=warning reason=\"%s is accessible "
		    "to group or others: whoever reads it can impersonate this "
		    "server to resuming clients (and decrypt TLS 1.2 sessions "
		    "resumed with its tickets)\"", path);
	while (got < sizeof(raw) &&
	    (n = read(fd, raw + got, sizeof(raw) - got)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		got += (size_t)n;
	}
	close(fd);
	if (got == 0 || got % TICKET_KEY_LEN != 0 || got > sizeof(raw) - 1) {
		snprintf(err, errlen, "%s: want 1 to %d keys of %d bytes "
		    "(openssl rand %d), found %zu bytes", path,
		    TICKET_KEYS_MAX, TICKET_KEY_LEN, TICKET_KEY_LEN, got);
		wipe(raw, sizeof(raw));
		return -1;
	}
	tk->count = (int)(got / TICKET_KEY_LEN);
	for (int i = 0; i < tk->count; i++) {
		const unsigned char *k = raw + i * TICKET_KEY_LEN;

		memcpy(tk->key[i].name, k, 16);
		memcpy(tk->key[i].hmac, k + 16, 32);
		memcpy(tk->key[i].aes, k + 48, 32);
	}
	wipe(raw, sizeof(raw));
	return 0;
}

static int
ticket_mac_init(EVP_MAC_CTX *mac, const struct ticket_key *k)
{
	OSSL_PARAM params[] = {
		OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY,
		    (void *)k->hmac, sizeof(k->hmac)),
		OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
		    (char *)"SHA256", 0),
		OSSL_PARAM_construct_end()
	};

	return EVP_MAC_CTX_set_params(mac, params);
}

/*
 * OpenSSL asks this to seal (enc = 1) or open (enc = 0) a ticket.  Returns
 * 1 to go on, 2 to accept a ticket but issue a fresh one (it was sealed
 * with an older key), 0 to ignore the ticket (full handshake), -1 on error.
 */
static int
ticket_cb(SSL *ssl, unsigned char name[16], unsigned char iv[16],
    EVP_CIPHER_CTX *cipher, EVP_MAC_CTX *mac, int enc)
{
	const struct ticket_keys *tk = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl),
	    ticket_keys_index);

	if (tk == NULL || tk->count == 0)
		return enc ? -1 : 0;
	if (enc) {
		const struct ticket_key *k = &tk->key[0];

		if (RAND_bytes(iv, 16) != 1 ||
		    EVP_EncryptInit_ex(cipher, EVP_aes_256_cbc(), NULL, k->aes,
		    iv) != 1 || ticket_mac_init(mac, k) != 1)
			return -1;
		memcpy(name, k->name, 16);
		return 1;
	}
	for (int i = 0; i < tk->count; i++) {
		const struct ticket_key *k = &tk->key[i];

		if (memcmp(name, k->name, 16) != 0)
			continue;
		if (ticket_mac_init(mac, k) != 1 ||
		    EVP_DecryptInit_ex(cipher, EVP_aes_256_cbc(), NULL, k->aes,
		    iv) != 1)
			return -1;
		return i == 0 ? 1 : 2;
	}
	return 0;
}

static int
load_cert_and_key(SSL_CTX *ctx, const char *cert, const char *key,
    char *err, size_t errlen)
{
	char why[160];

	if (access(cert, R_OK) != 0 || access(key, R_OK) != 0) {
		const char *f = access(cert, R_OK) != 0 ? cert : key;

		snprintf(err, errlen, "%s: %s", f, strerror(errno));
		return -1;
	}
	if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
		tls_error_text(why, sizeof(why));
		snprintf(err, errlen, "%s: %s", cert, why);
		return -1;
	}
	if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
	    SSL_CTX_check_private_key(ctx) != 1) {
		tls_error_text(why, sizeof(why));
		snprintf(err, errlen, "%s: %s", key, why);
		return -1;
	}
	return 0;
}

static void
common_options(SSL_CTX *ctx)
{
	/*
	 * Partial writes and moving buffers suit the non-blocking iobuf;
	 * releasing idle buffers matters when thousands of processes each
	 * hold a connection open.
	 */
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
	    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
	/*
	 * IMAP frames its own data, so a peer that closes TCP without a TLS
	 * close_notify (most clients do) has truncated nothing: treat it as an
	 * ordinary end of stream rather than an error.
	 */
	SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION |
	    SSL_OP_NO_COMPRESSION | SSL_OP_IGNORE_UNEXPECTED_EOF);
}

/* Load the ticket keys of path and hang them on ctx. */
static int
ticket_keys_attach(SSL_CTX *ctx, const char *path, char *err, size_t errlen)
{
	struct ticket_keys *tk;

	if (ticket_keys_index < 0 && (ticket_keys_index =
	    SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL)) < 0) {
		tls_error_text(err, errlen);
		return -1;
	}
	if ((tk = calloc(1, sizeof(*tk))) == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	if (ticket_keys_load(tk, path, err, errlen) != 0) {
		ticket_keys_free(tk);
		return -1;
	}
	if (SSL_CTX_set_ex_data(ctx, ticket_keys_index, tk) != 1) {
		snprintf(err, errlen, "%s: out of memory", path);
		ticket_keys_free(tk);
		return -1;
	}
	return 0;
}

/* The context clients handshake with; NULL and err on failure. */
SSL_CTX *
tls_server_ctx(const struct config *cfg, char *err, size_t errlen)
{
	static const unsigned char sid_ctx[] = "imapfe";
	SSL_CTX *ctx;

	if ((ctx = SSL_CTX_new(TLS_server_method())) == NULL) {
		tls_error_text(err, errlen);
		return NULL;
	}
	common_options(ctx);
	SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
	/* Every connection is a new process: a session cache helps nobody. */
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
	SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1);
	if (SSL_CTX_set_min_proto_version(ctx, cfg->tls_min_version) != 1 ||
	    (cfg->tls_ciphers != NULL &&
	    SSL_CTX_set_cipher_list(ctx, cfg->tls_ciphers) != 1)) {
		char why[160];

		tls_error_text(why, sizeof(why));
		snprintf(err, errlen, "tls_ciphers: %s", why);
		goto fail;
	}
	if (load_cert_and_key(ctx, cfg->tls_cert, cfg->tls_key, err,
	    errlen) != 0)
		goto fail;
	if (cfg->tls_ticket_key_file != NULL) {
		if (ticket_keys_attach(ctx, cfg->tls_ticket_key_file, err,
		    errlen) != 0)
			goto fail;
		SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_cb);
	} else {
		/* Per-process random ticket keys would only waste bytes. */
		SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
		SSL_CTX_set_num_tickets(ctx, 0);
	}
	return ctx;
fail:
	tls_server_ctx_free(ctx);
	return NULL;
}

void
tls_server_ctx_free(SSL_CTX *ctx)
{
	if (ctx == NULL)
		return;
	if (ticket_keys_index >= 0) {
		ticket_keys_free(SSL_CTX_get_ex_data(ctx, ticket_keys_index));
		SSL_CTX_set_ex_data(ctx, ticket_keys_index, NULL);
	}
	SSL_CTX_free(ctx);
}

/* The name the back-end's certificate must carry; "[v6]" loses brackets. */
static void
verify_name(const struct route *r, char *out, size_t outlen)
{
	const char *name = r->verify_name ? r->verify_name : r->host;
	size_t len = strlen(name);

	if (len >= 2 && name[0] == '[' && name[len - 1] == ']')
		snprintf(out, outlen, "%.*s", (int)(len - 2), name + 1);
	else
		snprintf(out, outlen, "%s", name);
}

/*
 * The TLS context for connections to route r's back-end: the CA to verify
 * it with and the client certificate to show it, loaded from their files.
 */
struct backend_tls_files {
	const char	*ca_file, *ca_path, *cert, *key;
};

/* A route's own CA or certificate replaces the global ones whole. */
static struct backend_tls_files
backend_tls_files(const struct config *cfg, const struct route *r)
{
	int own_ca = r->ca_file != NULL || r->ca_path != NULL;
	int own_cert = r->client_cert != NULL;

	return (struct backend_tls_files){
		.ca_file = own_ca ? r->ca_file : cfg->backend_ca_file,
		.ca_path = own_ca ? r->ca_path : cfg->backend_ca_path,
		.cert = own_cert ? r->client_cert : cfg->backend_client_cert,
		.key = own_cert ? r->client_key : cfg->backend_client_key,
	};
}

/*
 * Does route r's context read files of the configuration's when it is
 * made (a CA file, a client certificate)?  The system's CA store and a
 * CA directory need no such care: they are readable by all, or read as
 * certificates are verified anyway.
 */
int
tls_backend_ctx_reads_files(const struct config *cfg, const struct route *r)
{
	struct backend_tls_files f = backend_tls_files(cfg, r);

	return f.ca_file != NULL || f.cert != NULL;
}

SSL_CTX *
tls_backend_ctx(const struct config *cfg, const struct route *r, char *err,
    size_t errlen)
{
	struct backend_tls_files f = backend_tls_files(cfg, r);
	const char *ca_file = f.ca_file, *ca_path = f.ca_path;
	const char *cert = f.cert, *key = f.key;
	SSL_CTX *ctx;
	int ok;

	if ((ctx = SSL_CTX_new(TLS_client_method())) == NULL) {
		tls_error_text(err, errlen);
		return NULL;
	}
	common_options(ctx);
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	ok = SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) == 1;
	if (ok && (ca_file != NULL || ca_path != NULL))
		ok = SSL_CTX_load_verify_locations(ctx, ca_file, ca_path) == 1;
	else if (ok)
		ok = SSL_CTX_set_default_verify_paths(ctx) == 1;
	if (!ok) {
		char why[160];

		tls_error_text(why, sizeof(why));
		snprintf(err, errlen, "CA %s: %s", ca_file ? ca_file :
		    ca_path ? ca_path : "(system default)", why);
		SSL_CTX_free(ctx);
		return NULL;
	}
	if (cert != NULL && load_cert_and_key(ctx, cert, key ? key : cert,
	    err, errlen) != 0) {
		SSL_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}

/*
 * Do routes a and b load the same files for their back-end contexts?
 * Then they can share one.
 */
static int
same_string(const char *a, const char *b)
{
	return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

int
tls_backend_ctx_shareable(const struct route *a, const struct route *b)
{
	return same_string(a->ca_file, b->ca_file) &&
	    same_string(a->ca_path, b->ca_path) &&
	    same_string(a->client_cert, b->client_cert) &&
	    same_string(a->client_key, b->client_key);
}

/*
 * A connection object for the back-end of route r, with verification of
 * the certificate against the route's CA and name already set up.  The
 * context is the route's preloaded one (files read before privileges were
 * dropped), or is loaded now.
 */
SSL *
tls_backend_ssl(const struct config *cfg, const struct route *r, char *err,
    size_t errlen)
{
	char name[256];
	unsigned char addr[16];
	SSL_CTX *ctx = r->ssl_ctx;
	SSL *ssl;
	int ok;

	if (ctx != NULL)
		SSL_CTX_up_ref(ctx);
	else if ((ctx = tls_backend_ctx(cfg, r, err, errlen)) == NULL)
		return NULL;
	if ((ssl = SSL_new(ctx)) == NULL) {
		tls_error_text(err, errlen);
		goto out;
	}
	verify_name(r, name, sizeof(name));
	if (inet_pton(AF_INET, name, addr) == 1 ||
	    inet_pton(AF_INET6, name, addr) == 1)
		ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl),
		    name) == 1;
	else
		ok = SSL_set1_host(ssl, name) == 1 &&
		    SSL_set_tlsext_host_name(ssl, name) == 1;
	if (!ok) {
		snprintf(err, errlen, "cannot set the name to verify");
		SSL_free(ssl);
		ssl = NULL;
	}
out:
	SSL_CTX_free(ctx);	/* the SSL keeps its own reference */
	return ssl;
}
