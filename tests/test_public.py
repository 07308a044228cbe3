"""Public-folder routing (router.c): two real Dovecots, a home mailbox
server and a public-folder server, behind one imapfe with

    route * 127.0.0.1:HOME
    public "Public Folders/" 127.0.0.1:PUB

Both Dovecots use "/" as the hierarchy delimiter; the public one has a
public namespace "Public Folders/" besides its own INBOX namespace, and both
keep a rawlog of every post-login session, so a test can prove what imapfe
sent to each server.

Every imapfe process is ended by PID through conftest's Processes, which
also fails a test on a valgrind or sanitizer report; waits are bounded and
scaled by SLOW.
"""
import glob
import imaplib
import os
import re
import signal
import time

import pytest

from fakebackend import FakeBackend, command_loop, plain_server
from conftest import OPEN_CLIENTS as _clients
from conftest import (BIN, MAILUID, SLOW, VALGRIND, Dovecot, Raw,
                      base_config, sample_message, wait_for)

PREFIX = "Public Folders/"
NEWS = PREFIX + "News"
EVENTS = PREFIX + "Events"

with open(BIN, "rb") as _f:
    SANITIZED = b"__asan_init" in _f.read()

NS_INBOX = """\
namespace inbox {
  inbox = yes
  separator = /
}
"""


def q(name):
    """A mailbox name as an IMAP quoted string (imaplib does not quote)."""
    return '"%s"' % name.replace("\\", "\\\\").replace('"', '\\"')


def _mail_dir(d, name):
    path = os.path.join(d, name)
    os.mkdir(path)
    os.chown(path, MAILUID, MAILUID)
    return path


def home_conf(d):
    return NS_INBOX + "rawlog_dir = %s\n" % _mail_dir(d, "rawlog")


def public_conf(d):
    return NS_INBOX + """\
namespace public {
  type = public
  separator = /
  prefix = "%s"
  location = maildir:%s
  subscriptions = no
  list = yes
}
rawlog_dir = %s
""" % (PREFIX, _mail_dir(d, "public"), _mail_dir(d, "rawlog"))


def message(subject, body=None):
    body = body or "Body of %s.\r\n" % subject
    return ("From: sender@example.org\r\nTo: alice@example.org\r\n"
            "Subject: %s\r\nMessage-ID: <%s@example.org>\r\n\r\n%s"
            % (subject, re.sub(r"\W", "-", subject), body)).encode()


def big_message(size, salt):
    """A message of about size bytes, lines under 1000 octets, every byte
    position distinct enough that a shifted or dropped chunk shows."""
    body = bytes((i * 7 + salt) % 251 + 1 for i in range(size))
    body = body.replace(b"\r", b"x").replace(b"\n", b"y")
    lines = [body[i:i + 998] for i in range(0, len(body), 998)]
    return (b"From: a@example.org\r\nSubject: big %d\r\n\r\n" % salt +
            b"\r\n".join(lines) + b"\r\n")


def make_public_folder(pub, name, subjects, user="alice"):
    """Create PREFIX+name on the public server directly, with one message
    per subject; return the full name."""
    full = PREFIX + name
    m = pub.imap(user)
    assert m.create(q(full))[0] == "OK"
    for s in subjects:
        assert m.append(q(full), None, None, message(s))[0] == "OK"
    m.logout()
    return full


def public_server(passwd=None, extra="", folders=("News", "Events")):
    """A public-folder server with News and Events (of folders); with
    passwd (the text of its passwd-file), one that nobody has logged in to
    yet; extra: more of its configuration."""
    d = Dovecot(extra_conf=lambda dd: public_conf(dd) + extra,
                passwd=passwd)
    if passwd is None and "News" in folders:
        make_public_folder(d, "News", ["news 1", "news 2", "news 3"])
    if passwd is None and "Events" in folders:
        make_public_folder(d, "Events", ["event 1", "event 2"])
    return d


def home_server(extra=""):
    """alice's home server: INBOX with "test 1".."test 3" and a folder
    "Drafts"; extra: more of its configuration."""
    d = Dovecot(extra_conf=lambda dd: home_conf(dd) + extra)
    m = d.imap("alice")
    for i in range(1, 4):
        m.append("INBOX", None, None, sample_message(i))
    m.create("Drafts")
    m.logout()
    return d


@pytest.fixture(scope="module")
def home():
    """The home server, its INBOX never changed by any test here."""
    d = home_server()
    yield d
    d.close()


@pytest.fixture(scope="module")
def public():
    """The public-folder server: News ("news 1".."news 3") and Events
    ("event 1", "event 2"), neither changed by any test here."""
    d = public_server()
    yield d
    d.close()


@pytest.fixture
def own_public():
    """A public-folder server of the test's own, for stopping, killing and
    misconfiguring."""
    made = []

    def make(**kw):
        d = public_server(**kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.close()


def public_config(home, pub_port, extra=""):
    return base_config(home.port, 'public "%s" 127.0.0.1:%d\n'
                       % (PREFIX, pub_port) + extra)


@pytest.fixture
def pfe(imapfe_factory, home, public):
    """imapfe with the home and the public server, run inetd-style."""
    f = imapfe_factory(public_config(home, public.port))
    f.start_inetd()
    return f




def raw(port):
    c = Raw(port, timeout=20)
    _clients.append(c)
    return c


def login(fe, user="alice", password="secret"):
    m = imaplib.IMAP4("127.0.0.1", fe.port, timeout=20 * SLOW)
    _clients.append(m)
    assert m.login(user, password)[0] == "OK"
    return m


def raw_login(fe, user="alice", password="secret"):
    c = raw(fe.port)
    lines = c.cmd("L", "LOGIN %s %s" % (user, password))
    assert lines[-1].startswith("L OK"), lines
    return c


def list_names(data):
    """Mailbox names from imaplib's LIST/LSUB data."""
    names = []
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):        # a name sent as a literal
            names.append(item[1].decode())
            continue
        m = re.match(rb'\([^)]*\) (?:"(?:\\.|[^"])"|NIL) (.*)$', item)
        assert m, item
        name = m.group(1)
        if name.startswith(b'"'):
            name = re.sub(rb'\\(.)', rb'\1', name[1:-1])
        names.append(name.decode())
    return names


