"""The qdq pass's options, in the groups the quantization layers take (format, placement,
calibration, PTQ recovery): the user sets every option by its own name (``--set
qdq.weight_bits=4``); each layer receives only its group."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DataError, OptionError
from ..registry import PassOptions, option
from .targets import TARGET_NAMES, TargetRules, get_target
from .view import quantized_ops


@dataclass
class FormatOptions(PassOptions):
    """How weights and activations are stored: bits, symmetry, scale granularity."""

    per_channel: bool = option(True, "per-channel weight scales (output-channel axis); tidl-tda4vm is always per-tensor")
    weight_bits: int = option(8, "weight bits, 2..8 (below 8: restricted int8 range, or INT4 with low_bit=int4)")
    first_last_weight_bits: int = option(0, "weight bits of the first and last weighted layers (0 = weight_bits); low-bit "
                                         "PTQ keeps them at 8 by convention (AdaRound, BRECQ), e.g. weight_bits=4 "
                                         "first_last_weight_bits=8; for --target ort on AVX2 CPUs without VNNI take 7, "
                                         "where onnxruntime's fused int8 kernels saturate at 8")
    activation_bits: int = option(8, "activation bits, 2..8 (below 8: restricted range enforced by a Clip before Q)")
    symmetric: str = option("auto", "activation symmetry: auto (the target's), true (zero point 0), false (asymmetric; "
                            "ort/tidl only)", ("auto", "true", "false"))
    weight_symmetric: bool = option(True, "false: asymmetric weights below 8 bits, each channel's [min, max] (widened to "
                                    "hold 0) over all 2^b levels with its own zero point; at 4 bits it halves the rounding "
                                    "error of depthwise kernels; ort only (TensorRT and TIDL take zero-point-0 weights). "
                                    "8-bit layers stay symmetric: onnxruntime's int8 kernels on AVX2 CPUs saturate on "
                                    "stored weights beyond +-64")
    act_unsigned_low_bit: bool = option(True, "below 8 bits, non-negative activations (ReLU outputs...) take [0, 2^b-1] "
                                        "with zero point 0 (int8 storage on int8 targets) instead of the symmetric [-q, q] "
                                        "that leaves half the levels unused")
    power_of_two: bool = option(False, "round every scale up to a power of two (forced for tidl-tda4vm)")
    low_bit: str = option("restricted", "how <8-bit weights are stored: restricted (int8 range [-q, q]) or int4 (INT4 "
                          "type, opset >= 21)", ("restricted", "int4"))

    def act_symmetric(self, rules: TargetRules) -> bool:
        """Whether activations are symmetric (zero point 0): ``symmetric``, or the target's when auto."""
        if self.symmetric == "auto":
            return rules.act_symmetric
        if self.symmetric == "false" and not rules.allow_asymmetric:
            raise OptionError(f"target {rules.name} needs symmetric activations (zero point 0); symmetric=false is not allowed.",
                              "drop qdq.symmetric or use --target ort/tidl for asymmetric activations")
        return self.symmetric == "true"

    def unsigned_low_bit(self, bits: int) -> bool:
        """Below 8 bits, non-negative activations use [0, 2^b - 1] with zero point 0 even on int8 targets
        (int8 holds them): [-q, q] spends half its levels on values a ReLU output never takes (LSQ)."""
        return bits < 8 and self.act_unsigned_low_bit

    def check(self, rules: TargetRules) -> None:
        """The format's ranges and what ``rules`` (the target) accepts, or an OptionError."""
        for key in ("weight_bits", "activation_bits"):
            bits = getattr(self, key)
            if not 2 <= bits <= 8:
                raise OptionError(f"qdq.{key}={bits} is out of range.", "give 2..8 bits")
        fl_bits = self.first_last_weight_bits
        if fl_bits and not 2 <= fl_bits <= 8:
            raise OptionError(f"qdq.first_last_weight_bits={fl_bits} is out of range.", "give 2..8 bits, or 0 for weight_bits")
        if self.low_bit == "int4":
            if self.weight_bits != 4:
                raise OptionError("qdq.low_bit=int4 needs weight_bits=4.", "set --set qdq.weight_bits=4 or low_bit=restricted")
            if not rules.allow_int4_weights:
                raise OptionError(f"target {rules.name} does not take INT4 initializers.",
                                  "use qdq.low_bit=restricted (int8 storage, 4-bit range)")
        self.act_symmetric(rules)
        if not self.weight_symmetric and not rules.allow_asymmetric_weights:
            raise OptionError(f"target {rules.name} needs symmetric weights (zero point 0); weight_symmetric=false is not allowed.",
                              "drop qdq.weight_symmetric or use --target ort")


