"""The core session: pre-login commands, pass-through login to a real
Dovecot, the relay, and the limits (issue 2)."""
import imaplib
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import (RUN_AS, SLOW, USERS, Raw, b64, base_config,
                      sample_message, wait_for)
from fakebackend import FakeBackend, plain_server, serve_commands


def caps_of(line):
    m = re.search(r"\[CAPABILITY ([^\]]*)\]", line)
    assert m, line
    return m.group(1).split()


# --- before login ---------------------------------------------------------

def test_greeting_advertises_only_what_imapfe_honours(fe):
    c = Raw(fe.port)
    assert c.greeting.startswith("* OK [CAPABILITY ")
    caps = caps_of(c.greeting)
    for cap in ("IMAP4rev1", "LITERAL-", "SASL-IR", "ID", "AUTH=PLAIN",
                "AUTH=LOGIN"):
        assert cap in caps
    assert "LITERAL+" not in caps and "STARTTLS" not in caps
    c.close()


def test_capability_noop_logout(fe):
    c = Raw(fe.port)
    lines = c.cmd("a1", "CAPABILITY")
    assert lines[0].startswith("* CAPABILITY IMAP4rev1 ")
    assert lines[-1].startswith("a1 OK")
    assert c.cmd("a2", "NOOP")[-1].startswith("a2 OK")
    lines = c.cmd("a3", "LOGOUT")
    assert lines[0].startswith("* BYE") and lines[-1].startswith("a3 OK")
    assert c.closed()
    fe.wait_log("reason=logout")


def test_id_command(fe):
    c = Raw(fe.port)
    assert c.cmd("i1", "ID NIL") == ["* ID NIL", "i1 OK ID completed."]
    lines = c.cmd("i2", 'ID ("name" "test" "version" NIL)')
    assert lines[-1].startswith("i2 OK")
    assert c.cmd("i3", 'ID ("name")')[-1].startswith("i3 BAD")
    assert c.cmd("i4", "ID (" + '"k" "v" ' * 31 + ")")[-1].startswith(
        "i4 BAD")
    assert c.cmd("i5", 'ID ("%s" "v")' % ("f" * 31))[-1].startswith("i5 BAD")
    c.close()


@pytest.mark.parametrize("command,answer", [
    ("SELECT INBOX", "BAD"), ("LIST \"\" *", "BAD"), ("FETCH 1 FLAGS", "BAD"),
    ("ENABLE IMAP4rev2", "BAD"), ("XYZZY", "BAD"), ("NOOP extra", "BAD"),
    ("AUTHENTICATE CRAM-MD5", "NO"), ("LOGIN onlyuser", "BAD"),
])
def test_other_commands_get_rfc_answer_and_session_goes_on(fe, command,
                                                           answer):
    c = Raw(fe.port)
    lines = c.cmd("t1", command)
    assert lines[-1].startswith("t1 %s " % answer), lines
    assert c.cmd("t2", "NOOP")[-1].startswith("t2 OK")
    c.close()


def test_untagged_garbage_gets_star_bad(fe):
    c = Raw(fe.port)
    c.send("\r\n")
    assert c.line().startswith("* BAD")
    c.send("+foo NOOP\r\n")
    assert c.line().startswith("* BAD")
    assert c.cmd("t", "NOOP")[-1].startswith("t OK")
    c.close()


def test_too_many_bad_commands_end_the_session(fe):
    c = Raw(fe.port)
    c.send("GET / HTTP/1.1\r\n" * 12)
    while not c.closed():
        pass
    text = c.buf.decode()
    assert text.count(" BAD ") == 10
    assert "* BYE Too many invalid commands." in text
    fe.wait_log("reason=limit")


# --- login ----------------------------------------------------------------

def test_login_with_imaplib_and_read_mail(fe):
    m = imaplib.IMAP4("127.0.0.1", fe.port)
    typ, data = m.login("alice", "secret")
    assert typ == "OK"
    typ, data = m.capability()
    caps = data[0].decode().split()
    assert "IDLE" in caps and "UIDPLUS" in caps
    typ, data = m.select("INBOX")
    assert typ == "OK" and int(data[0]) >= 3
    typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: test 1" in data[0][1]
    m.logout()
    log = fe.wait_log("reason=logout")
    assert 'event=login user="alice" method=LOGIN' in log
    assert "secret" not in log


