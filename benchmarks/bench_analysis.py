"""Benchmark of the analysis core: geometry against its matmul floor, peak memory, drift, and the seed's sketch.

Run:  .venv/bin/python benchmarks/bench_analysis.py [--vocab 50304 --dim 768] [--seed-vocab N | --skip-seed]
      [--skip-core] [--skip-extras] [--skip-galaxy] [--skip-sizes]
      (f) alone: --skip-core --skip-seed --skip-galaxy --skip-sizes; (g) alone: --skip-core --skip-seed
      --skip-extras --skip-sizes; (h) alone: --skip-core --skip-seed --skip-extras --skip-galaxy

Every part runs in a fresh subprocess, so each peak RSS (ru_maxrss) belongs to that part alone; the
input (a seeded low-rank-plus-noise matrix with a shared offset, like trained token embeddings) is built
inside the subprocess and counts towards its peak, as a snapshot does in the daemon.
The ratio (a)/(b) is measured interleaved: geometry runs with a progress callback that runs and times the
plain matmul of the block geometry just finished, so both see the same load on a shared machine; (a) is
geometry's own time (total minus the callback's). The geometry's peak RSS is read before that, after a
run alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis_daemon.metrics.drift import measure_semantic_drift  # noqa: E402
from analysis_daemon.metrics.geometry import (  # noqa: E402
    analyze_embedding_geometry, geometry_and_neighbours, geometry_neighbours_and_sizes)
from analysis_daemon.metrics.clump import find_clump  # noqa: E402
from analysis_daemon.metrics.galaxy import galaxy_map  # noqa: E402
from analysis_daemon.metrics.insight import compute_insight  # noqa: E402


def make_embeddings(vocab: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Low-rank structure + isotropic noise + a shared offset: mean cosine > 0 and a spread-out histogram."""
    g = torch.Generator().manual_seed(seed)
    rank = min(64, dim)
    w = torch.randn(vocab, rank, generator=g) @ (torch.randn(rank, dim, generator=g) / math.sqrt(rank))
    w += 0.7 * torch.randn(vocab, dim, generator=g)
    w += 0.4 * torch.randn(1, dim, generator=g)
    return w


def seed_geometry(embedding_weights: torch.Tensor, threshold: float = 0.7, chunk_size: int = 512) -> dict:
    """The original sketch's geometry (original-spec.txt, Part 2), defects included, for comparison only."""
    weights = embedding_weights.clone().float()
    weights_norm = F.normalize(weights, p=2, dim=1)
    vocab_size, _ = weights_norm.shape
    total_neighbors = 0
    all_sim_values = []
    for i in range(0, vocab_size, chunk_size):
        chunk_end = min(i + chunk_size, vocab_size)
        chunk = weights_norm[i:chunk_end, :]
        sim_matrix_chunk = torch.matmul(chunk, weights_norm.T)
        for j in range(chunk.shape[0]):
            global_idx = i + j
            sim_matrix_chunk[j, global_idx] = -1.0
        total_neighbors += (sim_matrix_chunk > threshold).sum().item()
        all_sim_values.append(sim_matrix_chunk.flatten())
    full_sim_distribution = torch.cat(all_sim_values)
    avg_neighborhood_size = total_neighbors / vocab_size
    hist = torch.histogram(full_sim_distribution, bins=100, range=(-0.5, 1.0))
    return {
        "local_density": {"average_neighborhood_size": avg_neighborhood_size, "threshold": threshold},
        "global_sparsity": {
            "histogram_counts": hist.hist.tolist(),
            "histogram_bins": hist.bin_edges.tolist(),
            "mean_similarity": full_sim_distribution.mean().item(),
            "std_similarity": full_sim_distribution.std().item(),
        },
    }


def interleaved(weights: torch.Tensor, threshold: float, chunk_size: int) -> tuple[float, float]:
    """(geometry seconds, floor seconds) with the floor's block matmul run inside geometry's progress
    callback, right after the same row chunk: both see the same load on a shared machine, chunk by chunk.
    Assumes every row is valid (random input), so the floor's chunks are geometry's chunks."""
    u = F.normalize(weights.float(), dim=1)
    v = u.shape[0]
    buf = torch.empty(min(chunk_size, v) * v)
    state = {"chunk": 0, "floor": 0.0}

    def floor_block(_fraction: float) -> None:
        r0 = state["chunk"] * chunk_size
        r1 = min(r0 + chunk_size, v)
        t0 = time.perf_counter()
        torch.mm(u[r0:r1], u[r0:].T, out=buf[: (r1 - r0) * (v - r0)].view(r1 - r0, v - r0))
        state["floor"] += time.perf_counter() - t0
        state["chunk"] += 1

    t0 = time.perf_counter()
    analyze_embedding_geometry(weights, threshold=threshold, chunk_size=chunk_size, progress=floor_block)
    total = time.perf_counter() - t0
    return total - state["floor"], state["floor"]


