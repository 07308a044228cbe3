"""What the imapfe processes of a host share (issue 15): the failed-login
penalty per client address, session limits per address and per user,
back-ends found down, and a state file that cannot be used (imapfe goes
on without it)."""
import fcntl
import imaplib
import os
import signal
import subprocess
import socket
import threading
import time

import pytest

from conftest import (OPEN_CLIENTS, SLOW, USERS, Dovecot, Raw, base_config,
                      pid_alive, wait_for)
from fakebackend import FakeBackend, plain_server
from saslbed import FrontSasl

FIRST_MS = 150      # auth_penalty_first in these tests
MAX_MS = 600        # auth_penalty_max
# A penalty runs from the failure, which imapfe notes just before it
# answers: the time from one answer to the next is the delay less that
# moment (EARLY: a few milliseconds, tens under valgrind, which slows the
# log line and the write between the two), or late by a process start,
# a login and scheduling (more under valgrind or ASan).
EARLY = 0.02 * SLOW
LATE = 0.6 * SLOW
# connect_timeout where a back-end does not answer; a session that skips
# it must answer within half of it
CONNECT_TIMEOUT = 1 * SLOW


def penalty_config(port, extra=""):
    """alice is routed; anyone else is unknown, refused by imapfe itself
    (Dovecot's own penalty for 127.0.0.1 would blur the timings)."""
    return ("route alice 127.0.0.1:%d\n"
            "login_timeout %d\n"
            "auth_penalty_exempt none\n"
            "auth_penalty_first %d\n"
            "auth_penalty_max %d\n" % (port, 60 * SLOW, FIRST_MS, MAX_MS)
            + extra)


class Client(imaplib.IMAP4):
    """imaplib from a chosen loopback address (127.0.0.2 is another
    client, as far as imapfe can tell)."""

    def __init__(self, port, source="127.0.0.1"):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=30 * SLOW)
        OPEN_CLIENTS.append(self)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


def timed_login(port, user, password, source="127.0.0.1"):
    """(logged in?, seconds the LOGIN took) on a new connection."""
    ok, start, end = login_at(port, user, password, source)
    return ok, end - start


def login_at(port, user, password, source="127.0.0.1"):
    """(logged in?, when the LOGIN went, when its answer came)."""
    c = Client(port, source)
    start = time.monotonic()
    try:
        c.login(user, password)
        ok = True
    except imaplib.IMAP4.error:
        ok = False
    end = time.monotonic()
    if ok:
        c.logout()
    else:
        c.shutdown()
    return ok, start, end


def gaps(port, attempts, source="127.0.0.1", since=None):
    """Log in as each (user, password) in turn, each on a new connection:
    the seconds from each answer (or since) to the next."""
    ends = [] if since is None else [since]
    for user, password in attempts:
        ends.append(login_at(port, user, password, source)[2])
    return [b - a for a, b in zip(ends, ends[1:])]


def within(gap, delay_ms):
    return delay_ms / 1000.0 - EARLY <= gap < delay_ms / 1000.0 + LATE


def start(fe, mode):
    return fe.start_listener() if mode == "listener" else fe.start_inetd()


# --- failed-login penalty --------------------------------------------------

@pytest.mark.parametrize("mode", ["inetd", "listener"])
def test_penalty_doubles_per_failure_up_to_the_cap(imapfe_factory, dovecot,
                                                    mode):
    fe = imapfe_factory(penalty_config(dovecot.port))
    port = start(fe, mode)
    ok, sent, end = login_at(port, "mallory", "guess")
    assert not ok and end - sent < FIRST_MS / 1000.0, end - sent
    got = gaps(port, [("mallory", "guess%d" % i) for i in range(4)],
               since=end)
    # after 1, 2, 3 and 4 failures: 150, 300, 600 and the cap again (ms)
    for gap, want in zip(got, (150, 300, 600, 600)):
        assert within(gap, want), got
    log = fe.wait_log("delay_ms=600")
    for ms in (150, 300, 600):
        assert "event=penalty client=127.0.0.1 delay_ms=%d" % ms in log


