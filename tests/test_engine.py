"""The post-login engine (router.c) against scripted back-ends: one
regression test per defect the review of the one-engine rewrite found,
each run relayed and routed where both apply.

The back-ends are fakebackend.py's, since each case needs a back-end (or
a public server) to answer in a way Dovecot will not on demand: refuse
before its "+", send half a literal and stall, close in the middle of a
LIST, split a line after a literal.  Sanitizer reports and imapfe exit
statuses fail every test through conftest's procs fixture.
"""
import os
import re
import signal
import socket
import threading
import time

import pytest

from conftest import SLOW, Raw, base_config, recv_until_eof
from fakebackend import FakeBackend, plain_server, serve_commands
from fakebackend import command_loop as after_login_loop

# With a public line, sessions are routed, not relayed (as in
# test_badinput.py); the public server at port 1 is never reached.
ROUTED = 'public "Public/" 127.0.0.1:1\n'
MODES = ["relay", "routed"]


def start(imapfe_factory, port, extra=""):
    f = imapfe_factory(base_config(port, extra))
    f.start_inetd()
    return f


def login(f):
    c = Raw(f.port)
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    return c


def fill(c, n):
    """Read from the client's socket until c.buf holds n bytes."""
    while len(c.buf) < n:
        chunk = c.sock.recv(65536)
        if not chunk:
            raise EOFError("closed with %d of %d bytes" % (len(c.buf), n))
        c.buf += chunk


def response(c):
    """The next whole response, its literals read by their counts and kept
    inline ("{N}" CRLF and N bytes), without the final CRLF."""
    out = b""
    while True:
        while b"\r\n" not in c.buf:
            fill(c, len(c.buf) + 1)
        line, c.buf = c.buf.split(b"\r\n", 1)
        out += line
        m = re.search(rb"\{(\d+)\}$", line)
        if m is None:
            return out
        n = int(m.group(1))
        fill(c, n)
        out += b"\r\n" + c.buf[:n]
        c.buf = c.buf[n:]


def nothing_for(c, seconds):
    """Nothing reaches the client in this many seconds (a window in which
    the defect would show; it costs the time, it waits for nothing)."""
    c.sock.settimeout(seconds)
    try:
        chunk = c.sock.recv(65536)
    except socket.timeout:
        chunk = None
    finally:
        c.sock.settimeout(10 * SLOW)
    assert chunk is None, "sent while it should not have: %r" % chunk


def command_loop(conn, answer):
    """fakebackend's command loop, answer(conn, tag, verb, line) given the
    whole line."""
    after_login_loop(lambda cn, tag, verb, rest:
                     answer(cn, tag, verb, tag + " " + rest))(conn)


def commands(received):
    """The command lines a fake back-end received, non-synchronizing
    literals skipped by their counts: what it would have taken for
    commands.  (Its synchronizing literals' bytes may follow only a "+",
    and these back-ends send none.)"""
    data = bytes(received)
    out = []
    while data:
        line, sep, data = data.partition(b"\r\n")
        if not sep:
            out.append(line)
            break
        out.append(line)
        m = re.search(rb"\{(\d+)\+\}$", line)
        if m is not None:
            data = data[int(m.group(1)):]
    return out


# --- 1: a streamed literal that does not go --------------------------------

BODY_LINES = [b"Subject: hi", b"", b"x DELETE INBOX", b"y" * 70000]


