#!/usr/bin/env bash
# Per-worker bootstrap for a prefjax run on a TPU VM pod (launch/tpu_pod.py runs it on
# every worker with `gcloud compute tpus tpu-vm ssh --worker=all`).
#
#   bash launch/bootstrap_tpu.sh --workdir DIR [--venv DIR] [--bucket gs://B[/PATH]]
#       [--mount /mnt/prefjax] [--port 8476] [--total_steps N] -- PREFJAX_MAIN_ARGS...
#
# Options take their value as the next argument or after = (--workdir=DIR).
#
# 1. Environment: a virtual environment at --venv (Python >= 3.11; uv provides one when
#    the image's python3 is older), with requirements.txt, jax[tpu] and prefjax (editable)
#    installed when missing or when requirements.txt / pyproject.toml changed.
# 2. Data directory: with --bucket, the bucket is mounted with gcsfuse at --mount (the
#    same path on every worker), so workdirs survive a spot/preemptible TPU being deleted;
#    without it, ~/prefjax-data. TFDS_DATA_DIR, PREFJAX_DATA_DIR and a persistent jax
#    compilation cache live there. A relative --workdir is placed under <root>/runs/.
# 3. jax.distributed: launch/tpu_worker.py reads this worker's number and the pod's
#    addresses from the metadata server; the flags go to prefjax.main (worker 0 coordinates).
# 4. With --total_steps, a workdir whose run already reached that step is skipped.
# 5. exec python -m prefjax.main ARGS --workdir=DIR [distributed flags]. Rerunning the
#    same command in the same workdir resumes from its latest checkpoint.
#
# PREFJAX_BOOTSTRAP_DRY_RUN=1 prints the commands that change something (venv, installs,
# mount, mkdir, the run) instead of running them; the metadata and finished-run checks
# still run, since they only read.
set -euo pipefail
cd "$(dirname "$0")/.."

workdir="" venv="$HOME/prefjax-venv" bucket="" mount="/mnt/prefjax" port=8476 total_steps=""
die() { echo "bootstrap_tpu.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  # --name=value is split into --name value, so both spellings work (as with the Python launchers).
  case "$1" in --?*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; esac
  case "$1" in --) ;; --*) [[ $# -ge 2 ]] || die "option $1 needs a value" ;; esac
  case "$1" in
    --workdir) workdir="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --mount) mount="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --total_steps) total_steps="$2"; shift 2 ;;
    --) shift; break ;;
    *) die "unknown option $1 (prefjax.main arguments go after --)" ;;
  esac
done
[[ -n "$workdir" ]] || die "--workdir is required"
log() { echo "[bootstrap $(hostname)] $*"; }
run() {
  if [[ "${PREFJAX_BOOTSTRAP_DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

# ---------------------------------------------------------------- 1. environment
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
if [[ ! -x "$venv/bin/python" ]]; then
  if python_ok python3; then
    log "creating $venv with $(python3 --version)"
    run python3 -m venv "$venv"
  else
    log "python3 is older than 3.11: creating $venv with uv's Python 3.12"
    export PATH="$HOME/.local/bin:$PATH"
    command -v uv >/dev/null || run python3 -m pip install --user --quiet uv
    run uv venv --seed --python 3.12 "$venv"
  fi
fi
stamp="$venv/.prefjax-requirements"
wanted="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]]; then
  log "installing requirements into $venv"
  run "$venv/bin/python" -m pip install --quiet --upgrade pip
  run "$venv/bin/python" -m pip install --quiet -r requirements.txt "jax[tpu]>=0.10.2"
  run "$venv/bin/python" -m pip install --quiet --no-deps -e .
  run bash -c "echo $wanted > $stamp"
fi

# ---------------------------------------------------------------- 2. data directory
install_gcsfuse() {
  log "installing gcsfuse"
  local repo="gcsfuse-$(lsb_release -c -s)"
  local key=/usr/share/keyrings/cloud.google.asc
  run bash -c "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee $key >/dev/null"
  run bash -c "echo 'deb [signed-by=$key] https://packages.cloud.google.com/apt $repo main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
  run sudo apt-get update -qq
  run sudo apt-get install -y -qq gcsfuse
}
if [[ -n "$bucket" ]]; then
  if ! mountpoint -q "$mount"; then
    command -v gcsfuse >/dev/null || install_gcsfuse
    run sudo mkdir -p "$mount"
    run sudo chown "$(id -u):$(id -g)" "$mount"
    path="${bucket#gs://}" name="${path%%/*}" only_dir=""
    [[ "$path" == */* ]] && only_dir="${path#*/}"
    log "mounting gs://$path at $mount"
    run gcsfuse --implicit-dirs ${only_dir:+--only-dir "$only_dir"} "$name" "$mount"
  fi
  root="$mount"
else
  root="$HOME/prefjax-data"
fi
export PREFJAX_DATA_DIR="$root/data" TFDS_DATA_DIR="$root/tfds"
export JAX_COMPILATION_CACHE_DIR="$root/jax_cache"
case "$workdir" in /*) ;; *) workdir="$root/runs/$workdir" ;; esac
run mkdir -p "$PREFJAX_DATA_DIR" "$TFDS_DATA_DIR" "$JAX_COMPILATION_CACHE_DIR" "$workdir"

# ---------------------------------------------------------------- 3. jax.distributed
# A plain assignment, so a failed metadata query stops the script (set -e) instead of
# silently starting independent single-host runs.
# Both helpers below use only the standard library: python3 runs them even before the venv exists.
flags="$(python3 launch/tpu_worker.py --port "$port")"
read -r -a distributed <<< "$(echo $flags)"

# ---------------------------------------------------------------- 4. finished already?
if [[ -n "$total_steps" ]] && python3 -m launch.run_status "$workdir" "$total_steps"; then
  log "$workdir already finished $total_steps steps; skipping"
  exit 0
fi

# ---------------------------------------------------------------- 5. run
log "python -m prefjax.main $* --workdir=$workdir ${distributed[*]}"
run exec "$venv/bin/python" -m prefjax.main "$@" --workdir="$workdir" "${distributed[@]}"
