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

SCHEMA_VERSION = 1


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
    return md


BIG_TABLES = ("node_scalars", "pair_scalars", "edges")
