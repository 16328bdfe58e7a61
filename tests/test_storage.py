"""Storage: the stored DDL is SQLAlchemy's, the populate path stays light, batches are exactly once."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pyarrow as pa
import pytest

from actwh.errors import WarehouseError
from actwh.ontology import NODE_TYPES
from tests.conftest import write_prompts


def test_schema_sql_is_what_sqlalchemy_compiles():
    from actwh.warehouse.ddl import SCHEMA_SQL
    from actwh.warehouse.schema import compiled_ddl

    assert SCHEMA_SQL.read_text() == compiled_ddl(), "run: python -m actwh.warehouse.schema"


def test_file_made_from_schema_sql_equals_one_made_by_sqlalchemy(tmp_path):
    """Same tables, columns, types, nullability, keys and ENUM values either way."""
    import sqlalchemy as sa

    from actwh.compute.scalars import SCALARS
    from actwh.warehouse.migrate import create_file
    from actwh.warehouse.schema import build_metadata

    create_file(tmp_path / "a.duckdb", NODE_TYPES, tuple(SCALARS))
    engine = sa.create_engine(f"duckdb:///{tmp_path / 'b.duckdb'}")
    build_metadata(NODE_TYPES, tuple(SCALARS)).create_all(engine)
    engine.dispose()
    shape = []
    for name in ("a", "b"):
        con = duckdb.connect(str(tmp_path / f"{name}.duckdb"), read_only=True)
        shape.append((
            con.execute("SELECT table_name, column_name, data_type, is_nullable FROM "
                        "information_schema.columns WHERE table_name IN (SELECT table_name FROM "
                        "duckdb_tables()) ORDER BY ALL").fetchall(),
            con.execute("SELECT table_name, constraint_text FROM duckdb_constraints() "
                        "WHERE constraint_type = 'PRIMARY KEY' ORDER BY ALL").fetchall()))
        con.close()
    assert shape[0] == shape[1]
    assert ("node_scalars", "scalar", f"ENUM({', '.join(repr(s) for s in SCALARS)})", "NO") in shape[0][0]


def test_populate_imports_neither_polars_nor_sqlalchemy(tmp_path, gpt2_dir):
    """A populate into a new file and a second one into the same file (the writer's on-open
    migration) in a fresh process: neither Polars nor SQLAlchemy (nor its DuckDB dialect) loads."""
    prompts = write_prompts(tmp_path / "p.jsonl")
    code = (f"import sys; from actwh.runner import populate, PopulateOptions; "
            f"o = PopulateOptions(prompts={str(prompts)!r}, model={str(gpt2_dir)!r}, batch_size=3); "
            f"r = [populate({str(tmp_path / 'w.duckdb')!r}, o, progress=False).status for _ in range(2)]; "
            f"print(r, sorted(m for m in ('polars', 'sqlalchemy', 'duckdb_sqlalchemy') "
            f"if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['complete', 'complete'] []", out.stdout + out.stderr


def _batch(run_id, prompt_ids):
    return {"prompts": pa.table({"run_id": pa.array([run_id] * len(prompt_ids), pa.int32()),
                                 "prompt_id": pa.array(prompt_ids, pa.int32()),
                                 "text": [f"p{p}" for p in prompt_ids],
                                 "n_tokens": pa.array([1] * len(prompt_ids), pa.int32())})}


def test_a_batch_committed_twice_is_refused_in_the_commit(tmp_path):
    """The batch id is the batch's smallest prompt id; a second commit of it is refused inside
    the transaction (not by a lookup beforehand), whether the file already holds it or the same
    commit carries it twice, and nothing of the refused commit lands."""
    from actwh.compute.scalars import SCALARS
    from actwh.warehouse.store import BatchAlreadyCommitted, WarehouseWriter

    db = tmp_path / "w.duckdb"
    writer = WarehouseWriter(db, NODE_TYPES, tuple(SCALARS))
    assert writer.append_batch(1, _batch(1, [5, 3, 9])) == 3
    with pytest.raises(BatchAlreadyCommitted, match="batch 3 of run 1 is already committed"):
        writer.append_batch(1, _batch(1, [3, 4]))  # the same batch id: refused
    assert writer.append_batch(2, _batch(2, [3])) == 3  # another run: its own batch 3
    writer.queue_batch(1, _batch(1, [0, 1]))
    writer.queue_batch(1, _batch(1, [0]))
    with pytest.raises(BatchAlreadyCommitted, match="batch 0 of run 1"):
        writer.flush()
    writer.discard()
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT run_id, batch_id, n_prompts FROM batches ORDER BY ALL").fetchall() == [
        (1, 3, 3), (2, 3, 1)]
    assert con.execute("SELECT run_id, prompt_id FROM prompts ORDER BY ALL").fetchall() == [
        (1, 3), (1, 5), (1, 9), (2, 3)]
    con.close()
    with pytest.raises(WarehouseError, match="at least one prompts row"):
        writer.append_batch(1, {"prompts": _batch(1, [])["prompts"]})
