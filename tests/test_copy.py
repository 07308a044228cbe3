"""COPY and MOVE between servers (copy.c): all or nothing, the
destination's own response code, COPYUID.

A public-folder Dovecot is the source; the destination is alice's home
Dovecot, with a quota that has room for one test message, in two kinds:
one as Dovecot comes (MULTIAPPEND: imapfe sends every message in one
APPEND, which the server stores whole or not at all) and one whose
capability list leaves MULTIAPPEND out (one APPEND per message: after a
failure imapfe expunges the copies it stored, by their APPENDUID UIDs).
"""
import os
import re
import signal
import socket

import pytest

from conftest import VALGRIND, Dovecot, read_greeting, wait_for
from fakebackend import FakeBackend, command_loop, plain_server
from test_public import (PREFIX, SANITIZED, big_message, home_conf,
                         imapfe_pid, login, make_public_folder, message,
                         proc_status, public_conf, public_config,
                         public_server, q, raw_login, rawlog)
from test_transparency import Mbsync

# Dovecot's own list, less MULTIAPPEND.
CAPS_NO_MULTIAPPEND = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY "
    "THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT URL-PARTIAL "
    "CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED "
    "I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN "
    "CONTEXT=SEARCH LIST-STATUS BINARY MOVE LITERAL+")

# Room for one message of about 1200 bytes, never two; and alice may
# store into NoExpunge but not expunge from it (no "t" or "e" right):
# Dovecot then answers OK to UID EXPUNGE and keeps the messages (nor will
# it delete the mailbox then).
PLUGINS = """
mail_plugins = $mail_plugins quota acl
protocol imap {
  mail_plugins = $mail_plugins imap_quota imap_acl
}
plugin {
  quota = count:User quota
  quota_vsizes = yes
  quota_rule = *:storage=2K
  acl = vfile:%s
}
"""


def big(subject):
    body = ("%s: " % subject + "x" * 70 + "\r\n") * 15
    return ("From: sender@example.org\r\nSubject: %s\r\n"
            "Message-ID: <%s@example.org>\r\n\r\n%s"
            % (subject, subject.replace(" ", "-"), body)).encode()


def home_server(multiappend):
    def conf(d):
        acl = os.path.join(d, "global-acl")
        with open(acl, "w") as f:
            f.write("NoExpunge owner lrwsip\n")
        extra = home_conf(d) + PLUGINS % acl
        if not multiappend:
            extra += "imap_capability = %s\n" % CAPS_NO_MULTIAPPEND
        return extra
    return Dovecot(extra_conf=conf)


@pytest.fixture(scope="module")
def public():
    d = public_server()
    yield d
    d.close()


@pytest.fixture(scope="module", params=["multiappend", "one-by-one"])
def home(request):
    d = home_server(request.param == "multiappend")
    d.multiappend = request.param == "multiappend"
    yield d
    d.close()


@pytest.fixture
def fe(imapfe_factory, home, public):
    f = imapfe_factory(public_config(home, public.port))
    f.start_inetd()
    return f


def messages(d, mailbox, user="alice"):
    """UID -> whole message of every message in mailbox, read from server
    d directly."""
    m = d.imap(user)
    typ, data = m.select(q(mailbox), readonly=True)
    assert typ == "OK", data
    out = {}
    if int(data[0]):
        typ, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
        assert typ == "OK", data
        for d_ in data:
            if isinstance(d_, tuple):
                uid = int(re.search(rb"UID (\d+)", d_[0]).group(1))
                out[uid] = d_[1]
    m.logout()
    return out


def fresh_home_mailbox(home, name):
    """name, empty, as alice's only mailbox besides an empty INBOX: the
    quota's room is all for the test."""
    m = home.imap("alice")
    for item in m.list('""', "*")[1]:
        old = re.search(rb' "/" "?([^"]*)"?$', item).group(1).decode()
        if old != "INBOX":
            assert m.delete(q(old))[0] == "OK", old
    assert m.create(name)[0] == "OK"
    m.logout()


