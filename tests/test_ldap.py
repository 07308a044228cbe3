"""Routing from an LDAP directory: a real OpenLDAP slapd (Debian's), with
its own slapd.conf and database in a temporary directory on a loopback
port, holding test users and their mailHost.

Covers routing to two Dovecots by directory entry, route_order with the
route lines, the RFC 4515 escaping of user names (checked in slapd's own
log of the filters it received), a directory that is down, one that
accepts and never answers, one that answers garbage, one that is stopped
(SIGSTOP), failover to a second slapd, StartTLS and ldaps with verified
certificates, a simple bind with a password file, SASL EXTERNAL over
ldapi, directory answers that name an unlisted server or garbage, a
public-folder server named by the directory, and configuration errors.
"""
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import (SLOW, USERS, Dovecot, Raw, free_port, pid_alive,
                      wait_for)

BASE = "ou=people,dc=example,dc=org"
SLAPD_CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/misc.schema
pidfile {d}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
{tls}
{acl}
database mdb
suffix "dc=example,dc=org"
rootdn "cn=admin,dc=example,dc=org"
rootpw {rootpw}
directory {d}/db
maxsize 10485760
"""
ROOTPW = "ldap-secret"


def person(uid, host=None, cn=None):
    """An entry; its DN names cn (uid without "*"), its uid is as given."""
    cn = cn or uid.replace("*", "star")
    ldif = ("dn: cn=%s,%s\nobjectClass: inetOrgPerson\n"
            "objectClass: inetLocalMailRecipient\nuid: %s\ncn: %s\nsn: x\n"
            % (cn, BASE, uid, cn))
    if host is not None:
        ldif += "mailHost: %s\n" % host
    return ldif + "\n"


class Slapd:
    """Debian's slapd under a temporary directory, on a loopback port;
    with certs, also StartTLS on that port and ldaps on ldaps_port."""

    def __init__(self, entries, certs=None, acl=""):
        self.dir = tempfile.mkdtemp(prefix="imapfe-slapd-")
        os.chmod(self.dir, 0o755)   # the ldapi socket, for imapfe's user
        os.mkdir(os.path.join(self.dir, "db"), 0o700)
        self.port = free_port()
        self.ldaps_port = free_port() if certs else None
        tls = ""
        if certs is not None:
            tls = ("TLSCACertificateFile %s\nTLSCertificateFile %s\n"
                   "TLSCertificateKeyFile %s\n"
                   % (certs.ca, certs.dovecot, certs.dovecot_key))
        self.conf = os.path.join(self.dir, "slapd.conf")
        with open(self.conf, "w") as f:
            f.write(SLAPD_CONF.format(d=self.dir, tls=tls, acl=acl,
                                      rootpw=ROOTPW))
        ldif = ("dn: dc=example,dc=org\nobjectClass: dcObject\n"
                "objectClass: organization\no: example\ndc: example\n\n"
                "dn: %s\nobjectClass: organizationalUnit\nou: people\n\n"
                % BASE) + "".join(entries)
        subprocess.run(["slapadd", "-f", self.conf], input=ldif.encode(),
                       check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self.log = os.path.join(self.dir, "slapd.log")
        self.proc = None
        self.start()

    def ldapi(self):
        return "ldapi://" + os.path.join(self.dir, "ldapi").replace("/",
                                                                   "%2F")

    def urls(self):
        u = "ldap://127.0.0.1:%d/ %s" % (self.port, self.ldapi())
        if self.ldaps_port:
            u += " ldaps://127.0.0.1:%d/" % self.ldaps_port
        return u

    def uri(self):
        return "ldap://127.0.0.1:%d/" % self.port

    def start(self):
        with open(self.log, "ab") as logf:
            # -d 256: stats, the filters of each search, into the log.
            self.proc = subprocess.Popen(
                ["slapd", "-h", self.urls(), "-f", self.conf, "-d", "256"],
                stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_for(self.answers, 20, "slapd")

    def answers(self):
        """Whatever an anonymous search gets (an ACL may refuse it),
        rather than no server (255)."""
        r = subprocess.run(
            ["ldapsearch", "-x", "-H", self.uri(), "-b", BASE, "-s",
             "base", "-o", "nettimeout=2", "dn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return r.returncode != 255

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc is None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_dovecots():
    a, b = Dovecot(), Dovecot()
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def unlisted():
    """A listening socket no configuration names: nothing may connect."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


