"""Does a restored database define exactly what its archive defines? pg_upgrade's test, per object.

PostgreSQL's pg_upgrade test dumps a database, restores it, dumps the copy and diffs the two dumps. We do
the same per object: the archive's own SQL (`pg_restore --file`, the entries that were restored, without
table rows and large objects, whose content the fingerprints and `large_objects` compare) against a dump of
the restored database (`pg_dump`, without table rows and large objects). Both texts come from the same
printing code of the same major version, so an object is equal when its block of SQL is: tables and
columns, types, domains, functions, triggers, rules, policies and RLS flags, constraints (NOT VALID too),
indexes, sequences (owned-by and values), views, materialized views (populated or not), publications,
extensions, comments, ACLs, default privileges and owners. One line per difference, naming the object.

Between majors the printed SQL differs by design; then only the objects' presence is compared.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from backup_assets.core import BackupError
from backup_assets.core.engines import postgres
from backup_assets.core.engines.pgarchive import Archive, TocEntry

# entries whose content is compared elsewhere: table rows (fingerprints) and large objects (large_objects)
ROWS_AND_LARGE_OBJECTS = {"TABLE DATA", "BLOBS", "BLOB", "BLOB METADATA", "LARGE OBJECT"}
# (their metadata, creation, owner and comment, is compared with the restored catalog: see compare_large_object_metadata)
HEADER = re.compile(r"^-- (?:Data for )?Name: (?P<name>.*); Type: (?P<type>.*?); Schema: (?P<schema>.*?); "
                    r"Owner: (?P<owner>.*?)(?:; Tablespace: .*)?$")
# pg_dump emits these only when they change from one entry to the next: their value belongs to each entry
STATE = re.compile(r"^SET (default_tablespace|default_table_access_method) = (.*);$")
STATEFUL_TYPES = {"TABLE", "INDEX", "CONSTRAINT", "MATERIALIZED VIEW", "TABLE ATTACH", "INDEX ATTACH"}


@dataclass(frozen=True)
class SqlObject:
    type: str
    schema: str
    name: str
    owner: str

    def describe(self) -> str:
        where = f" in schema {self.schema}" if self.schema not in ("-", "") else ""
        return f"{self.type} {self.name}{where}"


@dataclass
class Comparison:
    problems: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)  # objects per kind, as the archive defines them
    exact: bool = True  # False: presence only (the archive and the restored server differ in major version)
    large_objects: dict = field(default_factory=dict)


def kinds_of(entries: list[TocEntry]) -> dict[str, int]:
    """What an archive (or a selection of its entries) holds, per kind of object."""
    return dict(sorted(Counter(e.desc for e in entries).items()))


def parse_objects(text: str, *, owners: bool = True) -> Counter:
    """The SQL text of a dump as a multiset of (object, its statements); without `owners`, the owner in an
    object's header is left out (a restore without owners gives every object to the restoring role)."""
    blocks: Counter = Counter()
    state: dict[str, str] = {}
    current: SqlObject | None = None
    body: list[str] = []

    def close() -> None:
        if current is not None:
            extra = tuple(f"SET {k} = {v}" for k, v in sorted(state.items())) if current.type in STATEFUL_TYPES else ()
            blocks[(current, tuple(body) + extra)] += 1

    for line in text.splitlines():
        header = HEADER.match(line)
        if header:
            close()
            current = SqlObject(header["type"], header["schema"], header["name"], header["owner"] if owners else "-")
            body = []
            continue
        if not line.strip() or line.startswith("--") or line.startswith("\\restrict") or line.startswith("\\unrestrict"):
            continue
        changed = STATE.match(line)
        if changed:
            state[changed.group(1)] = changed.group(2)
            continue
        if current is not None:
            body.append(line)
    close()
    return blocks


