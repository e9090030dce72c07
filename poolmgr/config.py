"""TOML configuration -> a frozen, validated `Config`.

Reads a file with `tomllib`, checks every key against `settings.SETTINGS` (unknown keys are
errors), converts values (durations "300s", sizes "25M", addresses, CIDR lists, next hops) and
runs cross-checks between keys. All errors are collected and raised together as
`ConfigError`, each naming file, key and reason, so `poolmgr check` can print them all.

Paths a packager expects: `find` looks for the config as `-c`, `$POOLMGR_CONFIG`,
`SYSTEM_CONFIG` (/etc/poolmgr/poolmgr.toml), then the embedded defaults. A relative path in a
config file is taken from the file's directory (the embedded defaults: the working directory);
a file in SYSTEM_CONFIG's directory gets the system layout's defaults (`SYSTEM_PATHS`: /run/poolmgr
for the socket and pidfile, /var/lib/poolmgr for mail), any other place `./var` beside it.
`differences` is `poolmgr config -n`: what a file sets that differs from the defaults.
"""

__all__ = ["load", "find", "differences", "setting_of", "ConfigError", "Config", "Section",
           "NextHop", "render_default", "render_sample", "control_socket_of", "parse_duration",
           "parse_size", "parse_address", "parse_listen", "format_address", "toml_value",
           "SYSTEM_CONFIG", "SYSTEM_PATHS", "CHECK_NAMES", "from_dict", "render_reference",
           "reload", "redacted"]

import importlib.util
import ipaddress
import math
import json
import os
import re
import resource
import socket
import tomllib
import urllib.parse
from dataclasses import dataclass
from typing import Any

from . import privileges
from .defence.dnsbl import parse_site
from .defence.networks import parse_cidrs, read_cidr_file
from .defence.recipients import RecipientTable
from .pools import Bounds, configured_bounds
from .settings import SECTION_HELP, SETTINGS, Setting
from .smtp.parse import valid_address

CHECK_NAMES = ("builtin", "clamd", "spamd", "rspamd")  # scanner/backends/NAME.py

EMBEDDED = "(embedded defaults)"
SYSTEM_CONFIG = "/etc/poolmgr/poolmgr.toml"
# The defaults that change when the config comes from SYSTEM_CONFIG's directory: systemd's
# RuntimeDirectory=poolmgr and StateDirectory=poolmgr (FHS: /run, /var/lib).
SYSTEM_PATHS = {
    "master.control_socket": "/run/poolmgr/poolmgr.sock",
    "master.pidfile": "/run/poolmgr/poolmgr.pid",
    "scanner.next_hop": "maildir:/var/lib/poolmgr/maildir",
    "scanner.quarantine": "/var/lib/poolmgr/quarantine",
}
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
RULE_KEYS = {"name", "header", "body", "pattern", "action"}
RULE_ACTIONS = ("reject", "tag")


# Settings a reload cannot change: the master holds their sockets and files.
RESTART_KEYS = ("smtp.listen", "scanner.listen", "master.control_socket", "master.pidfile",
                "metrics.listen", "scanner.policy")

