#!/usr/bin/env bash
# The ~1B-parameter GPU table of benchmarks/RESULTS.md: prefjax, TRL and Tunix on one GPU, bf16.
#
#   bash benchmarks/gpu_table.sh OUT_DIR [WHEEL_DIR]
#
# Written for a machine without a package index whose python3 already holds jax (CUDA),
# flax, optax, orbax, torch and transformers: the packages it lacks (grain, TRL, datasets,
# Tunix and their needs) come as wheels in WHEEL_DIR and are installed into a private
# folder on PYTHONPATH. Every framework runs with that interpreter (--python FW=python3).
# Each cell's rows are written to OUT_DIR as JSON as soon as the cell finishes, and the
# printed tables go to OUT_DIR/*.txt, so a run cut short keeps what it finished.
# SNAPSHOT=FILE.tgz keeps a tarball of OUT_DIR there, renewed after every cell (a machine that
# returns only a few files). SIZE (default 1b), SEQ_SHORT (1024) and SEQ_LONG (2048) change the
# cells, e.g. to try the script on a CPU: SIZE=tiny SEQ_SHORT=128 SEQ_LONG=256. The wheels come
# from benchmarks/gpu_wheels.sh WHEEL_DIR, run where pip reaches PyPI.
set -uo pipefail
out=${1:?usage: gpu_table.sh OUT_DIR [WHEEL_DIR]}
wheels=${2:-.whl}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/prefjax-site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/prefjax-site:$repo
else
  export PYTHONPATH=$repo
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)" \
  | tee -a "$out/device.txt"

bench() {  # bench NAME ARGS...: one invocation of the comparison, its table and JSON under $out
  local name=$1; shift
  python3 "$repo/benchmarks/compare_trl_tunix.py" --sizes "${SIZE:-1b}" --pairs 8 --steps 8 --warmup 3 \
    --dtype bfloat16 --python trl=python3 --python tunix=python3 --no-install --venv-root /tmp/prefjax-bench \
    --loss-tol 1e-2 --logp-rtol 2e-2 --timeout 240 --json "$out/$name.json" "$@" 2> "$out/$name.log" \
    | tee "$out/$name.txt"
  snapshot
}
snapshot() {
  if [ -n "${SNAPSHOT:-}" ]; then tar czf "$SNAPSHOT.tmp" -C "$out" . && mv "$SNAPSHOT.tmp" "$SNAPSHOT"; fi
}
prefjax_failed() {  # prefjax_failed NAME: whether prefjax's row of that invocation is an error
  python3 -c 'import json, sys; rows = json.load(open(sys.argv[1]))
sys.exit(0 if any(r["framework"] == "prefjax" and "error" in r for r in rows) else 1)' "$out/$1.json"
}
# The cells that matter most first (each invocation writes its own JSON, so a run cut short
# keeps the cells before); benchmarks/compare/table.py prints tables from the merged rows.
# prefjax uses cuDNN's fused attention for bf16; if that path fails here, XLA's attention.
attention=cudnn
bench seq1024 --seq "${SEQ_SHORT:-1024}" --frameworks prefjax,trl --attention $attention
if prefjax_failed seq1024; then
  attention=xla
  bench seq1024-xla --seq "${SEQ_SHORT:-1024}" --frameworks prefjax,trl --attention $attention
fi
bench seq2048 --seq "${SEQ_LONG:-2048}" --frameworks prefjax,trl --attention $attention
bench seq1024-more --seq "${SEQ_SHORT:-1024}" --frameworks prefjax-shared,tunix --attention $attention
# The trainer end to end on the GPU (orbax checkpoints, grain, metrics): configs/tiny_dpo.py.
timeout 120 python3 -m prefjax.main --config="$repo/configs/tiny_dpo.py" --workdir=/tmp/prefjax-tiny-dpo \
  > "$out/tiny_dpo.log" 2>&1
echo "tiny_dpo exit $?" >> "$out/tiny_dpo.log"
snapshot
tail -4 "$out/tiny_dpo.log"

# Which attention prefjax should default to on a GPU: the same cell with XLA's attention.
if [ "$attention" = cudnn ]; then
  bench seq1024-xla-attention --seq "${SEQ_SHORT:-1024}" --frameworks prefjax --attention xla
fi
