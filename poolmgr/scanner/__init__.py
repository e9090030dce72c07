"""The scanner pool: amavisd-style content-scanner workers."""

__all__: list[str] = []
