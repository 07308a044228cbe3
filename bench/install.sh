#!/bin/sh
# Install the peers the benchmark compares imapfe with -- nginx with its
# mail module and perdition -- when they are missing and we may (root,
# Debian's archive reachable).  Non-interactive; no service is started
# (policy-rc.d refuses every start while this runs).  Never fails the
# benchmark: a peer that cannot be installed is reported "not installed".
set -u
pkgs="nginx-light libnginx-mod-mail perdition linux-perf"
missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
	    missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
	echo "bench/install: missing$missing (run as root to install)" >&2
	exit 0
fi
export DEBIAN_FRONTEND=noninteractive
created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
	created_policy=1
	printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
	chmod 755 /usr/sbin/policy-rc.d
fi
echo "bench/install: installing$missing"
apt-get update -qq >/dev/null 2>&1
for p in $missing; do
	# One at a time: a package missing from the archive skips only itself.
	apt-get install -y -qq --no-install-recommends "$p" >/dev/null 2>&1 ||
	    echo "bench/install: $p could not be installed; skipped" >&2
done
if [ -n "$created_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
exit 0
