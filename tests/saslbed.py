"""Test bed for imapfe's Cyrus SASL features: a SASL server configuration
with its own sasldb for imapfe's front end, a SCRAM client and the server
half of SCRAM for scripted back-ends (RFC 5802, RFC 7677), a Dovecot with
master users, and a real Cyrus imapd run under a temporary directory.

Facts about Debian 12's libsasl2 (2.1.28) these helpers rely on:
  * saslpasswd2 without -u (and with -u "") stores users in the realm of
    the host's name (alice@HOSTNAME), which is the realm sasl_server_new()
    uses when given neither a server FQDN nor a user realm, so a user made
    without -u logs in as plain "alice".  With a user realm given to
    sasl_server_new(), SASL_USERNAME comes back as "alice@REALM".
  * The server library offers PLAIN LOGIN CRAM-MD5 DIGEST-MD5 NTLM
    ANONYMOUS and SCRAM-SHA-1/224/256/384/512 (libsasl2-modules); mech_list
    in SERVICE.conf narrows that.
"""
import base64
import grp
import hashlib
import hmac
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile

from conftest import Dovecot, free_port, read_greeting, wait_for

FRONT_MECHS = "PLAIN LOGIN CRAM-MD5 DIGEST-MD5 SCRAM-SHA-1 SCRAM-SHA-256"


# ---------------------------------------------------------------------------
# sasldb and the SASL server configuration imapfe reads

def sasldb_add(path, users, realm=None):
    """Create or update users (name -> password) in the sasldb at path
    with saslpasswd2, the password on standard input (-p)."""
    for user, pw in users.items():
        cmd = ["saslpasswd2", "-p", "-c", "-f", path]
        if realm is not None:
            cmd += ["-u", realm]
        cmd.append(user)
        r = subprocess.run(cmd, input=pw.encode("utf-8") + b"\n",
                           capture_output=True, timeout=30)
        assert r.returncode == 0, "saslpasswd2 %s: %s" % (user, r.stderr)


