"""`backup-assets`: the operator's command line. It reads the catalog, the repository and the
manifests directly, so it works when Dagster is down (that is when it is needed most).

Exit codes: 0 success, 1 failure, 2 refused or bad usage.

One module per command family: backups.py, restores.py, maintenance.py, operations.py; their arguments
in parser.py, what they share in common.py."""

from __future__ import annotations

import sys
import traceback

from backup_assets.catalog import CatalogError
from backup_assets.core import BackupError
from backup_assets.core.partition_keys import BadPartition
from backup_assets.core.secrets import scrub
from backup_assets.cli.common import UsageError
from backup_assets.cli.parser import build_parser


def _quiet() -> None:
    """A warning that is not the user's business: platformdirs' about XDG_RUNTIME_DIR (root without a login
    session, the usual case on a backup host)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*XDG_RUNTIME_DIR")


def main(argv: list[str] | None = None) -> int:
    _quiet()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, BadPartition) as exc:
        _fail(args, exc)
        return 2
    except (CatalogError, BackupError) as exc:
        _fail(args, exc)
        return 1
    except KeyboardInterrupt:
        print("backup-assets: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected failure: one scrubbed line, the traceback on --debug
        _fail(args, exc, unexpected=True)
        return 1


def _fail(args, exc: BaseException, *, unexpected: bool = False) -> None:
    if getattr(args, "debug", False):
        traceback.print_exception(exc, file=sys.stderr)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if unexpected:
        text = f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
    print(f"backup-assets: {scrub(text)}", file=sys.stderr)