def entries(a, b, unlisted_port):
    return [person("alice", "127.0.0.1:%d" % a.port),
            person("bob", "127.0.0.1:%d" % b.port),
            person("carol"),                              # no mailHost
            person("star*user", "127.0.0.1:%d" % b.port),
            person("dave", "127.0.0.1:%d" % unlisted_port),
            person("eve", "127.0.0.1:99999"),             # garbage
            person("frank", "bad host!"),                 # garbage
            person("twin", "127.0.0.1:%d" % a.port),
            person("twin", "127.0.0.1:%d" % b.port, cn="twin2")]


@pytest.fixture(scope="module")
def slapd(two_dovecots, unlisted, certs):
    a, b = two_dovecots
    s = Slapd(entries(a, b, unlisted.getsockname()[1]), certs=certs)
    yield s
    s.close()


@pytest.fixture
def ldap_fe(imapfe_factory, slapd, two_dovecots):
    """imapfe routing by the shared slapd alone, run inetd-style."""
    fe = imapfe_factory(ldap_config(two_dovecots, slapd.uri()))
    fe.start_inetd()
    return fe


def ldap_config(dovecots, uri, extra="", order="route_order ldap\n"):
    a, b = dovecots
    return ("server 127.0.0.1:%d\nserver 127.0.0.1:%d\n"
            "ldap_uri %s\nldap_search_base %s\nldap_timeout %d\n"
            "login_timeout %d\n%s%s"
            % (a.port, b.port, uri, BASE, 2 * SLOW, 60 * SLOW, order, extra))


def login(port, user, password="x"):
    """The tagged answer to LOGIN, and how long it took."""
    c = Raw(port, timeout=60)
    t0 = time.monotonic()
    line = c.cmd("a", 'LOGIN "%s" "%s"' % (user.replace("\\", "\\\\"),
                                           password))[-1]
    took = time.monotonic() - t0
    c.send("z LOGOUT\r\n")
    c.closed()
    c.close()
    return line, took


def dovecot_logins(d, user):
    return d.log_text().count("user=<%s>" % user)


# --- routing ----------------------------------------------------------------

def test_directory_routes_users_to_their_servers(ldap_fe, two_dovecots):
    a, b = two_dovecots
    fe, port = ldap_fe, ldap_fe.port
    for user, home, other in (("alice", a, b), ("bob", b, a)):
        before = dovecot_logins(other, user)
        line, _ = login(port, user, USERS[user])
        assert line.startswith("a OK"), line
        fe.wait_log('event=login user="%s" method=LOGIN backend=127.0.0.1:%d'
                    % (user, home.port))
        wait_for(lambda: dovecot_logins(home, user) > 0, 10, "home login")
        assert dovecot_logins(other, user) == before


def test_unknown_user_fails_like_a_wrong_password(ldap_fe):
    fe, port = ldap_fe, ldap_fe.port
    for user, why in (("nobody", "no entry"),
                      ("carol", "the entry has no mailHost")):
        line, _ = login(port, user)
        assert line == "a NO [AUTHENTICATIONFAILED] Authentication failed."
        fe.wait_log('user="%s" method=LOGIN reason="%s"' % (user, why))
    wrong, _ = login(port, "alice", "wrong")
    assert wrong == "a NO [AUTHENTICATIONFAILED] Authentication failed."


def test_route_order_falls_back_to_route_lines(imapfe_factory, slapd,
                                               two_dovecots):
    a, b = two_dovecots
    conf = ldap_config(two_dovecots, slapd.uri(), order="") + (
        "route alice 127.0.0.1:%d\nroute * 127.0.0.1:%d\n" % (b.port, a.port))
    fe = imapfe_factory(conf)
    port = fe.start_inetd()
    # Default order: user's own line, directory, *@domain, "*".
    line, _ = login(port, "alice", USERS["alice"])
    assert line.startswith("a OK"), line
    fe.wait_log('user="alice" method=LOGIN backend=127.0.0.1:%d' % b.port)
    line, _ = login(port, "bob", USERS["bob"])
    assert line.startswith("a OK"), line
    fe.wait_log('user="bob" method=LOGIN backend=127.0.0.1:%d' % b.port)
    line, _ = login(port, "carol", USERS["carol"])
    assert line.startswith("a OK"), line
    fe.wait_log('user="carol" method=LOGIN backend=127.0.0.1:%d' % a.port)


# --- filter injection -------------------------------------------------------

