"""The SMTP side: protocol, replies, I/O, and the gevent SMTP worker."""

__all__: list[str] = []
