"""Test bed for imapfe: a real Dovecot back-end, imapfe run as inetd runs
it (one process per connection on stdin/stdout) and as its own listener,
and a scriptable back-end for fault injection.

Every imapfe process a test starts is ended by PID when the test ends, and
its sanitizer or valgrind report, if any, fails the test.

Environment:
  IMAPFE_BIN       the binary to test (default: ../imapfe)
  IMAPFE_VALGRIND  1 to run every imapfe process under valgrind memcheck
"""
import base64
import glob
import imaplib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
BIN = os.environ.get("IMAPFE_BIN", os.path.join(TOP, "imapfe"))
VALGRIND = os.environ.get("IMAPFE_VALGRIND") == "1"
# IMAPFE_ROUTED=1: every configuration gets a server line that nothing
# refers to, so every session after login goes through the router instead
# of the byte relay -- the whole suite, to show the router changes nothing.
ROUTED = os.environ.get("IMAPFE_ROUTED") == "1"
SLOW = 8 if VALGRIND else 1          # valgrind runs code ~20x slower

USERS = {"alice": "secret", "bob": "hunter2", "carol": "p\u00e4ss word"}
MAILUID = 65534                      # nobody: Dovecot refuses root mail
RUN_AS = "user nobody\ngroup nogroup\n"   # imapfe's sessions, never root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, what="condition"):
    """Poll predicate until it is true; fail the test at timeout."""
    deadline = time.monotonic() + timeout * SLOW
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


def read_greeting(port, host="127.0.0.1", timeout=2.0):
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data
    except OSError:
        return b""


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Dovecot

DOVECOT_CONF = """\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = {mechs}
auth_verbose = yes
auth_verbose_passwords = no
mail_location = maildir:{d}/mail/%u
login_trusted_networks =
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={uid} home={d}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""


def dovecot_tls_conf(conf, imaps_port, cert, key, ca=None):
    """DOVECOT_CONF with TLS: STARTTLS on the plain port, implicit TLS on
    imaps_port, and with ca a client certificate the CA signed required."""
    ssl = "ssl = yes\nssl_cert = <%s\nssl_key = <%s\n" % (cert, key)
    if ca is not None:
        ssl += ("ssl_ca = <%s\nssl_verify_client_cert = yes\n"
                "ssl_require_crl = no\nauth_ssl_require_client_cert = yes\n"
                % ca)
    off = "  inet_listener imaps {\n    port = 0\n  }\n"
    on = ("  inet_listener imaps {\n    address = 127.0.0.1\n"
          "    port = %d\n  }\n" % imaps_port)
    assert "ssl = no\n" in conf and off in conf
    return conf.replace("ssl = no\n", ssl).replace(off, on)


class Dovecot:
    """A real Dovecot IMAP server under a temporary directory; with
    ssl_cert, also with TLS (STARTTLS on port, implicit on imaps_port)."""

    def __init__(self, mechs="plain login", ssl_cert=None, ssl_key=None,
                 ssl_ca=None, extra_conf="", passwd=None):
        """extra_conf: text appended to the configuration (namespaces,
        say), or a function of the server's directory returning it, called
        before the server starts; passwd: the passwd-file's text instead
        of USERS' lines."""
        self.dir = tempfile.mkdtemp(prefix="imapfe-dovecot-")
        os.chmod(self.dir, 0o755)
        for sub in ("run", "state", "mail"):
            os.mkdir(os.path.join(self.dir, sub))
        os.chown(os.path.join(self.dir, "mail"), MAILUID, MAILUID)
        self.port = free_port()
        self.imaps_port = None
        self.conf = os.path.join(self.dir, "dovecot.conf")
        self.log = os.path.join(self.dir, "dovecot.log")
        conf = DOVECOT_CONF.format(d=self.dir, port=self.port,
                                   uid=MAILUID, mechs=mechs)
        if ssl_cert is not None:
            self.imaps_port = free_port()
            conf = dovecot_tls_conf(conf, self.imaps_port, ssl_cert,
                                    ssl_key or ssl_cert, ssl_ca)
        conf += extra_conf(self.dir) if callable(extra_conf) else extra_conf
        with open(self.conf, "w") as f:
            f.write(conf)
        with open(os.path.join(self.dir, "passwd"), "w",
                  encoding="utf-8") as f:
            if passwd is not None:
                f.write(passwd)
            else:
                for user, pw in USERS.items():
                    f.write("%s:{PLAIN}%s::::::\n" % (user, pw))
        self.proc = None
        self.start()

    def start(self, timeout=20):
        self.proc = subprocess.Popen(
            ["dovecot", "-F", "-c", self.conf],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True)
        # Ready means the real greeting, not "Waiting for authentication".
        wait_for(lambda: b"ready" in read_greeting(self.port), timeout,
                 "dovecot greeting")

    def stop(self):
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        wait_for(lambda: read_greeting(self.port, timeout=0.2) == b"", 10,
                 "dovecot to stop")

    def restart(self):
        self.stop()
        self.start()

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def imap(self, user="alice"):
        import imaplib
        m = imaplib.IMAP4("127.0.0.1", self.port)
        m.login(user, USERS[user])
        return m


