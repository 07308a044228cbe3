"""systemd socket activation (issue 7): the shipped imapfe.socket and
imapfe@.service pass systemd-analyze verify, and imapfe serves a listening
socket handed over on stdin (a super-server's "wait" service) or as
LISTEN_FDS (systemd's Accept=no)."""
import imaplib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import BIN, SLOW, base_config, wait_for

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(ANALYZE is None,
                    reason="systemd-analyze is not installed (no systemd)")
def test_units_pass_systemd_analyze_verify(tmp_path):
    for name in ("imapfe.socket", "imapfe@.service"):
        with open(os.path.join(TOP, name)) as f:
            text = f.read()
        # verify checks that ExecStart's program exists: use the built one
        (tmp_path / name).write_text(
            text.replace("/usr/local/sbin/imapfe", os.path.abspath(BIN)))
    service = open(tmp_path / "imapfe@.service").read()
    for word in ("StandardInput=socket", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "MemoryMax=",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX"):
        assert word in service
    assert "Accept=yes" in open(tmp_path / "imapfe.socket").read()
    for unit in ("imapfe.socket", "imapfe@0.service"):
        r = subprocess.run([ANALYZE, "verify", "--man=no",
                            str(tmp_path / unit)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def listening_socket():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


# Puts the socket on descriptor 3 and names this very process in
# LISTEN_PID before it becomes imapfe, as systemd does.
SD_WRAP = ("import os, sys\n"
           "os.dup2(int(sys.argv[1]), 3)\n"
           "os.environ['LISTEN_PID'] = str(os.getpid())\n"
           "os.environ['LISTEN_FDS'] = '1'\n"
           "os.execvp(sys.argv[2], sys.argv[2:])\n")


def serve_two_sessions(f, port, proc):
    f.wait_log("event=listening")
    for _ in range(2):
        m = imaplib.IMAP4("127.0.0.1", port)
        assert m.login("alice", "secret")[0] == "OK"
        assert m.select("INBOX")[0] == "OK"
        m.logout()
    wait_for(lambda: f.log_text().count("reason=logout") == 2, 10,
             "both sessions to end")
    pids = set(re.findall(r"imapfe\[(\d+)\]: session=\w+ event=connect",
                          f.log_text()))
    assert len(pids) == 2 and str(proc.pid) not in pids
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20 * SLOW) == 0
    assert "event=shutdown" in f.log_text()


def test_listening_socket_on_stdin(imapfe_factory, dovecot, procs):
    f = imapfe_factory(base_config(dovecot.port))
    with listening_socket() as ls:
        port = ls.getsockname()[1]
        logf = open(f.log, "ab")
        proc = procs.spawn(["-d", "-f", f.conf], stdin=ls.fileno(),
                           stderr=logf)
    serve_two_sessions(f, port, proc)


def test_listening_socket_from_listen_fds(imapfe_factory, dovecot, procs):
    f = imapfe_factory(base_config(dovecot.port))
    with listening_socket() as ls:
        port = ls.getsockname()[1]
        fd = ls.fileno()
        logf = open(f.log, "ab")
        proc = subprocess.Popen(
            [sys.executable, "-c", SD_WRAP, str(fd)] +
            procs.command(["-d", "-f", f.conf]),
            stdin=subprocess.DEVNULL, stderr=logf, env=procs.env(),
            pass_fds=(fd,))
        procs.procs.append(proc)
    serve_two_sessions(f, port, proc)
