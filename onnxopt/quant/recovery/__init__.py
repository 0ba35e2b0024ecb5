"""PTQ accuracy recovery without training, applied to a QDQ model after calibration.

Entry point :func:`recover` (called by the ``qdq`` pass when one of its recovery options is
set). Steps, in this order, each optional and each in its own module:

1. ``rounding=adaround`` -- learned weight rounding per layer (:mod:`.adaround`), or
   ``rounding=brecq`` -- per block of layers, with their biases (:mod:`.brecq`, torch);
2. ``bias_correction`` -- ``analytical`` (the default) or ``empirical`` (:mod:`.bias`), undone,
   and reported as reverted, when it raises the outputs' noise-to-signal ratio (the task metric,
   on the logits) on up to ``AGREEMENT_SAMPLES`` calibration samples;
3. ``fallback=auto`` with ``max_error`` -- the most sensitive layers back to high precision
   (:mod:`.fallback`).

The package is acyclic: this orchestrator imports the steps; brecq builds on adaround's
rounding and on the bias correction; every step reads the model through
:mod:`onnxopt.quant.view`.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Union

from onnx import ModelProto

from ...data import collect_feeds
from ...errors import DataError, OptionError
from ...task_metric import Evaluator as TaskEvaluator
from ..options import RecoveryOptions
from ..view import Evaluator, QdqView, QuantInfo, sqnr_db
from . import adaround, brecq, fallback
from .bias import BIAS_SAMPLES, analytical_bias_correction, empirical_bias_correction
from .fallback import auto_fallback, fallback_budget

REFERENCE_SAMPLES = 16  # samples the start / end output errors are measured on


def _validate(bc: str, fb: str, max_error: float, rounding: str, precision: str, data, budget=None) -> None:
    if fb == "auto" and budget is None:
        raise OptionError("qdq.fallback=auto needs an error budget.",
                          "add e.g. --set qdq.max_agreement_loss=1 (top-1 agreement points) or qdq.max_error=0.05 (relative L2 error of the logits)")
    if max_error > 0 and fb != "auto":
        raise OptionError("qdq.max_error is only used with qdq.fallback=auto.", "add --set qdq.fallback=auto or drop max_error")
    if precision not in ("auto", "float") and fb != "auto":
        raise OptionError("qdq.fallback_precision is only used with qdq.fallback=auto.", "add --set qdq.fallback=auto")
    if data is None and (bc == "empirical" or fb == "auto" or rounding != "nearest"):
        raise DataError(f"PTQ recovery (empirical bias correction, fallback, rounding={rounding}) needs the calibration data.", "give --calib-data")


def _learned_rounding(rounding: str, view: QdqView, data, iters: int, n_samples, float_model, ctx, log) -> tuple:
    if rounding == "adaround":
        return adaround.adaround(view, data, iters=iters, log=log)
    # the cap: qdq.calib_samples, else the data's own limit (--calib-samples), else MAX_SAMPLES
    data_limit = getattr(getattr(ctx, "data_spec", None), "max_samples", None)
    config = brecq.BrecqConfig(iters=iters, max_samples=n_samples or data_limit or brecq.MAX_SAMPLES)
    return brecq.brecq(view, data, config, float_model=float_model, log=log)


def _bias_correction(bc: str, float_model, model, info, data, n_samples, held_in: Optional[TaskEvaluator], log) -> tuple:
    correct = empirical_bias_correction if bc == "empirical" else analytical_bias_correction
    corrected, rep = correct(float_model, model, info, data, (n_samples or BIAS_SAMPLES) if bc == "empirical" else n_samples, log)
    if held_in is not None:
        # A correction must not make the outputs noisier; some do: after rounding=adaround, or
        # where E[x] is a poor summary of the inputs (the HardSwish/SE model). Judged on all the
        # held-in samples: on 16 or 32 the noise ratio misranked the corrections
        # (tools/bench_bias_correction.py).
        before, after = held_in.error(model), held_in.error(corrected)
        rep = {**rep, "noise_before": before.noise(), "noise_after": after.noise(), "rel_error_before": before.rel_error,
               "rel_error_after": after.rel_error, "samples": held_in.samples}
        if after.noise() > before.noise():
            rep["reverted"] = (f"output noise-to-signal ratio rose from {before.noise():.4g} to {after.noise():.4g} on "
                               f"{held_in.samples} calibration samples; the model is left without it")
            log(f"bias_correction={bc} reverted: {rep['reverted']}")
            corrected = model
        else:
            log(f"bias_correction={bc}: output noise-to-signal ratio {before.noise():.4g} -> {after.noise():.4g} "
                f"on {held_in.samples} calibration samples")
    return corrected, rep


def recover(float_model: ModelProto, qdq_model: ModelProto, info: Union[QuantInfo, dict], options: RecoveryOptions,
            data, ctx, calib_samples: int = 0, check_data=None) -> tuple:
    """Apply the PTQ recovery steps ``options`` ask for; returns (model, report dict). ``info``:
    the quantization's :class:`QuantInfo`, or the pass report's ``info`` dict.
    ``options`` may be given as ``{option: value}``: only the steps and budgets named there apply
    (converted and validated as qdq's options; unlike the pass, whose defaults run fallback=auto
    with an agreement budget). ``calib_samples`` (0 = unset) caps the samples the data-driven steps read.
    ``check_data`` (a callable like ``data``): fallback=auto ranks and checks its budget on it instead
    of the calibration data."""
    if isinstance(options, dict):
        options = RecoveryOptions.build("qdq", {"fallback": "none", "bias_correction": "none", "max_agreement_loss": -1, **options})
    log = getattr(ctx, "log", None) or (lambda msg: None)
    bc, fb, max_error = options.bias_correction, options.fallback, options.max_error
    rounding, precision = options.rounding, options.fallback_precision
    n_samples = calib_samples or None
    budget = fallback_budget(options)
    _validate(bc, fb, max_error, rounding, precision, data, budget)
    if precision == "auto":  # TIDL's higher precision is its 16-bit mode; elsewhere the float layer itself
        precision = "int16" if QuantInfo.of(info).target.startswith("tidl") and fb == "auto" else "float"
    report: dict = {}
    t0 = time.perf_counter()
    model = qdq_model
    ev = None
    if data is not None:
        ev = Evaluator(QdqView(float_model, model, info).float_reference(), collect_feeds(data, REFERENCE_SAMPLES))
        report["rel_error_start"] = ev.error(model)
    if rounding != "nearest":
        model, report[rounding] = _learned_rounding(rounding, QdqView(float_model, model, info), data,
                                                    options.adaround_iters, n_samples, float_model, ctx, log)
    # the held-in samples of the bias check; the fallback measures an agreement budget on the same ones
    held_in = None
    if bc != "none":
        if data is not None:
            # the fallback's own count, read here at call time: one constant for both checks
            held_in = TaskEvaluator(QdqView(float_model, model, info).float_reference(), data,
                                    limit=fallback.AGREEMENT_SAMPLES)
        model, report["bias_correction"] = _bias_correction(bc, float_model, model, info, data, n_samples, held_in, log)
    if fb == "auto":
        checked_on = None
        if options.fallback_check == "shifted" and check_data is None and math.isfinite(budget.max_agreement_loss):
            # on the model's own training images the check sees too few top-1 changes; a one-pixel
            # shift is a view of each image the model did not train on
            shifted = fallback.shifted_views(data)
            if shifted is None:
                log("fallback_check=shifted: the input is not one image tensor (N, C, H, W or N, H, W, C with C 1 or 3, "
                    f"sides of {fallback.MIN_SHIFTED_SIZE} or more); the budget is checked on the calibration samples")
            else:
                data, checked_on = shifted, fallback.SHIFTED
        # an agreement budget is otherwise checked on the same samples as the bias correction; a
        # max_error budget reads fewer, and the check's feeds and reference outputs are dropped
        # before the fallback reads its own
        shared = (held_in if math.isfinite(budget.max_agreement_loss) and check_data is None and checked_on is None
                  else None)
        held_in = None
        model, report["fallback"] = auto_fallback(float_model, model, info, data if check_data is None else check_data, budget,
                                                  precision, log, evaluator=shared, own_data=check_data is not None,
                                                  checked_on=checked_on)
    if ev is not None:
        report["rel_error_end"] = ev.error(model)
        report["sqnr_db_start"] = round(sqnr_db(report["rel_error_start"]), 3)
        report["sqnr_db_end"] = round(sqnr_db(report["rel_error_end"]), 3)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return model, report
