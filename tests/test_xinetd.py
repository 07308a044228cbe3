"""imapfe under a real xinetd, with the service file shipped in the tree
(imapfe.xinetd), only the port, paths and log rewritten for the test; and
the one-process-per-connection model's point: sessions do not share
memory."""
import contextlib
import imaplib
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import (RUN_AS, SLOW, Raw, base_config, free_port,
                      read_greeting, wait_for)
from fakebackend import FakeBackend, plain_server

HERE = os.path.dirname(os.path.abspath(__file__))
XINETD = "/usr/sbin/xinetd"


def xinetd_conf(binary, conf, port, log):
    """The shipped imap service, pointed at this test's imapfe."""
    with open(os.path.join(HERE, "..", "imapfe.xinetd")) as f:
        text = f.read()
    imap = re.search(r"service imap\n\{.*?\n\}", text, re.S).group(0)
    imap = imap.replace("/usr/local/sbin/imapfe", binary)
    imap = imap.replace("/etc/imapfe/imapfe.conf", conf)
    imap = imap.replace("service imap\n{", "service imapfe-test\n{\n"
                        "\ttype\t\t= UNLISTED\n\tport\t\t= %d\n"
                        "\tbind\t\t= 127.0.0.1\n" % port)
    return "defaults\n{\n\tlog_type = FILE %s\n\tlog_on_success = PID HOST\n}\n\n%s\n" % (log, imap)


NOT_UNDER_VALGRIND = pytest.mark.skipif(
    os.environ.get("IMAPFE_VALGRIND") == "1",
    reason="xinetd starts imapfe itself, not under valgrind")
BINARY = os.environ.get("IMAPFE_BIN") or \
    os.path.abspath(os.path.join(HERE, "..", "imapfe"))


@contextlib.contextmanager
def xinetd(tmp_path, config):
    """A real xinetd serving the shipped imap service on a free loopback
    port; yields (port, its log file)."""
    conf = tmp_path / "imapfe.conf"
    if "state_file " not in config:         # the test's own, not the host's
        config += "state_file %s\n" % (tmp_path / "state")
    conf.write_text(config + RUN_AS)
    port = free_port()
    log = tmp_path / "xinetd.log"
    xconf = tmp_path / "xinetd.conf"
    xconf.write_text(xinetd_conf(BINARY, str(conf), port, str(log)))
    proc = subprocess.Popen([XINETD, "-dontfork", "-f", str(xconf),
                             "-pidfile", str(tmp_path / "pid")],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: b"imapfe ready" in read_greeting(port), 10 * SLOW,
                 "xinetd to serve imapfe")
        yield port, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def started_pids(log):
    return re.findall(r"START: imapfe-test pid=(\d+)", log.read_text())


@NOT_UNDER_VALGRIND
def test_sessions_through_xinetd(tmp_path, dovecot):
    with xinetd(tmp_path, base_config(dovecot.port, "plaintext_auth yes\n")
                ) as (port, log):
        for _ in range(2):
            m = imaplib.IMAP4("127.0.0.1", port)
            assert m.login("alice", "secret")[0] == "OK"
            typ, data = m.select("INBOX")
            assert typ == "OK" and int(data[0]) >= 3
            m.logout()
        # the readiness probe and two sessions: a process each
        assert len(set(started_pids(log))) >= 3, log.read_text()


@NOT_UNDER_VALGRIND
def test_login_penalty_across_xinetd_processes(tmp_path, dovecot):
    """Each connection is a process xinetd execs: the penalty a failure
    sets is seen by the next process, and doubles (from answer to answer,
    at least the delay)."""
    config = ("route alice 127.0.0.1:%d\nplaintext_auth yes\n"
              "auth_penalty_exempt none\nauth_penalty_first 150\n"
              "auth_penalty_max 600\n" % dovecot.port)
    with xinetd(tmp_path, config) as (port, log):
        answered = []
        for i in range(4):
            m = imaplib.IMAP4("127.0.0.1", port)
            with pytest.raises(imaplib.IMAP4.error):
                m.login("mallory", "guess%d" % i)
            answered.append(time.monotonic())
            m.shutdown()
        gaps = [b - a for a, b in zip(answered, answered[1:])]
        for gap, delay in zip(gaps, (0.15, 0.3, 0.6)):
            assert delay - 0.02 <= gap < delay + 0.5 * SLOW, gaps
        m = imaplib.IMAP4("127.0.0.1", port)
        assert m.login("alice", "secret")[0] == "OK"     # waits, then clears
        assert time.monotonic() - answered[-1] >= 0.6 - 0.02
        m.logout()


