"""The benchmark harness's content-filter kind: poolmgr's scanner pool beside amavisd-new
(`poolmgr bench compare bench/scenarios/content_filter.toml`)."""

import json
import re
from pathlib import Path

import pytest

from poolmgr.benchmark import scenario
from poolmgr.cli import main as cli_main

SCENARIOS = Path(__file__).resolve().parents[1] / "bench" / "scenarios"


def test_content_filter_scenarios_are_validated_and_amavisd_is_no_mta(tmp_path):
    plan = scenario.load(str(SCENARIOS / "content_filter.toml"))
    assert plan.measure == {"checks": ["builtin", "clamd"], "workers": 4, "messages": 2000,
                            "size": 10240, "rounds": 5}
    bad = tmp_path / "bad.toml"
    for text, message in (
            ('kind = "content-filter"\nchecks = ["spamd"]\n',
             "checks: ['spamd']: a list of builtin, clamd"),
            ('kind = "content-filter"\nworkers = [4]\n', "workers: [4] is not a number")):
        bad.write_text(text)
        with pytest.raises(scenario.ScenarioError, match=re.escape(message)):
            scenario.load(str(bad))
    # amavisd serves in Postfix's content_filter place only, poolmgr's MTA peers never do
    with pytest.raises(SystemExit, match="amavisd is a content filter, not an MTA"):
        cli_main(["bench", "run", str(SCENARIOS / "smoke.toml"), "--target", "amavisd"])
    with pytest.raises(SystemExit, match="postfix is not a content filter"):
        cli_main(["bench", "compare", str(SCENARIOS / "content_filter.toml"),
                  "--targets", "poolmgr,postfix"])


def test_content_filter_compare_puts_the_scanner_pool_beside_amavisd(tmp_path, capsys):
    """One short round of each target (the default targets of the kind), checks bypassed
    and with clamd: both delivered every message to smtp-sink, each did its comparison's
    checks, and the report gives every figure per round with poolmgr's ratios."""
    plan = tmp_path / "cf.toml"
    plan.write_text('name = "tiny-cf"\nkind = "content-filter"\nchecks = ["builtin", "clamd"]\n'
                    'workers = 2\nmessages = 40\nsize = "4k"\nrounds = 1\n')
    out = tmp_path / "cf"
    assert cli_main(["bench", "compare", str(plan), "--out", str(out)]) == 0
    table = json.loads((out / "compare.json").read_text())
    assert list(table) == ["builtin", "clamd"]
    for check, figures in table.items():
        for target in ("poolmgr", "amavisd"):
            (r,) = figures[target]["rounds"]
            assert r["smtp_source_exit"] == 0 and r["arrived_at_sink"] == 40, (check, target)
            assert r["command"].startswith("-s 2 -m 40 ") and "-l 4096" in r["command"]
            # two workers (scanner workers; amavisd's children), the master beside them
            assert len(r["pss_workers_after_mib"]) == 2, (check, target, r)
            assert 0 < max(r["pss_workers_after_mib"]) < r["pss_after_mib"], (check, target)
            assert r["messages_per_second"] > 0 and r["cpu_ms_per_message"] > 0
            assert figures[target]["all_arrived"] and figures[target]["workers"] == [2]
        ours, theirs = figures["poolmgr"]["rounds"][0], figures["amavisd"]["rounds"][0]
        assert ours["scanned"] == ours["check_builtin_count"] == 40
        assert ours.get("check_clamd_count", 0) == (40 if check == "clamd" else 0)
        assert "X-Poolmgr-Scan" in ours["header_names"]
        # amavisd says it virus-checked a message, which it does only with clamd here
        assert ("X-Virus-Scanned" in theirs["header_names"]) == (check == "clamd")
        ratios = figures["poolmgr_over_amavisd"]
        assert ratios["messages_per_second"]["runs"] == [
            round(ours["messages_per_second"] / theirs["messages_per_second"], 3)]
        assert ratios["pss_after_mib"]["median"] == round(
            ours["pss_after_mib"] / theirs["pss_after_mib"], 3)
        assert figures["goals"]["messages_per_second"]["met"] == \
            (ratios["messages_per_second"]["median"] >= 5)
    text = capsys.readouterr().out
    assert "`smtp-source -s 2 -m 40 -l 4096` from 127.0.0.1 into each target in turn " \
           "(poolmgr, amavisd)" in text
    assert re.search(r"^\| 1 \| amavisd \| [\d.]+ \| [\d.]+ \| [\d.]+\.\.[\d.]+ \(2\) \| [\d.]+ \| "
                     r"40/40 \|$", text, re.M), text
    assert re.search(r"^Goal: poolmgr's PSS of the tree at most 0.5x amavisd's: \*\*(met|NOT met)"
                     r"\*\* \(median ratio [\d.]+; ", text, re.M), text
