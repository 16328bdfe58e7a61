"""Circuit evaluation costs, in bare forward passes of the same batches timed in the same run.

- `evaluate_circuit_sizes`: k patched passes of random circuits holding 1/(k+1) ... k/(k+1) of
  the edges, a different one per prompt (so every node runs: the worst case) vs k bare forwards.
- `evaluate_whole_cost`: a whole `actwh evaluate` of the first k default top-n sizes on the
  circuits of a real run (EAP, corrupt baseline, every edge stored; the default model and a
  random GPT-2-small-shaped one on the default IOI prompts), under the corrupt and the zero
  baseline: the model's seconds per batch (every patched pass, and every other entry into the
  model's forward: the baseline run, timed around each call) against k bare forward passes; `forward_passes` is that time in bare passes,
  `patched_passes` the patched passes' share alone (the sizes' own cost, without the corrupted
  run that all sizes share) and `node_passes` the heads and MLPs those passes ran, in full
  passes' worth.

    python benchmarks/bench_evaluate.py [--batch 8] [--seq 32] [--sizes 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import emit, gpt2_small_shaped, timeit, timeit_pair


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--sizes", type=int, default=5)
    args = ap.parse_args()
    from actwh.compute.edges import downstream_nodes, upstream_nodes
    from actwh.compute.loading import DEFAULT_MODEL_DIR, load_model
    from actwh.compute.patching import allowed_edges, baseline_writes, run_patched
    from actwh.compute.targets import Batch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folders = [("default", DEFAULT_MODEL_DIR), ("gpt2-small-shaped-random", gpt2_small_shaped(
        Path(tempfile.gettempdir()) / "actwh-bench-gpt2-small"))]
    for name, folder in folders:
        model = load_model(folder, device=device).model
        cfg = model.cfg
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(3, cfg.d_vocab, (args.batch, args.seq), generator=g)
        bad = torch.randint(3, cfg.d_vocab, (args.batch, args.seq), generator=g)
        b = Batch(tokens, torch.ones_like(tokens), tokens[:, -1], tokens[:, -2]).to(device)
        U, V = len(upstream_nodes(model)), len(downstream_nodes(model))
        allowed = allowed_edges(model)
        # nested circuits of growing size, a different one per prompt (as evaluate builds them)
        scores = torch.rand(args.batch, U, V, generator=g).masked_fill(~allowed, -1)
        total = int(allowed.sum())
        masks = [scores >= scores.flatten(1).kthvalue(
            max(1, total - total * (k + 1) // (args.sizes + 1)), dim=1).values[:, None, None]
                 for k in range(args.sizes)]
        base = baseline_writes(model, b, bad.to(device))

        def patched():
            for m in masks:
                run_patched(model, b, m, base=base)

        def bare():
            with torch.no_grad():
                for _ in masks:
                    model(b.tokens, b.mask)

        ours, theirs = timeit_pair(patched, bare, repeat=3)
        common = dict(device=device, model=name, batch=args.batch, seq=args.seq, sizes=args.sizes)
        emit("evaluate_circuit_sizes", ours, "s/batch", "bare_forward_per_size", theirs, **common)
    whole_evaluate(args)


def gpt2_small_ioi(folder: Path) -> Path:
    """A random GPT-2-small-shaped checkpoint (GPT-2's vocabulary size) with the default model's
    tokenizer, so the default IOI prompts run on it."""
    import shutil

    import transformers as T

    from actwh.compute.loading import DEFAULT_MODEL_DIR

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        cfg = T.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                           bos_token_id=0, eos_token_id=0, pad_token_id=2)
        T.GPT2LMHeadModel(cfg).save_pretrained(folder)
        for f in Path(DEFAULT_MODEL_DIR).iterdir():
            if "token" in f.name or f.name.endswith((".txt", ".model")) or f.name == "vocab.json":
                shutil.copy(f, folder / f.name)
    return folder


def whole_evaluate(args) -> None:
    """A whole `actwh evaluate` of k top-n sizes (the default sizes' first k) on circuits from a
    real run (EAP, corrupt baseline, every edge stored): the model's time per batch (the
    baseline run and every patched pass, timed around each call) against k bare forward passes
    of the same batches, timed in the same process; and the nodes (attention heads, MLPs) those
    passes ran, in full forward passes' worth."""
    import json
    import time

    from actwh.compute import patching
    from actwh.compute.default_model import PROMPTS
    from actwh.compute.loading import DEFAULT_MODEL_DIR, load_model
    from actwh.compute.model import MLP, Attention, HookedTransformer
    from actwh.evaluate import DEFAULT_SIZES, EvalOptions, evaluate
    from actwh.runner import EdgeOptions, PopulateOptions, populate

    tmp = Path(tempfile.mkdtemp())
    rows = [json.loads(x) for x in open(PROMPTS / "ioi.jsonl")][: args.batch * 2]
    prompts = tmp / "ioi.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = [("default", Path(DEFAULT_MODEL_DIR)),
              ("gpt2-small-shaped-random", gpt2_small_ioi(Path(tempfile.gettempdir()) / "actwh-bench-gpt2-ioi"))]
    for name, folder in models:
        db = tmp / f"{name}.duckdb"
        populate(db, PopulateOptions(prompts=str(prompts), model=str(folder), device=device,
                                     edges=EdgeOptions(baseline="corrupt", select="dense"),
                                     batch_size=args.batch), progress=False)
        model = load_model(folder, device=device).model
        cfg = model.cfg
        per_pass = cfg.n_layers * (cfg.n_heads + 1)
        spent, patched, batches, work = [0.0], [0.0], [], [0]

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        inside = [False]  # in a patched pass (whose hooked form runs the model's forward)

        def timed_patched(m, b, *a, **k):
            sync()
            t0 = time.perf_counter()
            inside[0] = True
            try:
                out = saved[0](m, b, *a, **k)
            finally:
                inside[0] = False
            sync()
            spent[0] += time.perf_counter() - t0
            patched[0] += time.perf_counter() - t0  # the zero/mean baselines' all-patched one too
            batches.append((b.tokens, b.mask))
            return out

        def timed_forward(self, *a, **k):  # every other entry into the model: the baseline run
            if inside[0]:
                return saved[1](self, *a, **k)
            sync()
            t0 = time.perf_counter()
            out = saved[1](self, *a, **k)
            sync()
            spent[0] += time.perf_counter() - t0
            return out
        saved = (patching.run_patched, HookedTransformer.forward, Attention.attend, MLP.forward)
        attend, mlp_forward = saved[2], saved[3]
        patching.run_patched = timed_patched
        HookedTransformer.forward = timed_forward
        Attention.attend = lambda self, q, *a, **k: work.__setitem__(0, work[0] + q.shape[2]) or attend(self, q, *a, **k)
        MLP.forward = lambda self, x: work.__setitem__(0, work[0] + 1) or mlp_forward(self, x)
        try:
            for baseline in ("corrupt", "zero"):
                for k in range(1, len(DEFAULT_SIZES["top-n"]) + 1):
                    sizes = DEFAULT_SIZES["top-n"][:k]
                    evaluate(db, 1, EvalOptions("top-n", sizes, baseline, None, device=device,
                                                batch_size=args.batch))  # warm
                    spent[0], patched[0], work[0] = 0.0, 0.0, 0
                    batches.clear()
                    evaluate(db, 1, EvalOptions("top-n", sizes, baseline, None, device=device,
                                                batch_size=args.batch))
                    shapes = list({(t.data_ptr(), t.shape): (t, m) for t, m in batches}.values())
                    n_batches = len(shapes)
                    nodes = work[0] / n_batches / per_pass
                    Attention.attend, MLP.forward = attend, mlp_forward
                    HookedTransformer.forward = saved[1]

                    def bare():
                        with torch.no_grad():
                            for t, m in shapes:
                                model(t, m)
                    one = timeit(bare, repeat=5) / n_batches
                    Attention.attend = lambda self, q, *a, **kw: work.__setitem__(0, work[0] + q.shape[2]) or attend(self, q, *a, **kw)
                    MLP.forward = lambda self, x: work.__setitem__(0, work[0] + 1) or mlp_forward(self, x)
                    HookedTransformer.forward = timed_forward
                    ours = spent[0] / n_batches
                    emit("evaluate_whole_cost", ours, "s/batch", "bare_forward_x_sizes", one * k,
                         device=device, model=name, batch=args.batch, sizes=k,
                         baseline_kind=baseline, forward_passes=round(ours / one, 3),
                         patched_passes=round(patched[0] / n_batches / one, 3),
                         node_passes=round(nodes, 3))
        finally:
            patching.run_patched, HookedTransformer.forward, Attention.attend, MLP.forward = saved


if __name__ == "__main__":
    main()
