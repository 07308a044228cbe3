"""The bad-input catalogue (issue 6, item 7): one test per kind of hostile
or broken input, each ending in the RFC's answer (a tagged BAD or NO, or
"* BYE" and a close), a log line, and a session that either goes on (a
NOOP still gets OK) or ends with the process exiting 0.  Leaks and
sanitizer reports fail each test through conftest's procs fixture.

Before login a raw socket talks to imapfe; after login the back-end is
the real Dovecot, or the scripted fake one where the back-end itself
must misbehave.

One case lives elsewhere, with the TLS set-up it needs: STARTTLS with
pipelined commands is
test_tls.py::test_commands_pipelined_after_starttls_are_discarded.
"""
import socket
import time

import pytest

from conftest import SLOW, Raw, b64, base_config, recv_until_eof
from fakebackend import FakeBackend, plain_server


def still_serving(c):
    """The session goes on: a NOOP is answered."""
    assert c.cmd("n", "NOOP")[-1].startswith("n OK NOOP completed")


def ends_with_bye(c, text):
    assert c.line() == "* BYE " + text
    assert c.closed()


def start(imapfe_factory, port, extra=""):
    f = imapfe_factory(base_config(port, extra))
    f.start_inetd()
    return f


def message_count(dovecot, user):
    m = dovecot.imap(user)
    typ, data = m.select("INBOX", readonly=True)
    m.logout()
    return int(data[0])


# --- lines and literals before login ----------------------------------------

def test_overlong_line(imapfe_factory, dovecot):
    f = start(imapfe_factory, dovecot.port, "max_line_length 1024\n")
    c = Raw(f.port)
    c.send("a NOOP " + "x" * 2000 + "\r\n")
    ends_with_bye(c, "Command line too long.")
    f.wait_log('reason=limit detail="Command line too long."')


@pytest.mark.parametrize("announce", ["{4294967296}", "{-1}",
                                      "{99999999999999999999}", "{12x}"])
def test_invalid_literal_size(fe, announce):
    c = Raw(fe.port)
    c.send("a LOGIN %s\r\n" % announce)
    assert c.line() == "a BAD Invalid literal size."
    still_serving(c)
    c.close()
    fe.wait_log('event=bad-command reason="invalid literal size"')


def test_literal_over_prelogin_limit(fe):
    c = Raw(fe.port)
    c.send("a LOGIN {5000}\r\n")
    ends_with_bye(c, "Literal too large.")
    c = Raw(fe.port)
    c.send("a LOGIN {5000+}\r\n" + "x" * 5000 + " y\r\n")
    ends_with_bye(c, "Literal too large.")
    fe.wait_log('reason=limit detail="Literal too large."')


@pytest.mark.parametrize("line", [b"a NO\x00OP", b"a LOGIN al\x00ice secret",
                                  b"a NO\xc3\xa4OP", b"\xff\xfe NOOP"],
                         ids=["nul-in-command", "nul-in-user",
                              "8bit-in-command", "8bit-in-tag"])
def test_nul_and_8bit_bytes_in_atoms(fe, line):
    c = Raw(fe.port)
    c.send(line + b"\r\n")
    answer = c.line()
    tag = "*" if line.startswith(b"\xff") else "a"
    assert answer.startswith(tag + " BAD "), answer
    still_serving(c)
    c.close()
    fe.wait_log("event=bad-command")


@pytest.mark.parametrize("command", ['a LOGIN "alice secret',
                                     'a LOGIN alice "sec\\"ret',
                                     'a ID ("name" "x"',
                                     'a ID "name" "x")',
                                     'a ID (("name" "x")'],
                         ids=["open-quote", "escaped-close", "open-paren",
                              "close-paren", "nested-paren"])
def test_unbalanced_quotes_and_parentheses(fe, command):
    c = Raw(fe.port)
    assert c.cmd("a", command)[-1].startswith("a BAD "), command
    still_serving(c)
    c.close()
    fe.wait_log("event=bad-command")


# --- credentials ----------------------------------------------------------

def sasl_plain(user, pw):
    return "AUTHENTICATE PLAIN " + b64(b"\0" + user + b"\0" + pw)


