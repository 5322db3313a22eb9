"""Keeping and pruning: which backups a tier keeps (rules.py, a pure function over the manifests), pruning the
repository, the replica and the physical tier (prune.py), and pruning old application rows once a drilled
backup holds them (app_tables.py)."""