def test_post_login_capabilities_come_from_the_backend(fe):
    c = Raw(fe.port)
    lines = c.cmd("l", "LOGIN alice secret")
    caps = caps_of(lines[-1])
    assert lines[-1].startswith("l OK [CAPABILITY ")
    assert "MOVE" in caps and "LITERAL+" in caps
    for gone in ("AUTH=PLAIN", "SASL-IR", "STARTTLS", "LOGINDISABLED"):
        assert gone not in caps
    c.cmd("z", "LOGOUT")
    c.close()


def test_authenticate_plain_without_and_with_sasl_ir(fe):
    c = Raw(fe.port)
    c.send("p1 AUTHENTICATE PLAIN\r\n")
    assert c.line().startswith("+")
    c.send(b64("\0alice\0secret") + "\r\n")
    assert c.until_tagged("p1")[-1].startswith("p1 OK [CAPABILITY")
    c.cmd("z", "LOGOUT")
    c.close()
    c = Raw(fe.port)
    lines = c.cmd("p2", "AUTHENTICATE PLAIN " + b64("alice\0alice\0secret"))
    assert lines[-1].startswith("p2 OK")
    c.cmd("z", "LOGOUT")
    c.close()


def test_authenticate_plain_with_imaplib(fe):
    m = imaplib.IMAP4("127.0.0.1", fe.port)
    typ, _ = m.authenticate("PLAIN", lambda _: b"\0bob\0hunter2")
    assert typ == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()


def test_authenticate_login_mechanism(fe):
    c = Raw(fe.port)
    c.send("q AUTHENTICATE LOGIN\r\n")
    assert c.line() == "+ VXNlcm5hbWU6"
    c.send(b64("alice") + "\r\n")
    assert c.line() == "+ UGFzc3dvcmQ6"
    c.send(b64("secret") + "\r\n")
    assert c.until_tagged("q")[-1].startswith("q OK")
    c.cmd("z", "LOGOUT")
    # SASL-IR carries the user name for LOGIN.
    c = Raw(fe.port)
    c.send("r AUTHENTICATE LOGIN %s\r\n" % b64("bob"))
    assert c.line() == "+ UGFzc3dvcmQ6"
    c.send(b64("hunter2") + "\r\n")
    assert c.until_tagged("r")[-1].startswith("r OK")
    c.close()


def test_authenticate_cancel_and_bad_base64(fe):
    c = Raw(fe.port)
    c.send("c1 AUTHENTICATE PLAIN\r\n")
    c.line()
    c.send("*\r\n")
    assert c.line().startswith("c1 BAD")
    c.send("c2 AUTHENTICATE PLAIN\r\n")
    c.line()
    c.send("!!notbase64!!\r\n")
    assert c.line().startswith("c2 BAD")
    assert c.cmd("c3", "AUTHENTICATE PLAIN A===")[-1].startswith("c3 BAD")
    # An authorization identity pass-through cannot honour is refused.
    lines = c.cmd("c4", "AUTHENTICATE PLAIN " + b64("bob\0alice\0secret"))
    assert lines[-1].startswith("c4 NO [AUTHORIZATIONFAILED]")
    assert c.cmd("c5", "LOGIN alice secret")[-1].startswith("c5 OK")
    c.close()


def test_curl_login_and_fetch(fe):
    for opts in ([], ["--login-options", "AUTH=PLAIN", "--sasl-ir"],
                 ["--login-options", "AUTH=LOGIN"]):
        out = subprocess.run(
            ["curl", "-s", "-S", "--max-time", str(20 * SLOW)] + opts +
            ["-u", "alice:secret",
             "imap://127.0.0.1:%d/INBOX;MAILINDEX=2" % fe.port],
            capture_output=True, timeout=30 * SLOW)
        assert out.returncode == 0, out.stderr
        assert b"Subject: test 2" in out.stdout


def test_wrong_password_and_unknown_user_look_the_same(fe):
    c = Raw(fe.port)
    wrong = c.cmd("a", "LOGIN alice wrong")[-1]
    unknown = c.cmd("b", "LOGIN nosuchuser secret")[-1]
    assert wrong == "a NO [AUTHENTICATIONFAILED] Authentication failed."
    assert unknown == "b NO [AUTHENTICATIONFAILED] Authentication failed."
    assert c.cmd("c", "LOGIN alice secret")[-1].startswith("c OK")
    c.close()
    log = fe.log_text()
    assert "wrong" not in log


