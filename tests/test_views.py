"""Pictures (actwh.views): the drawn circuit is exactly `actwh circuit`'s, attention cells and
token colours carry the stored values, node clicks list the SQL answer, the circuit-tracer export
loads with circuit-tracer's own code, and the server binds locally, only reads, and answers bad
parameters with a clean 400.

The warehouse is populated once, with the default model, on prompts of mixed lengths: run 1 keeps
positions in its edges (dense scalars and attention), run 2 sums them. Reference answers come from
DuckDB directly (SQL written here, not the saved queries) or from the CLI.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from actwh.cli.main import cli

ROOT = Path(__file__).parents[1]
PROMPTS = ROOT / "compute" / "default_model" / "prompts"
ARTIFACTS = Path(os.environ.get("ACTWH_ARTIFACTS", ROOT / "test-artifacts"))
METHOD_ARGS = {"influence": [], "threshold": ["--threshold", "0.05"], "top-n": ["-n", "25"],
               "reachable": ["--threshold", "0.05"]}


@pytest.fixture(scope="session")
def view_db(tmp_path_factory):
    from actwh.runner import EdgeOptions, PopulateOptions, populate

    folder = tmp_path_factory.mktemp("views")
    rows = [json.loads(line) for line in (PROMPTS / "induction.jsonl").read_text().splitlines()[:3]]
    rows += [json.loads(line) for line in (PROMPTS / "successor.jsonl").read_text().splitlines()[:2]]
    rows = [{"text": r["text"], "target": r["target"]} for r in rows]
    assert len({len(r["text"].split()) for r in rows}) >= 3  # mixed lengths: padding in every batch
    prompts = folder / "mixed.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = folder / "views.duckdb"
    scalars = ("attn_pattern", "attn_act_times_grad", "attn_head_act_times_grad",
               "mlp_act_times_grad", "token_attribution")
    populate(db, PopulateOptions(prompts=str(prompts), scalars=scalars, select="dense", batch_size=3,
                                 device="cpu", edges=EdgeOptions(select="top-k:400", positions="each")),
             progress=False)
    populate(db, PopulateOptions(prompts=str(prompts), select="top-k:5:mlp_act_times_grad", batch_size=3,
                                 device="cpu", edges=EdgeOptions(select="dense")), progress=False)
    return db


def raw(db, sql, params=None):
    """Reference answers: DuckDB directly, read-only."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def cli_circuit(db, run, prompt, method, tmp_path) -> dict:
    out = tmp_path / f"cli-{run}-{prompt}-{method}.json"
    r = CliRunner().invoke(cli, ["circuit", str(run), str(prompt), "--db", str(db), "--method",
                                 method, *METHOD_ARGS[method], "--json", str(out), "--format", "csv"])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def nkey(layer, kind, index, pos) -> str:
    return f"{layer}|{kind}|{index}|{'' if pos is None else pos}"


def ekey(e: dict) -> str:
    return (nkey(e["up_layer"], e["up_type"], e["up_index"], e["up_pos"]) + ">"
            + nkey(e["down_layer"], e["down_type"], e["down_index"], e["down_pos"])
            + (f".{e['down_input']}" if e.get("down_input") else ""))


def svg_parts(svg_text: str):
    root = ET.fromstring(svg_text)
    ns = "{http://www.w3.org/2000/svg}"
    nodes = [g for g in root.iter(ns + "g") if g.get("class") == "node"]
    edges = [p for p in root.iter(ns + "path") if (p.get("class") or "").startswith("edge")]
    return nodes, edges


def assert_same_graph(cli_json: dict, node_keys: list[str], edge_items: list[tuple[str, float]]):
    want_nodes = sorted(nkey(n["layer"], n["node_type"], n["node_index"], n["pos"])
                        for n in cli_json["nodes"])
    assert sorted(node_keys) == want_nodes
    want_edges = sorted((ekey(e), round(e["value"], 5)) for e in cli_json["edges"])
    assert sorted((k, round(v, 5)) for k, v in edge_items) == want_edges


# --- standalone files and notebook objects -----------------------------------------------------

