"""`poolmgr plan`: the mail log parser on real-format Postfix lines, and the arithmetic.

Every test runs under three local time zones (TZ set for the process): the results must not
depend on the zone of the machine that reads the log, only on the zone the log was written in.
"""

import json
import time
from datetime import datetime

import pytest

from poolmgr import config, forecast, plan, pools
from poolmgr.benchmark import scenario as bench_scenario
from poolmgr.cli import main as cli_main

UTC = plan.zone("UTC")


@pytest.fixture(autouse=True, params=["UTC", "America/New_York", "Asia/Tokyo"])
def local_zone(request, monkeypatch):
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()

# Lines in the format Postfix 3.7 writes (smtpd, postscreen, cleanup/qmgr lines ignored), by a
# syslog daemon running in UTC: the two ISO lines at the end say +00:00.
MAILLOG = """\
Nov 25 10:00:01 mx postfix/postscreen[900]: CONNECT from [192.0.2.10]:40001 to [198.51.100.1]:25
Nov 25 10:00:01 mx postfix/postscreen[900]: PREGREET 11 after 0.12 from [192.0.2.10]:40001: EHLO bot\\r\\n
Nov 25 10:00:02 mx postfix/postscreen[900]: DISCONNECT [192.0.2.10]:40001
Nov 25 10:00:03 mx postfix/postscreen[900]: CONNECT from [192.0.2.11]:40002 to [198.51.100.1]:25
Nov 25 10:00:03 mx postfix/postscreen[900]: DNSBL rank 3 for [192.0.2.11]:40002
Nov 25 10:00:04 mx postfix/postscreen[900]: NOQUEUE: reject: RCPT from [192.0.2.11]:40002: 550 5.7.1 Service unavailable; client [192.0.2.11] blocked using zen.spamhaus.org; from=<a@b.example>, to=<c@example.com>, proto=ESMTP, helo=<bot>
Nov 25 10:00:05 mx postfix/postscreen[900]: DISCONNECT [192.0.2.11]:40002
Nov 25 10:00:05 mx postfix/postscreen[900]: CONNECT from [203.0.113.5]:40003 to [198.51.100.1]:25
Nov 25 10:00:05 mx postfix/postscreen[900]: PASS NEW [203.0.113.5]:40003
Nov 25 10:00:05 mx postfix/smtpd[1001]: connect from mail.partner.example[203.0.113.5]
Nov 25 10:00:06 mx postfix/smtpd[1001]: 4F2A81C0E2: client=mail.partner.example[203.0.113.5]
Nov 25 10:00:06 mx postfix/cleanup[1002]: 4F2A81C0E2: message-id=<1@partner.example>
Nov 25 10:00:07 mx postfix/smtpd[1001]: disconnect from mail.partner.example[203.0.113.5] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5
Nov 25 10:00:10 mx postfix/smtpd[1003]: connect from unknown[192.0.2.20]
Nov 25 10:00:30 mx postfix/smtpd[1003]: lost connection after CONNECT from unknown[192.0.2.20]
Nov 25 10:00:30 mx postfix/smtpd[1003]: disconnect from unknown[192.0.2.20] commands=0/0
Nov 25 10:00:40 mx postfix/smtpd[1004]: connect from unknown[192.0.2.21]
Nov 25 10:00:41 mx postfix/smtpd[1004]: NOQUEUE: reject: RCPT from unknown[192.0.2.21]: 550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown in local recipient table; from=<x@y.example> to=<nobody@example.com> proto=ESMTP helo=<y>
Nov 25 10:00:42 mx postfix/smtpd[1004]: disconnect from unknown[192.0.2.21] ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4
Nov 25 10:01:10 mx postfix/smtpd[1005]: connect from unknown[192.0.2.22]
Nov 25 10:06:10 mx postfix/smtpd[1005]: timeout after EHLO from unknown[192.0.2.22]
Nov 25 10:06:10 mx postfix/smtpd[1005]: disconnect from unknown[192.0.2.22] ehlo=1 commands=1
2026-11-25T10:01:20.500000+00:00 mx postfix/smtpd[1006]: connect from a.example[203.0.113.6]
2026-11-25T10:01:21.000000+00:00 mx postfix/smtpd[1006]: disconnect from a.example[203.0.113.6] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5
this line is not from postfix
"""


