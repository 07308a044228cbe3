/*
 * imapfe: an IMAP front-end, one process per client connection.
 *
 * Shared declarations.  The program is split by concern:
 *   imapfe.c   process life, configuration, the client side before login
 *   listener.c the -l listener: accept, fork a session each, reap, stop
 *   engine.c   the session after login: one loop, the relay's fast path
 *   router.c   routing policy after login (with engine.c and link.c, whose
 *              own header is engine.h)
 *   auth.c     credentials: client LOGIN and AUTHENTICATE, base64, Cyrus
 *              SASL on both sides
 *   backend.c  routing, back-end connections and their login
 *   log.c      syslog lines with the session id; the protocol trace
 *   proto.c    the IMAP grammar: command parser, string quoting, response
 *              scanning (pure functions, shared by both sides, unit-tested
 *              and fuzzed on their own)
 *   iobuf.c    buffered I/O over one descriptor, plain or TLS, with
 *              deadlines
 *   tls.c      TLS contexts: certificates, ticket keys, verification
 *   proxyproto.c  HAProxy's PROXY protocol header from a load balancer
 *   ldap.c     directory lookups: which server holds a user's mailbox
 *   imapurl.c  IMAP URLs in commands (CATENATE, URLAUTH): which mailbox,
 *              so which server
 *   state.c    what the processes of a host share: failed-login
 *              penalties, sessions per address and user, back-ends down
 */
#ifndef IMAPFE_H
#define IMAPFE_H

#include <sys/socket.h>
#include <sys/types.h>

#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#define IMAPFE_VERSION		"0.1"

/* AddressSanitizer's builds: no memory cap, and a leak check at _exit. */
#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN	1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN	1
#endif
#endif
#define IMAPFE_DEFAULT_CONFIG	"/etc/imapfe/imapfe.conf"

/* ------------------------------------------------------------------ */
/* log.c: syslog lines and the protocol trace, under everything else */

void		 log_open(int facility, int to_stderr);
void		 log_close(void);
void		 log_session_set(const char *id);
void		 log_msg(int prio, const char *fmt, ...)
		    __attribute__((format(printf, 2, 3)));

/* The protocol trace on stderr (-D), credentials masked. */
extern int	 protocol_trace;
size_t		 trace_credential_prefix(const char *line, size_t len);
void		 trace_data(const char *dir, const char *who, const void *,
		    size_t, int secret);

/* ------------------------------------------------------------------ */
/* iobuf.c: buffered I/O over one descriptor pair */

enum io_status {
	IO_OK = 0,
	IO_CLOSED = -1,		/* orderly end of stream */
	IO_TIMEOUT = -2,	/* the deadline passed */
	IO_ERROR = -3,		/* read or write failed (errno kept) */
	IO_TOOLONG = -4,	/* a line exceeded the caller's limit */
	IO_AGAIN = -5,		/* nothing to read yet (iobuf_try_fill) */
	IO_NOMEM = -6,		/* the destination could not grow */
	IO_UNSUPPORTED = -7	/* these descriptors cannot splice(2) */
};

struct iobuf {
	int		 rfd;
	int		 wfd;
	char		*buf;		/* read buffer, owned */
	size_t		 cap;
	size_t		 start;		/* first unconsumed byte */
	size_t		 end;		/* one past the last buffered byte */
	int64_t		 deadline;	/* monotonic ms; 0 = none */
	uint64_t	 bytes_in;
	uint64_t	 bytes_out;
	SSL		*ssl;		/* owned; NULL while plain */
	int		 tls_failed;	/* a fatal TLS error: no close_notify */
	int		 tls_short;	/* the last read wanted more of a record */
	int		 corked;	/* TCP_CORK holds writes until a read */
	char		 tls_why[160];	/* what the last TLS failure was */
	const char	*trace_name;	/* traced under -D as this peer */
	int		 trace_secret;	/* a login is under way: mask */
};

int64_t		 now_ms(void);
int64_t		 deadline_in(int seconds);
int		 iobuf_init(struct iobuf *, int rfd, int wfd, size_t cap);
void		 iobuf_free(struct iobuf *);
size_t		 iobuf_pending(const struct iobuf *);
enum io_status	 iobuf_fill(struct iobuf *);
enum io_status	 iobuf_try_fill(struct iobuf *);
struct str;
enum io_status	 iobuf_read_into(struct iobuf *, uint64_t n, struct str *);
int		 iobuf_has_decrypted(const struct iobuf *);
enum io_status	 iobuf_tls_handshake(struct iobuf *, SSL *, int server);
void		 iobuf_tls_close(struct iobuf *);
enum io_status	 iobuf_getline(struct iobuf *, size_t max, char **line,
		    size_t *len);
void		 iobuf_consume(struct iobuf *, size_t);
enum io_status	 iobuf_write(struct iobuf *, const void *, size_t);
enum io_status	 iobuf_puts(struct iobuf *, const char *);
enum io_status	 iobuf_splice(struct iobuf *from, struct iobuf *to,
		    int pipefd[2], size_t max, size_t *moved, int *to_failed);
