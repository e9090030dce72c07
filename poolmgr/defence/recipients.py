"""The table of valid recipients for the local domains (Postfix: local_recipient_maps).

A file of addresses, one per line, `#` comments; `@example.com` accepts every address of a
domain. Only the domains named in the file are checked: mail for other domains passes to the
relay check. Lookups ignore case, as Postfix's table lookups do.
"""

__all__ = ["RecipientTable"]

class RecipientTable:
    __slots__ = ("path", "addresses", "domains", "catchall")

    def __init__(self, path: str, addresses=(), catchall=()):
        self.path = path
        self.addresses = frozenset(a.lower() for a in addresses)
        self.catchall = frozenset(d.lower() for d in catchall)
        self.domains = self.catchall | {a.rpartition("@")[2] for a in self.addresses}

    @classmethod
    def load(cls, path: str) -> "RecipientTable":
        """Read the file; OSError or ValueError (with the line number) when it is unusable."""
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise OSError(f"cannot read {path}: {exc.strerror}") from None
        addresses, catchall = [], []
        for number, line in enumerate(lines, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            local, at, domain = words[0].rpartition("@")
            if not at or not domain or "@" in local:
                raise ValueError(f"{path} line {number}: {words[0]!r} is not an address "
                                 f"(user@example.com) or a domain (@example.com)")
            if local:
                addresses.append(words[0])
            else:
                catchall.append(domain)
        return cls(path, addresses, catchall)

    def verdict(self, key: str) -> bool | None:
        """True: a known recipient; False: unknown in a local domain; None: not ours to say.
        `key` is the address's lower-case normal form (`smtp.parse.canonical`)."""
        domain = key.rpartition("@")[2] if "@" in key else ""
        if domain not in self.domains:
            return None
        return domain in self.catchall or key in self.addresses

    def __eq__(self, other) -> bool:
        return (isinstance(other, RecipientTable) and self.path == other.path and
                self.addresses == other.addresses and self.catchall == other.catchall)

    def __len__(self) -> int:
        return len(self.addresses) + len(self.catchall)
