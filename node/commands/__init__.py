"""Subcommands of `cacs-node`, one module each.

Each module defines `HELP` (one line), `configure(parser)` that adds its
arguments, and `run(args) -> int` that returns the exit status. Modules keep
heavy imports (torch, highdicom, pynetdicom) inside `run`, so `cacs-node
--help` stays fast.
"""
