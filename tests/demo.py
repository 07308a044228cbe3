"""make demo: a throw-away Dovecot back-end and imapfe on loopback, and a
real IMAP client session through imapfe, shown line by line."""
import imaplib
import os
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import (BIN, USERS, Dovecot, fill_inbox, free_port,  # noqa
                      read_greeting, wait_for)


def main():
    print("Starting a throw-away Dovecot back-end on loopback...")
    dovecot = Dovecot()
    fe = None
    tmp = tempfile.mkdtemp(prefix="imapfe-demo-")
    try:
        fill_inbox(dovecot)
        conf = os.path.join(tmp, "imapfe.conf")
        with open(conf, "w") as f:
            f.write("# the whole configuration of this demo\n"
                    "route * 127.0.0.1:%d\n"
                    "# loopback only: no TLS certificate in this demo\n"
                    "plaintext_auth loopback\n"
                    "# started as root, sessions run as this user\n"
                    "user nobody\ngroup nogroup\n" % dovecot.port)
        port = free_port()
        print("Dovecot listens on 127.0.0.1:%d; imapfe on 127.0.0.1:%d "
              "with %s:" % (dovecot.port, port, conf))
        print("    route * 127.0.0.1:%d\n" % dovecot.port)
        fe = subprocess.Popen([BIN, "-d", "-f", conf, "-l",
                               "127.0.0.1:%d" % port])
        wait_for(lambda: read_greeting(port).startswith(b"* OK"), 10,
                 "imapfe")

        print("A client session through imapfe (Python's imaplib, "
              "protocol trace on):\n")
        m = imaplib.IMAP4("127.0.0.1", port)
        m.debug = 4
        print("S: %s" % m.welcome.decode())
        m.login("alice", USERS["alice"])
        typ, data = m.select("INBOX")
        typ, data = m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS "
                            "(SUBJECT)])")
        m.logout()
        print("\nThe session above went client -> imapfe -> Dovecot. "
              "imapfe's log lines are the 'imapfe[...]' lines.")
        if sys.stdin.isatty():
            print("\nConnect a client of your own while this runs, e.g.:\n"
                  "    curl -u alice:secret imap://127.0.0.1:%d/INBOX\n"
                  "    openssl s_client is for TLS (see imapfe.8); plain: "
                  "telnet 127.0.0.1 %d\n"
                  "Users: %s.  Press Ctrl-C to stop."
                  % (port, port, ", ".join("%s/%s" % kv for kv in
                                           USERS.items() if kv[0] != "carol")))
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
    finally:
        if fe is not None:
            fe.send_signal(signal.SIGTERM)
            fe.wait(timeout=20)
        dovecot.close()
        subprocess.run(["rm", "-rf", tmp])
    print("Demo finished; everything it started has stopped.")


if __name__ == "__main__":
    main()
