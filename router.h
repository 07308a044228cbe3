/*
 * The router's insides that copy.c (COPY and MOVE between servers) uses,
 * and copy.c's entry point.  Private to router.c and copy.c: links are
 * named by index, 0 the home server's.
 */
#ifndef ROUTER_H
#define ROUTER_H

#include "imapfe.h"

struct router;

/* router.c */
struct backend	*router_backend(struct router *, int link);
const struct config *router_config(const struct router *);
struct iobuf	*router_client(struct router *);
const char	*router_user(const struct router *);
int		 client_line(struct router *, const char *fmt, ...)
		    __attribute__((format(printf, 2, 3)));
void		 router_bye(struct router *, enum session_end, const char *);
int		 public_unavailable(struct router *, int link, const char *tag);
void		 router_link_lost(struct router *, int link, const char *tag);
enum sink_verdict router_untagged(struct router *, int link,
		    const char *line, size_t len);
enum reply_status router_link_command(struct router *, int link,
		    const char *text);
void		 router_unselect(struct router *, int link);

/* copy.c */
void		 cross_copy(struct router *, const struct command *,
		    size_t first, int from, int to, int move);

#endif
