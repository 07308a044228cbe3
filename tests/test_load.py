"""Load and faults (issue 6, item 8): many concurrent sessions through one
imapfe -l listener to one real Dovecot, each looping LOGIN, SELECT, FETCH,
APPEND and LOGOUT for a fixed time; then the same with Dovecot killed
(SIGKILL to its process group, by PID) and restarted in the middle.

What is asserted afterwards, and why:
  * every connection ended with a proper answer: the server's "* BYE"
    before EOF (after LOGOUT, or imapfe's own BYE when the back-end went
    away), never an EOF or reset without one, and no command ever waited
    past the client's timeout;
  * no imapfe child of the listener is left, zombie or not;
  * no message lost or duplicated: each APPEND carries a unique number,
    recorded as "acknowledged" only once its tagged OK arrived.  An
    acknowledged message must be on Dovecot exactly once.  An APPEND cut
    off by the back-end's death has no answer; its message may or may not
    have been stored before Dovecot died, so it must be there at most
    once.  Nothing else may be there;
  * the listener still serves a fresh login.

Sizes (environment): IMAPFE_LOAD_SESSIONS (default 500, 100 under ASan,
20 under valgrind) and IMAPFE_LOAD_SECONDS (default 5; the restart phase
runs twice that); "make load" runs it longer.
"""
import collections
import os
import resource
import signal
import socket
import threading
import time

from conftest import BIN, SLOW, VALGRIND, Dovecot, read_greeting, wait_for

ASAN = BIN.endswith("-asan")
SESSIONS = int(os.environ.get("IMAPFE_LOAD_SESSIONS",
                              20 if VALGRIND else 100 if ASAN else 500))
SECONDS = float(os.environ.get("IMAPFE_LOAD_SECONDS", 5))
ANSWER_TIMEOUT = 60 * SLOW          # no command may wait longer
PASSWORD = "load-pw"


def raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def dovecot_for(n):
    """A Dovecot with one user per session and room for n of them."""
    limits = ("default_process_limit = %d\ndefault_client_limit = %d\n"
              "mail_max_userip_connections = %d\n"
              % (n + 100, 4 * n + 400, n + 100))
    passwd = "".join("u%d:{PLAIN}%s::::::\n" % (i, PASSWORD)
                     for i in range(n))
    return Dovecot(extra_conf=limits, passwd=passwd)


class Dropped(Exception):
    """EOF or reset without a BYE first."""


class Refused(Exception):
    """The listener's "* BYE Too many connections" greeting."""


class Client:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port),
                                             timeout=ANSWER_TIMEOUT)
        self.buf = b""
        self.saw_bye = False
        if self.line().startswith(b"* BYE"):
            raise Refused()

    def line(self):
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise
            except OSError as e:
                raise Dropped(str(e))
            if not chunk:
                raise Dropped("EOF")
            self.buf += chunk
        ln, self.buf = self.buf.split(b"\r\n", 1)
        if ln.startswith(b"* BYE"):
            self.saw_bye = True
        return ln

    def cmd(self, tag, data):
        self.sock.sendall(data)
        while True:
            ln = self.line()
            if ln.startswith(tag + b" "):
                return ln.split(b" ")[1].decode()

    def close(self):
        self.sock.close()


def message(phase, s, q):
    return ("From: load@example.org\r\nSubject: load %s-%d-%d\r\n\r\n"
            "body %s-%d-%d\r\n" % (phase, s, q, phase, s, q)).encode()


