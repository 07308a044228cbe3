/*
 * Directory lookups: which server holds a user's mailbox, as the site's
 * LDAP directory says (mailHost and the like), with OpenLDAP's libldap.
 *
 * One lookup per login, so each costs as little as the directory allows:
 * no bind at all when no bind DN is configured (one search, one round
 * trip), no schema or root DSE reads.  Every server in ldap_uri is tried
 * in order with its own connect and search timeouts; what one of them
 * answers decides, unless it fails.  The caller checks that the answer
 * names a configured back-end.
 */
#include <sys/socket.h>

#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <syslog.h>

#include <ldap.h>
#include <sasl/sasl.h>

#include "imapfe.h"

#define DEFAULT_IMAP_PORT	"143"

/* ------------------------------------------------------------------ */
/* libldap, opened at run time */

/*
 * libldap is opened only when the configuration names a directory
 * (ldap_uri): linked, it and the GnuTLS it brings would double the
 * start-up cost of every process a super-server execs.  Opened once, at
 * start, before a chroot or the change of user; never closed.
 */
static struct {
	__typeof__(ldap_set_option)	*set_option;
	__typeof__(ldap_value_free_len)	*value_free_len;
	__typeof__(ldap_err2string)	*err2string;
	__typeof__(ldap_unbind_ext_s)	*unbind_ext_s;
	__typeof__(ldap_start_tls_s)	*start_tls_s;
	__typeof__(ldap_search_ext_s)	*search_ext_s;
	__typeof__(ldap_sasl_interactive_bind_s)	*sasl_interactive_bind_s;
	__typeof__(ldap_sasl_bind_s)	*sasl_bind_s;
	__typeof__(ldap_msgfree)	*msgfree;
	__typeof__(ldap_memfree)	*memfree;
	__typeof__(ldap_initialize)	*initialize;
	__typeof__(ldap_get_values_len)	*get_values_len;
	__typeof__(ldap_get_option)	*get_option;
	__typeof__(ldap_first_entry)	*first_entry;
	__typeof__(ldap_count_entries)	*count_entries;
	__typeof__(ber_sockbuf_add_io)	*sockbuf_add_io;
	__typeof__(ber_sockbuf_ctrl)	*sockbuf_ctrl;
} lib;

