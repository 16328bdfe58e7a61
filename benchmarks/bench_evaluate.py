"""Circuit evaluation: k circuit sizes of a batch (one patched forward pass each, every
downstream input patched per prompt) vs k bare forward passes of the same model; and how many
forward passes a whole `actwh evaluate` of k sizes makes per batch (the baseline run included;
the clean metric is the one populate stored), counted on the default model's IOI prompts.

    python benchmarks/bench_evaluate.py [--batch 8] [--seq 32] [--sizes 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import emit, gpt2_small_shaped, timeit_pair


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
        calls = [0]
        hook = model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        patched()
        hook.remove()
        emit("evaluate_forward_passes", calls[0], "passes/batch", "sizes", args.sizes, **common)
    whole_evaluate(args)


def whole_evaluate(args) -> None:
    """Every forward pass of `evaluate` (any entry into the model), per batch, per baseline."""
    import json

    from actwh.compute.default_model import PROMPTS
    from actwh.compute.model import HookedTransformer
    from actwh.evaluate import EvalOptions, evaluate
    from actwh.runner import EdgeOptions, PopulateOptions, populate

    tmp = Path(tempfile.mkdtemp())
    rows = [json.loads(x) for x in open(PROMPTS / "ioi.jsonl")][: args.batch * 2]
    prompts = tmp / "ioi.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp / "wh.duckdb"
    populate(db, PopulateOptions(prompts=str(prompts), scalars=("attn_act_times_grad",),
                                 edges=EdgeOptions(baseline="corrupt"), batch_size=args.batch),
             progress=False)
    calls = [0]
    forward = HookedTransformer.forward

    def counting(self, *a, **k):
        calls[0] += 1
        return forward(self, *a, **k)
    HookedTransformer.forward = counting
    try:
        for baseline in ("corrupt", "zero"):
            calls[0] = 0
            sizes = tuple(range(1, args.sizes + 1))
            evaluate(db, 1, EvalOptions("top-n", sizes, baseline, None, batch_size=args.batch))
            emit("evaluate_whole_forward_passes", calls[0] / 2, "passes/batch", "sizes",
                 args.sizes, model="default", batch=args.batch, baseline_kind=baseline)
    finally:
        HookedTransformer.forward = forward


if __name__ == "__main__":
    main()
