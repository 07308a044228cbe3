"""Operating imapfe's own listener (-l, issue 19): SIGHUP reloads the
configuration and its files for the connections accepted from then on,
keeps the old one when the new one fails the check, and never stops
accepting; SIGQUIT drains (no new connection, the sessions end on their
own, the rest get "* BYE" after drain_timeout); the example unit
imapfe-listener.service passes systemd-analyze verify."""
import grp
import hashlib
import imaplib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading

import pytest

from conftest import (BIN, OPEN_CLIENTS, RUN_AS, SLOW, Imapfe, Raw, b64,
                      fill_inbox, wait_for)
from saslbed import FrontSasl, MasterDovecot

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def confdir():
    """A directory the listener can read again after giving root up (the
    test's own tmp_path is root's alone): the configuration and the
    certificate files a reload reads live here."""
    d = tempfile.mkdtemp(prefix="imapfe-reload-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def listener(procs, confdir):
    """make(config) -> an Imapfe whose files are in confdir; stopped at
    the end unless the test stopped it."""
    made = []

    def make(config):
        fe = Imapfe(procs, confdir, config + RUN_AS)
        made.append(fe)
        return fe
    yield make
    for fe in made:
        fe.stop()


def write(path, data):
    """Replace path's content whole, as an admin's editor or certbot's
    deploy hook does (a new file renamed over the old), readable by the
    user the listener serves as."""
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


def copy(src, dst):
    with open(src, "rb") as f:
        write(dst, f.read())


def config(backend_port, greeting, extra=""):
    return ("route * 127.0.0.1:%d\nlogin_timeout %d\nplaintext_auth yes\n"
            "greeting %s\n%s" % (backend_port, 30 * SLOW, greeting, extra))


def reloads(fe, event):
    return fe.log_text().count(event)


def hup(fe, expect="event=reload "):
    """SIGHUP the listener and wait for the outcome logged."""
    before = reloads(fe, expect)
    fe.listener.send_signal(signal.SIGHUP)
    try:
        wait_for(lambda: reloads(fe, expect) > before, 10,
                 "%r after SIGHUP" % expect)
    except AssertionError as e:
        raise AssertionError("%s; the log:\n%s" % (e, fe.log_text()))


def logged_in(port):
    m = imaplib.IMAP4("127.0.0.1", port)
    OPEN_CLIENTS.append(m)
    assert m.login("alice", "secret")[0] == "OK"
    typ, data = m.select("INBOX")
    assert typ == "OK"
    return m


def still_works(m):
    """The session answers as before: a fetch, a NOOP, a clean logout."""
    typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK" and b"Subject: test 1" in data[0][1]
    assert m.noop()[0] == "OK"
    assert m.logout()[0] == "BYE"


def der_fingerprint(pem_path):
    with open(pem_path) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return hashlib.sha256(der).hexdigest()


def served_fingerprint(port):
    """The SHA-256 of the certificate a new implicit-TLS connection gets
    (not verified: the test compares it with the file's)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10 * SLOW) \
            as s, ctx.wrap_socket(s) as t:
        der = t.getpeercert(binary_form=True)
        assert t.recv(4096).startswith(b"* OK")
    return hashlib.sha256(der).hexdigest()


def tls_ready(port):
    try:
        served_fingerprint(port)
        return b"* OK"
    except (OSError, ssl.SSLError):
        return b""


def session_pid(fe):
    """The process of the one session logged in so far (the listener's
    other children may be idle, pre-forked)."""
    def pid():
        found = re.findall(r"imapfe\[(\d+)\]: session=\w+ event=login ",
                           fe.log_text())
        return int(found[0]) if len(found) == 1 else None
    pid = wait_for(pid, 10 * SLOW, "one session's login line")
    assert parent_of(pid) == fe.listener.pid
    return pid


def parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


# --- SIGHUP: reload ---------------------------------------------------------

def test_hup_serves_new_connections_with_the_new_certificate(
        listener, confdir, dovecot, certs):
    cert, key = os.path.join(confdir, "cert.pem"), os.path.join(
        confdir, "key.pem")
    copy(certs.imapfe, cert)
    copy(certs.imapfe_key, key)
    fe = listener(config(dovecot.port, "Old.",
                         "tls_cert %s\ntls_key %s\ntls_ticket_key_file %s\n"
                         % (cert, key, os.path.join(confdir, "ticket"))))
    copy(certs.ticket_key, os.path.join(confdir, "ticket"))
    fe.start_listener(["-T"], greeting=tls_ready)
    assert served_fingerprint(fe.port) == der_fingerprint(certs.imapfe)
    ctx = ssl.create_default_context(cafile=certs.ca)
    m = imaplib.IMAP4_SSL("127.0.0.1", fe.port, ssl_context=ctx)
    OPEN_CLIENTS.append(m)
    assert m.login("alice", "secret")[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    # the renewed certificate: another key, another fingerprint
    copy(certs.wrongname, cert)
    copy(certs.wrongname_key, key)
    hup(fe)
    assert served_fingerprint(fe.port) == der_fingerprint(certs.wrongname)
    assert "event=reload-failed" not in fe.log_text()
    still_works(m)


def test_hup_with_a_broken_configuration_keeps_the_old_one(
        listener, confdir, dovecot, certs):
    fe = listener(config(dovecot.port, "Old."))
    fe.start_listener()
    m = logged_in(fe.port)
    good = open(fe.conf).read()
    # a directive imapfe does not know, then a certificate that is not there
    for broken, why in (("no_such_directive 1\n", "no_such_directive"),
                        ("tls_cert %s\n" % os.path.join(confdir, "none.pem"),
                         "none.pem")):
        write(fe.conf, good + broken)
        hup(fe, "event=reload-failed")
        line = [x for x in fe.log_text().splitlines()
                if "event=reload-failed" in x][-1]
        assert why in line, line
        c = Raw(fe.port)
        assert c.greeting.endswith("Old."), c.greeting
        assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
        c.close()
    # a user the listener cannot become without a restart
    write(fe.conf, good.replace("user nobody", "user daemon"))
    hup(fe, "event=reload-failed")
    assert "user changed" in fe.log_text()
    assert Raw(fe.port).greeting.endswith("Old.")
    # fixed: the next SIGHUP takes the new greeting
    write(fe.conf, good.replace("greeting Old.", "greeting New."))
    hup(fe)
    c = Raw(fe.port)
    assert c.greeting.endswith("New."), c.greeting
    c.close()
    still_works(m)


def test_sessions_ignore_hup_and_quit(listener, dovecot):
    fe = listener(config(dovecot.port, "Old."))
    fe.start_listener()
    m = logged_in(fe.port)
    pid = session_pid(fe)
    os.kill(pid, signal.SIGHUP)
    os.kill(pid, signal.SIGQUIT)
    assert m.noop()[0] == "OK"
    still_works(m)


@pytest.mark.parametrize("prefork", [0, 3])
def test_listener_never_stops_accepting_across_many_hups(listener,
                                                         dovecot, prefork):
    fe = listener(config(dovecot.port, "Old.", "prefork %d\n" % prefork))
    fe.start_listener()
    done = threading.Event()
    failures, served = [], [0]

    def clients():
        while not done.is_set():
            try:
                c = Raw(fe.port, timeout=10 * SLOW)
                assert c.greeting.startswith("* OK"), c.greeting
                assert c.cmd("z", "LOGOUT")[-1].startswith("z OK")
                c.close()
                served[0] += 1
            except Exception as e:      # every failure is the test's
                failures.append(repr(e))
    t = threading.Thread(target=clients)
    t.start()
    try:
        for i in range(30):
            hup(fe)
            # a connection served between each reload and the next
            now = served[0]
            wait_for(lambda: served[0] > now or failures, 10 * SLOW,
                     "a connection after reload %d" % i)
    finally:
        done.set()
        t.join(timeout=30 * SLOW)
    assert failures == []
    assert served[0] >= 30
    assert fe.listener.poll() is None
    assert reloads(fe, "event=reload ") == 30
    assert "event=reload-failed" not in fe.log_text()


def authenticate_plain(c, tag, user, password):
    return c.cmd(tag, "AUTHENTICATE PLAIN " + b64("\0%s\0%s" % (
        user, password)))[-1]


def test_hup_sets_sasl_up_again(listener, confdir):
    """auth proxy: a reload takes a new SASL configuration (another
    sasldb, another password for alice) and the proxy password again."""
    backend = MasterDovecot({"proxy": "proxy-pw"})
    old_sasl = FrontSasl({"alice": "old-front-pw"})
    new_sasl = FrontSasl({"alice": "new-front-pw"})
    try:
        fill_inbox(backend)
        pw = os.path.join(confdir, "proxy-pw")
        write(pw, "proxy-pw\n")
        # as an admin would: readable by the group imapfe serves as
        os.chown(pw, 0, grp.getgrnam("nogroup").gr_gid)
        os.chmod(pw, 0o640)
        base = ("auth proxy\nproxy_user proxy\nproxy_password_file %s\n"
                % pw)
        fe = listener(config(backend.port, "Old.", base + old_sasl.config()))
        fe.start_listener()
        old = Raw(fe.port)
        OPEN_CLIENTS.append(old)
        assert authenticate_plain(old, "a", "alice",
                                  "old-front-pw").startswith("a OK")
        write(fe.conf, config(backend.port, "New.",
                              base + new_sasl.config()) + RUN_AS)
        hup(fe)
        c = Raw(fe.port)
        OPEN_CLIENTS.append(c)
        assert c.greeting.endswith("New.")
        assert authenticate_plain(c, "a", "alice",
                                  "old-front-pw").startswith("a NO")
        assert authenticate_plain(c, "b", "alice",
                                  "new-front-pw").startswith("b OK")
        for s in (old, c):
            assert s.cmd("c", "SELECT INBOX")[-1].startswith("c OK")
            assert s.cmd("d", "LOGOUT")[-1].startswith("d OK")
    finally:
        old_sasl.close()
        new_sasl.close()
        backend.close()


# --- SIGQUIT: drain ---------------------------------------------------------

@pytest.mark.parametrize("prefork", [0, 3])
def test_drain_refuses_new_connections_and_waits_for_sessions(listener,
                                                              dovecot,
                                                              prefork):
    fe = listener(config(dovecot.port, "Old.", "drain_timeout 600\n"
                         "prefork %d\n" % prefork))
    fe.start_listener()
    fe.wait_log("event=end")        # the readiness check's session
    m = logged_in(fe.port)
    fe.listener.send_signal(signal.SIGQUIT)
    fe.wait_log("event=drain-start sessions=1 timeout=600")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fe.port), timeout=5)
    assert fe.listener.poll() is None
    still_works(m)
    assert fe.listener.wait(timeout=20 * SLOW) == 0
    assert "event=drain-end sessions=0" in fe.log_text()
    assert "Server shutting down" not in fe.log_text()


def test_drain_timeout_ends_the_rest_with_bye(listener, dovecot):
    fe = listener(config(dovecot.port, "Old.", "drain_timeout 1\n"))
    fe.start_listener()
    fe.wait_log("event=end")        # the readiness check's session
    c = Raw(fe.port)
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    assert c.cmd("b", "SELECT INBOX")[-1].startswith("b OK")
    fe.listener.send_signal(signal.SIGQUIT)
    assert c.line() == "* BYE Server shutting down."
    assert fe.listener.wait(timeout=20 * SLOW) == 0
    log = fe.log_text()
    assert "event=drain-start sessions=1 timeout=1" in log
    assert "event=drain-end sessions=1" in log
    assert "reason=shutdown" in log


def test_sigterm_during_a_drain_ends_it_at_once(listener, dovecot):
    fe = listener(config(dovecot.port, "Old.", "drain_timeout 600\n"))
    fe.start_listener()
    c = Raw(fe.port)
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    fe.listener.send_signal(signal.SIGQUIT)
    fe.wait_log("event=drain-start")
    fe.listener.send_signal(signal.SIGTERM)
    assert c.line() == "* BYE Server shutting down."
    assert fe.listener.wait(timeout=20 * SLOW) == 0


# --- prefork: idle children waiting to accept -----------------------------

def children(fe):
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit()
                  and parent_of(int(p)) == fe.listener.pid)


def wait_children(fe, n, what):
    return wait_for(lambda: children(fe) if len(children(fe)) == n
                    else None, 10 * SLOW, what)


def connect_pids(fe):
    """The process of every session, from its event=connect line."""
    return [int(p) for p in re.findall(
        r"imapfe\[(\d+)\]: session=\w+ event=connect ", fe.log_text())]


def test_prefork_children_wait_and_serve_one_connection_each(listener,
                                                             dovecot):
    fe = listener(config(dovecot.port, "Old.", "prefork 3\n"))
    fe.start_listener()
    # start_listener's own check took one and the listener replaced it
    idle = wait_children(fe, 3, "three idle children")
    m = logged_in(fe.port)
    pid = session_pid(fe)
    assert pid in idle, (pid, idle)
    wait_children(fe, 4, "the session and three idle children")
    still_works(m)
    wait_children(fe, 3, "three idle children again")
    for _ in range(5):
        c = Raw(fe.port)
        assert c.cmd("z", "LOGOUT")[-1].startswith("z OK")
        c.close()
    pids = connect_pids(fe)
    assert len(pids) == 7 and len(set(pids)) == 7   # one connection each
    wait_children(fe, 3, "every session reaped, three idle children")
    assert not set(pids) & set(children(fe))


def test_prefork_stays_within_max_sessions(listener, dovecot):
    fe = listener(config(dovecot.port, "Old.",
                         "prefork 4\nmax_sessions 2\n"))
    fe.start_listener()
    wait_children(fe, 2, "two idle children, max_sessions' worth")
    sessions = [logged_in(fe.port) for _ in range(2)]
    c = Raw(fe.port)
    assert c.greeting == "* BYE Too many connections, try again later."
    assert len(children(fe)) == 2
    for m in sessions:
        still_works(m)
    wait_children(fe, 2, "two idle children again")


def test_reload_retires_idle_children(listener, dovecot):
    fe = listener(config(dovecot.port, "Old.", "prefork 2\n"))
    fe.start_listener()
    wait_children(fe, 2, "two idle children")
    m = logged_in(fe.port)
    wait_children(fe, 3, "the session and two idle children")
    write(fe.conf, config(dovecot.port, "New.", "prefork 2\n") + RUN_AS)
    session = session_pid(fe)
    idle_before = set(children(fe)) - {session}
    assert len(idle_before) == 2
    hup(fe)
    # at once: no idle child of the old configuration serves any more
    c = Raw(fe.port)
    assert c.greeting.endswith("New."), c.greeting
    c.close()
    # the idle ones leave; new ones wait with the new configuration
    wait_for(lambda: not idle_before & set(children(fe)) and
             len(children(fe)) == 3, 10 * SLOW, "idle children replaced")
    assert session in children(fe)
    for _ in range(3):
        c = Raw(fe.port)
        assert c.greeting.endswith("New."), c.greeting
        c.close()
    still_works(m)


# --- the unit ---------------------------------------------------------------

@pytest.mark.skipif(ANALYZE is None,
                    reason="systemd-analyze is not installed (no systemd)")
def test_listener_unit_passes_systemd_analyze_verify(tmp_path):
    with open(os.path.join(TOP, "imapfe-listener.service")) as f:
        text = f.read()
    for word in ("ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGQUIT",
                 "KillMode=mixed", "TimeoutStopSec=", "NoNewPrivileges=yes",
                 "ProtectSystem=strict",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID "
                 "CAP_SETGID", " -l "):
        assert word in text, word
    unit = tmp_path / "imapfe-listener.service"
    # verify checks that ExecStart's program exists: use the built one
    unit.write_text(text.replace("/usr/local/sbin/imapfe",
                                 os.path.abspath(BIN)))
    r = subprocess.run([ANALYZE, "verify", "--man=no", str(unit)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