def test_unrouted_user_gets_authenticationfailed(imapfe_factory, dovecot):
    f = imapfe_factory("route alice 127.0.0.1:%d\nroute *@example.com "
                       "127.0.0.1:%d\n" % (dovecot.port, dovecot.port))
    f.start_inetd()
    c = Raw(f.port)
    assert c.cmd("a", "LOGIN bob hunter2")[-1] == \
        "a NO [AUTHENTICATIONFAILED] Authentication failed."
    assert c.cmd("b", "LOGIN alice secret")[-1].startswith("b OK")
    c.close()
    f.wait_log('user="bob" method=LOGIN reason="no route for user"')


def test_too_many_failures_end_with_bye(fe):
    c = Raw(fe.port)
    for t in ("a", "b"):
        assert c.cmd(t, "LOGIN alice nope")[-1].startswith(t + " NO")
    c.send("c LOGIN alice nope\r\n")
    assert c.line().startswith("c NO")
    assert c.line() == "* BYE Too many failed logins."
    assert c.closed()


def test_backend_down_gives_unavailable(imapfe_factory):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    dead = port.getsockname()[1]
    port.close()
    f = imapfe_factory(base_config(dead))
    f.start_inetd()
    c = Raw(f.port)
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith(
        "a NO [UNAVAILABLE]")
    c.close()
    f.wait_log("connect: Connection refused")


def test_literals_synchronizing_and_not(fe):
    c = Raw(fe.port)
    c.send("a LOGIN {5}\r\n")
    assert c.line().startswith("+ ")
    c.send("alice {6}\r\n")
    assert c.line().startswith("+ ")
    c.send("secret\r\n")
    assert c.until_tagged("a")[-1].startswith("a OK")
    c.cmd("z", "LOGOUT")
    c = Raw(fe.port)
    c.send("b LOGIN {3+}\r\nbob {7+}\r\nhunter2\r\n")
    assert c.until_tagged("b")[-1].startswith("b OK")
    c.close()


def test_eight_bit_password_via_literal(fe):
    pw = USERS["carol"].encode("utf-8")
    c = Raw(fe.port)
    c.send(b"a LOGIN carol {%d+}\r\n%s\r\n" % (len(pw), pw))
    assert c.until_tagged("a")[-1].startswith("a OK")
    c.close()


def test_quoted_strings_with_escapes(fe):
    c = Raw(fe.port)
    assert c.cmd("a", r'LOGIN "alice" "secret"')[-1].startswith("a OK")
    c.close()
    c = Raw(fe.port)
    assert c.cmd("b", r'LOGIN "al\ice" "x"')[-1].startswith("b BAD")
    assert c.cmd("c", r'LOGIN "unterminated')[-1].startswith("c BAD")
    c.close()


# --- injection ------------------------------------------------------------

def test_hostile_user_name_reaches_backend_as_one_login(imapfe_factory,
                                                        dovecot):
    """A user name holding a quote and a backslash is one login attempt at
    the back-end, quoted; one with CR LF never reaches it at all."""
    fake = FakeBackend(lambda c: plain_server(
        c, caps="IMAP4rev1", accept=lambda u, p: False))
    try:
        f = imapfe_factory(base_config(fake.port, "max_login_failures 5\n"))
        f.start_inetd()
        c = Raw(f.port)
        evil = b'ev"il\\ a NOOP'
        c.send(b"a LOGIN {%d}\r\n" % len(evil))
        c.line()
        c.send(evil + b" pw\r\n")
        assert c.until_tagged("a")[-1].startswith("a NO [AUTHENTICATIONFAIL")
        crlf = b"x\r\nb DELETE INBOX"
        c.send(b"b LOGIN {%d}\r\n" % len(crlf))
        c.line()
        c.send(crlf + b" pw\r\n")
        assert c.until_tagged("b")[-1] == \
            "b NO [AUTHENTICATIONFAILED] Authentication failed."
        c.send(b"c AUTHENTICATE PLAIN " +
               b64(b"\0x\r\nc DELETE INBOX\0pw").encode() + b"\r\n")
        assert c.until_tagged("c")[-1].startswith("c NO [AUTHENTICATIONF")
        c.cmd("z", "LOGOUT")
        c.close()
        wait_for(lambda: len(fake.received) == 1, 10, "one connection")
        sent = bytes(fake.received[0])
        # Exactly: the LOGIN (no SASL mechanism offered), quoted, and
        # whatever imapfe sent on disconnecting; no other command.
        lines = [l for l in sent.split(b"\r\n") if l]
        assert lines == [b'F1 LOGIN "ev\\"il\\\\ a NOOP" "pw"'], lines
    finally:
        fake.close()
    # The real Dovecot sees the same name as a single failed attempt.
    g = imapfe_factory(base_config(dovecot.port), name="fe2")
    g.start_inetd()
    c = Raw(g.port)
    c.send(b"a LOGIN {%d}\r\n" % len(evil))
    c.line()
    c.send(evil + b" pw\r\n")
    assert c.until_tagged("a")[-1].startswith("a NO [AUTHENTICATIONFAILED]")
    c.cmd("z", "LOGOUT")
    c.close()
    wait_for(lambda: "auth failed, 1 attempts" in dovecot.log_text() and
             'ev"il' in dovecot.log_text(), 10, "dovecot's log line")


