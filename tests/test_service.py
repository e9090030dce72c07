"""poolmgr as a packaged service: where the config is found and what its relative paths mean,
the verbs `reload`, `stop`, `config -n`, exit codes, and the files in conf/ (unit file, man page,
logrotate snippet) checked by the tools that read them."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import wait_until
from poolmgr import config
from poolmgr.cli import build_parser
from poolmgr.manpage import render
from poolmgr.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poolmgr", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


# -- where the configuration is, and what its paths mean
def test_lookup_order(tmp_path, monkeypatch):
    system = tmp_path / "etc" / "poolmgr" / "poolmgr.toml"
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(system))
    monkeypatch.delenv("POOLMGR_CONFIG", raising=False)
    assert config.find(None) is None  # no system file: the embedded defaults
    system.parent.mkdir(parents=True)
    system.write_text("")
    assert config.find(None) == str(system)
    monkeypatch.setenv("POOLMGR_CONFIG", "/from/env.toml")
    assert config.find(None) == "/from/env.toml"
    assert config.find("given.toml") == "given.toml"


def test_relative_paths_are_taken_from_the_config_files_directory(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    path = tmp_path / "site" / "poolmgr.toml"
    path.parent.mkdir()
    path.write_text('[master]\npidfile = "run/p.pid"\n[scanner]\nnext_hop = "maildir:mail"\n')
    cfg = config.load(str(path))
    assert cfg.master.pidfile == str(tmp_path / "site" / "run" / "p.pid")
    assert cfg.scanner.next_hop.path == str(tmp_path / "site" / "mail")
    # Defaults not written in the file: ./var beside it.
    assert cfg.master.control_socket == str(tmp_path / "site" / "var" / "poolmgr.sock")
    assert config.control_socket_of(str(path)) == cfg.master.control_socket
    assert config.load(None).master.pidfile == "/var/poolmgr.pid"  # no file: the working dir


def test_a_config_in_the_system_directory_gets_the_system_layout(tmp_path, monkeypatch):
    system = tmp_path / "etc" / "poolmgr" / "poolmgr.toml"
    system.parent.mkdir(parents=True)
    system.write_text('[scanner]\nquarantine = "kept"\n')
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(system))
    cfg = config.load(str(system))
    assert cfg.master.control_socket == "/run/poolmgr/poolmgr.sock"
    assert cfg.master.pidfile == "/run/poolmgr/poolmgr.pid"
    assert str(cfg.scanner.next_hop) == "maildir:/var/lib/poolmgr/maildir"
    assert cfg.scanner.quarantine == str(system.parent / "kept")  # written: relative to /etc
    assert config.control_socket_of(str(system)) == "/run/poolmgr/poolmgr.sock"
    assert config.differences(str(system)) == [("scanner.quarantine", "kept")]


def test_poolmgr_config_from_the_environment(tmp_path):
    path = tmp_path / "env.toml"
    path.write_text('[smtp]\nmin_workers = 3\nmax_workers = 6\nhostname = "mx.example.test"\n'
                    '[master]\npidfile = "./var/poolmgr.pid"\n'
                    '[scanner]\nnext_hop = "maildir:elsewhere"\n')
    env = {**os.environ, "POOLMGR_CONFIG": str(path)}
    checked = cli("check", env=env)
    assert checked.returncode == 0 and f"poolmgr: {path}: configuration OK" in checked.stdout
    changed = cli("config", "-n", env=env)
    assert changed.returncode == 0, changed.stderr
    # pidfile is written but equals its default; listed in the table's order, as written.
    assert changed.stdout == ('smtp.hostname = "mx.example.test"\nsmtp.min_workers = 3\n'
                              'smtp.max_workers = 6\nscanner.next_hop = "maildir:elsewhere"\n')
    path.write_text("[smtp]\nmin_workers = 0\n")
    for verb in (["check"], ["config", "-n"], ["run"], ["reload"], ["quarantine", "list"]):
        result = cli(*verb, env=env)
        assert result.returncode == 78, (verb, result.stderr)  # EX_CONFIG
        assert "[smtp] min_workers: must be at least 1" in result.stderr
    assert cli("run", "--no-such-option").returncode == 2  # a usage error stays 2


# -- verbs against a running master
def test_status_reload_stop_and_exit_codes(make_poolmgr):
    pm = make_poolmgr()
    pid = pm.proc.pid
    reloaded = pm.run_cli("reload")
    assert reloaded.returncode == 0 and f"master pid {pid}" in reloaded.stdout
    wait_until(lambda: (pm.try_status() or {}).get("master", {}).get("generation") == 2,
               what="generation 2")
    assert "received SIGHUP" in pm.log()
    stopped = pm.run_cli("stop")
    assert stopped.returncode == 0 and f"stopped (master pid {pid})" in stopped.stdout
    assert pm.proc.wait(5) == 0 and "graceful stop" in pm.log()
    assert not (pm.dir / "poolmgr.pid").exists()
    down = pm.run_cli("status")
    assert down.returncode == 3 and "is poolmgr running?" in down.stderr  # LSB: not running
    assert pm.run_cli("stop").returncode == 0  # already stopped: nothing to do
    assert pm.run_cli("reload").returncode == 1  # nothing to reload


def test_stop_fast(make_poolmgr):
    pm = make_poolmgr()
    stopped = pm.run_cli("stop", "--fast")
    assert stopped.returncode == 0, stopped.stderr
    assert pm.proc.wait(5) == 0 and "received SIGQUIT" in pm.log()


# -- conf/: the files a packager installs
def test_shipped_man_page_is_generated():
    shipped = (CONF / "poolmgr.8").read_text()
    assert shipped == render(build_parser()), \
        "regenerate with: poolmgr config --man > conf/poolmgr.8"
    result = cli("config", "--man")
    assert result.returncode == 0 and result.stdout == shipped


def test_man_page_renders_without_warnings():
    if not shutil.which("groff"):
        pytest.fail("groff is not installed (Debian package groff-base)")
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(CONF / "poolmgr.8")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""


def test_unit_file_verifies(tmp_path):
    """systemd-analyze verify needs ExecStart's program and Documentation's man page: the copy
    runs this Python's `-m poolmgr`, and MANPATH holds the shipped man page."""
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is not installed (Debian package systemd)")
    unit = (CONF / "poolmgr.service").read_text()
    assert "ExecStart=/usr/local/bin/poolmgr run\n" in unit
    for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID",
                 "KillSignal=SIGTERM", "KillMode=mixed", "LimitNOFILE=65536",
                 "RuntimeDirectory=poolmgr", "StateDirectory=poolmgr", "Restart=on-failure",
                 "RestartPreventExitStatus=78", "#AmbientCapabilities=CAP_NET_BIND_SERVICE",
                 "#User=poolmgr"):
        assert f"\n{line}\n" in unit, line
    copy = tmp_path / "poolmgr.service"
    copy.write_text(unit.replace("/usr/local/bin/poolmgr", f"{sys.executable} -m poolmgr"))
    (tmp_path / "man" / "man8").mkdir(parents=True)
    shutil.copy(CONF / "poolmgr.8", tmp_path / "man" / "man8")
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "MANPATH": str(tmp_path / "man")})
    # A bad value is a warning with exit 0: the output must be empty too.
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def test_sample_sets_only_the_user_and_shows_the_system_defaults(tmp_path, monkeypatch):
    """conf/poolmgr.sample.toml, the packages' /etc/poolmgr/poolmgr.toml: it sets only
    [master] user; every key commented out in it is at its default in /etc/poolmgr/, so
    uncommenting them all changes nothing."""
    system = tmp_path / "etc" / "poolmgr" / "poolmgr.toml"
    system.parent.mkdir(parents=True)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(system))
    # 'poolmgr' need not exist on the machine that runs the tests: an account that does.
    sample = (CONF / "poolmgr.sample.toml").read_text()
    assert sample.count('\nuser = "poolmgr"\n') == 1
    sample = sample.replace('\nuser = "poolmgr"\n', '\nuser = "nobody"\n')
    commented = re.findall(r"^#(\w+ = .*)$", sample, flags=re.M)
    assert len(commented) == len(SETTINGS) - 1
    for text in (sample, re.sub(r"^#(\w+ = )", r"\1", sample, flags=re.M)):
        system.write_text(text)
        assert config.differences(str(system)) == [("master.user", "nobody")]
        cfg = config.load(str(system))
        assert cfg.master.control_socket == "/run/poolmgr/poolmgr.sock"
        assert str(cfg.scanner.next_hop) == "maildir:/var/lib/poolmgr/maildir"


def test_logrotate_snippet_reopens_the_log(make_poolmgr, tmp_path):
    if not shutil.which("logrotate"):
        pytest.fail("logrotate is not installed (Debian package logrotate)")
    log_file = tmp_path / "log" / "poolmgr.log"
    log_file.parent.mkdir()
    pm = make_poolmgr({"master": {"log_file": str(log_file)}})
    snippet = (CONF / "poolmgr.logrotate").read_text()
    assert "/var/log/poolmgr.log {" in snippet and "/run/poolmgr/poolmgr.pid" in snippet
    conf = tmp_path / "logrotate.conf"
    conf.write_text(snippet.replace("/var/log/poolmgr.log", str(log_file))
                    .replace("/run/poolmgr/poolmgr.pid", str(pm.dir / "poolmgr.pid")))
    conf.chmod(0o644)
    result = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "log" / "poolmgr.log.1").exists()
    wait_until(lambda: log_file.exists(), what="a new log file")
    assert pm.run_cli("ctl", "smtp", "3").returncode == 0
    wait_until(lambda: "resize (ctl)" in log_file.read_text(), what="the resize in the new log")
    pm.send_signal(signal.SIGTERM)