class Load:
    """The client side: one thread per session, and the tallies."""

    def __init__(self, port, sessions=SESSIONS):
        self.port = port
        self.sessions = sessions
        self.lock = threading.Lock()
        self.count = collections.Counter()
        self.acked = set()          # (phase, session, seq) with tagged OK
        self.tried = set()          # every APPEND sent

    def note(self, what, n=1):
        with self.lock:
            self.count[what] += n

    def one_connection(self, phase, s, q):
        """One login-to-logout cycle; returns the next sequence number."""
        try:
            c = Client(self.port)
        except Refused:
            self.note("refused at max_sessions")
            return q
        except (OSError, Dropped):
            self.note("connect failed")
            return q
        try:
            st = c.cmd(b"a", b"a LOGIN u%d %s\r\n" % (s, PASSWORD.encode()))
            self.note("login " + st)
            if st == "OK":
                self.note("select " + c.cmd(b"b", b"b SELECT INBOX\r\n"))
                self.note("fetch " + c.cmd(b"c", b"c UID FETCH 1:* "
                                           b"(FLAGS)\r\n"))
                # Each number is sent once, whatever its answer.
                body = message(phase, s, q)
                with self.lock:
                    self.tried.add((phase, s, q))
                q += 1
                st = c.cmd(b"d", b"d APPEND INBOX {%d+}\r\n%s\r\n"
                           % (len(body), body))
                self.note("append " + st)
                if st == "OK":
                    with self.lock:
                        self.acked.add((phase, s, q - 1))
            st = c.cmd(b"z", b"z LOGOUT\r\n")
            self.note("logout " + st)
            if not c.saw_bye:
                self.note("logout without BYE")
        except socket.timeout:
            self.note("no answer in time")
        except Dropped:
            if c.saw_bye:
                self.note("ended by BYE")
            else:
                self.note("dropped without BYE")
        finally:
            c.close()
        self.note("connections")
        return q

    def session(self, phase, s, until):
        q = 0
        while time.monotonic() < until:
            q = self.one_connection(phase, s, q)

    def run(self, phase, seconds, during=None):
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=self.session,
                                    args=(phase, s, until), daemon=True)
                   for s in range(self.sessions)]
        for t in threads:
            t.start()
        try:
            if during is not None:
                during()
        finally:
            for t in threads:
                t.join(timeout=seconds + 4 * ANSWER_TIMEOUT)
        assert not any(t.is_alive() for t in threads), "sessions hang"


def children(pid):
    """(pid, state) of every process whose parent is pid."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append((int(d), fields[0]))
    return out


def stored_messages(dovecot, sessions=SESSIONS):
    """How often each (phase, session, seq) is on Dovecot."""
    import imaplib
    seen = collections.Counter()
    for s in range(sessions):
        m = imaplib.IMAP4("127.0.0.1", dovecot.port)
        m.login("u%d" % s, PASSWORD)
        typ, data = m.select("INBOX", readonly=True)
        if int(data[0]) > 0:
            typ, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS "
                                "(SUBJECT)])")
            for item in data:
                if isinstance(item, tuple):
                    subj = item[1].decode().split("load ", 1)[1].strip()
                    ph, ss, qq = subj.split("-")
                    seen[(ph, int(ss), int(qq))] += 1
        m.logout()
    return seen


def maildir_files(dovecot, keys):
    """Where Dovecot keeps the messages of keys, for a failure's report."""
    found = {}
    for phase, s, q in keys:
        needle = ("Subject: load %s-%d-%d\n" % (phase, s, q)).encode()
        top = os.path.join(dovecot.dir, "mail", "u%d" % s)
        for d, _, files in os.walk(top):
            for name in files:
                path = os.path.join(d, name)
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.setdefault((phase, s, q), []).append(
                            os.path.relpath(path, top))
    return found


def kill_and_restart(dovecot, after, took):
    """SIGKILL Dovecot's whole process group (its master's PID), then start
    it again; took gets the seconds it was away."""
    time.sleep(after)
    killed = time.monotonic()
    os.killpg(dovecot.proc.pid, signal.SIGKILL)
    dovecot.proc.wait()
    dovecot.proc = None
    wait_for(lambda: read_greeting(dovecot.port, timeout=0.2) == b"", 20,
             "dovecot to die")
    # Hundreds of imapfe sessions knocking make its start slow.
    dovecot.start(timeout=90)
    took.append(time.monotonic() - killed)


