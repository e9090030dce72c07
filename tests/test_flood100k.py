"""The 100,000-session scenario (issue 26) and the same shape scaled down against poolmgr and
aiosmtpd: what a large storm's figures count. Apart from tests/test_bench.py so that xdist
runs the long bench tests side by side."""

import json
import sys
from pathlib import Path

import pytest

from poolmgr.benchmark import scenario
from poolmgr.cli import main as cli_main

SMOKE = str(Path(__file__).resolve().parents[1] / "bench" / "scenarios" / "smoke.toml")
FLOOD100K = str(Path(SMOKE).parent / "flood100k.toml")
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


# -- 100,000 sessions (issue 26): the shipped scenario, and the same shape scaled down

def test_flood100k_offers_100000_idle_bots_at_2000_a_second_as_the_readme_configures(capsys):
    plan = scenario.load(FLOOD100K)
    idle = [p.rates.get("idle", 0) for p in plan.phases]
    assert sum(r * p.duration for r, p in zip(idle, plan.phases)) == 100_000
    assert max(idle) == 2000 and all(p.rates["legit"] > 0 for p in plan.phases)
    # Every bot is open at once: the last arrives before the first leaves.
    flood = sum(p.duration for p, r in zip(plan.phases, idle) if r)
    assert plan.profiles["idle"]["hold"] > flood
    assert scenario.peak_connections(plan) >= 100_000
    # Each generator process stays under the open-files limit of one process.
    assert scenario.peak_connections(plan) / plan.processes < scenario.OPEN_FILES - 200
    # The pool's ceiling holds them all, each worker under the open-files limit too.
    s = plan.server
    assert s["smtp_max_workers"] * s["max_sessions_per_worker"] >= 100_000
    assert s["max_sessions_per_worker"] < scenario.OPEN_FILES
    # The README's "Large storms" section gives the settings the scenario runs with.
    section = README[README.index("## Large storms"):]
    section = section[:section.index("\n## ")]
    for words in (f"max_sessions_per_worker = {s['max_sessions_per_worker']}",
                  f"min_workers = {s['smtp_workers']}", f"max_workers = {s['smtp_max_workers']}",
                  f"listen_backlog = {plan.config['smtp']['listen_backlog']}",
                  "stress = false", "somaxconn", "ip_local_port_range", "nf_conntrack",
                  "bench/scenarios/flood100k.toml"):
        assert words in section, words
    assert plan.config["autoscale"]["stress"] is False
    # Too few generator processes for the open-files limit is an error before anything runs.
    with pytest.raises(scenario.ScenarioError, match="raise processes to at least 6"):
        scenario.load(FLOOD100K, ["processes=3"])
    # The planner forecasts the scenario from its file alone.
    assert cli_main(["plan", "--scenario", FLOOD100K, "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)["forecast"]
    assert 100_000 <= predicted["peak_sessions"] <= 100_010
    assert predicted["config"]["smtp"]["max_workers"] == s["smtp_max_workers"]


def test_log_problems_counts_failed_sessions_and_anvil_fallbacks(tmp_path):
    from poolmgr.benchmark.targets import log_problems

    log = tmp_path / "poolmgr.log"
    log.write_bytes(
        b"Dec 07 12:00:00 h poolmgr/smtpd[7]: connect from unknown[127.60.0.1]\n"
        b"Dec 07 12:00:00 h poolmgr/smtpd[7]: error: session with unknown[127.60.0.1] "
        b"failed after CONNECT\n"
        b"Traceback (most recent call last):\n"
        b"Dec 07 12:00:01 h poolmgr/smtpd[7]: error: session with unknown[127.60.0.2] "
        b"failed after EHLO\n"
        + (b"Dec 07 12:00:01 h poolmgr/smtpd[8]: warning: anvil: no answer from the master "
           b"for C 127.60.0.3: timed out -- not limiting\n") * 3 +
        b"Dec 07 12:00:02 h poolmgr/smtpd[8]: warning: 120 log lines dropped\n")
    assert log_problems(log) == {"failed_after_connect": 1, "sessions_failed": 2,
                                 "anvil_no_answer": 3, "log_lines_dropped": 120}


def test_merged_series_carry_a_process_over_a_second_its_ticker_missed():
    """Seven busy generator processes do not each tick every second: a second one missed
    counts its last point before (not 0, which made flood100k's plot a saw), and a second
    ticked twice its last point."""
    from poolmgr.benchmark.run import merge_series

    def point(t, process, idle):
        return {"t": t, "process": process, "open": {"idle": idle}, "legit": {}}

    merged = merge_series([point(0.1, 0, 1), point(0.2, 1, 10), point(1.9, 0, 2),
                           point(2.5, 0, 3), point(2.6, 1, 30), point(2.9, 1, 31),
                           point(3.1, 1, 40)])
    assert [(p["t"], p["open"]["idle"]) for p in merged] == [(0, 11), (1, 12), (2, 34),
                                                            (3, 40)]


def test_a_load_generator_told_to_stop_writes_what_it_has(tmp_path):
    """Past the bench's time limit a generator process gets TERM and still writes its
    records (a process killed at the limit left flood100k a seventh short)."""
    import signal
    import socket
    import subprocess
    import time

    from poolmgr.testing import wait_until
    from poolmgr.testing.poolmgr import own_code_first

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(100)
    listener.settimeout(0.1)
    plan = scenario.from_dict({"processes": 1, "phases": [
        {"duration": "60s", "rates": {"idle": 20}}]})
    spec = tmp_path / "load0.json"
    spec.write_text(json.dumps({"scenario": plan.as_dict(), "targets": [
        ["127.0.0.1", listener.getsockname()[1]]], "index": 0, "processes": 1,
        "t0": time.time()}))
    out = tmp_path / "result0.json"
    proc = subprocess.Popen([sys.executable, "-m", "poolmgr.benchmark.load", str(spec),
                             str(out)], env=own_code_first())
    accepted = []

    def five_connected():
        try:
            accepted.append(listener.accept()[0])
        except OSError:
            pass
        return len(accepted) >= 5

    try:
        wait_until(five_connected, 30, what="five bots connected")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        for conn in accepted:
            conn.close()
        listener.close()
    bots = json.loads(out.read_text())["bots"]
    assert len(bots) >= 5 and all(b["profile"] == "idle" for b in bots)


FLOOD_MINI = """
name = "floodmini"
description = "flood100k's shape scaled down: 2,000 idle bots at 500/s, two processes."
processes = 2
drain = "20s"

[server]
smtp_workers = 2
smtp_max_workers = 4
scanner_workers = 2
max_sessions_per_worker = 600

[config.smtp]
listen_backlog = 4096

[config.autoscale]
stress = false

[[phases]]
name = "calm"
duration = "3s"
rates = { legit = 2 }

[[phases]]
name = "flood"
duration = "4s"
rates = { idle = 500, legit = 2 }

[[phases]]
name = "held"
duration = "5s"
rates = { legit = 2 }

[profiles.idle]
hold = "10s"

[profiles.legit]
timeout = "60s"
sizes = ["2k"]
recipients = ["bob@example.test"]
"""


def test_a_scaled_down_flood_side_by_side_with_aiosmtpd(tmp_path, capsys):
    """flood100k's shape at 2,000 bots: every bot held and greeted by poolmgr, every
    legitimate message delivered, the storm reaction, the accept queue, the log's failures
    and the planner's forecast reported; aiosmtpd's figures beside them."""
    plan = tmp_path / "floodmini.toml"
    plan.write_text(FLOOD_MINI)
    out = tmp_path / "compare"
    assert cli_main(["bench", "compare", str(plan), "--targets", "poolmgr,aiosmtpd",
                     "--out", str(out)]) == 0
    table = json.loads((out / "compare.json").read_text())
    for target, f in table.items():
        assert f["legit_sent"] >= 20 and f["legit_delivered_pct"] == 100.0, (target, f)
        assert f["bot_connections"] == 2000 and f["connect_failed"] == 0, (target, f)
        assert f["bots_greeted"] == 2000, (target, f["bots_ended"])
        assert f["peak_sessions_held"] >= 1800, target
        assert f["pss_per_held_session_bytes"] > 0 and f["cpu_seconds"] > 0, target
        assert f["accept_queue_peak"] >= 0 and f["accept_queue_drops"] >= 0, target
        # The onset: the flood's first second (500/s against the calm phase's 2/s).
        assert f["calm_rate"] <= 3 and f["storm_onset_s"] in (2, 3, 4), (target, f)
        assert 200 <= f["offered_peak_per_s"] <= 2002 and 6 <= f["last_bot_arrival_s"] < 20, f
    f = table["poolmgr"]
    assert 0 < f["latency_p50_s"] <= f["latency_p99_s"] < 10
    # The pool (2 x 600 slots) grew for 2,000 bots: the first new worker accepted within
    # seconds of the onset.
    assert f["peak_smtp_workers"] >= 4 and f["samples_breaking_rules"] == 0, f["rule_breaks"]
    assert f["first_new_smtp_worker_accepting_s"] >= f["first_new_smtp_worker_started_s"] \
        >= f["storm_onset_s"]
    assert 0 < f["storm_reaction_s"] <= 10, f
    assert f["failed_after_connect"] >= 0 and f["anvil_no_answer"] >= 0
    assert abs(f["forecast_error_pct"]) <= 20 and 2000 <= f["forecast_peak_sessions"] <= 2010
    assert table["aiosmtpd"]["storm_reaction_s"] is None  # no pools to grow
    text = (out / "compare.md").read_text()
    for row in ("| storm reaction s | ", "| failed after CONNECT (log) | ",
                "| accept-queue drops (machine) | ", "| forecast error % | "):
        assert row in text, row
    report = (out / "poolmgr" / "report.md").read_text()
    assert "| storm reaction: onset to the first new SMTP worker accepting |" in report
    capsys.readouterr()
    # `poolmgr plan --scenario` forecasts the same and checks it against the run.
    cli_main(["plan", "--scenario", str(plan), "--check",
              str(out / "poolmgr" / "result.json"), "--json"])
    rows = {r["figure"]: r for r in json.loads(capsys.readouterr().out)["check"]["figures"]}
    assert abs(rows["peak_sessions"]["error_pct"]) <= 20, rows
