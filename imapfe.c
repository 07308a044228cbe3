/*
 * imapfe: an IMAP front-end.  One process serves one client connection:
 * greet, authenticate, find the user's back-end, log in there, relay,
 * exit.  Started by inetd/xinetd/systemd on stdin and stdout, or by its
 * own listener (-l), which forks one child per connection.
 */
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>
#include <unistd.h>

#include "imapfe.h"

#define CLIENT_BUFSIZE		(64 * 1024)
#define PRELOGIN_COMMAND_MAX	(64 * 1024)	/* lines and literals */
#define LINGER_MS		2000		/* see client_linger_close() */
#define LINGER_MAX_BYTES	(1024 * 1024)

/* ------------------------------------------------------------------ */
/* configuration */

static void
config_defaults(struct config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->plaintext_auth = PLAINTEXT_NO;
	cfg->tls_min_version = TLS1_2_VERSION;
	cfg->tls_mode = TLS_STARTTLS;
	cfg->tls_handshake_timeout = 30;
	cfg->public_holddown = 30;
	cfg->referral_hops = 3;
	cfg->max_session_memory = 64;
	cfg->forward_id = 1;
	cfg->max_line_length = 8192;
	cfg->max_prelogin_literal = 4096;
	cfg->max_literal_size = 64 << 20;
	cfg->max_pipelined_commands = 64;
	cfg->max_id_pairs = 30;
	cfg->max_id_field = 30;
	cfg->max_id_value = 1024;
	cfg->max_login_failures = 3;
	cfg->max_bad_commands = 10;
	cfg->login_timeout = 120;
	cfg->idle_timeout = 1860;
	cfg->connect_timeout = 10;
	cfg->backend_timeout = 30;
	cfg->max_sessions = 1000;
	cfg->drain_timeout = 60;
	cfg->prefork = 1;
	cfg->syslog_facility = LOG_MAIL;
	cfg->proxy_protocol_timeout = 10;
	cfg->ldap_timeout = 5;
	cfg->auth_penalty = 1;
	cfg->auth_penalty_first = 2000;
	cfg->auth_penalty_max = 15000;
	cfg->client_ipv6_prefix = 64;
	cfg->max_sessions_per_ip = 0;		/* no limit */
	cfg->max_sessions_per_user = 0;
	cfg->backend_down_time = 10;
}

/* Split a configuration line into words; "..." quotes, \ escapes. */
static int
split_words(char *line, char **words, int max)
{
	int n = 0;
	char *p = line, *out;

	for (;;) {
		while (*p == ' ' || *p == '\t')
			p++;
		if (*p == '\0' || *p == '#')
			return n;
		if (n == max)
			return -1;
		if (*p != '"') {
			words[n++] = p;
			p += strcspn(p, " \t");
			if (*p != '\0')
				*p++ = '\0';
			continue;
		}
		words[n++] = out = ++p;
		while (*p != '"') {
			if (*p == '\0')
				return -1;
			if (*p == '\\' && p[1] != '\0')
				p++;
			*out++ = *p++;
		}
		p++;
		*out = '\0';
	}
}

static int
set_string(char **field, const char *val)
{
	char *s = strdup(val);

	if (s == NULL)
		return -1;
	free(*field);
	*field = s;
	return 0;
}

static int
parse_tls_mode(const char *v, enum tls_mode *out)
{
	if (strcmp(v, "none") == 0)
		*out = TLS_NONE;
	else if (strcmp(v, "starttls") == 0)
		*out = TLS_STARTTLS;
	else if (strcmp(v, "implicit") == 0)
		*out = TLS_IMPLICIT;
	else
		return -1;
	return 0;
}

/* One "key=value" option of a route line. */
static int
route_option(struct route *r, const char *opt, char *err, size_t errlen)
{
	static const struct { const char *key; size_t offset; } strings[] = {
		{ "name", offsetof(struct route, verify_name) },
		{ "ca_file", offsetof(struct route, ca_file) },
		{ "ca_path", offsetof(struct route, ca_path) },
		{ "client_cert", offsetof(struct route, client_cert) },
		{ "client_key", offsetof(struct route, client_key) },
	};
	const char *eq = strchr(opt, '=');
	size_t kl = eq ? (size_t)(eq - opt) : 0;

	if (eq == NULL || eq[1] == '\0')
		goto bad;
	if (kl == 5 && strncmp(opt, "order", 5) == 0) {
		if (strcmp(eq + 1, "hash") == 0 || strcmp(eq + 1, "first") == 0) {
			r->hash_order = eq[1] == 'h';
			return 0;
		}
		snprintf(err, errlen, "order= takes first or hash");
		return -1;
	}
	if (kl == 3 && strncmp(opt, "tls", 3) == 0) {
		if (parse_tls_mode(eq + 1, &r->tls) == 0)
			return 0;
		snprintf(err, errlen, "tls= takes none, starttls or implicit");
		return -1;
	}
	for (size_t i = 0; i < sizeof(strings) / sizeof(*strings); i++)
		if (strlen(strings[i].key) == kl &&
		    strncmp(opt, strings[i].key, kl) == 0)
			return set_string((char **)(void *)((char *)r +
			    strings[i].offset), eq + 1);
bad:
	snprintf(err, errlen, "unknown route option '%s'", opt);
	return -1;
}

static void
route_free(struct route *r)
{
	if (r->alt != NULL)
		route_free(r->alt);
	free(r->pattern);
	free(r->host);
	free(r->port);
	free(r->verify_name);
	free(r->ca_file);
	free(r->ca_path);
	free(r->client_cert);
	free(r->client_key);
	SSL_CTX_free(r->ssl_ctx);
	free(r);
}

/* Which list a route, public or server line goes to. */
static void
route_lists(struct config *cfg, const char *kind, struct route ***head,
    struct route ***tail)
{
	if (strcmp(kind, "public") == 0) {
		*head = &cfg->publics;
		*tail = &cfg->publics_tail;
	} else if (strcmp(kind, "server") == 0) {
		*head = &cfg->servers;
		*tail = &cfg->servers_tail;
	} else {
		*head = &cfg->routes;
		*tail = &cfg->routes_tail;
	}
}

static int
check_route_key(const char *kind, const char *key, char *err, size_t errlen)
{
	if (strcmp(kind, "public") == 0 && (key[0] == '\0' ||
	    strncasecmp(key, "INBOX", 5) == 0 ||
	    strpbrk(key, "*%\r\n") != NULL)) {
		snprintf(err, errlen, "public prefix must be a mailbox name "
		    "prefix without wildcards, not INBOX");
		return -1;
	}
	if (strcmp(kind, "route") == 0 && strcmp(key, "*") != 0 &&
	    strchr(key, '*') != NULL && strncmp(key, "*@", 2) != 0) {
		snprintf(err, errlen, "route pattern must be a user, *@domain "
		    "or *");
		return -1;
	}
	return 0;
}

/*
 * HOST:PORT, or for "public PREFIX ldap" (no options: the server the
 * directory names brings its own) a placeholder for the logs, never
 * connected to and never matched by listed_server().
 */
