"""The verify-forward cost model ``T(n, L)``: seconds for ``n`` draft nodes at context length ``L``.

Fitted, not assumed, and robust to noise and sparse data:

* measurements are kept per size bucket (the newest `PER_BUCKET` of each, so sizes chosen rarely
  keep their evidence);
* the context slope ``c`` (seconds per context token, >= 0) is the Theil-Sen estimate: the median
  of the slopes between pairs of measurements of the same bucket at different context lengths;
* each bucket's cost at context 0 is the median of ``seconds - c * L`` (an outlier moves a median
  little), pulled towards the robust line through all buckets by as much as its standard error
  allows (noise goes, real steps in the cost stay), and the curve over the buckets is made
  non-decreasing in ``n`` by weighted isotonic regression (pool-adjacent-violators);
* sizes between measured buckets interpolate; above the largest measured size the curve extends
  with the robust affine slope of the measured points (the prior slope until two buckets exist).

Each point comes with a standard error (scaled MAD / sqrt(count)); unmeasured sizes are uncertain
by `UNMEASURED_SPREAD`. The scheduler explores where that uncertainty could change its decision.
"""

from __future__ import annotations

import numpy as np

# Tree sizes grouped for cost measurements; a size belongs to the largest bucket not above it.
SIZE_BUCKETS = (0, 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Batched forwards: their cost is kept by query positions (rows x (nodes + 1)), less one, so that
# forwards of every row count inform each other (a size here is positions - 1: one row's n).
POSITION_BUCKETS = SIZE_BUCKETS[:-1] + (64, 96, 128, 192, 256, 384, 512, 640, 768, 1024)
# Prior relative cost of each extra draft node (or query position), T(n) ~ T(0) * (1 + slope * n),
# until two buckets are measured: about what bf16 / fp32 forwards of a 135M model cost on a 2-core CPU.
PRIOR_SLOPE = 0.03
PER_BUCKET = 32  # newest measurements kept per bucket
MIN_CONTEXT_GAP = 16  # pairs closer than this in context length say nothing about the slope
UNMEASURED_SPREAD = 0.5  # relative standard error of a size with no measurement nearby
REFIT_EVERY = 8  # records between fits (a bucket's first measurement refits at once)


def isotonic(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of ``values`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values.tolist(), weights.tolist()):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, weight, count = blocks.pop()
            last = blocks[-1]
            total = last[1] + weight
            last[0] = (last[0] * last[1] + mean * weight) / total
            last[1], last[2] = total, last[2] + count
    return np.concatenate([np.full(count, mean) for mean, _, count in blocks])


def pooled_context_slope(buckets: list[np.ndarray]) -> float:
    """Median of the seconds-per-context-token slopes of all same-bucket pairs (0 without pairs)."""
    slopes = []
    for rows in buckets:
        i, j = np.triu_indices(len(rows), k=1)
        gap = rows[j, 1] - rows[i, 1]
        usable = np.abs(gap) >= MIN_CONTEXT_GAP
        slopes.append((rows[j, 2] - rows[i, 2])[usable] / gap[usable])
    pooled = np.concatenate(slopes) if slopes else np.zeros(0)
    return float(np.median(pooled)) if pooled.size else 0.0


def shrink_to_line(xs: np.ndarray, ys: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Bucket costs pulled towards their robust line (Theil-Sen) by how much of their deviation
    noise could explain: a deviation of many standard errors (a real step in the cost, e.g. a
    GPU tile boundary) stays, one within the noise mostly goes."""
    if len(xs) < 3:
        return ys
    slope, _ = theil_sen(xs, ys, 1)
    line = float(np.median(ys - slope * xs)) + slope * xs
    deviation = ys - line
    noise = (2 * errors) ** 2
    return line + deviation * deviation**2 / (deviation**2 + noise + 1e-30)


def theil_sen(xs: np.ndarray, ys: np.ndarray, min_gap: float) -> tuple[float, int]:
    """Median pairwise slope of ``ys`` over ``xs`` for pairs at least ``min_gap`` apart, and how many pairs."""
    i, j = np.triu_indices(len(xs), k=1)
    gap = xs[j] - xs[i]
    usable = np.abs(gap) >= min_gap
    if not usable.any():
        return 0.0, 0
    return float(np.median((ys[j] - ys[i])[usable] / gap[usable])), int(usable.sum())


class CostModel:
    """``T(n, L)`` from measured verify forwards; see the module docstring. ``buckets`` group the
    sizes (`SIZE_BUCKETS`: draft nodes of one row; `POSITION_BUCKETS`: query positions of a
    batched forward, less one)."""

    def __init__(self, buckets: tuple[int, ...] = SIZE_BUCKETS) -> None:
        self.buckets = buckets
        self.samples = [np.zeros((0, 3)) for _ in buckets]  # per bucket: [k, (size, context, seconds)]
        self._fit = None
        self._curve = None  # the fit's curve at context 0 (see `_curve_at_zero`)
        self._pending = 0  # records since the last fit

    def bucket(self, size: int) -> int:
        """Index of the largest bucket not above ``size``."""
        return int(np.searchsorted(self.buckets, min(size, self.buckets[-1]), side="right") - 1)

    @property
    def counts(self) -> np.ndarray:
        """``[len(buckets)]`` measurements kept per bucket."""
        return np.array([len(s) for s in self.samples])

    def record(self, size: int, context_len: int, seconds: float) -> None:
        """One verify forward of ``size`` draft nodes at ``context_len`` took ``seconds``."""
        b = self.bucket(size)
        new_bucket = not len(self.samples[b])
        self.samples[b] = np.vstack([self.samples[b], [size, context_len, seconds]])[-PER_BUCKET:]
        self._pending += 1
        if new_bucket or self._pending >= REFIT_EVERY:  # medians move slowly: refit every few records
            self._fit, self._curve, self._pending = None, None, 0

    def context_slope(self) -> float:
        """Seconds per context token (>= 0): Theil-Sen over same-bucket pairs, pooled."""
        return self._fitted()[0]

    def curve(self, context_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``([m + 1], [m + 1])``: estimated seconds for sizes 0..m (the largest bucket) at
        ``context_len`` and their standard errors (NaN everywhere while nothing is measured)."""
        slope, at_zero, relative = self._curve_at_zero()
        seconds = at_zero + slope * context_len
        return seconds, relative * seconds

    def _curve_at_zero(self) -> tuple[float, np.ndarray, np.ndarray]:
        """(context slope, ``[m + 1]`` seconds at context 0, ``[m + 1]`` relative standard errors);
        kept with the fit, so a step only adds the context term."""
        if self._curve is not None:
            return self._curve
        slope, xs, ys, errors = self._fitted()
        sizes = np.arange(self.buckets[-1] + 1)
        if not len(xs):
            self._curve = (0.0, np.full(len(sizes), np.nan), np.full(len(sizes), np.nan))
            return self._curve
        base = ys[0] / (1 + PRIOR_SLOPE * xs[0])
        step = self._node_slope(xs, ys, base)
        at_zero = np.interp(sizes, xs, ys)
        above, below = sizes > xs[-1], sizes < xs[0]
        at_zero[above] = ys[-1] + step * (sizes[above] - xs[-1])
        at_zero[below] = np.maximum(ys[0] - step * (xs[0] - sizes[below]), 0.5 * ys[0])
        # error: the nearest measured point's, growing with the distance to it
        nearest = np.abs(sizes[:, None] - xs[None, :]).argmin(axis=1)
        distance = np.abs(sizes - xs[nearest])
        relative = errors[nearest] / ys[nearest] + UNMEASURED_SPREAD * np.minimum(distance / (xs[nearest] + 4), 1)
        self._curve = (slope, at_zero, relative)
        return self._curve

    @staticmethod
    def _node_slope(xs: np.ndarray, ys: np.ndarray, base: float) -> float:
        """Seconds per extra node beyond the measured sizes: the robust slope of the measured
        points (never flatter than a quarter of the prior), the prior with one point."""
        floor = 0.25 * PRIOR_SLOPE * base
        if len(xs) < 2:
            return PRIOR_SLOPE * base
        slope, _ = theil_sen(xs.astype(float), ys, 1)
        return max(slope, floor)

    def _fitted(self):
        """(context slope, bucket sizes, costs at context 0 (non-decreasing), standard errors)."""
        if self._fit is None:
            filled = [s for s in self.samples if len(s)]
            slope = max(pooled_context_slope(filled), 0.0)
            xs, ys, errors, weights = [], [], [], []
            for s in filled:
                residual = s[:, 2] - slope * s[:, 1]
                median = float(np.median(residual))
                mad = 1.4826 * float(np.median(np.abs(residual - median)))
                spread = mad if len(s) >= 3 else UNMEASURED_SPREAD * 0.5 * abs(median)
                xs.append(float(np.median(s[:, 0])))
                ys.append(median)
                errors.append(spread / np.sqrt(len(s)))
                weights.append(len(s))
            xs, ys, errors = np.asarray(xs), shrink_to_line(np.asarray(xs), np.asarray(ys), np.asarray(errors)), \
                np.asarray(errors)
            ys_fit = isotonic(ys, np.asarray(weights, dtype=float)) if len(ys) else np.zeros(0)
            self._fit = (slope, xs, np.maximum(ys_fit, 1e-9), errors)
        return self._fit

    def state_dict(self) -> dict:
        return {"samples": [s.tolist() for s in self.samples]}

    def load_state_dict(self, state: dict, where: str) -> None:
        """Restore `state_dict` output; every bucket's rows are checked (`drafters.state.StateError`)."""
        from drafters.state import StateError, check_array, field

        raw = field(state, "samples", where)
        if not isinstance(raw, list) or len(raw) != len(self.buckets):
            raise StateError(f"{where}: samples must be a list of {len(self.buckets)} buckets")
        samples = []
        for b, rows in enumerate(raw):
            if isinstance(rows, (list, tuple)) and not rows:
                rows = np.zeros((0, 3))
            array = check_array(rows, f"{where}: samples[{b}]",
                                (None, 3), "float", low=0.0)[-PER_BUCKET:]
            if any(size != int(size) or size > self.buckets[-1] or self.bucket(int(size)) != b
                   for size in array[:, 0]):
                raise StateError(f"{where}: samples[{b}] holds sizes outside bucket {self.buckets[b]}")
            samples.append(array.astype(float))
        self.samples, self._fit, self._curve, self._pending = samples, None, None, 0
