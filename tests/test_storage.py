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


def BatchCommitter_for_folder(tmp_path):
    from actwh.compute.scalars import SCALARS
    from actwh.warehouse.shards import BatchCommitter, FolderWriter

    FolderWriter(f"parquet:{tmp_path / 'f'}", NODE_TYPES, tuple(SCALARS))
    return BatchCommitter.from_spec(f"parquet:{tmp_path / 'f'}", 1)


def test_a_batch_committed_twice_is_refused_in_the_commit(tmp_path):
    """The batch id is the batch's smallest prompt id; a second commit of it is refused inside
    the transaction (not by a lookup beforehand), whether the file already holds it or the same
    commit carries it twice, and nothing of the refused commit lands."""
    from actwh.compute.scalars import SCALARS
    from actwh.warehouse.store import BatchAlreadyCommitted, WarehouseWriter

    db = tmp_path / "w.duckdb"
    writer = WarehouseWriter(db, NODE_TYPES, tuple(SCALARS), group_seconds=3600)
    assert writer.append_batch(1, _batch(1, [5, 3, 9])) == 3
    with pytest.raises(BatchAlreadyCommitted, match="batch 3 of run 1 is already committed"):
        writer.append_batch(1, _batch(1, [3, 4]))  # the same batch id: refused
    assert writer.append_batch(2, _batch(2, [3])) == 3  # another run: its own batch 3
    writer.queue_batch(1, _batch(1, [0, 1]))
    writer.queue_batch(1, _batch(1, [0]))  # held: both go in one commit, which is refused
    assert writer.held == 2
    with pytest.raises(BatchAlreadyCommitted, match="batch 0 of run 1"):
        writer.flush()
    writer.discard()
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT run_id, batch_id, n_prompts FROM batches ORDER BY ALL").fetchall() == [
        (1, 3, 3), (2, 3, 1)]
    assert con.execute("SELECT run_id, prompt_id FROM prompts ORDER BY ALL").fetchall() == [
        (1, 3), (1, 5), (1, 9), (2, 3)]
    con.close()
    extra = {"prompts": _batch(1, [])["prompts"]}  # rows for prompts already written
    assert [writer.append_batch(1, extra), writer.append_batch(1, extra)] == [-1, -2]
    with pytest.raises(WarehouseError, match="at least one prompts row"):
        BatchCommitter_for_folder(tmp_path).commit({"prompts": _batch(1, [])["prompts"]})


# -- three storages: a DuckDB file, a lake, a Parquet folder -----------------------------------

STORES = ("file", "lake", "parquet")
TABLE_KEYS = {  # every table a populate writes, its columns in a fixed order, the volatile left out
    "models": "* EXCLUDE (config), config::VARCHAR",
    "runs": "* EXCLUDE (created_at, finished_at, options), options::VARCHAR, finished_at IS NULL",
    "prompts": "*", "tokens": "*", "edges": "* EXCLUDE (up_type, down_type, down_input), "
    "up_type::VARCHAR, down_type::VARCHAR, down_input::VARCHAR",
    "node_scalars": "* EXCLUDE (node_type, scalar), node_type::VARCHAR, scalar::VARCHAR",
    "pair_scalars": "* EXCLUDE (scalar), scalar::VARCHAR",
    "batches": "* EXCLUDE (written_at)",
}


VOLATILE = ("created_at", "finished_at", "written_at")


def spec_of(kind, root):
    return {"file": str(root / "wh.duckdb"), "lake": f"lake:{root / 'lake'}",
            "parquet": f"parquet:{root / 'shards'}"}[kind]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, gpt2_dir):
    """One populate (3 batches, edges, both padding-relevant lengths) into each storage."""
    from actwh.runner import EdgeOptions, PopulateOptions, populate

    root = tmp_path_factory.mktemp("stores")
    prompts = write_prompts(root / "p.jsonl")
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=2,
                           edges=EdgeOptions(select="top-k:12"),
                           scalars=("mlp_act_times_grad", "attn_act_times_grad", "attn_pattern"))
    results = {k: populate(spec_of(k, root), opts, progress=False) for k in STORES}
    return root, opts, results


