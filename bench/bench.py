#!/usr/bin/python3
"""imapfe's benchmark: direct access to a real Dovecot, imapfe under
xinetd and under -l (relayed, and routed through the command router),
nginx's mail proxy, perdition and HAProxy, side by side in one run.  See
bench/README.md for what each figure means.

Servers run on CPU 0 and this load generator on CPU 1 when there are two
CPUs.  Every figure is the median of ROUNDS rounds, the targets taking
turns within each round so that noise from a shared machine spreads over
all of them alike.

usage: bench/bench.py [--rounds N] [--quick] [--json FILE] [--only NAME]
"""
import argparse
import json
import re
import os
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TOP, "tests"))
from conftest import (USERS, Certs, Dovecot, free_port,  # noqa: E402
                      read_greeting, sample_message, wait_for)

BIN = os.environ.get("IMAPFE_BIN", os.path.join(TOP, "imapfe"))
USER, PASSWORD = "alice", USERS["alice"]
BIG = 10 * 1024 * 1024
SMALL_COUNT = 1000
STRESS_COUNT = 30        # small messages in `stress`, for short sessions
STRESS_CLIENTS = 16      # clients doing short sessions at once
PIPELINED = 200          # commands in the pipelined figure, <= SMALL_COUNT
MB = 1e6


# ---------------------------------------------------------------------------
# CPU pinning: servers inherit CPU 0 from this process; then it moves to 1.

def cpus():
    return sorted(os.sched_getaffinity(0))


ALL_CPUS = cpus()
PINNED = len(ALL_CPUS) >= 2


def pin_servers():
    if PINNED:
        os.sched_setaffinity(0, {ALL_CPUS[0]})


def pin_client():
    if PINNED:
        os.sched_setaffinity(0, {ALL_CPUS[1]})


# ---------------------------------------------------------------------------
# the client side: raw sockets, as little Python work per byte as possible

class Conn:
    """One IMAP connection; tls is an SSLContext for implicit TLS."""

    def __init__(self, port, tls=None, timeout=30):
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            s = tls.wrap_socket(s)
        self.sock = s
        self.buf = b""
        self.greeting = self.line()
        if not self.greeting.startswith(b"* OK"):
            raise RuntimeError("greeting %r" % self.greeting)

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed: %r" % self.buf[-200:])
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def cmd(self, tag, text):
        self.sock.sendall(b"%s %s\r\n" % (tag, text))
        t = tag + b" "
        while True:
            ln = self.line()
            if ln.startswith(t):
                if not ln.startswith(t + b"OK"):
                    raise RuntimeError("%s: %r" % (text, ln))
                return ln

    def login(self, mailbox=b"INBOX"):
        self.cmd(b"a", b"LOGIN %s \"%s\"" % (USER.encode(),
                                            PASSWORD.encode()))
        if mailbox:
            self.cmd(b"b", b"SELECT " + mailbox)

    def fetch_bytes(self, text):
        """Send a FETCH; read everything to its tagged OK without parsing
        the literals.  Returns the number of bytes received."""
        tag = b"Zq7"
        self.sock.sendall(b"%s %s\r\n" % (tag, text))
        end = b"\r\n" + tag + b" "
        got = len(self.buf)
        tail = self.buf[-64:]
        chunk = bytearray(1 << 20)
        view = memoryview(chunk)
        while True:
            n = self.sock.recv_into(view)
            if n == 0:
                raise EOFError("closed during FETCH")
            got += n
            tail = (tail + bytes(view[max(0, n - 64):n]))[-64:] \
                if n < 64 else bytes(view[n - 64:n])
            i = tail.rfind(end)
            if i >= 0 and tail.endswith(b"\r\n"):
                if not tail[i + len(end):].startswith(b"OK"):
                    raise RuntimeError("FETCH: %r" % tail)
                self.buf = b""
                return got

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def login_cycle(port, tls):
    c = Conn(port, tls)
    try:
        c.login()
        c.cmd(b"c", b"LOGOUT")
    finally:
        c.close()


def run_clients(concurrency, seconds, one_cycle):
    """Cycles per second of `concurrency` client threads, each calling
    one_cycle(i) (i its index) in a loop until `seconds` have passed.  A
    cycle that raises ends its thread, and the figure fails with the
    first errors: failures are reported, never counted."""
    deadline = time.monotonic() + seconds
    counts = [0] * concurrency
    errors = []

    def worker(i):
        try:
            while time.monotonic() < deadline:
                one_cycle(i)
                counts[i] += 1
        except Exception as e:          # reported, not hidden
            errors.append(repr(e))
    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,))
               for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("%d of %d clients failed: %s"
                           % (len(errors), concurrency, errors[:3]))
    return sum(counts) / (time.monotonic() - start)


def logins_per_second(port, tls, concurrency, seconds):
    """Complete login cycles per second with `concurrency` clients."""
    return run_clients(concurrency, seconds,
                       lambda i: login_cycle(port, tls))


# Tagged commands in one short session: LOGIN, SELECT, the six below,
# LOGOUT.
SHORT_COMMANDS = 9


