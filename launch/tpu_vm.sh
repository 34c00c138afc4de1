#!/usr/bin/env bash
# e2_jax on a Cloud TPU VM or pod slice: create it (or reuse it), install on every worker,
# fetch weights and data, train on all workers at once; then stop or delete it.
#
#   launch/tpu_vm.sh create  --name e2 --zone us-central2-b --type v4-32
#   launch/tpu_vm.sh setup   --name e2 --zone us-central2-b                     # this checkout, to every worker
#   launch/tpu_vm.sh train   --name e2 --zone us-central2-b --config configs/e2_b16.py \
#        --workdir gs://BUCKET/runs/e2_b16 --weights gs://BUCKET/models/clip_b16 --data-dir gs://BUCKET/tfds
#   launch/tpu_vm.sh logs | stop | delete  --name e2 --zone us-central2-b
#   launch/tpu_vm.sh all ...      create + setup + train
#   ... --dry-run                 print every command, run none
#   ... train ... -- --config.batch_size=1024      flags after -- go to python -m e2_jax.main
#
# Options (or their environment variables):
#   --name TPU_NAME  --zone TPU_ZONE  --project GCP_PROJECT
#   --type TPU_TYPE (default v5litepod-8)  --version TPU_VERSION (default: the type's usual image)  --spot
#   --repo URL --ref REF   install from git on every worker instead of copying this checkout
#   --weights gs://.../DIR        a converted model (python -m e2_jax.convert), copied to models/ on every worker
#   --convert OUT=gs://.../ViT-B-16.pt   OpenAI's archive, copied and converted to OUT (e.g.
#                                 models/clip_b16, what the configs name) on every worker
#   --prepare NAME=gs://.../DIR   build TFDS dataset NAME (fashion_gen, amazon_fashion) from the files
#                                 in DIR into --data-dir, on worker 0, before training
#   --data-dir gs://.../tfds      where the training processes read the datasets (TFDS reads GCS)
#   --config FILE[:ARG]  --workdir DIR    what to train, and where checkpoints and metrics go: a
#                                 bucket (gs://BUCKET/runs/NAME) or a file system every worker mounts
#
# Every worker must run the same program: `train` starts `python -m e2_jax.main` on all of
# them at once (--worker=all); JAX's runtime finds the others by itself on a TPU VM.
set -euo pipefail

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }

command="${1:-}"
case "$command" in
  create | setup | prepare | train | logs | stop | delete | all) shift ;;
  -h | --help | "") usage; exit 0 ;;
  *) echo "error: unknown command '$command' (create, setup, prepare, train, logs, stop, delete, all)" >&2; exit 2 ;;
esac

name="${TPU_NAME:-}" zone="${TPU_ZONE:-}" project="${GCP_PROJECT:-}"
type="${TPU_TYPE:-v5litepod-8}" version="${TPU_VERSION:-}"
spot=0 dry_run=0 repo="" ref="main" weights="" convert="" prepare="" data_dir="" config="" workdir=""
main_flags=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --weights) weights="$2"; shift 2 ;;
    --convert) convert="$2"; shift 2 ;;
    --prepare) prepare="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; main_flags=("$@"); break ;;
    *) echo "error: unknown option $1 (see launch/tpu_vm.sh --help)" >&2; exit 2 ;;
  esac
done
if [[ -z "$name" || -z "$zone" ]]; then
  echo "error: give --name and --zone (or TPU_NAME and TPU_ZONE)" >&2
  exit 2
fi

if [[ -z "$version" ]]; then  # the software version each TPU generation boots
  case "$type" in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) echo "error: no default --version for --type $type: give --version (see gcloud compute tpus versions list)" >&2; exit 2 ;;
  esac
fi
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "$project" ]]; then where+=(--project "$project"); fi

run() {  # prints a command, runs it unless --dry-run
  printf '%q ' "$@"
  echo
  if [[ "$dry_run" == 0 ]]; then "$@"; fi
}