def test_parse_real_format_lines():
    sessions = plan.parse_maillog(MAILLOG.splitlines(), year=2026, tz=UTC)
    assert sessions[0].start == datetime(2026, 11, 25, 10, 0, 1, tzinfo=UTC).timestamp()
    reasons = [(s.source, s.legit, s.reason, round(s.hold, 1)) for s in sessions]
    assert reasons == [
        ("postscreen", False, "pregreet", 1.0),
        ("postscreen", False, "dnsbl", 2.0),
        ("smtpd", True, "", 2.0),
        ("smtpd", False, "lost_after_connect", 20.0),
        ("smtpd", False, "reject_550", 2.0),
        ("smtpd", False, "timeout_after_ehlo", 300.0),
        ("smtpd", True, "", 0.5),
    ]


# poolmgr's own log: postscreen's lines inside smtpd's session name its nuisance reason.
POOLMGR_LOG = """\
Nov 25 10:00:01 mx poolmgr/smtpd[700]: connect from unknown[192.0.2.30]
Nov 25 10:00:01 mx poolmgr/smtpd[700]: PREGREET 15 after 0.01 from [192.0.2.30]:40010: EHLO bot.test\\r\\n
Nov 25 10:00:01 mx poolmgr/smtpd[700]: PREGREET action=enforce for [192.0.2.30]:40010
Nov 25 10:00:02 mx poolmgr/smtpd[700]: NOQUEUE: reject: RCPT from [192.0.2.30]:40010: 550 5.7.1 Service unavailable; client [192.0.2.30] blocked using pregreet test; from=<a@example.org>, to=<b@example.test>, proto=ESMTP, helo=<bot.test>
Nov 25 10:00:03 mx poolmgr/smtpd[700]: disconnect from unknown[192.0.2.30] ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4
Nov 25 10:00:04 mx poolmgr/smtpd[701]: connect from unknown[192.0.2.31]
Nov 25 10:00:04 mx poolmgr/smtpd[701]: DNSBL rank 2 for [192.0.2.31]:40011; sites=zen.example(+2); action=drop
Nov 25 10:00:04 mx poolmgr/smtpd[701]: disconnect from unknown[192.0.2.31] commands=0
Nov 25 10:00:05 mx poolmgr/smtpd[701]: connect from unknown[192.0.2.32]
Nov 25 10:00:05 mx poolmgr/smtpd[701]: NOQUEUE: reject: RCPT from [192.0.2.32]:40012: 550 5.7.1 Service unavailable; client [192.0.2.32] blocked using denylist; from=<a@example.org>, to=<b@example.test>, proto=ESMTP, helo=<x>
Nov 25 10:00:06 mx poolmgr/smtpd[701]: disconnect from unknown[192.0.2.32] ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4
Nov 25 10:00:07 mx poolmgr/smtpd[700]: connect from unknown[192.0.2.33]
Nov 25 10:00:09 mx poolmgr/smtpd[700]: PASS NEW [192.0.2.33]:40013
Nov 25 10:00:10 mx poolmgr/smtpd[700]: disconnect from unknown[192.0.2.33] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5
"""


def test_parse_poolmgr_lines():
    sessions = plan.parse_maillog(POOLMGR_LOG.splitlines(), year=2026, tz=UTC)
    assert [(s.source, s.legit, s.reason) for s in sessions] == [
        ("smtpd", False, "pregreet"), ("smtpd", False, "dnsbl"), ("smtpd", False, "reject_550"),
        ("smtpd", True, "")]


def test_per_minute_and_recommendation_show_the_arithmetic():
    sessions = plan.parse_maillog(MAILLOG.splitlines(), year=2026, tz=UTC)
    result = plan.recommend(sessions, sessions_per_worker=2, scan_seconds=1.0)
    first, second = result["minutes"][:2]
    assert (first["connections"], first["legit"], first["nuisance_ratio"]) == (5, 1, 0.8)
    assert first["peak_concurrency"] == 1 and second["connections"] == 2
    assert result["nuisance_ratio"] == round(5 / 7, 3)
    text = plan.render(result)
    assert "busiest minute: 5 connections = 0.08/s x mean hold 5.4s" in text
    assert "Little's law" in text and "[smtp]" in text and "min_workers = 2" in text
    assert "2026-11-25 10:00 " in plan.render(result, UTC)


