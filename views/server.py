"""`actwh view`: a small local web app over one warehouse (standard library HTTP server).

Pages (each a stable URL: every choice is a query parameter, so a URL can be shared):
  /            runs, and a run's prompts (search text, sort by metric, loss or length)
  /prompt      a prompt's tokens coloured by a token-level scalar
  /attention   a head's pattern as a heatmap over the prompt's tokens (from pair_scalars)
  /circuit     the circuit `actwh circuit` finds, drawn; clicking a node asks /api/node
  /compare     two runs or two methods on the same prompt, side by side
  /api/node    a node's top in/out edges and its value across the run's prompts (JSON)

It binds 127.0.0.1 unless told otherwise, only reads (each query opens the file read-only, so a
populate can write between requests; readers retry briefly while it holds the file), and answers a
malformed parameter with a one-line 400, never a stack trace or SQL.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from urllib.parse import parse_qs, urlencode, urlsplit

from actwh.errors import ActwhError, WarehouseError
from actwh.views import data as D
from actwh.warehouse.store import WarehouseLocked
from actwh.views import draw

log = logging.getLogger("actwh.views")
# The warehouse's own messages for a run, prompt, scalar or node type it does not hold.
NOT_FOUND = re.compile(r"matches no run|is not in run|is not a (scalar|node_type)|^no run ")
MISSING = object()
INT_RANGE = (-(2**31), 2**31 - 1)
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


class Params:
    """Typed access to a request's query parameters; anything malformed is a BadParameter."""

    def __init__(self, query: str, allowed: tuple[str, ...]):
        try:
            raw = parse_qs(query, keep_blank_values=True, strict_parsing=False,
                           max_num_fields=64)
        except ValueError as e:
            raise D.BadParameter(f"malformed query string: {e}") from None
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise D.BadParameter(f"unknown parameter {unknown[0]!r}; this page takes: "
                                 f"{', '.join(allowed) or 'none'}")
        for k, v in raw.items():
            if len(v) > 1:
                raise D.BadParameter(f"parameter {k!r} given {len(v)} times")
        self.raw = {k: v[0] for k, v in raw.items()}

    def _get(self, name, default):
        v = self.raw.get(name, "")
        if v == "":
            if default is MISSING:
                raise D.BadParameter(f"missing parameter {name!r}")
            return None, default
        return v, None

    def int(self, name: str, default=MISSING, lo: int = INT_RANGE[0], hi: int = INT_RANGE[1]):
        v, d = self._get(name, default)
        if v is None:
            return d
        try:
            x = int(v.strip(), 10)
        except ValueError:
            raise D.BadParameter(f"parameter {name!r} must be an integer, not {v[:40]!r}") from None
        if not lo <= x <= hi:
            raise D.BadParameter(f"parameter {name!r} must be between {lo} and {hi}, not {x}")
        return x

    def float(self, name: str, default=MISSING):
        v, d = self._get(name, default)
        if v is None:
            return d
        try:
            x = float(v)
        except ValueError:
            raise D.BadParameter(f"parameter {name!r} must be a number, not {v[:40]!r}") from None
        if not math.isfinite(x):
            raise D.BadParameter(f"parameter {name!r} must be finite, not {v[:40]!r}")
        return x

    def choice(self, name: str, choices, default=MISSING):
        v, d = self._get(name, default)
        if v is None:
            return d
        if v not in choices:
            raise D.BadParameter(f"parameter {name!r} must be one of {', '.join(choices)}, "
                                 f"not {v[:40]!r}")
        return v

    def str(self, name: str, default=MISSING, max_len: int = 200):
        v, d = self._get(name, default)
        if v is None:
            return d
        if len(v) > max_len or any(ord(c) < 32 for c in v):
            raise D.BadParameter(f"parameter {name!r} is too long or holds control characters")
        return v


# --- page frame --------------------------------------------------------------------------------