def _large_object_metadata(blocks: Counter) -> tuple[Counter, dict[int, dict]]:
    """Split the blocks about large objects (their creation, owner, comment and privileges) from the others:
    `pg_dump --no-blobs` of a restored database leaves them out, so they are compared with the catalog."""
    rest, found = Counter(), {}
    for (obj, body), n in blocks.items():
        if obj.type in LARGE_OBJECT_TYPES or obj.name.startswith("LARGE OBJECT "):
            text = "\n".join(body)
            for oid in re.findall(r"lo_create\('(\d+)'\)", text):
                found.setdefault(int(oid), {"owner": None, "comment": None})
            for oid, owner in re.findall(r"^ALTER LARGE OBJECT (\d+) OWNER TO (.+);$", text, re.M):
                found.setdefault(int(oid), {"owner": None, "comment": None})["owner"] = owner
            for oid, comment in re.findall(r"^COMMENT ON LARGE OBJECT (\d+) IS '((?:[^']|'')*)';$", text, re.M | re.S):
                found.setdefault(int(oid), {"owner": None, "comment": None})["comment"] = comment.replace("''", "'")
            for verb, what, oid, grantee, option in LARGE_OBJECT_ACL.findall(text):
                found.setdefault(int(oid), {"owner": None, "comment": None}).setdefault("acl", []).append(
                    (verb, what, grantee, bool(option)))
        else:
            rest[(obj, body)] += n
    return rest, found


LARGE_OBJECT_TYPES = {"BLOB", "BLOB METADATA", "LARGE OBJECT"}
# pg_dump's privileges of a large object: the GRANTs and REVOKEs that make its ACL from the default (its owner's)
LARGE_OBJECT_ACL = re.compile(r"^(GRANT|REVOKE) (.+?) ON LARGE OBJECT (\d+) (?:TO|FROM) (.+?)( WITH GRANT OPTION)?;$", re.M)
LARGE_OBJECT_PRIVILEGES = ("SELECT", "UPDATE")


def large_object_acl(owner: str, statements: list[tuple[str, str, str, bool]]) -> dict[tuple[str, str], bool]:
    """{(grantee, privilege): grantable} after pg_dump's statements, applied in order to a large object's default
    ACL (its owner may read and write it)."""
    acl = {(owner, p): False for p in LARGE_OBJECT_PRIVILEGES}
    for verb, what, grantee, option in statements:
        only_option = what.startswith("GRANT OPTION FOR ")
        what = what.removeprefix("GRANT OPTION FOR ")
        privileges = LARGE_OBJECT_PRIVILEGES if what.startswith("ALL") else [p.strip() for p in what.split(",")]
        for p in privileges:
            if verb == "GRANT":
                acl[(grantee, p)] = acl.get((grantee, p), False) or option
            elif only_option:
                if (grantee, p) in acl:
                    acl[(grantee, p)] = False
            else:
                acl.pop((grantee, p), None)
    return acl


def compare_texts(archive_text: str, restored_text: str, *, exact: bool, owners: bool = True) -> list[str]:
    """One line per object that is missing, extra or different in the restored database."""
    want, got = parse_objects(archive_text, owners=owners), parse_objects(restored_text, owners=owners)
    want, _ = _large_object_metadata(want)
    if not exact:
        want = Counter({(o, ()): n for (o, _b), n in want.items()})
        got = Counter({(o, ()): n for (o, _b), n in got.items()})
    missing, extra = want - got, got - want
    problems = []
    extra_by_object = {o: b for (o, b) in extra}
    for (obj, body) in sorted(missing, key=lambda k: (k[0].type, k[0].schema, k[0].name)):
        other = extra_by_object.pop(obj, None)
        if other is None:
            problems.append(f"{obj.describe()} is missing after the restore")
        else:
            first = next((a, b) for a, b in zip(list(body) + [""] * len(other), list(other) + [""] * len(body)) if a != b)
            problems.append(f"{obj.describe()} differs after the restore: the archive says {first[0].strip()[:160]!r}, "
                            f"the restored database {first[1].strip()[:160]!r}")
    if exact:
        for obj in sorted(extra_by_object, key=lambda o: (o.type, o.schema, o.name)):
            problems.append(f"{obj.describe()} exists after the restore but not in the archive")
    return problems


