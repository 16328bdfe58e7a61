"""Peers: act × grad for every neuron and every head (the same node scalars: neuron activation ×
its gradient; head output · gradient = z · ∂metric/∂z summed over d_head) with actwh, with
TransformerLens 4.3 (`TransformerBridge` caching forward and backward hooks, either only the
two sites read or every hook as `run_with_cache` does by default, then the products a
researcher would write) and with nnsight 0.8 (a trace saving values and gradients), on the
same checkpoint and batch.

    pip install -e '.[bench]'; python benchmarks/bench_peers.py [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import emit, gpt2_small_shaped, timeit_pair

SCALARS = ("mlp_act_times_grad", "attn_head_act_times_grad")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    try:
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

    def ours_step():
        return compute_scalars(loaded.model, b, "logit_diff", SCALARS)

    bridge = TransformerBridge.boot_transformers(str(folder), tokenizer=AutoTokenizer.from_pretrained(folder))
    bridge.to(device)
    names = {f"blocks.{L}.{s}" for L in range(cfg.n_layers) for s in ("mlp.hook_post", "attn.hook_z")}
    t = tokens.to(device)
    rows = torch.arange(args.batch, device=device)

    def metric(logits):
        return (logits[rows, -1, t[:, -1]] - logits[rows, -1, t[:, -2]]).sum()

    def tl_step(every_hook: bool = False):
        # every_hook: what `run_with_cache` does by default (the anchor); else only the
        # two sites the scalars read, the fairest TransformerLens can be made
        cache = bridge.add_caching_hooks(None if every_hook else (lambda n: n in names), incl_bwd=True)
        metric(bridge(t)).backward()
        bridge.reset_hooks()
        # Caching every hook stores the bridge's canonical names: hook_post is the input of
        # mlp.out, hook_z the input of attn.o.
        post, z = ("mlp.out.hook_in", "attn.o.hook_in") if every_hook else ("mlp.hook_post", "attn.hook_z")
        mlp = torch.stack([cache[f"blocks.{L}.{post}"] * cache[f"blocks.{L}.{post}_grad"]
                           for L in range(cfg.n_layers)])
        heads = torch.stack([(cache[f"blocks.{L}.{z}"] * cache[f"blocks.{L}.{z}_grad"]).sum(-1)
                             for L in range(cfg.n_layers)])
        return mlp, heads

    from importlib.metadata import version

    common = dict(device=device, model="gpt2-small-shaped-random", batch=args.batch, seq=args.seq)
    tl = f"transformer_lens_{version('transformer-lens')}"
    # each peer is timed in rounds alternating with actwh's own step (timeit_pair)
    ours, theirs = timeit_pair(ours_step, tl_step)
    emit("act_times_grad_all_nodes", ours, "s/batch", tl, theirs, **common)
    ours, theirs = timeit_pair(ours_step, lambda: tl_step(every_hook=True))
    emit("act_times_grad_all_nodes", ours, "s/batch", f"{tl}_caching_every_hook", theirs, **common)
    try:
        from nnsight import LanguageModel
    except ImportError:
        return
    import transformers as T

    lm = LanguageModel(T.AutoModelForCausalLM.from_pretrained(folder).to(device),
                       tokenizer=AutoTokenizer.from_pretrained(folder))
    h = cfg.n_heads

    def nnsight_step():
        zs, posts, gz, gp = [], [], {}, {}
        with lm.trace(t):
            for L in range(cfg.n_layers):
                zs.append(lm.transformer.h[L].attn.c_proj.input.save())
                posts.append(lm.transformer.h[L].mlp.act.output.save())
            with metric(lm.lm_head.output).backward():
                for L in reversed(range(cfg.n_layers)):
                    gp[L] = posts[L].grad.save()
                    gz[L] = zs[L].grad.save()
        mlp = torch.stack([posts[L] * gp[L] for L in range(cfg.n_layers)])
        heads = torch.stack([(zs[L] * gz[L]).unflatten(-1, (h, -1)).sum(-1) for L in range(cfg.n_layers)])
        return mlp, heads

    ours, theirs = timeit_pair(ours_step, nnsight_step)
    emit("act_times_grad_all_nodes", ours, "s/batch", f"nnsight_{version('nnsight')}", theirs, **common)


if __name__ == "__main__":
    main()