def short_session(port, rng):
    """One short session as a mail client's quick sync makes it, on the
    `stress` mailbox (STRESS_COUNT messages, UIDs 1..STRESS_COUNT): every
    flag it sets it clears again, so the mailbox does not drift."""
    c = Conn(port)
    try:
        c.login(b"stress")
        seq = rng.randint(1, STRESS_COUNT)
        c.cmd(b"c", b"FETCH 1:* (UID FLAGS)")
        c.cmd(b"d", b"UID FETCH %d (BODY.PEEK[HEADER])"
              % rng.randint(1, STRESS_COUNT))
        c.cmd(b"e", b"FETCH %d (BODY.PEEK[])"
              % rng.randint(1, STRESS_COUNT))
        c.cmd(b"f", b"STORE %d +FLAGS (\\Seen)" % seq)
        c.cmd(b"g", b"SEARCH UNSEEN")
        c.cmd(b"h", b"STORE %d -FLAGS (\\Seen)" % seq)
        c.cmd(b"z", b"LOGOUT")
    finally:
        c.close()


def short_sessions(port, concurrency, seconds):
    """Tagged commands completed per second by `concurrency` clients
    doing short sessions, as Dovecot's imaptest counts them; each client
    draws its numbers from its own fixed seed, so runs are comparable."""
    rngs = [random.Random(i) for i in range(concurrency)]
    return SHORT_COMMANDS * run_clients(
        concurrency, seconds, lambda i: short_session(port, rngs[i]))


def short_sessions_sample(target, bed, seconds):
    """One sample of the figure: the stress mailbox made anew (every
    sample starts from the same mailbox), then the short sessions."""
    bed.fresh_stress()
    return short_sessions(target.port, STRESS_CLIENTS, seconds)