#define SYMBOL(field, name) \
	((*(void **)(void *)&lib.field = dlsym(handle, #name)) != NULL)

int
directory_library_load(char *err, size_t errlen)
{
	void *handle;

	if (lib.initialize != NULL)
		return 0;
	if ((handle = dlopen(LDAP_SONAME, RTLD_NOW | RTLD_LOCAL)) == NULL) {
		snprintf(err, errlen, "ldap_uri needs %s: %s", LDAP_SONAME,
		    dlerror());
		return -1;
	}
	if (
	    SYMBOL(set_option, ldap_set_option) &&
	    SYMBOL(value_free_len, ldap_value_free_len) &&
	    SYMBOL(err2string, ldap_err2string) &&
	    SYMBOL(unbind_ext_s, ldap_unbind_ext_s) &&
	    SYMBOL(start_tls_s, ldap_start_tls_s) &&
	    SYMBOL(search_ext_s, ldap_search_ext_s) &&
	    SYMBOL(sasl_interactive_bind_s, ldap_sasl_interactive_bind_s) &&
	    SYMBOL(sasl_bind_s, ldap_sasl_bind_s) &&
	    SYMBOL(msgfree, ldap_msgfree) &&
	    SYMBOL(memfree, ldap_memfree) &&
	    SYMBOL(initialize, ldap_initialize) &&
	    SYMBOL(get_values_len, ldap_get_values_len) &&
	    SYMBOL(get_option, ldap_get_option) &&
	    SYMBOL(first_entry, ldap_first_entry) &&
	    SYMBOL(count_entries, ldap_count_entries) &&
	    SYMBOL(sockbuf_add_io, ber_sockbuf_add_io) &&
	    SYMBOL(sockbuf_ctrl, ber_sockbuf_ctrl) &&
	    1)
		return 0;
	snprintf(err, errlen, "%s lacks a function imapfe uses: %s",
	    LDAP_SONAME, dlerror());
	memset(&lib, 0, sizeof(lib));
	return -1;
}

/* ------------------------------------------------------------------ */
/* filters (RFC 4515) */

/*
 * Append a user name as an assertion value: the filter's special bytes
 * (RFC 4515 section 3: '*', '(', ')', '\', NUL) and, for readable logs
 * and no surprises in servers, every control byte as \XX.
 */
int
ldap_filter_escape(struct str *out, const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		int rc;

		if (c == '*' || c == '(' || c == ')' || c == '\\' || c < 0x20 ||
		    c == 0x7f)
			rc = str_printf(out, "\\%02x", c);
		else
			rc = str_add(out, &s[i], 1);
		if (rc != 0)
			return -1;
	}
	return 0;
}

/*
 * The search filter: the template with %u (the user name), %n (the part
 * before the last '@', or all of it), %d (the part after, or nothing)
 * escaped, and %% for '%'.  -1 for another '%' sequence or no memory.
 */
int
ldap_filter_compose(struct str *out, const char *tmpl, const char *user,
    size_t len)
{
	const char *at = memrchr(user, '@', len);
	size_t local = at != NULL ? (size_t)(at - user) : len;

	for (const char *p = tmpl; *p != '\0'; p++) {
		int rc;

		if (*p != '%') {
			rc = str_add(out, p, 1);
		} else if (*++p == 'u') {
			rc = ldap_filter_escape(out, user, len);
		} else if (*p == 'n') {
			rc = ldap_filter_escape(out, user, local);
		} else if (*p == 'd') {
			rc = at == NULL ? 0 : ldap_filter_escape(out, at + 1,
			    len - local - 1);
		} else if (*p == '%') {
			rc = str_add(out, "%", 1);
		} else
			return -1;
		if (rc != 0)
			return -1;
	}
	/* An empty result still needs a string to hand libldap. */
	return str_add(out, "", 0);
}

/* ------------------------------------------------------------------ */
/* configuration */

/*
 * A cheap shape check at load time: one parenthesized filter with
 * balanced parentheses.  The server judges the rest, and a filter it
 * refuses makes every lookup fail, loudly.
 */
static int
filter_is_plausible(const char *f)
{
	int depth = 0;

	if (*f != '(')
		return 0;
	for (; *f != '\0'; f++) {
		if (*f == '(')
			depth++;
		else if (*f == ')' && --depth == 0 && f[1] != '\0')
			return 0;	/* text after the closing parenthesis */
	}
	return depth == 0;
}

/* A template that composes into a plausible filter. */
static int
template_is_usable(const char *tmpl)
{
	struct str probe = { 0 };
	int ok = ldap_filter_compose(&probe, tmpl, "u@d", 3) == 0 &&
	    filter_is_plausible(probe.s);

	str_free(&probe);
	return ok;
}

static int
set_default(char **field, const char *val)
{
	if (*field != NULL)
		return 0;
	return (*field = strdup(val)) == NULL ? -1 : 0;
}

/*
 * Fill in the defaults, check the filter templates, and load the bind
 * password once at start, as proxy_password_file is.
 */
int
directory_check_config(struct config *cfg, char *err, size_t errlen)
{
	char why[300];

	if (set_default(&cfg->ldap_filter, "(uid=%u)") != 0 ||
	    set_default(&cfg->ldap_public_filter, "(cn=%u)") != 0 ||
	    set_default(&cfg->ldap_host_attribute, "mailHost") != 0) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	if (cfg->ldap_uri == NULL)
		return 0;
	if (directory_library_load(err, errlen) != 0)
		return -1;
	if (cfg->ldap_search_base == NULL) {
		snprintf(err, errlen, "ldap_uri needs ldap_search_base");
		return -1;
	}
	if (!template_is_usable(cfg->ldap_filter) ||
	    !template_is_usable(cfg->ldap_public_filter)) {
		snprintf(err, errlen, "ldap_filter or ldap_public_filter is not "
		    "a filter template (%%u, %%n, %%d, %%%%)");
		return -1;
	}
	if ((cfg->ldap_bind_dn == NULL) != (cfg->ldap_bind_password_file ==
	    NULL) && cfg->ldap_sasl_mech == NULL) {
		snprintf(err, errlen, "ldap_bind_dn and "
		    "ldap_bind_password_file go together");
		return -1;
	}
	if (cfg->ldap_bind_dn == NULL || cfg->ldap_sasl_mech != NULL)
		return 0;
	if ((cfg->ldap_bind = calloc(1, sizeof(*cfg->ldap_bind))) == NULL ||
	    credentials_load_password(cfg->ldap_bind, cfg->ldap_bind_dn,
	    cfg->ldap_bind_password_file, why, sizeof(why)) != 0) {
		snprintf(err, errlen, "ldap_bind_password_file %s",
		    cfg->ldap_bind ? why : "out of memory");
		return -1;
	}
	return 0;
}

/* ------------------------------------------------------------------ */
/* one server */

/*
 * Certificates are verified as for back-ends: the configured CA, the
 * name in the URI, no way to skip it.  NEWCTX makes the handle use these
 * settings rather than the process-wide ones (or ldap.conf's).
 */
static int
set_tls_options(LDAP *ld, const struct config *cfg)
{
	const char *ca = cfg->ldap_ca_file ? cfg->ldap_ca_file :
	    cfg->backend_ca_file;
	int demand = LDAP_OPT_X_TLS_DEMAND, server = 0;

	if (lib.set_option(ld, LDAP_OPT_X_TLS_REQUIRE_CERT, &demand) != 0)
		return -1;
	if (ca != NULL &&
	    lib.set_option(ld, LDAP_OPT_X_TLS_CACERTFILE, ca) != 0)
		return -1;
	if (ca == NULL && cfg->backend_ca_path != NULL &&
	    lib.set_option(ld, LDAP_OPT_X_TLS_CACERTDIR,
	    cfg->backend_ca_path) != 0)
		return -1;
	return lib.set_option(ld, LDAP_OPT_X_TLS_NEWCTX, &server);
}

/*
 * libldap's timeouts cover the TCP connect and each wait for an answer,
 * but its TLS handshake (ldaps://, StartTLS) retries a read that would
 * block without waiting or giving up: a server that accepts and never
 * speaks TLS would hold the login, and a CPU, until it closed.  A layer
 * under TLS makes every read and write wait at most ldap_timeout for the
 * socket and then fail for good.
 */
static ber_slen_t
wait_then(Sockbuf_IO_Desc *sbiod, void *buf, ber_len_t len, int writing)
{
	const struct timeval *tv = sbiod->sbiod_pvt;
	int64_t deadline = deadline_in((int)tv->tv_sec);
	struct pollfd pfd = { .events = writing ? POLLOUT : POLLIN };
	ber_socket_t fd;

	if (lib.sockbuf_ctrl(sbiod->sbiod_sb, LBER_SB_OPT_GET_FD, &fd) != 1)
		fd = -1;
	pfd.fd = fd;
	for (;;) {
		ber_slen_t n = writing ? LBER_SBIOD_WRITE_NEXT(sbiod, buf, len) :
		    LBER_SBIOD_READ_NEXT(sbiod, buf, len);
		int64_t left = deadline - now_ms();

		if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK) ||
		    fd < 0)
			return n;
		if (left <= 0 || poll(&pfd, 1, (int)left) == 0) {
			errno = ETIMEDOUT;
			return -1;
		}
	}
}

