/*
 * What the imapfe processes of one host must know of each other: failed
 * logins per client address (the penalty), sessions per address and per
 * user (the limits), and back-ends found down.  One process serves one
 * connection, so this lives in a small file that every process maps
 * (MAP_SHARED): a header and three fixed tables, the same size whatever
 * the traffic, the oldest entry giving way when a table is full.
 *
 * Locking: a POSIX record lock (fcntl F_SETLK) on the whole file.  The
 * kernel drops it when its process dies, however it dies (SIGKILL
 * included), so no crashed process can leave the file locked.  Record
 * locks belong to a process, not to an open file description: the -l
 * listener opens the file once, its forked sessions inherit descriptor
 * and mapping, and each still locks against the others.  (flock(2) and
 * OFD locks would be shared through the inherited description and so
 * exclude nothing between a listener's children; a pthread mutex in the
 * mapping is left held by a killed process.)  imapfe holds no other
 * descriptor on the file, so closing one never drops the lock early.
 * A lock is taken for a few table look-ups only, never across a wait.
 *
 * Fail open: a file that cannot be opened, mapped or locked, or that is
 * not exactly one of ours (magic, version, sizes), is logged once by the
 * process and the features act as if nothing were known: no penalty, no
 * limit, no back-end marked down.  Entries are read defensively (times
 * compared with the clock without arithmetic that could overflow, process
 * ids checked before kill(2)), so a corrupt entry can mislead a count but
 * not crash.  Nothing secret is stored: user names, client addresses
 * and servers are 64-bit keyed hashes under a random key made with the
 * file; a failed password leaves 16 bits of a keyed hash, enough to tell
 * a retry of the same password, too few to recognise it.
 */
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <netinet/in.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "imapfe.h"

#define STATE_MAGIC		"imapfe-state\n\0\0"	/* 16 bytes */
#define STATE_VERSION		1
#define STATE_PENALTIES		4096
#define STATE_SESSIONS		8192
#define STATE_SERVERS		256
#define STATE_KEY_LEN		32
#define STATE_LOCK_WAIT_MS	1000	/* then go on without the file */
#define PENALTY_FORGET_MS	(3600 * 1000)	/* an hour after the last */

struct state_header {
	char		 magic[16];
	uint32_t	 version;
	uint32_t	 header_size;
	uint64_t	 file_size;
	uint32_t	 penalties;	/* entries in each table */
	uint32_t	 sessions;
	uint32_t	 servers;
	uint32_t	 pad;
	unsigned char	 key[STATE_KEY_LEN];	/* SipHash's: the first 16 */
};

struct penalty_entry {
	uint64_t	 addr;		/* keyed hash; 0: a free entry */
	int64_t		 last_ms;	/* the last failure, wall clock */
	uint32_t	 failures;
	uint16_t	 last_print;	/* of the last failed password */
	uint16_t	 pad;
};

struct session_entry {
	int32_t		 pid;		/* 0: a free entry */
	uint32_t	 pad;
	uint64_t	 addr;		/* keyed hash; 0: no address */
	uint64_t	 user;		/* keyed hash; 0: not logged in */
	int64_t		 started_ms;
};

struct server_entry {
	uint64_t	 server;	/* keyed hash of host:port; 0: free */
	int64_t		 retry_ms;	/* not tried before this */
	int64_t		 marked_ms;	/* when it was first found down */
	uint32_t	 timed_out;	/* last failure: a wait, not a refusal */
	uint32_t	 pad;
};

struct state_file {
	struct state_header	 hdr;
	struct penalty_entry	 penalty[STATE_PENALTIES];
	struct session_entry	 session[STATE_SESSIONS];
	struct server_entry	 server[STATE_SERVERS];
};

struct shared_state {
	int			 fd;
	struct state_file	*map;
	int			 failed;	/* logged; acts as absent */
	int			 slot;		/* this process's session, or -1 */
	char			 path[256];	/* for the log */
};

static int64_t
wall_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Once per process: from then on the file is left alone. */
static void
state_fail(struct shared_state *st, const char *why)
{
	if (st->failed)
		return;
	st->failed = 1;
	log_msg(LOG_ERR, "event=state-error file=%s reason=\"%s\" "
	    "effect=\"no login penalties, session limits or back-end marks "
	    "across processes\"", st->path, why);
}

