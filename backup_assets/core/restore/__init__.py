"""Restoring dumps and SQLite copies without destroying the old data first: what may be replaced and from which
backup (choose.py), whole PostgreSQL databases (postgres.py), selected tables (tables.py), SQLite files
(sqlite.py); the catalog's commands around a restore (hooks.py) and the append-only restore log
(restore_log.py). Point-in-time recovery is in core/pitr/."""
