import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Poolmgr, Sink  # noqa: E402


@pytest.fixture
def make_poolmgr(tmp_path):
    """Factory: start a poolmgr with config overrides; all are stopped after the test."""
    started = []

    def make(overrides=None, start=True, name="pm"):
        instance = Poolmgr(tmp_path / f"{name}{len(started)}", overrides)
        started.append(instance)
        return instance.start() if start else instance

    yield make
    for instance in started:
        try:
            instance.stop()
        except Exception:
            instance.kill_all()


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
def shared_poolmgr(tmp_path_factory):
    """One poolmgr for a module's read-mostly tests (transcripts, protocol checks)."""
    instance = Poolmgr(tmp_path_factory.mktemp("shared"), {
        "smtp": {"message_size_limit": "64k", "max_recipients": 100,
                 "line_length_limit": 1000},
        "scanner": {"rules": []},
    })
    instance.start()
    yield instance
    try:
        instance.stop()
    except Exception:
        instance.kill_all()
