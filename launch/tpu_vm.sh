#!/usr/bin/env bash
# e2_jax on a Cloud TPU VM or pod slice: create it, install on every worker, fetch weights and
# data, train on all workers at once; follow, stop, delete.
#
#   launch/tpu_vm.sh create  --name e2 --zone us-central2-b --type v4-32 [--spot] [--queued]
#   launch/tpu_vm.sh setup   --name e2 --zone us-central2-b                     # this checkout, to every worker
#   launch/tpu_vm.sh train   --name e2 --zone us-central2-b --config configs/e2_b16.py \
#        --workdir gs://BUCKET/runs/e2_b16 --weights gs://BUCKET/models/clip_b16 --data-dir gs://BUCKET/tfds
#   launch/tpu_vm.sh logs | status | stop | delete  --name e2 --zone us-central2-b
#   launch/tpu_vm.sh all ...      create + setup + train
#   ... --dry-run                 print every command, run none
#   ... train ... -- --config.batch_size=1024      flags after -- go to python -m e2_jax.main
#
# Options (or their environment variables):
#   --name TPU_NAME  --zone TPU_ZONE  --project GCP_PROJECT
#   --type TPU_TYPE (default v5litepod-8; v5e-N is taken for gcloud's v5litepod-N)
#   --version TPU_VERSION (default: the type's usual image)
#   --spot                        a spot slice; `create` deletes and recreates one that was preempted
#   --queued                      create through a queued resource (spot needs it on v5e/v5p/v6e); `create`
#                                 and `all` wait until it is ACTIVE, printing its state as it changes
#                                 (--queued-timeout SECONDS, default 43200, or TPU_QUEUED_TIMEOUT); a
#                                 request that exists already is waited for, not made again
#   --repo URL --ref REF          install from git on every worker instead of copying this checkout
#   --weights gs://.../DIR        a converted model (python -m e2_jax.convert), copied to models/<DIR's name> on every worker
#   --convert OUT=gs://.../ViT-B-16.pt   OpenAI's archive: converted HERE, once (this machine needs
#                                 e2_jax with torch: pip install -r requirements-test.txt), uploaded
#                                 beside the archive as ViT-B-16_e2_jax/, copied to OUT (e.g.
#                                 models/clip_b16, what the configs name) on every worker
#   --prepare NAME=gs://.../DIR   build TFDS dataset NAME (fashion_gen, amazon_fashion) from the files
#                                 in DIR into --data-dir, on worker 0, before training
#   --data-dir gs://.../tfds      where the training processes read the datasets (TFDS reads GCS)
#   --config FILE[:ARG]  --workdir DIR    what to train, and where checkpoints and metrics go: a
#                                 bucket (gs://BUCKET/runs/NAME); each worker's log lands in DIR/logs/
#
# The workers' images have Python 3.10; `setup` makes a Python 3.11 virtual environment
# (~/e2_venv, with uv) holding the project's pins and JAX's TPU build of the same version (libtpu
# from PyPI). `train` runs launch/tpu_worker.sh on every worker at once (--worker=all): it stops
# an earlier trainer, frees the TPU, checks the worker's chips, and starts the trainer detached.
# `stop` sends it SIGTERM (it saves a checkpoint and exits); the slice keeps running (a pod slice
# cannot be stopped): `delete` it. JAX's runtime finds the other workers by itself.
set -euo pipefail

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

command="${1:-}"
case "$command" in
  create | setup | prepare | train | logs | status | stop | delete | all) shift ;;
  -h | --help | "") usage; exit 0 ;;
  *) echo "error: unknown command '$command' (create, setup, prepare, train, logs, status, stop, delete, all)" >&2; exit 2 ;;
esac

name="${TPU_NAME:-}" zone="${TPU_ZONE:-}" project="${GCP_PROJECT:-}"
type="${TPU_TYPE:-v5litepod-8}" version="${TPU_VERSION:-}"
queued_timeout="${TPU_QUEUED_TIMEOUT:-43200}" queued_poll="${TPU_QUEUED_POLL:-30}"
spot=0 queued=0 dry_run=0 repo="" ref="main" weights="" convert="" prepare="" data_dir="" config="" workdir=""
main_flags=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --queued-timeout) queued_timeout="$2"; shift 2 ;;
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

