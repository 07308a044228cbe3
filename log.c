/*
 * What imapfe says about itself: log lines to syslog, each with the
 * session's id, and the protocol trace (-D) on stderr.  The bottom layer:
 * every other file may log or trace, and this one calls nothing above
 * the IMAP grammar (proto.c's sanitize).
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>
#include <unistd.h>

#include "imapfe.h"

/* ------------------------------------------------------------------ */
/* syslog */

static char	session_id[32];

/*
 * LOG_NDELAY: the log socket is opened now, before a chroot hides it.
 * to_stderr (-d, -D, -t) copies every line to stderr as well.
 */
void
log_open(int facility, int to_stderr)
{
	openlog("imapfe", LOG_PID | LOG_NDELAY | (to_stderr ? LOG_PERROR : 0),
	    facility);
}

void
log_close(void)
{
	closelog();
}

/* The id every later log and trace line of this process starts with. */
void
log_session_set(const char *id)
{
	snprintf(session_id, sizeof(session_id), "%s", id);
}

void
log_msg(int prio, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (session_id[0] != '\0')
		syslog(prio, "session=%s %s", session_id, msg);
	else
		syslog(prio, "%s", msg);
}

/* ------------------------------------------------------------------ */
/* the protocol trace (-D) */

int		 protocol_trace;

#define TRACE_LINES	8	/* per chunk; the rest is counted */
#define TRACE_WIDTH	200

/* Where the run of blanks (spaces, tabs) at p ends. */
static const char *
skip_blanks(const char *p, const char *end)
{
	while (p < end && (*p == ' ' || *p == '\t'))
		p++;
	return p;
}

/* Where the word at p ends: at a blank or the end. */
static const char *
word_end(const char *p, const char *end)
{
	while (p < end && *p != ' ' && *p != '\t')
		p++;
	return p;
}

/*
 * How much of a client's line may be traced before a credential: up to
 * LOGIN's arguments, or AUTHENTICATE's mechanism.  A client's blanks are
 * not counted on to be single spaces: a password is masked however the
 * words are separated.  0: nothing to hide.
 */
size_t
trace_credential_prefix(const char *line, size_t len)
{
	static const char *const names[] = { "LOGIN", "AUTHENTICATE" };
	const char *end = line + len, *name, *name_end, *arg;

	name = skip_blanks(word_end(skip_blanks(line, end), end), end);
	name_end = word_end(name, end);
	arg = skip_blanks(name_end, end);
	if (arg == end)
		return 0;	/* nothing after the name: nothing secret */
	for (size_t i = 0; i < sizeof(names) / sizeof(*names); i++) {
		size_t nl = strlen(names[i]);

		if ((size_t)(name_end - name) != nl || strncasecmp(name,
		    names[i], nl) != 0)
			continue;
		if (i == 0)
			return (size_t)(name_end - line);
		/* AUTHENTICATE: the mechanism is not secret, the rest is */
		arg = word_end(arg, end);
		return skip_blanks(arg, end) == end ? 0 : (size_t)(arg - line);
	}
	return 0;
}

static void
trace_one(const char *dir, const char *who, const char *line, size_t len,
    size_t shown)
{
	char clean[TRACE_WIDTH + 4];

	sanitize(clean, sizeof(clean), line, shown);
	fprintf(stderr, "imapfe[%ld]: session=%s trace %s=%s: %s%s\n",
	    (long)getpid(), session_id, dir, who, clean,
	    shown < len ? " <masked>" : "");
}

/*
 * Trace bytes that crossed a connection, line by line, on stderr.  With
 * secret set (a login in progress) nothing of what imapfe sends is shown,
 * nor any "+" continuation the peer sends; a LOGIN or AUTHENTICATE command
 * shows its tag, name and mechanism and hides the rest of the chunk
 * (arguments, literals, an initial response).
 */
void
trace_data(const char *dir, const char *who, const void *data, size_t len,
    int secret)
{
	const char *p = data, *end = p + len;
	int lines = 0;

	if (!protocol_trace)
		return;
	if (secret && strcmp(dir, "to") == 0) {
		size_t cut = trace_credential_prefix(p, len);

		if (cut > 0) {
			trace_one(dir, who, p, len, cut);
			return;
		}
		fprintf(stderr, "imapfe[%ld]: session=%s trace %s=%s: "
		    "<%zu bytes masked>\n", (long)getpid(), session_id,
		    dir, who, len);
		return;
	}
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t ll = (size_t)((nl != NULL ? nl : end) - p), cut;

		if (ll > 0 && p[ll - 1] == '\r')
			ll--;
		if (++lines > TRACE_LINES) {
			fprintf(stderr, "imapfe[%ld]: session=%s trace %s=%s: "
			    "... %zu more bytes\n", (long)getpid(),
			    session_id, dir, who, (size_t)(end - p));
			return;
		}
		if ((cut = trace_credential_prefix(p, ll)) > 0) {
			trace_one(dir, who, p, (size_t)(end - p), cut);
			return;		/* the rest may be its literals */
		}
		if (secret && ll > 0 && p[0] == '+')
			trace_one(dir, who, p, ll, 1);
		else
			trace_one(dir, who, p, ll, ll);
		p = nl != NULL ? nl + 1 : end;
	}
}