static ber_slen_t
timed_read(Sockbuf_IO_Desc *sbiod, void *buf, ber_len_t len)
{
	return wait_then(sbiod, buf, len, 0);
}

static ber_slen_t
timed_write(Sockbuf_IO_Desc *sbiod, void *buf, ber_len_t len)
{
	return wait_then(sbiod, buf, len, 1);
}

static int
timed_setup(Sockbuf_IO_Desc *sbiod, void *arg)
{
	sbiod->sbiod_pvt = arg;
	return 0;
}

static int
timed_ctrl(Sockbuf_IO_Desc *sbiod, int opt, void *arg)
{
	return LBER_SBIOD_CTRL_NEXT(sbiod, opt, arg);
}

static Sockbuf_IO timed_io = {
	.sbi_setup = timed_setup,
	.sbi_ctrl = timed_ctrl,
	.sbi_read = timed_read,
	.sbi_write = timed_write,
};

/* Each new connection gets the layer, just above the socket's own. */
static int
on_connect(LDAP *ld, Sockbuf *sb, LDAPURLDesc *srv, struct sockaddr *addr,
    struct ldap_conncb *cb)
{
	(void)ld;
	(void)srv;
	(void)addr;
	return lib.sockbuf_add_io(sb, &timed_io, LBER_SBIOD_LEVEL_PROVIDER + 1,
	    cb->lc_arg) == 0 ? 0 : -1;
}