def plain_rows(kind, root, table):
    """A table's rows read without actwh's reader: DuckDB on the file, DuckDB attaching the
    lake's catalog, pyarrow on every Parquet file of the folder (a clean run leaves no orphan)."""
    import pyarrow.parquet as pq

    from actwh.warehouse.spec import lake_extension

    con = duckdb.connect()
    if kind == "file":
        con.execute(f"ATTACH '{root / 'wh.duckdb'}' AS w (READ_ONLY)")
        src = f"w.{table}"
    elif kind == "lake":
        con.execute(f"LOAD '{lake_extension()}'")
        con.execute(f"ATTACH 'ducklake:{root / 'lake' / 'catalog.ducklake'}' AS w (READ_ONLY)")
        src = f"w.{table}"
    else:
        folder = root / "shards" / ("data/" + table if table not in ("runs", "models") else table)
        con.register("t", pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]))
        src = "t"
    rows = con.execute(f"SELECT {TABLE_KEYS[table]} FROM {src} ORDER BY ALL").fetchall()
    con.close()
    return rows


def test_three_storages_hold_the_same_rows(stores):
    root, _, results = stores
    assert {k: (r.status, r.n_written) for k, r in results.items()} == {
        k: ("complete", 6) for k in STORES}
    for table in TABLE_KEYS:
        rows = {k: plain_rows(k, root, table) for k in STORES}
        assert rows["file"], table
        assert rows["lake"] == rows["file"], table
        assert rows["parquet"] == rows["file"], table
    # batch ids: each batch's smallest prompt id (lengths sort the 6 prompts into 3 batches)
    batches = plain_rows("file", root, "batches")
    prompts = plain_rows("file", root, "prompts")
    assert sum(b[2] for b in batches) == len(prompts) == 6 and len(batches) == 3
    assert {b[1] for b in batches} <= {p[1] for p in prompts}


def test_readers_see_the_same_tables_views_queries_and_circuits(stores):
    """Every saved query (parameters filled for run 1, prompt 0), the views, and circuits by
    each method return the same frames from the three storages."""
    from actwh.queries.circuit import find_circuit
    from actwh.queries.loader import Queries
    from actwh.warehouse import Warehouse

    root, _, _ = stores
    whs = {k: Warehouse(spec_of(k, root)) for k in STORES}
    fill = dict(run=1, prompt=0, layer=1, head=2, node_type="attn_head", node_index=1,
                scalar="attn_act_times_grad", scalars=["attn_act_times_grad"], run_a=1, run_b=1)
    compared = 0
    for q in Queries():
        args = {p: fill[p] for p, d in q.params if p in fill}
        if any(p not in args and d is inspect_empty() for p, d in q.params):
            continue
        out = {}
        for k, wh in whs.items():
            try:
                df = q(wh, **args)
                out[k] = df.drop([c for c in VOLATILE if c in df.columns]).sort(
                    [c for c in df.columns if c not in VOLATILE])
            except WarehouseError as e:
                out[k] = str(e).replace(str(wh.path), "WH")
        for k in ("lake", "parquet"):
            same = out[k] == out["file"] if isinstance(out[k], str) else out[k].equals(out["file"])
            assert same, (q.name, k, out[k], out["file"])
        compared += not isinstance(out["file"], str) and out["file"].height > 0
    assert compared >= 12
    for table in (*TABLE_KEYS, "saes", "actwh_meta", "circuits"):  # same names, same types
        described = [whs[k].sql(f"DESCRIBE {table}").select("column_name", "column_type")
                     .rows() for k in STORES]
        assert described[1] == described[0] and described[2] == described[0], table
    ordered = [whs[k].sql("SELECT DISTINCT node_type FROM node_scalars ORDER BY node_type")
               ["node_type"].cast(str).to_list() for k in STORES]  # ENUM order, not alphabetical
    assert ordered[0] == [t for t in NODE_TYPES if t in ordered[0]] == ordered[1] == ordered[2]
    for view in ("nodes", "pairs", "edges_labeled"):
        frames = [whs[k].sql(f"SELECT * FROM {view}") for k in STORES]
        frames = [f.sort(f.columns) for f in frames]
        assert frames[0].height and frames[1].equals(frames[0]) and frames[2].equals(frames[0]), view
    for method, kw in (("influence", {}), ("top-n", {"n": 5}), ("threshold", {"value": 0.05})):
        found = [find_circuit(whs[k], 1, 3, method, **kw) for k in STORES]
        edges = [c.edges.sort(c.edges.columns) for c in found]
        assert edges[0].height > 0, method
        assert edges[1].equals(edges[0]) and edges[2].equals(edges[0]), method
        assert found[1].to_dot() == found[0].to_dot() == found[2].to_dot()


def inspect_empty():
    import inspect

    return inspect.Parameter.empty