static int
header_valid(const struct state_header *h)
{
	return memcmp(h->magic, STATE_MAGIC, sizeof(h->magic)) == 0 &&
	    h->version == STATE_VERSION &&
	    h->header_size == sizeof(struct state_header) &&
	    h->file_size == sizeof(struct state_file) &&
	    h->penalties == STATE_PENALTIES && h->sessions == STATE_SESSIONS &&
	    h->servers == STATE_SERVERS;
}

static void
state_unlock(struct shared_state *st)
{
	struct flock fl = { .l_type = F_UNLCK, .l_whence = SEEK_SET };

	fcntl(st->fd, F_SETLK, &fl);
}

/*
 * The whole file, within STATE_LOCK_WAIT_MS: a stopped process holding
 * it must not stop every login, so past that the caller goes without.
 */
static int
file_lock(int fd)
{
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
	struct timespec pause = { 0, 1000000 };

	for (int waited = 0; fcntl(fd, F_SETLK, &fl) != 0; waited++) {
		if ((errno != EAGAIN && errno != EACCES && errno != EINTR) ||
		    waited >= STATE_LOCK_WAIT_MS)
			return -1;
		nanosleep(&pause, NULL);
	}
	return 0;
}

/* Locked, and still the file that was mapped (else it would fault). */
static int
state_lock(struct shared_state *st)
{
	struct stat sb;

	if (file_lock(st->fd) != 0) {
		state_fail(st, errno == EAGAIN || errno == EACCES ?
		    "lock held too long by another process" : strerror(errno));
		return -1;
	}
	if (fstat(st->fd, &sb) != 0 ||
	    (uint64_t)sb.st_size < sizeof(struct state_file) ||
	    !header_valid(&st->map->hdr)) {
		state_unlock(st);
		state_fail(st, "file changed under imapfe: truncated or "
		    "overwritten");
		return -1;
	}
	return 0;
}

/* Mapped and not given up on: keys may be made (the key never changes). */
static int
ready(const struct shared_state *st)
{
	return st != NULL && !st->failed && st->map != NULL;
}

/*
 * Ready and locked.  Callers make their keys before: while one process
 * holds the lock every other waits, so it covers table look-ups only.
 */
static int
usable(struct shared_state *st)
{
	return ready(st) && state_lock(st) == 0;
}

/* A new, empty file: size it and write a header with a fresh key. */
static int
state_init(int fd, const char **why)
{
	struct state_header h;

	memset(&h, 0, sizeof(h));
	memcpy(h.magic, STATE_MAGIC, sizeof(h.magic));
	h.version = STATE_VERSION;
	h.header_size = sizeof(h);
	h.file_size = sizeof(struct state_file);
	h.penalties = STATE_PENALTIES;
	h.sessions = STATE_SESSIONS;
	h.servers = STATE_SERVERS;
	if (getentropy(h.key, sizeof(h.key)) != 0) {
		*why = "no randomness for the file's key";
		return -1;
	}
	if (ftruncate(fd, (off_t)sizeof(struct state_file)) != 0 ||
	    pwrite(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h)) {
		*why = strerror(errno);
		return -1;
	}
	return 0;
}

/* Size and header checked under the lock; a new file made ours. */
static int
state_adopt(struct shared_state *st, const char **why)
{
	struct state_header h;
	struct stat sb;

	if (fstat(st->fd, &sb) != 0) {
		*why = strerror(errno);
		return -1;
	}
	if (!S_ISREG(sb.st_mode)) {
		*why = "not a regular file";
		return -1;
	}
	if (sb.st_size == 0)
		return state_init(st->fd, why);
	if ((uint64_t)sb.st_size != sizeof(struct state_file)) {
		*why = "wrong size: truncated, or not an imapfe state file "
		    "(remove it)";
		return -1;
	}
	if (pread(st->fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h) ||
	    !header_valid(&h)) {
		*why = "not an imapfe state file of this version (remove it)";
		return -1;
	}
	return 0;
}

/*
 * Open (or create, empty) the file at path, owned by uid and gid when
 * given (a root-started imapfe whose sessions run as another user).
 * Never NULL unless out of memory: a file that cannot be used gives a
 * handle that is logged once and then ignores every call.
 */
