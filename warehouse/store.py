"""The DuckDB warehouse, as one import: every public name of the reader, the writer, the
connection helpers and the on-open migration, from the modules that now hold them.

- `connection`: opening the file (locks, retries, read-only readers), one-line errors,
  `transaction`, parameter checks, the package's views;
- `reader`: `Warehouse`, read access;
- `writer`: `WarehouseWriter`, grouped, held and checked batch commits;
- `migrate`: creating a file from schema.sql, adding ENUM values and columns to an older one.
"""

from actwh.warehouse.connection import (  # noqa: F401
    CORRUPT_MARKS, LOCK_RE, READER_CONFIG, VIEWS_SQL, WarehouseLocked, _ddl, _holder,
    _is_lock_error, _now, _open, check_params, check_version, check_writable, connect,
    interruptible, one_line, package_views, read_run, transaction)
from actwh.warehouse.ddl import SCHEMA_VERSION  # noqa: F401
from actwh.warehouse.migrate import COLUMNS_SQL, ENUM_VALUES_SQL  # noqa: F401
from actwh.warehouse.reader import EXPORT_SQL, Warehouse  # noqa: F401
from actwh.warehouse.writer import (  # noqa: F401
    BIG_TABLES, EVAL_DELETES, INSERT_SQL, RUN_DELETES, TABLES_SQL, TELL_AFTER_S,
    BatchAlreadyCommitted, WarehouseWriter, batch_id_of)


def enum_columns(node_types=None, scalars=None) -> dict[str, list[tuple[str, str]]]:
    """ENUM type name -> the (table, column) pairs that use it (from the schema itself)."""
    from actwh.warehouse.ddl import enum_users

    return enum_users()
