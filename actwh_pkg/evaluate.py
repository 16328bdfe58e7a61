"""Is the circuit right? Faithfulness of a run's circuits, measured by patched forward passes.

For each prompt of a run with component-graph edges and each circuit size, the circuit's edges
keep their clean writes and every other edge is patched to its baseline (corrupted prompt, zero,
or the mean over the run's prompts; `actwh.compute.patching.run_patched`). The patched metric
and faithfulness = (patched − baseline) / (clean − baseline) go into `circuit_evals`, one row per
prompt and circuit, beside two end points per prompt: the empty circuit (selection `none`,
faithfulness 0) and the full graph (`all`, 1). The evaluation's options (method, sizes,
baseline, prompts, the run's edge method) are its provenance, in `evaluations`.

Circuits come from the run's stored edges (summed over positions), per prompt:
- `top-n`: the n edges of largest |value| (sizes: edge counts);
- `threshold`: edges with |value| ≥ X (sizes: thresholds);
- `influence`: circuit-tracer's influence pruning (sizes: edge thresholds, the cumulative
  influence fraction of edges kept, at `--node-threshold`);
- `circuit`: a stored circuit (`circuits` table) applied to every prompt.
Each size of a batch costs one patched forward pass that runs only the nodes its circuits read
(heads and MLPs with a kept out-edge in some prompt of the batch; the rest stand in with their
baseline writes) and unembeds only the scored positions. Per batch, one full pass over the
corrupted prompts gives the baseline writes and the all-patched end point, shared by all sizes
(under zero and mean baselines no node runs for it); the clean metric is the one populate stored
(a clean pass only where it stored none). So k sizes of small circuits cost less than k forward
passes (benchmarks/bench_evaluate.py, `evaluate_whole_cost`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
import os
from dataclasses import dataclass, field, replace

import numpy as np

from actwh import __version__
from actwh.errors import ActwhError, PromptError

METHODS = ("influence", "top-n", "threshold")
BASELINES = ("corrupt", "zero", "mean")
DEFAULT_SIZES = {"top-n": (10, 20, 50, 100, 200, 500), "threshold": (1.0, 0.3, 0.1, 0.03, 0.01),
                 "influence": (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)}
COMPONENT_TYPES = ("embed", "attn_head", "mlp", "mlp_expert")  # the component graph's upstream nodes


@dataclass(frozen=True)
class EvalOptions:
    method: str = "influence"
    sizes: tuple[float, ...] | None = None  # None: the method's defaults (DEFAULT_SIZES)
    baseline: str = "corrupt"
    prompts: tuple[int, ...] | None = None  # None: every prompt of the run
    node_threshold: float = 0.8  # influence: cumulative influence fraction of nodes kept
    batch_size: int = 8
    device: str | None = None
    progress: bool | None = None  # prompts, tokens/s, ETA on stderr (None: when it is a terminal)


@dataclass
class EvalResult:
    eval_id: int
    rows: dict = field(repr=False)  # the circuit_evals columns written


def parse_sizes(text: str | None, method: str) -> tuple[float, ...] | None:
    """`--sizes` as numbers: edge counts (top-n), |value| thresholds (threshold) or cumulative
    influence fractions in (0, 1] (influence)."""
    if text is None:
        return None
    try:
        sizes = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ActwhError(f"bad --sizes {text!r}: give comma-separated numbers") from None
    if not sizes:
        raise ActwhError("--sizes is empty")
    check_sizes(sizes, method)
    return sizes


def check_sizes(sizes, method: str) -> None:
    for s in sizes:
        if method == "top-n" and (s != int(s) or s < 1):
            raise ActwhError(f"top-n sizes are edge counts ≥ 1, not {s:g}")
        if method == "threshold" and s < 0:
            raise ActwhError(f"threshold sizes are |value| thresholds ≥ 0, not {s:g}")
        if method == "influence" and not 0 < s <= 1:
            raise ActwhError(f"influence sizes are cumulative fractions in (0, 1], not {s:g}")


def parse_prompt_ids(text: str | None) -> tuple[int, ...] | None:
    """`--prompts all|ID,...`."""
    if text is None or text.strip() == "all":
        return None
    try:
        ids = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ActwhError(f"bad --prompts {text!r}: give all or comma-separated prompt ids") from None
    if not ids:
        raise ActwhError("--prompts is empty")
    return ids


# --- reading the run -------------------------------------------------------------------------

def read_run(wh, run_id: int) -> dict:
    df = wh.sql("SELECT * FROM runs WHERE run_id = $run", run=run_id)
    if df.height == 0:
        raise ActwhError(f"no run {run_id} in {wh.path}")
    row = df.row(0, named=True)
    row["options"] = json.loads(row["options"]) if isinstance(row["options"], str) else row["options"]
    return row


def read_edges(wh, run_id: int, prompt_ids):
    """The run's component-graph edges (summed over positions) of `prompt_ids`, as Polars."""
    import polars as pl

    df = wh.sql("SELECT prompt_id, up_layer, up_type::VARCHAR AS up_type, up_index, up_pos, "
                "down_layer, down_type::VARCHAR AS down_type, down_index, down_pos, "
                "down_input::VARCHAR AS down_input, value FROM edges WHERE run_id = $run "
                "AND up_pos IS NULL AND down_pos IS NULL "
                "AND list_contains($ups, up_type::VARCHAR) "
                "AND down_type::VARCHAR IN ('attn_head', 'mlp', 'logit') "
                "AND list_contains($prompts, prompt_id) ORDER BY prompt_id",
                run=run_id, prompts=list(prompt_ids), ups=list(COMPONENT_TYPES))
    return df.with_columns(pl.col("value").cast(pl.Float64))