struct shared_state *
state_open(const char *path, uid_t uid, gid_t gid)
{
	struct shared_state *st;
	const char *why = NULL;
	void *map;

	if ((st = calloc(1, sizeof(*st))) == NULL)
		return NULL;
	st->slot = -1;
	snprintf(st->path, sizeof(st->path), "%s", path);
	/* Only a file made here is given away: root must never chown
	 * whatever someone else put (or linked) at the path. */
	st->fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC |
	    O_NOFOLLOW, 0600);
	if (st->fd >= 0 && uid != (uid_t)-1 && fchown(st->fd, uid, gid) != 0) {
		/* the sessions reach it through this descriptor anyway */
	}
	if (st->fd < 0 && errno == EEXIST)
		st->fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
	if (st->fd < 0) {
		state_fail(st, strerror(errno));
		return st;
	}
	if (file_lock(st->fd) != 0) {
		state_fail(st, "cannot lock: held too long by another process");
		return st;
	}
	if (state_adopt(st, &why) != 0) {
		state_unlock(st);
		state_fail(st, why);
		return st;
	}
	map = mmap(NULL, sizeof(struct state_file), PROT_READ | PROT_WRITE,
	    MAP_SHARED, st->fd, 0);
	state_unlock(st);
	if (map == MAP_FAILED) {
		state_fail(st, strerror(errno));
		return st;
	}
	st->map = map;
	return st;
}

void
state_close(struct shared_state *st)
{
	if (st == NULL)
		return;
	if (st->map != NULL)
		munmap(st->map, sizeof(struct state_file));
	if (st->fd >= 0)
		close(st->fd);
	free(st);
}

/* ------------------------------------------------------------------ */
/* keys */

/*
 * SipHash-2-4 (Aumasson and Bernstein), the keyed hash made for hash
 * tables: short inputs, no allocation, nothing of OpenSSL's set up in
 * each session.  Fed a byte at a time: the inputs are names.
 */
struct siphash {
	uint64_t	 v0, v1, v2, v3;
	uint64_t	 tail;		/* bytes not yet a whole word */
	uint64_t	 len;
};

#define ROTL64(x, b)	(uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

static void
sip_round(struct siphash *h)
{
	h->v0 += h->v1; h->v1 = ROTL64(h->v1, 13); h->v1 ^= h->v0;
	h->v0 = ROTL64(h->v0, 32);
	h->v2 += h->v3; h->v3 = ROTL64(h->v3, 16); h->v3 ^= h->v2;
	h->v0 += h->v3; h->v3 = ROTL64(h->v3, 21); h->v3 ^= h->v0;
	h->v2 += h->v1; h->v1 = ROTL64(h->v1, 17); h->v1 ^= h->v2;
	h->v2 = ROTL64(h->v2, 32);
}

static void
sip_init(struct siphash *h, const unsigned char key[16])
{
	uint64_t k0 = 0, k1 = 0;

	for (int i = 7; i >= 0; i--) {
		k0 = k0 << 8 | key[i];
		k1 = k1 << 8 | key[8 + i];
	}
	h->v0 = k0 ^ 0x736f6d6570736575ULL;
	h->v1 = k1 ^ 0x646f72616e646f6dULL;
	h->v2 = k0 ^ 0x6c7967656e657261ULL;
	h->v3 = k1 ^ 0x7465646279746573ULL;
	h->tail = h->len = 0;
}

static void
sip_update(struct siphash *h, const void *data, size_t n)
{
	const unsigned char *p = data;

	for (size_t i = 0; i < n; i++) {
		h->tail |= (uint64_t)p[i] << (8 * (h->len % 8));
		if (++h->len % 8 == 0) {
			h->v3 ^= h->tail;
			sip_round(h);
			sip_round(h);
			h->v0 ^= h->tail;
			h->tail = 0;
		}
	}
}

static uint64_t
sip_final(struct siphash *h)
{
	uint64_t b = h->len << 56 | h->tail;

	h->v3 ^= b;
	sip_round(h);
	sip_round(h);
	h->v0 ^= b;
	h->v2 ^= 0xff;
	for (int i = 0; i < 4; i++)
		sip_round(h);
	return h->v0 ^ h->v1 ^ h->v2 ^ h->v3;
}

/* kind, then a and b, under the file's key; never 0 (a free entry). */
static uint64_t
keyed_hash(const struct shared_state *st, const char *kind, const void *a,
    size_t alen, const void *b, size_t blen)
{
	struct siphash h;
	uint64_t v;

	sip_init(&h, st->map->hdr.key);
	sip_update(&h, kind, strlen(kind) + 1);
	sip_update(&h, a, alen);
	sip_update(&h, b, blen);
	v = sip_final(&h);
	wipe(&h, sizeof(h));
	return v != 0 ? v : 1;
}

/*
 * The address as the tables count it: IPv4 whole (a mapped one too),
 * IPv6 cut to its first prefix bits (one subscriber's /64, say).
 */