def page(title: str, body: str, nav: dict | None = None) -> str:
    nav = nav or {}
    keep = {k: v for k, v in nav.items() if v is not None}
    links = [("/", "Runs", {k: keep[k] for k in ("run",) if k in keep})]
    if "run" in keep and "prompt" in keep:
        rp = {"run": keep["run"], "prompt": keep["prompt"]}
        links += [("/prompt", "Tokens", rp), ("/attention", "Attention", rp),
                  ("/circuit", "Circuit", rp), ("/compare", "Compare", rp)]
    menu = " · ".join(f'<a href="{u}{"?" + urlencode(q) if q else ""}">{t}</a>' for u, t, q in links)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)} · actwh</title>'
            f'<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/style.css">'
            f'<style>{draw.STYLE}</style><script src="/static/app.js" defer></script></head>'
            f'<body class="actwh-pic"><nav>{menu}</nav><h1>{escape(title)}</h1>{body}</body></html>')


def _select(name: str, options, current, label: str = "") -> str:
    opts = "".join(f'<option value="{escape(str(v))}"{" selected" if str(v) == str(current) else ""}>'
                   f"{escape(str(t))}</option>" for v, t in options)
    return f'<label>{escape(label or name)} <select name="{name}">{opts}</select></label> '


def _input(name: str, value, label: str = "", size: int = 6) -> str:
    v = "" if value is None else escape(str(value))
    return f'<label>{escape(label or name)} <input name="{name}" value="{v}" size="{size}"></label> '


def _hidden(**kv) -> str:
    return "".join(f'<input type="hidden" name="{k}" value="{escape(str(v))}">' for k, v in kv.items()
                   if v is not None)


def _table(df, links=None, cls: str = "") -> str:
    cols = df.columns
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    rows = []
    for r in df.iter_rows(named=True):
        cells = "".join(f"<td>{escape(draw.fmt(v) if isinstance(v, float) else str('' if v is None else v))}</td>"
                        for v in r.values())
        extra = links(r) if links else ""
        rows.append(f"<tr>{cells}{extra}</tr>")
    return f'<table class="{cls}"><tr>{head}{"<th></th>" if links else ""}</tr>{"".join(rows)}</table>'


# --- pages -------------------------------------------------------------------------------------

def _pair(v: str, name: str) -> tuple[int, int]:
    """LAYER:INDEX, as the node and head menus send it."""
    a, sep, b = v.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(a, 10), int(b, 10)
    except ValueError:
        raise D.BadParameter(f"parameter {name!r} must be LAYER:INDEX, not {v[:40]!r}") from None


def runs_page(wh, p: Params) -> str:
    f = D.Fetcher(wh)
    runs = f("view_runs")
    run = p.int("run", None)
    body = [_table(runs.select("run_id", "name", "model", "target", "status", "n_prompts", "selection"),
                   links=lambda r: f'<td><a href="/?run={r["run_id"]}">prompts</a></td>', cls="runs")]
    if run is None and runs.height:
        run = runs["run_id"][0]
    if run is not None:
        D.run_info(f, run)
        search = p.str("search", "")
        sort = p.choice("sort", D.SORTS, "prompt_id")
        desc = p.choice("descending", ("0", "1"), "0") == "1"
        df = D.prompts(f, run, search, sort, desc)
        form = (f'<form method="get">{_hidden(run=run)}{_input("search", search, "text contains", 20)}'
                f'{_select("sort", [(s, s) for s in D.SORTS], sort, "sort by")}'
                f'{_select("descending", [("0", "ascending"), ("1", "descending")], "1" if desc else "0", "")}'
                f'<button>show</button></form>')

        def links(r):
            q = urlencode({"run": run, "prompt": r["prompt_id"]})
            return (f'<td><a href="/prompt?{q}">tokens</a> <a href="/attention?{q}">attention</a> '
                    f'<a href="/circuit?{q}">circuit</a></td>')

        body.append(f"<h2>Prompts of run {run}</h2>{form}{_table(df, links, 'prompts')}")
    body.append(draw.sql_block(f.shown))
    return page("Runs", "".join(body), {"run": run})