def tree_cpu_seconds(pid):
    """CPU time of a process and all its descendants, living and reaped:
    its own utime + stime, its reaped children's (cutime + cstime), and
    the same for each living child.  A reaped child counts once, in its
    parent's cutime; a living one in its own fields."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK") + sum(
        tree_cpu_seconds(c) for c in children(pid))


def cpu_per_login(target, seconds):
    """Milliseconds of CPU per login cycle (1 client) of the target's own
    processes (for direct, Dovecot's), read from /proc before and after."""
    pids = [p.pid for p in target.procs[:1]]
    before = sum(tree_cpu_seconds(p) for p in pids)
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        login_cycle(target.port, None)
        count += 1
    time.sleep(0.1)         # the last sessions' exit, and their reaping
    after = sum(tree_cpu_seconds(p) for p in pids)
    return (after - before) * 1000 / count


def throughput(port, tls, mailbox, fetch, repeat):
    """MB/s of one FETCH's response, best of repeat on one session."""
    c = Conn(port, tls)
    try:
        c.login(mailbox)
        best = 0.0
        for _ in range(repeat):
            t0 = time.perf_counter()
            n = c.fetch_bytes(fetch)
            best = max(best, n / (time.perf_counter() - t0) / MB)
        return best
    finally:
        c.close()


def noop_latency(port, direct_port, count):
    """NOOP round trips through port, each followed by one straight to
    the back-end; returns (median us, p99 us, median of paired ratios)."""
    a, d = Conn(port), Conn(direct_port)
    try:
        a.login()
        d.login()
        times, ratios = [], []
        for _ in range(count):
            t0 = time.perf_counter()
            a.cmd(b"n", b"NOOP")
            t1 = time.perf_counter()
            d.cmd(b"n", b"NOOP")
            t2 = time.perf_counter()
            times.append(t1 - t0)
            ratios.append((t1 - t0) / (t2 - t1))
        times.sort()
        return (statistics.median(times) * 1e6,
                times[int(len(times) * 0.99)] * 1e6,
                statistics.median(ratios))
    finally:
        a.close()
        d.close()


def greeting_time(port, tls, count):
    """Median microseconds from connect to the whole greeting line."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        c = Conn(port, tls)
        times.append(time.perf_counter() - t0)
        c.close()
    return statistics.median(times) * 1e6


PIPELINE_COMMAND = (b"P%d UID FETCH %d "
                    b"(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")


def pipelined_batch(count):
    """count UID FETCHes of flags and Subject, as mbsync and Thunderbird
    send them when syncing, tagged P0..P<count-1>, in one piece."""
    batch = b"".join(PIPELINE_COMMAND % (i, i + 1) + b"\r\n"
                     for i in range(count))
    # Written with one sendall before anything is read.  That cannot
    # deadlock: a batch within Linux's default initial send buffer (16
    # KiB, tcp_wmem) is taken by the kernel at once, whether the target
    # reads it or not, and only then does the client read, to the end.
    # 200 commands make 12 KiB; their answers 26 KiB.
    assert len(batch) <= 16384, len(batch)
    return batch


def check_tagged(buf, count):
    """Parse answers in buf, skipping literals: the number of tagged ones
    (each must be OK), of FETCH responses, and the end of the last whole
    answer."""
    pos = tagged = fetched = 0
    while tagged < count:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            break
        line = bytes(buf[pos:eol])
        if line.startswith(b"* ") and b" FETCH " in line:
            fetched += 1
        if line.endswith(b"}"):
            size = int(line[line.rindex(b"{") + 1:-1])
            if len(buf) < eol + 2 + size:
                break               # the literal is not all in yet
            pos = eol + 2 + size
            continue
        if line.startswith(b"P"):
            if not line.partition(b" ")[2].startswith(b"OK"):
                raise RuntimeError("pipelined: %r" % line)
            tagged += 1
        pos = eol + 2
    return tagged, fetched, pos


def read_tagged(conn, count):
    """Read until the count tagged answers to pipelined_batch are in and
    return the time the last one arrived.  While reading, only the last
    tag is looked for (so that the client's own parsing is not what is
    measured); then everything is parsed: each answer must be OK and each
    command must have had its FETCH response."""
    buf = bytearray(conn.buf)
    conn.buf = b""
    last = b"\r\nP%d " % (count - 1)
    chunk = bytearray(1 << 16)
    seen = -1
    while True:
        n = conn.sock.recv_into(chunk)
        arrived = time.perf_counter()
        if n == 0:
            raise EOFError("closed during pipelined FETCH")
        searched = max(0, len(buf) - len(last))
        buf += chunk[:n]
        if seen < 0:
            seen = buf.find(last, searched)
        if seen < 0 or buf.find(b"\r\n", seen + 2) < 0:
            continue
        tagged, fetched, pos = check_tagged(buf, count)
        if tagged == count:         # else answered out of order: read on
            break
    if fetched != count:
        raise RuntimeError("pipelined: %d FETCH responses for %d commands"
                           % (fetched, count))
    conn.buf = bytes(buf[pos:])
    return arrived


def pipelined(port, count, repeat):
    """Milliseconds from writing count pipelined UID FETCHes in one piece
    to the last tagged answer, median of repeat on one session in
    `small` (after one batch to warm Dovecot's cache)."""
    c = Conn(port)
    try:
        c.login(b"small")
        batch = pipelined_batch(count)
        times = []
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            c.sock.sendall(batch)
            arrived = read_tagged(c, count)
            if i > 0:
                times.append(arrived - t0)
        return statistics.median(times) * 1e3
    finally:
        c.close()


# ---------------------------------------------------------------------------
# memory: USS of the processes that serve idle logged-in sessions

def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def waiting_to_accept(pid):
    """An idle pre-forked imapfe child holds the epoll descriptor it
    waits in; a session has closed it."""
    try:
        d = "/proc/%d/fd" % pid
        return any(os.readlink(os.path.join(d, f)) ==
                   "anon_inode:[eventpoll]" for f in os.listdir(d))
    except OSError:
        return False


def idle_child_memory(target):
    """KiB of private memory per idle pre-forked child (the price of the
    pool), with no session open."""
    pids = wait_for(lambda: target.idle_pids() or None, 20,
                    "idle pre-forked children")
    return statistics.median(uss_kib(p) for p in pids)


def uss_kib(pid):
    """Private_Clean + Private_Dirty from smaps_rollup, in KiB."""
    total = 0
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def idle_session_memory(target, tls, sessions):
    """KiB of private memory per idle logged-in session."""
    before = set(target.session_pids())
    conns = []
    try:
        for _ in range(sessions):
            c = Conn(target.tls_port if tls else target.port,
                     target.client_tls if tls else None)
            c.login()
            conns.append(c)
        c = conns[-1]
        c.cmd(b"s", b"NOOP")            # every session is past login
        if target.per_process:
            pids = wait_for(lambda: ([p for p in target.session_pids()
                                      if p not in before]
                                     if len(set(target.session_pids())
                                            - before) >= sessions
                                     else None), 20, "session processes")
            return statistics.median(uss_kib(p) for p in pids)
        return sum(uss_kib(p) for p in target.session_pids()) / sessions
    finally:
        for c in conns:
            c.close()


# ---------------------------------------------------------------------------
# targets: each serves IMAP on port (plain) and tls_port (implicit TLS)

SPAWNED = []     # every server process started, ended by PID at the end


def spawn(*args, **kwargs):
    p = subprocess.Popen(*args, **kwargs)
    SPAWNED.append(p)
    return p


def stop_all():
    """End what is still running, a target that failed to start too."""
    for p in SPAWNED:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Target:
    name = "?"
    per_process = True      # one process per session (memory is its USS)
    tls_note = ""

    def __init__(self):
        self.port = self.tls_port = None
        self.client_tls = None
        self.proc = None
        self.procs = []

    def session_pids(self):
        return children(self.proc.pid)


class Direct(Target):
    name = "direct"
    per_process = False

    def __init__(self, bed):
        super().__init__()
        self.port, self.tls_port = bed.dovecot.port, bed.dovecot.imaps_port
        self.client_tls = bed.client_tls
        self.procs = [bed.dovecot.proc]

    def session_pids(self):
        return []


def imapfe_config(bed, tls):
    """imapfe with a route line in its file: plain, or TLS on both
    sides."""
    # Started as root, imapfe runs sessions only as a user of its own:
    # measured as it is deployed, after giving root up.
    conf = ("plaintext_auth yes\nlogin_timeout 60\n"
            "user nobody\ngroup nogroup\n"
            "state_file %s\n" % os.path.join(bed.dir, "imapfe-state"))
    if not tls:
        return conf + "route * 127.0.0.1:%d\n" % bed.dovecot.port
    return conf + ("route * 127.0.0.1:%d tls=implicit\n"
                   "backend_ca_file %s\ntls_cert %s\ntls_key %s\n"
                   % (bed.dovecot.imaps_port, bed.certs.ca,
                      bed.certs.imapfe, bed.certs.imapfe_key))


def routed_config(bed, tls):
    """The same with a server line that nothing routes to, as the suite's
    IMAPFE_ROUTED=1 adds: every session then goes through the command
    router after login instead of the byte relay, to the same Dovecot."""
    return imapfe_config(bed, tls) + "server 127.0.0.1:9\n"


def forking_config(bed, tls):
    """The same without pre-forked children: the listener forks one
    after accepting each connection, as before the prefork directive."""
    return imapfe_config(bed, tls) + "prefork 0\n"


def no_state_config(bed, tls):
    """The same without the shared state file (state_file none): no
    penalty look-up at login, no back-end mark checked at connect, for
    the cost per login of the shared state, in the same rounds."""
    return re.sub(r"(?m)^state_file .*$", "state_file none",
                  imapfe_config(bed, tls))


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


class ImapfeListener(Target):
    """imapfe -l: one process listening, a fork per connection."""

    def __init__(self, bed, config=imapfe_config, suffix=""):
        super().__init__()
        self.name = "imapfe -l" + suffix
        self.client_tls = bed.client_tls
        d = bed.subdir(self.name.replace(" ", "_"))
        self.port, self.tls_port = free_port(), free_port()
        for tls, port in ((False, self.port), (True, self.tls_port)):
            conf = write(os.path.join(d, "tls.conf" if tls else "plain.conf"),
                         config(bed, tls))
            debug = ["-d"] if os.environ.get("BENCH_DEBUG") else []
            args = [BIN] + debug + ["-f", conf, "-l", "127.0.0.1:%d" % port]
            self.procs.append(spawn(
                args + (["-T"] if tls else []),
                stderr=open(os.path.join(d, "stderr"), "ab")))
        self.proc = self.procs[0]
        wait_for(lambda: read_greeting(self.port).startswith(b"* OK"), 20,
                 "imapfe -l")

    def all_children(self):
        return children(self.procs[0].pid) + children(self.procs[1].pid)

    def session_pids(self):
        return [p for p in self.all_children() if not waiting_to_accept(p)]

    def idle_pids(self):
        """The pre-forked children still waiting for a connection."""
        return [p for p in self.all_children() if waiting_to_accept(p)]


XINETD_SERVICE = """service imapfe-bench{n}
{{
	type		= UNLISTED
	port		= {port}
	bind		= 127.0.0.1
	socket_type	= stream
	protocol	= tcp
	wait		= no
	user		= root
	server		= {bin}
	server_args	= {args}
	instances	= 1000
	per_source	= UNLIMITED
	cps		= 10000 1
	disable		= no
}}
"""


class ImapfeXinetd(Target):
    """imapfe exec'd by xinetd for each connection, as shipped."""

    def __init__(self, bed, config=imapfe_config, suffix=""):
        super().__init__()
        self.name = "imapfe xinetd" + suffix
        self.client_tls = bed.client_tls
        d = bed.subdir(self.name.replace(" ", "_"))
        self.port, self.tls_port = free_port(), free_port()
        text = "defaults\n{\n}\n"
        for n, (tls, port) in enumerate(((False, self.port),
                                         (True, self.tls_port))):
            conf = write(os.path.join(d, "tls.conf" if tls else "plain.conf"),
                         config(bed, tls))
            text += XINETD_SERVICE.format(
                n=n, port=port, bin=BIN,
                args=("-T " if tls else "") + "-f " + conf)
        xconf = write(os.path.join(d, "xinetd.conf"), text)
        self.proc = spawn(
            ["xinetd", "-dontfork", "-f", xconf, "-pidfile",
             os.path.join(d, "pid")], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        self.procs.append(self.proc)
        wait_for(lambda: read_greeting(self.port).startswith(b"* OK"), 20,
                 "xinetd")


NGINX_CONF = """daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log error;
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp;
    server {{
        listen 127.0.0.1:{auth};
        location /auth {{
            add_header Auth-Status OK always;
            add_header Auth-Server 127.0.0.1 always;
            add_header Auth-Port {backend} always;
            return 204;
        }}
    }}
}}
mail {{
    server_name localhost;
    auth_http 127.0.0.1:{auth}/auth;
    imap_capabilities IMAP4rev1 LITERAL+;
    {buffers}
    server {{ listen 127.0.0.1:{port}; protocol imap; }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        protocol imap;
        ssl_certificate {cert};
        ssl_certificate_key {key};
    }}
}}
"""


class Nginx(Target):
    """nginx's mail proxy, its auth_http answered by the same nginx."""
    name = "nginx mail"
    per_process = False
    tls_note = "TLS from the client only: nginx's mail proxy has no TLS " \
        "to back-ends"

    def __init__(self, bed, buffers=None):
        super().__init__()
        if buffers:
            self.name = "nginx mail %dk" % (buffers // 1024)
        self.client_tls = bed.client_tls
        d = bed.subdir(self.name.replace(" ", "-"))
        os.mkdir(os.path.join(d, "tmp"))
        self.port, self.tls_port = free_port(), free_port()
        conf = write(os.path.join(d, "nginx.conf"), NGINX_CONF.format(
            d=d, auth=free_port(), backend=bed.dovecot.port,
            port=self.port, tls_port=self.tls_port, cert=bed.certs.imapfe,
            key=bed.certs.imapfe_key,
            buffers="proxy_buffer %d;" % buffers if buffers else ""))
        self.proc = spawn(
            ["nginx", "-e", os.path.join(d, "error.log"), "-p", d, "-c",
             conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(self.proc)
        wait_for(lambda: read_greeting(self.port).startswith(b"* OK"), 20,
                 "nginx")

    def session_pids(self):
        return children(self.proc.pid)      # the worker


class Perdition(Target):
    """Debian's perdition, forking a child per connection."""
    name = "perdition"
    tls_note = "TLS from the client only"

    def __init__(self, bed):
        super().__init__()
        self.client_tls = bed.client_tls
        d = bed.subdir("perdition")
        self.port, self.tls_port = free_port(), free_port()
        common = ["--no_daemon", "-f", "/dev/null", "-M", "", "-n",
                  "-s", "127.0.0.1", "-p", str(bed.dovecot.port),
                  "-u", "nobody", "-g", "nogroup", "--connection_limit",
                  "1000", "-L", "1000"]
        self.procs.append(spawn(
            ["perdition.imap4"] + common + [
                "-b", "127.0.0.1", "-l", str(self.port),
                "--pid_file", os.path.join(d, "plain.pid")],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "err"),
                                                   "ab")))
        self.procs.append(spawn(
            ["perdition.imaps"] + common + [
                "-b", "127.0.0.1", "-l", str(self.tls_port),
                "--ssl_mode", "ssl_listen",
                "--ssl_cert_file", bed.certs.imapfe,
                "--ssl_key_file", bed.certs.imapfe_key,
                "--pid_file", os.path.join(d, "tls.pid")],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "err"),
                                                   "ab")))
        self.proc = self.procs[0]
        wait_for(lambda: read_greeting(self.port).startswith(b"* OK"), 20,
                 "perdition")

    def session_pids(self):
        return children(self.procs[0].pid) + children(self.procs[1].pid)


HAPROXY_CONF = """global
    maxconn 4096
    nbthread 1
    tune.ssl.default-dh-param 2048
defaults
    mode tcp
    option splice-auto
    timeout connect 10s
    timeout client 120s
    timeout server 120s
frontend plain
    bind 127.0.0.1:{port}
    default_backend dovecot
backend dovecot
    server d 127.0.0.1:{backend}
frontend tls
    bind 127.0.0.1:{tls_port} ssl crt {pem}
    default_backend dovecot_tls
backend dovecot_tls
    server d 127.0.0.1:{tls_backend} ssl verify required ca-file {ca} verifyhost localhost
"""


class Haproxy(Target):
    """HAProxy in TCP mode: not an IMAP proxy (it cannot route by user),
    the floor for any relay that adds a hop here.  One event-driven
    process, splice(2) between plain sockets, and with TLS on both sides
    (verifying Dovecot's certificate) like imapfe's TLS rows."""
    name = "haproxy tcp"
    per_process = False

    def __init__(self, bed):
        super().__init__()
        self.client_tls = bed.client_tls
        d = bed.subdir("haproxy")
        pem = os.path.join(d, "crt.pem")
        with open(pem, "w") as out:
            for part in (bed.certs.imapfe, bed.certs.imapfe_key):
                with open(part) as f:
                    out.write(f.read())
        self.port, self.tls_port = free_port(), free_port()
        conf = write(os.path.join(d, "haproxy.cfg"), HAPROXY_CONF.format(
            port=self.port, backend=bed.dovecot.port, tls_port=self.tls_port,
            tls_backend=bed.dovecot.imaps_port, pem=pem, ca=bed.certs.ca))
        self.proc = spawn(["haproxy", "-db", "-f", conf],
                          stdout=subprocess.DEVNULL,
                          stderr=open(os.path.join(d, "err"), "ab"))
        self.procs.append(self.proc)
        wait_for(lambda: read_greeting(self.port).startswith(b"* OK"), 20,
                 "haproxy")

    def session_pids(self):
        return [self.proc.pid]


# ---------------------------------------------------------------------------
# the test bed

# Dovecot tuned as for a busy server ("high-performance mode": login and
# imap processes reused, an auth cache), so that direct access is the fast
# reference it should be, not process start-up.
DOVECOT_FAST = """mail_max_userip_connections = 1000
auth_cache_size = 1M
service imap-login {
  service_count = 0
  process_min_avail = 1
}
service imap {
  service_count = 0
  process_min_avail = 4
}
"""

class Bed:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="imapfe-bench-")
        os.chmod(self.dir, 0o755)
        self.certs = Certs()
        self.dovecot = Dovecot(ssl_cert=self.certs.dovecot,
                               ssl_key=self.certs.dovecot_key,
                               extra_conf=DOVECOT_FAST)
        self.client_tls = ssl.create_default_context(cafile=self.certs.ca)
        self.client_tls.check_hostname = False
        self.fill()

    def subdir(self, name):
        d = os.path.join(self.dir, name)
        os.mkdir(d)
        os.chmod(d, 0o755)
        return d

    def fill(self):
        m = self.dovecot.imap(USER)
        m.create("big")
        m.create("small")
        line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV\r\n"
        body = line * (BIG // len(line))
        m.append("big", None, None, sample_message(0, body.decode()))
        for i in range(1, 4):
            m.append("INBOX", None, None, sample_message(i))
        m.logout()
        self.fresh_stress()
        # 1,000 small messages: written as maildir files, then indexed.
        cur = os.path.join(self.dovecot.dir, "mail", USER, ".small", "cur")
        for i in range(SMALL_COUNT):
            path = os.path.join(cur, "%d.M%dP1.bench:2," % (1700000000 + i,
                                                            i))
            with open(path, "wb") as f:
                f.write(sample_message(i, "x" * 2000 + "\r\n"))
            os.chown(path, 65534, 65534)
        m = self.dovecot.imap(USER)
        typ, data = m.select("small")
        assert int(data[0]) == SMALL_COUNT, data
        m.logout()

    def fresh_stress(self):
        """The short sessions' mailbox made anew, its UIDs 1..STRESS_COUNT:
        every STORE of a short session grows Dovecot's transaction log
        until it rewrites its index, and the figure drifts with it (a
        tenth over eight rounds of direct alone), so every sample starts
        from the same mailbox."""
        m = self.dovecot.imap(USER)
        m.delete("stress")
        m.create("stress")
        for i in range(1, STRESS_COUNT + 1):
            m.append("stress", None, None, sample_message(i))
        typ, data = m.status("stress", "(MESSAGES UIDNEXT)")
        assert data[0].endswith(b"(MESSAGES %d UIDNEXT %d)"
                                % (STRESS_COUNT, STRESS_COUNT + 1)), data
        m.logout()

    def close(self):
        self.dovecot.close()
        self.certs.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def installed(cmd, extra=None):
    if shutil.which(cmd) is None:
        return False
    return extra is None or os.path.exists(extra)


# The imapfe configurations measured: (suffix for the target's name,
# function(bed, tls) -> configuration text, whether under xinetd too).
# Issue 9 adds its LDAP route map here, beside the file's route lines.
# The routed one runs under -l only, measured beside the relayed -l in the
# same rounds (ROUTED_VS_RELAYED).
IMAPFE_CONFIGS = [
    ("", imapfe_config, True),
    (" no state", no_state_config, True),
    (" routed", routed_config, False),
    (" prefork 0", forking_config, False),
]
RELAYED, ROUTED = "imapfe -l", "imapfe -l routed"
# Comparisons run only when named with --only: the listener without
# pre-forked children.
ONLY_WHEN_NAMED = {"imapfe -l prefork 0"}


def imapfe_targets():
    for suffix, config, xinetd in IMAPFE_CONFIGS:
        if xinetd:
            yield ("imapfe xinetd" + suffix,
                   lambda b, c=config, x=suffix: ImapfeXinetd(b, c, x),
                   ("xinetd", None))
    for suffix, config, xinetd in IMAPFE_CONFIGS:
        yield ("imapfe -l" + suffix,
               lambda b, c=config, x=suffix: ImapfeListener(b, c, x), None)


TARGETS = [
    ("direct", Direct, None),
] + list(imapfe_targets()) + [
    ("nginx mail", Nginx, ("nginx", "/usr/lib/nginx/modules/"
                           "ngx_mail_module.so")),
    ("perdition", Perdition, ("perdition.imap4", None)),
    ("haproxy tcp", Haproxy, ("haproxy", None)),
]


# ---------------------------------------------------------------------------
# measuring

def measures(quick):
    """(key, label, function(target, bed) -> number, applies(target))."""
    s = 0.6 if quick else 1.5
    plain_only = (lambda t: True)
    return [
        ("login_c1", "logins/s, 1 client",
         lambda t, b: logins_per_second(t.port, None, 1, s), plain_only),
        ("login_c16", "logins/s, 16 clients",
         lambda t, b: logins_per_second(t.port, None, 16, s), plain_only),
        ("cpu_login_ms", "CPU per login, ms",
         lambda t, b: cpu_per_login(t, 2 * s), plain_only),
        ("short_cmds", "short sessions, 16 clients, cmds/s",
         lambda t, b: short_sessions_sample(t, b, s), plain_only),
        ("fetch_big", "FETCH 10 MiB, MB/s",
         lambda t, b: throughput(t.port, None, b"big", b"FETCH 1 BODY.PEEK[]",
                                 3), plain_only),
        ("fetch_small", "FETCH 1,000 small, MB/s",
         lambda t, b: throughput(t.port, None, b"small",
                                 b"FETCH 1:* BODY.PEEK[]", 3), plain_only),
        ("noop", "NOOP round trip, paired ratio",
         lambda t, b: noop_latency(t.port, b.dovecot.port,
                                   300 if quick else 1000), plain_only),
        ("pipelined_ms", "200 pipelined UID FETCH, ms",
         lambda t, b: pipelined(t.port, PIPELINED, 5 if quick else 20),
         plain_only),
        ("greeting_us", "connect to greeting, us",
         lambda t, b: greeting_time(t.port, None, 20 if quick else 50),
         plain_only),
        ("uss_kib", "USS per idle session, KiB",
         lambda t, b: idle_session_memory(t, False, 16),
         lambda t: t.name != "direct"),
        ("uss_prefork_kib", "USS per idle pre-forked child, KiB",
         lambda t, b: idle_child_memory(t),
         lambda t: isinstance(t, ImapfeListener) and
         not t.name.endswith("prefork 0")),
        ("uss_tls_kib", "USS per idle TLS session, KiB",
         lambda t, b: idle_session_memory(t, True, 16),
         lambda t: t.name != "direct"),
        ("tls_login_c1", "TLS logins/s, 1 client",
         lambda t, b: logins_per_second(t.tls_port, t.client_tls, 1, s),
         plain_only),
        ("tls_login_c16", "TLS logins/s, 16 clients",
         lambda t, b: logins_per_second(t.tls_port, t.client_tls, 16, s),
         plain_only),
        ("tls_fetch_big", "TLS FETCH 10 MiB, MB/s",
         lambda t, b: throughput(t.tls_port, t.client_tls, b"big",
                                 b"FETCH 1 BODY.PEEK[]", 3), plain_only),
        ("tls_fetch_small", "TLS FETCH 1,000 small, MB/s",
         lambda t, b: throughput(t.tls_port, t.client_tls, b"small",
                                 b"FETCH 1:* BODY.PEEK[]", 3), plain_only),
    ]


def median_of(values):
    if not values:
        return None
    if isinstance(values[0], tuple):
        return tuple(statistics.median(v[i] for v in values)
                     for i in range(len(values[0])))
    return statistics.median(values)


def run(rounds, quick, only=None, figures=None):
    pin_servers()
    bed = Bed()
    targets, missing = [], []
    extra = [("nginx mail 256k", lambda b: Nginx(b, 256 * 1024),
              ("nginx", "/usr/lib/nginx/modules/ngx_mail_module.so"))]
    try:
        for name, cls, need in TARGETS + extra:
            if (only and name not in only) or (not only and
                                               name in ONLY_WHEN_NAMED):
                continue
            if need is not None and not installed(*need):
                missing.append(name)
                continue
            try:
                targets.append(cls(bed))
            except Exception as e:
                print("bench: %s did not start: %r" % (name, e),
                      file=sys.stderr)
                missing.append(name)
        pin_client()
        # Every round's sample is kept (None where it failed), so that two
        # targets can be compared round by round (ROUTED_VS_RELAYED).
        results = {t.name: {"rounds": {}} for t in targets}
        for key, label, fn, applies in measures(quick):
            if figures and key not in figures:
                continue
            samples = {t.name: [] for t in targets}
            for _ in range(rounds):
                for t in targets:
                    if not applies(t):
                        continue
                    try:
                        samples[t.name].append(fn(t, bed))
                    except Exception as e:
                        print("bench: %s %s: %r" % (t.name, key, e),
                              file=sys.stderr)
                        samples[t.name].append(None)
            for t in targets:
                got = [v for v in samples[t.name] if v is not None]
                results[t.name][key] = median_of(got)
                results[t.name]["rounds"][key] = samples[t.name]
            print("bench: %s done" % label, file=sys.stderr)
        return results, missing, {t.name: t.tls_note for t in targets}
    finally:
        stop_all()
        bed.close()


# ---------------------------------------------------------------------------
# reporting

ROWS = [
    ("login_c1", "logins/s, 1 client", "hi"),
    ("login_c16", "logins/s, 16 clients", "hi"),
    ("cpu_login_ms", "CPU per login, ms", "ms"),
    ("short_cmds", "short sessions, 16 clients, cmds/s", "hi"),
    ("fetch_big", "FETCH 10 MiB, MB/s", "hi"),
    ("fetch_small", "FETCH 1,000 x 2 KiB, MB/s", "hi"),
    ("noop_median", "NOOP median, us", "lo"),
    ("noop_p99", "NOOP 99th pct, us", "lo"),
    ("noop_ratio", "NOOP paired ratio to direct", "ratio"),
    ("pipelined_ms", "200 pipelined UID FETCH, ms", "lo"),
    ("greeting_us", "connect to greeting, us", "lo"),
    ("uss_kib", "USS/idle session, KiB", "abs"),
    ("uss_prefork_kib", "USS/idle pre-forked child, KiB", "abs"),
    ("uss_tls_kib", "USS/idle TLS session, KiB", "abs"),
    ("tls_login_c1", "TLS logins/s, 1 client", "hi"),
    ("tls_login_c16", "TLS logins/s, 16 clients", "hi"),
    ("tls_fetch_big", "TLS FETCH 10 MiB, MB/s", "hi"),
    ("tls_fetch_small", "TLS FETCH 1,000 x 2 KiB, MB/s", "hi"),
]


NOOP_PARTS = ("noop_median", "noop_p99", "noop_ratio")


def flatten(results):
    """Split the NOOP figure's (median, p99, paired ratio) into three, in
    the medians and in the rounds."""
    for r in results.values():
        noop = r.pop("noop", None)
        if noop is not None:
            r.update(zip(NOOP_PARTS, noop))
        rounds = r["rounds"].pop("noop", None)
        if rounds is not None:
            for i, part in enumerate(NOOP_PARTS):
                r["rounds"][part] = [None if v is None else v[i]
                                     for v in rounds]


def cell(value, direct, kind):
    if value is None:
        return "-"
    text = ("%.2f" % value) if kind in ("ratio", "ms") else (
        "%.0f" % value if value >= 100 else "%.1f" % value)
    if kind in ("hi", "lo", "ms") and direct:
        text += " (%.2fx)" % (value / direct)
    return text


def table(results, missing):
    names = list(results)
    direct = results.get("direct", {})
    head = ["figure"] + names + ["%s" % m for m in missing]
    rows = []
    for key, label, kind in ROWS:
        row = [label]
        for n in names:
            row.append(cell(results[n].get(key), direct.get(key), kind))
        row += ["not installed"] * len(missing)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [head])
              for i in range(len(head))]
    out = []
    for r in [head] + rows:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths))
                   + " |")
        if r is head:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