def _run(args: list[str], ep: postgres.Endpoint | None, what: str) -> str:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        env = ep.child_env() if ep is not None else None
        proc = subprocess.run(args, stdout=out, stderr=err, env=env)
        err.seek(0)
        if proc.returncode != 0:
            lines = [line for line in err.read().decode(errors="replace").splitlines() if line.strip()]
            detail = lines[-1] if lines else f"exit code {proc.returncode}"
            raise BackupError(f"{what}: {ep.scrub(detail) if ep is not None else detail}")
        out.seek(0)
        return out.read().decode("utf-8", errors="replace")


def compare(archive: Archive, raw: Path, entries: list[TocEntry] | None, target: postgres.Endpoint, *,
            pg_restore: Path, pg_dump: Path, pg_dump_major: int, no_owner: bool = False,
            pg_bin_dir: str | None = None) -> Comparison:
    """Compare the restored database `target` with the entries of the decoded archive `raw` that were
    restored (`entries`; None: all of them)."""
    chosen = [e for e in (entries if entries is not None else archive.entries)]
    dump_version = archive.header.dump_version or ""
    match = re.match(r"(\d+)", dump_version)
    exact = bool(match) and int(match.group(1)) == pg_dump_major
    result = Comparison(kinds=kinds_of(chosen), exact=exact)
    shown = [e for e in chosen if e.desc not in ROWS_AND_LARGE_OBJECTS or e.desc in LARGE_OBJECT_TYPES]
    owner_flags = ["--no-owner", "--no-privileges"] if no_owner else []
    with tempfile.TemporaryDirectory(prefix="schema-compare-") as tmp:
        listing = Path(tmp) / "entries.list"
        listing.write_text("".join(f"{e.dump_id};\n" for e in shown))
        archive_text = _run([str(pg_restore), f"--use-list={listing}", "--file=-", *owner_flags, str(raw)], None,
                            "reading the archive's definitions")
    with postgres.connect(target) as conn:
        tables = postgres.all_tables_with_data(conn)
    patterns = [f"--exclude-table-data={t.pattern()}" for t in tables]
    restored_text = _run([str(pg_dump), "--no-password", "--no-blobs", *owner_flags, *patterns,
                          f"--dbname={target.dbname}"], target, f"dumping the restored database {target.dbname}")
    result.problems = compare_texts(archive_text, restored_text, exact=exact, owners=not no_owner)
    _, wanted_los = _large_object_metadata(parse_objects(archive_text))
    if wanted_los:
        with postgres.connect(target) as conn:
            restored_los = {oid: {"owner": owner, "comment": comment, "acl": {(g, p): grantable for g, p, grantable in acl}}
                            for oid, owner, comment, acl in conn.execute(_RESTORED_LARGE_OBJECTS).fetchall()}
        result.problems += compare_large_object_metadata(wanted_los, restored_los, owners=not no_owner)
    return result


# each large object's owner, comment and privileges (grantee, privilege, grantable; PUBLIC for everyone)
_RESTORED_LARGE_OBJECTS = """
SELECT m.oid::bigint, quote_ident(pg_get_userbyid(m.lomowner)), obj_description(m.oid, 'pg_largeobject'),
       (SELECT coalesce(json_agg(json_build_array(CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                                       ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                                                  a.privilege_type, a.is_grantable)), '[]')
          FROM aclexplode(coalesce(m.lomacl, acldefault('L', m.lomowner))) a)
  FROM pg_largeobject_metadata m
"""


def compare_large_object_metadata(want: dict[int, dict], got: dict[int, dict], *, owners: bool) -> list[str]:
    """Large objects by oid: each exists, with its owner, comment and (where owners and privileges were restored)
    privileges."""
    problems = []
    for oid in sorted(want):
        if oid not in got:
            problems.append(f"LARGE OBJECT {oid} is missing after the restore")
            continue
        if want[oid]["comment"] != got[oid]["comment"]:
            problems.append(f"COMMENT LARGE OBJECT {oid} differs after the restore: the archive says "
                            f"{want[oid]['comment']!r}, the restored database {got[oid]['comment']!r}")
        if owners and want[oid]["owner"] is not None and want[oid]["owner"] != got[oid]["owner"]:
            problems.append(f"LARGE OBJECT {oid} is owned by {got[oid]['owner']} after the restore, "
                            f"the archive says {want[oid]['owner']}")
        if owners and want[oid]["owner"] is not None and "acl" in got[oid]:
            wanted_acl = large_object_acl(want[oid]["owner"], want[oid].get("acl", []))
            if wanted_acl != got[oid]["acl"]:
                problems.append(f"LARGE OBJECT {oid} privileges differ after the restore: the archive grants "
                                f"{_acl_words(wanted_acl)}, the restored database {_acl_words(got[oid]['acl'])}")
    problems += [f"LARGE OBJECT {oid} exists after the restore but not in the archive" for oid in sorted(set(got) - set(want))]
    return problems


