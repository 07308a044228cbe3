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


def plain_server(conn, caps="IMAP4rev1 LITERAL+ AUTH=PLAIN",
                 accept=lambda user, pw: True, after_login=None):
    """A back-end that does just enough IMAP: greeting, CAPABILITY, LOGIN
    (with literals), AUTHENTICATE PLAIN, then NOOP and LOGOUT."""
    import base64
    conn.sendline("* OK [CAPABILITY %s] fake ready" % caps)
    while True:
        ln = conn.line()
        if ln is None:
            return
        tag, _, rest = ln.partition(" ")
        cmd = rest.split(" ", 1)[0].upper()
        if cmd == "CAPABILITY":
            conn.sendline("* CAPABILITY " + caps)
            conn.sendline(tag + " OK done")
        elif cmd == "AUTHENTICATE":
            parts = rest.split(" ")
            data = parts[2] if len(parts) > 2 else None
            if data is None:
                conn.sendline("+ ")
                data = conn.line()
            raw = base64.b64decode(data)
            _, user, pw = raw.split(b"\0")
            if accept(user, pw):
                conn.sendline(tag + " OK [CAPABILITY IMAP4rev1 IDLE] in")
                if after_login:
                    return after_login(conn)
            else:
                conn.sendline(tag + " NO [AUTHENTICATIONFAILED] no")
        elif cmd == "LOGIN":
            args = parse_strings(conn, rest.split(" ", 1)[1])
            if len(args) == 2 and accept(*args):
                conn.sendline(tag + " OK [CAPABILITY IMAP4rev1 IDLE] in")
                if after_login:
                    return after_login(conn)
            else:
                conn.sendline(tag + " NO [AUTHENTICATIONFAILED] no")
        elif cmd == "LOGOUT":
            conn.sendline("* BYE bye")
            conn.sendline(tag + " OK bye")
            return
        elif cmd == "NOOP":
            conn.sendline(tag + " OK noop")
        else:
            conn.sendline(tag + " BAD unknown")


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
