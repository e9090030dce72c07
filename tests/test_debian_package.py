"""The Debian package (debian/): `dpkg-buildpackage -b -us -uc` in a copy of this tree (it
writes beside the tree and into it; the sdist is built there too, and both carry conf/ and the
LICENSE), `apt-get install ./poolmgr_*.deb` on this machine,
`/usr/bin/poolmgr check`, `poolmgr run` as the unit runs it (root, the workers as the
`poolmgr` user of the conffile) delivering one message to /var/lib/poolmgr, then
`apt-get purge`, which leaves no file, user or group behind.

Needs root and the build dependencies in debian/control (scripts/test.sh installs them). The
run is in a network namespace of its own: the conffile's listeners (127.0.0.1:2525 and
:10024, its defaults) are nobody else's business on a machine that runs other tests."""

import contextlib
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import psutil
import pytest

import poolmgr
from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
# Not copied to the build: what builds, runs and tests leave in the tree.
LEFT_IN_TREE = {".git", ".pybuild", ".pytest_cache", ".hypothesis", ".benchmarks", "build",
                "dist", "var"}
CONF = sorted((ROOT / "conf").iterdir())
SYSTEM_DIRS = ["/etc", "/usr", "/var", "/run", "/opt", "/srv"]
APT = ["apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=300"]


def run(command, **options) -> subprocess.CompletedProcess:
    options.setdefault("timeout", 300)
    return subprocess.run(command, capture_output=True, text=True, **options)


def system_files(owner: pwd.struct_passwd | None = None) -> set[str]:
    """Files in the system's directories named after poolmgr, or owned by `owner` (the
    poolmgr user, by its uid and gid, once it is gone)."""
    test = ["-name", "*poolmgr*"]
    if owner is not None:
        test += ["-o", "-uid", str(owner.pw_uid), "-o", "-gid", str(owner.pw_gid)]
    found = run(["find", *SYSTEM_DIRS, "-xdev", "(", *test, ")", "-print"])
    return set(found.stdout.split())


def serving() -> bool:
    """Whether the installed poolmgr's pools are up (it answers on /run/poolmgr/poolmgr.sock)."""
    status = run(["/usr/bin/poolmgr", "status", "--json"], cwd="/", timeout=30)
    if status.returncode != 0:
        return False
    pools = json.loads(status.stdout)["pools"]
    return all(0 < pools[name]["workers"] == pools[name]["target"] for name in pools)


def installed() -> bool:
    status = run(["dpkg-query", "-W", "-f=${Status}", "poolmgr"])
    return status.returncode == 0 and "installed" in status.stdout.split()


def copy_of_the_tree(to: Path) -> Path:
    def ignore(directory, names):
        top = Path(directory) == ROOT
        return [n for n in names if n == "__pycache__" or n.endswith(".egg-info")
                or top and n in LEFT_IN_TREE or Path(directory, n) == ROOT / "bench" / "out"]
    shutil.copytree(ROOT, to, ignore=ignore, symlinks=True)
    return to


@contextlib.contextmanager
def no_service_starts():
    """Where systemd runs, the package's postinst starts the service (dh_installsystemd);
    this test runs it itself. invoke-rc.d's policy says no while the package is installed,
    unless the machine already says so (Docker images do)."""
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink()


