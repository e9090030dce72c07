"""Test support shared by the test suite and the bench's targets: real poolmgr, Postfix,
smtp-sink, amavisd-new, clamd, spamd, rspamd and DNS server processes on loopback ports. Not
used by poolmgr at run time.

- `poolmgr`: Poolmgr (a `poolmgr run` subprocess), write_config, HELO
- `sink`: Sink (Postfix's smtp-sink)
- `recorder`: Recorder (a scripted SMTP/LMTP next hop that records what it accepted), Copy
- `amavisd`: Amavisd (Debian's amavisd-new with a private config, home and ports)
- `clamd`: Clamd (a private ClamAV clamd with a local EICAR signature), EICAR_NAME, ping
- `spamd`: Spamd (SpamAssassin's spamd, local tests only)
- `postfix`: Postfix (a private Postfix instance)
- `nameserver`: DnsServer (dnslib, DNSBL records), Dnsmasq (the bench's), SilentDns (a server
  that is down)
- `rspamd`: Rspamd (a private rspamd, offline), ENVELOPE_SYMBOL
- `redis`: RedisServer (a private redis-server on a loopback port and a Unix socket),
  SentinelGroup (a master, a replica and three sentinels)
- `haproxy`: HAProxy (a private HAProxy in front of nodes, sending PROXY headers)
- `wait`: free_port, free_udp_port, listening, wait_until, WaitTimeout
"""

from .amavisd import Amavisd
from .clamd import EICAR_NAME, Clamd, ping
from .haproxy import HAProxy
from .nameserver import DnsServer, Dnsmasq, SilentDns
from .poolmgr import HELO, Poolmgr, write_config
from .postfix import Postfix
from .recorder import Copy, Recorder
from .redis import RedisServer, SentinelGroup
from .rspamd import ENVELOPE_SYMBOL, Rspamd
from .sink import Sink
from .spamd import Spamd
from .wait import WaitTimeout, free_port, free_udp_port, listening, wait_until

__all__ = ["ENVELOPE_SYMBOL", "EICAR_NAME", "HELO", "Amavisd", "Clamd", "Copy", "DnsServer",
           "Dnsmasq", "HAProxy", "Poolmgr", "Postfix", "Recorder", "RedisServer", "Rspamd",
           "SentinelGroup", "SilentDns", "Sink", "Spamd",
           "WaitTimeout", "free_port", "free_udp_port", "listening", "ping", "wait_until",
           "write_config"]
