"""TLS on both sides of imapfe.

Client side: STARTTLS and implicit TLS (-T, tls_mode implicit), the
capabilities and the refusal of plaintext passwords before TLS
(plaintext_auth no|loopback), the discarding of commands pipelined behind
STARTTLS, handshake failures and the handshake timeout, session tickets
shared between processes through tls_ticket_key_file, tls_min_version and
tls_ciphers.

Back-end side: tls=starttls|implicit routes to a Dovecot with TLS, always
verified (CA file, CA directory, the name checked against the route's host
or name=), client certificates, and no fallback to plaintext.

Clients: Python's imaplib and ssl, curl, and openssl s_client, all of which
trust only the test CA made by the certs fixture.
"""
import imaplib
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from conftest import SLOW, Raw, b64, sample_message, wait_for

PRE_TLS_CAPS = "IMAP4rev1 LITERAL- SASL-IR ID ENABLE STARTTLS LOGINDISABLED"

# How a client reaches imapfe's TLS: the configuration line and the
# command-line arguments for each client mode.
CLIENT_MODES = {
    "starttls": ("", ()),
    "implicit-flag": ("", ("-T",)),
    "implicit-config": ("tls_mode implicit\n", ()),
}


# --- helpers ----------------------------------------------------------------

def client_ctx(cafile):
    """A client context that verifies the server against cafile only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile)
    return ctx


def fe_config(backend_port, certs=None, route_opts="", extra="",
              plaintext_auth="no"):
    """A route to 127.0.0.1:backend_port; with certs, imapfe's own
    certificate for clients and plaintext_auth as given."""
    conf = "route * 127.0.0.1:%d%s\nlogin_timeout %d\n" % (
        backend_port, " " + route_opts if route_opts else "", 30 * SLOW)
    if certs is not None:
        conf += "tls_cert %s\ntls_key %s\nplaintext_auth %s\n" % (
            certs.imapfe, certs.imapfe_key, plaintext_auth)
    return conf + extra


def start_fe(factory, config, mode="starttls", name="fe"):
    """imapfe, inetd-style, serving clients in one of CLIENT_MODES."""
    line, args = CLIENT_MODES[mode]
    f = factory(config + line, name=name)
    f.start_inetd(args)
    return f


def tls_raw(fe, ctx, mode):
    """A Raw client inside TLS: after STARTTLS, or from the first byte."""
    if mode == "starttls":
        c = Raw(fe.port)
        assert c.cmd("s", "STARTTLS") == ["s OK Begin TLS negotiation now."]
        c.starttls(ctx, "localhost")
    else:
        c = Raw(fe.port, tls=ctx, server_hostname="localhost")
    return c


def imap_tls(fe, ctx, mode):
    """An imaplib client inside TLS, not yet logged in."""
    if mode == "starttls":
        m = imaplib.IMAP4("127.0.0.1", fe.port)
        m.starttls(ssl_context=ctx)
    else:
        m = imaplib.IMAP4_SSL("127.0.0.1", fe.port, ssl_context=ctx)
    return m


def greeting_caps(greeting):
    m = re.match(r"\* OK \[CAPABILITY ([^\]]*)\]", greeting)
    assert m, greeting
    return m.group(1).split()


def capability(c, tag="c"):
    """The capabilities a CAPABILITY command lists."""
    lines = c.cmd(tag, "CAPABILITY")
    assert lines[-1].startswith(tag + " OK"), lines
    caps = [ln for ln in lines if ln.startswith("* CAPABILITY ")]
    assert len(caps) == 1, lines
    return caps[0].split()[2:]


def log_line(fe, *needles, timeout=10):
    """The first imapfe log line holding every needle, once there is one;
    on timeout the failure shows the whole log."""
    def find():
        for line in fe.log_text().splitlines():
            if all(n in line for n in needles):
                return line
        return None
    try:
        return wait_for(find, timeout, "a log line with %r" % (needles,))
    except AssertionError as e:
        raise AssertionError("%s; the log:\n%s" % (e, fe.log_text()))


def log_pid(line):
    m = re.match(r"imapfe\[(\d+)\]:", line)
    assert m, line
    return int(m.group(1))


def dovecot_logins(d, user="alice"):
    """Dovecot's log lines for successful logins of user."""
    return [ln for ln in d.log_text().splitlines()
            if "Login: user=<%s>" % user in ln]