on_workers() {  # a shell command on every worker (or on --worker=N given first)
  local worker=all
  if [[ "$1" == --worker=* ]]; then worker="${1#--worker=}"; shift; fi
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker="$worker" --command "$1"
}

create() {
  if [[ "$dry_run" == 0 ]] && "${gcloud_tpu[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1; then
    echo "$name exists in $zone: reusing it"
    return
  fi
  local extra=()
  if [[ "$spot" == 1 ]]; then extra+=(--spot); fi
  run "${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$type" --version "$version" "${extra[@]}"
}

setup() {
  local get
  if [[ -n "$repo" ]]; then
    get="rm -rf e2_jax && git clone --quiet $(printf '%q' "$repo") e2_jax && git -C e2_jax checkout --quiet $(printf '%q' "$ref")"
  else
    # This checkout as committed (git archive: no workdirs or local data), to every worker.
    local archive="/tmp/e2_jax_${name}.tar.gz"
    run git -C "$(dirname "$0")/.." archive --format=tar.gz --prefix=e2_jax/ -o "$archive" HEAD
    run "${gcloud_tpu[@]}" scp "$archive" "$name:e2_jax.tar.gz" "${where[@]}" --worker=all
    get="rm -rf e2_jax && tar -xzf e2_jax.tar.gz"
  fi
  # The project's pins, then JAX's TPU build of the same version (libtpu from Google's index).
  local jax_version
  jax_version="$(sed -n 's/^jax==//p' "$(dirname "$0")/../requirements.txt")"
  on_workers "$get && cd e2_jax && pip install --quiet -r requirements.txt && pip install --quiet -e . && \
pip install --quiet 'jax[tpu]==$jax_version' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
}

prepare_data() {
  if [[ -n "$weights" ]]; then
    on_workers "cd e2_jax && mkdir -p models && gcloud storage cp --recursive $(printf '%q' "$weights") models/"
  fi
  if [[ -n "$convert" ]]; then
    local out="${convert%%=*}" archive="${convert#*=}"
    on_workers "cd e2_jax && mkdir -p models && gcloud storage cp $(printf '%q' "$archive") models/ && \
python -m e2_jax.convert to-flax models/$(printf '%q' "${archive##*/}") $(printf '%q' "$out") --trust-pickle"
  fi
  if [[ -n "$prepare" ]]; then
    if [[ -z "$data_dir" ]]; then echo "error: --prepare needs --data-dir (where the built dataset goes)" >&2; exit 2; fi
    local dataset="${prepare%%=*}" source="${prepare#*=}"
    on_workers --worker=0 "cd e2_jax && mkdir -p ~/manual && gcloud storage cp --recursive $(printf '%q' "$source")/* ~/manual/ && \
python -m e2_jax.data.build $(printf '%q' "$dataset") --manual-dir ~/manual --data-dir $(printf '%q' "$data_dir")"
  fi
}

train() {
  if [[ -z "$config" || -z "$workdir" ]]; then echo "error: train needs --config and --workdir" >&2; exit 2; fi
  local flags=(--config "$config" --workdir "$workdir")
  if [[ -n "$data_dir" ]]; then flags+=("--config.data.data_dir=$data_dir"); fi
  flags+=("${main_flags[@]}")
  local quoted
  quoted="$(printf '%q ' "${flags[@]}")"
  # Detached (nohup), so that a dropped ssh connection does not stop training; `logs` follows it.
  on_workers "cd e2_jax && nohup python -m e2_jax.main $quoted> ~/e2_jax_train.log 2>&1 &"
}

case "$command" in
  create) create ;;
  setup) setup ;;
  prepare) prepare_data ;;
  train) prepare_data; train ;;
  all) create; setup; prepare_data; train ;;
  logs) on_workers --worker=0 "tail -n 200 -f ~/e2_jax_train.log" ;;
  stop) on_workers "pkill -f e2_jax.main || true"; run "${gcloud_tpu[@]}" stop "$name" "${where[@]}" ;;
  delete) run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet ;;
esac
