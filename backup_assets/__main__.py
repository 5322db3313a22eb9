"""`backup-assets` and `python -m backup_assets`: the WAL commands PostgreSQL runs per segment take a fast path
(walcmd), everything else the full CLI."""

import sys


def main(argv: list[str] | None = None) -> int:
    from backup_assets.core.pitr.walcmd import main as fast

    code = fast(argv)
    if code is not None:
        return code
    from backup_assets.cli import main as full

    try:
        return full(argv)
    finally:
        exiting()


def exiting() -> None:
    """The process ends next: Python's last garbage collection over everything Dagster loaded would take
    about 0.4 s and free nothing the operating system does not take back anyway."""
    import gc

    gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
