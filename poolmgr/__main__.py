"""`python3 -m poolmgr`: the command line (`cli.main`)."""

__all__: list[str] = []

from .cli import main

raise SystemExit(main())
