"""Proving backups: the checks (checks.py), reading a dump by structure in one pass (archive_scan.py), comparing a
restored database's schema object by object (schema_compare.py), the disaster-recovery drill (dr_drill.py), and
the check results kept beside each artifact (records.py)."""
