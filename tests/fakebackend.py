"""A scriptable IMAP back-end for fault injection, used beside the real
Dovecot, never instead of it.  It records every byte it receives, so a test
can prove what imapfe sent and what it did not."""
import socket
import threading


class Conn:
    def __init__(self, sock, log):
        self.sock = sock
        self.buf = b""
        self.log = log          # every byte received on this connection

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def sendline(self, text):
        self.send(text + "\r\n")

    def line(self):
        """One line without CRLF, or None at EOF."""
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self.log.extend(chunk)
            self.buf += chunk
        ln, self.buf = self.buf.split(b"\r\n", 1)
        return ln.decode("latin-1")

    def read_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.log.extend(chunk)
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def parse_strings(conn, text):
    """The astrings of a command line: atoms, quoted strings, and literals
    (read from conn, answering "+" for synchronizing ones)."""
    out = []
    i = 0
    data = text.encode("latin-1")
    while i < len(data):
        if data[i:i + 1] == b" ":
            i += 1
        elif data[i:i + 1] == b'"':
            j, s = i + 1, b""
            while data[j:j + 1] != b'"':
                if data[j:j + 1] == b"\\":
                    j += 1
                s += data[j:j + 1]
                j += 1
            out.append(s)
            i = j + 1
        elif data[i:i + 1] == b"{" and data.endswith(b"}"):
            n = int(data[i + 1:-1].rstrip(b"+"))
            if not data.endswith(b"+}"):
                conn.sendline("+ go")
            out.append(conn.read_exact(n))
            data = conn.line().encode("latin-1")
            i = 0
        else:
            j = data.find(b" ", i)
            j = len(data) if j < 0 else j
            out.append(data[i:j])
            i = j
    return out


def command_loop(answer):
    """An after_login for plain_server: each command after login goes to
    answer(conn, tag, cmd, rest), which returns True when it answered;
    NOOP it leaves gets OK, LOGOUT a BYE, the rest serve_commands'
    defaults, until LOGOUT or EOF."""
    def with_noop(conn, tag, cmd, rest):
        if answer(conn, tag, cmd, rest):
            return True
        if cmd == "NOOP":
            conn.sendline(tag + " OK noop")
            return True
        return False
    return lambda conn: serve_commands(conn, None, with_noop)


def plain_server(conn, caps="IMAP4rev1 LITERAL+ AUTH=PLAIN",
                 accept=lambda user, pw: True, after_login=None):
    """A back-end that does just enough IMAP: greeting, CAPABILITY, LOGIN
    (with literals), AUTHENTICATE PLAIN, then NOOP and LOGOUT."""
    import base64

    def login_result(tag, ok):
        if not ok:
            conn.sendline(tag + " NO [AUTHENTICATIONFAILED] no")
            return True
        conn.sendline(tag + " OK [CAPABILITY IMAP4rev1 IDLE] in")
        if after_login:
            after_login(conn)
            return END
        return True

    def answer(conn, tag, cmd, rest):
        if cmd == "AUTHENTICATE":
            parts = rest.split(" ")
            data = parts[2] if len(parts) > 2 else None
            if data is None:
                conn.sendline("+ ")
                data = conn.line()
            _, user, pw = base64.b64decode(data).split(b"\0")
            return login_result(tag, accept(user, pw))
        if cmd == "LOGIN":
            args = parse_strings(conn, rest.split(" ", 1)[1])
            return login_result(tag, len(args) == 2 and accept(*args))
        if cmd == "NOOP":
            conn.sendline(tag + " OK noop")
            return True
        return False

    serve_commands(conn, "* OK [CAPABILITY %s] fake ready" % caps, answer,
                   caps)


END = "end"     # an answer that ends serve_commands


