"""Command line: `poolmgr run|check|config|status|ctl|top|reload|stop|quarantine|scan|bench|
plan`.

The configuration is `-c FILE`, else `$POOLMGR_CONFIG`, else /etc/poolmgr/poolmgr.toml when it
exists, else the embedded defaults (config.find). `reload` and `stop` signal the master whose
pid is in `master.pidfile` (HUP; TERM, or QUIT with --fast) and `stop` waits until it is gone.
`config -n` prints what a file sets that differs from the defaults (postconf -n), `config
--man [8|5]` the man pages poolmgr(8) and poolmgr.toml(5), `config --markdown` the configuration
reference (manpage.py, shipped as conf/poolmgr.8, conf/poolmgr.toml.5, docs/configuration.md).

Exit codes (sysexits, LSB) are documented in manpage.EXIT_STATUS; those that are not 0, 1 or
2 (argparse's usage error) are named here.
"""

__all__ = ["main", "build_parser", "format_status", "EXIT_CONFIG", "EXIT_NOT_RUNNING",
           "EXIT_TEMPFAIL", "EXIT_USAGE"]

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from . import __version__, config, control, log
from .status import Status

EXIT_CONFIG = 78      # sysexits.h EX_CONFIG, what systemd and Postfix's tools use
EXIT_NOT_RUNNING = 3  # LSB: `status` of a program that is not running
EXIT_TEMPFAIL = 75    # sysexits.h EX_TEMPFAIL: `scan`, a check could not answer
EXIT_USAGE = 64       # sysexits.h EX_USAGE: `scan --policy` names no bank (2 is a verdict there)
# `scan`'s verdicts as exit codes (rspamc and amavisd's test mode tell them apart too).
# A message a check asks to be tried later (rspamd's greylist) would get a 4xx, as when a
# check fails: 75, no verdict yet.
SCAN_EXIT = {"clean": 0, "spam_tagged": 1, "spam_killed": 1, "virus": 2, "banned": 2,
             "failed": EXIT_TEMPFAIL, "deferred": EXIT_TEMPFAIL}
STOP_MARGIN = 30.0    # seconds `stop` waits beyond the master's own drain and kill deadlines


