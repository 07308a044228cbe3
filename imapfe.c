/*
 * imapfe: an IMAP front-end.  One process serves one client connection:
 * greet, authenticate, find the user's back-end, log in there, relay,
 * exit.  Started by inetd/xinetd/systemd on stdin and stdout, or by its
 * own listener (-l), which forks one child per connection.
 */
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
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
#define ID_MAX_PAIRS		30		/* RFC 2971 */
#define ID_MAX_FIELD		30
#define ID_MAX_VALUE		1024
#define LINGER_MS		2000		/* see client_linger_close() */
#define LINGER_MAX_BYTES	(1024 * 1024)

volatile sig_atomic_t	shutdown_requested;

/* ------------------------------------------------------------------ */
/* logging */

static char	log_session[32];
static int	log_stderr;

void
log_msg(int prio, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (log_session[0] != '\0')
		syslog(prio, "session=%s %s", log_session, msg);
	else
		syslog(prio, "%s", msg);
}

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
	cfg->max_session_memory = 64;
	cfg->forward_id = 1;
	cfg->max_line_length = 8192;
	cfg->max_prelogin_literal = 4096;
	cfg->max_login_failures = 3;
	cfg->max_bad_commands = 10;
	cfg->login_timeout = 120;
	cfg->idle_timeout = 1860;
	cfg->connect_timeout = 10;
	cfg->backend_timeout = 30;
	cfg->max_sessions = 1000;
	cfg->syslog_facility = LOG_MAIL;
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

/* "host:port", "[v6addr]:port" */
static int
split_hostport(const char *s, char **host, char **port)
{
	const char *colon;
	size_t hl;

	if (*s == '[') {
		const char *close = strchr(s, ']');

		if (close == NULL || close[1] != ':')
			return -1;
		hl = (size_t)(close - s - 1);
		s++;
		colon = close + 1;
	} else {
		if ((colon = strrchr(s, ':')) == NULL)
			return -1;
		hl = (size_t)(colon - s);
	}
	if (hl == 0 || colon[1] == '\0')
		return -1;
	*host = strndup(s, hl);
	*port = strdup(colon + 1);
	if (*host == NULL || *port == NULL) {
		free(*host);
		free(*port);
		return -1;
	}
	return 0;
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
	free(r->pattern);
	free(r->host);
	free(r->port);
	free(r->verify_name);
	free(r->ca_file);
	free(r->ca_path);
	free(r->client_cert);
	free(r->client_key);
	free(r);
}

