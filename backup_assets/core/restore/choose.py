"""What a restore may touch and what it restores from: the catalog's own databases and files (which the UI may
not replace), the newest backup of a partition that verifies, a backup named by its file, and the checks a
backup passes before anything is touched. Also what every restore reports and the hooks around it."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path


from backup_assets.catalog import Catalog
from backup_assets.core import BackupError
from backup_assets.core.restore import restore_log as audit
from backup_assets.core.restore import hooks
from backup_assets.core.backup.take import repository_for
from backup_assets.core.repository import StoredBackup
from backup_assets.core.verify.records import read_status
from backup_assets.core.verify.checks import artifact_intact


RESTORE_MARK = "backup_assets restore in progress"


SWAP_MARK = "backup_assets restore swapping"


def real_path(path: str | Path) -> str:
    """A file's path with every symlink and `..` resolved, also for a file that does not exist yet (its
    folder's real path): how a target is matched against the catalog's files."""
    return os.path.realpath(os.path.expanduser(str(path)))


def _addresses(host: str | None) -> frozenset[str]:
    """The addresses a host name stands for (a socket path or an unresolvable name stands for itself)."""
    import socket

    if not host or host.startswith("/"):
        return frozenset({host or "/"})
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(host, None)) | {host}
    except OSError:
        return frozenset({host})


@dataclass
class CatalogTargets:
    """What the catalog's sources hold: their databases (server and name) and files (real paths)."""
    databases: list[tuple[frozenset[str], int, str, str]]  # (addresses, port, dbname, source)
    files: dict[str, str]  # real path -> source

    def database_owner(self, host: str | None, port: int, dbname: str) -> str | None:
        addresses = _addresses(host)
        return next((source for addrs, p, name, source in self.databases
                     if p == port and name == dbname and addrs & addresses), None)

    def file_owner(self, path: str | Path) -> str | None:
        return self.files.get(real_path(path))


def catalog_targets(catalog: Catalog) -> CatalogTargets:
    databases, files = [], {}
    for name, src in catalog.sources.items():
        if src.engine == "postgres":
            written = src.written()
            databases.append((_addresses(written.host), written.port, src.connection.dbname, name))
        else:
            files[real_path(catalog.resolve_path(src.path))] = name
    return CatalogTargets(databases, files)


def quiet(message: str, progress: bool = False) -> None:
    """The default reporter: says nothing. The CLI passes one that prints."""


@dataclass
class RestoreResult:
    target: str
    counts: dict[str, int]
    expected: dict[str, int]
    problems: list[str]
    safety_copy: str | None
    duration_s: float
    artifact: str
    extra: dict = field(default_factory=dict)
    hooks: list[dict] = field(default_factory=list)
    # a post_restore or verify hook failed after the data was restored (names the safety copy)
    hook_problem: str | None = None

    @property
    def matches(self) -> bool:
        return not self.problems

    def table(self) -> str:
        lines = [f"{'table':40} {'restored':>12} {'manifest':>12}"]
        for t in sorted(self.expected):
            got = self.counts.get(t)
            mark = "" if got == self.expected[t] else "  <-- differs"
            lines.append(f"{t:40} {str(got if got is not None else '-'):>12} {self.expected[t]:>12}{mark}")
        return "\n".join(lines)


class _Hooks:
    """The source's hooks around one restore (see core.restore.hooks for when each stage runs)."""

    def __init__(self, catalog: Catalog, backup: StoredBackup, *, target: str, in_place: bool, endpoint=None,
                 say=quiet):
        m = backup.manifest
        src = catalog.sources.get(m.source)
        self.cfg = src.hooks if src is not None else None
        self.in_place, self.say = in_place, say
        self.args = dict(source=m.source, group=m.group, engine=m.engine, artifact=m.artifact,
                         partition=m.partition, target=target, endpoint=endpoint)
        self.runs: list[hooks.HookRun] = []
        if self.cfg and not in_place and (self.cfg.pre_restore or self.cfg.post_restore):
            say("pre_restore/post_restore hooks skipped: they run when the source's own data is replaced")

    def _stage(self, stage: str, commands: list, **env) -> hooks.HookRun | None:
        if not commands:
            return None
        runs = hooks.run_stage(stage, commands, {**hooks.target_env(**self.args), **env},
                               timeout_s=self.cfg.timeout_s, say=self.say)
        self.runs += runs
        return runs[-1] if runs and not runs[-1].ok else None

    def before(self) -> None:
        if self.cfg and self.in_place:
            failed = self._stage("pre_restore", self.cfg.pre_restore)
            if failed:
                raise BackupError(f"pre_restore hook failed, nothing was changed: {failed.problem}")

    def after_failure(self, error: BackupError) -> BackupError:
        """The restore failed (the target kept its data): bring the application back on it."""
        if self.cfg and self.in_place:
            failed = self._stage("post_restore", self.cfg.post_restore, BACKUP_ASSETS_RESTORE_OK="0")
            if failed:
                return BackupError(f"{error}; then the post_restore hook failed too: {failed.problem}")
        return error

    def after(self, result: RestoreResult) -> RestoreResult:
        if self.cfg:
            env = {"BACKUP_ASSETS_RESTORE_OK": "1", "BACKUP_ASSETS_SAFETY_COPY": result.safety_copy or ""}
            failed = self._stage("post_restore", self.cfg.post_restore, **env) if self.in_place else None
            if failed is None and (self.in_place or self.cfg.verify_in_drill):
                failed = self._stage("verify", self.cfg.verify, **env)
            if failed is not None:
                back = (f"the previous data is kept as {result.safety_copy}: go back to it if the application cannot "
                        "run on the restored data" if result.safety_copy else "no safety copy was kept")
                result.hook_problem = (f"{result.target} was restored from {result.artifact}, but the {failed.stage} "
                                       f"hook failed: {failed.problem}; {back}")
                self.say(f"WARNING: {result.hook_problem}")
        result.hooks = [r.as_dict() for r in self.runs]
        return result


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d%H%M%S")


