"""Restoring dumps and SQLite copies without destroying the old data first (logical.py), the catalog's commands
around a restore (hooks.py), and the append-only restore log (restore_log.py). Point-in-time recovery is in
core/pitr/."""
