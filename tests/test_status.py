"""The typed status records: what the master sends is what every reader gets back."""

from poolmgr.status import (AnvilStatus, AutoscaleStatus, Decision, MasterStatus,
                            NuisanceStatus, NuisanceTotal, PoolStatus, Status, StormStatus,
                            StressStatus, WorkerStatus)
from poolmgr.top import frame


def sample() -> Status:
    worker = WorkerStatus(41, 1, 1, "running", 3.5, 12, 0, 0.4, 50_000_000)
    smtp = PoolStatus(2, 0, 2, 2, 6, 12, 4000, 0, 100_000_000, False,
                      {"connections": 30, "legit": 3, "nuisance_pregreet": 2}, [worker],
                      {"suspect": 4, "transaction": 1, "other": 7})
    scanner = PoolStatus(2, 0, 2, 2, 4, 0, 2, 1, 90_000_000, False, {"scanned": 3}, [])
    return Status("0.1.0", MasterStatus(40, 12.0, "/etc/poolmgr.toml", 1, "running", 30_000_000),
                  {"smtp": smtp, "scanner": scanner},
                  NuisanceStatus(300.0, 0.4, 3, 2, {"pregreet": 2},
                                 NuisanceTotal(3, {"pregreet": 2})),
                  StressStatus(), StormStatus(False, "calm", 1.0),
                  AutoscaleStatus(True, "calm", 1.0, decisions=[Decision(2.0, "storm begins")]),
                  AnvilStatus(3, 5))


def test_json_round_trip():
    status = sample()
    data = status.to_json()
    assert data["pools"]["smtp"]["worker_list"][0]["pid"] == 41
    assert data["autoscale"]["decisions"] == [{"time": 2.0, "decision": "storm begins"}]
    assert Status.from_json(data) == status


def test_readers_accept_fields_they_do_not_know_yet():
    data = sample().to_json()
    data["pools"]["smtp"]["newer_field"] = 1
    data["federation"] = {"state": "ok"}
    assert Status.from_json(data) == sample()


def test_top_reads_the_records():
    lines = frame(sample())
    assert any(line.startswith("smtp") and "4000" not in line and "12" in line for line in lines)
    assert lines[-1].endswith("storm begins")