enum io_status	 iobuf_vline(struct iobuf *, const char *fmt, va_list)
		    __attribute__((format(printf, 2, 0)));
#define TAGGED_LINE_MAX	8192	/* longest status line imapfe relays whole */
void		 iobuf_discard(struct iobuf *);
void		 iobuf_cork(struct iobuf *);
int		 wait_readable(int fd, int64_t deadline);
void		 nonblocking(int fd);

/* How a session ended: its event=end line's reason. */
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

/* Set by the SIGTERM handler: every wait gives up and the session ends. */
extern volatile sig_atomic_t shutdown_requested;
/*
 * SIGTERM, SIGINT, SIGCHLD and the listener's SIGHUP and SIGQUIT stay
 * blocked except while a process waits in poll_wait(), so a request can
 * never slip in between the check of its flag and the wait that would
 * otherwise sleep through it.
 */
struct epoll_event;
void	 signals_block_outside_waits(void);
int	 poll_wait(struct pollfd *, nfds_t, int);
int	 epoll_wait_signals(int, struct epoll_event *, int, int);

/* ------------------------------------------------------------------ */
/* tls.c */

struct config;
struct credentials;
struct route;

SSL_CTX		*tls_server_ctx(const struct config *, char *err, size_t);
void		 tls_server_ctx_free(SSL_CTX *);
SSL_CTX		*tls_backend_ctx(const struct config *, const struct route *,
		    char *err, size_t);
int		 tls_backend_ctx_shareable(const struct route *,
		    const struct route *);
int		 tls_backend_ctx_reads_files(const struct config *,
		    const struct route *);
SSL		*tls_backend_ssl(const struct config *, const struct route *,
		    char *err, size_t);
void		 tls_error_text(char *, size_t);

/* ------------------------------------------------------------------ */
/* proto.c: the IMAP grammar */

enum tok_type {
	TOK_ATOM,
	TOK_QUOTED,
	TOK_LITERAL,
	TOK_NIL,
	TOK_LPAREN,
	TOK_RPAREN
};

struct token {
	enum tok_type	 type;
	char		*s;		/* points into the command buffer */
	size_t		 len;
};

#define CMD_MAX_TOKENS	128

struct command {
	char		*tag;
	char		*name;		/* upper-cased in place */
	size_t		 ntok;
	struct token	 tok[CMD_MAX_TOKENS];
};

enum parse_status {
	PARSE_OK = 0,
	PARSE_NOTAG = -1,	/* no usable tag: answer with "* BAD" */
	PARSE_BAD = -2		/* tag known, arguments malformed */
};

/* Literal announcement at the end of a line: "{n}" or "{n+}" (or "~{n}"). */
enum literal_kind {
	LIT_NONE = 0,
	LIT_SYNC,
	LIT_NONSYNC,
	LIT_INVALID	/* looks like "{...}" but is not a valid literal */
};

enum parse_status parse_command(char *buf, size_t len, struct command *,
		    const char **why);
size_t		 token_group_end(const struct command *, size_t i);
enum literal_kind literal_at_end(const char *line, size_t len,
		    uint64_t *size);
int		 is_atom_char(unsigned char);
int		 tag_is_valid(const char *, size_t);
void		 early_tag(const char *, size_t, char *tag, size_t taglen);

/* A growing byte string, used to compose what imapfe sends. */
struct str {
	char	*s;
	size_t	 len;
	size_t	 cap;
};

/* A wipe the compiler cannot remove as a dead store. */
void		 wipe(void *, size_t);
int		 str_add(struct str *, const void *, size_t);
int		 str_adds(struct str *, const char *);
int		 str_printf(struct str *, const char *, ...)
		    __attribute__((format(printf, 2, 3)));
void		 str_wipe(struct str *);
void		 str_free(struct str *);

/*
 * Reading a client's command (iobuf.c, cmd_read): lines and literals,
 * within limits that differ before login and after.
 */
#define CMD_MAX_LITERALS	1024	/* literals in one command */

struct cmd_limits {
	size_t		 line_max;	/* one line, CRLF not counted */
	size_t		 command_max;	/* lines and held literals */
	uint64_t	 literal_max;	/* larger ones are refused */
	uint64_t	 hold_max;	/* larger ones are streamed */
	int		 toobig;	/* refuse with NO [TOOBIG] where we can */
	const char	*literal_name;	/* the limit's name, for the log */
};

struct cmd_buf {
	struct str	 text;		/* as on the wire, CRLFs and all */
	size_t		*cuts;		/* after each "{n}", owned */
	int		 ncuts;
	int		 cuts_cap;
	uint64_t	 stream_left;	/* CMD_STREAM: the literal's size */
	int		 stream_sync;	/* and whether the client waits */
	const char	*bye;		/* CMD_END: the BYE's text, or none */
	enum session_end end;		/* CMD_END: how the session ends */
	size_t		 longest;	/* its longest line */
	char		 tag[72];	/* the command's, for answers */
	int		 continuing;	/* the rest of a streamed command */
};