def choose_backup(catalog: Catalog, *, source: str, group: str, tier: str | None = None,
                  partition: str | None = None, say=quiet) -> StoredBackup:
    """The requested partition, or the newest backup that verifies (checksum checked now)."""
    if source not in catalog.sources:
        raise BackupError(f"unknown source {source!r} (the catalog has {', '.join(catalog.sources)})")
    if group not in catalog.sources[source].group_names():
        raise BackupError(f"source {source!r} has no group {group!r}")
    repo = repository_for(catalog)
    tiers = [tier] if tier else ["daily", "weekly", "monthly", "hourly"]
    what = f"{source}/{group}" + (f" for partition {partition}" if partition else "")
    if partition:  # the partition's backups, in the first tier that has any (a newer one may be torn)
        candidates = next((found for t in tiers if (found := repo.backups(source=source, group=group, tier=t,
                                                                          partition=partition))), [])
        if not candidates:
            raise BackupError(f"no backup of {what} ({'/'.join(tiers)})")
    else:
        candidates = [b for t in tiers for b in repo.backups(source=source, group=group, tier=t)]
    candidates.sort(key=lambda b: (b.manifest.snapshot_at or b.manifest.timestamp, b.manifest.timestamp), reverse=True)
    if not candidates:
        raise BackupError(f"no backup of {what} matches ({'/'.join(tiers)})")
    skipped = []
    for b in candidates:
        failed = sorted(n for n, st in read_status(b).items() if not st.get("passed") and n != "size_anomaly")
        if failed:
            skipped.append(f"{b.artifact_path.name}: its last checks failed ({', '.join(failed)})")
            say(f"skipping {skipped[-1]}")
            continue
        outcome = _intact(b)
        if outcome.passed:
            say(f"chose {b.artifact_path.name}: the newest backup of {what} that verifies"
                + (f" ({len(skipped)} newer skipped)" if skipped else ""))
            return b
        skipped.append(f"{b.artifact_path.name}: {outcome.message}")
        say(f"skipping {skipped[-1]}")
    if len(candidates) == 1:
        raise BackupError(f"refusing to restore: {skipped[0]}")
    raise BackupError(f"no backup of {what} verifies ({len(candidates)} tried: {'; '.join(skipped[:3])})")


def backup_from_file(catalog: Catalog, file: str) -> StoredBackup:
    """A backup named by path: it must lie inside the repository, with its manifest beside it."""
    from backup_assets.core.manifest import manifest_path_for, read_manifest

    root = repository_for(catalog).root.resolve()
    raw = Path(file)
    if any(part == ".." for part in raw.parts):
        raise BackupError(f"{file}: path must not contain '..'")
    path = (raw if raw.is_absolute() else Path.cwd() / raw)
    if path.is_symlink():
        raise BackupError(f"{file}: is a symbolic link; name the artifact itself")
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise BackupError(f"{file}: is outside the backup repository {root}")
    if resolved.name.endswith(".meta"):
        resolved = resolved.with_name(resolved.name[: -len(".meta")])
    if not resolved.is_file():
        raise BackupError(f"{file}: artifact is missing")
    manifest = read_manifest(manifest_path_for(resolved))
    if manifest.artifact != resolved.name:
        raise BackupError(f"{file}: its manifest describes {manifest.artifact}")
    return StoredBackup(manifest, manifest_path_for(resolved))


def _fingerprint(backup: StoredBackup) -> tuple | None:
    try:
        st = backup.artifact_path.stat()
    except FileNotFoundError:
        return None
    return (str(backup.artifact_path), st.st_size, st.st_mtime_ns, backup.manifest.sha256)


def _intact(backup: StoredBackup):
    outcome = artifact_intact(backup)
    if outcome.passed and (key := _fingerprint(backup)):
        _verified_here.add(key)
    return outcome


# artifacts whose checksum this process has verified, by path, size, mtime and manifest sha256:
# choosing "the newest backup that verifies" reads the file once, and the restore does not again
_verified_here: set[tuple] = set()


def verify_before_restore(backup: StoredBackup) -> None:
    key = _fingerprint(backup)
    if key is not None and key in _verified_here:
        return
    outcome = _intact(backup)
    if not outcome.passed:
        raise BackupError(f"refusing to restore: {outcome.message}")


def _audited(catalog: Catalog, backup: StoredBackup, origin: dict | None, *, say, target: str, tables: list[str],
             safety_copy: bool, action) -> RestoreResult:
    """Run a restore between its two lines in the restore log: nothing is touched unless its start is recorded."""
    m = backup.manifest
    log = audit.RestoreAudit(repository_for(catalog).root, origin, source=m.source, group=m.group, tier=m.tier,
                             partition=m.partition, artifact=m.artifact, target=target, tables=tables,
                             safety_copy=safety_copy)
    log.start()
    try:
        result = action()
    except BaseException as exc:
        warning = log.end(outcome="failed", error=str(exc) or type(exc).__name__)
        if warning:
            say(warning)
        raise
    problem = "; ".join(result.problems) or result.hook_problem
    warning = log.end(outcome="failed" if problem else "ok", error=problem or None,
                      safety_copy_kept=result.safety_copy, duration_s=result.duration_s)
    if warning:
        say(warning)
    return result


def _progress(backup: StoredBackup, say):
    total = backup.manifest.raw_size_bytes or 1
    return lambda done: say(f"decompressing {100 * done / total:5.1f}%", progress=True)