def test_penalty_never_delays_another_address(imapfe_factory, dovecot):
    fe = imapfe_factory(penalty_config(dovecot.port))
    port = fe.start_inetd()
    for i in range(3):
        timed_login(port, "mallory", "guess%d" % i)
    last = login_at(port, "mallory", "guess3")[2]
    # 127.0.0.1 now waits the cap; 127.0.0.2 logs in at the same moment.
    result = {}

    def guesser():
        result["guess"] = login_at(port, "mallory", "again")
    t = threading.Thread(target=guesser)
    t.start()
    ok, took = timed_login(port, "alice", USERS["alice"], "127.0.0.2")
    t.join()
    assert ok and took < 0.5 * SLOW, took
    assert result["guess"][2] - last >= MAX_MS / 1000.0 - EARLY, result


def test_same_wrong_password_does_not_raise_the_penalty(imapfe_factory,
                                                         dovecot):
    fe = imapfe_factory(penalty_config(dovecot.port))
    port = fe.start_inetd()
    # one failure (150 ms), the same password three times more, then a
    # new one (still 150 after it: it counts), then a third (300)
    got = gaps(port, [("mallory", "same")] * 4 +
               [("mallory", "other"), ("mallory", "third")])
    for gap, want in zip(got, (150, 150, 150, 150, 300)):
        assert within(gap, want), got


def test_success_clears_the_penalty(imapfe_factory, dovecot):
    fe = imapfe_factory(penalty_config(dovecot.port))
    port = fe.start_inetd()
    timed_login(port, "mallory", "guess0")
    last = login_at(port, "mallory", "guess1")[2]
    ok, _, end = login_at(port, "alice", USERS["alice"])
    assert ok and end - last >= 0.3 - EARLY, end - last     # it waited
    ok, took = timed_login(port, "mallory", "guess9")
    assert not ok and took < 0.25, took             # and nothing is left


def test_wrong_password_at_the_backend_counts(imapfe_factory):
    """Passthrough: the back-end refuses the password, imapfe counts it.
    A scripted back-end: Dovecot's own penalty for 127.0.0.1 would slow
    the shared one's other tests."""
    fake = FakeBackend(lambda conn: plain_server(
        conn, accept=lambda user, pw: pw == b"right"))
    try:
        fe = imapfe_factory(penalty_config(fake.port))
        port = fe.start_inetd()
        ok, _, end = login_at(port, "alice", "wrong")
        assert not ok
        fe.wait_log("event=penalty client=127.0.0.1 delay_ms=150")
        ok, _, later = login_at(port, "alice", "right")
        assert ok and later - end >= 0.15 - EARLY
    finally:
        fake.close()


def test_penalty_in_auth_proxy_mode(imapfe_factory, dovecot, tmp_path):
    """imapfe checks the passwords itself (SASL): the same penalty."""
    sasl = FrontSasl({"alice": "secret"})
    try:
        pw = tmp_path / "proxy-pw"
        pw.write_text("unused\n")
        os.chmod(str(pw), 0o600)
        fe = imapfe_factory(penalty_config(dovecot.port,
                                           "auth proxy\n" + sasl.config() +
                                           "proxy_user proxy\n"
                                           "proxy_password_file %s\n" % pw))
        port = fe.start_inetd()
        got = gaps(port, [("alice", "guess%d" % i) for i in range(3)])
        assert within(got[0], 150) and within(got[1], 300), got
        fe.wait_log("event=penalty client=127.0.0.1 delay_ms=300")
    finally:
        sasl.close()


def test_loopback_is_exempt_by_default(imapfe_factory, dovecot):
    fe = imapfe_factory("route alice 127.0.0.1:%d\n" % dovecot.port)
    port = fe.start_inetd()
    took = [timed_login(port, "mallory", "guess%d" % i)[1] for i in range(3)]
    assert max(took) < 0.25 * SLOW, took
    assert "event=penalty" not in fe.log_text()


# --- session limits ----------------------------------------------------------

class RawFrom(Raw):
    """conftest's Raw client, from a chosen loopback address."""

    def __init__(self, port, source="127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", port), 10 * SLOW,
                                             source_address=(source, 0))
        self.buf = b""
        OPEN_CLIENTS.append(self)
        self.greeting = self.line()


def greeting(port, source="127.0.0.1"):
    return RawFrom(port, source)


def session_pids(fe):
    """The imapfe processes now serving a session (inetd style)."""
    return [p for p in fe.procs.procs if p.poll() is None]