enum cmd_status {
	CMD_COMPLETE,		/* text holds the whole command */
	CMD_STREAM,		/* text holds it up to a literal to stream */
	CMD_BAD_LITERAL,	/* answered with a tagged BAD */
	CMD_ANSWERED,		/* answered NO [TOOBIG]: the session goes on */
	CMD_END			/* the session ends: bye and end say how */
};

enum cmd_status	 cmd_read(struct iobuf *, const struct cmd_limits *,
		    struct cmd_buf *);
enum session_end io_status_end(enum io_status, const char **bye);
void		 cmd_buf_free(struct cmd_buf *);

/*
 * Append s as an IMAP string: a quoted string when every byte may stand
 * in one, a literal otherwise.  Returns 1 if a literal was used, 0 for a
 * quoted string, -1 on allocation failure or a NUL byte (never sendable).
 */
int		 imap_append_string(struct str *, const char *, size_t,
		    int nonsync);
size_t		 sanitize(char *dst, size_t dstsize, const char *src,
		    size_t len);

/* Response-line helpers for back-end replies. */
int		 resp_is_tagged(const char *line, size_t len, const char *tag);

enum resp_kind { RESP_OK = 0, RESP_NO, RESP_BAD, RESP_BYE, RESP_PREAUTH };

/* Response codes (RFC 9051 7.1, 5530, 4315, 2193, 7162) imapfe acts on. */
enum resp_code {
	CODE_NONE = 0,
	CODE_OTHER,
	CODE_ALERT,
	CODE_APPENDUID,
	CODE_AUTHENTICATIONFAILED,
	CODE_AUTHORIZATIONFAILED,
	CODE_CANNOT,
	CODE_CAPABILITY,
	CODE_CLOSED,
	CODE_CONTACTADMIN,
	CODE_COPYUID,
	CODE_INUSE,
	CODE_LIMIT,
	CODE_OVERQUOTA,
	CODE_REFERRAL,
	CODE_SERVERBUG,
	CODE_TOOBIG,
	CODE_TRYCREATE,
	CODE_UNAVAILABLE
};

/* A status response, parsed; the pointers point into the line. */
struct status_resp {
	enum resp_kind	 kind;
	enum resp_code	 code;
	const char	*code_span;	/* the whole "[NAME arg]" */
	size_t		 code_span_len;
	const char	*code_arg;	/* after the code's name, up to "]" */
	size_t		 code_arg_len;
	const char	*text;		/* after the code */
	size_t		 text_len;
};

int		 status_parse(const char *line, size_t len, const char *tag,
		    struct status_resp *);

/* The UIDs of an APPENDUID or COPYUID code (RFC 4315), in written order. */
struct uid_list {
	uint32_t	*uid;		/* owned */
	size_t		 n;
	size_t		 cap;
};

int		 uid_list_add(struct uid_list *, uint32_t);
void		 uid_list_free(struct uid_list *);
int		 uid_set_parse(const char *s, size_t len, size_t max,
		    struct uid_list *);
int		 appenduid_parse(const struct status_resp *, size_t max,
		    uint32_t *uidvalidity, struct uid_list *);
int		 caps_has(const char *caps, const char *cap);

/* Where a referral (RFC 2193, RFC 2221) points. */
struct referral {
	char		 host[256];
	char		 port[6];
	char		 user[256];	/* decoded; "" when the URL names none */
	char		 mailbox[1024];	/* decoded; "" for a login referral */
};

int		 referral_parse(const char *text, struct referral *);
int		 hostport_parse(const char *p, const char *end, char *host,
		    size_t hostsize, char *port, size_t portsize);
int		 url_decode(const char *p, const char *end, char *out,
		    size_t outsize);
int		 url_iserver_parse(const char *p, const char *end, char *user,
		    size_t usersize, char *host, size_t hostsize, char *port,
		    size_t portsize);
int		 port_is_valid(const char *, size_t);
int		 nz_number_parse(const char **p, const char *end, uint32_t *);
int		 split_hostport(const char *word, int wildcard_ok, char **host,
		    char **port, char *err, size_t errlen);

/* Tracks where lines start in a stream of IMAP responses, literals skipped. */
struct resp_scanner {
	uint64_t	 literal_left;
	int		 at_line_start;
	size_t		 head_len;		/* first bytes of the line */
	char		 head[8];
	size_t		 tail_len;		/* last bytes of the line */
	char		 tail[24];
	int		 saw_bye;
	int		 mid_response;		/* a literal, then more line */
	uint64_t	 largest_literal;	/* announced since init */
};

void		 keep_tail(char *tail, size_t cap, size_t *len, const char *,
		    size_t);
void		 resp_scanner_init(struct resp_scanner *);
void		 resp_scan(struct resp_scanner *, const char *, size_t);
int		 resp_scan_at_start(const struct resp_scanner *);
void		 resp_scan_text_line(struct resp_scanner *);
size_t		 resp_scan_piece(const struct resp_scanner *, const char *,
		    size_t);

/* ------------------------------------------------------------------ */
/* configuration (imapfe.c) */

enum tls_mode { TLS_NONE = 0, TLS_STARTTLS, TLS_IMPLICIT };

