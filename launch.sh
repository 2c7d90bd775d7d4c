#!/usr/bin/env bash
# embedding-monitor launcher: trainer + analysis daemon, together or on two hosts.
#
#   ./launch.sh [-- TRAINER_ARGS...]              set up if needed, run daemon + trainer on the built-in data
#   ./launch.sh --nproc 4 [-- TRAINER_ARGS...]    same, trainer under torchrun with 4 processes (rank 0 publishes)
#   ./launch.sh daemon --listen tcp://0.0.0.0:5555 --keys DIR [DAEMON_ARGS...]
#                                                 only the daemon, for snapshots from another host (CurveZMQ)
#   ./launch.sh trainer --connect tcp://HOST:5555 --keys DIR [--nproc N] [-- TRAINER_ARGS...]
#                                                 only the trainer, publishing to a remote daemon
#   ./launch.sh keygen DIR                        make the CurveZMQ keys for daemon and trainer
#   ./launch.sh tail [RUN]                        follow the daemon log of the newest (or the named) run
#
# Environment: RUN (run name), RESULTS_DIR (default runs), PORT (default 5555), DAEMON_THREADS,
# WANDB_MODE (offline unless you configured wandb), EM_PYTHON (use this interpreter instead of .venv).
set -euo pipefail
cd "$(dirname "$0")"

RESULTS_DIR=${RESULTS_DIR:-runs}
PORT=${PORT:-5555}

die() { echo "launch.sh: $*" >&2; exit 2; }
log() { echo "[launch] $*" >&2; }

python_bin() { scripts/setup.sh; }

# wandb runs offline unless the user configured it (an API key or a login in ~/.netrc).
default_wandb_mode() {
    if [ -z "${WANDB_MODE:-}" ] && [ -z "${WANDB_API_KEY:-}" ] && ! grep -qs "api.wandb.ai" "$HOME/.netrc"; then
        export WANDB_MODE=offline
        log "wandb: no credentials found, logging offline (wandb sync later to upload)"
    fi
}

# Start the daemon in the background and wait (bounded) for its ready line; sets DAEMON_PID.
start_daemon() {
    local logfile=$1; shift
    mkdir -p "$(dirname "$logfile")"
    : > "$logfile.stdout"
    # The daemon's summary blocks (stdout) show in this terminal beside the trainer's lines and are
    # kept in daemon.log.stdout; its log lines go to daemon.log (./launch.sh tail follows it).
    # shellcheck disable=SC2086
    $DAEMON_PREFIX "$PY" -m analysis_daemon --results-dir "$RESULTS_DIR" --log-file "$logfile" "$@" \
        > >(tee -a "$logfile.stdout") 2>> "$logfile.stderr" &
    DAEMON_PID=$!
    local waited=0
    until grep -q "ready" "$logfile.stdout" 2>/dev/null; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            cat "$logfile.stderr" >&2 || true
            die "the analysis daemon exited before it was ready (log: $logfile.stderr)"
        fi
        if [ "$waited" -ge 600 ]; then die "the analysis daemon was not ready after 60 s (log: $logfile)"; fi
        sleep 0.1; waited=$((waited + 1))
    done
    log "$(grep -m1 ready "$logfile.stdout")  (pid $DAEMON_PID, log $logfile)"
}

# Pin trainer and daemon to disjoint cores where taskset exists and there are at least 2 cores:
# four busy threads on two cores made each training step 4x slower in our measurements.
plan_cores() {
    local n; n=$(nproc 2>/dev/null || echo 1)
    TRAINER_PREFIX=""; DAEMON_PREFIX=""; DAEMON_THREADS=${DAEMON_THREADS:-}  # the daemon lowers its own priority (--nice 10)
    if command -v taskset >/dev/null && [ "$n" -ge 2 ]; then
        local daemon_cores=$(( n / 4 > 1 ? n / 4 : 1 ))
        local last=$((n - 1)) first_daemon=$((n - daemon_cores))
        TRAINER_PREFIX="taskset -c 0-$((first_daemon - 1))"
        DAEMON_PREFIX="taskset -c $first_daemon-$last"
        DAEMON_THREADS=${DAEMON_THREADS:-$daemon_cores}
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$first_daemon}
    fi
    DAEMON_THREADS=${DAEMON_THREADS:-1}
}

trainer_cmd() {
    local nproc=$1
    if [ "$nproc" -gt 1 ]; then
        echo "$PY -m torch.distributed.run --standalone --nproc_per_node=$nproc train.py"
    else
        echo "$PY train.py"
    fi
}