def sigkill_session(fe, proc):
    """SIGKILL one session's process; the test bed is told not to count
    its status against the test."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fe.procs.procs.remove(proc)


def test_per_address_limit_refuses_with_unavailable(imapfe_factory,
                                                     dovecot):
    fe = imapfe_factory(base_config(dovecot.port,
                                    "max_sessions_per_ip 2\n"))
    port = fe.start_inetd()
    a, b = greeting(port), greeting(port)
    assert a.greeting.startswith("* OK") and b.greeting.startswith("* OK")
    c = greeting(port)
    assert c.greeting.startswith("* BYE [UNAVAILABLE]"), c.greeting
    assert c.closed()
    c.close()
    fe.wait_log('reason="max_sessions_per_ip (2) reached"')
    # another address is counted apart
    assert greeting(port, "127.0.0.2").greeting.startswith("* OK")
    # a session that ends frees its slot
    a.cmd("a1", "LOGOUT")
    wait_for(lambda: greeting(port).greeting.startswith("* OK"), 10 * SLOW,
             "a slot freed by LOGOUT")


def test_sigkilled_session_frees_its_slot_and_no_lock(imapfe_factory,
                                                      dovecot):
    fe = imapfe_factory(base_config(dovecot.port,
                                    "max_sessions_per_ip 1\n"))
    port = fe.start_inetd()
    a = greeting(port)
    assert a.greeting.startswith("* OK")
    refused = greeting(port)
    assert refused.greeting.startswith("* BYE [UNAVAILABLE]")
    refused.close()
    wait_for(lambda: len(session_pids(fe)) == 1, 10 * SLOW, "one session")
    victim = session_pids(fe)[0]
    sigkill_session(fe, victim)
    assert not pid_alive(victim.pid)
    # nothing holds the lock: take it, as another process would
    with open(os.path.join(fe.tmp, "state"), "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(f, fcntl.LOCK_UN)
    c = greeting(port)
    assert c.greeting.startswith("* OK"), c.greeting
    c.cmd("a1", 'LOGIN alice "%s"' % USERS["alice"])


def test_per_user_limit_refuses_with_no_limit(imapfe_factory, dovecot):
    fe = imapfe_factory(base_config(dovecot.port,
                                    "max_sessions_per_user 1\n"))
    port = fe.start_inetd()
    first = Client(port)
    first.login("alice", USERS["alice"])
    c = greeting(port)
    lines = c.cmd("a1", 'LOGIN alice "%s"' % USERS["alice"])
    assert lines[-1].startswith("a1 NO [LIMIT]"), lines
    fe.wait_log('event=login-refused user="alice" '
                'reason="max_sessions_per_user (1) reached"')
    # another user is not counted with alice; the session goes on
    lines = c.cmd("a2", 'LOGIN bob "%s"' % USERS["bob"])
    assert lines[-1].startswith("a2 OK"), lines
    first.logout()
    wait_for(lambda: timed_login(port, "alice", USERS["alice"])[0],
             10 * SLOW, "alice's slot back after LOGOUT")


@pytest.mark.parametrize("mode", ["inetd", "listener"])
def test_concurrent_sessions_are_counted_exactly(imapfe_factory, dovecot,
                                                 mode):
    """Twelve connections at once from one address, limit 5: five greeted
    whatever the order the processes start in."""
    fe = imapfe_factory(base_config(dovecot.port, "max_sessions_per_ip 5\n"))
    port = start(fe, mode)
    got = []
    lock = threading.Lock()

    def connect():
        c = greeting(port)
        with lock:
            got.append(c.greeting)
        if c.greeting.startswith("* BYE"):
            c.close()
    threads = [threading.Thread(target=connect) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [g for g in got if g.startswith("* OK")]
    refused = [g for g in got if g.startswith("* BYE [UNAVAILABLE]")]
    assert len(ok) == 5 and len(refused) == 7, got
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()      # before the listener stops


# --- back-ends found down ----------------------------------------------------

def unresponsive_port():
    """A listening socket whose backlog is full: connections to it time
    out rather than fail (SYNs are dropped), as a dead host's do."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        fillers.append(f)
    probe = socket.socket()
    probe.settimeout(0.5)
    with pytest.raises(OSError):
        probe.connect(("127.0.0.1", port))
    probe.close()
    return port, [srv, probe] + fillers