struct route {
	char		*pattern;	/* "user", "*@domain" or "*" */
	char		*host;
	char		*port;
	enum tls_mode	 tls;
	char		*verify_name;	/* name the certificate must carry */
	char		*ca_file;	/* these four: NULL = the global one */
	char		*ca_path;
	char		*client_cert;
	char		*client_key;
	SSL_CTX		*ssl_ctx;	/* preloaded, or NULL: load when used */
	int		 from_directory;	/* "public PREFIX ldap" */
	int		 hash_order;	/* order=hash: start from the user's */
	struct route	*alt;		/* the line's next HOST:PORT, owned */
	struct route	*next;
};

/* An address block, for proxy_protocol_trusted. */
struct cidr {
	int		 family;	/* AF_INET or AF_INET6 */
	unsigned char	 addr[16];
	int		 bits;
};

/*
 * Where route_find() looks for a user's server, in the order the admin
 * sets with route_order: route lines in file order, or only those naming
 * the user, a *@domain, or "*"; and the directory.
 */
enum route_source {
	SRC_ROUTES = 0,
	SRC_USER,
	SRC_DOMAIN,
	SRC_DEFAULT,
	SRC_LDAP
};
#define ROUTE_SOURCES_MAX	5

enum plaintext_policy { PLAINTEXT_NO = 0, PLAINTEXT_YES, PLAINTEXT_LOOPBACK };
enum auth_mode { AUTH_PASSTHROUGH = 0, AUTH_PROXY };

struct config {
	struct route	*routes;
	struct route	*routes_tail;
	struct route	*publics;	/* public PREFIX HOST:PORT, in order */
	struct route	*publics_tail;
	struct route	*servers;	/* server HOST:PORT: reachable, unrouted */
	struct route	*servers_tail;
	int		 public_holddown;	/* seconds */
	int		 referral_hops;		/* referrals followed in a row */
	char		*greeting;
	char		*run_user;	/* user, group, chroot: after start-up */
	char		*run_group;
	char		*chroot_dir;
	char		*backend_mechanisms;	/* preference order */
	enum auth_mode	 auth;
	char		*sasl_service;		/* auth proxy: SASL server */
	char		*sasl_config_path;
	char		*proxy_user;		/* auth proxy: back-end login */
	char		*proxy_password_file;
	struct credentials *proxy;		/* loaded from the two above */
	enum plaintext_policy plaintext_auth;	/* LOGIN/PLAIN without TLS */
	int		 oauth_bearer;	/* OAUTHBEARER, XOAUTH2 from clients */
	char		*tls_cert;		/* client-side TLS */
	char		*tls_key;
	char		*tls_ciphers;
	char		*tls_ticket_key_file;
	int		 tls_min_version;
	enum tls_mode	 tls_mode;		/* STARTTLS or implicit */
	int		 tls_handshake_timeout;	/* seconds */
	char		*backend_ca_file;	/* back-end TLS defaults */
	char		*backend_ca_path;
	char		*backend_client_cert;
	char		*backend_client_key;
	size_t		 max_line_length;
	size_t		 max_prelogin_literal;
	size_t		 max_literal_size;	/* after login, from the client */
	int		 max_pipelined_commands;	/* sent during login */
	int		 max_id_pairs;		/* RFC 2971: at most 30 */
	int		 max_id_field;		/* RFC 2971: at most 30 */
	int		 max_id_value;		/* RFC 2971: at most 1024 */
	int		 max_login_failures;
	int		 max_bad_commands;
	int		 login_timeout;		/* seconds */
	int		 idle_timeout;		/* seconds */
	int		 connect_timeout;	/* seconds */
	int		 backend_timeout;	/* seconds */
	int		 max_sessions;
	int		 drain_timeout;		/* seconds, after SIGQUIT */
	int		 prefork;		/* -l: children waiting to accept */
	int		 max_session_memory;	/* MiB of data; 0: no cap */
	int		 forward_id;		/* ID with the client's address */
	int		 syslog_facility;
	struct cidr	*proxy_trusted;		/* must send a PROXY header */
	size_t		 proxy_trusted_n;
	int		 proxy_protocol_timeout;	/* seconds */
	enum route_source route_order[ROUTE_SOURCES_MAX];
	size_t		 route_order_len;	/* 0 until config_load ends */
	char		*ldap_uri;		/* URIs, space-separated */
	char		*ldap_bind_dn;
	char		*ldap_bind_password_file;
	char		*ldap_sasl_mech;	/* instead of a simple bind */
	char		*ldap_search_base;
	char		*ldap_filter;		/* template: %u, %n, %d */
	char		*ldap_public_filter;	/* %u: a public prefix */
	char		*ldap_host_attribute;
	char		*ldap_port_attribute;
	char		*ldap_ca_file;		/* NULL: backend_ca_file */
	int		 ldap_starttls;
	int		 ldap_timeout;		/* seconds, per server */
	struct credentials *ldap_bind;		/* DN and password */
	char		*state_file;		/* "none": no shared state */
	int		 auth_penalty;		/* on by default */
	int		 auth_penalty_first;	/* ms, after one failure */
	int		 auth_penalty_max;	/* ms */
	struct cidr	*auth_penalty_exempt;	/* NULL: loopback */
	size_t		 auth_penalty_exempt_n;
	int		 auth_penalty_exempt_set;	/* given, maybe "none" */
	int		 client_ipv6_prefix;	/* bits counted as one client */
	int		 max_sessions_per_ip;	/* 0: no limit */
	int		 max_sessions_per_user;	/* 0: no limit */
	int		 backend_down_time;	/* seconds; 0: never marked */
	struct shared_state *state;		/* opened before serving */
};