def test_syslog_timestamps_are_read_in_the_zone_given(local_zone):
    line = ["Nov 25 10:00:01.250 mx postfix/smtpd[1]: connect from unknown[192.0.2.1]",
            "Nov 25 10:00:03 mx postfix/smtpd[1]: disconnect from unknown[192.0.2.1] commands=0"]
    berlin = plan.zone("Europe/Berlin")
    (session,) = plan.parse_maillog(line, year=2026, tz=berlin)
    assert session.start == datetime(2026, 11, 25, 9, 0, 1, 250000, tzinfo=UTC).timestamp()
    (local,) = plan.parse_maillog(line, year=2026)  # default: the local zone
    wall = datetime(2026, 11, 25, 10, 0, 1, 250000, tzinfo=plan.zone(local_zone))
    assert local.start == wall.timestamp() and local.hold == pytest.approx(1.75)
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        plan.zone("Mars/Olympus")


def test_recommendation_follows_littles_law():
    """Figures well above the minimum of 2, so the formula itself is what is checked."""
    base = datetime(2026, 11, 25, 10, 0, tzinfo=UTC).timestamp()
    sessions = []
    for second in range(60):  # busiest minute: 6,000 bots held 30 s, 120 legitimate senders
        sessions += [plan.Session(base + second, base + second + 30, False, "idle")] * 100
        if second % 30 == 0:
            sessions += [plan.Session(base + second, base + second + 2, True)] * 60
    for minute in (1, 2):  # two calm minutes: 600 connections held 10 s
        start = base + 60 * minute
        sessions += [plan.Session(start + s, start + s + 10, False, "idle")
                     for s in range(60) for _ in range(10)]
    result = plan.recommend(sessions, sessions_per_worker=500, scan_seconds=1.5, headroom=2.0)
    # busiest: 6,120/60 = 102/s x mean hold (6000x30 + 120x2)/6120 = 29.45 s = 3004 concurrent
    # -> ceil(3004 x 2 / 500) = 13; typical: 10/s x 10 s = 100 -> ceil(100 x 2 / 500) = 1,
    # raised to the scanner pool: 120/60 = 2 legit/s x 1.5 s x 2 = 6 scanner workers.
    assert result["smtp"] == {"min_workers": 6, "max_workers": 13}
    assert result["scanner"] == {"min_workers": 6, "max_workers": 12}
    text = "\n".join(result["lines"])
    assert "busiest minute: 6120 connections = 102.00/s x mean hold 29.4s" in text
    assert "= 13 (at least 2)" in text and "-> 6 workers" in text


def test_plan_command_reads_a_maillog_and_a_bench_result(tmp_path, capsys):
    log = tmp_path / "maillog"
    log.write_text(MAILLOG)
    assert cli_main(["plan", "--maillog", str(log), "--year", "2026", "--json",
                     "--tz", "UTC"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["sessions"] == 7
    assert "syslog timestamps read in time zone UTC" in err
    assert cli_main(["plan", "--maillog", str(log), "--year", "2026"]) == 0
    assert "syslog timestamps read in time zone local (" in capsys.readouterr().err
    assert cli_main(["plan", "--maillog", str(log), "--tz", "Nowhere/Land"]) == 1
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"started": 1_790_000_000.0, "connections": [
        [0.5, 30.0, False], [1.0, 30.0, False], [2.0, 0.4, True]]}))
    assert cli_main(["plan", "--bench", str(result)]) == 0
    out = capsys.readouterr().out
    assert "3 sessions, nuisance ratio 0.67" in out
    assert cli_main(["plan"]) == 2


def postscreen_storm(connections: int, busy: int, passed: int) -> list[str]:
    """A postscreen storm as Postfix logs it: every client CONNECTs; `busy` of them are refused
    at once (all screening ports busy), `passed` pass the tests and go on to smtpd, which
    delivers their message; the rest hang up during the tests."""
    lines = []
    for n in range(connections):
        stamp = f"Nov 25 10:{n // 600:02d}:{n // 10 % 60:02d}"
        ip, port = f"192.0.{n // 250}.{n % 250 + 1}", 40000 + n
        ps = f"{stamp} mx postfix/postscreen[900]:"
        lines.append(f"{ps} CONNECT from [{ip}]:{port} to [198.51.100.1]:25")
        if n < busy:
            lines.append(f"{ps} NOQUEUE: reject: CONNECT from [{ip}]:{port}: all screening "
                         f"ports busy")
        elif n < busy + passed:
            lines.append(f"{ps} PASS NEW [{ip}]:{port}")
            sd = f"{stamp} mx postfix/smtpd[{2000 + n}]:"
            lines += [f"{sd} connect from unknown[{ip}]",
                      f"{sd} disconnect from unknown[{ip}] ehlo=1 mail=1 rcpt=1 data=1 quit=1 "
                      f"commands=5"]
        else:
            lines += [f"{ps} HANGUP after 1.2 from [{ip}]:{port} in tests after SMTP handshake",
                      f"{ps} DISCONNECT [{ip}]:{port}"]
    return lines


