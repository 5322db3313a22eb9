"""A command's first backup, started while Dagster starts.

`backup-assets backup` runs its backups through Dagster, so the UI shows them; in a fresh process Dagster's
start (importing it, the definitions, the instance) costs more than a small database's dump and checks. So the
command starts its first backup (the dump, then its checks, as the asset's step takes them) in a thread as
soon as the catalog is read and the command's input is checked, and the step hands over what that thread
produced instead of dumping again: the same artifact and the same check results, recorded by the same run,
only earlier. The thread waits on pg_dump, zstd and the drill's server, so it runs beside Dagster's imports.

Only the process that started it sees a head start (a run launched elsewhere, by the daemon, never does), only
a step that backs up exactly that source, group, tier and partition takes it, and only once. What no step
took (Dagster failed before the step ran) is waited for and named by `leftovers`: a backup never recorded in
Dagster is reported, not silently kept. The server's pool slot is not held during the head start: the dump
starts before the run exists to claim it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from backup_assets.catalog import Catalog

_started: dict[tuple[str, str, str, str], "HeadStart"] = {}
_lock = threading.Lock()


@dataclass
class HeadStart:
    target: tuple[str, str, str, str]  # source, group, tier, partition
    names: list[str]  # the checks it runs
    dumped: Future = field(default_factory=Future)  # -> the StoredBackup (or the dump's exception)
    checked: Future = field(default_factory=Future)  # -> {check name: Outcome} (or the exception)
    lines: list[str] = field(default_factory=list)  # what the backup said, for the step's log
    thread: threading.Thread | None = None
    times: dict[str, float] = field(default_factory=dict)  # "dumped", "checked": time.time() when each ended


def backup_check_names(catalog: Catalog, tier: str) -> list[str]:
    """The checks of a backup asset of this tier (its asset check specs), in the order they are listed."""
    names = ["artifact_intact", "archive_readable", "size_anomaly"]
    return names + (["restore_drill"] if catalog.tier(tier).drill else [])


def start(catalog: Catalog, source: str, group: str, tier: str, partition: str) -> HeadStart:
    """Start backing up (source, group, tier, partition) and then checking it, in a thread of this process."""
    head = HeadStart((source, group, tier, partition), backup_check_names(catalog, tier))
    head.thread = threading.Thread(target=_work, args=(catalog, head), name="head-start", daemon=True)
    with _lock:
        _started[head.target] = head
    head.thread.start()
    return head


def _work(catalog: Catalog, head: HeadStart) -> None:
    from backup_assets.core import BackupError
    from backup_assets.core.backup.take import run_backup
    from backup_assets.core.outcome import Outcome
    from backup_assets.core.verify.checks import evaluate, find_backup, stream_check

    source, group, tier, partition = head.target
    stream = None
    try:
        stream = stream_check(catalog, source, group, head.names)
        run_backup(catalog, source, group, tier, partition, log=head.lines.append, stream=stream)
        backup = find_backup(catalog, source, group, tier, partition)
    except BaseException as exc:  # the step that takes it raises or reports it as its own
        if stream is not None:
            stream.close()
        head.dumped.set_exception(exc)
        head.checked.set_exception(exc)
        return
    head.times["dumped"] = time.time()
    head.dumped.set_result(backup)
    try:
        outcomes = evaluate(catalog, backup, head.names, stream=stream)
    except BackupError as exc:
        outcomes = {n: Outcome(False, str(exc)) for n in head.names}
    except BaseException as exc:
        head.checked.set_exception(exc)
        return
    finally:
        if stream is not None:
            stream.close()
    head.times["checked"] = time.time()
    head.checked.set_result(outcomes)


def take(source: str, group: str, tier: str, partition: str) -> HeadStart | None:
    """The head start of exactly this backup, once; None when there is none (a step in another process, another
    partition, or a second time)."""
    with _lock:
        return _started.pop((source, group, tier, partition), None)


def leftovers() -> list[tuple[tuple[str, str, str, str], str]]:
    """Head starts no step took: each waited for, with what became of it (the artifact, or the error)."""
    with _lock:
        left = list(_started.values())
        _started.clear()
    done = []
    for head in left:
        if head.thread is not None:
            head.thread.join()
        try:
            backup = head.dumped.result()
        except BaseException as exc:  # noqa: BLE001 - reported, not raised: the command already failed
            done.append((head.target, f"failed: {exc}"))
            continue
        try:  # its checks ran: the artifact's own record says what they found, as any backup's does
            record(backup, head.checked.result())
        except BaseException:  # noqa: BLE001 - no record: the backup stays unverified
            pass
        done.append((head.target, str(backup.artifact_path)))
    return done


def record(backup, outcomes: dict) -> None:
    """One write of the backup's check record for all of its outcomes (never over a result a check could not
    get)."""
    from backup_assets.core.verify import records as verification

    verification.record_outcomes(backup, {n: (o.passed, o.message, o.metadata) for n, o in outcomes.items()
                                          if not o.not_checked})