@pytest.mark.parametrize("mech,user,pw", [
    ("PLAIN", b"ali\rce", b"secret"),
    ("PLAIN", b"alice", b"sec\nret"),
    ("LOGIN", b"ali\0ce", b"secret"),
    ("LOGIN", b"alice", b"sec\0ret"),
], ids=["cr-in-user", "lf-in-password", "nul-in-user", "nul-in-password"])
def test_cr_lf_nul_in_sasl_credentials(imapfe_factory, mech, user, pw):
    fake = FakeBackend(plain_server)
    try:
        f = start(imapfe_factory, fake.port)
        c = Raw(f.port)
        if mech == "PLAIN":
            c.send("a %s\r\n" % sasl_plain(user, pw))
        else:
            c.send("a AUTHENTICATE LOGIN %s\r\n" % b64(user))
            assert c.line().startswith("+ ")
            c.send(b64(pw) + "\r\n")
        assert c.until_tagged("a")[-1] == \
            "a NO [AUTHENTICATIONFAILED] Authentication failed."
        still_serving(c)
        c.close()
        f.wait_log('reason="invalid characters in credentials"')
        # Refused before any back-end was contacted at all.
        assert fake.received == []
    finally:
        fake.close()


# --- pipelining -------------------------------------------------------------

def test_commands_pipelined_before_login(fe):
    c = Raw(fe.port)
    c.send("a SELECT INBOX\r\nb FETCH 1 BODY[]\r\nc NOOP\r\n")
    assert c.line() == "a BAD Log in first."
    assert c.line() == "b BAD Log in first."
    assert c.line() == "c OK NOOP completed."
    c.close()
    fe.wait_log('event=bad-command reason="Log in first."')


def test_too_many_commands_pipelined_behind_login(imapfe_factory, dovecot):
    f = start(imapfe_factory, dovecot.port, "max_pipelined_commands 5\n")
    c = Raw(f.port)
    c.send("a LOGIN alice secret\r\n" +
           "".join("x%d NOOP\r\n" % i for i in range(10)))
    assert c.line().startswith("a OK ")
    ends_with_bye(c, "Too many commands sent during login.")
    f.wait_log("event=limit reason=\"10 commands pipelined")
    # Within the limit they all reach the back-end.
    c = Raw(f.port)
    c.send("a LOGIN alice secret\r\n" +
           "".join("x%d NOOP\r\n" % i for i in range(5)))
    assert c.until_tagged("a")[-1].startswith("a OK ")
    for i in range(5):
        assert c.until_tagged("x%d" % i)[-1].startswith("x%d OK" % i)
    c.cmd("z", "LOGOUT")
    c.close()


# --- slow and vanishing clients ---------------------------------------------

def test_slowloris_until_login_timeout(imapfe_factory, dovecot):
    # (a later line overrides base_config's login_timeout)
    f = start(imapfe_factory, dovecot.port, "login_timeout %d\n" % (2 * SLOW))
    c = Raw(f.port)
    start_t = time.monotonic()
    received = b""
    # One byte a second: each byte is activity, yet the command never
    # completes, so only the overall login deadline ends it.
    while time.monotonic() - start_t < 10 * SLOW:
        try:
            c.send("x")
        except OSError:
            break
        c.sock.settimeout(1.0)
        try:
            data = c.sock.recv(100)
            if data == b"":
                break
            received += data
        except socket.timeout:
            pass
    elapsed = time.monotonic() - start_t
    assert b"* BYE Disconnected for inactivity.\r\n" in received
    assert 2 * SLOW - 1 <= elapsed < 10 * SLOW
    f.wait_log("reason=timeout")


def test_client_vanishing_mid_literal_before_login(fe):
    c = Raw(fe.port)
    c.send("a LOGIN {50}\r\n")
    assert c.line().startswith("+ ")
    c.send("x" * 10)
    c.close()
    fe.wait_log("reason=client-gone")


def test_client_vanishing_mid_literal_after_login(fe, dovecot):
    before = message_count(dovecot, "bob")
    c = Raw(fe.port)
    assert c.cmd("a", "LOGIN bob hunter2")[-1].startswith("a OK")
    c.send("b APPEND INBOX {5000}\r\n")
    assert c.line().startswith("+ ")
    c.send("Subject: cut short\r\n\r\n" + "x" * 100)
    c.close()
    fe.wait_log("reason=client-gone")
    assert message_count(dovecot, "bob") == before


# --- misbehaving back-ends --------------------------------------------------

# With a public line, sessions are routed, not relayed; the public server
# itself is never reached in these tests.
ROUTED = 'public "Public/" 127.0.0.1:1\n'


