"""The long-running daemon: receive loop, per-run state, backlog, liveness, the analysis worker
thread and the on-disk state store."""