@dataclass
class PlacementOptions(PassOptions):
    """Which quantizable nodes stay in float."""

    exclude_nodes: list = option([], "node names kept in float (comma-separated)")
    exclude_op_types: list = option([], "op types kept in float, e.g. Gemm,Add")
    exclude_regex: str = option("", "regular expression on node names kept in float")
    keep_first_last: bool = option(False, "keep the first and last weighted layers in float")
    op_types: list = option([], "only quantize these op types (default: every op the target quantizes)")
    depthwise_per_channel: bool = option(False, "ort only: per-channel (axis 1) activation Q/DQ, per-channel minmax ranges, "
                                         "on the data input of every depthwise Conv: holds channels whose ranges differ by "
                                         "decades (a HardSwish/SE model: top-1 agreement with fp32 +2.8 points), but onnxruntime then "
                                         "runs the layers around it unfused (that model: 1.3x -> 3.2x fp32 latency); TensorRT "
                                         "and TIDL take per-tensor activations; 8-bit activations only")

    def depthwise_axis(self, rules: TargetRules, activation_bits: int) -> bool:
        """Whether depthwise inputs get per-channel activation Q/DQ (an OptionError where the target refuses it)."""
        if not self.depthwise_per_channel:
            return False
        if not rules.per_channel_activations:
            raise OptionError(f"target {rules.name} takes per-tensor activations only; depthwise_per_channel=true is not allowed.",
                              "drop qdq.depthwise_per_channel, or use --target ort")
        if activation_bits != 8:
            raise OptionError("qdq.depthwise_per_channel=true needs 8-bit activations.",
                              "drop qdq.depthwise_per_channel or set activation_bits=8")
        return True


@dataclass
class CalibrationOptions(PassOptions):
    """How activation ranges are measured on the calibration data."""

    clip_bounds: bool = option(True, "cap activation ranges at the clips lite removed (ReLU6 -> ReLU: the quantizer clips "
                               "at 6 where ReLU6 did; recorded in the model's onnxopt.activation_bounds metadata)")
    calib_method: str = option("auto", "calibration method; auto: the one among minmax, percentile, entropy and mse "
                               "whose Q/DQ model has the lowest noise-to-signal ratio of the outputs (logits before a "
                               "final Softmax/Sigmoid) against the float model on held-in calibration samples (the "
                               "report lists each tensor's choice); whatever the method, tensors that reach the graph "
                               "outputs through data movement only (a detector's scores) keep their full range",
                               ("auto", "minmax", "percentile", "entropy", "mse"), flag="--calib-method")
    calib_search: str = option("uniform", "what calib_method=auto chooses: uniform (one method for every activation) or "
                               "per_tensor (then each activation's own, greedy in graph order, within about 3x an mse "
                               "calibration; it can fit the held-in samples: held-out it was worse more often than "
                               "better on the shared models)", ("uniform", "per_tensor"))
    calib_percentile: float = option(99.99, "percentile for calib_method=percentile", flag="--calib-percentile")
    calib_bins: int = option(2048, "histogram bins (entropy/percentile/mse)")
    calib_samples: int = option(0, "use at most this many calibration samples (0 = all; random data: 16)")
    calib_cache: str = option("", "calibration cache file: reused when model/data/settings match, refused when stale",
                              flag="--calib-cache", path=True)
    calib_workers: int = option(1, "calibration worker processes whose statistics merge", flag="--calib-workers")
    trt_calib_table: str = option("", "also write a TensorRT calibration table (implicit-quantization flows) here",
                                  flag="--trt-calib-table", path=True)


