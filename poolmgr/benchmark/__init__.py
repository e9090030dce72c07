"""The benchmark harness (`poolmgr bench`): scenarios, the load generator, targets, reports.

`scenario` reads scenario files, `load` is the load generator, `targets` starts the servers
measured (poolmgr, Postfix, aiosmtpd) with their peers, `run` runs a scenario against them,
`report` turns a run into figures, plots and Markdown.
"""

__all__: list[str] = []