/* "route PATTERN HOST:PORT [opt=val ...]" or "public PREFIX HOST:PORT ..." */
static int
add_route(struct config *cfg, char **w, int n, char *err, size_t errlen)
{
	int public = strcmp(w[0], "public") == 0;
	struct route *r, **head = public ? &cfg->publics : &cfg->routes;
	struct route **tail = public ? &cfg->publics_tail : &cfg->routes_tail;

	if (n < 3) {
		snprintf(err, errlen, "%s takes %s HOST:PORT [OPTION=VALUE ...]",
		    w[0], public ? "PREFIX" : "PATTERN");
		return -1;
	}
	if (public && (w[1][0] == '\0' || strncasecmp(w[1], "INBOX", 5) == 0 ||
	    strpbrk(w[1], "*%\r\n") != NULL)) {
		snprintf(err, errlen, "public prefix must be a mailbox name "
		    "prefix without wildcards, not INBOX");
		return -1;
	}
	if (!public && strcmp(w[1], "*") != 0 && strchr(w[1], '*') != NULL &&
	    strncmp(w[1], "*@", 2) != 0) {
		snprintf(err, errlen, "route pattern must be a user, *@domain "
		    "or *");
		return -1;
	}
	if ((r = calloc(1, sizeof(*r))) == NULL ||
	    (r->pattern = strdup(w[1])) == NULL ||
	    split_hostport(w[2], &r->host, &r->port) != 0) {
		if (r != NULL)
			free(r->pattern);
		free(r);
		snprintf(err, errlen, "bad route target '%s' (HOST:PORT)", w[2]);
		return -1;
	}
	for (int i = 3; i < n; i++)
		if (route_option(r, w[i], err, errlen) != 0) {
			route_free(r);
			return -1;
		}
	if (r->client_key != NULL && r->client_cert == NULL) {
		snprintf(err, errlen, "client_key= needs client_cert=");
		route_free(r);
		return -1;
	}
	if (*tail != NULL)
		(*tail)->next = r;
	else
		*head = r;
	*tail = r;
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
	{ "tls_handshake_timeout", offsetof(struct config,
	    tls_handshake_timeout), 1, 600, 0 },
	{ "public_holddown", offsetof(struct config, public_holddown), 0,
	    86400, 0 },
	{ "max_session_memory", offsetof(struct config, max_session_memory),
	    0, 65536, 0 },
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

static int
config_line(struct config *cfg, char **w, int n, char *err, size_t errlen)
{
	if (strcmp(w[0], "route") == 0 || strcmp(w[0], "public") == 0)
		return add_route(cfg, w, n, err, errlen);
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
	if (rc == 0 && cfg->routes == NULL) {
		snprintf(err, errlen, "%s: no route configured", path);
		rc = -1;
	}
	if (rc == 0)
		rc = config_check_tls(cfg, path, err, errlen);
	if (rc == 0)
		rc = config_check_auth(cfg, path, err, errlen);
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
	if (cfg->proxy != NULL) {
		credentials_clear(cfg->proxy);
		free(cfg->proxy);
	}
	for (size_t i = 0; i < sizeof(string_keys) / sizeof(*string_keys);
	    i++)
		free(*(char **)(void *)((char *)cfg + string_keys[i].offset));
	memset(cfg, 0, sizeof(*cfg));
}

/* ------------------------------------------------------------------ */
/* the session */

enum session_end {
	END_NONE = 0,
	END_LOGOUT,		/* the client logged out */
	END_CLIENT_GONE,	/* the client closed or failed */
	END_BACKEND_GONE,	/* the back-end closed or failed */
	END_LIMIT,		/* a limit was reached: BYE sent */
	END_TIMEOUT,
	END_SHUTDOWN,
	END_TLS			/* the TLS handshake failed */
};

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
	struct str		 cmdbuf;	/* the command being read */
	char			 peer[80];
	char			 user[96];	/* sanitized, for logs */
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

/* The peer's address for logs; returns whether it is a loopback one. */
static int
describe_peer(int fd, char *out, size_t outlen)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char host[NI_MAXHOST], serv[NI_MAXSERV];

	if (getpeername(fd, (struct sockaddr *)&ss, &sl) != 0 ||
	    getnameinfo((struct sockaddr *)&ss, sl, host, sizeof(host), serv,
	    sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
		snprintf(out, outlen, "local");
		return 0;
	}
	snprintf(out, outlen, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s",
	    host, serv);
	return is_loopback(&ss);
}

static void
numeric_address(const struct sockaddr_storage *ss, socklen_t sl, char *ip,
    size_t iplen, char *port, size_t portlen)
{
	if (getnameinfo((const struct sockaddr *)ss, sl, ip, (socklen_t)iplen,
	    port, (socklen_t)portlen, NI_NUMERICHOST | NI_NUMERICSERV) != 0)
		ip[0] = port[0] = '\0';
}

/* Both ends of the client's connection, for the back-end's ID. */
static void
client_info_init(struct client_info *ci, int fd, const char *session)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);

	memset(ci, 0, sizeof(*ci));
	ci->ttl = PROXY_TTL_DEFAULT;
	snprintf(ci->session, sizeof(ci->session), "%s", session);
	if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0)
		numeric_address(&ss, sl, ci->ip, sizeof(ci->ip), ci->port,
		    sizeof(ci->port));
	sl = sizeof(ss);
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0)
		numeric_address(&ss, sl, ci->local_ip, sizeof(ci->local_ip),
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

	s->client.deadline = now_ms() + (int64_t)s->cfg->idle_timeout * 1000;
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
 * back-end needs the password itself), and without plaintext mechanisms
 * wherever plaintext is not allowed.
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
		str_adds(&mechs, " AUTH=PLAIN AUTH=LOGIN");
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
	switch (st) {
	case IO_TIMEOUT:
		session_bye(s, END_TIMEOUT, "Disconnected for inactivity.");
		break;
	case IO_TOOLONG:
		session_bye(s, END_LIMIT, "Command line too long.");
		break;
	case IO_NOMEM:
		session_bye(s, END_LIMIT, "Out of memory.");
		break;
	default:
		if (shutdown_requested)
			session_bye(s, END_SHUTDOWN, "Server shutting down.");
		else
			s->end = END_CLIENT_GONE;
		break;
	}
}

/*
 * Read one whole command: its lines and the literals they announce, into
 * s->cmdbuf.  Synchronizing literals get their "+" here, once their size
 * is known to be acceptable.
 */