def prompt_page(wh, p: Params) -> str:
    f = D.Fetcher(wh)
    run, prompt = p.int("run"), p.int("prompt")
    scalar = p.str("scalar", None, 64)
    layer, index = p.int("layer", None, -1, 100_000), p.int("node_index", None, 0)
    node = p.str("node", "", 32)
    if node:
        layer, index = _pair(node, "node")
    info = D.prompt_info(f, run, prompt)
    tv = D.token_values(f, run, prompt, scalar, layer, index)
    choices = tv["choices"]
    scalars = choices["scalar"].unique(maintain_order=True).to_list()
    nodes = [("", "all nodes (summed)")] + [
        (f'{r["layer"]}:{r["node_index"]}', f'{r["node_label"]} (max |value| {draw.fmt(r["max_abs"])})')
        for r in choices.filter(choices["scalar"] == tv["scalar"]).iter_rows(named=True)]
    current = "" if layer is None else f"{layer}:{'' if index is None else index}"
    form = (f'<form method="get" id="tokform">{_hidden(run=run, prompt=prompt)}'
            f'{_select("scalar", [(s, s) for s in scalars], tv["scalar"])}'
            f'{_select("node", nodes, current, "node")}'
            f'<button>show</button></form>')
    body = (f'<p class="text">{escape(info["text"])}</p><p>metric {draw.fmt(info["metric"])}, '
            f'loss {draw.fmt(info["loss"])}</p>{form}{draw.tokens_html(tv)}'
            f'<p class="hint">hover a token for its value</p>{draw.sql_block(f.shown)}')
    return page(f"Run {run} prompt {prompt}: {tv['scalar']}", body, {"run": run, "prompt": prompt})


def attention_page(wh, p: Params) -> str:
    f = D.Fetcher(wh)
    run, prompt = p.int("run"), p.int("prompt")
    layer, head = p.int("layer", None, -1, 10_000), p.int("head", None, 0, 10_000)
    if p.str("lh", "", 32):
        layer, head = _pair(p.str("lh"), "lh")
    scalar = p.str("scalar", "attn_pattern", 64)
    att = D.attention(f, run, prompt, layer, head, scalar)
    heads = [(f'{r["layer"]}:{r["head"]}', f'L{r["layer"]}H{r["head"]}') for r in att["heads"].iter_rows(named=True)]
    current = f'{att["layer"]}:{att["head"]}'
    form = (f'<form method="get" id="attform">{_hidden(run=run, prompt=prompt, scalar=scalar)}'
            f'{_select("lh", heads, current, "head")}'
            f'<button>show</button></form>')
    body = (f"{form}<p>{att['cells'].height} stored (query, key) cells; rows are queries, columns "
            f"keys; hover a cell for its value</p>{draw.heatmap_svg(att)}{draw.sql_block(f.shown)}")
    return page(f"Run {run} prompt {prompt}: {scalar} of L{att['layer']}H{att['head']}", body,
                {"run": run, "prompt": prompt})


def _circuit_args(p: Params, suffix: str = "", base: dict | None = None) -> dict:
    base = base or {}
    return {"method": p.choice("method" + suffix, D.METHODS, base.get("method", "influence")),
            "value": p.float("threshold" + suffix, base.get("value")),
            "n": p.int("n" + suffix, base.get("n", 50), 1, 1_000_000),
            "node_threshold": p.float("node_threshold" + suffix, base.get("node_threshold", 0.8)),
            "edge_threshold": p.float("edge_threshold" + suffix, base.get("edge_threshold", 0.98))}


def _circuit_form(args: dict, suffix: str = "") -> str:
    return (f'{_select("method" + suffix, [(m, m) for m in D.METHODS], args["method"], "method")}'
            f'{_input("threshold" + suffix, args["value"], "|value| ≥")}'
            f'{_input("n" + suffix, args["n"], "top n", 4)}'
            f'{_input("node_threshold" + suffix, args["node_threshold"], "node fraction", 4)}'
            f'{_input("edge_threshold" + suffix, args["edge_threshold"], "edge fraction", 4)}')


def _legend() -> str:
    return ('<p class="legend">rows: layers (embeddings at the bottom, the target on top); columns: '
            'tokens where positions are kept; node size: influence (else Σ|edge|); edges: '
            f'<span style="color:{draw.POS}">positive</span> / <span style="color:{draw.NEG}">'
            'negative</span>, width by |value|. Click a node.</p>')


