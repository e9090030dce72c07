import subprocess
import sys
from pathlib import Path

import pytest

from poolmgr import config
from poolmgr.config import ConfigError, parse_duration, parse_size
from poolmgr.pools import Bounds

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "poolmgr", *args], capture_output=True,
                          text=True, timeout=60)


def test_embedded_defaults():
    cfg = config.load(None)
    assert cfg.smtp.listen == (("127.0.0.1", 2525),)
    assert cfg.scanner.listen == ("127.0.0.1", 10024)
    assert cfg.scanner.next_hop.kind == "maildir"
    assert cfg.scanner.next_hop.path.endswith("/var/maildir")
    assert cfg.smtp.timeout == 300.0  # RFC 5321 section 4.5.3.2.7
    assert cfg.smtp.per_record_deadline is True and cfg.smtp.min_data_rate == 500  # as Postfix
    assert cfg.timeouts.data_init == 120.0 and cfg.timeouts.data_done == 600.0
    assert "localhost" in cfg.smtp.mydestination
    assert cfg.master.control_socket_mode == 0o600


def test_shipped_config_is_the_documented_default():
    shipped = (ROOT / "conf" / "poolmgr.toml").read_text()
    assert shipped == config.render_default(), "regenerate with: poolmgr config > conf/poolmgr.toml"
    # Every default written out is the same as none written, in the same place.
    where = str(ROOT / "conf" / "poolmgr.toml")
    assert config.load(where) == config.from_dict({}, where)


def test_every_key_is_commented_in_the_default():
    lines = config.render_default().splitlines()
    for index, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[index - 1].startswith("# "), f"no comment above {line!r}"