# gcloud names v5e slices v5litepod-N.
if [[ "$type" == v5e-* ]]; then type="v5litepod-${type#v5e-}"; fi
# The software version each TPU generation boots, and the chips one worker (host) has.
chips="${type##*-}"
case "$type" in
  v4-*) default_version=tpu-ubuntu2204-base; chips=$((chips / 2)); per_host=$((chips < 4 ? chips : 4)) ;;
  v5p-*) default_version=v2-alpha-tpuv5; chips=$((chips / 2)); per_host=$((chips < 4 ? chips : 4)) ;;
  v5litepod-*) default_version=v2-alpha-tpuv5-lite; per_host=$((chips <= 8 ? chips : 4)) ;;
  v6e-*) default_version=v2-alpha-tpuv6e; per_host=$((chips <= 8 ? chips : 4)) ;;
  *)
    if [[ -z "$version" ]]; then
      echo "error: no default --version for --type $type: give --version (see gcloud compute tpus versions list)" >&2
      exit 2
    fi
    per_host="" ;;
esac
version="${version:-$default_version}"
gcloud_tpu=(gcloud compute tpus tpu-vm)
gcloud_queued=(gcloud compute tpus queued-resources)
where=(--zone "$zone")
if [[ -n "$project" ]]; then where+=(--project "$project"); fi
venv_python="\$HOME/e2_venv/bin/python"  # expanded by the workers' shells

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

queued_state() {
  "${gcloud_queued[@]}" describe "$name" "${where[@]}" --format='value(state.state)' 2> /dev/null || true
}

wait_until_active() {  # a queued resource: ACTIVE means its TPU VM exists
  printf '%q ' "${gcloud_queued[@]}" describe "$name" "${where[@]}" --format='value(state.state)'
  echo "# every ${queued_poll} s until ACTIVE (at most ${queued_timeout} s)"
  if [[ "$dry_run" == 1 ]]; then return; fi
  local start=$SECONDS state="" last=""
  while true; do
    state="$(queued_state)"
    if [[ "$state" != "$last" ]]; then
      echo "$(date -u +%H:%M:%SZ) queued resource $name: ${state:-not found} ($((SECONDS - start)) s)"
      last="$state"
    fi
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING | "")
        echo "error: queued resource $name is ${state:-gone}: see gcloud compute tpus queued-resources describe $name" >&2
        exit 1 ;;
    esac
    if ((SECONDS - start >= queued_timeout)); then
      echo "error: queued resource $name still $state after ${queued_timeout} s: it stays queued; run this again to keep waiting, or delete it (delete --queued)" >&2
      exit 1
    fi
    sleep "$queued_poll"
  done
}

create() {
  local state=""
  if [[ "$queued" == 1 && "$dry_run" == 0 ]]; then
    state="$(queued_state)"
    if [[ -n "$state" ]]; then
      echo "queued resource $name exists already (state $state): waiting for it, not requesting another"
      wait_until_active
      return
    fi
  fi
  if [[ "$dry_run" == 0 ]]; then
    state="$("${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' 2> /dev/null || true)"
  fi
  case "$state" in
    READY) echo "$name is READY in $zone: reusing it"; return ;;
    PREEMPTED | TERMINATED)
      echo "$name was $state: deleting it and creating it again"
      delete ;;
    "") ;;
    *) echo "error: $name exists in state $state: wait for it, or delete it" >&2; exit 1 ;;
  esac
  local extra=()
  if [[ "$spot" == 1 ]]; then extra+=(--spot); fi
  if [[ "$queued" == 1 ]]; then
    run "${gcloud_queued[@]}" create "$name" --node-id "$name" "${where[@]}" --accelerator-type "$type" \
      --runtime-version "$version" "${extra[@]}"
    echo "queued: $name is created when capacity allows"
    wait_until_active
  else
    run "${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$type" --version "$version" "${extra[@]}"
  fi
}

