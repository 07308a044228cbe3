#!/bin/sh
# Install the Debian packages imapfe's build, tests and demo need, when they
# are missing.  Non-interactive; no system service is started (policy-rc.d
# refuses every start while this runs).
set -eu
pkgs="build-essential clang pkg-config libssl-dev libsasl2-dev libsasl2-modules
sasl2-bin dovecot-core dovecot-imapd python3 python3-pytest curl openssl
valgrind mandoc"
missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
	    missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
	echo "install-deps: missing packages:$missing (run as root to install)" >&2
	exit 1
fi
echo "install-deps: installing$missing"
created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
	created_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
[ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d
exit 0