def test_load_and_backend_restart(imapfe_factory):
    raise_fd_limit(8 * SESSIONS + 1024)
    dovecot = dovecot_for(SESSIONS)
    try:
        # Room for sessions still exiting while their client reconnects.
        f = imapfe_factory("route * 127.0.0.1:%d\nmax_sessions %d\n"
                           % (dovecot.port, 3 * SESSIONS))
        port = f.start_listener()
        listener = f.listener.pid
        peak = [0]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], len(children(listener)))
                time.sleep(0.2)
        threading.Thread(target=watch, daemon=True).start()

        load = Load(port)
        started = time.monotonic()
        load.run("calm", SECONDS)
        away = []
        load.run("restart", SECONDS * 2,
                 during=lambda: kill_and_restart(dovecot, SECONDS * 0.6,
                                                 away))
        duration = time.monotonic() - started
        # Sessions end on their own; the listener reaps every one, and
        # only the one pre-forked child (prefork's default) is left.
        wait_for(lambda: len(children(listener)) == 1, 30,
                 "the listener's children to be gone and reaped")
        stop.set()
        stored = stored_messages(dovecot)

        lost = [k for k in load.acked if stored[k] != 1]
        unasked = [k for k in stored if k not in load.tried]
        doubled = [k for k in load.tried if stored[k] > 1]
        print("\nload: %d sessions, %.0f s (Dovecot away %.1f s), peak %d "
              "imapfe children; %s; %d APPENDs acknowledged, %d unanswered "
              "of which %d stored"
              % (SESSIONS, duration, away[0], peak[0],
                 ", ".join("%s %d" % kv for kv in sorted(load.count.items())),
                 len(load.acked), len(load.tried - load.acked),
                 sum(1 for k in load.tried - load.acked if stored[k])))
        assert load.count["dropped without BYE"] == 0
        assert load.count["no answer in time"] == 0
        assert load.count["logout without BYE"] == 0
        assert load.count["connect failed"] == 0
        # Far under max_sessions: a refusal means the listener lost count.
        assert load.count["refused at max_sessions"] == 0
        assert load.count["login OK"] > SESSIONS
        assert not lost and not unasked and not doubled, \
            (lost[:5], unasked[:5], doubled[:5],
             maildir_files(dovecot, (lost + unasked + doubled)[:3]))
        # The restart must have been felt, and answered properly.
        assert load.count["ended by BYE"] + load.count["login NO"] > 0

        import imaplib
        m = imaplib.IMAP4("127.0.0.1", port)
        m.login("u0", PASSWORD)
        assert m.select("INBOX")[0] == "OK"
        m.logout()
    finally:
        dovecot.close()


def kill_for_a_while(dovecot, after, away, took):
    """SIGKILL Dovecot's process group after `after` seconds, start it
    again `away` seconds later; took gets the seconds it was gone."""
    time.sleep(after)
    killed = time.monotonic()
    os.killpg(dovecot.proc.pid, signal.SIGKILL)
    dovecot.proc.wait()
    dovecot.proc = None
    time.sleep(away)
    dovecot.start(timeout=90)
    took.append(time.monotonic() - killed)


def logins_on(log, dovecot):
    return sum(1 for ln in log.splitlines() if "event=login " in ln and
               "backend=127.0.0.1:%d" % dovecot.port in ln)


# A fifth of the load test's sessions: enough to have logins in flight at
# the kill and on both sides of it, at a fifth of the time.
FAILOVER_SESSIONS = max(4, SESSIONS // 5)


def test_load_with_failover_to_a_second_server(imapfe_factory):
    """Two Dovecots on one route line (issue 15): the first is SIGKILLed
    mid-run and started again.  Sessions on it end with a BYE; logins go
    on on the second with no answer lost (a login in flight at the kill
    at most); the first is used again once it is back; every acknowledged
    message is on one of them exactly once."""
    n = FAILOVER_SESSIONS
    raise_fd_limit(8 * n + 1024)
    first, second = dovecot_for(n), dovecot_for(n)
    try:
        f = imapfe_factory("route * 127.0.0.1:%d 127.0.0.1:%d\n"
                           "max_sessions %d\nbackend_down_time 1\n"
                           % (first.port, second.port, 3 * n))
        port = f.start_listener()
        load = Load(port, n)
        took = []
        load.run("failover", SECONDS * 2,
                 during=lambda: kill_for_a_while(first, SECONDS * 0.4,
                                                 SECONDS * 0.6, took))
        # only the one pre-forked child (prefork's default) is left
        wait_for(lambda: len(children(f.listener.pid)) == 1, 30,
                 "the listener's children to be gone and reaped")
        stored = stored_messages(first, n) + stored_messages(second, n)
        log = f.log_text()
        print("\nfailover: %d sessions, first away %.1f s; %s; logins on "
              "the first %d, the second %d"
              % (n, took[0], ", ".join(
                  "%s %d" % kv for kv in sorted(load.count.items())),
                 logins_on(log, first), logins_on(log, second)))
        assert load.count["dropped without BYE"] == 0
        assert load.count["no answer in time"] == 0
        assert load.count["connect failed"] == 0
        assert load.count["refused at max_sessions"] == 0
        assert load.count["login NO"] <= n          # in flight at most
        assert load.count["login OK"] > n
        assert "event=failover" in log and logins_on(log, second) > 0
        # back on the first once it answered again
        up = log.index("event=backend-up backend=127.0.0.1:%d" % first.port)
        assert logins_on(log[up:], first) > 0
        lost = [k for k in load.acked if stored[k] != 1]
        unasked = [k for k in stored if k not in load.tried]
        doubled = [k for k in load.tried if stored[k] > 1]
        assert not lost and not unasked and not doubled, \
            (lost[:5], unasked[:5], doubled[:5])
    finally:
        first.close()
        second.close()