def test_a_postscreen_storm_counts_every_connection_offered():
    """The issue's storm: 3,040 CONNECTs, 2,815 refused as busy, 211 passed; smtpd alone saw
    about 200 sessions, but the offered load is every connection, and the plan says how much
    was refused."""
    sessions = plan.parse_maillog(postscreen_storm(3040, 2815, 211), year=2026)
    assert len(sessions) == 3040
    assert sum(s.refused for s in sessions) == 2815
    assert sum(s.legit for s in sessions) == 211
    assert {s.reason for s in sessions if not s.legit} == {"refused_busy", "hangup"}
    result = plan.recommend(sessions)
    assert result["sessions"] == 3040 and result["refused"] == 2815
    assert result["lines"][0] == ("offered load: 3040 connections, 2815 refused at connect "
                                  "(93%), 211 legitimate")
    assert sum(m["refused"] for m in result["minutes"]) == 2815
    assert "refused" in plan.render(result).splitlines()[1]


@pytest.mark.parametrize("refusal", [
    "warning: Connection concurrency limit exceeded: 11 from unknown[192.0.2.9] for service "
    "smtp",  # poolmgr's and Postfix's anvil limits
    "NOQUEUE: reject: CONNECT from unknown[192.0.2.9]: 554 5.7.1 <unknown[192.0.2.9]>: Client "
    "host rejected: Access denied; proto=SMTP"])
def test_smtpd_refusals_at_connect_are_refused_load(refusal):
    lines = ["Nov 25 10:00:01 mx poolmgr/smtpd[7]: connect from unknown[192.0.2.9]",
             f"Nov 25 10:00:01 mx poolmgr/smtpd[7]: {refusal}",
             "Nov 25 10:00:01 mx poolmgr/smtpd[7]: disconnect from unknown[192.0.2.9] "
             "commands=0"]
    (session,) = plan.parse_maillog(lines, year=2026)
    assert session.refused and session.reason == "refused" and not session.legit


# -- the forecast: what the recommended sizes will do (poolmgr.forecast)

def bench_result(connections, server=None, figures=None, series=None) -> dict:
    return {"started": 1_789_999_980.0, "connections": connections,  # on a whole minute
            "scenario": {"server": {"smtp_workers": 2, "smtp_max_workers": 8,
                                    "scanner_workers": 2, "scanner_max_workers": 4,
                                    "max_sessions_per_worker": 100, **(server or {})}},
            "figures": figures or {}, "server_series": series or []}


def test_peak_is_a_sweep_not_an_average():
    """100 sessions at once for a second in 100 seconds: Little's law over the whole span says
    one session open on average; the peak is 100. A session that ends when another starts is
    not open beside it."""
    burst = [plan.Session(0.0, 1.0, False, "idle")] * 100 + [plan.Session(99.0, 100.0, True)]
    assert forecast.peak(burst) == (100, 0.0)
    chain = [plan.Session(0, 10, False), plan.Session(5, 15, False), plan.Session(10, 20, False)]
    assert forecast.peak(chain) == (2, 5)
    lines = forecast.by_profile(burst, 0.5)
    assert lines[0] == ("  idle: 100 open; Little's law: 100.00/s over the last 1s x mean hold "
                        "1.0s = 100")


def storm(bots: int, legit_per_s: float = 0.0, seconds: int = 60, scan: float = 0.0):
    """`bots` nuisance sessions arriving over 4 s and held for `seconds`, and legitimate
    sessions of 1 s (handed off) at `legit_per_s`."""
    sessions = [plan.Session(4 * n / bots, 4 * n / bots + seconds, False, "idle")
                for n in range(bots)]
    sessions += [plan.Session(t / legit_per_s, t / legit_per_s + max(1.0, scan), True,
                              data=True) for t in range(int(seconds * legit_per_s))]
    return sorted(sessions, key=lambda s: s.start)


