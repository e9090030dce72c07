"""`poolmgr bench source`: Postfix's own load tool through a target, in messages/second.

The target starts as for `bench run` (`targets.started`: poolmgr's two pools, Postfix or
aiosmtpd, each relaying to the same smtp-sink). After two seconds at rest its process tree is
measured (RSS, PSS), then `smtp-source -s SESSIONS -m MESSAGES [-l SIZE]` sends from 127.0.0.1,
a client every target trusts (Postfix's mynetworks, poolmgr's allowlist), so the figure is the
mail path's, not the defences'. Figures: messages/second over smtp-source's run, what
smtp-source saw (its exit status), what the target accepted (poolmgr's counters), what reached
smtp-sink, and the tree's memory at rest and after, written to OUT/result.json.

Exports: source.
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

from ..testing import HELO
from .scenario import SERVER_DEFAULTS
from .targets import settled, started, tree_usage

RECIPIENT = "bob@example.test"


def source(target_name: str, sessions: int, messages: int, size: int, out: Path) -> dict:
    """Run smtp-source against the target; returns the figures (also in OUT/result.json)."""
    command = [shutil.which("smtp-source") or "/usr/sbin/smtp-source", "-s", str(sessions),
               "-m", str(messages), "-c", "-M", HELO, "-f", "bench@example.org", "-t", RECIPIENT]
    if size:
        command += ["-l", str(size)]
    with started(target_name, SERVER_DEFAULTS, [RECIPIENT]) as (target, sink, dns, work):
        time.sleep(2)  # let the workers settle before measuring memory at rest
        rest_rss, rest_pss, cpu_before = tree_usage(target.pid)
        begun = time.monotonic()
        result = subprocess.run(command + [f"127.0.0.1:{target.port}"], capture_output=True,
                                text=True, timeout=1800)
        elapsed = time.monotonic() - begun
        arrived = len(settled(sink, expect=messages))
        after_rss, after_pss, cpu = tree_usage(target.pid)
        counters = target.counters()
    mib = 2 ** 20
    figures = {
        "target": target_name, "command": " ".join(command[1:] + ["127.0.0.1:PORT"]),
        "sessions": sessions, "messages": messages, "size": size,
        "smtp_source_exit": result.returncode,
        "seconds": round(elapsed, 2), "messages_per_second": round(messages / elapsed, 1),
        **counters, "arrived_at_sink": arrived,
        "rss_at_rest_mib": round(rest_rss / mib, 1), "pss_at_rest_mib": round(rest_pss / mib, 1),
        "rss_after_mib": round(after_rss / mib, 1), "pss_after_mib": round(after_pss / mib, 1),
        "cpu_seconds": round(cpu - cpu_before, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures
