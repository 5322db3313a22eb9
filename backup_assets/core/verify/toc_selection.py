"""Which TOC entries of an archive a restore of a table group needs, and the roles they name: read from the
archive's own TOC (see pgarchive), never from `pg_restore --list` text."""

from __future__ import annotations

from pathlib import Path

from backup_assets.core import BackupError
from backup_assets.core.engines.pgarchive import Archive, TocEntry
from backup_assets.core.names import TableName


# entries that are a table (or hold one's data); other kinds (schemas, types, functions, sequences,
# extensions) are pulled in by whatever depends on them
RELATION_KINDS = {"TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE"}
NEVER = {"DATABASE", "DATABASE PROPERTIES", "ENCODING", "STDSTRINGS", "SEARCHPATH"}


def group_entries(archive: Archive, tables: list[TableName], partitions: dict[str, list[str]]) -> list[TocEntry]:
    """The TOC entries that restore `tables` into an empty database: the tables (with their
    partitions and partition parents), everything they depend on (schemas, types, domains,
    functions, sequences, extensions), and everything that depends only on what is selected
    (defaults, owned sequences and their values, data, constraints, indexes, triggers, comments,
    grants; a foreign key only when the table it references is selected too)."""
    by_name = archive.tables()
    start: set[int] = set()
    for table in tables:
        members = [table] + [TableName.parse(p) for p in partitions.get(str(table), [])]
        for m in members:
            entry = by_name.get((m.schema, m.name))
            if entry is None:
                raise BackupError(f"the archive has no table {m}")
            start.add(entry.dump_id)
    selected: set[int] = set()

    def pull(dump_id: int) -> None:
        if dump_id in selected or dump_id not in archive.by_id:
            return
        entry = archive.by_id[dump_id]
        if entry.desc in NEVER:
            return
        selected.add(dump_id)
        for dep in entry.deps:
            dep_entry = archive.by_id.get(dep)
            # a table's own dependencies on other tables are its partition or inheritance parents
            if dep_entry is not None and (dep_entry.desc not in RELATION_KINDS or entry.desc == "TABLE"):
                pull(dep)

    for dump_id in start:
        pull(dump_id)
    attached = _relations_of(archive)
    chosen = {e.dump_id for e in archive.entries if e.dump_id in selected and e.desc in RELATION_KINDS}
    changed = True
    while changed:
        changed = False
        for entry in archive.entries:
            if entry.dump_id in selected or entry.desc in NEVER or entry.desc in RELATION_KINDS or not entry.deps:
                continue
            rels = attached[entry.dump_id]
            if all(d in selected for d in entry.deps):
                selected.add(entry.dump_id)
                changed = True
            elif rels and rels <= chosen:
                # hangs on selected tables only (a trigger, a policy, a default, a check): it comes with what
                # else it needs, e.g. a trigger's function that nothing else selects
                pull(entry.dump_id)
                changed = True
    return [e for e in archive.entries if e.dump_id in selected]


def _relations_of(archive: Archive) -> dict[int, frozenset[int]]:
    """For every entry, the relations (tables, views, ...) it hangs on, through its dependencies: a
    relation hangs on itself; a function or a type that no relation underlies hangs on none."""
    memo: dict[int, frozenset[int]] = {}

    def rels(dump_id: int, seen: frozenset[int] = frozenset()) -> frozenset[int]:
        if dump_id in memo:
            return memo[dump_id]
        entry = archive.by_id.get(dump_id)
        if entry is None or dump_id in seen:
            return frozenset()
        if entry.desc in RELATION_KINDS:
            result = frozenset({dump_id})
        else:
            result = frozenset().union(*(rels(d, seen | {dump_id}) for d in entry.deps)) if entry.deps else frozenset()
        memo[dump_id] = result
        return result

    for e in archive.entries:
        rels(e.dump_id)
    return memo


def write_list_file(entries: list[TocEntry], path: Path) -> Path:
    """A pg_restore --use-list file: one dump id a line (pg_restore reads only the id)."""
    path.write_text("".join(f"{e.dump_id};\n" for e in entries))
    return path


def roles_needed(archive: Archive, entries: list[TocEntry] | None = None) -> set[str]:
    """The roles that own what will be restored (each entry's owner field)."""
    return {e.owner for e in (entries if entries is not None else archive.entries) if e.owner}