def run_part(args: argparse.Namespace) -> dict:
    """One measurement, inside its own process; returns seconds, peak RSS and a few result figures."""
    vocab = args.vocab
    w = make_embeddings(vocab, args.dim, args.seed)
    out: dict = {"part": args.part, "vocab": vocab}
    if args.part == "geometry":
        # Geometry alone first, so the peak RSS read right after it is the geometry's (input included).
        t0 = time.perf_counter()
        r = analyze_embedding_geometry(w, threshold=args.threshold, chunk_size=args.chunk_size)
        out["seconds"] = time.perf_counter() - t0
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.update(mean=r["global_sparsity"]["mean_similarity"], neighbors=r["local_density"]["average_neighborhood_size"])
        out["interleaved"] = [interleaved(w, args.threshold, args.chunk_size) for _ in range(args.repeats)]
        return out
    if args.part == "extras":
        # What the daemon runs per snapshot, without and with the extras, alternating so both see the
        # same load: drift + geometry vs drift + geometry with neighbour lists + the insight section.
        # The previous neighbour lists are this one's, shifted by a row (the overlap costs the same).
        prev = w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(args.seed + 2))
        base, extra, knn_part = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            measure_semantic_drift(prev, w, top_k=50)
            analyze_embedding_geometry(w, threshold=args.threshold, chunk_size=args.chunk_size)
            base.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            measure_semantic_drift(prev, w, top_k=50)
            t_geo = time.perf_counter()
            _, (ids, _) = geometry_and_neighbours(w, threshold=args.threshold, chunk_size=args.chunk_size, knn_k=10)
            t1 = time.perf_counter()
            ins = compute_insight(w, prev=prev, knn_ids=ids, prev_knn_ids=ids.roll(1, dims=0),
                                  probe_ids=[1, 2, 3], top_k=50, probe_k=10)
            extra.append(time.perf_counter() - t0)
            knn_part.append((t1 - t_geo, time.perf_counter() - t1))
        out.update(base=base, extra=extra, parts=knn_part, rank=ins["effective_rank"],
                   iso=ins["isotropy"]["partition_ratio"], overlap=ins["neighbourhood_drift"]["mean_overlap"])
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out
    if args.part == "galaxy":
        # The galaxy map and the partial-collapse search beside the analysis they join (drift + geometry
        # with neighbour lists + insight), alternating so both see the same load. The map is aligned to
        # the previous snapshot's map, as in the daemon; the clump search starts from the pass's lists.
        prev = w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(args.seed + 2))
        prev_map = galaxy_map(prev, rows=2000, threshold=args.threshold)
        analysis, galaxy, clump, forced = [], [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            measure_semantic_drift(prev, w, top_k=50)
            _, (ids, cos) = geometry_and_neighbours(w, threshold=args.threshold, chunk_size=args.chunk_size, knn_k=10)
            compute_insight(w, prev=prev, knn_ids=ids, prev_knn_ids=ids.roll(1, dims=0), probe_ids=[1, 2, 3])
            analysis.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m = galaxy_map(w, rows=2000, threshold=args.threshold, previous={"iter": 0, "points": prev_map["points"]})
            galaxy.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            found = find_clump(w, threshold=args.threshold, share=0.2, kth_cosine=cos[:, -1], knn_k=10)
            clump.append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # worst case: every row a candidate (no lists), one 64 x V product
            find_clump(w, threshold=args.threshold, share=0.2)
            forced.append(time.perf_counter() - t0)
        out.update(analysis=analysis, galaxy=galaxy, clump=clump, forced=forced, clusters=m["cluster_count"],
                   clustered=m["clustered_points"], ev=m["explained_variance"], found=found is not None,
                   candidates=int((cos[:, -1] > args.threshold).sum()), bytes=len(json.dumps(m)))
        return out
    if args.part == "sizes":
        # The explorer's per-token neighbourhood sizes: the daemon's pass (neighbour lists on) without and
        # with them, alternating (and swapping which goes first) so both see the same load; the sizes must
        # add up to the pair count. On a loaded machine whole passes vary by tens of percent, so the sizes'
        # own work is also timed inside the pass, block by block (torch's CPU ops are synchronous): that
        # share of the same run is the figure load cannot blur. One threshold per entry: this input has no
        # pair above the default 0.7, so lower ones give a sparse (~3 per token, on a bin edge) and a
        # denser (~36, off the edges) mask; 0.0 a dense one (half the pairs: a collapsed embedding).
        from analysis_daemon.metrics import geometry
        own, depth = [0.0], [0]

        def timed(method):
            def run(*a, **kw):  # only the outermost call counts: add_bins calls add_block itself
                depth[0] += 1
                t0 = time.perf_counter()
                try:
                    return method(*a, **kw)
                finally:
                    depth[0] -= 1
                    if depth[0] == 0:
                        own[0] += time.perf_counter() - t0
            return run
        for name in ("add_bins", "add_block"):
            setattr(geometry._RowsAbove, name, timed(getattr(geometry._RowsAbove, name)))
        out["thresholds"] = []
        for threshold in args.sizes_thresholds:
            times: dict[bool, list[float]] = {False: [], True: []}
            shares = []
            for r in range(args.repeats):
                for sizes_on in ((False, True) if r % 2 == 0 else (True, False)):
                    own[0] = 0.0
                    t0 = time.perf_counter()
                    geo, _, got = geometry_neighbours_and_sizes(w, threshold=threshold, chunk_size=args.chunk_size,
                                                                knn_k=10, sizes=sizes_on)
                    times[sizes_on].append(time.perf_counter() - t0)
                    if sizes_on:
                        shares.append((own[0], times[True][-1]))
                        sizes, pairs = got, geo["local_density"]["neighbor_pairs"]
                        assert int(sizes.sum()) == pairs, (int(sizes.sum()), pairs)
            out["thresholds"].append({"threshold": threshold, "without": times[False], "with_sizes": times[True],
                                      "own": shares, "pairs": pairs, "max_size": int(sizes.max()),
                                      "isolated": int((sizes == 0).sum())})
        return out
    t0 = time.perf_counter()
    if args.part == "ours":
        r = analyze_embedding_geometry(w, threshold=args.threshold, chunk_size=args.chunk_size)
        out.update(mean=r["global_sparsity"]["mean_similarity"], neighbors=r["local_density"]["average_neighborhood_size"])
    elif args.part == "seed":
        r = seed_geometry(w, threshold=args.threshold, chunk_size=args.chunk_size)
        out.update(mean=r["global_sparsity"]["mean_similarity"], neighbors=r["local_density"]["average_neighborhood_size"])
    elif args.part == "drift":
        g = torch.Generator().manual_seed(args.seed + 1)
        q, _ = torch.linalg.qr(torch.randn(args.dim, args.dim, generator=g))
        curr = (w @ q + 0.01 * torch.randn(vocab, args.dim, generator=g) + 1.0).contiguous()
        t0 = time.perf_counter()
        r = measure_semantic_drift(w, curr, top_k=50)
        out.update(cos=r["average_cosine_similarity"])
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def spawn(args: argparse.Namespace, part: str, vocab: int) -> dict:
    """Run one part in a fresh interpreter and return its JSON figures."""
    cmd = [sys.executable, __file__, "--part", part, "--vocab", str(vocab), "--dim", str(args.dim),
           "--chunk-size", str(args.chunk_size), "--threshold", str(args.threshold), "--seed", str(args.seed),
           "--repeats", str(args.repeats), "--sizes-thresholds", ",".join(map(str, args.sizes_thresholds))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def seed_fit(dim: int) -> int:
    """Largest V the seed's sketch fits in: the V x V list plus its concatenation (8 V^2 bytes) and the input,
    within a quarter of the memory available now (other processes share this machine)."""
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    budget = avail / 4
    v = int(math.sqrt(budget / 8.5))
    return max(1000, v // 1000 * 1000)


def main() -> None:
    """Print the figures: geometry vs matmul floor, peak RSS, drift, seed's sketch side by side."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-vocab", type=int, default=0, help="V for the seed's sketch (0: largest that fits)")
    p.add_argument("--skip-seed", action="store_true", help="skip part (e)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved geometry/matmul rounds (best ratio shown)")
    p.add_argument("--skip-core", action="store_true", help="skip parts (a)-(d): only the extras' cost (f)")
    p.add_argument("--skip-extras", action="store_true", help="skip part (f)")
    p.add_argument("--skip-galaxy", action="store_true", help="skip part (g)")
    p.add_argument("--skip-sizes", action="store_true", help="skip part (h)")
    p.add_argument("--sizes-thresholds", type=lambda t: [float(x) for x in t.split(",")], default=[0.7, 0.4, 0.35, 0.0],
                   help="thresholds of part (h), comma-separated")
    p.add_argument("--part", choices=["geometry", "ours", "drift", "seed", "extras", "galaxy", "sizes"],
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        print(json.dumps(run_part(args)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    v, d = args.vocab, args.dim
    print(f"V={v} d={d} chunk_size={args.chunk_size} threshold={args.threshold} float32")
    if not args.skip_core:
        geo = spawn(args, "geometry", v)
        drift = spawn(args, "drift", v)
        g, m = min(geo["interleaved"], key=lambda gm: gm[0] / gm[1])
        rounds = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in geo["interleaved"])
        print(f"(a) geometry wall time            {geo['seconds']:8.2f} s   (alone; mean cos {geo['mean']:.4f}, "
              f"avg neighbours {geo['neighbors']:.3f})")
        print(f"    geometry, interleaved         {g:8.2f} s   (its own time with (b) run block by block inside it)")
        print(f"(b) triangle matmul (floor)       {m:8.2f} s   (same blocks, timed between geometry's; rounds a/b: {rounds} s)")
        print(f"    ratio (a)/(b)                 {g / m:8.3f}    (interleaved, best of {args.repeats}; target <= 1.25)")
        print(f"(c) peak RSS, geometry process    {geo['peak_rss_mib']:8.0f} MiB (target < 1536; input included)")
        print(f"(d) drift wall time               {drift['seconds']:8.2f} s   (target < 3; avg cos {drift['cos']:.4f}), "
              f"peak RSS {drift['peak_rss_mib']:.0f} MiB (both snapshots included)")
    if not args.skip_seed:
        sv = args.seed_vocab or min(seed_fit(d), v)
        seed = spawn(args, "seed", sv)
        ours = spawn(args, "ours", sv)
        print(f"(e) at V={sv}: seed sketch {seed['seconds']:.2f} s, peak RSS {seed['peak_rss_mib']:.0f} MiB; "
              f"ours {ours['seconds']:.2f} s, peak RSS {ours['peak_rss_mib']:.0f} MiB; "
              f"speed-up {seed['seconds'] / ours['seconds']:.1f}x, memory {seed['peak_rss_mib'] / ours['peak_rss_mib']:.1f}x")
        print(f"    seed mean cos {seed['mean']:.4f} (diagonal -1 included) vs ours {ours['mean']:.4f}")
    if not args.skip_extras:
        ex = spawn(args, "extras", v)
        b, e = min(ex["base"]), min(ex["extra"])
        pairs = ", ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(ex["base"], ex["extra"]))
        knn_s, ins_s = min(ex["parts"], key=lambda p: p[0] + p[1])
        print(f"(f) analysis without extras       {b:8.2f} s   (drift + geometry, as the daemon runs them)")
        print(f"    analysis with extras          {e:8.2f} s   (drift + geometry with neighbour lists {knn_s:.2f} s, "
              f"insight section {ins_s:.2f} s; rounds without/with: {pairs} s)")
        print(f"    ratio with/without            {e / b:8.3f}    (best of {args.repeats} each; target <= 1.15; "
              f"effective rank {ex['rank']:.1f}, isotropy {ex['iso']:.3f}, peak RSS {ex['peak_rss_mib']:.0f} MiB)")
    if not args.skip_galaxy:
        gx = spawn(args, "galaxy", v)
        a, g, c, f = min(gx["analysis"]), min(gx["galaxy"]), min(gx["clump"]), min(gx["forced"])
        rounds = ", ".join(f"{x:.2f}/{y:.3f}/{z:.3f}" for x, y, z in zip(gx["analysis"], gx["galaxy"], gx["clump"]))
        print(f"(g) analysis (drift, geometry with lists, insight) {a:8.2f} s")
        print(f"    galaxy map, 2000 of {v} rows  {g:8.3f} s   ({gx['clusters']} clusters of {gx['clustered']} points, "
              f"axes {gx['ev'][0]:.1%} + {gx['ev'][1]:.1%}; {gx['bytes'] / 1024:.0f} KiB of JSON)")
        print(f"    partial-collapse search       {c:8.3f} s   ({gx['candidates']} candidates from the lists; "
              f"clump found: {gx['found']}); every row a candidate: {f:.3f} s")
        print(f"    ratio (map + search)/analysis {(g + c) / a:8.3f}    (best of {args.repeats} each; target < 0.05; "
              f"rounds analysis/map/search: {rounds} s)")
    if not args.skip_sizes:
        sz = spawn(args, "sizes", v)
        print("(h) per-token neighbourhood sizes: the pass with neighbour lists, without / with them, and the")
        print("    sizes' own work timed inside the pass (its share of that pass's time; target: a few percent)")
        for t in sz["thresholds"]:
            a, b = min(t["without"]), min(t["with_sizes"])
            rounds = ", ".join(f"{x:.2f}/{y:.2f}" for x, y in zip(t["without"], t["with_sizes"]))
            own = ", ".join(f"{o:.2f} s = {o / total:.1%}" for o, total in t["own"])
            print(f"    threshold {t['threshold']:<5} {a:7.2f} s / {b:7.2f} s (ratio {b / a:.3f});  own work {own}")
            print(f"        {t['pairs'] / v:.1f} per token = sum of sizes / V, largest {t['max_size']}, "
                  f"{t['isolated']} with none; rounds without/with {rounds} s")
        print(f"    (whole passes: best of {args.repeats} each, interleaved)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
