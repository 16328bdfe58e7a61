"""The warehouse: schema, reads (`Warehouse`) and atomic batch writes (`WarehouseWriter`).

Modules: `connection` (opening, locks, transactions), `reader`, `writer`, `migrate` (creating
a file from `schema.sql`, bringing an older one up to date), `ddl` (schema.sql without
SQLAlchemy), `schema` (the SQLAlchemy metadata schema.sql is compiled from); `store` re-exports
their public names.
"""

from actwh.warehouse.store import Warehouse, WarehouseWriter

__all__ = ["Warehouse", "WarehouseWriter"]
