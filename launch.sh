#!/usr/bin/env bash
# embedding-monitor launcher: trainer + analysis daemon, together or on two hosts (./launch.sh --help).
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<'USAGE'
embedding-monitor launcher: trainer + analysis daemon, together or on two hosts.

  ./launch.sh [--nproc N] [--daemon-args "ARGS"] [-- TRAINER_ARGS...]
        set up .venv if needed, run daemon + trainer on this host (torchrun when N > 1);
        --daemon-args passes options to the daemon (split on spaces, repeatable), e.g.
        ./launch.sh --daemon-args "--probe king,queen --knn-k 20" -- --max_iters=300
  ./launch.sh daemon --listen tcp://0.0.0.0:5555 --keys DIR [DAEMON_ARGS...]
        only the daemon, for snapshots from another host (CurveZMQ)
  ./launch.sh trainer --connect tcp://HOST:5555 --keys DIR [--nproc N] [-- TRAINER_ARGS...]
        only the trainer, publishing to a remote daemon
  ./launch.sh keygen DIR
        make the CurveZMQ keys for daemon and trainer
  ./launch.sh tail [RUN|HOST]
        follow the daemon's log (log lines and result blocks) of the newest run, of RUN, or of the
        runs whose trainers run on HOST (two-host mode: the daemon host's log, filtered)

Exit status: the trainer's (the daemon's in daemon mode); 130 on Ctrl-C, 143 on SIGTERM, 129 when the
terminal closes (SIGHUP): trainer and daemon are stopped cleanly first.
Environment: RUN (run name), RESULTS_DIR (default runs), ENDPOINT (same-host mode; default a private ipc
socket, see docs/privacy-and-transport.md), PORT (daemon/trainer modes, default 5555), DAEMON_THREADS,
WANDB_MODE (offline unless you configured wandb), EM_PYTHON (use this interpreter instead of .venv),
DRAIN_S (default 600: how long the daemon may go on analysing after the trainer finished; then it is
stopped, and what it had not analysed is named in its log).
USAGE
}

RESULTS_DIR=${RESULTS_DIR:-runs}
PORT=${PORT:-5555}

die() { echo "launch.sh: $*" >&2; exit 2; }
# `|| true`: after a terminal hang-up stderr may be gone, and a failed echo must not abort a clean stop.
log() { echo "[launch] $*" >&2 || true; }

python_bin() { scripts/setup.sh; }

# wandb runs offline unless the user configured it (an API key or a login in ~/.netrc).
default_wandb_mode() {
    if [ -z "${WANDB_MODE:-}" ] && [ -z "${WANDB_API_KEY:-}" ] && ! grep -qs "api.wandb.ai" "$HOME/.netrc"; then
        export WANDB_MODE=offline
        log "wandb: no credentials found, logging offline (wandb sync later to upload)"
    fi
}

# Make the run directory; remember whether it is ours to remove if the daemon cannot start.
prepare_run_dir() {
    RUN_DIR=$1
    RUN_DIR_CREATED=0
    [ -d "$RUN_DIR" ] || RUN_DIR_CREATED=1
    mkdir -p "$RUN_DIR"
}

# A daemon that never became ready leaves nothing behind: its log files go (their content was shown),
# a run directory made for it goes, and .current keeps naming the previous run.
undo_failed_start() {
    local logfile=$1
    rm -f "$logfile" "$logfile.stdout" "$logfile.stderr"
    if [ "$RUN_DIR_CREATED" = 1 ]; then rmdir "$RUN_DIR" 2>/dev/null || true; fi
}

