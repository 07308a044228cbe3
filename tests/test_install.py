"""make install and uninstall as a packager runs them (issue 7): PREFIX
and DESTDIR honoured, the usual directories, nothing enabled, nothing
left behind."""
import os
import re
import subprocess

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ("imapfe.conf", "imapfe.xinetd", "imapfe.inetd",
            "imapfe.socket", "imapfe@.service", "imapfe-listener.service")
MANUALS = ("usr/share/man/man5/imapfe.conf.5", "usr/share/man/man8/imapfe.8")


def make(*args):
    r = subprocess.run(["make", "-s", "-C", TOP] + list(args),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


def test_install_and_uninstall_with_prefix_and_destdir(tmp_path):
    dest = str(tmp_path / "dest")
    make("install", "DESTDIR=" + dest, "PREFIX=/usr")
    examples = ["usr/share/examples/imapfe/" + f for f in EXAMPLES]
    assert files_under(dest) == sorted(
        ["usr/sbin/imapfe"] + list(MANUALS) + examples)
    assert os.stat(os.path.join(dest, "usr/sbin/imapfe")).st_mode & 0o777 \
        == 0o755
    for f in examples + list(MANUALS):
        assert os.stat(os.path.join(dest, f)).st_mode & 0o777 == 0o644, f
    # the service files name the installed program, not /usr/local's
    for f in examples:
        if f.endswith((".conf", ".socket")):
            continue
        text = open(os.path.join(dest, f)).read()
        assert "/usr/sbin/imapfe" in text and "/usr/local" not in text, f
    # each manual is the page of its own section, installed as shipped
    for f in MANUALS:
        name, section = os.path.basename(f).rsplit(".", 1)
        text = open(os.path.join(dest, f)).read()
        assert text == open(os.path.join(TOP, name + "." + section)).read()
        assert ".Dt %s %s\n" % (name.upper(), section) in text, f
    make("uninstall", "DESTDIR=" + dest, "PREFIX=/usr")
    assert files_under(dest) == []
    assert not os.path.exists(os.path.join(dest, "usr/share/examples/imapfe"))


def c_source(name):
    return open(os.path.join(TOP, name)).read()


def c_block(src, start):
    """The text of the C block (array or function body) opening after
    start."""
    i = src.index(start)
    i = src.index("{", i)
    depth = 0
    for j in range(i, len(src)):
        depth += {"{": 1, "}": -1}.get(src[j], 0)
        if depth == 0:
            return src[i:j + 1]
    raise AssertionError("unterminated block after " + start)


def accepted_directives():
    """Every keyword config_line() takes, and every route option."""
    src = c_source("imapfe.c")
    keys = set(re.findall(r'strcmp\(w\[0\], "(\w+)"\)',
                          c_block(src, "\nconfig_line(")))
    keys |= set(re.findall(r'\{ "(\w+)", offsetof',
                           c_block(src, "int_keys[] =")))
    keys |= set(re.findall(r'\{ "(\w+)", offsetof',
                           c_block(src, "string_keys[] =")))
    options = set(re.findall(r'\{ "(\w+)", offsetof\(struct route',
                             c_block(src, "\nroute_option(")))
    options |= set(re.findall(r'strncmp\(opt, "(\w+)", \d+\)',
                              c_block(src, "\nroute_option(")))
    return keys, options


def conf5_entries():
    """{directive: its text} for every '.It Ic' entry of imapfe.conf.5,
    and the set of route options ('.It Cm key=')."""
    entries, options, current = {}, set(), []
    for line in c_source("imapfe.conf.5").splitlines():
        if line.startswith(".It Ic ") or line.startswith((".Ss", ".Sh")):
            current = re.findall(r"\bIc (\w+)", line) \
                if line.startswith(".It") else []
            for k in current:
                entries.setdefault(k, "")
            continue
        if line.startswith(".It Cm "):
            options |= set(re.findall(r"\bCm (\w+)=", line))
        for k in current:
            entries[k] += " " + line
    return entries, options


def test_every_directive_is_documented_in_imapfe_conf_5():
    keys, options = accepted_directives()
    entries, documented_options = conf5_entries()
    assert len(keys) > 50 and "ldap_uri" in keys and "route" in keys
    assert sorted(keys - set(entries)) == [], "accepted, not documented"
    assert sorted(set(entries) - keys) == [], "documented, not accepted"
    assert options == documented_options == {
        "tls", "name", "ca_file", "ca_path", "client_cert", "client_key",
        "order"}


def test_every_number_directive_has_its_default_and_range_documented():
    src = c_source("imapfe.c")
    defines = dict(re.findall(r"#define (\w+)\s+(\d+)",
                              c_source("imapfe.h")))
    defaults = {f: int(v) << int(shift or 0) for f, v, shift in re.findall(
        r"cfg->(\w+) = (\d+)(?: << (\d+))?;",
        c_block(src, "\nconfig_defaults("))}
    entries, _ = conf5_entries()
    table = c_block(src, "int_keys[] =")
    rows = re.findall(r'\{ "(\w+)", offsetof\(struct config,\s*(\w+)\),'
                      r'\s*(\w+),\s*(\w+),', table)
    assert len(rows) == table.count("offsetof")
    for name, field, low, high in rows:
        low, high = (int(defines.get(v, v).rstrip("L")) for v in (low, high))
        text = " ".join(entries[name].split())
        assert "Default: %d" % defaults[field] in text, name
        assert "range %d to %d" % (low, high) in text, name