def uid_set(text):
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def copyuid(data):
    mo = re.search(rb"\[COPYUID (\d+) ([\d:,]+) ([\d:,]+)\]", data)
    assert mo, data
    return (int(mo.group(1)), uid_set(mo.group(2).decode()),
            uid_set(mo.group(3).decode()))


def uidvalidity(d, mailbox):
    m = d.imap("alice")
    typ, data = m.status(q(mailbox), "(UIDVALIDITY)")
    m.logout()
    return int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))


@pytest.fixture(scope="module")
def roomy_home():
    """A home server with no quota, as Dovecot comes."""
    d = Dovecot(extra_conf=home_conf)
    yield d
    d.close()


def fill(d, mailbox, n, user):
    m = d.imap(user)
    assert m.create(q(mailbox))[0] == "OK"
    for i in range(n):
        assert m.append(q(mailbox), None, None,
                        ("Subject: %s %d\r\n\r\n%s\r\n" % (
                            mailbox, i, "x" * i)).encode())[0] == "OK"
    m.logout()


@pytest.mark.parametrize("n", [1, 10, 500])
@pytest.mark.parametrize("to_home", [True, False])
@pytest.mark.parametrize("verb", ["COPY", "MOVE"])
def test_copy_and_move_of_many_both_ways(imapfe_factory, roomy_home, public,
                                         n, to_home, verb):
    """n messages from a public folder home, or from home to a public
    folder: every one arrives once, byte for byte as COPYUID pairs them;
    COPY leaves the source as it was, MOVE empties it with n EXPUNGEs."""
    name = "Many%s%d%s" % (verb, n, "Home" if to_home else "Pub")
    if to_home:
        src, dst = PREFIX + name, name
        fill(public, src, n, "bob")
        fill(roomy_home, dst, 0, "alice")
        src_d, dst_d = public, roomy_home
    else:
        src, dst = name, PREFIX + name
        fill(roomy_home, src, n, "alice")
        fill(public, dst, 0, "bob")
        src_d, dst_d = roomy_home, public
    before = messages(src_d, src)
    f = imapfe_factory(public_config(roomy_home, public.port))
    f.start_inetd()
    m = login(f)
    assert m.select(q(src))[0] == "OK"
    typ, data = m._simple_command("UID", verb, "1:*", q(dst))
    assert typ == "OK", data
    if verb == "MOVE":
        _, src_uids, dst_uids = copyuid(
            [x for x in m.untagged_responses["OK"] if b"COPYUID" in x][0])
        assert len(m.untagged_responses.get("EXPUNGE", [])) == n
    else:
        _, src_uids, dst_uids = copyuid(data[0])
    m.logout()
    arrived = messages(dst_d, dst)
    assert sorted(src_uids) == sorted(before) and len(arrived) == n
    assert sorted(dst_uids) == sorted(arrived)
    assert [before[u] for u in src_uids] == [arrived[u] for u in dst_uids]
    assert messages(src_d, src) == ({} if verb == "MOVE" else before)