# "circuit-drawn": the drawing is in the DOM; "circuit-painted": the first frame painted after it
# (two animation frames later). benchmarks/bench_views.py reads both.
PAINT_MARKS = ('performance.mark("circuit-drawn"); requestAnimationFrame(() => '
               'requestAnimationFrame(() => performance.mark("circuit-painted")));')
CIRCUIT_PARAMS = ("run", "prompt", "method", "threshold", "n", "node_threshold", "edge_threshold",
                  "circuit")


def circuit_page(wh, p: Params) -> str:
    f = D.Fetcher(wh)
    run, stored = p.int("run"), p.int("circuit", None, 1)
    if stored is not None:  # a stored circuit, by id, drawn over one of its prompts
        pic = D.stored_circuit(f, run, stored, p.int("prompt", None))
        prompt = pic.prompt
        form = f'<p class="stored">{escape(pic.method)}: {escape(json.dumps(pic.settings))}</p>'
    else:
        prompt = p.int("prompt")
        args = _circuit_args(p)
        pic = D.circuit(f, run, prompt, **args)
        form = f'<form method="get">{_hidden(run=run, prompt=prompt)}{_circuit_form(args)}<button>draw</button></form>'
    svg = draw.circuit_svg(pic)
    body = (f'<p class="text">{escape(pic.text)}</p>{form}{_legend()}'
            f'<p class="counts"><span id="n-nodes">{pic.n_nodes}</span> nodes, '
            f'<span id="n-edges">{pic.n_edges}</span> edges</p>'
            f'<div class="layout"><div id="circuit" class="drawing" data-run="{run}" '
            f'data-prompt="{prompt}">{svg}</div><div id="detail"></div></div>'
            f'<script>{PAINT_MARKS}</script>{draw.sql_block(f.shown)}')
    return page(f"Run {run} prompt {prompt}: {pic.method} circuit", body, {"run": run, "prompt": prompt})


COMPARE_PARAMS = CIRCUIT_PARAMS + ("run_b", "method_b", "threshold_b", "n_b", "node_threshold_b",
                                   "edge_threshold_b")


def compare_page(wh, p: Params) -> str:
    run, prompt = p.int("run"), p.int("prompt")
    a_args = _circuit_args(p)
    run_b = p.int("run_b", run)
    b_default = dict(a_args, method="top-n" if run_b == run and a_args["method"] == "influence"
                     else a_args["method"])
    b_args = _circuit_args(p, "_b", b_default)
    fa, fb = D.Fetcher(wh), D.Fetcher(wh)
    a = D.circuit(fa, run, prompt, **a_args)
    b = D.circuit(fb, run_b, prompt, **b_args)
    diff = D.compare(a, b)
    cols = ["up_label", "down_label", "down_input", "value"]

    def side(pic, args, only_rows, only_keys, fetch, name):
        import polars as pl

        rows = pl.DataFrame(only_rows).select(cols) if only_rows else pl.DataFrame({c: [] for c in cols})
        return (f'<div class="side" id="side-{name}"><h2>{name.upper()}: run {pic.run}, '
                f'{pic.method}</h2><p>{pic.n_nodes} nodes, {pic.n_edges} edges, '
                f'<span class="n-only">{len(only_rows)}</span> in this one only (dashed)</p>'
                f'<div class="drawing">{draw.circuit_svg(pic, only_keys)}</div>'
                f'<h3>Edges only in {name.upper()}</h3>{_table(rows, cls="only-" + name)}'
                f'{draw.sql_block(fetch.shown)}</div>')

    form = (f'<form method="get">{_hidden(run=run, prompt=prompt)}<p>A: {_circuit_form(a_args)}</p>'
            f'<p>B: {_input("run_b", run_b, "run")}{_circuit_form(b_args, "_b")}</p>'
            f'<button>compare</button></form>')
    body = (f'<p class="text">{escape(a.text)}</p>{form}{_legend()}<p>{diff["both"]} edges in both</p>'
            f'<div class="compare">{side(a, a_args, diff["only_a"], diff["keys_a"], fa, "a")}'
            f'{side(b, b_args, diff["only_b"], diff["keys_b"], fb, "b")}</div>')
    return page(f"Prompt {prompt}: run {run} {a_args['method']} vs run {run_b} {b_args['method']}",
                body, {"run": run, "prompt": prompt})


