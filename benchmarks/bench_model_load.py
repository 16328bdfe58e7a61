"""Model loading: `load_model` (meta-device build, weights streamed one layer at a time) vs
transformers' `from_pretrained(..., dtype=...).to(device)` on the same checkpoint, and vs the
loader actwh had before (float32 model on the CPU with every file read whole, then a cast).

Each load runs in its own fresh process (imports done before the clock starts); the figures are
the load's wall time and its host memory: the process's RSS high-water mark (VmHWM, reset just
before the load by writing 5 to /proc/self/clear_refs; getrusage's ru_maxrss would include the
parent's memory inherited at fork) minus its RSS just before the load, against the bytes of the
loaded weights. Loaders alternate within
each repeat; medians of `--repeat`.

    python benchmarks/bench_model_load.py [--repeat 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import emit

CHILD = r'''
import json, os, sys, time
import torch
import transformers as T
sys.path.insert(0, {bench!r})
from bench_model_load import legacy_load
from actwh.compute.loading import load_model

def status(field):  # kB in /proc/self/status
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024


kind, folder, dtype, device = {kind!r}, {folder!r}, getattr(torch, {dtype!r}), {device!r}
torch.set_num_threads(1)
open("/proc/self/clear_refs", "w").write("5")  # the RSS high-water mark restarts from here
before = status("VmRSS")
t0 = time.perf_counter()
if kind == "actwh":
    model = load_model(folder, device=device, dtype=dtype).model
elif kind == "legacy":
    model = legacy_load(folder, device, dtype)
else:
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
peak = status("VmHWM")
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps(dict(seconds=seconds, host_bytes=peak - before, weights_bytes=weights)))
'''


def legacy_load(folder, device, dtype):
    """actwh's loader before streaming: float32 model on the CPU, every file read whole,
    converted state dict loaded, then cast and moved."""
    import torch
    from safetensors.torch import load_file

    from actwh.compute.loading import config_from_hf, convert, weight_files
    from actwh.compute.model import HookedTransformer

    folder = Path(folder)
    c = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(c)
    state = {}
    for f in weight_files(folder):
        state.update(load_file(f))
    model = HookedTransformer(cfg)
    model.load_state_dict(convert(cfg, c, state), strict=False)
    return model.to(device=device, dtype=dtype).eval()


def checkpoint(root: Path, name: str, dtype, shard: str | None = None) -> Path:
    """A random checkpoint saved by transformers (its own config class) in `dtype`."""
    import torch
    import transformers as T

    from conftest import make_tokenizer

    folder = root / name
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    if name.startswith("gpt2"):  # GPT-2-small's shape, full vocabulary
        cfg = T.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    else:  # Llama-3.2-1B's widths (GQA 32/8, vocab 128256, tied), 4 of its 16 layers
        cfg = T.LlamaConfig(num_hidden_layers=4, hidden_size=2048, num_attention_heads=32,
                            num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                            max_position_embeddings=2048, tie_word_embeddings=True)
    model = T.AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(folder, max_shard_size=shard or "100GB")
    make_tokenizer().save_pretrained(folder)
    return folder


def measure(kind: str, folder: Path, dtype: str, device: str) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent), kind=kind, folder=str(folder),
                        dtype=dtype, device=device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    root = Path(tempfile.gettempdir()) / "actwh-bench-load"
    cases = [
        ("gpt2-small-shaped", checkpoint(root, "gpt2-small-fp32", torch.float32), "float32"),
        ("gpt2-small-shaped", checkpoint(root, "gpt2-small-fp32", torch.float32), "bfloat16"),
        ("llama-1b-widths-4-layers", checkpoint(root, "llama-bf16", torch.bfloat16), "bfloat16"),
        ("llama-1b-widths-4-layers-sharded-200MB",
         checkpoint(root, "llama-bf16-sharded", torch.bfloat16, "200MB"), "bfloat16"),
    ]
    for name, folder, dtype in cases:
        runs: dict[str, list[dict]] = {"actwh": [], "legacy": [], "transformers": []}
        for _ in range(args.repeat):
            for kind in runs:
                runs[kind].append(measure(kind, folder, dtype, args.device))
        med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
        common = dict(device=args.device, model=name, dtype=dtype,
                      weights_bytes=med["actwh"]["weights_bytes"],
                      checkpoint_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")))
        for base in ("transformers", "legacy"):
            label = "from_pretrained_to_device" if base == "transformers" else "actwh_before_streaming"
            emit("load_seconds", med["actwh"]["seconds"], "s", f"{label}_s", med[base]["seconds"], **common)
            emit("load_host_peak_bytes", med["actwh"]["host_bytes"], "bytes",
                 f"{label}_host_peak_bytes", med[base]["host_bytes"], **common)
        w = med["actwh"]["weights_bytes"]
        emit("load_host_peak_over_weights", med["actwh"]["host_bytes"] / w, "x",
             "from_pretrained_host_peak_over_weights", med["transformers"]["host_bytes"] / w, **common)


if __name__ == "__main__":
    main()