static void
on_close(LDAP *ld, Sockbuf *sb, struct ldap_conncb *cb)
{
	(void)ld;
	(void)sb;
	(void)cb;
}

/* What a handle needs to time out: owned by the caller, outlives it. */
struct timeouts {
	struct timeval	 tv;
	ldap_conncb	 cb;
};

static int
set_options(LDAP *ld, const struct config *cfg, struct timeouts *t)
{
	int v3 = LDAP_VERSION3;

	t->tv.tv_sec = cfg->ldap_timeout;
	t->tv.tv_usec = 0;
	t->cb.lc_add = on_connect;
	t->cb.lc_del = on_close;
	t->cb.lc_arg = &t->tv;
	if (lib.set_option(ld, LDAP_OPT_PROTOCOL_VERSION, &v3) != 0 ||
	    lib.set_option(ld, LDAP_OPT_REFERRALS, LDAP_OPT_OFF) != 0 ||
	    lib.set_option(ld, LDAP_OPT_NETWORK_TIMEOUT, &t->tv) != 0 ||
	    lib.set_option(ld, LDAP_OPT_TIMEOUT, &t->tv) != 0 ||
	    lib.set_option(ld, LDAP_OPT_CONNECT_CB, &t->cb) != 0)
		return -1;
	return set_tls_options(ld, cfg);
}

/* SASL EXTERNAL and GSSAPI need no answers: take each default. */
static int
sasl_defaults(LDAP *ld, unsigned flags, void *defaults, void *prompts)
{
	(void)ld;
	(void)flags;
	(void)defaults;
	for (sasl_interact_t *in = prompts; in->id != SASL_CB_LIST_END; in++) {
		in->result = in->defresult ? in->defresult : "";
		in->len = (unsigned)strlen(in->result);
	}
	return LDAP_SUCCESS;
}

/* No bind without a DN or mechanism: the search goes out first. */
static int
bind_as_configured(LDAP *ld, const struct config *cfg)
{
	struct berval pw;

	if (cfg->ldap_sasl_mech != NULL)
		return lib.sasl_interactive_bind_s(ld, NULL,
		    cfg->ldap_sasl_mech, NULL, NULL, LDAP_SASL_QUIET,
		    sasl_defaults, NULL);
	if (cfg->ldap_bind == NULL)
		return LDAP_SUCCESS;
	pw.bv_val = cfg->ldap_bind->pass;
	pw.bv_len = cfg->ldap_bind->pass_len;
	return lib.sasl_bind_s(ld, cfg->ldap_bind_dn, LDAP_SASL_SIMPLE, &pw,
	    NULL, NULL, NULL);
}