def test_copy_over_quota_is_refused_whole(fe, home, public):
    """3 messages into a mailbox with room for one: NO [OVERQUOTA] (the
    destination's own code), and the destination as it was; the retried
    COPY is refused the same way, never storing the first one twice."""
    src = make_public_folder(public, "Quota%d" % home.multiappend, [])
    p = public.imap("bob")
    for i in range(3):
        assert p.append(q(src), None, None, big("quota %d" % i))[0] == "OK"
    p.logout()
    fresh_home_mailbox(home, "Full")
    m = login(fe)
    m.select(q(src))
    for attempt in range(2):
        typ, data = m.copy("1:3", "Full")
        assert typ == "NO" and data[0].startswith(b"[OVERQUOTA] "), data
        assert messages(home, "Full") == {}, "attempt %d" % attempt
    # One fits: it is stored once, and its COPYUID names it.
    typ, data = m.copy("2", "Full")
    assert typ == "OK", data
    held = messages(home, "Full")
    assert list(held.values()) == [messages(public, src)[2]]
    _, src_uids, dst_uids = copyuid(data[0])
    assert (src_uids, dst_uids) == ([2], list(held))
    m.logout()
    # What imapfe sent the destination: one MULTIAPPEND per attempt, or
    # one APPEND per message and the one stored expunged again.
    sent = [ln for ln in rawlog(home, "APPEND \"Full\"")
            if re.search(r"APPEND|EXPUNGE|UNSELECT|SELECT", ln)]
    appends = [ln for ln in sent if " APPEND \"Full\" " in ln]
    if home.multiappend:
        assert len(appends) == 3 and not [ln for ln in sent
                                          if "EXPUNGE" in ln], sent
    else:
        assert len(appends) == 5, sent
        assert len([ln for ln in sent if " UID EXPUNGE " in ln]) == 2, sent
        assert len([ln for ln in sent if ln.endswith(" UNSELECT")]) == 2, \
            sent
    text = fe.log_text()
    assert text.count("event=copy-failed") == 2, text
    assert "reason=destination-refused" in text, text
    assert "event=copy-undo-failed" not in text, text


def test_move_over_quota_keeps_originals(fe, home, public):
    src = make_public_folder(public, "MoveQuota%d" % home.multiappend, [])
    p = public.imap("bob")
    for i in range(3):
        assert p.append(q(src), None, None, big("mq %d" % i))[0] == "OK"
    p.logout()
    before = messages(public, src)
    fresh_home_mailbox(home, "FullMove")
    m = login(fe)
    m.select(q(src))
    typ, data = m._simple_command("MOVE", "1:3", "FullMove")
    assert typ == "NO" and data[0].startswith(b"[OVERQUOTA] "), data
    assert "EXPUNGE" not in m.untagged_responses, m.untagged_responses
    typ, data = m.search(None, "DELETED")
    assert data == [b""], "originals marked \\Deleted: %r" % data
    m.logout()
    assert messages(home, "FullMove") == {}
    assert messages(public, src) == before


def test_copy_and_move_give_copyuid_matching_the_destination(fe, home,
                                                             public):
    """COPYUID's source and destination UIDs, in matching order, name the
    same messages byte for byte, both ways; a MOVE's COPYUID comes
    untagged, before its EXPUNGEs."""
    src = make_public_folder(public, "Uids%d" % home.multiappend,
                             ["u 1", "u 2", "u 3", "u 4"])
    fresh_home_mailbox(home, "UidsDst")
    m = login(fe)
    m.select(q(src))
    typ, data = m._simple_command("UID", "COPY", "1:*", "UidsDst")
    assert typ == "OK", data
    validity, src_uids, dst_uids = copyuid(data[0])
    assert validity == uidvalidity(home, "UidsDst")
    source, dest = messages(public, src), messages(home, "UidsDst")
    assert len(src_uids) == len(dst_uids) == 4
    assert [source[u] for u in src_uids] == [dest[u] for u in dst_uids]

    # home to public: MOVE 2 of them back into a fresh public folder
    back = make_public_folder(public, "UidsBack%d" % home.multiappend, [])
    m.select("UidsDst")
    typ, data = m._simple_command("UID", "MOVE", "%d,%d" % (
        dst_uids[1], dst_uids[3]), q(back))
    assert typ == "OK", data
    oks = m.untagged_responses.get("OK", [])
    moved = [copyuid(x) for x in oks if b"COPYUID" in x]
    assert len(moved) == 1, oks
    validity, from_uids, to_uids = moved[0]
    assert from_uids == [dst_uids[1], dst_uids[3]]
    assert validity == uidvalidity(public, back)
    arrived = messages(public, back)
    assert [dest[u] for u in from_uids] == [arrived[u] for u in to_uids]
    assert sorted(messages(home, "UidsDst")) == [dst_uids[0], dst_uids[2]]
    m.logout()


def test_copy_to_a_missing_mailbox_is_trycreate(fe, home, public):
    src = make_public_folder(public, "NoDst%d" % home.multiappend, ["n 1"])
    m = login(fe)
    m.select(q(src))
    typ, data = m.copy("1", "DoesNotExist")
    assert typ == "NO" and data[0].startswith(b"[TRYCREATE] "), data
    m.logout()


