"""imapfe under a real xinetd, with the service file shipped in the tree
(imapfe.xinetd), only the port, paths and log rewritten for the test."""
import imaplib
import os
import re
import signal
import subprocess

import pytest

from conftest import RUN_AS, SLOW, base_config, free_port, read_greeting, wait_for

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


@pytest.mark.skipif(os.environ.get("IMAPFE_VALGRIND") == "1",
                    reason="xinetd starts imapfe itself, not under valgrind")
def test_sessions_through_xinetd(tmp_path, dovecot):
    binary = os.environ.get("IMAPFE_BIN") or \
        os.path.abspath(os.path.join(HERE, "..", "imapfe"))
    conf = tmp_path / "imapfe.conf"
    conf.write_text(base_config(dovecot.port, "plaintext_auth yes\n" +
                                RUN_AS))
    port = free_port()
    xconf = tmp_path / "xinetd.conf"
    xconf.write_text(xinetd_conf(binary, str(conf), port,
                                 str(tmp_path / "xinetd.log")))
    proc = subprocess.Popen([XINETD, "-dontfork", "-f", str(xconf),
                             "-pidfile", str(tmp_path / "pid")],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: b"imapfe ready" in read_greeting(port), 10 * SLOW,
                 "xinetd to serve imapfe")
        for _ in range(2):
            m = imaplib.IMAP4("127.0.0.1", port)
            assert m.login("alice", "secret")[0] == "OK"
            typ, data = m.select("INBOX")
            assert typ == "OK" and int(data[0]) >= 3
            m.logout()
        log = (tmp_path / "xinetd.log").read_text()
        pids = set(re.findall(r"START: imapfe-test pid=(\d+)", log))
        # the readiness probe and two sessions: a process each
        assert len(pids) >= 3, log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