def s_client(port, certs, *args, stdin=b"a LOGOUT\n"):
    """openssl s_client against imapfe, verifying its certificate for
    127.0.0.1 against the test CA.  -ign_eof keeps it reading after stdin
    ends until imapfe closes (after the LOGOUT), so that TLS 1.3 tickets,
    which come after the handshake, are received.  Returns (exit status,
    all output)."""
    cmd = ["openssl", "s_client", "-connect", "127.0.0.1:%d" % port,
           "-CAfile", certs.ca, "-verify_return_error",
           "-verify_ip", "127.0.0.1", "-crlf", "-ign_eof"] + list(args)
    r = subprocess.run(cmd, input=stdin, capture_output=True,
                       timeout=30 * SLOW)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def session_kind(output):
    """'New' or 'Reused' and the protocol, from s_client's output."""
    m = re.search(r"^(New|Reused), (TLSv1\.[23]),", output, re.M)
    assert m, output
    return m.group(1), m.group(2)


def curl(url, certs, *opts):
    return subprocess.run(
        ["curl", "-s", "-S", "--max-time", str(20 * SLOW), "--cacert",
         certs.ca, "-u", "alice:secret"] + list(opts) + [url],
        capture_output=True, timeout=30 * SLOW)


def big_message(size=1 << 20):
    """A message of about size bytes whose every line differs, so that a
    lost, doubled or reordered piece anywhere shows."""
    rnd = random.Random(size)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    lines, n = [], 0
    while n < size:
        line = "%08d %s\r\n" % (len(lines), "".join(
            rnd.choice(alphabet) for _ in range(66)))
        lines.append(line)
        n += len(line)
    return sample_message(0, "".join(lines))


# --- fixtures ---------------------------------------------------------------

@pytest.fixture
def ctx(certs):
    return client_ctx(certs.ca)


@pytest.fixture
def fe_starttls(imapfe_factory, certs, dovecot):
    """imapfe offering STARTTLS, refusing plaintext passwords, in front of
    the plain Dovecot."""
    return start_fe(imapfe_factory, fe_config(dovecot.port, certs))


# --- client side: STARTTLS --------------------------------------------------

def test_capabilities_before_and_after_starttls(fe_starttls, ctx):
    c = Raw(fe_starttls.port)
    assert " ".join(greeting_caps(c.greeting)) == PRE_TLS_CAPS
    assert " ".join(capability(c)) == PRE_TLS_CAPS
    assert c.cmd("s", "STARTTLS") == ["s OK Begin TLS negotiation now."]
    c.starttls(ctx, "localhost")
    caps = capability(c, "d")
    for cap in ("IMAP4rev1", "AUTH=PLAIN", "AUTH=LOGIN", "SASL-IR"):
        assert cap in caps
    assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps
    assert c.cmd("t", "STARTTLS")[-1].startswith("t BAD ")
    assert c.cmd("l", "LOGIN alice secret")[-1].startswith("l OK [CAPAB")
    c.cmd("z", "LOGOUT")
    c.close()
    line = log_line(fe_starttls, "event=tls ", "version=TLSv1.")
    assert "resumed=no" in line
    log_line(fe_starttls, 'event=login user="alice" method=LOGIN')


@pytest.mark.parametrize("command", [
    "LOGIN alice secret",
    "AUTHENTICATE PLAIN " + b64("\0alice\0secret"),
    "AUTHENTICATE PLAIN",          # refused before any password is asked
    "AUTHENTICATE LOGIN",
])
def test_passwords_are_refused_before_tls(fe_starttls, dovecot, command):
    before = len(dovecot_logins(dovecot))
    c = Raw(fe_starttls.port)
    lines = c.cmd("a", command)
    assert len(lines) == 1 and lines[0].startswith("a NO [PRIVACYREQUIRED]"), \
        lines
    assert c.cmd("b", "NOOP") == ["b OK NOOP completed."]
    c.close()
    log_line(fe_starttls, "event=login-refused")
    assert len(dovecot_logins(dovecot)) == before