def sample_message(i, body=None):
    body = body or ("Message number %d.\r\n" % i)
    return ("From: sender@example.org\r\nTo: alice@example.org\r\n"
            "Subject: test %d\r\nMessage-ID: <%d@example.org>\r\n\r\n%s"
            % (i, i, body)).encode()


def fill_inbox(d):
    """Three messages in alice's INBOX on Dovecot d."""
    m = d.imap("alice")
    for i in range(1, 4):
        m.append("INBOX", None, None, sample_message(i))
    m.logout()


@pytest.fixture(scope="session")
def dovecot():
    d = Dovecot()
    fill_inbox(d)
    yield d
    d.close()


# ---------------------------------------------------------------------------
# TLS certificates, made with the openssl command for each test session

LOCAL_SAN = "DNS:localhost,IP:127.0.0.1"


class Certs:
    """A test CA and what it signed, plus a second CA nobody trusts.
    Attributes are paths: ca, ca_key, imapfe, imapfe_key, dovecot,
    dovecot_key, wrongname, wrongname_key, untrusted, untrusted_key,
    untrusted_ca, client, client_key, ticket_key."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="imapfe-certs-")
        os.chmod(self.dir, 0o755)
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self):
        self.ca, self.ca_key = self._ca("ca", "imapfe test CA")
        self.untrusted_ca, untrusted_ca_key = self._ca(
            "untrusted-ca", "imapfe untrusted CA")
        self.imapfe, self.imapfe_key = self._leaf("imapfe", LOCAL_SAN)
        self.dovecot, self.dovecot_key = self._leaf("dovecot", LOCAL_SAN)
        self.wrongname, self.wrongname_key = self._leaf(
            "wrongname", "DNS:wrong.example")
        self.untrusted, self.untrusted_key = self._leaf(
            "untrusted", LOCAL_SAN, ca=(self.untrusted_ca, untrusted_ca_key))
        self.client, self.client_key = self._leaf(
            "client", "DNS:client.example", usage="clientAuth")
        self.ticket_key = self.path("ticket.key")
        self._openssl("rand", "-out", self.ticket_key, "80")
        os.chmod(self.ticket_key, 0o600)

    def path(self, name):
        return os.path.join(self.dir, name)

    def _openssl(self, *args):
        r = subprocess.run(["openssl"] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        assert r.returncode == 0, "openssl %s: %s" % (
            " ".join(args), r.stdout.decode(errors="replace"))

    def _newkey(self, name):
        key = self.path(name + ".key")
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt",
                      "ec_paramgen_curve:P-256", "-out", key)
        return key

    def _ca(self, name, cn):
        key = self._newkey(name)
        pem = self.path(name + ".pem")
        self._openssl("req", "-x509", "-new", "-key", key, "-out", pem,
                      "-days", "30", "-subj", "/CN=" + cn,
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return pem, key

    def _leaf(self, name, san, ca=None, usage="serverAuth"):
        ca_pem, ca_key = ca or (self.ca, self.ca_key)
        key = self._newkey(name)
        csr, pem, ext = (self.path(name + x) for x in (".csr", ".pem",
                                                        ".ext"))
        with open(ext, "w") as f:
            f.write("basicConstraints = CA:FALSE\n"
                    "keyUsage = critical,digitalSignature\n"
                    "extendedKeyUsage = %s\n"
                    "subjectAltName = %s\n" % (usage, san))
        self._openssl("req", "-new", "-key", key, "-out", csr,
                      "-subj", "/CN=" + name)
        self._openssl("x509", "-req", "-in", csr, "-CA", ca_pem,
                      "-CAkey", ca_key, "-set_serial",
                      str(int.from_bytes(os.urandom(8), "big")),
                      "-days", "30", "-extfile", ext, "-out", pem)
        return pem, key

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def certs():
    c = Certs()
    yield c
    c.close()


def filled_dovecot(**kwargs):
    """A Dovecot whose alice has three messages in her INBOX."""
    d = Dovecot(**kwargs)
    fill_inbox(d)
    return d


@pytest.fixture(scope="session")
def dovecot_tls(certs):
    """Dovecot with the test CA's certificate for localhost, 127.0.0.1."""
    d = filled_dovecot(ssl_cert=certs.dovecot, ssl_key=certs.dovecot_key)
    yield d
    d.close()