@pytest.mark.parametrize("user,escaped", [
    ("*", "(uid=\\2A)"),
    ("ali*", "(uid=ali\\2A)"),
    ("alice)(uid=*", "(uid=alice\\29\\28uid=\\2A)"),
    ("x)(|(uid=*)", "(uid=x\\29\\28|\\28uid=\\2A\\29)"),
    ("back\\slash", "(uid=back\\5Cslash)"),
])
def test_user_name_cannot_change_the_filter(ldap_fe, slapd, user, escaped):
    line, _ = login(ldap_fe.port, user)
    assert line == "a NO [AUTHENTICATIONFAILED] Authentication failed."
    log = wait_for(lambda: escaped.lower() in slapd.log_text().lower() and
                   slapd.log_text(), 10, "slapd to log %s" % escaped)
    assert "filter=\"(uid=*)\"" not in log


def test_escaped_name_still_matches_its_entry(ldap_fe, two_dovecots):
    _, b = two_dovecots
    fe, port = ldap_fe, ldap_fe.port
    line, _ = login(port, "star*user")
    # Routed to b by its entry; b does not know the user.
    assert line == "a NO [AUTHENTICATIONFAILED] Authentication failed."
    fe.wait_log('user="star*user" method=LOGIN backend=127.0.0.1:%d'
                % b.port)


def test_nul_in_user_name_never_reaches_the_directory(
        ldap_fe, slapd, two_dovecots):
    fe, port = ldap_fe, ldap_fe.port
    c = Raw(port)
    c.send("a LOGIN {5+}\r\nzz\0zz x\r\n")
    assert c.until_tagged("a")[-1].startswith("a NO [AUTHENTICATIONFAILED]")
    c.close()
    fe.wait_log("invalid characters in credentials")
    assert "(uid=zz" not in slapd.log_text()


# --- what the directory may answer ------------------------------------------

def test_unlisted_server_is_never_contacted(
        ldap_fe, slapd, two_dovecots, unlisted):
    fe, port = ldap_fe, ldap_fe.port
    line, _ = login(port, "dave")
    assert line.startswith("a NO [UNAVAILABLE]"), line
    fe.wait_log("directory names 127.0.0.1:%d, which is not a configured "
                "server" % unlisted.getsockname()[1])
    with pytest.raises(BlockingIOError):
        unlisted.accept()


@pytest.mark.parametrize("user,why", [
    ("eve", "unusable mailHost value"),
    ("frank", "unusable mailHost value"),
    ("twin", "more than one entry matches"),
])
def test_garbage_answers_are_unavailable(
        ldap_fe, slapd, two_dovecots, user, why):
    fe, port = ldap_fe, ldap_fe.port
    line, _ = login(port, user)
    assert line.startswith("a NO [UNAVAILABLE]"), line
    fe.wait_log(why)


# --- failure and failover ---------------------------------------------------

def test_directory_down(imapfe_factory, two_dovecots):
    fe = imapfe_factory(ldap_config(two_dovecots, "ldap://127.0.0.1:%d/"
                                    % free_port()))
    port = fe.start_inetd()
    line, took = login(port, "alice", USERS["alice"])
    assert line.startswith("a NO [UNAVAILABLE]"), line
    fe.wait_log("event=ldap-failed")
    assert took < 10 * SLOW


@pytest.mark.parametrize("scheme,extra", [("ldap", ""),
                                          ("ldap", "ldap_starttls yes\n"),
                                          ("ldaps", "")])
