"""A storm of idle bots against the autoscaler: how fast the SMTP pool follows, and back.

    python3 bench/storm.py [--bots 3000] [--hold 30] [--out bench/out]

Starts poolmgr with the default `[autoscale]` settings (interval 1s, cooldown 30s), SMTP pool
2..8 workers of `--per-worker` sessions each, and a scanner pool of 2. Then opens BOTS idle
connections from distinct 127.x.y.z addresses (they never speak), holds them HOLD seconds and
closes them, while one legitimate message is sent every two seconds with smtplib. `poolmgr
status --json` is sampled every second throughout, and every sample is checked against the
rules (each pool within floor and ceiling, scanner <= SMTP, calm -> SMTP <= max(floor,
calm_ratio x scanner)).

Prints and writes to OUT/storm.json: time from storm onset to the first added SMTP worker,
the peak SMTP pool, when stress mode switched on and off, time from the end of the storm back
to the floor, the samples that broke a rule (must be none), and the legitimate deliveries.
"""

import argparse
import json
import resource
import smtplib
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from poolmgr import config  # noqa: E402
from poolmgr.autoscale import Snapshot, check_rules  # noqa: E402
from poolmgr.testing import Poolmgr  # noqa: E402

FLOOR, CEILING = 2, 8


def rule_breaks(status: dict, cfg) -> list[str]:
    """The autoscaler's rules on the targets (`autoscale.check_rules`), and the running
    workers never above a ceiling nor scanner workers above SMTP workers."""
    smtp, scanner = status["pools"]["smtp"], status["pools"]["scanner"]
    snap = Snapshot(0.0, smtp["target"], scanner["target"], smtp["floor"], smtp["ceiling"],
                    scanner["floor"], scanner["ceiling"])
    broken = check_rules(snap, smtp["target"], scanner["target"], status["autoscale"]["phase"],
                         cfg)
    for name, pool in (("smtp", smtp), ("scanner", scanner)):
        if pool["workers"] > pool["ceiling"]:
            broken.append(f"{name} workers {pool['workers']} above the ceiling")
    if scanner["workers"] > smtp["workers"] + smtp["draining"]:
        broken.append(f"scanner workers {scanner['workers']} > smtp {smtp['workers']}")
    return broken


