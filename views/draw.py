"""SVG and HTML drawings, built in Python so the browser pages, the standalone files and the
notebook objects show one and the same picture.

Circuit: layers as rows (embeddings at the bottom, the target at the top), the prompt's tokens as
columns when positions are kept (nodes summed over positions sit in a last "Σ" column; with no
position kept, each row's nodes are spread evenly); node area by influence (circuit-tracer's, when
the influence method computed it; else the summed |value| of the node's edges in the circuit);
edge colour by sign (blue positive, red negative) and width by |value|. Every drawn node and edge
carries its key and exact value as data attributes, so tests and scripts can read the picture.
"""

from __future__ import annotations

import math
from collections import defaultdict
from html import escape

from actwh.views.data import CircuitPicture, edge_key, node_key

POS, NEG = "#2166ac", "#b2182b"
TYPE_FILL = {"embed": "#9e9e9e", "attn_head": "#f4a261", "mlp": "#2a9d8f", "mlp_neuron": "#2a9d8f",
             "sae_latent": "#8e7cc3", "sae_error": "#cfcfcf", "logit": "#e9c46a", "resid": "#bbbbbb"}
SLOT, ROW_H, LEFT, TOP, BOTTOM = 30, 78, 64, 24, 64

STYLE = """
.actwh-pic { font: 12px system-ui, sans-serif; color: #222; }
.actwh-pic svg text { font: 10px system-ui, sans-serif; fill: #333; }
.actwh-pic .node { cursor: pointer; }
.actwh-pic .node circle { stroke: #333; stroke-width: 0.8; }
.actwh-pic .node.selected circle { stroke: #000; stroke-width: 3; }
.actwh-pic .edge { fill: none; stroke-opacity: 0.65; }
.actwh-pic .edge.only { stroke-dasharray: 5 3; stroke-opacity: 0.95; }
.actwh-pic .tok { padding: 2px 3px; margin: 1px; border-radius: 3px; display: inline-block;
  border: 1px solid #ddd; white-space: pre; }
.actwh-pic table { border-collapse: collapse; }
.actwh-pic td, .actwh-pic th { padding: 2px 6px; border-bottom: 1px solid #eee; text-align: left; }
"""


def fmt(v) -> str:
    return "" if v is None else f"{v:.4g}"


def _num(v) -> str:
    """The exact value, for data attributes."""
    return "" if v is None else repr(float(v))


def _short(r: dict) -> str:
    lab = r["label"]
    return lab.split("@")[0]


def node_sizes(pic: CircuitPicture) -> dict[str, float]:
    nodes = pic.circuit.nodes
    if "influence" in nodes.columns:
        return {node_key(r["layer"], r["node_type"], r["node_index"], r["pos"]): abs(r["influence"] or 0.0)
                for r in nodes.iter_rows(named=True)}
    size: dict[str, float] = defaultdict(float)
    for e in pic.circuit.edges.iter_rows(named=True):
        size[node_key(e["up_layer"], e["up_type"], e["up_index"], e["up_pos"])] += abs(e["value"])
        size[node_key(e["down_layer"], e["down_type"], e["down_index"], e["down_pos"])] += abs(e["value"])
    return size