static uint64_t
addr_key(const struct shared_state *st, const struct sockaddr_storage *ss,
    int prefix)
{
	const struct in6_addr *in6;
	unsigned char a[17] = { 0 };

	if (ss->ss_family == AF_INET) {
		a[0] = 4;
		memcpy(a + 1, &((const struct sockaddr_in *)(const void *)ss)->
		    sin_addr, 4);
		return keyed_hash(st, "addr", a, 5, NULL, 0);
	}
	if (ss->ss_family != AF_INET6)
		return 0;
	in6 = &((const struct sockaddr_in6 *)(const void *)ss)->sin6_addr;
	if (IN6_IS_ADDR_V4MAPPED(in6)) {
		a[0] = 4;
		memcpy(a + 1, in6->s6_addr + 12, 4);
		return keyed_hash(st, "addr", a, 5, NULL, 0);
	}
	a[0] = 6;
	memcpy(a + 1, in6->s6_addr, 16);
	for (int bit = prefix; bit < 128; bit++)
		a[1 + bit / 8] &= (unsigned char)~(0x80 >> (bit % 8));
	return keyed_hash(st, "addr", a, 17, NULL, 0);
}

/*
 * Was t (read from the file, so anything) within the last window ms?
 * Compared without subtracting t: a corrupt time must not overflow.
 */
static int
recent(int64_t t, int64_t now, int64_t window)
{
	return t <= now && t >= now - window;
}

/* ------------------------------------------------------------------ */
/* failed-login penalty */

static struct penalty_entry *
penalty_find(struct state_file *f, uint64_t addr, int64_t now, int create)
{
	struct penalty_entry *oldest = NULL, *e;

	for (size_t i = 0; i < STATE_PENALTIES; i++) {
		e = &f->penalty[i];
		if (e->addr == addr)
			return e;
		if (!create)
			continue;
		if (e->addr != 0 &&
		    !recent(e->last_ms, now, PENALTY_FORGET_MS))
			e->addr = 0;
		if (oldest == NULL || e->addr == 0 ||
		    (oldest->addr != 0 && e->last_ms < oldest->last_ms))
			oldest = e;
	}
	if (oldest != NULL)
		memset(oldest, 0, sizeof(*oldest));
	return oldest;
}

static int64_t
penalty_for(const struct config *cfg, uint32_t failures)
{
	int64_t d = cfg->auth_penalty_first;

	if (failures == 0)
		return 0;
	for (uint32_t i = 1; i < failures && d < cfg->auth_penalty_max; i++)
		d *= 2;
	return d < cfg->auth_penalty_max ? d : cfg->auth_penalty_max;
}

/* The penalty's key for a client, or 0 when none applies. */
static uint64_t
penalty_key(struct shared_state *st, const struct config *cfg,
    const struct sockaddr_storage *client)
{
	if (!cfg->auth_penalty || client == NULL ||
	    cidr_list_match(cfg->auth_penalty_exempt,
	    cfg->auth_penalty_exempt_n, client))
		return 0;
	return addr_key(st, client, cfg->client_ipv6_prefix);
}

/*
 * How long the client must wait before its login is looked at: the
 * address's penalty less the time since its last failure.
 */
int64_t
state_penalty_ms(struct shared_state *st, const struct config *cfg,
    const struct sockaddr_storage *client)
{
	struct penalty_entry *e;
	int64_t now, wait = 0;
	uint64_t key;

	if (!ready(st) || (key = penalty_key(st, cfg, client)) == 0 ||
	    !usable(st))
		return 0;
	now = wall_ms();
	if ((e = penalty_find(st->map, key, now, 0)) != NULL &&
	    recent(e->last_ms, now, PENALTY_FORGET_MS)) {
		wait = penalty_for(cfg, e->failures) - (now - e->last_ms);
		if (wait < 0)
			wait = 0;
	}
	state_unlock(st);
	return wait;
}

/* 16 bits of a keyed hash of user and password; 0 when unknown. */
uint16_t
state_password_print(struct shared_state *st, const struct credentials *cr)
{
	uint64_t h;

	if (!ready(st) || cr->pass == NULL)
		return 0;
	h = keyed_hash(st, "password", cr->user, cr->user_len + 1, cr->pass,
	    cr->pass_len);
	return (uint16_t)(h | 1);
}

/*
 * A failed login from client: its penalty grows, unless this was the
 * password that failed last (print, 0 when unknown).  Returns the delay
 * the next attempt will see, for the log, or -1 when unchanged.
 */