# Start the daemon in the background and wait (bounded) for its ready line; sets DAEMON_PID.
# The daemon and its tee ignore SIGHUP: when the terminal closes, launch.sh stops the trainer first and
# then the daemon with SIGTERM, so the daemon flushes its sinks and logs its "stopped" line. The tee also
# ignores SIGINT (Ctrl-C reaches the whole process group): it must keep draining the daemon's stdout until
# the daemon exits, or the summary block of the analysis it finishes hits a closed pipe (a lost result).
start_daemon() {
    local logfile=$1; shift
    # This start's part of daemon.log begins after what an earlier daemon of the run wrote.
    DAEMON_LOG_FROM=$(( $(wc -l < "$logfile" 2>/dev/null || echo 0) + 1 ))
    : > "$logfile.stdout"
    : > "$logfile.stderr"
    # The daemon's summary blocks (stdout) show in this terminal and are kept in daemon.log.stdout; its
    # log lines and a copy of every block go to daemon.log (./launch.sh tail follows it).
    # shellcheck disable=SC2086
    ( trap '' HUP; exec $DAEMON_PREFIX "$PY" -m analysis_daemon --results-dir "$RESULTS_DIR" \
        --log-file "$logfile" "$@" ) > >(trap '' HUP INT; exec tee -a "$logfile.stdout") 2>> "$logfile.stderr" &
    DAEMON_PID=$!
    local waited=0
    until grep -q "ready" "$logfile.stdout" 2>/dev/null; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            cat "$logfile.stderr" >&2 || true
            undo_failed_start "$logfile"
            die "the analysis daemon exited before it was ready (its error is above)"
        fi
        if [ "$waited" -ge 600 ]; then
            kill -TERM "$DAEMON_PID" 2>/dev/null || true
            wait "$DAEMON_PID" 2>/dev/null || true
            cat "$logfile.stderr" >&2 || true
            undo_failed_start "$logfile"
            die "the analysis daemon was not ready after 60 s (its log is above)"
        fi
        sleep 0.1; waited=$((waited + 1))
    done
    echo "$(basename "$RUN_DIR")" > "$RESULTS_DIR/.current"
    log "$(grep -m1 ready "$logfile.stdout")  (pid $DAEMON_PID, log $logfile)"
}

# `wait PID` that survives trapped signals (a trap makes `wait` return early); sets WAIT_RC.
wait_pid() {
    local pid=$1
    while :; do
        WAIT_RC=0
        wait "$pid" || WAIT_RC=$?
        if [ "$WAIT_RC" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
        break
    done
}

# Stop the daemon explicitly with SIGTERM (its SIGHUP may mean something else) and wait for it.
stop_daemon() {
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait_pid "$DAEMON_PID"
    DAEMON_RC=$WAIT_RC
}

# The daemon's own account of its stop: the last "analysis-daemon stopped: received=... lost=N ..." line of
# this start's part of its log; empty when it died before it could write one (kill -9, a crash).
daemon_stopped_line() {
    tail -n +"${DAEMON_LOG_FROM:-1}" "$1" 2>/dev/null | grep "analysis-daemon stopped:" | tail -n 1 || true
}

# Warn only when results were lost: the daemon's stopped line counts them (lost=N: analysed, not delivered
# to a sink); without that line it stopped before it could say, and its exit status is all there is.
warn_if_results_lost() {
    local logfile=$1 stopped lost
    stopped=$(daemon_stopped_line "$logfile")
    if [ -z "$stopped" ]; then
        if [ "$DAEMON_RC" -ne 0 ]; then
            log "warning: the daemon (pid $DAEMON_PID) exited with status $DAEMON_RC (killed?); results may be incomplete, see $logfile"
        fi
        return 0
    fi
    lost=$(sed -n 's/.* lost=\([0-9][0-9]*\).*/\1/p' <<< "$stopped")
    if [ "${lost:-0}" -gt 0 ]; then
        log "warning: the daemon lost $lost analysed result(s) (not delivered to a sink); see $logfile"
    fi
}

# The last line of a run: where the results are and the command that turns them into a report.
report_hint() {
    local results=$1 cmd="$PY -m analysis_daemon"
    if command -v analysis-daemon >/dev/null 2>&1; then cmd="analysis-daemon"; fi
    log "results: $results (report: $cmd report $results -o ${results%/*}/report.html)"
}

signal_number() { case $1 in HUP) echo 1 ;; INT) echo 2 ;; *) echo 15 ;; esac; }