def layout(pic: CircuitPicture) -> tuple[dict[str, tuple[float, float]], dict]:
    """x, y of every node, and the frame (width, height, row and column labels)."""
    nodes = pic.circuit.nodes.to_dicts()
    layers = sorted({n["layer"] for n in nodes})
    row_y = {lay: TOP + (len(layers) - 1 - i) * ROW_H + ROW_H / 2 for i, lay in enumerate(layers)}
    kept = any(n["pos"] is not None for n in nodes)
    xy: dict[str, tuple[float, float]] = {}
    cols: list[tuple[float, str]] = []
    order = lambda n: (n["node_type"], n["node_index"])  # noqa: E731
    if kept:
        n_tok = len(pic.tokens)
        summed = any(n["pos"] is None for n in nodes)
        cells: dict = defaultdict(list)
        for n in nodes:
            cells[(n["layer"], n_tok if n["pos"] is None else n["pos"])].append(n)
        x = LEFT
        for c in range(n_tok + (1 if summed else 0)):
            width = max([len(cells[(lay, c)]) for lay in layers] + [1]) * SLOT
            cols.append((x + width / 2, pic.tokens[c] if c < n_tok else "Σ"))
            for lay in layers:
                group = sorted(cells[(lay, c)], key=order)
                start = x + (width - len(group) * SLOT) / 2 + SLOT / 2
                for i, n in enumerate(group):
                    xy[node_key(n["layer"], n["node_type"], n["node_index"], n["pos"])] = (
                        start + i * SLOT, row_y[lay])
            x += width
        width = x + 16
    else:
        rows: dict = defaultdict(list)
        for n in nodes:
            rows[n["layer"]].append(n)
        widest = max([len(v) for v in rows.values()] + [1]) * SLOT * 1.6
        for lay, group in rows.items():
            group.sort(key=order)
            step = widest / len(group)
            for i, n in enumerate(group):
                xy[node_key(n["layer"], n["node_type"], n["node_index"], n["pos"])] = (
                    LEFT + step * (i + 0.5), row_y[lay])
        width = LEFT + widest + 16
    height = TOP + len(layers) * ROW_H + (BOTTOM if kept else 12)
    return xy, {"width": width, "height": height, "row_y": row_y, "cols": cols, "kept": kept,
                "n_layers": pic.n_layers}


def _layer_name(layer: int, n_layers) -> str:
    if layer == -1:
        return "emb"
    if n_layers is not None and layer == n_layers:
        return "target"
    return f"L{layer}"


def circuit_svg(pic: CircuitPicture, only: set[str] | frozenset = frozenset(),
                standalone: bool = False) -> str:
    """The circuit as one <svg>: a <g class="node"> per node and a <path class="edge"> per edge."""
    xy, frame = layout(pic)
    sizes = node_sizes(pic)
    biggest = max(sizes.values(), default=0.0) or 1.0
    edges = pic.circuit.edges.to_dicts()
    top = max((abs(e["value"]) for e in edges), default=0.0) or 1.0
    w, h = frame["width"], frame["height"]
    out = [f'<svg class="circuit" xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" '
           f'height="{h:.0f}" viewBox="0 0 {w:.0f} {h:.0f}" data-nodes="{pic.n_nodes}" '
           f'data-edges="{pic.n_edges}">']
    if standalone:
        out.append("<style>text{font:10px sans-serif;fill:#333}.edge{fill:none}</style>")
    out.append('<rect width="100%" height="100%" fill="white"/>')
    for lay, y in frame["row_y"].items():
        out.append(f'<text class="row" x="4" y="{y + 3:.1f}">{_layer_name(lay, frame["n_layers"])}</text>'
                   f'<line x1="{LEFT - 6}" x2="{w - 8:.0f}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="#eee"/>')
    base = TOP + len(frame["row_y"]) * ROW_H + 10
    for x, tok in frame["cols"]:
        out.append(f'<text class="col" transform="translate({x:.1f},{base:.0f}) rotate(35)">'
                   f'{escape(tok)}</text>')
    for e in edges:
        up = node_key(e["up_layer"], e["up_type"], e["up_index"], e["up_pos"])
        down = node_key(e["down_layer"], e["down_type"], e["down_index"], e["down_pos"])
        (x1, y1), (x2, y2) = xy[up], xy[down]
        k = edge_key(e)
        width = 0.6 + 5.0 * abs(e["value"]) / top
        mid = (y1 + y2) / 2
        inp = e.get("down_input") or ""
        title = f'{e["up_label"]} → {e["down_label"]}{"." + inp if inp else ""}: {fmt(e["value"])}'
        cls = "edge only" if k in only else "edge"
        out.append(f'<path class="{cls}" data-key="{escape(k)}" data-up="{escape(up)}" '
                   f'data-down="{escape(down)}" data-input="{inp}" data-value="{_num(e["value"])}" '
                   f'd="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}" '
                   f'stroke="{POS if e["value"] >= 0 else NEG}" stroke-width="{width:.2f}" '
                   f'fill="none"><title>{escape(title)}</title></path>')
    for n in pic.circuit.nodes.iter_rows(named=True):
        key = node_key(n["layer"], n["node_type"], n["node_index"], n["pos"])
        x, y = xy[key]
        size = sizes.get(key, 0.0)
        r = 3.5 + 9.0 * math.sqrt(size / biggest)
        infl = n.get("influence")
        title = f'{n["label"]} ({n["node_type"]}); ' + (
            f"influence {fmt(infl)}" if infl is not None else f"Σ|edge| in circuit {fmt(size)}")
        pos = "" if n["pos"] is None else n["pos"]
        out.append(f'<g class="node" data-key="{escape(key)}" data-layer="{n["layer"]}" '
                   f'data-type="{n["node_type"]}" data-index="{n["node_index"]}" data-pos="{pos}" '
                   f'data-label="{escape(n["label"])}" data-size="{_num(size)}">'
                   f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" '
                   f'fill="{TYPE_FILL.get(n["node_type"], "#ccc")}" stroke="#333"/>'
                   f'<text x="{x:.1f}" y="{y - r - 2:.1f}" text-anchor="middle">{escape(_short(n))}</text>'
                   f'<title>{escape(title)}</title></g>')
    out.append("</svg>")
    return "".join(out)


