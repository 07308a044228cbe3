"""The protocol trace (-D, issue 7): both sides of a session on stderr,
commands shown, credentials masked however the client sends them and
however imapfe logs in to the back-end."""
import base64
import re

import pytest

from conftest import Raw, b64, base_config, wait_for

PASSWORD = "secret"


def leaks(text):
    """Where the password shows in the trace, in clear or in base64."""
    found = [ln for ln in text.splitlines() if PASSWORD in ln]
    for token in re.findall(r"[A-Za-z0-9+/]{8,}={0,2}", text):
        try:
            if PASSWORD.encode() in base64.b64decode(token + "==="[
                    :(-len(token)) % 4]):
                found.append(token)
        except ValueError:
            pass
    return found


@pytest.mark.parametrize("backend_mechanisms", [
    "PLAIN",            # imapfe logs in with SASL PLAIN
    "SCRAM-SHA-256",    # not offered by this Dovecot: imapfe uses LOGIN
])
def test_trace_shows_commands_and_masks_credentials(imapfe_factory, dovecot,
                                                    backend_mechanisms):
    f = imapfe_factory(base_config(
        dovecot.port, "backend_mechanisms %s\n" % backend_mechanisms))
    port = f.start_inetd(extra_args=["-D"])
    logins = [
        "LOGIN alice %s" % PASSWORD,                          # atom
        'LOGIN "alice" "%s"' % PASSWORD,                      # quoted
        "LOGIN alice {%d+}\r\n%s" % (len(PASSWORD), PASSWORD),  # literal
        "AUTHENTICATE PLAIN " + b64("\0alice\0" + PASSWORD),  # SASL-IR
    ]
    for i, login in enumerate(logins):
        c = Raw(port)
        assert c.cmd("a%d" % i, login)[-1].startswith("a%d OK" % i)
        assert c.cmd("s", "SELECT INBOX")[-1].startswith("s OK")
        c.cmd("z", "LOGOUT")
        c.close()
    # an AUTHENTICATE continuation line
    c = Raw(port)
    c.send("b AUTHENTICATE PLAIN\r\n")
    assert c.line().startswith("+")
    c.send(b64("\0alice\0" + PASSWORD) + "\r\n")
    assert c.until_tagged("b")[-1].startswith("b OK")
    c.cmd("z", "LOGOUT")
    c.close()
    wait_for(lambda: f.log_text().count("event=end") == len(logins) + 1,
             10, "the sessions to end")
    trace = "\n".join(ln for ln in f.log_text().splitlines()
                      if " trace " in ln)
    assert not leaks(trace), leaks(trace)
    # what the trace does show: the client's commands, imapfe's answers,
    # imapfe's own conversation with the back-end and the relayed session
    assert "trace from=client: a0 LOGIN <masked>" in trace
    assert "trace from=client: a3 AUTHENTICATE PLAIN <masked>" in trace
    assert "trace from=client: <masked>" in trace
    assert "trace to=client: * OK [CAPABILITY" in trace
    assert re.search(r"trace to=127\.0\.0\.1: \w+ ID \(", trace)
    assert re.search(r"trace to=127\.0\.0\.1: (<\d+ bytes masked>|"
                     r"\w+ LOGIN <masked>|\w+ AUTHENTICATE PLAIN <masked>)$",
                     trace, re.M)
    assert re.search(r"trace from=127\.0\.0\.1: \w+ OK", trace)
    assert "trace to=127.0.0.1: s SELECT INBOX" in trace
    assert re.search(r"trace from=127\.0\.0\.1: \* \d+ EXISTS", trace)


def test_no_trace_without_capital_d(fe):
    c = Raw(fe.port)
    assert c.cmd("a", "LOGIN alice %s" % PASSWORD)[-1].startswith("a OK")
    c.cmd("z", "LOGOUT")
    c.close()
    assert " trace " not in fe.wait_log("event=end")


@pytest.mark.parametrize("login", [
    "a  LOGIN alice %s" % PASSWORD,             # two spaces after the tag
    "a   LOGIN alice {%d+}\r\n%s" % (len(PASSWORD), PASSWORD),
    "a\tLOGIN alice %s" % PASSWORD,              # a tab for the space
    " a LOGIN alice %s" % PASSWORD,              # a blank before the tag
    "a LOGIN\talice %s" % PASSWORD,
], ids=["two-spaces", "three-spaces-literal", "tab", "leading-space",
        "tab-after-name"])
def test_trace_masks_login_after_extra_spaces(imapfe_factory, dovecot,
                                              login):
    """`a  LOGIN alice secret`, two spaces after the tag, is a syntax
    error (RFC 9051 9: exactly one SP) and gets a BAD; but the client
    meant a LOGIN and sent its password, so the trace must not show it,
    however many spaces precede the command name."""
    f = imapfe_factory(base_config(dovecot.port))
    port = f.start_inetd(extra_args=["-D"])
    c = Raw(port)
    c.send(login + "\r\n")
    assert c.line().split(" ")[1] == "BAD"
    c.cmd("z", "LOGOUT")
    c.close()
    f.wait_log("event=end")
    trace = "\n".join(ln for ln in f.log_text().splitlines()
                      if " trace " in ln)
    assert "trace from=client: " in trace
    assert not leaks(trace), leaks(trace)