@pytest.fixture(scope="session")
def dovecot_wrongname(certs):
    """Dovecot whose certificate (test CA) names only wrong.example."""
    d = Dovecot(ssl_cert=certs.wrongname, ssl_key=certs.wrongname_key)
    yield d
    d.close()


@pytest.fixture(scope="session")
def dovecot_clientcert(certs):
    """Dovecot that lets in only clients with a certificate from the CA."""
    d = Dovecot(ssl_cert=certs.dovecot, ssl_key=certs.dovecot_key,
                ssl_ca=certs.ca)
    yield d
    d.close()


@pytest.fixture(scope="session")
def dovecot_untrusted(certs):
    """Dovecot whose certificate is for 127.0.0.1 but from another CA."""
    d = Dovecot(ssl_cert=certs.untrusted, ssl_key=certs.untrusted_key)
    yield d
    d.close()


# ---------------------------------------------------------------------------
# imapfe processes

class Processes:
    """Every imapfe process a test starts, ended by PID at the end."""

    def __init__(self, tmp):
        self.tmp = tmp
        # Sanitizers write their reports after imapfe gave up root: the
        # directory must take files from RUN_AS's user, and be reachable.
        self.reports = tempfile.mkdtemp(prefix="imapfe-reports-")
        os.chmod(self.reports, 0o1777)
        self.procs = []
        self.lock = threading.Lock()

    def command(self, args):
        cmd = [BIN] + args
        if VALGRIND:
            cmd = ["valgrind", "--quiet", "--error-exitcode=99", "--vgdb=no",
                   "--leak-check=full",
                   "--show-leak-kinds=definite,indirect",
                   "--errors-for-leak-kinds=definite,indirect",
                   "--suppressions=" + os.path.join(HERE, "valgrind.supp"),
                   "--log-file=" + os.path.join(self.reports,
                                                "valgrind.%p")] + cmd
        return cmd

    def env(self):
        env = dict(os.environ)
        env["ASAN_OPTIONS"] = ("detect_leaks=1:abort_on_error=0:"
                               "log_path=" + os.path.join(self.reports,
                                                          "asan"))
        env["UBSAN_OPTIONS"] = ("print_stacktrace=1:halt_on_error=1:"
                                "log_path=" + os.path.join(self.reports,
                                                           "ubsan"))
        return env

    def spawn(self, args, stdin=None, stdout=None, stderr=None,
              pass_fds=()):
        p = subprocess.Popen(self.command(args), stdin=stdin, stdout=stdout,
                             stderr=stderr, env=self.env(),
                             pass_fds=pass_fds)
        with self.lock:
            self.procs.append(p)
        return p

    def finish(self, timeout=10):
        """Wait for every process to end (they should on their own); end
        the rest by PID.  Returns the PIDs that had to be killed."""
        killed = []
        for p in self.procs:
            try:
                p.wait(timeout=timeout * SLOW)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5 * SLOW)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                killed.append(p.pid)
        return killed

    def report_text(self):
        text = ""
        for path in sorted(glob.glob(os.path.join(self.reports, "*"))):
            with open(path, errors="replace") as f:
                content = f.read()
            if content.strip():
                text += "==> %s\n%s\n" % (os.path.basename(path), content)
        return text