int		 config_load(struct config *, const char *path, char *err,
		    size_t errlen);
void		 config_free(struct config *);


/* How imapfe was started: its command line. */
struct options {
	const char	*config_path;
	const char	*listen_spec;	/* -l; NULL: inetd, or systemd's */
	int		 implicit_tls;	/* -T */
	int		 test_only;	/* -t */
	int		 to_stderr;	/* -d, -D */
	int		 version;	/* -V */
};

/*
 * What sessions are served with: the configuration and what was loaded
 * from it.  A listener replaces it whole when it reloads; each session
 * keeps the one it was forked with.
 */
struct service {
	struct config	 cfg;
	SSL_CTX		*tls_ctx;	/* the clients'; NULL without tls_cert */
};


/* ------------------------------------------------------------------ */
/* listener.c: imapfe's own listener (-l) and its signals */

void		 install_signals(void);
int		 listen_on(const char *spec);
int		 inherited_listener(void);

/*
 * What the listener asks of the program that runs it (imapfe.c), through
 * these rather than by name, so that it never calls up: one connection's
 * session, to the end; and, for a reload, a service loaded (checked as -t
 * checks), freed, and the SASL libraries set up for one.
 */
struct listener_hooks {
	int	(*session)(const struct service *, int fd);
	int	(*load)(struct service *, const struct options *,
		    int check_all, char *err, size_t errlen);
	void	(*free)(struct service *);
	int	(*sasl_setup)(const struct config *);
	void	(*sasl_teardown)(const struct config *);
};

int		 serve_listener(struct service *, const struct options *,
		    const struct listener_hooks *, int lfd);

/* ------------------------------------------------------------------ */
/* state.c: shared between the processes of a host; NULL or a file that
 * cannot be used makes every call a no-op (fail open) */

struct shared_state;
enum state_admit { STATE_ADMITTED = 0, STATE_REFUSED };

struct shared_state *state_open(const char *path, uid_t, gid_t);
void		 state_close(struct shared_state *);
int64_t		 state_penalty_ms(struct shared_state *, const struct config *,
		    const struct sockaddr_storage *client);
uint16_t	 state_password_print(struct shared_state *,
		    const struct credentials *);
int64_t		 state_login_failed(struct shared_state *,
		    const struct config *, const struct sockaddr_storage *client,
		    uint16_t print);
void		 state_login_ok(struct shared_state *, const struct config *,
		    const struct sockaddr_storage *client);
enum state_admit state_session_begin(struct shared_state *,
		    const struct config *, const struct sockaddr_storage *client);
enum state_admit state_session_user(struct shared_state *,
		    const struct config *, const char *user, size_t len);
void		 state_session_end(struct shared_state *);
int		 state_backend_may_try(struct shared_state *,
		    const struct config *, const char *host, const char *port,
		    int last_resort, int64_t *down_ms);
void		 state_backend_failed(struct shared_state *,
		    const struct config *, const char *host, const char *port,
		    int timed_out);
int		 state_backend_up(struct shared_state *, const struct config *,
		    const char *host, const char *port);

/* ------------------------------------------------------------------ */
/* proxyproto.c */

struct proxy_header {
	int			 local;	/* no addresses: keep the connection's */
	struct sockaddr_storage	 src;	/* the real client */
	struct sockaddr_storage	 dst;	/* where it connected to */
};

int		 cidr_parse(const char *, struct cidr *);
int		 cidr_list_match(const struct cidr *, size_t,
		    const struct sockaddr_storage *);
int		 proxy_v1_parse(const char *line, size_t len,
		    struct proxy_header *, const char **why);
long		 proxy_v2_length(const unsigned char *head16, const char **why);
int		 proxy_v2_parse(const unsigned char *hdr, size_t len,
		    struct proxy_header *, const char **why);
int		 proxy_header_read(int fd, int timeout_s, struct proxy_header *,
		    const char **why);

/* ------------------------------------------------------------------ */
/* auth.c: credentials */

/*
 * What a credential's secret is: a password, or an OAuth 2.0 bearer
 * token (RFC 6750) that only its own mechanism may carry to a back-end.
 */
enum cred_kind { CRED_PASSWORD = 0, CRED_OAUTHBEARER, CRED_XOAUTH2 };

struct credentials {
	char	*user;		/* owned, NUL-terminated */
	size_t	 user_len;
	char	*pass;		/* owned, wiped before free: password, token */
	size_t	 pass_len;
	char	*authzid;	/* owned; NULL: act as user itself */
	enum cred_kind kind;
};

int		 credentials_set(struct credentials *, const char *user,
		    size_t ulen, const char *pass, size_t plen);
