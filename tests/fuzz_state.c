/*
 * Fuzz target: the shared state file as imapfe finds it.  An input with
 * an even first byte is the whole file (a foreign, truncated or corrupt
 * header must be refused, never trusted); an odd one is written over the
 * tables of a valid file (corrupt entries may mislead a count, never
 * crash).  Then every operation runs on it.
 */
#include <sys/stat.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include "fuzz_common.h"

#define HEADER_KEEP	128	/* the header is smaller: left intact */

static char	path[64];

static int
prepare(const uint8_t *data, size_t size)
{
	struct shared_state *st;
	struct stat sb;
	int fd;

	if (path[0] == '\0') {
		snprintf(path, sizeof(path), "/tmp/imapfe-fuzz-state-%ld",
		    (long)getpid());
	}
	unlink(path);
	if ((fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600)) < 0)
		return -1;
	if (size > 0 && data[0] % 2 == 0) {
		if (write(fd, data + 1, size - 1) != (ssize_t)(size - 1)) {
			close(fd);
			return -1;
		}
		close(fd);
		return 0;
	}
	close(fd);
	/* a valid file, then the input over its tables from an offset */
	st = state_open(path, (uid_t)-1, (gid_t)-1);
	state_close(st);
	if (stat(path, &sb) != 0 || (fd = open(path, O_RDWR)) < 0)
		return -1;
	if (size > 3) {
		off_t at = HEADER_KEEP + (off_t)(((size_t)data[1] << 8 |
		    data[2]) * 97 % ((size_t)sb.st_size - HEADER_KEEP));

		if (pwrite(fd, data + 3, size - 3, at) < 0) {
			/* past the end grows the file: refused at open */
		}
	}
	close(fd);
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct config cfg = { .auth_penalty = 1, .auth_penalty_first = 100,
	    .auth_penalty_max = 400, .client_ipv6_prefix = 64,
	    .max_sessions_per_ip = 2, .max_sessions_per_user = 1,
	    .connect_timeout = 10, .backend_down_time = 10 };
	struct credentials cr = { .user = "u", .user_len = 1, .pass = "p",
	    .pass_len = 1 };
	struct sockaddr_storage a = { .ss_family = AF_INET };
	struct sockaddr_storage b = { .ss_family = AF_INET6 };
	struct shared_state *st;
	int64_t since;

	if (prepare(data, size) != 0)
		return 0;
	((struct sockaddr_in *)(void *)&a)->sin_addr.s_addr =
	    htonl(0xc0000201);
	st = state_open(path, (uid_t)-1, (gid_t)-1);
	(void)state_penalty_ms(st, &cfg, &a);
	(void)state_login_failed(st, &cfg, &a, state_password_print(st, &cr));
	(void)state_login_failed(st, &cfg, &b, 0);
	state_login_ok(st, &cfg, &a);
	(void)state_session_begin(st, &cfg, &a);
	(void)state_session_user(st, &cfg, "alice", 5);
	state_session_end(st);
	(void)state_backend_may_try(st, &cfg, "mx", "143", 1, &since);
	state_backend_failed(st, &cfg, "mx", "143", 1);
	(void)state_backend_may_try(st, &cfg, "mx", "143", 0, &since);
	(void)state_backend_up(st, &cfg, "mx", "143");
	state_close(st);
	unlink(path);
	return 0;
}