def _load(path: str | None) -> config.Config:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        for line in exc.errors:
            print(f"poolmgr: error: {line}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _config_path(args) -> str | None:
    return config.find(getattr(args, "config", None))


def cmd_run(args) -> int:
    path = _config_path(args)
    cfg = _load(path)
    log.setup("poolmgr/master", cfg.master)
    from .master import Master

    try:
        return Master(cfg, path).run()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            log.get("master").critical(exc.code.removeprefix("fatal: "))
            return 1
        raise
    finally:
        log.drain()  # the lines a stalled log has not taken yet get a last chance


def cmd_check(args) -> int:
    cfg = _load(_config_path(args))
    for warning in cfg.warnings:
        print(f"poolmgr: warning: {warning}", file=sys.stderr)
    print(f"poolmgr: {cfg.path}: configuration OK")
    return 0


def cmd_config(args) -> int:
    if args.changed:
        path = _config_path(args)
        try:
            changed = config.differences(path)
        except config.ConfigError as exc:
            for line in exc.errors:
                print(f"poolmgr: error: {line}", file=sys.stderr)
            return EXIT_CONFIG
        for name, value in changed:
            print(f"{name} = {config.toml_value(value)}")
        return 0
    if args.man or args.markdown:
        from . import manpage
        if args.markdown:
            sys.stdout.write(manpage.configuration_markdown())
        elif args.man == "5":
            sys.stdout.write(manpage.render_config())
        else:
            sys.stdout.write(manpage.render(build_parser()))
        return 0
    sys.stdout.write(config.render_sample() if args.sample else config.render_default())
    return 0


def _socket_path(args) -> str:
    """The control socket; a config with errors (mid-edit) still names it."""
    if args.socket:
        return args.socket
    path = _config_path(args)
    try:
        return config.load(path).master.control_socket
    except config.ConfigError as exc:
        socket_path = config.control_socket_of(path)
        print(f"poolmgr: warning: {path} has {len(exc.errors)} error(s), see 'poolmgr check'; "
              f"using control socket {socket_path}", file=sys.stderr)
        return socket_path


def _ask(args, payload: dict, down: int = 1) -> dict:
    """One control request; exit 1 when it fails, `down` when the master is not running."""
    try:
        return control.request(_socket_path(args), payload)
    except control.ControlError as exc:
        print(f"poolmgr: {exc}", file=sys.stderr)
        raise SystemExit(down if exc.down else 1) from None


def _alive(pid: int) -> bool:
    """A poolmgr process (not a zombie waiting for its parent) with this pid."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "poolmgr" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _master_pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as handle:
            pid = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _alive(pid) else None


def cmd_reload(args) -> int:
    """HUP to the master, after checking the configuration it will read (exit 78 if bad)."""
    cfg = _load(_config_path(args))
    pid = _master_pid(cfg.master.pidfile)
    if pid is None:
        print(f"poolmgr: not running (pidfile {cfg.master.pidfile})", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"poolmgr: reload requested (master pid {pid}, configuration {cfg.path})")
    return 0


def cmd_stop(args) -> int:
    """TERM (graceful) or QUIT (--fast) to the master; wait until it is gone."""
    path = _config_path(args)
    try:
        cfg = config.load(path)
        pidfile = cfg.master.pidfile
        graceful, scan = cfg.master.graceful_timeout, cfg.scanner.timeout
    except config.ConfigError:  # mid-edit: the master still runs the old one; stop it anyway
        pidfile, graceful, scan = config.setting_of(path, "master.pidfile"), 30.0, 600.0
    pid = _master_pid(pidfile)
    if pid is None:
        print(f"poolmgr: not running (pidfile {pidfile})")
        return 0
    # The master drains SMTP workers for up to graceful_timeout, then the scanner workers,
    # which may finish a scan (scanner.timeout); then it kills.
    timeout = args.timeout if args.timeout is not None else (
        10.0 if args.fast else graceful + max(graceful, scan) + STOP_MARGIN)
    os.kill(pid, signal.SIGQUIT if args.fast else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            print(f"poolmgr: error: master pid {pid} still running after {timeout:g}s",
                  file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(f"poolmgr: stopped (master pid {pid})")
    return 0


def format_status(status: Status) -> str:
    master = status.master
    lines = [f"poolmgr {status.version}  master pid {master.pid}  {master.state}  "
             f"up {master.uptime:.0f}s  generation {master.generation}",
             f"{'pool':<8} {'workers':>7} {'target':>6} {'floor':>5} {'ceiling':>7} "
             f"{'sessions':>8} {'slots':>7} {'busy':>4} {'draining':>8} {'rss MiB':>8}"]
    scanner_only = status.scanner.scanner_only
    for kind, pool in status.pools.items():
        if kind == "smtp" and scanner_only and not pool.workers + pool.draining:
            lines.append(f"{kind:<8} {'none':>7}  (scanner-only: Postfix's content_filter "
                         f"feeds the scanner pool)")
            continue
        lines.append(f"{kind:<8} {pool.workers:>7} {pool.target:>6} {pool.floor:>5} "
                     f"{pool.ceiling:>7} {pool.sessions:>8} {pool.slots:>7} "
                     f"{pool.busy:>4} {pool.draining:>8} {pool.rss / 2**20:>8.1f}")
    if scanner_only:
        fed = status.pools["scanner"].counters
        feeder = status.scanner.feeder_maxproc
        lines.append(f"messages: scanned {fed.get('scanned', 0)}; connections from the feeder "
                     f"{fed.get('connections', 0)}; feeder_maxproc "
                     f"{feeder if feeder else 'not set'}")
    else:
        smtp = status.pools["smtp"].counters
        lines.append(f"messages: accepted {smtp.get('messages_accepted', 0)}, rejected "
                     f"{smtp.get('messages_rejected', 0)}, deferred "
                     f"{smtp.get('messages_tempfailed', 0)}; connections "
                     f"{smtp.get('connections', 0)}")
    nuisance = status.nuisance
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(nuisance.by_reason.items(),
                                                     key=lambda kv: -kv[1])) or "none"
    checks = nuisance.total.health_checks
    lines.append(f"nuisance ratio {nuisance.ratio:.2f} over {nuisance.window:g}s "
                 f"(legit {nuisance.legit}, nuisance {nuisance.nuisance}: {reasons})"
                 + (f"; load balancer health checks {checks} since start" if checks else ""))
    stress, anvil = status.stress, status.anvil
    stress_text = f"on ({stress.source})" if stress.on else "off"
    lines.append(f"stress mode {stress_text}; anvil: {anvil.connections} connections "
                 f"from {anvil.clients} clients, {anvil.greet_passes} greet passes, "
                 f"{anvil.dnsbl_answers} DNSBL answers, {anvil.client_names} client names "
                 f"cached; {anvil.fallbacks} requests not answered in time (not limited)")
    lines.append(status.cluster.summary())
    if status.dnsbl.by_site:  # DNSBL sites are configured
        lines.append(status.dnsbl.summary())
    lines.append(status.scanner.summary())
    lines.append("log lines dropped: master %d, smtp %d, scanner %d" % (
        status.master.log_dropped, *(status.pools[kind].counters.get("log_dropped", 0)
                                     for kind in ("smtp", "scanner"))))
    auto = status.autoscale
    since = time.strftime("%H:%M:%S", time.localtime(auto.since))
    lines.append(f"autoscale {auto.phase if auto.enabled else 'off'} since {since}; pressure "
                 f"{auto.pressure:.2f} (occupancy {auto.occupancy:.2f}, accept queue "
                 f"{auto.backlog}/{auto.backlog_max}), nuisance {auto.nuisance_ratio:.2f}")
    for entry in auto.decisions[-5:]:
        stamp = time.strftime("%H:%M:%S", time.localtime(entry.time))
        lines.append(f"  {stamp} {entry.decision}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    answer = _ask(args, {"cmd": "status"}, down=EXIT_NOT_RUNNING)
    if args.json:
        print(json.dumps(answer["status"], indent=2, sort_keys=True))
    else:
        print(format_status(Status.from_json(answer["status"])))
    return 0


def cmd_ctl(args) -> int:
    answer = _ask(args, {"cmd": "ctl", "args": [args.pool, args.size]})
    print(f"poolmgr: {answer.get('message', '')}",
          file=sys.stdout if answer.get("ok") else sys.stderr)
    return 0 if answer.get("ok") else 1


def cmd_top(args) -> int:
    from . import top

    def fetch() -> Status:
        return Status.from_json(_ask(args, {"cmd": "status"})["status"])

    if args.once or not sys.stdout.isatty():
        first = fetch()
        time.sleep(1.0)
        print("\n".join(top.frame(fetch(), first, 1.0)))
        return 0
    return top.run(fetch)


def _interrupt_on_term() -> None:
    """A bench stopped with SIGTERM (kill PID) stops what it started, as with Ctrl-C: the
    daemons, the target and the load generator go in their `finally`s."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_bench(args) -> int:
    """`bench run` and `bench compare`: one scenario against one target, or several."""
    from .benchmark import report, run, scenario

    _interrupt_on_term()
    try:
        plan = scenario.load(args.scenario, args.set or [])
        if args.config:
            plan.server.update(scenario.pool_sizes(config.load(args.config)))
    except scenario.ScenarioError as exc:
        print(f"poolmgr: error: {exc}", file=sys.stderr)
        return 2
    except config.ConfigError as exc:
        print("\n".join(f"poolmgr: error: {e}" for e in exc.errors), file=sys.stderr)
        return 2
    if plan.kind in ("scanner-pool", "cluster-overhead", "soak"):
        return bench_poolmgr_alone(args, plan)
    if args.bench_command == "compare":
        from .benchmark.targets import CONTENT_FILTERS, MTAS
        given = args.targets or ",".join(
            CONTENT_FILTERS if plan.kind == "content-filter" else MTAS)
        targets = [t.strip() for t in given.split(",") if t.strip()]
        out = Path(args.out or os.path.join("bench", "out", f"{plan.name}-compare"))
        run.compare(plan, targets, out)
        print((out / "compare.md").read_text())
        return 0
    if args.nodes:
        plan.server["nodes"] = args.nodes
    out = Path(args.out or os.path.join("bench", "out", f"{plan.name}-{args.target}"))
    if plan.kind in ("source", "content-filter"):  # the rounds against one target
        run.compare(plan, [args.target], out)
        print((out / "compare.md").read_text())
        return 0
    f = run.run(plan, args.target, out)["figures"]
    print(f"poolmgr bench: {plan.name} against {args.target}: legitimate delivered "
          f"{f['legit_delivered_pct']}%, p99 {f['latency_p99_s']}s; bots shed before DATA "
          f"{f['bots_shed_before_data_pct']}%, spam accepted {f['spam_accepted']}; peak "
          f"sessions {f['peak_sessions_held']}; CPU {f['cpu_seconds']}s; report {out}/report.md")
    if report.reaction_line(f):
        print(f"poolmgr bench: {report.reaction_line(f)}")
    return 0


def bench_poolmgr_alone(args, plan) -> int:
    """`bench run` of a scenario that measures poolmgr alone, against itself: the scanner pool
    by back-end and size (scanner-pool), a node with [cluster] and without (cluster-overhead),
    one node for a long time (soak). Exit 1 when a run lost a message, an arm completed no
    connection, or poolmgr logged a traceback during a soak."""
    from .benchmark import cluster_overhead, scanner_pool, soak

    if args.bench_command == "compare" or args.target != "poolmgr" or args.nodes:
        print(f"poolmgr: error: {args.scenario}: a {plan.kind} scenario measures poolmgr "
              "alone, one node: `poolmgr bench run` it without --target or --nodes",
              file=sys.stderr)
        return 2
    out = Path(args.out or os.path.join("bench", "out", f"{plan.name}-poolmgr"))
    if plan.kind == "scanner-pool":
        f = scanner_pool.measure(plan, out)["figures"]
        lines = scanner_pool.summary_lines(f)
        runs = [r for per_size in f.values() for v in per_size.values() for r in v["runs"]]
        ok = all(r["accepted"] and r["delivered"] == r["accepted"] for r in runs)
    elif plan.kind == "soak":
        f = soak.measure(plan, out)["figures"]
        lines = soak.summary_lines(f)
        ok = f["messages"]["accepted"] > 0 and not f["messages"]["lost"] and not f["tracebacks"]
    else:
        f = cluster_overhead.measure(plan, out)["figures"]
        lines = cluster_overhead.summary_lines(f)
        ok = all(r["connections"] for r in f["rounds"])
    print((out / "report.md").read_text())
    for line in lines:
        print(f"poolmgr bench: {line}")
    print(f"poolmgr bench: result {out}/result.json, report {out}/report.md")
    return 0 if ok else 1


def cmd_bench_source(args) -> int:
    """`bench source`: Postfix's smtp-source through a target to smtp-sink."""
    from .benchmark import source

    _interrupt_on_term()
    out = Path(args.out or os.path.join("bench", "out", f"source-{args.target}"))
    f = source.source(args.target, args.sessions, args.messages, args.size, out)
    print(f"poolmgr bench source: {f['messages']} messages in {f['seconds']}s through "
          f"{args.target}: {f['messages_per_second']} messages/second; {f['arrived_at_sink']} "
          f"at smtp-sink; result {out}/result.json")
    for key, value in f.items():
        print(f"{key:>24}: {value}")
    ok = f["smtp_source_exit"] == 0 and f["arrived_at_sink"] == f["messages"]
    return 0 if ok else 1


def cmd_plan(args) -> int:
    from . import forecast, plan

    if sum(map(bool, (args.maillog, args.bench, args.scenario))) != 1 or \
            (args.check and args.maillog):
        print("poolmgr: error: give one of --maillog FILE, --bench result.json or --scenario "
              "FILE (--check needs --bench or --scenario)", file=sys.stderr)
        return 2
    tz, bench, second, offered, cfg = None, {}, None, None, None
    try:
        if args.scenario:  # the load a scenario offers, with the sizes it names
            from .benchmark import scenario

            offered = scenario.load(args.scenario)
            bench = {"scenario": offered.as_dict()}
            sessions = offered.sessions()
            cfg = config.from_dict(offered.config)
            if args.check:
                with open(args.check) as handle:
                    second = json.load(handle)
                bench["figures"] = {"handoff_mean_s":
                                    second.get("figures", {}).get("handoff_mean_s")}
        elif args.maillog:
            tz = plan.zone(args.tz)
            print(f"poolmgr plan: syslog timestamps read in time zone "
                  f"{args.tz if tz else 'local (' + time.strftime('%Z') + ')'}", file=sys.stderr)
            with open(args.maillog, encoding="utf-8", errors="replace") as handle:
                sessions = plan.parse_maillog(handle, args.year, tz)
        else:
            with open(args.bench) as handle:
                bench = json.load(handle)
            sessions = plan.sessions_from_bench(bench)
            if args.check:
                with open(args.check) as handle:
                    second = json.load(handle)
    except (OSError, ValueError, config.ConfigError) as exc:
        print(f"poolmgr: error: {exc}", file=sys.stderr)
        return 1
    # A bench result knows its sessions per worker and the time a hand-off took.
    server = bench.get("scenario", {}).get("server", {})
    per_worker = args.sessions_per_worker or server.get("max_sessions_per_worker", 2000)
    scan = args.scan_seconds or bench.get("figures", {}).get("handoff_mean_s") or 1.0
    result = plan.recommend(sessions, per_worker, scan)
    if "smtp" not in result:
        print(json.dumps(result, indent=2) if args.json else plan.render(result, tz))
        return 0
    sizes = forecast.sizes_of(result, per_worker)
    if offered is not None:  # the scenario's own sizes
        sizes = forecast.sizes_of_bench(bench)
    elif second is not None:  # what the second run ran with: should be the recommendation
        sizes = forecast.sizes_of_bench(second)
    predicted = forecast.forecast(sessions, sizes, scan, cfg)
    result["forecast"] = dataclasses.asdict(predicted)
    if args.write_config:
        try:
            with open(args.write_config, "w") as handle:
                handle.write(forecast.config_text(forecast.sizes_of(result, per_worker),
                                                  args.bench or args.maillog or args.scenario))
        except OSError as exc:
            print(f"poolmgr: error: {exc}", file=sys.stderr)
            return 1
    ok = True
    if second is not None:
        rows, ok = forecast.compare(predicted, forecast.measured(second))
        result["check"] = {"against": args.check, "figures": rows, "within_tolerance": ok}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(plan.render(result, tz))
        print("\n".join(forecast.render(predicted, "the scenario's sizes" if offered else
                                         "the recommended sizes")))
        if second is not None:
            if sizes != forecast.sizes_of(result, per_worker):
                print(f"note: {args.check} ran with other pool sizes than recommended: "
                      f"the forecast is for the sizes it ran with")
            print(f"\nforecast of {args.bench or args.scenario} against {args.check}:")
            print("\n".join(forecast.render_check(rows, ok)))
        if args.write_config:
            print(f"\nrecommended sizes written to {args.write_config}: "
                  f"poolmgr bench run SCENARIO --config {args.write_config}")
    return 0 if ok else 1


def cmd_quarantine(args) -> int:
    from .scanner import quarantine
    from .smtp.parse import valid_address

    cfg = _load(_config_path(args))
    where = cfg.scanner.quarantine
    if not where:
        print("poolmgr: error: scanner.quarantine is empty: no quarantine", file=sys.stderr)
        return 1
    try:
        if args.action == "list":
            after = quarantine.since(args.since) if args.since else None
            kept = quarantine.select(quarantine.entries(where), after, args.reason or "")
            if args.json:
                print(json.dumps([quarantine.as_dict(e) for e in kept], indent=2,
                                 ensure_ascii=False))
            for entry in kept if not args.json else ():
                print(f"{entry.id}  {entry.date}  [{entry.client}] <{entry.sender}> -> "
                      f"{','.join(f'<{r}>' for r in entry.recipients)}  {entry.verdict}: "
                      f"{entry.reason}{'  (released)' if entry.released else ''}")
            return 0
        if args.action == "purge":
            age = config.parse_duration(args.older_than)
            removed = quarantine.purge(where, age)
            print(f"poolmgr: purged {len(removed)} message(s) older than {args.older_than}")
            return 0
        entry = quarantine.find(where, args.id or "")
        if entry is None:
            print(f"poolmgr: error: no message {args.id!r} in {where}", file=sys.stderr)
            return 1
        if args.action == "show":
            sys.stdout.buffer.write(quarantine.read(where, entry))
            return 0
        bad = [a for a in args.to or () if not valid_address(a)]
        if bad:
            print(f"poolmgr: error: --to {bad[0]!r}: not an address", file=sys.stderr)
            return 2
        to = args.to or list(entry.recipients)
        log.setup("poolmgr/quarantine", cfg.master)
        try:
            result = quarantine.release(cfg, entry, to)
        except quarantine.ReleaseError as exc:
            log.get("quarantine").warning("%s: release failed: %s", entry.id, exc)
            print(f"poolmgr: error: {entry.id}: release failed: {exc}", file=sys.stderr)
            return 1
        log.get("quarantine").info("%s: released from=<%s> to=%s, %s", entry.id, entry.sender,
                                   ",".join(f"<{r}>" for r in to), result)
        print(f"poolmgr: {entry.id}: released ({result})")
        return 0
    except (OSError, ValueError) as exc:
        print(f"poolmgr: error: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1


def _found(result) -> str:
    """What one check found, as key=value words (lists joined by commas)."""
    words = [f"{key}={','.join(map(str, value)) if isinstance(value, (tuple, list)) else value}"
             for key, value in dataclasses.asdict(result).items()
             if key != "check" and value not in ("", (), [], {}, None)]
    return " ".join(words) or "nothing found"


def cmd_scan(args) -> int:
    """One message through the configured checks (rspamc, amavisd's test mode): the verdict,
    what each check found, the headers a delivered copy gets. Exit 0 clean, 1 spam, 2 virus
    or banned, 75 when a check failed, 64 for an unknown --policy bank or a --client that is
    no address."""
    import logging

    from .scanner.scan import UnknownBank, examine_one, scan_header
    from .smtp.parse import BadAddress, forwarded_address

    cfg = _load(_config_path(args))
    try:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as handle:
                data = handle.read()
    except OSError as exc:
        print(f"poolmgr: error: {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    warnings = logging.getLogger("poolmgr-scan")  # a check's failure, to stderr
    if not warnings.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("poolmgr: %(levelname)s: %(message)s"))
        warnings.addHandler(handler)
        warnings.propagate = False
    try:
        client = forwarded_address(args.client) if args.client else ""
    except BadAddress:  # 2 is a verdict here: a usage error is 64
        print(f"poolmgr: error: --client {args.client!r} is not an IP address", file=sys.stderr)
        return EXIT_USAGE
    try:
        found = examine_one(cfg, data, sender=args.sender, rcpts=args.rcpt or (),
                            client=client, helo=args.helo, bank=args.policy, log=warnings)
    except UnknownBank as exc:
        print(f"poolmgr: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    verdict = found.verdict
    code = SCAN_EXIT[verdict.kind]
    if found.failures and code != SCAN_EXIT["virus"]:
        code = EXIT_TEMPFAIL  # a check passed unchecked: no clean bill, nor a sure spam
    headers = (verdict.headers + scan_header(verdict, cfg.scanner.hostname)).decode()
    headers = headers.replace("\r\n\t", " ").splitlines()
    if args.json:
        print(json.dumps({
            "kind": verdict.kind, "action": verdict.action, "summary": verdict.summary,
            "reply": str(verdict.reply) if verdict.reply else None, "score": verdict.score,
            "tests": list(verdict.tests), "subject_tag": verdict.subject_tag,
            "headers": headers, "exit": code, "spam_lovers": list(found.lovers),
            "checks": [{k: v for k, v in dataclasses.asdict(r).items()
                        if v not in ("", (), [], {}, None)} for r in found.results],
            "failures": [dataclasses.asdict(f) for f in found.failures]}, indent=2))
        return code
    print(f"Verdict: {verdict.kind} ({verdict.summary})")
    print(f"Action: {verdict.action}" + (f": {verdict.reply}" if verdict.reply else ""))
    if verdict.score is not None:
        print(f"Score: {verdict.score:.3f}")
    if verdict.tests:
        print(f"Tests: {', '.join(verdict.tests)}")
    for result in found.results:
        print(f"Check {result.check}: {_found(result)}")
    for failure in found.failures:
        print(f"Check {failure.check}: failed ({failure.detail}), on_failure "
              f"{failure.on_failure}")
    if found.lovers:
        print("Spam lovers, delivered tagged: " + ", ".join(f"<{r}>" for r in found.lovers))
    for line in headers:
        print(f"Header: {line}")
    if verdict.subject_tag:
        print(f"Subject tag: {verdict.subject_tag!r}")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolmgr", description=(
        "Prefork SMTP listener pool manager: an SMTP pool that sheds nuisance connections "
        "and a content-scanner pool, supervised by one master."))
    parser.add_argument("--version", action="version", version=f"poolmgr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(parent, name: str, help_text: str, func, with_config: bool = False,
                socket: bool = False):
        """A sub-command; `with_config` adds -c FILE, `socket` adds --socket PATH."""
        p = parent.add_parser(name, help=help_text)
        if with_config:
            p.add_argument("-c", "--config", metavar="FILE",
                           help=f"configuration file (default: $POOLMGR_CONFIG, else "
                                f"{config.SYSTEM_CONFIG} if it exists, else the embedded "
                                f"defaults)")
        if socket:
            p.add_argument("--socket", help="control socket path (overrides the config)")
        p.set_defaults(func=func)
        return p

    command(sub, "run", "run the master in the foreground", cmd_run, with_config=True)
    command(sub, "check", "validate a configuration file", cmd_check, with_config=True)
    conf = command(sub, "config", "print the documented default configuration", cmd_config,
                   with_config=True)
    shown = conf.add_mutually_exclusive_group()
    shown.add_argument("--markdown", action="store_true",
                       help="print the configuration reference as Markdown "
                            "(docs/configuration.md)")
    shown.add_argument("-n", dest="changed", action="store_true",
                       help="print the settings of the configuration file that differ from the "
                            "defaults, as section.key = value (postconf -n)")
    shown.add_argument("--sample", action="store_true",
                       help="print the sample /etc/poolmgr/poolmgr.toml that packages install "
                            "(conf/poolmgr.sample.toml): [master] user = \"poolmgr\", every other "
                            "key commented out at its default")
    shown.add_argument("--man", nargs="?", const="8", choices=("8", "5"), metavar="SECTION",
                       help="print the man page poolmgr(8) (conf/poolmgr.8), or with 5 "
                            "poolmgr.toml(5) (conf/poolmgr.toml.5)")
    status = command(sub, "status", "show pools and counters", cmd_status,
                     with_config=True, socket=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    ctl = command(sub, "ctl", "resize a pool (ctl smtp|scanner N|+N|-N), switch stress mode or "
                  "the autoscaler (ctl stress|autoscale on|off)", cmd_ctl, with_config=True,
                  socket=True)
    ctl.add_argument("pool", choices=("smtp", "scanner", "stress", "autoscale"))
    ctl.add_argument("size", help="N, +N or -N; on or off for stress and autoscale")
    top = command(sub, "top", "live view of the pools, refreshed every second; q quits",
                  cmd_top, with_config=True, socket=True)
    top.add_argument("--once", action="store_true",
                     help="print one frame and exit (also when not on a terminal)")

    command(sub, "reload", "check the configuration, then send HUP to the running master "
            "(its pid from master.pidfile)", cmd_reload, with_config=True)
    stop = command(sub, "stop", "stop the running master (TERM: graceful) and wait until it "
                   "is gone; exit 0 when it is, or was not running", cmd_stop, with_config=True)
    stop.add_argument("--fast", action="store_true",
                      help="fast stop (QUIT): workers exit at once")
    stop.add_argument("--timeout", type=float, metavar="SECONDS",
                      help="give up waiting after this long (default: graceful_timeout plus "
                           "the scanner's, plus 30s; --fast: 10s)")

    quarantined = command(sub, "quarantine", "list, show, release or purge mail the scanner "
                          "kept (scanner.quarantine)", cmd_quarantine, with_config=True)
    quarantined.add_argument("action", choices=("list", "show", "release", "purge"))
    quarantined.add_argument("id", nargs="?", help="quarantine id (show, release)")
    quarantined.add_argument("--json", action="store_true", help="list: machine-readable")
    quarantined.add_argument("--older-than", default="30d", metavar="AGE",
                             help="purge: remove what was kept longer ago (default 30d)")
    quarantined.add_argument("--since", metavar="WHEN",
                             help="list: only what was kept since WHEN, an age (2h, 7d) or a "
                                  "local date and time (2026-12-07, 2026-12-07T10:30)")
    quarantined.add_argument("--reason", metavar="TEXT",
                             help="list: only verdicts starting with TEXT (virus, banned, spam) "
                                  "or reasons containing it (a virus or file name)")
    quarantined.add_argument("--to", action="append", metavar="ADDR",
                             help="release: to this recipient instead of the message's own "
                                  "(amavisd-release's alternate recipient); repeatable")

    scan = command(sub, "scan", "scan one message with the configured checks and print the "
                   "verdict, what each check found and the headers (rspamc, amavisd's test "
                   "mode); exit 0 clean, 1 spam, 2 virus or banned, 75 a check failed or asks "
                   "to try later, 64 an unknown --policy or a --client that is no address",
                   cmd_scan, with_config=True)
    scan.add_argument("file", metavar="FILE", help="the message (RFC 5322), or - for stdin")
    scan.add_argument("--sender", default="", metavar="ADDR", help="envelope sender")
    scan.add_argument("--rcpt", action="append", metavar="ADDR",
                      help="envelope recipient; repeatable")
    scan.add_argument("--client", default="", metavar="IP",
                      help="the client's address, as XFORWARD would give it (bypass_*_checks)")
    scan.add_argument("--helo", default="", metavar="NAME", help="the client's HELO name")
    scan.add_argument("--policy", default="", metavar="NAME",
                      help="judge as mail to this [[scanner.policy]] bank's listener "
                           "(default: scanner.listen)")
    scan.add_argument("--json", action="store_true", help="machine-readable output")

    bench = sub.add_parser("bench", help="benchmark harness: replay a storm scenario or a "
                                         "mail log, or measure throughput with smtp-source")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    mtas = "poolmgr, postfix, postfix-postscreen, aiosmtpd"
    targets = f"{mtas}; poolmgr, amavisd in a content-filter scenario"
    for name, help_text, func in (
            ("run", "run one scenario against one target", cmd_bench),
            ("compare", "run one scenario against several targets, side by side", cmd_bench),
            ("source", "Postfix's smtp-source through a target to smtp-sink: messages/second",
             cmd_bench_source)):
        p = command(bench_sub, name, help_text, func)
        if name == "compare":
            p.add_argument("--targets",
                           help=f"comma-separated: {targets} (default: all of the kind)")
        else:
            p.add_argument("--target", default="poolmgr",
                           help=f"one of {mtas if name == 'source' else targets}")
        default_out = {"run": "NAME-TARGET", "compare": "NAME-compare", "source": "source-TARGET"}
        p.add_argument("--out", help=f"output directory (default bench/out/{default_out[name]})")
        if name == "source":
            p.add_argument("--sessions", type=int, default=20,
                           help="sessions in parallel (smtp-source -s, default 20)")
            p.add_argument("--messages", type=int, default=2000,
                           help="messages in all (smtp-source -m, default 2000)")
            p.add_argument("--size", type=int, default=0,
                           help="message payload bytes (smtp-source -l; default: smtp-source's "
                                "own)")
        else:
            p.add_argument("scenario", help="a scenario file, e.g. bench/scenarios/smoke.toml "
                                            "(phases, or kind = \"replay\" of a mail log, "
                                            "\"source\", \"scanner-pool\", "
                                            "\"cluster-overhead\", \"soak\" or "
                                            "\"content-filter\")")
            p.add_argument("--set", action="append", metavar="KEY=VALUE",
                           help="change one of the scenario's keys (a TOML value; a dotted "
                                "KEY reaches into a table), e.g. --set duration=10m "
                                "--set server.smtp_workers=4; repeatable")
            p.add_argument("--config", metavar="FILE",
                           help="pool sizes from a poolmgr config file ([smtp] and [scanner] "
                                "min_workers, max_workers, max_sessions_per_worker) instead "
                                "of the scenario's [server], e.g. from poolmgr plan "
                                "--write-config")
        if name == "run":
            p.add_argument("--nodes", type=int, default=0, choices=range(1, 9), metavar="N",
                           help="poolmgr: N nodes sharing one Redis, clients spread over them "
                                "round-robin (default: the scenario's [server] nodes, 1)")

    planner = command(sub, "plan", "capacity planning from a Postfix mail log or a bench "
                      "result: pool sizes by Little's law, and a forecast of the peak "
                      "sessions and pool sizes with them (--check: against a second run)",
                      cmd_plan)
    planner.add_argument("--maillog", metavar="FILE", help="a Postfix (or poolmgr) mail log")
    planner.add_argument("--bench", metavar="RESULT", help="a result.json of poolmgr bench run")
    planner.add_argument("--scenario", metavar="FILE",
                         help="a bench scenario (phases or replay): the load it offers, "
                              "forecast with the pool sizes and settings it names")
    planner.add_argument("--sessions-per-worker", type=int,
                         help="smtp.max_sessions_per_worker (default: the bench run's, else "
                              "2000)")
    planner.add_argument("--scan-seconds", type=float,
                         help="time one scanner worker spends on a message (default: the "
                              "bench run's mean hand-off, else 1s)")
    planner.add_argument("--write-config", metavar="FILE",
                         help="write the recommended pool sizes as a poolmgr config file "
                              "([smtp] and [scanner]), for `bench run --config FILE`")
    planner.add_argument("--check", metavar="RESULT",
                         help="with --bench: compare the forecast (peak sessions, peak SMTP "
                              "and scanner workers) with a second run's result.json, made "
                              "with the recommended sizes; with --scenario: with a run of "
                              "that scenario; exit 1 if an error is beyond 20%%")
    planner.add_argument("--year", type=int, help="year of syslog timestamps (default: this one)")
    planner.add_argument("--tz", default="local", metavar="ZONE",
                         help="time zone of syslog timestamps, e.g. Europe/Berlin (default: "
                              "local; ISO timestamps carry their own)")
    planner.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