def test_the_package_installs_delivers_as_poolmgr_and_purges_clean(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("installing a package needs root")
    if not shutil.which("dpkg-buildpackage"):
        pytest.fail("dpkg-buildpackage is not installed (scripts/test.sh installs debhelper)")
    assert not installed(), "poolmgr is installed already: purge it first"
    for lookup in (pwd.getpwnam, grp.getgrnam):
        with pytest.raises(KeyError):
            lookup("poolmgr")  # the package makes and removes them: none may be there before
    before = system_files()

    source = copy_of_the_tree(tmp_path / "poolmgr")
    # The sdist carries conf/ and the LICENSE (the wheel: below, in the package).
    sdist = run(["/usr/bin/python3", "-m", "build", "--sdist", "--no-isolation", "--outdir",
                 str(tmp_path / "dist"), str(source)])
    assert sdist.returncode == 0, sdist.stdout[-3000:] + sdist.stderr[-3000:]
    with tarfile.open(tmp_path / "dist" / f"poolmgr-{poolmgr.__version__}.tar.gz") as tar:
        names = {name.partition("/")[2] for name in tar.getnames()}
    assert {f"conf/{conf.name}" for conf in CONF} | {"LICENSE"} <= names
    built = run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=source)
    assert built.returncode == 0, built.stdout[-5000:] + built.stderr[-5000:]
    deb = tmp_path / f"poolmgr_{poolmgr.__version__}_all.deb"
    assert deb.exists(), sorted(p.name for p in tmp_path.iterdir())

    master = user = None
    try:
        with no_service_starts():
            added = run([*APT, "install", str(deb)], env={**os.environ,
                                                          "DEBIAN_FRONTEND": "noninteractive"})
        assert added.returncode == 0, added.stdout[-3000:] + added.stderr
        assert Path("/usr/bin/poolmgr").read_text().startswith("#!/usr/bin/python3\n")
        # The suite's Python keeps its pip-installed poolmgr (pip's site-packages, or
        # /usr/local/lib/python3.X/dist-packages, come before Debian's dist-packages).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        pip_installed = run([sys.executable, "-c", "import poolmgr; print(poolmgr.__file__)"],
                            cwd="/", env=env)
        assert "/usr/lib/python3/dist-packages/" not in pip_installed.stdout, pip_installed
        package = Path("/usr/lib/python3/dist-packages/poolmgr")
        for conf in CONF:  # conf/ as package data
            assert (package / "conf" / conf.name).read_bytes() == conf.read_bytes(), conf.name
        (metadata,) = package.parent.glob("poolmgr-*.dist-info/METADATA")
        assert "\nLicense: Apache-2.0\n" in metadata.read_text()
        user = pwd.getpwnam("poolmgr")
        assert user.pw_uid < 1000 and user.pw_shell == "/usr/sbin/nologin"
        assert grp.getgrgid(user.pw_gid).gr_name == "poolmgr"
        checked = run(["/usr/bin/poolmgr", "check"], cwd="/")
        assert checked.stdout == "poolmgr: /etc/poolmgr/poolmgr.toml: configuration OK\n", \
            checked.stderr
        assert run(["/usr/bin/poolmgr", "config", "-n"], cwd="/").stdout == \
            'master.user = "poolmgr"\n'
        conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", "poolmgr"]).stdout
        assert "/etc/poolmgr/poolmgr.toml" in conffiles
        assert "/etc/logrotate.d/poolmgr" in conffiles
        unit = Path("/lib/systemd/system/poolmgr.service").read_text()
        assert "\nExecStart=/usr/bin/poolmgr run\n" in unit
        assert Path("/etc/systemd/system/multi-user.target.wants/poolmgr.service").is_symlink()
        for page in ("man8/poolmgr.8.gz", "man5/poolmgr.toml.5.gz"):
            assert Path("/usr/share/man", page).exists(), page
        assert Path("/var/lib/poolmgr").is_dir()

        # As the unit runs it: root, from /, no option; the workers drop to poolmgr.
        log = tmp_path / "run.log"
        with open(log, "w") as out:
            master = subprocess.Popen(
                ["unshare", "--net", "sh", "-c", "ip link set lo up && exec /usr/bin/poolmgr run"],
                cwd="/", stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: master.poll() is not None or serving(), timeout=60, interval=0.5,
                   what="both pools up")
        assert master.poll() is None, log.read_text()
        assert psutil.Process(master.pid).username() == "root"
        workers = lambda: psutil.Process(master.pid).children()  # noqa: E731
        # Each worker drops to the user once started, before its first client.
        wait_until(lambda: {w.username() for w in workers()} == {"poolmgr"},
                   what="every worker running as poolmgr")

        sent = run(["nsenter", f"--net=/proc/{master.pid}/ns/net", "swaks", "--server",
                    "127.0.0.1:2525", "--helo", "client.test", "--from", "alice@example.org",
                    "--to", "user@localhost", "--header", "Subject: from the package"],
                   timeout=60)
        assert "<-  250 2.0.0 Ok: queued as" in sent.stdout, sent.stdout + sent.stderr
        (delivered,) = Path("/var/lib/poolmgr/maildir/new").iterdir()
        assert delivered.owner() == "poolmgr"
        assert "Subject: from the package" in delivered.read_text()

        stopped = run(["/usr/bin/poolmgr", "stop"], cwd="/", timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert master.wait(30) == 0, log.read_text()
        master = None
    finally:
        if master is not None:  # a failed test: its processes by their pids
            for process in [*psutil.Process(master.pid).children(), psutil.Process(master.pid)]:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            master.wait(30)
        purged = run([*APT, "purge", "poolmgr"],
                     env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert purged.returncode == 0, purged.stdout[-3000:] + purged.stderr
    assert not installed()
    for lookup in (pwd.getpwnam, grp.getgrnam):
        with pytest.raises(KeyError):
            lookup("poolmgr")
    assert system_files(user) == before
