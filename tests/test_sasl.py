"""Cyrus SASL: imapfe authenticating clients itself with libsasl2's server
library (auth proxy) and logging in to real back-ends -- Dovecot with a
master user, Cyrus imapd with proxyservers -- as a proxy identity with the
user as authorization identity; and every way a back-end can fail a login,
in both modes, with the session going on afterwards and leaking nothing.
"""
import base64
import imaplib
import os
import re
import subprocess
import time

import pytest

from conftest import (BIN, SLOW, VALGRIND, Raw, b64, base_config,
                      fill_inbox, wait_for)
from fakebackend import FakeBackend, MisbehavingBackend, serve_commands
from saslbed import (FRONT_MECHS, Cyrus, FrontSasl, MasterDovecot,
                     ScramClient, cram_md5_response, sasldb_add,
                     sasldb_users)

# The users imapfe's own sasldb knows, with passwords unlike the
# back-ends', so that a login that works proves which side checked it.
FRONT_USERS = {"alice": "alice-front-pw", "bob": "bob-front-pw",
               "mallory": "mallory-pw"}
DOVECOT_PROXY_PW = "dovecot-proxy-pw"
CYRUS_PROXY_PW = "cyrus-proxy-pw"
PASSTHROUGH_PW = "pw"          # what mallory offers the fake back-end


def auth_mechs(line):
    m = re.search(r"\[CAPABILITY ([^\]]*)\]", line) or \
        re.match(r"\* CAPABILITY (.*)", line)
    assert m, line
    caps = m.group(1).split()
    return caps, {c[5:] for c in caps if c.upper().startswith("AUTH=")}


def b64d(line):
    """The decoded data of a '+ ...' continuation line."""
    assert line.startswith("+"), line
    return base64.b64decode(line[2:]) if len(line) > 2 else b""


def scram_login(c, tag, mech, user, password, authzid=None, ir=True):
    """One SCRAM exchange over Raw c.  Returns (lines to the tagged one,
    the ScramClient); the client has verified the server's signature when
    .verified is true."""
    sc = ScramClient(mech, user, password, authzid)
    if ir:
        c.send("%s AUTHENTICATE %s %s\r\n" % (tag, mech, b64(sc.first())))
    else:
        c.send("%s AUTHENTICATE %s\r\n" % (tag, mech))
        ln = c.line()
        assert ln in ("+", "+ "), ln
        c.send(b64(sc.first()) + "\r\n")
    ln = c.line()
    if not ln.startswith("+"):
        return [ln] if ln.startswith(tag + " ") else \
            [ln] + c.until_tagged(tag), sc
    c.send(b64(sc.final(b64d(ln))) + "\r\n")
    ln = c.line()
    if ln.startswith("+"):
        # IMAP has no room for additional data with OK: the server
        # signature comes as a continuation, answered with an empty line.
        sc.check(b64d(ln))
        c.send("\r\n")
        return c.until_tagged(tag), sc
    return [ln] if ln.startswith(tag + " ") else \
        [ln] + c.until_tagged(tag), sc


def curl_fetch(port, user, password, mech, index=2):
    """curl fetching message index with one SASL mechanism; returns the
    completed process (stderr holds the protocol, -v)."""
    return subprocess.run(
        ["curl", "-s", "-S", "-v", "--max-time", str(20 * SLOW),
         "--login-options", "AUTH=" + mech, "-u", "%s:%s" % (user, password),
         "imap://127.0.0.1:%d/INBOX;MAILINDEX=%d" % (port, index)],
        capture_output=True, timeout=30 * SLOW)


def is_asan_binary():
    with open(BIN, "rb") as f:
        return b"__asan_init" in f.read()


def vmrss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


# ---------------------------------------------------------------------------
# fixtures

@pytest.fixture
def connect(procs):
    """connect(port) -> a Raw client, closed when the test ends even if it
    fails, before the procs fixture waits for imapfe processes to exit."""
    made = []

    def make(port, timeout=10):
        c = Raw(port, timeout=timeout)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="module")
def master_dovecot():
    """A Dovecot of its own where "proxy" is a master user; alice's INBOX
    holds three messages."""
    d = MasterDovecot({"proxy": DOVECOT_PROXY_PW})
    fill_inbox(d)
    yield d
    d.close()


@pytest.fixture(scope="module")
def cyrus():
    """A real Cyrus imapd: "proxy" may act for anybody (proxyservers),
    "notproxy" may not; alice has no password there at all."""
    c = Cyrus({"proxy": CYRUS_PROXY_PW, "notproxy": "notproxy-pw",
               "admin": "admin-pw"})
    c.watch("alice")
    yield c
    c.close()


@pytest.fixture
def front():
    """imapfe's own SASL configuration and sasldb."""
    sasl = FrontSasl(FRONT_USERS)
    yield sasl
    sasl.close()