@pytest.mark.parametrize("text,seconds", [("300s", 300), ("5m", 300), ("500ms", 0.5),
                                          (7, 7), ("1h", 3600), ("2d", 172800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text,size", [("25M", 25 * 2**20), ("10k", 10240), (10240000, 10240000),
                                       ("1G", 2**30)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_all_errors_are_reported_with_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[smtp]\nmax_workers = -1\ntimeout = "soon"\nfrobnicate = 1\n'
                    '[scanner]\nnext_hop = "carrier-pigeon:x"\n[nonsense]\nx = 1\n')
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    errors = info.value.errors
    text = "\n".join(errors)
    assert f"{path}: [smtp] max_workers: must be at least 0" in text
    assert f"{path}: [smtp] timeout: expected a duration" in text
    assert f"{path}: [smtp] frobnicate: unknown key" in text
    assert f"{path}: [scanner] next_hop: expected smtp:host:port" in text
    assert f"{path}: [nonsense]: unknown section" in text
    assert len(errors) == 5


def test_pool_rule_in_config_is_mended_with_a_warning(tmp_path):
    path = tmp_path / "rule.toml"
    path.write_text("[smtp]\nmin_workers = 1\nmax_workers = 3\n"
                    "[scanner]\nmin_workers = 2\nmax_workers = 4\ntimeout = \"400s\"\n")
    cfg = config.load(str(path))
    text = "\n".join(cfg.warnings)
    assert "[scanner] min_workers: 2 is above smtp.min_workers (1); the SMTP pool starts at 2" in text
    assert "[scanner] max_workers: 4 is above smtp.max_workers (3)" in text
    assert "[scanner] timeout: 400s is not below smtp.proxy_timeout (300s)" in text
    assert cfg.bounds() == Bounds(smtp_floor=2, smtp_ceiling=3, scanner_floor=2, scanner_ceiling=3)
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0 and "poolmgr: warning:" in result.stderr


def test_an_unknown_reverse_action_without_lookups_is_a_warning(tmp_path):
    path = tmp_path / "names.toml"
    path.write_text('[defence]\nreverse_lookup = false\nunknown_reverse_client_action = "reject"\n')
    assert config.load(str(path)).warnings == [
        f"{path}: [defence] unknown_reverse_client_action: reject needs defence.reverse_lookup "
        "= true; no client is looked up, so none is refused"]
    assert config.from_dict({}).warnings == []  # the defaults: lookups on, action ignore

def test_impossible_pool_rule_is_an_error(tmp_path):
    path = tmp_path / "rule.toml"
    path.write_text("[smtp]\nmin_workers = 2\nmax_workers = 3\n"
                    "[scanner]\nmin_workers = 4\nmax_workers = 4\n")
    with pytest.raises(ConfigError, match=r"\[scanner\] min_workers: 4 scanner workers need as "
                                          r"many SMTP workers, above smtp.max_workers \(3\)"):
        config.load(str(path))


def test_a_cluster_without_the_redis_package_is_an_error(tmp_path, monkeypatch):
    """The Debian package only recommends python3-redis: without it, [cluster] redis is a
    config error, not a worker that fails at its first client."""
    path = tmp_path / "cluster.toml"
    path.write_text('[cluster]\nredis = "redis://127.0.0.1:6379/0"\n')
    assert config.load(str(path)).cluster.redis
    monkeypatch.setitem(sys.modules, "redis", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"\[cluster\] redis: needs the Python package redis "
                                          r"\(Debian: python3-redis"):
        config.load(str(path))


def test_too_many_sessions_for_the_open_files_limit(tmp_path):
    path = tmp_path / "files.toml"
    path.write_text("[smtp]\nmax_sessions_per_worker = 999999\n")
    with pytest.raises(ConfigError, match="max_sessions_per_worker: .*RLIMIT_NOFILE"):
        config.load(str(path))


def test_a_listen_backlog_above_somaxconn_is_a_warning():
    """The kernel cuts any listen backlog to net.core.somaxconn without a word: check says so
    (the README's "Large storms")."""
    with open("/proc/sys/net/core/somaxconn") as handle:
        somaxconn = int(handle.read())
    assert config.from_dict({"smtp": {"listen_backlog": somaxconn}}).warnings == []
    warnings = config.from_dict({"smtp": {"listen_backlog": somaxconn + 1}}).warnings
    assert warnings == [f"(embedded defaults): [smtp] listen_backlog: {somaxconn + 1} is above "
                        f"net.core.somaxconn ({somaxconn}), which caps it: raise the sysctl or "
                        f"the backlog is {somaxconn}"]


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[smtp\n")
    with pytest.raises(ConfigError, match=f"{path}: invalid TOML"):
        config.load(str(path))


def test_rules_are_validated(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[[scanner.rules]]\nheader = "Subject"\npattern = "(unclosed"\n')
    with pytest.raises(ConfigError, match=r"\[scanner\] rules: rule 1: bad pattern"):
        config.load(str(path))
    path.write_text('[[scanner.rules]]\nname = "x"\nheader = "Subject"\npattern = "a"\n'
                    'action = "tag"\n')
    (rule,) = config.load(str(path)).scanner.rules
    assert rule["action"] == "tag" and rule["header"] == "subject"


def test_postfix_style_networks_and_hostname_expansion(tmp_path):
    path = tmp_path / "nets.toml"
    path.write_text('[smtp]\nhostname = "mx.example.test"\nmynetworks = ["[::1]/128", '
                    '"10.0.0.0/8"]\nmydestination = ["$myhostname", "Example.TEST."]\n')
    cfg = config.load(str(path))
    assert [str(n) for n in cfg.smtp.mynetworks] == ["::1/128", "10.0.0.0/8"]
    assert cfg.smtp.mydestination == ("mx.example.test", "example.test")


def test_check_command(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[smtp]\nmin_workers = 3\n")
    result = run_cli("check", "-c", str(good))
    assert result.returncode == 0 and "configuration OK" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nmax_recipients = 5\n[scanner]\nmax_requests = -1\n")
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 78  # EX_CONFIG
    assert f"poolmgr: error: {bad}: [smtp] max_recipients: must be at least 100" in result.stderr
    assert f"poolmgr: error: {bad}: [scanner] max_requests: must be at least 1" in result.stderr


def test_run_refuses_an_invalid_config_with_the_same_message(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nlisten = \"nowhere\"\n")
    checked, ran = run_cli("check", "-c", str(bad)), run_cli("run", "-c", str(bad))
    assert ran.returncode == checked.returncode == 78
    assert ran.stderr == checked.stderr
    assert "[smtp] listen: expected host:port" in ran.stderr


def test_config_command_prints_the_default():
    result = run_cli("config")
    assert result.returncode == 0 and result.stdout == config.render_default()


def test_smtp_listen_takes_one_address_or_a_list():
    assert config.from_dict({"smtp": {"listen": "[::]:25"}}).smtp.listen == (("::", 25),)
    both = config.from_dict({"smtp": {"listen": ["0.0.0.0:25", "[::1]:2525"]}}).smtp.listen
    assert both == (("0.0.0.0", 25), ("::1", 2525))
    for bad, reason in (("", "at least one address"), (["a:1", "a:1"], "listed twice"),
                        ([25], "host:port strings"), (["127.0.0.1:10024"], "scanner.*differ")):
        with pytest.raises(ConfigError, match=reason):
            config.from_dict({"smtp": {"listen": bad}})
    # The empty list is no SMTP pool at all (scanner-only mode), not a mistake.
    assert config.from_dict({"smtp": {"listen": []}}).smtp.listen == ()


def test_former_names_still_work():
    """smtp.backlog is now smtp.listen_backlog: a config written with the old name works."""
    assert config.from_dict({"smtp": {"backlog": 64}}).smtp.listen_backlog == 64
    assert config.from_dict({"scanner": {"backlog": 32}}).scanner.listen_backlog == 32
    with pytest.raises(ConfigError, match=r"\[smtp\] listen_backlog: set only one of "
                                          r"listen_backlog and backlog"):
        config.from_dict({"smtp": {"backlog": 64, "listen_backlog": 128}})


@pytest.mark.parametrize("section, key, value, reason", [
    ("smtp", "max_workers", True, "expected an integer, got True"),
    ("smtp", "max_workers", 2.5, "expected an integer, got 2.5"),
    ("smtp", "hostname", 5, "expected a string, got 5"),
    ("autoscale", "enabled", 1, "expected true or false, got 1"),
    ("autoscale", "calm_ratio", True, "expected a number, got True"),
    ("autoscale", "calm_ratio", float("nan"), "must be a finite number, got nan"),
    ("smtp", "timeout", float("inf"), "must be a finite number, got inf"),
    ("smtp", "max_rss", -1, "must not be negative, got -1"),
    ("defence", "greet_wait", -0.5, "must not be negative, got -0.5"),
    ("smtp", "min_data_rate", -1, "must be at least 0, got -1"),
    ("smtp", "min_data_rate", float("nan"), "expected an integer, got nan"),
    ("smtp", "per_record_deadline", "yes", "expected true or false, got 'yes'"),
])
def test_values_of_the_wrong_type_name_the_key(section, key, value, reason):
    with pytest.raises(ConfigError) as info:
        config.from_dict({section: {key: value}})
    assert info.value.errors == [f"(embedded defaults): [{section}] {key}: {reason}"]


def test_min_data_rate_in_a_file_is_checked(tmp_path):
    path = tmp_path / "rate.toml"
    path.write_text("[smtp]\nmin_data_rate = nan\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 78
    assert f"poolmgr: error: {path}: [smtp] min_data_rate: expected an integer, got nan" \
        in result.stderr
    path.write_text("[smtp]\nmin_data_rate = -500\nper_record_deadline = false\n")
    with pytest.raises(ConfigError, match=r"\[smtp\] min_data_rate: must be at least 0"):
        config.load(str(path))
    path.write_text("[smtp]\nmin_data_rate = 0\nper_record_deadline = false\n")
    cfg = config.load(str(path))
    assert (cfg.smtp.min_data_rate, cfg.smtp.per_record_deadline) == (0, False)


@pytest.mark.parametrize("smtp", ['listen = []\nmax_workers = 2', "max_workers = 0"])
def test_scanner_only_mode_drops_the_smtp_side_of_the_rule(tmp_path, smtp):
    """No SMTP pool: 4 scanner workers need no SMTP workers (the refusal of
    test_impossible_pool_rule_is_an_error does not apply), and none are started."""
    path = tmp_path / "scanner-only.toml"
    path.write_text(f"[smtp]\n{smtp}\n[scanner]\nmin_workers = 4\nmax_workers = 4\n"
                    "feeder_maxproc = 4\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "configuration OK" in result.stdout
    cfg = config.load(str(path))
    assert cfg.scanner_only and cfg.warnings == []
    assert cfg.bounds() == Bounds(smtp_floor=0, smtp_ceiling=0, scanner_floor=4, scanner_ceiling=4)


def test_check_warns_when_the_scanner_pool_outgrows_the_feeder(tmp_path):
    """amavisd's $max_servers above the maxproc of Postfix's transport, the classic
    misconfiguration: the workers above it never get mail; the pool is capped there."""
    path = tmp_path / "feeder.toml"
    path.write_text("[smtp]\nlisten = []\n[scanner]\nmin_workers = 2\nmax_workers = 6\n"
                    "feeder_maxproc = 4\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0 and "configuration OK" in result.stdout
    assert result.stderr == (
        f"poolmgr: warning: {path}: [scanner] max_workers: 6 scanner workers are more than "
        "scanner.feeder_maxproc (4), the connections Postfix opens to them (the maxproc of its "
        "content_filter transport); the scanner pool is capped at 4: lower max_workers or "
        "raise that maxproc\n")
    assert config.load(str(path)).bounds() == Bounds(0, 0, 2, 4)


def test_check_warns_when_the_feeder_is_more_than_twice_the_scanner_pool(tmp_path):
    path = tmp_path / "feeder.toml"
    path.write_text("[smtp]\nlisten = []\n[scanner]\nmax_workers = 4\nfeeder_maxproc = 10\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0
    assert ("[scanner] feeder_maxproc: 10 connections from Postfix are more than twice "
            "scanner.max_workers (4): its deliveries wait for a scanner worker") in result.stderr
    unset = config.from_dict({"smtp": {"listen": []}}).warnings
    assert len(unset) == 1 and "[scanner] feeder_maxproc: not set, and poolmgr has no SMTP " \
        "pool: set it to the maxproc of Postfix's content_filter transport" in unset[0]
    assert config.from_dict({"scanner": {"feeder_maxproc": 4}}).warnings == []


def test_leaving_or_entering_scanner_only_mode_needs_a_restart():
    running = config.from_dict({"smtp": {"max_workers": 0}})
    assert running.restart_needed(config.from_dict({})) == "smtp.max_workers"
    assert running.restart_needed(config.from_dict({"smtp": {"max_workers": 0}})) is None


def test_passwords_are_never_said_back(tmp_path):
    """`poolmgr config -n` (pasted into bug reports) and `poolmgr check` hide the cluster's
    passwords: the sentinels' and the master's, and the one in a redis URL."""
    path = tmp_path / "secret.toml"
    path.write_text('[cluster]\nsentinels = ["10.0.0.5:26379"]\npassword = "s3cretPW"\n'
                    'sentinel_password = "s3nt"\n')
    assert config.load(str(path)).cluster.password == "s3cretPW"
    shown = run_cli("config", "-n", "-c", str(path))
    assert shown.returncode == 0 and shown.stdout.splitlines()[1:] == [
        'cluster.password = "***"', 'cluster.sentinel_password = "***"']
    path.write_text('[cluster]\nredis = "redis://:s3cretPW@10.0.0.5:6379/0"\n')
    assert run_cli("config", "-n", "-c", str(path)).stdout == \
        'cluster.redis = "redis://:***@10.0.0.5:6379/0"\n'
    for text in ('sentinels = ["10.0.0.5:26379"]\npassword = 12345678\n',
                 'redis = "redis://:s3cretPW@10.0.0.5:port/0"\n'):
        path.write_text("[cluster]\n" + text)
        result = run_cli("check", "-c", str(path))
        assert result.returncode == 78 and "12345678" not in result.stderr
        assert "s3cretPW" not in result.stderr and "***" in result.stderr or \
            "got an integer (not shown)" in result.stderr, result.stderr


def test_cluster_takes_either_redis_or_sentinels(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text('[cluster]\nsentinels = ["10.0.0.5:26379", "[2001:db8::6]:26379"]\n')
    cfg = config.load(str(path))
    assert cfg.cluster.sentinels == (("10.0.0.5", 26379), ("2001:db8::6", 26379))
    assert cfg.cluster.sentinel_master == "poolmgr" and cfg.cluster.redis == ""
    for text, error in (
            ('redis = "redis://10.0.0.5:6379/0"\nsentinels = ["10.0.0.5:26379"]\n',
             "[cluster] sentinels: set either redis or sentinels, not both"),
            ('sentinels = ["10.0.0.5"]\n',
             "[cluster] sentinels: expected host:port or [ipv6]:port, got '10.0.0.5'"),
            ('sentinels = [":26379"]\n', "[cluster] sentinels: ':26379': name the sentinel's "
                                         "host, e.g. \"10.0.0.5:26379\""),
            ('sentinels = ["a:26379", "a:26379"]\n', "[cluster] sentinels: a sentinel is listed "
                                                      "twice"),
            ('sentinels = ["a:26379"]\nsentinel_master = "my master"\n',
             "[cluster] sentinel_master: 'my master': the name the sentinels monitor the "
             "master as"),
            ('redis = "redis://10.0.0.5:6379/0"\npassword = "secret"\n',
             "[cluster] password: used only with sentinels (with redis, put the password in "
             "the URL")):
        path.write_text("[cluster]\n" + text)
        result = run_cli("check", "-c", str(path))
        assert result.returncode == 78, (text, result.stdout)
        assert f"{path}: {error}" in result.stderr, (text, result.stderr)
    # A master's name alone, without sentinels, changes nothing.
    path.write_text('[cluster]\nsentinel_master = "mymaster"\n')
    assert config.load(str(path)).cluster.sentinels == ()