def test_starttls_without_certificate_is_bad(imapfe_factory, dovecot):
    f = start_fe(imapfe_factory, fe_config(dovecot.port))
    c = Raw(f.port)
    assert "STARTTLS" not in greeting_caps(c.greeting)
    assert "STARTTLS" not in capability(c)
    assert c.cmd("s", "STARTTLS")[-1].startswith("s BAD ")
    # Still a plaintext session that works.
    assert c.cmd("l", "LOGIN alice secret")[-1].startswith("l OK")
    c.close()


def test_commands_pipelined_after_starttls_are_discarded(fe_starttls,
                                                         dovecot, ctx):
    """CVE-2011-0411: what was sent in the clear behind STARTTLS must not
    run inside TLS."""
    before = len(dovecot_logins(dovecot))
    c = Raw(fe_starttls.port)
    injected = b"b LOGIN alice secret\r\n"
    c.send(b"a STARTTLS\r\n" + injected)
    assert c.line() == "a OK Begin TLS negotiation now."
    c.starttls(ctx, "localhost")
    lines = c.cmd("c", "CAPABILITY")
    assert not any(ln.startswith("b ") for ln in lines), lines
    assert "AUTH=PLAIN" in lines[0].split()
    assert c.cmd("d", "NOOP") == ["d OK NOOP completed."]
    sel = c.cmd("e", "SELECT INBOX")
    assert len(sel) == 1 and re.match(r"e (BAD|NO) ", sel[0]), sel
    log_line(fe_starttls, "event=starttls-discarded bytes=%d" % len(injected))
    # The real login, inside TLS, is the only one Dovecot sees.
    assert c.cmd("f", "LOGIN alice secret")[-1].startswith("f OK")
    c.cmd("z", "LOGOUT")
    c.close()
    assert len(dovecot_logins(dovecot)) == before + 1


def test_imaplib_starttls_login_and_fetch(fe_starttls, ctx):
    m = imaplib.IMAP4("127.0.0.1", fe_starttls.port)
    assert "LOGINDISABLED" in m.capabilities
    m.starttls(ssl_context=ctx)
    assert "LOGINDISABLED" not in m.capabilities
    assert m.login("alice", "secret")[0] == "OK"
    typ, data = m.select("INBOX")
    assert typ == "OK" and int(data[0]) >= 3
    typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: test 1" in data[0][1]
    m.logout()
    log_line(fe_starttls, "event=end", 'user="alice"', "reason=logout")


def test_openssl_s_client_starttls(fe_starttls, certs):
    rc, out = s_client(fe_starttls.port, certs, "-starttls", "imap")
    assert rc == 0, out
    assert "Verify return code: 0 (ok)" in out
    assert session_kind(out)[0] == "New"
    assert "* BYE" in out and "a OK" in out


@pytest.mark.parametrize("mode", ["starttls", "implicit-flag"])
def test_curl(imapfe_factory, dovecot, certs, mode):
    f = start_fe(imapfe_factory, fe_config(dovecot.port, certs), mode)
    url = "%s://127.0.0.1:%d/INBOX;MAILINDEX=2" % (
        "imap" if mode == "starttls" else "imaps", f.port)
    out = curl(url, certs, "--ssl-reqd")
    assert out.returncode == 0, out.stderr
    assert b"Subject: test 2" in out.stdout


def test_plaintext_auth_loopback_allows_login_from_loopback(imapfe_factory,
                                                           dovecot, certs):
    f = start_fe(imapfe_factory, fe_config(dovecot.port, certs,
                                           plaintext_auth="loopback"))
    c = Raw(f.port)
    caps = greeting_caps(c.greeting)
    assert "STARTTLS" in caps and "AUTH=PLAIN" in caps
    assert "LOGINDISABLED" not in caps
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    c.close()


