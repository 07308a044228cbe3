"""HAProxy's PROXY protocol on the client side (issue 7): v1 and v2
headers from trusted addresses only, strict parsing, the real client's
address in logs, plaintext_auth and the back-end's ID; and a real HAProxy
balancing over two imapfe listeners."""
import imaplib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess

import pytest

from conftest import SLOW, Dovecot, base_config, free_port, wait_for

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(src, sport, dst, dport, command=0x21):
    """A v2 PROXY header for TCP over IPv4 (or LOCAL with command 0x20)."""
    body = (socket.inet_aton(src) + socket.inet_aton(dst) +
            struct.pack("!HH", sport, dport))
    return V2_SIG + struct.pack("!BBH", command, 0x11, len(body)) + body


def connect(port, source_ip="127.0.0.1", header=b""):
    sock = socket.socket()
    sock.bind((source_ip, 0))
    sock.settimeout(10 * SLOW)
    sock.connect(("127.0.0.1", port))
    if header:
        sock.sendall(header)
    return sock


def lines_until(sock, tag):
    buf = b""
    while not re.search(rb"(^|\r\n)" + tag + rb" [^\r\n]*\r\n", buf):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


def nothing_before_close(sock):
    """True if the peer closes (or resets, having unread bytes) without
    sending a byte."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def greeting_after(header):
    """A readiness probe for a listener that wants a PROXY header."""
    def probe(port):
        try:
            with connect(port, header=header) as s:
                return s.recv(4096)
        except OSError:
            return b""
    return probe


def proxied_fe(imapfe_factory, dovecot, trusted="127.0.0.1/32",
               extra="plaintext_auth yes\n", timeout=2 * SLOW):
    f = imapfe_factory(base_config(
        dovecot.port, "proxy_protocol_trusted %s ::1/128\n"
        "proxy_protocol_timeout %d\n%s" % (trusted, timeout, extra)))
    return f


def test_v1_and_v2_headers_name_the_client(imapfe_factory, dovecot):
    f = proxied_fe(imapfe_factory, dovecot)
    port = f.start_listener(greeting=greeting_after(
        b"PROXY TCP4 192.0.2.9 127.0.0.1 1000 143\r\n"))
    for header, client in (
            (b"PROXY TCP4 192.0.2.10 127.0.0.1 40001 143\r\n",
             "192.0.2.10:40001"),
            (b"PROXY TCP6 2001:db8::7 ::1 40002 143\r\n",
             "[2001:db8::7]:40002"),
            (v2_header("198.51.100.3", 40003, "127.0.0.1", 143),
             "198.51.100.3:40003")):
        with connect(port, header=header) as s:
            assert s.recv(4096).startswith(b"* OK")
            s.sendall(b"a LOGIN alice secret\r\n")
            assert "a OK" in lines_until(s, b"a")
            s.sendall(b"z LOGOUT\r\n")
            lines_until(s, b"z")
        f.wait_log("event=connect client=%s proxy=127.0.0.1:" % client)


def test_proxied_client_is_not_loopback_because_the_proxy_is(imapfe_factory,
                                                             dovecot):
    f = proxied_fe(imapfe_factory, dovecot, extra="plaintext_auth loopback\n")
    port = f.start_listener(greeting=greeting_after(
        b"PROXY TCP4 127.0.0.9 127.0.0.1 1000 143\r\n"))
    # a remote client behind a proxy on loopback: no plaintext login
    with connect(port, header=b"PROXY TCP4 192.0.2.10 127.0.0.1 1 143\r\n"
                 ) as s:
        assert b"LOGINDISABLED" in s.recv(4096)
        s.sendall(b"a LOGIN alice secret\r\n")
        assert "a NO" in lines_until(s, b"a")
    # a health check (LOCAL) is the proxy itself, still not loopback
    with connect(port, header=v2_header("0.0.0.0", 0, "0.0.0.0", 0, 0x20)
                 ) as s:
        assert b"LOGINDISABLED" in s.recv(4096)
    # a client on loopback behind it is loopback
    with connect(port, header=b"PROXY TCP4 127.0.0.7 127.0.0.1 1 143\r\n"
                 ) as s:
        assert b"LOGINDISABLED" not in s.recv(4096)
        s.sendall(b"a LOGIN alice secret\r\n")
        assert "a OK" in lines_until(s, b"a")


BAD_HEADERS = [
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 1 14", "closed before the header"),
    (b"PROXY TCP4 " + b"1" * 120 + b"\r\n", "v1 header too long"),
    (b"HELLO THERE\r\n", "no PROXY header"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 99999 143\r\n", "malformed v1"),
    (b"PROXY TCP4  192.0.2.1 127.0.0.1 1 143\r\n", "malformed v1"),
    (b"PROXY TCP6 192.0.2.1 127.0.0.1 1 143\r\n", "malformed v1"),
    (V2_SIG + b"\x21\x11\x00\x04" + b"\x7f\x00\x00\x01", "malformed v2"),
    (V2_SIG + b"\x21\x11\xff\xff", "v2 header too long"),
    (V2_SIG + b"\x31\x11\x00\x0c" + b"\x00" * 12, "unsupported v2 version"),
    (V2_SIG + b"\x21\x31\x00\x0c" + b"\x00" * 12,
     "unsupported v2 address family"),
    # the length says 32 bytes follow; 12 do, then the peer stops
    (V2_SIG + b"\x21\x11\x00\x20" + b"\x00" * 12, "closed before the header"),
]


def test_bad_headers_end_the_connection_with_a_log_line(imapfe_factory,
                                                        dovecot):
    f = proxied_fe(imapfe_factory, dovecot)
    port = f.start_listener(greeting=greeting_after(
        b"PROXY TCP4 192.0.2.9 127.0.0.1 1000 143\r\n"))
    for n, (header, reason) in enumerate(BAD_HEADERS, 1):
        with connect(port) as s:
            s.sendall(header)
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:     # imapfe may have refused it already
                pass
            assert nothing_before_close(s), header   # no greeting at all
        wait_for(lambda: f.log_text().count("event=proxy-error") == n, 10,
                 "the proxy-error line for %r" % header)
        line = [ln for ln in f.log_text().splitlines()
                if "event=proxy-error" in ln][-1]
        assert "reason=\"" + reason in line, (header, line)
    # only the readiness probe got as far as a session
    assert f.log_text().count("event=connect") == 1


def test_silent_trusted_peer_times_out(imapfe_factory, dovecot):
    f = proxied_fe(imapfe_factory, dovecot, timeout=1)
    port = f.start_inetd()
    with connect(port, header=b"PROXY TCP4") as s:
        assert nothing_before_close(s)
    assert 'reason="timeout"' in f.wait_log("event=proxy-error",
                                            timeout=10 * SLOW)


def test_untrusted_source_is_not_parsed(imapfe_factory, dovecot):
    f = proxied_fe(imapfe_factory, dovecot, trusted="127.0.0.2/32")
    port = f.start_inetd()
    with connect(port, header=b"PROXY TCP4 192.0.2.1 127.0.0.1 1 143\r\n"
                 ) as s:
        out = lines_until(s, b"PROXY")
        assert out.startswith("* OK")
        assert "\r\nPROXY BAD" in out
    log = f.wait_log("event=end")
    assert "event=connect client=127.0.0.1:" in log
    assert "192.0.2.1" not in log and "proxy=" not in log


def test_bad_trusted_block_is_a_config_error(tmp_path, dovecot):
    from conftest import BIN
    conf = tmp_path / "c"
    for bad in ("10.0.0.0/33", "10.0.0.1/", "example.org", "::1/129"):
        conf.write_text(base_config(dovecot.port,
                                    "proxy_protocol_trusted %s\n" % bad))
        r = subprocess.run([BIN, "-t", "-f", str(conf)], capture_output=True,
                           text=True, timeout=30 * SLOW)
        assert r.returncode == 1 and "proxy_protocol_trusted" in r.stderr


# --- a real HAProxy in front of two imapfe listeners ------------------------

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class IMAP4From(imaplib.IMAP4):
    """imaplib, connecting from 127.0.0.2: not HAProxy's own address."""

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=("127.0.0.2", 0))


