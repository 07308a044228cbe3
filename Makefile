# imapfe: an IMAP front-end, one process per client connection.
# See README.md for the two commands that do everything, imapfe.8 and
# imapfe.conf.5.

PREFIX	?= /usr/local
SBINDIR	?= $(PREFIX)/sbin
MANDIR	?= $(PREFIX)/share/man
EXAMPLESDIR ?= $(PREFIX)/share/examples/imapfe
DESTDIR	?=

CC	?= cc
PKGS	 = libsasl2 openssl
CFLAGS	?= -O2 -g
CFLAGS	+= -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wshadow -Wformat=2 \
	   -Wstrict-prototypes -Wmissing-prototypes
CPPFLAGS += $(shell pkg-config --cflags $(PKGS) ldap 2>/dev/null)
# Full RELRO, as Debian builds the libraries: every symbol bound at
# start-up and the tables then made read-only, so no session (forked or
# exec'd) can have them overwritten, nor resolves them lazily itself.
LDFLAGS	+= -Wl,-z,relro,-z,now
LDLIBS	+= $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -lsasl2 -lssl -lcrypto)
# libldap is opened at run time, and only by configurations with ldap_uri:
# linked, it and GnuTLS would double every exec'd process's start-up.
LDAP_SONAME = $(shell objdump -p "$$(pkg-config --variable=libdir ldap \
	2>/dev/null)/libldap.so" 2>/dev/null | awk '/SONAME/ { print $$2 }')
CPPFLAGS += -DLDAP_SONAME='"$(or $(LDAP_SONAME),libldap-2.5.so.0)"'

SRCS	 = imapfe.c listener.c log.c auth.c backend.c proto.c iobuf.c tls.c \
	   engine.c router.c copy.c link.c proxyproto.c ldap.c imapurl.c \
	   state.c
OBJS	 = $(SRCS:.c=.o)
HDRS	 = imapfe.h engine.h
# The parts the C unit tests and fuzzers link without main().
LIBSRCS	 = log.c auth.c backend.c proto.c iobuf.c tls.c proxyproto.c ldap.c \
	   imapurl.c state.c

# Super-server and systemd files, installed as examples (nothing enabled)
# with the binary's installed path.
SERVICE_FILES = imapfe.xinetd imapfe.inetd imapfe.socket imapfe@.service \
		imapfe-listener.service

FUZZERS	 = tests/fuzz_command tests/fuzz_reader tests/fuzz_response \
	   tests/fuzz_sasl tests/fuzz_url tests/fuzz_state
FUZZ_SECONDS ?= 180
SANFLAGS = -fno-omit-frame-pointer -fsanitize=address,undefined \
	   -fno-sanitize-recover=all

PYTHON	?= /usr/bin/python3
PYTEST	 = $(PYTHON) -m pytest -q -p no:cacheprovider
# check lists each pass's slowest tests, to see where its time goes.
DURATIONS = --durations=10

all: imapfe

imapfe: $(OBJS)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(OBJS) $(LDLIBS)

$(OBJS): $(HDRS)

# Debian packages the build, the tests and the demo need; installed only
# when missing, and without starting any system service.
deps:
	@sh tests/install-deps.sh

tests/unit: tests/unit.c $(LIBSRCS) $(HDRS)
	$(CC) $(CFLAGS) $(CPPFLAGS) -I. -o $@ tests/unit.c $(LIBSRCS) $(LDLIBS)

tests/unit-asan: tests/unit.c $(LIBSRCS) $(HDRS)
	clang -std=c11 -D_GNU_SOURCE -O1 -g $(SANFLAGS) $(CPPFLAGS) -I. \
	    -o $@ tests/unit.c $(LIBSRCS) $(LDLIBS)

# libFuzzer targets, each with its seed corpus under tests/corpus/.
tests/fuzz_%: tests/fuzz_%.c tests/fuzz_common.h $(LIBSRCS) $(HDRS)
	clang -std=c11 -D_GNU_SOURCE -O1 -g -fsanitize=fuzzer $(SANFLAGS) \
	    $(CPPFLAGS) -I. -o $@ $< $(LIBSRCS) $(LDLIBS)

