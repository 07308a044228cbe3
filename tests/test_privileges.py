"""Privileges: started as root, imapfe reads its files and then runs every
session as the configured user and group, optionally chrooted, never as
root, with core dumps off.  The suite itself runs as root, which is what
makes these tests possible; every other test runs its sessions as
conftest's RUN_AS too.
"""
import imaplib
import os
import subprocess
import tempfile

import pytest

from conftest import BIN, SLOW, USERS, Raw, base_config, wait_for

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to give root up")


def ids(pid):
    """(real, effective, saved) uids and gids of a process."""
    with open("/proc/%d/status" % pid) as f:
        fields = dict(ln.split(":", 1) for ln in f if ":" in ln)
    return ([int(x) for x in fields["Uid"].split()[:3]],
            [int(x) for x in fields["Gid"].split()[:3]],
            fields["Groups"].split())


def session_pid(fe, before):
    """The PID of the imapfe process started since before (a set)."""
    def new():
        pids = {p.pid for p in fe.procs.procs} - before
        return pids.pop() if pids else None
    return wait_for(new, 10 * SLOW, "an imapfe process")


def open_session(fe, dovecot):
    before = {p.pid for p in fe.procs.procs}
    m = imaplib.IMAP4("127.0.0.1", fe.port, timeout=20 * SLOW)
    assert m.login("alice", USERS["alice"])[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    return m, session_pid(fe, before)


def test_inetd_session_runs_as_the_configured_user(imapfe_factory, dovecot):
    fe = imapfe_factory(base_config(dovecot.port))
    fe.start_inetd()
    m, pid = open_session(fe, dovecot)
    uids, gids, groups = ids(pid)
    assert uids == [NOBODY] * 3
    assert gids == [NOBODY] * 3        # nogroup
    assert groups == [str(NOBODY)]     # root's supplementary groups gone
    # not dumpable: its /proc files belong to root, not to its own user
    assert os.stat("/proc/%d/mem" % pid).st_uid == 0
    with open("/proc/%d/limits" % pid) as f:
        core = [ln for ln in f if ln.startswith("Max core file size")][0]
    assert core.split()[4:6] == ["0", "0"]
    m.logout()


def test_listener_gives_up_root_before_accepting(imapfe_factory, dovecot):
    fe = imapfe_factory(base_config(dovecot.port))
    fe.start_listener()
    assert ids(fe.listener.pid)[0] == [NOBODY] * 3
    m = imaplib.IMAP4("127.0.0.1", fe.port, timeout=20 * SLOW)
    assert m.login("alice", USERS["alice"])[0] == "OK"
    children = wait_for(lambda: open("/proc/%d/task/%d/children" % (
        fe.listener.pid, fe.listener.pid)).read().split(), 10 * SLOW,
        "a session process")
    assert ids(int(children[0]))[0] == [NOBODY] * 3
    m.logout()


def run_once(conf_text, tmp_path):
    """One inetd-style start on a pipe; (exit status, output, stderr)."""
    conf = tmp_path / "once.conf"
    conf.write_text(conf_text)
    p = subprocess.run([BIN, "-d", "-f", str(conf)], input=b"a LOGOUT\r\n",
                       capture_output=True, timeout=30 * SLOW)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


@pytest.mark.parametrize("setting,why", [
    ("", "started as root without a user directive"),
    ("user root\n", "user root: must not be root"),
    ("user imapfe-no-such-user\n", "no such user"),
    ("user nobody\ngroup root\n", "group root: must not be root"),
    ("user nobody\nchroot /nonexistent-imapfe\n", "chroot /nonexistent"),
])
def test_no_session_as_root(tmp_path, setting, why):
    rc, out, err = run_once("route * 127.0.0.1:1\nplaintext_auth yes\n" +
                            setting, tmp_path)
    assert rc == 1
    assert out == "* BYE [UNAVAILABLE] Server configuration error.\r\n"
    assert "event=config-error" in err and why in err


def test_check_mode_looks_the_user_up(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("route * 127.0.0.1:1\nuser imapfe-no-such-user\n")
    p = subprocess.run([BIN, "-t", "-f", str(conf)], capture_output=True,
                       timeout=30 * SLOW)
    assert p.returncode == 1 and b"no such user" in p.stderr


with open(BIN, "rb") as _f:
    SANITIZED = b"__asan_init" in _f.read()


@pytest.mark.skipif(SANITIZED, reason="LeakSanitizer needs the /proc that "
                    "a chroot hides (valgrind runs this test)")
def test_chrooted_session(imapfe_factory, dovecot):
    jail = tempfile.mkdtemp(prefix="imapfe-chroot-")
    try:
        fe = imapfe_factory(base_config(dovecot.port, "chroot %s\n" % jail))
        fe.start_inetd()
        m, pid = open_session(fe, dovecot)
        assert os.readlink("/proc/%d/root" % pid) == jail
        typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and b"Subject: test 1" in data[0][1]
        m.logout()
        fe.wait_log("event=end")
    finally:
        os.rmdir(jail)


def test_files_only_root_can_read_are_read_before_the_drop(
        imapfe_factory, dovecot, certs):
    # the server key is root's alone (0600, as certs makes it); STARTTLS
    # still works in a session that runs as nobody
    import ssl
    fe = imapfe_factory(base_config(dovecot.port,
                                    "tls_cert %s\ntls_key %s\n"
                                    "plaintext_auth no\n"
                                    % (certs.imapfe, certs.imapfe_key)))
    fe.start_inetd()
    os.chmod(certs.imapfe_key, 0o600)
    ctx = ssl.create_default_context(cafile=certs.ca)
    c = Raw(fe.port, timeout=20 * SLOW)
    assert c.cmd("s", "STARTTLS")[-1].startswith("s OK")
    c.starttls(ctx, server_hostname="localhost")
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    c.cmd("z", "LOGOUT")
    c.close()
