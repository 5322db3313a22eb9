"""Proving backups: every check of a backup, reading it once (checks.py), each check on its own (readable.py,
restore_drill.py), reading a dump by structure in one pass (archive_scan.py), comparing a restored database's
schema object by object (schema_compare.py), the disaster-recovery drill over every source (dr_drill.py), and
the check results kept beside each artifact (records.py)."""
