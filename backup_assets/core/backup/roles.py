"""Roles and grants: what `pg_dumpall --globals-only` holds, as structured data.

Each PostgreSQL source has a `globals` group: the server's roles (attributes, password hashes,
memberships), per-role and per-database settings, and the database-level grants of the source's
database. It is kept as JSON rather than as a SQL script so that a restore can create exactly the
roles a target server lacks, every name going through psycopg.sql.Identifier, and a drill can
prove the statements valid inside a transaction that is rolled back.

Password hashes are secrets: the artifact is 0600 (and encrypted once encryption is configured);
the manifest lists role names only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from backup_assets.catalog import GLOBALS_GROUP
from backup_assets.core import BackupError

FORMAT = "roles-json"
GROUP = GLOBALS_GROUP
ATTRIBUTES = [("rolsuper", "SUPERUSER"), ("rolinherit", "INHERIT"), ("rolcreaterole", "CREATEROLE"),
              ("rolcreatedb", "CREATEDB"), ("rolcanlogin", "LOGIN"), ("rolreplication", "REPLICATION"),
              ("rolbypassrls", "BYPASSRLS")]


@dataclass
class Globals:
    roles: list[dict[str, Any]] = field(default_factory=list)
    memberships: list[dict[str, Any]] = field(default_factory=list)
    settings: list[dict[str, Any]] = field(default_factory=list)
    database_grants: list[dict[str, Any]] = field(default_factory=list)
    passwords_included: bool = True

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, indent=1, default=str).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str) -> "Globals":
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise BackupError(f"{where}: roles backup is not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("roles"), list):
            raise BackupError(f"{where}: roles backup has no list of roles")
        for role in raw["roles"]:
            if not isinstance(role, dict) or not isinstance(role.get("name"), str) or not role["name"]:
                raise BackupError(f"{where}: roles backup holds a role without a name")
        known = {k: raw[k] for k in ("roles", "memberships", "settings", "database_grants", "passwords_included")
                 if k in raw}
        return cls(**known)

    def role_names(self) -> list[str]:
        return sorted(r["name"] for r in self.roles)


def read(conn: psycopg.Connection, dbname: str) -> Globals:
    """The server's roles and the database's grants and settings (predefined pg_* roles left out)."""
    out = Globals()
    columns = sql.SQL(", ").join(sql.Identifier(a) for a, _ in ATTRIBUTES)
    query = sql.SQL("SELECT rolname, {}, rolconnlimit, rolvaliduntil, {} FROM {} WHERE rolname !~ '^pg_' ORDER BY rolname")
    try:
        rows = conn.execute(query.format(columns, sql.Identifier("rolpassword"), sql.Identifier("pg_authid"))).fetchall()
    except psycopg.errors.InsufficientPrivilege:  # not a superuser: roles without their password hashes
        out.passwords_included = False
        rows = conn.execute(query.format(columns, sql.NULL, sql.Identifier("pg_roles"))).fetchall()
    for row in rows:
        role = {"name": row[0], **{a: bool(v) for (a, _), v in zip(ATTRIBUTES, row[1:8])},
                "connlimit": row[8], "valid_until": row[9].isoformat() if row[9] else None, "password": row[10]}
        out.roles.append(role)
    out.memberships = [
        {"role": r, "member": m, "admin": bool(a)} for r, m, a in conn.execute(
            "SELECT r.rolname, m.rolname, am.admin_option FROM pg_auth_members am "
            "JOIN pg_roles r ON r.oid = am.roleid JOIN pg_roles m ON m.oid = am.member "
            "WHERE r.rolname !~ '^pg_' OR m.rolname !~ '^pg_' ORDER BY 1, 2").fetchall()]
    out.settings = [
        {"role": r, "database": d, "config": list(c or [])} for r, d, c in conn.execute(
            "SELECT r.rolname, d.datname, s.setconfig FROM pg_db_role_setting s "
            "LEFT JOIN pg_roles r ON r.oid = s.setrole LEFT JOIN pg_database d ON d.oid = s.setdatabase "
            "WHERE s.setdatabase = 0 OR d.datname = %s ORDER BY 1 NULLS FIRST, 2 NULLS FIRST", (dbname,)).fetchall()]
    out.database_grants = [
        {"grantee": g, "privilege": p, "grantable": bool(gr)} for g, p, gr in conn.execute(
            "SELECT coalesce(r.rolname, 'PUBLIC'), a.privilege_type, a.is_grantable "
            "FROM pg_database d, aclexplode(d.datacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee "
            "WHERE d.datname = %s ORDER BY 1, 2", (dbname,)).fetchall()]
    return out


def _create_role(conn: psycopg.Connection, role: dict) -> None:
    options = [sql.SQL(keyword if role.get(attr) else "NO" + keyword) for attr, keyword in ATTRIBUTES]
    if role.get("connlimit") not in (None, -1):
        options.append(sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(int(role["connlimit"]))))
    if role.get("password"):
        options.append(sql.SQL("PASSWORD {}").format(sql.Literal(role["password"])))
    if role.get("valid_until"):
        options.append(sql.SQL("VALID UNTIL {}").format(sql.Literal(role["valid_until"])))
    conn.execute(sql.SQL("CREATE ROLE {} WITH {}").format(sql.Identifier(role["name"]), sql.SQL(" ").join(options)))


def create_missing(conn: psycopg.Connection, saved: Globals, wanted: set[str] | None = None) -> list[str]:
    """Create the roles of `saved` (all, or those in `wanted`) that the server lacks, then the
    memberships between roles that exist afterwards. Existing roles are never altered."""
    have = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles").fetchall()}
    created = []
    for role in saved.roles:
        if role["name"] in have or (wanted is not None and role["name"] not in wanted):
            continue
        _create_role(conn, role)
        created.append(role["name"])
    have.update(created)
    for m in saved.memberships:
        if (m["role"] in created or m["member"] in created) and m["role"] in have and m["member"] in have:
            already = conn.execute(
                "SELECT 1 FROM pg_auth_members am JOIN pg_roles r ON r.oid = am.roleid JOIN pg_roles m ON m.oid = am.member "
                "WHERE r.rolname = %s AND m.rolname = %s", (m["role"], m["member"])).fetchone()
            if not already:
                conn.execute(sql.SQL("GRANT {} TO {}{}").format(
                    sql.Identifier(m["role"]), sql.Identifier(m["member"]),
                    sql.SQL(" WITH ADMIN OPTION" if m.get("admin") else "")))
    return created


def apply_settings(conn: psycopg.Connection, saved: Globals, *, source_db: str, target_db: str | None,
                   roles: set[str]) -> list[str]:
    """Re-apply saved settings: the database's own (onto `target_db`), and those of the roles in
    `roles` (server-wide, and in the database). Each value is set in this session with set_config
    and stored with `SET ... FROM CURRENT`, so PostgreSQL parses it exactly as it did when it was
    saved (list settings such as search_path keep their quoting). A setting this server does not
    accept is skipped and reported, never half-applied."""
    problems = []
    for entry in saved.settings:
        role, database = entry.get("role"), entry.get("database")
        if database is not None and (database != source_db or target_db is None):
            continue
        if role is not None and role not in roles:
            continue
        if role is None and database is None:
            continue
        if role is None:
            target = sql.SQL("DATABASE {}").format(sql.Identifier(target_db))
        elif database is None:
            target = sql.SQL("ROLE {}").format(sql.Identifier(role))
        else:
            target = sql.SQL("ROLE {} IN DATABASE {}").format(sql.Identifier(role), sql.Identifier(target_db))
        for item in entry.get("config", []):
            name, _, value = item.partition("=")
            try:
                with conn.transaction():
                    conn.execute("SELECT set_config(%s, %s, true)", (name, value))
                    conn.execute(sql.SQL("ALTER {} SET {} FROM CURRENT").format(
                        target, sql.Identifier(*name.split("."))))
            except psycopg.Error as exc:
                problems.append(f"{item} for {role or target_db}: {str(exc).strip().splitlines()[0]}")
    return problems


def drill(conn: psycopg.Connection, saved: Globals) -> list[str]:
    """Create every saved role the server lacks, with its memberships, inside a transaction that is
    rolled back: proves the backup restores without changing the server. Returns the roles tried."""
    with conn.transaction(force_rollback=True):
        return create_missing(conn, saved)


def load(artifact, manifest, identities=None) -> Globals:
    """The saved roles of a roles backup (decoded in memory: it is small)."""
    from backup_assets.core.artifact import open_decompressed

    with open_decompressed(artifact, manifest.raw_size_bytes, identities) as reader:
        chunks = []
        while chunk := reader.read():
            chunks.append(chunk)
    return Globals.from_bytes(b"".join(chunks), where=str(artifact))
