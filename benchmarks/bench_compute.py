"""Compute overhead: actwh's populate compute (act × grad and direct effects for all heads and
neurons, top-k selection, columns) vs a bare transformers forward + backward of the same metric.

    python benchmarks/bench_compute.py [--batch 4] [--seq 128] [--model DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import emit, gpt2_small_shaped, timeit

SCALARS = ("mlp_act_times_grad", "mlp_direct_effect", "attn_act_times_grad", "attn_direct_effect",
           "attn_head_act_times_grad")


def run(model_dir: Path, name: str, batch: int, seq: int, device: str) -> None:
    import transformers as T

    from actwh.compute.loading import load_model
    from actwh.compute.scalars import compute_scalars
    from actwh.compute.selection import Selection
    from actwh.compute.targets import Batch
    from actwh.rows import to_columns

    loaded = load_model(model_dir, device=device)
    cfg = loaded.model.cfg
    seq = min(seq, cfg.n_ctx)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, cfg.d_vocab, (batch, seq), generator=g)
    b = Batch(tokens, torch.ones_like(tokens), tokens[:, -1], tokens[:, -2])
    sel = Selection.parse("top-k:20:mlp_act_times_grad")
    needed = sel.scalars_needed(SCALARS)

    def actwh_step():
        res = compute_scalars(loaded.model, b, "logit_diff", needed)
        to_columns(res, SCALARS, sel, list(range(batch)))

    hf = T.AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    hf_tokens = tokens.to(device)
    rows = torch.arange(batch, device=device)

    def bare_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(hf_tokens).logits
        metric = (logits[rows, -1, hf_tokens[:, -1]] - logits[rows, -1, hf_tokens[:, -2]]).sum()
        metric.backward()

    ours, bare = timeit(actwh_step), timeit(bare_step)
    n_tok = batch * seq
    common = dict(device=device, model=name, batch=batch, seq=seq)
    emit("compute_tokens_per_s", n_tok / ours, "tokens/s", "hf_forward_backward_tokens_per_s",
         n_tok / bare, **common)
    emit("compute_overhead", ours, "s/batch", "hf_forward_backward", bare, **common)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from actwh.compute.loading import DEFAULT_MODEL_DIR

    if args.model:
        run(Path(args.model), Path(args.model).name, args.batch, args.seq, device)
        return
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        run(DEFAULT_MODEL_DIR, "default", args.batch, args.seq, device)
    folder = gpt2_small_shaped(Path(tempfile.gettempdir()) / "actwh-bench-gpt2-small")
    run(folder, "gpt2-small-shaped-random", args.batch, args.seq, device)


if __name__ == "__main__":
    main()