/* The first value of attr, or NULL; *count says how many there were. */
static struct berval **
values_of(LDAP *ld, LDAPMessage *entry, const char *attr)
{
	struct berval **v;

	if (attr == NULL)
		return NULL;
	v = lib.get_values_len(ld, entry, attr);
	if (v != NULL && v[0] == NULL) {
		lib.value_free_len(v);
		v = NULL;
	}
	return v;
}

/* Host and port from the one entry found. */
static enum dir_status
read_entry(LDAP *ld, LDAPMessage *entry, const struct config *cfg,
    char *host, char *port, char *why, size_t whylen)
{
	struct berval **hv = values_of(ld, entry, cfg->ldap_host_attribute);
	struct berval **pv = values_of(ld, entry, cfg->ldap_port_attribute);
	enum dir_status st = DIR_FOUND;

	port[0] = '\0';
	if (hv == NULL) {
		snprintf(why, whylen, "the entry has no %s",
		    cfg->ldap_host_attribute);
		st = DIR_UNKNOWN;
	} else if (hostport_parse(hv[0]->bv_val, hv[0]->bv_val + hv[0]->bv_len,
	    host, DIR_HOST_MAX, port, DIR_PORT_MAX) != 0) {
		snprintf(why, whylen, "unusable %s value",
		    cfg->ldap_host_attribute);
		st = DIR_UNAVAILABLE;
	} else if (port[0] == '\0' && pv != NULL) {
		if (!port_is_valid(pv[0]->bv_val, pv[0]->bv_len)) {
			snprintf(why, whylen, "unusable %s value",
			    cfg->ldap_port_attribute);
			st = DIR_UNAVAILABLE;
		} else {
			memcpy(port, pv[0]->bv_val, pv[0]->bv_len);
			port[pv[0]->bv_len] = '\0';
		}
	}
	if (st == DIR_FOUND && port[0] == '\0')
		memcpy(port, DEFAULT_IMAP_PORT, sizeof(DEFAULT_IMAP_PORT));
	if (hv != NULL)
		lib.value_free_len(hv);
	if (pv != NULL)
		lib.value_free_len(pv);
	return st;
}

/* What one search answered: no entry, exactly one, or trouble. */
static enum dir_status
read_result(LDAP *ld, LDAPMessage *res, const struct config *cfg,
    char *host, char *port, char *why, size_t whylen)
{
	int n = lib.count_entries(ld, res);

	if (n == 0) {
		snprintf(why, whylen, "no entry");
		return DIR_UNKNOWN;
	}
	if (n != 1) {
		snprintf(why, whylen, n > 1 ? "more than one entry matches" :
		    "unreadable answer");
		return DIR_UNAVAILABLE;
	}
	return read_entry(ld, lib.first_entry(ld, res), cfg, host, port,
	    why, whylen);
}

static enum dir_status
search_one(LDAP *ld, const struct config *cfg, const char *filter,
    char *host, char *port, char *why, size_t whylen)
{
	char *attrs[3] = { cfg->ldap_host_attribute, cfg->ldap_port_attribute,
	    NULL };
	struct timeval tv = { cfg->ldap_timeout, 0 };
	LDAPMessage *res = NULL;
	enum dir_status st;
	int rc;

	/* Size limit 2: enough to tell one entry from an ambiguous filter. */
	rc = lib.search_ext_s(ld, cfg->ldap_search_base, LDAP_SCOPE_SUBTREE,
	    filter, attrs, 0, NULL, NULL, &tv, 2, &res);
	if (rc == LDAP_SUCCESS)
		st = read_result(ld, res, cfg, host, port, why, whylen);
	else if (rc == LDAP_SIZELIMIT_EXCEEDED) {
		snprintf(why, whylen, "more than one entry matches");
		st = DIR_UNAVAILABLE;
	} else if (rc == LDAP_NO_SUCH_OBJECT) {
		snprintf(why, whylen, "search base not found");
		st = DIR_UNAVAILABLE;
	} else {
		snprintf(why, whylen, "search: %s", lib.err2string(rc));
		st = DIR_UNAVAILABLE;
	}
	lib.msgfree(res);
	return st;
}

