"""`actwh verify`: measured effects beside predicted attributions.

For each prompt of a run, the top N stored predictions by |value|, each measured alone:
- nodes (`node_scalars` rows of act × grad or attribution scalars): the node's activation at
  that position patched to its baseline (zero by default: act × grad predicts zero ablation);
- edges (the run's component-graph edges): that edge alone patched, per its downstream input,
  to the baseline of the run's edges (the corrupted prompt, or zero).
measured = clean metric − patched metric, the quantity a first-order attribution predicts.
Rows go to `node_effects` / `edge_effects` beside `predicted`; the evaluation's options to
`evaluations`. One patched forward pass per rank (the k-th prediction of every prompt of a batch
at once), so a batch costs N passes.
"""

from __future__ import annotations


from actwh.errors import ActwhError

NODE_SCALARS = ("attn_act_times_grad", "mlp_act_times_grad", "mlp_layer_act_times_grad",
                "token_attribution", "sae_act_times_grad", "sae_error_act_times_grad")
INSERT_SQL = {"node_effects": "INSERT INTO node_effects BY NAME SELECT * FROM effect_rows",
              "edge_effects": "INSERT INTO edge_effects BY NAME SELECT * FROM effect_rows"}
PATCHABLE = ("embed", "attn_head", "mlp", "mlp_neuron", "sae_latent", "sae_error")


def parse_top(text: str) -> int:
    kind, _, n = text.partition(":")
    if kind != "top" or not n.isdigit() or int(n) < 1:
        raise ActwhError(f"bad selection {text!r}: use top:N")
    return int(n)


def verify(db, run_id: int, what: str, top: int, baseline: str | None = None,
           prompts: tuple[int, ...] | None = None, scalars: tuple[str, ...] | None = None,
           batch_size: int = 8, device: str | None = None, progress: bool | None = None) -> int:
    """Measure the top `top` predictions of each prompt; returns the evaluation id."""
    import torch

    from actwh.compute.patching import (baseline_writes, mean_acts, mean_writes, node_masks,
                                        node_sites, run_nodes_patched, run_patched,
                                        site_baselines)
    from actwh.compute.targets import get_target
    from actwh.evaluate import (EdgeIndex, encoded_prompts, in_batches, load_run_model,
                                make_batch, read_edges, read_run)
    from actwh.warehouse.store import Warehouse

    if what not in ("nodes", "edges"):
        raise ActwhError("verify --nodes or --edges")
    if top < 1:
        raise ActwhError("top:N needs N ≥ 1")
    wh = Warehouse(db)
    run = read_run(wh, run_id)
    edge_opts = run["options"].get("edges") or {}
    if baseline is None:
        baseline = ("corrupt" if edge_opts.get("baseline") == "corrupt" else "zero") \
            if what == "edges" else "zero"
    if baseline not in ("zero", "corrupt", "mean"):
        raise ActwhError(f"unknown baseline {baseline!r}; valid: zero, corrupt, mean")
    all_ids = wh.sql("SELECT prompt_id FROM prompts WHERE run_id = $run ORDER BY prompt_id",
                     run=run_id)["prompt_id"].to_list()
    ids = all_ids if prompts is None else list(dict.fromkeys(prompts))
    for i in ids:
        if i not in set(all_ids):
            raise ActwhError(f"run {run_id} has no prompt {i}")
    if what == "nodes":
        stored = set(run["scalars"].split(","))
        wanted = list(scalars) if scalars else [s for s in NODE_SCALARS if s in stored]
        from actwh.compute.scalars import SCALARS

        for s in wanted:
            if s not in stored:
                raise ActwhError(f"run {run_id} did not store scalar {s!r}")
            info = SCALARS.get(s)
            if info is not None and info.node_type not in PATCHABLE:
                raise ActwhError(f"cannot verify {s!r}: its {info.node_type} nodes cannot be "
                                 f"patched alone (patchable: {', '.join(PATCHABLE)})")
        if not wanted:
            raise ActwhError(f"run {run_id} stored no act × grad scalar to verify")
        preds = wh.sql(
            "SELECT prompt_id, position, layer, node_type::VARCHAR AS node_type, node_index, "
            "scalar::VARCHAR AS scalar, value FROM node_scalars WHERE run_id = $run "
            "AND list_contains($scalars, scalar::VARCHAR) AND list_contains($prompts, prompt_id) "
            "AND list_contains($types, node_type::VARCHAR) "
            "QUALIFY row_number() OVER (PARTITION BY prompt_id, scalar ORDER BY abs(value) DESC, "
            "layer, node_index, position) <= $top ORDER BY prompt_id, scalar, abs(value) DESC",
            run=run_id, scalars=wanted, prompts=ids, types=list(PATCHABLE), top=top)
        found = set(preds["scalar"].unique().to_list())
        lacking = [s for s in wanted if s not in found]
        if lacking:
            raise ActwhError(f"cannot verify {lacking[0]!r}: run {run_id} has no per-node values of "
                             "it for these prompts (attention-pattern scalars are per query and key)")
    else:
        edges = read_edges(wh, run_id, ids)
        if edges.height == 0:
            raise ActwhError(f"run {run_id} has no component edges; populate with --edges")
        import polars as pl

        preds = edges.with_columns(pl.col("value").abs().alias("mag")).sort(
            ["prompt_id", "mag"], descending=[False, True]).group_by(
            "prompt_id", maintain_order=True).head(top).drop("mag")
    target = get_target(run["target"])
    loaded = load_run_model(run, device)
    model = loaded.model
    corrupt = baseline == "corrupt"
    encoded = encoded_prompts(wh, run, loaded, target, ids, corrupt)
    index = None
    if what == "edges":
        import polars as pl

        index = EdgeIndex(model)
        ui, vi = index.indices(preds)
        preds = preds.with_columns(pl.Series("_u", ui), pl.Series("_v", vi))
    by_prompt = {pid: df for (pid,), df in preds.group_by("prompt_id", maintain_order=True)}
    sites = None
    if what == "nodes":
        sites = sorted({s for r in preds.iter_rows(named=True)
                        for s, _ in node_sites(model, r["node_type"], r["layer"])})
    means = None
    if baseline == "mean":
        everyone = encoded_prompts(wh, run, loaded, target, all_ids, False)
        chunks = [make_batch(loaded, everyone[i:i + batch_size], False)[0]
                  for i in range(0, len(everyone), batch_size)]
        means = mean_writes(model, chunks) if what == "edges" else mean_acts(model, chunks, sites)
    out = []
    encoded.sort(key=lambda e: len(e.ids))
    for chunk in in_batches(encoded, batch_size, progress):
        batch, bad = make_batch(loaded, chunk, corrupt)
        batch = batch.to(model.device)
        with torch.no_grad():
            clean = target.metric(model(batch.tokens, batch.mask), batch).double().cpu()
        rows = [by_prompt[e.prompt_id].to_dicts() if e.prompt_id in by_prompt else []
                for e in chunk]
        base_arg = bad if corrupt else (means if means is not None else "zero")
        if what == "edges":
            base = baseline_writes(model, batch, base_arg)
        elif sites:
            base = site_baselines(model, batch, sites, base_arg)
        for k in range(max(map(len, rows), default=0)):
            live = [i for i, r in enumerate(rows) if len(r) > k]
            if what == "edges":
                keep = index.allowed[None].repeat(len(chunk), 1, 1)
                for i in live:
                    keep[i, rows[i][k]["_u"], rows[i][k]["_v"]] = False
                logits = run_patched(model, batch, keep, base=base)
            else:
                nodes = [[(r[k]["layer"], r[k]["node_type"], r[k]["node_index"], r[k]["position"])]
                         if len(r) > k else [] for r in rows]
                logits = run_nodes_patched(model, batch, node_masks(model, batch, nodes), base)
            patched = target.metric(logits, batch).double().cpu()
            for i in live:
                out.append({**rows[i][k], "measured": float(clean[i] - patched[i])})
    provenance = {"kind": "verify", "what": what, "top": top, "baseline": baseline,
                  "prompts": ids, "scalars": scalars and list(scalars), "target": run["target"],
                  "edges": edge_opts or None, "batch_size": batch_size,
                  "device": str(model.device)}
    return write_effects(db, run_id, what, baseline, out, provenance)


