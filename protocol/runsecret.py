"""Run tokens: how the ranks of one job prove to the daemon that they belong to the same run.

The first publisher of a run binds it (daemon: its source and its token); a later hello that claims a
rank of that run is accepted only with the same token (or, for a rank-0 trainer of the same user, kept
apart as a run of its own). The token travels in the hello's `meta` under RUN_TOKEN_KEY; the daemon takes
it out before the hello is kept anywhere. Ranks agree on it without a collective, from the first of:

1. `run_secret=` given to the publisher (or a callback), or the EMBEDDING_MONITOR_RUN_SECRET variable:
   a secret the user shares between the job's ranks (strong: recommended across hosts);
2. a distributed job's rendezvous: TORCHELASTIC_RUN_ID (random per `torchrun --standalone` job) with
   MASTER_ADDR and MASTER_PORT (guessable by someone who can see the job's rendezvous: a weak secret, so
   a local attacker who can also reach the daemon could join; see docs/threat-model.md);
3. a single process: a random secret of its own (nobody else can join its run).

token = SHA-256 of ("embedding-monitor run token", secret, run name), 32 hex digits: the secret itself
never leaves the trainer, and one secret gives each run name its own token.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from typing import Final

RUN_TOKEN_KEY: Final[str] = "run_token"
RUN_SECRET_ENV: Final[str] = "EMBEDDING_MONITOR_RUN_SECRET"
_TOKEN_RE: Final = re.compile(r"[0-9a-f]{32}")


def job_secret(world_size: int, explicit: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(secret, where it came from) for this process's run token; see the module docstring for the order."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit, "run_secret="
    if env.get(RUN_SECRET_ENV):
        return env[RUN_SECRET_ENV], RUN_SECRET_ENV
    if world_size > 1:
        parts = [env.get("TORCHELASTIC_RUN_ID", ""), env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")]
        if any(parts):
            return "\0".join(parts), "the job's rendezvous (TORCHELASTIC_RUN_ID, MASTER_ADDR, MASTER_PORT)"
    return secrets.token_hex(16), "a random secret of this process"


def run_token(run: str, secret: str) -> str:
    """The token of `run` for ranks holding `secret` (32 hex digits)."""
    digest = hashlib.sha256()
    for field in ("embedding-monitor run token", secret, run):
        data = field.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(4, "big") + data)
    return digest.hexdigest()[:32]


def take_token(meta: dict) -> str | None:
    """Remove the run token from a hello's `meta` (peer-supplied) and return it when well formed."""
    value = meta.pop(RUN_TOKEN_KEY, None)
    return value if isinstance(value, str) and _TOKEN_RE.fullmatch(value) else None