def fake_source(fail_uid):
    """A public-folder server, scripted: its mailbox holds UIDs 11, 12 and
    13 (their FETCH answers with MODSEQ, as after ENABLE CONDSTORE, and
    flag changes among them), and the body of fail_uid it will not
    give."""
    bodies = {uid: b"Subject: fake %d\r\n\r\nBody %d.\r\n" % (uid, uid)
              for uid in (11, 12, 13)}

    def answer(cn, tag, cmd, rest):
        if cmd == "LOGOUT":
            return False
        words = rest.split(" ")
        out = b""
        if cmd == "SELECT":
            out = b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n"
        elif not rest.endswith("BODY.PEEK[]") and "FETCH" in cmd + words[1]:
            uids = sorted(bodies) if cmd == "FETCH" else uid_set(words[2])
            # news of the selected mailbox among the answers, with UIDs
            # as under QRESYNC: one of a message outside the set (the
            # client's), one of a message in it (no second copy of it)
            out = (b"* 9 FETCH (UID 99 FLAGS (\\Flagged))\r\n"
                   b"* 3 FETCH (UID 13 MODSEQ (5) FLAGS ())\r\n")
            for uid in uids:
                out += (b'* %d FETCH (UID %d MODSEQ (4) FLAGS (\\Seen '
                        b'\\Recent) INTERNALDATE "01-Jan-2020 10:00:0%d '
                        b'+0000")\r\n' % (uid - 10, uid, uid - 10))
        elif cmd == "UID" and words[1].upper() == "FETCH":
            uid = int(words[2])
            if uid == fail_uid:
                cn.sendline(tag + " NO [SERVERBUG] cannot read it")
                return True
            out = (b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n"
                   % (uid - 10, uid, len(bodies[uid]), bodies[uid]))
        cn.send(out + b"%s OK %s done\r\n" % (tag.encode(), cmd.encode()))
        return True
    fake = FakeBackend(lambda conn: plain_server(
        conn, after_login=command_loop(answer)))
    fake.bodies = bodies
    return fake


@pytest.mark.parametrize("fail_uid", [11, 12, 13])
def test_source_failing_part_way_leaves_the_destination_unchanged(
        imapfe_factory, home, fail_uid):
    """The source refuses the first, a middle or the last message's body:
    the copies before it are taken back (or, in one MULTIAPPEND, never
    stored), the client gets NO [UNAVAILABLE], and the destination's
    connection goes on working: the messages that can be copied, copied
    next, arrive once each, with their flags and dates."""
    src = fake_source(fail_uid)
    dst = "FromFake%d" % fail_uid
    try:
        fresh_home_mailbox(home, dst)
        f = imapfe_factory(public_config(home, src.port))
        f.start_inetd()
        m = login(f)
        assert m.select(q(PREFIX + "Src"))[0] == "OK"
        typ, data = m.copy("1:3", dst)
        assert typ == "NO" and data[0].startswith(b"[UNAVAILABLE] "), data
        assert m.untagged_responses.get("FETCH") == [
            b"9 (UID 99 FLAGS (\\Flagged))"], m.untagged_responses
        assert b"destination is unchanged" in data[0], data
        assert messages(home, dst) == {}
        good = [u for u in (11, 12, 13) if u != fail_uid]
        typ, data = m._simple_command(
            "UID", "COPY", ",".join(map(str, good)), dst)
        assert typ == "OK", data
        _, src_uids, dst_uids = copyuid(data[0])
        held = messages(home, dst)
        assert src_uids == good and sorted(held) == sorted(dst_uids)
        assert [held[u] for u in dst_uids] == [src.bodies[u] for u in good]
        h = home.imap("alice")
        h.select(dst, readonly=True)
        typ, flags = h.fetch("1:*", "(FLAGS INTERNALDATE)")
        h.logout()
        assert [b"\\Seen" in x and b"01-Jan-2020" in x
                for x in flags] == [True] * 2, flags
        m.logout()
        sent = rawlog(home, 'APPEND "%s"' % dst)
        assert not [ln for ln in sent if "\\Recent" in ln], sent
        appends = [ln for ln in sent if ' APPEND "%s" ' % dst in ln]
        expunges = [ln for ln in sent if " UID EXPUNGE " in ln]
        if home.multiappend:
            # the failed MULTIAPPEND (none when the first message failed)
            # ended with an argument Dovecot must refuse
            aborts = [ln for ln in sent if ln.strip() == "NIL"]
            assert (len(appends), len(aborts), len(expunges)) == (
                1 + int(fail_uid > 11), int(fail_uid > 11), 0), sent
        else:
            assert (len(appends), len(expunges)) == (
                fail_uid - 11 + 2, int(fail_uid > 11)), sent
    finally:
        src.close()