# The routed imapfe -l against the relayed one, round by round in the same
# run: (key, label, "ratio" for routed / relayed or "minus" for routed -
# relayed, the criterion as (operator, bound) or None).
AT_LEAST, AT_MOST, WITHIN = ">=", "<=", "within"
ROUTED_VS_RELAYED = [
    ("login_c1", "logins/s, 1 client", "ratio", (AT_LEAST, 0.95)),
    ("login_c16", "logins/s, 16 clients", "ratio", (AT_LEAST, 0.95)),
    ("short_cmds", "short sessions, 16 clients, cmds/s", "ratio", None),
    ("fetch_big", "FETCH 10 MiB, MB/s", "ratio", (AT_LEAST, 0.95)),
    ("fetch_small", "FETCH 1,000 x 2 KiB, MB/s", "ratio", (AT_LEAST, 0.95)),
    ("noop_ratio", "NOOP paired ratio, routed minus relayed", "minus",
     (WITHIN, 0.03)),
    ("pipelined_ms", "200 pipelined UID FETCH, time", "ratio",
     (AT_MOST, 1.2)),
    ("noop_median", "NOOP median, time", "ratio", None),
    ("noop_p99", "NOOP 99th pct, time", "ratio", None),
    ("greeting_us", "connect to greeting, time", "ratio", None),
    ("uss_kib", "USS/idle session", "ratio", None),
    ("uss_tls_kib", "USS/idle TLS session", "ratio", None),
    ("tls_login_c1", "TLS logins/s, 1 client", "ratio", None),
    ("tls_login_c16", "TLS logins/s, 16 clients", "ratio", None),
    ("tls_fetch_big", "TLS FETCH 10 MiB, MB/s", "ratio", None),
    ("tls_fetch_small", "TLS FETCH 1,000 x 2 KiB, MB/s", "ratio", None),
]