static int
route_target(struct route *r, const char *kind, const char *word,
    int noptions, char *err, size_t errlen)
{
	if (strcmp(kind, "public") != 0 || strcmp(word, "ldap") != 0)
		return split_hostport(word, 0, &r->host, &r->port, err, errlen);
	if (noptions != 0) {
		snprintf(err, errlen, "a public line takes HOST:PORT with "
		    "options, or ldap without");
		return -1;
	}
	if ((r->host = strdup("directory")) == NULL ||
	    (r->port = strdup("0")) == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	r->from_directory = 1;
	return 0;
}

/* One HOST:PORT of a line, with the line's options. */
static struct route *
route_new(const char *kind, const char *key, const char *target,
    char **opts, int nopts, char *err, size_t errlen)
{
	struct route *r;
	char why[128];

	if ((r = calloc(1, sizeof(*r))) == NULL ||
	    (r->pattern = strdup(key)) == NULL) {
		free(r);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	if (route_target(r, kind, target, nopts, why, sizeof(why)) != 0) {
		snprintf(err, errlen, "bad route target '%s': %s", target, why);
		route_free(r);
		return NULL;
	}
	for (int i = 0; i < nopts; i++)
		if (route_option(r, opts[i], err, errlen) != 0) {
			route_free(r);
			return NULL;
		}
	if (r->client_key != NULL && r->client_cert == NULL) {
		snprintf(err, errlen, "client_key= needs client_cert=");
		route_free(r);
		return NULL;
	}
	return r;
}

/*
 * "route PATTERN HOST:PORT ... [opt=val ...]", "public PREFIX HOST:PORT
 * ..." or "server HOST:PORT ...": the last names a back-end that no line
 * routes to but that a referral or a directory answer may lead to.
 * Several HOST:PORT are one service (a replicated pair, say), tried in
 * turn; each is its own route, chained by alt, with the line's options.
 */
static int
add_route(struct config *cfg, char **w, int n, char *err, size_t errlen)
{
	int server = strcmp(w[0], "server") == 0;
	int target = server ? 1 : 2, hosts = 1;
	const char *key = server ? "" : w[1];
	struct route *first, *r, **head, **tail;

	route_lists(cfg, w[0], &head, &tail);
	if (n < target + 1) {
		snprintf(err, errlen, "%s takes %sHOST:PORT ... [OPTION=VALUE "
		    "...]", w[0], server ? "" : strcmp(w[0], "public") == 0 ?
		    "PREFIX " : "PATTERN ");
		return -1;
	}
	if (check_route_key(w[0], key, err, errlen) != 0)
		return -1;
	while (target + hosts < n && strchr(w[target + hosts], '=') == NULL)
		hosts++;
	if ((first = route_new(w[0], key, w[target], w + target + hosts,
	    n - target - hosts, err, errlen)) == NULL)
		return -1;
	r = first;
	for (int i = 1; i < hosts; i++) {
		if (first->from_directory) {
			snprintf(err, errlen, "public PREFIX ldap names no "
			    "HOST:PORT");
			route_free(first);
			return -1;
		}
		if ((r->alt = route_new(w[0], key, w[target + i],
		    w + target + hosts, n - target - hosts, err, errlen)) ==
		    NULL) {
			route_free(first);
			return -1;
		}
		r = r->alt;
	}
	if (*tail != NULL)
		(*tail)->next = first;
	else
		*head = first;
	*tail = first;
	return 0;
}

struct int_key {
	const char	*name;
	size_t		 offset;
	long		 min;
	long		 max;
	int		 is_size;	/* size_t field, not int */
};

static const struct int_key int_keys[] = {
	{ "max_line_length", offsetof(struct config, max_line_length),
	    1024, 1048576, 1 },
	{ "max_prelogin_literal", offsetof(struct config,
	    max_prelogin_literal), 256, 65536, 1 },
	{ "max_literal_size", offsetof(struct config, max_literal_size),
	    65536, 4294967295L, 1 },
	{ "max_pipelined_commands", offsetof(struct config,
	    max_pipelined_commands), 1, 10000, 0 },
	/* RFC 2971's own bounds are the most that may be allowed. */
	{ "max_id_pairs", offsetof(struct config, max_id_pairs), 0, 30, 0 },
	{ "max_id_field", offsetof(struct config, max_id_field), 1, 30, 0 },
	{ "max_id_value", offsetof(struct config, max_id_value), 1, 1024, 0 },
	{ "max_login_failures", offsetof(struct config, max_login_failures),
	    1, 100000, 0 },
	{ "max_bad_commands", offsetof(struct config, max_bad_commands),
	    1, 1000, 0 },
	{ "login_timeout", offsetof(struct config, login_timeout), 1, 3600,
	    0 },
	{ "idle_timeout", offsetof(struct config, idle_timeout), 1, 86400,
	    0 },
	{ "connect_timeout", offsetof(struct config, connect_timeout), 1, 600,
	    0 },
	{ "backend_timeout", offsetof(struct config, backend_timeout), 1,
	    3600, 0 },
	{ "max_sessions", offsetof(struct config, max_sessions), 1, 100000,
	    0 },
	{ "drain_timeout", offsetof(struct config, drain_timeout), 0, 86400,
	    0 },
	{ "prefork", offsetof(struct config, prefork), 0, 1024, 0 },
	{ "tls_handshake_timeout", offsetof(struct config,
	    tls_handshake_timeout), 1, 600, 0 },
	{ "referral_hops", offsetof(struct config, referral_hops), 0,
	    REFERRAL_HOPS_MAX,
	    0 },
	{ "public_holddown", offsetof(struct config, public_holddown), 0,
	    86400, 0 },
	{ "max_session_memory", offsetof(struct config, max_session_memory),
	    0, 65536, 0 },
	{ "proxy_protocol_timeout", offsetof(struct config,
	    proxy_protocol_timeout), 1, 600, 0 },
	{ "ldap_timeout", offsetof(struct config, ldap_timeout), 1, 300, 0 },
	{ "auth_penalty_first", offsetof(struct config, auth_penalty_first),
	    1, 600000, 0 },
	{ "auth_penalty_max", offsetof(struct config, auth_penalty_max), 1,
	    3600000, 0 },
	{ "client_ipv6_prefix", offsetof(struct config, client_ipv6_prefix),
	    1, 128, 0 },
	{ "max_sessions_per_ip", offsetof(struct config,
	    max_sessions_per_ip), 0, 100000, 0 },
	{ "max_sessions_per_user", offsetof(struct config,
	    max_sessions_per_user), 0, 100000, 0 },
	{ "backend_down_time", offsetof(struct config, backend_down_time), 0,
	    86400, 0 },
};

/* Directives whose value is kept as given (file names, mostly). */
static const struct { const char *name; size_t offset; } string_keys[] = {
	{ "greeting", offsetof(struct config, greeting) },
	{ "backend_mechanisms", offsetof(struct config, backend_mechanisms) },
	{ "tls_cert", offsetof(struct config, tls_cert) },
	{ "tls_key", offsetof(struct config, tls_key) },
	{ "tls_ciphers", offsetof(struct config, tls_ciphers) },
	{ "tls_ticket_key_file", offsetof(struct config, tls_ticket_key_file) },
	{ "backend_ca_file", offsetof(struct config, backend_ca_file) },
	{ "backend_ca_path", offsetof(struct config, backend_ca_path) },
	{ "backend_client_cert", offsetof(struct config, backend_client_cert) },
	{ "backend_client_key", offsetof(struct config, backend_client_key) },
	{ "sasl_service", offsetof(struct config, sasl_service) },
	{ "sasl_config_path", offsetof(struct config, sasl_config_path) },
	{ "proxy_user", offsetof(struct config, proxy_user) },
	{ "proxy_password_file", offsetof(struct config, proxy_password_file) },
	{ "user", offsetof(struct config, run_user) },
	{ "group", offsetof(struct config, run_group) },
	{ "chroot", offsetof(struct config, chroot_dir) },
	{ "ldap_uri", offsetof(struct config, ldap_uri) },
	{ "ldap_bind_dn", offsetof(struct config, ldap_bind_dn) },
	{ "ldap_bind_password_file", offsetof(struct config,
	    ldap_bind_password_file) },
	{ "ldap_sasl_mech", offsetof(struct config, ldap_sasl_mech) },
	{ "ldap_search_base", offsetof(struct config, ldap_search_base) },
	{ "ldap_filter", offsetof(struct config, ldap_filter) },
	{ "ldap_public_filter", offsetof(struct config, ldap_public_filter) },
	{ "ldap_host_attribute", offsetof(struct config, ldap_host_attribute) },
	{ "ldap_port_attribute", offsetof(struct config, ldap_port_attribute) },
	{ "ldap_ca_file", offsetof(struct config, ldap_ca_file) },
	{ "state_file", offsetof(struct config, state_file) },
};

static int
set_int_key(struct config *cfg, const struct int_key *k, const char *val,
    char *err, size_t errlen)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(val, &end, 10);
	if (errno != 0 || *end != '\0' || end == val || v < k->min ||
	    v > k->max) {
		snprintf(err, errlen, "%s must be a number from %ld to %ld",
		    k->name, k->min, k->max);
		return -1;
	}
	if (k->is_size)
		*(size_t *)(void *)((char *)cfg + k->offset) = (size_t)v;
	else
		*(int *)(void *)((char *)cfg + k->offset) = (int)v;
	return 0;
}

static int
parse_bool(const char *v, int *out)
{
	if (strcmp(v, "yes") == 0 || strcmp(v, "true") == 0) {
		*out = 1;
		return 0;
	}
	if (strcmp(v, "no") == 0 || strcmp(v, "false") == 0) {
		*out = 0;
		return 0;
	}
	return -1;
}

static int
parse_facility(const char *v, int *out)
{
	static const struct { const char *name; int val; } fac[] = {
		{ "mail", LOG_MAIL }, { "daemon", LOG_DAEMON },
		{ "auth", LOG_AUTH }, { "authpriv", LOG_AUTHPRIV },
		{ "local0", LOG_LOCAL0 }, { "local1", LOG_LOCAL1 },
		{ "local2", LOG_LOCAL2 }, { "local3", LOG_LOCAL3 },
		{ "local4", LOG_LOCAL4 }, { "local5", LOG_LOCAL5 },
		{ "local6", LOG_LOCAL6 }, { "local7", LOG_LOCAL7 },
	};

	for (size_t i = 0; i < sizeof(fac) / sizeof(*fac); i++)
		if (strcmp(v, fac[i].name) == 0) {
			*out = fac[i].val;
			return 0;
		}
	return -1;
}

/* proxy_protocol_trusted or auth_penalty_exempt CIDR...: may repeat. */
static int
add_cidr_list(struct cidr **list, size_t *n, char **w, int nw, char *err,
    size_t errlen)
{
	struct cidr *grown;

	if (nw < 2) {
		snprintf(err, errlen, "%s takes one or more ADDRESS/BITS", w[0]);
		return -1;
	}
	grown = realloc(*list, (*n + (size_t)nw - 1) * sizeof(*grown));
	if (grown == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	*list = grown;
	for (int i = 1; i < nw; i++) {
		if (cidr_parse(w[i], &grown[*n]) != 0) {
			snprintf(err, errlen, "bad address block for %s: '%s'",
			    w[0], w[i]);
			return -1;
		}
		(*n)++;
	}
	return 0;
}

/* "route_order SOURCE ...": each source at most once. */
static int
set_route_order(struct config *cfg, char **w, int n, char *err,
    size_t errlen)
{
	/* In enum route_source's order. */
	static const char *const names[] = { "routes", "user", "domain",
	    "default", "ldap" };
	unsigned seen = 0;

	if (n < 2 || n - 1 > ROUTE_SOURCES_MAX)
		goto bad;
	for (int i = 1; i < n; i++) {
		size_t k = 0;

		while (k < sizeof(names) / sizeof(*names) &&
		    strcmp(w[i], names[k]) != 0)
			k++;
		if (k == sizeof(names) / sizeof(*names) || (seen & (1u << k)))
			goto bad;
		seen |= 1u << k;
		cfg->route_order[i - 1] = (enum route_source)k;
	}
	cfg->route_order_len = (size_t)(n - 1);
	return 0;
bad:
	snprintf(err, errlen, "route_order takes routes, user, domain, "
	    "default and ldap, each at most once");
	return -1;
}

/* "ldap_uri URI [URI ...]": kept space-separated, in order. */
static int
set_ldap_uri(struct config *cfg, char **w, int n, char *err, size_t errlen)
{
	struct str all = { 0 };
	int ok = n >= 2;

	for (int i = 1; ok && i < n; i++)
		ok = (strncasecmp(w[i], "ldap://", 7) == 0 ||
		    strncasecmp(w[i], "ldaps://", 8) == 0 ||
		    strncasecmp(w[i], "ldapi://", 8) == 0) &&
		    str_printf(&all, "%s%s", i > 1 ? " " : "", w[i]) == 0;
	if (!ok) {
		str_free(&all);
		snprintf(err, errlen, "ldap_uri takes ldap://, ldaps:// or "
		    "ldapi:// URIs");
		return -1;
	}
	free(cfg->ldap_uri);
	cfg->ldap_uri = all.s;
	return 0;
}

static int
config_line(struct config *cfg, char **w, int n, char *err, size_t errlen)
{
	if (strcmp(w[0], "route") == 0 || strcmp(w[0], "public") == 0 ||
	    strcmp(w[0], "server") == 0)
		return add_route(cfg, w, n, err, errlen);
	if (strcmp(w[0], "proxy_protocol_trusted") == 0)
		return add_cidr_list(&cfg->proxy_trusted, &cfg->proxy_trusted_n,
		    w, n, err, errlen);
	if (strcmp(w[0], "auth_penalty_exempt") == 0) {
		/* given, even as "none": the loopback default is replaced */
		cfg->auth_penalty_exempt_set = 1;
		if (n == 2 && strcmp(w[1], "none") == 0)
			return 0;
		return add_cidr_list(&cfg->auth_penalty_exempt,
		    &cfg->auth_penalty_exempt_n, w, n, err, errlen);
	}
	if (strcmp(w[0], "route_order") == 0)
		return set_route_order(cfg, w, n, err, errlen);
	if (strcmp(w[0], "ldap_uri") == 0)
		return set_ldap_uri(cfg, w, n, err, errlen);
	if (n != 2) {
		snprintf(err, errlen, "%s takes one value", w[0]);
		return -1;
	}
	for (size_t i = 0; i < sizeof(int_keys) / sizeof(*int_keys); i++)
		if (strcmp(w[0], int_keys[i].name) == 0)
			return set_int_key(cfg, &int_keys[i], w[1], err, errlen);
	for (size_t i = 0; i < sizeof(string_keys) / sizeof(*string_keys);
	    i++)
		if (strcmp(w[0], string_keys[i].name) == 0) {
			if (strpbrk(w[1], "\r\n") != NULL ||
			    set_string((char **)(void *)((char *)cfg +
			    string_keys[i].offset), w[1]) != 0)
				goto bad;
			return 0;
		}
	if (strcmp(w[0], "plaintext_auth") == 0) {
		int yes;

		if (strcmp(w[1], "loopback") == 0)
			cfg->plaintext_auth = PLAINTEXT_LOOPBACK;
		else if (parse_bool(w[1], &yes) == 0)
			cfg->plaintext_auth = yes ? PLAINTEXT_YES : PLAINTEXT_NO;
		else
			goto bad;
		return 0;
	}
	if (strcmp(w[0], "forward_id") == 0) {
		if (parse_bool(w[1], &cfg->forward_id) != 0)
			goto bad;
		return 0;
	}
	if (strcmp(w[0], "auth_penalty") == 0) {
		if (parse_bool(w[1], &cfg->auth_penalty) != 0)
			goto bad;
		return 0;
	}
	if (strcmp(w[0], "oauth_bearer") == 0) {
		if (parse_bool(w[1], &cfg->oauth_bearer) != 0)
			goto bad;
		return 0;
	}
	if (strcmp(w[0], "ldap_starttls") == 0) {
		if (parse_bool(w[1], &cfg->ldap_starttls) != 0)
			goto bad;
		return 0;
	}
	if (strcmp(w[0], "auth") == 0) {
		if (strcmp(w[1], "passthrough") == 0)
			cfg->auth = AUTH_PASSTHROUGH;
		else if (strcmp(w[1], "proxy") == 0)
			cfg->auth = AUTH_PROXY;
		else
			goto bad;
		return 0;
	}
	if (strcmp(w[0], "tls_mode") == 0) {
		if (parse_tls_mode(w[1], &cfg->tls_mode) != 0 ||
		    cfg->tls_mode == TLS_NONE)
			goto bad;
		return 0;
	}
	if (strcmp(w[0], "tls_min_version") == 0) {
		if (strcmp(w[1], "TLSv1.2") == 0)
			cfg->tls_min_version = TLS1_2_VERSION;
		else if (strcmp(w[1], "TLSv1.3") == 0)
			cfg->tls_min_version = TLS1_3_VERSION;
		else
			goto bad;
		return 0;
	}
	if (strcmp(w[0], "syslog_facility") == 0) {
		if (parse_facility(w[1], &cfg->syslog_facility) != 0)
			goto bad;
		return 0;
	}
	snprintf(err, errlen, "unknown directive '%s'", w[0]);
	return -1;
bad:
	snprintf(err, errlen, "bad value for %s: '%s'", w[0], w[1]);
	return -1;
}

/* Settings that only make sense together. */
static int
config_check_tls(struct config *cfg, const char *path, char *err,
    size_t errlen)
{
	const char *why = NULL;

	if (cfg->tls_key != NULL && cfg->tls_cert == NULL)
		why = "tls_key needs tls_cert";
	else if (cfg->tls_ticket_key_file != NULL && cfg->tls_cert == NULL)
		why = "tls_ticket_key_file needs tls_cert";
	else if (cfg->backend_client_key != NULL &&
	    cfg->backend_client_cert == NULL)
		why = "backend_client_key needs backend_client_cert";
	else if (cfg->tls_cert != NULL && cfg->tls_key == NULL &&
	    set_string(&cfg->tls_key, cfg->tls_cert) != 0)
		why = "out of memory";
	if (why == NULL)
		return 0;
	snprintf(err, errlen, "%s: %s", path, why);
	return -1;
}

/*
 * Without route_order: route lines in file order, as before the
 * directory existed; with ldap_uri, the user's own line first, then the
 * directory, then the *@domain and "*" lines as fallbacks.
 */
static int
config_check_routing(struct config *cfg, const char *path, char *err,
    size_t errlen)
{
	static const enum route_source with_ldap[] = { SRC_USER, SRC_LDAP,
	    SRC_DOMAIN, SRC_DEFAULT };
	char why[200];
	int uses_ldap = 0;

	if (cfg->route_order_len == 0 && cfg->ldap_uri == NULL) {
		cfg->route_order[0] = SRC_ROUTES;
		cfg->route_order_len = 1;
	} else if (cfg->route_order_len == 0) {
		memcpy(cfg->route_order, with_ldap, sizeof(with_ldap));
		cfg->route_order_len = sizeof(with_ldap) / sizeof(*with_ldap);
	}
	for (size_t i = 0; i < cfg->route_order_len; i++)
		uses_ldap |= cfg->route_order[i] == SRC_LDAP;
	for (const struct route *r = cfg->publics; r != NULL; r = r->next)
		if (r->from_directory && cfg->ldap_uri == NULL) {
			snprintf(err, errlen, "%s: public %s ldap needs ldap_uri",
			    path, r->pattern);
			return -1;
		}
	if (uses_ldap && cfg->ldap_uri == NULL) {
		snprintf(err, errlen, "%s: route_order ldap needs ldap_uri",
		    path);
		return -1;
	}
	if (!uses_ldap && cfg->routes == NULL) {
		snprintf(err, errlen, "%s: no route configured", path);
		return -1;
	}
	if (uses_ldap && cfg->routes == NULL && cfg->servers == NULL) {
		snprintf(err, errlen, "%s: the directory may name only "
		    "configured servers: add route or server lines", path);
		return -1;
	}
	if (directory_check_config(cfg, why, sizeof(why)) != 0) {
		snprintf(err, errlen, "%s: %s", path, why);
		return -1;
	}
	return 0;
}

/*
 * Shared state: where, and who is spared the login penalty.  Loopback by
 * default: a webmail or a load balancer on the host, without a PROXY
 * header, is one address for all of its users.
 */
static int
config_check_state(struct config *cfg, const char *path, char *err,
    size_t errlen)
{
	static char *loopback[] = { "auth_penalty_exempt", "127.0.0.0/8",
	    "::1/128" };

	if (cfg->state_file == NULL &&
	    set_string(&cfg->state_file, "/run/imapfe/state") != 0) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	if (cfg->state_file[0] != '/' && strcmp(cfg->state_file, "none") != 0) {
		snprintf(err, errlen, "%s: state_file must be an absolute path "
		    "or none", path);
		return -1;
	}
	if (cfg->auth_penalty_first > cfg->auth_penalty_max) {
		snprintf(err, errlen, "%s: auth_penalty_first is more than "
		    "auth_penalty_max", path);
		return -1;
	}
	if (!cfg->auth_penalty_exempt_set)
		return add_cidr_list(&cfg->auth_penalty_exempt,
		    &cfg->auth_penalty_exempt_n, loopback, 3, err, errlen);
	return 0;
}

/* auth proxy needs an identity and its password; load the password now. */
static int
config_check_auth(struct config *cfg, const char *path, char *err,
    size_t errlen)
{
	char why[300];

	if (cfg->sasl_service == NULL &&
	    set_string(&cfg->sasl_service, "imap") != 0) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	if (cfg->sasl_config_path != NULL) {
		struct stat st;

		/* libsasl2 would quietly fall back to its defaults. */
		if (stat(cfg->sasl_config_path, &st) != 0 ||
		    !S_ISDIR(st.st_mode)) {
			snprintf(err, errlen, "%s: sasl_config_path %s is not a "
			    "directory", path, cfg->sasl_config_path);
			return -1;
		}
	}
	if (cfg->auth != AUTH_PROXY)
		return 0;
	if (cfg->proxy_user == NULL || cfg->proxy_password_file == NULL) {
		snprintf(err, errlen, "%s: auth proxy needs proxy_user and "
		    "proxy_password_file", path);
		return -1;
	}
	if ((cfg->proxy = calloc(1, sizeof(*cfg->proxy))) == NULL ||
	    credentials_load_password(cfg->proxy, cfg->proxy_user,
	    cfg->proxy_password_file, why, sizeof(why)) != 0) {
		snprintf(err, errlen, "%s: proxy_password_file %s", path,
		    cfg->proxy ? why : "out of memory");
		return -1;
	}
	return 0;
}

int
config_load(struct config *cfg, const char *path, char *err, size_t errlen)
{
	char line[4096], msg[256], *words[16];
	int lineno = 0, n, rc = 0;
	FILE *f;

	config_defaults(cfg);
	if ((f = fopen(path, "r")) == NULL) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -1;
	}
	while (rc == 0 && fgets(line, sizeof(line), f) != NULL) {
		lineno++;
		/* the rest of a longer line would be read as a line of its own:
		 * a directive at the end of a long comment, say */
		if (strchr(line, '\n') == NULL && !feof(f)) {
			snprintf(err, errlen, "%s:%d: line longer than %zu bytes",
			    path, lineno, sizeof(line) - 2);
			rc = -1;
			break;
		}
		line[strcspn(line, "\r\n")] = '\0';
		n = split_words(line, words, 16);
		if (n < 0) {
			snprintf(msg, sizeof(msg), "syntax error");
			rc = -1;
		} else if (n > 0)
			rc = config_line(cfg, words, n, msg, sizeof(msg));
		if (rc != 0)
			snprintf(err, errlen, "%s:%d: %s", path, lineno, msg);
	}
	fclose(f);
	if (rc == 0)
		rc = config_check_routing(cfg, path, err, errlen);
	if (rc == 0)
		rc = config_check_tls(cfg, path, err, errlen);
	if (rc == 0)
		rc = config_check_auth(cfg, path, err, errlen);
	if (rc == 0)
		rc = config_check_state(cfg, path, err, errlen);
	if (rc == 0 && cfg->greeting == NULL &&
	    set_string(&cfg->greeting, IMAPFE_GREETING_MARK ".") != 0)
		rc = -1;
	if (rc == 0 && cfg->backend_mechanisms == NULL &&
	    set_string(&cfg->backend_mechanisms,
	    "SCRAM-SHA-256 SCRAM-SHA-1 PLAIN LOGIN") != 0)
		rc = -1;
	if (rc != 0)
		config_free(cfg);
	return rc;
}

void
config_free(struct config *cfg)
{
	struct route *r, *next;

	for (r = cfg->routes; r != NULL; r = next) {
		next = r->next;
		route_free(r);
	}
	for (r = cfg->publics; r != NULL; r = next) {
		next = r->next;
		route_free(r);
	}
	for (r = cfg->servers; r != NULL; r = next) {
		next = r->next;
		route_free(r);
	}
	if (cfg->proxy != NULL) {
		credentials_clear(cfg->proxy);
		free(cfg->proxy);
	}
	if (cfg->ldap_bind != NULL) {
		credentials_clear(cfg->ldap_bind);
		free(cfg->ldap_bind);
	}
	for (size_t i = 0; i < sizeof(string_keys) / sizeof(*string_keys);
	    i++)
		free(*(char **)(void *)((char *)cfg + string_keys[i].offset));
	free(cfg->proxy_trusted);
	free(cfg->auth_penalty_exempt);
	state_close(cfg->state);
	memset(cfg, 0, sizeof(*cfg));
}

/* ------------------------------------------------------------------ */
/* the session */


struct session {
	const struct config	*cfg;
	SSL_CTX			*tls_ctx;	/* NULL: TLS not configured */
	int			 tls_active;
	int			 peer_loopback;
	struct client_info	 ci;		/* told to back-ends with ID */
	struct iobuf		 client;
	struct backend		 backend;
	int			 logged_in;
	struct credentials	 cred;
	struct cmd_buf		 cmdbuf;	/* the command being read */
	char			 peer[80];
	struct sockaddr_storage	 peer_addr;	/* the real client's, */
	int			 have_peer_addr;	/* for shared state */
	char			 user[96];	/* sanitized, for logs */
	uint16_t		 password_print;	/* this attempt's */
	int			 failures;
	int			 bad_commands;
	int64_t			 started;
	enum session_end	 end;
	const char		*end_reason;
};

static const char *const end_names[] = { "none", "logout", "client-gone",
    "backend-gone", "limit", "timeout", "shutdown", "tls" };

static int
is_loopback(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET)
		return (ntohl(((const struct sockaddr_in *)(const void *)ss)->
		    sin_addr.s_addr) >> 24) == 127;
	if (ss->ss_family == AF_INET6) {
		const struct in6_addr *a =
		    &((const struct sockaddr_in6 *)(const void *)ss)->sin6_addr;

		return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) &&
		    a->s6_addr[12] == 127);
	}
	return 0;
}

