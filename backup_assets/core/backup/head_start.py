"""A command's first backup, started while Dagster starts.

`backup-assets backup` runs its backups through Dagster, so the UI shows them; in a fresh process Dagster's
start (importing it, the definitions, the instance) costs more than a small database's dump and checks. So the
command starts its first backup (the dump, then its checks, as the asset's step takes them) as soon as the
catalog is read and the command's input is checked, and the step hands over what that head start produced
instead of dumping again: the same artifact and the same check results, recorded by the same run, only earlier.
It mostly waits on pg_dump, zstd and the drill's server, so it runs beside Dagster's imports.

Only the process that started it sees a head start (a run launched elsewhere, by the daemon, never does), only
a step that backs up exactly that source, group, tier and partition takes it, and only once. What no step
took (Dagster failed before the step ran) is waited for and named by `leftovers`: a backup never recorded in
Dagster is reported, not silently kept. The server's pool slot is not held during the head start: the dump
starts before the run exists to claim it.

Where the machine has a core to spare, the head start runs in a child process forked before Dagster is imported
(`apart`): Dagster's imports and the checks' decoding are both Python, and in one process they take turns on one
interpreter lock (the drill's decoding of a 62 MB database took 0.65 s beside the imports, 0.23 s alone). The
child sends the backup and the check outcomes back through a pipe (pickled, in frames), dies with the command
(a parent-death signal), and a child that ends without a word fails the backup with its exit code, as a dead
thread's exception would.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from backup_assets.catalog import Catalog

_started: dict[tuple[str, str, str, str], "HeadStart"] = {}
_threads: list[threading.Thread] = []
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
    """Start backing up (source, group, tier, partition) and then checking it: in a child process (`apart`), whose
    reports a thread of this process collects, or in that thread itself."""
    head = HeadStart((source, group, tier, partition), backup_check_names(catalog, tier))
    if apart():
        child, reader = _fork(catalog, head)
        head.thread = threading.Thread(target=_collect, args=(head, child, reader), name="head-start", daemon=True)
    else:
        head.thread = threading.Thread(target=_work, args=(catalog, head), name="head-start", daemon=True)
    with _lock:
        _started[head.target] = head
        _threads.append(head.thread)
    head.thread.start()
    return head


def apart() -> bool:
    """Run the head start in a child process: a second core, fork, and no other thread in this process yet (a
    fork beside a thread that holds a lock, an import's among them, would copy the lock held forever)."""
    from backup_assets.core.verify.row_hasher import cores

    return hasattr(os, "fork") and cores() >= 2 and threading.active_count() == 1


FRAME = struct.Struct("<Q")


def _fork(catalog: Catalog, head: HeadStart) -> tuple[int, int]:
    """Fork the child that runs `_work` and reports through a pipe; returns (its pid, the pipe's reading end)."""
    reader, writer = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        os.close(writer)
        return pid, reader
    code = 70
    try:  # the child: never returns into the command
        os.close(reader)
        _die_with(parent)
        with os.fdopen(writer, "wb") as out:
            def send(what: str, future: Future) -> None:
                exc = future.exception()
                frame = _pickled((what, exc is None, future.result() if exc is None else exc, list(head.lines)))
                out.write(FRAME.pack(len(frame)) + frame)
                out.flush()

            head.dumped.add_done_callback(lambda f: send("dumped", f))
            head.checked.add_done_callback(lambda f: send("checked", f))
            _work(catalog, head)
        code = 0
    except BaseException:  # noqa: BLE001 - the parent names the exit code; nothing of the command runs here
        pass
    finally:
        os._exit(code)


def _die_with(parent: int) -> None:
    """Ask Linux to kill this process when the command dies (kill -9 included): no backup goes on unowned."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(71)


def _pickled(message: tuple) -> bytes:
    """The frame of one message; an exception that would not come back as itself is sent as its words."""
    from backup_assets.core import BackupError

    try:
        frame = pickle.dumps(message)
        pickle.loads(frame)
        return frame
    except Exception:  # noqa: BLE001 - e.g. an exception class whose constructor takes other arguments
        what, ok, value, lines = message
        if not ok:
            value = (BackupError if isinstance(value, BackupError) else RuntimeError)(f"{type(value).__name__}: {value}")
        return pickle.dumps((what, ok, value, lines))


def _collect(head: HeadStart, pid: int, reader: int) -> None:
    """The command's side: each message of the child resolves its future; what the child never sent fails."""
    from backup_assets.core import BackupError

    try:
        with os.fdopen(reader, "rb") as pipe:
            while len(size := pipe.read(FRAME.size)) == FRAME.size:
                frame = pipe.read(FRAME.unpack(size)[0])
                if len(frame) < FRAME.unpack(size)[0]:
                    break  # cut short: the child died while it wrote
                what, ok, value, lines = pickle.loads(frame)
                head.lines[:] = lines
                future = head.dumped if what == "dumped" else head.checked
                if not future.done():
                    future.set_result(value) if ok else future.set_exception(value)
                head.times[what] = time.time()
    except Exception:  # noqa: BLE001 - a frame that does not read: what it would have said is failed below
        pass
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    ended = f"with exit code {code}" if code >= 0 else f"by signal {-code}"
    for future in (head.dumped, head.checked):
        if not future.done():
            future.set_exception(BackupError(f"{' '.join(head.target)}: the process that backed it up while Dagster "
                                             f"started ended {ended} before it said how the backup went"))


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
    """Head starts no step took: each waited for, with what became of it (the artifact, or the error); and every
    child process of a head start a step took, waited for to its end (the command never leaves one running)."""
    with _lock:
        left = list(_started.values())
        _started.clear()
        everyone = list(_threads)
        _threads.clear()
    for thread in everyone:
        thread.join()
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