@pytest.fixture
def proxy_fe(imapfe_factory, tmp_path, front):
    """make(routes, ...) -> an imapfe in auth proxy mode, started inetd
    style.  routes is a list of (pattern, port)."""
    count = [0]

    def make(routes, proxy_user="proxy", proxy_password=DOVECOT_PROXY_PW,
             extra="", sasl=None, start=True):
        count[0] += 1
        pwfile = os.path.join(str(tmp_path), "proxy-pw-%d" % count[0])
        with open(pwfile, "w") as f:
            f.write(proxy_password + "\n")
        os.chmod(pwfile, 0o600)
        cfg = "".join("route %s 127.0.0.1:%d\n" % r for r in routes)
        cfg += ("auth proxy\n" + (sasl or front).config() +
                "proxy_user %s\nproxy_password_file %s\n"
                "login_timeout %d\n" % (proxy_user, pwfile, 60 * SLOW))
        f = imapfe_factory(cfg + extra, name="proxy%d" % count[0])
        if start:
            f.start_inetd()
        return f
    return make


# ---------------------------------------------------------------------------
# the mechanisms imapfe offers

def test_capabilities_are_the_sasl_configurations(connect, proxy_fe,
                                                  master_dovecot):
    fe = proxy_fe([("*", master_dovecot.port)])
    c = connect(fe.port)
    caps, mechs = auth_mechs(c.greeting)
    assert mechs == set(FRONT_MECHS.split()), c.greeting
    assert "SASL-IR" in caps and "LOGINDISABLED" not in caps
    caps2, mechs2 = auth_mechs(c.cmd("a", "CAPABILITY")[0])
    assert mechs2 == mechs
    c.close()


def test_sasl_service_name_and_mech_list_are_honoured(
        connect, proxy_fe, request, master_dovecot):
    sasl = FrontSasl(FRONT_USERS, service="imapfe-test",
                     mechs="SCRAM-SHA-256 PLAIN")
    request.addfinalizer(sasl.close)
    fe = proxy_fe([("*", master_dovecot.port)], sasl=sasl)
    c = connect(fe.port)
    assert auth_mechs(c.greeting)[1] == {"PLAIN", "SCRAM-SHA-256"}
    # A mechanism the configuration leaves out is refused.
    lines = c.cmd("a", "AUTHENTICATE CRAM-MD5")
    assert lines[-1].startswith("a NO"), lines
    lines, sc = scram_login(c, "b", "SCRAM-SHA-256", "alice",
                            FRONT_USERS["alice"])
    assert lines[-1].startswith("b OK"), lines
    assert sc.verified
    c.close()


def test_without_plaintext_only_non_plaintext_mechanisms(connect, proxy_fe,
                                                         master_dovecot):
    fe = proxy_fe([("*", master_dovecot.port)], extra="plaintext_auth no\n")
    c = connect(fe.port)
    caps, mechs = auth_mechs(c.greeting)
    assert "PLAIN" not in mechs and "LOGIN" not in mechs, c.greeting
    assert {"CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-1",
            "SCRAM-SHA-256"} <= mechs, c.greeting
    assert "LOGINDISABLED" in caps
    lines = c.cmd("a", "LOGIN alice " + FRONT_USERS["alice"])
    assert lines[-1].startswith("a NO"), lines
    lines = c.cmd("b", "AUTHENTICATE PLAIN " +
                  b64("\0alice\0" + FRONT_USERS["alice"]))
    assert lines[-1].startswith("b NO"), lines
    # SCRAM sends no password, so it is fine without TLS.
    lines, sc = scram_login(c, "c", "SCRAM-SHA-1", "alice",
                            FRONT_USERS["alice"])
    assert lines[-1].startswith("c OK") and sc.verified, lines
    assert c.cmd("d", "SELECT INBOX")[-1].startswith("d OK")
    c.close()


# ---------------------------------------------------------------------------
# clients logging in, and the back-end session being the user's

def test_plain_with_imaplib_reaches_alices_mailbox(proxy_fe, master_dovecot):
    fe = proxy_fe([("*", master_dovecot.port)])
    m = imaplib.IMAP4("127.0.0.1", fe.port)
    typ, _ = m.authenticate(
        "PLAIN", lambda _: b"\0alice\0" + FRONT_USERS["alice"].encode())
    assert typ == "OK"
    typ, data = m.select("INBOX")
    assert typ == "OK" and int(data[0]) >= 3
    typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: test 1" in data[0][1]
    assert m.create("MadeThroughImapfe")[0] == "OK"
    m.logout()
    # The folder is alice's: she sees it logging in to Dovecot herself.
    d = master_dovecot.imap("alice")
    assert any(b"MadeThroughImapfe" in ln for ln in d.list()[1])
    d.delete("MadeThroughImapfe")
    d.logout()
    wait_for(lambda: "Master user logging in as alice" in
             master_dovecot.log_text(), 10, "dovecot's master login line")
    log = fe.wait_log("reason=logout")
    assert 'event=login user="alice" method=PLAIN' in log
    assert FRONT_USERS["alice"] not in log
    assert DOVECOT_PROXY_PW not in log