def test_memory_stays_flat_over_many_failed_copies(fe, home, public):
    """1000 COPYs over quota in one session, each refused whole (one by
    one: each time a copy stored and taken back): memory and descriptors
    no larger after the last than after the tenth."""
    tries = 200 if VALGRIND else 1000
    src = make_public_folder(public, "Flat%d" % home.multiappend, [])
    p = public.imap("bob")
    for i in range(3):
        assert p.append(q(src), None, None, big("flat %d" % i))[0] == "OK"
    p.logout()
    fresh_home_mailbox(home, "FlatDst")
    c = raw_login(fe)
    assert c.cmd("s", "SELECT %s" % q(src))[-1].startswith("s OK")
    pid = imapfe_pid(fe)
    rss, fds = {}, {}
    for i in range(1, tries + 1):
        got = c.cmd("c%d" % i, "COPY 1:3 FlatDst")
        assert got[-1].startswith("c%d NO [OVERQUOTA] " % i), got
        if i in (10, tries):
            rss[i] = proc_status(pid, "VmRSS")
            fds[i] = len(os.listdir("/proc/%d/fd" % pid))
    c.cmd("z", "LOGOUT")
    c.close()
    assert messages(home, "FlatDst") == {}
    assert fds[tries] == fds[10], "descriptors: %r" % fds
    if VALGRIND or SANITIZED:
        return          # there the leak check at exit is the proof
    growth = rss[tries] - rss[10]
    assert growth <= 64, "VmRSS %d KiB after 10 failures, %d KiB after " \
        "%d: %d KiB more" % (rss[10], rss[tries], tries, growth)