def test_readers_of_a_lake_and_a_folder_cannot_write(stores):
    """The reader's connection reads registered Arrow, never a file: COPY TO, even into the
    lake's own data folder, and reading other files are refused; nothing appears."""
    from actwh.warehouse import Warehouse

    root, _, _ = stores
    for kind, target in (("lake", root / "lake" / "data" / "x.parquet"),
                         ("parquet", root / "shards" / "data" / "prompts" / "x.parquet")):
        wh = Warehouse(spec_of(kind, root))
        for attack in (f"COPY (SELECT 1 AS a) TO '{target}'", "SELECT * FROM read_csv('/etc/hostname')",
                       "SELECT * FROM read_parquet('" + str(target.parent) + "/*.parquet')"):
            with pytest.raises(WarehouseError, match="refused|disabled"):
                wh.sql(attack)
        assert not target.exists()


def test_ingest_twice_equals_once_and_equals_the_file(stores, tmp_path):
    from actwh.warehouse.ingest import ingest

    root, _, _ = stores
    for kind in ("lake", "parquet"):
        db = tmp_path / f"{kind}.duckdb"
        first = ingest(spec_of(kind, root), db, NODE_TYPES)
        assert first["prompts"] == 6 and first["runs"] == 1 and first["node_scalars"] > 0
        again = ingest(spec_of(kind, root), db, NODE_TYPES)
        assert set(again.values()) == {0}, again
        for table in TABLE_KEYS:
            con = duckdb.connect(str(db), read_only=True)
            got = con.execute(f"SELECT {TABLE_KEYS[table]} FROM {table} ORDER BY ALL").fetchall()
            con.close()
            assert got == plain_rows("file", root, table), (kind, table)
            if table == "runs":  # the run row is the source's own, not a copy's
                assert got == plain_rows(kind, root, table)


def test_a_failed_ingest_writes_nothing_and_a_clashing_run_is_refused(stores, tmp_path, monkeypatch):
    import actwh.warehouse.ingest as ingest_mod

    root, _, _ = stores
    db = tmp_path / "i.duckdb"
    monkeypatch.setitem(ingest_mod.COPY_SQL, "edges", "INSERT INTO edges SELECT * FROM no_such_table")
    with pytest.raises(WarehouseError, match="nothing was ingested from lake:"):
        ingest_mod.ingest(spec_of("lake", root), db, NODE_TYPES)
    con = duckdb.connect(str(db), read_only=True)
    assert [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("runs", "models", "prompts", "node_scalars", "batches")] == [0] * 5
    con.close()
    monkeypatch.undo()
    # the DuckDB file's own run 1 is another run than the lake's run 1 (made later)
    other = tmp_path / "other.duckdb"
    import shutil

    shutil.copy(root / "wh.duckdb", other)
    with pytest.raises(WarehouseError, match="run_id 1 of lake:.* is another run than run_id 1"):
        ingest_mod.ingest(spec_of("lake", root), other, NODE_TYPES)


# -- exactly once on a lake and a folder; workers commit from a spec string ---------------------

COMMIT_ONE = """
import sys, pyarrow as pa
from actwh.warehouse.shards import BatchCommitter
from actwh.warehouse.writer import BatchAlreadyCommitted
c = BatchCommitter.from_spec(sys.argv[1], 1, wait_s=60)
tables = {{"prompts": pa.table({{"run_id": pa.array([1, 1], pa.int32()),
                                "prompt_id": pa.array([{p}, {p} + 1], pa.int32()),
                                "text": ["x", "y"], "n_tokens": pa.array([1, 1], pa.int32())}})}}
try:
    print("committed", c.commit(tables))
except BatchAlreadyCommitted as e:
    print("refused", e.batch_id)
"""