def after_login_fetch(answer, then_wait=False):
    """A back-end that logs in, answers the first command after login with
    answer (bytes), then closes, or with then_wait waits for imapfe to."""
    def script(conn):
        def after(cn):
            if cn.line() is None:
                return
            cn.send(answer)
            if then_wait:
                while cn.line() is not None:
                    pass
        plain_server(conn, after_login=after)
    return script


@pytest.mark.parametrize("mode", ["relay", "routed"])
@pytest.mark.parametrize("where", ["mid-literal", "mid-fetch"])
def test_backend_vanishing(imapfe_factory, where, mode):
    head = b"* 1 FETCH (UID 7 BODY[] {100}\r\n"
    answer = head + b"0123456789" if where == "mid-literal" else \
        b"* 1 FETCH (UID 7 FLAGS (\\Seen"
    fake = FakeBackend(after_login_fetch(answer))
    try:
        f = start(imapfe_factory, fake.port, ROUTED if mode == "routed"
                  else "")
        c = Raw(f.port)
        assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
        c.send("b FETCH 1 (UID BODY[])\r\n")
        data = recv_until_eof(c)
        bye = b"* BYE Back-end server closed the connection.\r\n"
        if where == "mid-literal":
            # A BYE now would be read as part of the message: none comes.
            assert data == answer
            f.wait_log("event=bye-withheld")
        else:
            # The broken line is ended, so the BYE is a line of its own.
            assert data == answer + b"\r\n" + bye
        f.wait_log("reason=backend-gone")
    finally:
        fake.close()


def greeting_garbage(conn):
    conn.send(b"\x00\xff\xfe garbage \x1b[2J\r\n")
    conn.line()


def greeting_endless(conn):
    conn.send(b"* OK " + b"x" * (200 * 1024))
    conn.line()


def answer_garbage(conn):
    conn.sendline("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] ready")
    conn.line()
    conn.send(b"\x01\x02 }{ garbage\r\n" * 3)


@pytest.mark.parametrize("script", [greeting_garbage, greeting_endless,
                                    answer_garbage],
                         ids=["garbage-greeting", "endless-line",
                              "garbage-answer"])
def test_backend_sending_garbage_or_endless_line(imapfe_factory, script):
    fake = FakeBackend(script)
    try:
        f = start(imapfe_factory, fake.port, "backend_timeout %d\n"
                  % (5 * SLOW))
        c = Raw(f.port)
        assert c.cmd("a", "LOGIN alice secret")[-1] == \
            "a NO [UNAVAILABLE] Back-end server unavailable, try again later."
        still_serving(c)
        c.close()
        f.wait_log("event=login-failed")
    finally:
        fake.close()


def test_backend_literal_bigger_than_it_sends(imapfe_factory):
    answer = b"* 1 FETCH (BODY[] {1000}\r\n0123456789)\r\nb OK done\r\n"
    fake = FakeBackend(after_login_fetch(answer, then_wait=True))
    try:
        f = start(imapfe_factory, fake.port, "idle_timeout %d\n" % (2 * SLOW))
        c = Raw(f.port)
        assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
        c.send("b FETCH 1 BODY[]\r\n")
        # The client is still inside the literal when the idle timeout
        # ends the session: it gets the bytes, no BYE inside them, EOF.
        assert recv_until_eof(c) == answer
        f.wait_log("event=bye-withheld")
        f.wait_log("reason=timeout")
    finally:
        fake.close()


@pytest.mark.parametrize("mode", ["relay", "routed"])
def test_append_literal_while_backend_is_slow(imapfe_factory, mode):
    """A 4 MiB LITERAL+ APPEND while the back-end reads nothing for two
    seconds: the message arrives whole and the answer comes back.  The
    router hands the back-end a synchronizing literal (it, not the client,
    decides when the bytes go), so the back-end, as a real one would,
    answers "+" when the literal is synchronizing."""
    size = 4 * 1024 * 1024
    got = {}

    def after(cn):
        ln = cn.line()
        tag = ln.split(" ")[0]
        got["command"] = ln
        time.sleep(2)            # slow: nothing read while the client sends
        if not ln.endswith("+}"):
            cn.sendline("+ go")
        got["body"] = cn.read_exact(size)
        got["rest"] = cn.line()
        cn.sendline(tag + " OK [APPENDUID 1 1] appended")
        ln = cn.line()
        if ln is not None:
            cn.sendline(ln.split(" ")[0] + " OK noop")
            cn.line()

    fake = FakeBackend(lambda conn: plain_server(
        conn, caps="IMAP4rev1 LITERAL+ AUTH=PLAIN", after_login=after))
    try:
        f = start(imapfe_factory, fake.port, ROUTED if mode == "routed"
                  else "")
        c = Raw(f.port)
        assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
        body = bytes(i % 251 for i in range(size))
        c.send(b"b APPEND INBOX {%d+}\r\n" % size + body + b"\r\n")
        assert c.until_tagged("b")[-1] == "b OK [APPENDUID 1 1] appended"
        assert got["command"] in ("b APPEND INBOX {%d+}" % size,
                                  "b APPEND INBOX {%d}" % size)
        assert got["body"] == body and got["rest"] == ""
        assert c.cmd("n", "NOOP")[-1] == "n OK noop"
        c.close()
        f.wait_log("reason=client-gone")
    finally:
        fake.close()


