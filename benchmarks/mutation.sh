#!/usr/bin/env bash
# Mutation testing (slow; not run in CI): mutmut 2.x mutates each file below in place, one mutant
# at a time, and runs only the tests that exercise that file, then restores it. mutmut 2 and not
# 3: mutmut 3 copies the sources into mutants/ and imports them from there, which the package's
# setuptools package-dir mapping (actwh.compute = compute/ ...) and its editable install defeat;
# in-place mutation is seen through the editable install as it is. Do not edit, commit or run
# anything else in this checkout while it runs.
#
#   .venv/bin/pip install -e '.[mutation]'
#   bash benchmarks/mutation.sh                       # every file below
#   bash benchmarks/mutation.sh compute/keep.py       # one file
#   .venv/bin/python -m mutmut results; .venv/bin/python -m mutmut show ID   # survivors, and a diff
#
# A full run costs a pytest start (with torch) per mutant, ~15-30 s each on a busy 2-core
# machine; benchmarks/mutation_sample.py runs a seeded sample of one file's mutants instead.
#
# SQL files (queries/*.sql, warehouse/views.sql) cannot be mutated by mutmut (Python only): the
# saved queries are checked against independent Polars and BFS computations instead.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
PY=${PY:-.venv/bin/python}
PYTEST="$PY -m pytest -x -q -p no:cacheprovider -p no:randomly"

declare -A TESTS=(
  [compute/keep.py]="tests/test_keep.py tests/test_selection.py tests/test_contracts.py"
  [compute/selection.py]="tests/test_contracts.py tests/test_selection.py tests/test_keep.py tests/test_sae.py tests/test_stored_rows.py -k 'not qwen2 and not component and not metric'"
  [compute/node_edges.py]="tests/test_node_edges.py tests/test_stored_rows.py tests/test_sae_edges.py -k 'not qwen2 and not mistral and not llama and not metric and not component and not top_k_at'"
  [queries/circuit.py]="tests/test_circuit.py"
  [queries/loader.py]="tests/test_queries.py"
  [warehouse/store.py]="tests/test_warehouse.py tests/test_readonly.py"
)
ORDER=(compute/keep.py queries/circuit.py compute/selection.py compute/node_edges.py
       warehouse/store.py queries/loader.py)

files=("$@")
[ ${#files[@]} -eq 0 ] && files=("${ORDER[@]}")
for f in "${files[@]}"; do
  tests=${TESTS[$f]:-}
  if [ -z "$tests" ]; then echo "no test selection for $f" >&2; exit 2; fi
  echo "== $f: $tests"
  # the baseline time (the timeout's base) is cached once for all files: time each file's tests
  [ -f .mutmut-cache ] && $PY -c "import sqlite3; c = sqlite3.connect('.mutmut-cache'); \
c.execute(\"DELETE FROM MiscData WHERE key = 'baseline_time_elapsed'\"); c.commit()"
  $PY -m mutmut run --paths-to-mutate "$f" --tests-dir tests --runner "$PYTEST $tests" \
    --simple-output --no-progress -m 4 -b 20
done
$PY benchmarks/mutation_score.py
