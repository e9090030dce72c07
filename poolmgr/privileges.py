"""Who the workers run as: `master.user` and `master.group`, resolved, handed over, dropped.

The master starts as root to bind port 25 and stays root; every worker it forks drops to the
configured user after its `init_process` (which may still read root-only files, such as the
TLS key, as Postfix's smtpd does before its jail) and before its first client. `resolve` is
the config's check: an unknown user or group is a config error, not a crash. `hand_over`
gives that user the files the workers write (the maildir, the log file), as Postfix's master
hands its queue to mail_owner. `drop` is the worker's side: supplementary groups cleared, then
the group, then the user, so that nothing can be regained.
"""

__all__ = ["Ids", "resolve", "hand_over", "drop"]

import grp
import os
import pwd
from typing import NamedTuple


class Ids(NamedTuple):
    user: str
    uid: int
    gid: int


def _lookup(table, name: str):
    """A passwd or group entry by name, or by number when the name is all digits."""
    try:
        return table.getpwnam(name) if table is pwd else table.getgrnam(name)
    except KeyError:
        if name.isdigit():
            try:
                return table.getpwuid(int(name)) if table is pwd else table.getgrgid(int(name))
            except KeyError:
                pass
    return None


def resolve(user: str, group: str) -> tuple[Ids | None, str, str]:
    """(ids, key, reason): ids None and a reason naming the key at fault when a name is
    unknown; ids None and no reason when no user is set (workers keep the master's ids)."""
    if not user:
        return (None, "group", "needs master.user") if group else (None, "", "")
    entry = _lookup(pwd, user)
    if entry is None:
        return None, "user", f"unknown user {user!r}"
    if not group:
        return Ids(user, entry.pw_uid, entry.pw_gid), "", ""
    gentry = _lookup(grp, group)
    if gentry is None:
        return None, "group", f"unknown group {group!r}"
    return Ids(user, entry.pw_uid, gentry.gr_gid), "", ""


def hand_over(path: str, ids: Ids | None) -> None:
    """Give `path` to the workers' user (the master creates it, the workers write it)."""
    if ids is not None and path and os.geteuid() == 0:
        os.chown(path, ids.uid, ids.gid)


def drop(ids: Ids | None) -> None:
    """In a worker, before its first client: become ids for good. Raises OSError."""
    if ids is None or (os.getuid(), os.getgid()) == (ids.uid, ids.gid):
        return
    os.setgroups([])
    os.setgid(ids.gid)
    os.setuid(ids.uid)