static int
uri_is_plain(const char *uri)
{
	return strncasecmp(uri, "ldap://", 7) == 0;
}

/* The step, libldap's message, and its diagnostic (a TLS error, say). */
static void
describe_failure(LDAP *ld, const char *step, int rc, char *why,
    size_t whylen)
{
	char *diag = NULL, clean[160];

	if (ld != NULL)
		lib.get_option(ld, LDAP_OPT_DIAGNOSTIC_MESSAGE, &diag);
	if (diag != NULL && *diag != '\0') {
		sanitize(clean, sizeof(clean), diag, strlen(diag));
		snprintf(why, whylen, "%s: %s: %s", step, lib.err2string(rc),
		    clean);
	} else
		snprintf(why, whylen, "%s: %s", step, lib.err2string(rc));
	lib.memfree(diag);
}

static enum dir_status
lookup_at(const struct config *cfg, const char *uri, const char *filter,
    char *host, char *port, char *why, size_t whylen)
{
	enum dir_status st = DIR_UNAVAILABLE;
	const char *step = "setup";
	struct timeouts t;
	LDAP *ld = NULL;
	int rc;

	if ((rc = lib.initialize(&ld, uri)) != LDAP_SUCCESS)
		goto fail;
	if (set_options(ld, cfg, &t) != 0) {
		rc = LDAP_OTHER;
		goto fail;
	}
	step = "starttls";
	if (cfg->ldap_starttls && uri_is_plain(uri) &&
	    (rc = lib.start_tls_s(ld, NULL, NULL)) != LDAP_SUCCESS)
		goto fail;
	step = "bind";
	if ((rc = bind_as_configured(ld, cfg)) != LDAP_SUCCESS)
		goto fail;
	st = search_one(ld, cfg, filter, host, port, why, whylen);
	lib.unbind_ext_s(ld, NULL, NULL);
	return st;
fail:
	describe_failure(ld, step, rc, why, whylen);
	if (ld != NULL)
		lib.unbind_ext_s(ld, NULL, NULL);
	return st;
}

/* ------------------------------------------------------------------ */
/* the lookup */

/*
 * The server for key (a user, or a public prefix) as the filter template
 * tmpl finds it, from the first directory server
 * that answers.  A server that fails is logged and the next one tried.
 */
enum dir_status
directory_lookup(const struct config *cfg, const char *tmpl, const char *key,
    char host[DIR_HOST_MAX], char port[DIR_PORT_MAX], char *why,
    size_t whylen)
{
	enum dir_status st = DIR_UNAVAILABLE;
	struct str filter = { 0 };
	char *uris, *uri, *save = NULL;

	snprintf(why, whylen, "no ldap_uri");
	if (ldap_filter_compose(&filter, tmpl, key, strlen(key)) != 0 || (uris = strdup(cfg->ldap_uri)) == NULL) {
		str_free(&filter);
		snprintf(why, whylen, "out of memory");
		return DIR_UNAVAILABLE;
	}
	for (uri = strtok_r(uris, " \t,", &save); uri != NULL;
	    uri = strtok_r(NULL, " \t,", &save)) {
		st = lookup_at(cfg, uri, filter.s, host, port, why, whylen);
		if (st != DIR_UNAVAILABLE)
			break;
		log_msg(LOG_ERR, "event=ldap-failed uri=\"%s\" reason=\"%s\"",
		    uri, why);
	}
	free(uris);
	str_free(&filter);
	return st;
}
