"""Embedding geometry: statistics of all pairwise cosines between rows, streamed one row chunk at a time.

Semantics (DESIGN.md, "Semantics of the numbers"): rows are L2-normalised; the statistics run over all
ordered pairs (i, j), i != j, of valid rows (rows with a non-finite entry and all-zero rows are left out
and counted). Memory stays O(chunk_size x V): no V x V matrix is ever held.

How the chunked pass stays close to the cost of the matmul itself:
- Only one triangle of blocks is computed: row chunk r0:r1 against columns r0:V. The square part of
  that block holds both orders of its pairs, the rest stands for its mirror image too, so it counts twice.
- The histogram's affine map is folded into the matmul: with A = [k*u_i, c] and B = [u_j, 1] one product
  gives x = k*cos + c, where k = bins / (hi - lo) and the integer offset in c puts every cosine in
  [-1, 1] inside [1, 254]. Casting x to uint8 then floors it (x > 0), and one bincount over 256 values
  gives every bin and the values below and above the range: ~0.5 ns per similarity instead of ~4 for
  torch.histc (the matmul itself costs ~9 ns per similarity at d=768 on 2 cores).
- The mean and std come from O(V d^2) sums (`pairwise_moments`), not from the pass.
- With the default threshold 0.7 lying on a bin edge, the neighbour count comes from the same bincount.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable, Final

import torch

from .bins import HIST_BINS, HIST_RANGE
from .sampled import sampled_geometry

# Rows are normalised and packed this many at a time, to bound the float32/float64 temporaries.
_PREP_ROWS: Final = 4096
# Padding the matmul's inner dimension to a multiple of 16 floats keeps the rows 64-byte aligned.
_INNER_ALIGN: Final = 16


def _check_weights(weights: torch.Tensor) -> None:
    """Raise ValueError unless `weights` is a 2-D float tensor."""
    if weights.dim() != 2:
        raise ValueError(f"embedding weights must be 2-D (V, d), got shape {list(weights.shape)}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"embedding weights must be a float tensor, got {weights.dtype}")


def _finite_rows(w: torch.Tensor, row_reduction: torch.Tensor) -> torch.Tensor:
    """Which rows of `w` are all finite, given a reduction of each row (sum, norm) that is finite for them.

    A non-finite entry always makes the row's reduction non-finite, so only those rows need the exact
    (three-pass) isfinite check; a finite row whose reduction overflowed is found finite there.
    """
    finite = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    suspect = ~torch.isfinite(row_reduction)
    if suspect.any():
        finite[suspect] = torch.isfinite(w[suspect]).all(dim=1)
    return finite


def _valid_unit_rows(weights: torch.Tensor, extra_cols: int = 0,
                     index: list[torch.Tensor] | None = None,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, int, int]:
    """Pack the L2-normalised valid rows of `weights` into a new float32 (n, d + extra_cols) buffer on `device`.

    Returns (buffer, nonfinite_rows, zero_rows); the first n rows of the buffer are the unit rows, in
    the original order, with zeros in the extra columns. When `index` is a list, the original row
    numbers of the packed rows are appended to it (one tensor per block of rows). Rows whose float32 norm overflows or underflows
    (finite values beyond ~1e19 or below ~1e-19) are normalised in float64 instead of becoming inf or 0.
    float64 values beyond float32's range become inf (non-finite row) or 0 (zero row if all are).
    """
    _check_weights(weights)
    v, d = weights.shape
    out = torch.empty(v, d + extra_cols, dtype=torch.float32, device=device)
    out[:, d:] = 0.0
    n = nonfinite = zero = 0
    for a in range(0, v, _PREP_ROWS):
        w = weights[a : a + _PREP_ROWS].detach().to(device, torch.float32)
        norms = torch.linalg.vector_norm(w, dim=1)
        finite = _finite_rows(w, norms)
        unsafe = finite & ~(norms.isfinite() & (norms > 1e-18))
        w = w / norms[:, None]  # unsafe rows come out inf/nan here and are redone just below
        if unsafe.any():  # rare: norms in float64, where squares of float32 values never overflow/underflow
            w64 = weights[a : a + _PREP_ROWS].detach().to(device)[unsafe].to(torch.float64)
            norms64 = torch.linalg.vector_norm(w64, dim=1, keepdim=True)
            w[unsafe] = torch.where(norms64 > 0, w64 / norms64, 0.0).float()
            norms[unsafe] = (norms64.squeeze(1) > 0).float()
        nonzero = norms > 0
        keep = finite & nonzero
        nonfinite += int((~finite).sum())
        zero += int((finite & ~nonzero).sum())
        m = int(keep.sum())
        out[n : n + m, :d] = w if m == w.shape[0] else w[keep]
        if index is not None:
            index.append(torch.nonzero(keep).squeeze(1) + a)
        n += m
    return out[:n], nonfinite, zero


def _moments_of_unit_rows(u: torch.Tensor) -> tuple[int, float | None, float | None]:
    """(pairs, mean, std with ddof=1) of cos(u_i, u_j) over ordered pairs i != j, from O(n d^2) sums.

    sum_{i != j} u_i.u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2 and
    sum_{i != j} (u_i.u_j)^2 = ||U^T U||_F^2 - sum_i ||u_i||^4 (or ||U U^T||_F^2 when n < d).
    All in float64, chunk by chunk: the variance is a difference of two large sums, and a float32 Gram
    matrix would leave an error of ~sqrt(1e-7) in the std when every cosine is nearly the same.
    """
    n, d = u.shape
    pairs = n * (n - 1)
    if n < 2:
        return pairs, None, None
    row_sum = torch.zeros(d, dtype=torch.float64, device=u.device)
    sq_norms = torch.empty(n, dtype=torch.float64, device=u.device)
    gram = torch.zeros(min(n, d), min(n, d), dtype=torch.float64, device=u.device)
    if n < d:  # small n: the n x n Gram matrix has the same Frobenius norm and costs less
        u64 = u.double()
        torch.mm(u64, u64.T, out=gram)
        row_sum = u64.sum(dim=0)
        sq_norms = gram.diagonal().clone()
    else:
        for a in range(0, n, _PREP_ROWS):
            c = u[a : a + _PREP_ROWS].double()
            gram.addmm_(c.T, c)
            row_sum += c.sum(dim=0)
            sq_norms[a : a + c.shape[0]] = c.square().sum(dim=1)
    total = float(row_sum.square().sum()) - float(sq_norms.sum())
    total_sq = float(gram.square().sum()) - float(sq_norms.square().sum())
    mean = total / pairs
    # pairs >= 2 here, so the ddof=1 denominator is positive; rounding can leave a tiny negative variance.
    var = max(0.0, (total_sq - pairs * mean * mean) / (pairs - 1))
    return pairs, mean, math.sqrt(var)


@torch.no_grad()
def pairwise_moments(weights: torch.Tensor, *, device: torch.device | str = "cpu") -> dict:
    """Mean and std (ddof=1) of all pairwise cosines of the valid rows, in O(V d^2) instead of O(V^2 d).

    Pairs are ordered, i != j, as in `analyze_embedding_geometry`; with fewer than 2 valid rows there
    are no pairs and mean/std are None.
    """
    u, nonfinite, zero = _valid_unit_rows(weights, device=device)
    pairs, mean, std = _moments_of_unit_rows(u)
    return {
        "rows": int(weights.shape[0]),
        "valid_rows": int(u.shape[0]),
        "nonfinite_rows": nonfinite,
        "zero_rows": zero,
        "pairs": pairs,
        "mean_similarity": mean,
        "std_similarity": std,
    }


def _bincount_u8(flat: torch.Tensor, pool: ThreadPoolExecutor | None, parts: int) -> torch.Tensor:
    """bincount of a contiguous uint8 tensor over 256 values, split across `parts` threads when pooled.

    torch's bincount runs on one core; torch ops release the GIL, so slices counted in pool threads
    run side by side. The caller sizes the pool to torch's own thread count, so no extra core is used.
    """
    if pool is None or flat.numel() < (1 << 20):
        return torch.bincount(flat, minlength=256)
    step = -(-flat.numel() // parts)
    futures = [pool.submit(torch.bincount, flat[a : a + step], None, 256) for a in range(step, flat.numel(), step)]
    total = torch.bincount(flat[:step], minlength=256)
    for f in futures:
        total += f.result()
    return total


def _bin_map(lo: float, hi: float, bins: int) -> tuple[float, int]:
    """Scale k and integer offset `off` such that x = k*(cos - lo) + off lies in (0, 255) for |cos| <= 1.

    Bin b then holds floor(x) == off + b; floor(x) < off is below the range. One unit of margin each
    side covers cosines a rounding error beyond +-1.
    """
    k = bins / (hi - lo)
    off = max(1, math.ceil(k * (lo + 1.0)) + 1)
    if k * (1.0 - lo) + off >= 254:
        raise ValueError(f"histogram of {bins} bins on [{lo}, {hi}] does not fit the 8-bit bin index")
    return k, off


class _NearestNeighbours:
    """Each packed row's k most similar other rows, gathered from the blocks of the triangle pass.

    Block x holds rows r0:r1 against columns r0:n; a pair (i, j) with j past the block's square is
    seen only here, so it is offered to row i's list and, as column j, to row j's list too. Values
    stay in the pass's x = k*cos + c units (same order as cos). Once a row's list is full, only values
    above its k-th best can enter, and after the first block those are few (~k per row per block at
    first, then fewer). So a block costs one comparison of its uint8 bins q = floor(x) (already made
    for the histogram) against min(row's, column's k-th best), a scan of the mask 8 bytes at a time,
    and a sort-merge of the few candidates: no topk along the columns, which would cost more than the
    pass itself. Rows whose list is not full yet (the first block) take a plain topk instead.
    """

    # When more than this fraction of a block's 8-byte mask words hold a candidate, the uint8 bins are
    # too coarse (cosines bunched in a few bins, as in a collapsed embedding): compare exact values.
    _COARSE = 1 / 2

    def __init__(self, n: int, k: int, m_max: int, device: torch.device | str = "cpu") -> None:
        self.k = max(0, min(k, n - 1))
        self.device = torch.device(device)
        self.vals = torch.full((n, self.k), -math.inf, dtype=torch.float32, device=device)
        self.idx = torch.full((n, self.k), -1, dtype=torch.int64, device=device)
        size = min(m_max, n) * n
        self.mask = torch.zeros(-(-size // 8) * 8, dtype=torch.bool, device=device)  # whole 8-byte words
        self.tmp = torch.empty(size, dtype=torch.uint8, device=device)  # thresholds, then a mask
        self.col_thr = torch.empty(n, dtype=torch.uint8, device=device)

    def _merge(self, rows: slice | torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Merge (len(rows), any) candidate `vals` / `idx` into the lists of `rows` (a slice or sorted ids)."""
        if isinstance(rows, slice):
            old_vals, old_idx = self.vals[rows], self.idx[rows]
        else:  # index_select / index_copy_: cheaper than advanced indexing for whole rows
            old_vals, old_idx = self.vals.index_select(0, rows), self.idx.index_select(0, rows)
        top, pos = torch.cat([old_vals, vals], dim=1).topk(self.k, dim=1)  # sorted, best first
        new_idx = torch.cat([old_idx, idx], dim=1).gather(1, pos)
        if isinstance(rows, slice):
            self.vals[rows], self.idx[rows] = top, new_idx
        else:
            self.vals.index_copy_(0, rows, top)
            self.idx.index_copy_(0, rows, new_idx)

    def _merge_pairs(self, targets: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor, base: int) -> None:
        """Offer candidate `ids` with `vals` to the full lists of `targets` (all >= base, any number each)."""
        if targets.numel() == 0:
            return
        k = self.k
        # Sort the candidates alone (not the lists) by (target, value descending): one int64 key, the
        # float32 bits made order-preserving as signed ints (negative floats have their 31 value bits
        # flipped), then flipped for descending order.
        bits = vals.view(torch.int32).long()
        bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        local = targets - base
        perm = torch.argsort((local << 32) | ((1 << 31) - 1 - bits))
        present = torch.zeros(self.vals.shape[0] - base, dtype=torch.bool, device=self.device)
        present.index_fill_(0, local, True)
        uniq = torch.nonzero(present).squeeze(1)
        group = (torch.cumsum(present, 0) - 1).index_select(0, local.index_select(0, perm))
        u = uniq.numel()
        counts = torch.bincount(group, minlength=u)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(perm.numel(), device=self.device) - starts.index_select(0, group)
        # Each target's k best candidates, into a (u, k) table padded with -inf.
        keep = torch.nonzero(rank < k).squeeze(1)
        slot = group.index_select(0, keep) * k + rank.index_select(0, keep)
        src = perm.index_select(0, keep)
        cand_vals = torch.full((u * k,), -math.inf, dtype=torch.float32, device=self.device)
        cand_ids = torch.full((u * k,), -1, dtype=torch.int64, device=self.device)
        cand_vals.index_copy_(0, slot, vals.index_select(0, src))
        cand_ids.index_copy_(0, slot, ids.index_select(0, src))
        # The lists are full (finite), so the -inf padding never enters the top k.
        self._merge(uniq + base, cand_vals.view(u, k), cand_ids.view(u, k))

    def _words(self, size: int) -> torch.Tensor:
        """Indices of the 8-byte words of the block's mask (`size` entries) that hold a set entry."""
        return torch.nonzero(self.mask[: -(-size // 8) * 8].view(torch.int64)).squeeze(1)

    def _hits(self, words: torch.Tensor) -> torch.Tensor:
        """Flat positions of the set entries of the mask within `words` (from `_words`)."""
        if words.numel() == 0:
            return words
        inner = torch.nonzero(self.mask[: (int(words[-1]) + 1) * 8].view(-1, 8).index_select(0, words))
        return words.index_select(0, inner[:, 0]) * 8 + inner[:, 1]

    def _mask(self, x: torch.Tensor, q: torch.Tensor, kth: torch.Tensor, r0: int, m: int, exact: bool) -> None:
        """Fill the mask with the candidates of rows (all columns) and of columns past the square,
        given every list's k-th best value `kth`."""
        cols = x.shape[1]
        size = m * cols
        self.mask[size : -(-size // 8) * 8] = False
        b = self.mask[:size].view(m, cols)
        thr_rows, thr_cols = kth[r0 : r0 + m, None], kth[r0 + m :]
        if exact:
            torch.gt(x, thr_rows, out=b)
            t = self.tmp[: m * (cols - m)].view(torch.bool).view(m, cols - m)
            torch.gt(x[:, m:], thr_cols, out=t)
            b[:, m:].logical_or_(t)
        else:  # x > thr implies floor(x) >= floor(thr): a superset, checked exactly afterwards
            # One threshold per entry, min(row's, column's), built by one broadcast op; the square
            # holds both orders of its pairs, so there only the row's threshold counts (255: none).
            col_thr = self.col_thr[:cols]
            col_thr[:m] = 255
            col_thr[m:] = thr_cols.floor().clamp(0, 255).to(torch.uint8)
            full = self.tmp[:size].view(m, cols)
            torch.minimum(thr_rows.floor().clamp(0, 255).to(torch.uint8), col_thr, out=full)
            torch.ge(q, full, out=b)
        b[:, :m].diagonal().fill_(False)  # a row is not its own neighbour

    def add_block(self, x: torch.Tensor, q: torch.Tensor, r0: int, m: int) -> None:
        """Merge block x (m rows from r0, columns r0:n; q its uint8 bins) into the lists."""
        if self.k == 0:
            return
        cols = x.shape[1]
        kth = self.vals[:, -1].contiguous()  # each list's k-th best: the bar a candidate must pass
        if not bool(torch.isfinite(kth[r0:]).all()):  # first block(s): lists still filling, plain topks
            x[:, :m].diagonal().fill_(-math.inf)
            v, j = x.topk(min(self.k, cols), dim=1)
            self._merge(slice(r0, r0 + m), v, j + r0)
            rest = x[:, m:]
            if rest.shape[1]:
                v, i = rest.T.topk(min(self.k, m), dim=1)
                self._merge(slice(r0 + m, None), v, i + r0)
            return
        size = m * cols
        self._mask(x, q, kth, r0, m, exact=False)
        words = self._words(size)
        if words.numel() > self._COARSE * -(-size // 8):
            self._mask(x, q, kth, r0, m, exact=True)
            words = self._words(size)
        pos = self._hits(words)
        vals = x.reshape(-1).index_select(0, pos)  # x is a contiguous block
        i = torch.div(pos, cols, rounding_mode="floor")
        rows, partners = r0 + i, r0 + pos - i * cols  # partners < n: the block's columns are r0:n
        to_row = torch.nonzero(vals > kth.index_select(0, rows)).squeeze(1)
        to_col = torch.nonzero((partners >= r0 + m) & (vals > kth.index_select(0, partners))).squeeze(1)
        self._merge_pairs(torch.cat([rows.index_select(0, to_row), partners.index_select(0, to_col)]),
                          torch.cat([partners.index_select(0, to_row), rows.index_select(0, to_col)]),
                          torch.cat([vals.index_select(0, to_row), vals.index_select(0, to_col)]), r0)

    def result(self, index: torch.Tensor, rows: int, k_scale: float, c: float,
               want: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, cosines), both (rows, want), on the CPU: original row ids (-1: none) and cosines (nan: none)."""
        ids = torch.full((rows, want), -1, dtype=torch.int32, device="cpu")
        cos = torch.full((rows, want), math.nan, dtype=torch.float32, device="cpu")
        found = torch.isfinite(self.vals)
        index_dev = index.to(self.device)
        cpu_index = index.cpu()
        ids[cpu_index, : self.k] = torch.where(found, index_dev[self.idx.clamp(min=0)], -1).to(torch.int32).cpu()
        cos[cpu_index, : self.k] = torch.where(found, (self.vals - c) / k_scale, math.nan).cpu()
        return ids, cos


class _RowsAbove:
    """Each packed row's count of other rows with cosine above the threshold, from the triangle pass's blocks.

    Block x holds rows r0:r1 against columns r0:n. Its above-threshold mask g gives row i (in r0:r1)
    every partner j >= r0 (the square holds both orders of its pairs, so a row's own entries there
    suffice) and column j >= r1 the rows r0:r1, its mirror pairs never computed; the diagonal is not a
    pair. Summed over the blocks, row i meets every j != i exactly once, so the counts add up to the
    pass's ordered-pair total. The mask is sparse for any healthy embedding (cos > 0.7 is rare): its
    8-byte words are scanned and only the set entries are counted, which costs a fraction of dense
    row and column sums; a dense mask (a collapsed embedding) takes the dense sums instead.
    """

    # Above this fraction of nonzero 8-byte words, dense row/column sums are cheaper than the hits.
    _DENSE = 1 / 16

    def __init__(self, n: int, m_max: int, above_bin: int | None, device: torch.device | str = "cpu",
                 buffer: torch.Tensor | None = None) -> None:
        self.counts = torch.zeros(n, dtype=torch.int64, device=device)
        self.bin = above_bin  # aligned threshold: the first uint8 bin above it; None: x > x_threshold
        size = min(m_max, n) * n
        self._mask = None
        if above_bin is not None:  # `buffer`: the neighbour lists' block mask, free again before they use it
            self._mask = buffer if buffer is not None and buffer.numel() >= size and buffer.dtype == torch.bool \
                else torch.empty(size, dtype=torch.bool, device=device)

    def add_bins(self, q: torch.Tensor, r0: int, m: int) -> None:
        """Count the block from its uint8 bins `q` (aligned threshold): "above" is q >= the threshold's
        bin, exactly as the pass's bincount counts it, so the sizes add up to its pair count."""
        assert self._mask is not None and self.bin is not None
        cols = q.shape[1]
        self.add_block(torch.ge(q, self.bin, out=self._mask[: m * cols].view(m, cols)), r0, m)

    def add_block(self, g: torch.Tensor, r0: int, m: int) -> None:
        """Count the contiguous (m, cols) above-threshold mask `g` of the block of rows r0:r0+m."""
        cols = g.shape[1]
        size = m * cols
        flat = g.reshape(-1)
        whole = size // 8 * 8
        words = torch.nonzero(flat[:whole].view(torch.int64)).squeeze(1)
        if words.numel() > self._DENSE * max(1, whole // 8):
            self._dense(g, r0, m)
            return
        inner = torch.nonzero(flat[:whole].view(-1, 8).index_select(0, words))
        pos = words.index_select(0, inner[:, 0]) * 8 + inner[:, 1]
        tail = torch.nonzero(flat[whole:]).squeeze(1) + whole  # the < 8 entries past the last whole word
        pos = torch.cat([pos, tail])
        i = torch.div(pos, cols, rounding_mode="floor")
        j = pos - i * cols
        pair = i != j  # the diagonal (j == i: the square's first m columns) is a row with itself
        self.counts.index_add_(0, r0 + i[pair], torch.ones_like(i[pair]))
        mirror = j >= m  # past the square: the column's row meets row i here only
        self.counts.index_add_(0, r0 + j[mirror], torch.ones_like(j[mirror]))

    def _dense(self, g: torch.Tensor, r0: int, m: int) -> None:
        rows = g.sum(dim=1, dtype=torch.int64) - g[:, :m].diagonal().to(torch.int64)
        self.counts[r0 : r0 + m] += rows
        if g.shape[1] > m:
            self.counts[r0 + m :] += g[:, m:].sum(dim=0, dtype=torch.int64)


def _triangle_pass(
    packed: torch.Tensor,
    d: int,
    k: float,
    c: float,
    chunk_size: int,
    counts: torch.Tensor,
    x_threshold: float,
    aligned: bool,
    pool: ThreadPoolExecutor | None,
    threads: int,
    progress: Callable[[float], None] | None,
    knn: _NearestNeighbours | None = None,
    rows_above: _RowsAbove | None = None,
) -> int:
    """Stream one triangle of similarity blocks: add the x = k*cos + c bin counts of all ordered pairs
    i != j into `counts` (256 uint8 bins) and return the count of x > x_threshold (0 when `aligned`);
    `rows_above` (when given) gets every row's count above the threshold from the same blocks."""
    n, inner = packed.shape
    packed[:, d] = 1.0
    m_max = min(chunk_size, n)
    dev = packed.device
    a_buf = torch.zeros(m_max, inner, dtype=torch.float32, device=dev)
    a_buf[:, d] = c
    # One block buffer each, reused: no 100 MB allocation (and its page faults) per chunk.
    x_buf = torch.empty(m_max * n, dtype=torch.float32, device=dev)
    q_buf = torch.empty(m_max * n, dtype=torch.uint8, device=dev)
    gt_buf = None if aligned else torch.empty(m_max * n, dtype=torch.bool, device=dev)
    above = 0
    total_work = n * (n + 1) // 2
    done = 0
    for r0 in range(0, n, chunk_size):
        r1 = min(r0 + chunk_size, n)
        m, cols = r1 - r0, n - r0
        a = a_buf[:m]
        torch.mul(packed[r0:r1, :d], k, out=a[:, :d])
        x = x_buf[: m * cols].view(m, cols)
        torch.mm(a, packed[r0:].T, out=x)
        q = q_buf[: m * cols].view(m, cols)
        q.copy_(x)  # float -> uint8 truncates, i.e. floors since x > 0
        square = q[:, :m]
        # Whole block twice (its mirror image is never computed), minus the square once (it holds
        # both orders already), minus the diagonal (self-similarity is not a pair).
        counts += 2 * _bincount_u8(q.view(-1), pool, threads)
        counts -= torch.bincount(square.reshape(-1), minlength=256)
        counts -= torch.bincount(square.diagonal(), minlength=256)
        if gt_buf is not None:
            xs = x[:, :m]
            gt = torch.gt(x, x_threshold, out=gt_buf[: m * cols].view(m, cols))
            above += 2 * int(torch.count_nonzero(gt))
            above -= int(torch.count_nonzero(xs > x_threshold))
            above -= int(torch.count_nonzero(xs.diagonal() > x_threshold))
            if rows_above is not None:
                rows_above.add_block(gt, r0, m)
        elif rows_above is not None:
            rows_above.add_bins(q, r0, m)
        if knn is not None:  # last: it may overwrite the diagonal of x
            knn.add_block(x, q, r0, m)
        done += m * cols - m * (m - 1) // 2
        if progress is not None:
            progress(done / total_work)
    return above


@torch.no_grad()
def analyze_embedding_geometry(
    weights: torch.Tensor,
    threshold: float = 0.7,
    chunk_size: int = 512,
    *,
    progress: Callable[[float], None] | None = None,
    sample_rows: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """Histogram, mean/std and neighbour density of all pairwise cosines of the rows of `weights` (V, d).

    - Pairs: ordered (i, j), i != j, over valid rows (non-finite or all-zero rows are excluded and
      counted in `nonfinite_rows` / `zero_rows`); `pairs` = n(n-1) for n valid rows.
    - `local_density.average_neighborhood_size` = (#pairs with cos > threshold) / n; 0.0 when n == 0.
    - `global_sparsity.histogram_counts`: 100 equal bins on [-0.5, 1.0], each [left, right) except the
      last, which is closed (numpy's convention; exact duplicates, cos == 1, land there).
      `below_range_count` / `above_range_count` hold the rest, so counts + below + above == pairs.
    - `mean_similarity` / `std_similarity` (ddof=1) over the same pairs, from `pairwise_moments`' sums;
      None when there are no pairs (n < 2).
    Cosines within ~1e-6 of a bin edge or of the threshold may fall on either side (float32 matmul).
    Memory is O(chunk_size x n). `progress(fraction_done)` is called after each row chunk; an exception
    it raises propagates and abandons the analysis (nothing is left half-updated outside this call).
    Inputs may be float16/bfloat16/float64: the pass runs in float32, the sums in float64.
    `sample_rows=N` (fewer than the valid rows): estimate the neighbourhood size and the histogram from N
    rows drawn with `seed`, each against all rows (cost N x V instead of V^2 / 2); the result gains
    `sampled_rows`, `sampled_pairs`, `sample_seed` and `confidence_95` (95% intervals), mean and std stay
    exact (sampled.py). N >= the valid rows is the exact pass.
    `device`: where the math runs (cpu, cuda, ...; metrics/device.py); the result is plain Python values.
    """
    return geometry_and_neighbours(weights, threshold, chunk_size, knn_k=0, progress=progress,
                                   sample_rows=sample_rows, seed=seed, device=device)[0]


@torch.no_grad()
def geometry_and_neighbours(
    weights: torch.Tensor,
    threshold: float = 0.7,
    chunk_size: int = 512,
    *,
    knn_k: int = 10,
    progress: Callable[[float], None] | None = None,
    sample_rows: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[dict, tuple[torch.Tensor, torch.Tensor] | None]:
    """`analyze_embedding_geometry`'s dict plus every row's `knn_k` nearest rows by cosine, from the same pass.

    The second value is None when knn_k == 0, else (ids, cosines), both (V, knn_k): original row ids,
    best first, self excluded, -1 / nan where there is none (invalid rows, fewer than knn_k + 1 valid
    rows). Ties at the k-th place are broken arbitrarily. With `sample_rows`, only the sampled rows
    have lists (see `analyze_embedding_geometry`). The math runs on `device`; the lists come back on the CPU.
    """
    geometry, neighbours, _ = geometry_neighbours_and_sizes(
        weights, threshold, chunk_size, knn_k=knn_k, progress=progress, sample_rows=sample_rows, seed=seed,
        device=device, sizes=False)
    return geometry, neighbours


@torch.no_grad()
def geometry_neighbours_and_sizes(
    weights: torch.Tensor,
    threshold: float = 0.7,
    chunk_size: int = 512,
    *,
    knn_k: int = 10,
    progress: Callable[[float], None] | None = None,
    sample_rows: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    sizes: bool = True,
) -> tuple[dict, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """`geometry_and_neighbours`' answer plus every row's neighbourhood size, from the same pass.

    The third value (None unless `sizes`) is (V,) int32: row i's count of rows j != i with cosine above
    the threshold, as the pass decides it, so the sizes of the valid rows add up to
    `local_density.neighbor_pairs` exactly (ordered pairs: each pair counts once for each of its rows)
    and their mean is `average_neighborhood_size`. -1 where not known: invalid rows, and with
    `sample_rows` every row not in the sample (a sampled row is compared with every row, so its size is exact).
    """
    if sample_rows is not None and (isinstance(sample_rows, bool) or not isinstance(sample_rows, int)
                                    or sample_rows < 1):
        raise ValueError(f"sample_rows must be a positive integer or None, got {sample_rows!r}")
    if isinstance(knn_k, bool) or not isinstance(knn_k, int) or knn_k < 0:
        raise ValueError(f"knn_k must be a non-negative integer, got {knn_k!r}")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    lo, hi = HIST_RANGE
    k, off = _bin_map(lo, hi, HIST_BINS)
    c = off - k * lo  # x = k*cos + c

    _check_weights(weights)
    d = weights.shape[1]
    inner = -(-(d + 1) // _INNER_ALIGN) * _INNER_ALIGN
    index_parts: list[torch.Tensor] = []
    device = torch.device(device)
    packed, nonfinite, zero = _valid_unit_rows(weights, extra_cols=inner - d, index=index_parts, device=device)
    n = packed.shape[0]
    knn = _NearestNeighbours(n, knn_k, chunk_size, device) if knn_k else None
    pairs, mean, std = _moments_of_unit_rows(packed[:, :d])

    counts = torch.zeros(256, dtype=torch.int64, device=device)
    # Default threshold: on a bin edge j, "cos > threshold" is "floor(x) >= off + j" up to rounding, so
    # the bincount already holds the count; elsewhere one extra comparison pass per block is needed.
    edge = k * (threshold - lo)
    aligned = abs(edge - round(edge)) < 1e-9 and 0 <= round(edge) < HIST_BINS
    x_threshold = k * threshold + c
    above_threshold = 0
    if sample_rows is not None and sample_rows < n:
        index = torch.cat(index_parts) if index_parts else torch.zeros(0, dtype=torch.int64, device=device)
        return sampled_geometry(packed, index, int(weights.shape[0]), d, (k, c, off, HIST_BINS), threshold,
                                off + round(edge) if aligned else None, (pairs, mean, std), (nonfinite, zero),
                                sample_rows, seed, chunk_size, knn_k, progress, sizes=sizes)

    rows_above = _RowsAbove(n, chunk_size, off + round(edge) if aligned else None, device,
                            buffer=knn.mask if knn is not None else None) if sizes else None
    if n >= 2:
        # The pool splits the CPU's single-core bincount over torch's threads; a GPU's bincount is parallel.
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        with ThreadPoolExecutor(threads - 1) if threads > 1 else nullcontext() as pool:
            above_threshold = _triangle_pass(
                packed, d, k, c, chunk_size, counts, x_threshold, aligned, pool, threads, progress, knn, rows_above
            )
    counts = counts.cpu()
    if aligned:
        above_threshold = int(counts[off + round(edge) :].sum())

    hist = counts[off : off + HIST_BINS].clone()
    hist[-1] += counts[off + HIST_BINS]  # cos == 1 up to rounding: the closed last bin
    edges = torch.linspace(lo, hi, HIST_BINS + 1, dtype=torch.float64, device="cpu")
    neighbours = row_sizes = None
    index = torch.cat(index_parts).cpu() if index_parts else torch.zeros(0, dtype=torch.int64)
    if knn is not None:
        neighbours = knn.result(index, int(weights.shape[0]), k, c, knn_k)
    if rows_above is not None:
        row_sizes = torch.full((int(weights.shape[0]),), -1, dtype=torch.int32)
        row_sizes[index] = rows_above.counts.cpu().to(torch.int32)
    return {
        "rows": int(weights.shape[0]),
        "valid_rows": n,
        "nonfinite_rows": nonfinite,
        "zero_rows": zero,
        "pairs": pairs,
        "local_density": {
            "average_neighborhood_size": above_threshold / n if n else 0.0,
            "threshold": threshold,
            "neighbor_pairs": above_threshold,
        },
        "global_sparsity": {
            "histogram_counts": [int(v) for v in hist],
            "histogram_bins": edges.tolist(),
            "mean_similarity": mean,
            "std_similarity": std,
            "below_range_count": int(counts[:off].sum()),
            "above_range_count": int(counts[off + HIST_BINS + 1 :].sum()),
        },
    }, neighbours, row_sizes
