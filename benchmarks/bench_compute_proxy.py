"""CPU proxies for the GPU compute step (issue 18): what launches kernels and what stalls the host.

For the populate compute step (`compute_scalars`: act × grad and direct effects of all heads and
neurons, logit_diff target) and for a bare transformers forward + backward of the same metric
(weight gradients on, as a user's script does), on the same checkpoint and batch:
- `ops`: operators that reach the dispatcher below autograd (forward and backward; views and
  other metadata-only operators left out), counted with a TorchDispatchMode: on a GPU each
  is (at least) one kernel launch;
- `host_syncs`: those of them that make a GPU step wait for the device (nonzero, item / bool /
  int, unique, masked_select, repeat_interleave without output_size) plus calls of .cpu(),
  .tolist() and .numpy() (which dispatch nothing on a CPU-only machine);
- `seconds`: the step's wall time (medians, timed alternately with the bare step; float32 only:
  bfloat16 matmuls are emulated on this CPU, so bfloat16 gets counts only, on a 1 × 8 batch).
The same measurement runs in a child process on this tree and on `--before` (a commit, default
the main of issue 18's start), so the before/after figures come from one run.

    python benchmarks/bench_compute_proxy.py [--before b84f5c4] [--batch 2] [--seq 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import emit

ROOT = Path(__file__).resolve().parents[1]
SCALARS = ("mlp_act_times_grad", "mlp_direct_effect", "attn_act_times_grad", "attn_direct_effect",
           "attn_head_act_times_grad")
VIEWS = {"view", "as_strided", "reshape", "permute", "unsqueeze", "expand", "transpose", "t",
         "_unsafe_view", "squeeze", "detach", "alias", "slice", "select", "_reshape_alias",
         "unflatten", "flatten", "split", "split_with_sizes", "chunk", "lift_fresh", "diagonal",
         "unbind", "view_as", "promote_types", "result_type", "is_same_size",
         "resolve_conj", "resolve_neg", "empty", "empty_strided", "empty_like", "new_empty",
         "new_empty_strided", "set_", "_has_compatible_shallow_copy_type"}
SYNCS = {"nonzero", "_local_scalar_dense", "item", "is_nonzero", "_unique2", "unique_dim",
         "unique_consecutive", "masked_select", "equal"}


def checkpoint(root: Path, family: str) -> Path:
    """Random checkpoints saved by transformers: GPT-2-small's shape (vocabulary 4,096) and a
    Llama-3.2-1B-like shape cut down (GQA 8/2 heads, no biases, tied, vocabulary 4,096)."""
    import torch
    import transformers as T

    from conftest import make_tokenizer

    folder = root / family
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    if family == "gpt2-small-shaped":
        cfg = T.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=4096)
    else:
        cfg = T.LlamaConfig(num_hidden_layers=8, hidden_size=512, num_attention_heads=8,
                            num_key_value_heads=2, intermediate_size=2048, vocab_size=4096,
                            max_position_embeddings=1024, tie_word_embeddings=True)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def child(folder: str, dtype_name: str, batch: int, seq: int, repeat: int) -> dict:
    """One tree's measurement (runs in a subprocess whose PYTHONPATH picks the tree)."""
    import collections

    import torch
    import transformers as T
    from torch.utils._python_dispatch import TorchDispatchMode

    import actwh
    from actwh.compute.loading import load_model
    from actwh.compute.scalars import compute_scalars
    from actwh.compute.targets import Batch
    from common import timeit_pair

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    model = load_model(folder, device="cpu", dtype=dtype).model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (batch, seq), generator=g)
    b = Batch(tokens, torch.ones_like(tokens), tokens[:, -1], tokens[:, -2])
    hf = T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    rows = torch.arange(batch)

    def ours():
        compute_scalars(model, b, "logit_diff", SCALARS)

    def bare():
        hf.zero_grad(set_to_none=True)
        logits = hf(tokens).logits
        (logits[rows, -1, tokens[:, -1]] - logits[rows, -1, tokens[:, -2]]).sum().backward()

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.syncs = collections.Counter(), collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name == "repeat_interleave" and (kwargs or {}).get("output_size") is None \
                    and len(args) and isinstance(args[0], torch.Tensor) and len(args) == 1:
                self.syncs[name] += 1
            elif name in SYNCS:
                self.syncs[name] += 1
            if name not in VIEWS:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    # Copies to the host: on a CPU-only machine .cpu() / .tolist() / .numpy() dispatch nothing,
    # so the calls themselves are counted.
    host_calls = collections.Counter()
    originals = {m: getattr(torch.Tensor, m) for m in ("cpu", "tolist", "numpy")}

    def counted(m):
        def call(self, *a, **k):
            host_calls[m] += 1
            return originals[m](self, *a, **k)
        return call

    out = {"tree": os.path.dirname(os.path.dirname(actwh.__file__))}
    for label, fn in (("ours", ours), ("bare", bare)):
        fn()
        host_calls.clear()
        for m in originals:
            setattr(torch.Tensor, m, counted(m))
        try:
            with Count() as c:
                fn()
        finally:
            for m, f in originals.items():
                setattr(torch.Tensor, m, f)
        syncs = dict(c.syncs) | dict(host_calls)
        out[label] = dict(ops=sum(c.ops.values()), host_syncs=sum(syncs.values()), syncs=syncs)
    # bfloat16 matmuls on this CPU are emulated (10x slower than float32): counts only
    out["ours"]["seconds"], out["bare"]["seconds"] = timeit_pair(ours, bare, repeat=repeat) \
        if dtype == torch.float32 else (None, None)
    return out


