"""The benchmark harness: scenario files, the smoke scenario run against poolmgr, and
`bench source` (smtp-source through poolmgr)."""

import json
import re
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from poolmgr.benchmark import scenario
from poolmgr.benchmark.load import address, listed_prefixes
from poolmgr.cli import main as cli_main

SMOKE = str(Path(__file__).resolve().parents[1] / "bench" / "scenarios" / "smoke.toml")
STORM = str(Path(SMOKE).parent / "storm.toml")


def test_scenario_files_are_validated_with_readable_errors(tmp_path):
    plan = scenario.load(SMOKE)
    assert plan.name == "smoke" and plan.duration == 12 and plan.drain == 25
    assert plan.sample_every == 1.0 and scenario.load(STORM).sample_every == 0.2
    assert plan.profiles["impatient"]["give_up"] == 5.0
    assert plan.profiles["legit"]["sizes"] == [2048, 20480, 61440]
    bad = tmp_path / "bad.toml"
    for text, message in (
            ('[[phases]]\nduration = "5s"\nrates = { zombie = 3 }\n',
             "phase 1: unknown profile(s) zombie"),
            ('[[phases]]\nduration = "forever"\nrates = { idle = 3 }\n', "phase 1: duration"),
            ('name = "x"\n', "no [[phases]]"),
            ('[[phases]]\nduration = "5s"\nrates = { idle = 3 }\n[profiles.idle]\nwait = 3\n',
             "profiles.idle: unknown key(s) wait"),
            ('sample_every = "10ms"\n[[phases]]\nduration = "5s"\nrates = { idle = 3 }\n',
             "sample_every: 0.01s is not within 0.1s..60s")):
        bad.write_text(text)
        with pytest.raises(scenario.ScenarioError, match=re.escape(message)):
            scenario.load(str(bad))
    assert cli_main(["bench", "run", str(bad)]) == 2


def test_shipped_scenarios_load_and_are_bounded():
    names = sorted(p.stem for p in Path(SMOKE).parent.glob("*.toml"))
    assert names == ["burst", "cluster-overhead", "content_filter", "flood", "flood100k", "replay",
                     "scanner-pool", "smoke", "soak", "storm", "throughput", "wave"]
    for name in names:
        plan = scenario.load(str(Path(SMOKE).parent / f"{name}.toml"))
        if plan.kind == "source":  # bounded by its messages
            assert not plan.phases and plan.source["messages"] * plan.source["rounds"] <= 100_000
            continue
        m = plan.measure
        if plan.kind == "scanner-pool":  # bounded by its runs' seconds of load
            assert len(m["checks"]) * len(m["workers"]) * m["runs"] * m["duration"] <= 900
            continue
        if plan.kind == "cluster-overhead":
            assert m["rounds"] * 2 * m["duration"] <= 900
            continue
        if plan.kind == "content-filter":  # bounded by its messages
            assert len(m["checks"]) * m["rounds"] * m["messages"] <= 100_000
            continue
        if plan.kind == "soak":  # the long run: an hour, as the issue asks, and no more
            assert plan.duration == m["duration"] == 3600 and plan.drain <= 60
            assert sum(p.duration for p in plan.phases) == 3600
            continue
        assert 0 < plan.duration + plan.drain <= 900, name
        assert all(p.rates for p in plan.phases) and bool(plan.phases) != bool(plan.arrivals)


def test_client_addresses_are_distinct_per_profile_and_process():
    seen = {address(p, i, n) for p in scenario.PROFILES for i in range(2) for n in range(600)}
    assert len(seen) == len(scenario.PROFILES) * 2 * 600
    assert address("listed", 1, 0).startswith(listed_prefixes(2)[1])