def dying_destination():
    """A public-folder server, scripted, without MULTIAPPEND: it stores the
    first APPEND (APPENDUID 5 100), and closes the connection in the
    middle of the second."""
    appends = []

    def answer(cn, tag, cmd, rest):
        if cmd == "LOGOUT":
            return False
        if cmd == "APPEND":
            n = int(rest.rsplit("{", 1)[1].rstrip("+}"))
            cn.sendline("+ go")
            if appends:
                cn.read_exact(n // 2)
                cn.sock.shutdown(socket.SHUT_RDWR)
                return True
            appends.append(cn.read_exact(n))
            cn.line()
            cn.sendline(tag + " OK [APPENDUID 5 100] stored")
            return True
        cn.sendline(tag + " OK %s done" % cmd)
        return True
    return FakeBackend(lambda conn: plain_server(
        conn, after_login=command_loop(answer)))


def test_destination_lost_mid_copy_names_the_copies_left(imapfe_factory,
                                                         home):
    """The destination's connection breaks in the middle of the second
    message: the copy it stored cannot be taken back, so the client hears
    the server was lost, and the log names the UID left."""
    fresh_home_mailbox(home, "Lost%d" % home.multiappend)
    d = home.imap("alice")
    for s in ("lost 1", "lost 2"):
        assert d.append("Lost%d" % home.multiappend, None, None,
                        ("Subject: %s\r\n\r\n%s\r\n" % (s, s)).encode()
                        )[0] == "OK"
    d.logout()
    dest = dying_destination()
    try:
        f = imapfe_factory(public_config(home, dest.port))
        f.start_inetd()
        m = login(f)
        m.select("Lost%d" % home.multiappend)
        typ, data = m.copy("1:2", q(PREFIX + "Dst"))
        assert typ == "NO" and data[0].startswith(b"[UNAVAILABLE]"), data
        assert b"copies left in the destination: 1" in data[0], data
        # the session goes on, the source untouched
        assert m.noop()[0] == "OK"
        assert len(messages(home, "Lost%d" % home.multiappend)) == 2
        m.logout()
        text = f.log_text()
        assert re.search(r'event=copy-failed .*reason=destination-lost '
                         r'left=1', text), text
        assert re.search(r'event=copy-undo-failed .*left=1 uidvalidity=5 '
                         r'uids="100"', text), text
    finally:
        dest.close()


def test_move_whose_originals_stay_keeps_both(imapfe_factory, public):
    """Every copy stored, then the source will not expunge the originals
    (it answers OK and keeps them): both stay, the client hears so and
    sees no EXPUNGE, and the log names the originals."""
    h = home_server(True)
    try:
        d = h.imap("alice")
        assert d.create("NoExpunge")[0] == "OK"
        for s in ("kept 1", "kept 2"):
            assert d.append("NoExpunge", None, None,
                            ("Subject: %s\r\n\r\n%s\r\n" % (s, s))
                            .encode())[0] == "OK"
        d.logout()
        before = messages(h, "NoExpunge")
        dst = make_public_folder(public, "KeptDst", [])
        f = imapfe_factory(public_config(h, public.port))
        f.start_inetd()
        m = login(f)
        m.select("NoExpunge")
        typ, data = m._simple_command("MOVE", "1:2", q(dst))
        assert typ == "OK" and b"originals could not be removed" in data[0], \
            data
        assert "EXPUNGE" not in m.untagged_responses, m.untagged_responses
        _, from_uids, to_uids = copyuid(m.untagged_responses["OK"][-1])
        m.logout()
        arrived = messages(public, dst)
        assert messages(h, "NoExpunge") == before
        assert [before[u] for u in from_uids] == [arrived[u] for u in to_uids]
        assert len(arrived) == 2
        assert re.search(r'event=move-expunge-failed .*copied=2 '
                         r'originals="1:2"', f.log_text()), f.log_text()
    finally:
        h.close()


def test_copies_that_cannot_be_removed_are_named(fe, home, public):
    """One APPEND per message, the second refused, and the destination
    will not expunge the first: the NO says a copy stays, and the log
    names its UID.  With MULTIAPPEND there is nothing to remove."""
    src = make_public_folder(public, "Stuck%d" % home.multiappend, [])
    p = public.imap("bob")
    for i in range(3):
        assert p.append(q(src), None, None, big("stuck %d" % i))[0] == "OK"
    p.logout()
    fresh_home_mailbox(home, "NoExpunge")
    m = login(fe)
    m.select(q(src))
    typ, data = m.copy("1:3", "NoExpunge")
    m.logout()
    # The copy that stays fills the quota: this test comes last.
    held = messages(home, "NoExpunge")
    assert typ == "NO" and data[0].startswith(b"[OVERQUOTA] "), data
    text = fe.log_text()
    if home.multiappend:
        assert held == {}
        assert b"destination is unchanged" in data[0], data
        assert "event=copy-undo-failed" not in text, text
        return
    assert list(held.values()) == [messages(public, src)[1]]
    assert b"copies left in the destination: 1." in data[0], data
    assert re.search(r'event=copy-undo-failed .*left=1 .*uids="%d"'
                     % list(held)[0], text), text


# --- a real destination killed mid-copy -----------------------------------

KILL_COUNT, KILL_SIZE = 300, 50000


def public_dest(multiappend):
    """A public-folder Dovecot of the test's own, to kill: as Dovecot
    comes, or with MULTIAPPEND left out of its capabilities."""
    def conf(d):
        extra = public_conf(d)
        if not multiappend:
            extra += "imap_capability = %s\n" % CAPS_NO_MULTIAPPEND
        return extra
    return Dovecot(extra_conf=conf)


def maildir_files(d, name):
    """The files of public folder name on server d: in tmp (being
    stored) and in new and cur (stored)."""
    top = os.path.join(d.dir, "public", "." + name)
    return sum(len(os.listdir(os.path.join(top, sub)))
               for sub in ("tmp", "new", "cur"))


def kill_dovecot(d):
    """SIGKILL to the whole process group of Dovecot d (master, imap,
    auth...): nothing of it gets to finish what it was doing."""
    os.killpg(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    d.proc = None
    wait_for(lambda: read_greeting(d.port, timeout=0.2) == b"", 10,
             "the killed dovecot's port to close")


@pytest.mark.parametrize("verb", ["COPY", "MOVE"])
@pytest.mark.parametrize("multiappend", [True, False],
                         ids=["multiappend", "one-by-one"])
def test_destination_killed_mid_copy(imapfe_factory, roomy_home, verb,
                                     multiappend):
    """300 messages of 50 KB from home to a public folder, whose Dovecot
    is killed (SIGKILL, every process of it) once the first messages of
    the APPEND are on its disk.  The client gets NO [UNAVAILABLE] and the
    session goes on; a MOVE removed no original and marked none
    \\Deleted.  Restarted, the destination holds what it held before:
    with MULTIAPPEND nothing of the APPEND was ever committed; one
    APPEND per message, the copies stored before the kill cannot be taken
    back on a dead server, so the NO says how many stay and
    event=copy-undo-failed names exactly their UIDs."""
    name = "Killed%s%d" % (verb, multiappend)
    src = name
    m = roomy_home.imap("alice")
    assert m.create(src)[0] == "OK"
    for i in range(KILL_COUNT):
        assert m.append(src, None, None,
                        big_message(KILL_SIZE, i))[0] == "OK"
    m.logout()
    before_src = messages(roomy_home, src)
    pub = public_dest(multiappend)
    try:
        dst = make_public_folder(pub, name, ["was here 1", "was here 2"])
        before_dst = messages(pub, dst)
        files_before = maildir_files(pub, name)
        f = imapfe_factory(public_config(roomy_home, pub.port))
        f.start_inetd()
        c = raw_login(f)
        assert c.cmd("s", "SELECT %s" % src)[-1].startswith("s OK")
        c.send("k UID %s 1:* %s\r\n" % (verb, q(dst)))
        # under way: a few messages written, by far not all
        wait_for(lambda: maildir_files(pub, name) >= files_before + 5, 30,
                 "the APPEND to reach the destination's disk")
        kill_dovecot(pub)
        answer = c.until_tagged("k")
        assert answer[-1].startswith("k NO [UNAVAILABLE] "), answer
        assert not [ln for ln in answer if "EXPUNGE" in ln], answer
        # the session goes on, on the home server
        assert c.cmd("n", "NOOP")[-1].startswith("n OK")
        got = c.cmd("d", "UID SEARCH DELETED")
        assert got[-1].startswith("d OK") and "* SEARCH" in got[0], got
        assert got[0].strip() == "* SEARCH", "marked \\Deleted: %r" % got
        got = c.cmd("e", "STATUS %s (MESSAGES)" % src)
        assert "(MESSAGES %d)" % KILL_COUNT in got[0], got
        assert c.cmd("z", "LOGOUT")[-1].startswith("z OK")
        c.close()
        assert messages(roomy_home, src) == before_src
        pub.start()
        after = messages(pub, dst)
        text = f.log_text()
        failed = re.search(r"event=copy-failed .*command=%s messages=%d "
                           r"reason=destination-lost left=(\d+)"
                           % (verb, KILL_COUNT), text)
        assert failed, text
        left = int(failed.group(1))
        if multiappend:
            assert left == 0, text
            assert after == before_dst
            assert "event=copy-undo-failed" not in text, text
            return
        undo = re.search(r'event=copy-undo-failed .*command=%s left=%d '
                         r'uidvalidity=(\d+) uids="([\d:,]+)"'
                         % (verb, left), text)
        assert undo and left >= 4, text
        assert int(undo.group(1)) == uidvalidity(pub, dst)
        named = uid_set(undo.group(2))
        assert len(named) == left
        assert {u: after[u] for u in before_dst} == before_dst
        no = answer[-1]
        assert ("copies left in the destination: %d." % left in no or
                "copies left in the destination: %d, and perhaps the one "
                "being stored." % left in no), answer
        # the one whose APPEND was on its way may have been stored, its
        # answer lost with the server: the NO says so, and then only
        extra = sorted(set(after) - set(before_dst) - set(named))
        assert len(extra) <= int("perhaps" in no), \
            "left in the destination: %r, named: %r" % (
                sorted(set(after) - set(before_dst)), named)
        # the copies left are the first messages of the set, in order
        order = [before_src[u] for u in sorted(before_src)]
        assert [after[u] for u in named + extra] == order[:left + len(extra)]
    finally:
        pub.close()


# --- mbsync over a folder whose messages moved between servers ------------

def mbsync_for(tmp, port):
    """mbsync (as test_transparency runs it) on alice's INBOX, her home
    folder Filed and the public folder Shared only, expunging on both
    sides what the other side no longer has."""
    sync = Mbsync(tmp, "moved", port)
    with open(sync.rc) as f:
        rc = f.read()
    rc = rc.replace("Patterns *\n", 'Patterns INBOX Filed "%sShared"\n'
                    % PREFIX).replace("Expunge None\n", "Expunge Both\n")
    with open(sync.rc, "w") as f:
        f.write(rc)
    return sync


MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]*>)", re.M | re.I)


