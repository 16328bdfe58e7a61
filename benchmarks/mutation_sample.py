"""A seeded random sample of mutmut's mutants of one file, each run against that file's tests.

For when a full `benchmarks/mutation.sh` run does not fit the time there is (every mutant costs
a pytest start with torch; ~15-30 s on a busy 2-core machine). Same mutation operators as
`mutmut run` (mutmut's own `list_mutations` / `mutate`), applied in place one at a time and
restored; results as JSON lines in benchmarks/mutation-sample.jsonl (file, mutant, status,
seconds, and the diff of each survivor). Killed = the tests failed (or hung past the timeout).

    .venv/bin/python benchmarks/mutation_sample.py queries/circuit.py 40 "tests/test_circuit.py"
"""

from __future__ import annotations

import difflib
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path


def main(path: str, n: int, tests: str, seed: int = 0, timeout: float = 300.0) -> None:
    from mutmut import Context, list_mutations, mutate

    root = Path(__file__).resolve().parents[1]
    os.chdir(root)
    src = Path(path).read_text()
    ids = list_mutations(Context(source=src, filename=path))
    sample = sorted(random.Random(seed).sample(range(len(ids)), min(n, len(ids))))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(tests)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = root / "benchmarks" / "mutation-sample.jsonl"
    for k in sample:
        mutated, count = mutate(Context(source=src, filename=path, mutation_id=ids[k]))
        if count == 0 or mutated == src:
            continue
        t0 = time.monotonic()
        Path(path).write_text(mutated)
        try:
            rc = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout).returncode
            status = "killed" if rc != 0 else "survived"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            Path(path).write_text(src)
        row = {"file": path, "mutant": k, "of": len(ids), "status": status,
               "seconds": round(time.monotonic() - t0, 1)}
        if status == "survived":
            row["diff"] = "".join(l for l in difflib.unified_diff(
                src.splitlines(True), mutated.splitlines(True), n=0) if l[:1] in "+-" and l[:3] not in ("+++", "---"))
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(row["mutant"], status, row["seconds"], flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *(int(x) for x in sys.argv[4:5]))
