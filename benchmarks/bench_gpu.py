"""GPU figures for issue 18 in one script (benchmarks/gpu.sh runs every part, in this order):

    python benchmarks/bench_gpu.py plan --shape llama-8b --batch 4 --seq 2048 --max-memory 40GB
    python benchmarks/bench_gpu.py shapes     # compute step and edges vs bare forward + backward
    python benchmarks/bench_gpu.py memory     # edges' peak vs sequence length, measured and predicted
    python benchmarks/bench_gpu.py big        # 8B Llama-3 shape: populate --edges under --max-memory
    python benchmarks/bench_gpu.py populate   # populate end to end vs the compute step alone

`--small` swaps every shape for a tiny one, so each part runs on a CPU in seconds (how gpu.sh is
checked before it travels). One JSON line per figure (benchmarks/common.emit). Peak memory is
CUDA's own count (max_memory_allocated above what was allocated before the call); on a CPU,
torch.profiler's memory events (as tests/test_memory.py measures).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from common import emit, timeit_pair

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (transformers config class, its arguments, batch, seq)
SHAPES = {
    "gpt2-small": ("GPT2Config", dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257), 8, 512),
    "llama-1b": ("LlamaConfig", dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                     max_position_embeddings=8192, tie_word_embeddings=True,
                                     rope_theta=500000.0), 4, 512),
    "llama-8b": ("LlamaConfig", dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                     max_position_embeddings=8192, rope_theta=500000.0), 4, 2048),
}
SMALL = {
    "gpt2-small": ("GPT2Config", dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=512), 2, 32),
    "llama-1b": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8,
                                     num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                                     max_position_embeddings=512), 2, 32),
    "llama-8b": ("LlamaConfig", dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=8,
                                     num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                                     max_position_embeddings=512), 2, 128),
}


def hf_config(shape: str, small: bool):
    import transformers as T

    cls, kw, batch, seq = (SMALL if small else SHAPES)[shape]
    return getattr(T, cls)(**kw, bos_token_id=0, eos_token_id=0), batch, seq


def actwh_config(shape: str, small: bool):
    from actwh.compute.loading import config_from_hf

    cfg, batch, seq = hf_config(shape, small)
    return config_from_hf(cfg.to_dict()), batch, seq


def checkpoint(shape: str, small: bool, dtype=torch.float32) -> Path:
    """A random checkpoint of `shape` in HF format (built on the device, saved once per machine)."""
    import transformers as T

    from conftest import make_tokenizer

    folder = Path(tempfile.gettempdir()) / f"actwh-gpu-{shape}{'-small' if small else ''}-{str(dtype)[6:]}"
    if (folder / "config.json").exists():
        return folder
    cfg, _, _ = hf_config(shape, small)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return folder


def peak_of(fn):
    """(peak bytes allocated while fn runs, above what was allocated before; fn's result)."""
    if CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    now = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
                    key=lambda e: e.start_ns()):
        now += e.nbytes()
        peak = max(peak, now)
    return peak, out


def random_batch(cfg, batch: int, seq: int):
    from actwh.compute.targets import Batch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, cfg.d_vocab, (batch, seq), generator=g)
    return Batch(tokens, torch.ones_like(tokens), tokens[:, -1], tokens[:, -2])


SCALARS = ("mlp_act_times_grad", "mlp_direct_effect", "attn_act_times_grad", "attn_direct_effect",
           "attn_head_act_times_grad")