class ConfigError(Exception):
    """One or more configuration errors; `errors` holds one line per error."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class NextHop:
    kind: str  # smtp, lmtp or maildir
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "maildir":
            return f"maildir:{self.path}"
        return f"{self.kind}:{format_address((self.host, self.port))}"


class Section:
    """Read-only attribute view of one config section."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", dict(values))
        # Plain attributes too: the hot path reads several a message, and a __getattr__ is
        # a Python call each time.
        self.__dict__.update(self._values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def _add(self, key: str, value: Any) -> None:
        self._values[key] = value
        self.__dict__[key] = value

    def __setattr__(self, key, value):
        raise AttributeError("configuration is read-only")

    def __eq__(self, other) -> bool:
        return isinstance(other, Section) and self._values == other._values

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


class Config:
    """The whole validated configuration: `cfg.smtp.max_workers`, `cfg.path`, `cfg.warnings`."""

    def __init__(self, path: str, sections: dict[str, dict[str, Any]],
                 warnings: list[str] | None = None):
        self.path = path
        self.warnings = warnings or []  # mended problems, logged at start and by check
        self._sections = {name: Section(values) for name, values in sections.items()}
        self.__dict__.update(self._sections)  # cfg.smtp without a __getattr__ call
        # A sub-section ([scanner.clamd]) is also an attribute of its parent: cfg.scanner.clamd.
        for name, section in self._sections.items():
            if "." in name:
                parent, child = name.rsplit(".", 1)
                self._sections[parent]._add(child, section)

    def __getattr__(self, name: str) -> Section:
        try:
            return self._sections[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def scanner_only(self) -> bool:
        """No SMTP pool (smtp.listen = [] or smtp.max_workers = 0): Postfix feeds the scanner
        pool as its content_filter."""
        return _scanner_only(self._sections["smtp"].as_dict())

    def bounds(self) -> Bounds:
        """Both pools' floors and ceilings at start, fitted to the sizing rule."""
        return _bounds(self._sections["smtp"].as_dict(), self._sections["scanner"].as_dict())

    def get(self, name: str) -> Any:
        section, key = name.split(".", 1)
        return getattr(self._sections[section], key)

    def scanner_addresses(self) -> list[tuple[str, int]]:
        """scanner.listen, then each policy bank's own listener."""
        scanner = self._sections["scanner"]
        return [scanner.listen] + [bank["listen"] for bank in scanner.policy]

    def restart_needed(self, new: "Config") -> str | None:
        """The first setting a reload to `new` cannot apply (a socket or file the running
        master holds); None when a reload can take them all."""
        if new.scanner_only != self.scanner_only:  # the SMTP pool's sockets come and go
            return "smtp.max_workers"
        for key in RESTART_KEYS:
            if key == "scanner.policy":  # a bank's actions may change; its listener may not
                if new.scanner_addresses() != self.scanner_addresses():
                    return key
            elif new.get(key) != self.get(key):
                return key
        return None

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and all(
            self._sections[s].as_dict() == other._sections[s].as_dict() for s in self._sections
        )


def parse_duration(value: Any) -> float:
    """'300s', '5m', '500ms', 2 -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like \"300s\"")
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(value))
    if not match:
        raise ValueError(f"expected a duration like \"300s\", \"5m\" or \"500ms\", got {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def parse_size(value: Any) -> int:
    """'25M', '10k', 10240000 -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like \"25M\"")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[bB]?\s*", str(value))
    if not match:
        raise ValueError(f"expected a size like \"25M\", \"10k\" or 10240000, got {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_address(value: Any) -> tuple[str, int]:
    """'127.0.0.1:2525', '[::1]:25', ':25' -> (host, port)."""
    text = str(value).strip()
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if not match:
        raise ValueError(f"expected host:port or [ipv6]:port, got {value!r}")
    host = match.group(1) if match.group(1) is not None else match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port}")
    return (host or "0.0.0.0", port)


def parse_listen(value: Any) -> tuple[tuple[str, int], ...]:
    """'0.0.0.0:25', or a list ["0.0.0.0:25", "[::1]:25"] -> ((host, port), ...): distinct
    addresses, one or more; the empty list [] is none (smtp.listen: no SMTP pool)."""
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected host:port strings, got {value!r}")
    addresses = tuple(parse_address(v) for v in _words(value, '["0.0.0.0:25", "[::]:25"]'))
    if not addresses and value != []:
        raise ValueError("expected at least one address")
    if len(set(addresses)) < len(addresses):
        raise ValueError(f"an address is listed twice in {value!r}")
    return addresses


def format_address(addr: tuple[str, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _words(value: Any, example: str) -> list:
    """A TOML list, or a Postfix-style string of words separated by commas or spaces."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, list):
        raise ValueError(f"expected a list like {example}")
    return value


def _parse_nexthop(value: Any) -> NextHop:
    text = str(value).strip()
    kind, _, rest = text.partition(":")
    if kind == "maildir" and rest:
        return NextHop("maildir", path=os.path.abspath(rest))
    if kind in ("smtp", "lmtp"):
        host, port = parse_address(rest)
        return NextHop(kind, host, port)
    raise ValueError(f"expected smtp:host:port, lmtp:host:port or maildir:PATH, got {value!r}")


def _parse_filter(value: Any) -> NextHop | None:
    text = str(value).strip()
    if not text:
        return None
    if not text.startswith(("smtp:", "lmtp:")):
        text = "smtp:" + text
    return _parse_nexthop(text)


def _parse_rules(value: Any) -> tuple:
    if not isinstance(value, list):
        raise ValueError("expected an array of tables ([[scanner.rules]])")
    rules = []
    for index, rule in enumerate(value):
        where = f"rule {index + 1}"
        if not isinstance(rule, dict):
            raise ValueError(f"{where}: expected a table")
        unknown = set(rule) - RULE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        if "pattern" not in rule:
            raise ValueError(f"{where}: 'pattern' is required")
        if bool(rule.get("header")) == bool(rule.get("body")):
            raise ValueError(f"{where}: give exactly one of 'header' or 'body = true'")
        action = rule.get("action", "reject")
        if action not in RULE_ACTIONS:
            raise ValueError(f"{where}: action must be one of {', '.join(RULE_ACTIONS)}")
        try:
            pattern = re.compile(str(rule["pattern"]))
        except re.error as exc:
            raise ValueError(f"{where}: bad pattern: {exc}") from None
        rules.append({"name": str(rule.get("name", f"rule{index + 1}")),
                      "header": str(rule.get("header", "")).lower(), "body": bool(rule.get("body")),
                      "pattern": pattern, "action": action})
    return tuple(rules)


# What a [[scanner.policy]] bank may set for mail arriving on its own listener (amavisd's
# policy banks): these scanner keys, by their own converters and bounds.
POLICY_KEYS = ("spam_action", "virus_action", "tag_level", "tag2_level", "kill_level",
               "spam_subject_tag", "bypass_spam_checks", "bypass_virus_checks")


def _parse_policies(value: Any) -> tuple:
    if not isinstance(value, list):
        raise ValueError("expected an array of tables ([[scanner.policy]])")
    settings = {s.key: s for s in SETTINGS if s.section == "scanner" and s.key in POLICY_KEYS}
    policies = []
    for index, table in enumerate(value):
        where = f"policy {index + 1}"
        if not isinstance(table, dict):
            raise ValueError(f"{where}: expected a table")
        unknown = set(table) - {"listen", "name", *POLICY_KEYS}
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r} (a policy sets "
                             f"listen, name and any of {', '.join(POLICY_KEYS)})")
        if "listen" not in table:
            raise ValueError(f"{where}: 'listen' is required")
        try:
            bank = {"listen": parse_address(table["listen"]),
                    "name": str(table.get("name", f"policy{index + 1}"))}
            for key in POLICY_KEYS:
                if key in table:
                    bank[key] = _convert(settings[key], table[key])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        policies.append(bank)
    return tuple(policies)


def _parse_nameserver(text: str) -> tuple[str, int]:
    """'127.0.0.1:5353', '[::1]:53', '::1', '10.0.0.1' -> (host, port); port 53 by default."""
    text = text.strip()
    if text.startswith("[") or text.count(":") == 1:
        return parse_address(text)
    ipaddress.ip_address(text)  # a bare IPv4 or IPv6 address
    return (text, 53)


def redacted(url: str) -> str:
    """The URL without its password (`redis://:***@HOST...`), for logs, status, `poolmgr
    config -n` and errors."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


def _parse_secret(value: Any) -> str:
    """A password: a string, never said back (an error names only its type)."""
    if not isinstance(value, str):
        kind = {bool: "true or false", int: "an integer", float: "a number", list: "an array",
                dict: "a table"}.get(type(value), "something else")
        raise ValueError(f"expected a string, got {kind} (not shown)")
    return value


def _parse_redis(value: Any) -> str:
    """'redis://HOST:PORT/DB', 'rediss://...', 'unix:///PATH' or '' -> the same string."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    text = value.strip()
    if not text:
        return ""
    url = urllib.parse.urlsplit(text)
    try:
        port = url.port
    except ValueError:
        port = -1
    database = url.path.strip("/")
    if url.scheme in ("redis", "rediss") and url.hostname and port != -1 and \
            (not database or database.isdigit()):
        return text
    if url.scheme == "unix" and url.path.startswith("/"):
        return text
    raise ValueError(f"expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB or "
                     f"unix:///PATH, got {redacted(text)!r}")


def _parse_sentinels(value: Any) -> tuple[tuple[str, int], ...]:
    """["10.0.0.5:26379", "[::1]:26379"] -> ((host, port), ...): distinct, each with a host."""
    sentinels = tuple(parse_address(v) for v in _words(value, '["10.0.0.5:26379"]'))
    for v in _words(value, ""):
        if str(v).strip().startswith(":"):
            raise ValueError(f"{v!r}: name the sentinel's host, e.g. \"10.0.0.5:26379\"")
    if len(set(sentinels)) < len(sentinels):
        raise ValueError(f"a sentinel is listed twice in {value!r}")
    return sentinels


_DOMAIN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


def _parse_domain_map(value: Any) -> dict[str, str]:
    """{"KEY.zen.dq.spamhaus.net" = "zen.spamhaus.org"} -> the same, keys lower case without
    a final dot: domain names both sides (a reply to a client shows the value)."""
    if not isinstance(value, dict):
        raise ValueError(f'expected a table like {{ "key.zen.dq.example" = "zen.example" }}, '
                         f"got {value!r}")
    result = {}
    for key, name in value.items():
        if not _DOMAIN.fullmatch(key):
            raise ValueError(f"expected a domain name as key, got {key!r}")
        if not isinstance(name, str) or not _DOMAIN.fullmatch(name):
            raise ValueError(f"{key}: expected a domain name, got {name!r}")
        result[key.lower().rstrip(".")] = name.rstrip(".")
    return result


def _parse_regexps(value: Any) -> tuple:
    """A list of Python regular expressions -> compiled, case-insensitive (amavisd's qr'...'i).
    Only a list: a pattern may hold the commas and spaces a string of words is split at."""
    if not isinstance(value, list):
        raise ValueError("expected a list like ['\\.exe$', '^application/x-msdownload$']")
    patterns = []
    for text in value:
        try:
            patterns.append(re.compile(str(text), re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"bad pattern {text!r}: {exc}") from None
    return tuple(patterns)


def _typed(kinds, what: str, convert=lambda v: v):
    """A converter that accepts only values of the TOML types `kinds` (bool is not a number)."""
    def check(value: Any) -> Any:
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            raise ValueError(f"expected {what}, got {value!r}")
        return convert(value)
    return check


def _each(parse, example: str):
    """A converter for a list setting: `parse` applied to every item."""
    return lambda value: tuple(parse(str(v)) for v in _words(value, example))


# One converter per setting kind (settings.Setting.kind).
CONVERTERS = {
    "str": _typed((str,), "a string"),
    "path": _typed((str,), "a path string", lambda v: os.path.abspath(v) if v else ""),
    "log": _typed((str,), '"syslog", "stderr" or a path string',
                  lambda v: v if v in ("", "syslog", "stderr") else os.path.abspath(v)),
    "int": _typed((int,), "an integer"),
    "float": _typed((int, float), "a number", float),
    "bool": _typed((bool,), "true or false"),
    "duration": parse_duration,
    "size": parse_size,
    "address": parse_address,
    "listen": parse_listen,
    "optaddress": lambda v: parse_address(v) if str(v).strip() else None,
    "cidrs": lambda v: parse_cidrs(_words(v, '["127.0.0.0/8", "::1/128"]')),
    "strlist": _each(str, '["example.com", "localhost"]'),
    "regexps": _parse_regexps,
    "nexthop": _parse_nexthop,
    "filter": _parse_filter,
    "rules": _parse_rules,
    "policies": _parse_policies,
    "sites": _each(parse_site, '["zen.example*3"]'),
    "addresses": _each(_parse_nameserver, '["127.0.0.1:5353"]'),
    "redis": _parse_redis,
    "secret": _parse_secret,
    "sentinels": _parse_sentinels,
    "domainmap": _parse_domain_map,
}


def _convert(setting: Setting, value: Any) -> Any:
    result = CONVERTERS[setting.kind](value)
    if isinstance(result, float) and not math.isfinite(result):
        raise ValueError(f"must be a finite number, got {value!r}")
    if setting.kind in ("duration", "size") and result < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    if setting.choices and result not in setting.choices:
        shown = (choice or '""' for choice in setting.choices)
        raise ValueError(f"must be one of {', '.join(shown)}, got {value!r}")
    if setting.min is not None and isinstance(result, (int, float)) and result < setting.min:
        raise ValueError(f"must be at least {setting.min:g}, got {value!r}")
    if setting.max is not None and isinstance(result, (int, float)) and result > setting.max:
        raise ValueError(f"must be at most {setting.max:g}, got {value!r}")
    return result


def _scanner_only(smtp: dict[str, Any]) -> bool:
    return not smtp["listen"] or smtp["max_workers"] == 0


def _bounds(smtp: dict[str, Any], scanner: dict[str, Any]) -> Bounds:
    """Both pools' bounds from their sections (no SMTP pool: its ceiling is 0)."""
    return configured_bounds(smtp["min_workers"],
                             0 if _scanner_only(smtp) else smtp["max_workers"],
                             scanner["min_workers"], scanner["max_workers"],
                             scanner["feeder_maxproc"])


def _check_feeder(scanner: dict[str, Any], scanner_only: bool, warn) -> int:
    """The scanner pool against what feeds it, Postfix's content_filter transport (its maxproc,
    feeder_maxproc): more workers than it opens connections never get mail (amavisd's
    $max_servers above maxproc, the classic misconfiguration); under half as many keep its
    deliveries waiting. Returns the scanner ceiling the feeder leaves."""
    feeder, most = scanner["feeder_maxproc"], scanner["max_workers"]
    if feeder and most > feeder:
        warn("scanner.max_workers", f"{most} scanner workers are more than "
             f"scanner.feeder_maxproc ({feeder}), the connections Postfix opens to them (the "
             f"maxproc of its content_filter transport); the scanner pool is capped at "
             f"{feeder}: lower max_workers or raise that maxproc")
    elif feeder > 2 * most:
        warn("scanner.feeder_maxproc", f"{feeder} connections from Postfix are more than twice "
             f"scanner.max_workers ({most}): its deliveries wait for a scanner worker; raise "
             f"max_workers or lower the maxproc of its content_filter transport")
    elif scanner_only and not feeder:
        warn("scanner.feeder_maxproc", "not set, and poolmgr has no SMTP pool: set it to the "
             "maxproc of Postfix's content_filter transport (master.cf), so that the scanner "
             "pool and Postfix agree on how many deliveries run at once")
    return min(most, feeder) if feeder else most


def _check_cluster(cluster: dict[str, Any], err) -> None:
    """One shared Redis: a fixed address (redis) or the master the sentinels name, not both."""
    if cluster["redis"] and cluster["sentinels"]:
        err("cluster.sentinels", "set either redis or sentinels, not both (sentinels find "
            "the master that redis would name)")
    for key in ("redis", "sentinels"):
        if cluster[key] and importlib.util.find_spec("redis") is None:
            err(f"cluster.{key}", "needs the Python package redis (Debian: python3-redis, "
                "which the poolmgr package recommends)")
    for key in ("password", "sentinel_password"):
        if cluster[key] and not cluster["sentinels"]:
            err(f"cluster.{key}", "used only with sentinels (with redis, put the password in "
                "the URL: rediss://:PASSWORD@HOST:6379/0)")
    name = cluster["sentinel_master"]
    if cluster["sentinels"] and not re.fullmatch(r"[^\s\x00-\x1f]{1,128}", name):
        err("cluster.sentinel_master", f"{name!r}: the name the sentinels monitor the master "
            "as (sentinel monitor NAME ...), without spaces")


def _cross_check(sections: dict[str, dict[str, Any]], err, warn) -> None:
    smtp, scanner, master = sections["smtp"], sections["scanner"], sections["master"]
    master["ids"], key, reason = privileges.resolve(master["user"], master["group"])
    if reason:
        err(f"master.{key}", reason)
    scanner_only = _scanner_only(smtp)
    for pool in (scanner,) if scanner_only else (smtp, scanner):
        name = "smtp" if pool is smtp else "scanner"
        if pool["min_workers"] > pool["max_workers"]:
            err(f"{name}.min_workers", f"{pool['min_workers']} is above "
                f"{name}.max_workers ({pool['max_workers']})")
    defence = sections["defence"]
    for kind in ("allowlist", "denylist"):
        if defence[f"{kind}_file"]:
            try:
                defence[kind] = defence[kind] + read_cidr_file(defence[f"{kind}_file"])
            except (OSError, ValueError) as exc:
                err(f"defence.{kind}_file", str(exc))
    defence["recipient_table"] = None
    if defence["recipients"]:
        try:
            defence["recipient_table"] = RecipientTable.load(defence["recipients"])
        except (OSError, ValueError) as exc:
            err("defence.recipients", str(exc))
    domains = {site.domain for site in defence["dnsbl_sites"]}
    for queried in defence["dnsbl_reply_map"]:
        if queried not in domains:
            warn("defence.dnsbl_reply_map", f"{queried!r} is the domain of no "
                 f"defence.dnsbl_sites entry, so this mapping is never used")
    if defence["unknown_reverse_client_action"] != "ignore" and not defence["reverse_lookup"]:
        warn("defence.unknown_reverse_client_action",
             f"{defence['unknown_reverse_client_action']} needs defence.reverse_lookup = true; "
             "no client is looked up, so none is refused")
    _check_cluster(sections["cluster"], err)
    node = sections["cluster"]["node"]
    if node and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", node):
        err("cluster.node", f"{node!r}: use at most 64 letters, digits, '.', '_' or '-'")
    auto = sections["autoscale"]
    if auto["storm_exit_occupancy"] >= auto["storm_enter_occupancy"]:
        err("autoscale.storm_exit_occupancy", f"{auto['storm_exit_occupancy']:g} must be below "
            f"autoscale.storm_enter_occupancy ({auto['storm_enter_occupancy']:g})")
    if auto["scanner_busy_low"] >= auto["scanner_busy_high"]:
        err("autoscale.scanner_busy_low", f"{auto['scanner_busy_low']:g} must be below "
            f"autoscale.scanner_busy_high ({auto['scanner_busy_high']:g})")
    # Never fewer SMTP than scanner workers (pools.fit): what can be mended is mended, and said.
    # Without an SMTP pool the SMTP listeners of the rule are Postfix's (the feeder's maxproc).
    wanted = _check_feeder(scanner, scanner_only, warn)
    bounds = _bounds(smtp, scanner)
    if not scanner_only and bounds.scanner_floor > bounds.smtp_ceiling:
        err("scanner.min_workers", f"{scanner['min_workers']} scanner workers need as many SMTP "
            f"workers, above smtp.max_workers ({smtp['max_workers']})")
    elif bounds.smtp_floor > smtp["min_workers"]:
        warn("scanner.min_workers", f"{scanner['min_workers']} is above smtp.min_workers "
             f"({smtp['min_workers']}); the SMTP pool starts at {bounds.smtp_floor} so that "
             f"scanner workers never outnumber SMTP workers")
    if bounds.scanner_ceiling < wanted:
        warn("scanner.max_workers", f"{scanner['max_workers']} is above smtp.max_workers "
             f"({smtp['max_workers']}); the scanner pool's ceiling is {bounds.scanner_ceiling}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if smtp["max_sessions_per_worker"] > limit - 100:
        err("smtp.max_sessions_per_worker", f"{smtp['max_sessions_per_worker']} sessions need "
            f"more open files than this host allows (RLIMIT_NOFILE hard limit {limit}); "
            f"use at most {limit - 100}")
    somaxconn = _somaxconn()
    if somaxconn is not None and smtp["listen_backlog"] > somaxconn:
        warn("smtp.listen_backlog", f"{smtp['listen_backlog']} is above net.core.somaxconn "
             f"({somaxconn}), which caps it: raise the sysctl or the backlog is {somaxconn}")
    if bool(smtp["tls_cert"]) != bool(smtp["tls_key"]):
        err("smtp.tls_cert", "tls_cert and tls_key must be set together")
    for key in ("tls_cert", "tls_key"):
        if smtp[key] and not os.access(smtp[key], os.R_OK):
            err(f"smtp.{key}", f"cannot read {smtp[key]}")
    if smtp["proxy_protocol"] and not smtp["proxy_networks"]:
        err("smtp.proxy_networks", f"empty, and proxy_protocol is {smtp['proxy_protocol']!r}: "
            "name the load balancers that may send a PROXY header (e.g. [\"10.0.0.5/32\"])")
    if not scanner_only and smtp["proxy_filter"] is None and \
            scanner["timeout"] >= smtp["proxy_timeout"]:
        warn("scanner.timeout", f"{scanner['timeout']:g}s is not below smtp.proxy_timeout "
             f"({smtp['proxy_timeout']:g}s): a slow scan gets 451 from the SMTP worker and may be "
             f"delivered twice when the client retries")
    if scanner["virus_admin"] and not valid_address(scanner["virus_admin"]):
        err("scanner.virus_admin", f"not an address: {scanner['virus_admin']!r}")
    for name in scanner["checks"]:
        if name not in CHECK_NAMES:
            err("scanner.checks", f"unknown check {name!r} (known: {', '.join(CHECK_NAMES)})")
    if len(set(scanner["checks"])) != len(scanner["checks"]):
        err("scanner.checks", "a check is named twice")
    if scanner["listen"] in smtp["listen"]:
        err("scanner.listen", "must differ from every address of smtp.listen")
    taken = {scanner["listen"], *smtp["listen"]}
    for bank in scanner["policy"] or ():
        if bank["listen"] in taken:
            err("scanner.policy", f"{bank['name']}: listen {format_address(bank['listen'])} "
                "is taken by another listener")
        taken.add(bank["listen"])


def _somaxconn() -> int | None:
    """The kernel's cap on every listen backlog (Linux), None where it cannot be read."""
    try:
        with open("/proc/sys/net/core/somaxconn") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def _expand(sections: dict[str, dict[str, Any]]) -> None:
    smtp = sections["smtp"]
    if not smtp["hostname"]:
        smtp["hostname"] = socket.gethostname() or "localhost"
    smtp["mydestination"] = tuple(
        d.replace("$myhostname", smtp["hostname"]).lower().rstrip(".")
        for d in smtp["mydestination"])
    if not sections["scanner"]["hostname"]:
        sections["scanner"]["hostname"] = smtp["hostname"]
    if not sections["cluster"]["node"]:
        sections["cluster"]["node"] = socket.gethostname() or "localhost"


def _sub_sections(data: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    """TOML nests [scanner.clamd] inside [scanner]; the loader sees it as a section of its own,
    named "scanner.clamd"."""
    data = dict(data)
    for name in known:
        parent, _, child = name.rpartition(".")
        table = data.get(parent)
        if parent and isinstance(table, dict) and child in table:
            table = dict(table)
            data[name] = table.pop(child)
            data[parent] = table
    return data


def find(given: str | None) -> str | None:
    """The config file to use: `-c`, $POOLMGR_CONFIG, SYSTEM_CONFIG if it exists, else None
    (the embedded defaults)."""
    if given:
        return given
    if os.environ.get("POOLMGR_CONFIG"):
        return os.environ["POOLMGR_CONFIG"]
    return SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else None


def _base(path: str) -> str:
    """The directory relative paths are taken from: the config file's, or the working one."""
    return os.getcwd() if path == EMBEDDED else os.path.dirname(os.path.abspath(path))


def _default(setting: Setting, path: str) -> Any:
    """A setting's default for a config at `path`: the system layout's for a file in
    SYSTEM_CONFIG's directory."""
    system = path != EMBEDDED and os.path.dirname(os.path.abspath(path)) == \
        os.path.dirname(SYSTEM_CONFIG)
    return SYSTEM_PATHS.get(setting.name, setting.default) if system else setting.default


def _anchor(setting: Setting, raw: Any, base: str) -> Any:
    """A relative path (or maildir:PATH) taken from `base`."""
    if setting.kind == "path" and isinstance(raw, str) and raw:
        return os.path.join(base, raw)
    if setting.kind == "nexthop" and isinstance(raw, str) and raw.strip().startswith("maildir:"):
        return "maildir:" + os.path.join(base, raw.strip().removeprefix("maildir:"))
    return raw


def from_dict(data: dict[str, Any], path: str = EMBEDDED) -> Config:
    errors: list[str] = []
    warnings: list[str] = []

    def err(name: str, reason: str, into: list[str] = errors) -> None:
        section, key = name.rsplit(".", 1)
        into.append(f"{path}: [{section}] {key}: {reason}")

    def warn(name: str, reason: str) -> None:
        err(name, reason, warnings)

    base = _base(path)
    known = {}
    for setting in SETTINGS:
        known.setdefault(setting.section, {})[setting.key] = setting
    data = _sub_sections(data, known)
    sections: dict[str, dict[str, Any]] = {}
    for name, table in data.items():
        if name not in known:
            errors.append(f"{path}: [{name}]: unknown section "
                          f"(known: {', '.join(known)})")
        elif not isinstance(table, dict):
            errors.append(f"{path}: {name}: expected a [{name}] table")
        else:
            former = {a for s in known[name].values() for a in s.aliases}
            for key in table:
                if key not in known[name] and key not in former:
                    err(f"{name}.{key}", "unknown key")
    for setting in SETTINGS:
        table = data.get(setting.section)
        table = table if isinstance(table, dict) else {}
        given = [k for k in (setting.key, *setting.aliases) if k in table]
        if len({repr(table[k]) for k in given}) > 1:
            err(setting.name, f"set only one of {' and '.join(given)} (a former name)")
        raw = table[given[0]] if given else _default(setting, path)
        try:
            value = _convert(setting, _anchor(setting, raw, base))
        except ValueError as exc:
            err(setting.name, str(exc))
            value = None
        sections.setdefault(setting.section, {})[setting.key] = value
    if not errors:
        _cross_check(sections, err, warn)
    if errors:
        raise ConfigError(errors)
    _expand(sections)
    return Config(path, sections, warnings)


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None


def load(path: str | None) -> Config:
    """Load and validate `path`; None gives the embedded defaults."""
    if path is None:
        return from_dict({})
    return from_dict(_read(path), path)


def reload(path: str | None, running: Config, log) -> Config | None:
    """The configuration a reload (HUP) applies, or None when it is refused (invalid, or a
    setting changed that needs a restart); each reason logged."""
    try:
        new = load(path)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("reload: %s", line)
        log.error("reload failed: keeping the running configuration")
        return None
    key = running.restart_needed(new)
    if key is not None:
        log.error("reload refused: %s changed; restart poolmgr to apply it", key)
        return None
    for warning in new.warnings:
        log.warning("reload: %s", warning)
    return new


def differences(path: str | None) -> list[tuple[str, Any]]:
    """`poolmgr config -n` (postconf -n): (section.key, value as written) for each setting the
    file sets to something other than its default; the file must validate."""
    if path is None:
        return []
    data = _read(path)
    from_dict(data, path)  # ConfigError when invalid
    known = {setting.section for setting in SETTINGS}
    data = _sub_sections(data, {name: None for name in known})
    base, found = _base(path), []
    for setting in SETTINGS:
        table = data.get(setting.section, {})
        given = [k for k in (setting.key, *setting.aliases) if k in table]
        if not given:
            continue
        raw = table[given[0]]
        convert = lambda value: _convert(setting, _anchor(setting, value, base))  # noqa: E731
        if convert(raw) != convert(_default(setting, path)):
            found.append((setting.name, _shown(setting, raw)))
    return found


def _shown(setting: Setting, value: Any) -> Any:
    """A setting's value as `poolmgr config -n` prints it: passwords hidden (a sysadmin pastes
    it into a bug report)."""
    if setting.kind == "secret":
        return "***"
    if setting.kind == "redis" and isinstance(value, str):
        return redacted(value)
    return value


def setting_of(path: str | None, name: str) -> Any:
    """Best effort for `status`, `ctl` and `stop` when the file does not validate: one path
    setting as the file gives it (or its default), taken from the file's directory."""
    setting = next(s for s in SETTINGS if s.name == name)
    where = path or EMBEDDED
    value = _default(setting, where)
    section, key = name.split(".")
    try:
        with open(path or "", "rb") as handle:
            value = tomllib.load(handle).get(section, {}).get(key, value)
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        pass
    return os.path.abspath(_anchor(setting, str(value), _base(where)))


def control_socket_of(path: str | None) -> str:
    return setting_of(path, "master.control_socket")


def toml_value(value: Any) -> str:
    """One value as TOML: bool, int, float, str (or a path), list or tuple, dict (an inline
    table). The one TOML writer: the default config and the test harness's configs use it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{k if _BARE_KEY.fullmatch(k) else toml_value(k)} = "
                                f"{toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def render_default() -> str:
    """The documented default configuration, as shipped in conf/poolmgr.toml."""
    header = ["# poolmgr configuration: every key with its default value.",
              "# Generated from poolmgr/settings.py by 'poolmgr config'; 'poolmgr check -c FILE'",
              "# validates a file. Durations: \"300s\", \"5m\", \"500ms\". Sizes: \"25M\", \"10k\".",
              ""]

    def line(setting: Setting) -> str:
        if setting.kind in ("rules", "policies"):  # tables: their help shows the shape
            return "# " + _assignment(setting, setting.default)
        return _assignment(setting, setting.default)
    return _render(header, line)


# What the sample sets; everything else is left at its default.
SAMPLE_SETTINGS = {"master.user": "poolmgr"}


def render_sample() -> str:
    """The sample /etc/poolmgr/poolmgr.toml that packages install (conf/poolmgr.sample.toml):
    it sets SAMPLE_SETTINGS only; every other key is there commented out, at its default in
    that directory (SYSTEM_PATHS), to be uncommented and changed."""
    header = ["# /etc/poolmgr/poolmgr.toml: poolmgr's configuration. It sets only [master] user;",
              "# every other key is commented out at its default. Uncomment a key to change it,",
              "# then 'poolmgr check' validates the file and 'poolmgr config -n' lists what it",
              "# changes. Generated from poolmgr/settings.py by 'poolmgr config --sample'.",
              "# Durations: \"300s\", \"5m\", \"500ms\". Sizes: \"25M\", \"10k\".", ""]

    def line(setting: Setting) -> str:
        if setting.name in SAMPLE_SETTINGS:
            return _assignment(setting, SAMPLE_SETTINGS[setting.name])
        return "#" + _assignment(setting, SYSTEM_PATHS.get(setting.name, setting.default))
    return _render(header, line)


def _assignment(setting: Setting, value: Any) -> str:
    if setting.kind in ("rules", "policies"):
        return f"{setting.key} = []"
    if setting.key.endswith("_mode"):
        return f"{setting.key} = 0o{value:o}"
    return f"{setting.key} = {toml_value(value)}"


def _render(header: list[str], line) -> str:
    """A config file: `header`, then each section with its help, and each setting with its
    help and `line(setting)`."""
    lines, current = list(header), None
    for setting in SETTINGS:
        if setting.section != current:
            current = setting.section
            lines += [f"[{current}]"] + [f"# {h}" for h in SECTION_HELP[current].splitlines()] + [""]
        lines += [f"# {h}".rstrip() for h in setting.help.splitlines()]
        lines += [line(setting), ""]
    return "\n".join(lines)


def render_reference() -> str:
    """The settings as Markdown tables, section by section (docs/configuration.md, made by
    manpage.configuration_markdown)."""
    lines, current = [], None
    for setting in SETTINGS:
        if setting.section != current:
            current = setting.section
            intro = " ".join(line.strip() for line in SECTION_HELP[current].splitlines())
            lines += ["", f"**[{current}]** {intro}", "",
                      "| key | default | meaning |", "|---|---|---|"]
        if setting.key.endswith("_mode"):
            default = f"0o{setting.default:o}"
        else:
            default = toml_value(setting.default)
        text = " ".join(line.strip() for line in setting.help.splitlines()
                        if not line.startswith("  ")).replace("|", "\\|")
        lines.append(f"| `{setting.key}` | `{default}` | {text} |")
    return "\n".join(lines) + "\n"
