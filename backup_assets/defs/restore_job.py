"""The `restore` job: the CLI's restore, launchable from the UI's launchpad with typed config."""

import dagster as dg
from dagster import OpExecutionContext
from pydantic import Field

from backup_assets.catalog import Catalog


class RestoreConfig(dg.Config):
    source: str = Field(description="source name from the catalog")
    group: str = Field(default="full", description="table group (SQLite sources: full)")
    tier: str | None = Field(default=None, description="daily, weekly or monthly (default: any)")
    partition: str | None = Field(default=None, description="partition key (default: the newest backup that verifies)")
    target_database: str | None = Field(default=None, description="PostgreSQL: restore into this database instead")
    target_file: str | None = Field(default=None, description="SQLite: restore into this file instead")
    tables: list[str] = Field(default=[], description="PostgreSQL: replace only these tables")
    jobs: int | None = Field(default=None, description="parallel pg_restore jobs (default: the catalog's restore.jobs; "
                                                       "one for an archive under 64 MiB)")
    safety_copy: bool = Field(default=True, description="keep the replaced data")
    terminate_connections: bool = Field(default=False, description="end other sessions on the target database")
    confirm: bool = Field(default=False, description="must be true: this replaces data")


def in_place_refusal(catalog: Catalog, manifest, config: RestoreConfig) -> str | None:
    """Open-source Dagster's webserver has no login, so the catalog decides what a run of this job may
    destroy: unless it opts in, the job may not replace **any** catalog source's database (same server and
    name) or file (compared by real path: a symlinked folder or `..` is the same file), nor restore without a
    safety copy. The CLI may, after its confirmation."""
    from backup_assets.core.backup import roles
    from backup_assets.core.restore.choose import catalog_targets

    if not config.safety_copy and not catalog.restore.allow_no_safety_copy_from_ui:
        return (f"refusing safety_copy: false from the restore job: set restore.allow_no_safety_copy_from_ui: true in "
                f"the catalog ({catalog.catalog_path or 'catalog'}) to allow it, or use `backup-assets restore "
                "--no-safety-copy` on the command line")
    if catalog.restore.allow_in_place_from_ui:
        return None
    src = catalog.sources.get(manifest.source)
    if src is None or manifest.format == roles.FORMAT:  # roles are only added, never replaced
        return None
    if src.engine == "postgres":
        target = config.target_database or src.connection.dbname
        owner = catalog_targets(catalog).database_owner(src.written().host, src.written().port, target)
        what, other = f"database {target}", "target_database (a database no catalog source backs up)"
    else:
        target = str(catalog.resolve_path(src.path)) if config.target_file is None else config.target_file
        owner = catalog_targets(catalog).file_owner(target)
        what, other = f"file {target}", "target_file (a file no catalog source backs up)"
    if owner is None:
        return None
    whose = "its own" if owner == manifest.source else f"source {owner}'s"
    return (f"refusing to replace {what}, {whose} {'database' if src.engine == 'postgres' else 'file'} in the "
            f"catalog, from the restore job: set restore.allow_in_place_from_ui: true in the catalog "
            f"({catalog.catalog_path or 'catalog'}) to allow it, restore into {other}, or use `backup-assets "
            "restore` on the command line")


def build_restore_job(catalog: Catalog) -> dg.JobDefinition:
    @dg.op(name="restore_backup", tags={"backup_assets/kind": "restore"})
    def restore_backup(context: OpExecutionContext, config: RestoreConfig) -> dg.Output:
        from backup_assets.core import BackupError
        from backup_assets.core.restore import restore_log as audit
        from backup_assets.core.restore.choose import choose_backup
        from backup_assets.core.restore.postgres import restore_plan, restore_postgres
        from backup_assets.core.restore.sqlite import restore_sqlite

        def say(message: str, progress: bool = False) -> None:
            if not progress:
                context.log.info(message)

        try:
            backup = choose_backup(catalog, source=config.source, group=config.group, tier=config.tier,
                                   partition=config.partition, say=say)
            plan = restore_plan(catalog, backup, target_db=config.target_database, tables=config.tables,
                                target_file=config.target_file, safety_copy=config.safety_copy)
            refusal = in_place_refusal(catalog, backup.manifest, config)
            if refusal:
                m = backup.manifest
                try:  # an attempt the catalog refused is part of the record too
                    audit.record(catalog.repository_root, {
                        **audit.run_origin(context.run_id), "source": m.source, "group": m.group, "tier": m.tier,
                        "partition": m.partition, "artifact": m.artifact, "event": "refused", "outcome": "refused",
                        "target": config.target_database or config.target_file or "(the source's own)",
                        "tables": config.tables, "safety_copy": config.safety_copy, "error": refusal})
                except BackupError as exc:
                    context.log.warning(str(exc))
                raise dg.Failure(description=refusal)
            if not config.confirm:
                raise dg.Failure(description=f"refusing without confirm: true. This run would {plan}.")
            context.log.info(f"about to {plan}")
            if backup.manifest.engine == "postgres":
                if config.target_file:
                    raise BackupError("target_file is for SQLite sources")
                result = restore_postgres(catalog, backup, target_db=config.target_database, tables=config.tables or None,
                                          jobs=config.jobs, safety_copy=config.safety_copy,
                                          terminate_connections=config.terminate_connections, say=say,
                                          origin=audit.run_origin(context.run_id))
            else:
                if config.target_database or config.tables:
                    raise BackupError("target_database and tables are for PostgreSQL sources")
                result = restore_sqlite(catalog, backup, target_file=config.target_file,
                                        safety_copy=config.safety_copy, say=say, origin=audit.run_origin(context.run_id))
        except BackupError as exc:
            raise dg.Failure(description=str(exc)) from None
        metadata = {
            "artifact": dg.MetadataValue.text(result.artifact),
            "target": dg.MetadataValue.text(result.target),
            "safety_copy": dg.MetadataValue.text(result.safety_copy or ""),
            "duration_s": dg.MetadataValue.float(result.duration_s),
            "row_counts": dg.MetadataValue.json(result.counts),
            "counts": dg.MetadataValue.md("```\n" + result.table() + "\n```"),
            "hooks": dg.MetadataValue.json(result.hooks),
        }
        if result.problems:
            raise dg.Failure(description="restored data differs from the manifest: " + "; ".join(result.problems),
                             metadata=metadata)
        if result.hook_problem:
            raise dg.Failure(description=result.hook_problem, metadata=metadata)
        return dg.Output(result.target, metadata=metadata)

    @dg.job(name="restore", description="Restore a backup (the same code as `backup-assets restore`). "
                                         "Refuses to run without confirm: true.",
            tags={"backup_assets/kind": "restore"})
    def restore():
        restore_backup()

    return restore