def shapes(args) -> None:
    """Per shape and dtype: the populate compute step and the component graph's edges against
    transformers' own forward + backward (weight gradients on, as a user's script runs it),
    timed alternately in one process; peak memory above the weights of each, and the planner's
    prediction for the edges."""
    import transformers as T

    from actwh.compute.edges import component_edges
    from actwh.compute.loading import load_model
    from actwh.compute.memory import predict
    from actwh.compute.scalars import compute_scalars
    from actwh.compute.selection import Selection, select_nodes
    from actwh.rows import node_columns

    for shape in ("gpt2-small", "llama-1b"):
        for dtype in (torch.float32, torch.bfloat16):
            folder = checkpoint(shape, args.small)
            loaded = load_model(folder, device=DEVICE, dtype=dtype)
            cfg = loaded.model.cfg
            _, batch, seq = hf_config(shape, args.small)
            b = random_batch(cfg, batch, seq).to(DEVICE)
            hf = T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(DEVICE)
            rows = torch.arange(batch, device=DEVICE)
            sel = Selection.parse("top-k:20:mlp_act_times_grad")
            needed = sel.scalars_needed(SCALARS)

            def bare():
                hf.zero_grad(set_to_none=True)
                logits = hf(b.tokens).logits
                (logits[rows, -1, b.target_ids] - logits[rows, -1, b.distractor_ids]).sum().backward()

            def step():
                res = compute_scalars(loaded.model, b, "logit_diff", needed)
                node_columns(select_nodes(res, SCALARS, sel), list(range(batch)), res.mask)

            def edges():
                return component_edges(loaded.model, b, "logit_diff")

            common = dict(device=DEVICE, model=shape, batch=batch, seq=seq, dtype=str(dtype)[6:])
            t_step, t_bare = timeit_pair(step, bare, repeat=args.repeat, warmup=1)
            emit("compute_step", t_step, "s/batch", "hf_forward_backward", t_bare, **common)
            t_edges, t_bare = timeit_pair(edges, bare, repeat=args.repeat, warmup=1)
            emit("edges_component_graph", t_edges, "s/batch", "hf_forward_backward", t_bare, **common)
            m_bare, _ = peak_of(bare)
            hf.zero_grad(set_to_none=True)
            m_step, _ = peak_of(step)
            m_edges, _ = peak_of(edges)
            emit("compute_step_peak_memory", m_step / 1e9, "GB", "hf_forward_backward_peak", m_bare / 1e9, **common)
            emit("edges_peak_memory", m_edges / 1e9, "GB", "hf_forward_backward_peak", m_bare / 1e9, **common)
            pred = predict(cfg, batch, seq, dtype).peak
            emit("edges_peak_predicted", pred / 1e9, "GB", "edges_peak_measured", m_edges / 1e9, **common)
            del hf, loaded
            if CUDA:
                torch.cuda.empty_cache()


def memory(args) -> None:
    """The edges' peak against sequence length (Llama-1B shape, one prompt, bf16): measured
    and predicted, one pass and under a budget of half the longest one-pass peak."""
    from actwh.compute.edges import component_edges
    from actwh.compute.loading import load_model
    from actwh.compute.memory import plan, predict
    from actwh.errors import ActwhError

    dtype = torch.bfloat16
    loaded = load_model(checkpoint("llama-1b", args.small), device=DEVICE, dtype=dtype)
    cfg = loaded.model.cfg
    lengths = (32, 64, 128) if args.small else (256, 1024, 2048)
    budget = None
    for seq in reversed(lengths):
        b = random_batch(cfg, 1, seq)
        got, _ = peak_of(lambda: component_edges(loaded.model, b, "logit_diff"))
        common = dict(device=DEVICE, model="llama-1b", batch=1, seq=seq, dtype="bfloat16")
        emit("edges_peak_vs_seq", got / 1e9, "GB", "predicted", predict(cfg, 1, seq, dtype).peak / 1e9, **common)
        budget = budget or int(got * 0.6)
        try:
            chunks, pred = plan(cfg, 1, seq, dtype, budget)
        except ActwhError as e:
            print(json.dumps({"name": "edges_peak_under_budget", "refused": str(e), **common}), flush=True)
            continue
        used, _ = peak_of(lambda: component_edges(loaded.model, b, "logit_diff", chunks=chunks))
        emit("edges_peak_under_budget", used / 1e9, "GB", "budget", budget / 1e9, predicted=round(pred.peak / 1e9, 3),
             chunks=str(chunks), **common)