def message_ids(msgs):
    return sorted(MESSAGE_ID.search(m).group(1) for m in msgs)


def test_mbsync_converges_after_a_move_between_servers(imapfe_factory,
                                                      tmp_path):
    """A local Maildir synced through imapfe with alice's home (INBOX,
    Filed) and a public folder; 3 of Shared's 6 messages then moved home
    into Filed through imapfe; mbsync run twice more: the second changes
    nothing, and every Message-ID is once on the servers and once in the
    Maildir, in the folder it was moved to."""
    home = Dovecot(extra_conf=home_conf)
    pub = public_server()
    try:
        h = home.imap("alice")
        assert h.append("INBOX", None, None, message("inbox 1"))[0] == "OK"
        assert h.create("Filed")[0] == "OK"
        h.logout()
        shared = make_public_folder(pub, "Shared",
                                    ["shared %d" % i for i in range(1, 7)])
        f = imapfe_factory(public_config(home, pub.port))
        f.start_inetd()
        sync = mbsync_for(str(tmp_path), f.port)
        sync.run()
        local = sync.folders()
        assert {k: len(v) for k, v in local.items()} == {
            "INBOX": 1, "Filed": 0, shared: 6}, local

        m = login(f)
        assert m.select(q(shared))[0] == "OK"
        moved = [b"<shared-%d@example.org>" % i for i in (2, 4, 5)]
        typ, data = m._simple_command("MOVE", "2,4,5", "Filed")
        assert typ == "OK", data
        m.logout()

        def far():
            return {"INBOX": messages(home, "INBOX"),
                    "Filed": messages(home, "Filed"),
                    shared: messages(pub, shared)}
        sync.run()
        first_far, first_local = far(), sync.folders()
        sync.run()
        assert far() == first_far, "the second run changed the servers"
        assert sync.folders() == first_local, \
            "the second run changed the Maildir"
        for side in ({k: v.values() for k, v in first_far.items()},
                     first_local):
            ids = {k: message_ids(v) for k, v in side.items()}
            assert ids["Filed"] == sorted(moved), ids
            assert ids[shared] == sorted(
                b"<shared-%d@example.org>" % i for i in (1, 3, 6)), ids
            assert ids["INBOX"] == [b"<inbox-1@example.org>"], ids
    finally:
        pub.close()
        home.close()
