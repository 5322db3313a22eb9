"""`retention`, `runs prune`, `doctor`, `replicas verify` and `rekey`: keeping the repository in order."""

from __future__ import annotations

import json
import sys

from backup_assets.core import BackupError
from backup_assets.core.secrets import scrub
from backup_assets.cli.common import (UsageError, Reporter, _catalog, _repositories, _dry_run, _instance,
    _fail_dead_cli_runs, _alert)


def cmd_retention_prune(args) -> int:
    from backup_assets.core.retention.prune import prune

    report = prune(_catalog(args), dry_run=_dry_run(args))
    print(json.dumps(report, indent=2))
    return 0


def cmd_retention_prune_tables(args) -> int:
    from backup_assets.core.retention.app_tables import prune_tables

    catalog = _catalog(args)
    sources = args.source or [s for s, src in catalog.sources.items() if src.engine == "postgres" and src.prune]
    if not sources:
        raise UsageError("no postgres source in the catalog has prune rules")
    reports = [prune_tables(catalog, s, dry_run=_dry_run(args), say=Reporter()) for s in sources]
    print(json.dumps(reports, indent=2, default=str))
    return 0


def cmd_runs_prune(args) -> int:

    from backup_assets.defs.hygiene import prune_runs

    report = prune_runs(_instance(), older_than_days=args.older_than_days, dry_run=not args.apply,
                        include_restores=args.include_restores)
    print(json.dumps({k: v for k, v in report.items() if k != "run_ids"}, indent=2))
    return 0


def cmd_doctor(args) -> int:
    import os

    from backup_assets.core.doctor import doctor

    catalog = _catalog(args)
    done = doctor(catalog)
    if os.environ.get("DAGSTER_HOME"):  # runs of `backup-assets backup` killed mid-run
        try:
            done += _fail_dead_cli_runs(catalog, _instance())
        except Exception as exc:  # noqa: BLE001 - the repository and servers are repaired whatever Dagster's state
            done.append(f"Dagster's runs not checked: {scrub(str(exc)).splitlines()[0][:300]}")
    for line in done:
        print(line)
    if not done:
        print(f"nothing to repair in repository {catalog.repository_root} and its servers")
    return 0


def cmd_replicas_verify(args) -> int:
    """Prove the replicas by their bytes: download and hash them (those due, or --all), replica by replica."""
    from backup_assets.core.replica import audit_replicas, storage_for

    catalog = _catalog(args)
    replicas = list(catalog.replication.replicas())
    if args.replica:
        if args.replica not in replicas:
            raise UsageError(f"--replica {args.replica}: the catalog has no replication.{args.replica} section")
        replicas = [args.replica]
    if not replicas:
        raise UsageError("the catalog has no replication section (s3, gcs or azure)")
    results = []
    for replica in replicas:
        results += [(replica, r) for r in audit_replicas(catalog, storage_for(catalog, replica=replica), every=args.all,
                                                         limit=args.limit, say=lambda m: print(m, file=sys.stderr))]
    if args.json:
        print(json.dumps([{"replica": where, "key": r.key, "passed": r.outcome.passed, "message": r.outcome.message}
                          for where, r in results], indent=2))
    else:
        for where, r in results:
            print(f"{'PASS' if r.outcome.passed else 'FAIL'} {where} {r.key}: {r.outcome.message}")
        if not results:
            print("no replica is due for a byte-level verification", file=sys.stderr)
    failed = [(where, r) for where, r in results if not r.outcome.passed]
    for where, r in failed:
        from backup_assets.core.monitoring.alerts import Alert
        from backup_assets.defs.keys import replica_key

        _alert(catalog, Alert(what="replica audit failed", error=f"[{r.partition}] {r.outcome.message}",
                              source=r.source, group=r.group, tier=r.tier,
                              asset=replica_key(r.source, r.group, r.tier, where).to_user_string(), cause="run-failure"))
    return 1 if failed else 0


def cmd_rekey(args) -> int:
    from collections import Counter

    from backup_assets.core import crypto
    from backup_assets.core.rekey import leftovers, rekey, select

    catalog = _catalog(args)
    repos = _repositories(catalog, args)
    repos[0].sweep()
    chosen = select(repos, source=args.source, group=args.group, tier=args.tier,
                    older_than_days=args.older_than_days, recipients=args.recipients)
    left = leftovers(repos, args.recipients)
    keys = ", ".join(crypto.fingerprint(r) for r in args.recipients)
    if not args.apply:
        for c in chosen:
            places = "+".join([c.repo.name] + [o.name for o in c.others])
            if c.successor is not None:
                print(f"would finish the interrupted rotation of {c.ref.name} ({places}): replace it by "
                      f"{c.successor[1].name} from {c.successor[0].name}")
            else:
                print(f"would re-encrypt {c.ref.name} ({places}; now: {crypto.key_summary(c.manifest)}) to {keys}")
        for lo in left:
            print(f"would remove {lo.repo.storage.uri(lo.key)}: an old copy left without its manifest by an "
                  f"interrupted rotation (its successor {lo.successor} is complete)")
        print(f"{len(chosen)} backup(s) to re-encrypt (a dry run: --apply does it)", file=sys.stderr)
        return 0
    for lo in left:
        lo.repo.storage.delete([lo.key])
        print(f"removed {lo.repo.storage.uri(lo.key)}: an old copy left without its manifest by an interrupted "
              f"rotation (its successor {lo.successor} is complete)")
    errors: Counter = Counter()
    first: dict[str, str] = {}
    places: Counter = Counter()
    failed = unfinished = 0

    def problem(text: str, same: str) -> None:
        errors[same] += 1
        first.setdefault(same, text)

    for c in chosen:
        try:
            done = rekey(catalog, c, args.recipients, identity_env=args.identity_file_env)
        except BackupError as exc:
            text = scrub(str(exc))
            problem(text, text.replace(c.repo.storage.uri(c.ref.key), "<artifact>"))
            failed += 1
            continue
        if c.successor is None:
            places[c.repo.name] += 1
        for name in done.also_in:
            places[name] += 1
        if done.resumed:
            line = (f"finished the interrupted rotation of {done.old}: replaced by {done.new} in "
                    f"{', '.join(done.also_in) or 'no repository yet'}")
        else:
            line = f"re-encrypted {done.old} -> {done.new} in {c.repo.name} ({done.seconds:.1f}s)"
            if done.also_in:
                line += f"; the copy in {', '.join(done.also_in)} replaced"
        print(line)
        if done.pending:
            unfinished += 1
        for name, why in done.pending.items():  # the rotated side is done; this side keeps the old copy for now
            text = scrub(why)
            problem(f"{done.old}: the copy in {name} still holds the old keys ({text}); run rekey again to "
                    "replace it with the same new artifact", f"{name}: {text}")
    for same, count in errors.items():  # one line per distinct problem, not one per backup
        print(f"backup-assets: {first[same]}" + (f" (and {count - 1} more backup(s) the same way)" if count > 1 else ""),
              file=sys.stderr)
    sides = ", ".join(f"{name} {n}" for name, n in sorted(places.items())) or "none"
    print(f"{len(chosen) - failed - unfinished} of {len(chosen)} backup(s) rotated everywhere; copies now on the new "
          f"keys: {sides}" + (f"; {failed} not rotated" if failed else "")
          + (f"; {unfinished} with a copy still to replace (run rekey again)" if unfinished else ""), file=sys.stderr)
    return 1 if failed or unfinished else 0