def non_loopback_address():
    """An address of this host that is not loopback, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))     # no packet is sent
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def test_plaintext_auth_loopback_refuses_other_clients(imapfe_factory,
                                                      dovecot, certs):
    """A pipe has no peer address; a TCP peer on another local address is
    not loopback either."""
    f = imapfe_factory(fe_config(dovecot.port, certs,
                                 plaintext_auth="loopback"))
    out = f.run_stdio(b"a CAPABILITY\r\nb LOGIN alice secret\r\n"
                      b"c LOGOUT\r\n").decode()
    assert "LOGINDISABLED" in out
    assert "b NO [PRIVACYREQUIRED]" in out
    addr = non_loopback_address()
    if addr is None:
        return
    f.start_inetd(host=addr)
    with socket.create_connection((addr, f.port), timeout=10 * SLOW) as c:
        c.sendall(b"b LOGIN alice secret\r\n")
        data = b""
        while b"\r\nb " not in data:
            chunk = c.recv(4096)
            assert chunk, data
            data += chunk
    assert b"LOGINDISABLED" in data and b"b NO [PRIVACYREQUIRED]" in data


# --- client side: implicit TLS ----------------------------------------------

@pytest.mark.parametrize("mode", ["implicit-flag", "implicit-config"])
def test_implicit_tls(imapfe_factory, dovecot, certs, ctx, mode):
    f = start_fe(imapfe_factory, fe_config(dovecot.port, certs), mode)
    c = Raw(f.port, tls=ctx, server_hostname="localhost")
    caps = greeting_caps(c.greeting)
    assert "AUTH=PLAIN" in caps
    assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps
    assert c.cmd("s", "STARTTLS")[-1].startswith("s BAD ")
    c.close()
    m = imaplib.IMAP4_SSL("127.0.0.1", f.port, ssl_context=ctx)
    assert m.login("alice", "secret")[0] == "OK"
    typ, data = m.select("INBOX")
    assert typ == "OK" and int(data[0]) >= 3
    typ, data = m.fetch("3", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: test 3" in data[0][1]
    m.logout()
    log_line(f, "event=end", 'user="alice"', "reason=logout")


def tls_greeting(ctx):
    """read_greeting for the listener's readiness check, over TLS."""
    def read(port):
        try:
            c = Raw(port, timeout=2, tls=ctx, server_hostname="localhost")
        except (OSError, EOFError):
            return b""
        c.close()
        return c.greeting.encode()
    return read


def test_listener_with_implicit_tls(imapfe_factory, dovecot, certs, ctx):
    f = imapfe_factory(fe_config(dovecot.port, certs))
    f.start_listener(["-T"], greeting=tls_greeting(ctx))
    sessions = [imaplib.IMAP4_SSL("127.0.0.1", f.port, ssl_context=ctx)
                for _ in range(2)]
    for m in sessions:
        assert m.login("alice", "secret")[0] == "OK"
        assert m.select("INBOX")[0] == "OK"
    for m in sessions:
        m.logout()
    f.stop()


# --- client side: handshake failures ----------------------------------------

@pytest.mark.parametrize("garbage", [
    b"a LOGIN alice secret\r\n",           # plaintext IMAP on a TLS port
    b"\x16\x03\x01\x00\x05hello" + bytes(range(256)),  # a broken record
])
def test_garbage_instead_of_client_hello(imapfe_factory, dovecot, certs,
                                         garbage):
    f = start_fe(imapfe_factory, fe_config(dovecot.port, certs),
                 "implicit-flag")
    c = socket.create_connection(("127.0.0.1", f.port), timeout=10 * SLOW)
    c.sendall(garbage)
    data = b""
    while True:
        try:
            chunk = c.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    c.close()
    assert b"* OK" not in data and b"secret" not in data
    line = log_line(f, "event=tls-error")
    assert "reason=" in line
    log_line(f, "event=end")


def test_client_that_does_not_trust_the_certificate(imapfe_factory, dovecot,
                                                     certs):
    f = start_fe(imapfe_factory, fe_config(dovecot.port, certs),
                 "implicit-flag")
    stranger = client_ctx(certs.untrusted_ca)
    with pytest.raises(ssl.SSLCertVerificationError):
        Raw(f.port, tls=stranger, server_hostname="localhost")
    line = log_line(f, "event=tls-error")
    assert "reason=" in line
    log_line(f, "event=end")


