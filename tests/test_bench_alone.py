"""The benchmark harness's kinds that measure poolmgr alone: the scanner pool by back-end and
pool size (scanner-pool), what [cluster] costs (cluster-overhead)."""

import json
import re
from pathlib import Path

import pytest

from poolmgr.benchmark import scenario
from poolmgr.cli import main as cli_main

SCENARIOS = Path(__file__).resolve().parents[1] / "bench" / "scenarios"


def test_scanner_pool_and_cluster_overhead_scenarios_are_validated(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    for text, message in (
            ('kind = "scanner-pool"\nchecks = ["builtin", "rspamd"]\n', "checks: ['builtin', "
             "'rspamd']: a list of builtin, clamd, spamd"),
            ('kind = "scanner-pool"\nworkers = [1, 0]\n', "workers: [1, 0] is not within 1..64"),
            ('kind = "scanner-pool"\nworkers = 2\n', "workers: 2 is not a list of numbers"),
            ('kind = "scanner-pool"\nduration = "1h"\n', "duration: 3600.0 is not within"),
            ('kind = "cluster-overhead"\nclients = 0\n', "clients: 0 is not within 1..1000"),
            ('kind = "cluster-overhead"\n[[phases]]\nduration = "5s"\nrates = { idle = 1 }\n',
             "a cluster-overhead scenario has no [[phases]]")):
        bad.write_text(text)
        with pytest.raises(scenario.ScenarioError, match=re.escape(message)):
            scenario.load(str(bad))
    # They measure poolmgr alone: against another target, or side by side, is an error.
    good = SCENARIOS / "cluster-overhead.toml"
    assert cli_main(["bench", "run", str(good), "--target", "postfix"]) == 2
    assert cli_main(["bench", "compare", str(good)]) == 2
    assert "measures poolmgr alone" in capsys.readouterr().err


def test_scanner_pool_scenario_measures_each_back_end_and_pool_size(tmp_path, capsys):
    """Every back-end at pool sizes 1 and 2, one short run each, straight to scanner.listen:
    every message sent was accepted and reached smtp-sink, and the back-end daemon did the
    scanning."""
    plan = tmp_path / "scanner.toml"
    plan.write_text('name = "tiny-scanner"\nkind = "scanner-pool"\n'
                    'checks = ["builtin", "clamd", "spamd"]\nworkers = [1, 2]\n'
                    'duration = "1s"\nruns = 1\nsize = "4k"\n')
    out = tmp_path / "scanner"
    assert cli_main(["bench", "run", str(plan), "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["kind"] == "scanner-pool" and result["target"] == "poolmgr"
    figures = result["figures"]
    assert list(figures) == ["builtin", "clamd", "spamd"]
    for name, per_size in figures.items():
        assert list(per_size) == ["1", "2"], name
        for workers, v in per_size.items():
            assert v["checks"] == (["builtin"] if name == "builtin" else ["builtin", name])
            (run,) = v["runs"]
            assert run["clients"] == int(workers)  # clients = 0: one per scanner worker
            assert run["sent"] > 0 and run["failed"] == 0, (name, workers, run)
            assert run["accepted"] == run["sent"] == run["delivered"], (name, workers, run)
            assert 1.0 <= run["seconds"] < 30, (name, workers, run)
            assert run["per_second"] == pytest.approx(run["accepted"] / run["seconds"], rel=0.01,
                                                   abs=0.1)
            assert v["per_second"] == [run["per_second"]] == [v["median"]]
            assert 0 < run["latency_p50_s"] <= run["latency_p99_s"] < 30
            assert run["cpu_seconds"] > 0
            # builtin runs in the scanner worker; clamd and spamd in their own daemons
            assert (run["backend_cpu_seconds"] > 0) == (name != "builtin"), (name, run)
    text = capsys.readouterr().out
    assert "poolmgr bench: builtin+spamd: 2 scanner worker(s), run 1: " in text
    assert re.search(r"poolmgr bench: clamd: 1 worker\(s\) [\d.]+ msgs/s \(runs \[[\d.]+\]\), "
                     r"2 worker\(s\) [\d.]+ msgs/s", text), text
    assert "| builtin+clamd | " in (out / "report.md").read_text()


def test_cluster_overhead_scenario_measures_both_arms_in_turn(tmp_path, capsys):
    """Two rounds of both arms, one second each, two generator processes: every arm completed
    connections, the "on" arms asked Redis and the "off" arms did not, and the cost is the
    arms' means'."""
    plan = tmp_path / "cluster.toml"
    plan.write_text('name = "tiny-cluster"\nkind = "cluster-overhead"\nrounds = 2\n'
                    'duration = "1s"\nclients = 8\nprocesses = 2\n')
    out = tmp_path / "cluster"
    assert cli_main(["bench", "run", str(plan), "--out", str(out)]) == 0
    f = json.loads((out / "result.json").read_text())["figures"]
    assert [(r["round"], r["cluster"]) for r in f["rounds"]] == [
        (1, "off"), (1, "on"), (2, "on"), (2, "off")]
    for r in f["rounds"]:
        assert r["connections"] > 8 and r["failed"] == 0, r
        assert 1.0 <= r["seconds"] < 30, r
        assert r["per_second"] == pytest.approx(r["connections"] / r["seconds"], rel=0.01,
                                                  abs=0.1), r
        if r["cluster"] == "on":  # at least a count up and one down per connection
            assert r["redis_commands_per_connection"] >= 2, r
        else:
            assert r["redis_commands_per_connection"] == 0, r
    for arm in ("off", "on"):
        rates = [r["per_second"] for r in f["rounds"] if r["cluster"] == arm]
        assert f[arm]["rates"] == rates and f[arm]["mean"] == round(sum(rates) / 2, 1)
    assert f["overhead_pct"] == round(100 * (f["off"]["mean"] - f["on"]["mean"]) /
                                      f["off"]["mean"], 1)
    text = capsys.readouterr().out
    assert re.search(r"poolmgr bench: round 2 cluster off: [\d.]+ connections/s", text)
    assert f"[cluster] on costs {f['overhead_pct']}% of the connection rate" in text
    assert "| 1 | on | " in (out / "report.md").read_text()
