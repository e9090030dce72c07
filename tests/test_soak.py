"""The soak kind (`benchmark/soak.py`): its scenario keys and phases, and a short soak against
real processes. Apart from tests/test_bench.py so that xdist runs the long bench tests side
by side."""

import json
import re
from pathlib import Path

import pytest

from poolmgr.benchmark import scenario, soak
from poolmgr.cli import main as cli_main

SMOKE = str(Path(__file__).resolve().parents[1] / "bench" / "scenarios" / "smoke.toml")


# -- the soak: one node for a long time, with storms, outages, a reload and an upgrade

def test_soak_scenario_is_validated_and_made_of_phases(tmp_path):
    """A soak's keys are checked; its phases are steady legitimate mail with the storm's bots
    added from first_storm on, every storm_every; its events fall at fixed shares of the run; --set
    changes a key, a dotted one inside a table."""
    bad = tmp_path / "bad.toml"
    for text, message in (
            ('kind = "soak"\nduration = "5s"\n', "duration: 5 is not within 10..86400"),
            ('kind = "soak"\nstorm = { zombie = 3 }\n', "storm: {'zombie': 3}: connections"),
            ('kind = "soak"\nstorm_every = "10s"\nstorm_length = "10s"\n',
             "storm_length: a storm must end before the next one starts"),
            ('kind = "soak"\nduration = "60s"\nwarmup = "10s"\nnext_hop_down = "15s"\n',
             "next_hop_down: the two outages take more than 40% of the duration"),
            ('kind = "soak"\nwarmup = "2h"\n', "warmup: 7200s is not shorter than the duration"),
            ('kind = "soak"\nduration = "30m"\n',
             "warmup: the run after it (1200s) must hold two storm periods"),
            ('kind = "soak"\nreload = "yes"\n', "reload: 'yes' is not true or false"),
            ('kind = "soak"\nduration = "20m"\nwarmup = "30s"\n',
             "warmup: 30s is not after the upgrade (at 5% of the run, 60s)"),
            ('kind = "soak"\n[[phases]]\nduration = "5s"\nrates = { idle = 1 }\n',
             "a soak scenario has no [[phases]]")):
        bad.write_text(text)
        with pytest.raises(scenario.ScenarioError, match=re.escape(message)):
            scenario.load(str(bad))
    shipped = str(Path(SMOKE).parent / "soak.toml")
    plan = scenario.load(shipped, ["duration=10m", "storm_every=4m", "first_storm=4m",
                                   "warmup=2m", "storm.idle=50", "profiles.idle.hold=20s",
                                   "cluster=true"])
    m = plan.measure
    assert m["duration"] == 600 and m["warmup"] == 120 and m["cluster"] is True
    storm = {"idle": 50.0, "pregreet": 10.0, "listed": 10.0, "dictionary": 5.0}
    assert m["storm"] == storm and plan.profiles["idle"]["hold"] == 20.0
    assert [(p.name, p.duration, p.rates) for p in plan.phases] == [
        ("steady1", 240.0, {"legit": 2.0}), ("storm1", 30.0, {"legit": 2.0, **storm}),
        ("steady2", 210.0, {"legit": 2.0}), ("storm2", 30.0, {"legit": 2.0, **storm}),
        ("steady", 90.0, {"legit": 2.0})]
    early = scenario.load(shipped, ["duration=10m", "warmup=2m", "first_storm=1m",
                                    "storm_every=4m"])
    assert [(p.name, p.duration) for p in early.phases] == [
        ("steady1", 60.0), ("storm1", 30.0), ("steady2", 210.0), ("storm2", 30.0),
        ("steady3", 210.0), ("storm3", 30.0), ("steady", 30.0)]
    assert soak.timeline(m) == [(18.0, "reload"), (30.0, "upgrade"), (180.0, "next_hop_down"),
                                (240.0, "next_hop_up"), (420.0, "next_hop_down"),
                                (480.0, "next_hop_up"), (510.0, "redis_down"),
                                (520.0, "redis_up")]
    with pytest.raises(scenario.ScenarioError, match="expected KEY=VALUE"):
        scenario.load(shipped, ["duration"])
    assert cli_main(["bench", "run", shipped, "--set", "duration=1s"]) == 2