@pytest.mark.parametrize("why", ["refused", "unavailable"])
def test_streamed_literal_that_does_not_go_is_not_read_as_commands(
        imapfe_factory, why):
    """Routed: `APPEND mailbox {N+}` with N over 64 KiB, which imapfe
    streams instead of holding.  The mailbox's server refuses it before
    its "+" (NO [TRYCREATE], RFC 9051 6.3.12), or is unavailable.

    A non-synchronizing literal is on its way whatever the server says
    (RFC 7888 section 4): imapfe must read it and drop it, so the client
    gets its tagged NO and the session goes on (a NOOP after it is
    answered); no line of the message may reach any back-end as a
    command (here, a "x DELETE INBOX" inside the message)."""
    def after(conn):
        def answer(conn, tag, verb, line):
            if verb == "APPEND":
                # refused at once, literal or not: nothing of it is read
                conn.sendline(tag + " NO [TRYCREATE] no such mailbox")
                return True
            return False
        command_loop(conn, answer)

    fake = FakeBackend(lambda conn: plain_server(
        conn, caps="IMAP4rev1 LITERAL+ AUTH=PLAIN", after_login=after))
    try:
        f = start(imapfe_factory, fake.port, ROUTED)
        c = login(f)
        mailbox = "nosuch" if why == "refused" else "Public/x"
        msg = b"\r\n".join(BODY_LINES) + b"\r\n"
        c.send(b"b APPEND %s {%d+}\r\n" % (mailbox.encode(), len(msg)) +
               msg + b"\r\nz NOOP\r\n")
        got = c.until_tagged("b")
        if why == "refused":
            assert got == ["b NO [TRYCREATE] no such mailbox"], got
        else:
            assert got[-1].startswith("b NO [UNAVAILABLE] "), got
        assert c.until_tagged("z") == ["z OK noop"]
        assert c.cmd("n", "NOOP") == ["n OK noop"]
        c.cmd("q", "LOGOUT")
        c.close()
        f.wait_log("reason=logout")
        sent = commands(fake.received[0])
        for ln in BODY_LINES:
            if ln:
                assert ln not in sent, "the message's %r taken for a " \
                    "command" % ln[:40]
        assert b"z NOOP" in sent and b"n NOOP" in sent, sent
    finally:
        fake.close()


# --- 2: cross-server COPY reads the collecting FETCH's answers --------------

DATE = "01-Jan-2020 00:00:00 +0000"


def copy_servers(meta_answer):
    """A home server whose INBOX answers the collecting `UID FETCH set
    (UID FLAGS INTERNALDATE)` with meta_answer(tag) and each message's
    `UID FETCH uid BODY.PEEK[]` with "message <uid>"; a public server
    that takes APPENDs.  Returns (home, public, appends): appends gets
    (command, body) for each APPEND the public server received."""
    appends = []

    def home_answer(conn, tag, verb, line):
        u = line.upper()
        if verb == "SELECT":
            conn.sendline("* 2 EXISTS")
            conn.sendline(tag + " OK [READ-WRITE] selected")
        elif "(UID FLAGS INTERNALDATE)" in u:
            conn.send(meta_answer(tag))
        elif "BODY.PEEK[]" in u:
            uid = int(re.search(r"FETCH (\d+) ", u).group(1))
            body = b"message %d\r\n" % uid
            conn.send(b"* 1 FETCH (UID %d BODY[] {%d}\r\n%s)\r\n"
                      % (uid, len(body), body) + tag.encode() +
                      b" OK fetched\r\n")
        else:
            conn.sendline(tag + " OK done")
        return verb != "LOGOUT"

    def public_answer(conn, tag, verb, line):
        if verb == "APPEND":
            n = int(line[line.rindex("{") + 1:].rstrip("+}"))
            if not line.endswith("+}"):
                conn.sendline("+ go")
            body = conn.read_exact(n)
            conn.line()
            appends.append((line.split(" ", 2)[2], body))
            conn.sendline(tag + " OK [APPENDUID 1 %d] appended"
                          % len(appends))
        elif verb != "LOGOUT":
            conn.sendline(tag + " OK done")
        return verb != "LOGOUT"

    home = FakeBackend(lambda conn: plain_server(
        conn, after_login=lambda cn: command_loop(cn, home_answer)))
    public = FakeBackend(lambda conn: plain_server(
        conn, after_login=lambda cn: command_loop(cn, public_answer)))
    return home, public, appends


def copy_to_public(imapfe_factory, home, public, spec):
    f = start(imapfe_factory, home.port,
              'public "Public/" 127.0.0.1:%d\n' % public.port)
    c = login(f)
    assert c.cmd("s", "SELECT INBOX")[-1].startswith("s OK")
    got = c.cmd("c", "COPY %s Public/x" % spec)
    c.cmd("z", "LOGOUT")
    c.close()
    return got


