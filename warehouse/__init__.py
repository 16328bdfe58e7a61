"""The DuckDB warehouse: schema, reads (`Warehouse`) and atomic batch writes (`WarehouseWriter`)."""

from actwh.warehouse.store import Warehouse, WarehouseWriter

__all__ = ["Warehouse", "WarehouseWriter"]
