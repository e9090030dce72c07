"""DNSBL answers that are errors, and names that must not reach a client (issue 24).

A DNSBL's error codes (Spamhaus's 127.255.255.254 to a query through a public resolver, .252
for a mistyped DQS key, .255 over the limit) and answers outside 127/8 never score, whatever
the site's filter; they are logged once per change of state and counted in status and
metrics. `dnsbl_reply_map` shows the client another name than the domain queried. Real DNS: the
project's dnslib server on a loopback port.
"""

import re
from urllib.request import urlopen

import pytest

from helpers import Raw, free_port, message, wait_until
from poolmgr import config
from poolmgr.config import ConfigError
from poolmgr.defence.dnsbl import Dnsbl, error_answer, parse_site
from poolmgr.status import DnsblStatus, collect
from poolmgr.testing import DnsServer

REFUSED = "127.255.255.254"


@pytest.fixture
def dns():
    server = DnsServer({}, ttl=300).start()
    yield server
    server.stop()


# -- the classification, a pure function

@pytest.mark.parametrize("address, meaning", [
    ("127.255.255.252", "typo in the DNSBL name or DQS key"),
    ("127.255.255.254", "query refused (public resolver)"),
    ("127.255.255.255", "query refused (excessive number of queries)"),
    ("127.255.255.0", "error answer"),
    ("127.255.255.1", "error answer"),
    ("10.0.0.1", "not a DNSBL answer"),       # outside 127/8: a resolver's NXDOMAIN redirect
    ("192.0.2.1", "not a DNSBL answer"),
    ("128.0.0.2", "not a DNSBL answer"),
    ("::1", "not a DNSBL answer"),
    ("127.0.0.2", None),                      # listings
    ("127.0.0.11", None),
    ("127.255.254.255", None),
    ("127.1.2.3", None),
])
def test_error_answers_are_told_from_listings(address, meaning):
    assert error_answer(address) == meaning


# -- the scorer itself, against the real DNS server

class Said:
    """A logger that keeps its lines."""

    def __init__(self):
        self.lines = []

    def warning(self, text, *args):
        self.lines.append("warning: " + text % args)

    def info(self, text, *args):
        self.lines.append(text % args)


def scorer(dns, sites, log, counted):
    return Dnsbl(tuple(parse_site(s) for s in sites), (("127.0.0.1", dns.port),), 2.0, 0, 0,
                 None, log, counted.append)


def test_error_answers_never_score_and_are_logged_once_per_change_of_state(dns):
    dns.list_network("127.", "zen.test", REFUSED)  # every client, as Spamhaus does
    dns.list("127.0.0.9", "bl.test", "127.0.0.2", "192.0.2.1")  # a listing beside a stray A
    log, counted = Said(), []
    dnsbl = scorer(dns, ["zen.test*3", "filtered.test=127.[0;255].[0;255].[2;254]*3",
                         "bl.test*2"], log, counted)
    dns.list_network("127.", "filtered.test", REFUSED)  # a filter that would match the code
    for last in range(1, 4):
        score = dnsbl.score(f"127.0.0.{last}")
        assert score.total == 0 and score.hits == () and score.unanswered == ()
    assert dnsbl.score("127.0.0.9").total == 2  # the listing scores, the stray answer does not
    assert log.lines == [
        "warning: dnsbl: zen.test: 127.255.255.254: query refused (public resolver); "
        "answers ignored",
        "warning: dnsbl: filtered.test: 127.255.255.254: query refused (public resolver); "
        "answers ignored",
        "warning: dnsbl: bl.test: 192.0.2.1: not a DNSBL answer; answers ignored"]
    # each error answer counted, with the site's position in dnsbl_sites
    assert sorted(counted) == [0] * 4 + [1] * 4 + [2]
    # Another error code is another state; a normal answer (here NXDOMAIN) ends it.
    dns.networks.clear()
    dns.list("127.0.0.5", "zen.test", "127.255.255.255")
    del log.lines[:]
    dnsbl.score("127.0.0.5")
    dnsbl.score("127.0.0.6")
    dnsbl.score("127.0.0.7")
    assert log.lines == [
        "warning: dnsbl: zen.test: 127.255.255.255: query refused (excessive number of "
        "queries); answers ignored",
        "dnsbl: filtered.test answers again", "dnsbl: bl.test answers again",
        "dnsbl: zen.test answers again"]


# -- status from the board's counters

def test_status_counts_error_answers_per_configured_site():
    from test_status import view
    pools = view().pools
    pools["smtp"].workers[0].board["counters"].update(dnsbl_errors=7, dnsbl_errors_0=5,
                                                      dnsbl_errors_2=2)
    status = collect(view(pools=pools, dnsbl_sites=["zen.test", "bl.test", "key.dq.test"]))
    assert status.dnsbl == DnsblStatus(7, {"zen.test": 5, "bl.test": 0, "key.dq.test": 2})
    assert status.dnsbl.summary() == "dnsbl: 7 error answers (zen.test 5, key.dq.test 2)"
    assert collect(view()).dnsbl == DnsblStatus()  # no sites: nothing counted


# -- the setting

