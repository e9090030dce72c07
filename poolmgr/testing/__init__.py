"""Test support shared by the test suite and the bench's targets: real poolmgr, Postfix,
smtp-sink and DNS server processes on loopback ports. Not used by poolmgr at run time.

Exports: Poolmgr, Sink, Postfix, DnsServer, SilentDns, free_port, wait_until, write_config,
HELO (see harness).
"""

from .harness import (HELO, DnsServer, Poolmgr, Postfix, SilentDns, Sink, free_port,
                      wait_until, write_config)

__all__ = ["HELO", "DnsServer", "Poolmgr", "Postfix", "SilentDns", "Sink", "free_port",
           "wait_until", "write_config"]