def test_literal_user_name_is_sent_as_literal(imapfe_factory):
    """Eight-bit bytes go to the back-end as a literal, waiting for its
    continuation when it has no LITERAL+."""
    got = {}

    def script(conn):
        conn.sendline("* OK [CAPABILITY IMAP4rev1] fake ready")
        ln = conn.line()
        m = re.match(r"(\S+) LOGIN \{(\d+)\}$", ln)
        got["first"] = ln
        conn.sendline("+ go")
        user = conn.read_exact(int(m.group(2)))
        got["user"] = user
        rest = conn.line()
        got["rest"] = rest
        conn.sendline(m.group(1) + " OK [CAPABILITY IMAP4rev1 IDLE] in")
        ln = conn.line()
        if ln and "LOGOUT" in ln:
            conn.sendline("* BYE bye")
            conn.sendline(ln.split()[0] + " OK bye")

    fake = FakeBackend(script)
    try:
        f = imapfe_factory(base_config(fake.port))
        f.start_inetd()
        c = Raw(f.port)
        user = "j\u00fcrgen".encode()
        c.send(b"a LOGIN {%d+}\r\n%s pw\r\n" % (len(user), user))
        assert c.until_tagged("a")[-1].startswith("a OK")
        c.cmd("z", "LOGOUT")
        c.close()
        assert got["user"] == user and got["rest"] == ' "pw"'
    finally:
        fake.close()


# --- relay ----------------------------------------------------------------

def test_append_and_fetch_10_mib_byte_for_byte(fe, dovecot):
    body = bytes((i * 7 + 13) % 251 + 1 for i in range(10 * 1024 * 1024))
    body = body.replace(b"\r", b"x").replace(b"\n", b"y")
    lines = [body[i:i + 998] for i in range(0, len(body), 998)]
    msg = (b"From: a@example.org\r\nSubject: big\r\n\r\n" +
           b"\r\n".join(lines) + b"\r\n")
    m = imaplib.IMAP4("127.0.0.1", fe.port)
    m.login("bob", "hunter2")
    m.create("Big")
    typ, data = m.append("Big", None, None, msg)
    assert typ == "OK"
    m.select("Big")
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK"
    assert data[0][1] == msg
    m.close()
    m.delete("Big")
    m.logout()
    log = fe.wait_log("reason=logout")
    assert re.search(r"bytes_in=(\d{8})", log)


def big_message(size):
    """A message of about size bytes in 998-byte lines, none alike."""
    body = bytes((i * 7 + 13) % 251 + 1 for i in range(size))
    body = body.replace(b"\r", b"x").replace(b"\n", b"y")
    lines = [body[i:i + 998] for i in range(0, len(body), 998)]
    return (b"From: a@example.org\r\nSubject: big\r\n\r\n" +
            b"\r\n".join(lines) + b"\r\n")


def read_exactly(c, n):
    """n bytes from Raw c, after what it buffered."""
    while len(c.buf) < n:
        chunk = c.sock.recv(1 << 20)
        assert chunk, "closed after %d of %d bytes" % (len(c.buf), n)
        c.buf += chunk
    data, c.buf = c.buf[:n], c.buf[n:]
    return data


@pytest.fixture
def big_mailbox(dovecot):
    """bob's mailbox Spliced holding one 6 MiB message (more than the
    socket buffers hold, so the relay must wait for a slow reader)."""
    msg = big_message(6 * 1024 * 1024)
    m = dovecot.imap("bob")
    m.create("Spliced")
    assert m.append("Spliced", None, None, msg)[0] == "OK"
    m.logout()
    yield msg
    m = dovecot.imap("bob")
    m.delete("Spliced")
    m.logout()


