#!/bin/sh
# Install the Debian packages imapfe's build, tests and demo need, when they
# are missing.  Non-interactive; no system service is started (policy-rc.d
# refuses every start while this runs).  Quiet when there is nothing to do.
#
# The SASL tests also run a real Cyrus imapd, but Debian's cyrus-imapd
# "Conflicts: imap-server", which dovecot-imapd provides, so the two cannot
# be installed together.  Dovecot stays the installed IMAP server; of Cyrus
# only cyrus-common (master, ctl_cyrusdb, the libcyrus* libraries, the cyrus
# user) is installed, and the cyrus-imapd package -- whose imapd needs
# nothing beyond cyrus-common and its libraries -- is fetched with
# "apt-get download" and unpacked with "dpkg-deb -x" into $cyrus_dir,
# never installed.  $cyrus_dir/.imapfe-version records the version unpacked,
# which must be cyrus-common's (cyrus-imapd depends on it exactly);
# tests/saslbed.py runs $cyrus_dir/usr/lib/cyrus/bin/imapd.
set -eu
umask 022
pkgs="build-essential clang pkg-config libssl-dev libsasl2-dev libsasl2-modules
sasl2-bin dovecot-core dovecot-imapd python3 python3-pytest curl openssl
valgrind mandoc libsasl2-modules-db cyrus-common libclang-rt-14-dev xinetd
haproxy libldap-dev slapd ldap-utils isync mutt tmux"
cache=/var/cache/imapfe-tests
cyrus_dir=$cache/cyrus-imapd

missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
	    missing="$missing $p"
done

# The cyrus-imapd version to unpack is cyrus-common's; an empty value (not
# installed yet) never matches.
cyrus_version() {
	dpkg-query -W -f='${Version}' cyrus-common 2>/dev/null || :
}
cyrus_ok() {
	v=$(cyrus_version)
	[ -n "$v" ] && [ -x "$cyrus_dir/usr/lib/cyrus/bin/imapd" ] &&
	    [ "$(cat "$cyrus_dir/.imapfe-version" 2>/dev/null)" = "$v" ]
}

[ -z "$missing" ] && cyrus_ok && exit 0
if [ "$(id -u)" != 0 ]; then
	[ -n "$missing" ] &&
	    echo "install-deps: missing packages:$missing (run as root to install)" >&2
	cyrus_ok ||
	    echo "install-deps: $cyrus_dir does not hold cyrus-imapd" \
		"$(cyrus_version) (unpacked, not installed; run as root to" \
		"fetch it)" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
created_policy=""
tmp=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
	if [ -n "$created_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
	if [ -n "$tmp" ]; then rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 1' HUP INT TERM

updated=""
if [ -n "$missing" ]; then
	echo "install-deps: installing$missing"
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		created_policy=1
		printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
	fi
	apt-get update -qq
	updated=1
	# shellcheck disable=SC2086
	apt-get install -y -qq --no-install-recommends $missing >/dev/null
	if [ -n "$created_policy" ]; then
		rm -f /usr/sbin/policy-rc.d
		created_policy=""
	fi
fi

if ! cyrus_ok; then
	v=$(cyrus_version)
	if [ -z "$v" ]; then
		echo "install-deps: cyrus-common is not installed" >&2
		exit 1
	fi
	echo "install-deps: unpacking cyrus-imapd $v into $cyrus_dir"
	mkdir -p "$cache"
	tmp=$(mktemp -d "$cache/.cyrus-imapd.XXXXXX")
	# apt fetches as _apt, which must be able to write the directory.
	if id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
	if ! (cd "$tmp" && apt-get download -qq "cyrus-imapd=$v") 2>/dev/null
	then
		# The package lists may predate the installed cyrus-common.
		if [ -z "$updated" ]; then apt-get update -qq; fi
		(cd "$tmp" && apt-get download -qq "cyrus-imapd=$v")
	fi
	set -- "$tmp"/cyrus-imapd_*.deb
	if [ $# != 1 ] || [ ! -f "$1" ]; then
		echo "install-deps: apt-get download cyrus-imapd=$v gave no package" >&2
		exit 1
	fi
	deb=$1
	got=$(dpkg-deb -f "$deb" Version)
	if [ "$got" != "$v" ]; then
		echo "install-deps: downloaded cyrus-imapd $got, wanted $v" >&2
		exit 1
	fi
	mkdir "$tmp/root"
	dpkg-deb -x "$deb" "$tmp/root"
	chmod 755 "$tmp/root"
	imapd=$tmp/root/usr/lib/cyrus/bin/imapd
	if [ ! -x "$imapd" ]; then
		echo "install-deps: cyrus-imapd $v has no usr/lib/cyrus/bin/imapd" >&2
		exit 1
	fi
	# Every library imapd needs must come from installed packages
	# (cyrus-common and its dependencies).
	if ldd "$imapd" | grep -q "not found"; then
		echo "install-deps: cyrus-imapd's imapd lacks libraries:" >&2
		ldd "$imapd" | grep "not found" >&2
		exit 1
	fi
	printf '%s\n' "$v" > "$tmp/root/.imapfe-version"
	rm -rf "$cyrus_dir"
	mv "$tmp/root" "$cyrus_dir"
fi
exit 0