def tree_at(rev: str, dest: Path) -> Path:
    """An importable `actwh` package (actwh_pkg plus its subpackage folders) as of `rev`."""
    src = dest / "src"
    if not (dest / "pkg" / "actwh").exists():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        pkg = dest / "pkg" / "actwh"
        shutil.copytree(src / "actwh_pkg", pkg)
        for sub in ("compute", "warehouse", "queries", "cli", "views"):
            if (src / sub).exists():
                (pkg / sub).symlink_to(src / sub)
    return dest / "pkg"


def measure(pythonpath: Path, folder: Path, dtype: str, args) -> dict:
    # bfloat16: counts only, on a short batch (they do not depend on the shape)
    batch, seq = (args.batch, args.seq) if dtype == "float32" else (1, 8)
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from bench_compute_proxy import child; "
            f"print(json.dumps(child({str(folder)!r}, {dtype!r}, {batch}, {seq}, {args.repeat})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pythonpath)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="b84f5c4")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.gettempdir()) / "actwh-bench-proxy"
    before = tree_at(args.before, root / f"before-{args.before}")
    for family in ("gpt2-small-shaped", "llama-shaped-8-layers"):
        folder = checkpoint(root, family)
        for dtype in ("float32", "bfloat16"):
            got = {"after": measure(Path(""), folder, dtype, args),  # this tree (editable install)
                   "before": measure(before, folder, dtype, args)}
            assert Path(got["after"]["tree"]).resolve() == ROOT, got["after"]["tree"]
            assert Path(got["before"]["tree"]).resolve() == (root / f"before-{args.before}" / "pkg").resolve()
            shape = (args.batch, args.seq) if dtype == "float32" else (1, 8)
            common = dict(model=family, batch=shape[0], seq=shape[1], dtype=dtype, target="logit_diff")
            a, bf = got["after"], got["before"]
            emit("compute_step_ops", a["ours"]["ops"], "ops/step", f"before_{args.before}_ops",
                 bf["ours"]["ops"], bare_forward_backward_ops=a["bare"]["ops"],
                 ratio_to_bare=round(a["ours"]["ops"] / a["bare"]["ops"], 3),
                 before_ratio_to_bare=round(bf["ours"]["ops"] / bf["bare"]["ops"], 3), **common)
            emit("compute_step_host_syncs", a["ours"]["host_syncs"], "syncs/step",
                 f"before_{args.before}_host_syncs", bf["ours"]["host_syncs"],
                 syncs=a["ours"]["syncs"], before_syncs=bf["ours"]["syncs"],
                 bare_forward_backward_syncs=a["bare"]["host_syncs"], **common)
            if a["ours"]["seconds"] is not None:
                emit("compute_step_seconds", a["ours"]["seconds"], "s/step",
                     "hf_forward_backward_s", a["bare"]["seconds"],
                     before_seconds=round(bf["ours"]["seconds"], 6),
                     before_bare_seconds=round(bf["bare"]["seconds"], 6),
                     before_ratio=round(bf["ours"]["seconds"] / bf["bare"]["seconds"], 3), **common)


if __name__ == "__main__":
    main()
