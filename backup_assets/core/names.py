"""Schema-qualified table names: one exact value type and one unambiguous text form.

Names come from users' databases and may hold spaces, dots, quotes, capitals and unicode. They
are never split on dots or parsed out of free text: a `TableName` is a (schema, name) pair, it
reaches SQL only as `psycopg.sql.Identifier` and pg_dump only as an exact quoted pattern.

Text form (catalog, manifests, the command line), like psql shows names:
    runs                      -> public.runs
    billing.invoices          -> billing.invoices
    billing."Order Items"     -> a part with anything but a-z, 0-9 and _ is double-quoted,
    "my.schema"."a ""b"" c"      with " doubled inside
Unquoted parts are taken exactly as written (no case folding): `billing.Invoices` names the
table "Invoices". The catalog also takes a mapping, `{schema: billing, table: "Order Items"}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # psycopg is imported where SQL is built, not by every catalog reader
    from psycopg import sql

PLAIN = re.compile(r"[a-z_][a-z0-9_]*")
MAX_IDENT_BYTES = 63


class NameError_(ValueError):
    """A table name that cannot be read; the message says why."""


@dataclass(frozen=True, order=True)
class TableName:
    schema: str
    name: str

    def __post_init__(self) -> None:
        for part in (self.schema, self.name):
            if not part:
                raise NameError_("empty identifier")
            if "\x00" in part:
                raise NameError_("identifier contains a NUL byte")
            if len(part.encode()) > MAX_IDENT_BYTES:
                raise NameError_(f"identifier {part!r} is longer than {MAX_IDENT_BYTES} bytes")

    def __str__(self) -> str:
        return f"{quote(self.schema)}.{quote(self.name)}"

    def ident(self) -> sql.Identifier:
        from psycopg import sql

        return sql.Identifier(self.schema, self.name)

    def pattern(self) -> str:
        """An exact pg_dump --table pattern: each part double-quoted, so no character is a wildcard."""
        return f"{_dq(self.schema)}.{_dq(self.name)}"

    @classmethod
    def parse(cls, text: str, default_schema: str = "public") -> "TableName":
        parts = split_qualified(text)
        if len(parts) == 1:
            return cls(default_schema, parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise NameError_(f"{text!r} has {len(parts)} dot-separated parts; expected table or schema.table "
                         "(quote a name that contains a dot: public.\"a.b\")")

    @classmethod
    def of(cls, value: Any) -> "TableName":
        """From the catalog: a string in the text form, or a {schema, table} mapping."""
        if isinstance(value, TableName):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"schema", "table"}
            if unknown:
                raise NameError_(f"unknown key(s) {', '.join(sorted(unknown))} in a table mapping (schema, table)")
            if not isinstance(value.get("table"), str):
                raise NameError_("a table mapping needs 'table' (and optionally 'schema')")
            schema = value.get("schema", "public")
            if not isinstance(schema, str):
                raise NameError_("'schema' must be a string")
            return cls(schema, value["table"])
        if isinstance(value, str):
            return cls.parse(value)
        raise NameError_(f"expected a table name or a {{schema, table}} mapping, got {type(value).__name__}")


def _dq(part: str) -> str:
    return '"' + part.replace('"', '""') + '"'


def quote(part: str) -> str:
    """A part as psql shows it: bare when plain lower-case, double-quoted otherwise."""
    return part if PLAIN.fullmatch(part) else _dq(part)


def split_qualified(text: str) -> list[str]:
    """Split `a."b.c"."d ""e"" f"` into its parts; quoted parts keep their dots, quotes are undoubled."""
    if not isinstance(text, str) or not text:
        raise NameError_("empty table name")
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise NameError_(f"{text!r}: unterminated double quote")
                buf.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':
                    buf.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            part = "".join(buf)
            if not part:
                raise NameError_(f"{text!r}: empty quoted name")
        else:
            k = text.find(".", i)
            part = text[i:] if k < 0 else text[i:k]
            if '"' in part:
                raise NameError_(f"{text!r}: a double quote inside an unquoted name (quote the whole part)")
            if not part:
                raise NameError_(f"{text!r}: empty name part")
            i = n if k < 0 else k
        parts.append(part)
        if i >= n:
            return parts
        if text[i] != ".":
            raise NameError_(f"{text!r}: expected '.' after a quoted name")
        i += 1
        if i >= n:
            raise NameError_(f"{text!r}: ends with '.'")