class EdgeIndex:
    """Maps stored edge rows to (upstream, downstream) indices of the component graph."""

    def __init__(self, model):
        from actwh.compute.edges import downstream_nodes, upstream_nodes
        from actwh.compute.patching import allowed_edges

        self.up = {(n.layer, n.node_type, n.index): i for i, n in enumerate(upstream_nodes(model))}
        down = downstream_nodes(model)
        self.down = {(n.layer, n.node_type, n.index, n.down_input): i for i, n in enumerate(down)}
        self.target = len(down) - 1
        self.up_keys = list(self.up)
        self.down_keys = [(n.layer, n.node_type, n.index) for n in down]
        self.allowed = allowed_edges(model)
        self.shape = self.allowed.shape

    def indices(self, df) -> tuple[np.ndarray, np.ndarray]:
        ui, vi = [], []
        for ul, ut, ux, dl, dt, dx, di in df.select(
                "up_layer", "up_type", "up_index", "down_layer", "down_type", "down_index",
                "down_input").iter_rows():
            try:
                ui.append(self.up[(ul, ut, ux)])
                vi.append(self.target if dt == "logit" else self.down[(dl, dt, dx, di)])
            except KeyError:
                raise ActwhError(f"stored edge {ut} L{ul}#{ux} -> {dt} L{dl}#{dx} is not in this "
                                 "model's component graph (another model?)") from None
        return np.asarray(ui, dtype=np.int64), np.asarray(vi, dtype=np.int64)

    def mask(self, df):
        import torch

        keep = torch.zeros(self.shape, dtype=torch.bool)
        ui, vi = self.indices(df)
        keep[torch.as_tensor(ui), torch.as_tensor(vi)] = True
        return keep & self.allowed


def n_nodes(keep, index: EdgeIndex) -> int:
    """Nodes a circuit touches, as (layer, type, index) the way edge rows name them: a head's
    q, k and v inputs and its output are one node; the target is one node."""
    ui, vi = keep.nonzero(as_tuple=True)
    return len({index.up_keys[u] for u in ui.tolist()} | {index.down_keys[v] for v in vi.tolist()})


def select_edges(df, method: str, size: float, node_threshold: float):
    """One prompt's stored edges kept by a method at one size (a Polars frame of edge rows)."""
    import polars as pl

    from actwh.queries.circuit import influence_prune

    if method == "top-n":
        return df.sort(pl.col("value").abs(), descending=True, maintain_order=True).head(int(size))
    if method == "threshold":
        return df.filter(pl.col("value").abs() >= size)
    if method == "influence":
        if df.height == 0:
            return df
        kept = influence_prune(df.drop("prompt_id"), node_threshold, size).edges
        return kept.select([c for c in df.columns if c != "prompt_id"])
    raise ActwhError(f"unknown circuit method {method!r}; valid: {', '.join(METHODS)}")