def test_long_literal_to_a_slow_reader_arrives_whole(fe, big_mailbox):
    """Long literals from a plain back-end take the splice(2) path; a
    client that reads late makes it wait for the socket, not give up."""
    c = Raw(fe.port)
    c.cmd("a", "LOGIN bob hunter2")
    c.cmd("b", "SELECT Spliced")
    c.send("c FETCH 1 BODY.PEEK[]\r\n")
    # Nothing read for a while: the bytes back up into imapfe, whose
    # writes to the client must wait (the sleep makes back-pressure, it
    # waits for nothing).
    time.sleep(0.5)
    head = c.line()
    assert head == "* 1 FETCH (BODY[] {%d}" % len(big_mailbox), head
    assert read_exactly(c, len(big_mailbox)) == big_mailbox
    assert c.line() == ")"
    assert c.line().startswith("c OK")
    assert c.cmd("d", "NOOP")[-1].startswith("d OK")
    c.cmd("e", "LOGOUT")
    log = fe.wait_log("reason=logout")
    out = int(re.findall(r"bytes_out=(\d+)", log)[-1])
    assert out > len(big_mailbox), log


def test_long_literal_through_inetd_pipes(imapfe_factory, dovecot,
                                          big_mailbox):
    """Pipes on stdin and stdout, as a super-server may hand them over:
    the literal still arrives whole."""
    f = imapfe_factory(base_config(dovecot.port))
    p = f.procs.spawn(["-d", "-f", f.conf], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=f._logf)
    # stdin stays open until the answers are in: its end ends the session.
    p.stdin.write(b"a LOGIN bob hunter2\r\nb SELECT Spliced\r\n"
                  b"c FETCH 1 BODY.PEEK[]\r\nd LOGOUT\r\n")
    p.stdin.flush()
    out = b""
    while b"\r\nd OK" not in out:
        chunk = p.stdout.read1(1 << 20)
        assert chunk, out[-300:]
        out += chunk
    p.stdin.close()
    p.wait(timeout=10 * SLOW)
    lit = b"* 1 FETCH (BODY[] {%d}\r\n" % len(big_mailbox)
    assert lit + big_mailbox + b")\r\nc OK" in out
    assert b"d OK" in out


def test_idle_sees_message_appended_by_another_client(fe, dovecot):
    c = Raw(fe.port)
    assert c.cmd("a", "LOGIN bob hunter2")[-1].startswith("a OK")
    c.cmd("b", "SELECT INBOX")
    c.send("i IDLE\r\n")
    assert c.line().startswith("+ ")
    other = dovecot.imap("bob")
    other.append("INBOX", None, None, sample_message(7))
    other.logout()
    assert re.match(r"\* \d+ EXISTS", c.line())
    c.send("DONE\r\n")
    assert c.until_tagged("i")[-1].startswith("i OK")
    c.cmd("z", "LOGOUT")
    c.close()


def test_pipelined_commands_after_login_reach_backend(fe):
    c = Raw(fe.port)
    c.send("a LOGIN alice secret\r\nb SELECT INBOX\r\nc NOOP\r\n")
    assert c.until_tagged("a")[-1].startswith("a OK")
    assert c.until_tagged("b")[-1].startswith("b OK")
    assert c.until_tagged("c")[-1].startswith("c OK")
    c.close()


def test_backend_closing_mid_session_gives_bye(imapfe_factory):
    def script(conn):
        plain_server(conn, after_login=lambda cn: cn.line())
    fake = FakeBackend(script)
    try:
        f = imapfe_factory(base_config(fake.port))
        f.start_inetd()
        c = Raw(f.port)
        assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
        c.send("b NOOP\r\n")
        assert c.line() == "* BYE Back-end server closed the connection."
        assert c.closed()
        f.wait_log("reason=backend-gone")
    finally:
        fake.close()


def test_client_leaving_closes_backend_at_once(imapfe_factory):
    closed = threading.Event()

    def script(conn):
        def after(cn):
            cn.line()
            closed.set()
        plain_server(conn, after_login=after)
    fake = FakeBackend(script)
    try:
        f = imapfe_factory(base_config(fake.port))
        f.start_inetd()
        c = Raw(f.port)
        assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
        c.close()
        assert closed.wait(10 * SLOW)
        f.wait_log("reason=client-gone")
    finally:
        fake.close()


def test_configuration_loop_is_refused(imapfe_factory):
    f = imapfe_factory("route * 127.0.0.1:1\n")
    port = f.start_inetd()
    with open(f.conf, "w") as fh:
        fh.write("route * 127.0.0.1:%d\nplaintext_auth yes\n%s"
                 % (port, RUN_AS))
    c = Raw(port)
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith(
        "a NO [UNAVAILABLE]")
    c.cmd("z", "LOGOUT")
    c.close()
    f.wait_log("configuration loop")


# --- limits (the bad-input catalogue is test_badinput.py) -----------------