# Each target for FUZZ_SECONDS on a scratch copy of its corpus; a crash
# leaves its input in fuzz-out/ (make it a regression test).
fuzz: $(FUZZERS)
	@for f in $(FUZZERS); do \
	    n=$${f#tests/fuzz_}; mkdir -p fuzz-out/$$n && \
	    cp tests/corpus/$$n/* fuzz-out/$$n/ && \
	    echo "fuzz: $$n for $(FUZZ_SECONDS) s" && \
	    ./$$f -max_total_time=$(FUZZ_SECONDS) -max_len=4096 \
	        -artifact_prefix=fuzz-out/$$n- fuzz-out/$$n 2>fuzz-out/$$n.log \
	    || { tail -40 fuzz-out/$$n.log; exit 1; }; \
	    tail -1 fuzz-out/$$n.log; \
	done

imapfe-asan: $(SRCS) $(HDRS)
	$(CC) -std=c11 -D_GNU_SOURCE -O1 -g -fno-omit-frame-pointer \
	    -fsanitize=address,undefined -fno-sanitize-recover=all \
	    $(CPPFLAGS) -o $@ $(SRCS) $(LDLIBS)

unit: tests/unit
	./tests/unit

# The whole suite four ways: plain, under ASan+UBSan, under valgrind, and
# with every session going through the router (IMAPFE_ROUTED=1).
check: deps imapfe tests/unit tests/unit-asan imapfe-asan
	./tests/unit
	./tests/unit-asan
	$(MAKE) fuzz FUZZ_SECONDS=30
	mandoc -Tlint -Wwarning imapfe.8 imapfe.conf.5
	$(PYTEST) $(DURATIONS) tests
	IMAPFE_BIN=$(CURDIR)/imapfe-asan $(PYTEST) $(DURATIONS) tests
	IMAPFE_VALGRIND=1 $(PYTEST) $(DURATIONS) tests
	IMAPFE_ROUTED=1 $(PYTEST) $(DURATIONS) tests

check-quick: imapfe tests/unit
	./tests/unit
	$(PYTEST) tests

# The load test of the suite, for longer: LOAD_SECONDS per phase.
LOAD_SECONDS ?= 60
load: imapfe
	IMAPFE_LOAD_SECONDS=$(LOAD_SECONDS) $(PYTEST) -s tests/test_load.py

# The benchmark (bench/README.md): imapfe beside direct access to Dovecot,
# nginx's mail proxy and perdition, a few minutes; not part of check.
bench: deps imapfe
	@sh bench/install.sh
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

demo: deps imapfe
	$(PYTHON) tests/demo.py

install: imapfe
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR)/man5 \
	    $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(EXAMPLESDIR)
	install -m 755 imapfe $(DESTDIR)$(SBINDIR)/imapfe
	install -m 644 imapfe.conf.5 $(DESTDIR)$(MANDIR)/man5/imapfe.conf.5
	install -m 644 imapfe.8 $(DESTDIR)$(MANDIR)/man8/imapfe.8
	install -m 644 imapfe.conf.sample $(DESTDIR)$(EXAMPLESDIR)/imapfe.conf
	for f in $(SERVICE_FILES); do \
	    sed 's|/usr/local/sbin/imapfe|$(SBINDIR)/imapfe|' $$f \
	        > $(DESTDIR)$(EXAMPLESDIR)/$$f && \
	    chmod 644 $(DESTDIR)$(EXAMPLESDIR)/$$f || exit 1; \
	done

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/imapfe $(DESTDIR)$(MANDIR)/man8/imapfe.8
	rm -f $(DESTDIR)$(MANDIR)/man5/imapfe.conf.5
	rm -f $(DESTDIR)$(EXAMPLESDIR)/imapfe.conf
	for f in $(SERVICE_FILES); do rm -f $(DESTDIR)$(EXAMPLESDIR)/$$f; done
	-rmdir $(DESTDIR)$(EXAMPLESDIR) 2>/dev/null

clean:
	rm -f imapfe imapfe-asan $(OBJS) tests/unit tests/unit-asan $(FUZZERS)
	rm -rf fuzz-out
	rm -rf tests/__pycache__

.PHONY: all deps unit check check-quick load bench demo install uninstall \
	clean