cmd_local() {
    local nproc=1 trainer_args=()
    while [ $# -gt 0 ]; do
        case $1 in
            --nproc) nproc=$2; shift 2 ;;
            --) shift; trainer_args=("$@"); break ;;
            *) die "unknown option '$1' (trainer options go after --, e.g. ./launch.sh -- --max_iters=2000)" ;;
        esac
    done
    PY=$(python_bin)
    default_wandb_mode
    plan_cores
    local run=${RUN:-synthetic-$(date +%Y%m%d-%H%M%S)}
    local logfile="$RESULTS_DIR/$run/daemon.log"
    mkdir -p "$RESULTS_DIR/$run"
    echo "$run" > "$RESULTS_DIR/.current"
    local endpoint="tcp://127.0.0.1:$PORT"

    start_daemon "$logfile" --listen "$endpoint" --threads "$DAEMON_THREADS" --exit-on-end
    TRAINER_PID=""
    # Ctrl-C / TERM: stop the trainer first (its hook unlinks its shared memory at exit),
    # then the daemon, which flushes its sinks; wait for both so nothing is orphaned.
    cleanup() {
        trap - INT TERM
        log "stopping"
        [ -n "$TRAINER_PID" ] && kill -TERM "$TRAINER_PID" 2>/dev/null || true
        [ -n "$TRAINER_PID" ] && wait "$TRAINER_PID" 2>/dev/null || true
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
        exit 130
    }
    trap cleanup INT TERM

    log "trainer: run $run (results in $RESULTS_DIR/$run)"
    # shellcheck disable=SC2046
    $TRAINER_PREFIX $(trainer_cmd "$nproc") --run_name="$run" --analysis_endpoint="$endpoint" \
        --out_dir="$RESULTS_DIR/$run" "${trainer_args[@]}" &
    TRAINER_PID=$!
    local rc=0
    wait "$TRAINER_PID" || rc=$?
    TRAINER_PID=""
    if [ "$rc" -ne 0 ]; then
        log "trainer exited with status $rc; stopping the daemon"
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
    else
        log "trainer finished; waiting for the daemon to analyse the last snapshot"
    fi
    local drc=0
    wait "$DAEMON_PID" || drc=$?
    trap - INT TERM
    log "results: $RESULTS_DIR/$run/analysis.jsonl"
    [ "$rc" -eq 0 ] || exit "$rc"
    exit "$drc"
}

cmd_daemon() {
    local listen="tcp://0.0.0.0:$PORT" keys="" extra=()
    while [ $# -gt 0 ]; do
        case $1 in
            --listen) listen=$2; shift 2 ;;
            --keys) keys=$2; shift 2 ;;
            *) extra+=("$1"); shift ;;
        esac
    done
    PY=$(python_bin)
    default_wandb_mode
    local curve=()
    if [ -n "$keys" ]; then
        [ -f "$keys/server.key_secret" ] || die "no $keys/server.key_secret: run ./launch.sh keygen $keys first"
        curve=(--curve-secret "$keys/server.key_secret" --curve-authorized-dir "$keys/authorized_clients")
    fi
    local run=${RUN:-daemon-$(date +%Y%m%d-%H%M%S)}
    mkdir -p "$RESULTS_DIR/$run"
    echo "$run" > "$RESULTS_DIR/.current"
    log "daemon log: $RESULTS_DIR/$run/daemon.log"

    exec "$PY" -m analysis_daemon --listen "$listen" --results-dir "$RESULTS_DIR" \
        --log-file "$RESULTS_DIR/$run/daemon.log" "${curve[@]}" "${extra[@]}"
}

cmd_trainer() {
    local connect="" keys="" nproc=1 trainer_args=()
    while [ $# -gt 0 ]; do
        case $1 in
            --connect) connect=$2; shift 2 ;;
            --keys) keys=$2; shift 2 ;;
            --nproc) nproc=$2; shift 2 ;;
            --) shift; trainer_args=("$@"); break ;;
            *) die "unknown option '$1' (trainer options go after --)" ;;
        esac
    done
    [ -n "$connect" ] || die "trainer mode needs --connect tcp://HOST:PORT (the daemon's address)"
    PY=$(python_bin)
    default_wandb_mode
    local curve=()
    if [ -n "$keys" ]; then
        [ -f "$keys/client.key_secret" ] || die "no $keys/client.key_secret: copy it from the keygen folder"
        [ -f "$keys/server.key" ] || die "no $keys/server.key: copy the daemon's public key here"
        curve=(--analysis_curve_client_secret="$keys/client.key_secret" --analysis_curve_server_public="$keys/server.key")
    fi
    local run=${RUN:-synthetic-$(date +%Y%m%d-%H%M%S)}
    # shellcheck disable=SC2046
    exec $(trainer_cmd "$nproc") --run_name="$run" --analysis_endpoint="$connect" --out_dir="$RESULTS_DIR/$run" \
        "${curve[@]}" "${trainer_args[@]}"
}

cmd_keygen() {
    [ $# -eq 1 ] || die "usage: ./launch.sh keygen DIR"
    PY=$(python_bin)
    local dir=$1
    "$PY" -m analysis_daemon keygen "$dir" --name server >/dev/null
    "$PY" -m analysis_daemon keygen "$dir" --name client >/dev/null
    # The daemon accepts exactly the trainers whose public keys are in authorized_clients/.
    mkdir -p "$dir/authorized_clients"
    cp "$dir/client.key" "$dir/authorized_clients/client.key"
    cat <<MSG
CurveZMQ keys written to $dir:
  daemon host : $dir/server.key_secret and $dir/authorized_clients/   (./launch.sh daemon --keys $dir)
  trainer host: $dir/client.key_secret and $dir/server.key            (./launch.sh trainer --keys $dir ...)
Copy only those files; keep *.key_secret private.
MSG
}

cmd_tail() {
    local run=${1:-}
    if [ -z "$run" ]; then
        [ -f "$RESULTS_DIR/.current" ] || die "no run yet in $RESULTS_DIR; name one: ./launch.sh tail RUN"
        run=$(cat "$RESULTS_DIR/.current")
    fi
    local logfile="$RESULTS_DIR/$run/daemon.log"
    [ -e "$logfile" ] || die "no daemon log at $logfile (runs: $(ls "$RESULTS_DIR" 2>/dev/null | tr '\n' ' '))"
    exec tail -n 50 -F "$logfile"
}

case ${1:-} in
    daemon) shift; cmd_daemon "$@" ;;
    trainer) shift; cmd_trainer "$@" ;;
    keygen) shift; cmd_keygen "$@" ;;
    tail) shift; cmd_tail "$@" ;;
    -h|--help|help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) cmd_local "$@" ;;
esac