def selection_name(method: str, size: float, node_threshold: float) -> str:
    if method == "top-n":
        return f"top-n:{int(size)}"
    if method == "threshold":
        return f"threshold:{size:g}"
    return f"influence:{node_threshold:g}/{size:g}"


# --- the evaluation --------------------------------------------------------------------------

def load_run_model(run: dict, device: str | None):
    """The run's model as populate loaded it (dtype, spliced autoencoders)."""
    import torch

    from actwh.compute.loading import load_model

    opts = run["options"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}[opts.get("dtype", "float32")]
    loaded = load_model(opts.get("model"), device=device, dtype=dtype)
    if opts.get("saes"):
        from actwh.compute.sae import load_sae, splice

        for folder, site in opts["saes"]:
            splice(loaded.model, load_sae(folder, site))
    return loaded


def make_batch(loaded, chunk, with_corrupt: bool):
    import torch

    from actwh.compute.targets import Batch

    n = max(len(e.ids) for e in chunk)
    pad = loaded.tokenizer.pad_token_id or 0
    tokens = torch.tensor([e.ids + [pad] * (n - len(e.ids)) for e in chunk])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in chunk])
    ids = lambda attr: (torch.tensor([getattr(e, attr) for e in chunk])  # noqa: E731
                        if getattr(chunk[0], attr) is not None else None)
    positions = None
    if any(e.position is not None for e in chunk):
        positions = torch.tensor([len(e.ids) - 1 if e.position is None else e.position
                                  for e in chunk])
    bad = None
    if with_corrupt:
        bad = torch.tensor([e.corrupt + [pad] * (n - len(e.corrupt)) for e in chunk])
    return Batch(tokens, mask, ids("target"), ids("distractor"), positions), bad


def in_batches(encoded, batch_size: int, progress: bool | None):
    """`encoded` in batches of `batch_size`; prompts done, tokens/s and ETA on stderr when it is
    a terminal (or when `progress` says so), nothing when piped."""
    from actwh.runner import Progress

    bar = Progress(len(encoded), progress)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        yield chunk
        bar.update(len(chunk), sum(len(e.ids) for e in chunk))
    bar.close()


def encoded_prompts(wh, run: dict, loaded, target, ids, need_corrupt: bool):
    """The run's prompts re-read from its prompt file and checked against what it stored."""
    from actwh.compute.prompts import read_prompts
    from actwh.runner import encode_all

    opts = run["options"]
    path = opts["prompts"]
    if not os.path.exists(path):
        raise PromptError(f"run {run['run_id']}'s prompt file {path} is gone")
    specs = {p.prompt_id: p for p in read_prompts(path)}
    stored = dict(wh.sql("SELECT prompt_id, text FROM prompts WHERE run_id = $run",
                         run=run["run_id"]).iter_rows())
    for i in ids:
        if i not in stored:
            raise ActwhError(f"run {run['run_id']} has no prompt {i}")
        if i not in specs or specs[i].text != stored[i]:
            raise PromptError(f"prompt {i} of {path} is not the text run {run['run_id']} stored")
    try:
        return encode_all(loaded, [specs[i] for i in ids], target, opts.get("prepend_bos", False),
                          need_corrupt=need_corrupt)
    except PromptError as e:
        if need_corrupt and "corrupt" in str(e):
            raise PromptError(f"{e} (--baseline corrupt needs one per prompt)") from None
        raise