def long_prompts(path: Path, n: int, words: int, seed: int = 0) -> Path:
    import random

    from conftest import WORDS

    rng = random.Random(seed)
    names = ["Mary", "John"]
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(words)), "target": names[i % 2],
             "distractor": names[1 - i % 2]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def big(args) -> None:
    """An 8B Llama-3-shaped random checkpoint (bf16): populate with --edges on 4 prompts × 2,048
    tokens under --max-memory (40GB), the peak against the budget; then, on prompts short enough
    for both, the edges with the chunks the long run used against one pass."""
    from actwh.compute.edges import component_edges
    from actwh.compute.loading import load_model
    from actwh.compute.memory import in_use, parse_memory, plan
    from actwh.errors import ActwhError
    from actwh.runner import EdgeOptions, PopulateOptions, populate

    budget = args.max_memory or ("6MB" if args.small else "40GB")
    _, batch, seq = hf_config("llama-8b", args.small)
    t0 = time.perf_counter()
    folder = checkpoint("llama-8b", args.small, torch.bfloat16)
    made = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp())
    prompts = long_prompts(tmp / "long.jsonl", batch, seq - 1)  # + BOS = seq tokens
    opts = PopulateOptions(prompts=str(prompts), model=str(folder), scalars=("mlp_act_times_grad",),
                           dtype="bfloat16", batch_size=batch, device=DEVICE, max_memory=budget,
                           edges=EdgeOptions(select="top-k:50"))
    common = dict(device=DEVICE, model="llama-8b", batch=batch, seq=seq, dtype="bfloat16")
    t0 = time.perf_counter()
    try:
        used, res = peak_of(lambda: populate(tmp / "wh.duckdb", opts, progress=False))
        weights = 0  # on CUDA the weights are allocated inside populate, so they are in `used`
        emit("populate_8b_edges_peak", used / 1e9, "GB", "max_memory", parse_memory(budget) / 1e9,
             wall_s=round(time.perf_counter() - t0, 1), status=res.status, checkpoint_s=round(made, 1),
             weights_gb=weights, **common)
    except ActwhError as e:
        print(json.dumps({"name": "populate_8b_edges", "refused": str(e), **common}), flush=True)
    if CUDA:
        torch.cuda.empty_cache()
    loaded = load_model(folder, device=DEVICE, dtype=torch.bfloat16)
    cfg = loaded.model.cfg
    try:
        chunks, _ = plan(cfg, batch, seq, torch.bfloat16, parse_memory(budget) - in_use(loaded.model))
    except ActwhError:
        from actwh.compute.edges import EdgeChunks

        chunks = EdgeChunks(rows=1, positions=seq // 8, groups=8)
    short = random_batch(cfg, batch, 64 if not args.small else 16)
    whole = component_edges(loaded.model, short, "logit_diff")
    got = component_edges(loaded.model, short, "logit_diff",
                          chunks=type(chunks)(rows=chunks.rows, positions=min(chunks.positions or 16, 16),
                                              groups=chunks.groups, recompute=chunks.recompute))
    diff = float((got.values - whole.values).abs().max() / whole.values.abs().max())
    emit("edges_chunked_vs_one_pass_max_rel_diff", diff, "relative", chunks=str(chunks), **{**common, "seq": short.tokens.shape[1]})


def populate_e2e(args) -> None:
    """populate end to end (runner API, 512 prompts × ~121 tokens, batch 32, default scalars)
    against the compute step's own throughput on the same batches."""
    from actwh.runner import PopulateOptions, populate

    folder = checkpoint("gpt2-small", args.small)
    tmp = Path(tempfile.mkdtemp())
    n, words = (32, 20) if args.small else (512, 120)
    prompts = long_prompts(tmp / "p.jsonl", n, words)
    opts = PopulateOptions(prompts=str(prompts), model=str(folder), batch_size=32, device=DEVICE)
    t0 = time.perf_counter()
    res = populate(tmp / "wh.duckdb", opts, progress=False)
    wall = time.perf_counter() - t0
    emit("populate_tokens_per_s", res.tokens / wall, "tokens/s", model="gpt2-small", device=DEVICE,
         batch=32, seq=words + 1, prompts=n, compute_seconds=round(res.seconds, 2), wall_s=round(wall, 2))


def plan_only(args) -> None:
    """The plan for a shape, batch, length and budget, without a model (no GPU needed)."""
    from actwh.compute.memory import parse_memory, plan, predict

    cfg, batch, seq = actwh_config(args.shape, args.small)
    batch, seq = args.batch or batch, args.seq or seq
    dtype = getattr(torch, args.dtype)
    one = predict(cfg, batch, seq, dtype)
    out = {"name": "edge_plan", "shape": args.shape, "batch": batch, "seq": seq, "dtype": args.dtype,
           "one_pass_gb": round(one.peak / 1e9, 3), "phases_gb": {k: round(v / 1e9, 3) for k, v in one.phases.items()}}
    hf, _, _ = hf_config(args.shape, args.small)
    with torch.device("meta"):
        import transformers as T

        n_params = sum(p.numel() for p in T.AutoModelForCausalLM.from_config(hf).parameters())
    weights = n_params * torch.empty((), dtype=dtype).element_size()
    out["weights_gb"] = round(weights / 1e9, 3)
    if args.max_memory:
        chunks, pred = plan(cfg, batch, seq, dtype, parse_memory(args.max_memory) - weights)
        out.update(max_memory=args.max_memory, chunks=str(chunks), predicted_gb=round(pred.peak / 1e9, 3))
    print(json.dumps(out), flush=True)


def report(args) -> None:
    """The JSON lines of a gpu.sh run as a Markdown section: written beside them, and appended
    to RESULTS.md for a run on a GPU (not for a --small smoke run)."""
    lines = [json.loads(x) for x in Path(args.jsonl).read_text().splitlines() if x.startswith("{")]
    setup = next((x for x in lines if x.get("name") == "setup" and "torch" in x), {})
    out = [f"\n## GPU run of benchmarks/gpu.sh ({time.strftime('%Y-%m-%d %H:%M')}, {setup.get('device', '?')}, "
           f"torch {setup.get('torch', '?')}, transformers {setup.get('transformers', '?')})\n",
           "| figure | model | batch × seq | dtype | value | baseline | ratio | more |", "|---|---|---|---|---|---|---|---|"]
    for x in lines:
        if x.get("name") in ("setup",) or x.get("name", "").endswith("_seconds") and "unit" not in x:
            continue
        known = {"name", "value", "unit", "baseline", "baseline_value", "ratio", "model", "batch", "seq", "dtype", "device"}
        more = {k: v for k, v in x.items() if k not in known}
        value = f"{x['value']} {x.get('unit', '')}" if "value" in x else ""
        base = f"{x.get('baseline') or ''} {x.get('baseline_value') if x.get('baseline_value') is not None else ''}"
        out.append(f"| {x['name']} | {x.get('model', '')} | {x.get('batch', '')} × {x.get('seq', '')} | "
                   f"{x.get('dtype', '')} | {value} | {base.strip()} | {x.get('ratio') or ''} | "
                   f"{json.dumps(more) if more else ''} |".replace("None", ""))
    total = next((x["value"] for x in lines if x.get("name") == "gpu_sh_seconds"), None)
    out.append(f"\ngpu.sh took {total} s.\n")
    text = "\n".join(out) + "\n"
    Path(args.jsonl).with_suffix(".md").write_text(text)
    if args.results and setup.get("cuda"):
        with open(args.results, "a") as f:
            f.write(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["plan", "shapes", "memory", "big", "populate", "report"])
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-8b")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--jsonl", default=None, help="report: gpu.sh's JSON lines")
    ap.add_argument("--results", default=None, help="report: append to this RESULTS.md (GPU runs only)")
    args = ap.parse_args()
    {"plan": plan_only, "shapes": shapes, "memory": memory, "big": big, "populate": populate_e2e,
     "report": report}[args.part](args)


if __name__ == "__main__":
    main()
