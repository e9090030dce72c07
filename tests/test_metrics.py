"""The metrics endpoint's server (metrics.py): it serves /metrics, and the master holds it, so
that workers close its socket and a USR2 upgrade frees its port for the new master, on every
prometheus_client poolmgr runs on (Debian 12's 0.16 returns no server from
start_http_server). The metrics themselves: test_autoscale_live, test_log, test_upgrade."""

from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families

from helpers import free_port
from poolmgr import metrics


def scrape(port: int) -> set[str]:
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return {f.name for f in text_string_to_metric_families(response.read().decode())}


def test_the_endpoint_serves_and_stop_frees_its_port():
    port = free_port()
    server = metrics.start(("127.0.0.1", port), metrics.StatusCollector())
    assert "process_resident_memory_bytes" in scrape(port)  # the master's own process_*
    assert server.socket.getsockname() == ("127.0.0.1", port)
    metrics.stop(server)
    # What the new master does after a USR2 upgrade.
    server = metrics.start(("127.0.0.1", port), metrics.StatusCollector())
    try:
        assert "process_resident_memory_bytes" in scrape(port)
    finally:
        metrics.stop(server)
