"""Databases as restores and drills handle them: created, dropped and commented; marked as a restore's or a drill's
scratch (the owner's host, pid and start time in the comment and the name), and the marked leftovers of dead
owners dropped."""

from __future__ import annotations

import datetime as dt
import json
import re

import psycopg
from psycopg import sql

from backup_assets.core import BackupError
from backup_assets.core.owner import Owner


def valid_db_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name))


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def create_database(conn: psycopg.Connection, name: str, *, comment: str | None = None) -> None:
    try:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.InsufficientPrivilege:
        user = conn.execute("SELECT current_user").fetchone()[0]
        raise BackupError(f"role {user} on {conn.info.host}:{conn.info.port} may not create databases (the drill's and "
                          "a restore's scratch database): grant it CREATEDB, or name a drill_server in the catalog "
                          "whose user may") from None
    if comment:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(comment)))


def recreate_database(conn: psycopg.Connection, name: str, *, comment: str | None = None) -> None:
    """Drop a scratch database and create it again, empty (a restore tried again from the start)."""
    drop_database(conn, name)
    create_database(conn, name, comment=comment)


def drop_database(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def database_comment(conn: psycopg.Connection, name: str) -> str | None:
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    return row[0] if row else None


def marker(mark: str, **extra) -> str:
    """A comment saying which of our operations owns a scratch database or schema, and which
    process (host, pid, start time) runs it."""
    return json.dumps({"mark": mark, **Owner.me().to_json(), **extra})


def read_marker(comment: str | None, mark: str) -> dict | None:
    try:
        data = json.loads(comment or "")
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("mark") == mark else None


def has_marker(comment: str | None, mark: str) -> bool:
    return read_marker(comment, mark) is not None


def marker_owner_alive(data: dict) -> bool:
    owner = Owner.from_json(data)
    if owner is None:
        return False
    try:
        created = dt.datetime.fromisoformat(data.get("created", ""))
        age = (dt.datetime.now(dt.timezone.utc) - created).total_seconds()
    except (TypeError, ValueError):
        age = None
    return owner.is_alive(age_s=age)


_OWNED = re.compile(r"_([0-9a-f]{8})_(\d+)_(\d+)$")


def owned_name(base: str) -> str:
    """A scratch database's name that says who made it (host, pid, process start): CREATE DATABASE
    cannot run in a transaction with the COMMENT that marks it, and a server finishes a CREATE
    DATABASE whose client was killed, so the name is what a sweep can always judge."""
    owner = Owner.me()
    suffix = f"_{owner.host}_{owner.pid}_{owner.start}"
    return _bytes_prefix(base, 63 - len(suffix.encode())) + suffix


def owned_name_with(head: str, tail: str) -> str:
    """`owned_name(head + tail)` where only `head` is shortened to fit (the tail, e.g. a time stamp, stays whole)."""
    owner = Owner.me()
    suffix = f"_{owner.host}_{owner.pid}_{owner.start}"
    return _bytes_prefix(head, 63 - len(suffix.encode()) - len(tail.encode())) + tail + suffix


def _bytes_prefix(text: str, limit: int) -> str:
    """The longest prefix of `text` within `limit` bytes of UTF-8 (PostgreSQL's 63 are bytes, not characters;
    a longer name would be cut by the server and no longer be the name we use)."""
    return text.encode()[:max(limit, 0)].decode(errors="ignore")


def name_owner(name: str) -> Owner | None:
    match = _OWNED.search(name)
    return Owner(match.group(1), int(match.group(2)), int(match.group(3))) if match else None


def drop_marked_databases(conn: psycopg.Connection, *, like: str, mark: str, protect: set[str] = frozenset()) -> list[str]:
    """Drop the leftovers of interrupted operations: databases named `like` that carry `mark` (or an
    owner in their name, when the operation died before it could mark them) and whose owner process
    is gone; never one that is neither, never one of a live operation."""
    dropped = []
    for name, comment in conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname LIKE %s", (like,)
    ).fetchall():
        if name in protect:
            continue
        data = read_marker(comment, mark)
        if data is not None:
            dead = not marker_owner_alive(data)
        elif comment is None and (owner := name_owner(name)) is not None:
            dead = not owner.is_alive()
        else:
            continue
        if dead:
            drop_database(conn, name)
            dropped.append(name)
    return dropped
