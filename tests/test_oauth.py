"""OAuth 2.0 bearer tokens through imapfe (issue 17): AUTHENTICATE
OAUTHBEARER (RFC 7628) and XOAUTH2 from clients, passed on to a real
Dovecot that checks the token with its oauth2 passdb.

Dovecot asks a small token-introspection endpoint (RFC 7662) that this
module runs on loopback: it knows which user each token belongs to and
which tokens have expired, and answers {"active": false} for any other
(a wrongly signed or made-up one).  A second Dovecot, with the same
passdb, is the public-folder server of the routed tests.
"""
import base64
import itertools
import json
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs

import pytest

from conftest import OPEN_CLIENTS as _clients
from fakebackend import FakeBackend, serve_commands
from conftest import (SLOW, VALGRIND, Dovecot, Raw, base_config, fill_inbox,
                      free_port, wait_for)
from test_public import (PREFIX, home_conf, make_public_folder, public_conf,
                         public_config)
from test_sasl import is_asan_binary, vmrss_kib
from test_tls import client_ctx, fe_config, start_fe

ALICE = secrets.token_urlsafe(48)
BOB = secrets.token_urlsafe(48)
EXPIRED = secrets.token_urlsafe(48)          # alice's, but past its exp
FORGED = secrets.token_urlsafe(48)           # nobody issued it
TOKENS = {ALICE: ("alice", 4102444800), BOB: ("bob", 4102444800),
          EXPIRED: ("alice", 946684800)}
ALL_TOKENS = (ALICE, BOB, EXPIRED, FORGED)

MECHS = ("OAUTHBEARER", "XOAUTH2")
# What each mechanism's client sends after an error challenge.
DUMMY = {"OAUTHBEARER": "AQ==", "XOAUTH2": ""}


class Introspection(BaseHTTPRequestHandler):
    """RFC 7662 token introspection, as Dovecot's "post" mode asks it."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        token = parse_qs(body.decode()).get("token", [""])[0]
        user, exp = TOKENS.get(token, (None, 0))
        active = user is not None and exp > time.time()
        reply = json.dumps({"active": True, "username": user, "exp": exp}
                           if active else {"active": False}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def introspection():
    srv = HTTPServer(("127.0.0.1", 0), Introspection)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_port
    srv.shutdown()
    srv.server_close()
    t.join()


def oauth_conf(port, more=None):
    """Dovecot's oauth2 passdb against the endpoint on port, besides its
    passwd-file, with refusals undelayed; loopback is a trusted network,
    as imapfe's address would be."""
    def conf(d):
        path = os.path.join(d, "oauth2.conf.ext")
        with open(path, "w") as f:
            f.write("introspection_mode = post\n"
                    "introspection_url = http://127.0.0.1:%d/introspect\n"
                    "force_introspection = yes\n"
                    "username_attribute = username\n"
                    "active_attribute = active\n"
                    "active_value = true\n" % port)
        return (("" if more is None else more(d)) +
                "auth_failure_delay = 0\n"
                "login_trusted_networks = 127.0.0.0/8\n"
                "passdb {\n  driver = oauth2\n"
                "  mechanisms = xoauth2 oauthbearer\n"
                "  args = %s\n}\n" % path)
    return conf


MECH_LIST = "plain login oauthbearer xoauth2"


@pytest.fixture(scope="module")
def backend(introspection):
    d = Dovecot(mechs=MECH_LIST, extra_conf=oauth_conf(introspection))
    fill_inbox(d)
    yield d
    d.close()


@pytest.fixture
def ofe(imapfe_factory, backend):
    f = imapfe_factory(base_config(backend.port, "oauth_bearer yes\n"))
    f.start_inetd(extra_args=["-D"])
    return f


def oauthbearer(user, token, host="127.0.0.1", port=143):
    gs2 = "n,a=%s," % user if user is not None else "n,,"
    return ("%s\x01host=%s\x01port=%d\x01auth=Bearer %s\x01\x01"
            % (gs2, host, port, token)).encode()