/* Both ends of the client's connection, as the kernel or a proxy says. */
struct endpoints {
	struct sockaddr_storage	 peer;
	struct sockaddr_storage	 local;
	int			 have_peer;	/* 0: a pipe, or unknown */
	int			 have_local;
	char			 proxy[80];	/* set when a PROXY header spoke */
};

static socklen_t
sockaddr_len(const struct sockaddr_storage *ss)
{
	return ss->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) :
	    sizeof(struct sockaddr_in);
}

static void
numeric_address(const struct sockaddr_storage *ss, char *ip, size_t iplen,
    char *port, size_t portlen)
{
	if (getnameinfo((const struct sockaddr *)ss, sockaddr_len(ss), ip,
	    (socklen_t)iplen, port, (socklen_t)portlen,
	    NI_NUMERICHOST | NI_NUMERICSERV) != 0)
		ip[0] = port[0] = '\0';
}

/* "1.2.3.4:143" or "[::1]:143" for logs. */
static void
format_address(const struct sockaddr_storage *ss, char *out, size_t outlen)
{
	char host[NI_MAXHOST], serv[NI_MAXSERV];

	numeric_address(ss, host, sizeof(host), serv, sizeof(serv));
	if (host[0] == '\0')
		snprintf(out, outlen, "local");
	else
		snprintf(out, outlen, ss->ss_family == AF_INET6 ? "[%s]:%s" :
		    "%s:%s", host, serv);
}

