"""Test support shared by the test suite and the bench's targets: real poolmgr, Postfix,
smtp-sink and DNS server processes on loopback ports. Not used by poolmgr at run time.

- `poolmgr`: Poolmgr (a `poolmgr run` subprocess), write_config, HELO
- `sink`: Sink (Postfix's smtp-sink)
- `postfix`: Postfix (a private Postfix instance)
- `nameserver`: DnsServer (dnslib, DNSBL records), SilentDns (a server that is down)
- `rspamd`: Rspamd (a private rspamd, offline), ENVELOPE_SYMBOL
- `wait`: free_port, free_udp_port, listening, wait_until, WaitTimeout

Exports all of the above.
"""

from .nameserver import DnsServer, SilentDns
from .poolmgr import HELO, Poolmgr, write_config
from .postfix import Postfix
from .rspamd import ENVELOPE_SYMBOL, Rspamd
from .sink import Sink
from .wait import WaitTimeout, free_port, free_udp_port, listening, wait_until

__all__ = ["ENVELOPE_SYMBOL", "HELO", "DnsServer", "Poolmgr", "Postfix", "Rspamd", "SilentDns",
           "Sink", "WaitTimeout", "free_port", "free_udp_port", "listening", "wait_until",
           "write_config"]
