"""Grouped commits: many small batches of one-word prompts, one commit per batch vs grouped.

    python benchmarks/bench_commits.py [--prompts 4000] [--batch-size 8]

Populates the same prompts with the default model twice in this process: `--commit-seconds 0`
(the file opened and committed once per batch, as before grouping) and the default grouping
(one commit per 2 s or 200,000 rows). Prints one JSON line: both times, the commits each took,
and the ratio. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    from actwh.compute.default_model import default_prompts
    from actwh.runner import PopulateOptions, populate

    words = sorted({w for line in default_prompts("ioi").read_text().splitlines()
                    for w in json.loads(line)["text"].split() if w.isalpha()})
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "words.txt"
    path.write_text("\n".join(words[i % len(words)] for i in range(args.prompts)) + "\n")
    opts = PopulateOptions(prompts=str(path), scalars=("mlp_act_times_grad",), batch_size=args.batch_size)
    populate(tmp / "warm.duckdb", PopulateOptions(prompts=str(path), scalars=("mlp_act_times_grad",),
                                                  batch_size=256), progress=False)
    out = {}
    for name, seconds in (("per_batch", 0.0), ("grouped", 2.0)):
        t0 = time.perf_counter()
        r = populate(tmp / f"{name}.duckdb", opts, progress=False, commit_seconds=seconds)
        out[name] = (time.perf_counter() - t0, r.commits)
    print(json.dumps({"name": "populate_small_batches", "prompts": args.prompts,
                      "batch_size": args.batch_size, "per_batch_s": round(out["per_batch"][0], 2),
                      "per_batch_commits": out["per_batch"][1], "grouped_s": round(out["grouped"][0], 2),
                      "grouped_commits": out["grouped"][1],
                      "ratio": round(out["grouped"][0] / out["per_batch"][0], 3)}))


if __name__ == "__main__":
    main()
