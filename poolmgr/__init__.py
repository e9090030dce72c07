"""poolmgr: a prefork SMTP listener pool manager for mail servers under botnet load."""

__version__ = "0.2.0"
