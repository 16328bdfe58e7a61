"""Opening the DuckDB file: locks, retries, read-only readers, errors in one line, transactions.

DuckDB lets one process write or many read, never both, so nobody holds the file for long:
readers open it read-only per query and retry briefly when a writer holds it; writers retry too
(`connect(..., wait_s=None)` waits for ever), and a lock becomes `WarehouseLocked` naming the
holder (pid and program when DuckDB tells).

Readers cannot write or read other files: every read-only connection is opened with DuckDB's
`enable_external_access = false` (COPY ... TO, EXPORT DATABASE, ATTACH, INSTALL, LOAD and the
file-reading table functions are refused, and SQL cannot turn it back on), and the views and
macros the package defines are recreated per connection as temporary objects from the package's
own views.sql, shadowing whatever the file holds under those names.

Durability (measured on DuckDB here): after an error inside a transaction a later COMMIT can
return normally and roll everything back, and several statements sent as one string are not
atomic. So writes are one explicit BEGIN ... COMMIT of single statements (`transaction`), and
writers read their bookkeeping back afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from actwh.errors import WarehouseError
from actwh.warehouse.ddl import SCHEMA_VERSION

log = logging.getLogger("actwh.warehouse")
VIEWS_SQL = Path(__file__).with_name("views.sql")
LOCK_RE = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")
READER_CONFIG = {"enable_external_access": False}
CORRUPT_MARKS = ("not a valid DuckDB", "Corrupt database file", "Could not read enough bytes",
                 "checksum")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE = re.compile(r"^[A-Z][A-Z ]*$")


def _ddl(template: str, **names: str) -> str:
    """DDL naming schema objects (never user values): identifiers checked, then formatted."""
    for n in names.values():
        if not _IDENT.match(n):
            raise WarehouseError(f"not an identifier: {n!r}")
    return template.format(**names)


def _compose(template: str, **pieces: str) -> str:
    """A statement assembled from pieces this package built out of checked identifiers
    (`_ident`, `_ddl`) and the schema's own column types: never from a user's value."""
    return template.format(**pieces)


def _type(kind: str) -> str:
    """A column type as schema.sql writes it (`INTEGER`, `TIMESTAMP WITHOUT TIME ZONE`, an
    ENUM's name), checked before it is formatted into SQL."""
    if not (_TYPE.match(kind) or _IDENT.match(kind)):
        raise WarehouseError(f"not a column type: {kind!r}")
    return kind


def _ident(name: str) -> str:
    """A schema object's name (never a user value), checked before it is formatted into SQL."""
    if not _IDENT.match(name):
        raise WarehouseError(f"not an identifier: {name!r}")
    return name


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class WarehouseLocked(WarehouseError):
    """Another process holds the file; `holder` says which (pid and program when DuckDB tells)."""

    def __init__(self, path, holder: str):
        self.holder = holder
        super().__init__(f"{path} is locked by {holder}")


def _is_lock_error(e: Exception) -> bool:
    """DuckDB's own lock message; a corrupted file's "block ..." messages are not locks."""
    text = str(e)
    return "Could not set lock on file" in text or "Conflicting lock" in text


def _holder(e: Exception) -> str:
    m = LOCK_RE.search(str(e))
    if not (m and m.group(2)):
        return "another process"
    pid = m.group(2)
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        cmd = m.group(1)
    return f"process {pid} ({cmd[:80]})" if cmd else f"process {pid}"


def _open(path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """One attempt; a lock becomes WarehouseLocked, anything else a one-line WarehouseError."""
    try:
        if read_only:
            return duckdb.connect(str(path), read_only=True, config=READER_CONFIG)
        return duckdb.connect(str(path))
    except duckdb.Error as e:
        if _is_lock_error(e):
            raise WarehouseLocked(path, _holder(e)) from None
        first = str(e).splitlines()[0]
        if any(m in first for m in CORRUPT_MARKS):
            raise WarehouseError(one_line(e, path)) from None
        raise WarehouseError(f"cannot open {path}: {first}") from None



def connect(path: str | os.PathLike, read_only: bool, wait_s: float | None = 10.0,
            on_wait=None) -> duckdb.DuckDBPyConnection:
    """Open the file, retrying while another process holds a conflicting lock (for ever when
    wait_s is None). A reader's connection cannot touch other files and sees the package's views."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    delay, told = 0.02, False
    while True:
        try:
            con = _open(path, read_only)
            break
        except WarehouseLocked as e:
            if deadline is not None and time.monotonic() >= deadline:
                raise WarehouseLocked(path, e.holder) from None
            if on_wait is not None and not told:
                on_wait(f"waiting for {e.holder}, which holds {path}")
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    if read_only:
        try:
            package_views(con)
        except BaseException:
            con.close()
            raise
    return con


def package_views(con, temporary: bool = True) -> None:
    """The package's views and macros (views.sql); as temporary objects they shadow the file's."""
    for statement in VIEWS_SQL.read_text().split(";\n"):
        statement = "\n".join(l for l in statement.splitlines() if not l.lstrip().startswith("--"))
        if not statement.strip():
            continue
        if temporary:
            statement = re.sub(r"CREATE\s+OR\s+REPLACE\s+(MACRO|VIEW|FUNCTION)",
                               r"CREATE OR REPLACE TEMP \1", statement, count=1, flags=re.I)
        try:
            con.execute(statement)
        except duckdb.Error as e:
            if temporary:  # an older file may lack a column a view names: that view stays out
                log.debug("view not recreated: %s", str(e).splitlines()[0])
                continue
            raise


def check_writable(path: str | os.PathLike) -> Path:
    """Where a warehouse can be written: an existing folder we may write, not a folder itself."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise WarehouseError(f"--db {path} is a folder, not a warehouse file")
    if not parent.is_dir():
        raise WarehouseError(f"cannot write {path}: no folder {parent}")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise WarehouseError(f"cannot write {path}: permission denied")
    return path


@contextmanager
def interruptible(con):
    """Ctrl-C interrupts a running query (DuckDB does not see Python's signal on its own)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def stop(signum, frame):
        con.interrupt()

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_STRIP = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.S)
_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def check_params(query: str, params: dict) -> None:
    """Every `$name` the SQL uses is given, and nothing else (DuckDB's own messages do not name them)."""
    if not query.strip().rstrip(";").strip():
        raise WarehouseError("empty query")
    used = set(_PARAM.findall(_STRIP.sub(" ", query)))
    missing = sorted(used - set(params))
    if missing:
        raise WarehouseError(f"the query uses ${missing[0]} but no value was given "
                             f"(-p {missing[0]}=VALUE)")
    extra = sorted(set(params) - used)
    if extra:
        raise WarehouseError(f"parameter {extra[0]!r} is not used by the query "
                             f"(it uses {', '.join('$' + u for u in sorted(used)) or 'none'})")


def one_line(e: Exception, path=None) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if path is not None and any(m in text for m in CORRUPT_MARKS):
        return f"{path} is corrupted or not a DuckDB file: {text}"
    if "file system operations are disabled" in text or "external" in text.lower() and "disabled" in text:
        return f"refused: a read-only command cannot read or write other files ({text})"
    return text


def check_version(con, path) -> None:
    try:
        row = con.execute("SELECT value FROM actwh_meta WHERE key = 'schema_version'").fetchone()
    except duckdb.CatalogException:
        raise WarehouseError(f"{path} is not an actwh warehouse (no actwh_meta table)") from None
    except duckdb.Error as e:
        raise WarehouseError(one_line(e, path)) from None
    found = row[0] if row else None
    try:
        version = int(found)
    except (TypeError, ValueError):
        version = None
    if version != SCHEMA_VERSION:
        raise WarehouseError(f"{path} has schema version {found if found is not None else 'none'}; "
                             f"this actwh reads version {SCHEMA_VERSION}")



@contextmanager
def transaction(con, failed=None):
    """One explicit BEGIN ... COMMIT on `con`. On any exception: ROLLBACK (a failed rollback
    is ignored: the transaction is gone either way) and re-raise; a DuckDB error becomes
    `WarehouseError(failed(e))` when `failed` is given (a one-line message saying what was
    not done)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException as e:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass
        if failed is not None and isinstance(e, duckdb.Error):
            raise WarehouseError(failed(e)) from None
        raise


def read_run(con, run_id: int, path) -> dict:
    cur = con.execute("SELECT * FROM runs WHERE run_id = $run", {"run": run_id})
    row = cur.fetchone()
    if row is None:
        ids = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY 1").fetchall()]
        raise WarehouseError(f"no run {run_id} in {path}; runs: {', '.join(map(str, ids)) or 'none'}")
    cols = [d[0] for d in cur.description]
    out = dict(zip(cols, row))
    out["options"] = json.loads(out["options"])
    return out
