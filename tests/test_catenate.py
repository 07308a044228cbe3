"""CATENATE (RFC 4469) and URLAUTH (RFC 4467) through a routed imapfe
(imapurl.c and its calls in router.c): a command runs where its IMAP URLs
point, and a URL naming a mailbox on another server than the one that
runs the command gets NO [BADURL url] from imapfe, with no server asked.

The same two real Dovecots as test_public.py: alice's home server (INBOX
"test 1".."test 3", Drafts) and the public-folder server ("Public
Folders/News" with "news 1".."news 3"), each keeping a rawlog of what
imapfe sent it.  Dovecot takes only relative URLs in CATENATE (it answers
an imap:// one with its own BADURL), so the URLs here are "/mailbox..."
and ";UID=n".
"""
import imaplib
import re

import pytest

from conftest import sample_message
from test_public import (NEWS, PREFIX, home_server, login,  # noqa: F401
                         make_public_folder, message, pfe, public_server, q,
                         raw_login, rawlog, tagged)

NEWS_URL = "/Public%20Folders/News"

# The name clients know imapfe by, and so the host of their URLAUTH URLs:
# the back-ends behind imapfe are told it (imap_urlauth_host); URLAUTH
# keys live in mailbox attributes.
URL_HOST = "imap.example.org"
URLAUTH_CONF = """\
imap_urlauth_host = %s
mail_attribute_dict = file:%%h/dovecot-attributes
""" % URL_HOST

for _name in ("GENURLAUTH", "URLFETCH", "RESETKEY"):
    imaplib.Commands.setdefault(_name, ("AUTH", "SELECTED"))


@pytest.fixture(scope="module")
def home():
    """alice's home server, as test_public's, with URLAUTH."""
    d = home_server(URLAUTH_CONF)
    yield d
    d.close()


@pytest.fixture(scope="module")
def public():
    """The public-folder server, as test_public's (News only), with
    URLAUTH."""
    d = public_server(extra=URLAUTH_CONF, folders=("News",))
    yield d
    d.close()


def fetch_uid(m, mailbox, uid):
    """The whole message with UID uid in mailbox, through client m."""
    assert m.select(q(mailbox))[0] == "OK"
    typ, data = m.uid("FETCH", str(uid), "(BODY.PEEK[])")
    assert typ == "OK", data
    parts = [d[1] for d in data if isinstance(d, tuple)]
    assert len(parts) == 1, data
    return parts[0]


def appended_uid(lines_or_data):
    """The UID in an [APPENDUID v uid] answer."""
    text = " ".join(x.decode() if isinstance(x, bytes) else str(x)
                    for x in lines_or_data)
    m = re.search(r"\[APPENDUID \d+ (\d+)\]", text)
    assert m, lines_or_data
    return int(m.group(1))


def count(m, mailbox):
    typ, data = m.status(q(mailbox), "(MESSAGES)")
    assert typ == "OK", data
    return int(re.search(rb"MESSAGES (\d+)", data[0]).group(1))


def catenate(m, mailbox, parts):
    """APPEND with CATENATE through imaplib (URL parts only: imaplib sends
    one literal at most, at the end of a command)."""
    return m._simple_command("APPEND", q(mailbox), "CATENATE",
                             "(%s)" % parts)


# --- capabilities ---------------------------------------------------------

def test_routed_capabilities_offer_catenate(pfe, home):
    direct = home.imap("alice")
    offered = direct.capability()[1][0].decode().split()
    direct.logout()
    assert "CATENATE" in offered and "URLAUTH" in offered, offered
    c = raw_login(pfe)
    lines = c.cmd("c", "CAPABILITY")
    caps = [ln for ln in lines if ln.startswith("* CAPABILITY ")]
    assert len(caps) == 1 and lines[-1].startswith("c OK"), lines
    caps = caps[0].split()
    for cap in ("CATENATE", "URL-PARTIAL", "URLAUTH", "URLAUTH=BINARY"):
        assert cap in caps, caps
    for cap in ("NOTIFY", "MULTISEARCH", "MAILBOX-REFERRALS"):
        assert cap not in caps, caps
    c.cmd("z", "LOGOUT")
    c.close()


# --- URLs on the server that appends --------------------------------------