@pytest.mark.parametrize("mode", ["implicit-flag", "starttls"])
def test_silent_client_is_cut_at_handshake_timeout(imapfe_factory, dovecot,
                                                   certs, mode):
    timeout = 2
    f = start_fe(imapfe_factory, fe_config(
        dovecot.port, certs, extra="tls_handshake_timeout %d\n" % timeout),
        mode)
    start = time.monotonic()
    c = socket.create_connection(("127.0.0.1", f.port), timeout=30 * SLOW)
    if mode == "starttls":
        c.sendall(b"s STARTTLS\r\n")
    data = b""
    while True:
        try:
            chunk = c.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    elapsed = time.monotonic() - start
    c.close()
    if mode == "starttls":
        assert b"s OK Begin TLS negotiation now.\r\n" in data
    # Not earlier than the handshake timeout, and long before the login
    # timeout (30 s).
    assert timeout - 0.1 <= elapsed < timeout + 10 * SLOW, elapsed
    line = log_line(f, "event=tls-error")
    assert "timeout" in line or "timed out" in line, line
    log_line(f, "event=end")


def test_min_version_tls13_refuses_tls12(imapfe_factory, dovecot, certs):
    f = start_fe(imapfe_factory, fe_config(
        dovecot.port, certs, extra="tls_min_version TLSv1.3\n"),
        "implicit-flag")
    rc, out = s_client(f.port, certs, "-tls1_2")
    assert rc != 0, out
    assert not re.search(r"^(New|Reused), TLSv1", out, re.M), out
    log_line(f, "event=tls-error")
    rc, out = s_client(f.port, certs, "-tls1_3")
    assert rc == 0, out
    assert session_kind(out) == ("New", "TLSv1.3")


def test_tls_ciphers(imapfe_factory, dovecot, certs):
    cipher = "ECDHE-ECDSA-AES128-GCM-SHA256"
    f = start_fe(imapfe_factory, fe_config(
        dovecot.port, certs, extra="tls_ciphers %s\n" % cipher),
        "implicit-flag")
    rc, out = s_client(f.port, certs, "-tls1_2")
    assert rc == 0, out
    assert "Cipher is %s" % cipher in out
    log_line(f, "event=tls ", "cipher=%s" % cipher)


# --- client side: session tickets -------------------------------------------

def ticket_fe(factory, dovecot, certs, mode, key_file=None, name="fe"):
    extra = "tls_ticket_key_file %s\n" % key_file if key_file else ""
    return start_fe(factory, fe_config(dovecot.port, certs, extra=extra),
                    mode, name=name)


def connect_with_session(fe, certs, mode, version, sess_in=None,
                         sess_out=None):
    """One s_client session; returns ('New'|'Reused', protocol)."""
    args = [version]
    if mode == "starttls":
        args += ["-starttls", "imap"]
    if sess_in:
        args += ["-sess_in", sess_in]
    if sess_out:
        args += ["-sess_out", sess_out]
    rc, out = s_client(fe.port, certs, *args)
    assert rc == 0, out
    assert "* BYE" in out, out
    return session_kind(out)


@pytest.mark.parametrize("mode", ["implicit-flag", "starttls"])
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_ticket_resumes_in_another_process(imapfe_factory, dovecot, certs,
                                           tmp_path, mode, version):
    f = ticket_fe(imapfe_factory, dovecot, certs, mode, certs.ticket_key)
    sess = str(tmp_path / "session.pem")
    proto = "TLSv1.2" if version == "-tls1_2" else "TLSv1.3"
    assert connect_with_session(f, certs, mode, version,
                                sess_out=sess) == ("New", proto)
    assert os.path.exists(sess)
    assert connect_with_session(f, certs, mode, version,
                                sess_in=sess) == ("Reused", proto)
    first = log_line(f, "event=tls ", "resumed=no")
    second = log_line(f, "event=tls ", "resumed=yes")
    assert log_pid(first) != log_pid(second)