def subjects(m, spec="1:*"):
    typ, data = m.fetch(spec, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK", data
    return [re.search(rb"Subject: ([^\r\n]*)", d[1]).group(1).decode()
            for d in data if isinstance(d, tuple)]


def tagged(lines, tag):
    return [ln for ln in lines if ln.startswith(tag + " ")]


def rawlog(d, marker, until="LOGOUT"):
    """The commands (timestamps cut) of the session of server d whose
    rawlog input holds marker, once it also holds until."""
    def find():
        for path in glob.glob(os.path.join(d.dir, "rawlog", "*.in")):
            with open(path, errors="replace") as f:
                text = f.read()
            if marker in text and until in text:
                return [ln.split(" ", 1)[1] if " " in ln else ""
                        for ln in text.splitlines()]
        return None
    return wait_for(find, 10, "rawlog with %r and %r" % (marker, until))


def imapfe_pid(fe):
    pids = set(re.findall(r"imapfe\[(\d+)\]", fe.log_text()))
    assert len(pids) == 1, pids
    return int(pids.pop())


def proc_status(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for ln in f:
            if ln.startswith(key + ":"):
                return int(ln.split()[1])
    raise AssertionError("no %s for %d" % (key, pid))


def count(fe, text):
    return fe.log_text().count(text)


# --- capabilities ---------------------------------------------------------

CROSS_MAILBOX = ("NOTIFY", "MULTISEARCH")


def test_login_capabilities_drop_cross_mailbox_extensions(pfe, home):
    # The home Dovecot itself offers several of them, so dropping is real.
    direct = home.imap("alice")
    offered = direct.capability()[1][0].decode().split()
    direct.logout()
    assert "NOTIFY" in offered and "CATENATE" in offered, offered
    c = raw(pfe.port)
    ok = c.cmd("a", "LOGIN alice secret")[-1]
    m = re.match(r"a OK \[CAPABILITY ([^\]]*)\]", ok)
    assert m, ok
    caps = m.group(1).split()
    for cap in CROSS_MAILBOX:
        assert cap not in caps, ok
    # CATENATE's URLs are checked where they point (test_catenate.py)
    for cap in ("IMAP4rev1", "IDLE", "UNSELECT", "NAMESPACE", "MOVE",
                "UIDPLUS", "LITERAL+", "CATENATE", "URL-PARTIAL"):
        assert cap in caps, ok
    c.cmd("z", "LOGOUT")
    c.close()


def test_capability_command_after_login_agrees_with_login(pfe):
    """An explicit CAPABILITY after login must not bring the dropped
    extensions back: a client would then use NOTIFY across servers."""
    c = raw_login(pfe)
    lines = c.cmd("c", "CAPABILITY")
    assert lines[-1].startswith("c OK"), lines
    caps = [ln for ln in lines if ln.startswith("* CAPABILITY ")]
    assert len(caps) == 1, lines
    present = [cap for cap in CROSS_MAILBOX if cap in caps[0].split()]
    assert not present, "CAPABILITY after login offers %s: %s" % (
        present, caps[0])
    assert "CATENATE" in caps[0].split(), caps[0]
    c.cmd("z", "LOGOUT")
    c.close()


# --- LIST, LSUB, NAMESPACE ------------------------------------------------

def test_list_merges_home_and_public_without_duplicate_inbox(pfe):
    m = login(pfe)
    typ, data = m.list('""', "*")
    assert typ == "OK"
    names = list_names(data)
    assert names.count("INBOX") == 1, names
    for want in ("Drafts", NEWS, EVENTS, "Public Folders"):
        assert names.count(want) == 1, (want, names)
    # The top level: home folders and the public prefix, nothing under it.
    typ, data = m.list('""', "%")
    top = list_names(data)
    assert sorted(top) == ["Drafts", "INBOX", "Public Folders"], top
    # Inside the prefix: only the public server's folders.
    typ, data = m.list(q(PREFIX), "%")
    assert sorted(list_names(data)) == [EVENTS, NEWS]
    typ, data = m.list('""', q(PREFIX + "*"))
    assert sorted(list_names(data)) == [EVENTS, NEWS]
    # A pattern that cannot reach the public prefix: just INBOX, once.
    typ, data = m.list('""', "INBOX")
    assert list_names(data) == ["INBOX"]
    m.logout()


def test_list_answers_once_and_nothing_trails(pfe):
    """One tagged answer per LIST even though two servers took part: the
    NOOP after it must see only its own answer."""
    c = raw_login(pfe)
    c.send('b LIST "" *\r\nn NOOP\r\n')
    first = c.until_tagged("b")
    second = c.until_tagged("n")
    assert len(tagged(first, "b")) == 1 and first[-1].startswith("b OK")
    assert second == [second[-1]] and second[-1].startswith("n OK"), second
    c.cmd("z", "LOGOUT")
    c.close()


def test_list_status_reports_each_mailbox_once(pfe):
    """LIST-STATUS (advertised after login): the public server's own INBOX
    is filtered from its LIST lines, so its STATUS line for that INBOX must
    go too, or the client sees two different INBOX counts."""
    c = raw_login(pfe)
    lines = c.cmd("s", 'LIST "" "*" RETURN (STATUS (MESSAGES))')
    assert lines[-1].startswith("s OK"), lines
    inbox = [ln for ln in lines if re.match(r'\* STATUS "?INBOX"? ', ln)]
    assert inbox == ["* STATUS INBOX (MESSAGES 3)"], lines
    news = [ln for ln in lines if ln.startswith('* STATUS "%s"' % NEWS)]
    assert news == ['* STATUS "%s" (MESSAGES 3)' % NEWS], lines
    c.cmd("z", "LOGOUT")
    c.close()


def test_lsub_merges_subscriptions_of_both_servers(pfe, home, public):
    m = login(pfe)
    try:
        assert m.subscribe(q(NEWS))[0] == "OK"
        assert m.subscribe("Drafts")[0] == "OK"
        typ, data = m.lsub('""', "*")
        assert typ == "OK"
        names = list_names(data)
        assert names.count(NEWS) == 1 and names.count("Drafts") == 1, names
        assert EVENTS not in names and "INBOX" not in names, names
        # Each subscription was stored by the server owning the name.
        h = home.imap("alice")
        assert list_names(h.lsub('""', "*")[1]) == ["Drafts"]
        h.logout()
        p = public.imap("alice")
        assert list_names(p.lsub('""', "*")[1]) == [NEWS]
        p.logout()
    finally:
        m.unsubscribe(q(NEWS))
        m.unsubscribe("Drafts")
        m.logout()


def test_namespace_adds_the_public_prefix(pfe, home):
    direct = home.imap("alice")
    typ, data = direct.namespace()
    direct.logout()
    assert data == [b'(("" "/")) NIL NIL']
    m = login(pfe)
    typ, data = m.namespace()
    assert typ == "OK"
    assert data == [b'(("" "/")) NIL (("Public Folders/" "/"))'], data
    m.logout()


# --- working in public folders --------------------------------------------

def test_select_fetch_store_search_uid_fetch_in_public_folder(pfe, public):
    folder = make_public_folder(public, "Work", ["work 1", "work 2",
                                                 "work 3"])
    m = login(pfe)
    typ, data = m.select(q(folder))
    assert typ == "OK" and data == [b"3"], data
    assert subjects(m) == ["work 1", "work 2", "work 3"]
    typ, data = m.store("2", "+FLAGS", "(\\Flagged)")
    assert typ == "OK" and b"\\Flagged" in data[0], data
    typ, data = m.search(None, "FLAGGED")
    assert typ == "OK" and data == [b"2"], data
    typ, data = m.fetch("2", "(UID)")
    uid = re.search(rb"UID (\d+)", data[0]).group(1).decode()
    typ, data = m.uid("FETCH", uid, "(FLAGS BODY.PEEK[HEADER.FIELDS "
                      "(SUBJECT)])")
    assert typ == "OK"
    assert b"\\Flagged" in data[0][0] and b"work 2" in data[0][1], data
    typ, data = m.uid("SEARCH", None, "FLAGGED")
    assert data == [uid.encode()], data
    m.logout()
    # The flag is on the public server, not anywhere else.
    p = public.imap("bob")
    p.select(q(folder), readonly=True)
    assert p.search(None, "FLAGGED")[1] == [b"2"]
    p.logout()


def test_status_of_public_folder_while_inbox_is_selected(pfe):
    m = login(pfe)
    assert m.select("INBOX") == ("OK", [b"3"])
    typ, data = m.status(q(NEWS), "(MESSAGES UIDNEXT)")
    assert typ == "OK" and re.search(rb"MESSAGES 3 UIDNEXT 4", data[0]), \
        data
    typ, data = m.status(q(EVENTS), "(MESSAGES)")
    assert re.search(rb"MESSAGES 2\)", data[0]), data
    # INBOX is still the selected mailbox.
    assert subjects(m, "1") == ["test 1"]
    m.logout()


def test_create_and_delete_public_folder(pfe, home, public):
    name = PREFIX + "Made by imapfe"
    m = login(pfe)
    assert m.create(q(name))[0] == "OK"
    p = public.imap("bob")
    assert name in list_names(p.list('""', "*")[1])
    h = home.imap("alice")
    assert not [n for n in list_names(h.list('""', "*")[1])
                if "Made by" in n]
    assert m.delete(q(name))[0] == "OK"
    assert name not in list_names(p.list('""', "*")[1])
    p.logout()
    h.logout()
    m.logout()


def test_append_to_public_folder_small_and_2_mib(pfe, public):
    folder = make_public_folder(public, "Uploads", [])
    small = message("small upload")
    big = big_message(2 * 1024 * 1024, 17)
    m = login(pfe)
    typ, data = m.append(q(folder), None, None, small)
    assert typ == "OK", data
    typ, data = m.append(q(folder), None, None, big)
    assert typ == "OK" and b"APPENDUID" in data[0], data
    m.logout()
    # A non-synchronizing 2 MiB literal (LITERAL+) streams too.
    big2 = big_message(2 * 1024 * 1024 + 333, 99)
    c = raw_login(pfe)
    c.send(b'x APPEND %s {%d+}\r\n' % (q(folder).encode(), len(big2)) +
           big2 + b"\r\n")
    lines = c.until_tagged("x")
    assert lines[-1].startswith("x OK"), lines
    c.cmd("z", "LOGOUT")
    c.close()
    m = login(pfe)
    typ, data = m.select(q(folder))
    assert data == [b"3"], data
    typ, data = m.fetch("1:3", "(BODY.PEEK[])")
    bodies = [d for d in data if isinstance(d, tuple)]
    assert bodies[0][1] == small
    assert bodies[1][1] == big
    assert bodies[2][1] == big2
    m.logout()
    # Byte for byte on the public server itself as well.
    p = public.imap("bob")
    p.select(q(folder), readonly=True)
    assert p.fetch("2", "(BODY.PEEK[])")[1][0][1] == big
    p.logout()


def test_multiappend_whose_messages_look_like_literal_announcements(pfe,
                                                                   public):
    # Two synchronizing literals in one APPEND (MULTIAPPEND, RFC 3502),
    # the first message holding lines that end as announcements do
    # ("{3}", "{5+}"): imapfe waits for the server's "+" only after the
    # real announcements, so both messages arrive byte for byte.
    folder = make_public_folder(public, "Multi", [])
    one = message("tricky", "a line {3}\r\nabc and {5+}\r\nhello\r\n")
    two = message("plain second")
    c = raw_login(pfe)
    c.send(b"A APPEND %s {%d}\r\n" % (q(folder).encode(), len(one)))
    assert c.line().startswith("+"), "no + for the first literal"
    c.send(one + b" {%d}\r\n" % len(two))
    assert c.line().startswith("+"), "no + for the second literal"
    c.send(two + b"\r\n")
    lines = c.until_tagged("A")
    assert lines[-1].startswith("A OK"), lines
    c.cmd("Z", "LOGOUT")
    p = public.imap("bob")
    p.select(q(folder), readonly=True)
    typ, data = p.fetch("1:*", "(BODY.PEEK[])")
    assert [d[1] for d in data if isinstance(d, tuple)] == [one, two]
    p.logout()


def test_append_with_flags_and_date_reaches_the_owning_server(pfe, home,
                                                              public):
    """APPEND with a flag list and a date, the usual form for a client
    saving a sent or draft message: small (buffered) and 300 KiB (streamed)
    to a public folder, and to a home folder while a public one is
    selected.  Each message must land on the server owning the name."""
    folder = make_public_folder(public, "Flagged uploads", [])
    date = '"24-Nov-2026 10:11:12 +0000"'
    small = message("flagged small")
    big = big_message(300 * 1024, 5)
    m = login(pfe)
    assert m.create("FlagDrop")[0] == "OK"
    problems = []
    for what, msg in (("small", small), ("300 KiB", big)):
        typ, data = m.append(q(folder), "(\\Seen \\Flagged)", date, msg)
        if typ != "OK":
            problems.append("APPEND %s to %s: %s %r" % (what, folder, typ,
                                                         data))
    m.select(q(NEWS), readonly=True)
    typ, data = m.append("FlagDrop", "(\\Seen)", date, small)
    if typ != "OK":
        problems.append("APPEND to FlagDrop with %s selected: %s %r" % (
            NEWS, typ, data))
    m.logout()
    p = public.imap("bob")
    n = int(p.select(q(folder), readonly=True)[1][0])
    got = _meta(p, "1:*") if n else []
    want = [({b"\\Seen", b"\\Flagged"}, date.strip('"').encode(), msg)
            for msg in (small, big)]
    if got != want:
        problems.append("%s on the public server holds %d messages: %r" % (
            folder, len(got), [(f, d, len(b)) for f, d, b in got]))
    p.logout()
    h = home.imap("alice")
    n = int(h.select("FlagDrop")[1][0])
    if n != 1:
        problems.append("FlagDrop at home holds %d messages, not 1" % n)
    h.close()
    h.delete("FlagDrop")
    h.logout()
    assert not problems, "\n".join(problems)


def test_switching_inbox_and_public_keeps_one_selected_mailbox(pfe, home,
                                                               public):
    c = raw_login(pfe)
    sel = c.cmd("sw1", "SELECT %s" % q(NEWS))
    assert sel[-1].startswith("sw1 OK") and "* 3 EXISTS" in sel, sel
    sel = c.cmd("sw2", "SELECT INBOX")
    assert sel[-1].startswith("sw2 OK") and "* 3 EXISTS" in sel, sel
    got = c.cmd("sw3", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert got[-1].startswith("sw3 OK") and "Subject: test 1" in got, got
    sel = c.cmd("sw4", "EXAMINE %s" % q(EVENTS))
    assert sel[-1].startswith("sw4 OK [READ-ONLY]"), sel
    got = c.cmd("sw5", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert "Subject: event 1" in got, got
    sel = c.cmd("sw6", "SELECT Drafts")
    assert sel[-1].startswith("sw6 OK") and "* 0 EXISTS" in sel, sel
    # Nothing in Drafts: a FETCH that reached the public server's Events
    # would find a message.
    got = c.cmd("sw7", "FETCH 1 FLAGS")
    assert got[-1].startswith("sw7 BAD") or got[-1].startswith("sw7 NO"), \
        got
    c.cmd("sw8", "LOGOUT")
    c.close()
    # What each server saw: the public one was unselected before INBOX was
    # selected and again before Drafts; the home one before Events.
    pub = rawlog(public, "sw1 SELECT")
    i1 = pub.index('sw1 SELECT "%s"' % NEWS)
    i4 = pub.index('sw4 EXAMINE "%s"' % EVENTS)
    unsel = [i for i, ln in enumerate(pub) if re.match(r"\S+ UNSELECT$", ln)]
    assert [i for i in unsel if i1 < i < i4], pub
    assert [i for i in unsel if i > i4], pub
    assert not [ln for ln in pub if ln.startswith(("sw2", "sw3", "sw6",
                                                    "sw7"))], pub
    hom = rawlog(home, "sw2 SELECT")
    i2 = hom.index("sw2 SELECT INBOX")
    i6 = hom.index("sw6 SELECT Drafts")
    assert [i for i, ln in enumerate(hom)
            if re.match(r"\S+ UNSELECT$", ln) and i2 < i < i6], hom
    assert not [ln for ln in hom if ln.startswith(("sw1", "sw4", "sw5"))], \
        hom


def test_pipelined_commands_across_servers_answer_in_order(pfe):
    c = raw(pfe.port)
    c.send("a LOGIN alice secret\r\n"
           "b SELECT %s\r\n"
           "c FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"
           "d SELECT INBOX\r\n"
           "e FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"
           'f STATUS %s (MESSAGES)\r\n'
           "g NOOP\r\n" % (q(NEWS), q(EVENTS)))
    assert c.until_tagged("a")[-1].startswith("a OK")
    assert c.until_tagged("b")[-1].startswith("b OK")
    got = c.until_tagged("c")
    assert "Subject: news 2" in got and got[-1].startswith("c OK"), got
    assert c.until_tagged("d")[-1].startswith("d OK")
    got = c.until_tagged("e")
    assert "Subject: test 2" in got and got[-1].startswith("e OK"), got
    got = c.until_tagged("f")
    assert '* STATUS "%s" (MESSAGES 2)' % EVENTS in got, got
    assert c.until_tagged("g")[-1].startswith("g OK")
    c.cmd("z", "LOGOUT")
    c.close()


def test_idle_in_public_folder_sees_append_by_another_client(pfe, public):
    folder = make_public_folder(public, "Live", ["live 1"])
    c = raw_login(pfe)
    assert c.cmd("s", "SELECT %s" % q(folder))[-1].startswith("s OK")
    c.send("i IDLE\r\n")
    assert c.line().startswith("+ ")
    other = public.imap("bob")      # straight to the public Dovecot
    assert other.append(q(folder), None, None,
                        message("live 2"))[0] == "OK"
    other.logout()
    ln = c.line()
    while ln.startswith("* ") and "EXISTS" not in ln and "RECENT" in ln:
        ln = c.line()
    assert ln == "* 2 EXISTS", ln
    c.send("DONE\r\n")
    assert c.until_tagged("i")[-1].startswith("i OK")
    got = c.cmd("f", "FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert "Subject: live 2" in got, got
    c.cmd("z", "LOGOUT")
    c.close()


def test_enable_is_replayed_on_public_server(pfe, public):
    """ENABLE CONDSTORE before the public server is reached: it must be
    enabled there too (RFC 7162: SELECT then reports HIGHESTMODSEQ)."""
    folder = make_public_folder(public, "Modseq", ["modseq 1"])
    c = raw_login(pfe)
    got = c.cmd("en1", "ENABLE CONDSTORE")
    assert "* ENABLED CONDSTORE" in got and got[-1].startswith("en1 OK"), got
    sel = c.cmd("en2", "SELECT %s" % q(folder))
    assert sel[-1].startswith("en2 OK"), sel
    assert [ln for ln in sel if "[HIGHESTMODSEQ " in ln], sel
    # The replayed ENABLE's own answer is not the client's business.
    assert not [ln for ln in sel if "ENABLED" in ln], sel
    c.cmd("en3", "LOGOUT")
    c.close()
    pub = rawlog(public, "en2 SELECT")
    enable = [i for i, ln in enumerate(pub)
              if re.match(r"\S+ ENABLE CONDSTORE$", ln)]
    assert enable and enable[0] < pub.index('en2 SELECT "%s"' % folder), pub


def test_qresync_client_sees_closed_when_switching_servers(pfe):
    """RFC 7162 3.2.11: with QRESYNC enabled, SELECT while a mailbox is
    selected must send [CLOSED] before the new mailbox's responses, so the
    client can tell which mailbox an EXPUNGE/VANISHED belongs to.  The home
    server does that by itself when the switch stays at home."""
    c = raw_login(pfe)
    assert c.cmd("q1", "ENABLE QRESYNC")[-1].startswith("q1 OK")
    assert c.cmd("q2", "SELECT INBOX")[-1].startswith("q2 OK")
    home_switch = c.cmd("q3", "SELECT Drafts")
    assert "* OK [CLOSED] Previous mailbox closed." in home_switch, \
        home_switch
    across = c.cmd("q4", "SELECT %s" % q(NEWS))
    assert across[-1].startswith("q4 OK"), across
    assert [ln for ln in across if "[CLOSED]" in ln], \
        "no [CLOSED] when switching from home to public: %r" % across
    back = c.cmd("q5", "SELECT INBOX")
    assert [ln for ln in back if "[CLOSED]" in ln], \
        "no [CLOSED] when switching from public to home: %r" % back
    c.cmd("z", "LOGOUT")
    c.close()


# --- COPY, MOVE, RENAME ---------------------------------------------------

def test_copy_and_move_within_public_server(pfe, public):
    src = make_public_folder(public, "CopySrc", ["cp 1", "cp 2", "cp 3"])
    dst = make_public_folder(public, "CopyDst", [])
    m = login(pfe)
    m.select(q(src))
    typ, data = m.copy("1", q(dst))
    assert typ == "OK" and b"COPYUID" in data[0], data
    typ, data = m._simple_command("MOVE", "2", q(dst))
    assert typ == "OK", data
    assert m.untagged_responses.get("EXPUNGE") == [b"2"], \
        m.untagged_responses
    assert subjects(m) == ["cp 1", "cp 3"]
    assert re.search(rb"MESSAGES 2\)", m.status(q(dst), "(MESSAGES)")[1][0])
    m.logout()
    p = public.imap("bob")
    p.select(q(dst), readonly=True)
    assert subjects(p) == ["cp 1", "cp 2"]
    p.logout()


def _meta(m, spec):
    typ, data = m.fetch(spec, "(FLAGS INTERNALDATE BODY.PEEK[])")
    assert typ == "OK", data
    out = []
    for d in data:
        if isinstance(d, tuple):
            flags = set(re.search(rb"FLAGS \(([^)]*)\)", d[0]).group(1)
                        .split()) - {b"\\Recent"}
            date = re.search(rb'INTERNALDATE "([^"]*)"', d[0]).group(1)
            out.append((flags, date, d[1]))
    return out


def _server_meta(d, mailbox, user="alice"):
    """Flags, arrival date and message of every message in mailbox, read
    from server d directly, not through imapfe."""
    m = d.imap(user)
    typ, data = m.select(q(mailbox), readonly=True)
    assert typ == "OK", data
    out = _meta(m, "1:*") if int(data[0]) else []
    m.logout()
    return out


def test_copy_and_move_across_servers(pfe, home, public):
    """COPY and MOVE between the public server and the home server, both
    ways: each message arrives whole, with its flags and arrival date, on
    the destination server; MOVE removes the original from the source
    server and the client sees it expunged; COPY leaves the source as it
    was."""
    src = make_public_folder(public, "AcrossSrc", ["ax 1", "ax 2", "ax 3"])
    dst = make_public_folder(public, "AcrossDst", [])
    p = public.imap("bob")
    p.select(q(src))
    p.store("1", "+FLAGS", "(\\Flagged $Important)")
    p.logout()
    m = login(pfe)
    assert m.create("Across")[0] == "OK"
    m.select(q(src))
    before = _meta(m, "1:3")
    assert before == _server_meta(public, src)

    # public to home
    typ, data = m.copy("1", "Across")
    assert typ == "OK", data
    typ, data = m._simple_command("MOVE", "2", "Across")
    assert typ == "OK", data
    assert m.untagged_responses.get("EXPUNGE") == [b"2"], \
        m.untagged_responses
    assert _meta(m, "1:*") == [before[0], before[2]]
    assert _server_meta(public, src) == [before[0], before[2]]
    assert _server_meta(home, "Across") == before[:2]

    # home to public
    m.select("Across")
    assert _meta(m, "1:*") == before[:2]
    typ, data = m.copy("1", q(dst))
    assert typ == "OK", data
    typ, data = m._simple_command("MOVE", "2", q(dst))
    assert typ == "OK", data
    assert m.untagged_responses.get("EXPUNGE") == [b"2"], \
        m.untagged_responses
    assert _meta(m, "1:*") == before[:1]
    assert _server_meta(home, "Across") == before[:1]
    assert _server_meta(public, dst) == before[:2]
    m.select(q(dst))
    assert _meta(m, "1:*") == before[:2]

    m.select("INBOX")
    assert m.delete("Across")[0] == "OK"
    m.logout()
    h = home.imap("alice")
    assert "Across" not in list_names(h.list('""', "*")[1])
    h.logout()


def test_cross_server_copy_with_long_uid_set_copies_what_was_named(pfe,
                                                                   home,
                                                                   public):
    """A UID set longer than 4 KiB: the messages named and no others.
    UID 30 does not exist, so only UID 2 is to be copied."""
    src = make_public_folder(public, "LongSet", ["ls 1", "ls 2", "ls 3"])
    before = _server_meta(public, src)
    m = login(pfe)
    assert m.create("LongSetDst")[0] == "OK"
    m.select(q(src))
    uidset = "2," * 2047 + "30"             # 4096 characters
    typ, data = m.uid("COPY", uidset, "LongSetDst")
    copied = _server_meta(home, "LongSetDst")
    m.select("INBOX")
    m.delete("LongSetDst")
    m.logout()
    assert typ == "OK", data
    assert copied == before[1:2], \
        "UID COPY %s... copied %r" % (uidset[:12], copied)
    assert _server_meta(public, src) == before


def test_cross_server_move_of_200_messages(pfe, home, public):
    """MOVE 1:200 from a public folder to a home folder: all 200 arrive
    whole, none stays behind, nothing is duplicated (the UID lists imapfe
    builds for this run to some 700 characters)."""
    src = make_public_folder(public, "Bulk", [])
    sent = [message("bulk %d" % i) for i in range(1, 201)]
    p = public.imap("bob")
    for msg in sent:
        p.append(q(src), None, None, msg)
    p.logout()
    m = login(pfe)
    assert m.create("BulkHome")[0] == "OK"
    assert m.select(q(src)) == ("OK", [b"200"])
    typ, data = m._simple_command("MOVE", "1:200", "BulkHome")
    expunged = len(m.untagged_responses.get("EXPUNGE", []))
    left = _server_meta(public, src)
    arrived = [body for _, _, body in _server_meta(home, "BulkHome")]
    m.select("INBOX")
    m.delete("BulkHome")
    m.logout()
    assert typ == "OK", data
    assert (len(left), len(arrived), expunged) == (0, 200, 200), \
        "MOVE 1:200: %d left in the source, %d arrived, %d EXPUNGE" % (
            len(left), len(arrived), expunged)
    assert sorted(arrived) == sorted(sent)


def test_rename_across_servers_is_cannot(pfe, home, public):
    m = login(pfe)
    typ, data = m.rename(q(NEWS), "NewsAtHome")
    assert typ == "NO" and data[0].startswith(b"[CANNOT]"), data
    typ, data = m.rename("Drafts", q(PREFIX + "Drafts"))
    assert typ == "NO" and data[0].startswith(b"[CANNOT]"), data
    typ, data = m.rename("INBOX", q(PREFIX + "Mine"))
    assert typ == "NO" and data[0].startswith(b"[CANNOT]"), data
    # Within one server RENAME goes through.
    make_public_folder(public, "RenA", ["ren 1"])
    typ, data = m.rename(q(PREFIX + "RenA"), q(PREFIX + "RenB"))
    assert typ == "OK", data
    names = list_names(m.list('""', "*")[1])
    assert NEWS in names and "Drafts" in names and PREFIX + "RenB" in names
    assert "NewsAtHome" not in names and PREFIX + "Drafts" not in names
    assert PREFIX + "RenA" not in names
    m.logout()


def test_metadata_commands_go_to_the_server_of_their_mailbox(pfe, home,
                                                             public):
    # GETMETADATA (its options first) and SETMETADATA name a mailbox: they
    # go to the server that owns it, whatever is selected; "" (the
    # server's own entries) to the home server.
    c = raw_login(pfe)
    assert tagged(c.cmd("S", "SELECT INBOX"), "S")[0].startswith("S OK")
    for tag, text in (("M1", 'GETMETADATA (MAXSIZE 100) %s /private/comment'
                       % q(NEWS)),
                      ("M2", 'SETMETADATA %s (/private/comment "x")'
                       % q(EVENTS)),
                      ("M3", 'GETMETADATA "" /private/comment')):
        assert len(tagged(c.cmd(tag, text), tag)) == 1
    c.cmd("Z", "LOGOUT")
    pub = "\n".join(rawlog(public, "M1 GETMETADATA"))
    assert "M2 SETMETADATA" in pub and "M3 " not in pub, pub
    own = "\n".join(rawlog(home, "M3 GETMETADATA"))
    assert "M1 " not in own and "M2 " not in own, own


def test_replace_into_another_server_is_cannot_and_nothing_moves(pfe, home,
                                                                 public):
    # RFC 8508 REPLACE appends and expunges on one server: with INBOX
    # selected, a public destination is refused before either server
    # sees the command, its literal read and dropped, and the session
    # goes on.
    c = raw_login(pfe)
    before = [ln for ln in c.cmd("S", "SELECT INBOX") if ln.endswith(
        " EXISTS")]
    msg = message("replaced")
    c.send(b"R REPLACE 1 %s {%d+}\r\n" % (q(NEWS).encode(), len(msg)) +
           msg + b"\r\n")
    answer = c.until_tagged("R")[-1]
    assert answer.startswith("R NO [CANNOT]"), answer
    after = [ln for ln in c.cmd("S2", "SELECT INBOX") if ln.endswith(
        " EXISTS")]
    assert after == before, (before, after)
    c.cmd("Z", "LOGOUT")
    assert "R REPLACE" not in "\n".join(rawlog(home, "S2 SELECT"))
    m = public.imap("alice")
    assert m.select(q(NEWS))[0] == "OK"
    assert b"replaced" not in b"".join(
        d[1] for d in m.fetch("1:*", "(BODY.PEEK[HEADER])")[1]
        if isinstance(d, tuple))
    m.logout()
    assert "event=refused" in pfe.log_text()


# --- public server unavailable --------------------------------------------

def test_public_server_down_before_first_use(imapfe_factory, home,
                                             own_public):
    pub = own_public()
    pub.stop()
    f = imapfe_factory(public_config(home, pub.port))
    f.start_inetd()
    m = login(f)
    typ, data = m.list('""', "*")
    assert typ == "OK", data
    assert sorted(list_names(data)) == ["Drafts", "INBOX"], data
    nos = m.untagged_responses.pop("NO", [])
    assert [n for n in nos if n.startswith(b"[UNAVAILABLE]")], (
        nos, m.untagged_responses)
    typ, data = m.select(q(NEWS))
    assert typ == "NO" and data[0].startswith(b"[UNAVAILABLE]"), data
    typ, data = m.status(q(NEWS), "(MESSAGES)")
    assert typ == "NO" and data[0].startswith(b"[UNAVAILABLE]"), data
    assert m.select("INBOX") == ("OK", [b"3"])
    assert subjects(m) == ["test 1", "test 2", "test 3"]
    m.logout()
    # A pattern only the public server can answer: a tagged NO.
    c = raw_login(f)
    lines = c.cmd("p", 'LIST %s "*"' % q(PREFIX))
    assert lines[-1].startswith("p NO [UNAVAILABLE]"), lines
    assert c.cmd("i", "STATUS INBOX (MESSAGES)")[-2] == \
        "* STATUS INBOX (MESSAGES 3)"
    c.cmd("z", "LOGOUT")
    c.close()
    assert count(f, "event=public-failed") >= 1
    assert "event=public-login" not in f.log_text()


def test_failed_public_select_leaves_no_mailbox_selected(imapfe_factory,
                                                         home, own_public):
    """RFC 3501 6.3.1: a SELECT that fails leaves no mailbox selected, so
    a FETCH after it is a BAD, not the previously selected INBOX's data."""
    pub = own_public()
    pub.stop()
    f = imapfe_factory(public_config(home, pub.port))
    f.start_inetd()
    c = raw_login(f)
    assert c.cmd("a", "SELECT INBOX")[-1].startswith("a OK")
    assert c.cmd("b", "SELECT %s" % q(NEWS))[-1].startswith(
        "b NO [UNAVAILABLE]")
    got = c.cmd("c", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert got[-1].startswith("c BAD"), \
        "FETCH after a failed SELECT still reads INBOX: %r" % got
    c.cmd("z", "LOGOUT")
    c.close()


def test_holddown_after_failed_public_login(imapfe_factory, home,
                                            own_public):
    holddown = 2 * SLOW
    pub = own_public()
    pub.stop()
    f = imapfe_factory(public_config(home, pub.port,
                                     "public_holddown %d\n" % holddown))
    f.start_inetd()
    c = raw_login(f)
    t0 = time.monotonic()
    lines = c.cmd("a", "SELECT %s" % q(NEWS))
    assert lines[-1].startswith("a NO [UNAVAILABLE]"), lines
    assert count(f, "event=public-failed") == 1
    assert "retry_in=%d" % holddown in f.log_text()
    # Within the hold-down: no new attempt, whatever the client asks.
    lines = c.cmd("b", 'LIST "" *')
    assert [ln for ln in lines if ln.startswith("* NO [UNAVAILABLE]")], lines
    assert lines[-1].startswith("b OK"), lines
    for t in ("c", "d"):
        lines = c.cmd(t, "SELECT %s" % q(NEWS))
        assert lines[-1].startswith(t + " NO [UNAVAILABLE]"), lines
    lines = c.cmd("e", "STATUS %s (MESSAGES)" % q(EVENTS))
    assert lines[-1].startswith("e NO [UNAVAILABLE]"), lines
    assert c.cmd("f", "SELECT INBOX")[-1].startswith("f OK")
    in_window = time.monotonic() - t0
    assert in_window < holddown, \
        "too slow to test the hold-down (%.1fs)" % in_window
    assert count(f, "event=public-failed") == 1, f.log_text()
    # The server comes back; once the hold-down has passed, SELECT works.
    pub.start()
    n = 0
    while True:
        n += 1
        lines = c.cmd("g%d" % n, "SELECT %s" % q(NEWS))
        done = time.monotonic()
        if lines[-1].startswith("g%d OK" % n):
            break
        assert lines[-1].startswith("g%d NO [UNAVAILABLE]" % n), lines
        assert done - t0 < holddown + 10 * SLOW, "SELECT never worked"
        time.sleep(0.05)
    assert done - t0 >= holddown, \
        "public server retried after %.2fs of a %ds hold-down" % (
            done - t0, holddown)
    assert "* 3 EXISTS" in lines, lines
    assert count(f, "event=public-failed") == 1, f.log_text()
    assert count(f, "event=public-login") == 1
    got = c.cmd("h", "FETCH 3 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert "Subject: news 3" in got, got
    c.cmd("z", "LOGOUT")
    c.close()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_public_server_dies_mid_session(imapfe_factory, home, own_public,
                                        how):
    """The public server goes away while one of its folders is selected:
    the session lives on, the client never sees the public server's BYE,
    public commands get NO [UNAVAILABLE], and the folder works again once
    the server is back."""
    pub = own_public()
    f = imapfe_factory(public_config(home, pub.port, "public_holddown 0\n"))
    f.start_inetd()
    c = raw_login(f)
    assert c.cmd("a", "SELECT %s" % q(NEWS))[-1].startswith("a OK")
    if how == "sigterm":
        pub.stop()      # Dovecot says "* BYE Server shutting down." first
    else:
        os.killpg(pub.proc.pid, signal.SIGKILL)     # the whole group
        pub.proc.wait()
        pub.proc = None
    f.wait_log("event=public-error")
    problems = []
    seen = c.cmd("b", "NOOP")
    if [ln for ln in seen if ln.startswith("* BYE")]:
        problems.append("the public server's BYE reached the client: %r"
                        % seen)
    got = c.cmd("c", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    if not got[-1].startswith("c NO [UNAVAILABLE]"):
        problems.append("FETCH in the lost public folder: %r" % got)
    got = c.cmd("d", "SELECT %s" % q(NEWS))
    if not got[-1].startswith("d NO [UNAVAILABLE]"):
        problems.append("SELECT with the server down: %r" % got)
    got = c.cmd("e", "SELECT INBOX")
    if not got[-1].startswith("e OK") or "* 3 EXISTS" not in got:
        problems.append("SELECT INBOX: %r" % got)
    got = c.cmd("g", 'LIST "" *')
    if not (got[-1].startswith("g OK") and '* LIST (\\HasNoChildren) "/" '
            'INBOX' in got and [ln for ln in got
                                if ln.startswith("* NO [UNAVAILABLE]")]):
        problems.append("LIST with the server down: %r" % got)
    pub.start()
    got = c.cmd("h", "SELECT %s" % q(NEWS))
    if not got[-1].startswith("h OK") or "* 3 EXISTS" not in got:
        problems.append("SELECT after the server came back: %r" % got)
    c.cmd("z", "LOGOUT")
    assert c.closed()
    assert not problems, "\n".join(problems)
    assert count(f, "event=public-login") == 2


# --- refused public logins ------------------------------------------------

def test_public_server_refusing_the_password(imapfe_factory, home,
                                             own_public):
    """alice's password on the public server is another one: each try is a
    public-failed line, the home session is untouched.  (Two tries only:
    Dovecot delays each mismatch by half a second and more.)"""
    pub = own_public(passwd="alice:{PLAIN}not-her-secret::::::\n")
    f = imapfe_factory(public_config(home, pub.port, "public_holddown 0\n"))
    f.start_inetd()
    c = raw_login(f)
    assert c.cmd("a", "SELECT INBOX")[-1].startswith("a OK")
    for t in ("b", "c"):
        lines = c.cmd(t, "SELECT %s" % q(NEWS))
        assert lines[-1].startswith(t + " NO [UNAVAILABLE]"), lines
    assert count(f, "event=public-failed") == 2
    assert "AUTHENTICATIONFAILED" in f.log_text()
    assert c.cmd("d", "SELECT INBOX")[-1].startswith("d OK")
    got = c.cmd("e", "FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert "Subject: test 2" in got, got
    c.cmd("z", "LOGOUT")
    c.close()
    assert "not-her-secret" not in f.log_text()


def test_public_login_refused_many_times_no_growth(imapfe_factory, home,
                                                   own_public):
    """The public server refuses alice's login again and again in one
    session (public_holddown 0): every attempt fails cleanly, INBOX keeps
    working, and the process does not grow.

    The refusal is Dovecot's nologin with nodelay: a plain password
    mismatch is answered only after at least half a second (Dovecot's
    failure queue), which would make 1,000 tries take over eight minutes.
    imapfe sees the same thing either way: a NO to its AUTHENTICATE.
    Under valgrind, 100 tries: there the RSS is valgrind's own and is not
    checked, and what valgrind adds, its error and leak checks, sees every
    path of an attempt as well after 100 as after 1,000 (each tried
    attempt is run under memcheck, at many times the cost).  Under ASan
    the RSS is not checked either (its allocator keeps freed memory in
    quarantine); its leak check runs at exit."""
    tries = 100 if VALGRIND else 1000
    pub = own_public(passwd="alice:{PLAIN}secret::::::nologin=y nodelay=y "
                     "reason=Refused-by-public-server\n")
    f = imapfe_factory(public_config(home, pub.port, "public_holddown 0\n"))
    f.start_inetd()
    c = raw_login(f)
    pid = imapfe_pid(f)
    assert c.cmd("s", "SELECT INBOX")[-1].startswith("s OK")
    rss = {}
    fds = {}
    for i in range(1, tries + 1):
        lines = c.cmd("t%d" % i, "SELECT %s" % q(NEWS))
        assert lines == ['t%d NO [UNAVAILABLE] The server for "%s" is '
                         'unavailable, try again later.' % (i, PREFIX)], \
            lines
        if i % 100 == 0:
            got = c.cmd("u%d" % i, "STATUS INBOX (MESSAGES)")
            assert got == ["* STATUS INBOX (MESSAGES 3)",
                           got[-1]] and got[-1].startswith("u%d OK" % i), got
        if i in (10, tries):
            rss[i] = proc_status(pid, "VmRSS")
            fds[i] = len(os.listdir("/proc/%d/fd" % pid))
    assert count(f, "event=public-failed") == tries
    assert count(f, "Refused-by-public-server") == tries
    assert "event=public-login" not in f.log_text()
    assert fds[tries] == fds[10], "descriptors: %r" % fds
    assert c.cmd("v", "SELECT INBOX")[-1].startswith("v OK")
    got = c.cmd("w", "FETCH 3 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert "Subject: test 3" in got, got
    c.cmd("z", "LOGOUT")
    c.close()
    if VALGRIND or SANITIZED:
        return
    growth = rss[tries] - rss[10]
    assert growth <= 64, "VmRSS %d KiB after 10 failures, %d KiB after " \
        "%d: %d KiB more" % (rss[10], rss[tries], tries, growth)


# --- plain sessions with a public line configured -------------------------

def test_plain_session_with_public_configured(pfe, home):
    """The core scenarios, never touching a public folder: LOGIN, SELECT,
    FETCH, a 10 MiB APPEND and FETCH, IDLE, LOGOUT; the public server is
    never even logged in to."""
    m = login(pfe, "bob", "hunter2")
    assert m.create("Big")[0] == "OK"
    msg = big_message(10 * 1024 * 1024, 13)
    typ, data = m.append("Big", None, None, msg)
    assert typ == "OK", data
    assert m.select("Big") == ("OK", [b"1"])
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == msg
    m.close()
    assert m.delete("Big")[0] == "OK"
    m.logout()
    c = raw_login(pfe, "bob", "hunter2")
    sel = c.cmd("b", "SELECT INBOX")
    exists = int([re.match(r"\* (\d+) EXISTS", ln).group(1) for ln in sel
                  if re.match(r"\* \d+ EXISTS", ln)][0])
    c.send("i IDLE\r\n")
    assert c.line().startswith("+ ")
    other = home.imap("bob")
    other.append("INBOX", None, None, sample_message(70))
    other.logout()
    ln = c.line()
    assert ln == "* %d EXISTS" % (exists + 1), ln
    c.send("DONE\r\n")
    assert c.until_tagged("i")[-1].startswith("i OK")
    got = c.cmd("f", "FETCH %d (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"
                % (exists + 1))
    assert "Subject: test 70" in got, got
    lines = c.cmd("z", "LOGOUT")
    assert lines[0].startswith("* BYE") and lines[-1].startswith("z OK")
    assert c.closed()
    log = pfe.wait_log("reason=logout")
    assert "event=public-login" not in log
    assert "event=public-failed" not in log
    assert re.search(r"bytes_in=(\d{8})", log), log


# --- a home server that speaks differently --------------------------------
# What no test Dovecot sends: names as literals, a home NAMESPACE naming the
# public prefix with extensions or another delimiter.  The home server is
# scripted (it answers LIST, LSUB and NAMESPACE from a table); the public
# server is the real one.

def scripted_home(answers):
    """A home back-end: after login, each command whose name is in answers
    gets those bytes (untagged responses) and a tagged OK."""
    def answer(cn, tag, cmd, rest):
        if cmd == "LOGOUT":
            return False
        cn.send(answers.get(cmd, b"") + b"%s OK %s done\r\n"
                % (tag.encode(), cmd.encode()))
        return True
    return FakeBackend(lambda conn: plain_server(
        conn, after_login=command_loop(answer)))


@pytest.fixture
def odd_home():
    made = []

    def make(answers):
        fake = scripted_home(answers)
        made.append(fake)
        return fake
    yield make
    for fake in made:
        fake.close()


def routed_to(imapfe_factory, home_port, pub_port):
    f = imapfe_factory(base_config(home_port, 'public "%s" 127.0.0.1:%d\n'
                                   % (PREFIX, pub_port)))
    f.start_inetd()
    return f


def test_home_names_sent_as_literals_are_filtered_too(imapfe_factory,
                                                      odd_home, public):
    home = odd_home({"LIST": (
        b'* LIST (\\HasNoChildren) "/" INBOX\r\n'
        b'* LIST (\\HasNoChildren) "/" {6}\r\nDrafts\r\n'
        b'* LIST (\\Noselect \\HasChildren) "/" {14}\r\nPublic Folders\r\n'
        b'* LIST (\\HasNoChildren) "/" {19}\r\nPublic Folders/News\r\n'
        b'* LIST (\\HasNoChildren) "/" "Public Folders/Stale"\r\n'
        b'* LIST () "/" "public folders/lower case"\r\n'
        b'* STATUS {19}\r\nPublic Folders/News (MESSAGES 9)\r\n'
        b'* STATUS "Public Folders/Stale" (MESSAGES 8)\r\n'
        b'* STATUS {6}\r\nDrafts (MESSAGES 1)\r\n')})
    f = routed_to(imapfe_factory, home.port, public.port)
    c = raw_login(f)
    lines = c.cmd("a", 'LIST "" "*" RETURN (STATUS (MESSAGES))')
    assert lines[-1].startswith("a OK LIST"), lines     # the home's answer
    text = "\n".join(lines)
    # The home's names outside the prefix, literals kept as literals ...
    assert '* LIST (\\HasNoChildren) "/" {6}\nDrafts' in text, lines
    assert '* STATUS {6}\nDrafts (MESSAGES 1)' in text, lines
    assert '"public folders/lower case"' in text, lines
    # ... its names under the prefix gone, literal or quoted ...
    assert "Stale" not in text and "(MESSAGES 9)" not in text, lines
    # ... and the public server's own, each once, the root too.
    for name in (NEWS, EVENTS, "Public Folders"):
        listed = [ln for ln in lines if ln.startswith("* LIST ") and
                  ln.endswith(' "/" "%s"' % name)]
        assert len(listed) == 1, (name, lines)
    # the root as the public server lists it (RFC 5258: \NonExistent)
    assert '* LIST (\\NonExistent) "/" "Public Folders"' in lines, lines
    assert lines.count('* STATUS "%s" (MESSAGES 3)' % NEWS) == 1, lines
    assert c.cmd("z", "LOGOUT")[-1].startswith("z OK")


@pytest.mark.parametrize("home_ns, want", [
    # the prefix named with another delimiter: shown once, the public's
    (b'(("" "/")) NIL (("Public Folders." ".")("Other Users/" "/"))',
     '(("" "/")) NIL (("Public Folders/" "/")("Other Users/" "/"))'),
    # with extension data of the home's: the public server's entry instead
    (b'(("" "/")) (("~" "/")) (("Public Folders/" "/" "X-PARAM" ("a" "b")))',
     '(("" "/")) (("~" "/")) (("Public Folders/" "/"))'),
    # not named: added after the home's own, whose quoting survives
    (b'(("" "/")) NIL (("Sh\\"ared/" "/"))',
     '(("" "/")) NIL (("Sh\\"ared/" "/")("Public Folders/" "/"))'),
    # no shared namespace at all
    (b'(("INBOX." ".")) NIL NIL',
     '(("INBOX." ".")) NIL (("Public Folders/" "/"))'),
])
def test_namespace_shows_each_public_prefix_once(imapfe_factory, odd_home,
                                                 public, home_ns, want):
    home = odd_home({"NAMESPACE": b"* NAMESPACE " + home_ns + b"\r\n"})
    f = routed_to(imapfe_factory, home.port, public.port)
    c = raw_login(f)
    lines = c.cmd("n", "NAMESPACE")
    assert lines == ["* NAMESPACE " + want, "n OK NAMESPACE done"], lines
    assert c.cmd("z", "LOGOUT")[-1].startswith("z OK")