def write_effects(db, run_id: int, what: str, baseline: str, rows: list[dict], provenance) -> int:
    import pyarrow as pa

    from actwh.evaluate import new_evaluation

    n = len(rows)
    col = lambda k, t: pa.array([r[k] for r in rows], t)  # noqa: E731
    with new_evaluation(db, run_id, provenance) as (con, eval_id):
        common = {"eval_id": pa.array([eval_id] * n, pa.int32()),
                  "run_id": pa.array([run_id] * n, pa.int32()),
                  "prompt_id": col("prompt_id", pa.int32()),
                  "baseline": pa.array([baseline] * n, pa.string()),
                  "predicted": col("value", pa.float64()),
                  "measured": col("measured", pa.float64())}
        if what == "nodes":
            table = pa.table({**common, "position": col("position", pa.int32()),
                              "layer": col("layer", pa.int32()),
                              "node_type": col("node_type", pa.string()),
                              "node_index": col("node_index", pa.int32()),
                              "scalar": col("scalar", pa.string())})
            name = "node_effects"
        else:
            table = pa.table({**common, **{k: col(k, t) for k, t in (
                ("up_layer", pa.int32()), ("up_type", pa.string()), ("up_index", pa.int32()),
                ("down_layer", pa.int32()), ("down_type", pa.string()),
                ("down_index", pa.int32()), ("down_input", pa.string()))},
                "method": pa.array([(provenance["edges"] or {}).get("method", "EAP")] * n,
                                   pa.string())})
            name = "edge_effects"
        con.register("effect_rows", table)
        con.execute(INSERT_SQL[name])
        con.unregister("effect_rows")
    return eval_id
