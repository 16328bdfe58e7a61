#!/usr/bin/env bash
# Every GPU check and figure of issue 18 in one command, within 5 minutes on a bare GPU machine
# with no package index (what it needs travels with the tree: benchmarks/RESULTS.md, "Running
# gpu.sh"). From the repository root:
#   bash benchmarks/gpu.sh            # on the GPU machine; JSON lines to $OUT/gpu.jsonl
#   bash benchmarks/gpu.sh --small    # tiny shapes: every part as a CPU smoke run
# Parts, in order (each under its own time limit; the peers run only if carried and time is left):
#   GPU tests (tests/test_gpu.py), compute step and edges vs bare forward + backward
#   (GPT-2-small 8 × 512, Llama-1B shape 4 × 512, fp32 and bf16), the 8B Llama-3-shaped
#   populate --edges under --max-memory 40GB, edges memory vs sequence length, populate end
#   to end, peers (TransformerLens / nnsight). The figures are appended to benchmarks/RESULTS.md
#   (copied to $OUT with the JSON lines).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMALL=""
[ "${1:-}" = "--small" ] && SMALL="--small"
OUTDIR=${OUT:-$(mktemp -d)}
mkdir -p "$OUTDIR"
JSONL=$OUTDIR/gpu.jsonl
: > "$JSONL"
PY=${PYTHON:-python3}
WORK=$(mktemp -d)

# actwh without a build step: a package folder of actwh_pkg's files and links to the others
mkdir -p "$WORK/site/actwh"
cp -r actwh_pkg/. "$WORK/site/actwh/"
for d in compute warehouse queries cli views; do ln -s "$ROOT/$d" "$WORK/site/actwh/$d"; done
# wheels carried in .whl/, unpacked (a wheel is a zip) only for what the machine lacks
unpack() { "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$@"; }
mkdir -p "$WORK/deps"
for mod in duckdb sqlalchemy duckdb_sqlalchemy aiosql; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    whl=$(ls .whl/"${mod}"-*.whl .whl/"${mod//_/-}"-*.whl 2>/dev/null | head -1)
    [ -n "$whl" ] && unpack "$WORK/deps" "$whl" || echo "{\"name\": \"setup\", \"missing\": \"$mod\"}" | tee -a "$JSONL"
  fi
done
if ! "$PY" -c 'import transformers as T, sys; sys.exit(tuple(map(int, T.__version__.split(".")[:2])) < (5, 23))' 2>/dev/null; then
  unpack "$WORK/deps" .whl/transformers-*.whl .whl/tokenizers-*.whl .whl/huggingface_hub-*.whl .whl/safetensors-*.whl
fi
# the peers' wheels (transformer-lens, nnsight and their dependencies), if carried in .whl/peers/
ls .whl/peers/*.whl > /dev/null 2>&1 && unpack "$WORK/deps" .whl/peers/*.whl
export PYTHONPATH="$WORK/site:$WORK/deps:$ROOT/tests:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
"$PY" -c 'import json, torch, transformers, actwh; print(json.dumps({"name": "setup", "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))' | tee -a "$JSONL"

part() {  # part SECONDS NAME COMMAND...: JSON lines to the log; a failure or timeout is a line too
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS
  timeout $((limit * SCALE)) "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
  local rc=$?
  grep '^{' "$WORK/$name.out" | tee -a "$JSONL"
  if [ $rc -ne 0 ]; then
    echo "{\"name\": \"$name\", \"rc\": $rc, \"error\": $(tail -c 1500 "$WORK/$name.err" | "$PY" -c 'import json, sys; print(json.dumps(sys.stdin.read()))')}" | tee -a "$JSONL"
  fi
  echo "{\"name\": \"${name}_seconds\", \"value\": $((SECONDS - t0))}" >> "$JSONL"
}
REPEAT=3 SCALE=1
[ -n "$SMALL" ] && REPEAT=1 SCALE=8  # a CPU smoke run: slower per op, only checks that all runs
part 90 gpu_tests "$PY" -c '
import json, subprocess, sys
r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], capture_output=True, text=True)
tail = r.stdout.strip().splitlines()
print(json.dumps({"name": "gpu_tests", "rc": r.returncode, "summary": tail[-1] if tail else "",
                  "failed": [l for l in tail if l.startswith("FAILED")][:20]}))'
part 80 shapes "$PY" benchmarks/bench_gpu.py shapes --repeat $REPEAT $SMALL
part 100 big "$PY" benchmarks/bench_gpu.py big $SMALL
part 30 memory "$PY" benchmarks/bench_gpu.py memory $SMALL
part 30 populate "$PY" benchmarks/bench_gpu.py populate $SMALL
if "$PY" -c 'import transformer_lens, nnsight' 2>/dev/null && [ $SECONDS -lt 240 ]; then
  part 50 peers_8x512 "$PY" benchmarks/bench_peers.py --batch 8 --seq 512
  part 30 peers_4x128 "$PY" benchmarks/bench_peers.py --batch 4 --seq 128
else
  echo '{"name": "peers", "skipped": "transformer-lens / nnsight not carried, or no time left"}' | tee -a "$JSONL"
fi
echo "{\"name\": \"gpu_sh_seconds\", \"value\": $SECONDS}" | tee -a "$JSONL"
"$PY" benchmarks/bench_gpu.py report --jsonl "$JSONL" --results benchmarks/RESULTS.md
cp benchmarks/RESULTS.md "$OUTDIR/RESULTS.md"
echo "JSON lines and the Markdown section: $OUTDIR/gpu.jsonl, $OUTDIR/gpu.md" >&2