def test_no_ticket_key_no_resumption(imapfe_factory, dovecot, certs,
                                     tmp_path):
    """Without tls_ticket_key_file imapfe issues no tickets, and accepts
    none, even one another imapfe sealed."""
    keyed = ticket_fe(imapfe_factory, dovecot, certs, "implicit-flag",
                      certs.ticket_key, name="keyed")
    keyless = ticket_fe(imapfe_factory, dovecot, certs, "implicit-flag",
                        name="keyless")
    rc, out = s_client(keyless.port, certs, "-tls1_2")
    assert rc == 0, out
    assert "TLS session ticket:" not in out, out
    sess = str(tmp_path / "session.pem")
    connect_with_session(keyed, certs, "implicit-flag", "-tls1_2",
                         sess_out=sess)
    assert connect_with_session(keyless, certs, "implicit-flag", "-tls1_2",
                                sess_in=sess) == ("New", "TLSv1.2")
    assert "resumed=yes" not in keyless.log_text()


def write_key_file(path, data):
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return str(path)


def test_ticket_key_rotation(imapfe_factory, dovecot, certs, tmp_path):
    """The first key in the file seals, every key opens: after a rotation
    old tickets still resume, and the tickets issued then are sealed with
    the new key.  TLS 1.3, where a resumed session gets fresh tickets."""
    with open(certs.ticket_key, "rb") as f:
        old_key = f.read()
    new_key = os.urandom(80)
    new = write_key_file(tmp_path / "new.key", new_key)
    rotated = write_key_file(tmp_path / "rotated.key", new_key + old_key)
    before, during, after = (
        ticket_fe(imapfe_factory, dovecot, certs, "implicit-flag", key,
                  name=name)
        for key, name in ((certs.ticket_key, "before"), (rotated, "during"),
                          (new, "after")))
    old_ticket = str(tmp_path / "old.pem")
    new_ticket = str(tmp_path / "new.pem")

    def resume(fe, sess_in, sess_out=None):
        return connect_with_session(fe, certs, "implicit-flag", "-tls1_3",
                                    sess_in=sess_in, sess_out=sess_out)[0]
    connect_with_session(before, certs, "implicit-flag", "-tls1_3",
                         sess_out=old_ticket)
    assert resume(during, old_ticket, sess_out=new_ticket) == "Reused"
    assert resume(after, new_ticket) == "Reused"
    assert resume(after, old_ticket) == "New"


# --- back-end side ----------------------------------------------------------

BACKEND_MODES = ["starttls", "implicit"]

# A back-end imapfe could not use fails the login: the reason (the
# certificate verification error, the missing STARTTLS) is on that line.
BACKEND_ERROR_EVENT = "event=login-failed"


def backend_port(d, tls):
    return d.imaps_port if tls == "implicit" else d.port


def last_login_over_tls(d):
    logins = dovecot_logins(d)
    assert logins, d.log_text()
    return ", TLS," in logins[-1]


@pytest.mark.parametrize("ca", ["backend_ca_file", "ca_file=", "ca_path="])
@pytest.mark.parametrize("tls", BACKEND_MODES)
def test_backend_tls_login_select_fetch(imapfe_factory, dovecot_tls, certs,
                                        tmp_path, tls, ca):
    if ca == "backend_ca_file":
        opts, extra = "tls=" + tls, "backend_ca_file %s\n" % certs.ca
    elif ca == "ca_file=":
        opts, extra = "tls=%s ca_file=%s" % (tls, certs.ca), ""
    else:
        # a CA directory is read as certificates are verified, after imapfe
        # gave up root: it lives where its user can read it
        cadir = os.path.join(certs.dir, "cadir")
        os.makedirs(cadir, exist_ok=True)
        shutil.copy(certs.ca, os.path.join(cadir, "ca.pem"))
        subprocess.run(["openssl", "rehash", cadir], check=True)
        opts, extra = "tls=%s ca_path=%s" % (tls, cadir), ""
    f = imapfe_factory(fe_config(backend_port(dovecot_tls, tls),
                                 route_opts=opts, extra=extra))
    f.start_inetd()
    m = imaplib.IMAP4("127.0.0.1", f.port)
    assert m.login("alice", "secret")[0] == "OK"
    assert last_login_over_tls(dovecot_tls)
    typ, data = m.select("INBOX")
    assert typ == "OK" and int(data[0]) >= 3
    typ, data = m.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: test 2" in data[0][1]
    m.logout()
    log_line(f, "event=end", 'user="alice"', "reason=logout")


