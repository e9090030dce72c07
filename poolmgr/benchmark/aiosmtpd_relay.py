"""The aiosmtpd target: aiosmtpd's stock SMTP server with its stock `Proxy` handler.

    python -m poolmgr.benchmark.aiosmtpd_relay PORT NEXT_HOP_PORT [BACKLOG]

What someone running a plain asyncio SMTP relay has: one process, no defences, each message
relayed with smtplib to the next hop before the 250 (aiosmtpd's `Proxy` handler). The
hostname is given, since aiosmtpd would otherwise ask the system resolver for it; the listen
backlog is poolmgr's in the same run (default 1024).
"""

__all__ = ["main"]

import asyncio
import sys

from aiosmtpd.handlers import Proxy
from aiosmtpd.smtp import SMTP


async def serve(port: int, next_hop: int, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Proxy("127.0.0.1", next_hop), hostname="aiosmtpd.example.test"),
        "127.0.0.1", port, backlog=backlog)
    await server.serve_forever()


def main(argv: list[str]) -> int:
    asyncio.run(serve(int(argv[0]), int(argv[1]), int(argv[2]) if len(argv) > 2 else 1024))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