def date_of(uid):
    """A date of its own for each message: where it lands tells which
    message's answer was read."""
    return "%02d-Jan-2020 %02d:%02d:00 +0000" % (uid % 28 + 1,
                                                 uid // 60 % 24, uid % 60)


def test_cross_server_copy_with_collecting_answer_over_64k(imapfe_factory):
    """COPY 1:3000 into a public folder: the home server's answer to
    imapfe's collecting UID FETCH is some 100 KB, more than the back-end
    buffer (64 KiB) holds at once, and every other response lacks its
    INTERNALDATE (the server gives none; the message is then appended
    without one).  Each FETCH response must be read as the response it
    is, ending where its line ends, not where a string search runs off it:
    into the next response (that one's date taken for this message) or
    off the end of the buffer (a heap overflow, which ASan reports).  The
    public server gets messages 1 to 3000, once each, each with its own
    flags and date or none, and the client the tagged OK."""
    count = 3000

    def item(i):
        date = b' INTERNALDATE "%s"' % date_of(i).encode() if i % 2 else b""
        return b"* %d FETCH (UID %d FLAGS (\\Seen)%s)\r\n" % (i, i, date)

    def meta(tag):
        return b"".join(item(i) for i in range(1, count + 1)) + \
            tag.encode() + b" OK fetched\r\n"

    home, public, appends = copy_servers(meta)
    try:
        assert len(meta("t")) > 64 * 1024
        got = copy_to_public(imapfe_factory, home, public, "1:%d" % count)
        assert got[-1].startswith("c OK"), got[-3:]
        expected = sorted(
            ('"Public/x" (\\Seen)%s {%d}' % (
                ' "%s"' % date_of(i) if i % 2 else "",
                len(b"message %d\r\n" % i)), b"message %d\r\n" % i)
            for i in range(1, count + 1))
        assert sorted(appends) == expected
    finally:
        home.close()
        public.close()


def test_cross_server_copy_skips_fetch_answers_without_uid(imapfe_factory):
    """COPY 1:2 into a public folder, the home server answering the
    collecting `UID FETCH 1:2 (UID FLAGS INTERNALDATE)` with a flag update
    of message 1 without UID first (a server may send one at any time,
    RFC 9051 7.5.2; it is no answer to the command) and then message 2's
    answer.  Only message 2 (UID 42) exists to copy: it is appended once,
    with its own flags (none) and date; the FETCH without UID is never
    taken for a message, nor its flags for another's."""
    def meta(tag):
        return (b'* 1 FETCH (FLAGS (\\Seen))\r\n'
                b'* 2 FETCH (UID 42 FLAGS () INTERNALDATE "%s")\r\n'
                % DATE.encode()) + tag.encode() + b" OK fetched\r\n"

    home, public, appends = copy_servers(meta)
    try:
        got = copy_to_public(imapfe_factory, home, public, "1:2")
        assert got[-1].startswith("c OK"), got
        assert appends == [('"Public/x" () "%s" {12}' % DATE,
                            b"message 42\r\n")], appends
    finally:
        home.close()
        public.close()


# --- 3: a public server lost during a merged LIST ---------------------------

def test_public_server_lost_during_merged_list(imapfe_factory):
    """`LIST "" *` goes to the home and the public server at once and
    their answers are merged.  The public server sends one LIST response
    and closes.  The client must get, without delay (well before
    idle_timeout): `* NO [UNAVAILABLE]` for the lost server (RFC 5530: an
    untagged NO is a warning, the command goes on), the home server's
    answers, and the tagged OK; the lost link leaves nothing in flight,
    so the session goes on."""
    def home_answer(conn, tag, verb, line):
        if verb == "LIST":
            conn.sendline('* LIST () "/" INBOX')
            conn.sendline(tag + " OK listed")
            return True
        return False

    def public_answer(conn, tag, verb, line):
        if verb == "LIST":
            conn.sendline('* LIST () "/" "Public/x"')
            conn.sock.close()
            return True
        return False

    home = FakeBackend(lambda conn: plain_server(
        conn, after_login=lambda cn: command_loop(cn, home_answer)))
    public = FakeBackend(lambda conn: plain_server(
        conn, after_login=lambda cn: command_loop(cn, public_answer)))
    try:
        f = start(imapfe_factory, home.port,
                  'public "Public/" 127.0.0.1:%d\nidle_timeout %d\n'
                  % (public.port, 60 * SLOW))
        c = login(f)
        began = time.monotonic()
        got = c.cmd("b", 'LIST "" *')      # Raw's timeout: 10 s
        assert time.monotonic() - began < 10 * SLOW
        assert '* NO [UNAVAILABLE] The server for "Public/" was lost.' \
            in got, got
        assert '* LIST () "/" INBOX' in got, got
        assert got[-1] == "b OK listed", got
        assert c.cmd("n", "NOOP") == ["n OK noop"]
        c.cmd("z", "LOGOUT")
        c.close()
    finally:
        home.close()
        public.close()


# --- 5: a whole command, then half of one -----------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_command_answered_while_next_is_half_sent(imapfe_factory, mode):
    """The client sends `b FETCH 1 FLAGS` CRLF and the start of its next
    command, "c NOO", without its CRLF (a client writing as it goes may;
    RFC 9051 5.5 lets it send commands without waiting).  b must be
    passed on and answered at once, not when c is complete; c is answered
    once its line ends."""
    def answer(conn, tag, verb, line):
        if verb == "FETCH":
            conn.sendline("* 1 FETCH (FLAGS (\\Seen))")
            conn.sendline(tag + " OK fetched")
            return True
        return False

    fake = FakeBackend(lambda conn: plain_server(
        conn, after_login=lambda cn: command_loop(cn, answer)))
    try:
        f = start(imapfe_factory, fake.port,
                  ROUTED if mode == "routed" else "")
        c = login(f)
        c.sock.settimeout(5 * SLOW)
        c.send("b FETCH 1 FLAGS\r\nc NOO")
        assert c.until_tagged("b") == ["* 1 FETCH (FLAGS (\\Seen))",
                                       "b OK fetched"]
        c.send("P\r\n")
        assert c.until_tagged("c") == ["c OK noop"]
        c.cmd("z", "LOGOUT")
        c.close()
    finally:
        fake.close()


# --- 6: a line cut after a literal at login ---------------------------------

def test_login_with_capability_literal_line_in_pieces(imapfe_factory):
    """The back-end greets without capabilities, so imapfe asks for them
    during its login (CAPABILITY); the answer starts with an untagged
    response holding a literal whose rest of line comes in a later TCP
    segment.  A response goes on after a literal (RFC 9051 4.3): imapfe
    must wait for the rest of the line, not take the response for one
    too long to read; the login succeeds and the session works."""
    def answer(conn, tag, verb, line):
        if verb == "CAPABILITY":
            conn.send(b"* XFOO {3}\r\nabc mo")
            time.sleep(0.3)          # the rest in a segment of its own
            conn.send(b"re\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" +
                      tag.encode() + b" OK done\r\n")
            return True
        if verb == "AUTHENTICATE":
            if len(line.split(" ")) < 4:
                conn.sendline("+ ")
                conn.line()
            conn.sendline(tag + " OK [CAPABILITY IMAP4rev1] in")
            return True
        if verb == "LOGIN":
            conn.sendline(tag + " OK [CAPABILITY IMAP4rev1] in")
            return True
        return False

    fake = FakeBackend(lambda conn: serve_commands(
        conn, "* OK ready", lambda cn, tag, verb, rest: answer(
            cn, tag, verb, tag + " " + rest), other="OK noop"))
    try:
        f = start(imapfe_factory, fake.port)
        c = login(f)
        assert c.cmd("n", "NOOP") == ["n OK noop"]
        c.cmd("z", "LOGOUT")
        c.close()
    finally:
        fake.close()


# --- 7: ENABLE replayed on a public server ----------------------------------

def recording_server(log, names):
    """A back-end that logs in, records each command (its literals read,
    answering "+" to synchronizing ones, and shown inline as <...>),
    answers LIST with names and anything else with OK."""
    def after(conn):
        while True:
            ln = conn.line()
            if ln is None:
                return
            while re.search(r"\{\d+\+?\}$", ln):
                n = int(re.search(r"\{(\d+)\+?\}$", ln).group(1))
                if not ln.endswith("+}"):
                    conn.sendline("+ go")
                ln += "<" + conn.read_exact(n).decode("latin-1") + ">" + \
                    conn.line()
            log.append(ln)
            tag, _, rest = ln.partition(" ")
            verb = rest.split(" ", 1)[0].upper()
            if verb == "LIST":
                for name in names:
                    conn.sendline('* LIST () "/" "%s"' % name)
                conn.sendline(tag + " OK listed")
            elif verb == "LOGOUT":
                conn.sendline("* BYE bye")
                conn.sendline(tag + " OK bye")
                return
            else:
                conn.sendline(tag + " OK done")
    return lambda conn: plain_server(conn, after_login=after)


ATOM = re.compile(r"^[^\x00-\x20\x7f(){%*\"\\\]]+$")


@pytest.mark.parametrize("enable,replayed", [
    ("ENABLE {9}\r\nCONDSTORE", None),
    ("ENABLE {9+}\r\nCONDSTORE", None),
    ('ENABLE "CONDSTORE"', None),
    ("ENABLE CONDSTORE {7}\r\nQRESYNC", "ENABLE CONDSTORE"),
], ids=["literal", "literal-plus", "quoted", "atom-and-literal"])
def test_enable_replays_only_atoms(imapfe_factory, enable, replayed):
    """Routed: ENABLE runs on the home server and is replayed on each
    public server as it is reached.  RFC 5161's ENABLE takes capability
    names, atoms; whatever else a client puts there (a literal, a quoted
    string, a list) is not replayed as it came: an ENABLE a public server
    receives holds only atoms, and never announces a literal, whose "+"
    would take the client's next command for its bytes.  The session does
    not hang: a LIST merged from both servers is answered at once."""
    home_log, public_log = [], []
    home = FakeBackend(recording_server(home_log, ["INBOX"]))
    public = FakeBackend(recording_server(public_log, ["Public/x"]))
    try:
        f = start(imapfe_factory, home.port,
                  'public "Public/" 127.0.0.1:%d\n' % public.port)
        c = login(f)
        c.sock.settimeout(5 * SLOW)
        first, _, rest = enable.partition("\r\n")
        if rest and not first.endswith("+}"):
            c.send("e %s\r\n" % first)
            assert c.line().startswith("+ ")
            c.send(rest + "\r\n")
        else:
            c.send("e %s\r\n" % enable)
        assert c.until_tagged("e")[-1] == "e OK done"
        got = c.cmd("b", 'LIST "" *')
        assert got[-1] == "b OK listed", got
        assert '* LIST () "/" "Public/x"' in got, got
        c.cmd("z", "LOGOUT")
        c.close()
        f.wait_log("reason=logout")
        enables = [ln.split(" ", 1)[1] for ln in public_log
                   if ln.split(" ")[1:2] == ["ENABLE"]]
        assert enables == ([replayed] if replayed else []), public_log
        for ln in enables:
            assert all(ATOM.match(arg) for arg in ln.split(" ")[1:]), ln
        # nothing of the client's taken for a literal: LIST went as sent
        assert public_log[-2] == 'b LIST "" *', public_log
        assert public_log[-1].endswith(" LOGOUT"), public_log
    finally:
        home.close()
        public.close()


# --- 4: imapfe's own lines never inside a back-end's literal ----------------

LITERAL = bytes(48 + i % 75 for i in range(200000))   # printable, no CRLF
HEAD = b"* 1 FETCH (BODY[] {%d}\r\n" % len(LITERAL)
HALF = len(LITERAL) // 2


def stalling_fetch_server(go):
    """A back-end whose FETCH answer is a 200 KB literal sent half, then,
    once go is set, the rest; APPENDs it takes ("+" to a synchronizing
    literal), NOOPs it answers."""
    def answer(conn, tag, verb, line):
        if verb == "FETCH":
            conn.send(HEAD + LITERAL[:HALF])
            go.wait(30 * SLOW)
            conn.send(LITERAL[HALF:] + b")\r\n" + tag.encode() +
                      b" OK fetched\r\n")
            return True
        if verb == "APPEND":
            n = int(line[line.rindex("{") + 1:].rstrip("+}"))
            if not line.endswith("+}"):
                conn.sendline("+ go")
            conn.read_exact(n)
            conn.line()
            conn.sendline(tag + " OK [APPENDUID 1 1] appended")
            return True
        return False
    return lambda conn: plain_server(
        conn, after_login=lambda cn: command_loop(cn, answer))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("what", ["continuation", "toobig", "sigterm",
                                  "timeout"])
def test_own_lines_never_inside_a_backend_literal(imapfe_factory, mode,
                                                  what):
    """The back-end's FETCH answer carries a 200 KB literal and stalls
    half-way through it.  Meanwhile something makes imapfe want to say
    something of its own: the client pipelines `APPEND INBOX {5}` (a
    synchronizing literal: "+ Ready for literal data" when routed) or one
    of 70000 bytes over max_literal_size (NO [TOOBIG]), or imapfe gets
    SIGTERM, or the idle timeout passes (a BYE).  A literal is exactly its
    count of octets (RFC 9051 4.3): any line of imapfe's written inside it
    would be taken for the message's bytes and what follows for
    responses.  So the client's byte stream must parse as IMAP responses
    with the literal's bytes exact: the answer to the APPEND comes after
    the FETCH's tagged OK; a BYE that cannot be placed is withheld and the
    stream ends where the literal was cut."""
    go = threading.Event()
    fake = FakeBackend(stalling_fetch_server(go))
    extra = ROUTED if mode == "routed" else ""
    extra += "max_literal_size 65536\n"
    if what == "timeout":
        extra += "idle_timeout %d\n" % (2 * SLOW)
    try:
        f = start(imapfe_factory, fake.port, extra)
        c = login(f)
        c.send("b FETCH 1 BODY[]\r\n")
        fill(c, len(HEAD) + HALF)
        if what in ("sigterm", "timeout"):
            if what == "sigterm":
                os.kill(f.procs.procs[-1].pid, signal.SIGTERM)
            assert recv_until_eof(c) == HEAD + LITERAL[:HALF]
            f.wait_log("event=bye-withheld")
            return
        size = 5 if what == "continuation" else 70000
        c.send("c APPEND INBOX {%d}\r\n" % size)
        nothing_for(c, 1.5)
        go.set()
        assert response(c) == HEAD + LITERAL + b")"
        assert response(c) == b"b OK fetched"
        if what == "continuation":
            assert response(c).startswith(b"+ ")
            c.send("hello\r\n")
            assert response(c) == b"c OK [APPENDUID 1 1] appended"
        else:
            assert response(c) == b"c NO [TOOBIG] Literal too large."
        assert c.cmd("n", "NOOP") == ["n OK noop"]
        c.cmd("z", "LOGOUT")
        c.close()
    finally:
        go.set()
        fake.close()


@pytest.mark.parametrize("mode", MODES)
def test_status_text_ending_in_brace_count_is_no_literal(imapfe_factory,
                                                        mode):
    """A tagged NO whose text ends in "{5}" announces no literal (RFC 9051
    9: resp-text is text, a literal only follows a string); the session
    goes on."""
    def answer(conn, tag, verb, line):
        if verb == "SELECT":
            conn.sendline(tag + " NO Mailbox doesn't exist: foo{5}")
            return True
        return False
    fake = FakeBackend(lambda conn: plain_server(
        conn, after_login=lambda cn: command_loop(cn, answer)))
    try:
        f = start(imapfe_factory, fake.port,
                     ROUTED if mode == "routed" else "")
        c = login(f)
        c.sock.settimeout(5)
        assert c.cmd("b", 'SELECT "foo{5}"') == \
            ["b NO Mailbox doesn't exist: foo{5}"]
        assert c.cmd("n", "NOOP") == ["n OK noop"]
        c.cmd("z", "LOGOUT")
        c.close()
    finally:
        fake.close()