@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_standalone_files_and_notebook_draw_the_cli_circuit(view_db, tmp_path, method):
    from actwh import views

    for run in (1, 2):
        want = cli_circuit(view_db, run, 3, method, tmp_path)
        assert want["edges"], "a circuit with no edge tests nothing"
        kw = {"influence": {}, "threshold": {"value": 0.05}, "top-n": {"n": 25},
              "reachable": {"value": 0.05}}[method]
        pic = views.circuit(view_db, run, 3, method=method, **kw)
        html = pic._repr_html_()
        body = html[html.index("<svg"):html.index("</svg>") + 6]
        for text in (body, pic.svg):
            nodes, edges = svg_parts(text)
            assert_same_graph(want, [g.get("data-key") for g in nodes],
                              [(p.get("data-key"), float(p.get("data-value"))) for p in edges])
        for fmt in ("svg", "html"):
            path = tmp_path / f"c{run}.{fmt}"
            r = CliRunner().invoke(cli, ["circuit", str(run), "3", "--db", str(view_db), "--method",
                                         method, *METHOD_ARGS[method], "--format", fmt, "-o", str(path)])
            assert r.exit_code == 0, r.output
            text = path.read_text()
            if fmt == "html":
                assert text.startswith("<!doctype html>") and "<script" not in text
                text = text[text.index("<svg"):text.index("</svg>") + 6]
            nodes, edges = svg_parts(text)
            assert len(nodes) == len(want["nodes"]) and len(edges) == len(want["edges"])


def test_positions_kept_draw_tokens_as_columns(view_db):
    """Run 1 keeps positions: every node sits in its token's column, so nodes at one position
    share x ranges and later positions lie to the right."""
    from actwh import views

    # a threshold low enough to keep edges out of the embeddings (the default model's are small)
    pic = views.circuit(view_db, 1, 0, method="threshold", value=0.005)
    nodes, _ = svg_parts(pic.svg)
    ns = "{http://www.w3.org/2000/svg}"
    xs: dict = {}
    for g in nodes:
        x = float(g.find(ns + "circle").get("cx"))
        xs.setdefault(int(g.get("data-pos")), []).append(x)
    assert len(xs) >= 3
    ordered = sorted(xs)
    for a, b in zip(ordered, ordered[1:]):
        assert max(xs[a]) < min(xs[b])
    # rows: embeddings lowest, logits highest (larger y is lower on the page)
    ys = {g.get("data-type"): float(g.find(ns + "circle").get("cy")) for g in nodes}
    assert ys["embed"] > ys["logit"]


def test_attention_and_tokens_notebook_objects_hold_stored_values(view_db):
    from actwh import views

    att = views.attention(view_db, 1, 2, layer=2, head=1)
    html = att._repr_html_()
    cells = {(int(q), int(k)): float(v) for q, k, v in
             re.findall(r'class="cell"[^>]*data-q="(\d+)" data-k="(\d+)" data-value="([^"]+)"', html)}
    want = raw(view_db, "SELECT query_pos, key_pos, value FROM pair_scalars WHERE run_id = 1 AND "
                        "prompt_id = 2 AND layer = 2 AND head = 1 AND scalar = 'attn_pattern'")
    n_tok = raw(view_db, "SELECT n_tokens FROM prompts WHERE run_id = 1 AND prompt_id = 2")[0][0]
    assert len(want) == n_tok * (n_tok + 1) // 2  # dense: the causal triangle
    assert cells == {(q, k): pytest.approx(v, abs=1e-7) for q, k, v in want}
    tok = views.tokens(view_db, 1, 2, scalar="mlp_act_times_grad", layer=1)
    got = {int(p): float(v) for p, v in re.findall(r'data-pos="(\d+)" data-value="([^"]+)"',
                                                     tok._repr_html_())}
    want = raw(view_db, "SELECT position, sum(value) FROM node_scalars WHERE run_id = 1 AND "
                        "prompt_id = 2 AND scalar = 'mlp_act_times_grad' AND layer = 1 "
                        "GROUP BY position")
    assert len(got) == n_tok and got == {p: pytest.approx(v, rel=1e-5) for p, v in want}