def test_a_short_soak_loses_nothing_through_outages_a_reload_and_an_upgrade(tmp_path, capsys):
    """40 seconds of the soak against real processes: two storms, smtp-sink stopped for 5
    seconds twice, SIGHUP, SIGUSR2 and a Redis restart under traffic, a sample every 5
    seconds. Every 250'd message is at the sink, poolmgr answered 4xx while the next hop was
    down, the upgrade put a new master in, the log holds no traceback."""
    plan = tmp_path / "soak.toml"
    plan.write_text('''name = "short-soak"
kind = "soak"
drain = "20s"
duration = "40s"
legit_rate = 2.0
storm_every = "15s"
storm_length = "3s"
storm = { idle = 20, pregreet = 5, listed = 5, dictionary = 2 }
next_hop_down = "5s"
cluster = true
redis_down = "3s"
sample_every = "5s"
warmup = "10s"

[server]
max_sessions_per_worker = 500

[profiles.idle]
hold = "5s"

[profiles.pregreet]
hold = "5s"

[profiles.listed]
give_up = "10s"

[profiles.legit]
timeout = "30s"
sizes = ["2k", "20k"]
''')
    out = tmp_path / "soak"
    assert cli_main(["bench", "run", str(plan), "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["kind"] == "soak" and result["target"] == "poolmgr"
    f = result["figures"]
    m = f["messages"]
    # Nothing lost: every 250'd message is at the sink; every one sent got an answer.
    assert m["sent"] >= 70 and m["accepted"] >= 40, m
    assert m["lost"] == 0 and m["lost_ids"] == [] and m["found_at_sink"] >= m["accepted"], m
    assert m["accepted"] + m["deferred"] == m["sent"] and m["refused"] == m["failed"] == 0, m
    assert f["tracebacks"] == 0 and f["log"] == {"tracebacks": 0, "reloads": 1, "upgrades": 1}
    # Each kind's events in order; an outage begun late on the jittered beat ends late, so
    # the second next hop outage may still be on when Redis goes down.
    events = [e["event"] for e in f["events"]]
    assert events[:2] == ["reload", "upgrade"] and events.count("upgraded") == 1, f["events"]
    assert [e for e in events if e.startswith("next_hop")] == \
        ["next_hop_down", "next_hop_up"] * 2, f["events"]
    assert [e for e in events if e.startswith("redis")] == ["redis_down", "redis_up"], f["events"]
    assert len(events) == 9, f["events"]
    # While the next hop was down, poolmgr answered 4xx and never 250.
    assert len(f["outages"]) == 2
    for outage in f["outages"]:
        # 5 s asked; the events are ticked on a jittered 1 s beat: the window may be ~1 s short
        assert 4.0 <= outage["to_s"] - outage["from_s"] < 10, outage
        assert outage["deferred"] >= 3 and outage["accepted"] == 0, outage
        assert outage["deferred_reply"].startswith("451 4.4.1 "), outage
    assert m["deferred"] >= sum(o["deferred"] for o in f["outages"])
    # Each storm: its bots, and the legitimate latency meanwhile.
    assert [s["from_s"] for s in f["storms"]] == [15.0, 30.0]
    for storm in f["storms"]:
        assert storm["bot_connections"] >= 60 and storm["accepted"] > 0, storm
        assert 0 < storm["p50_s"] <= storm["p99_s"] < 30, storm
        # Its onset (34 connections/s offered against the steady 2/s); no storm reaction, as
        # 100 bots never fill 2 x 500 slots and the SMTP pool stays where it is.
        assert storm["from_s"] - 1 <= storm["onset_s"] <= storm["from_s"] + 1, storm
        assert storm["storm_reaction_s"] is None, storm
    assert f["steady"]["accepted"] > 0 and f["steady"]["p99_s"] < 30
    # A sample every 5 seconds of the master and each pool; the master is the new one after
    # the upgrade.
    samples = f["samples"]
    assert 8 <= len(samples) <= 14 and samples[0]["t"] < 2
    for point in samples:
        for group in ("master", "smtp", "scanner"):
            g = point[group]
            assert g["processes"] >= 1 and 0 < g["pss"] <= g["rss"] and g["fds_floor"] > 0, \
                (point["t"], group, g)
    upgraded = next(e["t"] for e in f["events"] if e["event"] == "upgraded")
    assert samples[0]["master_pid"] != samples[-1]["master_pid"]
    assert all(p["master_pid"] == samples[-1]["master_pid"] for p in samples
               if p["t"] > upgraded)
    g = f["growth"]
    assert g["from_s"] >= 10 and g["to_s"] >= 35
    assert all(isinstance(g[group][k], float) for group in ("master", "smtp", "scanner")
               for k in ("rss", "pss", "fds_floor")), g
    assert f["flat"] == (g["max_pct"] <= 5.0)
    text = capsys.readouterr().out
    assert f"poolmgr bench: messages: sent {m['sent']}, 250'd {m['accepted']}, " in text
    assert f"at the sink {m['found_at_sink']}; lost 0" in text
    report = (out / "report.md").read_text()
    for heading in ("## Messages", "## Events", "## Next hop down",
                    "## Legitimate latency per storm", "## Memory and file descriptors"):
        assert heading in report
