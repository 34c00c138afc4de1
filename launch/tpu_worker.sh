#!/usr/bin/env bash
# What runs on each TPU VM worker (launch/tpu_vm.sh calls it over ssh on all of them at once).
#
#   launch/tpu_worker.sh start [--python P] [--devices N] [--log-to gs://.../logs] -- FLAGS OF e2_jax.main
#   launch/tpu_worker.sh stop      SIGTERM to the trainer: it saves a checkpoint and exits
#   launch/tpu_worker.sh status    is a trainer running here, and the last lines of its log
#   ... --dry-run                  print what it would do, do nothing
#
# `start`: stops a trainer left from an earlier launch, frees the TPU from any other process that
# still holds it (a crashed run, a notebook), checks this worker's devices (platform tpu, N
# chips), then starts `python -m e2_jax.main` detached (nohup) with its pid in ~/e2_jax_train.pid
# and its output in ~/e2_jax_train.log; when it ends the log is copied to --log-to as
# <hostname>.log (every worker's log next to the run).
set -euo pipefail

PID_FILE="$HOME/e2_jax_train.pid"
LOG_FILE="$HOME/e2_jax_train.log"

action="${1:-}"
case "$action" in
  start | stop | status | _supervise) shift ;;
  *) echo "usage: launch/tpu_worker.sh start|stop|status [--dry-run] [...] -- FLAGS" >&2; exit 2 ;;
esac
python="$HOME/e2_venv/bin/python" devices="" log_to="" dry_run=0
main_flags=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) python="$2"; shift 2 ;;
    --devices) devices="$2"; shift 2 ;;
    --log-to) log_to="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; main_flags=("$@"); break ;;
    *) echo "error: unknown option $1 (see launch/tpu_worker.sh)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."

run() {  # prints a command, runs it unless --dry-run
  printf '%q ' "$@"
  echo
  if [[ "$dry_run" == 0 ]]; then "$@"; fi
}

running_pid() {  # the trainer started here, if it still runs
  if [[ -f "$PID_FILE" ]]; then
    local pid
    pid="$(cat "$PID_FILE")"
    if kill -0 "$pid" 2> /dev/null; then echo "$pid"; fi
  fi
}

stop_trainer() {  # SIGTERM, then up to $1 seconds to save and exit, then SIGKILL
  local pid
  pid="$(running_pid)"
  if [[ -z "$pid" ]]; then
    echo "$(hostname): no trainer running"
    return
  fi
  run kill -TERM "$pid"
  if [[ "$dry_run" == 1 ]]; then return; fi
  for ((i = 0; i < $1; i++)); do
    if ! kill -0 "$pid" 2> /dev/null; then
      echo "$(hostname): trainer $pid stopped"
      return
    fi
    sleep 1
  done
  echo "$(hostname): trainer $pid still running after $1 s: SIGKILL"
  kill -KILL "$pid" 2> /dev/null || true
}

free_tpu() {  # processes that still hold the TPU devices, and libtpu's lock file
  local holders
  holders="$(sudo lsof -t /dev/accel* /dev/vfio/* 2> /dev/null | sort -u | tr '\n' ' ' || true)"
  if [[ -n "${holders// /}" ]]; then
    echo "$(hostname): processes holding the TPU: $holders"
    # shellcheck disable=SC2086  # a list of pids
    run sudo kill -9 $holders
  fi
  run sudo rm -f /tmp/libtpu_lockfile
}

case "$action" in
  stop) stop_trainer 300 ;;
  status)
    pid="$(running_pid)"
    echo "$(hostname): ${pid:+trainer running as $pid}${pid:-no trainer running}"
    if [[ -f "$LOG_FILE" ]]; then tail -n 5 "$LOG_FILE"; fi
    ;;
  start)
    stop_trainer 120
    free_tpu
    check=("$python" -m e2_jax.distributed --platform tpu)
    if [[ -n "$devices" ]]; then check+=(--count "$devices"); fi
    run "${check[@]}"
    supervise=(nohup bash launch/tpu_worker.sh _supervise --python "$python" --log-to "$log_to" -- "${main_flags[@]}")
    printf '%q ' "${supervise[@]}"
    echo
    if [[ "$dry_run" == 0 ]]; then
      "${supervise[@]}" > /dev/null 2>&1 &
      for _ in $(seq 50); do [[ -n "$(running_pid)" ]] && break; sleep 0.1; done
      echo "$(hostname): trainer started as $(running_pid), log in $LOG_FILE"
    fi
    ;;
  _supervise)  # detached: the trainer, its pid file, and its log copied next to the run when it ends
    "$python" -m e2_jax.main "${main_flags[@]}" > "$LOG_FILE" 2>&1 &
    echo "$!" > "$PID_FILE"
    status=0
    wait "$!" || status=$?
    echo "exit status $status" >> "$LOG_FILE"
    if [[ -n "$log_to" ]]; then gcloud storage cp "$LOG_FILE" "$log_to/$(hostname).log" || true; fi
    exit "$status"
    ;;
esac
