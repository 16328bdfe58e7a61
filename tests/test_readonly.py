"""Read-only means read-only: no reader writes, reads or deletes another file, and the views a
reader sees are the package's own, whatever a warehouse received from someone else holds."""

from __future__ import annotations

import hashlib
import os
import shutil

import duckdb
import pytest
from click.testing import CliRunner

from actwh.cli.main import cli
from actwh.errors import WarehouseError
from actwh.warehouse.store import Warehouse

from conftest import write_prompts


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wh_file(tmp_path_factory, gpt2_dir):
    tmp = tmp_path_factory.mktemp("ro")
    prompts = write_prompts(tmp / "p.jsonl")
    db = tmp / "wh.duckdb"
    r = CliRunner().invoke(cli, ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db),
                                 "--edges", "--top", "0"])
    assert r.exit_code == 0, r.output
    (tmp / "secret.csv").write_text("password\nhunter2\n")
    return tmp, db


def statements(tmp, db):
    out = tmp / "out"
    link = tmp / "hardlink.duckdb"
    if not link.exists():
        os.link(db, link)  # the same file under another name: ATTACH ... READ_WRITE would delete through it
    return {
        "copy_to": f"COPY runs TO '{out}.csv'",
        "copy_query_to": f"COPY (SELECT * FROM prompts) TO '{out}.parquet' (FORMAT parquet)",
        "export_database": f"EXPORT DATABASE '{out}'",
        "attach_read_write": f"ATTACH '{link}' AS w (READ_WRITE)",
        "attach_new": f"ATTACH '{tmp / 'new.duckdb'}' AS n",
        "install": "INSTALL httpfs",
        "load": "LOAD httpfs",
        "read_text": f"SELECT * FROM read_text('{tmp / 'secret.csv'}')",
        "read_csv": f"SELECT * FROM read_csv('{tmp / 'secret.csv'}')",
        "read_csv_auto": f"SELECT * FROM '{tmp / 'secret.csv'}'",
        "glob": f"SELECT * FROM glob('{tmp}/*')",
        "set_back_on": "SET enable_external_access = true",
    }


@pytest.mark.parametrize("case", [
    "copy_to", "copy_query_to", "export_database", "attach_read_write", "attach_new", "install",
    "load", "read_text", "read_csv", "read_csv_auto", "glob", "set_back_on"])
def test_sql_cannot_touch_other_files(wh_file, case):
    tmp, db = wh_file
    sql = statements(tmp, db)[case]
    before = digest(db)
    listing = sorted(p.name for p in tmp.iterdir())
    r = CliRunner().invoke(cli, ["sql", sql, "--db", str(db)])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "hunter2" not in r.output
    if case != "set_back_on":
        assert "read-only command cannot read or write other files" in lines[0], lines[0]
    else:
        assert "Cannot enable external access" in lines[0]
    assert digest(db) == before
    assert sorted(p.name for p in tmp.iterdir()) == listing  # nothing written, nothing deleted
    with pytest.raises(WarehouseError):  # the Python reader is the same
        Warehouse(db).sql(sql)


def hostile_copy(tmp, db):
    """A warehouse from someone else: its views and macro read the reader's files, and `edges`
    is no longer a table but a view over a local file."""
    bad = tmp / "hostile.duckdb"
    shutil.copy(db, bad)
    con = duckdb.connect(str(bad))
    secret = tmp / "secret.csv"
    con.execute(f"CREATE OR REPLACE VIEW nodes AS SELECT *, (SELECT content FROM read_text('{secret}')) "
                f"AS leak FROM node_scalars")
    con.execute(f"CREATE OR REPLACE MACRO node_label(layer, node_type, node_index) AS "
                f"(SELECT content FROM read_text('{secret}'))")
    con.execute(f"CREATE VIEW leak AS SELECT * FROM read_csv('{secret}')")
    con.execute("CREATE TABLE edges_real AS SELECT * FROM edges")
    con.execute("DROP TABLE edges")
    con.execute(f"CREATE VIEW edges AS SELECT e.*, s.password FROM edges_real e, read_csv('{secret}') s")
    con.close()
    return bad


def test_views_come_from_the_package_not_the_file(wh_file):
    tmp, db = wh_file
    bad = hostile_copy(tmp, db)
    runner = CliRunner()
    honest = runner.invoke(cli, ["query", "top_nodes", "-p", "run=1", "-p", "prompt=0", "--db", str(db),
                                 "--format", "csv"])
    hostile = runner.invoke(cli, ["query", "top_nodes", "-p", "run=1", "-p", "prompt=0", "--db", str(bad),
                                  "--format", "csv"])
    assert honest.exit_code == 0 and hostile.exit_code == 0, hostile.output
    assert hostile.output == honest.output and "hunter2" not in hostile.output
    r = runner.invoke(cli, ["sql", "SELECT DISTINCT node_label(layer, node_type, node_index) AS l FROM "
                                   "node_scalars ORDER BY l LIMIT 3", "--db", str(bad), "--format", "csv"])
    assert r.exit_code == 0 and "hunter2" not in r.output and r.output.splitlines()[1].startswith("L")
    # A view of the file's own that reads a local file is refused, through sql and circuits alike.
    for argv in (["sql", "SELECT * FROM leak"], ["circuit", "1", "0"], ["query", "top_edges", "-p", "run=1",
                                                                         "-p", "prompt=0"]):
        r = runner.invoke(cli, [*argv, "--db", str(bad)])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, (argv, r.output)
        assert "cannot read or write other files" in r.output and "hunter2" not in r.output


def test_export_writes_through_its_own_path_only(wh_file, tmp_path):
    import polars as pl

    _, db = wh_file
    before = digest(db)
    r = CliRunner().invoke(cli, ["export", "1", str(tmp_path / "x"), "--db", str(db)])
    assert r.exit_code == 0, r.output
    with Warehouse(db) as wh:
        n = wh.sql("SELECT count(*) AS n FROM edges WHERE run_id = 1")["n"][0]
    assert n > 0 and pl.read_parquet(tmp_path / "x" / "edges.parquet").height == n
    assert digest(db) == before
