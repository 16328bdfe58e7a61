"""End to end: `actwh populate` tokens/s and peak memory, on the default model and on a
tiny-random GPT-2-small-shaped model (12 layers, d_model 768), and with 1× and 4× the prompts
(memory should stay flat in the number of prompts).

    python benchmarks/bench_populate.py
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, gpt2_small_shaped


def run(model: str | None, prompts: Path, db: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `actwh populate` process."""
    cmd = [sys.executable, "-m", "actwh.cli", "populate", str(prompts), "--db", str(db), "--top", "0",
           "--batch-size", "8"] + (["--model", model] if model else [])
    err = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    # wait4 gives this child's own rusage: RUSAGE_CHILDREN would also count whatever this
    # process's parent ran before exec'ing it (a shell running the other benchmarks, say)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        err.seek(0)
        raise SystemExit(f"populate failed: {err.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # MiB (ru_maxrss is KiB on Linux)


def main() -> None:
    import duckdb

    from actwh.compute.default_model import default_prompts

    tmp = Path(tempfile.mkdtemp())
    rows = default_prompts("ioi").read_text().splitlines()
    big = gpt2_small_shaped(Path(tempfile.gettempdir()) / "actwh-bench-gpt2-small")
    words = "the a and to of in was he she it cat dog".split()
    rng = random.Random(0)
    long_rows = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}) for _ in range(24)]
    for name, model, base_rows in (("default", None, rows), ("gpt2-small-shaped-random", str(big), long_rows)):
        for scale in (1, 4):
            prompts = tmp / f"{name}-{scale}.jsonl"
            prompts.write_text("\n".join(base_rows * scale) + "\n")
            db = tmp / f"{name}-{scale}.duckdb"
            wall, peak = run(model, prompts, db)
            con = duckdb.connect(str(db), read_only=True)
            tokens = con.execute("SELECT sum(n_tokens) FROM prompts").fetchone()[0]
            con.close()
            emit("populate_tokens_per_s", tokens / wall, "tokens/s", model=name,
                 batch=8, seq=None, prompts=len(base_rows) * scale, peak_rss_mib=round(peak),
                 wall_s=round(wall, 2))
    os.environ.pop("ACTWH_DB", None)


if __name__ == "__main__":
    main()