void		 credentials_clear(struct credentials *);
int		 credentials_acceptable(const char *, size_t);

int		 base64_decode(const char *in, size_t inlen, char *out,
		    size_t outcap, size_t *outlen);
size_t		 base64_encode(const unsigned char *in, size_t inlen,
		    char *out, size_t outcap);

enum plain_status { PLAIN_OK = 0, PLAIN_MALFORMED, PLAIN_AUTHZID };
enum plain_status sasl_plain_split(const char *msg, size_t len,
		    struct credentials *);

/*
 * OAUTHBEARER (RFC 7628) and XOAUTH2 messages: the user and the token of
 * a client's, and the one imapfe sends a back-end.
 */
#define BEARER_TOKEN_MAX	16384	/* longer tokens are refused */

enum bearer_status {
	BEARER_OK = 0,
	BEARER_NOUSER,		/* well formed, but no user name to route by */
	BEARER_MALFORMED,	/* not the mechanism's grammar: why says */
	BEARER_TOOLONG		/* the token is over BEARER_TOKEN_MAX */
};

enum cred_kind	 bearer_kind(const char *mech);
const char	*bearer_mech_name(enum cred_kind);
enum bearer_status bearer_split(enum cred_kind, const char *msg, size_t len,
		    struct credentials *, const char **why);
int		 bearer_message(const struct credentials *, const char *host,
		    const char *port, struct str *out);
int		 bearer_response(const struct credentials *, const char *host,
		    const char *port, struct str *out);
int		 plain_response(const struct credentials *, struct str *out);

int		 credentials_set_authzid(struct credentials *, const char *);
void		 credentials_drop_password(struct credentials *);
int		 credentials_load_password(struct credentials *,
		    const char *user, const char *file, char *err, size_t);

int		 sasl_client_setup(const char *mechanisms);
void		 sasl_client_teardown(void);

/* Cyrus SASL's server side, for "auth proxy". */
#include <sasl/sasl.h>

int		 sasl_server_setup(const struct config *, char *err, size_t);
void		 sasl_server_teardown(void);
int		 sasl_server_mechs(const struct config *, int plaintext_ok,
		    struct str *caps);

/*
 * The client's AUTHENTICATE: auth.c writes the challenges to the client's
 * stream and reads the responses; what the client is told at the end,
 * and what is logged, is the caller's to decide.
 */
enum auth_status {
	AUTH_OK = 0,		/* credentials obtained */
	AUTH_CANCELLED,		/* the client answered "*" */
	AUTH_BAD_BASE64,	/* a response was not base64 */
	AUTH_PLAIN_MALFORMED,	/* not [authzid] NUL user NUL password */
	AUTH_PLAIN_AUTHZID,	/* PLAIN would act as someone else */
	AUTH_BEARER_MALFORMED,	/* not an OAUTHBEARER/XOAUTH2 message */
	AUTH_BEARER_NOUSER,	/* a bearer message names no user */
	AUTH_NOMECH,		/* no such mechanism here */
	AUTH_SASL_REFUSED,	/* the SASL server said no: sasl_code */
	AUTH_READ_END,		/* no response came: io_status says why */
	AUTH_CLIENT_GONE,	/* a challenge could not be written */
	AUTH_NOMEM
};

struct auth_client {
	struct iobuf	*io;		/* the client's stream */
	size_t		 max_line;	/* longest response line */
	int		 idle_timeout;	/* seconds, renewed by each challenge */
	int		 sasl_code;	/* after AUTH_SASL_REFUSED */
	enum io_status	 io_status;	/* after AUTH_READ_END */
	const char	*why;		/* after AUTH_BEARER_MALFORMED */
	int		 oauth_bearer;	/* OAUTHBEARER, XOAUTH2 offered */
};

int		 auth_mech_name(const char *, size_t, char *mech, size_t);
int		 auth_mech_plaintext(const char *mech);
enum auth_status auth_client_exchange(struct auth_client *,
		    const struct config *, int plaintext_ok, const char *mech,
		    const struct token *ir, struct credentials *);
int		 auth_check_password(const struct config *, int plaintext_ok,
		    const struct credentials *);
enum auth_status auth_client_relay(struct auth_client *, const char *chal,
		    size_t len, struct str *answer);
enum auth_status auth_bearer_refusal(struct auth_client *, enum cred_kind);

/* ------------------------------------------------------------------ */
/* backend.c */

/* A tagged answer from a back-end, typed; or why there was none. */
enum reply_status {
	REPLY_OK = 0,
	REPLY_NO,
	REPLY_BAD,
	REPLY_PLUS,		/* "+": the server waits for more */
	REPLY_BYE,		/* the server said BYE instead of answering */
	REPLY_LOST		/* the connection failed or timed out */
};

struct reply {
	enum reply_status status;
	enum resp_code	 code;
	size_t		 tag_len;
	size_t		 len;
	int		 truncated;	/* line holds the first part only */
	int		 sink_failed;	/* REPLY_LOST: the sink, not the server */
	char		 line[TAGGED_LINE_MAX];	/* as received, no CRLF */
	char		 why[160];	/* sanitized, for logs */
	const char	*raw;		/* the whole line, CRLF and all, in the */
	size_t		 raw_len;	/* back-end's buffer until it reads again */
};