class Imapfe:
    """One imapfe configuration, started inetd-style or as a listener."""

    def __init__(self, procs, tmp, config):
        self.procs = procs
        self.tmp = tmp
        self.conf = os.path.join(tmp, "imapfe.conf")
        with open(self.conf, "w") as f:
            f.write(config)
        self.log = os.path.join(tmp, "imapfe.log")
        self.port = None
        self.listener = None
        self._server = None
        self._logf = open(self.log, "ab", buffering=0)

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait_log(self, text, timeout=10):
        def seen():
            log = self.log_text()
            return log if text in log else None
        return wait_for(seen, timeout, "log line %r" % text)

    # inetd: a small accept loop that hands each connection to a new
    # imapfe process on its stdin and stdout, as inetd's "nowait" does.
    def start_inetd(self, extra_args=(), host="127.0.0.1"):
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((host, 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        args = ["-d", "-f", self.conf] + list(extra_args)

        def loop():
            while True:
                try:
                    conn, _ = self._server.accept()
                except OSError:
                    return
                self.procs.spawn(args, stdin=conn.fileno(),
                                 stdout=conn.fileno(), stderr=self._logf)
                conn.close()
        threading.Thread(target=loop, daemon=True).start()
        return self.port

    def start_listener(self, extra_args=(), greeting=read_greeting):
        """greeting(port) reads the greeting; implicit TLS needs its own."""
        self.port = free_port()
        self.listener = self.procs.spawn(
            ["-d", "-f", self.conf, "-l", "127.0.0.1:%d" % self.port]
            + list(extra_args), stderr=self._logf)
        wait_for(lambda: greeting(self.port).startswith(b"* OK"), 10,
                 "imapfe listener")
        return self.port

    def stop(self):
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.listener is not None and self.listener.poll() is None:
            self.listener.send_signal(signal.SIGTERM)
            self.listener.wait(timeout=20 * SLOW)
            assert self.listener.returncode == 0, \
                "listener exit status %s" % self.listener.returncode

    def run_stdio(self, data, timeout=20):
        """Run one session on a pipe, as a super-server would; return its
        output."""
        p = self.procs.spawn(["-d", "-f", self.conf],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=self._logf)
        out, _ = p.communicate(data, timeout=timeout * SLOW)
        return out


@pytest.fixture
def procs(tmp_path):
    pr = Processes(str(tmp_path))
    yield pr
    killed = pr.finish()
    report = pr.report_text()
    shutil.rmtree(pr.reports, ignore_errors=True)
    assert not report, "sanitizer/valgrind report:\n" + report
    bad = [p.returncode for p in pr.procs if p.returncode not in (0,)]
    assert not killed, "imapfe processes did not exit: %s" % killed
    assert not bad, "imapfe exit statuses: %s" % bad


# Clients a test opened (tests append them), closed when it ends however
# it ends, so that the imapfe processes serving them end too before the
# procs fixture checks that they did.
OPEN_CLIENTS = []


@pytest.fixture(autouse=True)
def close_clients(procs):
    yield
    while OPEN_CLIENTS:
        c = OPEN_CLIENTS.pop()
        try:
            if isinstance(c, imaplib.IMAP4):
                c.shutdown()
            else:
                c.close()
        except OSError:
            pass


@pytest.fixture
def imapfe_factory(procs, tmp_path):
    made = []

    def make(config, name="fe"):
        # Most tests talk plaintext on loopback; the TLS tests say otherwise.
        if "plaintext_auth" not in config:
            config += "plaintext_auth yes\n"
        # Started as root, imapfe runs sessions only as a user of its own.
        if not re.search(r"^user ", config, re.M):
            config += RUN_AS
        if ROUTED and not re.search(r"^(public|server) ", config, re.M):
            config += "server 127.0.0.1:9\n"
        d = os.path.join(str(tmp_path), name)
        # Each test's penalties, limits and back-ends found down are its
        # own, not those of every imapfe on the host.
        if not re.search(r"^state_file ", config, re.M):
            config += "state_file %s\n" % os.path.join(d, "state")
        os.mkdir(d)
        fe = Imapfe(procs, d, config)
        made.append(fe)
        return fe
    yield make
    for fe in made:
        fe.stop()


def recv_until_eof(c, limit=10):
    """Everything a Raw client still gets until the connection closes."""
    c.sock.settimeout(limit * SLOW)
    data = c.buf
    while True:
        chunk = c.sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def base_config(backend_port, extra=""):
    return ("route * 127.0.0.1:%d\n"
            "login_timeout %d\n" % (backend_port, 30 * SLOW)) + extra


@pytest.fixture
def fe(imapfe_factory, dovecot):
    """imapfe in front of the shared Dovecot, run inetd-style."""
    f = imapfe_factory(base_config(dovecot.port))
    f.start_inetd()
    return f


# ---------------------------------------------------------------------------
# a raw IMAP client for what imaplib will not send

class Raw:
    """Lines over a socket; with tls (an ssl.SSLContext), implicit TLS
    from the first byte, and starttls() to switch after a STARTTLS."""

    def __init__(self, port, timeout=10, tls=None, server_hostname=None):
        self.sock = socket.create_connection(("127.0.0.1", port),
                                             timeout=timeout * SLOW)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock,
                                        server_hostname=server_hostname)
        self.buf = b""
        self.greeting = self.line()

    def starttls(self, tls, server_hostname=None):
        """The TLS handshake on this connection, after a tagged OK to
        STARTTLS.  Bytes the server sent after its OK would be an
        injection: there must be none."""
        assert self.buf == b"", "data after STARTTLS OK: %r" % self.buf
        self.sock = tls.wrap_socket(self.sock,
                                    server_hostname=server_hostname)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed; buffered %r" % self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def until_tagged(self, tag):
        """Lines up to and including the tagged one."""
        lines = []
        while True:
            ln = self.line()
            lines.append(ln)
            if ln.startswith(tag + " "):
                return lines

    def cmd(self, tag, text):
        self.send("%s %s\r\n" % (tag, text))
        return self.until_tagged(tag)

    def closed(self):
        """True once the server has closed the connection."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except OSError:
            return True

    def close(self):
        self.sock.close()


def b64(s):
    if isinstance(s, str):
        s = s.encode()
    return base64.b64encode(s).decode()