def test_catenate_home_urls_into_home_mailbox(pfe):
    m = login(pfe)
    before = count(m, "Drafts")
    typ, data = catenate(m, "Drafts", 'URL "/INBOX/;UID=1" '
                         'URL "/INBOX;UIDVALIDITY=%d/;UID=2/;SECTION=TEXT"'
                         % uidvalidity(m, "INBOX"))
    assert typ == "OK", data
    uid = appended_uid(m.untagged_responses.get("APPENDUID", []) + data)
    assert count(m, "Drafts") == before + 1
    got = fetch_uid(m, "Drafts", uid)
    assert got == sample_message(1) + b"Message number 2.\r\n", got
    m.logout()


def uidvalidity(m, mailbox):
    typ, data = m.status(q(mailbox), "(UIDVALIDITY)")
    assert typ == "OK", data
    return int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))


def test_catenate_text_literal_and_url(pfe):
    """TEXT parts as literals around a URL, as a client composing a
    forward sends them (raw: imaplib cannot send several literals)."""
    c = raw_login(pfe)
    head = b"Subject: fwd\r\n\r\n"
    tail = b"\r\n-- \r\nend\r\n"
    c.send(b'a APPEND Drafts CATENATE (TEXT {%d+}\r\n%s URL "/INBOX/;UID=3"'
           b' TEXT {%d+}\r\n%s)\r\n' % (len(head), head, len(tail), tail))
    lines = c.until_tagged("a")
    assert lines[-1].startswith("a OK"), lines
    uid = appended_uid(lines)
    c.cmd("z", "LOGOUT")
    m = login(pfe)
    assert fetch_uid(m, "Drafts", uid) == head + sample_message(3) + tail
    m.logout()


def test_catenate_within_public_server(pfe):
    m = login(pfe)
    folder = PREFIX + "Forwards"
    assert m.create(q(folder))[0] == "OK"
    typ, data = catenate(m, folder, 'URL "%s/;UID=1"' % NEWS_URL)
    assert typ == "OK", data
    uid = appended_uid(m.untagged_responses.get("APPENDUID", []) + data)
    assert fetch_uid(m, folder, uid) == message("news 1")
    # relative to the selected mailbox, on the same server
    assert m.select(q(NEWS), readonly=True)[0] == "OK"
    typ, data = catenate(m, folder, 'URL ";UID=2"')
    assert typ == "OK", data
    uid = appended_uid(m.untagged_responses.get("APPENDUID", []) + data)
    assert fetch_uid(m, folder, uid) == message("news 2")
    m.logout()


# --- URLs elsewhere: NO [BADURL], nothing asked ---------------------------

def drafts(c, tag):
    """The number of messages in Drafts, asked over raw connection c."""
    lines = c.cmd(tag, "STATUS Drafts (MESSAGES)")
    assert lines[-1].startswith(tag + " OK"), lines
    return int(re.search(r"MESSAGES (\d+)", lines[0]).group(1))


def test_public_url_into_home_mailbox_is_badurl(pfe, home, public):
    c = raw_login(pfe)
    before = drafts(c, "badurl1")
    url = "%s/;UID=1" % NEWS_URL
    lines = c.cmd("a", 'APPEND Drafts CATENATE (URL "/INBOX/;UID=1" '
                  'URL "%s")' % url)
    assert lines == ["a NO [BADURL %s] The URL does not name a mailbox on "
                     "the server that runs this command." % url], lines
    # a relative URL whose base, the selected mailbox, is elsewhere
    assert c.cmd("badurl2", "EXAMINE %s" % q(NEWS))[-1].startswith(
        "badurl2 OK")
    lines = c.cmd("b", 'APPEND Drafts CATENATE (URL ";UID=1")')
    assert lines[-1].startswith("b NO [BADURL ;UID=1]"), lines
    # and one imapfe cannot place (relative to the selected mailbox's name)
    lines = c.cmd("d", 'APPEND Drafts CATENATE (URL "News/;UID=1")')
    assert lines[-1].startswith("d NO [BADURL News/;UID=1]"), lines
    assert drafts(c, "s") == before
    c.cmd("z", "LOGOUT")
    c.close()
    sent_home = rawlog(home, "badurl1 STATUS")
    assert not [ln for ln in sent_home if "CATENATE" in ln], sent_home
    sent_public = rawlog(public, "badurl2 EXAMINE")
    assert not [ln for ln in sent_public if "APPEND" in ln], sent_public


