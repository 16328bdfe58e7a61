"""The schema's DDL as DuckDB runs it, without SQLAlchemy: `schema.sql` beside this module.

`schema.sql` is what SQLAlchemy compiles from `schema.build_metadata` (the single source of
truth) through the DuckDB dialect, with the ENUM value lists of `node_type` and `scalar` left as
placeholders; `tests/test_storage.py` checks it equals a fresh compilation, and
`python -m actwh.warehouse.schema` rewrites it. Writers create and migrate files from it, so
the populate path imports neither SQLAlchemy nor its dialect.
"""

from __future__ import annotations

import re
from pathlib import Path

from actwh.errors import WarehouseError

SCHEMA_VERSION = 1
BIG_TABLES = ("node_scalars", "pair_scalars", "edges")
SCHEMA_SQL = Path(__file__).with_name("schema.sql")
# SQLAlchemy needs at least one value per ENUM: these stand for the lists given at run time.
PLACEHOLDERS = {"node_type": "__node_types__", "scalar": "__scalars__"}
ENUM_TYPES = ("node_type", "scalar", "down_input")
_VALUE = re.compile(r"^[a-z_][a-z0-9_]*$")
_TABLE = re.compile(r"CREATE TABLE (\w+) \((.*)\)\s*$", re.S)
_COLUMN = re.compile(r"^(\w+) (.+?)( NOT NULL)?$")


def statements(node_types, scalars) -> list[str]:
    """Every CREATE TYPE and CREATE TABLE statement, the ENUMs holding these values."""
    text = SCHEMA_SQL.read_text()
    for name, values in (("node_type", node_types), ("scalar", scalars)):
        for v in values:  # names from the package's registry, checked like identifiers
            if not _VALUE.match(v):
                raise WarehouseError(f"not a valid {name} value: {v!r}")
        text = text.replace(f"'{PLACEHOLDERS[name]}'", ", ".join(f"'{v}'" for v in values))
    return [s.strip() for s in text.split(";\n") if s.strip()]


def columns() -> dict[str, list[tuple[str, str, bool]]]:
    """table -> [(column, DuckDB type, nullable)] in schema order (ENUM columns by type name)."""
    out = {}
    for statement in statements(("x",), ("x",)):
        m = _TABLE.match(statement)
        if not m:
            continue
        cols = []
        for line in m.group(2).splitlines():
            line = line.strip().rstrip(",").strip()
            if line.startswith("PRIMARY KEY") or not line:
                continue
            c = _COLUMN.match(line)
            cols.append((c.group(1), c.group(2), c.group(3) is None))
        out[m.group(1)] = cols
    return out


def enum_users() -> dict[str, list[tuple[str, str]]]:
    """ENUM type name -> the (table, column) pairs that use it."""
    out: dict[str, list[tuple[str, str]]] = {}
    for table, cols in columns().items():
        for column, kind, _ in cols:
            if kind in ENUM_TYPES:
                out.setdefault(kind, []).append((table, column))
    return out