def test_reply_map_is_validated_with_file_and_key(tmp_path):
    path = tmp_path / "map.toml"
    path.write_text('[defence]\ndnsbl_sites = ["KEY.zen.dq.test*3"]\n'
                    'dnsbl_reply_map = { "Key.zen.dq.test." = "zen.test" }\n')
    assert config.load(str(path)).defence.dnsbl_reply_map == {"key.zen.dq.test": "zen.test"}
    for value, reason in (('"zen.test"', "expected a table like"),
                          ('{ "key.zen.dq.test" = "zen test" }', "key.zen.dq.test: expected a "
                           "domain name, got 'zen test'"),
                          ('{ "key.zen.dq.test" = 3 }',
                           "key.zen.dq.test: expected a domain name, got 3")):
        path.write_text(f'[defence]\ndnsbl_reply_map = {value}\n')
        with pytest.raises(ConfigError) as info:
            config.load(str(path))
        assert len(info.value.errors) == 1
        assert info.value.errors[0].startswith(f"{path}: [defence] dnsbl_reply_map: {reason}")
    path.write_text('[defence]\ndnsbl_sites = ["zen.test"]\n'
                    '[defence.dnsbl_reply_map]\n"other.test" = "zen.test"\n')
    assert config.load(str(path)).warnings == [
        f"{path}: [defence] dnsbl_reply_map: 'other.test' is the domain of no "
        "defence.dnsbl_sites entry, so this mapping is never used"]


# -- end to end: a real poolmgr, real DNS

def metric(port: int, name: str) -> dict[str, float]:
    """The samples of one metric on /metrics, by their labels."""
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {labels: float(value) for labels, value in
            re.findall(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M)}


def test_a_dnsbl_refusing_every_query_rejects_no_mail(make_poolmgr, dns):
    """Spamhaus's answer to a public resolver, for every client, on a site written without a
    filter: no client scores, legitimate mail flows, one warning, counted; once the DNSBL
    answers normally again, one line says so."""
    dns.list_network("127.", "zen.test", REFUSED)
    metrics = free_port()
    pm = make_poolmgr({"defence": {"dnsbl_sites": ["zen.test*3"], "nameservers": [dns.address],
                                   "greet_wait": "0.2s"},
                       "smtp": {"min_workers": 1, "max_workers": 1},  # one worker's state
                       "scanner": {"min_workers": 1, "max_workers": 1},
                       "metrics": {"listen": f"127.0.0.1:{metrics}"}})
    clients = [f"127.0.24.{n}" for n in range(1, 4)]
    for source in clients:
        with pm.smtp(source=source) as client:
            assert client.sendmail("alice@example.org", ["bob@example.test"],
                                   message(f"from {source}")) == {}
    assert len(pm.delivered()) == 3
    log = pm.log()
    warning = re.compile(r"poolmgr/smtpd\[\d+\]: warning: dnsbl: zen\.test: 127\.255\.255\.254: "
                         r"query refused \(public resolver\); answers ignored$", re.M)
    assert len(warning.findall(log)) == 1
    assert "DNSBL rank" not in log
    assert all(f"PASS NEW [{source}]" in log for source in clients)
    # Each client's answer counted (and the harness's probes' from 127.0.0.1, if they got it).
    def dnsbl_status():
        figures = pm.status()["dnsbl"]
        return figures if figures["errors"] >= len(clients) else None

    counted = wait_until(dnsbl_status, what="the error answers in status")
    errors = counted["errors"]
    assert counted == {"errors": errors, "by_site": {"zen.test": errors}}
    assert errors <= sum(1 for name in dns.queries if name.endswith(".zen.test"))
    wait_until(lambda: metric(metrics, "poolmgr_dnsbl_errors_total")
               == {'site="zen.test"': float(errors)}, what="the error answers in /metrics")
    assert f"dnsbl: {errors} error answers (zen.test {errors})" in \
        pm.run_cli("status", check=True).stdout
    # The DNSBL answers again: NXDOMAIN for a new client.
    dns.networks.clear()
    with pm.smtp(source="127.0.24.9") as client:
        assert client.sendmail("alice@example.org", ["bob@example.test"], message("again")) == {}
    assert len(re.findall(r"smtpd\[\d+\]: dnsbl: zen\.test answers again$", pm.log(),
                          re.M)) == 1
    assert len(warning.findall(pm.log())) == 1


@pytest.mark.parametrize("action", ["enforce", "drop"])
def test_a_keyed_dnsbl_domain_never_reaches_the_client(make_poolmgr, dns, action):
    """postscreen_dnsbl_reply_map: the reply names the public name, the log the domain
    queried."""
    queried = "s3cr3tkey.zen.dq.test"
    dns.list("127.0.25.1", queried)
    pm = make_poolmgr({"defence": {"dnsbl_sites": [f"{queried}*3"], "dnsbl_action": action,
                                   "dnsbl_reply_map": {queried: "zen.test"},
                                   "nameservers": [dns.address]}})
    raw = Raw(pm.smtp_port, "127.0.25.1")
    try:
        code, banner = raw.reply()
        said = banner
        if action == "drop":
            assert code == 521
        else:
            raw.send(b"EHLO client.test\r\n")
            said += raw.reply()[1]
            raw.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.test>\r\n")
            said += raw.reply()[1]
            code, rcpt = raw.reply()
            said += rcpt
            assert code == 550
    finally:
        raw.close()
    assert said[-1] == ("%d 5.7.1 Service unavailable; client [127.0.25.1] blocked using "
                        "zen.test" % (521 if action == "drop" else 550))
    assert not any("s3cr3tkey" in line for line in said)
    assert re.search(r"DNSBL rank 3 for \[127\.0\.25\.1\]:\d+; "
                     rf"sites={re.escape(queried)}\(\+3\); action={action}$", pm.log(), re.M)
