"""The benchmark harness (`poolmgr bench`): scenarios, the load generator, targets, reports.

`scenario` reads scenario files, `load` is the load generator, `targets` starts the servers
measured (poolmgr, Postfix, aiosmtpd) with their peers, `run` runs a scenario against them,
`report` turns a run into figures, plots and Markdown. `scanner_pool` and `cluster_overhead`
measure poolmgr alone with the same load generator (messages/second through the scanner pool
per back-end and size; connections/second of a node with `[cluster]` and without).
Exports nothing at package level.
"""

__all__: list[str] = []