def test_views_hold_no_sql():
    """All SQL lives in queries/*.sql: the views package only names saved queries."""
    for path in (ROOT / "views").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bSELECT\b|\bFROM\s+\w+\s+WHERE\b", text), path.name


# --- circuit-tracer ----------------------------------------------------------------------------

CT_CHECK = r"""
import json, sys
from circuit_tracer.frontend.graph_models import Model
import circuit_tracer
m = Model.model_validate_json(open(sys.argv[1]).read())
print(json.dumps({"version": circuit_tracer.__version__,
                  "nodes": [n.model_dump() for n in m.nodes], "links": m.links,
                  "tokens": m.metadata.prompt_tokens}))
"""


@pytest.fixture(scope="session")
def circuit_tracer_path():
    """circuit-tracer 0.5.0, installed with --no-deps into a cache folder (its pins, transformers
    <= 4.57 and huggingface-hub < 1, conflict with ours); its graph model needs only pydantic."""
    target = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actwh-test" / "circuit-tracer-0.5.0"
    if not (target / "circuit_tracer" / "frontend" / "graph_models.py").exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "--no-deps", "--target", str(tmp), "circuit-tracer==0.5.0"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"cannot install circuit-tracer 0.5.0: {r.stderr[-500:]}")
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
    return target


@pytest.mark.parametrize("run,method", [(1, "influence"), (1, "threshold"), (2, "top-n")])
def test_circuit_tracer_export_loads_with_circuit_tracer(view_db, tmp_path, circuit_tracer_path,
                                                         run, method):
    want = cli_circuit(view_db, run, 0, method, tmp_path)
    out = tmp_path / "graph.json"
    r = CliRunner().invoke(cli, ["circuit", str(run), "0", "--db", str(view_db), "--method", method,
                                 *METHOD_ARGS[method], "--format", "circuit-tracer", "-o", str(out)])
    assert r.exit_code == 0, r.output
    env = {**os.environ, "PYTHONPATH": str(circuit_tracer_path)}
    p = subprocess.run([sys.executable, "-c", CT_CHECK, str(out)], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout)
    assert got["version"] == "0.5.0"
    nodes, links = got["nodes"], got["links"]
    ids = [n["node_id"] for n in nodes]
    assert len(ids) == len(set(ids)) == len(want["nodes"])
    # every node comes back as the node it was, and every link as its edge with its weight
    raw_nodes = json.loads(out.read_text())["nodes"]
    key_of = {n["node_id"]: nkey(*(n["actwh"][k] for k in ("layer", "node_type", "node_index", "pos")))
              for n in raw_nodes}
    assert sorted(key_of.values()) == sorted(nkey(n["layer"], n["node_type"], n["node_index"], n["pos"])
                                             for n in want["nodes"])
    kinds = {n["node_id"]: n["actwh"]["node_type"] for n in raw_nodes}
    expect = {"embed": "embedding", "logit": "logit", "sae_error": "mlp reconstruction error"}
    for n in nodes:
        assert n["feature_type"] == expect.get(kinds[n["node_id"]], "cross layer transcoder")
        assert (n["layer"] == "E") == (kinds[n["node_id"]] == "embed")
    assert "logit" in kinds.values()
    back = sorted((key_of[l["source"]] + ">" + key_of[l["target"]]
                   + (f".{l['down_input']}" if l.get("down_input") else ""), round(l["weight"], 5))
                  for l in links)
    assert back == sorted((ekey(e), round(e["value"], 5)) for e in want["edges"])
    n_tok = raw(view_db, "SELECT n_tokens FROM prompts WHERE run_id = ? AND prompt_id = 0", [run])[0][0]
    assert len(got["tokens"]) == n_tok


# --- the server, without a browser -------------------------------------------------------------

