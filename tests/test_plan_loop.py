"""The loop of `poolmgr plan`: plan from one bench run, run again with the recommendation,
compare the forecast with what the second run measured."""

import json
import tomllib

from poolmgr.cli import main as cli_main

TINY_WAVE = """
name = "tinywave"
description = "A wave in 14 seconds: the loop of poolmgr plan --bench ... --check."
processes = 1
drain = "20s"

[server]
smtp_workers = 2
smtp_max_workers = 8
scanner_workers = 2
max_sessions_per_worker = 100

[[phases]]
name = "calm"
duration = "2s"
rates = { legit = 2, idle = 5 }

[[phases]]
name = "rising"
duration = "2s"
rates = { legit = 2, idle = 20, pregreet = 5 }

[[phases]]
name = "peak"
duration = "8s"
rates = { legit = 2, idle = 40, pregreet = 5 }

[[phases]]
name = "falling"
duration = "2s"
rates = { legit = 2, idle = 5 }

[profiles.idle]
hold = "5s"

[profiles.pregreet]
hold = "5s"

[profiles.legit]
recipients = ["bob@example.test"]
"""


def test_the_plan_of_a_run_forecasts_the_next_run(tmp_path, capsys):
    wave = tmp_path / "tinywave.toml"
    wave.write_text(TINY_WAVE)
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli_main(["bench", "run", str(wave), "--out", str(first)]) == 0
    config = tmp_path / "recommended.toml"
    assert cli_main(["plan", "--bench", str(first / "result.json"),
                     "--write-config", str(config)]) == 0
    capsys.readouterr()
    assert cli_main(["bench", "run", str(wave), "--config", str(config),
                     "--out", str(second)]) == 0
    capsys.readouterr()
    result = json.loads((second / "result.json").read_text())
    written = tomllib.loads(config.read_text())
    assert result["scenario"]["server"]["smtp_max_workers"] == written["smtp"]["max_workers"]
    code = cli_main(["plan", "--bench", str(first / "result.json"), "--check",
                     str(second / "result.json"), "--json"])
    check = json.loads(capsys.readouterr().out)["check"]
    rows = {r["figure"]: r for r in check["figures"]}
    assert rows["peak_sessions"]["measured"] >= 150, rows
    assert abs(rows["peak_sessions"]["error_pct"]) <= 20, rows
    # One minute of load: its busiest minute is its typical one, so floor = ceiling and the
    # pools stay where they start; the forecast must say so.
    assert rows["smtp_workers"]["predicted"] == written["smtp"]["min_workers"], rows
    assert code == 0 and check["within_tolerance"], check
