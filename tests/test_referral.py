"""Referrals followed on the client's behalf (RFC 2221 login referrals,
RFC 2193 mailbox referrals), only to configured servers.

Login referrals come from a real Dovecot: a passwd-file entry with
"host=... port=... nologin=Y" (and no "proxy") makes Dovecot refuse the
login with "NO [REFERRAL imap://user;AUTH=...@host:port/]".  Dovecot
issues no mailbox referrals, so those come from the scriptable back-end in
fakebackend.py, pointing at a real Dovecot.
"""
import imaplib
import os
import subprocess

import pytest

from conftest import (SLOW, USERS, Dovecot, Raw, base_config, free_port,
                      read_greeting, sample_message, wait_for)
from fakebackend import FakeBackend, plain_server


def referring_dovecot(target_port, user="alice", host="127.0.0.1"):
    """A Dovecot that sends user elsewhere with a login referral."""
    lines = ["%s:{PLAIN}%s::::::" % (u, pw) for u, pw in USERS.items()
             if u != user]
    lines.append("%s:{PLAIN}%s::::::host=%s port=%d nologin=Y"
                 % (user, USERS[user], host, target_port))
    return Dovecot(passwd="\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def target():
    """Where referrals lead: alice's INBOX holds "test 1".."test 3", and a
    folder "Remote" holds one message, "remote 1"."""
    d = Dovecot()
    m = d.imap("alice")
    for i in range(1, 4):
        m.append("INBOX", None, None, sample_message(i))
    m.create("Remote")
    m.append("Remote", None, None, sample_message(1, "remote 1\r\n"))
    m.logout()
    yield d
    d.close()


@pytest.fixture(scope="module")
def referrer(target):
    d = referring_dovecot(target.port)
    yield d
    d.close()


def logins_on(d):
    return d.log_text().count("Login: user=<alice>")


def login(fe, user="alice"):
    m = imaplib.IMAP4("127.0.0.1", fe.port, timeout=20 * SLOW)
    try:
        return m, m.login(user, USERS[user])
    except imaplib.IMAP4.error:
        m.shutdown()
        raise


# ---------------------------------------------------------------------------
# login referrals (RFC 2221)

def test_login_referral_followed_to_listed_server(imapfe_factory, referrer,
                                                  target):
    before = logins_on(target)
    fe = imapfe_factory(base_config(referrer.port,
                                    "server 127.0.0.1:%d\n" % target.port))
    fe.start_inetd()
    m, (typ, _) = login(fe)
    assert typ == "OK"
    typ, data = m.select("INBOX")
    assert typ == "OK" and data == [b"3"]
    typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"Subject: test 1" in data[0][1]
    m.logout()
    assert logins_on(target) == before + 1
    log = fe.wait_log("event=referral kind=login")
    assert "from=127.0.0.1:%d to=127.0.0.1:%d" % (referrer.port,
                                                  target.port) in log
    assert "imap://" not in log


def test_login_referral_to_unlisted_server_is_refused(imapfe_factory,
                                                      referrer, target):
    before = logins_on(target)
    fe = imapfe_factory(base_config(referrer.port))
    fe.start_inetd()
    c = Raw(fe.port, timeout=20 * SLOW)
    lines = c.cmd("a", "LOGIN alice secret")
    c.close()
    assert lines[-1].startswith("a NO [UNAVAILABLE]"), lines
    assert not any("REFERRAL" in ln or "imap://" in ln for ln in lines)
    log = fe.wait_log("event=referral-refused")
    assert 'target=127.0.0.1:%d reason="not a configured server"' \
        % target.port in log
    assert "login referral not followed" in log
    assert "secret" not in log
    assert logins_on(target) == before


def point_at(d, port, user="alice"):
    """Make Dovecot d refer user to port (passwd-file is re-read when it
    changes)."""
    lines = ["%s:{PLAIN}%s::::::" % (u, pw) for u, pw in USERS.items()
             if u != user]
    lines.append("%s:{PLAIN}%s::::::host=127.0.0.1 port=%d nologin=Y"
                 % (user, USERS[user], port))
    path = d.dir + "/passwd"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    later = os.stat(path).st_mtime + 5   # Dovecot compares whole seconds
    os.utime(path, (later, later))


def test_login_referral_loop_is_stopped(imapfe_factory):
    # a and b refer alice to each other: both listed, neither tried twice
    a = referring_dovecot(free_port())
    b = referring_dovecot(a.port)
    try:
        point_at(a, b.port)
        fe = imapfe_factory(base_config(a.port, "server 127.0.0.1:%d\n"
                                        % b.port))
        fe.start_inetd()
        with pytest.raises(imaplib.IMAP4.error) as e:
            login(fe)
        assert "UNAVAILABLE" in str(e.value)
        log = fe.wait_log('reason="loop"')
        assert log.count("event=referral kind=login") == 1
    finally:
        a.close()
        b.close()


def test_login_referral_hops_are_limited(imapfe_factory, target):
    # a chain of two referrals with referral_hops 1: the second is refused
    middle = referring_dovecot(target.port)
    first = referring_dovecot(middle.port)
    try:
        listed = ("server 127.0.0.1:%d\nserver 127.0.0.1:%d\n"
                  % (middle.port, target.port))
        fe = imapfe_factory(base_config(first.port, listed +
                                        "referral_hops 1\n"))
        fe.start_inetd()
        with pytest.raises(imaplib.IMAP4.error):
            login(fe)
        log = fe.wait_log('reason="more than 1 hops"')
        assert log.count("event=referral kind=login") == 1
        fe2 = imapfe_factory(base_config(first.port, listed), name="fe2")
        fe2.start_inetd()
        m, (typ, _) = login(fe2)
        assert typ == "OK"
        assert m.select("INBOX") == ("OK", [b"3"])
        m.logout()
        assert fe2.log_text().count("event=referral kind=login") == 2
    finally:
        first.close()
        middle.close()


def test_login_referral_to_imapfe_itself_is_a_loop(imapfe_factory, procs):
    # a misconfiguration: the listed server is this very imapfe, whose
    # greeting gives it away
    own_port = free_port()
    a = referring_dovecot(own_port)
    try:
        fe = imapfe_factory(base_config(a.port, "server 127.0.0.1:%d\n"
                                        % own_port))
        listener = procs.spawn(["-d", "-f", fe.conf, "-l",
                                "127.0.0.1:%d" % own_port],
                               stderr=subprocess.DEVNULL)
        wait_for(lambda: read_greeting(own_port).startswith(b"* OK"), 10,
                 "imapfe listener")
        fe.start_inetd()
        with pytest.raises(imaplib.IMAP4.error) as e:
            login(fe)
        assert "UNAVAILABLE" in str(e.value)
        fe.wait_log("configuration loop")
        listener.terminate()
        listener.wait(timeout=20 * SLOW)
    finally:
        a.close()


# ---------------------------------------------------------------------------
# mailbox referrals (RFC 2193)

def referring_home(url_for, record=None):
    """A home server that answers commands on "Remote" with a referral
    (url_for(command) gives the URL, or None for a plain NO) and everything
    else with OK."""
    def after_login(conn):
        while True:
            ln = conn.line()
            if ln is None:
                return
            if record is not None:
                record.append(ln)
            tag, _, rest = ln.partition(" ")
            cmd = rest.split(" ", 1)[0].upper()
            if ln.endswith("}"):        # APPEND's literal: read it
                n = ln[ln.rindex("{") + 1:-1]
                if not n.endswith("+"):
                    conn.sendline("+ go")
                conn.read_exact(int(n.rstrip("+")))
                conn.line()
            if cmd == "LOGOUT":
                conn.sendline("* BYE bye")
                conn.sendline(tag + " OK bye")
                return
            if "Remote" in rest:
                url = url_for(cmd)
                conn.sendline("%s NO [REFERRAL %s] Remote mailbox" %
                              (tag, url))
            elif cmd == "SELECT" or cmd == "EXAMINE":
                conn.sendline("* 0 EXISTS")
                conn.sendline("* OK [UIDVALIDITY 1] ok")
                conn.sendline(tag + " OK [READ-WRITE] selected")
            else:
                conn.sendline(tag + " OK done")
    return FakeBackend(lambda conn: plain_server(
        conn, caps="IMAP4rev1 LITERAL+ AUTH=PLAIN UNSELECT",
        after_login=after_login))


def raw_login(fe):
    c = Raw(fe.port, timeout=20 * SLOW)
    assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
    return c


def mailbox_fe(imapfe_factory, home, listed_port):
    fe = imapfe_factory(base_config(home.port, "server 127.0.0.1:%d\n"
                                    % listed_port))
    fe.start_inetd()
    return fe


def test_mailbox_referral_followed(imapfe_factory, target):
    before = logins_on(target)
    home = referring_home(
        lambda cmd: "imap://alice@127.0.0.1:%d/Remote" % target.port)
    try:
        fe = mailbox_fe(imapfe_factory, home, target.port)
        m, (typ, _) = login(fe)
        assert typ == "OK"
        typ, data = m.select("Remote")
        assert typ == "OK" and data == [b"1"], data
        typ, data = m.fetch("1", "(BODY.PEEK[TEXT])")
        assert data[0][1] == b"remote 1\r\n"
        typ, data = m.store("1", "+FLAGS", "(\\Flagged)")
        assert typ == "OK" and b"\\Flagged" in data[0]
        typ, data = m.search(None, "FLAGGED")
        assert data == [b"1"]
        assert m.store("1", "-FLAGS", "(\\Flagged)")[0] == "OK"
        typ, data = m.status("Remote", "(MESSAGES)")
        assert typ == "OK" and b"MESSAGES 1" in data[0]
        # back home: one selected mailbox, on the home server
        assert m.select("INBOX")[0] == "OK"
        assert m.noop()[0] == "OK"
        m.logout()
        assert logins_on(target) == before + 1  # one link, kept
        log = fe.wait_log("event=referral kind=mailbox")
        assert "to=127.0.0.1:%d" % target.port in log
        assert "event=referral-login" in log
    finally:
        home.close()


def test_mailbox_referral_to_unlisted_server_is_a_plain_no(imapfe_factory):
    trap = FakeBackend(lambda conn: conn.sendline("* OK trap"))
    home = referring_home(
        lambda cmd: "imap://alice@127.0.0.1:%d/Remote" % trap.port)
    try:
        # without a server line the session is a byte relay: list the home
        # server itself so that imapfe routes, yet the trap stays unlisted
        fe = imapfe_factory(base_config(home.port, "server 127.0.0.1:%d\n"
                                        % home.port), name="routed")
        fe.start_inetd()
        c = raw_login(fe)
        lines = c.cmd("b", "SELECT Remote")
        assert lines[-1] == "b NO Remote mailbox", lines
        assert c.cmd("c", "NOOP")[-1].startswith("c OK")
        c.close()
        log = fe.wait_log("event=referral-refused")
        assert 'target=127.0.0.1:%d reason="not a configured server"' \
            % trap.port in log
        assert trap.received == []
    finally:
        home.close()
        trap.close()


@pytest.mark.parametrize("url", [
    "imap://alice:secret@127.0.0.1:%(port)d/Remote",   # a password
    "imap://127.0.0.1:%(port)d/Re%%0D%%0Amote",          # CR LF
    "http://127.0.0.1:%(port)d/Remote",                  # not IMAP
])
def test_unusable_mailbox_referral_leaks_nothing(imapfe_factory, target, url):
    before = logins_on(target)
    home = referring_home(lambda cmd: url % {"port": target.port})
    try:
        fe = mailbox_fe(imapfe_factory, home, target.port)
        c = raw_login(fe)
        lines = c.cmd("b", "EXAMINE Remote")
        assert lines[-1] == "b NO Remote mailbox", lines
        c.cmd("z", "LOGOUT")
        c.close()
        log = fe.wait_log("event=referral-refused")
        assert "imap://" not in log and ":secret@" not in log
        assert logins_on(target) == before
    finally:
        home.close()


def test_mailbox_referral_loop_back_home_is_refused(imapfe_factory):
    box = {}
    home = referring_home(
        lambda cmd: "imap://127.0.0.1:%d/Remote" % box["port"])
    box["port"] = home.port
    try:
        fe = mailbox_fe(imapfe_factory, home, home.port)
        c = raw_login(fe)
        assert c.cmd("b", "SELECT Remote")[-1] == "b NO Remote mailbox"
        c.cmd("z", "LOGOUT")
        c.close()
        fe.wait_log('reason="loop"')
    finally:
        home.close()


def test_append_referral_is_a_plain_no(imapfe_factory, target):
    before = logins_on(target)
    home = referring_home(
        lambda cmd: "imap://127.0.0.1:%d/Remote" % target.port)
    try:
        fe = mailbox_fe(imapfe_factory, home, target.port)
        c = raw_login(fe)
        msg = "Subject: x\r\n\r\nhello\r\n"
        c.send(("b APPEND Remote {%d}\r\n" % len(msg)).encode())
        assert c.line().startswith("+ ")
        c.send(msg + "\r\n")
        assert c.line() == "b NO Remote mailbox"
        assert c.cmd("c", "NOOP")[-1].startswith("c OK")
        c.cmd("z", "LOGOUT")
        c.close()
        assert logins_on(target) == before     # APPEND is never re-sent
    finally:
        home.close()
