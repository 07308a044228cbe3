"""make install and uninstall as a packager runs them (issue 7): PREFIX
and DESTDIR honoured, the usual directories, nothing enabled, nothing
left behind."""
import os
import subprocess

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ("imapfe.conf", "imapfe.xinetd", "imapfe.inetd",
            "imapfe.socket", "imapfe@.service")


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
        ["usr/sbin/imapfe", "usr/share/man/man8/imapfe.8"] + examples)
    assert os.stat(os.path.join(dest, "usr/sbin/imapfe")).st_mode & 0o777 \
        == 0o755
    for f in examples + ["usr/share/man/man8/imapfe.8"]:
        assert os.stat(os.path.join(dest, f)).st_mode & 0o777 == 0o644, f
    # the service files name the installed program, not /usr/local's
    for f in examples:
        if f.endswith((".conf", ".socket")):
            continue
        text = open(os.path.join(dest, f)).read()
        assert "/usr/sbin/imapfe" in text and "/usr/local" not in text, f
    make("uninstall", "DESTDIR=" + dest, "PREFIX=/usr")
    assert files_under(dest) == []
    assert not os.path.exists(os.path.join(dest, "usr/share/examples/imapfe"))
