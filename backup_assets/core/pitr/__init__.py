"""Point-in-time recovery for PostgreSQL: base backups (base.py), recovery to a time (recovery.py), their checks
and drill (checks.py), the WAL archive (wal.py, with walcmd.py the per-segment fast path PostgreSQL runs),
where their files are kept (locations.py), their S3 replica (s3.py), and unpacking a base backup (unpack.py)."""