static enum read_status
read_command(struct session *s)
{
	enum io_status st;
	enum literal_kind k;
	uint64_t n;
	size_t len;
	char *line, tag[64];

	str_wipe(&s->cmdbuf);
	for (;;) {
		st = iobuf_getline(&s->client, s->cfg->max_line_length, &line,
		    &len);
		if (st != IO_OK) {
			io_end(s, st);
			return READ_END;
		}
		if (s->cmdbuf.len + len + 2 > PRELOGIN_COMMAND_MAX) {
			session_bye(s, END_LIMIT, "Command too long.");
			return READ_END;
		}
		if (str_add(&s->cmdbuf, line, len) != 0) {
			session_bye(s, END_LIMIT, "Out of memory.");
			return READ_END;
		}
		k = literal_at_end(line, len, &n);
		if (k == LIT_NONE)
			return READ_OK;
		if (k == LIT_INVALID) {
			early_tag(s->cmdbuf.s, s->cmdbuf.len, tag, sizeof(tag));
			client_send(s, "%s BAD Invalid literal size.", tag);
			log_msg(LOG_NOTICE, "event=bad-command reason=\"invalid "
			    "literal size\"");
			s->bad_commands++;
			return READ_BAD_LITERAL;
		}
		if (n > s->cfg->max_prelogin_literal ||
		    s->cmdbuf.len + n + 2 > PRELOGIN_COMMAND_MAX) {
			/* A non-synchronizing literal is on its way already. */
			session_bye(s, END_LIMIT, "Literal too large.");
			return READ_END;
		}
		if (k == LIT_SYNC && client_send(s, "+ Ready for literal "
		    "data") != 0)
			return READ_END;
		if (str_add(&s->cmdbuf, "\r\n", 2) != 0 ||
		    (st = iobuf_read_into(&s->client, n, &s->cmdbuf)) != IO_OK) {
			io_end(s, st);
			return READ_END;
		}
	}
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
 * count is believed only when it is lower than ours.
 */
static void
id_keep(struct session *s, const struct token *f, const struct token *v)
{
	static const char *const reserved[] = { "x-originating-",
	    "x-connected-", "x-session-", "x-proxy-ttl", "x-forward-" };
	struct str *out = &s->ci.id_fields;

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
	if ((out->len > 0 && str_add(out, " ", 1) != 0) ||
	    imap_append_string(out, f->s, f->len, 0) < 0 ||
	    str_add(out, " ", 1) != 0)
		str_wipe(out);
	else if (v->type == TOK_NIL ? str_adds(out, "NIL") != 0 :
	    imap_append_string(out, v->s, v->len, 0) < 0)
		str_wipe(out);
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
	    (n - 2) / 2 > ID_MAX_PAIRS) {
		bad_command(s, c->tag, "Invalid ID parameters.");
		return;
	}
	for (i = 1; i + 1 < n; i += 2) {
		const struct token *f = &c->tok[i], *v = &c->tok[i + 1];

		if ((f->type != TOK_QUOTED && f->type != TOK_LITERAL) ||
		    f->len > ID_MAX_FIELD ||
		    (v->type != TOK_NIL && v->type != TOK_QUOTED &&
		    v->type != TOK_LITERAL) || v->len > ID_MAX_VALUE) {
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

static void
login_failed(struct session *s, const char *tag, const char *code,
    const char *text)
{
	s->failures++;
	client_send(s, "%s NO [%s] %s", tag, code, text);
	if (s->failures >= s->cfg->max_login_failures && s->end == END_NONE)
		session_bye(s, END_LIMIT, "Too many failed logins.");
}

/*
 * Credentials are in s->cred: find the back-end and log in there.  The
 * client hears the same NO for an unknown user as for a wrong password.
 */
static void
do_login(struct session *s, const char *tag, const char *method)
{
	const struct route *r;
	enum login_result res;
	char why[256];
	char *caps;

	sanitize(s->user, sizeof(s->user), s->cred.user, s->cred.user_len);
	if (!credentials_acceptable(s->cred.user, s->cred.user_len) ||
	    !credentials_acceptable(s->cred.pass, s->cred.pass_len) ||
	    s->cred.user_len == 0) {
		log_msg(LOG_NOTICE, "event=login-failed user=\"%s\" "
		    "method=%s reason=\"invalid characters in credentials\"",
		    s->user, method);
		credentials_clear(&s->cred);
		login_failed(s, tag, "AUTHENTICATIONFAILED",
		    "Authentication failed.");
		return;
	}
	if ((r = route_lookup(s->cfg, s->cred.user)) == NULL) {
		log_msg(LOG_NOTICE, "event=login-failed user=\"%s\" "
		    "method=%s reason=\"no route for user\"", s->user, method);
		credentials_clear(&s->cred);
		login_failed(s, tag, "AUTHENTICATIONFAILED",
		    "Authentication failed.");
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
	res = backend_open_as(&s->backend, s->cfg, r, &s->cred, &s->ci, why,
	    sizeof(why));
	/*
	 * Public-folder servers are logged in to later, as the user: with
	 * the password in passthrough mode, by name alone in proxy mode.
	 */
	if (res != LOGIN_OK || s->cfg->publics == NULL)
		credentials_clear(&s->cred);
	else if (s->cfg->auth == AUTH_PROXY)
		credentials_drop_password(&s->cred);
	if (res == LOGIN_OK &&
	    (caps = caps_for_client(s->backend.caps,
	    s->cfg->publics != NULL)) != NULL) {
		s->logged_in = 1;
		log_msg(LOG_INFO, "event=login user=\"%s\" method=%s "
		    "backend=%s:%s", s->user, method, s->backend.host,
		    s->backend.port);
		client_send(s, "%s OK [CAPABILITY %s] Logged in.", tag, caps);
		free(caps);
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
	if (res == LOGIN_BADCREDS)
		login_failed(s, tag, "AUTHENTICATIONFAILED",
		    "Authentication failed.");
	else
		login_failed(s, tag, "UNAVAILABLE",
		    "Back-end server unavailable, try again later.");
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
	const char *code = "AUTHENTICATIONFAILED", *text =
	    "Authentication failed.";

	if (rc == SASL_NOAUTHZ) {
		code = "AUTHORIZATIONFAILED";
		text = "Authorization identity not allowed.";
	} else if (rc == SASL_NOMEM || rc == SASL_FAIL || rc == SASL_TRYAGAIN ||
	    rc == SASL_UNAVAIL) {
		code = "UNAVAILABLE";
		text = "Authentication service unavailable, try again later.";
	}
	log_msg(code[0] == 'U' ? LOG_ERR : LOG_NOTICE, "event=login-failed%s%s%s "
	    "method=%s reason=\"SASL: %s\"", s->user[0] ? " user=\"" : "",
	    s->user, s->user[0] ? "\"" : "", method,
	    sasl_errstring(rc, NULL, NULL));
	login_failed(s, tag, code, text);
}

/* auth proxy: LOGIN's password is checked by the SASL configuration. */
static int
proxy_check_password(struct session *s, const char *tag)
{
	sasl_conn_t *conn = sasl_server_conn(s->cfg, plaintext_allowed(s));
	int rc = SASL_FAIL;

	sanitize(s->user, sizeof(s->user), s->cred.user, s->cred.user_len);
	if (conn != NULL && credentials_acceptable(s->cred.user,
	    s->cred.user_len) && credentials_acceptable(s->cred.pass,
	    s->cred.pass_len))
		rc = sasl_checkpass(conn, s->cred.user,
		    (unsigned)s->cred.user_len, s->cred.pass,
		    (unsigned)s->cred.pass_len);
	else if (conn != NULL)
		rc = SASL_BADAUTH;
	sasl_dispose(&conn);
	if (rc == SASL_OK)
		return 0;
	credentials_clear(&s->cred);
	sasl_server_failed(s, tag, "LOGIN", rc);
	return -1;
}

static void
cmd_login(struct session *s, const struct command *c)
{
	if (c->ntok != 2 || !is_string(&c->tok[0]) || !is_string(&c->tok[1])) {
		bad_command(s, c->tag, "LOGIN takes a user name and a "
		    "password.");
		return;
	}
	if (plaintext_refused(s, c->tag))
		return;
	if (credentials_set(&s->cred, c->tok[0].s, c->tok[0].len,
	    c->tok[1].s, c->tok[1].len) != 0) {
		session_bye(s, END_LIMIT, "Out of memory.");
		return;
	}
	if (s->cfg->auth == AUTH_PROXY && proxy_check_password(s, c->tag) != 0)
		return;
	do_login(s, c->tag, "LOGIN");
}

/*
 * One client response of an AUTHENTICATE exchange, base64-decoded into a
 * fresh buffer the caller wipes and frees.  Returns 1 for data, 0 when the
 * client cancelled or sent bad base64 (answered here), -1 when the
 * session ended.
 */
static int
auth_response(struct session *s, const char *tag, const char *prompt,
    const struct token *ir, char **out, size_t *outlen)
{
	const char *b64;
	size_t len;
	char *line;
	enum io_status st;

	if (ir != NULL) {
		b64 = ir->s;
		len = ir->len;
	} else {
		if (client_send(s, "+ %s", prompt) != 0)
			return -1;
		st = iobuf_getline(&s->client, s->cfg->max_line_length, &line,
		    &len);
		if (st != IO_OK) {
			io_end(s, st);
			return -1;
		}
		b64 = line;
	}
	if (len == 1 && b64[0] == '*') {
		client_send(s, "%s BAD Authentication cancelled.", tag);
		return 0;
	}
	if (len == 1 && b64[0] == '=' && ir != NULL)
		len = 0;	/* SASL-IR: "=" is an empty initial response */
	*out = malloc(len / 4 * 3 + 1);
	if (*out == NULL || base64_decode(b64, len, *out, len / 4 * 3 + 1,
	    outlen) != 0) {
		free(*out);
		*out = NULL;
		bad_command(s, tag, "Invalid base64 data.");
		return 0;
	}
	return 1;
}

static void
free_secret(char *p, size_t len)
{
	if (p != NULL) {
		wipe(p, len);
		free(p);
	}
}

static void
auth_plain(struct session *s, const char *tag, const struct token *ir)
{
	char *msg = NULL;
	size_t len = 0;

	if (auth_response(s, tag, "", ir, &msg, &len) != 1)
		return;
	switch (sasl_plain_split(msg, len, &s->cred)) {
	case PLAIN_OK:
		free_secret(msg, len);
		do_login(s, tag, "PLAIN");
		return;
	case PLAIN_AUTHZID:
		free_secret(msg, len);
		log_msg(LOG_NOTICE, "event=login-failed method=PLAIN "
		    "reason=\"authorization identity not allowed\"");
		login_failed(s, tag, "AUTHORIZATIONFAILED",
		    "Authorization identity not allowed.");
		return;
	case PLAIN_MALFORMED:
		free_secret(msg, len);
		bad_command(s, tag, "Malformed PLAIN message.");
		return;
	}
}

/* SASL LOGIN: user name, then password, each its own continuation. */
static void
auth_login(struct session *s, const char *tag, const struct token *ir)
{
	char *user = NULL, *pass = NULL;
	size_t ulen = 0, plen = 0;
	int rc;

	/* "VXNlcm5hbWU6" and "UGFzc3dvcmQ6": "Username:" and "Password:" */
	if (auth_response(s, tag, "VXNlcm5hbWU6", ir, &user, &ulen) != 1)
		return;
	rc = auth_response(s, tag, "UGFzc3dvcmQ6", NULL, &pass, &plen);
	if (rc == 1 && credentials_set(&s->cred, user, ulen, pass, plen) != 0)
		rc = -1;
	free_secret(user, ulen);
	free_secret(pass, plen);
	if (rc == 1)
		do_login(s, tag, "LOGIN");
	else if (rc < 0 && s->end == END_NONE)
		session_bye(s, END_LIMIT, "Out of memory.");
}

/* Send a SASL challenge and take the client's decoded response. */
static int
auth_challenge(struct session *s, const char *tag, const char *data,
    unsigned len, char **out, size_t *outlen)
{
	size_t need = ((size_t)len + 2) / 3 * 4 + 1;
	char *b64 = malloc(need);
	int rc;

	if (b64 == NULL) {
		session_bye(s, END_LIMIT, "Out of memory.");
		return -1;
	}
	base64_encode((const unsigned char *)data, len, b64, need);
	rc = auth_response(s, tag, b64, NULL, out, outlen);
	free(b64);
	return rc;
}

/* Not a SASL code: the exchange ended with an answer already sent. */
#define EXCHANGE_ANSWERED	1000

/*
 * Run a SASL server exchange to its end.  Each client response is wiped
 * and freed as soon as the library has taken it.
 */
static int
server_exchange(struct session *s, sasl_conn_t *conn, const char *tag,
    const char *mech, const struct token *ir)
{
	const char *out = NULL;
	unsigned outlen = 0;
	char *in = NULL;
	size_t inlen = 0;
	int rc;

	if (ir != NULL && auth_response(s, tag, "", ir, &in, &inlen) != 1)
		return EXCHANGE_ANSWERED;
	/*
	 * Without SASL_SUCCESS_DATA (IMAP has no success data) libsasl2 itself
	 * turns a mechanism's final server message into one more challenge,
	 * so every message to send comes with SASL_CONTINUE; what is left in
	 * out after SASL_OK is stale and must not be sent.
	 */
	rc = sasl_server_start(conn, mech, in, (unsigned)inlen, &out, &outlen);
	free_secret(in, inlen);
	while (rc == SASL_CONTINUE) {
		if (auth_challenge(s, tag, out, outlen, &in, &inlen) != 1)
			return EXCHANGE_ANSWERED;
		rc = sasl_server_step(conn, in, (unsigned)inlen, &out, &outlen);
		free_secret(in, inlen);
	}
	return rc;
}

/*
 * auth proxy: AUTHENTICATE with any mechanism the SASL configuration
 * offers.  Success yields the identity to act as: the authorization
 * identity, which SASL's policy has allowed.  The connection object lives
 * for this one attempt.
 */
static void
auth_sasl_server(struct session *s, const char *tag, const char *mech,
    const struct token *ir)
{
	sasl_conn_t *conn = sasl_server_conn(s->cfg, plaintext_allowed(s));
	const char *user = NULL;
	int rc = SASL_FAIL;

	s->user[0] = '\0';
	if (conn != NULL)
		rc = server_exchange(s, conn, tag, mech, ir);
	if (rc == SASL_OK && (sasl_getprop(conn, SASL_USERNAME,
	    (const void **)&user) != SASL_OK || user == NULL))
		rc = SASL_FAIL;
	if (rc == SASL_OK &&
	    credentials_set(&s->cred, user, strlen(user), "", 0) != 0)
		rc = SASL_NOMEM;
	sasl_dispose(&conn);
	if (rc == SASL_OK)
		do_login(s, tag, mech);
	else if (rc == SASL_NOMECH)
		client_send(s, "%s NO Unsupported authentication mechanism.",
		    tag);
	else if (rc != EXCHANGE_ANSWERED)
		sasl_server_failed(s, tag, mech, rc);
}

static void
cmd_authenticate(struct session *s, const struct command *c)
{
	const struct token *ir;
	char mech[SASL_MECHNAMEMAX + 1];
	int plaintext_mech;

	if (c->ntok < 1 || c->ntok > 2 || c->tok[0].type != TOK_ATOM ||
	    (c->ntok == 2 && c->tok[1].type != TOK_ATOM)) {
		bad_command(s, c->tag, "AUTHENTICATE takes a mechanism and an "
		    "optional initial response.");
		return;
	}
	ir = c->ntok == 2 ? &c->tok[1] : NULL;
	if (c->tok[0].len >= sizeof(mech)) {
		client_send(s, "%s NO Unsupported authentication mechanism.",
		    c->tag);
		return;
	}
	memcpy(mech, c->tok[0].s, c->tok[0].len);
	mech[c->tok[0].len] = '\0';
	for (char *p = mech; *p != '\0'; p++)
		*p = (char)toupper((unsigned char)*p);
	plaintext_mech = strcmp(mech, "PLAIN") == 0 ||
	    strcmp(mech, "LOGIN") == 0;
	if (plaintext_mech && plaintext_refused(s, c->tag))
		return;
	if (s->cfg->auth == AUTH_PROXY)
		auth_sasl_server(s, c->tag, mech, ir);
	else if (strcmp(mech, "PLAIN") == 0)
		auth_plain(s, c->tag, ir);
	else if (strcmp(mech, "LOGIN") == 0)
		auth_login(s, c->tag, ir);
	else
		client_send(s, "%s NO Unsupported authentication mechanism.",
		    c->tag);
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

	s->client.deadline = now_ms() +
	    (int64_t)s->cfg->tls_handshake_timeout * 1000;
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

/* Greet, then read and answer commands until login or the end. */
static void
session_prelogin(struct session *s)
{
	struct command *cmd;
	const char *why;
	enum parse_status ps;

	if ((cmd = malloc(sizeof(*cmd))) == NULL) {
		session_bye(s, END_LIMIT, "Out of memory.");
		return;
	}
	if (s->tls_ctx != NULL && s->cfg->tls_mode == TLS_IMPLICIT &&
	    client_tls_start(s) != 0) {
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
		/* parse_command needs one byte past the command */
		if (str_add(&s->cmdbuf, "", 1) != 0) {
			session_bye(s, END_LIMIT, "Out of memory.");
			break;
		}
		s->cmdbuf.len--;
		ps = parse_command(s->cmdbuf.s, s->cmdbuf.len, cmd, &why);
		if (ps == PARSE_NOTAG)
			bad_command(s, "*", why);
		else if (ps == PARSE_BAD)
			bad_command(s, cmd->tag, why);
		else
			dispatch_prelogin(s, cmd);
next:
		if (s->end == END_NONE && s->bad_commands >=
		    s->cfg->max_bad_commands)
			session_bye(s, END_LIMIT, "Too many invalid commands.");
	}
	str_wipe(&s->cmdbuf);
	free(cmd);
}

/* ------------------------------------------------------------------ */
/* the relay */

/* Move what is buffered on one side to the other. */
static enum io_status
relay_pending(struct iobuf *from, struct iobuf *to, struct resp_scanner *sc)
{
	size_t n = iobuf_pending(from);
	enum io_status st;

	if (n == 0)
		return IO_OK;
	if (sc != NULL)
		resp_scan(sc, from->buf + from->start, n);
	st = iobuf_write(to, from->buf + from->start, n);
	iobuf_consume(from, n);
	return st;
}

/* Literal bodies at least this long go from a plain back-end to a plain
 * client through a pipe with splice(2); shorter ones are not worth it. */
#define SPLICE_MIN	(16 * 1024)
#define SPLICE_MAX	(1024 * 1024)

struct literal_pipe {
	int	fd[2];		/* -1 until the first long literal */
	int	off;		/* these descriptors cannot splice */
};

/*
 * Read from the back-end: into the buffer, or, inside a long literal
 * between plain sockets, straight on to the client, uncopied (the scanner
 * needs only the count).  A failed write to the client sets s->end.
 */
static enum io_status
backend_read(struct session *s, struct literal_pipe *lp,
    struct resp_scanner *sc)
{
	struct iobuf *c = &s->client, *b = &s->backend.io;
	size_t moved;
	int to_failed;
	enum io_status st;

	if (lp->off || b->ssl != NULL || c->ssl != NULL ||
	    iobuf_pending(b) > 0 || sc->literal_left < SPLICE_MIN)
		return iobuf_try_fill(b);
	if (lp->fd[0] < 0 && pipe2(lp->fd, O_CLOEXEC | O_NONBLOCK) != 0) {
		lp->off = 1;
		return iobuf_try_fill(b);
	}
	st = iobuf_splice(b, c, lp->fd, sc->literal_left > SPLICE_MAX ?
	    SPLICE_MAX : (size_t)sc->literal_left, &moved, &to_failed);
	sc->literal_left -= moved;
	if (st == IO_UNSUPPORTED) {
		lp->off = 1;
		return iobuf_try_fill(b);
	}
	if (to_failed) {
		s->end = END_CLIENT_GONE;
		return IO_AGAIN;
	}
	return st;
}

/*
 * After login: bytes flow both ways until either side closes.  Only the
 * client's silence counts towards the idle timeout; the back-end's stream
 * is watched just enough to know whether it already said BYE.
 */
static void
session_relay(struct session *s)
{
	struct iobuf *c = &s->client, *b = &s->backend.io;
	struct resp_scanner sc;
	int64_t idle = (int64_t)s->cfg->idle_timeout * 1000;
	int64_t last_client = now_ms();
	struct pollfd pfd[2];
	struct literal_pipe lp = { .fd = { -1, -1 } };
	enum io_status st;

	resp_scanner_init(&sc);
	while (s->end == END_NONE) {
		c->deadline = b->deadline = now_ms() + idle;
		if (relay_pending(c, b, NULL) != IO_OK) {
			s->end = END_BACKEND_GONE;
			break;
		}
		if (relay_pending(b, c, &sc) != IO_OK) {
			s->end = END_CLIENT_GONE;
			break;
		}
		pfd[0] = (struct pollfd){ .fd = c->rfd, .events = POLLIN };
		pfd[1] = (struct pollfd){ .fd = b->rfd, .events = POLLIN };
		int64_t left = last_client + idle - now_ms();
		if (left <= 0) {
			session_bye(s, END_TIMEOUT, "Disconnected for "
			    "inactivity.");
			break;
		}
		/* Bytes TLS already decrypted are invisible to poll(2). */
		if (iobuf_has_decrypted(c) || iobuf_has_decrypted(b))
			left = 0;
		if (poll_wait(pfd, 2, (int)(left > 3600000 ? 3600000 :
		    left)) < 0) {
			if (errno != EINTR)
				s->end = END_CLIENT_GONE;
			else if (shutdown_requested)
				session_bye(s, END_SHUTDOWN, "Server shutting "
				    "down.");
			continue;
		}
		if (pfd[0].revents != 0 || iobuf_has_decrypted(c)) {
			st = iobuf_try_fill(c);
			if (st != IO_OK && st != IO_AGAIN) {
				s->end = END_CLIENT_GONE;
				break;
			}
			if (st == IO_OK)
				last_client = now_ms();
		}
		if (pfd[1].revents != 0 || iobuf_has_decrypted(b))
			st = backend_read(s, &lp, &sc);
		else
			st = IO_AGAIN;
		if (st != IO_OK && st != IO_AGAIN) {
			if (b->tls_why[0] != '\0')
				log_msg(LOG_NOTICE, "event=tls-error "
				    "side=backend reason=\"%s\"", b->tls_why);
			relay_pending(b, c, &sc);
			s->end = END_BACKEND_GONE;
			if (!sc.saw_bye)
				client_send(s, "* BYE Back-end server closed "
				    "the connection.");
			break;
		}
	}
	if (lp.fd[0] >= 0) {
		close(lp.fd[0]);
		close(lp.fd[1]);
	}
	/* After the back-end's BYE (a LOGOUT, mostly) either side may close. */
	if (sc.saw_bye && (s->end == END_BACKEND_GONE ||
	    s->end == END_CLIENT_GONE))
		s->end = END_LOGOUT;
}

/* With public-folder servers, commands are routed, not just relayed. */
static void
session_route(struct session *s)
{
	static const enum session_end ends[] = {
		[ROUTER_NONE] = END_NONE,
		[ROUTER_LOGOUT] = END_LOGOUT,
		[ROUTER_CLIENT_GONE] = END_CLIENT_GONE,
		[ROUTER_BACKEND_GONE] = END_BACKEND_GONE,
		[ROUTER_LIMIT] = END_LIMIT,
		[ROUTER_TIMEOUT] = END_TIMEOUT,
		[ROUTER_SHUTDOWN] = END_SHUTDOWN,
	};

	s->end = ends[router_run(s->cfg, &s->client, &s->backend, &s->cred,
	    &s->ci, s->user)];
}

/* ------------------------------------------------------------------ */

static void
nonblocking(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl >= 0)
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

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

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN	1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN	1
#endif
#endif

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
	size_t bufsize = CLIENT_BUFSIZE;
	int one = 1;

	memset(&s, 0, sizeof(s));
	cap_session_memory(cfg);
	s.cfg = cfg;
	s.tls_ctx = tls_ctx;
	s.started = now_ms();
	s.backend.io.rfd = s.backend.io.wfd = -1;
	new_session_id(log_session, sizeof(log_session));
	s.peer_loopback = describe_peer(rfd, s.peer, sizeof(s.peer));
	client_info_init(&s.ci, rfd, log_session);
	setsockopt(wfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	nonblocking(rfd);
	nonblocking(wfd);
	if (cfg->max_line_length + 2 > bufsize)
		bufsize = cfg->max_line_length + 2;
	if (iobuf_init(&s.client, rfd, wfd, bufsize) != 0) {
		log_msg(LOG_ERR, "event=error reason=\"out of memory\"");
		return 1;
	}
	log_msg(LOG_INFO, "event=connect client=%s", s.peer);
	session_prelogin(&s);
	if (s.logged_in && cfg->publics != NULL)
		session_route(&s);
	else if (s.logged_in)
		session_relay(&s);
	if (s.logged_in)
		backend_close(&s.backend);
	if (s.client.tls_why[0] != '\0')
		log_msg(LOG_NOTICE, "event=tls-error side=client reason=\"%s\"",
		    s.client.tls_why);
	session_log_end(&s);
	client_linger_close(&s);
	credentials_clear(&s.cred);
	str_free(&s.cmdbuf);
	str_free(&s.ci.id_fields);
	iobuf_free(&s.client);
	return 0;
}

/* ------------------------------------------------------------------ */
/* the listener (-l) */

static volatile sig_atomic_t child_exited;

static void
on_signal(int sig)
{
	if (sig == SIGCHLD)
		child_exited = 1;
	else
		shutdown_requested = 1;
}

static void
install_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	/* No SA_RESTART: a signal must interrupt poll() and accept(). */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGCHLD, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	signals_block_outside_waits();
}

static int
listen_on(const char *spec)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM,
	    .ai_flags = AI_PASSIVE | AI_NUMERICHOST }, *res;
	char *host = NULL, *port = NULL;
	int fd = -1, one = 1, rc;

	if (split_hostport(spec, &host, &port) != 0) {
		fprintf(stderr, "imapfe: -l wants ADDRESS:PORT\n");
		return -1;
	}
	rc = getaddrinfo(strcmp(host, "*") == 0 ? NULL : host, port, &hints,
	    &res);
	if (rc != 0) {
		fprintf(stderr, "imapfe: %s: %s\n", spec, gai_strerror(rc));
		goto out;
	}
	fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC |
	    SOCK_NONBLOCK, 0);
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one,
	    sizeof(one)) != 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 ||
	    listen(fd, 512) != 0) {
		fprintf(stderr, "imapfe: %s: %s\n", spec, strerror(errno));
		if (fd >= 0)
			close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
out:
	free(host);
	free(port);
	return fd;
}

struct children {
	pid_t	*pid;
	int	 n;
	int	 max;
};

static void
children_reap(struct children *ch)
{
	pid_t pid;
	int status;

	child_exited = 0;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
		for (int i = 0; i < ch->n; i++)
			if (ch->pid[i] == pid) {
				ch->pid[i] = ch->pid[--ch->n];
				break;
			}
}

/* Tell every session to finish, and wait for them. */
static void
children_stop(struct children *ch)
{
	for (int i = 0; i < ch->n; i++)
		kill(ch->pid[i], SIGTERM);
	while (ch->n > 0) {
		pid_t pid = waitpid(-1, NULL, 0);

		if (pid < 0 && errno != EINTR)
			break;
		for (int i = 0; i < ch->n; i++)
			if (ch->pid[i] == pid) {
				ch->pid[i] = ch->pid[--ch->n];
				break;
			}
	}
}

static int
serve_listener(const struct config *cfg, SSL_CTX *tls_ctx, int lfd)
{
	struct children ch = { .max = cfg->max_sessions };
	int fd;
	pid_t pid;

	if ((ch.pid = calloc((size_t)ch.max, sizeof(pid_t))) == NULL)
		return 1;
	log_msg(LOG_INFO, "event=listening max_sessions=%d", ch.max);
	while (!shutdown_requested) {
		struct pollfd pfd = { .fd = lfd, .events = POLLIN };

		if (child_exited)
			children_reap(&ch);
		if (poll_wait(&pfd, 1, -1) <= 0)
			continue;
		fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno != EINTR && errno != ECONNABORTED &&
			    errno != EAGAIN)
				log_msg(LOG_ERR, "event=error reason=\"accept: "
				    "%s\"", strerror(errno));
			continue;
		}
		if (ch.n >= ch.max) {
			static const char full[] =
			    "* BYE Too many connections, try again later.\r\n";

			log_msg(LOG_WARNING, "event=refused reason=\"max_sessions "
			    "reached\"");
			if (write(fd, full, sizeof(full) - 1) < 0) {
				/* the client is gone already */
			}
			close(fd);
			continue;
		}
		if ((pid = fork()) == 0) {
			int rc;

			close(lfd);
			free(ch.pid);
			signal(SIGCHLD, SIG_DFL);
			rc = session_run(cfg, tls_ctx, fd, fd);
			close(fd);
			return rc | 0x100;	/* tells main it is a child */
		}
		if (pid < 0)
			log_msg(LOG_ERR, "event=error reason=\"fork: %s\"",
			    strerror(errno));
		else
			ch.pid[ch.n++] = pid;
		close(fd);
	}
	children_reap(&ch);
	log_msg(LOG_INFO, "event=shutdown sessions=%d", ch.n);
	children_stop(&ch);
	free(ch.pid);
	return 0;
}