def xoauth2(user, token):
    return ("user=%s\x01auth=Bearer %s\x01\x01" % (user, token)).encode()


def message(mech, user, token):
    return (oauthbearer if mech == "OAUTHBEARER" else xoauth2)(user, token)


def b64(data):
    return base64.b64encode(data).decode()


class Client(Raw):
    """A Raw client from an address of its own in 127/8: Dovecot holds
    back logins from an address that has failed some (its auth penalty,
    up to 15 s each, whatever auth_failure_delay says), and imapfe passes
    the client's address on with ID, so each client is judged alone."""

    addresses = itertools.count(1)

    def __init__(self, port, timeout=20):
        n = next(self.addresses)
        src = "127.1.%d.%d" % (n // 250 % 250, n % 250 + 1)
        self.sock = socket.create_connection(("127.0.0.1", port),
                                             timeout=timeout * SLOW,
                                             source_address=(src, 0))
        self.buf = b""
        self.greeting = self.line()


def raw(port):
    c = Client(port)
    _clients.append(c)
    return c


def authenticate(c, mech, msg, sasl_ir, tag="A"):
    """AUTHENTICATE with msg (bytes), with SASL-IR or after the "+";
    an error challenge is answered with the mechanism's dummy reply.
    Returns every line the server sent, the tagged one last."""
    lines = []
    if sasl_ir:
        c.send("%s AUTHENTICATE %s %s\r\n" % (tag, mech, b64(msg) or "="))
    else:
        c.send("%s AUTHENTICATE %s\r\n" % (tag, mech))
        lines.append(c.line())
        assert lines[-1].rstrip() == "+", lines
        c.send(b64(msg) + "\r\n")
    while True:
        ln = c.line()
        lines.append(ln)
        if ln.startswith("+"):
            c.send(DUMMY[mech] + "\r\n")
        elif ln.startswith(tag + " "):
            return lines


def capabilities(c):
    lines = c.cmd("C", "CAPABILITY")
    return lines[0].split()


# ---------------------------------------------------------------------------
# offered only when configured, and only where passwords may go

def test_disabled_by_default(imapfe_factory, backend):
    f = imapfe_factory(base_config(backend.port))
    f.start_inetd()
    c = raw(f.port)
    caps = capabilities(c)
    assert "AUTH=PLAIN" in caps
    assert "AUTH=OAUTHBEARER" not in caps and "AUTH=XOAUTH2" not in caps
    for mech in MECHS:
        lines = c.cmd("A", "AUTHENTICATE %s %s"
                      % (mech, b64(message(mech, "alice", ALICE))))
        assert lines == ["A NO Unsupported authentication mechanism."]
    assert "event=login " not in f.log_text()


def test_offered_when_configured(ofe):
    caps = capabilities(raw(ofe.port))
    assert "AUTH=OAUTHBEARER" in caps and "AUTH=XOAUTH2" in caps


def test_no_bearer_token_without_tls(imapfe_factory, backend):
    f = imapfe_factory(base_config(backend.port, "oauth_bearer yes\n"
                                   "plaintext_auth no\n"))
    f.start_inetd()
    c = raw(f.port)
    caps = capabilities(c)
    assert "AUTH=OAUTHBEARER" not in caps and "AUTH=XOAUTH2" not in caps
    for mech in MECHS:
        lines = c.cmd("A", "AUTHENTICATE %s %s"
                      % (mech, b64(message(mech, "alice", ALICE))))
        assert lines[-1].startswith("A NO [PRIVACYREQUIRED]"), lines
    assert f.log_text().count("event=login-refused") == 2


# ---------------------------------------------------------------------------
# logins

@pytest.mark.parametrize("sasl_ir", [True, False], ids=["sasl-ir", "plus"])
@pytest.mark.parametrize("mech", MECHS)
def test_login_with_token(ofe, mech, sasl_ir):
    c = raw(ofe.port)
    lines = authenticate(c, mech, message(mech, "alice", ALICE), sasl_ir)
    assert len(lines) == 1 + (not sasl_ir), lines
    assert lines[-1].startswith("A OK [CAPABILITY "), lines
    assert "* 3 EXISTS" in c.cmd("S", "SELECT INBOX")
    c.cmd("L", "LOGOUT")
    log = ofe.wait_log("event=end")
    assert re.search(r'event=login user="alice" method=%s backend=' % mech,
                     log), log


def direct_exchange(backend, mech, msg, sasl_ir):
    c = raw(backend.port)
    lines = authenticate(c, mech, msg, sasl_ir)
    c.close()
    return lines


@pytest.mark.parametrize("sasl_ir", [True, False], ids=["sasl-ir", "plus"])
@pytest.mark.parametrize("mech", MECHS)
@pytest.mark.parametrize("token", ["expired", "forged", "other-user"])
def test_refused_token_error_exchange_as_direct(ofe, backend, mech, sasl_ir,
                                                token):
    tok = {"expired": EXPIRED, "forged": FORGED, "other-user": BOB}[token]
    msg = message(mech, "alice", tok)
    direct = direct_exchange(backend, mech, msg, sasl_ir)
    # RFC 7628 3.2.2: a JSON error challenge, then the NO
    assert direct[-2].startswith("+ ") and len(direct[-2]) > 2, direct
    json.loads(base64.b64decode(direct[-2][2:]))
    assert direct[-1].startswith("A NO [AUTHENTICATIONFAILED]"), direct
    c = raw(ofe.port)
    assert authenticate(c, mech, msg, sasl_ir) == direct
    # the session goes on: a good token now works
    lines = authenticate(c, mech, message(mech, "alice", ALICE), True, "B")
    assert lines[-1].startswith("B OK"), lines
    c.cmd("L", "LOGOUT")
    log = ofe.wait_log("event=end")
    assert "event=login-failed" in log and 'method=%s' % mech in log


def test_client_cancels_error_exchange(ofe):
    c = raw(ofe.port)
    c.send("A AUTHENTICATE OAUTHBEARER %s\r\n"
           % b64(oauthbearer("alice", EXPIRED)))
    assert c.line().startswith("+ ")
    c.send("*\r\n")
    lines = c.until_tagged("A")
    assert re.match(r"A (NO|BAD) ", lines[-1]), lines
    lines = authenticate(c, "XOAUTH2", xoauth2("alice", ALICE), True, "B")
    assert lines[-1].startswith("B OK"), lines


@pytest.mark.parametrize("mech", MECHS)
def test_no_user_name_refused_like_a_bad_token(ofe, backend, mech):
    """Without a=/user= imapfe cannot route: the client hears what
    Dovecot says to a bad token, error challenge and all."""
    direct = direct_exchange(backend, mech, message(mech, "alice", FORGED),
                             True)
    msg = (oauthbearer(None, ALICE) if mech == "OAUTHBEARER" else
           ("auth=Bearer %s\x01\x01" % ALICE).encode())
    c = raw(ofe.port)
    assert authenticate(c, mech, msg, True) == direct
    log = ofe.wait_log("no user name")
    assert "event=login-failed method=%s" % mech in log


# ---------------------------------------------------------------------------
# malformed messages: BAD, a log line, the session goes on

MALFORMED = [
    ("OAUTHBEARER", b"n,a=alice,auth=Bearer x", "no \\x01 separator"),
    ("XOAUTH2", b"user=alice auth=Bearer x", "no \\x01 separator"),
    ("OAUTHBEARER", b"p=tls-unique,a=alice,\x01auth=Bearer x\x01\x01",
     "bad GS2 header"),
    ("OAUTHBEARER", b"n,a=al\x00ice,\x01auth=Bearer x\x01\x01",
     "bad GS2 header"),
    ("OAUTHBEARER", b"n,a=al=ZZice,\x01auth=Bearer x\x01\x01",
     "bad GS2 header"),
    ("XOAUTH2", b"user=al\x00ice\x01auth=Bearer x\x01\x01",
     "bad key=value pair"),
    ("OAUTHBEARER", b"n,a=alice,\x01auth=Bearer x\x01", "bad key=value pair"),
    ("OAUTHBEARER", b"n,a=alice,\x01auth=Basic eA==\x01\x01",
     "auth is not"),
    ("XOAUTH2", b"user=alice\x01\x01", "no auth=Bearer pair"),
    ("OAUTHBEARER", b"\x01", "bad GS2 header"),
    ("XOAUTH2", b"user=alice\x01auth=Bearer " + b"x" * 16385 + b"\x01\x01",
     "token too long"),
]


@pytest.mark.parametrize("mech,msg,why", MALFORMED)
def test_malformed_message(imapfe_factory, backend, mech, msg, why):
    f = imapfe_factory(base_config(backend.port, "oauth_bearer yes\n"
                                   "max_line_length 65536\n"))
    f.start_inetd()
    c = raw(f.port)
    lines = c.cmd("A", "AUTHENTICATE %s %s" % (mech, b64(msg)))
    assert lines == ["A BAD Malformed %s message." % mech], lines
    log = f.wait_log("reason=\"malformed %s message: %s" % (mech, why))
    assert "event=login-failed method=%s" % mech in log
    lines = authenticate(c, mech, message(mech, "alice", ALICE), True, "B")
    assert lines[-1].startswith("B OK"), lines


def test_bad_base64(ofe):
    c = raw(ofe.port)
    assert c.cmd("A", "AUTHENTICATE OAUTHBEARER bj*hbGljZQ==") == \
        ["A BAD Invalid base64 data."]
    c.send("B AUTHENTICATE XOAUTH2\r\n")
    assert c.line() == "+ "
    c.send("%%%%\r\n")
    assert c.until_tagged("B") == ["B BAD Invalid base64 data."]


def test_oversize_message_ends_session(ofe):
    c = raw(ofe.port)
    c.send("A AUTHENTICATE OAUTHBEARER %s\r\n"
           % b64(oauthbearer("alice", "x" * 9000)))
    assert c.line() == "* BYE Command line too long."
    assert c.closed()
    ofe.wait_log("event=end")


# ---------------------------------------------------------------------------
# the token stays out of every log and trace

def test_token_never_logged(ofe, backend):
    for mech in MECHS:
        for tok in (ALICE, EXPIRED):
            for sasl_ir in (True, False):
                c = raw(ofe.port)
                authenticate(c, mech, message(mech, "alice", tok), sasl_ir)
                c.cmd("L", "LOGOUT")
                c.close()
    wait_for(lambda: ofe.log_text().count("event=end") >= 8, 10,
             "eight sessions")
    log = ofe.log_text()
    assert "trace from=client" in log and "method=XOAUTH2" in log
    for tok in (ALICE, EXPIRED):
        for text in (tok, b64(oauthbearer("alice", tok))[:40],
                     b64(xoauth2("alice", tok))[:40]):
            assert text not in log


# ---------------------------------------------------------------------------
# curl as a real client

@pytest.mark.parametrize("mech", MECHS)
def test_curl_oauth2_bearer(ofe, backend, mech):
    def run(port):
        return subprocess.run(
            ["curl", "-sS", "--max-time", str(20 * SLOW),
             "--login-options", "AUTH=" + mech, "-u", "alice:",
             "--oauth2-bearer", ALICE,
             "imap://127.0.0.1:%d/INBOX;UID=2" % port],
            capture_output=True, timeout=30 * SLOW)
    direct, through = run(backend.port), run(ofe.port)
    assert direct.returncode == 0, direct.stderr
    assert through.returncode == 0, through.stderr
    assert through.stdout == direct.stdout
    assert b"Subject: test 2" in through.stdout


# ---------------------------------------------------------------------------
# public folders with the same token

@pytest.fixture(scope="module")
def home(introspection):
    d = Dovecot(mechs=MECH_LIST, extra_conf=oauth_conf(introspection,
                                                        home_conf))
    fill_inbox(d)
    yield d
    d.close()


@pytest.fixture(scope="module")
def public(introspection):
    d = Dovecot(mechs=MECH_LIST, extra_conf=oauth_conf(introspection,
                                                        public_conf))
    make_public_folder(d, "News", ["news 1", "news 2"])
    yield d
    d.close()


@pytest.mark.parametrize("mech", MECHS)
def test_public_folder_with_token(imapfe_factory, home, public, mech):
    f = imapfe_factory(public_config(home, public.port, "oauth_bearer yes\n"))
    f.start_inetd(extra_args=["-D"])
    c = raw(f.port)
    lines = authenticate(c, mech, message(mech, "alice", ALICE), False)
    assert lines[-1].startswith("A OK"), lines
    assert "* 2 EXISTS" in c.cmd("S", 'SELECT "%sNews"' % PREFIX)
    assert "* 3 EXISTS" in c.cmd("T", "SELECT INBOX")
    c.cmd("L", "LOGOUT")
    log = f.wait_log("event=end")
    assert re.search(r'event=public-login user="alice" prefix="%s" '
                     r'backend=127.0.0.1:%d' % (PREFIX, public.port), log)
    assert re.search(r"Login: user=<alice>, method=%s" % mech,
                     public.log_text())
    assert ALICE not in log


def test_public_server_refusing_token(imapfe_factory, home, introspection):
    """A public server whose oauth2 passdb refuses the token: the session
    goes on without it, as for any public-server failure."""
    pub = Dovecot(mechs=MECH_LIST, extra_conf=oauth_conf(free_port(),
                                                          public_conf))
    try:
        f = imapfe_factory(public_config(home, pub.port,
                                         "oauth_bearer yes\n"))
        f.start_inetd()
        c = raw(f.port)
        lines = authenticate(c, "OAUTHBEARER",
                             oauthbearer("alice", ALICE), True)
        assert lines[-1].startswith("A OK"), lines
        lines = c.cmd("S", 'SELECT "%sNews"' % PREFIX)
        assert lines[-1].startswith("S NO"), lines
        assert "* 3 EXISTS" in c.cmd("T", "SELECT INBOX")
        c.cmd("L", "LOGOUT")
        log = f.wait_log("event=end")
        assert "event=public-failed" in log
    finally:
        pub.close()


# ---------------------------------------------------------------------------
# many refused tokens in one session: memory stays flat
#
# Dovecot holds each failed login from an address back for longer (its
# auth penalty, up to 15 s, whatever auth_failure_delay says), so a
# thousand refusals go to a scripted back-end that answers as Dovecot does
# above: error challenge, reply, NO.

def bearer_server(conn):
    def answer(conn, tag, cmd, rest):
        if cmd != "AUTHENTICATE":
            return False
        parts = rest.split(" ")
        data = parts[2] if len(parts) > 2 else None
        if data is None:
            conn.sendline("+ ")
            data = conn.line()
        if base64.b64decode(data).find(ALICE.encode()) >= 0:
            conn.sendline(tag + " OK [CAPABILITY IMAP4rev1 IDLE] in")
            return True
        conn.sendline("+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=")
        conn.line()
        conn.sendline(tag + " NO [AUTHENTICATIONFAILED] Authentication "
                      "failed.")
        return True
    serve_commands(conn, "* OK [CAPABILITY IMAP4rev1 SASL-IR "
                   "AUTH=OAUTHBEARER AUTH=XOAUTH2] fake ready", answer,
                   "IMAP4rev1 SASL-IR AUTH=OAUTHBEARER AUTH=XOAUTH2")


def test_thousand_refused_tokens_flat_memory(imapfe_factory, procs):
    rounds = 100 if VALGRIND else 1000
    fake = FakeBackend(bearer_server)
    try:
        f = imapfe_factory(base_config(fake.port, "oauth_bearer yes\n"
                                       "max_login_failures 100000\n"
                                       "login_timeout 3600\n"))
        f.start_inetd()
        before = len(procs.procs)
        c = raw(f.port)
        wait_for(lambda: len(procs.procs) == before + 1, 10,
                 "the session's process")
        pid = procs.procs[-1].pid
        rss = {}
        for i in range(1, rounds + 1):
            mech = MECHS[i % 2]
            tag = "t%d" % i
            lines = authenticate(c, mech, message(mech, "alice", FORGED),
                                 i % 4 != 0, tag)
            assert lines[-2].startswith("+ ") and \
                lines[-1] == tag + " NO [AUTHENTICATIONFAILED] " \
                "Authentication failed.", (i, lines)
            if i in (10, rounds):
                rss[i] = vmrss_kib(pid)
        lines = authenticate(c, "OAUTHBEARER", oauthbearer("alice", ALICE),
                             True)
        assert lines[-1].startswith("A OK"), lines
        c.cmd("L", "LOGOUT")
        f.wait_log("reason=logout")
        assert f.log_text().count("event=login-failed") == rounds
        # RSS means nothing under valgrind or ASan: they judge at exit.
        if not VALGRIND and not is_asan_binary():
            growth = rss[rounds] - rss[10]
            assert growth <= 64, "VmRSS grew by %d KiB (%s)" % (growth, rss)
    finally:
        fake.close()


# ---------------------------------------------------------------------------
# TLS: a token only inside TLS, on both sides

@pytest.fixture(scope="module")
def backend_tls(introspection, certs):
    d = Dovecot(mechs=MECH_LIST, extra_conf=oauth_conf(introspection),
                ssl_cert=certs.dovecot, ssl_key=certs.dovecot_key)
    fill_inbox(d)
    yield d
    d.close()


@pytest.mark.parametrize("route_tls", ["starttls", "implicit"])
@pytest.mark.parametrize("mode", ["starttls", "implicit-config"])
def test_token_over_tls(imapfe_factory, backend_tls, certs, mode, route_tls):
    port = backend_tls.port if route_tls == "starttls" else \
        backend_tls.imaps_port
    f = start_fe(imapfe_factory, fe_config(
        port, certs, "tls=%s ca_file=%s" % (route_tls, certs.ca),
        "oauth_bearer yes\n"), mode)
    ctx = client_ctx(certs.ca)
    if mode == "starttls":
        c = raw(f.port)
        assert "AUTH=OAUTHBEARER" not in c.greeting
        assert c.cmd("s", "STARTTLS") == ["s OK Begin TLS negotiation now."]
        c.starttls(ctx, "localhost")
    else:
        c = Raw(f.port, tls=ctx, server_hostname="localhost")
        _clients.append(c)
    caps = capabilities(c)
    assert "AUTH=OAUTHBEARER" in caps and "AUTH=XOAUTH2" in caps
    lines = authenticate(c, "XOAUTH2", xoauth2("alice", EXPIRED), False)
    assert lines[-2].startswith("+ ") and \
        lines[-1].startswith("A NO [AUTHENTICATIONFAILED]"), lines
    lines = authenticate(c, "OAUTHBEARER", oauthbearer("alice", ALICE), True,
                         "B")
    assert lines[-1].startswith("B OK"), lines
    assert "* 3 EXISTS" in c.cmd("S", "SELECT INBOX")
    c.cmd("L", "LOGOUT")
    f.wait_log("reason=logout")
