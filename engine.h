/*
 * The session after login, in three layers that call downward only:
 *
 *   engine.c  the loop: it reads the client (as bytes for the relay, or
 *             command by command when routed), polls the links, and
 *             hands each routed command to the router;
 *   router.c  routing policy: which server a command goes to, and what
 *             LIST, NAMESPACE, CAPABILITY, RENAME, ENABLE, REPLACE, IMAP
 *             URLs and mailbox referrals become across several servers;
 *             copy.c beside it carries COPY and MOVE between servers;
 *   link.c    the links to back-ends: opening one, the client commands
 *             in flight on it, streaming its answers to the client,
 *             waiting for an answer, and what imapfe itself may write to
 *             the client between the back-ends' responses.
 *
 * This header is theirs (and copy.c's) alone; imapfe.c sees engine_run()
 * in imapfe.h.
 */
#ifndef ENGINE_H
#define ENGINE_H

#include "imapfe.h"

#define TAG_MAX			64
#define SMALL_LITERAL_MAX	65536		/* buffered; larger: streamed */
#define BUFFERED_COMMAND_MAX	(1024 * 1024)
#define REFERRAL_LINKS_MAX	4		/* servers reached by referral */
#define PIPELINE_MAX		4096		/* client commands in flight */
#define POLL_MAX_MS		3600000		/* poll(2) waits at most this */

/* What a LIST over several servers learnt of a public prefix's root. */
enum root_seen {
	ROOT_UNASKED,		/* its server has not answered this LIST */
	ROOT_MISSING,		/* it answered without listing the root */
	ROOT_LISTED
};

struct link {
	int64_t		 last_used;	/* for keepalives */
	const struct route *route;	/* NULL for the home back-end */
	const struct route *conf;	/* its public (or server) line */
	struct route	 found;		/* what the directory named for it */
	int		 public;	/* a public line's, not a referral's */
	struct backend	*be;		/* home: the session's; else &own */
	struct backend	 own;
	int		 up;
	int64_t		 retry_after;	/* hold-down after a failure */
	enum root_seen	 root;		/* in the LIST being merged */
};

struct engine;

/*
 * What the router does to the untagged responses of one of its commands
 * on their way to the client: line sees each response's first line (all
 * of it, literals included, up to whole_max) and keeps it, drops it, or
 * writes it rewritten itself (and then drops it).
 */
struct resp_filter {
	enum sink_verdict (*line)(struct engine *, struct link *,
			    const char *line, size_t len);
	size_t		 whole_max;
};

/* A client command sent to a link whose tagged answer is still to come. */
struct inflight {
	char		 tag[TAG_MAX + 1];
	const struct resp_filter *filter; /* NULL: its responses go as they are */
	struct reply	*keep;		/* its tagged answer is kept here */
	int		 forward;	/* and goes on to the client */
};

struct engine {
	const struct config	*cfg;
	struct iobuf		*client;
	const struct credentials *cr;
	const struct client_info *ci;
	const char		*user;		/* sanitized, for logs */
	struct link		*links;	/* never moved: links point into it */
	int			 nlinks;
	int			 npublic;	/* links[1 .. npublic-1] */
	int			 maxlinks;
	int			 selected;	/* link index, or -1 */
	struct inflight		*flight;	/* [fhead, fhead + nflight) */
	int			 fcap;
	int			 fhead;
	int			 nflight;
	int			 busy;		/* the link they are on, or -1 */
	int			 raw_for;	/* a link's "+": its next line */
	int			 want_plus;	/* a literal of ours waits */
	int			 got_plus;
	struct str		 out;		/* pipelined, to the busy link */
	struct reply		*answer;	/* link_pump's, owned */
	int			 relayed;	/* no routing: bytes pass on */
	struct resp_scanner	 client_sc;	/* relayed: the client's */
	int			 pipe[2];	/* splice(2), when it is used */
	int			 splice_off;
	struct cmd_buf		 cb;		/* the command being read */
	size_t			 send_len;	/* bytes of it to send */
	char			*enabled;	/* ENABLE arguments, to replay */
	int64_t			 last_client;
	int			 merging;	/* a LIST over several servers */
	int			 selection_lost;	/* its server went away */
	struct url_route	*urls;	/* an APPEND's, checked as they come */
	enum session_end	 end;
};

/* router.c: run the command just read (eng->cb) where it belongs; router.c
 * and copy.c call link.c, never the other way. */
void		 route_command(struct engine *);

/* link.c: what imapfe writes to the client, between responses */
int		 client_write(struct engine *, const char *, size_t);
int		 client_line(struct engine *, const char *fmt, ...)
		    __attribute__((format(printf, 2, 3)));
int		 client_reply(struct engine *, const struct reply *);
void		 bye_after_link(struct engine *, int i, const char *text);
void		 engine_bye(struct engine *, enum session_end, const char *);

/* link.c: the links */
void		 link_init(struct link *, const struct route *);
int		 link_up(struct engine *, int i);
void		 link_down(struct engine *, int i, const char *why);
int		 link_internal(struct engine *, int i, const char *verb,
		    const char *args);
int		 link_unavailable(struct engine *, int i, const char *tag);
void		 link_unselect(struct engine *, int i);
int		 current_link(const struct engine *);
int		 answering_link(const struct engine *);
int		 link_forwards_all(const struct engine *, int i);
int		 line_is_bye(const char *, size_t);

/*
 * link.c: client commands on a link, and their answers.  A command run
 * alone, whole at hand, runs as imapfe's own do, with backend_command
 * (run_on_link_as, run_text_on_link).  Pipelined commands, and one whose
 * literal streams from the client, are "in flight": sent, then waited
 * for with link_wait, which watches the client too (IDLE's DONE, the
 * literal's bytes) and streams the answers of all of them back.
 */
enum wait_result {
	W_DONE,			/* what was waited for came */
	W_LINK_DOWN,
	W_CLIENT_GONE,
	W_TIMEOUT
};

struct sink_ctx {
	struct engine		*eng;
	struct link		*l;
	const struct resp_filter *filter;
};

const struct resp_sink *link_client_sink(struct engine *, struct link *,
		    struct sink_ctx *, struct resp_sink *);
int		 link_pump(struct engine *, int i);
int		 flush_out(struct engine *);
int		 raw_line_to_link(struct engine *, int i);
void		 routed_limits(const struct engine *, struct cmd_limits *);
void		 command_failed_on_link(struct engine *, int i, const char *tag,
		    enum wait_result);
void		 discard_rest(struct engine *);
int		 wait_idle(struct engine *);
enum reply_status run_on_link_as(struct engine *, int i, const char *tag,
		    const struct resp_filter *, struct reply *keep);
enum reply_status run_on_link(struct engine *, int i, const char *tag,
		    struct reply *keep);
enum reply_status run_text_on_link(struct engine *, int i, const char *tag,
		    const struct str *text, struct reply *keep);
void		 send_pipelined(struct engine *, int i, const char *tag);
enum sink_verdict link_untagged(struct engine *, int i, const char *line,
		    size_t len);
enum reply_status link_command(struct engine *, int i, const char *text);

/* copy.c: COPY or MOVE from link from to a mailbox on link to */
void		 cross_copy(struct engine *, const struct command *,
		    size_t first, int from, int to, int move);

#endif
