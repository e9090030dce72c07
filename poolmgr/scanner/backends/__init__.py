"""The scanner's check back-ends, one module each, named as in `scanner.checks`.

Each module defines `Backend`, a `base.Check` subclass: `builtin` (rules and EICAR), `clamd`
(ClamAV, zINSTREAM), `spamd` (SpamAssassin, SPAMC/1.5), `rspamd` (/checkv2 over HTTP).
"""

import importlib

from ...config import CHECK_NAMES as NAMES
from .base import Check

__all__ = ["NAMES", "load"]


def load(cfg) -> list[Check]:
    """The checks of `cfg.scanner.checks`, in their order, each with its own settings."""
    checks = []
    for name in cfg.scanner.checks:
        module = importlib.import_module(f"{__name__}.{name}")
        checks.append(module.Backend(cfg))
    return checks
