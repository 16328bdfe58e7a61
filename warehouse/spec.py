"""Where a warehouse lives: the `--db` spec.

- a plain path: one DuckDB file (a laptop, one writer at a time);
- `lake:PATH`: a DuckLake catalog, the folder PATH holding the catalog (`PATH/catalog.ducklake`,
  a DuckDB file) and the Parquet data files (`PATH/data/`): many writers take turns on the
  catalog for a short commit each, and the data can move to object storage;
- `parquet:DIR`: a folder of Parquet shards, each batch's files written under a temporary name
  and renamed, and committed by one manifest entry (`DIR/manifest/`): any tool that reads
  Parquet reads it, no extension needed.

Readers read the three the same way (`actwh.warehouse.reader.Warehouse`); `actwh ingest` copies
a lake or a folder into one DuckDB file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from actwh.errors import WarehouseError

KINDS = ("file", "lake", "parquet")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.S)
LAKE_CATALOG = "catalog.ducklake"
PARQUET_META = "actwh.json"


@dataclass(frozen=True)
class Spec:
    """A parsed `--db` value; `str()` gives it back as written."""

    kind: str  # file | lake | parquet
    path: Path

    def __str__(self) -> str:
        return str(self.path) if self.kind == "file" else f"{self.kind}:{self.path}"

    @property
    def catalog(self) -> Path:
        """A lake's catalog file."""
        return self.path / LAKE_CATALOG

    @property
    def data(self) -> Path:
        """A lake's data folder."""
        return self.path / "data"

    def exists(self) -> bool:
        """Whether a warehouse of this kind is there (nothing is created)."""
        if self.kind == "file":
            return self.path.is_file()
        if self.kind == "lake":
            return self.catalog.is_file()
        return (self.path / PARQUET_META).is_file()


def parse_spec(db) -> Spec:
    """`PATH`, `lake:PATH` or `parquet:DIR` (a Spec passes through); anything else with a
    scheme (`s3:`, `duckdb:`) is refused, naming the three forms."""
    if isinstance(db, Spec):
        return db
    if isinstance(db, os.PathLike):
        return Spec("file", Path(db))
    text = str(db)
    if not text.strip():
        raise WarehouseError("--db is empty: give a file path, lake:PATH or parquet:DIR")
    m = _SCHEME.match(text)
    if m and not Path(text).exists():
        scheme, rest = m.group(1), m.group(2)
        if scheme not in ("lake", "parquet"):
            raise WarehouseError(f"--db {text}: unknown storage {scheme + ':'!r}; use a DuckDB "
                                 "file path, lake:PATH or parquet:DIR")
        if not rest.strip():
            raise WarehouseError(f"--db {text}: no path after {scheme}:")
        return Spec(scheme, Path(rest))
    return Spec("file", Path(text))


def check_folder_target(spec: Spec) -> Spec:
    """A lake or a Parquet folder can be written there: the folder is one of this kind, or new
    (or empty) in a folder we may write. Checked before anything is written."""
    path = spec.path
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and not path.is_dir():
        raise WarehouseError(f"--db {spec}: {path} is a file, not a folder")
    if path.is_dir():
        if not spec.exists() and any(path.iterdir()):
            kind = "DuckLake catalog" if spec.kind == "lake" else "actwh Parquet folder"
            raise WarehouseError(f"--db {spec}: {path} is not empty and holds no {kind}")
        where = path
    else:
        if not parent.is_dir():
            raise WarehouseError(f"--db {spec}: no folder {parent}")
        where = parent
    if not os.access(where, os.W_OK | os.X_OK):
        raise WarehouseError(f"--db {spec}: cannot write {where}: permission denied")
    if spec.kind == "lake":
        lake_extension()
    return spec


def check_target(db) -> Spec:
    """Where a populate can write: a file (`connection.check_writable`), a lake or a folder."""
    from actwh.warehouse.connection import check_writable

    spec = parse_spec(db)
    if spec.kind == "file":
        check_writable(spec.path)
        return spec
    return check_folder_target(spec)


def lake_extension() -> str:
    """The DuckLake extension file (the `lake` extra: duckdb-extension-ducklake, built for
    exactly this duckdb), loaded by path: nothing is downloaded."""
    import duckdb

    try:
        import duckdb_extension_ducklake as pkg
    except ImportError:
        raise WarehouseError("a lake needs the DuckLake extension: pip install 'actwh[lake]' "
                             "(duckdb-extension-ducklake)") from None
    found = sorted(Path(pkg.__file__).parent.glob("extensions/*/ducklake.duckdb_extension"))
    wanted = [f for f in found if f.parent.name == f"v{duckdb.__version__}"]
    if not wanted:
        raise WarehouseError(f"the DuckLake extension installed is built for "
                             f"{', '.join(f.parent.name for f in found) or 'no'} duckdb, this is "
                             f"duckdb {duckdb.__version__}: pip install 'actwh[lake]'")
    return str(wanted[0])
