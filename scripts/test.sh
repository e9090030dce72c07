#!/usr/bin/env bash
# Install what the tests need (Debian packages and the Python package with its test extra)
# and run the whole suite. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

# util-linux (unshare), mount and bsdutils (script) run the private Postfix instances; tzdata
# gives the plan tests their time zones; the scanner's check back-ends are tested against the
# real daemons (clamav-daemon, spamd, rspamd), each started by the tests with a private config;
# the service tests run systemd-analyze verify (with man-db for the unit's man page), groff,
# logrotate, fail2ban-regex and pflogsumm on what poolmgr ships and logs; the cluster tests start
# their own redis-server, and for the failover test three sentinels (Debian's redis-sentinel is
# the same program, run as redis-server --sentinel with a private config each), and haproxy
# in front of the nodes (the PROXY protocol). The Debian package is built (debian/control's
# Build-Depends), installed, run in a network namespace of its own (iproute2) and purged; part
# of the suite runs on Debian's own python3 with the python3-* packages the package depends on;
# the bench compares the scanner pool with amavisd-new, started with a private config.
debs=(postfix swaks dnsmasq-base openssl procps util-linux mount bsdutils tzdata clamav-daemon
      spamd spamassassin rspamd systemd man-db groff-base logrotate fail2ban pflogsumm
      redis-server redis-sentinel haproxy iproute2 amavisd-new
      build-essential debhelper dh-python python3-all pybuild-plugin-pyproject
      python3-setuptools python3-wheel python3-build
      python3-gevent python3-greenlet python3-psutil python3-setproctitle python3-dnspython
      python3-prometheus-client python3-redis python3-pytest python3-pytest-timeout
      python3-dnslib)
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix must not configure or start a system instance: the tests run their own.
    echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
    # Nor may the daemons start system instances (clamd, spamd, rspamd, fail2ban, redis,
    # haproxy, amavisd): unless the machine already says so (Docker images do), a policy-rc.d
    # for the time of the install.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        trap '$sudo rm -f "$policy"' EXIT  # also when the install fails
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
    fi
    $sudo apt-get update -q
    $sudo apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}"
    [ -z "$policy" ] || $sudo rm -f "$policy"
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# The suite mostly waits (on daemons starting, timeouts running out), so four pytest-xdist
# workers share the two cores well; a test module stays on one worker (--dist loadfile), which
# starts its module's shared daemons once, and the files go out in the order collected
# (tests/conftest.py puts the longest first). The 15 slowest tests close the output.
exec python3 -m pytest -q -p no:cacheprovider -n 4 --dist loadfile --no-loadscope-reorder \
    --durations=15 "$@"
