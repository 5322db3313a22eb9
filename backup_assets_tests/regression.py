"""PostgreSQL's own regression database, the standard nobody here designed.

`make installcheck` of PostgreSQL leaves a database `regression` holding nearly every kind of object the
server supports; pg_upgrade's test dumps it, restores it and diffs the dumps. We build it from Debian's
source package of the installed postgresql-15 (`.ci/run` fetches it with `apt-get source`): configure,
`make -C src/test/regress` (pg_regress and the suite's C libraries), the parallel schedule against a
throwaway PostgreSQL 15 cluster, then `pg_dump -Fc` of the result and the roles it needs, cached under
BACKUP_ASSETS_REGRESSION_CACHE (default /var/cache/backup_assets) so a test run restores it in seconds.

The suite's C functions are created with the absolute path of their library: the libraries are kept in
the cache beside the dump, readable by the server's user, so every PostgreSQL 15 server on this machine
can restore the dump.

    python -m backup_assets_tests.regression build SOURCE_DIR    # SOURCE_DIR: the unpacked postgresql-15 source
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("BACKUP_ASSETS_REGRESSION_CACHE", "/var/cache/backup_assets"))
DUMP = CACHE / "regression-15.dump"
ROLES = CACHE / "regression-15-roles.sql"
LIB = CACHE / "regress-lib-15"
LIBRARIES = ("regress.so", "refint.so", "autoinc.so")


def available() -> bool:
    return DUMP.is_file() and ROLES.is_file() and all((LIB / name).is_file() for name in LIBRARIES)


def _say(message: str) -> None:
    print(f"regression: {message}", file=sys.stderr, flush=True)


def build(source: Path) -> None:
    """Build the suite from `source`, run it, and cache the dump, the roles and the libraries."""
    from backup_assets.demo.cluster import LocalCluster, _open_path_for, debian_bin_dir, free_port

    bin_dir = debian_bin_dir(15)
    if bin_dir is None:
        raise SystemExit("regression: Debian's PostgreSQL 15 (/usr/lib/postgresql/15/bin) is not installed")
    regress = source / "src" / "test" / "regress"
    if not (source / "configure").is_file():
        raise SystemExit(f"regression: {source} is not a PostgreSQL source tree (no configure)")
    if not (regress / "pg_regress").is_file():
        _say(f"configuring and building pg_regress in {source}")
        subprocess.run(["./configure", "--without-readline", "--without-zlib", "--without-icu", "--without-lz4",
                        "--without-zstd", "--without-openssl", "--without-ldap", "--without-gssapi"],
                       cwd=source, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["make", "-j2", "-C", "src/test/regress"], cwd=source, check=True, stdout=subprocess.DEVNULL)
    CACHE.mkdir(parents=True, exist_ok=True)
    lib = LIB.with_name(LIB.name + ".partial")
    shutil.rmtree(lib, ignore_errors=True)
    lib.mkdir()
    for name in LIBRARIES:
        shutil.copy2(regress / name, lib / name)
        (lib / name).chmod(0o755)
    lib.chmod(0o755)
    shutil.rmtree(LIB, ignore_errors=True)
    lib.rename(LIB)
    _open_path_for(LIB / LIBRARIES[0])
    with tempfile.TemporaryDirectory(prefix="regression-") as tmp:
        work = Path(tmp)
        _open_path_for(work / "x")
        work.chmod(0o755)
        cluster = LocalCluster(bin_dir, work / "pg", free_port(), "regress-" + secrets.token_hex(8))
        cluster.start()
        try:
            out = work / "out"
            out.mkdir()
            env = {**os.environ, "PGPASSWORD": cluster.password, "PGHOST": cluster.host, "PGPORT": str(cluster.port),
                   "PGUSER": cluster.superuser}
            _say("running the parallel schedule (a few minutes; failures of single tests do not matter: the "
                 "database they leave is what counts)")
            subprocess.run([str(regress / "pg_regress"), f"--inputdir={regress}", f"--outputdir={out}",
                            f"--bindir={bin_dir}", f"--dlpath={LIB}", "--max-concurrent-tests=20",
                            f"--schedule={regress / 'parallel_schedule'}", f"--host={cluster.host}",
                            f"--port={cluster.port}", f"--user={cluster.superuser}"],
                           cwd=regress, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with cluster.connect("regression") as conn:
                tables = conn.execute("SELECT count(*) FROM pg_class WHERE relkind IN ('r', 'p')").fetchone()[0]
            if tables < 300:
                raise SystemExit(f"regression: the suite left only {tables} tables: the run failed (see {out})")
            partial = DUMP.with_name(DUMP.name + ".partial")
            subprocess.run([str(bin_dir / "pg_dump"), "-Fc", f"--file={partial}", "--dbname=regression"], env=env,
                           check=True)
            roles = subprocess.run([str(bin_dir / "pg_dumpall"), "--roles-only"], env=env, check=True,
                                   capture_output=True, text=True).stdout
            ROLES.write_text(roles)
            partial.rename(DUMP)
            _say(f"{tables} tables; cached {DUMP} ({DUMP.stat().st_size // 1024} KiB)")
        finally:
            cluster.destroy()


def load(cluster, dbname: str) -> None:
    """Create the suite's roles on `cluster` and restore the cached regression database as `dbname`."""
    from psycopg import sql

    load_roles(cluster)
    with cluster.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname)))
    env = {**os.environ, "PGPASSWORD": cluster.password}
    subprocess.run([str(cluster.bin_dir / "pg_restore"), "--exit-on-error", "--no-password", f"--host={cluster.host}",
                    f"--port={cluster.port}", f"--username={cluster.superuser}", f"--dbname={dbname}", "--jobs=1",
                    str(DUMP)], env=env, check=True, capture_output=True)


def load_roles(cluster) -> None:
    """The suite's roles and memberships on `cluster` (existing roles are left as they are)."""
    with cluster.connect() as conn:
        for line in ROLES.read_text().splitlines():
            if line.startswith("CREATE ROLE "):
                name = line.removeprefix("CREATE ROLE ").rstrip(";")
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE quote_ident(rolname) = %s", (name,)).fetchone()
                if not exists:
                    conn.execute(line)
            elif line.startswith("ALTER ROLE ") and " WITH " in line and not line.startswith(f"ALTER ROLE {cluster.superuser} "):
                conn.execute(line)
            elif line.startswith("GRANT "):
                try:
                    conn.execute(line)
                except Exception:  # a membership already there
                    pass


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "build":
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    build(Path(sys.argv[2]).resolve())
