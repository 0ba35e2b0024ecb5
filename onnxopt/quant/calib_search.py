"""``calib_method=auto``: the activation ranges chosen on the user's data by their effect on the
task metric.

No fixed calibration method suits every model (a HardSwish/SE classifier lost 9 points more with
the method that was best on EfficientNet-Lite0), so the choice is measured:

1. one streaming pass collects every tensor's min/max and histogram (the statistics an ``mse``
   calibration collects) and computes each tensor's candidate ranges: ``minmax``,
   ``percentile``, ``entropy``, ``mse`` (symmetric, unsigned or not, as the fixed methods do);
2. on the first ``SEARCH_SAMPLES`` held-in calibration samples, the Q/DQ model is built with each
   method for every tensor and measured against the float model by the noise-to-signal ratio of
   its outputs (of the logits, before a final Softmax/Sigmoid: :meth:`TaskError.noise
   <onnxopt.task_metric.TaskError.noise>`); the lowest wins;
3. only with ``per_tensor`` (``calib_search=per_tensor``): greedy in topological order from
   there. The tensors are cut into consecutive chunks; for each chunk, every other method is tried
   on the chunk's tensors (those whose range it changes) and kept when the measure falls. The
   number of chunks is set by a budget in samples, so that the choice is the same on any machine:
   the evaluations may run ``SEARCH_BUDGET`` times as many samples as the statistics pass read
   (about three ``mse`` calibrations at most). Without a sample count (the data is not the
   pass's :class:`~onnxopt.task_metric.HeldIn`) the budget is the same ratio in time.

Why one method, measured by the noise (docs/benchmarks.md, "calib_method=auto: what the search
measures"): on a few dozen samples the mean KL is carried by the few samples near a decision
boundary and ranked the methods wrongly, and the per-tensor moves it accepted fitted those samples
and raised the held-out KL more often than they lowered it.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

from onnx import ModelProto

from .. import task_metric

METHODS = ("minmax", "percentile", "entropy", "mse")
SEARCH_SAMPLES = 32
SEARCH_BUDGET = 2.0      # evaluated samples per statistics sample (auto <= ~3x an mse calibration)
SAME_RANGE = 0.01        # candidate ranges within 1 % of each other count as one


def _differs(a: tuple, b: tuple) -> bool:
    scale = max(abs(a[0]), abs(a[1]), abs(b[0]), abs(b[1]), 1e-12)
    return abs(a[0] - b[0]) > SAME_RANGE * scale or abs(a[1] - b[1]) > SAME_RANGE * scale


def choose_ranges(reference: ModelProto, build: Callable[[dict], ModelProto], candidates: dict, searched: list,
                  data, collect_seconds: float, log: Optional[Callable[[str], None]] = None,
                  per_tensor: bool = False) -> tuple:
    """Choose one candidate range per tensor (see the module doc).

    ``reference``: the float model the Q/DQ model approximates; ``build(ranges)``: the Q/DQ model
    for a full ``{tensor: (lo, hi)}`` (the quantizer's, so that this module needs none of it);
    ``candidates``: ``{tensor: {method: (lo, hi)}}``; ``searched``: the tensors whose choice is
    measured, in topological order (others take the best uniform method); ``data``: the
    calibration data (its first samples are held in);
    ``collect_seconds``: the statistics pass's time, which sets the budget; ``per_tensor``: step 3.
    Returns ``(ranges, report)``; the report becomes ``info["calibration"]``."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    ev = task_metric.Evaluator(reference, data, limit=SEARCH_SAMPLES)
    evaluations = 0

    def score(choice: dict) -> float:
        nonlocal evaluations
        evaluations += 1
        ranges = {t: candidates[t][m] for t, m in choice.items()}
        value = ev.error(build(ranges)).noise()
        return value if math.isfinite(value) else math.inf

    uniform = {m: score(dict.fromkeys(candidates, m)) for m in METHODS}
    best_method = min(METHODS, key=uniform.get)
    choice = dict.fromkeys(candidates, best_method)
    best = start = uniform[best_method]
    order = [t for t in searched if t in candidates and
             any(_differs(candidates[t][m], candidates[t][best_method]) for m in METHODS)]
    read = getattr(data, "read", None)
    if isinstance(read, int) and read > 0:   # deterministic: evaluations left in the sample budget
        affordable = int(SEARCH_BUDGET * read / max(ev.samples, 1)) - evaluations
    else:
        per_eval = (time.perf_counter() - t0) / max(evaluations, 1)
        budget = 0.75 * SEARCH_BUDGET * collect_seconds - (time.perf_counter() - t0)
        affordable = int(budget / max(per_eval, 1e-6)) if budget > 0 else 0
    n_chunks = min(len(order), affordable // (len(METHODS) - 1)) if per_tensor and order and affordable > 0 else 0
    size = math.ceil(len(order) / n_chunks) if n_chunks else 0
    for c in range(n_chunks):
        chunk = order[c * size:(c + 1) * size]      # (the last ones may be empty: nothing moves)
        for m in METHODS:
            moved = [t for t in chunk if choice[t] != m and _differs(candidates[t][m], candidates[t][choice[t]])]
            if not moved:
                continue
            trial = dict(choice)
            trial.update({t: m for t in moved})
            value = score(trial)
            if value < best:
                best, choice = value, trial
    counts = {m: sum(1 for t in searched if choice.get(t) == m) for m in METHODS}
    report = {"method": "auto", "search": "per_tensor" if per_tensor else "uniform", "measure": "noise-to-signal",
              "samples": ev.samples, "start_method": best_method,
              "uniform_objective": {m: uniform[m] for m in METHODS}, "objective_start": start, "objective_end": best,
              "chunks": n_chunks, "chunk_size": size, "evaluations": evaluations,
              "search_seconds": round(time.perf_counter() - t0, 2), "statistics_seconds": round(collect_seconds, 2),
              "counts": counts, "choices": {t: choice[t] for t in searched if t in choice}}
    log(f"calibration auto: {', '.join(f'{n} {m}' for m, n in counts.items() if n)} "
        f"(started from {best_method}; noise-to-signal {start:.4g} -> {best:.4g}; {evaluations} evaluations on "
        f"{ev.samples} held-in samples, {report['search_seconds']:.1f} s)")
    return {t: candidates[t][m] for t, m in choice.items()}, report
