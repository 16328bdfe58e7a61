"""Standalone circuit files: HTML and SVG pictures, and circuit-tracer's graph JSON.

The circuit-tracer file follows the format its viewer (and Neuronpedia's) reads, as defined by
`circuit_tracer.frontend.graph_models.Model` in circuit-tracer 0.5.0: `metadata`, `qParams`,
`nodes` and `links`. Mapping from actwh's nodes:

- embed → `feature_type "embedding"`, layer "E", id `E_{token id}_{pos}` (their convention);
- logit → `"logit"`, layer = actwh's logit layer + 1 (their n_layers + 1), id `{layer}_{index}_{pos}`,
  `is_target_logit` true; the clerp carries `(p=0)` because the viewer parses a probability from it
  and actwh stores none;
- sae_latent → `"cross layer transcoder"`, id `{layer}_{index}_{pos}` (their feature convention);
- sae_error → `"mlp reconstruction error"`, id `0_{layer}_{pos}`;
- attn_head, mlp_neuron, mlp, resid (no circuit-tracer counterpart) → `"cross layer transcoder"`
  nodes whose feature number encodes the type (type code × 10⁷ + index), so ids stay unique, with
  actwh's label as the clerp.

Nodes summed over positions get ctx_idx = the last position and `sum` in place of the position in
their id. Every node also carries an `actwh` object (layer, node_type, node_index, pos), and every
link its `down_input` (q/k/v) when it has one, so nothing of the circuit is lost.
"""

from __future__ import annotations

import json

from actwh.views import data as D
from actwh.views import draw

FORMATS = ("html", "svg", "circuit-tracer")
TYPE_CODE = {"sae_latent": 0, "attn_head": 1, "mlp_neuron": 2, "mlp": 3, "resid": 4}


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def ct_node(n: dict, pic: D.CircuitPicture) -> dict:
    layer, kind, index, pos = n["layer"], n["node_type"], n["node_index"], n["pos"]
    last = max(len(pic.tokens) - 1, 0)
    ctx = last if pos is None else pos
    p = "sum" if pos is None else str(pos)
    infl = n.get("influence")
    common = {"ctx_idx": ctx, "influence": None if infl is None else float(infl),
              "actwh": {"layer": layer, "node_type": kind, "node_index": index, "pos": pos,
                        "label": n["label"]}}
    if kind == "embed":
        tok = pic.token_ids[pos] if pos is not None and pos < len(pic.token_ids) else "all"
        return {**common, "node_id": f"E_{tok}_{p}", "feature": ctx, "layer": "E",
                "feature_type": "embedding", "jsNodeId": f"E_{tok}-{p}", "clerp": n["label"]}
    if kind == "logit":
        lay = str(layer + 1)
        return {**common, "node_id": f"{lay}_{index}_{p}", "feature": index, "layer": lay,
                "feature_type": "logit", "is_target_logit": True, "token_prob": 0.0,
                "jsNodeId": f"L_{index}-{p}",
                "clerp": f"Output {index}: the run's target (p=0) [actwh stores no probability]"}
    if kind == "sae_error":
        return {**common, "node_id": f"0_{layer}_{p}", "feature": -1, "layer": str(layer),
                "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_{p}-0",
                "clerp": n["label"]}
    feat = TYPE_CODE.get(kind, 9) * 10_000_000 + index
    return {**common, "node_id": f"{layer}_{feat}_{p}", "feature": _cantor(max(layer, 0), feat),
            "layer": str(layer), "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{feat}-0", "clerp": f"{n['label']} ({kind})"}


def to_circuit_tracer(pic: D.CircuitPicture, scan: str = "actwh") -> dict:
    """circuit-tracer's graph JSON (`Model`) for one circuit: every node and edge kept."""
    nodes = [ct_node(n, pic) for n in pic.circuit.nodes.iter_rows(named=True)]
    by_key = {D.node_key(**{k: n["actwh"][k] for k in D.NODE_KEY}): n["node_id"] for n in nodes}
    links = []
    for e in pic.circuit.edges.iter_rows(named=True):
        link = {"source": by_key[D.node_key(e["up_layer"], e["up_type"], e["up_index"], e["up_pos"])],
                "target": by_key[D.node_key(e["down_layer"], e["down_type"], e["down_index"], e["down_pos"])],
                "weight": float(e["value"])}
        if e.get("down_input"):
            link["down_input"] = e["down_input"]
        links.append(link)
    slug = f"actwh-run{pic.run}-prompt{pic.prompt}-{pic.method}"
    return {
        "metadata": {"slug": slug, "scan": scan, "transcoder_list": [],
                     "prompt_tokens": list(pic.tokens), "prompt": pic.text,
                     "node_threshold": pic.settings["node_threshold"] if pic.method == "influence" else None,
                     "schema_version": 1,
                     "actwh": {"run": pic.run, "prompt": pic.prompt, "method": pic.method,
                               **pic.settings}},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


def render_circuit(pic: D.CircuitPicture, fmt: str, shown=()) -> str:
    if fmt == "svg":
        return draw.circuit_svg(pic, standalone=True) + "\n"
    if fmt == "html":
        from actwh.views import Picture, circuit_title

        return Picture(circuit_title(pic), f'<div class="drawing">{draw.circuit_svg(pic)}</div>',
                       shown).html()
    if fmt == "circuit-tracer":
        return json.dumps(to_circuit_tracer(pic), indent=1) + "\n"
    raise D.BadParameter(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def write_circuit(db, run: int, prompt: int, fmt: str, output=None, **circuit_args) -> D.CircuitPicture:
    """`actwh circuit ... --format html|svg|circuit-tracer`: the file, or stdout without OUTPUT."""
    if fmt not in FORMATS:
        raise D.BadParameter(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    with D.reading(db) as wh:
        f = D.Fetcher(wh)
        pic = D.circuit(f, run, prompt, **circuit_args)
    text = render_circuit(pic, fmt, f.shown)
    if output is None:
        import sys

        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    return pic