def node_api(wh, p: Params) -> dict:
    f = D.Fetcher(wh)
    return D.node_detail(f, p.int("run"), p.int("prompt"), p.int("layer", lo=-1, hi=100_000),
                         p.str("node_type", max_len=32), p.int("node_index", lo=0),
                         p.int("pos", None, lo=0), p.int("k", 10, 1, 1000))


PAGES = {
    "/": (runs_page, ("run", "search", "sort", "descending")),
    "/prompt": (prompt_page, ("run", "prompt", "scalar", "layer", "node_index", "node")),
    "/attention": (attention_page, ("run", "prompt", "layer", "head", "scalar", "lh")),
    "/circuit": (circuit_page, CIRCUIT_PARAMS),
    "/compare": (compare_page, COMPARE_PARAMS),
}
API = {"/api/node": (node_api, ("run", "prompt", "layer", "node_type", "node_index", "pos", "k"))}


# --- the server --------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    server_version = "actwh-view"
    wh = None  # set per server (make_server); each request reads through its own connection

    def log_message(self, fmt, *args):  # quiet by default; errors are logged below
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: str, ctype: str = "text/html; charset=utf-8") -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, api: bool) -> None:
        if api:
            self._send(status, json.dumps({"error": message}), "application/json")
        else:
            self._send(status, page(f"Error {status}", f'<p class="error">{escape(message)}</p>'))

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        path = url.path
        api = path.startswith("/api/")
        try:
            if path.startswith("/static/"):
                name = path[len("/static/"):]
                if name not in STATIC:
                    return self._error(404, f"no static file {name!r}", False)
                text = (files("actwh.views") / "static" / name).read_text(encoding="utf-8")
                return self._send(200, text, STATIC[name])
            if path in PAGES or path in API:
                fn, allowed = PAGES.get(path) or API[path]
                params = Params(url.query, allowed)
                with D.reading(self.wh) as wh:
                    out = fn(wh, params)
                if path in API:
                    return self._send(200, json.dumps(out, default=str), "application/json")
                return self._send(200, out)
            return self._error(404, f"no page {path!r}; pages: {', '.join(PAGES)}", api)
        except D.BadParameter as e:
            return self._error(400, str(e), api)
        except D.NotFound as e:
            return self._error(404, str(e), api)
        except WarehouseError as e:
            if isinstance(e, WarehouseLocked) or "is locked by" in str(e):
                return self._error(503, "the warehouse is busy (a populate is writing); retry", api)
            if NOT_FOUND.search(str(e)):  # a value the file does not hold, named by the warehouse
                return self._error(404, str(e).splitlines()[0], api)
            log.error("warehouse error on %s: %s", self.path, e)
            return self._error(500, "the warehouse could not answer (see the server's log)", api)
        except ActwhError as e:  # e.g. "run 1 has no edges for prompt 0 (populate with --edges)"
            return self._error(404 if "no " in str(e) else 400, str(e).splitlines()[0], api)
        except (BrokenPipeError, ConnectionResetError):
            return None
        except Exception:
            log.exception("internal error on %s", self.path)
            return self._error(500, "internal error (see the server's log)", api)


def make_server(db, host: str = "127.0.0.1", port: int = 0, wait_s: float = 5.0) -> ThreadingHTTPServer:
    """A server over DB (not yet serving: call `serve_forever`). Port 0 picks a free port."""
    wh = D.open_warehouse(db, wait_s=wait_s)  # refuses a missing or foreign file before serving
    handler = type("BoundHandler", (Handler,), {"wh": wh})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def url_of(server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def serve(db, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = False) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    server = make_server(db, host, port)
    url = url_of(server)
    print(f"actwh view: serving {db} on {url} (read-only; Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