@pytest.fixture(scope="module")
def trusting_dovecot():
    d = Dovecot(extra_conf="login_trusted_networks = 127.0.0.0/8\n")
    yield d
    d.close()


@pytest.mark.skipif(not os.path.exists(HAPROXY),
                    reason="haproxy is not installed (make deps)")
@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxy_balances_and_imapfe_logs_the_real_client(
        imapfe_factory, trusting_dovecot, tmp_path, send_proxy):
    fes = []
    for name in ("fe1", "fe2"):
        f = imapfe_factory(base_config(
            trusting_dovecot.port, "proxy_protocol_trusted 127.0.0.1/32\n"
            "plaintext_auth yes\n"), name=name)
        f.start_listener(greeting=greeting_after(
            b"PROXY TCP4 192.0.2.9 127.0.0.1 1000 143\r\n"))
        fes.append(f)
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n  maxconn 100\n\n"
        "defaults\n  mode tcp\n  timeout connect 10s\n"
        "  timeout client 60s\n  timeout server 60s\n\n"
        "frontend imap\n  bind 127.0.0.1:%d\n  default_backend fes\n\n"
        "backend fes\n  balance roundrobin\n"
        "  server fe1 127.0.0.1:%d %s\n  server fe2 127.0.0.1:%d %s\n"
        % (front, fes[0].port, send_proxy, fes[1].port, send_proxy))
    hap = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)],
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        def ready():
            try:
                with connect(front) as s:
                    return s.recv(4096).startswith(b"* OK")
            except OSError:
                return False
        wait_for(ready, 20, "haproxy to forward")
        # All four open at once, so that each has a port of its own (one
        # closed first could see its port taken again by the next).
        clients = []
        for _ in range(4):
            m = IMAP4From("127.0.0.1", front)
            clients.append(m)
            assert m.login("alice", "secret")[0] == "OK"
            assert m.select("INBOX")[0] == "OK"
        client_ports = [m.sock.getsockname()[1] for m in clients]
        for m in clients:
            m.logout()
        for f in fes:
            f.wait_log("reason=logout")
        logs = [f.log_text() for f in fes]
        for port in client_ports:
            hits = [log for log in logs
                    if "client=127.0.0.2:%d proxy=127.0.0.1:" % port in log]
            assert len(hits) == 1, (port, logs)
        for log in logs:        # balanced: each listener got clients
            assert "client=127.0.0.2:" in log
        # and the back-end saw the real client through imapfe's ID
        wait_for(lambda: "rip=127.0.0.2" in trusting_dovecot.log_text(),
                 10, "Dovecot to log the real client")
    finally:
        hap.send_signal(signal.SIGTERM)
        hap.wait(timeout=10)