def legit_sender(pm: Poolmgr, stop: threading.Event, results: list) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        started = time.monotonic()
        try:
            with pm.smtp(source=f"127.40.0.{n % 250 + 1}", timeout=120) as client:
                client.sendmail("partner@example.org", ["bob@example.test"],
                                f"Subject: legit {n}\r\nMessage-ID: <storm-{n}@example.org>"
                                f"\r\n\r\nduring the storm\r\n".encode())
            results.append(("250", time.monotonic() - started))
        except (smtplib.SMTPException, OSError) as exc:
            results.append((type(exc).__name__, time.monotonic() - started))
        stop.wait(2.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bots", type=int, default=3000)
    parser.add_argument("--hold", type=float, default=30.0, help="seconds the bots stay")
    parser.add_argument("--per-worker", type=int, default=500,
                        help="smtp.max_sessions_per_worker")
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="poolmgr-storm-"))
    pm = Poolmgr(work / "poolmgr", {
        "smtp": {"min_workers": FLOOR, "max_workers": CEILING,
                 "max_sessions_per_worker": args.per_worker},
        "scanner": {"min_workers": 2, "max_workers": 4},
    })
    samples, bots, results, stop = [], [], [], threading.Event()
    marks: dict[str, float] = {}
    try:
        pm.start()
        rules = config.load(str(pm.config)).autoscale
        sender = threading.Thread(target=legit_sender, args=(pm, stop, results), daemon=True)
        sender.start()
        t0 = time.time()

        def sample() -> dict:
            status = pm.status()
            smtp, scanner = status["pools"]["smtp"], status["pools"]["scanner"]
            samples.append({"t": round(time.time() - t0, 1), "smtp": smtp["workers"],
                            "smtp_target": smtp["target"], "draining": smtp["draining"],
                            "scanner": scanner["workers"], "sessions": smtp["sessions"],
                            "phase": status["autoscale"]["phase"],
                            "stress": status["stress"]["on"],
                            "broken": rule_breaks(status, rules)})
            return status

        for _ in range(3):
            sample()
            time.sleep(1)
        marks["onset"] = time.time()
        for n in range(args.bots):
            sock = socket.socket()
            sock.bind((f"127.41.{n // 250}.{n % 250 + 1}", 0))
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", pm.smtp_port))
            except BlockingIOError:
                pass
            bots.append(sock)
        while time.time() - marks["onset"] < args.hold:
            sample()
            time.sleep(1)
        for sock in bots:
            sock.close()
        bots.clear()
        marks["end"] = time.time()
        deadline = time.time() + 180
        while time.time() < deadline:
            status = sample()
            smtp = status["pools"]["smtp"]
            if smtp["workers"] == FLOOR and not smtp["draining"] and \
                    status["autoscale"]["phase"] == "calm":
                marks["floor"] = time.time()
                break
            time.sleep(1)
        stop.set()
        sender.join(timeout=130)
        decisions = pm.status()["autoscale"]["decisions"]
        log = pm.log()
    finally:
        for sock in bots:
            sock.close()
        pm.stop()
    first_grow = next((d["time"] for d in decisions if d["decision"].startswith("smtp 2 -> ")),
                      None)
    grow_lines = [line for line in log.splitlines() if "autoscale: smtp 2 -> " in line]
    stress_on = [s["t"] for s in samples if s["stress"]]
    broken = [s for s in samples if s["broken"]]
    accepted = [t for outcome, t in results if outcome == "250"]
    figures = {
        "bots": args.bots, "hold_s": args.hold, "per_worker": args.per_worker,
        "floor": FLOOR, "ceiling": CEILING,
        "onset_to_first_worker_s": round(first_grow - marks["onset"], 1) if first_grow else None,
        "first_grow_log": grow_lines[0].split("autoscale: ", 1)[-1] if grow_lines else None,
        "peak_smtp_workers": max(s["smtp"] for s in samples),
        "stress_on_s": [stress_on[0], stress_on[-1]] if stress_on else None,
        "storm_end_to_floor_s": round(marks["floor"] - marks["end"], 1)
        if "floor" in marks else None,
        "samples": len(samples), "samples_breaking_rules": len(broken),
        "legit_sent": len(results), "legit_accepted": len(accepted),
        "legit_worst_s": round(max(accepted), 2) if accepted else None,
        "delivered": len(pm.delivered()),
        "timeline": samples,
    }
    print(f"storm: {args.bots} idle bots for {args.hold:g}s; SMTP pool {FLOOR}..{CEILING} "
          f"x {args.per_worker} sessions; autoscale defaults (interval 1s, cooldown 30s)")
    print(f"onset -> first added SMTP worker: {figures['onset_to_first_worker_s']}s "
          f"({figures['first_grow_log']})")
    print(f"peak SMTP pool: {figures['peak_smtp_workers']} workers; stress mode on from "
          f"t={stress_on[0] if stress_on else '-'}s to t={stress_on[-1] if stress_on else '-'}s")
    print(f"storm end -> back at the floor ({FLOOR}): {figures['storm_end_to_floor_s']}s")
    print(f"rules checked at {len(samples)} one-second samples: {len(broken)} broken")
    for s in broken[:5]:
        print(f"  t={s['t']}s: {'; '.join(s['broken'])}")
    print(f"legitimate mail during the run: {len(accepted)}/{len(results)} accepted, "
          f"{figures['delivered']} in the maildir, worst {figures['legit_worst_s']}s")
    print("timeline (t, smtp workers+draining, scanner, sessions, phase, stress):")
    for s in samples[::5]:
        print(f"  {s['t']:6.1f}s  smtp {s['smtp']}+{s['draining']}  scanner {s['scanner']}  "
              f"sessions {s['sessions']:5}  {s['phase']}{'  stress' if s['stress'] else ''}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "storm.json").write_text(json.dumps(figures, indent=2) + "\n")
    ok = not broken and "floor" in marks and len(accepted) == len(results) == figures["delivered"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