def test_login_timeout_ends_with_bye(imapfe_factory, dovecot):
    f = imapfe_factory("route * 127.0.0.1:%d\nlogin_timeout %d\n"
                       % (dovecot.port, 2 * SLOW))
    f.start_inetd()
    c = Raw(f.port)
    start = time.monotonic()
    c.send("a NOOP\r\n")
    assert c.line().startswith("a OK")
    assert c.line() == "* BYE Disconnected for inactivity."
    assert c.closed()
    assert time.monotonic() - start < 10 * SLOW
    f.wait_log("reason=timeout")


def test_idle_timeout_after_login(imapfe_factory, dovecot):
    f = imapfe_factory(base_config(dovecot.port, "idle_timeout %d\n"
                                   % (2 * SLOW)))
    f.start_inetd()
    c = Raw(f.port)
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    assert c.line() == "* BYE Disconnected for inactivity."
    assert c.closed()


# --- process model --------------------------------------------------------

def test_stdio_session_like_inetd(imapfe_factory, dovecot):
    f = imapfe_factory(base_config(dovecot.port))
    out = f.run_stdio(b"a CAPABILITY\r\nb LOGOUT\r\n")
    assert out.startswith(b"* OK [CAPABILITY")
    assert b"b OK LOGOUT completed." in out


def test_listener_forks_a_process_per_connection(imapfe_factory, dovecot):
    f = imapfe_factory(base_config(dovecot.port))
    f.start_listener()
    clients = [imaplib.IMAP4("127.0.0.1", f.port) for _ in range(5)]
    for m in clients:
        assert m.login("alice", "secret")[0] == "OK"
    children = wait_for(lambda: [
        p for p in os.listdir("/proc") if p.isdigit() and
        _ppid(int(p)) == f.listener.pid] if len([
            p for p in os.listdir("/proc") if p.isdigit() and
            _ppid(int(p)) == f.listener.pid]) >= 5 else None, 10,
        "five session processes")
    assert len(children) >= 5
    for m in clients:
        m.select("INBOX")
        m.logout()
    # Every session's child is reaped: none is left as a zombie, and only
    # the one pre-forked child (prefork's default) waits for the next.
    wait_for(lambda: len([p for p in os.listdir("/proc") if p.isdigit()
                          and _ppid(int(p)) == f.listener.pid]) == 1, 10,
             "children reaped")
    f.stop()


def test_listener_sigterm_ends_sessions_with_bye(imapfe_factory, dovecot):
    f = imapfe_factory(base_config(dovecot.port))
    f.start_listener()
    c = Raw(f.port)
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    d = Raw(f.port)
    f.listener.send_signal(signal.SIGTERM)
    assert d.line() == "* BYE Server shutting down."
    assert c.line() == "* BYE Server shutting down."
    f.listener.wait(timeout=20 * SLOW)
    assert f.listener.returncode == 0