/* ------------------------------------------------------------------ */

/*
 * The configuration cannot be used.  Under inetd the client is already
 * connected on stdout: tell it, so it does not wait for a greeting.
 */
static int
startup_failed(const char *err, int no_client)
{
	fprintf(stderr, "imapfe: %s\n", err);
	if (!no_client && !isatty(1)) {
		static const char bye[] = "* BYE [UNAVAILABLE] Server "
		    "configuration error.\r\n";

		if (write(1, bye, sizeof(bye) - 1) < 0) {
			/* nothing more to be done */
		}
	}
	openlog("imapfe", LOG_PID, LOG_MAIL);
	syslog(LOG_ERR, "event=config-error reason=\"%s\"", err);
	return 1;
}

/* For -t: every back-end TLS setting loads (CA, client certificate). */
static int
check_routes_tls(const struct config *cfg, const struct route *list,
    char *err, size_t errlen)
{
	for (const struct route *r = list; r != NULL; r = r->next) {
		char why[300];
		SSL *ssl;

		if (r->tls == TLS_NONE)
			continue;
		if ((ssl = tls_backend_ssl(cfg, r, why, sizeof(why))) == NULL) {
			snprintf(err, errlen, "route %s %s:%s: %s", r->pattern,
			    r->host, r->port, why);
			return -1;
		}
		SSL_free(ssl);
	}
	return 0;
}