def test_the_autoscaler_is_replayed_over_the_load():
    rules = config.load(None).autoscale
    occupancy_only = config.from_dict({"autoscale": {"lead_time": "0s"}}).autoscale
    bounds = pools.Bounds(2, 8, 2, 4)
    # 400 sessions, 100 per worker: a storm (all nuisance, occupancy 1 with 2 workers); on
    # occupancy alone the pool grows while it stays >= 0.75: 5 workers hold 400 at 0.80, 6 at
    # 0.67.
    smtp, scanner, decisions = forecast.simulate(storm(400), bounds, 100, occupancy_only,
                                                 0.01, 1024)
    assert (smtp, scanner) == (6, 2)
    assert decisions[0].startswith("t=") and "storm begins" in decisions[0]
    # The same load, legitimate: no storm, the pool stays at its floor.
    calm = [plan.Session(s.start, s.end, True) for s in storm(400)]
    assert forecast.simulate(calm, bounds, 100, occupancy_only, 0.01, 1024)[:2] == (2, 2)
    # With lead_time (10s), sessions growing by 100/s would need 1,000 more slots: the pool
    # goes to its ceiling as they arrive, legitimate or not.
    assert forecast.simulate(storm(400), bounds, 100, rules, 0.01, 1024)[:2] == (8, 2)
    assert forecast.simulate(calm, bounds, 100, rules, 0.01, 1024)[:2] == (8, 2)
    # Hand-offs that keep more than 80% of the scanner pool busy grow it to its ceiling, and
    # the SMTP pool with it (scanner <= SMTP).
    assert forecast.simulate(storm(10, legit_per_s=2, scan=3.0), bounds, 100, rules, 3.0,
                             1024)[:2] == (4, 4)


def test_forecast_check_and_config_file(tmp_path, capsys):
    """Four minutes of a legitimate message a second, with a storm of 400 idle bots held 50s
    in the second one."""
    connections = [[60 + 4 * n / 400, 50.0, False, "idle", False] for n in range(400)]
    connections += [[t, 1.0, True, "legit", True] for t in range(240)]
    first = tmp_path / "first.json"
    first.write_text(json.dumps(bench_result(connections, figures={"handoff_mean_s": 0.02})))
    written = tmp_path / "recommended.toml"
    assert cli_main(["plan", "--bench", str(first), "--write-config", str(written)]) == 0
    out = capsys.readouterr().out
    assert "peak concurrent sessions: 401 at t=64s" in out and "idle: 400 open" in out
    # The busiest minute: 460 connections = 7.67/s x mean hold 43.6s = 334.3 concurrent, but
    # 401 seen, x 2 headroom / 100 per worker -> a ceiling of 9; the typical one, 1/s x 1s ->
    # a floor of 2.
    # The autoscaler grows the pool to all 9 of them: the sessions grow by 100/s in the
    # storm's first 4s, and 10s (lead_time) of that would need 1,000 more slots.
    cfg = config.load(str(written))
    assert (cfg.smtp.min_workers, cfg.smtp.max_workers, cfg.smtp.max_sessions_per_worker,
            cfg.scanner.min_workers) == (2, 9, 100, 2)
    assert "peak 9 SMTP workers, 2 scanner workers" in out
    sizes = bench_scenario.pool_sizes(cfg)
    assert sizes == {"smtp_workers": 2, "smtp_max_workers": 9, "scanner_workers": 2,
                     "scanner_max_workers": 4, "max_sessions_per_worker": 100}
    second = tmp_path / "second.json"
    for peak_sessions, smtp, code in ((380, 9, 0), (300, 9, 1), (390, 6, 1)):
        second.write_text(json.dumps(bench_result(
            connections, server={"smtp_max_workers": 9},
            figures={"peak_sessions_held": peak_sessions, "peak_smtp_workers": smtp},
            series=[{"scanner_workers": 2}])))
        assert cli_main(["plan", "--bench", str(first), "--check", str(second)]) == code
        table = capsys.readouterr().out.split("\nfigure ")[1].splitlines()
        error = 100 * (401 - peak_sessions) / peak_sessions
        assert table[1].split()[-3:] == ["401", str(peak_sessions), f"{error:+.1f}%"]
        assert table[2].split()[-3:] == ["9", str(smtp), f"{100 * (9 - smtp) / smtp:+.1f}%"]
        assert table[4] == f"within 20%: {'yes' if code == 0 else 'no'}"
    assert cli_main(["plan", "--maillog", str(first), "--check", str(second)]) == 2