def test_login_command_is_checked_against_sasldb(connect, proxy_fe,
                                                 master_dovecot):
    fe = proxy_fe([("*", master_dovecot.port)],
                  extra="max_login_failures 10\n")
    c = connect(fe.port)
    # Dovecot's own password for alice is no good at the front.
    assert c.cmd("a", "LOGIN alice secret")[-1] == \
        "a NO [AUTHENTICATIONFAILED] Authentication failed."
    assert c.cmd("b", "LOGIN nosuchuser secret")[-1] == \
        "b NO [AUTHENTICATIONFAILED] Authentication failed."
    lines = c.cmd("c", "LOGIN alice " + FRONT_USERS["alice"])
    assert lines[-1].startswith("c OK [CAPABILITY"), lines
    assert "AUTH=" not in lines[-1]
    lines = c.cmd("d", "SELECT INBOX")
    assert lines[-1].startswith("d OK"), lines
    assert any(re.match(r"\* [3-9]\d* EXISTS", ln) for ln in lines)
    c.cmd("z", "LOGOUT")
    c.close()
    log = fe.wait_log("reason=logout")
    assert 'event=login user="alice" method=LOGIN' in log


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5",
                                  "DIGEST-MD5"])
def test_curl_with_each_mechanism(connect, proxy_fe, master_dovecot, mech):
    fe = proxy_fe([("*", master_dovecot.port)])
    probe = connect(fe.port)
    offered = auth_mechs(probe.greeting)[1]
    probe.close()
    if mech not in offered:
        pytest.skip("this libsasl2 build does not offer " + mech)
    out = curl_fetch(fe.port, "alice", FRONT_USERS["alice"], mech)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert b"Subject: test 2" in out.stdout
    # curl really used that mechanism.
    assert re.search(rb"> A\d+ AUTHENTICATE " + mech.encode(), out.stderr), \
        out.stderr.decode(errors="replace")
    bad = curl_fetch(fe.port, "alice", "wrong-pw", mech)
    assert bad.returncode != 0
    assert b"Subject" not in bad.stdout
    log = fe.wait_log('event=login user="alice" method=' + mech)
    assert "wrong-pw" not in log