# Ctrl-C, SIGTERM or a closed terminal (SIGHUP): the trainer stops first (it finishes its iteration, saves,
# and its hook removes its shared memory), then the daemon; the main flow below waits for both.
on_signal() {
    if [ -n "$STOP_SIGNAL" ]; then
        log "SIG$1 again: stopping the daemon now"
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
        return
    fi
    STOP_SIGNAL=$1
    if [ -n "$TRAINER_PID" ]; then
        log "SIG$1: stopping the trainer, then the daemon"
        kill -TERM "$TRAINER_PID" 2>/dev/null || true
    else
        log "SIG$1: stopping the daemon"
        kill -TERM "$DAEMON_PID" 2>/dev/null || true
    fi
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
    local nproc=1 trainer_args=() daemon_args=() words
    while [ $# -gt 0 ]; do
        case $1 in
            --nproc) [ $# -ge 2 ] || die "--nproc needs a number"; nproc=$2; shift 2 ;;
            --daemon-args) [ $# -ge 2 ] || die "--daemon-args needs a quoted list, e.g. --daemon-args \"--probe king,queen\""
                read -r -a words <<< "$2"; daemon_args+=("${words[@]}"); shift 2 ;;
            --) shift; trainer_args=("$@"); break ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option '$1' (trainer options go after --, e.g. ./launch.sh -- --max_iters=2000; daemon options in --daemon-args \"...\")" ;;
        esac
    done
    PY=$(python_bin)
    default_wandb_mode
    plan_cores
    local run=${RUN:-synthetic-$(date +%Y%m%d-%H%M%S)}
    local logfile="$RESULTS_DIR/$run/daemon.log"
    # Same host: an ipc socket in the user's private (0700) socket directory, never a tcp port another user
    # could squat; one per launch, so two launches never meet. ENDPOINT overrides it (e.g. tcp://127.0.0.1:5555).
    local endpoint=${ENDPOINT:-}
    if [ -z "$endpoint" ]; then
        endpoint=$("$PY" -m protocol.endpoints) || die "no private socket directory (the error is above); set ENDPOINT"
        endpoint="${endpoint%/*}/launch-$$.sock"
    fi
    prepare_run_dir "$RESULTS_DIR/$run"

    STOP_SIGNAL="" TRAINER_PID="" DAEMON_PID=""
    start_daemon "$logfile" --listen "$endpoint" --threads "$DAEMON_THREADS" --exit-on-end \
        ${daemon_args[@]+"${daemon_args[@]}"}
    trap 'on_signal INT' INT
    trap 'on_signal TERM' TERM
    trap 'on_signal HUP' HUP

    log "trainer: run $run (results in $RESULTS_DIR/$run)"
    # shellcheck disable=SC2046
    ( trap '' HUP; exec $TRAINER_PREFIX $(trainer_cmd "$nproc") --run_name="$run" --analysis_endpoint="$endpoint" \
        --out_dir="$RESULTS_DIR/$run" ${trainer_args[@]+"${trainer_args[@]}"} ) &
    TRAINER_PID=$!
    wait_pid "$TRAINER_PID"
    local rc=$WAIT_RC
    TRAINER_PID=""
    DAEMON_RC=0
    if [ -n "$STOP_SIGNAL" ]; then
        stop_daemon
    elif [ "$rc" -ne 0 ]; then
        log "trainer exited with status $rc; stopping the daemon"
        stop_daemon
    else
        log "trainer finished; waiting (at most ${DRAIN_S:-600} s) for the daemon to analyse the last snapshot"
        # Bounded: a daemon held open (a long backlog, or a peer keeping a run alive) is stopped cleanly.
        local ticks=0
        while kill -0 "$DAEMON_PID" 2>/dev/null && [ -z "$STOP_SIGNAL" ] && [ "$ticks" -lt $(( ${DRAIN_S:-600} * 10 )) ]; do
            sleep 0.1; ticks=$((ticks + 1))
        done
        if kill -0 "$DAEMON_PID" 2>/dev/null && [ -z "$STOP_SIGNAL" ]; then
            log "the daemon is still running ${DRAIN_S:-600} s after the trainer finished (DRAIN_S): stopping it"
            stop_daemon
        else
            wait_pid "$DAEMON_PID"
            DAEMON_RC=$WAIT_RC
        fi
    fi
    trap - INT TERM HUP
    case $endpoint in ipc://*) rm -f "${endpoint#ipc://}" ;; esac  # the daemon is gone: its socket file goes too
    warn_if_results_lost "$logfile"
    if [ -n "$STOP_SIGNAL" ]; then
        local signo; signo=$(signal_number "$STOP_SIGNAL")
        log "interrupted by SIG$STOP_SIGNAL: trainer (status $rc) and daemon stopped; exit status $((128 + signo))"
        report_hint "$RESULTS_DIR/$run/analysis.jsonl"
        exit $((128 + signo))
    fi
    report_hint "$RESULTS_DIR/$run/analysis.jsonl"
    exit "$rc"
}

cmd_daemon() {
    local listen="tcp://0.0.0.0:$PORT" keys="" extra=()
    while [ $# -gt 0 ]; do
        case $1 in
            --listen) listen=$2; shift 2 ;;
            --keys) keys=$2; shift 2 ;;
            -h|--help) usage; exit 0 ;;
            *) extra+=("$1"); shift ;;
        esac
    done
    PY=$(python_bin)
    default_wandb_mode
    DAEMON_PREFIX=""
    local curve=()
    if [ -n "$keys" ]; then
        [ -f "$keys/server.key_secret" ] || die "no $keys/server.key_secret: run ./launch.sh keygen $keys first"
        curve=(--curve-secret "$keys/server.key_secret" --curve-authorized-dir "$keys/authorized_clients")
    fi
    local run=${RUN:-daemon-$(date +%Y%m%d-%H%M%S)}
    local logfile="$RESULTS_DIR/$run/daemon.log"
    prepare_run_dir "$RESULTS_DIR/$run"

    STOP_SIGNAL="" TRAINER_PID="" DAEMON_PID=""
    start_daemon "$logfile" --listen "$listen" ${curve[@]+"${curve[@]}"} ${extra[@]+"${extra[@]}"}
    trap 'on_signal INT' INT
    trap 'on_signal TERM' TERM
    trap 'on_signal HUP' HUP
    log "daemon log: $logfile (follow it with ./launch.sh tail)"
    wait_pid "$DAEMON_PID"
    trap - INT TERM HUP
    exit "$WAIT_RC"
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

