"""actwh: an activation warehouse for transformer interpretability.

What a notebook needs, from one import (each name is imported on first use, so `import actwh`
stays cheap and the CLI pays for torch only in commands that run a model):

    import actwh
    loaded = actwh.load_model()                           # the default model, or a folder
    batch = actwh.Batch.from_text(loaded, ["When Mary and John ..."], targets=[" Mary"])
    res = actwh.compute_scalars(loaded.model, batch, "logit", ["mlp_act_times_grad"])
    run = actwh.populate("actwh.duckdb", actwh.PopulateOptions(prompts="prompts.jsonl"))
    wh = actwh.Warehouse("actwh.duckdb")
    actwh.q.top_nodes(wh, run=run.run_id, prompt=0)      # saved queries, as Polars DataFrames

The root package holds only what bridges or serves the four subpackages (`compute`,
`warehouse`, `queries`, `cli`): `errors`, `ontology` (node types, codes, labels), `runner`
(populate), `ray_engine` (populate's compute on a Ray cluster), `rows` (compute results as
warehouse rows) and this facade.
"""

from __future__ import annotations

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "load_model": ("actwh.compute.loading", "load_model"),
    "example_prompts": ("actwh.compute.default_model", "default_prompts"),
    "Batch": ("actwh.compute.targets", "Batch"),
    "TARGETS": ("actwh.compute.targets", "TARGETS"),
    "SCALARS": ("actwh.compute.scalars", "SCALARS"),
    "compute_scalars": ("actwh.compute.scalars", "compute_scalars"),
    "Selection": ("actwh.compute.selection", "Selection"),
    "component_edges": ("actwh.compute.edges", "component_edges"),
    "node_edges": ("actwh.compute.node_edges", "node_edges"),
    "Down": ("actwh.compute.node_edges", "Down"),
    "top_downstream": ("actwh.compute.node_edges", "top_downstream"),
    "load_sae": ("actwh.compute.sae", "load_sae"),
    "splice": ("actwh.compute.sae", "splice"),
    "populate": ("actwh.runner", "populate"),
    "PopulateOptions": ("actwh.runner", "PopulateOptions"),
    "EdgeOptions": ("actwh.runner", "EdgeOptions"),
    "RayEngine": ("actwh.ray_engine", "RayEngine"),
    "Warehouse": ("actwh.warehouse", "Warehouse"),
    "q": ("actwh.queries", "q"),
    "find_circuit": ("actwh.queries.circuit", "find_circuit"),
    "node_label": ("actwh.ontology", "node_label"),
    "NODE_TYPES": ("actwh.ontology", "NODE_TYPES"),
    "ActwhError": ("actwh.errors", "ActwhError"),
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actwh' has no attribute {name!r}")
    import importlib

    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # imported once
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