delete() {
  if [[ "$queued" == 1 ]]; then
    run "${gcloud_queued[@]}" delete "$name" "${where[@]}" --force --quiet
  else
    run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
  fi
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
  # Python 3.11 (uv fetches it: the images have 3.10), the project's pins, and JAX's TPU build of
  # the same version (libtpu comes from PyPI).
  local jax_version
  jax_version="$(sed -n 's/^jax==//p' "$(dirname "$0")/../requirements.txt")"
  on_workers "$get && cd e2_jax && python3 -m pip install --user --quiet --upgrade uv && \
~/.local/bin/uv venv --quiet --allow-existing --python 3.11 ~/e2_venv && \
~/.local/bin/uv pip install --quiet --python ~/e2_venv/bin/python -r requirements.txt -e . 'jax[tpu]==$jax_version'"
}

prepare_data() {
  if [[ -n "$weights" ]]; then
    on_workers "cd e2_jax && mkdir -p models/$(printf '%q' "${weights##*/}") && \
gcloud storage rsync --recursive $(printf '%q' "$weights") models/$(printf '%q' "${weights##*/}")"
  fi
  if [[ -n "$convert" ]]; then
    # Converting needs torch, which the workers do not install: convert once, here, and upload.
    local out="${convert%%=*}" archive="${convert#*=}"
    local converted="${archive%.*}_e2_jax" local_dir="${TMPDIR:-/tmp}/e2_jax_convert_$name"
    run gcloud storage cp "$archive" "$local_dir/"
    run python -m e2_jax.convert to-flax "$local_dir/${archive##*/}" "$local_dir/converted" --trust-pickle
    run gcloud storage rsync --recursive "$local_dir/converted" "$converted"
    on_workers "cd e2_jax && mkdir -p $(printf '%q' "$out") && gcloud storage rsync --recursive \
$(printf '%q' "$converted") $(printf '%q' "$out")"
  fi
  if [[ -n "$prepare" ]]; then
    if [[ -z "$data_dir" ]]; then echo "error: --prepare needs --data-dir (where the built dataset goes)" >&2; exit 2; fi
    local dataset="${prepare%%=*}" source="${prepare#*=}"
    on_workers --worker=0 "cd e2_jax && mkdir -p ~/manual && gcloud storage rsync --recursive $(printf '%q' "$source") ~/manual && \
$venv_python -m e2_jax.data.build $(printf '%q' "$dataset") --manual-dir ~/manual --data-dir $(printf '%q' "$data_dir")"
  fi
}

train() {
  if [[ -z "$config" || -z "$workdir" ]]; then echo "error: train needs --config and --workdir" >&2; exit 2; fi
  local flags=(--config "$config" --workdir "$workdir")
  if [[ -n "$data_dir" ]]; then flags+=("--config.data.data_dir=$data_dir"); fi
  flags+=("${main_flags[@]}")
  local worker=()
  if [[ -n "$per_host" ]]; then worker+=(--devices "$per_host"); fi
  if [[ "$workdir" == gs://* ]]; then worker+=(--log-to "$workdir/logs"); fi
  local options=""
  if [[ ${#worker[@]} -gt 0 ]]; then options="$(printf '%q ' "${worker[@]}")"; fi
  on_workers "cd e2_jax && bash launch/tpu_worker.sh start $options-- $(printf '%q ' "${flags[@]}")"
}

case "$command" in
  create) create ;;
  setup) setup ;;
  prepare) prepare_data ;;
  train) prepare_data; train ;;
  all) create; setup; prepare_data; train ;;
  logs) on_workers "tail -n 20 ~/e2_jax_train.log | sed \"s/^/\$(hostname): /\"" ;;
  status) on_workers "cd e2_jax && bash launch/tpu_worker.sh status" ;;
  stop) on_workers "cd e2_jax && bash launch/tpu_worker.sh stop" ;;
  delete) delete ;;
esac
