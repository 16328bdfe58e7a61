"""Pictures of what the warehouse holds: circuits, attention patterns and token attributions.

In a notebook (no server needed), each returns an object that renders inline:

    from actwh import views
    views.circuit("actwh.duckdb", run=1, prompt=0)            # or a Warehouse
    views.attention(wh, 1, 0, layer=2, head=1)
    views.tokens(wh, 1, 0, scalar="token_attribution")

`actwh view` serves the same drawings as a local web app (`actwh.views.server`), and
`actwh circuit ... --format html|svg|circuit-tracer` writes them to a file. Everything here reads
the warehouse through saved queries (queries/*.sql), read-only; nothing writes.
"""

from __future__ import annotations

from html import escape

from actwh.views import data as _data
from actwh.views import draw as _draw


class Picture:
    """A drawing that renders inline in Jupyter (`_repr_html_`) and can be saved as HTML."""

    def __init__(self, title: str, body: str, shown, svg: str | None = None, info: dict | None = None):
        self.title, self.body, self.shown, self.svg, self.info = title, body, shown, svg, info or {}

    def _repr_html_(self) -> str:
        return (f'<div class="actwh-pic"><style>{_draw.STYLE}</style><b>{escape(self.title)}</b>'
                f'{self.body}{_draw.sql_block(self.shown)}</div>')

    def html(self) -> str:
        """A standalone HTML document (no script, no external file)."""
        return (f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(self.title)}'
                f'</title></head><body>{self._repr_html_()}</body></html>\n')

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.svg if str(path).endswith(".svg") and self.svg else self.html())

    def __repr__(self) -> str:
        return f"<actwh picture: {self.title}>"


def circuit_title(pic) -> str:
    return (f"run {pic.run} prompt {pic.prompt}: {pic.method} circuit, {pic.n_nodes} nodes, "
            f"{pic.n_edges} edges")


def circuit(wh, run: int, prompt: int, method: str = "influence", value: float | None = None,
            n: int = 50, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Picture:
    """The circuit `actwh circuit` finds (same method and thresholds), drawn as layers × tokens."""
    with _data.reading(wh) as w:
        f = _data.Fetcher(w)
        pic = _data.circuit(f, run, prompt, method, value, n, node_threshold, edge_threshold)
    svg = _draw.circuit_svg(pic)
    return Picture(circuit_title(pic), f'<div class="drawing">{svg}</div>', f.shown,
                   svg=_draw.circuit_svg(pic, standalone=True),
                   info={"n_nodes": pic.n_nodes, "n_edges": pic.n_edges, "picture": pic})


def attention(wh, run: int, prompt: int, layer: int | None = None, head: int | None = None,
              scalar: str = "attn_pattern") -> Picture:
    """One head's attention pattern (or another pair scalar) as a heatmap over the tokens."""
    with _data.reading(wh) as w:
        f = _data.Fetcher(w)
        att = _data.attention(f, run, prompt, layer, head, scalar)
    svg = _draw.heatmap_svg(att)
    return Picture(f"run {run} prompt {prompt}: {scalar} of L{att['layer']}H{att['head']}",
                   f'<div class="drawing">{svg}</div>', f.shown, svg=svg,
                   info={"n_cells": att["cells"].height})


def tokens(wh, run: int, prompt: int, scalar: str | None = None, layer: int | None = None,
           node_index: int | None = None) -> Picture:
    """The prompt's tokens coloured by a token-level scalar (summed over the chosen nodes)."""
    with _data.reading(wh) as w:
        f = _data.Fetcher(w)
        tv = _data.token_values(f, run, prompt, scalar, layer, node_index)
    which = "all nodes" if layer is None else f"layer {layer}" + (
        "" if node_index is None else f" index {node_index}")
    return Picture(f"run {run} prompt {prompt}: {tv['scalar']} ({which})", _draw.tokens_html(tv),
                   f.shown, info={"n_tokens": tv["rows"].height})


__all__ = ["Picture", "circuit", "attention", "tokens"]
