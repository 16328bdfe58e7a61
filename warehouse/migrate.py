"""Creating a warehouse file, and bringing an older one up to date when a writer opens it.

Both run from `ddl.statements` (the schema SQLAlchemy compiles, stored as schema.sql), so a
populate never imports SQLAlchemy. A file is built under a private name and linked into place,
so a second writer or a full disk never leaves a half-made file; an older file gains the ENUM
values this actwh knows (DuckDB cannot alter an ENUM: the columns go through VARCHAR to a
re-created type, in one transaction) and the nullable columns it lacks (NULL in its rows).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

import duckdb

from actwh.errors import WarehouseError
from actwh.warehouse import ddl
from actwh.warehouse.connection import _ddl, one_line, package_views, transaction

log = logging.getLogger("actwh.warehouse")
COLUMNS_SQL = "SELECT table_name, column_name FROM information_schema.columns"
ENUM_VALUES_SQL = {
    "scalar": "SELECT unnest(enum_range(NULL::scalar))::VARCHAR",
    "node_type": "SELECT unnest(enum_range(NULL::node_type))::VARCHAR",
}
_TYPE = re.compile(r"^[A-Z][A-Z ]*$")
META_SQL = "INSERT INTO actwh_meta VALUES ('schema_version', $version)"


def create_schema(con, node_types, scalars) -> None:
    """The schema, its version row and the package's views, on an empty database."""
    for statement in ddl.statements(node_types, scalars):
        con.execute(statement)
    con.execute(META_SQL, {"version": str(ddl.SCHEMA_VERSION)})
    package_views(con, temporary=False)


def create_file(path: Path, node_types, scalars) -> None:
    """Build the schema in a private file, then link it under the real name unless someone
    else got there first: a second writer or a full disk never leaves a half-made file."""
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        con = duckdb.connect(str(tmp))
        try:
            with transaction(con):
                create_schema(con, node_types, scalars)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        try:
            os.link(tmp, path)  # atomic, and never replaces a file another writer made
        except FileExistsError:
            pass
    except (duckdb.Error, OSError) as e:
        raise WarehouseError(f"cannot create {path}: {str(e).splitlines()[0]}") from None
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)


def migrate_enums(con, path, node_types, scalars) -> None:
    """Add the ENUM values this actwh knows and the file lacks."""
    wanted = {"node_type": tuple(node_types), "scalar": tuple(scalars)}
    users = ddl.enum_users()
    changes = {}
    for name, values in wanted.items():
        have = [r[0] for r in con.execute(ENUM_VALUES_SQL[name]).fetchall()]
        missing = [v for v in values if v not in have]
        if missing:
            changes[name] = have + missing  # old codes keep their order
    if not changes:
        return
    failed = lambda e: f"cannot add {sorted(changes)} values to {path}: {one_line(e)}"  # noqa: E731
    with transaction(con, failed):
        for name, values in changes.items():
            for table, column in users[name]:
                con.execute(_ddl("ALTER TABLE {t} ALTER COLUMN {c} SET DATA TYPE VARCHAR",
                                 t=table, c=column))
            con.execute(_ddl("DROP TYPE {n}", n=name))
            for v in values:  # names from the package's registry, checked like identifiers
                _ddl("{v}", v=v)
            con.execute(_ddl("CREATE TYPE {n} AS ENUM (", n=name)
                        + ", ".join("'" + v + "'" for v in values) + ")")
            for table, column in users[name]:
                con.execute(_ddl("ALTER TABLE {t} ALTER COLUMN {c} SET DATA TYPE {n}",
                                 t=table, c=column, n=name))
        package_views(con, temporary=False)
    log.info("added ENUM values to %s: %s", path, changes)


def add_columns(con, path) -> None:
    """Add the nullable columns of this schema that an older file lacks (NULL in its rows),
    and recreate the file's views, which may name them."""
    have = set(con.execute(COLUMNS_SQL).fetchall())
    tables = {t for t, _ in have}  # a table the file lacks altogether is not this one's job
    missing = [(t, c, kind) for t, cols in ddl.columns().items() if t in tables
               for c, kind, nullable in cols if (t, c) not in have and nullable]
    if not missing:
        return
    failed = lambda e: f"cannot add columns to {path}: {one_line(e)}"  # noqa: E731
    with transaction(con, failed):
        for table, column, kind in missing:
            if not _TYPE.match(kind):  # from the package's schema.sql, checked all the same
                raise WarehouseError(f"not a column type: {kind!r}")
            con.execute(_ddl("ALTER TABLE {t} ADD COLUMN {c} ", t=table, c=column) + kind)
        package_views(con, temporary=False)
    log.info("added columns to %s: %s", path, missing)