# imapfe -l against nginx's mail proxy in the same rounds: issue 16's
# targets for the listener, as imapfe -l / nginx mail.
LISTENER, NGINX = "imapfe -l", "nginx mail"
LISTENER_VS_NGINX = [
    ("greeting_us", "connect to greeting, time", "ratio", (AT_MOST, 1.0)),
    ("login_c1", "logins/s, 1 client", "ratio", (AT_LEAST, 1.0)),
    ("login_c16", "logins/s, 16 clients", "ratio", (AT_LEAST, 0.6)),
    ("short_cmds", "short sessions, 16 clients, cmds/s", "ratio",
     (AT_LEAST, 0.8)),
]


def meets(value, criterion):
    op, bound = criterion
    if op == AT_LEAST:
        return value >= bound
    if op == AT_MOST:
        return value <= bound
    return abs(value) <= bound


def same_rounds(results, ours, theirs, figures):
    """Per figure: our sample over (or minus) theirs of the same round,
    for every round where both were measured, and their median; None
    when either target is missing."""
    if ours not in results or theirs not in results:
        return None
    out = {}
    for key, label, how, criterion in figures:
        pairs = zip(results[ours]["rounds"].get(key, []),
                    results[theirs]["rounds"].get(key, []))
        per_round = [(a / b if how == "ratio" else a - b)
                     for a, b in pairs
                     if a is not None and b is not None
                     and (how == "minus" or b != 0)]
        med = statistics.median(per_round) if per_round else None
        out[key] = {"label": label, "how": how, "rounds": per_round,
                    "median": med, "criterion": criterion,
                    "met": (None if med is None or criterion is None
                            else meets(med, criterion))}
    return out


