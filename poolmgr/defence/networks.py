"""Network lists (mynetworks, allowlist, denylist, inet_acl): parsing and lookup.

Entries are CIDR networks, IPv4 or IPv6, written inline or one per line in a file (`#`
comments), Postfix's `[::1]/128` style accepted. `plain_ip` turns an IPv4-mapped IPv6 peer
(`::ffff:192.0.2.1`, what a dual-stack `[::]` socket reports for an IPv4 client) back into
plain IPv4; sessions apply it once to their peer, so every list, DNSBL query, anvil key, log
line and trace header sees the address as the client has it.
"""

__all__ = ["parse_cidrs", "read_cidr_file", "in_networks", "plain_ip"]

import functools
import ipaddress
import re


def parse_cidrs(items) -> tuple:
    nets = []
    for item in items:
        text = str(item).strip()
        bracketed = re.fullmatch(r"\[([^\]]+)\](/\d+)?", text)  # Postfix style [::1]/128
        if bracketed:
            text = bracketed.group(1) + (bracketed.group(2) or "")
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"not a network: {item!r}") from None
    return tuple(nets)


def read_cidr_file(path: str) -> tuple:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror}") from None
    words = [line.split("#", 1)[0].strip() for line in lines]
    try:
        return parse_cidrs([w for w in words if w])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# A session's address is looked up in several lists: parse it once.
_address = functools.lru_cache(maxsize=1024)(ipaddress.ip_address)


_answers: dict[tuple[str, int], tuple[object, bool]] = {}


def in_networks(address: str, networks) -> bool:
    """Whether an IP address string lies in any of the parsed networks of a setting.
    Answers are kept per address and list (each `ip in net` is Python code, and a session
    asks several lists at connect and again per message)."""
    key = (address, id(networks))
    kept = _answers.get(key)
    if kept is not None and kept[0] is networks:
        return kept[1]
    ip = _address(address)
    answer = any(ip in net for net in networks)
    if len(_answers) >= 4096:
        _answers.clear()
    _answers[key] = (networks, answer)
    return answer


def plain_ip(address: str) -> str:
    """'::ffff:192.0.2.1' -> '192.0.2.1'; any other address (or non-address) unchanged."""
    if ":" not in address:
        return address  # IPv4 (every connection of an IPv4 listener): nothing to map
    try:
        mapped = getattr(ipaddress.ip_address(address), "ipv4_mapped", None)
    except ValueError:
        return address
    return str(mapped) if mapped is not None else address
