"""The disaster-recovery drill: restore the newest backup of every source and group into a
scratch target, compare it with its manifest, and write a markdown report (the MyloWare
runbook's staging restore test, for every database at once)."""

from __future__ import annotations

from dataclasses import dataclass

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError
from backup_assets.core.backup.take import repository_for
from backup_assets.core.repository import StoredBackup
from backup_assets.core.verify.checks import Outcome, artifact_intact
from backup_assets.core.verify.restore_drill import restore_drill


@dataclass
class DrillResult:
    source: str
    group: str
    backup: StoredBackup | None
    outcome: Outcome


def newest_backups(catalog: Catalog) -> dict[tuple[str, str], StoredBackup | None]:
    repo = repository_for(catalog)
    newest: dict[tuple[str, str], StoredBackup | None] = {
        (s, g): None for s, src in catalog.sources.items() for g in src.group_names()
    }
    for b in repo.backups():
        key = (b.manifest.source, b.manifest.group)
        if key in newest and (newest[key] is None or b.manifest.timestamp > newest[key].manifest.timestamp):
            newest[key] = b
    return newest


def run_dr_drill(catalog: Catalog, *, sources: list[str] | None = None, jobs: int | None = None, log=None) -> list[DrillResult]:
    say = log or (lambda _m: None)
    results = []
    for (source, group), backup in newest_backups(catalog).items():
        if sources and source not in sources:
            continue
        if backup is None:
            results.append(DrillResult(source, group, None, Outcome(False, f"{source}/{group}: no backup to drill")))
            continue
        say(f"drilling {backup.artifact_path.name}")
        outcome = artifact_intact(backup)
        if outcome.passed:
            try:
                outcome = restore_drill(catalog, backup, jobs=jobs)
            except BackupError as exc:
                outcome = Outcome(False, str(exc))
        results.append(DrillResult(source, group, backup, outcome))
    return results


def markdown_report(results: list[DrillResult]) -> str:
    lines = [
        "| source | group | backup used | partition | RTO (s) | tables | rows compared | result |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        m = r.backup.manifest if r.backup else None
        meta = r.outcome.metadata
        lines.append(
            f"| {r.source} | {r.group} | {m.artifact if m else '—'} | {m.partition if m else '—'} | "
            f"{meta.get('rto_s', '—')} | {meta.get('tables', '—')} | {meta.get('rows', '—')} | "
            f"{'PASS' if r.outcome.passed else 'FAIL: ' + r.outcome.message.replace('|', '/')} |"
        )
    for r in results:
        counts = r.outcome.metadata.get("row_counts")
        if counts:
            lines += ["", f"**{r.source}/{r.group}** counts after restore (equal to the manifest's):", ""]
            lines += [f"- {t}: {n}" for t, n in sorted(counts.items())]
    return "\n".join(lines)