def evaluate(db, run_id: int, opts: EvalOptions, circuit=None) -> EvalResult:
    """Evaluate one run's circuits; every input is checked before anything is written.

    circuit: a stored circuit (`actwh.queries.circuits.StoredCircuit`) evaluated on every
    prompt instead of per-prompt circuits from `opts.method`."""
    import torch

    from actwh.compute.patching import (LayerWrites, baseline_writes, mean_writes, run_patched,
                                        sparse_applies, upstream_writes)
    from actwh.compute.targets import get_target
    from actwh.warehouse.store import Warehouse

    if circuit is None and opts.method not in METHODS:
        raise ActwhError(f"unknown method {opts.method!r}; valid: {', '.join(METHODS)}")
    if opts.baseline not in BASELINES:
        raise ActwhError(f"unknown baseline {opts.baseline!r}; valid: {', '.join(BASELINES)}")
    if opts.batch_size < 1:
        raise ActwhError("--batch-size must be at least 1")
    if not 0 < opts.node_threshold <= 1:
        raise ActwhError("--node-threshold is a cumulative fraction in (0, 1]")
    method = "circuit" if circuit is not None else opts.method
    sizes = (0.0,) if circuit is not None else (opts.sizes or DEFAULT_SIZES[opts.method])
    if circuit is None:
        check_sizes(sizes, opts.method)
    wh = Warehouse(db)
    run = read_run(wh, run_id)
    all_ids = wh.sql("SELECT prompt_id FROM prompts WHERE run_id = $run ORDER BY prompt_id",
                     run=run_id)["prompt_id"].to_list()
    ids = list(all_ids if opts.prompts is None else dict.fromkeys(opts.prompts))
    missing = [i for i in ids if i not in set(all_ids)]
    if missing:
        raise ActwhError(f"run {run_id} has no prompt {missing[0]}")
    if not ids:
        raise ActwhError(f"run {run_id} has no prompts")
    edges = None
    if circuit is None:
        edges = read_edges(wh, run_id, ids)
        have = set(edges["prompt_id"].unique().to_list())
        lacking = [i for i in ids if i not in have]
        if lacking:
            raise ActwhError(f"run {run_id} has no component edges (summed over positions) for "
                             f"prompt {lacking[0]}; populate with --edges")
    elif circuit.run_id != run_id:
        raise ActwhError(f"circuit {circuit.circuit_id} belongs to run {circuit.run_id}, "
                         f"not {run_id}")
    target = get_target(run["target"])
    loaded = load_run_model(run, opts.device)
    model = loaded.model
    corrupt = opts.baseline == "corrupt"
    sparse = sparse_applies(model)
    encoded = encoded_prompts(wh, run, loaded, target, ids, corrupt)
    index = EdgeIndex(model)
    clean_metric = dict(wh.sql("SELECT prompt_id, metric FROM prompts WHERE run_id = $run",
                               run=run_id).iter_rows())

    def stored_clean(chunk):
        """The clean metric populate stored for these prompts (None: run the clean pass)."""
        got = [clean_metric.get(e.prompt_id) for e in chunk]
        if any(v is None or v != v for v in got):
            return None
        return torch.tensor(got, dtype=torch.float64)
    means = None
    if opts.baseline == "mean":
        everyone = encoded_prompts(wh, run, loaded, target, all_ids, False)
        chunks = [everyone[i:i + opts.batch_size] for i in range(0, len(everyone), opts.batch_size)]
        means = mean_writes(model, (make_batch(loaded, c, False)[0] for c in chunks))

    # circuits per prompt and size, worked out (and checked) before the model runs
    by_prompt = {}
    if circuit is None:
        for (pid,), df in edges.group_by("prompt_id", maintain_order=True):
            by_prompt[pid] = df
    plans: dict[int, list[tuple[str, object]]] = {}
    for e in encoded:
        plan = []
        for s in sizes:
            if circuit is not None:
                plan.append((f"circuit:{circuit.circuit_id}", circuit.mask(index)))
            else:
                kept = select_edges(by_prompt[e.prompt_id], opts.method, s, opts.node_threshold)
                plan.append((selection_name(opts.method, s, opts.node_threshold), index.mask(kept)))
        plans[e.prompt_id] = plan

    cols = {k: [] for k in ("prompt_id", "selection", "n_edges", "n_nodes", "metric",
                            "faithfulness")}
    full = index.allowed
    encoded.sort(key=lambda e: len(e.ids))
    with torch.no_grad():
        for chunk in in_batches(encoded, opts.batch_size, opts.progress):
            batch, bad = make_batch(loaded, chunk, corrupt)
            batch = batch.to(model.device)
            # a metric read at one position per prompt needs only those positions' logits
            at = None if run["target"] == "loss" else batch.scored_positions
            scored = batch if at is None else replace(batch, positions=torch.zeros_like(at))
            if corrupt:  # one pass gives the baseline writes and the baseline (= all patched) run
                if sparse:  # kept per layer: a node's write is formed only where it is needed
                    base, bad_logits = LayerWrites.of_run(model, bad, batch.mask, positions=at)
                else:
                    base, bad_logits = upstream_writes(model, bad, batch.mask, with_logits=True,
                                                       positions=at)
                low = target.metric(bad_logits, scored).double().cpu()
            else:  # all patched: no node runs, the target reads the baseline writes' sum
                if sparse and means is None:
                    base = LayerWrites.zeros(model, *batch.tokens.shape)
                else:
                    base = baseline_writes(model, batch, means if means is not None else "zero")
                none = torch.zeros(full.shape, dtype=torch.bool)
                low = target.metric(run_patched(model, batch, none, base=base, positions=at),
                                    scored).double().cpu()
            clean = stored_clean(chunk)
            if clean is None:
                clean = target.metric(model(batch.tokens, batch.mask), batch).double().cpu()
            span = clean - low

            def add(i, sel, keep_n, nodes, metric):
                f = (metric - low[i]) / span[i] if span[i] != 0 else float("nan")
                cols["prompt_id"].append(chunk[i].prompt_id)
                cols["selection"].append(sel)
                cols["n_edges"].append(keep_n)
                cols["n_nodes"].append(nodes)
                cols["metric"].append(float(metric))
                cols["faithfulness"].append(None if span[i] == 0 else float(f))
            for i in range(len(chunk)):
                add(i, "none", 0, 0, low[i])
                add(i, "all", int(full.sum()), n_nodes(full, index), clean[i])
            seen: dict[tuple, float] = {}
            for k in range(len(sizes)):
                masks = torch.stack([plans[e.prompt_id][k][1] for e in chunk])
                key = (masks.numpy().tobytes(),)
                if key in seen:  # the same circuits as an earlier size: no second pass
                    metric = seen[key]
                else:
                    logits = run_patched(model, batch, masks, base=base, positions=at)
                    metric = seen[key] = target.metric(logits, scored).double().cpu()
                for i, e in enumerate(chunk):
                    add(i, plans[e.prompt_id][k][0], int(masks[i].sum()), n_nodes(masks[i], index),
                        metric[i])
    provenance = {"method": method, "sizes": list(sizes), "baseline": opts.baseline,
                  "prompts": ids, "node_threshold": opts.node_threshold,
                  "target": run["target"], "edges": run["options"].get("edges"),
                  "circuit_id": None if circuit is None else circuit.circuit_id,
                  "batch_size": opts.batch_size, "device": str(model.device)}
    eval_id = write_evals(db, run_id, method, opts.baseline, cols, provenance)
    return EvalResult(eval_id, cols)


