"""Routing is transparent: the Exchange-like topology, where the home
server has its own "Public Folders/" namespace and a public-folder server
serves the same prefix, both over ONE shared public mail store (one
maildir, an index of its own per server).

A session relayed to the home server (imapfe without public lines) and a
routed one (with `public "Public Folders/" pf`) must see the same mailboxes,
each listed once, and the same messages byte for byte -- with imaplib,
mbsync (isync) and mutt.

Every Dovecot, imapfe, mbsync and tmux process a test starts is ended by
PID; waits are bounded and scaled by SLOW.
"""
import imaplib
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from conftest import OPEN_CLIENTS as _clients
from conftest import (MAILUID, SLOW, Dovecot, Raw, base_config, wait_for)
from fakebackend import FakeBackend, command_loop, plain_server

PREFIX = "Public Folders/"
ROOT = "Public Folders"

# The public store's folders and their messages' subjects.
PUBLIC = {
    "Announcements": ["announce 1", "announce 2", "announce 3"],
    "News": ["news 1", "news 2"],
    "News/Archive": ["archived news"],
    'Team "Blue"': ["blue team"],
    "Empty": [],
}
# alice's own folders on her home server.
HOME = {
    "INBOX": ["home inbox 1", "home inbox 2", "home inbox 3"],
    "Drafts": ["draft 1"],
    "Projects/2026": ["plan"],
}
# The public server's own INBOX and folder for alice: never to be seen.
PF_PRIVATE = {"INBOX": ["pf private inbox"], "PFOnly": ["pf only"]}
SUBSCRIBED = ["Drafts", PREFIX + "News", PREFIX + "Announcements"]

NS_INBOX = """\
namespace inbox {
  inbox = yes
  separator = /
}
"""


def owned_dir(parent, name):
    path = os.path.join(parent, name)
    os.mkdir(path)
    os.chown(path, MAILUID, MAILUID)
    return path


def shared_public_conf(store):
    """A Dovecot configuration function: its own INBOX namespace and the
    public namespace over the shared store, indexed in its own directory;
    subscriptions to public folders are kept in the store, shared too."""
    def conf(d):
        return NS_INBOX + """\
namespace public {
  type = public
  separator = /
  prefix = "%s"
  location = maildir:%s:INDEX=%s
  subscriptions = yes
  list = yes
}
""" % (PREFIX, store, owned_dir(d, "public-index"))
    return conf


def message(subject):
    return ("From: sender@example.org\r\nTo: alice@example.org\r\n"
            "Subject: %s\r\nMessage-ID: <%s@example.org>\r\n\r\n"
            "Body of %s.\r\n" % (subject, re.sub(r"\W", "-", subject),
                                 subject)).encode()


def q(name):
    return '"%s"' % name.replace("\\", "\\\\").replace('"', '\\"')


def fill(server, folders):
    m = server.imap("alice")
    for name, subjects in folders.items():
        if name != "INBOX":
            assert m.create(q(name))[0] == "OK", name
        for s in subjects:
            assert m.append(q(name), None, None, message(s))[0] == "OK"
    m.logout()


class Topology:
    def __init__(self):
        self.store = tempfile.mkdtemp(prefix="imapfe-pubstore-")
        os.chmod(self.store, 0o755)
        os.chown(self.store, MAILUID, MAILUID)
        self.servers = []
        try:
            self.home = Dovecot(extra_conf=shared_public_conf(self.store))
            self.servers.append(self.home)
            self.pf = Dovecot(extra_conf=shared_public_conf(self.store))
            self.servers.append(self.pf)
            fill(self.home, HOME)
            fill(self.pf, PF_PRIVATE)
            # The public store, written through the public server ...
            fill(self.pf, {PREFIX + k: v for k, v in PUBLIC.items()})
            # ... and subscriptions, partly through the home server.
            h, p = self.home.imap("alice"), self.pf.imap("alice")
            assert h.subscribe("Drafts")[0] == "OK"
            assert h.subscribe(q(PREFIX + "News"))[0] == "OK"
            assert p.subscribe(q(PREFIX + "Announcements"))[0] == "OK"
            h.logout()
            p.logout()
        except BaseException:
            self.close()
            raise

    def close(self):
        for s in self.servers:
            s.close()
        shutil.rmtree(self.store, ignore_errors=True)


@pytest.fixture(scope="module")
def topo():
    t = Topology()
    yield t
    t.close()