def _acl_words(acl: dict[tuple[str, str], bool]) -> str:
    return ", ".join(f"{p} to {g}{' with grant option' if grantable else ''}" for (g, p), grantable in sorted(acl.items())) \
        or "nothing"


def large_objects(conn) -> tuple[int, int, str]:
    """(count, bytes, fingerprint) of a database's large objects: the fingerprint sums each object's oid and
    content MD5 (order-free), as `pgarchive` does over the archive's large-object blocks."""
    count, size, total = conn.execute(  # lo_get: pg_largeobject itself is readable by superusers only
        "SELECT count(*), coalesce(sum(length(d)), 0), coalesce(sum(('x' || substr(md5(oid::text || ':' || "
        "md5(d)), 1, 16))::bit(64)::bigint::numeric), 0) "
        "FROM (SELECT oid, lo_get(oid) AS d FROM pg_largeobject_metadata) x").fetchone()
    return count, int(size), f"{int(total) & ((1 << 64) - 1):016x}"


@dataclass
class DatabaseProperties:
    """What an archive says about the database itself, which pg_restore applies only with --create:
    owner, privileges (REVOKEs included), settings, connection limit and comment."""
    source: str
    owner: str | None
    comment: str | None
    statements: list[str]  # ACL and properties, as pg_dump wrote them for the source database

    def apply(self, admin, dbname: str) -> list[str]:
        """Apply them to `dbname` (before it takes the target's place). Returns what could not be applied
        (a missing role, a setting this server does not know), one line each; the rest is applied."""
        problems = []
        ours = admin.execute("SELECT quote_ident(%s)", (dbname,)).fetchone()[0]
        theirs = admin.execute("SELECT quote_ident(%s)", (self.source,)).fetchone()[0]
        pattern = re.compile(r"\bDATABASE " + re.escape(theirs) + r"(?=[\s;])")
        if self.owner and not postgres.missing_roles(admin, [self.owner]):
            admin.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(dbname), sql.Identifier(self.owner)))
        elif self.owner:
            problems.append(f"owner {self.owner} does not exist on this server")
        for statement in self.statements:
            text = pattern.sub(lambda _m: f"DATABASE {ours}", statement, count=1)
            try:
                with admin.transaction():
                    admin.execute(text)
            except psycopg.Error as exc:
                problems.append(f"{statement.strip()} ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})")
        admin.execute("RESET SESSION AUTHORIZATION")
        return problems


_COMMENT = re.compile(r"COMMENT ON DATABASE \S+(?: \S+)*? IS '((?:[^']|'')*)';\s*", re.S)


def database_properties(archive, source: str) -> DatabaseProperties | None:
    """The archive's entries about the database (None: an archive without them, from an old pg_dump)."""
    entries = [e for e in archive.entries if e.database_level and e.defn is not None]
    database = next((e for e in entries if e.desc == "DATABASE"), None)
    if database is None:
        return None
    comment, statements = None, []
    for e in entries:
        if e.desc == "COMMENT":
            match = _COMMENT.fullmatch(e.defn)
            comment = match.group(1).replace("''", "'") if match else None
        elif e.desc in ("ACL", "DATABASE PROPERTIES"):
            # one statement a line: privileges (with SET SESSION AUTHORIZATION around a grantor's own grants),
            # ALTER DATABASE ... SET / CONNECTION LIMIT, ALTER ROLE ... IN DATABASE ... SET
            statements += [line for line in e.defn.splitlines() if line.strip()]
    return DatabaseProperties(database.tag, database.owner, comment, statements)
