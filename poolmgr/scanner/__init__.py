"""The scanner pool: amavisd-style content-scanner workers."""