def sasldb_users(path):
    """The entries of a sasldb, as sasldblistusers2 prints them."""
    r = subprocess.run(["sasldblistusers2", "-f", path],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.split("\n")


class FrontSasl:
    """A directory holding SERVICE.conf for imapfe's sasl_config_path and
    the sasldb it points to."""

    def __init__(self, users, service="imap", mechs=FRONT_MECHS,
                 extra=""):
        # imapfe opens the sasldb after it gave up root: as an admin would,
        # let the group imapfe runs as (RUN_AS) read it, and nobody else.
        self.dir = tempfile.mkdtemp(prefix="imapfe-sasl-")
        gid = grp.getgrnam("nogroup").gr_gid
        os.chown(self.dir, 0, gid)
        os.chmod(self.dir, 0o750)
        self.service = service
        self.sasldb = os.path.join(self.dir, "sasldb2")
        sasldb_add(self.sasldb, users)
        os.chown(self.sasldb, 0, gid)
        os.chmod(self.sasldb, 0o640)
        self.conf = os.path.join(self.dir, service + ".conf")
        with open(self.conf, "w") as f:
            f.write("pwcheck_method: auxprop\n"
                    "auxprop_plugin: sasldb\n"
                    "sasldb_path: %s\n" % self.sasldb)
            if mechs:
                f.write("mech_list: %s\n" % mechs)
            f.write(extra)

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def config(self):
        """The imapfe directives that use this configuration."""
        return ("sasl_service %s\nsasl_config_path %s\n"
                % (self.service, self.dir))


# ---------------------------------------------------------------------------
# SCRAM (RFC 5802; SHA-256 from RFC 7677)

SCRAM_HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


def _hmac(alg, key, msg):
    return hmac.new(key, msg, alg).digest()


def _xor(a, b):
    return bytes(x ^ y for x, y in zip(a, b))


def saslname(name):
    return name.replace("=", "=3D").replace(",", "=2C")


def scram_attrs(msg):
    """A SCRAM message's attributes as a dict; raises ValueError."""
    out = {}
    for part in msg.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ValueError("bad SCRAM attribute %r" % part)
        out.setdefault(part[0], part[2:])
    return out


def scram_keys(alg, password, salt, iterations):
    salted = hashlib.pbkdf2_hmac(alg, password.encode("utf-8"), salt,
                                 iterations)
    client_key = _hmac(alg, salted, b"Client Key")
    server_key = _hmac(alg, salted, b"Server Key")
    return client_key, hashlib.new(alg, client_key).digest(), server_key


class ScramClient:
    """The client side of one SCRAM exchange, without channel binding.
    Raises AssertionError when the server's messages are wrong, above all
    when its signature does not prove it knows the password."""

    def __init__(self, mech, user, password, authzid=None, nonce=None):
        self.alg = SCRAM_HASHES[mech]
        self.user = user
        self.password = password
        self.gs2 = "n,%s," % ("a=" + saslname(authzid) if authzid else "")
        self.cnonce = nonce or base64.b64encode(
            secrets.token_bytes(18)).decode()
        self.bare = "n=%s,r=%s" % (saslname(user), self.cnonce)
        self.server_signature = None
        self.verified = False

    def first(self):
        return (self.gs2 + self.bare).encode()

    def final(self, server_first):
        server_first = server_first.decode()
        a = scram_attrs(server_first)
        assert "m" not in a, "mandatory extension: %r" % server_first
        nonce, salt, it = a["r"], base64.b64decode(a["s"]), int(a["i"])
        assert nonce.startswith(self.cnonce) and len(nonce) > len(
            self.cnonce), "server nonce %r lacks ours" % nonce
        assert it >= 1
        without_proof = "c=%s,r=%s" % (
            base64.b64encode(self.gs2.encode()).decode(), nonce)
        auth_message = ",".join((self.bare, server_first,
                                 without_proof)).encode()
        client_key, stored_key, server_key = scram_keys(
            self.alg, self.password, salt, it)
        proof = _xor(client_key, _hmac(self.alg, stored_key, auth_message))
        self.server_signature = _hmac(self.alg, server_key, auth_message)
        return ("%s,p=%s" % (without_proof,
                             base64.b64encode(proof).decode())).encode()

    def check(self, server_final):
        a = scram_attrs(server_final.decode())
        assert "e" not in a, "server error: %r" % server_final
        got = base64.b64decode(a["v"])
        assert hmac.compare_digest(got, self.server_signature), \
            "server signature does not verify: %r" % server_final
        self.verified = True


class ScramServer:
    """The server half, for scripted back-ends: it checks the client's
    proof against password and can send a right or a wrong signature."""

    def __init__(self, mech, password, iterations=4096):
        self.alg = SCRAM_HASHES[mech]
        self.password = password
        self.salt = secrets.token_bytes(16)
        self.iterations = iterations
        self.client_first = None

    def first(self, client_first):
        """Parse client-first; return server-first."""
        cf = client_first.decode()
        gs2_flag, authz, bare = cf.split(",", 2)
        assert gs2_flag in ("n", "y"), cf
        self.gs2 = "%s,%s," % (gs2_flag, authz)
        self.authzid = authz[2:] if authz.startswith("a=") else None
        self.bare = bare
        a = scram_attrs(bare)
        self.user = a["n"]
        self.nonce = a["r"] + base64.b64encode(
            secrets.token_bytes(12)).decode()
        self.server_first = "r=%s,s=%s,i=%d" % (
            self.nonce, base64.b64encode(self.salt).decode(),
            self.iterations)
        return self.server_first.encode()

    def final(self, client_final, wrong_signature=False):
        """Check client-final; return server-final (v=...), or None when
        the proof is wrong."""
        cf = client_final.decode()
        without_proof, _, proof = cf.rpartition(",p=")
        a = scram_attrs(without_proof)
        assert base64.b64decode(a["c"]).decode() == self.gs2
        assert a["r"] == self.nonce
        auth_message = ",".join((self.bare, self.server_first,
                                 without_proof)).encode()
        client_key, stored_key, server_key = scram_keys(
            self.alg, self.password, self.salt, self.iterations)
        want = _xor(client_key, _hmac(self.alg, stored_key, auth_message))
        if not hmac.compare_digest(base64.b64decode(proof), want):
            return None
        sig = _hmac(self.alg, server_key, auth_message)
        if wrong_signature:
            sig = bytes([sig[0] ^ 1]) + sig[1:]
        return ("v=" + base64.b64encode(sig).decode()).encode()


def cram_md5_response(user, password, challenge):
    digest = hmac.new(password.encode(), challenge, "md5").hexdigest()
    return ("%s %s" % (user, digest)).encode()


# ---------------------------------------------------------------------------
# Dovecot with master users

class MasterDovecot(Dovecot):
    """Dovecot that also lets master users log in as anybody: SASL PLAIN
    with authzid=USER, authcid=MASTER and the master's password logs in as
    USER (no auth_master_user_separator needed for the authzid).  With
    result_success=continue the target user must exist in the ordinary
    passdb too.

    The tests make a proxy identity fail on purpose, and Dovecot's auth
    penalty would then delay every later login from 127.0.0.1 by up to 15
    seconds, successful ones too; an anvil-auth-penalty socket nobody may
    connect to turns the penalty off (auth_penalty_init() finds anvil
    unreachable), and auth_failure_delay 0 drops the fixed delay."""

    def __init__(self, master_users, mechs="plain login"):
        self.master_users = dict(master_users)
        self._master_written = False
        super().__init__(mechs=mechs)

    def start(self):
        if not self._master_written:
            masters = os.path.join(self.dir, "masters")
            with open(masters, "w") as f:
                for user, pw in self.master_users.items():
                    f.write("%s:{PLAIN}%s::::::\n" % (user, pw))
            with open(self.conf, "a") as f:
                f.write("passdb {\n  driver = passwd-file\n"
                        "  args = scheme=PLAIN username_format=%%u %s\n"
                        "  master = yes\n  result_success = continue\n}\n"
                        "auth_failure_delay = 0\n"
                        "service anvil {\n"
                        "  unix_listener anvil-auth-penalty {\n"
                        "    mode = 0\n  }\n}\n" % masters)
            self._master_written = True
        super().start()


# ---------------------------------------------------------------------------
# Cyrus imapd

# master and ctl_cyrusdb come from cyrus-common.  imapd is cyrus-imapd's,
# which cannot be installed beside dovecot-imapd (it conflicts with every
# imap-server): tests/install-deps.sh unpacks that package, uninstalled,
# into CYRUS_IMAPD_ROOT and records its version there.
CYRUS_BIN = "/usr/lib/cyrus/bin"
CYRUS_IMAPD_ROOT = "/var/cache/imapfe-tests/cyrus-imapd"
CYRUS_IMAPD = CYRUS_IMAPD_ROOT + "/usr/lib/cyrus/bin/imapd"


def cyrus_check():
    """Fail, saying what to do, unless cyrus-common is installed and the
    unpacked cyrus-imapd is there in cyrus-common's version.  Never a skip:
    install-deps.sh guarantees both, so their absence is an error."""
    fix = "run sh tests/install-deps.sh as root"
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}",
                        "cyrus-common"], capture_output=True, text=True)
    status = r.stdout.rsplit(" ", 1)
    assert r.returncode == 0 and status[0] == "install ok installed" and \
        os.path.exists(os.path.join(CYRUS_BIN, "master")), \
        "cyrus-common is not installed: " + fix
    version = status[1]
    assert os.access(CYRUS_IMAPD, os.X_OK), \
        "%s is missing (cyrus-imapd %s unpacked, not installed): %s" % (
            CYRUS_IMAPD, version, fix)
    try:
        with open(os.path.join(CYRUS_IMAPD_ROOT, ".imapfe-version")) as f:
            unpacked = f.read().strip()
    except OSError:
        unpacked = "unknown"
    assert unpacked == version, \
        "%s holds cyrus-imapd %s but cyrus-common is %s: %s" % (
            CYRUS_IMAPD_ROOT, unpacked, version, fix)


