"""Growing histograms of activations and the clipping-range searches that read them.

Histogram
---------
A :class:`SignedHistogram` counts the values of one tensor in ``nbins`` bins per sign over
``[-R, R]``, ``R = 2**exp`` the smallest power of two strictly above every ``|x|`` seen: bin ``j``
of a side holds ``j*w <= |x| < (j+1)*w``, ``w = R / nbins``.

When a batch exceeds the range, the range doubles as often as needed and adjacent bin pairs merge.
``R`` and ``nbins`` being powers of two, ``w`` is one, ``x / w`` is exact in floating point and a
value's bin at the final range is ``floor(|x| / w_final)`` whatever the order the batches came in:
re-binning is *exact*, the streamed histogram equals the one-shot histogram of all the data on the
final edges, bit for bit, and histograms from several workers merge exactly. The price is
resolution: the final range lies in ``(amax, 2*amax]``, so callers allocate twice the bins they
want over ``[0, amax]``.

Range searches (all on counts, never on raw data; bins are ``w`` wide, starting at 0)
------------------------------------------------------------------------------------
* percentile -- the value below which ``q`` of the mass lies, linearly interpolated in its bin.
* entropy -- TensorRT's KL-divergence calibration (Migacz, "8-bit inference with TensorRT",
  GTC 2017): for each candidate ``i`` in ``[nq, n]`` (``nq`` quantization levels), ``P`` = the
  first ``i`` bins with the mass beyond folded into bin ``i-1``; ``Q`` = those ``i`` bins (without
  the tail) merged into ``nq`` groups and expanded back uniformly over the bins of each group where
  ``P`` is non-zero, zeros smoothed with ``eps``; the threshold is ``i * w`` for the ``i`` of
  minimal ``KL(P || Q)`` (the largest on ties). Candidates are all evaluated at once from prefix
  sums (the KL curve is jagged at the scale of a few bins); only above ``COARSE_CANDIDATES`` is a
  strided pass refined around its four best. As in NVIDIA's pytorch-quantization, the zero bin is replaced by
  its neighbour so the spike of exact zeros after a ReLU does not drive the choice. The same holds for
  any other value repeated far beyond its neighbours -- a constant image region (MNIST's background,
  letterbox padding) gives each channel one such value, in every layer it reaches -- so a bin holding
  more than ``SPIKE_FACTOR`` times its level (the median of the ``SPIKE_WINDOW`` bins around it, or
  the mean non-zero bin where that is higher) is first cut down to that level; counting noise and
  sparse tails stay exactly as they are. Without that, ``Q`` spreads a spike's mass
  over its group, the search picks the finest grouping, ``i = nq``, and clips the strokes of a digit
  at a tenth of their range (an MNIST CNN: 98.9 -> 34 % top-1). Candidates start at the median of
  the counts: below every value, all the mass folds into the last bin, ``Q = P`` and KL is 0.
* mse -- the clip minimising the expected squared error of the quantizer over the folded ``|x|``
  histogram (the symmetric quantizer is odd, so ``|x|`` suffices), every bin represented by
  ``MSE_POINTS`` evenly spread points; a coarse grid of candidates is refined around its best.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

BLOCK = 1 << 15          # elements per histogram block: keeps the temporaries in cache
COARSE_CANDIDATES = 8192  # entropy: exhaustive up to this many thresholds, strided + refined above
KL_CHUNK = 256           # candidates evaluated together
KL_EPS = 1e-4            # smoothing of Q's zeros (as in MXNet / onnxruntime's smooth_distribution)
SPIKE_FACTOR = 4.0       # entropy: a bin is a spike when it holds more than this many times its neighbourhood's level
SPIKE_WINDOW = 9         # entropy: a spike's level is the median of this many bins around it (spikes up to 4 bins wide)
MSE_POINTS = 4           # representative points per bin for the MSE search


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


class SignedHistogram:
    """Counts of a tensor's values in ``2*nbins`` bins over ``[-2**exp, 2**exp]`` (see module doc)."""

    __slots__ = ("nbins", "exp", "counts")

    def __init__(self, nbins: int):
        if not is_power_of_two(nbins) or nbins < 2:
            raise ValueError(f"nbins must be a power of two >= 2, got {nbins}")
        self.nbins = nbins
        self.exp: Optional[int] = None       # None until a non-zero value was seen
        self.counts = np.zeros(2 * nbins, np.int64)

    # -- geometry ----------------------------------------------------------------------
    @property
    def range(self) -> float:
        return math.ldexp(1.0, self.exp) if self.exp is not None else 0.0

    @property
    def width(self) -> float:
        return self.range / self.nbins

    def positive(self) -> np.ndarray:
        """Counts of the positive side (zeros included), bin j = [j*w, (j+1)*w)."""
        return self.counts[self.nbins:]

    def negative(self) -> np.ndarray:
        """Counts of the negative side by |x|, bin j = [j*w, (j+1)*w) of |x|."""
        return self.counts[: self.nbins][::-1]

    def folded(self) -> np.ndarray:
        """Counts of |x| (positive + mirrored negative side)."""
        return self.positive() + self.negative()

    # -- updates -----------------------------------------------------------------------
    def _double(self, times: int) -> None:
        """Double the range ``times`` times, merging adjacent bin pairs (exact)."""
        if times <= 0:
            return
        nb = self.nbins
        for _ in range(min(times, int(math.log2(nb)) + 1)):
            pos = self.counts[nb:].reshape(-1, 2).sum(axis=1)
            neg = self.counts[:nb].reshape(-1, 2).sum(axis=1)   # mirrored: pairs stay aligned
            self.counts = np.concatenate([np.zeros(nb // 2, np.int64), neg, pos, np.zeros(nb // 2, np.int64)])
        self.exp += times

    def add(self, x: np.ndarray, amax: Optional[float] = None, lo_hint: Optional[float] = None) -> None:
        """Count the values of ``x`` (finite floats); ``amax`` = max |x| and ``lo_hint`` = min x when known."""
        x = np.asarray(x).reshape(-1)
        if x.size == 0:
            return
        if amax is None:
            lo_hint = float(x.min())
            amax = float(max(-lo_hint, x.max()))
        if amax > 0:
            # amax = mant * 2**e with 0.5 <= mant < 1, so 2**e > amax strictly: no value ever equals R.
            # (A value equal to R would have to go to the last bin, closed on the right, but after a
            # doubling it belongs to the bin starting at R: the merge would not be exact.)
            need = math.frexp(amax)[1]
            if self.exp is None:    # zeros counted before a range existed stay in the positive zero bin
                self.exp = need
            self._double(need - self.exp)           # (a no-op unless the range must grow)
        elif self.exp is None:
            self.counts[self.nbins] += x.size       # only zeros so far
            return
        nb = self.nbins
        scale = math.ldexp(float(nb), -self.exp)    # nb / R, a power of two
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        # x * scale is exact (scale is a power of two) unless it would leave the dtype's range
        info = np.finfo(x.dtype)
        work = x.dtype if float(info.tiny) <= scale <= float(info.max) / 4 else np.dtype(np.float64)
        s = work.type(scale)
        y = np.empty(min(BLOCK, x.size), work)
        t = np.empty(y.size, np.int32)      # |t| < nb <= 2**17: int32 converts faster than int64
        neg = np.empty(y.size, bool)
        signs = lo_hint is None or lo_hint < 0
        # |x| < R so t lies in [-(nb-1), nb-1]; the +1 offset and two spare end bins only guard
        # against rounding in the float64 fallback path (folded into the last bins below)
        acc = np.zeros(2 * nb + 2, np.int64)
        for start in range(0, x.size, BLOCK):
            xb = x[start:start + BLOCK]
            yy, tt, nn = y[:xb.size], t[:xb.size], neg[:xb.size]
            np.multiply(xb, s, out=yy, casting="unsafe")
            tt[...] = yy                     # truncation toward zero: |t| = floor(|x| / w)
            tt += nb + 1
            if signs:                        # (skipped for non-negative tensors, e.g. after ReLU/Clip)
                np.less(xb, 0, out=nn)
                tt -= nn                     # negative j maps to nb - 1 - j (+1)
            acc += np.bincount(tt, minlength=2 * nb + 2)
        acc[1] += acc[0]
        acc[-2] += acc[-1]
        self.counts += acc[1:-1]

    def merge(self, other: "SignedHistogram") -> None:
        """Add ``other``'s counts (exact: the smaller range is doubled up to the larger)."""
        if other.nbins != self.nbins:
            raise ValueError("cannot merge histograms with different bin counts")
        if other.exp is None:
            self.counts[self.nbins] += int(other.counts.sum())
            return
        o = other.copy()
        if self.exp is None:            # only zeros so far: they stay in the positive zero bin at any range
            self.exp = o.exp
        self._double(o.exp - self.exp)      # the smaller range doubles up to the larger (no-op when not smaller)
        o._double(self.exp - o.exp)
        self.counts = self.counts + o.counts

    def copy(self) -> "SignedHistogram":
        h = SignedHistogram(self.nbins)
        h.exp, h.counts = self.exp, self.counts.copy()
        return h


# -- range searches on one-sided counts (bin j = [j*w, (j+1)*w)) -------------------------

def _trim(counts: np.ndarray) -> np.ndarray:
    nz = np.flatnonzero(counts)
    return counts[: nz[-1] + 1] if nz.size else counts[:0]


def percentile_value(counts: np.ndarray, width: float, q: float) -> float:
    """The value below which a fraction ``q`` of the mass lies (linear inside its bin)."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    cdf = np.cumsum(counts)
    target = min(max(q, 0.0), 1.0) * total
    k = min(int(np.searchsorted(cdf, target, side="left")), counts.size - 1)
    below = cdf[k - 1] if k > 0 else 0.0
    frac = (target - below) / counts[k] if counts[k] > 0 else 1.0
    return (k + min(max(frac, 0.0), 1.0)) * width


def signed_percentile(hist: SignedHistogram, q: float) -> float:
    """Quantile ``q`` of the signed data in a :class:`SignedHistogram` (linear inside a bin)."""
    if hist.exp is None or hist.counts.sum() <= 0:
        return 0.0
    return -hist.range + percentile_value(hist.counts, hist.width, q)


def entropy_threshold(counts: np.ndarray, width: float, nq: int, *, ignore_zero_bin: bool = True) -> float:
    """TensorRT's KL-divergence threshold over one-sided counts (see module doc)."""
    b = _trim(np.asarray(counts, np.float64)).copy()
    n = b.size
    if n <= nq:
        return n * width                      # fewer bins than levels (or none): nothing to gain by clipping
    if ignore_zero_bin and n > 1:
        b[0] = b[1]
    b = despike(b)
    # no candidate below the median: one below every value folds all the mass into its last bin,
    # where Q equals P and KL is 0 (an SE gate's HardSigmoid output, all in [0.23, 0.72], was
    # clipped at 0.23); a clip that keeps less than half the values is never the right one
    first = max(nq, int(np.searchsorted(np.cumsum(b), 0.5 * b.sum())) + 1)
    # every candidate when there are few; otherwise a strided pass, then every candidate around
    # the best few strided ones (the KL curve is smooth at the scale of the stride)
    stride = max(1, (n - first + 1) // COARSE_CANDIDATES)
    cand = np.arange(first, n + 1, stride, dtype=np.int64)
    kl = _finite(kl_divergences(b, nq, cand))
    if stride > 1 and np.isfinite(kl).any():
        near = cand[np.argsort(kl, kind="stable")[:4]]
        extra = np.unique(np.clip((near[:, None] + np.arange(-stride, stride + 1)[None, :]).ravel(), first, n))
        cand = np.concatenate([cand, extra])
        kl = np.concatenate([kl, _finite(kl_divergences(b, nq, extra))])
    if not np.isfinite(kl).any():
        return n * width
    m = float(kl.min())
    ties = kl <= m + 1e-12 * abs(m) + 1e-15
    return float(cand[ties].max() * width)                    # the largest i among (numerical) ties


def despike(counts: np.ndarray, window: int = SPIKE_WINDOW) -> np.ndarray:
    """``counts`` with every spike cut down to its level: a bin holding more than ``SPIKE_FACTOR``
    times the median of the ``window`` bins centred on it (or the mean non-zero count where that is
    higher). A repeated value's spike falls to its neighbours' level; smooth stretches, their
    counting noise and sparse tails are left exactly as they are."""
    b = np.asarray(counts, np.float64)
    nonzero = b[b > 0]
    if b.size < window or not nonzero.size:
        return b
    half = window // 2
    padded = np.pad(b, half, mode="edge")
    median = np.median(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)
    level = np.maximum(median, nonzero.mean())
    return np.where(b > SPIKE_FACTOR * level, level, b)


def _finite(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, np.inf)


def kl_divergences(b: np.ndarray, nq: int, candidates: Optional[np.ndarray] = None) -> np.ndarray:
    """KL(P_i || Q_i) for the candidates i (default: every i in [nq, len(b)]), vectorised with prefix sums."""
    total = b.sum()
    S = np.concatenate([[0.0], np.cumsum(b)])                       # S[k] = sum b[:k]
    NZ = np.concatenate([[0.0], np.cumsum(b > 0)])                  # NZ[k] = non-zero bins in b[:k]
    with np.errstate(divide="ignore", invalid="ignore"):
        blogb = np.where(b > 0, b * np.log(np.where(b > 0, b, 1.0)), 0.0)
    L = np.concatenate([[0.0], np.cumsum(blogb)])
    cands = np.arange(nq, b.size + 1, dtype=np.int64) if candidates is None else np.asarray(candidates, np.int64)
    # chunks of candidates keep the (chunk, nq) temporaries in cache
    return np.concatenate([_kl_chunk(b, nq, cands[k:k + KL_CHUNK], total, S, NZ, L) for k in range(0, cands.size, KL_CHUNK)]) \
        if cands.size else np.zeros(0)


def _kl_chunk(b, nq, i, total, S, NZ, L):
    tail = total - S[i]                                              # mass beyond bin i-1
    last = b[i - 1]
    p_last = last + tail
    # sum P log P with P = p / total (p_k = b_k for k < i-1, p_{i-1} = b_{i-1} + tail)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = (L[i - 1] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)) / total \
            - np.log(total)
    # groups: bin k of candidate i belongs to group floor(k * nq / i); group g = [start_g, start_{g+1})
    g = np.arange(nq + 1, dtype=np.int64)
    bounds = (g[None, :] * i[:, None] + nq - 1) // nq                # ceil(g * i / nq), shape (C, nq+1)
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    mass = S[hi] - S[lo]                                             # Q's mass per group (no tail)
    cnt = NZ[hi] - NZ[lo]                                            # bins where P > 0, per group
    pmass = mass.copy()                                              # P's mass per group
    # the last bin (in the last group) also carries the tail; it is non-zero in P when the tail is
    cnt[:, -1] += (last == 0) & (tail > 0)
    pmass[:, -1] += tail
    # Q per non-zero bin of group g: mass_g / cnt_g, normalised by S[i]; zeros smoothed with eps
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(cnt > 0, mass / np.where(cnt > 0, cnt, 1.0), 0.0) / np.where(S[i] > 0, S[i], 1.0)[:, None]
    zero_q = (cnt > 0) & (q <= 0)
    n_zero = (zero_q * cnt).sum(axis=1)
    q = np.where(zero_q, KL_EPS, q) / (1.0 + KL_EPS * n_zero)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.where(pmass > 0, pmass * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axis=1) / total
    # a candidate whose kept bins are all empty (all mass beyond it) has no quantized distribution
    return np.where(S[i] > 0, plogp - cross, np.inf)


def quant_mse(points: np.ndarray, weights: np.ndarray, clips: np.ndarray, qmax: int) -> np.ndarray:
    """Expected squared error of clamp(round(x/s), 0, qmax)*s, s = clip/qmax, for each clip."""
    s = (clips / qmax)[:, None]
    xq = np.clip(np.rint(points[None, :] / s), 0, qmax) * s
    return ((points[None, :] - xq) ** 2 * weights[None, :]).sum(axis=1)


def _bin_points(counts: np.ndarray, width: float, origin: float = 0.0) -> tuple:
    """``MSE_POINTS`` evenly spread points per non-empty bin ``[origin + k*w, origin + (k+1)*w)``, and their weights."""
    nz = np.flatnonzero(counts)
    sub = (np.arange(MSE_POINTS) + 0.5) / MSE_POINTS
    points = (origin + (nz[:, None] + sub[None, :]) * width).reshape(-1)
    return points, np.repeat(counts[nz].astype(np.float64) / MSE_POINTS, MSE_POINTS)


def mse_threshold(counts: np.ndarray, width: float, qmax: int, *, grid: int = 64) -> float:
    """Clip minimising the expected quantization MSE over a one-sided histogram (see module doc)."""
    c = _trim(np.asarray(counts, np.float64))
    if c.size == 0:
        return 0.0
    points, weights = _bin_points(c, width)
    top = c.size * width
    clips = top * np.arange(1, grid + 1) / grid
    err = quant_mse(points, weights, clips, qmax)
    k = int(np.argmin(err))
    fine = np.linspace(clips[k - 1] if k > 0 else top / grid / 4, clips[min(k + 1, grid - 1)], grid)   # around the best
    fine_err = quant_mse(points, weights, fine, qmax)
    j = int(np.argmin(fine_err))
    return float(fine[j]) if fine_err[j] <= err[k] else float(clips[k])


def asym_mse_range(hist: SignedHistogram, lo: float, hi: float, levels: int, *, grid: int = 48) -> tuple:
    """(lo', hi') = (a*lo, b*hi) minimising the asymmetric quantization MSE over the signed histogram:
    a grid over a common shrink factor, then coordinate passes per side."""
    if hist.exp is None or hi <= lo:
        return lo, hi
    points, weights = _bin_points(hist.counts, hist.width, -hist.range)   # signed bin k starts at -R + k*w

    def err(los: np.ndarray, his: np.ndarray) -> np.ndarray:
        s = np.maximum((his - los) / levels, 1e-30)[:, None]
        zp = np.rint(-los[:, None] / s)
        xq = (np.clip(np.rint(points[None, :] / s) + zp, 0, levels) - zp) * s
        return ((points[None, :] - xq) ** 2 * weights[None, :]).sum(axis=1)

    f = np.arange(1, grid + 1) / grid
    e = err(lo * f, hi * f)
    k = int(np.argmin(e))
    best_lo, best_hi, best = lo * f[k], hi * f[k], e[k]
    for _ in range(2):
        cand_hi = np.linspace(max(best_hi * 0.5, 0.0), hi, grid) if hi > 0 else np.array([0.0])
        eh = err(np.full(cand_hi.size, best_lo), cand_hi)
        j = int(np.argmin(eh))
        if eh[j] < best:
            best_hi, best = cand_hi[j], eh[j]
        cand_lo = np.linspace(lo, min(best_lo * 0.5, 0.0), grid) if lo < 0 else np.array([0.0])
        el = err(cand_lo, np.full(cand_lo.size, best_hi))
        j = int(np.argmin(el))
        if el[j] < best:
            best_lo, best = cand_lo[j], el[j]
    return float(best_lo), float(best_hi)
