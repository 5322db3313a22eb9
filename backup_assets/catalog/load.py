"""Reading the catalog: YAML, `${NAME}` / `${NAME:-default}` references to the environment, one line per error
naming the file and the key; the demo's catalog when none is named."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from backup_assets.catalog.common import CatalogError, ENV_REF, IDENT
from backup_assets.catalog.model import Catalog


def _interpolate(value: Any, env: dict[str, str], where: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def repl(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise CatalogError(f"{where}: environment variable {name} is not set")

        return ENV_REF.sub(repl, value)
    return value


def _location(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif str(item).startswith("function-") or item in ("literal['postgres','sqlite']",):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _message(error: dict) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing required key"
    msg = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if kind == "literal_error":
        msg = f"{msg}, got {error.get('input')!r}"
    return msg


def parse_catalog(data: Any, *, source_name: str = "<catalog>", env: dict[str, str] | None = None) -> Catalog:
    environ = dict(os.environ)
    if env:
        environ = {**env, **environ}
    if not isinstance(data, dict):
        raise CatalogError(f"{source_name}: the catalog must be a mapping with 'repository' and 'sources'")
    try:
        data = _interpolate(data, environ, "")
    except CatalogError as exc:
        raise CatalogError(f"{source_name}: {exc}") from None
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # the engine decides which fields apply: report a bad engine before anything it implies
        for err in exc.errors():
            if err["loc"][-1:] == ("engine",):
                first = err
                break
        key = _location(first["loc"])
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise CatalogError(f"{source_name}: {key}: {_message(first)}{more}") from None
    return catalog


def load_catalog(path: str | os.PathLike, *, env: dict[str, str] | None = None) -> Catalog:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read catalog: {exc.strerror}") from None
    try:
        # libyaml's loader when PyYAML has it: a fleet's catalog is read by every process that loads
        # the definitions (the pure-Python one took a tenth of that time for 100 sources)
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CatalogError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    catalog = parse_catalog(data, source_name=str(path), env=env)
    return catalog.model_copy(update={"catalog_path": str(path.resolve())})


DEMO_CATALOG = Path(__file__).resolve().parents[1] / "demo" / "catalog.yaml"


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def demo_home() -> Path:
    """BACKUP_ASSETS_DEMO_HOME, else the project's .demo (the same from any directory)."""
    return Path(os.environ.get("BACKUP_ASSETS_DEMO_HOME") or (PROJECT_ROOT / ".demo")).resolve()


def demo_env(home: Path | None = None) -> dict[str, str]:
    """The demo's settings kept in <demo home>/secrets.env (0600), e.g. its database password."""
    path = (home or demo_home()) / "secrets.env"
    env: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return env
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and re.fullmatch(IDENT, name.strip()):
            env[name.strip()] = value
    return env


def catalog_from_env() -> Catalog:
    """The catalog named by BACKUP_ASSETS_CATALOG, else the packaged demo catalog (whose settings,
    such as its database password, come from the demo's secrets.env when the environment lacks them)."""
    path = os.environ.get("BACKUP_ASSETS_CATALOG")
    if path:
        return load_catalog(path)
    home = demo_home()
    for name, value in demo_env(home).items():
        os.environ.setdefault(name, value)
    return load_catalog(DEMO_CATALOG, env={"BACKUP_ASSETS_DEMO_HOME": str(home)})