def test_streamed_literal_then_url_elsewhere(pfe):
    """A TEXT part too big to hold is on its way to the home server before
    the URL after it is read: the APPEND fails there, nothing is saved,
    the client gets NO [BADURL] and the session goes on."""
    c = raw_login(pfe)
    big = (b"x" * 998 + b"\r\n") * 100            # 100 KB: streamed
    url = "%s/;UID=2" % NEWS_URL
    before = drafts(c, "s")
    c.send(b'a APPEND Drafts CATENATE (TEXT {%d+}\r\n' % len(big) + big +
           b' URL "%s" TEXT {5+}\r\nhello)\r\n' % url.encode())
    lines = c.until_tagged("a")
    assert tagged(lines, "a") == [
        "a NO [BADURL %s] The URL does not name a mailbox on the server "
        "that runs this command." % url], lines
    assert drafts(c, "s") == before
    # a MULTIAPPEND whose second message names another server: neither
    c.send(b'm APPEND Drafts {%d+}\r\n' % len(big) + big +
           b' CATENATE (URL "%s")\r\n' % url.encode())
    lines = c.until_tagged("m")
    assert lines[-1].startswith("m NO [BADURL %s]" % url), lines
    assert drafts(c, "s") == before
    assert c.cmd("n", "NOOP")[-1].startswith("n OK")
    # the URL before the streamed literal: refused at once, the literal
    # and the rest of the command read and dropped
    c.send(b'e APPEND Drafts CATENATE (URL "%s" TEXT {%d+}\r\n'
           % (url.encode(), len(big)) + big + b')\r\n')
    lines = c.until_tagged("e")
    assert lines == ["e NO [BADURL %s] The URL does not name a mailbox on "
                     "the server that runs this command." % url], lines
    assert c.cmd("n2", "NOOP")[-1].startswith("n2 OK")
    assert drafts(c, "s") == before
    # the same streamed TEXT with a home URL: appended whole
    c.send(b'g APPEND Drafts CATENATE (TEXT {%d+}\r\n' % len(big) + big +
           b' URL "/INBOX/;UID=1")\r\n')
    lines = c.until_tagged("g")
    assert lines[-1].startswith("g OK"), lines
    uid = appended_uid(lines)
    c.cmd("z", "LOGOUT")
    m = login(pfe)
    assert fetch_uid(m, "Drafts", uid) == big + sample_message(1)
    m.logout()


def test_streamed_synchronizing_literal_then_url_elsewhere(pfe):
    """As above with a literal that waits for "+": the client sends the
    rest only when told to, and hears NO [BADURL] for it."""
    c = raw_login(pfe)
    big = b"y" * 70000 + b"\r\n"
    url = "%s/;UID=3" % NEWS_URL
    c.send(b"a APPEND Drafts CATENATE (TEXT {%d}\r\n" % len(big))
    assert c.line().startswith("+"), "no continuation"
    c.send(big + b' URL "%s")\r\n' % url.encode())
    lines = c.until_tagged("a")
    assert lines[-1].startswith("a NO [BADURL %s]" % url), lines
    assert c.cmd("n", "NOOP")[-1].startswith("n OK")
    c.cmd("z", "LOGOUT")
    c.close()


# --- URLFETCH and GENURLAUTH: run where the URLs point --------------------

URLAUTH_TOKEN = ";URLAUTH=anonymous:INTERNAL:" + "0" * 32