def test_backend_down_is_skipped_quickly_by_the_next_session(
        imapfe_factory):
    port, keep = unresponsive_port()
    try:
        fe = imapfe_factory(base_config(port, "connect_timeout %d\n"
                                        "backend_down_time 60\n"
                                        % CONNECT_TIMEOUT))
        fe_port = fe.start_inetd()
        ok, first = timed_login(fe_port, "alice", USERS["alice"])
        assert not ok and first >= CONNECT_TIMEOUT, first
        fe.wait_log("event=backend-down backend=127.0.0.1:%d" % port)
        ok, second = timed_login(fe_port, "alice", USERS["alice"])
        assert not ok and second < 0.5 * CONNECT_TIMEOUT, second
        assert "marked down" in fe.wait_log("marked down")
    finally:
        for s in keep:
            s.close()


def test_backend_that_never_greets_is_marked_down_too(imapfe_factory):
    """A hung server: the kernel takes the connection, nothing answers."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)                     # never accepted, never greeted
    port = hung.getsockname()[1]
    try:
        fe = imapfe_factory(base_config(port, "backend_timeout %d\n"
                                        "backend_down_time 60\n"
                                        % CONNECT_TIMEOUT))
        fe_port = fe.start_inetd()
        ok, first = timed_login(fe_port, "alice", USERS["alice"])
        assert not ok and first >= CONNECT_TIMEOUT, first
        fe.wait_log("no greeting within backend_timeout")
        fe.wait_log("event=backend-down backend=127.0.0.1:%d" % port)
        ok, second = timed_login(fe_port, "alice", USERS["alice"])
        assert not ok and second < 0.5 * CONNECT_TIMEOUT, second
    finally:
        hung.close()


# --- a state file that cannot be used --------------------------------------

def damage(path, how):
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "random":
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(os.urandom(size))
    elif how == "foreign":
        with open(path, "w") as f:
            f.write("not imapfe's\n")
    elif how == "deleted":
        os.unlink(path)


@pytest.mark.parametrize("how", ["truncated", "random", "foreign",
                                 "deleted"])
def test_damaged_state_file_logins_still_work(imapfe_factory, dovecot, how):
    fe = imapfe_factory(penalty_config(dovecot.port,
                                       "max_sessions_per_ip 3\n"))
    port = fe.start_inetd()
    assert timed_login(port, "alice", USERS["alice"])[0]
    path = os.path.join(fe.tmp, "state")
    assert os.path.getsize(path) > 0
    damage(path, how)
    for _ in range(2):
        ok, took = timed_login(port, "alice", USERS["alice"])
        assert ok and took < 0.5 * SLOW
    if how == "deleted":
        assert os.path.getsize(path) > 0          # made again
        assert "event=state-error" not in fe.log_text()
    else:
        log = fe.wait_log("event=state-error")
        assert "no login penalties" in log
        # failures are not counted (fail open), and nothing crashed
        took = [timed_login(port, "mallory", "g%d" % i)[1] for i in range(3)]
        assert max(took) < 0.25 * SLOW, took


@pytest.mark.parametrize("where", ["directory", "readonly"])
def test_unwritable_state_file_logins_still_work(imapfe_factory, dovecot,
                                                 tmp_path, where):
    path = str(tmp_path / "statedir")
    if where == "directory":
        os.mkdir(path)
    else:
        path = "/proc/version"          # not writable, even by root
    fe = imapfe_factory(base_config(dovecot.port,
                                    "state_file %s\n" % path))
    port = fe.start_inetd()
    assert timed_login(port, "alice", USERS["alice"])[0]
    fe.wait_log("event=state-error file=%s" % path)


def test_two_configurations_share_one_file(imapfe_factory, dovecot,
                                           tmp_path):
    shared = "state_file %s\n" % (tmp_path / "shared-state")
    one = imapfe_factory(penalty_config(dovecot.port, shared), name="one")
    two = imapfe_factory(penalty_config(dovecot.port, shared), name="two")
    p1, p2 = one.start_inetd(), two.start_listener()
    timed_login(p1, "mallory", "g1")
    last = login_at(p2, "mallory", "g2")[2]
    assert within(login_at(p1, "mallory", "g3")[2] - last, 300)


def test_state_none_turns_it_all_off(imapfe_factory, dovecot):
    fe = imapfe_factory(penalty_config(dovecot.port, "state_file none\n"))
    port = fe.start_inetd()
    took = [timed_login(port, "mallory", "guess%d" % i)[1] for i in range(3)]
    assert max(took) < 0.25 * SLOW, took
    assert not os.path.exists(os.path.join(fe.tmp, "state"))


# --- several servers on one line -------------------------------------------

def logged_in_backend(fe, nth):
    """host:port of the nth event=login line (from 0)."""
    lines = [ln for ln in fe.log_text().splitlines() if "event=login " in ln]
    return lines[nth].split(" backend=")[1].split()[0]


def test_failover_to_the_second_server_then_straight_there(imapfe_factory,
                                                           dovecot):
    dead, keep = unresponsive_port()
    try:
        fe = imapfe_factory("route * 127.0.0.1:%d 127.0.0.1:%d\n"
                            "connect_timeout %d\nbackend_down_time 60\n"
                            % (dead, dovecot.port, CONNECT_TIMEOUT))
        port = fe.start_inetd()
        ok, first = timed_login(port, "alice", USERS["alice"])
        assert ok and first >= CONNECT_TIMEOUT, first
        fe.wait_log("event=failover user=\"alice\" from=127.0.0.1:%d" % dead)
        ok, second = timed_login(port, "bob", USERS["bob"])
        assert ok and second < 0.5 * CONNECT_TIMEOUT, second
        assert logged_in_backend(fe, 1) == "127.0.0.1:%d" % dovecot.port
        assert "marked down" in fe.log_text()
    finally:
        for s in keep:
            s.close()


def test_first_server_used_again_once_back(imapfe_factory, dovecot):
    primary = Dovecot()
    try:
        fe = imapfe_factory("route * 127.0.0.1:%d 127.0.0.1:%d\n"
                            "backend_down_time 1\n"
                            % (primary.port, dovecot.port))
        port = fe.start_inetd()
        primary.stop()
        assert timed_login(port, "alice", USERS["alice"])[0]
        assert logged_in_backend(fe, 0) == "127.0.0.1:%d" % dovecot.port
        primary.start()
        here = "127.0.0.1:%d" % primary.port

        def back_on_primary():
            n = fe.log_text().count("event=login ")
            assert timed_login(port, "alice", USERS["alice"])[0]
            return logged_in_backend(fe, n) == here
        wait_for(back_on_primary, 15 * SLOW, "logins on the first again")
        fe.wait_log("event=backend-up backend=" + here)
    finally:
        primary.close()


def fnv1a(name):
    h = 2166136261
    for b in name.encode():
        h = ((h ^ b) * 16777619) & 0xffffffff
    return h


def test_order_hash_keeps_each_user_on_one_server(imapfe_factory, dovecot):
    other = Dovecot()
    try:
        servers = [dovecot.port, other.port]
        fe = imapfe_factory("route * 127.0.0.1:%d 127.0.0.1:%d order=hash\n"
                            % tuple(servers))
        port = fe.start_inetd()
        n = 0
        for user in ("alice", "bob"):
            want = "127.0.0.1:%d" % servers[fnv1a(user) % 2]
            for _ in range(2):
                assert timed_login(port, user, USERS[user])[0]
                assert logged_in_backend(fe, n) == want, user
                n += 1
    finally:
        other.close()


@pytest.mark.parametrize("line, why", [
    ("route * 127.0.0.1:143 127.0.0.1:99999",
     "bad route target '127.0.0.1:99999': the port must be"),
    ("route * 127.0.0.1:143 127.0.0.1:144 order=sometimes",
     "order= takes first or hash"),
    ("public P/ ldap 127.0.0.1:143", "public PREFIX ldap names no"),
])
def test_bad_server_lists_are_configuration_errors(tmp_path, line, why):
    bad = tmp_path / "bad.conf"
    bad.write_text("plaintext_auth yes\nldap_uri ldap://127.0.0.1:9\n"
                   "route * 127.0.0.1:143\n%s\n" % line)
    r = subprocess.run([os.environ.get("IMAPFE_BIN") or
                        os.path.join(os.path.dirname(__file__), "..",
                                     "imapfe"), "-t", "-f", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "bad.conf:4: " + why in r.stderr, r.stderr