@pytest.fixture
def relayed(imapfe_factory, topo):
    f = imapfe_factory(base_config(topo.home.port), name="relayed")
    f.start_inetd()
    return f


@pytest.fixture
def routed(imapfe_factory, topo):
    f = imapfe_factory(base_config(topo.home.port, 'public "%s" '
                                   '127.0.0.1:%d\n' % (PREFIX, topo.pf.port)),
                       name="routed")
    f.start_inetd()
    return f




def raw_login(fe):
    c = Raw(fe.port, timeout=20)
    _clients.append(c)
    lines = c.cmd("L", "LOGIN alice secret")
    assert lines[-1].startswith("L OK"), lines
    return c


def login(fe):
    m = imaplib.IMAP4("127.0.0.1", fe.port, timeout=20 * SLOW)
    _clients.append(m)
    assert m.login("alice", "secret")[0] == "OK"
    return m


LIST_RE = re.compile(r'\* (LIST|LSUB) \(([^)]*)\) (?:"(?:\\.|[^"])"|NIL) '
                     r'("(?:\\.|[^"])*"|[^ ]+)')
STATUS_RE = re.compile(r'\* STATUS ("(?:\\.|[^"])*"|[^ ]+) ')


def unquote(s):
    if s.startswith('"'):
        return re.sub(r'\\(.)', r'\1', s[1:-1])
    return s


def untagged(lines):
    """The untagged answers of one command, the tagged line checked OK."""
    assert re.match(r"\S+ OK", lines[-1]), lines
    return lines[:-1]


def names_of(lines, kind=("LIST", "LSUB")):
    out = []
    for ln in lines:
        m = LIST_RE.match(ln)
        if m and m.group(1) in kind:
            out.append(unquote(m.group(3)))
    return out


def statuses_of(lines):
    return [unquote(m.group(1)) for m in map(STATUS_RE.match, lines) if m]


def unmarked(lines):
    """LIST lines without \\Marked and \\Unmarked: Dovecot's hint that a
    maildir has new mail changes as its new/ is read, by any session."""
    return [re.sub(r"\\(?:Un)?[Mm]arked ?", "", ln).replace(" )", ")")
            for ln in lines]


# The commands whose answers must agree, relayed and routed.
LIST_COMMANDS = [
    'LIST "" "*"',
    'LIST "" "%"',
    'LIST "" "Public Folders/%"',
    'LIST "Public Folders/" "%"',
    'LIST "" "Public Folders"',
    'LIST "" "Public Folders/*"',
    'LIST "" "Public*"',
    'LIST "" "inbox"',
    'LSUB "" "*"',
    'LSUB "" "%"',
    'LIST (SUBSCRIBED) "" "*"',
    'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"',
    'LIST "" ("INBOX" "Public Folders/*")',
    'LIST "" "*" RETURN (CHILDREN SUBSCRIBED)',
    'LIST "" "*" RETURN (STATUS (MESSAGES UIDNEXT UIDVALIDITY))',
    'LIST "" "%" RETURN (CHILDREN STATUS (MESSAGES))',
]


@pytest.mark.parametrize("command", LIST_COMMANDS)
def test_list_routed_equals_relayed_every_name_once(relayed, routed,
                                                    command):
    a, b = raw_login(relayed), raw_login(routed)
    want = unmarked(untagged(a.cmd("a", command)))
    got = unmarked(untagged(b.cmd("a", command)))
    names = names_of(got)
    assert len(names) == len(set(names)), (command, got)
    status = statuses_of(got)
    assert len(status) == len(set(status)), (command, got)
    # Same mailboxes, same flags, same counts: the home server's view of
    # the shared store and the public server's are one.
    assert sorted(got) == sorted(want), "%s\nrouted:\n%s\nrelayed:\n%s" % (
        command, "\n".join(sorted(got)), "\n".join(sorted(want)))
    assert names, (command, got)
    for private in ("PFOnly",):
        assert private not in names, (command, got)


def test_list_sees_the_whole_tree_once(routed):
    c = raw_login(routed)
    names = names_of(untagged(c.cmd("a", 'LIST "" "*"')))
    want = (list(HOME) + [PREFIX + k for k in PUBLIC] + ["Projects", ROOT])
    assert sorted(names) == sorted(want), names
    roots = [ln for ln in untagged(c.cmd("b", 'LIST "" "%"'))
             if ln.endswith(' "%s"' % ROOT)]
    assert len(roots) == 1 and "\\Noselect" in roots[0], roots
    status = statuses_of(untagged(c.cmd(
        "s", 'LIST "" "*" RETURN (STATUS (MESSAGES))')))
    assert sorted(status) == sorted(list(HOME) +
                                    [PREFIX + k for k in PUBLIC]), status


