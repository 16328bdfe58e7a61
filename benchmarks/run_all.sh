#!/usr/bin/env bash
# Every benchmark in one go (one JSON line per figure), e.g. on a lent GPU machine:
#   bash benchmarks/run_all.sh | tee benchmarks/latest.jsonl
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
"$PY" bench_compute.py
"$PY" bench_peers.py
"$PY" bench_compute_proxy.py
"$PY" bench_model_load.py
"$PY" bench_edges.py
"$PY" bench_loading.py
"$PY" bench_queries.py
"$PY" bench_populate.py
"$PY" bench_evaluate.py
"$PY" bench_views.py