# The daemon log that mentions run or host NAME (two-host mode: trainers' runs have no log of their own).
find_daemon_log() {
    local name=$1 f
    # Newest first; a run is named in "run NAME: ..." lines and block headers, a host in hello lines.
    # shellcheck disable=SC2012
    for f in $(ls -t "$RESULTS_DIR"/*/daemon.log 2>/dev/null); do
        if grep -qF -e "run $name:" -e "(run $name)" -e " on $name (" "$f"; then echo "$f"; return 0; fi
    done
    return 1
}

# stdin -> stdout: the log lines and result blocks of run NAME, or of the runs whose hello names host NAME.
# (bash, not awk: mawk buffers a pipe's input, and `tail -F` must show each line as it comes.)
filter_run() {
    local name=$1 line r inblock=0 show
    local -A runs=(["$name"]=1)
    while IFS= read -r line; do
        if [ "$inblock" = 1 ]; then
            printf '%s\n' "$line"
            [[ $line == "--- END OF ASYNC ANALYSIS RESULTS"* ]] && inblock=0
            continue
        fi
        if [[ $line == *"hello from pid "*" on $name ("* ]]; then
            r=${line%%: hello from pid *}; r=${r#* INFO run }; runs["$r"]=1
        fi
        show=0
        for r in "${!runs[@]}"; do
            if [[ $line == *"run $r:"* || $line == *"(run $r)"* ]]; then show=1; break; fi
        done
        if [ "$show" = 1 ]; then
            printf '%s\n' "$line"
            [[ $line == "--- ASYNC ANALYSIS RESULTS FOR ITERATION"* ]] && inblock=1
        fi
    done
}

cmd_tail() {
    local name=${1:-} logfile
    if [ -z "$name" ]; then
        [ -f "$RESULTS_DIR/.current" ] || die "no run yet in $RESULTS_DIR; name one: ./launch.sh tail RUN"
        name=$(cat "$RESULTS_DIR/.current")
    fi
    logfile="$RESULTS_DIR/$name/daemon.log"
    if [ -e "$logfile" ]; then exec tail -n 50 -F "$logfile"; fi
    # A trainer started with `./launch.sh trainer` (or a host name): its lines are in the log of the
    # daemon that served it; show those lines and that run's result blocks only.
    logfile=$(find_daemon_log "$name") || die "no daemon log names run or host '$name' in $RESULTS_DIR (runs: $(ls "$RESULTS_DIR" 2>/dev/null | tr '\n' ' ')); in two-host mode run this on the daemon host"
    echo "[launch] $name: following $logfile" >&2
    tail -n +1 -F "$logfile" 2>/dev/null | filter_run "$name"

}

case ${1:-} in
    daemon) shift; cmd_daemon "$@" ;;
    trainer) shift; cmd_trainer "$@" ;;
    keygen) shift; cmd_keygen "$@" ;;
    tail) shift; cmd_tail "$@" ;;
    -h|--help|help) usage ;;
    *) cmd_local "$@" ;;
esac