NODE_RANKERS = ("attn_act_times_grad", "mlp_act_times_grad", "sae_act_times_grad",
                "attn_attribution", "mlp_attribution", "sae_attribution")


def patched_sites(model) -> dict[tuple[int, str], str]:
    """The sites node circuits patch, by (layer, node type): every head's z and neuron's
    activation, and every spliced autoencoder's latents."""
    from actwh.compute.patching import node_sites
    from actwh.compute.sae import spliced

    out = {(L, t): node_sites(model, t, L)[0][0] for L in range(model.cfg.n_layers)
           for t in ("attn_head", "mlp_neuron")}
    out.update({(s.info.layer, "sae_latent"): node_sites(model, "sae_latent", s.info.layer)[0][0]
                for s in spliced(model)})
    return out


def evaluate_nodes(db, run_id: int, opts: EvalOptions, scalars: tuple[str, ...] | None = None) -> EvalResult:
    """Node circuits: per prompt the top-n heads, neurons and autoencoder latents by |Σ over
    positions| of a stored node scalar keep their activations; every other head's z, neuron's
    activation and latent is patched to its baseline at every position (activation patching of
    their writes). Rows go to circuit_evals with selection `nodes:top-n:N` and n_edges 0; `none`
    patches every one of them, `all` is the clean run. Per batch: one patched pass per size and
    one for the baseline; the clean metric is the one populate stored."""
    import torch

    from actwh.compute.patching import mean_acts, run_nodes_patched, site_units
    from actwh.compute.targets import get_target
    from actwh.warehouse.store import Warehouse

    if opts.baseline not in BASELINES:
        raise ActwhError(f"unknown baseline {opts.baseline!r}; valid: {', '.join(BASELINES)}")
    if opts.method != "top-n":
        raise ActwhError("node circuits are chosen by --method top-n (sizes: node counts)")
    sizes = opts.sizes or (1, 2, 5, 10, 20, 50)
    check_sizes(sizes, "top-n")
    wh = Warehouse(db)
    run = read_run(wh, run_id)
    stored = set(run["scalars"].split(","))
    rankers = list(scalars) if scalars else [s for s in NODE_RANKERS if s in stored]
    bad = [s for s in rankers if s not in stored or s not in NODE_RANKERS]
    if bad or not rankers:
        raise ActwhError(f"node circuits rank heads, neurons and latents by a stored scalar of "
                         f"{', '.join(NODE_RANKERS)}; run {run_id} has {run['scalars']}")
    all_ids = wh.sql("SELECT prompt_id FROM prompts WHERE run_id = $run ORDER BY prompt_id",
                     run=run_id)["prompt_id"].to_list()
    ids = list(all_ids if opts.prompts is None else dict.fromkeys(opts.prompts))
    for i in ids:
        if i not in set(all_ids):
            raise ActwhError(f"run {run_id} has no prompt {i}")
    scores = wh.sql("SELECT prompt_id, layer, node_type::VARCHAR AS node_type, node_index, "
                    "abs(sum(value)) AS score FROM node_scalars WHERE run_id = $run AND "
                    "list_contains($scalars, scalar::VARCHAR) AND list_contains($prompts, prompt_id) "
                    "GROUP BY ALL ORDER BY prompt_id, score DESC, layer, node_type, node_index",
                    run=run_id, scalars=rankers, prompts=ids)
    by_prompt = {pid: df.rows() for (pid,), df in scores.group_by("prompt_id", maintain_order=True)}
    clean_metric = dict(wh.sql("SELECT prompt_id, metric FROM prompts WHERE run_id = $run",
                               run=run_id).iter_rows())
    target = get_target(run["target"])
    loaded = load_run_model(run, opts.device)
    model = loaded.model
    site_of = patched_sites(model)
    flat = list(site_of.values())
    corrupt = opts.baseline == "corrupt"
    encoded = encoded_prompts(wh, run, loaded, target, ids, corrupt)
    means = None
    if opts.baseline == "mean":
        everyone = encoded_prompts(wh, run, loaded, target, all_ids, False)
        means = mean_acts(model, (make_batch(loaded, everyone[i:i + opts.batch_size], False)[0]
                                  for i in range(0, len(everyone), opts.batch_size)), flat)
    cols = {k: [] for k in ("prompt_id", "selection", "n_edges", "n_nodes", "metric",
                            "faithfulness")}
    encoded.sort(key=lambda e: len(e.ids))
    for chunk in in_batches(encoded, opts.batch_size, opts.progress):
        batch, bad_tokens = make_batch(loaded, chunk, corrupt)
        batch = batch.to(model.device)
        b, p = batch.tokens.shape
        with torch.no_grad():
            if corrupt:  # one pass: the baseline activations and the baseline (= all patched) run
                cache = model.run_with_cache(bad_tokens.to(model.device), flat,
                                             attention_mask=batch.mask)
                base, low_logits = cache.acts, cache.logits
            elif means is not None:
                pos = model.positions(batch.mask)
                base = {s: means[s][pos.clamp(max=means[s].shape[0] - 1)] for s in flat}
            else:
                base = {s: torch.zeros((), dtype=model.W_E.dtype, device=model.device) for s in flat}
        shapes = {s: site_units(model, s) for s in flat}
        total = sum(shapes.values())

        def masks(n):
            """Patch masks keeping each prompt's top n nodes (n None: none kept)."""
            m = {s: torch.ones(b, p, shapes[s], dtype=torch.bool, device=model.device) for s in flat}
            kept = []
            for i, e in enumerate(chunk):
                top = by_prompt.get(e.prompt_id, [])[: n or 0]
                kept.append(len(top))
                for _, layer, node_type, index, _ in top:
                    m[site_of[(layer, node_type)]][i, :, index] = False
            return m, kept
        if not corrupt:
            low_logits = run_nodes_patched(model, batch, masks(None)[0], base)
        low = target.metric(low_logits, batch).double().cpu()
        got = [clean_metric.get(e.prompt_id) for e in chunk]
        if any(v is None or v != v for v in got):
            with torch.no_grad():
                clean = target.metric(model(batch.tokens, batch.mask), batch).double().cpu()
        else:
            clean = torch.tensor(got, dtype=torch.float64)
        span = clean - low
        rows = [(i, "none", 0, low[i]) for i in range(len(chunk))]
        rows += [(i, "all", total, clean[i]) for i in range(len(chunk))]
        for n in sizes:
            m, kept = masks(int(n))
            metric = target.metric(run_nodes_patched(model, batch, m, base), batch).double().cpu()
            rows += [(i, f"nodes:top-n:{int(n)}", kept[i], metric[i]) for i in range(len(chunk))]
        for i, sel, k, metric in rows:
            cols["prompt_id"].append(chunk[i].prompt_id)
            cols["selection"].append(sel)
            cols["n_edges"].append(0)
            cols["n_nodes"].append(k)
            cols["metric"].append(float(metric))
            cols["faithfulness"].append(None if span[i] == 0 else
                                        float((metric - low[i]) / span[i]))
    provenance = {"kind": "nodes", "method": "top-n", "sizes": list(sizes),
                  "baseline": opts.baseline, "prompts": ids, "scalars": rankers,
                  "target": run["target"], "batch_size": opts.batch_size,
                  "device": str(model.device)}
    return EvalResult(write_evals(db, run_id, "nodes", opts.baseline, cols, provenance), cols)