int		 reply_is(const struct reply *, const char *tag);

struct backend {
	struct iobuf	 io;
	struct resp_scanner sc;		/* where its response stream is */
	int		 dropping;	/* the current response goes nowhere */
	struct reply	*bye;		/* its BYE, once it sent one; owned */
	char		*host;		/* owned copies, for logging */
	char		*port;
	char		*caps;		/* latest capability list, owned */
	unsigned	 caps_seq;	/* bumped whenever caps changes */
	char		 tagbuf[16];
	unsigned	 tagseq;
	char		 id_tag[16];	/* a pipelined ID's, until its answer */
};

/*
 * Where a back-end's untagged responses go while a command runs.  Each
 * response's first line (with whole_max, all of it up to that size,
 * literals included) is shown to line (when set), which keeps or drops
 * the whole response; what is kept is written to out (the client)
 * or, without out, handed to data piece by piece.  A "+" that no literal
 * of imapfe's waits for goes to continuation, which must answer it.  A
 * tagged answer for which tagged (when set) returns 1 is written to out
 * with the responses around it, and dispatching goes on.
 */
enum sink_verdict { SINK_KEEP, SINK_DROP, SINK_FAIL };

struct resp_sink {
	struct iobuf	*out;
	enum sink_verdict (*line)(void *ctx, const char *line, size_t len);
	int		(*data)(void *ctx, const char *p, size_t n);
	int		(*continuation)(void *ctx, struct backend *,
			    const char *line, size_t len);
	int		(*tagged)(void *ctx, const struct reply *);
	size_t		 whole_max;	/* line sees responses this long whole */
	int		 long_lines;	/* pass lines longer than the buffer */
	void		*ctx;
};

enum dispatch {
	DISPATCH_MORE,		/* all buffered input is used: read more */
	DISPATCH_TAGGED,	/* a tagged answer, in the reply */
	DISPATCH_CONTINUATION,	/* a "+" line, in the reply */
	DISPATCH_FAILED,	/* the sink could not write */
	DISPATCH_TOOLONG	/* a line longer than the buffer, not passed */
};

enum dispatch	 backend_dispatch(struct backend *, const struct resp_sink *,
		    struct reply *);
enum reply_status backend_command(struct backend *, const struct config *,
		    const struct str *cmd, const char *tag,
		    const struct resp_sink *, struct reply *);
enum reply_status backend_await(struct backend *, const struct config *,
		    const char *tag, const struct resp_sink *, struct reply *);
enum reply_status backend_simple(struct backend *, const struct config *,
		    const char *text, const struct resp_sink *, struct reply *);

/*
 * What imapfe tells a back-end about the client with ID (RFC 2971) before
 * logging in, as Dovecot honours from trusted networks: addresses, the
 * session id, a hop count against proxy loops, and the client's own ID
 * fields (minus any it might use to pose as someone else).
 */
#define PROXY_TTL_DEFAULT	5

struct client_info {
	char		 ip[64];
	char		 port[8];
	char		 local_ip[64];
	char		 local_port[8];
	char		 session[32];
	int		 ttl;		/* hops left, counted down per imapfe */
	struct str	 id_fields;	/* the client's, as "f" "v" pairs */
};

enum login_result {
	LOGIN_OK = 0,
	LOGIN_BADCREDS,		/* NO [AUTHENTICATIONFAILED] to the client */
	LOGIN_UNAVAILABLE,	/* NO [UNAVAILABLE] to the client */
	LOGIN_LOOP,		/* the back-end is imapfe: refuse */
	LOGIN_REFERRAL		/* a login referral, inside backend.c only */
};

/*
 * Sessions are routed command by command when public folders or referral
 * targets are configured; otherwise their bytes are relayed unread.
 */
static inline int
config_routed(const struct config *cfg)
{
	return cfg->publics != NULL || cfg->servers != NULL;
}
enum route_status {
	ROUTE_FOUND = 0,
	ROUTE_UNKNOWN,		/* no source knows the user */
	ROUTE_UNAVAILABLE	/* a source failed, or named an unlisted server */
};

const struct route *route_lookup(const struct config *, const char *user);
enum route_status route_find(const struct config *, const char *user,
		    const struct route **, char *why, size_t whylen);
enum route_status public_from_directory(const struct config *,
		    const struct route *pub, struct route *out, char *why,
		    size_t whylen);
const struct route *listed_server(const struct config *, const char *host,
		    const char *port);
const struct route *referral_target(const struct config *, const char *text,
		    struct referral *, const char *user);
void		 referral_refused(const char *user, const struct referral *,
		    const char *why);
int		 referral_allowed(const struct config *,
		    const struct route *const *tried, int hops,
		    const struct route *next, const struct referral *,
		    const char *user);
#define REFERRAL_HOPS_MAX	10	/* the most referral_hops may say */
enum login_result backend_login(struct backend *, const struct config *,
		    const struct route *, const struct credentials *,
		    const struct client_info *, const char *who, char *why,
		    size_t whylen);