@pytest.fixture(scope="module")
def server(view_db):
    from actwh.views.server import make_server, url_of

    srv = make_server(view_db, port=0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield url_of(srv), srv
    srv.shutdown()
    srv.server_close()


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


BAD = [
    ("circuit?run=abc&prompt=0", 400, "'run' must be an integer"),
    ("circuit?run=1&prompt=0.5", 400, "'prompt' must be an integer"),
    ("circuit?run=1&prompt=0&method=magic", 400, "'method' must be one of"),
    ("circuit?run=1&prompt=0&threshold=nan", 400, "must be finite"),
    ("circuit?run=1&prompt=0&node_threshold=7", 400, "node_threshold"),
    ("circuit?run=1&run=2&prompt=0", 400, "given 2 times"),
    ("circuit?run=1&prompt=0&colour=red", 400, "unknown parameter 'colour'"),
    ("circuit?prompt=0", 400, "missing parameter 'run'"),
    ("circuit?run=99999999999999999999&prompt=0", 400, "must be between"),
    ("circuit?run=7&prompt=0", 404, "run=7 matches no run"),
    ("circuit?run=1&prompt=99", 404, "prompt=99 is not in run 1"),
    ("attention?run=1&prompt=0&scalar=x%27%3B%20DROP%20TABLE%20edges", 400, "is not stored"),
    ("attention?run=1&prompt=0&lh=2-1", 400, "LAYER:INDEX"),
    ("prompt?run=1&prompt=0&scalar=bogus", 400, "is not stored"),
    ("?run=1&sort=length", 400, "'sort' must be one of"),
    ("api/node?run=1&prompt=0&layer=0&node_type=neuron&node_index=0", 400, "unknown node_type"),
    ("api/node?run=1&prompt=0&layer=0&node_type=mlp&node_index=0&k=0", 400, "'k' must be between"),
]


@pytest.mark.parametrize("path,status,message", BAD)
def test_malformed_parameters_get_a_clear_400(server, path, status, message):
    url, _ = server
    code, body = get(url + path)
    body = html.unescape(body)
    assert code == status and message in body, (code, body[-500:])
    for leak in ("Traceback", "SELECT", "FROM", "duckdb", 'File "'):
        assert leak not in body


def test_server_binds_127_0_0_1_by_default(view_db):
    from actwh.views.server import make_server

    srv = make_server(view_db, port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()
    # and the command: `actwh view --port 0` reports where it listens, and answers there
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "actwh.cli", "view", "--db", str(view_db),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://([\d.]+):(\d+)/", line)
        assert m and m.group(1) == "127.0.0.1", line + proc.stderr.read() if not m else line
        code, body = get(m.group(0))
        assert code == 200 and "Prompts of run 1" in body
    finally:
        proc.terminate()
        proc.wait(10)


def test_server_only_reads_and_waits_for_a_writer(server, view_db, tmp_path):
    url, _ = server
    before = hashlib.sha256(view_db.read_bytes()).hexdigest()
    for path in ["", "?run=2&search=two&sort=metric&descending=1", "prompt?run=1&prompt=3",
                 "attention?run=1&prompt=3&lh=1:2", "circuit?run=1&prompt=3",
                 "compare?run=1&prompt=3&run_b=2",
                 "api/node?run=1&prompt=3&layer=-1&node_type=embed&node_index=0&pos=2"]:
        code, body = get(url + path)
        assert code == 200, (path, body[:300])
    assert hashlib.sha256(view_db.read_bytes()).hexdigest() == before
    # Between requests the server holds no lock: another process can open the file to write.
    # While that process holds it, a request waits and is answered once it lets go.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "print('held', flush=True); time.sleep(1.5); c.close()", str(view_db)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    code, body = get(url + "circuit?run=1&prompt=0")
    assert code == 200 and time.monotonic() - t0 > 0.3
    assert holder.wait(10) == 0


# --- in the browser ----------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--disable-extensions"]


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium (Debian's, driven by Playwright) for the session. .ci/run installs
    both and sets ACTWH_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping."""
    required = os.environ.get("ACTWH_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (the browser extra)")
    if not os.path.exists(CHROMIUM):
        if required:
            pytest.fail(f"{CHROMIUM} is missing (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is missing")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # offline: nothing is asked of any host but the server itself (no CDN, no font, no favicon)
    pg.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1:", "data:"))
          else errors.append(f"outside request: {r.url}"))
    pg.errors = errors
    yield pg
    pg.close()


def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_every_page_loads_without_console_errors(server, page):
    url, _ = server
    pages = {"runs": "?run=1&sort=metric&descending=1", "prompt": "prompt?run=1&prompt=0",
             "attention": "attention?run=1&prompt=0&lh=2:1", "circuit": "circuit?run=1&prompt=0",
             "compare": "compare?run=1&prompt=0&run_b=1&method_b=threshold&threshold_b=0.05"}
    for name, path in pages.items():
        resp = page.goto(url + path)
        assert resp.status == 200, name
        page.wait_for_load_state("load")
        assert page.locator("details.sql").count() >= 1, name  # the SQL, one click away
        shot(page, name)
    assert page.errors == []
    # the SQL opens with one click and shows the query text
    page.goto(url + "attention?run=1&prompt=0&lh=2:1")
    page.click("details.sql > summary")
    assert "FROM pair_scalars" in page.inner_text("details.sql")


@pytest.mark.parametrize("run,method,query", [(1, "influence", ""), (1, "threshold", "&threshold=0.05"),
                                               (2, "reachable", "&threshold=0.05")])
def test_circuit_page_draws_the_cli_circuit(server, page, view_db, tmp_path, run, method, query):
    url, _ = server
    want = cli_circuit(view_db, run, 3, method, tmp_path)
    page.goto(url + f"circuit?run={run}&prompt=3&method={method}{query}")
    keys = page.eval_on_selector_all("#circuit g.node", "els => els.map(e => e.dataset.key)")
    edges = page.eval_on_selector_all(
        "#circuit path.edge", "els => els.map(e => [e.dataset.key, Number(e.dataset.value)])")
    assert_same_graph(want, keys, [tuple(e) for e in edges])
    assert page.errors == []


def test_clicking_a_node_lists_its_edges_as_sql_gives(server, page, view_db):
    url, _ = server
    page.goto(url + "circuit?run=1&prompt=3&method=threshold&threshold=0.1")
    # the node with the most edges in the circuit: an MLP or head mid-graph, at some position
    g = page.eval_on_selector_all(
        "#circuit g.node", "els => els.filter(e => !['embed', 'logit'].includes(e.dataset.type))"
                           ".map(e => e.dataset.key)")
    key = g[len(g) // 2]
    layer, kind, index, pos = key.split("|")
    page.click(f'#circuit g.node[data-key="{key}"] circle')
    page.wait_for_selector("#detail[data-ready='1']")
    for direction, near, far in (("in", "down", "up"), ("out", "up", "down")):
        rows = page.eval_on_selector_all(
            f"#detail table.edges-{direction} tr.edge-row",
            "els => els.map(e => [e.dataset.other, e.dataset.input, Number(e.dataset.value)])")
        want = raw(view_db,
                   f"SELECT {far}_layer, {far}_type, {far}_index, {far}_pos, down_input, value "
                   f"FROM edges WHERE run_id = 1 AND prompt_id = 3 AND {near}_layer = ? AND "
                   f"{near}_type = ? AND {near}_index = ? AND {near}_pos = ? "
                   f"ORDER BY abs(value) DESC LIMIT 10", [int(layer), kind, int(index), int(pos)])
        assert len(rows) == len(want)
        assert sorted((r[0], r[1], round(r[2], 5)) for r in rows) == sorted(
            (nkey(*w[:4]), w[4] or "", round(w[5], 5)) for w in want)
    assert page.locator("#detail table.edges-in tr.edge-row").count() > 0
    # the histogram counts the node's value in every prompt where the run stores it
    scalar = "attn_head_act_times_grad" if kind == "attn_head" else {
        "mlp": None, "mlp_neuron": "mlp_act_times_grad"}.get(kind)
    if scalar:
        n = raw(view_db, "SELECT count(DISTINCT prompt_id) FROM node_scalars WHERE run_id = 1 AND "
                         "layer = ? AND node_type = ? AND node_index = ? AND scalar = ?",
                [int(layer), kind, int(index), scalar])[0][0]
        assert int(page.get_attribute("#detail .hist-caption", "data-n")) == n
        counts = page.eval_on_selector_all("#detail svg.hist rect.bar",
                                           "els => els.map(e => Number(e.dataset.count))")
        assert sum(counts) == n
    shot(page, "circuit-node")
    assert page.errors == []


def test_attention_heatmap_cells_equal_pair_scalars(server, page, view_db):
    url, _ = server
    page.goto(url + "attention?run=1&prompt=1&lh=1:3")
    cells = page.eval_on_selector_all(
        "svg.heatmap rect.cell", "els => els.map(e => [+e.dataset.q, +e.dataset.k, +e.dataset.value])")
    want = raw(view_db, "SELECT query_pos, key_pos, value FROM pair_scalars WHERE run_id = 1 AND "
                        "prompt_id = 1 AND layer = 1 AND head = 3 AND scalar = 'attn_pattern'")
    assert len(cells) == len(want) > 10
    assert {(q, k): pytest.approx(v, abs=1e-7) for q, k, v in want} == {(q, k): v for q, k, v in cells}
    # choosing another head in the menu lands on its own URL
    page.select_option("select[name=lh]", "2:0")
    page.wait_for_url(re.compile(r"lh=2%3A0"))
    assert "L2H0" in page.inner_text("h1")
    assert page.errors == []


def test_compare_page_marks_edges_in_one_circuit_only(server, page, view_db, tmp_path):
    url, _ = server
    a = cli_circuit(view_db, 1, 2, "influence", tmp_path)
    b = cli_circuit(view_db, 1, 2, "top-n", tmp_path)
    page.goto(url + "compare?run=1&prompt=2&method=influence&run_b=1&method_b=top-n&n_b=25")
    ka, kb = {ekey(e) for e in a["edges"]}, {ekey(e) for e in b["edges"]}
    only_a = page.eval_on_selector_all("#side-a path.edge.only", "els => els.map(e => e.dataset.key)")
    only_b = page.eval_on_selector_all("#side-b path.edge.only", "els => els.map(e => e.dataset.key)")
    assert sorted(only_a) == sorted(ka - kb) and sorted(only_b) == sorted(kb - ka)
    assert ka - kb or kb - ka
    assert page.locator("#side-a table.only-a tr").count() == len(ka - kb) + 1
    assert page.errors == []


def test_tokens_page_colours_by_the_stored_values(server, page, view_db):
    url, _ = server
    page.goto(url + "prompt?run=1&prompt=4&scalar=token_attribution")
    got = page.eval_on_selector_all("span.tok", "els => els.map(e => [+e.dataset.pos, e.dataset.value])")
    want = dict(raw(view_db, "SELECT position, value FROM node_scalars WHERE run_id = 1 AND "
                             "prompt_id = 4 AND scalar = 'token_attribution'"))
    n_tok = raw(view_db, "SELECT n_tokens FROM prompts WHERE run_id = 1 AND prompt_id = 4")[0][0]
    assert len(got) == n_tok
    assert {p: float(v) for p, v in got} == {p: pytest.approx(v, abs=1e-7) for p, v in want.items()}
    assert page.errors == []


def test_runs_page_filters_and_sorts_prompts(server, view_db):
    """The prompts table: text search (case-insensitive) and sort by metric, descending."""
    url, _ = server
    code, body = get(url + "?run=1&search=TWO&sort=metric&descending=1")
    assert code == 200
    table = body[body.index('<table class="prompts">'):]
    table = table[:table.index("</table>")]
    ids = [int(x) for x in re.findall(r"<tr><td>(\d+)</td>", table)]
    want = raw(view_db, "SELECT prompt_id FROM prompts WHERE run_id = 1 AND lower(text) LIKE "
                        "'%two%' ORDER BY metric DESC")
    assert ids == [w[0] for w in want] and len(ids) >= 1
    code, body = get(url + "?run=1&sort=n_tokens")
    table = body[body.index('<table class="prompts">'):]
    ids = [int(x) for x in re.findall(r"<tr><td>(\d+)</td>", table[:table.index("</table>")])]
    want = raw(view_db, "SELECT prompt_id FROM prompts WHERE run_id = 1 ORDER BY n_tokens, prompt_id")
    assert ids == [w[0] for w in want] and len(ids) == 5