def test_config_check_flag(imapfe_factory, tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("route * nohostport\n")
    r = subprocess.run([os.environ.get("IMAPFE_BIN") or
                        os.path.join(os.path.dirname(__file__), "..",
                                     "imapfe"), "-t", "-f", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "bad.conf:1: bad route target" in r.stderr


@pytest.mark.parametrize("line, why", [
    ("route * mail.example.org:99999",
     "the port must be a number from 1 to 65535"),
    ("route * mail.example.org:0", "the port must be a number from 1 to 65535"),
    ("route * mail.example.org:imap",
     "the port must be a number from 1 to 65535"),
    ("route * mail.example.org", "the port is missing"),
    ("route * [::1]", "the port is missing"),
    ("route * ::1:143", "an IPv6 address goes in brackets"),
    ("route * [::1:143", "no ']' after the IPv6 address"),
    ("server mail/example:143", "the host must be a name or an address"),
    ('public "Shared/" mail.example.org:65536',
     "the port must be a number from 1 to 65535"),
    ('public "Shared/" ldap tls=none',
     "a public line takes HOST:PORT with options, or ldap without"),
])
def test_config_check_rejects_bad_host_port(tmp_path, line, why):
    bad = tmp_path / "bad.conf"
    bad.write_text("plaintext_auth yes\n%s\n" % line)
    r = subprocess.run([os.environ.get("IMAPFE_BIN") or
                        os.path.join(os.path.dirname(__file__), "..",
                                     "imapfe"), "-t", "-f", str(bad)],
                       capture_output=True, text=True)
    target = line.split()[1 if line.startswith("server") else 2]
    assert r.returncode == 1
    assert "bad.conf:2: bad route target '%s': %s" % (target, why) in r.stderr


def test_config_line_too_long_is_an_error(tmp_path):
    """A line longer than the reader's buffer is refused, not cut in two:
    the directive at the end of a long comment must not become a line of
    its own."""
    bad = tmp_path / "bad.conf"
    bad.write_text("route * 127.0.0.1:143\n# " + "x" * 5000 +
                   " plaintext_auth yes\n")
    r = subprocess.run([os.environ.get("IMAPFE_BIN") or
                        os.path.join(os.path.dirname(__file__), "..",
                                     "imapfe"), "-t", "-f", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "bad.conf:2: line longer than 4094 bytes" in r.stderr


@pytest.mark.parametrize("spec, why", [
    ("127.0.0.1:0", "the port must be a number from 1 to 65535"),
    ("127.0.0.1", "the port is missing"),
    ("*:70000", "the port must be a number from 1 to 65535"),
])
def test_listen_spec_rejected(imapfe_factory, spec, why):
    f = imapfe_factory(base_config(9))     # never connected to
    r = subprocess.run([os.environ.get("IMAPFE_BIN") or
                        os.path.join(os.path.dirname(__file__), "..",
                                     "imapfe"), "-f", f.conf,
                        "-l", spec], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 1
    assert "imapfe: -l %s: %s" % (spec, why) in r.stderr


def _ppid(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


# --- the memory cap ---------------------------------------------------------

@pytest.mark.skipif(os.environ.get("IMAPFE_VALGRIND") == "1" or
                    "asan" in os.environ.get("IMAPFE_BIN", ""),
                    reason="valgrind and AddressSanitizer manage memory "
                    "themselves; a data-size rlimit means nothing to them")
def test_session_memory_cap_ends_session_with_bye(imapfe_factory, dovecot):
    # With a public line the router buffers whole commands (small literals
    # included) up to 1 MiB; a 1 MiB cap stops that growth first.
    f = imapfe_factory(base_config(dovecot.port,
                                   'public "Shared/" 127.0.0.1:%d\n'
                                   "max_session_memory 1\n" % dovecot.port))
    f.start_inetd()
    c = Raw(f.port)
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    chunk = b"x" * 60000
    c.send(b"b LIST \"\" (")
    try:
        for _ in range(17):
            c.send(b"{60000+}\r\n" + chunk + b" ")
        c.send(b")\r\n")
    except OSError:
        pass                    # the session may end before all is sent
    assert c.line() == "* BYE Out of memory."
    assert c.closed()
    f.wait_log("reason=limit")
    # and the next session is unaffected
    d = Raw(f.port)
    assert d.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    assert d.cmd("z", "LOGOUT")[-1].startswith("z OK")


# --- the client's address, told to the back-end ----------------------------

@pytest.fixture(scope="module")
def trusting_dovecot():
    """A Dovecot that believes imapfe's ID (as it would on a trusted
    network) and logs the ID it receives."""
    from conftest import Dovecot
    d = Dovecot(extra_conf="login_trusted_networks = 127.0.0.0/8\n"
                           "imap_id_log = *\n")
    yield d
    d.close()


def raw_from(port, source_ip):
    """A Raw client whose connection comes from source_ip."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source_ip, 0))
    sock.settimeout(10 * SLOW)
    sock.connect(("127.0.0.1", port))
    c = Raw.__new__(Raw)
    c.sock, c.buf = sock, b""
    c.greeting = c.line()
    return c, sock.getsockname()[1]


def test_backend_learns_the_client_address(imapfe_factory, trusting_dovecot):
    f = imapfe_factory(base_config(trusting_dovecot.port))
    f.start_inetd()
    c, client_port = raw_from(f.port, "127.0.0.2")
    # the client's own fields travel; one posing as another address does not
    assert c.cmd("i", 'ID ("name" "mutt" "x-originating-ip" "192.0.2.66")'
                 )[-1].startswith("i OK")
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    c.cmd("z", "LOGOUT")
    c.close()
    session = re.search(r"session=([0-9a-f]{12})",
                        f.wait_log("reason=logout")).group(1)

    def login_line():
        for ln in trusting_dovecot.log_text().splitlines():
            if "Login: user=<alice>" in ln and "rip=127.0.0.2" in ln:
                return ln
        return None
    wait_for(login_line, 10 * SLOW, "Dovecot to log the login")
    log = trusting_dovecot.log_text()
    assert "rport=%d" % client_port in login_line() or \
        "rip=127.0.0.2" in login_line()
    assert "192.0.2.66" not in log
    assert "name=mutt" in log and session in log


@pytest.mark.parametrize("routed", [False, True], ids=["relay", "routed"])
def test_id_at_rfc2971_sizes_is_answered(imapfe_factory, trusting_dovecot,
                                         routed):
    """RFC 2971 allows 30 pairs, fields of 30 octets and values of 1024:
    about 32 KB on one line, more with escapes.  Such an ID is answered
    (Dovecot answers it) in both modes, what reaches the back-end is the
    same, and another command that long still ends the session."""
    conf = base_config(trusting_dovecot.port)
    if routed:
        conf += "server 127.0.0.1:9\n"
    f = imapfe_factory(conf)
    f.start_inetd()
    c = Raw(f.port)
    value = '\\"' * 1024    # 1024 octets, each escaped: 2048 on the wire
    pairs = " ".join('"%s" "%s"' % ("f%02d" % i + "x" * 27, value)
                     for i in range(30))
    assert len("i ID (%s)" % pairs) > 60000
    assert c.cmd("i", "ID (%s)" % pairs) == ["* ID NIL", "i OK ID completed."]
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    assert c.cmd("n", "NOOP")[-1].startswith("n OK")
    c.cmd("z", "LOGOUT")
    c.close()
    session = re.search(r"session=([0-9a-f]{12})",
                        f.wait_log("reason=logout")).group(1)
    wait_for(lambda: session in trusting_dovecot.log_text(), 10 * SLOW,
             "Dovecot to log the forwarded ID")
    # a line that long that is not an ID is still too long
    d = Raw(f.port)
    d.send("a NOOP " + "x" * 20000 + "\r\n")
    assert d.line() == "* BYE Command line too long."
    d.close()


def test_client_id_with_8bit_value_still_logs_in(imapfe_factory,
                                                 trusting_dovecot):
    """imapfe passes a non-ASCII ID value on as a synchronizing literal,
    so that ID is awaited rather than pipelined with the login: its "+"
    must not be taken for the login's."""
    f = imapfe_factory(base_config(trusting_dovecot.port))
    f.start_inetd()
    c = Raw(f.port)
    c.send('i ID ("name" "M\u00e4il" "version" "1")\r\n'.encode("utf-8"))
    assert c.until_tagged("i")[-1].startswith("i OK")
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    assert c.cmd("s", "SELECT INBOX")[-1].startswith("s OK")
    c.cmd("z", "LOGOUT")
    c.close()
    f.wait_log("reason=logout")
    wait_for(lambda: "version=1" in trusting_dovecot.log_text(), 10 * SLOW,
             "Dovecot to log the forwarded ID")


def test_pipelined_id_answer_is_not_taken_for_capabilities(imapfe_factory):
    """The ID goes out with the login, unawaited; whatever its answer
    says, the client is told the capabilities the back-end has after
    login, asked for since the login's OK carried none."""
    def answer(conn, tag, cmd, rest):
        if cmd == "ID":
            conn.sendline('* ID ("name" "[CAPABILITY IMAP4rev1 BOGUS1]")')
            conn.sendline(tag + " OK [CAPABILITY IMAP4rev1 BOGUS2] id")
        elif cmd == "AUTHENTICATE":
            conn.sendline(tag + " OK in")
        else:
            return False
        return True

    def script(conn):
        serve_commands(conn, "* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN "
                       "SASL-IR] hi", answer,
                       caps="IMAP4rev1 IDLE POSTLOGIN")
    fake = FakeBackend(script)
    try:
        f = imapfe_factory(base_config(fake.port))
        f.start_inetd()
        c = Raw(f.port)
        ok = c.cmd("a", "LOGIN alice secret")[-1]
        assert ok.startswith("a OK [CAPABILITY ") and "POSTLOGIN" in ok
        assert "BOGUS" not in ok
        c.cmd("z", "LOGOUT")
        c.close()
        # one segment: the ID and the login arrived together
        sent = bytes(fake.received[0])
        assert b" ID (" in sent and b" AUTHENTICATE PLAIN " in sent
    finally:
        fake.close()


def test_proxy_ttl_from_client_stops_a_loop(imapfe_factory, dovecot):
    f = imapfe_factory(base_config(dovecot.port))
    f.start_inetd()
    c = Raw(f.port)
    assert c.cmd("i", 'ID ("x-proxy-ttl" "0")')[-1].startswith("i OK")
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith(
        "a NO [UNAVAILABLE]")
    c.cmd("z", "LOGOUT")
    c.close()
    f.wait_log("proxy loop")
