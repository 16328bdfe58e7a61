"""Peers: act × grad for every neuron and every head's attention (the same node scalars) with
actwh and with TransformerLens 4.3 (`TransformerBridge` caching forward and backward hooks, then
the products a researcher would write), on the same checkpoint and batch.

    pip install -e '.[bench]'; python benchmarks/bench_peers.py [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import emit, gpt2_small_shaped, timeit

SCALARS = ("mlp_act_times_grad", "attn_act_times_grad")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    try:
        import transformer_lens
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        print('{"name": "peers", "skipped": "transformer-lens not installed (pip install -e .[bench])"}')
        return
    from transformers import AutoTokenizer

    from actwh.compute.loading import load_model
    from actwh.compute.scalars import compute_scalars
    from actwh.compute.targets import Batch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = gpt2_small_shaped(Path(tempfile.gettempdir()) / "actwh-bench-gpt2-small")
    loaded = load_model(folder, device=device)
    cfg = loaded.model.cfg
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, cfg.d_vocab, (args.batch, args.seq), generator=g)
    b = Batch(tokens, torch.ones_like(tokens), tokens[:, -1], tokens[:, -2])
    ours = timeit(lambda: compute_scalars(loaded.model, b, "logit_diff", SCALARS))

    bridge = TransformerBridge.boot_transformers(str(folder), tokenizer=AutoTokenizer.from_pretrained(folder))
    bridge.to(device)
    names = {f"blocks.{L}.{s}" for L in range(cfg.n_layers) for s in ("mlp.hook_post", "attn.hook_pattern")}
    t = tokens.to(device)
    rows = torch.arange(args.batch, device=device)

    def tl_step():
        cache = bridge.add_caching_hooks(lambda n: n in names, incl_bwd=True)
        logits = bridge(t)
        (logits[rows, -1, t[:, -1]] - logits[rows, -1, t[:, -2]]).sum().backward()
        bridge.reset_hooks()
        mlp = torch.stack([cache[f"blocks.{L}.mlp.hook_post"] * cache[f"blocks.{L}.mlp.hook_post_grad"]
                           for L in range(cfg.n_layers)])
        attn = torch.stack([(cache[f"blocks.{L}.attn.hook_pattern"] *
                             cache[f"blocks.{L}.attn.hook_pattern_grad"]).sum(-1)
                            for L in range(cfg.n_layers)])
        return mlp, attn

    theirs = timeit(tl_step)
    from importlib.metadata import version

    emit("act_times_grad_all_nodes", ours, "s/batch", f"transformer_lens_{version('transformer-lens')}",
         theirs, device=device, model="gpt2-small-shaped-random", batch=args.batch, seq=args.seq)


if __name__ == "__main__":
    main()