def test_directory_that_never_answers(imapfe_factory, two_dovecots, scheme,
                                      extra):
    """A server that accepts (the kernel's backlog) and never answers: not
    the search, nor StartTLS, nor the TLS handshake."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        fe = imapfe_factory(ldap_config(
            two_dovecots, "%s://127.0.0.1:%d/" % (scheme,
                                                 mute.getsockname()[1]),
            extra))
        port = fe.start_inetd()
        line, took = login(port, "alice", USERS["alice"])
    assert line.startswith("a NO [UNAVAILABLE]"), line
    fe.wait_log("event=ldap-failed")
    assert 1.5 <= took < 2 * 2 * SLOW + 5, took


def test_directory_that_answers_garbage(imapfe_factory, two_dovecots,
                                       slapd):
    """A first server that answers every connection with bytes that are
    not LDAP, then the real slapd: the login still succeeds."""
    with socket.socket() as bad:
        bad.bind(("127.0.0.1", 0))
        bad.listen(8)

        def answer_garbage():
            conn, _ = bad.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x30\x84\xff\xff\xff\xff" + b"junk" * 64)
        t = threading.Thread(target=answer_garbage, daemon=True)
        t.start()
        uri = "ldap://127.0.0.1:%d/" % bad.getsockname()[1]
        fe = imapfe_factory(ldap_config(two_dovecots,
                                        "%s %s" % (uri, slapd.uri())))
        line, took = login(fe.start_inetd(), "alice", USERS["alice"])
        t.join(10 * SLOW)
    assert line.startswith("a OK"), line
    fe.wait_log('event=ldap-failed uri="%s" reason="search: ' % uri)
    assert took < 2 * SLOW + 5, took


def test_failover_to_second_slapd(imapfe_factory, two_dovecots, unlisted,
                                  slapd):
    a, b = two_dovecots
    first = Slapd(entries(a, b, unlisted.getsockname()[1]))
    try:
        fe = imapfe_factory(ldap_config(
            two_dovecots, "%s %s" % (first.uri(), slapd.uri())))
        port = fe.start_inetd()
        line, _ = login(port, "alice", USERS["alice"])
        assert line.startswith("a OK"), line
        assert "ldap-failed" not in fe.log_text()
        os.kill(first.proc.pid, signal.SIGSTOP)     # slow: never answers
        line, took = login(port, "bob", USERS["bob"])
        assert line.startswith("a OK"), line
        fe.wait_log('event=ldap-failed uri="%s"' % first.uri())
        assert took < 2 * 2 * SLOW + 5
        first.stop()                                # down: refused
        line, _ = login(port, "bob", USERS["bob"])
        assert line.startswith("a OK"), line
    finally:
        pid = first.proc.pid if first.proc else None
        first.close()
    assert pid is None or not pid_alive(pid)


# --- TLS and binding --------------------------------------------------------

def test_starttls_and_ldaps_verified(imapfe_factory, slapd, two_dovecots,
                                     certs):
    ca = "ldap_ca_file %s\n" % certs.ca
    for uri, extra in ((slapd.uri(), "ldap_starttls yes\n"),
                       ("ldaps://127.0.0.1:%d/" % slapd.ldaps_port, "")):
        fe = imapfe_factory(ldap_config(two_dovecots, uri, ca + extra),
                            name="fe%d" % len(extra))
        port = fe.start_inetd()
        line, _ = login(port, "alice", USERS["alice"])
        assert line.startswith("a OK"), line
    assert "STARTTLS" in slapd.log_text()


def test_tls_to_an_untrusted_directory_fails(imapfe_factory, slapd,
                                             two_dovecots, certs):
    fe = imapfe_factory(ldap_config(
        two_dovecots, slapd.uri(),
        "ldap_starttls yes\nldap_ca_file %s\n" % certs.untrusted_ca))
    port = fe.start_inetd()
    line, _ = login(port, "alice", USERS["alice"])
    assert line.startswith("a NO [UNAVAILABLE]"), line
    fe.wait_log('event=ldap-failed uri="%s" reason="starttls' % slapd.uri())


def test_simple_bind_with_password_file(imapfe_factory, slapd, two_dovecots,
                                        tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(ROOTPW + "\n")
    bad.write_text("wrong\n")
    for pwfile, ok in ((good, True), (bad, False)):
        os.chmod(pwfile, 0o600)
        fe = imapfe_factory(ldap_config(
            two_dovecots, slapd.uri(),
            "ldap_bind_dn cn=admin,dc=example,dc=org\n"
            "ldap_bind_password_file %s\n" % pwfile), name="fe-" + pwfile.name)
        port = fe.start_inetd()
        line, _ = login(port, "alice", USERS["alice"])
        assert line.startswith("a OK" if ok else "a NO [UNAVAILABLE]"), line
    assert ROOTPW not in fe.log_text()
    fe.wait_log('reason="bind: Invalid credentials"')


def test_sasl_external_bind_over_ldapi(imapfe_factory, two_dovecots,
                                      unlisted):
    """Only the user imapfe's sessions run as (conftest's RUN_AS, nobody
    and nogroup), as slapd sees it over ldapi with SASL EXTERNAL, may read
    the directory; an anonymous search finds nothing."""
    a, b = two_dovecots
    me = "gidNumber=%d+uidNumber=%d,cn=peercred,cn=external,cn=auth" % (
        grp.getgrnam("nogroup").gr_gid, pwd.getpwnam("nobody").pw_uid)
    s = Slapd(entries(a, b, unlisted.getsockname()[1]),
              acl='access to * by dn.exact="%s" read by * none' % me)
    try:
        for mech, ok in (("ldap_sasl_mech EXTERNAL\n", True), ("", False)):
            fe = imapfe_factory(ldap_config(two_dovecots, s.ldapi(), mech),
                                name="fe%d" % len(mech))
            line, _ = login(fe.start_inetd(), "alice", USERS["alice"])
            assert line.startswith("a OK") == ok, line
        assert "BIND dn=\"%s\" mech=EXTERNAL" % me in s.log_text()
    finally:
        s.close()


def test_public_folder_server_from_directory(imapfe_factory, two_dovecots,
                                            slapd):
    """public PREFIX ldap: the directory names the public-folder server,
    looked up when the session first needs it."""
    from test_public import NEWS, PREFIX, public_server, q
    a, b = two_dovecots
    pub = public_server()
    s = Slapd([person("alice", "127.0.0.1:%d" % a.port),
               person("public-folders", "127.0.0.1:%d" % pub.port,
                      cn=PREFIX)])
    try:
        public = 'public "%s" ldap\nserver 127.0.0.1:%d\n' % (PREFIX,
                                                               pub.port)
        for d, ok in ((s, True), (slapd, False)):
            fe = imapfe_factory(ldap_config(two_dovecots, d.uri(), public),
                                name="fe%d" % ok)
            c = Raw(fe.start_inetd(), timeout=30)
            assert c.cmd("a", "LOGIN alice secret")[-1].startswith("a OK")
            sel = c.cmd("b", "SELECT %s" % q(NEWS))
            c.cmd("z", "LOGOUT")
            c.close()
            if ok:
                assert "* 3 EXISTS" in sel and sel[-1].startswith("b OK")
                fe.wait_log('event=public-login user="alice" prefix="%s" '
                            'backend=127.0.0.1:%d' % (PREFIX, pub.port))
            else:
                assert sel[-1].startswith("b NO [UNAVAILABLE]"), sel
                fe.wait_log('event=public-failed user="alice" prefix="%s" '
                            'reason="no entry"' % PREFIX)
        # slapd logs filters normalized, in lower case.
        assert 'filter="(cn=%s)"' % PREFIX.lower() in s.log_text()
    finally:
        s.close()
        pub.close()


@pytest.mark.parametrize("conf,why", [
    ("route_order ldap\nroute * 127.0.0.1:143\n", "needs ldap_uri"),
    ("ldap_uri ldap://127.0.0.1/\nroute * 127.0.0.1:143\n",
     "needs ldap_search_base"),
    ("ldap_uri http://x/\nroute * 127.0.0.1:143\n", "ldap_uri takes"),
    ("ldap_uri ldap://127.0.0.1/\nldap_search_base o=x\n"
     "ldap_filter uid=%u\nroute * 127.0.0.1:143\n", "ldap_filter"),
    ("ldap_uri ldap://127.0.0.1/\nldap_search_base o=x\n"
     "ldap_filter (uid=%x)\nroute * 127.0.0.1:143\n", "ldap_filter"),
    ("ldap_uri ldap://127.0.0.1/\nldap_search_base o=x\n"
     "ldap_public_filter (cn=%u)(x=y)\nroute * 127.0.0.1:143\n",
     "ldap_public_filter"),
    ("ldap_uri ldap://127.0.0.1/\nldap_search_base o=x\n"
     "route_order ldap ldap\nroute * 127.0.0.1:143\n", "route_order takes"),
    ("ldap_uri ldap://127.0.0.1/\nldap_search_base o=x\n"
     "route_order ldap\n", "configured servers"),
    ("public P/ ldap\nroute * 127.0.0.1:143\n", "public P/ ldap needs"),
    ("ldap_uri ldap://127.0.0.1/\nldap_search_base o=x\n"
     "public P/ ldap tls=implicit\nroute * 127.0.0.1:143\n", "or ldap"),
])
def test_config_errors(tmp_path, conf, why):
    from conftest import BIN
    path = tmp_path / "bad.conf"
    path.write_text(conf)
    r = subprocess.run([BIN, "-t", "-f", str(path)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    assert r.returncode != 0
    assert why in r.stdout.decode()