/*
 * A bearer-token login may end in RFC 7628's error exchange: the
 * back-end's challenge (a JSON error), the client's reply, the NO.  When
 * a client waits for the login (its home server's), challenge puts the
 * back-end's challenge to it and returns its reply as the line to send
 * (0), or -1 when the client is gone; without a relay (a public server's
 * login) imapfe sends the dummy reply itself.  The back-end's tagged
 * refusal of the token is copied to refusal, for the client as given.
 */
struct login_relay {
	int		(*challenge)(void *ctx, const char *chal, size_t len,
			    struct str *answer);
	void		*ctx;
	struct reply	 refusal;
	int		 refused;	/* refusal holds the back-end's answer */
};

enum login_result backend_login_relayed(struct backend *,
		    const struct config *, const struct route *,
		    const struct credentials *, const struct client_info *,
		    const char *who, struct login_relay *, char *why,
		    size_t whylen);
void		 backend_close(struct backend *);
void		 backend_note_caps(struct backend *, const char *line,
		    size_t len);
char		*caps_for_client(const char *backend_caps, int routed);

/* auth.c, used by backend.c: one SASL client exchange, without I/O */
struct sasl_client;
enum sasl_begin { SASL_BEGIN_OK, SASL_BEGIN_NOMECH, SASL_BEGIN_FAILED };

enum sasl_begin	 sasl_client_begin(struct sasl_client **, const char *host,
		    const struct credentials *, const char *mech, int sasl_ir,
		    struct str *args);
int		 sasl_client_answer(struct sasl_client *, const char *chal,
		    size_t len, struct str *line, char *why, size_t whylen);
int		 sasl_client_complete(const struct sasl_client *);
void		 sasl_client_end(struct sasl_client *);

const char	*backend_next_tag(struct backend *);

/*
 * engine.c: the session after login, one engine.  A relayed session (no
 * public or server lines) passes the client's bytes on unread, but for
 * the literals they announce; a routed one is read command by command.
 * Both stream the back-ends' answers through backend_dispatch.
 */
enum session_end engine_run(const struct config *, struct iobuf *client,
		    struct backend *home, const struct credentials *,
		    const struct client_info *, const char *user);

/* ------------------------------------------------------------------ */
/* imapurl.c: IMAP URLs (RFC 5092) in commands, and where they point */

#define URL_MAX		8192	/* a quoted URL imapfe reads */

struct imap_url {
	int		 has_server;	/* "imap://iserver" or "//iserver" */
	char		 user[256];	/* decoded; "" when none */
	char		 host[256];
	char		 port[6];	/* "" when none */
	int		 relative;	/* no mailbox: the selected one's */
	int		 has_mailbox;
	char		 mailbox[1024];	/* decoded */
	uint32_t	 uidvalidity;	/* 0: none */
	uint32_t	 uid;		/* 0: none */
	int		 has_section;
	int		 has_partial;
	int		 has_urlauth;
	int		 search;	/* "?" and a search: a message list */
};

/*
 * What a router knows to place a URL: the server (its link index) of a
 * mailbox name, of the selected mailbox (-1: none), who the session's
 * user is and where their home server is; and for a check, the server
 * that executes the command and the first URL refused.
 */
struct url_route {
	int		(*mailbox_server)(void *ctx, const char *name,
			    size_t len);
	void		*ctx;
	const struct config *cfg;
	const char	*user;
	const char	*home_host;
	const char	*home_port;
	int		 selected;
	int		 server;	/* executes the command; -1: none */
	int		 refused;
	char		 bad[1024];	/* NO [BADURL bad], sanitized */
};

int		 imap_url_parse(const char *, size_t, struct imap_url *);
int		 url_server(const struct url_route *, const char *, size_t);
void		 url_badurl_text(char *out, size_t size, const char *url,
		    size_t len);
int		 url_command(const char *name);
int		 url_command_server(struct url_route *, const struct command *);
int		 url_append_check(struct url_route *, const char *, size_t);
size_t		 args_open_lists(const char *, size_t);

/* ------------------------------------------------------------------ */
/* ldap.c: directory lookups */

enum dir_status {
	DIR_FOUND = 0,
	DIR_UNKNOWN,		/* no entry, or one without the host */
	DIR_UNAVAILABLE		/* every server failed, or answered garbage */
};

#define DIR_HOST_MAX	256
#define DIR_PORT_MAX	8

enum dir_status	 directory_lookup(const struct config *, const char *tmpl,
		    const char *key,
		    char host[DIR_HOST_MAX], char port[DIR_PORT_MAX],
		    char *why, size_t whylen);
int		 ldap_filter_escape(struct str *, const char *, size_t);
int		 ldap_filter_compose(struct str *, const char *tmpl,
		    const char *user, size_t len);
int		 directory_check_config(struct config *, char *err,
		    size_t errlen);
int		 directory_library_load(char *err, size_t errlen);

#define IMAPFE_GREETING_MARK	"imapfe ready"
#define MAX_BACKEND_LINE	65536

#endif