@dataclass
class RecoveryOptions(PassOptions):
    """PTQ recovery after quantization; by default the analytical bias correction (where it helps)
    and fallback=auto (automatic mixed precision) run."""

    bias_correction: str = option("analytical", "PTQ recovery: correct the bias shift the weights' rounding causes: "
                                  "analytical (the weight error times each layer's mean input, from its BN or the "
                                  "calibration data) or empirical (the measured mean output error, layer by layer); "
                                  "either is undone, and reported as reverted, where it raises the outputs' "
                                  "noise-to-signal ratio (logits) on up to 256 calibration samples",
                                  ("none", "empirical", "analytical"))
    fallback: str = option("auto", "automatic mixed precision: auto = keep the fewest most sensitive layers in higher "
                           "precision (TensorRT: no Q/DQ, fp16 in an fp16 build; TIDL: 16-bit; ort: float) until the "
                           "budget (max_agreement_loss at agreement_confidence, max_error) holds on the calibration "
                           "data (or apply's --check-data); where no output takes a decision and max_error is unset, "
                           "only the units that alone make half the output noise or more, when they remove more of it "
                           "than their share of the MACs; none = every layer quantized", ("none", "auto"))
    max_agreement_loss: float = option(1.0, "fallback=auto budget: agreement points with the float model lost on "
                                       "classifier outputs (the top-1 class; a final Sigmoid's every label; each position's class "
                                       "of a map ended by an ArgMax/Softmax over its classes), measured on "
                                       "the logits before a final Softmax/Sigmoid on up to 256 calibration samples "
                                       "(-1 = no agreement budget)")
    agreement_confidence: float = option(0.84, "fallback=auto: max_agreement_loss must hold on the one-sided upper "
                                         "confidence bound (Wilson, from the sample count) of the loss at this confidence, "
                                         "so that it holds beyond the calibration samples (at 1 point, no disagreement is left "
                                         "on the at most 256 samples read; more samples make the check surer, not looser); "
                                         "0.5 = the calibration samples' own count; default chosen leaving one model "
                                         "out (tools/bench_fallback_margin.py)")
    fallback_check: str = option("calibration", "what fallback=auto checks its agreement budget on without apply's "
                                 "--check-data: calibration = the calibration samples; shifted = each calibration image "
                                 "moved by one pixel, a view the model did not train on (image inputs): for calibration "
                                 "images that are training images and no validation split; it keeps more layers in high "
                                 "precision where the images are new to the model (docs/benchmarks.md)",
                                 ("calibration", "shifted"))
    max_error: float = option(0.0, "fallback=auto budget: relative L2 error of every output's logits vs float (0 = unset); "
                              "the only budget on outputs that take no decision (detectors' raw heads, regressions)")
    fallback_precision: str = option("auto", "precision of fallback layers: auto (int16 on tidl, float elsewhere), float, "
                                     "int16", ("auto", "float", "int16"))
    rounding: str = option("nearest", "PTQ recovery: weight rounding: nearest, adaround (learned per layer, NumPy) or "
                           "brecq (learned per block of layers through their activations, on up to 256 calibration "
                           "samples, or calib_samples / --calib-samples; needs torch)", ("nearest", "adaround", "brecq"))
    adaround_iters: int = option(500, "PTQ recovery: learned-rounding iterations per layer (adaround) or per block "
                                 "(brecq, plus 4 hardening stages of a tenth each)")

    @property
    def requested(self) -> bool:
        """Whether recovery runs: fallback=auto (the default), another step, or an option only
        recovery checks (a budget given with fallback=none is refused there)."""
        return (self.fallback == "auto" or self.bias_correction != "none" or self.rounding != "nearest"
                or self.max_error > 0 or self.fallback_precision not in ("auto", "float"))


@dataclass
class QdqOptions(PassOptions):
    """The qdq pass's options: the target, and one group per quantization layer."""

    target: str = option("tensorrt", "deployment target: tensorrt (int8 symmetric, Q/DQ on inputs), ort (uint8/int8, "
                         "onnxruntime int8 kernels), tidl (TI pre-quantized, opset 17), tidl-tda4vm (per-tensor "
                         "power-of-two)", TARGET_NAMES, flag="--target")
    target_rewrites: bool = option(True, "tidl targets: before placing Q/DQ, rewrite the float graph exactly at its static "
                                   "input size so that TIDL runs more of it: cleanup (folds shape arithmetic, drops "
                                   "Identity, Dropout, no-op Casts), then lite's reducemean_to_pool and "
                                   "reducemean_to_matmul (ReduceMean -> GlobalAveragePool / MatMul); each verified in "
                                   "onnxruntime")
    strict_check: bool = option(False, "fail (exit 3) when the output has nodes the target runs outside its accelerator "
                                "(TIDL: on ARM through ONNX Runtime), like `onnxopt check --strict`; by default they are "
                                "counted in one warning")
    format: FormatOptions = field(default_factory=FormatOptions)
    placement: PlacementOptions = field(default_factory=PlacementOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)

    def validate(self, model, ctx) -> None:
        if quantized_ops(model):  # left unchanged by the pass, with the reason: nothing to check
            return
        self.format.check(get_target(self.target))
        self.placement.depthwise_axis(get_target(self.target), self.format.activation_bits)
        if self.calibration.calib_samples < 0:
            raise OptionError(f"qdq.calib_samples must be 0 (all) or a positive count, got {self.calibration.calib_samples}.",
                              "e.g. --set qdq.calib_samples=200")
        if not 0.5 <= self.recovery.agreement_confidence < 1:
            raise OptionError(f"qdq.agreement_confidence must be in [0.5, 1), got {self.recovery.agreement_confidence}.",
                              "e.g. --set qdq.agreement_confidence=0.84 (0.5 = the calibration samples' own count)")
        if ctx.data is None:
            raise DataError("the qdq pass needs calibration data, and none was given.",
                            "give --calib-data (an image folder, .npy/.npz, or file.py:function); "
                            "--calib-data random is accepted for smoke tests only")