# --- limits after login -----------------------------------------------------

@pytest.mark.parametrize("literal", ["{70000}", "{70000+}"],
                         ids=["sync", "nonsync"])
@pytest.mark.parametrize("mode", ["relay", "routed"])
def test_literal_over_max_literal_size_after_login(imapfe_factory, dovecot,
                                                   mode, literal):
    """A literal over max_literal_size after login gets the same answer
    whether the session is relayed or routed, the one the RFCs call for.

    Synchronizing: the client waits for "+" before it sends a byte, so the
    server may answer the command instead (RFC 9051 section 2.2.1); the
    answer is a tagged NO, an operational failure of this command only
    (RFC 9051 section 7.1), with TOOBIG, the code for data over the
    server's limit (RFC 4469, RFC 7889).  Nothing of the literal was sent,
    so the session goes on: a NOOP and a small APPEND then work.

    Non-synchronizing (LITERAL+ or LITERAL-, RFC 7888): the bytes are
    already on their way.  RFC 7888 section 4 leaves the server two
    choices for one it will not take, reading and rejecting it, or an
    untagged BYE and closing the connection (RFC 9051 section 7.1: BYE,
    the server is closing); imapfe does the latter, before the command
    reaches the back-end.

    In both cases the back-end stores nothing."""
    before = message_count(dovecot, "bob")
    extra = "max_literal_size 65536\n"
    if mode == "routed":
        extra += ROUTED
    f = start(imapfe_factory, dovecot.port, extra)
    c = Raw(f.port)
    assert c.cmd("a", "LOGIN bob hunter2")[-1].startswith("a OK")
    c.send("b APPEND INBOX %s\r\n" % literal)
    if literal.endswith("+}"):
        ends_with_bye(c, "Literal too large.")
        stored = 0
    else:
        assert c.line() == "b NO [TOOBIG] Literal too large."
        still_serving(c)
        msg = b"Subject: small\r\n\r\nsmall\r\n"
        c.send(b"c APPEND INBOX {%d}\r\n" % len(msg))
        assert c.line().startswith("+ ")
        c.send(msg + b"\r\n")
        assert c.until_tagged("c")[-1].startswith("c OK")
        c.close()
        stored = 1
    f.wait_log('event=limit reason="literal of 70000 bytes')
    assert message_count(dovecot, "bob") == before + stored


def id_pairs(n, field="f", value="v"):
    return "ID (%s)" % " ".join('"%s%d" "%s"' % (field, i, value)
                                for i in range(n))


@pytest.mark.parametrize("extra,too_much,just_right", [
    ("", id_pairs(31), id_pairs(30)),
    ("", id_pairs(1, field="f" * 30), id_pairs(1, field="f" * 29)),
    ("", id_pairs(1, value="v" * 1025), id_pairs(1, value="v" * 1024)),
    ("max_id_pairs 2\n", id_pairs(3), id_pairs(2)),
], ids=["31-pairs", "31-octet-field", "1025-octet-value", "configured-pairs"])
def test_id_over_rfc2971_limits(imapfe_factory, dovecot, extra, too_much,
                                just_right):
    f = start(imapfe_factory, dovecot.port, extra)
    c = Raw(f.port)
    assert c.cmd("a", too_much)[-1] == "a BAD Invalid ID parameters."
    assert c.cmd("b", just_right)[-1] == "b OK ID completed."
    still_serving(c)
    c.close()
    f.wait_log('event=bad-command reason="Invalid ID parameters."')