def refused_login(f):
    """LOGIN through imapfe is refused as UNAVAILABLE; returns imapfe's
    log line about the back-end."""
    c = Raw(f.port)
    line = c.cmd("a", "LOGIN alice secret")[-1]
    c.close()
    assert line.startswith("a NO [UNAVAILABLE] "), line
    # Logged before the reply is sent: no long wait needed.
    return log_line(f, BACKEND_ERROR_EVENT, timeout=2)


def assert_verify_failure(line, reason):
    assert "verify" in line or "certificate" in line, line
    assert reason in line, line


@pytest.mark.parametrize("tls", BACKEND_MODES)
def test_backend_certificate_for_another_name_is_refused(
        imapfe_factory, dovecot_wrongname, certs, tls):
    before = len(dovecot_logins(dovecot_wrongname))
    f = imapfe_factory(fe_config(
        backend_port(dovecot_wrongname, tls), route_opts="tls=" + tls,
        extra="backend_ca_file %s\n" % certs.ca))
    f.start_inetd()
    assert_verify_failure(refused_login(f), "mismatch")
    assert len(dovecot_logins(dovecot_wrongname)) == before


def test_backend_name_option_is_what_is_verified(imapfe_factory, dovecot_tls,
                                                 dovecot_wrongname, certs):
    """name= overrides the route's host for verification, both ways."""
    ca = "backend_ca_file %s\n" % certs.ca
    good = imapfe_factory(fe_config(
        dovecot_tls.imaps_port, route_opts="tls=implicit name=localhost",
        extra=ca), name="good")
    good.start_inetd()
    m = imaplib.IMAP4("127.0.0.1", good.port)
    assert m.login("alice", "secret")[0] == "OK"
    m.logout()
    wrong = imapfe_factory(fe_config(
        dovecot_tls.imaps_port, route_opts="tls=implicit name=wrong.example",
        extra=ca), name="wrong")
    wrong.start_inetd()
    assert_verify_failure(refused_login(wrong), "hostname mismatch")
    # The wrong-name certificate is fine for the name it carries.
    named = imapfe_factory(fe_config(
        dovecot_wrongname.imaps_port,
        route_opts="tls=implicit name=wrong.example", extra=ca),
        name="named")
    named.start_inetd()
    m = imaplib.IMAP4("127.0.0.1", named.port)
    assert m.login("alice", "secret")[0] == "OK"
    m.logout()


@pytest.mark.parametrize("tls", BACKEND_MODES)
def test_backend_certificate_from_untrusted_ca_is_refused(
        imapfe_factory, dovecot_untrusted, certs, tls):
    before = len(dovecot_logins(dovecot_untrusted))
    f = imapfe_factory(fe_config(
        backend_port(dovecot_untrusted, tls), route_opts="tls=" + tls,
        extra="backend_ca_file %s\n" % certs.ca))
    f.start_inetd()
    assert_verify_failure(refused_login(f),
                          "unable to get local issuer certificate")
    assert len(dovecot_logins(dovecot_untrusted)) == before


def test_backend_without_ca_setting_uses_system_store(imapfe_factory,
                                                      dovecot_tls):
    """The system trust store does not know the test CA."""
    before = len(dovecot_logins(dovecot_tls))
    f = imapfe_factory(fe_config(dovecot_tls.imaps_port,
                                 route_opts="tls=implicit"))
    f.start_inetd()
    assert_verify_failure(refused_login(f),
                          "unable to get local issuer certificate")
    assert len(dovecot_logins(dovecot_tls)) == before


def test_backend_starttls_never_falls_back_to_plaintext(imapfe_factory,
                                                        dovecot, certs):
    before = len(dovecot_logins(dovecot))
    f = imapfe_factory(fe_config(dovecot.port, route_opts="tls=starttls",
                                 extra="backend_ca_file %s\n" % certs.ca))
    f.start_inetd()
    assert "STARTTLS" in refused_login(f)
    assert len(dovecot_logins(dovecot)) == before


