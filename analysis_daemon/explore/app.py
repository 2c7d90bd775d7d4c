"""The explorer's HTTP API and page (Starlette): read-only, over the runs found at start-up.

    GET /api/runs                               {"runs": [name, ...]}
    GET /api/iters[?run=R]                      {"run", "iters": [...]}
    GET /api/neighbours?iter=N&token=T&k=K      {"iter", "token", "id", "neighbours": [[id, token, cosine], ...]}
    GET /api/token?token=T                      {"id", "token", "iters", "drift_cosine", "norm", "neighbourhood_size",
                                                 "tokens_seen", "tokens_total", "tokens_total_since"}
    GET /api/vocab[?run=R]                      [token string or null, ...]
    GET /api/points?iter=N[&run=R]              float32 little-endian: x, y, drift, norm, cluster, flag,
                                                 tokens_total (NaN: not counted) (V each)
    GET /                                       the page (static/index.html); ?token=T&iter=N opens there
T is a token string or an id; R defaults to the first run. A bad or unknown argument is a 404 (400 for
a malformed one) with {"error": "one line"}. Nothing outside the results directory can be named.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .data import ExploreError, RunData

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 100
# The page and its scripts come from this package only; no inline script, nothing fetched elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class BadRequest(Exception):
    """A malformed argument (400)."""


def _int(request: Request, name: str, default: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        if default is None:
            raise BadRequest(f"missing ?{name}=")
        return default
    raw = raw.strip()
    if not raw.lstrip("-").isdigit() or len(raw) > 18:
        raise BadRequest(f"?{name}= must be an integer")
    return int(raw)


def create_app(runs: dict[str, RunData]) -> Starlette:
    """The ASGI app serving `runs` (name -> RunData)."""
    default = next(iter(runs))

    def run_of(request: Request) -> RunData:
        name = request.query_params.get("run", default)
        if name not in runs:
            raise ExploreError(f"no run {name[:200]!r} here")
        return runs[name]

    def token_of(request: Request, run: RunData) -> int:
        spec = request.query_params.get("token")
        if spec is None or spec == "":
            raise BadRequest("missing ?token=")
        return run.resolve(spec)

    def api(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                return handler(request)
            except BadRequest as exc:
                return JSONResponse({"error": str(exc)}, status_code=400, headers=SECURITY_HEADERS)
            except ExploreError as exc:
                return JSONResponse({"error": str(exc)}, status_code=404, headers=SECURITY_HEADERS)
        return endpoint

    def ok(value: Any) -> JSONResponse:
        return JSONResponse(value, headers=SECURITY_HEADERS)

    def run_list(request: Request) -> Response:
        return ok({"runs": list(runs)})

    def iters(request: Request) -> Response:
        run = run_of(request)
        return ok({"run": run.name, "iters": run.iters()})

    def neighbours(request: Request) -> Response:
        run = run_of(request)
        iteration = _int(request, "iter")
        k = _int(request, "k", 10)
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"?k= must be in [1, {MAX_K}]")
        token_id = token_of(request, run)
        return ok({"iter": iteration, "token": run.token_string(token_id), "id": token_id,
                   "neighbours": run.neighbours(iteration, token_id, k)})

    def token(request: Request) -> Response:
        run = run_of(request)
        token_id = token_of(request, run)
        return ok({"id": token_id, "token": run.token_string(token_id), **run.history(token_id)})

    def vocab(request: Request) -> Response:
        run = run_of(request)
        return ok(run.vocab()[: run.rows()])

    def points(request: Request) -> Response:
        run = run_of(request)
        arrays = run.arrays(_int(request, "iter"))
        rows = int(arrays.norm.shape[0])
        nan = np.full(rows, np.nan, dtype=np.float32)
        cluster, flagged = run.categories(arrays.iter)
        parts = [np.ascontiguousarray(arrays.xy[:, 0]), np.ascontiguousarray(arrays.xy[:, 1]),
                 arrays.drift if arrays.drift is not None else nan, arrays.norm, cluster, flagged,
                 arrays.tokens_total if arrays.tokens_total is not None else nan]
        body = b"".join(np.asarray(p, dtype="<f4").tobytes() for p in parts)
        return Response(body, media_type="application/octet-stream",
                        headers={**SECURITY_HEADERS, "X-Rows": str(rows), "Cache-Control": "no-store"})

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)

    routes = [
        Route("/", page),
        Route("/api/runs", api(run_list)),
        Route("/api/iters", api(iters)),
        Route("/api/neighbours", api(neighbours)),
        Route("/api/token", api(token)),
        Route("/api/vocab", api(vocab)),
        Route("/api/points", api(points)),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)
