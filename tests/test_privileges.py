"""Safe on port 25: workers drop to master.user; a fork or socketpair that fails is retried."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import Raw, message, wait_until
from poolmgr import privileges
from poolmgr.testing import DnsServer
from poolmgr.master import ROOT_WARNING

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


@pytest.fixture
def open_dir():
    """A directory `nobody` can reach (pytest's own tmp_path is 0700 root): for the maildir
    and the log file the workers write. Asked for before make_poolmgr, so it outlives it."""
    path = Path(tempfile.mkdtemp(prefix="poolmgr-privdrop-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def ps(pid: int, field: str) -> str:
    return subprocess.run(["ps", "-o", f"{field}=", "-p", str(pid)], capture_output=True,
                          text=True).stdout.strip()


def hard_limit(pid: int) -> int:
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]


def groups(pid: int) -> list[str]:
    status = Path(f"/proc/{pid}/status").read_text()
    return status.partition("\nGroups:")[2].partition("\n")[0].split()


def worker_pids(pm) -> list[int]:
    return pm.worker_pids("smtp") + pm.worker_pids("scanner")


@as_root
def test_workers_run_as_nobody_and_mail_still_flows(open_dir, make_poolmgr):
    pm = make_poolmgr({"master": {"user": "nobody", "log_file": str(open_dir / "mail.log")},
                       "scanner": {"next_hop": f"maildir:{open_dir / 'maildir'}"}}, start=False)
    pm.maildir = open_dir / "maildir"
    pm.start()
    assert ps(pm.proc.pid, "user") == "root"
    # A worker drops to master.user before its first client, once started: the first one
    # answers as the others may still be starting.
    wait_until(lambda: all(ps(pid, "user") == "nobody" for pid in worker_pids(pm)),
               what="every worker running as nobody")
    for pid in worker_pids(pm):
        assert (ps(pid, "user"), ps(pid, "group")) == ("nobody", "nogroup")  # primary group
        assert groups(pid) == []  # no supplementary groups left
        assert ps(pid, "args").startswith(("poolmgr: smtp worker", "poolmgr: scanner worker"))
    with pm.smtp() as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], message("drop")) == {}
    (delivered,) = (pm.maildir / "new").iterdir()
    assert delivered.stat().st_uid == (open_dir / "mail.log").stat().st_uid != 0
    assert ROOT_WARNING not in (open_dir / "mail.log").read_text()


@as_root
def test_workers_as_nobody_reopen_a_rotated_log_file(open_dir, make_poolmgr):
    logfile = open_dir / "mail.log"
    pm = make_poolmgr({"master": {"user": "nobody", "log_file": str(logfile)}})
    logfile.rename(open_dir / "mail.log.1")
    pm.send_signal(signal.SIGUSR1)
    wait_until(logfile.exists, what="a new log file")
    wait_until(lambda: logfile.stat().st_uid != 0, what="the new log file handed over")
    with pm.smtp() as client:
        client.noop()
    wait_until(lambda: "noop=1 quit=1" in logfile.read_text(),
               what="a worker's line in the new file")


@as_root
def test_drop_clears_supplementary_groups_then_group_then_user():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a root process with supplementary groups, as a master may have
        code = 1
        try:
            os.setgroups([4, 27])
            privileges.drop(privileges.Ids("nobody", 65534, 65534))
            os.write(write, repr((os.getgroups(), os.getresgid(), os.getresuid())).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    assert os.read(read, 200).decode() == repr(([], (65534,) * 3, (65534,) * 3))
    assert os.waitpid(pid, 0)[1] == 0


@as_root
def test_workers_as_nobody_still_read_dnsbl_answers(make_poolmgr):
    """dnspython imports an answer's rdata class at first use; after the drop that import may
    be refused (here Python lives under /root, mode 0700), so the worker imports it before
    (the DNSBL's A records, and the client name's PTR and A)."""
    dns = DnsServer({}, ttl=300).start()
    try:
        dns.list("127.0.3.4", "zen.test")
        dns.host_record("mail.example.test", "127.0.3.5")
        pm = make_poolmgr({"master": {"user": "nobody"},
                           "defence": {"dnsbl_sites": ["zen.test"], "nameservers": [dns.address],
                                       "dnsbl_action": "drop", "reverse_lookup": True}})
        raw = Raw(pm.smtp_port, "127.0.3.4")
        assert raw.reply() == (521, ["521 5.7.1 Service unavailable; client [127.0.3.4] "
                                     "blocked using zen.test"])
        raw.close()
        raw = Raw(pm.smtp_port, "127.0.3.5")
        assert raw.reply()[0] == 220
        raw.close()
        wait_until(lambda: "connect from mail.example.test[127.0.3.5]" in pm.log(),
                   what="the client's name")
    finally:
        dns.stop()


@pytest.mark.parametrize("key,value", [("user", "no-such-user-x"), ("group", "no-such-group-x")])
def test_unknown_user_or_group_is_a_config_error(tmp_path, key, value):
    path = tmp_path / "bad.toml"
    user = 'user = "nobody"\n' if key == "group" else ""
    path.write_text(f'[master]\n{user}{key} = "{value}"\n')
    result = subprocess.run([sys.executable, "-m", "poolmgr", "run", "-c", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78  # EX_CONFIG
    assert f"{path}: [master] {key}: unknown {key} '{value}'" in result.stderr
    assert "Traceback" not in result.stderr


@as_root
def test_root_with_user_unset_warns_and_workers_stay_root(make_poolmgr):
    pm = make_poolmgr()
    assert f"poolmgr/master[{pm.proc.pid}]: warning: {ROOT_WARNING}" in pm.log()
    assert {ps(pid, "user") for pid in worker_pids(pm)} == {"root"}


def test_socketpair_out_of_files_is_retried_and_the_master_stays_up(make_poolmgr):
    pm = make_poolmgr()
    master = pm.proc.pid
    # One free descriptor below the limit: an SMTP worker's socketpair (two) fails with EMFILE,
    # a control client (one) is still accepted.
    fds = {int(fd) for fd in os.listdir(f"/proc/{master}/fd")}
    free = [n for n in range(max(fds) + 3) if n not in fds]
    soft, hard = resource.prlimit(master, resource.RLIMIT_NOFILE, (free[1], hard_limit(master)))
    assert pm.run_cli("ctl", "smtp", "+3").returncode == 0
    wait_until(lambda: "warning: fork failed: socketpair: Too many open files -- smtp pool "
               "retries in 1s" in pm.log(), what="the fork failure warning")
    wait_until(lambda: "retries in 2s" in pm.log(), what="the back-off doubling")
    status = pm.status()["pools"]["smtp"]
    assert (status["workers"], status["target"]) == (2, 5)
    resource.prlimit(master, resource.RLIMIT_NOFILE, (soft, hard))
    pm.wait_workers(5, 2)  # the next try succeeds
    assert pm.stop() == 0


@pytest.fixture
def pids_cgroup():
    """A cgroup-v1 pids controller group: its pids.max makes fork() fail with EAGAIN, as a
    host out of processes does (RLIMIT_NPROC does not bind root)."""
    root = Path("/sys/fs/cgroup/pids")
    if os.geteuid() != 0 or not (root / "cgroup.procs").exists():
        pytest.skip("needs root and the cgroup-v1 pids controller")
    group = root / f"poolmgr-test-{os.getpid()}"
    group.mkdir()
    yield group
    for pid in (group / "cgroup.procs").read_text().split():
        (root / "cgroup.procs").write_text(pid)
    group.rmdir()


def test_fork_out_of_processes_is_retried_and_the_master_stays_up(pids_cgroup, make_poolmgr):
    pm = make_poolmgr()
    (pids_cgroup / "cgroup.procs").write_text(str(pm.proc.pid))
    (pids_cgroup / "pids.max").write_text((pids_cgroup / "pids.current").read_text())
    fds = len(os.listdir(f"/proc/{pm.proc.pid}/fd"))
    assert pm.run_cli("ctl", "smtp", "+1").returncode == 0
    wait_until(lambda: "retries in 2s" in pm.log(), what="two fork failures")
    assert "warning: fork failed: fork: Resource temporarily unavailable -- smtp pool retries " \
           "in 1s" in pm.log()
    assert len(os.listdir(f"/proc/{pm.proc.pid}/fd")) == fds  # each socketpair closed again
    assert pm.status()["pools"]["smtp"]["workers"] == 2
    (pids_cgroup / "pids.max").write_text("max")
    pm.wait_workers(3, 2)
    assert pm.stop() == 0