IMAPD_CONF = """\
configdirectory: {d}/config
partition-default: {d}/spool
defaultpartition: default
servername: {servername}
admins: {admin}
proxyservers: {proxyservers}
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {d}/sasldb2
sasl_mech_list: {mechs}
allowplaintext: yes
autocreate_quota: 0
failedloginpause: 0
unixhierarchysep: 1
"""

CYRUS_CONF = """\
START {{
  recover cmd="ctl_cyrusdb -C {d}/imapd.conf -r"
}}
SERVICES {{
  imap cmd="{imapd} -C {d}/imapd.conf" listen="127.0.0.1:{port}" prefork=0
}}
EVENTS {{
}}
DAEMON {{
}}
"""


class Cyrus:
    """A real Cyrus imapd (Debian's, see CYRUS_IMAPD) under a temporary
    directory, on a loopback port, with its own sasldb.  master runs in the
    foreground (it drops to the cyrus user itself); every service is given
    -C explicitly, since master does not pass its own -C on.

    Cyrus logs only to syslog, so the evidence of whose session it was is
    its telemetry: for a user U with a directory configdirectory/log/U,
    imapd writes the protocol of each of U's sessions there, headed by
    "---------- U"."""

    SERVERNAME = "imapfe-cyrus"

    def __init__(self, users, proxyservers=("proxy",), admin="admin",
                 mechs="PLAIN LOGIN SCRAM-SHA-1 SCRAM-SHA-256"):
        cyrus_check()
        self.dir = tempfile.mkdtemp(prefix="imapfe-cyrus-")
        os.chmod(self.dir, 0o755)
        self.users = dict(users)
        self.admin = admin
        self.port = free_port()
        d = self.dir
        for sub in ("config", "config/socket", "config/lock", "config/proc",
                    "config/log", "spool"):
            os.mkdir(os.path.join(d, sub))
        with open(os.path.join(d, "imapd.conf"), "w") as f:
            f.write(IMAPD_CONF.format(d=d, servername=self.SERVERNAME,
                                      admin=admin, mechs=mechs,
                                      proxyservers=" ".join(proxyservers)))
        with open(os.path.join(d, "cyrus.conf"), "w") as f:
            f.write(CYRUS_CONF.format(d=d, port=self.port,
                                      imapd=CYRUS_IMAPD))
        self.sasldb = os.path.join(d, "sasldb2")
        # Cyrus gives libsasl2 its servername as the server FQDN, so that
        # is the realm its users must be in.
        sasldb_add(self.sasldb, self.users, realm=self.SERVERNAME)
        self.cyrus = pwd.getpwnam("cyrus")
        self.proc = None
        self._chown()
        self.start()

    def _chown(self):
        for root, dirs, files in os.walk(self.dir):
            for name in dirs + files:
                os.chown(os.path.join(root, name), self.cyrus.pw_uid,
                         self.cyrus.pw_gid)

    def watch(self, user):
        """Have imapd record the protocol of user's sessions."""
        p = os.path.join(self.dir, "config", "log", user)
        if not os.path.isdir(p):
            os.mkdir(p)
            os.chown(p, self.cyrus.pw_uid, self.cyrus.pw_gid)
        return p

    def telemetry(self, user):
        """The protocol text recorded for user's sessions."""
        p = os.path.join(self.dir, "config", "log", user)
        text = ""
        for name in sorted(os.listdir(p)) if os.path.isdir(p) else ():
            with open(os.path.join(p, name), errors="replace") as f:
                text += f.read()
        return text

    def start(self):
        self.proc = subprocess.Popen(
            [os.path.join(CYRUS_BIN, "master"),
             "-C", os.path.join(self.dir, "imapd.conf"),
             "-M", os.path.join(self.dir, "cyrus.conf"),
             "-p", os.path.join(self.dir, "master.pid"),
             "-L", os.path.join(self.dir, "master.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True)

        def ready():
            assert self.proc.poll() is None, \
                "cyrus master exited: %s\n%s" % (self.proc.returncode,
                                                 self.master_log())
            return b"server ready" in read_greeting(self.port)
        wait_for(ready, 30, "cyrus imapd greeting")

    def master_log(self):
        try:
            with open(os.path.join(self.dir, "master.log"),
                      errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        # master ends its children itself on SIGTERM.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        wait_for(lambda: read_greeting(self.port, timeout=0.2) == b"", 10,
                 "cyrus to stop")

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def imap(self, user, password=None):
        import imaplib
        m = imaplib.IMAP4("127.0.0.1", self.port)
        m.login(user, password if password is not None else self.users[user])
        return m

    def mailboxes(self):
        """Every mailbox name, as the admin sees them."""
        m = self.imap(self.admin)
        typ, data = m.list('""', "*")
        m.logout()
        assert typ == "OK", data
        return [ln.decode().rsplit(' "/" ', 1)[1].strip('"')
                for ln in data if ln]