def test_cram_md5_with_imaplib_and_by_hand(connect, proxy_fe, master_dovecot):
    fe = proxy_fe([("*", master_dovecot.port)])
    m = imaplib.IMAP4("127.0.0.1", fe.port)
    assert m.login_cram_md5("bob", FRONT_USERS["bob"])[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    c = connect(fe.port)
    c.send("a AUTHENTICATE CRAM-MD5\r\n")
    chal = b64d(c.line())
    assert re.match(rb"<[^>]+@[^>]+>$", chal), chal
    c.send(b64(cram_md5_response("bob", "wrong", chal)) + "\r\n")
    assert c.line() == "a NO [AUTHENTICATIONFAILED] Authentication failed."
    c.close()


@pytest.mark.parametrize("ir", [True, False], ids=["sasl-ir", "no-ir"])
@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_scram_with_server_signature_verified(connect, proxy_fe,
                                              master_dovecot, mech, ir):
    fe = proxy_fe([("*", master_dovecot.port)],
                  extra="max_login_failures 10\n")
    c = connect(fe.port)
    lines, sc = scram_login(c, "w", mech, "alice", "not-her-password", ir=ir)
    assert lines[-1] == "w NO [AUTHENTICATIONFAILED] Authentication failed."
    assert not sc.verified
    lines, sc = scram_login(c, "a", mech, "alice", FRONT_USERS["alice"],
                            ir=ir)
    assert lines[-1].startswith("a OK [CAPABILITY"), lines
    assert sc.verified
    assert c.cmd("b", "SELECT INBOX")[-1].startswith("b OK")
    c.cmd("z", "LOGOUT")
    c.close()
    fe.wait_log('event=login user="alice" method=' + mech)


def test_cancel_and_malformed_base64_get_bad(connect, proxy_fe,
                                             master_dovecot):
    fe = proxy_fe([("*", master_dovecot.port)])
    c = connect(fe.port)
    c.send("a AUTHENTICATE PLAIN\r\n")
    assert c.line() in ("+", "+ ")
    c.send("*\r\n")
    assert c.line().startswith("a BAD")
    # Cancelled in the middle of SCRAM, after the server-first.
    sc = ScramClient("SCRAM-SHA-256", "alice", FRONT_USERS["alice"])
    c.send("b AUTHENTICATE SCRAM-SHA-256 %s\r\n" % b64(sc.first()))
    assert c.line().startswith("+ ")
    c.send("*\r\n")
    assert c.line().startswith("b BAD")
    c.send("c AUTHENTICATE CRAM-MD5\r\n")
    assert c.line().startswith("+ ")
    c.send("!!not base64!!\r\n")
    assert c.line().startswith("c BAD")
    assert c.cmd("d", "AUTHENTICATE PLAIN A===")[-1].startswith("d BAD")
    assert c.cmd("e", "AUTHENTICATE SCRAM-SHA-1 %%%")[-1].startswith(
        "e BAD")
    assert c.cmd("f", "AUTHENTICATE NO-SUCH-MECH")[-1].startswith("f NO")
    # None of it counted as a failed login (default limit 3) or ended the
    # session.
    lines = c.cmd("g", "LOGIN alice " + FRONT_USERS["alice"])
    assert lines[-1].startswith("g OK"), lines
    c.close()


def test_authorization_identity_of_another_user_is_refused(connect, proxy_fe,
                                                           master_dovecot):
    fe = proxy_fe([("*", master_dovecot.port)],
                  extra="max_login_failures 10\n")
    c = connect(fe.port)
    pw = FRONT_USERS["alice"]
    lines = c.cmd("a", "AUTHENTICATE PLAIN " + b64("bob\0alice\0" + pw))
    assert lines[-1].startswith("a NO"), lines
    lines, sc = scram_login(c, "b", "SCRAM-SHA-256", "alice", pw,
                            authzid="bob")
    assert lines[-1].startswith("b NO"), lines
    # Asking for oneself is no proxying at all.
    lines = c.cmd("c", "AUTHENTICATE PLAIN " + b64("alice\0alice\0" + pw))
    assert lines[-1].startswith("c OK"), lines
    c.close()
    log = fe.log_text()
    assert 'event=login user="alice"' in log
    assert 'event=login user="bob"' not in log


def test_user_in_a_realm(connect, proxy_fe, front, master_dovecot):
    """A sasldb user made with -u example.org logs in as dave@example.org,
    and that is the name routed and handed on as authorization identity."""
    sasldb_add(front.sasldb, {"dave": "dave-pw"}, realm="example.org")
    assert any(ln.startswith("dave@example.org:")
               for ln in sasldb_users(front.sasldb))
    rec = {}
    fake = FakeBackend(lambda conn: _accepting_backend(conn, rec))
    try:
        fe = proxy_fe([("*@example.org", fake.port),
                       ("*", master_dovecot.port)])
        c = connect(fe.port)
        lines = c.cmd("a", "LOGIN dave@example.org dave-pw")
        assert lines[-1].startswith("a OK"), lines
        c.cmd("z", "LOGOUT")
        c.close()
        assert rec["plain"] == b"dave@example.org\0proxy\0" + \
            DOVECOT_PROXY_PW.encode()
    finally:
        fake.close()


def _accepting_backend(conn, rec, caps="IMAP4rev1 SASL-IR AUTH=PLAIN"):
    """Accept any AUTHENTICATE PLAIN, keeping its decoded message."""
    def answer(conn, tag, cmd, rest):
        rec.setdefault("commands", []).append(tag + " " + rest)
        words = rest.split(" ")
        mech = words[1].upper() if cmd == "AUTHENTICATE" else None
        if mech == "PLAIN":
            data = words[2] if len(words) > 2 else None
            if data is None:
                conn.sendline("+ ")
                data = conn.line()
            rec["plain"] = base64.b64decode(data)
        elif mech == "LOGIN":
            conn.sendline("+ VXNlcm5hbWU6")
            rec["login-user"] = base64.b64decode(conn.line())
            conn.sendline("+ UGFzc3dvcmQ6")
            conn.line()
        elif mech == "CRAM-MD5":
            conn.sendline("+ " + b64("<1896.697170952@fake.test>"))
            rec["cram-user"] = base64.b64decode(conn.line()).split(b" ")[0]
        elif mech is not None:
            conn.sendline(tag + " NO unsupported mechanism")
            return True
        elif cmd == "LOGIN":
            rec["login-command"] = tag + " " + rest
        else:
            return False
        conn.sendline(tag + " OK [CAPABILITY IMAP4rev1 IDLE] in")
        return True

    serve_commands(conn, "* OK [CAPABILITY %s] fake ready" % caps, answer,
                   caps, other="OK done")


def test_backend_gets_proxy_identity_and_never_the_users_password(
        connect, proxy_fe, master_dovecot):
    rec = {}
    fake = FakeBackend(lambda conn: _accepting_backend(conn, rec))
    try:
        fe = proxy_fe([("mallory", fake.port), ("*", master_dovecot.port)],
                      proxy_password="fake-proxy-pw")
        c = connect(fe.port)
        lines = c.cmd("a", "LOGIN mallory " + FRONT_USERS["mallory"])
        assert lines[-1].startswith("a OK"), lines
        c.cmd("z", "LOGOUT")
        c.close()
        wait_for(lambda: len(fake.received) == 1 and
                 b"LOGOUT" in bytes(fake.received[0]), 10, "the LOGOUT")
        assert rec["plain"] == b"mallory\0proxy\0fake-proxy-pw"
        sent = bytes(fake.received[0])
        pw = FRONT_USERS["mallory"].encode()
        assert pw not in sent and base64.b64encode(pw) not in sent
        assert "login-command" not in rec
    finally:
        fake.close()


def _mallory_to(fake, connect, imapfe_factory, dovecot):
    """imapfe as inetd starts it, mallory routed to the fake back-end and
    everyone else to Dovecot; and a client connected to it."""
    f = imapfe_factory("route mallory 127.0.0.1:%d\n" % fake.port +
                       base_config(dovecot.port))
    f.start_inetd()
    return f, connect(f.port)


@pytest.mark.parametrize("caps", ["IMAP4rev1 SASL-IR AUTH=PLAIN",
                                  "IMAP4rev1 AUTH=PLAIN"])
def test_plain_with_and_without_sasl_ir(connect, imapfe_factory, dovecot,
                                        caps):
    """imapfe writes PLAIN itself: in the AUTHENTICATE line where the
    back-end offers SASL-IR, else as the answer to its empty challenge;
    either way the message of RFC 4616, with no authorization identity in
    passthrough mode."""
    rec = {}
    fake = FakeBackend(lambda conn: _accepting_backend(conn, rec, caps))
    try:
        f, c = _mallory_to(fake, connect, imapfe_factory, dovecot)
        lines = c.cmd("a", "LOGIN mallory " + PASSTHROUGH_PW)
        assert lines[-1].startswith("a OK"), lines
        c.cmd("z", "LOGOUT")
        c.close()
        wait_for(lambda: "plain" in rec, 10, "the PLAIN message")
        assert rec["plain"] == b"\0mallory\0" + PASSTHROUGH_PW.encode()
        auth = [cmd for cmd in rec["commands"] if " AUTHENTICATE " in cmd]
        assert len(auth) == 1, rec
        if "SASL-IR" in caps:
            assert auth[0].split(" ")[1:3] == ["AUTHENTICATE", "PLAIN"] and \
                len(auth[0].split(" ")) == 4, auth
        else:
            assert auth[0].split(" ", 1)[1] == "AUTHENTICATE PLAIN", auth
    finally:
        fake.close()


def _challenging_backend(conn, rec):
    """Send PLAIN a challenge with data, which PLAIN has none of, and keep
    what comes back."""
    def answer(conn, tag, cmd, rest):
        if cmd != "AUTHENTICATE":
            return False
        conn.sendline("+ " + b64("what is this"))
        rec["after"] = conn.line()
        conn.sendline(tag + " BAD cancelled")
        return True

    serve_commands(conn, "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake ready",
                   answer, "IMAP4rev1 AUTH=PLAIN", other="OK done")


def test_plain_challenge_with_data_is_cancelled(connect, imapfe_factory,
                                                dovecot):
    """A challenge PLAIN cannot have is cancelled ("*"), never answered
    with the password; the client hears UNAVAILABLE, the log says why, and
    the session goes on to log in elsewhere."""
    rec = {}
    fake = FakeBackend(lambda conn: _challenging_backend(conn, rec))
    try:
        f, c = _mallory_to(fake, connect, imapfe_factory, dovecot)
        lines = c.cmd("a", "LOGIN mallory " + PASSTHROUGH_PW)
        assert lines[-1].startswith("a NO [UNAVAILABLE]"), lines
        wait_for(lambda: "after" in rec, 10, "the answer to the challenge")
        assert rec["after"] == "*", rec
        lines = c.cmd("b", "LOGIN alice secret")
        assert lines[-1].startswith("b OK"), lines
        c.cmd("z", "LOGOUT")
        c.close()
        log = f.wait_log("reason=logout")
        assert "unexpected challenge to PLAIN" in log, log
        sent = b"".join(bytes(r) for r in fake.received)
        assert base64.b64encode(b"\0mallory\0" +
                                PASSTHROUGH_PW.encode()) not in sent
    finally:
        fake.close()


@pytest.mark.parametrize("caps", ["IMAP4rev1", "IMAP4rev1 AUTH=LOGIN",
                                  "IMAP4rev1 AUTH=CRAM-MD5 LOGINDISABLED"])
def test_proxy_mode_never_logs_in_without_the_authzid(connect, proxy_fe,
                                                      master_dovecot, caps):
    """A back-end offering no mechanism that carries an authorization
    identity must not be logged in to as the proxy user itself (that would
    give the client the proxy user's mailbox): the LOGIN command, the LOGIN
    mechanism and CRAM-MD5 cannot carry one."""
    rec = {}
    fake = FakeBackend(lambda conn: _accepting_backend(conn, rec, caps))
    try:
        fe = proxy_fe([("mallory", fake.port), ("*", master_dovecot.port)],
                      extra="backend_mechanisms \"SCRAM-SHA-256 SCRAM-SHA-1 "
                      "PLAIN LOGIN CRAM-MD5\"\n")
        c = connect(fe.port)
        lines = c.cmd("a", "LOGIN mallory " + FRONT_USERS["mallory"])
        assert lines[-1].startswith("a NO [UNAVAILABLE]"), (lines, rec)
        assert not {"login-command", "login-user", "cram-user"} & set(rec), \
            rec
        # The same session then logs in where the proxy identity works.
        lines = c.cmd("b", "LOGIN alice " + FRONT_USERS["alice"])
        assert lines[-1].startswith("b OK"), lines
        c.close()
        fe.wait_log('event=login-failed user="mallory"')
    finally:
        fake.close()


# ---------------------------------------------------------------------------
# real back-ends refusing the proxy identity

def test_dovecot_refusing_the_proxy_password(connect, proxy_fe,
                                             master_dovecot):
    fe = proxy_fe([("*", master_dovecot.port)],
                  proxy_password="not-the-master-password",
                  extra="max_login_failures 10\n")
    c = connect(fe.port)
    for tag in ("a", "b"):
        lines = c.cmd(tag, "LOGIN alice " + FRONT_USERS["alice"])
        assert lines[-1].startswith(tag + " NO [UNAVAILABLE]"), lines
    c.close()
    log = fe.wait_log('event=login-failed user="alice"')
    assert re.search(r'event=login-failed user="alice" .*reason="', log)
    assert "not-the-master-password" not in log


def test_dovecot_refusing_a_proxy_user_without_master_rights(
        connect, proxy_fe, master_dovecot):
    # bob's password is right, but bob may not act for alice.
    fe = proxy_fe([("*", master_dovecot.port)], proxy_user="bob",
                  proxy_password="hunter2")
    c = connect(fe.port)
    lines = c.cmd("a", "LOGIN alice " + FRONT_USERS["alice"])
    assert lines[-1].startswith("a NO [UNAVAILABLE]"), lines
    c.close()
    fe.wait_log('event=login-failed user="alice"')


@pytest.fixture(scope="module")
def scram_dovecot():
    """A master-user Dovecot that also offers SCRAM."""
    d = MasterDovecot({"proxy": DOVECOT_PROXY_PW},
                      mechs="plain login scram-sha-1 scram-sha-256")
    yield d
    d.close()


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_bed_scram_client_verifies_dovecot(scram_dovecot, mech):
    """The test bed's SCRAM client against Dovecot directly: it logs in,
    checks the server's signature, and would notice a forged one."""
    c = Raw(scram_dovecot.port)
    try:
        lines, sc = scram_login(c, "a", mech, "bob", "hunter2")
        assert lines[-1].startswith("a OK"), lines
        assert sc.verified
    finally:
        c.close()
    forged = ScramClient(mech, "bob", "hunter2")
    forged.server_signature = b"\0" * 32
    with pytest.raises(AssertionError):
        forged.check(b"v=" + base64.b64encode(b"\1" * 32))


def test_dovecot_offering_scram_with_backend_mechanisms_plain(
        connect, proxy_fe, scram_dovecot):
    """Dovecot 2.3 refuses an authorization identity in SCRAM (NO
    [AUTHORIZATIONFAILED] for a master user), so in front of a Dovecot
    that offers SCRAM, proxy mode is configured to use PLAIN."""
    fe = proxy_fe([("*", scram_dovecot.port)],
                  extra="backend_mechanisms PLAIN\n")
    c = connect(fe.port)
    lines, sc = scram_login(c, "a", "SCRAM-SHA-256", "alice",
                            FRONT_USERS["alice"])
    assert lines[-1].startswith("a OK"), lines
    assert c.cmd("b", "SELECT INBOX")[-1].startswith("b OK")
    c.close()
    wait_for(lambda: "Master user logging in as alice" in
             scram_dovecot.log_text(), 10, "dovecot's master login line")


# ---------------------------------------------------------------------------
# Cyrus imapd as back-end

@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
def test_cyrus_session_is_alices(connect, proxy_fe, cyrus, mech):
    fe = proxy_fe([("*", cyrus.port)], proxy_password=CYRUS_PROXY_PW,
                  extra="backend_mechanisms %s\n" % mech)
    c = connect(fe.port)
    lines, sc = scram_login(c, "a", "SCRAM-SHA-256", "alice",
                            FRONT_USERS["alice"])
    assert lines[-1].startswith("a OK [CAPABILITY"), lines
    assert sc.verified
    lines = c.cmd("b", "SELECT INBOX")
    assert lines[-1].startswith("b OK"), lines
    box = "ViaImapfe" + mech.replace("-", "")
    assert c.cmd("c", "CREATE " + box)[-1].startswith("c OK")
    lines = c.cmd("d", "NAMESPACE")
    assert lines[-1].startswith("d OK"), lines
    c.cmd("z", "LOGOUT")
    c.close()
    # Cyrus put the folder under alice, and recorded the session as hers.
    assert "user/alice/" + box in cyrus.mailboxes()
    text = wait_for(lambda: (lambda t: t if "CREATE " + box in t else None)(
        cyrus.telemetry("alice")), 10, "cyrus telemetry")
    assert "---------- alice " in text
    fe.wait_log('event=login user="alice" method=SCRAM-SHA-256')


def test_cyrus_refusing_a_proxy_user_not_in_proxyservers(connect, proxy_fe,
                                                         cyrus):
    before = cyrus.telemetry("alice")
    fe = proxy_fe([("*", cyrus.port)], proxy_user="notproxy",
                  proxy_password="notproxy-pw")
    c = connect(fe.port)
    lines = c.cmd("a", "LOGIN alice " + FRONT_USERS["alice"])
    assert lines[-1].startswith("a NO [UNAVAILABLE]"), lines
    c.close()
    log = fe.wait_log('event=login-failed user="alice"')
    assert re.search(r'event=login-failed user="alice" .*reason="', log)
    assert cyrus.telemetry("alice") == before


def test_cyrus_refusal_then_dovecot_in_the_same_session(
        connect, proxy_fe, cyrus, master_dovecot):
    """The proxy password is Dovecot's master password: Cyrus refuses it,
    Dovecot takes it, in one session."""
    fe = proxy_fe([("mallory", cyrus.port), ("*", master_dovecot.port)],
                  extra="max_login_failures 10\n")
    c = connect(fe.port)
    for tag in ("a", "b"):
        lines = c.cmd(tag, "LOGIN mallory " + FRONT_USERS["mallory"])
        assert lines[-1].startswith(tag + " NO [UNAVAILABLE]"), lines
    lines, sc = scram_login(c, "c", "SCRAM-SHA-1", "alice",
                            FRONT_USERS["alice"])
    assert lines[-1].startswith("c OK"), lines
    assert c.cmd("d", "SELECT INBOX")[-1].startswith("d OK")
    c.close()


# ---------------------------------------------------------------------------
# back-ends failing the login, every way

# What the client hears in passthrough mode; in proxy mode it is always
# UNAVAILABLE, since the client's own credentials were already good.
FAILURES = {
    "reject": "AUTHENTICATIONFAILED",
    "nomech": "UNAVAILABLE",
    "badbase64": "UNAVAILABLE",
    "badscram": "UNAVAILABLE",
    "longline": "UNAVAILABLE",
    "close": "UNAVAILABLE",
    "silent": "UNAVAILABLE",
    "earlyok": "UNAVAILABLE",
    "earlyok-final": "UNAVAILABLE",
    "badsignature": "UNAVAILABLE",
    "bye": "UNAVAILABLE",
}
SCRAM_KINDS = ("badbase64", "badscram", "earlyok", "earlyok-final",
               "badsignature")
# Long enough for Dovecot's answers in the same session, short enough for
# the "silent" back-end: each of its two attempts waits this long.
BACKEND_TIMEOUT = max(2, SLOW)


def _check_failure_record(kind, rec):
    cmds = [ln.split(" ", 2)[1].upper() for ln in rec.get("commands", [])
            if " " in ln]
    if kind == "nomech":
        # Nothing was tried: no LOGIN, no AUTHENTICATE.
        assert "LOGIN" not in cmds and "AUTHENTICATE" not in cmds, rec
    else:
        assert "AUTHENTICATE" in cmds, rec
    if kind in SCRAM_KINDS:
        assert rec["mech"] == "SCRAM-SHA-256", rec
    if kind == "badsignature":
        # imapfe did not answer the forged server signature as if it were
        # good.
        assert rec.get("after", [""])[:1] != [""], rec


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_passthrough_backend_failure_then_dovecot(connect, imapfe_factory,
                                                  dovecot, kind):
    fake = MisbehavingBackend(kind, password=PASSTHROUGH_PW)
    try:
        f = imapfe_factory(
            "route mallory 127.0.0.1:%d\n" % fake.port +
            base_config(dovecot.port, "backend_timeout %d\n"
                        "max_login_failures 1000\n" % BACKEND_TIMEOUT))
        f.start_inetd()
        c = connect(f.port, timeout=30)
        want = FAILURES[kind]
        for tag in ("a", "b"):
            start = time.monotonic()
            lines = c.cmd(tag, "LOGIN mallory " + PASSTHROUGH_PW)
            took = time.monotonic() - start
            assert lines[-1].startswith("%s NO [%s]" % (tag, want)), \
                (lines, fake.records)
            if kind == "silent":
                assert BACKEND_TIMEOUT - 0.5 <= took < \
                    BACKEND_TIMEOUT + 10 * SLOW, took
        lines = c.cmd("c", "LOGIN alice secret")
        assert lines[-1].startswith("c OK [CAPABILITY"), lines
        assert c.cmd("d", "SELECT INBOX")[-1].startswith("d OK")
        c.cmd("z", "LOGOUT")
        c.close()
        wait_for(lambda: len(fake.records) == 2, 10, "two connections")
        for rec in fake.records:
            _check_failure_record(kind, rec)
        log = f.wait_log("reason=logout")
        assert log.count('event=login-failed user="mallory"') == 2, log
        assert re.search(r'event=login-failed user="mallory" method=LOGIN '
                         r'backend=127\.0\.0\.1:%d reason="[^"]+"'
                         % fake.port, log), log
    finally:
        fake.close()


@pytest.mark.parametrize("kind", ["reject", "nomech", "longline", "close",
                                  "silent", "earlyok", "earlyok-final",
                                  "badsignature", "bye"])
def test_proxy_backend_failure_then_dovecot(connect, proxy_fe, master_dovecot,
                                            kind):
    # The fake checks SCRAM proofs against the same proxy password that
    # Dovecot's master user has, so one configuration serves both routes.
    fake = MisbehavingBackend(kind, password=DOVECOT_PROXY_PW)
    try:
        fe = proxy_fe([("mallory", fake.port), ("*", master_dovecot.port)],
                      extra="backend_timeout %d\nmax_login_failures 1000\n"
                      % BACKEND_TIMEOUT)
        c = connect(fe.port, timeout=30)
        for tag in ("a", "b"):
            lines = c.cmd(tag, "LOGIN mallory " + FRONT_USERS["mallory"])
            assert lines[-1].startswith(tag + " NO [UNAVAILABLE]"), \
                (lines, fake.records)
        lines = c.cmd("c", "LOGIN alice " + FRONT_USERS["alice"])
        assert lines[-1].startswith("c OK"), lines
        assert c.cmd("d", "SELECT INBOX")[-1].startswith("d OK")
        c.cmd("z", "LOGOUT")
        c.close()
        wait_for(lambda: len(fake.records) == 2, 10, "two connections")
        for rec in fake.records:
            _check_failure_record(kind, rec)
            if rec.get("mech") == "PLAIN":
                assert rec["initial"] == ("mallory\0proxy\0" +
                                          DOVECOT_PROXY_PW).encode()
            elif "initial" in rec:      # SCRAM client-first: authzid
                assert rec["initial"].startswith(b"n,a=mallory,n=proxy,")
        log = fe.wait_log("reason=logout")
        assert log.count('event=login-failed user="mallory"') == 2, log
        assert 'event=login user="alice"' in log
    finally:
        fake.close()


# ---------------------------------------------------------------------------
# a thousand failures in one session leak nothing

# The quick ways to fail (not "silent", which waits for backend_timeout).
LEAK_KINDS = ["reject", "nomech", "badbase64", "badscram", "longline",
              "close", "earlyok", "earlyok-final", "badsignature", "bye"]
# A thousand rounds take about 2 s natively; under valgrind 200 take
# about 10 s in passthrough mode and, in proxy mode, where every third
# round also runs two SCRAM exchanges at the front (PBKDF2, 4096 rounds of
# HMAC in libsasl2, which valgrind slows about 50 times), about 40 s.
# memcheck finds a leak of any size in one round; what only a thousand
# rounds show, memory that grows while still reachable, is the RSS check
# of the native and sanitized runs.
LEAK_ROUNDS = {mode: 200 if VALGRIND else 1000
               for mode in ("passthrough", "proxy")}


@pytest.mark.parametrize("mode", ["passthrough", "proxy"])
def test_thousand_backend_failures_leak_nothing(connect, imapfe_factory,
                                                proxy_fe, procs, dovecot,
                                                master_dovecot, mode):
    fake = MisbehavingBackend("reject")
    try:
        if mode == "passthrough":
            fake.password = PASSTHROUGH_PW
            f = imapfe_factory(
                "route mallory 127.0.0.1:%d\n" % fake.port +
                "route * 127.0.0.1:%d\n" % dovecot.port +
                "login_timeout 3600\nbackend_timeout %d\n"
                "max_login_failures 100000\n" % (10 * SLOW))
            f.start_inetd()
            login = "LOGIN mallory " + PASSTHROUGH_PW
            final = "LOGIN alice secret"
        else:
            fake.password = DOVECOT_PROXY_PW
            f = proxy_fe([("mallory", fake.port),
                          ("*", master_dovecot.port)],
                         extra="login_timeout 3600\nbackend_timeout %d\n"
                         "max_login_failures 100000\n" % (10 * SLOW))
            login = "LOGIN mallory " + FRONT_USERS["mallory"]
            final = "LOGIN alice " + FRONT_USERS["alice"]
        before = len(procs.procs)
        c = connect(f.port, timeout=30)
        wait_for(lambda: len(procs.procs) == before + 1, 10,
                 "the session's process")
        pid = procs.procs[-1].pid
        rss = {}
        rounds = LEAK_ROUNDS[mode]
        for i in range(1, rounds + 1):
            kind = LEAK_KINDS[i % len(LEAK_KINDS)]
            fake.kind = kind
            tag = "t%d" % i
            want = FAILURES[kind] if mode == "passthrough" else \
                "UNAVAILABLE"
            if mode == "proxy" and i % 3 == 0:
                # The front's SASL server too: SCRAM, then a wrong password.
                lines, sc = scram_login(c, tag, "SCRAM-SHA-256", "mallory",
                                        FRONT_USERS["mallory"])
                assert sc.verified
                wl, _ = scram_login(c, tag + "w", "SCRAM-SHA-1", "mallory",
                                    "wrong")
                assert wl[-1].startswith(tag + "w NO [AUTHENTICATIONF"), wl
            else:
                lines = c.cmd(tag, login)
            assert lines[-1].startswith("%s NO [%s]" % (tag, want)), \
                (i, kind, lines)
            if i in (10, rounds):
                rss[i] = vmrss_kib(pid)
        lines = c.cmd("ok", final)
        assert lines[-1].startswith("ok OK"), lines
        assert c.cmd("s", "SELECT INBOX")[-1].startswith("s OK")
        c.cmd("z", "LOGOUT")
        c.close()
        assert len(fake.records) >= rounds
        # valgrind's own memory and ASan's quarantine make RSS meaningless
        # there; memcheck and LeakSanitizer judge the process at exit (the
        # procs fixture fails the test on any report).
        if not VALGRIND and not is_asan_binary():
            growth = rss[rounds] - rss[10]
            assert growth <= 64, \
                "VmRSS grew by %d KiB from failure 10 to %d (%s)" % (
                    growth, rounds, rss)
        f.wait_log("reason=logout")
    finally:
        fake.close()


# ---------------------------------------------------------------------------
# configuration

@pytest.mark.parametrize("text,word", [
    ("auth proxy\n", "proxy_user"),
    ("auth proxy\nproxy_user proxy\n", "proxy_password_file"),
    ("auth proxy\nproxy_user proxy\nproxy_password_file /nonexistent/pw\n",
     "/nonexistent/pw"),
    ("auth sideways\n", "sideways"),
])
def test_bad_proxy_configuration_is_refused(tmp_path, text, word):
    conf = tmp_path / "c.conf"
    conf.write_text("route * 127.0.0.1:143\n" + text)
    r = subprocess.run([BIN, "-t", "-f", str(conf)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert word in r.stderr, r.stderr
