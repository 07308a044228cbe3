"""What the imapfe processes of a host share (issue 15): the failed-login
penalty per client address, session limits per address and per user,
back-ends found down, and a state file that cannot be used (imapfe goes
on without it)."""
import fcntl
import imaplib
import os
import signal
import socket
import threading
import time

import pytest

from conftest import (OPEN_CLIENTS, SLOW, USERS, Dovecot, Raw, base_config,
                      pid_alive, wait_for)
from saslbed import FrontSasl

FIRST_MS = 300      # auth_penalty_first in these tests
MAX_MS = 1200       # auth_penalty_max
# A measured delay may be late by scheduling (more under valgrind), never
# early: the lower bounds are tight, the upper ones generous.
LATE = 0.25 * SLOW


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
    c = Client(port, source)
    start = time.monotonic()
    try:
        c.login(user, password)
        ok = True
    except imaplib.IMAP4.error:
        ok = False
    took = time.monotonic() - start
    if ok:
        c.logout()
    else:
        c.shutdown()
    return ok, took


def start(fe, mode):
    return fe.start_listener() if mode == "listener" else fe.start_inetd()


# --- failed-login penalty --------------------------------------------------

@pytest.mark.parametrize("mode", ["inetd", "listener"])
def test_penalty_doubles_per_failure_up_to_the_cap(imapfe_factory, dovecot,
                                                    mode):
    fe = imapfe_factory(penalty_config(dovecot.port))
    port = start(fe, mode)
    took = []
    for i in range(5):
        ok, t = timed_login(port, "mallory", "guess%d" % i)
        assert not ok
        took.append(t)
    # no failure yet, then 300, 600, 1200 and the cap again (ms)
    assert took[0] < FIRST_MS / 1000.0, took
    for n, want in ((1, 0.3), (2, 0.6), (3, 1.2), (4, 1.2)):
        assert want - 0.05 <= took[n] < want + LATE, (n, took)
    log = fe.wait_log("delay_ms=1200")
    for ms in (300, 600, 1200):
        assert "event=penalty client=127.0.0.1 delay_ms=%d" % ms in log


def test_penalty_never_delays_another_address(imapfe_factory, dovecot):
    fe = imapfe_factory(penalty_config(dovecot.port))
    port = fe.start_inetd()
    for i in range(4):
        timed_login(port, "mallory", "guess%d" % i)
    # 127.0.0.1 now waits the cap; 127.0.0.2 logs in at the same moment.
    result = {}

    def guesser():
        result["guess"] = timed_login(port, "mallory", "again")
    t = threading.Thread(target=guesser)
    t.start()
    ok, took = timed_login(port, "alice", USERS["alice"], "127.0.0.2")
    t.join()
    assert ok and took < 0.5 * SLOW, took
    assert result["guess"][1] >= MAX_MS / 1000.0 - 0.05, result


def test_same_wrong_password_does_not_raise_the_penalty(imapfe_factory,
                                                         dovecot):
    fe = imapfe_factory(penalty_config(dovecot.port))
    port = fe.start_inetd()
    timed_login(port, "mallory", "same")            # one failure: 300
    for _ in range(3):                              # the same one again
        ok, took = timed_login(port, "mallory", "same")
        assert not ok and 0.25 <= took < 0.3 + LATE, took
    ok, took = timed_login(port, "mallory", "other")   # a new one counts
    assert 0.25 <= took < 0.3 + LATE, took
    ok, took = timed_login(port, "mallory", "third")
    assert 0.55 <= took < 0.6 + LATE, took


def test_success_clears_the_penalty(imapfe_factory, dovecot):
    fe = imapfe_factory(penalty_config(dovecot.port))
    port = fe.start_inetd()
    for i in range(3):
        timed_login(port, "mallory", "guess%d" % i)
    ok, took = timed_login(port, "alice", USERS["alice"])
    assert ok and took >= 0.55, took                # it waited too
    ok, took = timed_login(port, "mallory", "guess9")
    assert not ok and took < 0.25, took             # and nothing is left


def test_wrong_password_at_the_backend_counts(imapfe_factory):
    """Passthrough: Dovecot refuses the password, imapfe counts it.  A
    Dovecot of its own: its penalty for 127.0.0.1 would slow the shared
    one's other tests."""
    d = Dovecot()
    try:
        fe = imapfe_factory(penalty_config(d.port))
        port = fe.start_inetd()
        ok, _ = timed_login(port, "alice", "wrong")
        assert not ok
        fe.wait_log("event=penalty client=127.0.0.1 delay_ms=300")
        ok, took = timed_login(port, "alice", USERS["alice"])
        assert ok and took >= 0.25, took
    finally:
        d.close()


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
        took = [timed_login(port, "alice", "guess%d" % i)[1]
                for i in range(3)]
        assert took[0] < 0.25 and 0.25 <= took[1] < 0.3 + LATE and \
            0.55 <= took[2] < 0.6 + LATE, took
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
    assert greeting(port).greeting.startswith("* BYE [UNAVAILABLE]")
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
    threads = [threading.Thread(target=connect) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [g for g in got if g.startswith("* OK")]
    refused = [g for g in got if g.startswith("* BYE [UNAVAILABLE]")]
    assert len(ok) == 5 and len(refused) == 7, got


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
        fe = imapfe_factory(base_config(port, "connect_timeout 2\n"
                                        "backend_down_time 60\n"))
        fe_port = fe.start_inetd()
        ok, first = timed_login(fe_port, "alice", USERS["alice"])
        assert not ok and first >= 1.9, first
        fe.wait_log("event=backend-down backend=127.0.0.1:%d" % port)
        ok, second = timed_login(fe_port, "alice", USERS["alice"])
        assert not ok and second < 0.5 * 2, second
        assert "marked down" in fe.wait_log("marked down")
    finally:
        for s in keep:
            s.close()


def test_backend_back_up_is_used_again(imapfe_factory, tmp_path):
    d = Dovecot()
    try:
        fe = imapfe_factory(base_config(d.port, "backend_down_time 2\n"))
        port = fe.start_inetd()
        d.stop()
        assert not timed_login(port, "alice", USERS["alice"])[0]
        fe.wait_log("event=backend-down backend=127.0.0.1:%d" % d.port)
        d.start()
        # refused at once while marked, then tried again and found up
        assert not timed_login(port, "alice", USERS["alice"])[0]
        wait_for(lambda: timed_login(port, "alice", USERS["alice"])[0],
                 15 * SLOW, "login once the mark's time is up")
        fe.wait_log("event=backend-up backend=127.0.0.1:%d" % d.port)
    finally:
        d.close()


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
    timed_login(p2, "mallory", "g2")
    ok, took = timed_login(p1, "mallory", "g3")
    assert 0.55 <= took < 0.6 + LATE, took


def test_state_none_turns_it_all_off(imapfe_factory, dovecot):
    fe = imapfe_factory(penalty_config(dovecot.port, "state_file none\n"))
    port = fe.start_inetd()
    took = [timed_login(port, "mallory", "guess%d" % i)[1] for i in range(3)]
    assert max(took) < 0.25 * SLOW, took
    assert not os.path.exists(os.path.join(fe.tmp, "state"))