static void
endpoints_from_socket(struct endpoints *ep, int fd)
{
	socklen_t sl = sizeof(ep->peer);

	memset(ep, 0, sizeof(*ep));
	ep->have_peer = getpeername(fd, (struct sockaddr *)&ep->peer, &sl) == 0
	    && (ep->peer.ss_family == AF_INET || ep->peer.ss_family == AF_INET6);
	sl = sizeof(ep->local);
	ep->have_local = getsockname(fd, (struct sockaddr *)&ep->local, &sl) ==
	    0 && (ep->local.ss_family == AF_INET ||
	    ep->local.ss_family == AF_INET6);
}

/*
 * A trusted load balancer names the real client in a PROXY header; from
 * here on that is the client, for logs, plaintext_auth and the back-end's
 * ID.  A header without addresses (a health check) leaves the proxy's own,
 * but never counts as loopback.  Connections from anyone else are not
 * looked at: a PROXY line from them is just a bad IMAP command.
 */
static int
endpoints_apply_proxy(struct endpoints *ep, const struct config *cfg, int fd,
    int *loopback_ok)
{
	struct proxy_header ph;
	const char *why;

	*loopback_ok = 1;
	if (cfg->proxy_trusted_n == 0 || !ep->have_peer ||
	    !cidr_list_match(cfg->proxy_trusted, cfg->proxy_trusted_n,
	    &ep->peer))
		return 0;
	format_address(&ep->peer, ep->proxy, sizeof(ep->proxy));
	if (proxy_header_read(fd, cfg->proxy_protocol_timeout, &ph, &why) != 0) {
		log_msg(LOG_NOTICE, "event=proxy-error proxy=%s reason=\"%s\"",
		    ep->proxy, why);
		return -1;
	}
	if (ph.local) {
		*loopback_ok = 0;
		return 0;
	}
	ep->peer = ph.src;
	ep->local = ph.dst;
	ep->have_local = 1;
	return 0;
}

/* The client's address and port, and the address it connected to. */
static void
client_info_init(struct client_info *ci, const struct endpoints *ep,
    const char *session)
{
	memset(ci, 0, sizeof(*ci));
	ci->ttl = PROXY_TTL_DEFAULT;
	snprintf(ci->session, sizeof(ci->session), "%s", session);
	if (ep->have_peer)
		numeric_address(&ep->peer, ci->ip, sizeof(ci->ip), ci->port,
		    sizeof(ci->port));
	if (ep->have_local)
		numeric_address(&ep->local, ci->local_ip, sizeof(ci->local_ip),
		    ci->local_port, sizeof(ci->local_port));
}

static void
new_session_id(char *out, size_t outlen)
{
	unsigned char r[6] = { 0 };

	if (getentropy(r, sizeof(r)) != 0) {
		uint64_t t = (uint64_t)now_ms() ^ ((uint64_t)getpid() << 20);

		memcpy(r, &t, sizeof(r));
	}
	snprintf(out, outlen, "%02x%02x%02x%02x%02x%02x", r[0], r[1], r[2],
	    r[3], r[4], r[5]);
}

