"""The ontology's codes and node labels: the one table compute, the runner and the warehouse share.

Dependency-free on purpose (no torch, no DuckDB), so both sides of the layering import it:
compute writes codes that index these tuples, the warehouse builds its ENUM types from them and
its `node_label` SQL macro from `node_label_sql()`, and Python labels come from `node_label()`.
A new node type is one entry in `NODE_TYPES` (and, for a readable name, one in `LABELS`).
"""

from __future__ import annotations

# The `node_type` column's values, in code order (Arrow dictionary codes index this tuple).
NODE_TYPES = ("embed", "attn_head", "mlp", "mlp_neuron", "sae_latent", "sae_error", "logit",
              "mlp_expert")
# The `down_input` column's values: which input of an attention head an edge enters.
DOWN_INPUTS = ("q", "k", "v")

# the pieces a label is made of, besides text
LAYER, INDEX, TOKEN, NODE_TYPE = object(), object(), object(), object()
# node type -> its label's pieces: `L3H5`, `L2N117`, `L1.mlp`, `emb`, `logit:"Mary"`.
LABELS = {
    "embed": ("emb",),
    "attn_head": ("L", LAYER, "H", INDEX),
    "mlp": ("L", LAYER, ".mlp"),
    "mlp_neuron": ("L", LAYER, "N", INDEX),
    "mlp_expert": ("L", LAYER, "E", INDEX),
    "sae_latent": ("L", LAYER, "F", INDEX),
    "sae_error": ("L", LAYER, ".err"),
    # the target: its token's text when known, else its vocabulary id (none for the loss)
    "logit": ("logit", TOKEN),
}


FALLBACK = (NODE_TYPE, LAYER, "_", INDEX)  # a type without an entry: `mlp_expert2_5`


def node_label(layer: int, node_type: str, index: int, token: str | None = None) -> str:
    """A node's readable name; `token` is the text of the target token (logit nodes only)."""
    out = []
    for piece in LABELS.get(node_type, FALLBACK):
        if piece is NODE_TYPE:
            out.append(node_type)
        elif piece is LAYER:
            out.append(str(layer))
        elif piece is INDEX:
            out.append(str(index))
        elif piece is TOKEN:
            out.append(f':"{token}"' if token is not None else str(index) if index >= 0 else "")
        else:
            out.append(piece)
    return "".join(out)


def _sql_text(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def node_label_sql() -> str:
    """`CREATE OR REPLACE MACRO node_label(layer, node_type, node_index, token := NULL)`, the
    SQL twin of `node_label`, generated from the same table."""
    pieces = {NODE_TYPE: "CAST(node_type AS VARCHAR)", LAYER: "CAST(layer AS VARCHAR)", INDEX: "CAST(node_index AS VARCHAR)",
              TOKEN: "coalesce(':\"' || token || '\"', CASE WHEN node_index >= 0 "
                     "THEN CAST(node_index AS VARCHAR) ELSE '' END)"}

    def concat(parts) -> str:
        return " || ".join(pieces[p] if p in pieces else _sql_text(p) for p in parts)

    whens = "".join(f"\n        WHEN {_sql_text(t)} THEN {concat(parts)}" for t, parts in LABELS.items())
    return ("CREATE OR REPLACE MACRO node_label(layer, node_type, node_index, token := NULL) AS\n"
            f"    CASE CAST(node_type AS VARCHAR){whens}\n        ELSE {concat(FALLBACK)}\n    END")
