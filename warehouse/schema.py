"""The warehouse schema: SQLAlchemy Core metadata, the single source of truth for every table.

The DDL comes from here through the DuckDB SQLAlchemy dialect. The big tables (node_scalars,
pair_scalars, edges) have no key and no index: WAL replay of indexes is DuckDB's most-reported
crash bug, a key made ingest 4.6× slower and storage 5.5× larger when measured here, and rows
are written sorted by (run_id, prompt_id, ...) so zone maps prune prompt lookups. Uniqueness
holds by construction (a prompt's rows land in one transaction with its `prompts` row).

The ENUM value lists are the ontology's names: node types and scalars are passed in by whoever
creates the file (the runner, from `actwh.ontology` and the scalar registry), `down_input`'s
come from `actwh.ontology`, which is dependency-free, so this module needs nothing from compute.
"""

from __future__ import annotations

import sqlalchemy as sa

from actwh.ontology import DOWN_INPUTS

from actwh.warehouse.ddl import BIG_TABLES, PLACEHOLDERS, SCHEMA_SQL, SCHEMA_VERSION  # noqa: F401


def build_metadata(node_types: tuple[str, ...], scalars: tuple[str, ...]) -> sa.MetaData:
    md = sa.MetaData()
    node_type = sa.Enum(*node_types, name="node_type")
    scalar = sa.Enum(*scalars, name="scalar")
    down_input = sa.Enum(*DOWN_INPUTS, name="down_input")
    integer_key = dict(primary_key=True, autoincrement=False)

    sa.Table("actwh_meta", md,
             sa.Column("key", sa.String, primary_key=True),
             sa.Column("value", sa.String, nullable=False))
    sa.Table("models", md,
             sa.Column("model_id", sa.Integer, **integer_key),
             sa.Column("name", sa.String, nullable=False),
             sa.Column("source", sa.String, nullable=False),
             sa.Column("weights_sha256", sa.String, nullable=False),
             sa.Column("arch", sa.String, nullable=False),
             *(sa.Column(c, sa.Integer, nullable=False) for c in
               ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx")),
             sa.Column("config", sa.JSON, nullable=False))
    sa.Table("saes", md,
             sa.Column("sae_id", sa.Integer, **integer_key),
             sa.Column("model_id", sa.Integer, nullable=False),
             sa.Column("site", sa.String, nullable=False),
             sa.Column("d_in", sa.Integer, nullable=False),
             sa.Column("d_sae", sa.Integer, nullable=False),
             sa.Column("source", sa.String, nullable=False),
             sa.Column("weights_sha256", sa.String, nullable=False),
             sa.Column("config", sa.JSON, nullable=False))
    sa.Table("runs", md,
             sa.Column("run_id", sa.Integer, **integer_key),
             sa.Column("model_id", sa.Integer, nullable=False),
             sa.Column("name", sa.String),
             sa.Column("created_at", sa.DateTime, nullable=False),
             sa.Column("finished_at", sa.DateTime),
             sa.Column("status", sa.String, nullable=False),  # running | complete
             sa.Column("target", sa.String, nullable=False),
             sa.Column("scalars", sa.String, nullable=False),  # comma-separated, request order
             sa.Column("selection", sa.String, nullable=False),
             sa.Column("code_version", sa.String, nullable=False),
             sa.Column("device", sa.String, nullable=False),
             sa.Column("dtype", sa.String, nullable=False),
             sa.Column("n_prompts", sa.Integer, nullable=False),
             sa.Column("options", sa.JSON, nullable=False))  # prompts file, batching, provenance
    sa.Table("prompts", md,
             sa.Column("run_id", sa.Integer, primary_key=True),
             sa.Column("prompt_id", sa.Integer, primary_key=True),
             sa.Column("text", sa.String, nullable=False),
             sa.Column("n_tokens", sa.Integer, nullable=False),
             sa.Column("target_token_id", sa.Integer),
             sa.Column("distractor_token_id", sa.Integer),
             sa.Column("target_token", sa.String),  # the target's text: logit nodes' labels
             sa.Column("metric", sa.Float),
             sa.Column("loss", sa.Float),
             sa.Column("corrupt_metric", sa.Float),  # the target on the corrupted prompt
             sa.Column("edges_to_target", sa.Float))  # Σ of all edges into the target
    sa.Table("batches", md,  # one row per committed batch: what a write is checked against
             sa.Column("run_id", sa.Integer, primary_key=True),
             sa.Column("batch_id", sa.Integer, primary_key=True),
             sa.Column("n_prompts", sa.Integer, nullable=False),
             sa.Column("n_node_rows", sa.BigInteger, nullable=False),
             sa.Column("n_pair_rows", sa.BigInteger, nullable=False),
             sa.Column("n_edge_rows", sa.BigInteger, nullable=False),
             sa.Column("written_at", sa.DateTime, nullable=False))
    sa.Table("tokens", md,
             sa.Column("run_id", sa.Integer, nullable=False),
             sa.Column("prompt_id", sa.Integer, nullable=False),
             sa.Column("position", sa.Integer, nullable=False),
             sa.Column("token_id", sa.Integer, nullable=False),
             sa.Column("token", sa.String, nullable=False))
    sa.Table("node_scalars", md,
             sa.Column("run_id", sa.Integer, nullable=False),
             sa.Column("prompt_id", sa.Integer, nullable=False),
             sa.Column("position", sa.Integer, nullable=False),
             sa.Column("layer", sa.SmallInteger, nullable=False),
             sa.Column("node_type", node_type, nullable=False),
             sa.Column("node_index", sa.Integer, nullable=False),
             sa.Column("scalar", scalar, nullable=False),
             sa.Column("value", sa.REAL, nullable=False))
    sa.Table("pair_scalars", md,
             sa.Column("run_id", sa.Integer, nullable=False),
             sa.Column("prompt_id", sa.Integer, nullable=False),
             sa.Column("layer", sa.SmallInteger, nullable=False),
             sa.Column("head", sa.SmallInteger, nullable=False),
             sa.Column("query_pos", sa.Integer, nullable=False),
             sa.Column("key_pos", sa.Integer, nullable=False),
             sa.Column("scalar", scalar, nullable=False),
             sa.Column("value", sa.REAL, nullable=False))
    sa.Table("edges", md,
             sa.Column("run_id", sa.Integer, nullable=False),
             sa.Column("prompt_id", sa.Integer, nullable=False),
             sa.Column("up_layer", sa.SmallInteger, nullable=False),
             sa.Column("up_type", node_type, nullable=False),
             sa.Column("up_index", sa.Integer, nullable=False),
             sa.Column("up_pos", sa.Integer),  # NULL: summed over positions
             sa.Column("down_layer", sa.SmallInteger, nullable=False),
             sa.Column("down_type", node_type, nullable=False),
             sa.Column("down_index", sa.Integer, nullable=False),
             sa.Column("down_pos", sa.Integer),  # NULL: summed over positions
             sa.Column("down_input", down_input),  # q, k or v for attention heads, else NULL
             sa.Column("value", sa.REAL, nullable=False))
    add_eval_tables(md)
    return md


def add_eval_tables(md: sa.MetaData) -> sa.MetaData:
    """Circuit evaluations (`actwh evaluate`, `actwh verify`) and stored circuits (`actwh circuit`).

    No ENUMs, so `create_missing_tables` can add them to a file made before they existed.
    `evaluations` holds each evaluation's provenance (its options as JSON); `circuit_evals` one
    row per prompt and circuit: the patched metric and the faithfulness (patched − baseline) /
    (clean − baseline), with the empty circuit (selection 'none') and the full graph ('all') as
    the curve's end points."""
    sa.Table("evaluations", md,
             sa.Column("eval_id", sa.Integer, primary_key=True, autoincrement=False),
             sa.Column("run_id", sa.Integer, nullable=False),
             sa.Column("created_at", sa.DateTime, nullable=False),
             sa.Column("code_version", sa.String, nullable=False),
             sa.Column("options", sa.JSON, nullable=False))
    sa.Table("circuit_evals", md,
             sa.Column("eval_id", sa.Integer, nullable=False),
             sa.Column("run_id", sa.Integer, nullable=False),
             sa.Column("prompt_id", sa.Integer, nullable=False),
             sa.Column("method", sa.String, nullable=False),  # influence | top-n | threshold | circuit
             sa.Column("selection", sa.String, nullable=False),  # e.g. top-n:20, none, all
             sa.Column("n_edges", sa.Integer, nullable=False),
             sa.Column("n_nodes", sa.Integer, nullable=False),
             sa.Column("baseline", sa.String, nullable=False),  # corrupt | zero | mean
             sa.Column("metric", sa.Float, nullable=False),
             sa.Column("faithfulness", sa.Float))  # NULL when clean = baseline
    sa.Table("node_effects", md,  # actwh verify --nodes: one row per measured node
             sa.Column("eval_id", sa.Integer, nullable=False),
             sa.Column("run_id", sa.Integer, nullable=False),
             sa.Column("prompt_id", sa.Integer, nullable=False),
             sa.Column("position", sa.Integer, nullable=False),
             sa.Column("layer", sa.Integer, nullable=False),
             sa.Column("node_type", sa.String, nullable=False),
             sa.Column("node_index", sa.Integer, nullable=False),
             sa.Column("scalar", sa.String, nullable=False),  # the prediction's scalar
             sa.Column("baseline", sa.String, nullable=False),
             sa.Column("predicted", sa.Float, nullable=False),
             sa.Column("measured", sa.Float, nullable=False))  # clean − patched metric
    sa.Table("edge_effects", md,  # actwh verify --edges: one row per measured edge
             sa.Column("eval_id", sa.Integer, nullable=False),
             sa.Column("run_id", sa.Integer, nullable=False),
             sa.Column("prompt_id", sa.Integer, nullable=False),
             *(sa.Column(c, t, nullable=n) for c, t, n in (
                 ("up_layer", sa.Integer, False), ("up_type", sa.String, False),
                 ("up_index", sa.Integer, False), ("down_layer", sa.Integer, False),
                 ("down_type", sa.String, False), ("down_index", sa.Integer, False),
                 ("down_input", sa.String, True))),
             sa.Column("method", sa.String, nullable=False),  # the run's edge method (EAP, EAP-IG)
             sa.Column("baseline", sa.String, nullable=False),
             sa.Column("predicted", sa.Float, nullable=False),
             sa.Column("measured", sa.Float, nullable=False))
    sa.Table("circuits", md,  # actwh circuit --save: stored circuits, read by id
             sa.Column("circuit_id", sa.Integer, primary_key=True, autoincrement=False),
             sa.Column("run_id", sa.Integer, nullable=False),
             sa.Column("method", sa.String, nullable=False),  # threshold | top-n | influence
             sa.Column("params", sa.JSON, nullable=False),  # thresholds, n
             sa.Column("prompts", sa.JSON, nullable=False),  # the prompt ids averaged over
             sa.Column("n_edges", sa.Integer, nullable=False),
             sa.Column("n_nodes", sa.Integer, nullable=False),
             sa.Column("nodes", sa.JSON, nullable=False),  # [{layer, node_type, node_index}]
             sa.Column("edges", sa.JSON, nullable=False),  # [{up_*, down_*, down_input, value}]
             sa.Column("created_at", sa.DateTime, nullable=False))
    return md


EVAL_TABLES = ("evaluations", "circuit_evals", "node_effects", "edge_effects", "circuits")


def create_missing_tables(con) -> None:
    """Create the evaluation tables in an older warehouse (a DuckDB connection open for
    writing); idempotent."""
    from sqlalchemy.schema import CreateTable

    try:
        from duckdb_sqlalchemy import Dialect as dialect_cls
    except ImportError:  # pragma: no cover - older dialect package layouts
        from sqlalchemy.dialects.postgresql import dialect as dialect_cls
    md = add_eval_tables(sa.MetaData())
    for name in EVAL_TABLES:
        ddl = str(CreateTable(md.tables[name], if_not_exists=True).compile(dialect=dialect_cls()))
        con.execute(ddl)


def compiled_ddl() -> str:
    """The DDL `create_all` runs, through the DuckDB dialect, ENUM lists as placeholders: what
    `schema.sql` holds (writers use that file, so populating never imports SQLAlchemy)."""
    out = []
    engine = sa.create_mock_engine("duckdb://", lambda sql, *a, **k: out.append(
        str(sql.compile(dialect=engine.dialect)).strip()))
    build_metadata((PLACEHOLDERS["node_type"],), (PLACEHOLDERS["scalar"],)).create_all(
        engine, checkfirst=False)
    return "".join(s + ";\n\n" for s in out)


if __name__ == "__main__":  # python -m actwh.warehouse.schema: rewrite schema.sql
    SCHEMA_SQL.write_text(compiled_ddl())