static int
client_send(struct session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Send one formatted response line (CRLF added) to the client. */
static int
client_send(struct session *s, const char *fmt, ...)
{
	enum io_status st;
	va_list ap;

	s->client.deadline = deadline_in(s->cfg->idle_timeout);
	if (protocol_trace) {
		char line[512];
		int n;

		va_start(ap, fmt);
		n = vsnprintf(line, sizeof(line), fmt, ap);
		va_end(ap);
		/* "+ ..." may be a SASL challenge: its payload is not shown */
		trace_data("to", "client", line, strncmp(line, "+ ", 2) == 0 ?
		    1 : n < 0 ? 0 : (size_t)n < sizeof(line) ? (size_t)n :
		    sizeof(line) - 1, 0);
	}
	va_start(ap, fmt);
	st = iobuf_vline(&s->client, fmt, ap);
	va_end(ap);
	if (st != IO_OK) {
		s->end = END_CLIENT_GONE;
		return -1;
	}
	return 0;
}

/* End the session with an untagged BYE. */
static void
session_bye(struct session *s, enum session_end end, const char *text)
{
	client_send(s, "* BYE %s", text);
	s->end = end;
	s->end_reason = text;
}

/* Memory ran out: the session cannot go on. */
static void
session_nomem(struct session *s)
{
	session_bye(s, END_LIMIT, "Out of memory.");
}

/* May the client send a password here, in the clear or inside TLS? */
static int
plaintext_allowed(const struct session *s)
{
	return s->tls_active || s->cfg->plaintext_auth == PLAINTEXT_YES ||
	    (s->cfg->plaintext_auth == PLAINTEXT_LOOPBACK && s->peer_loopback);
}

/*
 * What imapfe itself offers before login.  The AUTH= list is the SASL
 * configuration's in proxy mode, PLAIN and LOGIN in passthrough mode (the
 * back-end needs the password itself), with OAUTHBEARER and XOAUTH2 when
 * oauth_bearer says so, and without plaintext mechanisms (bearer tokens
 * included) wherever plaintext is not allowed.
 */
static const char *
prelogin_caps(const struct session *s)
{
	static char caps[1024];
	struct str mechs = { 0 };
	int plain = plaintext_allowed(s);

	if (s->cfg->auth == AUTH_PROXY)
		sasl_server_mechs(s->cfg, plain, &mechs);
	else if (plain)
		str_adds(&mechs, s->cfg->oauth_bearer ? " AUTH=PLAIN AUTH=LOGIN"
		    " AUTH=OAUTHBEARER AUTH=XOAUTH2" : " AUTH=PLAIN AUTH=LOGIN");
	snprintf(caps, sizeof(caps), "IMAP4rev1 LITERAL- SASL-IR ID ENABLE%s%s%s",
	    s->tls_ctx != NULL && !s->tls_active ? " STARTTLS" : "",
	    mechs.s != NULL ? mechs.s : "", plain ? "" : " LOGINDISABLED");
	str_free(&mechs);
	return caps;
}

/* ------------------------------------------------------------------ */
/* reading a command before login */

enum read_status {
	READ_OK,
	READ_BAD_LITERAL,	/* answered with tagged BAD; go on */
	READ_END		/* session over; s->end says why */
};

static void
io_end(struct session *s, enum io_status st)
{
	const char *bye;
	enum session_end end = io_status_end(st, &bye);

	if (bye != NULL)
		session_bye(s, end, bye);
	else
		s->end = end;
}

/*
 * Before login a line may be as long as max_line_length, or, for ID, as
 * a valid ID at RFC 2971's sizes (30 pairs, fields of 30 octets and values
 * of 1024, every byte of them escaped in a quoted string) is: such an ID
 * is answered, as Dovecot answers it, and what goes on to a back-end stays
 * bounded by the max_id settings.  The reader takes lines up to that
 * size; session_prelogin() holds other commands to max_line_length.
 */
static size_t
prelogin_line_max(const struct config *cfg)
{
	size_t id = (size_t)cfg->max_id_pairs * (2 * (size_t)cfg->max_id_field +
	    2 * (size_t)cfg->max_id_value + 7) + 80;
	size_t n = cfg->max_line_length > id ? cfg->max_line_length : id;

	return n < PRELOGIN_COMMAND_MAX - 2 ? n : PRELOGIN_COMMAND_MAX - 2;
}

/*
 * Read one whole command: its lines and the literals they announce, into
 * s->cmdbuf, with the limits before login: no literal over
 * max_prelogin_literal, none streamed.
 */
static enum read_status
read_command(struct session *s)
{
	const struct cmd_limits lim = {
		.line_max = prelogin_line_max(s->cfg),
		.command_max = PRELOGIN_COMMAND_MAX,
		.literal_max = s->cfg->max_prelogin_literal,
		.hold_max = s->cfg->max_prelogin_literal,
		.literal_name = "max_prelogin_literal" };

	s->cmdbuf.continuing = 0;
	switch (cmd_read(&s->client, &lim, &s->cmdbuf)) {
	case CMD_COMPLETE:
		return READ_OK;
	case CMD_BAD_LITERAL:
	case CMD_ANSWERED:
	case CMD_STREAM:	/* (not before login: hold_max is the limit) */
		log_msg(LOG_NOTICE, "event=bad-command reason=\"invalid "
		    "literal size\"");
		s->bad_commands++;
		return READ_BAD_LITERAL;
	case CMD_END:
		break;
	}
	if (s->cmdbuf.bye != NULL)
		session_bye(s, s->cmdbuf.end, s->cmdbuf.bye);
	else
		s->end = s->cmdbuf.end;
	return READ_END;
}

/* ------------------------------------------------------------------ */
/* commands before login */

static int
is_string(const struct token *t)
{
	return t->type == TOK_ATOM || t->type == TOK_QUOTED ||
	    t->type == TOK_LITERAL;
}

static void
bad_command(struct session *s, const char *tag, const char *why)
{
	client_send(s, "%s BAD %s", tag, why);
	s->bad_commands++;
	log_msg(LOG_NOTICE, "event=bad-command reason=\"%s\"", why);
}

static void
cmd_capability(struct session *s, const struct command *c)
{
	client_send(s, "* CAPABILITY %s", prelogin_caps(s));
	client_send(s, "%s OK CAPABILITY completed.", c->tag);
}

/*
 * Keep one of the client's ID fields for the back-end.  Fields that would
 * let a client pose as another address or session are dropped; a hop
 * count is believed only when it is lower than ours.  What is kept stays
 * within FORWARDED_ID_MAX, the rest is dropped: a back-end reads an ID
 * before login into a small buffer (Dovecot's imap-login, 4 KB, ends the
 * connection over it), however much RFC 2971 lets a client send.
 */
#define FORWARDED_ID_MAX	2048

static void
id_keep(struct session *s, const struct token *f, const struct token *v)
{
	static const char *const reserved[] = { "x-originating-",
	    "x-connected-", "x-session-", "x-proxy-ttl", "x-forward-" };
	struct str *out = &s->ci.id_fields;
	size_t kept;

	if (f->len == 11 && strncasecmp(f->s, "x-proxy-ttl", 11) == 0 &&
	    v->type != TOK_NIL && v->len > 0 && v->len < 6) {
		char num[8];
		int ttl;

		memcpy(num, v->s, v->len);
		num[v->len] = '\0';
		ttl = atoi(num);
		if (ttl < s->ci.ttl)
			s->ci.ttl = ttl;
	}
	for (size_t i = 0; i < sizeof(reserved) / sizeof(*reserved); i++)
		if (f->len >= strlen(reserved[i]) &&
		    strncasecmp(f->s, reserved[i], strlen(reserved[i])) == 0)
			return;
	if (!credentials_acceptable(f->s, f->len) ||
	    (v->type != TOK_NIL && !credentials_acceptable(v->s, v->len)))
		return;
	kept = out->len;
	if ((out->len > 0 && str_add(out, " ", 1) != 0) ||
	    imap_append_string(out, f->s, f->len, 0) < 0 ||
	    str_add(out, " ", 1) != 0)
		str_wipe(out);
	else if (v->type == TOK_NIL ? str_adds(out, "NIL") != 0 :
	    imap_append_string(out, v->s, v->len, 0) < 0)
		str_wipe(out);
	else if (out->len > FORWARDED_ID_MAX)
		out->len = kept;	/* this pair would make it too long */
}

/* ID NIL, or ID ("field" "value" ...) within RFC 2971's limits. */
static void
cmd_id(struct session *s, const struct command *c)
{
	size_t i, n = c->ntok;

	if (n == 1 && c->tok[0].type == TOK_NIL)
		goto ok;
	if (n < 2 || c->tok[0].type != TOK_LPAREN ||
	    c->tok[n - 1].type != TOK_RPAREN || (n - 2) % 2 != 0 ||
	    (n - 2) / 2 > (size_t)s->cfg->max_id_pairs) {
		bad_command(s, c->tag, "Invalid ID parameters.");
		return;
	}
	for (i = 1; i + 1 < n; i += 2) {
		const struct token *f = &c->tok[i], *v = &c->tok[i + 1];

		if ((f->type != TOK_QUOTED && f->type != TOK_LITERAL) ||
		    f->len > (size_t)s->cfg->max_id_field ||
		    (v->type != TOK_NIL && v->type != TOK_QUOTED &&
		    v->type != TOK_LITERAL) ||
		    v->len > (size_t)s->cfg->max_id_value) {
			bad_command(s, c->tag, "Invalid ID parameters.");
			return;
		}
	}
	str_wipe(&s->ci.id_fields);
	for (i = 1; i + 1 < n; i += 2)
		id_keep(s, &c->tok[i], &c->tok[i + 1]);
ok:
	client_send(s, "* ID NIL");
	client_send(s, "%s OK ID completed.", c->tag);
}

/* A failed login, answered with status, a response as it stands. */
static void
login_refused(struct session *s, const char *tag, const char *status)
{
	s->failures++;
	client_send(s, "%s %s", tag, status);
	if (s->failures >= s->cfg->max_login_failures && s->end == END_NONE)
		session_bye(s, END_LIMIT, "Too many failed logins.");
}

static void
login_failed(struct session *s, const char *tag, const char *code,
    const char *text)
{
	char status[256];

	snprintf(status, sizeof(status), "NO [%s] %s", code, text);
	login_refused(s, tag, status);
}

static struct auth_client
session_auth_client(struct session *s)
{
	return (struct auth_client){ .io = &s->client,
	    .max_line = s->cfg->max_line_length,
	    .idle_timeout = s->cfg->idle_timeout,
	    .oauth_bearer = s->cfg->oauth_bearer };
}

/*
 * When the session's exchange with the client cannot go on: how it ends.
 * Returns -1 then, 0 when it can.
 */
static int
auth_client_ended(struct session *s, const struct auth_client *ac,
    enum auth_status st)
{
	if (st == AUTH_READ_END)
		io_end(s, ac->io_status);
	else if (st == AUTH_CLIENT_GONE)
		s->end = END_CLIENT_GONE;
	else if (st == AUTH_NOMEM)
		session_nomem(s);
	else
		return 0;
	return -1;
}

/*
 * A bearer token refused by imapfe itself (no user to route by): the
 * mechanism's error exchange, then the NO a refused token gets, so that
 * the client cannot tell an unknown user from a bad token.
 */
static void
bearer_refused(struct session *s, const char *tag, enum cred_kind kind)
{
	struct auth_client ac = session_auth_client(s);

	if (auth_client_ended(s, &ac, auth_bearer_refusal(&ac, kind)) == 0)
		login_failed(s, tag, "AUTHENTICATIONFAILED",
		    "Authentication failed.");
}

/*
 * The back-end's error challenge to a bearer login, put to the client;
 * its reply goes back (a "*", or a reply that is no base64, cancels).
 */
static int
relay_challenge(void *ctx, const char *chal, size_t len, struct str *answer)
{
	struct session *s = ctx;
	struct auth_client ac = session_auth_client(s);
	enum auth_status st = auth_client_relay(&ac, chal, len, answer);

	if (auth_client_ended(s, &ac, st) != 0)
		return -1;
	if (st != AUTH_OK) {
		str_wipe(answer);
		return str_adds(answer, "*\r\n");
	}
	return 0;
}

static const struct sockaddr_storage *
client_addr(const struct session *s)
{
	return s->have_peer_addr ? &s->peer_addr : NULL;
}

/*
 * Before a login attempt is looked at: the client's address waits out
 * its penalty (auth_penalty), with no lock held, so only it waits.
 */
static void
penalty_wait(struct session *s)
{
	int64_t until = now_ms() + state_penalty_ms(s->cfg->state, s->cfg,
	    client_addr(s));

	s->password_print = 0;
	while (!shutdown_requested && now_ms() < until)
		poll_wait(NULL, 0, (int)(until - now_ms()));
	if (shutdown_requested)
		session_bye(s, END_SHUTDOWN, "Server shutting down.");
}

/* The credentials were wrong: the address's penalty may grow. */
static void
penalize(struct session *s)
{
	int64_t delay = state_login_failed(s->cfg->state, s->cfg,
	    client_addr(s), s->password_print);

	if (delay >= 0)
		log_msg(LOG_NOTICE, "event=penalty client=%s delay_ms=%lld",
		    s->ci.ip, (long long)delay);
}

static void
auth_failed(struct session *s, const char *tag)
{
	penalize(s);
	login_failed(s, tag, "AUTHENTICATIONFAILED", "Authentication failed.");
}

/* Logged in to the back-end: within max_sessions_per_user? */
static int
user_admitted(struct session *s, const char *tag)
{
	state_login_ok(s->cfg->state, s->cfg, client_addr(s));
	if (state_session_user(s->cfg->state, s->cfg, s->cred.user,
	    s->cred.user_len) == STATE_ADMITTED)
		return 1;
	backend_close(&s->backend);
	credentials_clear(&s->cred);
	log_msg(LOG_NOTICE, "event=login-refused user=\"%s\" "
	    "reason=\"max_sessions_per_user (%d) reached\"", s->user,
	    s->cfg->max_sessions_per_user);
	login_failed(s, tag, "LIMIT", "Too many sessions for this user.");
	return 0;
}

/*
 * Credentials are in s->cred: find the back-end and log in there.  The
 * client hears the same NO for an unknown user as for a wrong password.
 */
static void
do_login(struct session *s, const char *tag, const char *method)
{
	struct login_relay *relay = NULL;
	const struct route *r = NULL;
	enum cred_kind kind = s->cred.kind;
	enum route_status rs;
	enum login_result res;
	char why[256];
	char *caps;

	sanitize(s->user, sizeof(s->user), s->cred.user, s->cred.user_len);
	if (s->password_print == 0)
		s->password_print = state_password_print(s->cfg->state,
		    &s->cred);
	if (!credentials_acceptable(s->cred.user, s->cred.user_len) ||
	    !credentials_acceptable(s->cred.pass, s->cred.pass_len) ||
	    s->cred.user_len == 0) {
		log_msg(LOG_NOTICE, "event=login-failed user=\"%s\" "
		    "method=%s reason=\"invalid characters in credentials\"",
		    s->user, method);
		credentials_clear(&s->cred);
		auth_failed(s, tag);
		return;
	}
	if ((rs = route_find(s->cfg, s->cred.user, &r, why, sizeof(why))) !=
	    ROUTE_FOUND) {
		log_msg(rs == ROUTE_UNKNOWN ? LOG_NOTICE : LOG_ERR,
		    "event=login-failed user=\"%s\" method=%s reason=\"%s\"",
		    s->user, method, why);
		credentials_clear(&s->cred);
		if (rs == ROUTE_UNKNOWN && kind != CRED_PASSWORD) {
			penalize(s);
			bearer_refused(s, tag, kind);
		} else if (rs == ROUTE_UNKNOWN)
			auth_failed(s, tag);
		else
			login_failed(s, tag, "UNAVAILABLE", "Back-end server "
			    "unavailable, try again later.");
		return;
	}
	if (s->ci.ttl <= 0) {
		log_msg(LOG_ERR, "event=login-failed user=\"%s\" method=%s "
		    "reason=\"proxy loop: the client's x-proxy-ttl ran out\"",
		    s->user, method);
		credentials_clear(&s->cred);
		login_failed(s, tag, "UNAVAILABLE", "Proxy loop detected.");
		return;
	}
	if (kind != CRED_PASSWORD &&
	    (relay = calloc(1, sizeof(*relay))) == NULL) {
		credentials_clear(&s->cred);
		session_nomem(s);
		return;
	}
	if (relay != NULL) {
		relay->challenge = relay_challenge;
		relay->ctx = s;
	}
	res = backend_login_relayed(&s->backend, s->cfg, r, &s->cred, &s->ci,
	    s->user, relay, why, sizeof(why));
	if (res == LOGIN_OK && !user_admitted(s, tag)) {
		free(relay);
		return;
	}
	/*
	 * Public-folder servers are logged in to later, as the user: with
	 * the password in passthrough mode, by name alone in proxy mode.
	 */
	if (res != LOGIN_OK || !config_routed(s->cfg))
		credentials_clear(&s->cred);
	else if (s->cfg->auth == AUTH_PROXY)
		credentials_drop_password(&s->cred);
	if (res == LOGIN_OK &&
	    (caps = caps_for_client(s->backend.caps,
	    config_routed(s->cfg))) != NULL) {
		s->logged_in = 1;
		log_msg(LOG_INFO, "event=login user=\"%s\" method=%s "
		    "backend=%s:%s", s->user, method, s->backend.host,
		    s->backend.port);
		client_send(s, "%s OK [CAPABILITY %s] Logged in.", tag, caps);
		free(caps);
		free(relay);
		return;
	}
	if (res == LOGIN_OK) {
		backend_close(&s->backend);
		res = LOGIN_UNAVAILABLE;
		snprintf(why, sizeof(why), "out of memory");
	}
	log_msg(res == LOGIN_BADCREDS ? LOG_NOTICE : LOG_ERR,
	    "event=login-failed user=\"%s\" method=%s backend=%s:%s "
	    "reason=\"%s\"", s->user, method, r->host, r->port, why);
	if (relay != NULL && relay->refused) {
		if (res == LOGIN_BADCREDS)
			penalize(s);
		login_refused(s, tag, relay->refusal.line +
		    relay->refusal.tag_len + 1);
	} else if (res == LOGIN_BADCREDS)
		auth_failed(s, tag);
	else
		login_failed(s, tag, "UNAVAILABLE",
		    "Back-end server unavailable, try again later.");
	free(relay);
}

static int
plaintext_refused(struct session *s, const char *tag)
{
	if (plaintext_allowed(s))
		return 0;
	log_msg(LOG_NOTICE, "event=login-refused reason=\"plaintext "
	    "authentication without TLS\"");
	/* Counted like a failed login, so a client cannot retry forever. */
	login_failed(s, tag, "PRIVACYREQUIRED", "Plaintext authentication is "
	    "disabled on an unencrypted connection.");
	return 1;
}

/* How a failed SASL server exchange is answered; the attempt counts. */
static void
sasl_server_failed(struct session *s, const char *tag, const char *method,
    int rc)
{
	int unavailable = rc == SASL_NOMEM || rc == SASL_FAIL ||
	    rc == SASL_TRYAGAIN || rc == SASL_UNAVAIL;

	log_msg(unavailable ? LOG_ERR : LOG_NOTICE, "event=login-failed%s%s%s "
	    "method=%s reason=\"SASL: %s\"", s->user[0] ? " user=\"" : "",
	    s->user, s->user[0] ? "\"" : "", method,
	    sasl_errstring(rc, NULL, NULL));
	if (rc == SASL_NOAUTHZ)
		login_failed(s, tag, "AUTHORIZATIONFAILED",
		    "Authorization identity not allowed.");
	else if (unavailable)
		login_failed(s, tag, "UNAVAILABLE", "Authentication service "
		    "unavailable, try again later.");
	else
		auth_failed(s, tag);
}

static void
cmd_login(struct session *s, const struct command *c)
{
	int rc;

	if (c->ntok != 2 || !is_string(&c->tok[0]) || !is_string(&c->tok[1])) {
		bad_command(s, c->tag, "LOGIN takes a user name and a "
		    "password.");
		return;
	}
	if (plaintext_refused(s, c->tag))
		return;
	penalty_wait(s);
	if (s->end != END_NONE)
		return;
	if (credentials_set(&s->cred, c->tok[0].s, c->tok[0].len,
	    c->tok[1].s, c->tok[1].len) != 0) {
		session_nomem(s);
		return;
	}
	s->password_print = state_password_print(s->cfg->state, &s->cred);
	if (s->cfg->auth == AUTH_PROXY) {
		sanitize(s->user, sizeof(s->user), s->cred.user,
		    s->cred.user_len);
		rc = auth_check_password(s->cfg, plaintext_allowed(s), &s->cred);
		if (rc != SASL_OK) {
			credentials_clear(&s->cred);
			sasl_server_failed(s, c->tag, "LOGIN", rc);
			return;
		}
	}
	do_login(s, c->tag, "LOGIN");
}

/* What the client is told when its AUTHENTICATE has ended. */
static void
authenticate_answer(struct session *s, const char *tag, const char *mech,
    const struct auth_client *ac, enum auth_status st)
{
	switch (st) {
	case AUTH_OK:
		do_login(s, tag, mech);
		break;
	case AUTH_CANCELLED:
		client_send(s, "%s BAD Authentication cancelled.", tag);
		break;
	case AUTH_BAD_BASE64:
		bad_command(s, tag, "Invalid base64 data.");
		break;
	case AUTH_PLAIN_MALFORMED:
		bad_command(s, tag, "Malformed PLAIN message.");
		break;
	case AUTH_BEARER_MALFORMED:
		log_msg(LOG_NOTICE, "event=login-failed method=%s "
		    "reason=\"malformed %s message: %s\"", mech, mech,
		    ac->why);
		bad_command(s, tag, bearer_kind(mech) == CRED_XOAUTH2 ?
		    "Malformed XOAUTH2 message." :
		    "Malformed OAUTHBEARER message.");
		break;
	case AUTH_BEARER_NOUSER:
		log_msg(LOG_NOTICE, "event=login-failed method=%s "
		    "reason=\"no user name in the %s message\"", mech, mech);
		bearer_refused(s, tag, bearer_kind(mech));
		break;
	case AUTH_PLAIN_AUTHZID:
		log_msg(LOG_NOTICE, "event=login-failed method=PLAIN "
		    "reason=\"authorization identity not allowed\"");
		login_failed(s, tag, "AUTHORIZATIONFAILED",
		    "Authorization identity not allowed.");
		break;
	case AUTH_NOMECH:
		client_send(s, "%s NO Unsupported authentication mechanism.",
		    tag);
		break;
	case AUTH_SASL_REFUSED:
		sasl_server_failed(s, tag, mech, ac->sasl_code);
		break;
	case AUTH_READ_END:
		io_end(s, ac->io_status);
		break;
	case AUTH_CLIENT_GONE:
		s->end = END_CLIENT_GONE;
		break;
	case AUTH_NOMEM:
		session_nomem(s);
		break;
	}
}

static void
cmd_authenticate(struct session *s, const struct command *c)
{
	struct auth_client ac = session_auth_client(s);
	const struct token *ir;
	char mech[SASL_MECHNAMEMAX + 1];
	enum auth_status st;

	if (c->ntok < 1 || c->ntok > 2 || c->tok[0].type != TOK_ATOM ||
	    (c->ntok == 2 && c->tok[1].type != TOK_ATOM)) {
		bad_command(s, c->tag, "AUTHENTICATE takes a mechanism and an "
		    "optional initial response.");
		return;
	}
	ir = c->ntok == 2 ? &c->tok[1] : NULL;
	if (auth_mech_name(c->tok[0].s, c->tok[0].len, mech,
	    sizeof(mech)) != 0) {
		client_send(s, "%s NO Unsupported authentication mechanism.",
		    c->tag);
		return;
	}
	if ((auth_mech_plaintext(mech) || (s->cfg->oauth_bearer &&
	    bearer_kind(mech) != CRED_PASSWORD)) &&
	    plaintext_refused(s, c->tag))
		return;
	penalty_wait(s);
	if (s->end != END_NONE)
		return;
	if (s->cfg->auth == AUTH_PROXY)
		s->user[0] = '\0';	/* the exchange names the user */
	st = auth_client_exchange(&ac, s->cfg, plaintext_allowed(s), mech, ir,
	    &s->cred);
	authenticate_answer(s, c->tag, mech, &ac, st);
}

/* Commands that exist, but only after login (RFC 9051, RFC 3501). */
static int
needs_login(const char *name)
{
	static const char *const names[] = { "SELECT", "EXAMINE", "CREATE",
	    "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB",
	    "NAMESPACE", "STATUS", "APPEND", "IDLE", "CHECK", "CLOSE",
	    "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
	    "UID", "GETQUOTA", "GETQUOTAROOT", "SETQUOTA", "GETACL", "SETACL",
	    "DELETEACL", "LISTRIGHTS", "MYRIGHTS", "GETMETADATA",
	    "SETMETADATA", "SORT", "THREAD", "COMPRESS", "ENABLE" };

	for (size_t i = 0; i < sizeof(names) / sizeof(*names); i++)
		if (strcmp(name, names[i]) == 0)
			return 1;
	return 0;
}

/* TLS on the client connection, for implicit TLS and after STARTTLS. */
static int
client_tls_start(struct session *s)
{
	SSL *ssl = SSL_new(s->tls_ctx);

	s->client.deadline = deadline_in(s->cfg->tls_handshake_timeout);
	if (ssl == NULL) {
		tls_error_text(s->client.tls_why, sizeof(s->client.tls_why));
		s->end = END_TLS;
		return -1;
	}
	if (iobuf_tls_handshake(&s->client, ssl, 1) != IO_OK) {
		s->end = END_TLS;
		return -1;
	}
	s->tls_active = 1;
	log_msg(LOG_INFO, "event=tls version=%s cipher=%s resumed=%s",
	    SSL_get_version(ssl), SSL_get_cipher_name(ssl),
	    SSL_session_reused(ssl) ? "yes" : "no");
	return 0;
}

/*
 * STARTTLS.  Whatever the client sent after it, before the handshake, is
 * thrown away unread: executing it would let an attacker who can inject
 * plaintext have it run inside the TLS session (CVE-2011-0411).
 */
static void
cmd_starttls(struct session *s, const struct command *c)
{
	size_t pipelined;

	if (c->ntok != 0) {
		bad_command(s, c->tag, "STARTTLS takes no arguments.");
		return;
	}
	if (s->tls_ctx == NULL) {
		bad_command(s, c->tag, "TLS is not configured.");
		return;
	}
	if (s->tls_active) {
		bad_command(s, c->tag, "TLS is already active.");
		return;
	}
	if (client_send(s, "%s OK Begin TLS negotiation now.", c->tag) != 0)
		return;
	if ((pipelined = iobuf_pending(&s->client)) > 0)
		log_msg(LOG_NOTICE, "event=starttls-discarded bytes=%zu",
		    pipelined);
	iobuf_discard(&s->client);
	client_tls_start(s);
}

static void
dispatch_prelogin(struct session *s, const struct command *c)
{
	if (strcmp(c->name, "CAPABILITY") == 0 && c->ntok == 0)
		cmd_capability(s, c);
	else if (strcmp(c->name, "NOOP") == 0 && c->ntok == 0)
		client_send(s, "%s OK NOOP completed.", c->tag);
	else if (strcmp(c->name, "LOGOUT") == 0 && c->ntok == 0) {
		client_send(s, "* BYE Logging out.");
		client_send(s, "%s OK LOGOUT completed.", c->tag);
		s->end = END_LOGOUT;
	} else if (strcmp(c->name, "ID") == 0)
		cmd_id(s, c);
	else if (strcmp(c->name, "LOGIN") == 0)
		cmd_login(s, c);
	else if (strcmp(c->name, "AUTHENTICATE") == 0)
		cmd_authenticate(s, c);
	else if (strcmp(c->name, "STARTTLS") == 0)
		cmd_starttls(s, c);
	else if (strcmp(c->name, "CAPABILITY") == 0 ||
	    strcmp(c->name, "NOOP") == 0 || strcmp(c->name, "LOGOUT") == 0)
		bad_command(s, c->tag, "This command takes no arguments.");
	else if (needs_login(c->name))
		bad_command(s, c->tag, "Log in first.");
	else
		bad_command(s, c->tag, "Unknown command.");
}

/*
 * Within max_sessions_per_ip?  Counted across the host's processes, and
 * answered as RFC 5530 says a server that will not serve says it.
 */
static int
session_admitted(struct session *s)
{
	if (state_session_begin(s->cfg->state, s->cfg, client_addr(s)) ==
	    STATE_ADMITTED)
		return 1;
	log_msg(LOG_NOTICE, "event=refused client=%s reason=\"max_sessions_per_ip "
	    "(%d) reached\"", s->ci.ip, s->cfg->max_sessions_per_ip);
	session_bye(s, END_LIMIT, "[UNAVAILABLE] Too many connections from "
	    "your address, try again later.");
	return 0;
}

/* Greet, then read and answer commands until login or the end. */
static void
session_prelogin(struct session *s)
{
	struct command *cmd;
	const char *why;
	enum parse_status ps;
	size_t len;

	if ((cmd = malloc(sizeof(*cmd))) == NULL) {
		session_nomem(s);
		return;
	}
	if (s->tls_ctx != NULL && s->cfg->tls_mode == TLS_IMPLICIT &&
	    client_tls_start(s) != 0) {
		free(cmd);
		return;
	}
	if (!session_admitted(s)) {
		free(cmd);
		return;
	}
	client_send(s, "* OK [CAPABILITY %s] %s", prelogin_caps(s),
	    s->cfg->greeting);
	while (s->end == END_NONE && !s->logged_in) {
		s->client.deadline = s->started +
		    (int64_t)s->cfg->login_timeout * 1000;
		if (read_command(s) != READ_OK)
			goto next;
		/* parse_command needs one byte past the command: its CR */
		len = s->cmdbuf.text.len - 2;
		trace_data("from", "client", s->cmdbuf.text.s, len, 0);
		ps = parse_command(s->cmdbuf.text.s, len, cmd, &why);
		if (s->cmdbuf.longest > s->cfg->max_line_length &&
		    (ps != PARSE_OK || strcmp(cmd->name, "ID") != 0))
			session_bye(s, END_LIMIT, "Command line too long.");
		else if (ps == PARSE_NOTAG)
			bad_command(s, "*", why);
		else if (ps == PARSE_BAD)
			bad_command(s, cmd->tag, why);
		else
			dispatch_prelogin(s, cmd);
next:
		str_wipe(&s->cmdbuf.text);	/* a LOGIN's password, say */
		if (s->end == END_NONE && s->bad_commands >=
		    s->cfg->max_bad_commands)
			session_bye(s, END_LIMIT, "Too many invalid commands.");
	}
	str_wipe(&s->cmdbuf.text);
	free(cmd);
}

/* ------------------------------------------------------------------ */
/* after login */

/*
 * Commands the client sent while its login was under way: imapfe reads
 * nothing from the client while it reaches the back-end, so they wait in
 * the client buffer.  Counted by their last lines, literals skipped.
 */
static int
pipelined_commands(const struct iobuf *c)
{
	const char *p = c->buf + c->start, *end = c->buf + c->end, *nl;
	int commands = 0;
	uint64_t n;

	while (p < end && (nl = memchr(p, '\n', (size_t)(end - p))) != NULL) {
		size_t len = (size_t)(nl - p);
		enum literal_kind k;

		if (len > 0 && p[len - 1] == '\r')
			len--;
		k = literal_at_end(p, len, &n);
		if (k == LIT_SYNC || k == LIT_NONSYNC) {
			if (n >= (uint64_t)(end - nl))
				break;	/* the literal is still arriving */
			p = nl + 1 + n;
			continue;
		}
		commands++;
		p = nl + 1;
	}
	return commands;
}

/* A client that floods commands behind its login is cut off there. */
static void
check_pipelined(struct session *s)
{
	int n = pipelined_commands(&s->client);

	if (n <= s->cfg->max_pipelined_commands)
		return;
	log_msg(LOG_NOTICE, "event=limit reason=\"%d commands pipelined behind "
	    "the login, more than max_pipelined_commands\"", n);
	session_bye(s, END_LIMIT, "Too many commands sent during login.");
}

/* ------------------------------------------------------------------ */

static void
session_log_end(struct session *s)
{
	log_msg(LOG_INFO, "event=end%s%s%s reason=%s%s%s%s "
	    "bytes_in=%llu bytes_out=%llu duration_ms=%lld",
	    s->user[0] ? " user=\"" : "", s->user, s->user[0] ? "\"" : "",
	    end_names[s->end], s->end_reason ? " detail=\"" : "",
	    s->end_reason ? s->end_reason : "", s->end_reason ? "\"" : "",
	    (unsigned long long)s->client.bytes_in,
	    (unsigned long long)s->client.bytes_out,
	    (long long)(now_ms() - s->started));
}

/*
 * Closing a TCP socket that still holds unread client bytes makes the
 * kernel send a reset, and a reset can destroy our last reply (the BYE)
 * before the client reads it.  So signal end-of-data, then read and discard
 * what the client still sends, briefly and boundedly, as web servers do.
 */
static void
client_linger_close(struct session *s)
{
	char sink[4096];
	int64_t deadline = now_ms() + LINGER_MS;
	size_t drained = 0;

	if (s->end == END_CLIENT_GONE)
		return;
	iobuf_tls_close(&s->client);
	if (shutdown(s->client.wfd, SHUT_WR) != 0)
		return;
	while (drained < LINGER_MAX_BYTES &&
	    wait_readable(s->client.rfd, deadline)) {
		ssize_t n = read(s->client.rfd, sink, sizeof(sink));

		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			break;
		if (n > 0)
			drained += (size_t)n;
	}
}

/*
 * Cap what this session may allocate, so that no bug and no client can
 * make one session take the host down: past the cap, allocations fail and
 * the session ends with "* BYE Out of memory."  (AddressSanitizer's own
 * reservations would exceed any cap, so its builds go without.)
 */
static void
cap_session_memory(const struct config *cfg)
{
#ifndef UNDER_ASAN
	struct rlimit rl;

	if (cfg->max_session_memory == 0)
		return;
	rl.rlim_cur = rl.rlim_max = (rlim_t)cfg->max_session_memory << 20;
	if (setrlimit(RLIMIT_DATA, &rl) != 0)
		log_msg(LOG_WARNING, "event=warning reason=\"max_session_memory: "
		    "%s\"", strerror(errno));
#else
	(void)cfg;
#endif
}

/* Serve one client connection on rfd/wfd, to the end.  Returns exit code. */
static int
session_run(const struct config *cfg, SSL_CTX *tls_ctx, int rfd, int wfd)
{
	struct session s;
	struct endpoints ep;
	size_t bufsize = CLIENT_BUFSIZE;
	int one = 1, loopback_ok;
	char id[32];

	memset(&s, 0, sizeof(s));
	cap_session_memory(cfg);
	s.cfg = cfg;
	s.tls_ctx = tls_ctx;
	s.started = now_ms();
	s.backend.io.rfd = s.backend.io.wfd = -1;
	new_session_id(id, sizeof(id));
	log_session_set(id);
	endpoints_from_socket(&ep, rfd);
	nonblocking(rfd);
	if (endpoints_apply_proxy(&ep, cfg, rfd, &loopback_ok) != 0)
		return 0;
	if (ep.have_peer)
		format_address(&ep.peer, s.peer, sizeof(s.peer));
	else
		snprintf(s.peer, sizeof(s.peer), "local");
	s.peer_loopback = loopback_ok && ep.have_peer && is_loopback(&ep.peer);
	s.peer_addr = ep.peer;
	s.have_peer_addr = ep.have_peer;
	client_info_init(&s.ci, &ep, id);
	setsockopt(wfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	nonblocking(wfd);
	if (cfg->max_line_length + 2 > bufsize)
		bufsize = cfg->max_line_length + 2;
	if (iobuf_init(&s.client, rfd, wfd, bufsize) != 0) {
		log_msg(LOG_ERR, "event=error reason=\"out of memory\"");
		return 1;
	}
	log_msg(LOG_INFO, "event=connect client=%s%s%s", s.peer,
	    ep.proxy[0] ? " proxy=" : "", ep.proxy);
	session_prelogin(&s);
	if (s.logged_in)
		check_pipelined(&s);
	if (s.logged_in && s.end == END_NONE)
		s.end = engine_run(cfg, &s.client, &s.backend, &s.cred, &s.ci,
		    s.user);
	if (s.logged_in)
		backend_close(&s.backend);
	state_session_end(cfg->state);
	if (s.client.tls_why[0] != '\0')
		log_msg(LOG_NOTICE, "event=tls-error side=client reason=\"%s\"",
		    s.client.tls_why);
	session_log_end(&s);
	client_linger_close(&s);
	credentials_clear(&s.cred);
	cmd_buf_free(&s.cmdbuf);
	str_free(&s.ci.id_fields);
	iobuf_free(&s.client);
	return 0;
}


/* ------------------------------------------------------------------ */

/*
 * The configuration cannot be used.  Under inetd the client is already
 * connected on stdout: tell it, so it does not wait for a greeting.
 */
/* The client of an inetd-style start hears why there is no session. */
static void
bye_unavailable(void)
{
	static const char bye[] = "* BYE [UNAVAILABLE] Server configuration "
	    "error.\r\n";

	if (!isatty(1) && write(1, bye, sizeof(bye) - 1) < 0) {
		/* nothing more to be done */
	}
}

static int
startup_failed(const char *err, int no_client)
{
	fprintf(stderr, "imapfe: %s\n", err);
	if (!no_client)
		bye_unavailable();
	log_open(LOG_MAIL, 0);
	log_msg(LOG_ERR, "event=config-error reason=\"%s\"", err);
	return 1;
}

/*
 * Started as root, imapfe has read its keys and secrets by now: sessions
 * run as the configured user and group, inside chroot when set, and never
 * as root.  Started as anyone else, there is nothing to give up.
 */
/* The ids of the user and group directives; neither may be root's. */
static int
lookup_run_ids(const struct config *cfg, uid_t *uid, gid_t *gid, char *err,
    size_t errlen)
{
	const struct passwd *pw;
	const struct group *gr;

	if ((pw = getpwnam(cfg->run_user)) == NULL || pw->pw_uid == 0) {
		snprintf(err, errlen, "user %s: %s", cfg->run_user,
		    pw == NULL ? "no such user" : "must not be root");
		return -1;
	}
	*uid = pw->pw_uid;
	*gid = pw->pw_gid;
	if (cfg->run_group != NULL) {
		if ((gr = getgrnam(cfg->run_group)) == NULL || gr->gr_gid == 0) {
			snprintf(err, errlen, "group %s: %s", cfg->run_group,
			    gr == NULL ? "no such group" : "must not be root");
			return -1;
		}
		*gid = gr->gr_gid;
	}
	return 0;
}

static int
drop_privileges(const struct config *cfg, char *err, size_t errlen)
{
	uid_t uid;
	gid_t gid;

	if (geteuid() != 0)
		return 0;
	if (cfg->run_user == NULL) {
		snprintf(err, errlen, "started as root without a user directive: "
		    "imapfe never runs a session as root");
		return -1;
	}
	if (lookup_run_ids(cfg, &uid, &gid, err, errlen) != 0)
		return -1;
	tzset();	/* syslog's time stamps, read before a chroot hides it */
	if (cfg->chroot_dir != NULL && (chroot(cfg->chroot_dir) != 0 ||
	    chdir("/") != 0)) {
		snprintf(err, errlen, "chroot %s: %s", cfg->chroot_dir,
		    strerror(errno));
		return -1;
	}
	if (setgroups(1, &gid) != 0 || setresgid(gid, gid, gid) != 0 ||
	    setresuid(uid, uid, uid) != 0) {
		snprintf(err, errlen, "cannot become %s: %s", cfg->run_user,
		    strerror(errno));
		return -1;
	}
	if (setuid(0) == 0) {
		snprintf(err, errlen, "root could be regained after dropping it");
		return -1;
	}
	/* A setuid process is not dumpable; say so for the rest too. */
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	return 0;
}

/* A context already loaded for another route with the same files. */
static SSL_CTX *
loaded_ctx_like(const struct config *cfg, const struct route *r)
{
	const struct route *lists[] = { cfg->routes, cfg->publics,
	    cfg->servers };

	for (size_t i = 0; i < sizeof(lists) / sizeof(*lists); i++)
		for (const struct route *o = lists[i]; o != NULL; o = o->next)
			if (o != r && o->ssl_ctx != NULL &&
			    tls_backend_ctx_shareable(o, r))
				return o->ssl_ctx;
	return NULL;
}

static int
preload_list_tls(const struct config *cfg, struct route *list, int all,
    char *err, size_t errlen)
{
	for (struct route *r = list; r != NULL; r = r->next)
		if (r->alt != NULL &&
		    preload_list_tls(cfg, r->alt, all, err, errlen) != 0)
			return -1;
	for (struct route *r = list; r != NULL; r = r->next) {
		char why[300];

		if (r->tls == TLS_NONE || r->ssl_ctx != NULL ||
		    (!all && !tls_backend_ctx_reads_files(cfg, r)))
			continue;
		if ((r->ssl_ctx = loaded_ctx_like(cfg, r)) != NULL) {
			SSL_CTX_up_ref(r->ssl_ctx);
			continue;
		}
		if ((r->ssl_ctx = tls_backend_ctx(cfg, r, why, sizeof(why))) ==
		    NULL) {
			snprintf(err, errlen, "%s%s%s:%s: %s", r->pattern,
			    r->pattern[0] ? " " : "", r->host, r->port, why);
			return -1;
		}
	}
	return 0;
}

/*
 * Load back-end CA files and client certificates now: all of them for -t,
 * to check them; before dropping root, those that read configured files,
 * which may be root's alone (the system's CA store is left to the sessions
 * that use it: loading it for every route would cost every exec'd session
 * milliseconds).  Otherwise each session loads what its back-ends need.
 */
static int
preload_backend_tls(struct config *cfg, int all, char *err, size_t errlen)
{
	if (preload_list_tls(cfg, cfg->routes, all, err, errlen) != 0 ||
	    preload_list_tls(cfg, cfg->servers, all, err, errlen) != 0)
		return -1;
	return preload_list_tls(cfg, cfg->publics, all, err, errlen);
}

/* The client-side TLS context, when tls_cert is configured. */
static int
client_tls_setup(struct config *cfg, int implicit_tls, SSL_CTX **ctx,
    char *err, size_t errlen)
{
	*ctx = NULL;
	if (implicit_tls) {
		if (cfg->tls_cert == NULL) {
			snprintf(err, errlen, "-T needs tls_cert in the "
			    "configuration");
			return -1;
		}
		cfg->tls_mode = TLS_IMPLICIT;
	}
	if (cfg->tls_cert == NULL) {
		if (cfg->tls_mode == TLS_IMPLICIT) {
			snprintf(err, errlen, "tls_mode implicit needs "
			    "tls_cert");
			return -1;
		}
		return 0;
	}
	*ctx = tls_server_ctx(cfg, err, errlen);
	return *ctx == NULL ? -1 : 0;
}

static int
stderr_is_stdin(void)
{
	struct stat in, err;

	return fstat(0, &in) == 0 && fstat(2, &err) == 0 &&
	    in.st_dev == err.st_dev && in.st_ino == err.st_ino;
}

static void
usage(void)
{
	fprintf(stderr, "usage: imapfe [-DdTtV] [-f config] "
	    "[-l address:port]\n");
	exit(2);
}

static void
parse_options(int argc, char *argv[], struct options *opt)
{
	int ch;

	memset(opt, 0, sizeof(*opt));
	opt->config_path = IMAPFE_DEFAULT_CONFIG;
	while ((ch = getopt(argc, argv, "Ddf:l:TtV")) != -1) {
		switch (ch) {
		case 'D':
			protocol_trace = 1;
			/* FALLTHROUGH */
		case 'd':
			opt->to_stderr = 1;
			break;
		case 'f':
			opt->config_path = optarg;
			break;
		case 'l':
			opt->listen_spec = optarg;
			break;
		case 'T':
			opt->implicit_tls = 1;
			break;
		case 't':
			opt->test_only = 1;
			break;
		case 'V':
			opt->version = 1;
			break;
		default:
			usage();
		}
	}
	if (optind != argc)
		usage();
}

/*
 * Everything -t checks beyond the file itself: the TLS contexts (all of
 * them for -t and a reload; as root, those whose files may be root's
 * alone), the run user; and what deserves a warning.
 */
static int
startup_prepare(struct config *cfg, const struct options *opt, int check_all,
    SSL_CTX **tls_ctx, char *err, size_t errlen)
{
	uid_t uid;
	gid_t gid;

	if (client_tls_setup(cfg, opt->implicit_tls, tls_ctx, err,
	    errlen) != 0 || ((check_all || geteuid() == 0) &&
	    preload_backend_tls(cfg, check_all, err, errlen) != 0))
		return -1;
	if (*tls_ctx == NULL && cfg->plaintext_auth == PLAINTEXT_NO &&
	    cfg->auth == AUTH_PASSTHROUGH)
		log_msg(LOG_WARNING, "event=warning reason=\"plaintext_auth is "
		    "no and there is no tls_cert: no client can log in\"");
	if (check_all && cfg->run_user != NULL &&
	    lookup_run_ids(cfg, &uid, &gid, err, errlen) != 0)
		return -1;
	if (protocol_trace && stderr_is_stdin()) {
		/* inetd hands the connection over as stderr too */
		protocol_trace = 0;
		log_msg(LOG_WARNING, "event=warning reason=\"-D ignored: stderr "
		    "is the client's connection\"");
	}
	if (cfg->idle_timeout < 1800)
		log_msg(LOG_WARNING, "event=warning reason=\"idle_timeout is "
		    "below RFC 9051's 30 minutes\"");
	return 0;
}

/*
 * The shared state file, opened before privileges are dropped (a chroot
 * may hide it) and kept by every session: the listener's children inherit
 * it.  Made in a directory of its own when that is missing, and given to
 * the run user when made here (every session writes to it).  Never
 * fails: a file that cannot be used is logged, and imapfe goes on
 * without it.
 */
static void
shared_state_open(struct config *cfg)
{
	uid_t uid = (uid_t)-1;
	gid_t gid = (gid_t)-1;
	char dir[PATH_MAX], err[256], *slash;

	if (strcmp(cfg->state_file, "none") == 0)
		return;
	if (geteuid() == 0 && cfg->run_user != NULL &&
	    lookup_run_ids(cfg, &uid, &gid, err, sizeof(err)) != 0)
		uid = (uid_t)-1;
	snprintf(dir, sizeof(dir), "%s", cfg->state_file);
	if ((slash = strrchr(dir, '/')) != NULL && slash != dir) {
		*slash = '\0';
		if (mkdir(dir, 0755) != 0 && errno != EEXIST)
			log_msg(LOG_WARNING, "event=warning reason=\"mkdir %s: "
			    "%s\"", dir, strerror(errno));
	}
	cfg->state = state_open(cfg->state_file, uid, gid);
}

static void	service_free(struct service *);

/*
 * Read the configuration file of opt and load everything it names; with
 * check_all, check it all as -t does (a listener's reload).  The log is
 * opened with the file's facility only by main(), and by a reload once
 * the new service is in force.
 */
static int
service_load(struct service *svc, const struct options *opt, int check_all,
    char *err, size_t errlen)
{
	memset(svc, 0, sizeof(*svc));
	if (config_load(&svc->cfg, opt->config_path, err, errlen) != 0)
		return -1;
	if (startup_prepare(&svc->cfg, opt, check_all, &svc->tls_ctx, err,
	    errlen) != 0) {
		service_free(svc);
		return -1;
	}
	shared_state_open(&svc->cfg);
	return 0;
}

static void
service_free(struct service *svc)
{
	tls_server_ctx_free(svc->tls_ctx);
	config_free(&svc->cfg);
	svc->tls_ctx = NULL;
}

/* Once here, so that forked sessions do not each pay for it. */
static int
service_sasl_setup(const struct config *cfg)
{
	char err[512];

	if (cfg->auth == AUTH_PROXY &&
	    sasl_server_setup(cfg, err, sizeof(err)) != 0) {
		log_msg(LOG_ERR, "event=error reason=\"%s\"", err);
		return -1;
	}
	if (sasl_client_setup(cfg->backend_mechanisms) != 0) {
		log_msg(LOG_ERR, "event=error reason=\"SASL initialisation "
		    "failed\"");
		if (cfg->auth == AUTH_PROXY)
			sasl_server_teardown();
		return -1;
	}
	return 0;
}

static void
service_sasl_teardown(const struct config *cfg)
{
	sasl_client_teardown();
	if (cfg->auth == AUTH_PROXY)
		sasl_server_teardown();
}

/* One of the listener's connections, in its own process. */
static int
listener_session(const struct service *svc, int fd)
{
	return session_run(&svc->cfg, svc->tls_ctx, fd, fd);
}

static const struct listener_hooks listener_hooks = {
	.session = listener_session,
	.load = service_load,
	.free = service_free,
	.sasl_setup = service_sasl_setup,
	.sasl_teardown = service_sasl_teardown
};

/*
 * As the run user: the listener's connections, one process each, or the
 * one connection on stdin and stdout.  The listener takes lfd over.
 */
static int
serve(struct service *svc, const struct options *opt, int lfd)
{
	char err[512];

	if (drop_privileges(&svc->cfg, err, sizeof(err)) != 0) {
		log_msg(LOG_ERR, "event=config-error reason=\"%s\"", err);
		if (lfd < 0)
			bye_unavailable();
		else
			close(lfd);
		return 1;
	}
	if (lfd >= 0)
		return serve_listener(svc, opt, &listener_hooks, lfd);
	return session_run(&svc->cfg, svc->tls_ctx, 0, 1);
}

/* Listen where told, or take what inetd or systemd hands over; serve. */
static int
run(struct service *svc, const struct options *opt)
{
	int lfd, rc = 1;

	install_signals();
	if (opt->listen_spec == NULL)
		lfd = inherited_listener();
	else if ((lfd = listen_on(opt->listen_spec)) < 0)
		return 1;
	if (service_sasl_setup(&svc->cfg) != 0) {
		if (lfd >= 0)
			close(lfd);
		return 1;
	}
	rc = serve(svc, opt, lfd);
	service_sasl_teardown(&svc->cfg);
	return rc;
}

int
main(int argc, char *argv[])
{
	struct options opt;
	struct service svc;
	struct rlimit no_core = { 0, 0 };
	char err[512];
	int no_client, rc;

	parse_options(argc, argv, &opt);
	if (opt.version) {
		printf("imapfe %s\n", IMAPFE_VERSION);
		return 0;
	}
	/* A core dump would hold passwords. */
	setrlimit(RLIMIT_CORE, &no_core);
	/* No client waits on stdout for a BYE. */
	no_client = opt.test_only || opt.listen_spec != NULL;
	memset(&svc, 0, sizeof(svc));
	if (config_load(&svc.cfg, opt.config_path, err, sizeof(err)) != 0)
		return startup_failed(err, no_client);
	log_open(svc.cfg.syslog_facility, opt.to_stderr || opt.test_only);
	if (startup_prepare(&svc.cfg, &opt, opt.test_only, &svc.tls_ctx, err,
	    sizeof(err)) != 0)
		rc = startup_failed(err, no_client);
	else if (opt.test_only) {
		printf("imapfe: %s: configuration OK\n", opt.config_path);
		rc = 0;
	} else {
		shared_state_open(&svc.cfg);
		rc = run(&svc, &opt);
	}
	service_free(&svc);
	log_close();
	return rc;
}
