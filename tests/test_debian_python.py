"""poolmgr on Debian's own Python: the part of the suite that exercises its dependencies
(delivery and the SMTP worker on gevent and greenlet, the defences on dnspython, the master
on psutil and setproctitle, the scanner pool, the metrics endpoint on prometheus_client, a
Redis client on redis-py) run by /usr/bin/python3 with Debian 12's python3-* packages, the
versions the Debian package depends on and pyproject.toml's floors (scripts/test.sh installs
them). The whole suite runs on the pip-installed versions."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = "/usr/bin/python3"
ON_DEBIAN_PYTHON = [
    "tests/test_delivery.py", "tests/test_defence.py", "tests/test_master.py",
    "tests/test_scanner.py", "tests/test_metrics.py",
    "tests/test_cluster.py::test_a_call_to_a_silent_redis_gives_up_after_the_timeout",
    "tests/test_cluster.py::test_redis_outage_falls_back_to_local_state_and_recovers",
    "tests/test_cluster.py::"
    "test_a_resync_waits_for_count_changes_in_flight_and_holds_new_ones_back",
]
# Timers of 5-20 s that exercise no dependency of poolmgr's: the main run has them.
SLOW = [
    "tests/test_master.py::test_a_draining_scanner_gets_scanner_timeout_for_its_message",
    "tests/test_master.py::test_crash_loop_is_throttled",
    "tests/test_scanner.py::test_scanner_reuses_its_next_hop_connection",
    "tests/test_scanner.py::test_idle_next_hop_connection_is_closed_while_the_client_stays",
    "tests/test_scanner.py::test_a_worker_busy_on_one_connection_keeps_its_heartbeat",
]
MODULES = ["gevent", "greenlet", "dns", "psutil", "setproctitle", "prometheus_client", "redis"]


def test_the_dependencies_are_debians_packages():
    probe = subprocess.run(
        [DEBIAN_PYTHON, "-c", f"import {', '.join(MODULES)}\n"
         f"for m in [{', '.join(MODULES)}]: print(m.__file__)"],
        capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert all(path.startswith("/usr/lib/python3/dist-packages/")
               for path in probe.stdout.split()), probe.stdout


def test_part_of_the_suite_passes_on_debians_python():
    # The run inherits this pytest-xdist worker's PYTEST_XDIST_WORKER: it takes its ports from
    # this worker's share, which nothing else uses while this test waits for it.
    result = subprocess.run([DEBIAN_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *ON_DEBIAN_PYTHON, *(f"--deselect={test}" for test in SLOW)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert " passed" in result.stdout.splitlines()[-1] and "skipped" not in result.stdout