@pytest.mark.parametrize("where", ["route", "global"])
def test_backend_client_certificate(imapfe_factory, dovecot_clientcert,
                                    certs, where):
    ca = "backend_ca_file %s\n" % certs.ca
    port = dovecot_clientcert.imaps_port
    if where == "route":
        f = imapfe_factory(fe_config(port, route_opts=(
            "tls=implicit client_cert=%s client_key=%s" % (
                certs.client, certs.client_key)), extra=ca))
    else:
        f = imapfe_factory(fe_config(port, route_opts="tls=implicit",
                                     extra=ca + (
            "backend_client_cert %s\nbackend_client_key %s\n" % (
                certs.client, certs.client_key))))
    f.start_inetd()
    m = imaplib.IMAP4("127.0.0.1", f.port)
    assert m.login("alice", "secret")[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()


def test_backend_without_client_certificate_is_refused(imapfe_factory,
                                                       dovecot_clientcert,
                                                       certs):
    def refusals():
        return dovecot_clientcert.log_text().count(
            "didn't present valid SSL certificate")
    before = refusals()
    f = imapfe_factory(fe_config(
        dovecot_clientcert.imaps_port, route_opts="tls=implicit",
        extra="backend_ca_file %s\n" % certs.ca))
    f.start_inetd()
    c = Raw(f.port)
    line = c.cmd("a", "LOGIN alice secret")[-1]
    c.close()
    assert line.startswith("a NO "), line
    assert refusals() == before + 1


# --- both sides: bulk data and IDLE -----------------------------------------

def tls_both_sides(factory, dovecot_tls, certs, client, backend):
    return start_fe(factory, fe_config(
        backend_port(dovecot_tls, backend), certs,
        route_opts="tls=" + backend,
        extra="backend_ca_file %s\n" % certs.ca), client)


@pytest.mark.parametrize("client,backend", [
    ("implicit-flag", "implicit"), ("starttls", "starttls")])
def test_one_mebibyte_round_trip(imapfe_factory, dovecot_tls, certs, ctx,
                                 client, backend):
    f = tls_both_sides(imapfe_factory, dovecot_tls, certs, client, backend)
    msg = big_message()
    box = "big-" + client
    m = imap_tls(f, ctx, client)
    assert m.login("alice", "secret")[0] == "OK"
    assert last_login_over_tls(dovecot_tls)
    assert m.create(box)[0] == "OK"
    try:
        assert m.append(box, None, None, msg)[0] == "OK"
        typ, data = m.select(box)
        assert typ == "OK" and int(data[0]) == 1
        typ, data = m.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        got = data[0][1]
        assert len(got) == len(msg)
        assert got == msg
        # The session goes on after the bulk transfer.
        assert m.noop()[0] == "OK"
        m.close()
    finally:
        m.delete(box)
        m.logout()


@pytest.mark.parametrize("client,backend", [
    ("implicit-config", "starttls"), ("starttls", "implicit")])
def test_idle_over_tls(imapfe_factory, dovecot_tls, certs, ctx, client,
                       backend):
    f = tls_both_sides(imapfe_factory, dovecot_tls, certs, client, backend)
    box = "idle-" + client
    direct = dovecot_tls.imap("alice")
    direct.create(box)
    try:
        c = tls_raw(f, ctx, client)
        assert c.cmd("l", "LOGIN alice secret")[-1].startswith("l OK")
        sel = c.cmd("s", "SELECT " + box)
        assert sel[-1].startswith("s OK") and "* 0 EXISTS" in sel
        c.send("i IDLE\r\n")
        assert c.line().startswith("+ ")
        direct.append(box, None, None, sample_message(42))
        line = c.line()
        while line.startswith("* ") and "EXISTS" not in line:
            line = c.line()
        assert line == "* 1 EXISTS", line
        c.send("DONE\r\n")
        assert c.until_tagged("i")[-1].startswith("i OK")
        lines = c.cmd("f", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert lines[-1].startswith("f OK")
        assert "Subject: test 42" in "\n".join(lines)
        c.cmd("z", "LOGOUT")
        c.close()
    finally:
        direct.delete(box)
        direct.logout()
