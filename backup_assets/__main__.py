"""`backup-assets` and `python -m backup_assets`: the WAL commands PostgreSQL runs per segment take a fast path
(walcmd), everything else the full CLI."""

import sys


def main(argv: list[str] | None = None) -> int:
    from backup_assets.core.pitr.walcmd import main as fast

    code = fast(argv)
    if code is not None:
        return code
    from backup_assets.cli import main as full

    return full(argv)


if __name__ == "__main__":
    sys.exit(main())
