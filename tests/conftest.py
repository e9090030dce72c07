import os
import re
import shutil
import sys
from pathlib import Path

import psutil
import pytest

from poolmgr.testing.poolmgr import own_code_first

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Poolmgr, Sink  # noqa: E402

# The tests start `python3 -m poolmgr` (and the CLI) from their own directories, where Python
# would import whichever checkout pip installed: they must run the poolmgr these tests import.
os.environ["PYTHONPATH"] = own_code_first()["PYTHONPATH"]

# Log lines that mean something in poolmgr went wrong: an exception caught and logged by a
# session, a worker or the master (`error:`/`fatal:`), a Python traceback on stderr, or a worker
# that died. A test that provokes one on purpose says which with @pytest.mark.log_allows.
LOG_PROBLEM = re.compile(r"Traceback \(most recent call last\)|: (?:error|fatal|panic): "
                         r"|session with .* failed after"
                         r"|worker \d+ pid \d+ (?:exit status [1-9]|killed by signal)")


def pytest_configure(config):
    config.addinivalue_line("markers", "log_allows(*patterns): poolmgr log lines matching one "
                                       "of these regular expressions do not fail the test")


# The longest files first (most take a minute or more on 2 cores): pytest-xdist's --dist
# loadfile --no-loadscope-reorder (scripts/test.sh) hands the files out in collection order,
# and a long one handed out last runs on alone at the end while the other workers stand idle.
LONGEST_FIRST = ("test_bench.py", "test_debian_python.py", "test_master.py", "test_plan_loop.py",
                 "test_log.py", "test_limits.py", "test_flood100k.py", "test_soak.py",
                 "test_cluster.py", "test_delivery.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def log_problems(text: str, allowed: list[str]) -> list[str]:
    lines = text.splitlines()
    problems = [line for line in lines
                if LOG_PROBLEM.search(line) and not any(re.search(a, line) for a in allowed)]
    return problems + killed_context(lines, problems)


def killed_context(lines: list[str], problems: list[str]) -> list[str]:
    """For a worker that was killed: the master's lines about it (why) and the Python stacks
    the workers wrote (faulthandler, on the master's STACK_SIGNAL before SIGKILL)."""
    pids = {m.group(1) for p in problems for m in [re.search(r"pid (\d+) killed by", p)] if m}
    if not pids:
        return []
    about = re.compile(r"pid (?:%s)\b" % "|".join(pids))
    return ["  " + line for line in lines
            if about.search(line) and line not in problems
            or re.match(r"(?:Current thread|Thread) 0x|  File ", line)]


def stop_cleanly(instance: Poolmgr, allowed: list[str]) -> list[str]:
    """Stop one poolmgr; what went wrong: a bad exit, a leftover process, a bad log line."""
    if instance.proc is None:
        return []
    problems = []
    try:
        children = psutil.Process(instance.proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    try:
        code = instance.stop()
        if code != 0:
            problems.append(f"poolmgr exited with status {code}")
    except Exception as exc:
        instance.kill_all()
        problems.append(f"poolmgr did not stop: {exc!r}")
    left = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    if left:
        problems.append(f"worker processes left running: {left}")
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
    master = instance.sections["master"]
    log_file = master.get("log", master.get("log_file"))  # a test's own log file
    log_file = "" if log_file in ("syslog", "stderr") else log_file
    text = instance.log() + (Path(log_file).read_text(errors="replace")
                             if log_file and Path(log_file).exists() else "")
    problems += log_problems(text, allowed)
    return [f"{instance.dir.name}: {p}" for p in problems]


def allowed_patterns(node) -> list[str]:
    return [p for marker in node.iter_markers("log_allows") for p in marker.args]


@pytest.fixture
def make_poolmgr(tmp_path, request):
    """Factory: start a poolmgr with config overrides; all are stopped after the test, which
    fails if one did not stop cleanly or logged an error (see LOG_PROBLEM)."""
    started = []

    def make(overrides=None, start=True, name="pm"):
        instance = Poolmgr(tmp_path / f"{name}{len(started)}", overrides)
        started.append(instance)
        return instance.start() if start else instance

    yield make
    problems = []
    for instance in started:
        problems += stop_cleanly(instance, allowed_patterns(request.node))
    if problems:
        pytest.fail("poolmgr did not end cleanly:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def make_sink(tmp_path):
    if not shutil.which("smtp-sink") and not Path("/usr/sbin/smtp-sink").exists():
        pytest.fail("smtp-sink is not installed: run scripts/test.sh, which installs postfix")
    sinks = []

    def make(port=None, extra=None):
        sink = Sink(tmp_path, port, extra)
        sinks.append(sink)
        return sink.start()

    yield make
    for sink in sinks:
        sink.stop()


@pytest.fixture(scope="module")
def shared_poolmgr(tmp_path_factory, request):
    """One poolmgr for a module's read-mostly tests (transcripts, protocol checks)."""
    instance = Poolmgr(tmp_path_factory.mktemp("shared"), {
        "smtp": {"message_size_limit": "64k", "max_recipients": 100,
                 "line_length_limit": 1000},
        "scanner": {"rules": []},
    })
    instance.start()
    yield instance
    problems = stop_cleanly(instance, allowed_patterns(request.node))
    if problems:
        pytest.fail("poolmgr did not end cleanly:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def fresh_logging():
    """log.setup changes this process's 'poolmgr' logger and log.py's state (its target, its
    drop counts): put them back afterwards."""
    import logging

    from poolmgr import log

    root = logging.getLogger("poolmgr")
    saved = (list(root.handlers), root.propagate, root.level, dict(log._state),
             list(log._counted))
    root.handlers = []
    log._counted[:] = [0, 0]
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers, root.propagate, root.level = saved[:3]
    log._state.clear()
    log._state.update(saved[3])
    log._counted[:] = saved[4]
