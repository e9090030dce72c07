"""The benchmark harness: scenarios, the load generator, runs against a target, reports.

Exports nothing at package level: see `scenario`, `load`, `run`.
"""
