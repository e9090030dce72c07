"""poolmgr: a prefork SMTP listener pool manager for mail servers under botnet load."""

__all__: list[str] = []

__version__ = "0.2.0"
