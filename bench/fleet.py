"""A fleet catalog: N PostgreSQL sources × 3 table groups × 3 tiers, replicated to S3.

What a platform team with tens to hundreds of databases writes. Used by `make bench`
to time loading the definitions, and by the tests to prove such a catalog loads.

    python -m bench.fleet --sources 100 > fleet.yaml
"""

from __future__ import annotations

import argparse
import sys

import yaml


def fleet_catalog(sources: int = 100, *, root: str = "/var/backups/fleet", s3: bool = True, servers: int = 3,
                  port: int = 5432) -> dict:
    catalog: dict = {
        "repository": {"root": root},
        "timezone": "UTC",
        "start_date": "2026-11-01",
        "tiers": {
            "daily": {"time": "03:00", "retention_days": 7, "drill": True},
            "weekly": {"time": "03:00", "day_of_week": "monday", "retention_days": 28},
            "monthly": {"time": "03:00", "day_of_month": 1, "retention_days": 180},
        },
        "sources": {},
    }
    for i in range(sources):
        catalog["sources"][f"db{i:03d}"] = {
            "engine": "postgres",
            "description": f"application database {i}",
            "connection": {"host": f"pg{i % servers}.internal", "port": port, "dbname": f"app{i:03d}",
                           "user": "backup", "password_env": "FLEET_PG_PASSWORD"},
            "globals": False,
            "groups": {
                "full": {"description": "the whole database"},
                "core": {"tables": ["runs", "artifacts", "webhook_events", "hitl_approvals"]},
                "kb": {"tables": ["kb_documents", "kb_embeddings"]},
            },
        }
    if s3:
        catalog["replication"] = {"s3": {"bucket": "fleet-backups", "prefix": "fleet", "region": "eu-central-1",
                                         "access_key_id_env": "FLEET_S3_KEY", "secret_access_key_env": "FLEET_S3_SECRET"}}
    return catalog


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=100)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--root", default="/var/backups/fleet")
    args = parser.parse_args(argv)
    yaml.safe_dump(fleet_catalog(args.sources, root=args.root, s3=not args.no_s3), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
