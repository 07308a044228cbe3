/*
 * Buffered I/O over one descriptor pair (a socket, or inetd's stdin and
 * stdout), every wait bounded by the stream's deadline.  Descriptors are
 * non-blocking; poll(2) does the waiting so that a peer that stops reading
 * or writing cannot hold the process past its deadline.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "imapfe.h"

int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int
poll_timeout(int64_t deadline)
{
	int64_t left;

	if (deadline == 0)
		return -1;
	left = deadline - now_ms();
	if (left <= 0)
		return 0;
	return left > 3600000 ? 3600000 : (int)left;
}

/* Wait until fd is ready for events or the deadline passes. */
static enum io_status
wait_for(int fd, short events, int64_t deadline)
{
	struct pollfd pfd = { .fd = fd, .events = events };
	int n;

	for (;;) {
		n = poll(&pfd, 1, poll_timeout(deadline));
		if (n > 0)
			return IO_OK;
		if (n == 0) {
			if (deadline != 0 && now_ms() >= deadline)
				return IO_TIMEOUT;
			continue;
		}
		if (errno != EINTR || shutdown_requested)
			return IO_ERROR;
	}
}

int
wait_readable(int fd, int64_t deadline)
{
	return wait_for(fd, POLLIN, deadline) == IO_OK;
}

int
iobuf_init(struct iobuf *io, int rfd, int wfd, size_t cap)
{
	memset(io, 0, sizeof(*io));
	io->rfd = rfd;
	io->wfd = wfd;
	io->buf = malloc(cap);
	if (io->buf == NULL)
		return -1;
	io->cap = cap;
	return 0;
}

void
iobuf_free(struct iobuf *io)
{
	free(io->buf);
	io->buf = NULL;
	io->cap = io->start = io->end = 0;
}

size_t
iobuf_pending(const struct iobuf *io)
{
	return io->end - io->start;
}

void
iobuf_consume(struct iobuf *io, size_t n)
{
	io->start += n;
	if (io->start >= io->end)
		io->start = io->end = 0;
}

/* Forget everything buffered: used where pipelined input must not run. */
void
iobuf_discard(struct iobuf *io)
{
	io->start = io->end = 0;
}

/* Read once more into the buffer; at least one byte on IO_OK. */
enum io_status
iobuf_fill(struct iobuf *io)
{
	enum io_status st;
	ssize_t n;

	if (io->start > 0 && io->end == io->cap) {
		memmove(io->buf, io->buf + io->start, io->end - io->start);
		io->end -= io->start;
		io->start = 0;
	}
	if (io->end == io->cap)
		return IO_TOOLONG;
	for (;;) {
		n = read(io->rfd, io->buf + io->end, io->cap - io->end);
		if (n > 0) {
			io->end += (size_t)n;
			io->bytes_in += (uint64_t)n;
			return IO_OK;
		}
		if (n == 0)
			return IO_CLOSED;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return IO_ERROR;
		if ((st = wait_for(io->rfd, POLLIN, io->deadline)) != IO_OK)
			return st;
	}
}

/*
 * Return the next line (without CRLF; a bare LF ends a line too) in
 * line and len, NUL-terminated in place.  The line stays valid until the
 * next call that reads.  A line longer than max gives IO_TOOLONG.
 */
enum io_status
iobuf_getline(struct iobuf *io, size_t max, char **line, size_t *len)
{
	size_t scanned = 0, n;
	enum io_status st;
	char *p, *nl;

	for (;;) {
		p = io->buf + io->start;
		n = io->end - io->start;
		nl = memchr(p + scanned, '\n', n - scanned);
		if (nl != NULL) {
			size_t l = (size_t)(nl - p);

			io->start += l + 1;
			if (l > 0 && p[l - 1] == '\r')
				l--;
			if (l > max)
				return IO_TOOLONG;
			p[l] = '\0';
			*line = p;
			*len = l;
			return IO_OK;
		}
		scanned = n;
		if (n > max + 1)
			return IO_TOOLONG;
		if (io->start > 0) {
			memmove(io->buf, p, n);
			io->start = 0;
			io->end = n;
		}
		if ((st = iobuf_fill(io)) != IO_OK)
			return st;
	}
}

enum io_status
iobuf_write(struct iobuf *io, const void *data, size_t len)
{
	const char *p = data;
	enum io_status st;
	ssize_t n;

	while (len > 0) {
		n = write(io->wfd, p, len);
		if (n > 0) {
			p += n;
			len -= (size_t)n;
			io->bytes_out += (uint64_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
			return errno == EPIPE ? IO_CLOSED : IO_ERROR;
		if ((st = wait_for(io->wfd, POLLOUT, io->deadline)) != IO_OK)
			return st;
	}
	return IO_OK;
}

enum io_status
iobuf_puts(struct iobuf *io, const char *s)
{
	return iobuf_write(io, s, strlen(s));
}