@contextmanager
def new_evaluation(db, run_id: int, provenance: dict):
    """One transaction that adds an `evaluations` row (its provenance) and yields
    (connection, eval_id) for the rows measured under it (circuit_evals, node/edge_effects)."""
    from actwh.compute.scalars import NODE_TYPES, SCALARS
    from actwh.warehouse.schema import create_missing_tables
    from actwh.warehouse.store import WarehouseWriter, _now

    writer = WarehouseWriter(db, NODE_TYPES, tuple(SCALARS))
    with writer.transaction() as con:
        create_missing_tables(con)
        eval_id = con.execute("SELECT coalesce(max(eval_id), 0) + 1 FROM evaluations").fetchone()[0]
        con.execute("INSERT INTO evaluations VALUES ($id, $run, $at, $version, $options)",
                    {"id": eval_id, "run": run_id, "at": _now(), "version": __version__,
                     "options": json.dumps(provenance)})
        yield con, eval_id


def write_evals(db, run_id: int, method: str, baseline: str, cols: dict, provenance: dict) -> int:
    """One evaluation's provenance row and its circuit_evals rows, in one transaction."""
    import pyarrow as pa

    n = len(cols["prompt_id"])
    with new_evaluation(db, run_id, provenance) as (con, eval_id):
        rows = pa.table({
            "eval_id": pa.array([eval_id] * n, pa.int32()),
            "run_id": pa.array([run_id] * n, pa.int32()),
            "prompt_id": pa.array(cols["prompt_id"], pa.int32()),
            "method": pa.array([method] * n, pa.string()),
            "selection": pa.array(cols["selection"], pa.string()),
            "n_edges": pa.array(cols["n_edges"], pa.int32()),
            "n_nodes": pa.array(cols["n_nodes"], pa.int32()),
            "baseline": pa.array([baseline] * n, pa.string()),
            "metric": pa.array(cols["metric"], pa.float64()),
            "faithfulness": pa.array(cols["faithfulness"], pa.float64()),
        })
        con.register("eval_rows", rows)
        con.execute("INSERT INTO circuit_evals BY NAME SELECT * FROM eval_rows")
        con.unregister("eval_rows")
    return eval_id