static int
check_backend_tls(const struct config *cfg, char *err, size_t errlen)
{
	if (check_routes_tls(cfg, cfg->routes, err, errlen) != 0)
		return -1;
	return check_routes_tls(cfg, cfg->publics, err, errlen);
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

static void
usage(void)
{
	fprintf(stderr, "usage: imapfe [-dTtV] [-f config] "
	    "[-l address:port]\n");
	exit(2);
}

int
main(int argc, char *argv[])
{
	const char *config_path = IMAPFE_DEFAULT_CONFIG, *listen_spec = NULL;
	struct config cfg;
	char err[512];
	int ch, test_only = 0, implicit_tls = 0, lfd = -1, rc;
	SSL_CTX *tls_ctx = NULL;
	struct rlimit no_core = { 0, 0 };

	while ((ch = getopt(argc, argv, "df:l:TtV")) != -1) {
		switch (ch) {
		case 'd':
			log_stderr = 1;
			break;
		case 'f':
			config_path = optarg;
			break;
		case 'l':
			listen_spec = optarg;
			break;
		case 'T':
			implicit_tls = 1;
			break;
		case 't':
			test_only = 1;
			break;
		case 'V':
			printf("imapfe %s\n", IMAPFE_VERSION);
			return 0;
		default:
			usage();
		}
	}
	if (optind != argc)
		usage();
	/* A core dump would hold passwords. */
	setrlimit(RLIMIT_CORE, &no_core);
	if (config_load(&cfg, config_path, err, sizeof(err)) != 0)
		return startup_failed(err, test_only || listen_spec != NULL);
	openlog("imapfe", LOG_PID | (log_stderr || test_only ? LOG_PERROR : 0),
	    cfg.syslog_facility);
	if (client_tls_setup(&cfg, implicit_tls, &tls_ctx, err,
	    sizeof(err)) != 0 || (test_only &&
	    check_backend_tls(&cfg, err, sizeof(err)) != 0)) {
		tls_server_ctx_free(tls_ctx);
		config_free(&cfg);
		return startup_failed(err, test_only || listen_spec != NULL);
	}
	if (tls_ctx == NULL && cfg.plaintext_auth == PLAINTEXT_NO &&
	    cfg.auth == AUTH_PASSTHROUGH)
		log_msg(LOG_WARNING, "event=warning reason=\"plaintext_auth is "
		    "no and there is no tls_cert: no client can log in\"");
	if (test_only) {
		printf("imapfe: %s: configuration OK\n", config_path);
		tls_server_ctx_free(tls_ctx);
		config_free(&cfg);
		return 0;
	}
	install_signals();
	if (listen_spec != NULL && (lfd = listen_on(listen_spec)) < 0) {
		tls_server_ctx_free(tls_ctx);
		config_free(&cfg);
		return 1;
	}
	/* Done once here, so that forked sessions do not each pay for it. */
	if (cfg.auth == AUTH_PROXY &&
	    sasl_server_setup(&cfg, err, sizeof(err)) != 0) {
		log_msg(LOG_ERR, "event=error reason=\"%s\"", err);
		tls_server_ctx_free(tls_ctx);
		config_free(&cfg);
		return 1;
	}
	if (sasl_client_setup(cfg.backend_mechanisms) != 0) {
		log_msg(LOG_ERR, "event=error reason=\"SASL initialisation "
		    "failed\"");
		if (cfg.auth == AUTH_PROXY)
			sasl_server_teardown();
		tls_server_ctx_free(tls_ctx);
		config_free(&cfg);
		return 1;
	}
	if (lfd >= 0) {
		rc = serve_listener(&cfg, tls_ctx, lfd);
		if (rc & 0x100)
			rc &= 0xff;
		else
			close(lfd);
	} else
		rc = session_run(&cfg, tls_ctx, 0, 1);
	sasl_client_teardown();
	if (cfg.auth == AUTH_PROXY)
		sasl_server_teardown();
	tls_server_ctx_free(tls_ctx);
	config_free(&cfg);
	closelog();
	return rc;
}