def routed_vs_relayed(results):
    return same_rounds(results, ROUTED, RELAYED, ROUTED_VS_RELAYED)


def listener_vs_nginx(results):
    return same_rounds(results, LISTENER, NGINX, LISTENER_VS_NGINX)


def comparison_table(comparison, title, ratio):
    head = [title, ratio, "each round", "issue's criterion"]
    rows = []
    for key, c in comparison.items():
        fmt = "%+.3f" if c["how"] == "minus" else "%.2f"
        value = "-" if c["median"] is None else fmt % c["median"]
        if c["how"] == "ratio" and c["median"] is not None:
            value += "x"
        crit = ""
        if c["criterion"] is not None:
            op, bound = c["criterion"]
            crit = "%s %s: %s" % (op, bound, {None: "not measured",
                                              True: "met",
                                              False: "NOT met"}[c["met"]])
        rows.append([c["label"], value,
                     " ".join(fmt % v for v in c["rounds"]), crit])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    out = []
    for r in [head] + rows:
        out.append("| " + " | ".join(x.ljust(w) for x, w in zip(r, widths))
                   + " |")
        if r is head:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="shorter runs, for trying the bench out")
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--only", action="append",
                    help="measure only this target (and direct; the "
                    "routed imapfe -l brings the relayed one)")
    ap.add_argument("--figure", action="append",
                    help="measure only this figure (its key in "
                    "results.json: login_c1, greeting_us...)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (Dovecot, xinetd and smaps_rollup)")
    only = set(args.only + ["direct"]) if args.only else None
    if only and ROUTED in only:
        only.add(RELAYED)           # the routed row is read against it
    t0 = time.monotonic()
    results, missing, notes = run(args.rounds, args.quick, only,
                                  set(args.figure or ()))
    flatten(results)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpus": len(ALL_CPUS), "pinned": PINNED,
            "rounds": args.rounds, "quick": args.quick,
            "loadavg": os.getloadavg(), "seconds": time.monotonic() - t0,
            "not_installed": missing, "notes": notes}
    comparison = routed_vs_relayed(results)
    against_nginx = listener_vs_nginx(results)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": results,
                   "routed_vs_relayed": comparison,
                   "listener_vs_nginx": against_nginx}, f, indent=1)
    print(table(results, missing))
    if comparison is not None:
        print()
        print(comparison_table(comparison, "routed vs relayed, imapfe -l, "
                               "same rounds", "routed/relayed"))
    if against_nginx is not None:
        print()
        print(comparison_table(against_nginx, "imapfe -l vs nginx mail, "
                               "same rounds", "imapfe -l/nginx"))
    print("\n%s, %d CPUs%s, medians of %d rounds, load average %.1f, "
          "%.0f s" % (meta["date"], meta["cpus"],
                      " (servers CPU 0, client CPU 1)" if PINNED else "",
                      args.rounds, meta["loadavg"][0], meta["seconds"]))
    for n, note in notes.items():
        if note:
            print("%s: %s" % (n, note))


if __name__ == "__main__":
    main()