def test_urlfetch_across_servers_is_badurl(pfe, home, public):
    c = raw_login(pfe)
    home_url = "imap://alice@imap.example.org/INBOX/;UID=1" + URLAUTH_TOKEN
    pub_url = ("imap://alice@imap.example.org%s/;UID=1" % NEWS_URL +
               URLAUTH_TOKEN)
    lines = c.cmd("ufu", "URLFETCH %s %s" % (q(home_url), q(pub_url)))
    assert lines == ["ufu NO [BADURL %s] The URL does not name a mailbox on "
                     "the server that runs this command." % pub_url], lines
    lines = c.cmd("ufg", "GENURLAUTH %s INTERNAL %s INTERNAL" % (
        q(pub_url.split(":INTERNAL")[0]),
        q(home_url.split(":INTERNAL")[0])))
    assert lines[-1].startswith("ufg NO [BADURL imap://alice@imap.example"
                                ".org/INBOX/;UID=1;URLAUTH=anonymous]"), lines
    # one server's URLs go to that server (which answers as it can)
    lines = c.cmd("ufp", "URLFETCH %s" % q(pub_url))
    assert tagged(lines, "ufp") and "BADURL" not in lines[-1], lines
    lines = c.cmd("ufh", "URLFETCH %s" % q(home_url))
    assert tagged(lines, "ufh") and "BADURL" not in lines[-1], lines
    c.cmd("z", "LOGOUT")
    c.close()
    sent_public = rawlog(public, "ufp URLFETCH")
    assert not [ln for ln in sent_public
                if ln.startswith(("ufu ", "ufg ", "ufh "))], sent_public
    sent_home = rawlog(home, "ufh URLFETCH")
    assert not [ln for ln in sent_home
                if ln.startswith(("ufu ", "ufg ", "ufp "))], sent_home


def test_streamed_text_part_routed_by_mailbox(pfe, public):
    """A TEXT part too big to hold, inside CATENATE's list, leaves the
    command unparsable as first read (the list is still open): it still
    goes to the server of its mailbox, not to the current one."""
    m = login(pfe)
    folder = PREFIX + "Big"
    assert m.create(q(folder))[0] == "OK"
    m.logout()
    c = raw_login(pfe)
    big = (b"z" * 998 + b"\r\n") * 80
    c.send(b'a APPEND %s CATENATE (TEXT {%d+}\r\n' % (q(folder).encode(),
                                                      len(big)) +
           big + b' URL "%s/;UID=1")\r\n' % NEWS_URL.encode())
    lines = c.until_tagged("a")
    assert lines[-1].startswith("a OK"), lines
    uid = appended_uid(lines)
    c.cmd("z", "LOGOUT")
    direct = public.imap("alice")
    assert fetch_uid(direct, folder, uid) == big + message("news 1")
    direct.logout()


# --- URLAUTH end to end ---------------------------------------------------

def genurlauth(m, mailbox, uid):
    """An anonymous URLAUTH URL for message uid of mailbox, through m."""
    enc = mailbox.replace(" ", "%20")
    rump = "imap://alice@%s/%s;UIDVALIDITY=%d/;UID=%d;URLAUTH=anonymous" % (
        URL_HOST, enc, uidvalidity(m, mailbox), uid)
    typ, data = m._simple_command("GENURLAUTH", q(rump), "INTERNAL")
    assert typ == "OK", data
    urls = m.untagged_responses.pop("GENURLAUTH", [])
    assert len(urls) == 1, urls
    url = urls[0].decode().strip('"')
    assert url.startswith(rump + ":internal:"), url
    return url


def urlfetch(m, url):
    """What URLFETCH returns for url through m: bytes, or None for NIL."""
    typ, data = m._simple_command("URLFETCH", q(url))
    assert typ == "OK", data
    got = m.untagged_responses.pop("URLFETCH", [])
    assert got, data
    if isinstance(got[0], tuple):
        return got[0][1]
    assert got[0].endswith(b" NIL"), got
    return None


def test_urlauth_on_each_server(pfe):
    """GENURLAUTH and URLFETCH run on the server of the URL's mailbox:
    the home server's for INBOX, the public server's for News, each with
    its own keys; RESETKEY of a public mailbox resets the public key."""
    m = login(pfe)
    home_url = genurlauth(m, "INBOX", 1)
    news_url = genurlauth(m, NEWS, 2)
    assert urlfetch(m, home_url) == sample_message(1)
    assert urlfetch(m, news_url) == message("news 2")
    # a second client (a submission server, say) fetches them as well
    other = login(pfe)
    assert urlfetch(other, news_url) == message("news 2")
    typ, data = m._simple_command("RESETKEY", q(NEWS))
    assert typ == "OK", data
    assert urlfetch(other, news_url) is None
    assert urlfetch(other, home_url) == sample_message(1)
    # RESETKEY without a mailbox, nothing selected: the home server's keys
    news_url = genurlauth(m, NEWS, 3)
    typ, data = m._simple_command("RESETKEY")
    assert typ == "OK", data
    assert urlfetch(other, home_url) is None
    assert urlfetch(other, news_url) == message("news 3")
    other.logout()
    m.logout()