def _blend(v: float, top: float) -> str:
    """Blue for positive, red for negative, white at zero."""
    t = 0.0 if not top else max(-1.0, min(1.0, v / top))
    base = (33, 102, 172) if t >= 0 else (178, 24, 43)
    a = abs(t)
    r, g, b = (round(255 + (c - 255) * a) for c in base)
    return f"rgb({r},{g},{b})"


def heatmap_svg(att: dict) -> str:
    """One head's pattern: a <rect class="cell"> per stored (query, key) pair."""
    toks = att["tokens"]
    n = len(toks)
    cell = 22 if n <= 40 else max(6, 880 // n)
    margin = 110
    size = margin + n * cell + 10
    cells = att["cells"]
    signed = cells.height and cells["value"].min() < 0
    top = float(cells["value"].abs().max() or 1.0) if cells.height else 1.0
    out = [f'<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
           f'data-cells="{cells.height}">', '<rect width="100%" height="100%" fill="white"/>']
    for i, t in enumerate(toks):
        y = margin + i * cell + cell * 0.7
        out.append(f'<text x="{margin - 4}" y="{y:.1f}" text-anchor="end">{escape(t)} {i}</text>')
        x = margin + i * cell + cell * 0.6
        out.append(f'<text transform="translate({x:.1f},{margin - 4}) rotate(-60)">{i} {escape(t)}</text>')
    for r in cells.iter_rows(named=True):
        q, k, v = r["query_pos"], r["key_pos"], r["value"]
        fill = _blend(v, top) if signed else _blend(v, 1.0 if top <= 1.0 else top)
        out.append(f'<rect class="cell" x="{margin + k * cell}" y="{margin + q * cell}" '
                   f'width="{cell - 1}" height="{cell - 1}" fill="{fill}" data-q="{q}" data-k="{k}" '
                   f'data-value="{_num(v)}"><title>query {q} {escape(toks[q])} → key {k} '
                   f'{escape(toks[k])}: {fmt(v)}</title></rect>')
    out.append("</svg>")
    return "".join(out)


def tokens_html(tv: dict) -> str:
    """The prompt's tokens, each coloured by the scalar's value at its position."""
    rows = tv["rows"]
    vals = [v for v in rows["value"].to_list() if v is not None]
    top = max((abs(v) for v in vals), default=0.0) or 1.0
    out = ['<div class="tokens">']
    for r in rows.iter_rows(named=True):
        v = r["value"]
        colour = "#fff" if v is None else _blend(v, top)
        title = f'position {r["position"]}: {fmt(v) if v is not None else "no stored value"}'
        out.append(f'<span class="tok" data-pos="{r["position"]}" data-value="{_num(v)}" '
                   f'style="background:{colour}" title="{escape(title)}">{escape(r["token"])}</span>')
    out.append("</div>")
    return "".join(out)


def sql_block(shown, open_: bool = False) -> str:
    """The queries behind a picture, one click away (<details>)."""
    parts = [f'<details class="sql"{" open" if open_ else ""}><summary>SQL that produced these '
             f'numbers ({len(shown)} quer{"y" if len(shown) == 1 else "ies"})</summary>']
    for s in shown:
        params = ", ".join(f"${k} = {v!r}" for k, v in s.params.items())
        parts.append(f'<div class="q"><b>{escape(s.name)}</b> <code>{escape(params)}</code>'
                     f'<pre>{escape(s.sql)}</pre></div>')
    parts.append("</details>")
    return "".join(parts)