def test_smoke_scenario_against_poolmgr(tmp_path, capsys):
    out = tmp_path / "smoke"
    gevent_before = "gevent" in sys.modules  # another test file on this xdist worker may
    assert cli_main(["bench", "run", SMOKE, "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    f = result["figures"]
    assert f["legit_sent"] >= 20
    assert f["legit_outcomes"] == {"accepted": f["legit_sent"]}
    assert f["legit_delivered_pct"] == 100.0  # every message at smtp-sink, by Message-ID
    assert 0 < f["latency_p50_s"] <= f["latency_p99_s"] < 30
    assert f["bot_connections"] >= 200 and f["bots_shed_before_data_pct"] > 80
    # The bots that try to send (a listed client, a dictionary attack) all stop before DATA;
    # the others never try, so the overall share alone would hold with the defences off.
    by_profile = f["bots_shed_before_data_pct_by_profile"]
    assert by_profile["listed"] == 100.0 and by_profile["dictionary"] == 100.0, by_profile
    for reason in ("pregreet", "dnsbl", "bad_recipients"):
        assert f["server_verdicts"].get(reason, 0) > 0, reason
    assert f["peak_sessions_held"] >= 50 and f["rss_peak_bytes"] > f["rss_baseline_bytes"] > 0
    assert f["cpu_seconds"] > 0
    # The autoscaler's figures: every sampled status kept the pool rules.
    assert f["samples_checked"] >= 10 and f["samples_breaking_rules"] == 0, f["rule_breaks"]
    # The storm's onset: the first second of the storm phase (42 connections/s offered against
    # the calmest phase's 2/s), give or take a second of the generator's timing.
    assert 2 <= f["peak_smtp_workers"] <= 4 and f["storm_onset_s"] in (2, 3, 4), f["calm_rate"]
    assert f["handoffs_to_scanner"] >= f["legit_sent"]
    assert len(result["server_series"]) >= 10 and len(result["client_series"]) >= 10
    assert {p for point in result["client_series"] for p in point["open"]} >= {"idle", "legit"}
    report = (out / "report.md").read_text()
    assert "| legitimate delivered (at the next hop) | 100.0% |" in report
    for image in ("connections.png", "latency.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{image}]({image})" in report
    assert "legitimate delivered 100.0%" in capsys.readouterr().out
    # The harness never runs clients in-process (it does not import gevent).
    assert gevent_before or "gevent" not in sys.modules


def test_compare_of_a_source_scenario_takes_rounds_and_gives_poolmgr_s_ratios(tmp_path, capsys):
    """smtp-source through poolmgr and aiosmtpd in turn, twice: each round's messages/second
    and ratio in compare.md."""
    plan = tmp_path / "tiny.toml"
    plan.write_text('name = "tiny"\nkind = "source"\nsessions = 4\nmessages = 200\n'
                    'size = "1k"\nrounds = 2\n')
    out = tmp_path / "compare"
    assert cli_main(["bench", "compare", str(plan), "--targets", "poolmgr,aiosmtpd",
                     "--out", str(out)]) == 0
    table = json.loads((out / "compare.json").read_text())
    for target in ("poolmgr", "aiosmtpd"):
        f = table[target]
        assert f["all_arrived"] and len(f["messages_per_second_runs"]) == 2, target
        assert f["messages_per_second"] == sum(f["messages_per_second_runs"]) / 2
    ratios = [a / b for a, b in zip(table["poolmgr"]["messages_per_second_runs"],
                                    table["aiosmtpd"]["messages_per_second_runs"])]
    assert table["aiosmtpd"]["poolmgr_ratio_runs"] == [round(r, 3) for r in ratios]
    assert table["poolmgr"]["poolmgr_ratio"] == 1.0
    text = capsys.readouterr().out
    assert "`smtp-source -s 4 -m 200 -l 1024` from 127.0.0.1, 2 rounds" in text
    assert "| poolmgr / this target, median of the rounds' ratios | 1.00 | " in text


def test_compare_smoke_against_postfix_and_aiosmtpd(tmp_path, capsys):
    out = tmp_path / "compare"
    assert cli_main(["bench", "compare", SMOKE, "--targets", "postfix-postscreen,aiosmtpd",
                     "--out", str(out)]) == 0
    table = json.loads((out / "compare.json").read_text())
    assert sorted(table) == ["aiosmtpd", "postfix-postscreen"]
    for target, f in table.items():
        assert f["legit_sent"] >= 20, target
        # What a target accepted reached smtp-sink; Postfix may defer some legitimate mail
        # (postscreen: "421 4.3.2 All server ports are busy" while bots hold the smtpd slots).
        accepted = f["legit_outcomes"].get("accepted", 0)
        assert accepted + f["legit_outcomes"].get("deferred", 0) == f["legit_sent"], target
        assert f["legit_delivered_pct"] == round(100 * accepted / f["legit_sent"], 2), target
        assert f["peak_sessions_held"] > 0 and f["rss_peak_bytes"] > 0, target
    # postscreen saw the scenario's DNSBL through the harness's DNS server, and the pregreets.
    verdicts = table["postfix-postscreen"]["server_verdicts"]
    assert verdicts.get("dnsbl", 0) > 0 and verdicts.get("pregreet", 0) > 0
    assert table["aiosmtpd"]["spam_accepted"] > table["postfix-postscreen"]["spam_accepted"]
    text = capsys.readouterr().out
    assert "| figure | postfix-postscreen | aiosmtpd |" in text
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "postfix-postscreen" / "report.md").exists()


def test_source_mode_against_poolmgr(tmp_path, capsys):
    """`bench source`: Postfix's smtp-source through both pools; every message at smtp-sink."""
    out = tmp_path / "source"
    assert cli_main(["bench", "source", "--messages", "300", "--sessions", "10",
                     "--out", str(out)]) == 0
    f = json.loads((out / "result.json").read_text())
    assert f["smtp_source_exit"] == 0 and f["target"] == "poolmgr"
    assert f["messages_accepted"] == f["scanned"] == f["arrived_at_sink"] == 300
    assert f["messages_per_second"] > 0 and f["pss_at_rest_mib"] > 0
    assert "messages/second" in capsys.readouterr().out


# -- poolmgr's scanner pool beside amavisd-new (kind = "content-filter")

def test_content_filter_scenarios_are_validated_and_amavisd_is_no_mta(tmp_path):
    plan = scenario.load(str(Path(SMOKE).parent / "content_filter.toml"))
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
        cli_main(["bench", "run", SMOKE, "--target", "amavisd"])
    with pytest.raises(SystemExit, match="postfix is not a content filter"):
        cli_main(["bench", "compare", str(Path(SMOKE).parent / "content_filter.toml"),
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


# -- replaying a mail log as a storm (kind = "replay")

REPLAY = Path(SMOKE).parent / "replay.toml"


def test_a_replay_scenario_takes_its_arrivals_from_the_mail_log(tmp_path):
    """replay.log: 199 connections offered over 30 s; every session, refused ones too, is a
    client at its offset (spread over its second), holding as long as the session did."""
    plan = scenario.load(str(REPLAY))
    assert plan.kind == "replay" and len(plan.arrivals) == 199 and plan.duration == 30
    assert Counter(a[1] for a in plan.arrivals) == {
        "idle": 98, "pregreet": 32, "listed": 28, "dictionary": 21, "legit": 20}
    per_second = Counter(int(a[0]) for a in plan.arrivals)
    assert per_second[0] == 3 and per_second[10] == 14 and sum(per_second.values()) == 199
    assert max(a[2] for a in plan.arrivals if a[1] == "idle") == 12.0
    # speed 2 halves offsets and holds; scale 0.5 keeps every other session
    fast = tmp_path / "fast.toml"
    fast.write_text(f'kind = "replay"\nmaillog = "{REPLAY.parent / "replay.log"}"\n'
                    f'tz = "UTC"\nyear = 2026\nspeed = 2\nscale = 0.5\n')
    half = scenario.load(str(fast))
    assert len(half.arrivals) == 99 and half.duration == 15
    assert max(a[2] for a in half.arrivals if a[1] == "idle") <= 6.0
    for text, message in (('kind = "replay"\n', "a replay needs maillog"),
                          ('kind = "replay"\nmaillog = "nothere.log"\n', "nothere.log"),
                          ('kind = "replay"\nmaillog = "replay.log"\nspeed = 0\n',
                           "speed and scale"),
                          ('kind = "tape"\n', "known kinds are phases, replay")):
        fast.write_text(text.replace("replay.log", str(REPLAY.parent / "replay.log")))
        with pytest.raises(scenario.ScenarioError, match=re.escape(message)):
            scenario.load(str(fast))


def test_replay_against_poolmgr_arrives_as_the_log_did(tmp_path):
    """The sample log at twice its speed against poolmgr: the clients arrive second by second
    as the log's sessions did, each profile as many times, and poolmgr sees them for what
    they are."""
    fast = tmp_path / "fast.toml"
    fast.write_text(REPLAY.read_text().replace('maillog = "replay.log"',
                                               f'maillog = "{REPLAY.parent / "replay.log"}"')
                    .replace("speed = 1.0", "speed = 2.0"))
    plan = scenario.load(str(fast))
    out = tmp_path / "replay"
    assert cli_main(["bench", "run", str(fast), "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    connections = result["connections"]
    assert len(connections) == 199
    assert Counter(c[3] for c in connections) == Counter(a[1] for a in plan.arrivals)
    # The n-th client arrives within half a second of the log's n-th session (counted per
    # second, a client a little late on a busy machine fell into the next second: CI saw
    # 14 of 18 in one).
    late = [round(c - a, 3) for c, a in zip(sorted(c[0] for c in connections),
                                            sorted(a[0] for a in plan.arrivals))]
    assert max(map(abs, late)) < 0.5, late
    # idle clients held as long as their sessions did (poolmgr let them)
    holds = sorted(a[2] for a in plan.arrivals if a[1] == "idle")
    held = sorted(c[1] for c in connections if c[3] == "idle")
    assert all(abs(h - want) < 1.0 for h, want in zip(held, holds)), (held, holds)
    f = result["figures"]
    assert f["legit_outcomes"] == {"accepted": 20} and f["legit_delivered_pct"] == 100.0
    assert f["server_verdicts"].get("pregreet", 0) > 0 and f["server_verdicts"].get("dnsbl", 0) > 0
    # No phases, so no calm one: the storm begins with the first second of more than
    # storm_threshold (20) connections (at twice the log's speed, its fifth), and the SMTP
    # pool never grew for it.
    expected = Counter(int(a[0]) for a in plan.arrivals)
    first = min(second for second, n in expected.items() if n > plan.storm_threshold)
    assert f["calm_rate"] == 0 and abs(f["storm_onset_s"] - first) <= 1, (f, expected)
    assert f["first_smtp_grow"] is None and f["storm_reaction_s"] is None


# -- the loop: plan from one run, run again with the recommendation, compare

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


def test_compare_md_gives_each_peer_s_figures_over_poolmgr_s(tmp_path):
    from poolmgr.benchmark import report

    plan = scenario.load(SMOKE)
    table = {"poolmgr": {"latency_p99_s": 2.5, "pss_per_held_session_bytes": 4096},
             "aiosmtpd": {"latency_p99_s": 5.0, "pss_per_held_session_bytes": 12288}}
    report.compare_report(tmp_path, plan, table, ["poolmgr", "aiosmtpd"])
    text = (tmp_path / "compare.md").read_text()
    assert "| latency p99 s | 2.00 |" in text and "| PSS per held session KiB | 3.00 |" in text


# -- poolmgr alone: the scanner pool by back-end and size, what [cluster] costs

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
    good = Path(SMOKE).parent / "cluster-overhead.toml"
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