def test_lsub_lists_each_subscription_once(routed):
    c = raw_login(routed)
    names = names_of(untagged(c.cmd("a", 'LSUB "" "*"')))
    assert sorted(names) == sorted(SUBSCRIBED), names


def test_namespace_names_the_prefix_once(relayed, routed):
    a, b = raw_login(relayed), raw_login(routed)
    want = untagged(a.cmd("n", "NAMESPACE"))
    got = untagged(b.cmd("n", "NAMESPACE"))
    assert want == ['* NAMESPACE (("" "/")) NIL (("%s" "/"))' % PREFIX]
    assert got == want, got


def rootless_public(status):
    """A public server that lists its folders but never its root, and
    answers LIST with status ("OK" or "NO"); it has no subscriptions."""
    def answer(cn, tag, cmd, rest):
        if cmd == "LOGOUT":
            return False
        if cmd == "LIST" and status == "OK" and \
                "SUBSCRIBED" not in rest.upper():
            cn.send('* LIST () "/" INBOX\r\n'
                    '* LIST () "/" "Public Folders/News"\r\n')
        cn.send("%s %s %s\r\n" % (tag, status, cmd))
        return True
    return FakeBackend(lambda conn: plain_server(
        conn, after_login=command_loop(answer)))


@pytest.mark.parametrize("status", ["OK", "NO"])
def test_root_from_home_when_the_public_server_lists_none(imapfe_factory,
                                                         topo, status):
    """The root is the public server's to list; where it answers without
    one, the home server's root is shown, once; where it fails, nothing
    of the prefix is."""
    pub = rootless_public(status)
    try:
        f = imapfe_factory(base_config(topo.home.port, 'public "%s" '
                                       '127.0.0.1:%d\n' % (PREFIX, pub.port)))
        f.start_inetd()
        c = raw_login(f)
        lines = untagged(c.cmd("a", 'LIST "" "%"'))
        roots = [ln for ln in lines if ln.endswith(' "%s"' % ROOT)]
        assert roots == (['* LIST (\\Noselect \\HasChildren) "/" "%s"' % ROOT]
                         if status == "OK" else []), lines
        names = names_of(untagged(c.cmd("b", 'LIST "" "*"')))
        under = [n for n in names if n.startswith(PREFIX)]
        assert under == ([PREFIX + "News"] if status == "OK" else []), names
        assert names.count("INBOX") == 1, names
        # The home server lists the root for its subscriptions under the
        # prefix; they say nothing of the public server's: no root.
        for cmd in ('LSUB "" "%"', 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"'):
            lines = untagged(c.cmd("c", cmd))
            assert names_of(lines) == ["Drafts"], (cmd, lines)
        direct = topo.home.imap("alice")
        home_lsub = names_of(["* LSUB " + x.decode()
                              for x in direct.lsub('""', "%")[1]])
        assert ROOT in home_lsub, home_lsub
        direct.logout()
        c.cmd("z", "LOGOUT")
    finally:
        pub.close()


def mailbox_contents(m):
    """{mailbox: [(uid, flags, size, bytes)]} of every selectable mailbox."""
    typ, data = m.list('""', "*")
    assert typ == "OK"
    out = {}
    for item in data:
        mt = LIST_RE.match("* LIST " + item.decode())
        assert mt, item
        if "\\Noselect" in mt.group(2):
            continue
        name = unquote(mt.group(3))
        typ, d = m.select(q(name), readonly=True)
        assert typ == "OK", (name, d)
        msgs = []
        if int(d[0]) > 0:
            typ, d = m.fetch("1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[])")
            assert typ == "OK", d
            for part in d:
                if isinstance(part, tuple):
                    msgs.append((part[0], part[1]))
        out[name] = msgs
        m.close()
    return out


def test_messages_routed_equal_relayed_byte_for_byte(relayed, routed):
    a, b = login(relayed), login(routed)
    want, got = mailbox_contents(a), mailbox_contents(b)
    a.logout()
    b.logout()
    assert sorted(got) == sorted(want)
    assert got == want
    news = got[PREFIX + "News"]
    assert sum(b"Subject: news 1\r\n" in x[1] for x in news) == 1
    blob = b"".join(x[1] for v in got.values() for x in v)
    assert b"pf private inbox" not in blob and b"pf only" not in blob


# --- mbsync ---------------------------------------------------------------

MBSYNCRC = """\
IMAPAccount fe
Host 127.0.0.1
Port {port}
User alice
Pass secret
SSLType None
AuthMechs LOGIN
Timeout {timeout}

IMAPStore far
Account fe

MaildirStore near
Path {path}/
Inbox {path}/INBOX
SubFolders Verbatim

Channel all
Far :far:
Near :near:
Patterns *
Create Both
Remove None
Expunge None
Sync All
SyncState *
"""


# mbsync's own header, random per run, that it adds to find a message it
# stored again; everything else must be the same byte for byte.
TUID = re.compile(rb"^X-TUID: [^\n]*\n", re.M)


class Mbsync:
    def __init__(self, tmp, name, port):
        self.path = os.path.join(tmp, "mbsync-" + name)
        os.mkdir(self.path)
        self.rc = self.path + ".mbsyncrc"
        with open(self.rc, "w") as f:
            f.write(MBSYNCRC.format(port=port, path=self.path,
                                    timeout=30 * SLOW))

    def run(self):
        p = subprocess.Popen(["mbsync", "-c", self.rc, "-a"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = p.communicate(timeout=120 * SLOW)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, out.decode(errors="replace")
        return out.decode(errors="replace")

    def folders(self):
        """{folder: sorted message bytes} of the local maildirs."""
        out = {}
        for dirpath, dirnames, _ in os.walk(self.path):
            if "cur" in dirnames and "new" in dirnames:
                rel = os.path.relpath(dirpath, self.path)
                msgs = []
                for sub in ("cur", "new"):
                    d = os.path.join(dirpath, sub)
                    for fn in os.listdir(d):
                        with open(os.path.join(d, fn), "rb") as f:
                            msgs.append(TUID.sub(b"", f.read(), count=1))
                out[rel] = sorted(msgs)
        return out

    def deliver(self, folder, data, name):
        """A message delivered locally, with LF line ends as on disk."""
        path = os.path.join(self.path, folder, "new", name)
        with open(path, "wb") as f:
            f.write(data.replace(b"\r\n", b"\n"))


def test_mbsync_relayed_and_routed_sync_the_same(relayed, routed,
                                                 tmp_path):
    a = Mbsync(str(tmp_path), "relayed", relayed.port)
    b = Mbsync(str(tmp_path), "routed", routed.port)
    a.run()
    b.run()
    fa, fb = a.folders(), b.folders()
    assert sorted(fb) == sorted(fa)
    assert fb == fa
    want = {"INBOX", "Drafts", "Projects/2026"} | {
        PREFIX + k for k in PUBLIC}
    assert want <= set(fb), sorted(fb)
    assert len(fb[PREFIX + "Announcements"]) >= 3
    # Both ways: each run puts a message of its own into a public folder
    # and a home folder; each then fetches the other's.
    a.deliver(PREFIX + "News", message("from the relayed mbsync"),
              "1.relayed.host")
    b.deliver(PREFIX + "Announcements", message("from the routed mbsync"),
              "1.routed.host")
    b.deliver("Drafts", message("routed draft"), "2.routed.host")
    a.run()
    b.run()
    a.run()
    fa, fb = a.folders(), b.folders()
    assert fb == fa
    for folder, subject in ((PREFIX + "News", b"from the relayed mbsync"),
                            (PREFIX + "Announcements",
                             b"from the routed mbsync"),
                            ("Drafts", b"routed draft")):
        assert sum(subject in m for m in fb[folder]) == 1, folder


def test_mbsync_routed_alone_creates_nothing_twice(routed, tmp_path):
    """A routed mbsync run twice: nothing new on the second, exit 0, and
    no mailbox it cannot open (the user's report)."""
    b = Mbsync(str(tmp_path), "again", routed.port)
    b.run()
    first = b.folders()
    out = b.run()
    assert "cannot be opened" not in out, out
    assert b.folders() == first


# --- mutt -----------------------------------------------------------------

MUTTRC = """\
set folder="imap://alice@127.0.0.1:{port}/"
set spoolfile="+INBOX"
set imap_pass="secret"
set imap_authenticators="login"
set ssl_starttls=no
set ssl_force_tls=no
set header_cache=""
set message_cachedir=""
set record=""
set postponed=""
set mbox="+INBOX"
set move=no
set confirmappend=no
set sort=date-sent
set index_format="%4C %s"
set imap_list_subscribed=no
set timeout=1
"""


class Mutt:
    """mutt under a tmux server of its own (its socket in the test's
    directory); the screen is read with capture-pane."""

    def __init__(self, tmp, port, name):
        self.dir = os.path.join(tmp, "mutt-" + name)
        os.mkdir(self.dir)
        self.rc = os.path.join(self.dir, "muttrc")
        with open(self.rc, "w") as f:
            f.write(MUTTRC.format(port=port))
        self.port = port
        self.sock = os.path.join(self.dir, "tmux.sock")
        self.env = dict(os.environ, HOME=self.dir, TERM="xterm",
                        LANG="C.UTF-8")
        self.pid = None

    def tmux(self, *args):
        r = subprocess.run(["tmux", "-S", self.sock] + list(args),
                           env=self.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        assert r.returncode == 0, r.stdout
        return r.stdout.decode(errors="replace")

    def start(self, mailbox):
        url = "imap://alice@127.0.0.1:%d/%s" % (self.port,
                                                mailbox.replace(" ", "%20"))
        self.tmux("new-session", "-d", "-x", "150", "-y", "40",
                  "mutt", "-n", "-F", self.rc, "-f", url)
        self.pid = int(self.tmux("display-message", "-p",
                                 "#{pid}").strip())

    def screen(self):
        return self.tmux("capture-pane", "-p")

    def wait_screen(self, predicate, what):
        try:
            return wait_for(lambda: predicate(self.screen()) and
                            self.screen(), 30, what)
        except AssertionError:
            raise AssertionError("timed out waiting for %s; the screen:\n%s"
                                 % (what, self.screen()))

    def keys(self, *keys):
        self.tmux("send-keys", *keys)

    def stop(self):
        if self.pid is None:
            return
        subprocess.run(["tmux", "-S", self.sock, "kill-server"],
                       env=self.env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30)
        try:
            wait_for(lambda: not os.path.exists("/proc/%d" % self.pid), 10,
                     "tmux server to end")
        except AssertionError:
            os.kill(self.pid, 9)
        self.pid = None


@pytest.fixture
def mutts(tmp_path):
    made = []

    def make(port, name):
        m = Mutt(str(tmp_path), port, name)
        made.append(m)
        return m
    yield make
    for m in made:
        m.stop()


def mutt_view(mutt, mailbox):
    """What mutt shows: the index of a public folder, its folder browser
    at the top level, and the browser inside the prefix."""
    mutt.start(mailbox)
    index = mutt.wait_screen(lambda s: "news 2" in s,
                             "mutt's index of %s" % mailbox)
    mutt.keys("c")
    mutt.wait_screen(lambda s: "Open mailbox" in s, "mutt's prompt")
    mutt.keys("?")
    top = mutt.wait_screen(lambda s: "Directory [imap:" in s and
                           "INBOX" in s, "mutt's folder browser")
    # The prefix is the last entry ("*": last-entry); Enter opens it.
    mutt.keys("*")
    mutt.keys("Enter")
    inside = mutt.wait_screen(lambda s: "Directory [=%s]" % PREFIX in s and
                              "Announcements" in s,
                              "mutt's browser inside the prefix")
    return index, top, inside


def browser_entries(screen):
    """The mailbox names a mutt folder browser shows, in its order."""
    return re.findall(r"^\s*\d+\s+IMAP(?: \+)?\s+(\S.*?)\s*$", screen,
                      re.M)


def subjects_shown(screen):
    return re.findall(r"^\s*\d+\s+(\S.*?)\s*$", screen, re.M)


def test_mutt_shows_the_same_relayed_and_routed(relayed, routed, mutts):
    ia, ta, ba = mutt_view(mutts(relayed.port, "relayed"), PREFIX + "News")
    ib, tb, bb = mutt_view(mutts(routed.port, "routed"), PREFIX + "News")
    # The public folder's messages, as the home server shows them.
    shown = subjects_shown(ib)
    assert "news 1" in shown and "news 2" in shown, ib
    assert shown == subjects_shown(ia), (ia, ib)
    # The top level: each mailbox once, the prefix too.
    top = browser_entries(tb)
    assert top == ["Drafts", "INBOX", "Projects/", PREFIX], tb
    assert top == browser_entries(ta), (ta, tb)
    # Inside the prefix: the public folders, each once.
    inside = browser_entries(bb)
    assert inside == ["../", "Announcements", "Empty", "News/",
                      'Team "Blue"'], bb
    assert inside == browser_entries(ba), (ba, bb)