@pytest.mark.parametrize("kind", ["lake", "parquet"])
def test_a_batch_is_committed_once_by_racing_workers(stores, tmp_path, kind):
    """Three processes, given only the spec string and the run id, commit the same new batch
    (prompts 100, 101) at once: one commits it, the others are refused, the batch is in once;
    then a batch the populate committed is refused too, and a refused commit leaves no file."""
    import shutil

    root, _, _ = stores
    src = root / ("lake" if kind == "lake" else "shards")
    where = tmp_path / src.name
    shutil.copytree(src, where)  # a copied lake reads and writes its own data folder
    spec = f"{kind}:{where}"
    files_before = sorted(p.name for p in where.rglob("*") if p.is_file())
    procs = [subprocess.Popen([sys.executable, "-c", COMMIT_ONE.format(p=100), spec],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["committed 100", "refused 100", "refused 100"], outs
    from actwh.warehouse import Warehouse

    wh = Warehouse(spec)
    assert wh.sql("SELECT prompt_id, count(*) AS n FROM prompts WHERE prompt_id >= 100 "
                  "GROUP BY ALL ORDER BY 1").rows() == [(100, 1), (101, 1)]
    assert wh.sql("SELECT count(*) AS n FROM batches WHERE batch_id = 100")["n"][0] == 1
    first = wh.sql("SELECT min(batch_id) AS b FROM batches WHERE run_id = 1")["b"][0]
    files_mid = sorted(p.name for p in where.rglob("*") if p.is_file())
    out = subprocess.run([sys.executable, "-c", COMMIT_ONE.format(p=first), spec],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"refused {first}"
    if kind == "parquet":  # the refused commits' data files are gone again
        assert sorted(p.name for p in where.rglob("*") if p.is_file()) == files_mid
        assert len(files_mid) == len(files_before) + 3  # prompts, batches, manifest entry


def test_bad_specs_fail_in_one_line_before_anything_is_written(tmp_path, gpt2_dir):
    from click.testing import CliRunner

    from actwh.cli.main import cli

    prompts = write_prompts(tmp_path / "p.jsonl")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cases = [
        (["populate", str(prompts), "--db", "s3:bucket/x"], "unknown storage 's3:'"),
        (["populate", str(prompts), "--db", "lake:"], "no path after lake:"),
        (["populate", str(prompts), "--db", f"parquet:{tmp_path / 'a_file'}"], "is a file, not a folder"),
        (["populate", str(prompts), "--db", f"parquet:{tmp_path / 'foreign'}"],
         "is not empty and holds no actwh Parquet folder"),
        (["populate", str(prompts), "--db", f"lake:{tmp_path / 'no' / 'lake'}"], "no folder"),
        (["populate", str(prompts), "--db", f"parquet:{tmp_path / 'x'}", "--scalars", "nope"],
         "nope"),
        (["sql", "SELECT 1", "--db", f"parquet:{tmp_path / 'none'}"], "no warehouse at parquet:"),
        (["ingest", f"lake:{tmp_path / 'none'}", "--db", str(tmp_path / "i.duckdb")],
         "no warehouse at lake:"),
        (["ingest", str(tmp_path / "a_file"), "--db", str(tmp_path / "i.duckdb")],
         "not a DuckDB file"),
        (["ingest", f"lake:{tmp_path / 'none'}", "--db", f"parquet:{tmp_path / 'y'}"],
         "ingest writes a DuckDB file"),
        (["runs", "--delete", "1", "--db", f"parquet:{tmp_path / 'foreign'}"], "no warehouse at"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(cli, [*args, "--model", str(gpt2_dir)] if args[0] == "populate" else args)
        assert r.exit_code == 1, (args, r.output)
        assert r.output.startswith("Error: ") and r.output.count("\n") == 1, (args, r.output)
        assert message in r.output, (args, r.output)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, args


def test_writing_commands_refuse_a_lake_or_folder(stores):
    """runs --delete (and every other command that writes a DuckDB file) names ingest."""
    from click.testing import CliRunner

    from actwh.cli.main import cli

    root, _, _ = stores
    r = CliRunner().invoke(cli, ["runs", "--delete", "1", "--db", spec_of("parquet", root)])
    assert r.exit_code == 1 and "actwh ingest" in r.output and r.output.count("\n") == 1, r.output


@pytest.mark.parametrize("kind", ["lake", "parquet"])
def test_a_killed_run_resumes_into_a_lake_or_folder(stores, tmp_path, monkeypatch, kind):
    """A populate stopped after its first batch resumes (`resume=RUN_ID`) with exactly the
    missing prompts: the rows equal the uninterrupted run's."""
    import actwh.runner as runner_mod
    from actwh.runner import populate

    root, opts, _ = stores
    spec = spec_of(kind, tmp_path)
    real, calls = runner_mod.compute_batch, []

    def compute(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner_mod, "compute_batch", compute)
    with pytest.raises(KeyboardInterrupt):
        populate(spec, opts, progress=False)
    monkeypatch.undo()
    result = populate(spec, resume=1, progress=False)
    assert (result.status, result.n_written) == ("complete", 4)
    for table in ("prompts", "node_scalars", "pair_scalars", "edges", "batches"):
        assert plain_rows(kind, tmp_path, table) == plain_rows("file", root, table), table
