"""Storm defences of the SMTP pool: access lists, pregreet, DNSBL scoring, nuisance verdicts."""

__all__: list[str] = []