int64_t
state_login_failed(struct shared_state *st, const struct config *cfg,
    const struct sockaddr_storage *client, uint16_t print)
{
	struct penalty_entry *e;
	int64_t now, delay = -1;
	uint64_t key;

	if (!ready(st) || (key = penalty_key(st, cfg, client)) == 0 ||
	    !usable(st))
		return -1;
	now = wall_ms();
	if ((e = penalty_find(st->map, key, now, 1)) != NULL) {
		if (!recent(e->last_ms, now, PENALTY_FORGET_MS))
			e->failures = 0;
		if (e->addr == 0 || e->failures == 0 || print == 0 ||
		    print != e->last_print) {
			e->addr = key;
			if (e->failures < 64)
				e->failures++;
			delay = penalty_for(cfg, e->failures);
		}
		e->last_print = print;
		e->last_ms = now;
	}
	state_unlock(st);
	return delay;
}

/* A login from client succeeded: its penalty is forgiven. */
void
state_login_ok(struct shared_state *st, const struct config *cfg,
    const struct sockaddr_storage *client)
{
	struct penalty_entry *e;
	uint64_t key;

	if (!ready(st) || (key = penalty_key(st, cfg, client)) == 0 ||
	    !usable(st))
		return;
	if ((e = penalty_find(st->map, key, wall_ms(), 0)) != NULL)
		memset(e, 0, sizeof(*e));
	state_unlock(st);
}

/* ------------------------------------------------------------------ */
/* sessions per address and per user */

/* An entry whose process is gone (SIGKILL, a crash) is free again. */
static int
session_live(const struct session_entry *e)
{
	if (e->pid <= 0)
		return 0;
	return kill((pid_t)e->pid, 0) == 0 || errno != ESRCH;
}

static int
session_free_slot(struct state_file *f)
{
	int oldest = -1;

	for (int i = 0; i < STATE_SESSIONS; i++) {
		struct session_entry *e = &f->session[i];

		if (!session_live(e))
			return i;
		if (oldest < 0 || e->started_ms < f->session[oldest].started_ms)
			oldest = i;
	}
	return oldest;
}

static int
sessions_counted(const struct config *cfg)
{
	return cfg->max_sessions_per_ip > 0 || cfg->max_sessions_per_user > 0;
}

/*
 * A new session from client: counted, unless its address already has
 * max_sessions_per_ip (then STATE_REFUSED).  Processes that died are not
 * counted, and their entries are reused.
 */
enum state_admit
state_session_begin(struct shared_state *st, const struct config *cfg,
    const struct sockaddr_storage *client)
{
	uint64_t addr = 0;
	int n = 0, slot;

	if (!sessions_counted(cfg) || !ready(st))
		return STATE_ADMITTED;
	if (client != NULL)
		addr = addr_key(st, client, cfg->client_ipv6_prefix);
	if (!usable(st))
		return STATE_ADMITTED;
	if (addr != 0 && cfg->max_sessions_per_ip > 0)
		for (int i = 0; i < STATE_SESSIONS; i++)
			if (st->map->session[i].addr == addr &&
			    session_live(&st->map->session[i]))
				n++;
	if (addr != 0 && cfg->max_sessions_per_ip > 0 &&
	    n >= cfg->max_sessions_per_ip) {
		state_unlock(st);
		return STATE_REFUSED;
	}
	slot = session_free_slot(st->map);
	st->map->session[slot] = (struct session_entry){ .pid = getpid(),
	    .addr = addr, .started_ms = wall_ms() };
	st->slot = slot;
	state_unlock(st);
	return STATE_ADMITTED;
}

/* This process's entry, if still its own (a full table may take it). */
static struct session_entry *
own_session(struct shared_state *st)
{
	struct session_entry *e;

	if (st->slot < 0)
		return NULL;
	e = &st->map->session[st->slot];
	return e->pid == getpid() ? e : NULL;
}

/*
 * The session logged in as user: counted as the user's, unless the user
 * has max_sessions_per_user already (STATE_REFUSED).
 */
enum state_admit
state_session_user(struct shared_state *st, const struct config *cfg,
    const char *user, size_t len)
{
	struct session_entry *own;
	uint64_t key;
	int n = 0;

	if (!sessions_counted(cfg) || !ready(st))
		return STATE_ADMITTED;
	key = keyed_hash(st, "user", user, len, NULL, 0);
	if (!usable(st))
		return STATE_ADMITTED;
	if (cfg->max_sessions_per_user > 0)
		for (int i = 0; i < STATE_SESSIONS; i++)
			if (st->map->session[i].user == key &&
			    session_live(&st->map->session[i]))
				n++;
	if (cfg->max_sessions_per_user > 0 && n >= cfg->max_sessions_per_user) {
		state_unlock(st);
		return STATE_REFUSED;
	}
	if ((own = own_session(st)) != NULL)
		own->user = key;
	state_unlock(st);
	return STATE_ADMITTED;
}