def memory_kib(pid):
    """(RSS, private dirty) of a process in KiB, from /proc: its resident
    size, and the part no other process shares and only it wrote (heap,
    stack, data).  Private_Clean is left out: file pages turn from private
    to shared merely because another process maps the same library."""
    with open("/proc/%s/smaps_rollup" % pid) as f:
        fields = dict((ln.split(":")[0], int(ln.split()[1]))
                      for ln in f if ln.split()[-1] == "kB")
    return fields["Rss"], fields["Private_Dirty"]


def settled_memory_kib(pid):
    """memory_kib once two readings in a row agree: a
    process that has just answered may still be freeing what the answer
    took."""
    last = [None]

    def settled():
        now = memory_kib(pid)
        same, last[0] = now == last[0], now
        return now if same else None
    return wait_for(settled, 5, "the memory of %s to settle" % pid)


def failing_logins(conn, n, first_tag=0):
    for i in range(first_tag, first_tag + n):
        assert conn.cmd("f%d" % i, "LOGIN bob wrong")[-1].startswith(
            "f%d NO [AUTHENTICATIONFAILED]" % i)


@NOT_UNDER_VALGRIND
def test_failing_session_leaves_another_sessions_memory_alone(tmp_path,
                                                              dovecot):
    """One process per connection: a session whose back-end refuses login
    after login does not touch another session's memory, and does not
    grow itself."""
    refuser = FakeBackend(lambda c: plain_server(
        c, accept=lambda user, pw: False))
    config = ("route alice 127.0.0.1:%d\nroute * 127.0.0.1:%d\n"
              "plaintext_auth yes\nmax_login_failures 100000\n"
              "max_bad_commands 1000\n" % (dovecot.port, refuser.port))
    try:
        with xinetd(tmp_path, config) as (port, log):
            alice = imaplib.IMAP4("127.0.0.1", port)
            assert alice.login("alice", "secret")[0] == "OK"
            assert alice.select("INBOX")[0] == "OK"
            alice_pid = started_pids(log)[-1]
            before = settled_memory_kib(alice_pid)
            failing = Raw(port)
            failing_pid = wait_for(lambda: (started_pids(log)[-1]
                                            if started_pids(log)[-1] !=
                                            alice_pid else None),
                                   10, "the failing session's process")
            failing_logins(failing, 50)
            failing_50 = memory_kib(failing_pid)
            failing_logins(failing, 250, first_tag=50)
            failing_300 = memory_kib(failing_pid)
            after = memory_kib(alice_pid)
            assert len(refuser.received) >= 300
            assert alice.noop()[0] == "OK"
            alice.logout()
            failing.cmd("z", "LOGOUT")
            failing.close()
    finally:
        refuser.close()
    print("alice RSS/private-dirty KiB before %s after %s; failing session after 50 "
          "logins %s, after 300 %s" % (before, after, failing_50,
                                       failing_300))
    # The other session's memory is untouched: a page of slack, or more
    # under ASan, whose runtime returns and takes memory on its own.
    asan = "asan" in BINARY
    slack = 512 if asan else 8
    assert after[0] - before[0] <= slack and \
        after[1] - before[1] <= slack, (before, after)
    if not asan:    # ASan's quarantine grows by design
        assert abs(after[1] - before[1]) <= slack, (before, after)
        assert failing_300[1] - failing_50[1] <= 64, (failing_50,
                                                       failing_300)