def serve_commands(conn, greeting, answer, caps="IMAP4rev1",
                   other="BAD unknown"):
    """Greet (greeting None: a session greeted already, after login), then
    answer each command with answer(conn, tag, cmd, rest) until LOGOUT or
    EOF.  answer returns True for a command it answered, END to stop
    serving, or something false for the defaults: CAPABILITY with caps,
    LOGOUT, and `other` for the rest."""
    if greeting is not None:
        conn.sendline(greeting)
    while True:
        ln = conn.line()
        if ln is None:
            return
        tag, _, rest = ln.partition(" ")
        cmd = rest.split(" ", 1)[0].upper()
        done = answer(conn, tag, cmd, rest)
        if done == END:
            return
        if done:
            continue
        if cmd == "CAPABILITY":
            conn.sendline("* CAPABILITY " + caps)
            conn.sendline(tag + " OK done")
        elif cmd == "LOGOUT":
            conn.sendline("* BYE bye")
            conn.sendline(tag + " OK bye")
            return
        else:
            conn.sendline(tag + " " + other)


class FakeBackend:
    def __init__(self, script):
        self.script = script
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received = []      # one bytearray per connection
        self.threads = []
        self.running = True
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self):
        while self.running:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            log = bytearray()
            self.received.append(log)
            t = threading.Thread(target=self._serve, args=(s, log),
                                 daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, s, log):
        conn = Conn(s, log)
        try:
            self.script(conn)
        except OSError:
            pass
        finally:
            s.close()

    def close(self):
        self.running = False
        self.sock.close()
        for t in self.threads:
            t.join(timeout=5)


# ---------------------------------------------------------------------------
# Back-ends that fail a login in one particular way, for the SASL tests.
# Each kind is one way a back-end can go wrong during imapfe's login; what
# the client must hear for it is in the tests.

# What each kind advertises: SCRAM kinds offer only SCRAM-SHA-256 so that
# imapfe's default backend_mechanisms must pick it.
MISBEHAVIOUR_CAPS = {
    "reject": "IMAP4rev1 SASL-IR AUTH=PLAIN",
    "nomech": "IMAP4rev1 LOGINDISABLED AUTH=GSSAPI AUTH=X-UNKNOWN",
    "badbase64": "IMAP4rev1 SASL-IR AUTH=SCRAM-SHA-256",
    "badscram": "IMAP4rev1 SASL-IR AUTH=SCRAM-SHA-256",
    "longline": "IMAP4rev1 SASL-IR AUTH=PLAIN",
    "close": "IMAP4rev1 SASL-IR AUTH=PLAIN",
    "silent": "IMAP4rev1 SASL-IR AUTH=PLAIN",
    "earlyok": "IMAP4rev1 SASL-IR AUTH=SCRAM-SHA-256",
    "earlyok-final": "IMAP4rev1 SASL-IR AUTH=SCRAM-SHA-256",
    "badsignature": "IMAP4rev1 SASL-IR AUTH=SCRAM-SHA-256",
    "bye": "IMAP4rev1 SASL-IR AUTH=PLAIN",
    "accept": "IMAP4rev1 SASL-IR AUTH=PLAIN",
}


def _b64(data):
    import base64
    return base64.b64encode(data).decode()


def _drain(conn, tag):
    """After imapfe should have given up: answer its '*' cancel and a
    LOGOUT, and return at EOF.  Returns the lines it sent."""
    got = []
    while True:
        ln = conn.line()
        if ln is None:
            return got
        got.append(ln)
        if ln == "*":
            conn.sendline(tag + " BAD Authentication cancelled")
        elif " " in ln and ln.split(" ", 2)[1].upper() == "LOGOUT":
            conn.sendline("* BYE bye")
            conn.sendline(ln.split(" ")[0] + " OK bye")
            return got