void
state_session_end(struct shared_state *st)
{
	struct session_entry *own;

	if (st == NULL || st->slot < 0 || !usable(st))
		return;
	if ((own = own_session(st)) != NULL)
		memset(own, 0, sizeof(*own));
	st->slot = -1;
	state_unlock(st);
}

/* ------------------------------------------------------------------ */
/* back-ends found down */

static struct server_entry *
server_find(struct state_file *f, uint64_t key, int create)
{
	struct server_entry *oldest = NULL, *e;

	for (size_t i = 0; i < STATE_SERVERS; i++) {
		e = &f->server[i];
		if (e->server == key)
			return e;
		if (create && (oldest == NULL || e->server == 0 ||
		    (oldest->server != 0 && e->marked_ms < oldest->marked_ms)))
			oldest = e;
	}
	if (oldest != NULL)
		memset(oldest, 0, sizeof(*oldest));
	return oldest;
}

static uint64_t
server_key(struct shared_state *st, const char *host, const char *port)
{
	return keyed_hash(st, "server", host, strlen(host) + 1, port,
	    strlen(port));
}

/*
 * May this session try host:port?  Not while it is marked down, unless
 * it is the last server the session has left (last_resort) and its last
 * failure was a refusal, which costs nothing to meet again; a server
 * that timed out costs a wait, so it is skipped even then.  Once the
 * mark's time is up one session at a time may try (for as long as a
 * connection and a greeting may take), so a server that is still dead
 * costs one wait, not one per session.  *since: how long it has been
 * down (ms), for the log.
 */
int
state_backend_may_try(struct shared_state *st, const struct config *cfg,
    const char *host, const char *port, int last_resort, int64_t *since)
{
	struct server_entry *e;
	int64_t now, probe = ((int64_t)cfg->connect_timeout +
	    cfg->backend_timeout) * 1000;
	uint64_t key;
	int ok = 1;

	*since = 0;
	if (cfg->backend_down_time == 0 || !ready(st))
		return 1;
	key = server_key(st, host, port);
	if (!usable(st))
		return 1;
	now = wall_ms();
	e = server_find(st->map, key, 0);
	/* a mark from the future (a clock set back) is not believed */
	if (e != NULL && e->retry_ms > now &&
	    e->retry_ms - now <= (int64_t)cfg->backend_down_time * 1000 +
	    probe) {
		ok = last_resort && !e->timed_out;
		if (recent(e->marked_ms, now, INT32_MAX))
			*since = now - e->marked_ms;
	} else if (e != NULL)
		e->retry_ms = now + probe;
	state_unlock(st);
	return ok;
}

/*
 * host:port refused a connection, or timed out (no connection or no
 * greeting in time): marked down for backend_down_time.
 */
void
state_backend_failed(struct shared_state *st, const struct config *cfg,
    const char *host, const char *port, int timed_out)
{
	struct server_entry *e;
	int64_t now;
	uint64_t key;

	if (cfg->backend_down_time == 0 || !ready(st))
		return;
	key = server_key(st, host, port);
	if (!usable(st))
		return;
	now = wall_ms();
	if ((e = server_find(st->map, key, 0)) == NULL &&
	    (e = server_find(st->map, key, 1)) != NULL) {
		e->server = key;
		e->marked_ms = now;
	}
	if (e != NULL) {
		e->retry_ms = now + (int64_t)cfg->backend_down_time * 1000;
		e->timed_out = timed_out != 0;
	}
	state_unlock(st);
}

/* host:port answered: no longer down.  Returns 1 if it had been marked. */
int
state_backend_up(struct shared_state *st, const struct config *cfg,
    const char *host, const char *port)
{
	struct server_entry *e;
	uint64_t key;
	int was = 0;

	if (cfg->backend_down_time == 0 || !ready(st))
		return 0;
	key = server_key(st, host, port);
	if (!usable(st))
		return 0;
	if ((e = server_find(st->map, key, 0)) != NULL) {
		memset(e, 0, sizeof(*e));
		was = 1;
	}
	state_unlock(st);
	return was;
}
