"""`wal-push`, `wal-fetch`, `wal-verify` (PostgreSQL's archive and restore commands), `alerts test` and
`metrics`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from backup_assets.cli.common import UsageError, _catalog


def cmd_wal_push(args) -> int:
    from backup_assets.core.pitr import wal

    done = wal.push(_catalog(args), args.source, args.path)
    print(f"{done.name} already archived (identical)" if done.already
          else f"archived {done.name} ({done.raw_size} bytes) as {done.stored}")
    return 0


def cmd_wal_fetch(args) -> int:
    from backup_assets.core.pitr import wal

    wal.fetch(_catalog(args), args.source, args.name, args.dest)
    return 0


def cmd_wal_verify(args) -> int:
    import datetime as dt

    from backup_assets.core.pitr import base as pitr_base
    from backup_assets.core.pitr import wal

    catalog = _catalog(args)
    bases = pitr_base.base_backups(catalog, args.source)
    since = bases[0]["start_wal"] if bases else None  # from the oldest kept base backup on
    result = wal.verify(catalog, args.source, since=since)
    age = None
    if result.newest_pushed_at:
        age = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(result.newest_pushed_at)).total_seconds()
    if args.json:
        print(json.dumps({"source": args.source, "since": since, "segments": result.segments, "first": result.first,
                          "last": result.last, "gaps": [list(g) for g in result.gaps],
                          "newest_pushed_at": result.newest_pushed_at, "newest_age_s": age, "ok": result.ok}))
    elif not result.segments:
        print(f"{args.source}: no WAL segment archived yet")
    else:
        print(f"{args.source}: {result.segments} segment(s) {result.first} .. {result.last}"
              + (f" (from the oldest base backup's {since})" if since else "") + ", "
              + ("no gaps" if not result.gaps else f"{len(result.gaps)} gap(s)")
              + (f"; newest pushed {age:.0f}s ago" if age is not None else ""))
        for before, after in result.gaps:
            print(f"  gap after {before}: the next archived segment is {after}")
    return 0 if result.ok else 1


def cmd_alerts_test(args) -> int:
    from backup_assets.core.monitoring.alerts import Notifier

    notifier = Notifier.for_catalog(_catalog(args))
    if not notifier.channels:
        raise UsageError("no alert channel is configured (alerts.slack, alerts.email or alerts.webhook)")
    results = notifier.test()
    for channel, error in results.items():
        print(f"{'OK  ' if error is None else 'FAIL'} {channel}" + (f": {error}" if error else ""))
    return 1 if any(results.values()) else 0


def cmd_metrics(args) -> int:
    from backup_assets.core.monitoring import metrics

    catalog = _catalog(args)
    if args.textfile:
        print(f"wrote {metrics.write_textfile(catalog, Path(args.textfile))}")
        return 0
    sys.stdout.write(metrics.render(catalog, openmetrics=args.openmetrics).decode())
    return 0


def cmd_metrics_serve(args) -> int:
    import signal
    import threading

    from backup_assets.core.monitoring import metrics

    catalog = _catalog(args)
    try:
        server, thread = metrics.serve(catalog, port=args.port, addr=args.addr)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.addr}:{args.port}: {exc.strerror or exc}") from None
    host, port = server.server_address[:2]
    print(f"serving metrics on http://{host}:{port}/metrics (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0