def misbehaving_server(conn, kind, password="pw", record=None):
    """Greet, offer the mechanisms of kind, and fail the login that way.
    record, a dict, gets: commands (every command line), mech, initial
    (the decoded first client message), after (what imapfe sent once the
    failure had happened), and scram (the ScramServer, for SCRAM kinds)."""
    import base64
    rec = record if record is not None else {}
    rec.setdefault("commands", [])
    conn.sendline("* OK [CAPABILITY %s] fake ready" %
                  MISBEHAVIOUR_CAPS[kind])
    while True:
        ln = conn.line()
        if ln is None:
            return
        rec["commands"].append(ln)
        tag, _, rest = ln.partition(" ")
        cmd = rest.split(" ", 1)[0].upper()
        if cmd == "CAPABILITY":
            conn.sendline("* CAPABILITY " + MISBEHAVIOUR_CAPS[kind])
            conn.sendline(tag + " OK done")
        elif cmd == "LOGOUT":
            conn.sendline("* BYE bye")
            conn.sendline(tag + " OK bye")
            return
        elif cmd == "NOOP":
            conn.sendline(tag + " OK noop")
        elif cmd == "AUTHENTICATE":
            parts = rest.split(" ")
            rec["mech"] = parts[1].upper()
            ir = parts[2] if len(parts) > 2 else None
            if ir is None:
                conn.sendline("+ ")
                ir = conn.line()
                if ir is None:
                    return
            data = b"" if ir == "=" else base64.b64decode(ir)
            rec["initial"] = data
            _misbehave(conn, kind, tag, data, password, rec)
            return
        elif cmd == "LOGIN":
            conn.sendline(tag + " NO [AUTHENTICATIONFAILED] no")
        else:
            conn.sendline(tag + " BAD unknown")


def _misbehave(conn, kind, tag, data, password, rec):
    from saslbed import ScramServer
    if kind == "reject":
        conn.sendline(tag + " NO [AUTHENTICATIONFAILED] Invalid credentials")
    elif kind == "accept":
        conn.sendline(tag + " OK [CAPABILITY IMAP4rev1 IDLE] in")
        rec["after"] = _drain(conn, tag)
        return
    elif kind == "badbase64":
        conn.sendline("+ %%%not base64%%%")
    elif kind == "badscram":
        conn.sendline("+ " + _b64(b"this is no SCRAM server-first"))
    elif kind == "longline":
        conn.send("* OK " + "x" * (70 * 1024) + "\r\n")
    elif kind == "close":
        return
    elif kind == "silent":
        pass
    elif kind == "earlyok":
        conn.sendline(tag + " OK [CAPABILITY IMAP4rev1 IDLE] welcome")
    elif kind in ("earlyok-final", "badsignature"):
        srv = rec["scram"] = ScramServer("SCRAM-SHA-256", password)
        conn.sendline("+ " + _b64(srv.first(data)))
        ln = conn.line()
        if ln is None:
            return
        import base64
        final = srv.final(base64.b64decode(ln),
                          wrong_signature=kind == "badsignature")
        if final is None:
            conn.sendline(tag + " NO [AUTHENTICATIONFAILED] wrong proof")
        elif kind == "earlyok-final":
            conn.sendline(tag + " OK [CAPABILITY IMAP4rev1 IDLE] welcome")
        else:
            conn.sendline("+ " + _b64(final))
            ln = conn.line()
            if ln is None:
                return
            rec["after"] = [ln]
            if ln == "*":
                conn.sendline(tag + " BAD Authentication cancelled")
            else:   # imapfe took the forged signature: let it in
                conn.sendline(tag + " OK [CAPABILITY IMAP4rev1 IDLE] in")
    elif kind == "bye":
        conn.sendline("* BYE [UNAVAILABLE] shutting down")
        return
    rec["after"] = rec.get("after", []) + _drain(conn, tag)


class MisbehavingBackend(FakeBackend):
    """A fake back-end whose next connections fail as .kind says (set it
    before each login).  records holds one dict per connection."""

    def __init__(self, kind="reject", password="pw"):
        self.kind = kind
        self.password = password
        self.records = []
        super().__init__(self._script)

    def _script(self, conn):
        rec = {"kind": self.kind}
        self.records.append(rec)
        misbehaving_server(conn, rec["kind"], self.password, rec)
