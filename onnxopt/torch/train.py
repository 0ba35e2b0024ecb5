"""Finetuning an ONNX model in torch: label-free distillation, supervised and QAT, then write-back.

``finetune(model, data, teacher=..., config=FinetuneConfig(...))`` converts ``model`` to an
:class:`~onnxopt.torch.convert.OnnxModule`, trains it and writes the learned values back into the
same graph. The loss sums distillation from a frozen teacher (the model before lite/prune/qdq; with
shared intermediate features), cross entropy with labels, and an optional user loss. Checkpoints
are resumable; under ``torchrun`` every rank trains its share of each epoch (DDP; rank 0 writes).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from onnx import ModelProto

from .. import runtime, stats, task_metric
from ..progress import progress_bar
from ..data import IGNORED_LABEL
from ..errors import DataError, OnnxoptError, OptionError
from ..model_io import fingerprint
from ..quant.upcast import float32_twin
from ..userfiles import load_user_function

import torch
import torch.nn.functional as F

from .convert import OnnxModule
from .writeback import write_back
from ..ir.proto import infer_shapes


FEATURE_OPS = {"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Add"}


def auto_features(teacher: ModelProto, student: ModelProto) -> List[str]:
    """The tensors ``--feature-loss auto`` distills: outputs of the student's activations and Adds
    (residual sums) that the teacher has under the same name and, where both graphs know it, the
    same shape. The passes keep tensor names (lite swaps ReLU6 for ReLU on the same output, qdq
    only adds Q/DQ after it), and pruned tensors drop out on their changed channel count."""
    def shapes(m):
        # shapes only narrow the choice: unknown shapes (inference failed) do not exclude
        inferred, why = infer_shapes(m)
        return {} if why else {v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
                               for v in inferred.graph.value_info}
    in_teacher = {o for n in teacher.graph.node for o in n.output}
    ts, ss = shapes(teacher), shapes(student)

    def same_shape(name):
        a, b = ts.get(name), ss.get(name)
        if a is None or b is None:
            return True
        return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a[1:], b[1:]))
    return [n.output[0] for n in student.graph.node
            if n.op_type in FEATURE_OPS and n.output and n.output[0] in in_teacher and same_shape(n.output[0])]


@dataclass
class FinetuneConfig:
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32
    weight_decay: float = 0.0
    optimizer: str = "adam"            # adam | sgd
    warmup: float = 0.05               # fraction of all steps with a linear lr warm-up before the cosine decay
    temperature: float = 4.0
    distill_weight: float = 1.0
    label_weight: float = 1.0
    feature_loss: Sequence[str] = ()
    feature_weight: float = 1.0
    user_loss: Optional[str] = None    # file.py:function
    augment: bool = False
    quant_mode: str = "lsq"            # lsq | pact | fixed
    train_scales: bool = True
    bn_mode: str = "auto"              # auto (= frozen, measured best) | frozen | train
    bn_recalib: bool = False
    bn_recalib_batches: int = 0        # 0 = all
    checkpoint: Optional[str] = None
    resume: bool = False
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    teacher_runtime: str = "torch"     # torch | ort
    weight_ranges: dict = field(default_factory=dict)
    weight_modes: dict = field(default_factory=dict)
    float_weights: dict = field(default_factory=dict)
    log: Callable[[str], None] = print
    parity_samples: int = 4
    threads: int = 0                   # 0 = auto: the cores the load average leaves idle (at least 1)
    val_split: float = 0.0             # fraction of the data held in (not trained on) to pick the best epoch / stop early
    patience: int = 0                  # stop after this many epochs without a lower held-in loss (0 = run every epoch)


@dataclass
class FinetuneResult:
    model: ModelProto
    history: list
    parity: dict
    samples_per_second: float
    module: Optional[OnnxModule] = None


# --------------------------------------------------------------------------- defaults
SAMPLE_BUDGET = 10000   # samples seen by default: 15 epochs of 717 images recovered pruned ResNet56
MAX_EPOCHS = 15


def recovery_defaults(student: ModelProto, teacher: Optional[ModelProto], samples: int, batch_size: int, *,
                      labels: bool = False, qat: bool = False, optimizer: str = "adam", image_input: bool = True) -> dict:
    """The settings ``onnxopt finetune`` uses for what the user does not give: {name: (value, why)}.

    Each choice was measured (docs/benchmarks.md, "Prune -> finetune with the defaults"); feature
    distillation is off for QAT (unmeasured there)."""
    pruned = teacher is not None and stats.param_count(student) < 0.97 * stats.param_count(teacher)
    lr = (1e-3 if pruned else 1e-4) * math.sqrt(batch_size / 32) * (10.0 if optimizer == "sgd" else 1.0)
    epochs = int(min(MAX_EPOCHS, max(1, math.ceil(SAMPLE_BUDGET / max(1, samples)))))
    features = teacher is not None and not qat
    augment = teacher is not None and not labels and image_input
    return {
        "lr": (float(f"{lr:.3g}"), "pruned student (fewer parameters than the teacher)" if pruned
               else "student of the teacher's shape" if teacher is not None else "no teacher"),
        "epochs": (epochs, f"about {SAMPLE_BUDGET} samples, at most {MAX_EPOCHS} epochs"),
        "feature_loss": (["auto"] if features else [], "tensors student and teacher share" if features
                         else "QAT" if qat else "no teacher"),
        "augment": (bool(augment), "label-free distillation of images" if augment
                    else "labels given" if labels else "no teacher" if teacher is None else "not an image input"),
        "val_split": (0.03 if samples >= 500 else 0.0, "3 % held in from 500 samples up" if samples >= 500
                      else "under 500 samples: all are trained on"),
        "patience": (3, "epochs without a lower held-in loss"),
    }


# ----------------------------------------------------------------------------- distributed
def dist_info() -> tuple:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _init_distributed(device: torch.device) -> bool:
    if dist_info()[1] <= 1:
        return False
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{dist_info()[2] % torch.cuda.device_count()}")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise OptionError(f"bad --device '{spec}'.", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda given, but torch sees no CUDA device.", "use --device cpu or auto")
    return dev


def set_threads(threads: int, world: int = 1) -> int:
    """Intra-op threads. On a shared CPU, OpenMP threads that find their cores busy spin and
    wait (an order of magnitude slower when the cores are oversubscribed), so ``auto`` uses the
    cores the 1-minute load average leaves idle, split among the data-parallel processes."""
    if threads <= 0:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        cores = runtime.cpu_count()
        try:
            idle = cores - int(os.getloadavg()[0])
        except OSError:
            idle = cores
        threads = max(1, min(cores, idle) // max(1, world))
    torch.set_num_threads(threads)
    return threads


# ----------------------------------------------------------------------------- data
def materialize(data, input_names: List[str]) -> tuple:
    """All samples of a DataSource as stacked numpy arrays per input, plus labels (or None)."""
    arrays = {n: [] for n in input_names}
    for feed in data.samples():
        for n in input_names:
            if n not in feed:
                raise DataError(f"the data has no array for input '{n}'.", "key the data by the model's input names")
            arrays[n].append(feed[n])
    stacked = {n: np.concatenate(v, axis=0) for n, v in arrays.items()}
    labels = data.labels() if hasattr(data, "labels") else None
    count = len(next(iter(stacked.values())))
    if labels is not None and len(labels) != count:
        raise DataError(f"{len(labels)} labels for {count} samples.", "give one integer label per sample")
    return stacked, labels


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation (pad H/8 and crop back) and horizontal flip of an NCHW image batch."""
    if x.dim() != 4 or not x.is_floating_point():
        return x
    n, _, h, w = x.shape
    p = max(1, h // 8)
    padded = F.pad(x, (p, p, p, p), mode="reflect" if p < min(h, w) else "constant")
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen).tolist()
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


def load_user_loss(spec: str) -> Callable:
    return load_user_function(spec, "loss script", "define fn(student_outputs, teacher_outputs, labels, batch) -> scalar tensor")


@dataclass
class _Logits:
    """A graph output written by a final Softmax/LogSoftmax/Sigmoid or ArgMax/TopK: the tensors
    before it in the student and in the teacher (each found on its own graph: a quantized student's
    may be a dequantized copy), distilled and trained on instead of the probabilities or class ids.
    ``axis``: the classes' axis a Softmax / LogSoftmax / ArgMax names (:func:`onnxopt.task_metric.class_axes`),
    None for a Sigmoid or a TopK."""
    output: str
    student: str
    teacher: Optional[str]
    activation: str
    axis: Optional[int] = None


def logit_pairs(model: ModelProto, teacher: Optional[ModelProto]) -> dict:
    """{graph output: :class:`_Logits`} for the outputs written by a final Softmax/LogSoftmax/Sigmoid
    or ArgMax/TopK (:func:`onnxopt.task_metric.logit_tensors`); the teacher's tensor is None without
    a teacher, or when its output is not written by the same op (then the output itself is
    distilled, where it is a float tensor)."""
    mine, axes = task_metric.logit_tensors(model), task_metric.class_axes(model)
    theirs = task_metric.logit_tensors(teacher) if teacher is not None else {}
    pairs = {}
    for name, (tensor, act) in mine.items():
        # the input of the op is distilled instead of the output it writes: a softmax of probabilities
        # divided by T is nearly uniform (its KL moves the student ~2x less), and class ids have no gradient
        if act in task_metric.LOGIT_READERS and tensor != name:
            t_tensor, t_act = theirs.get(name, (None, None))
            pairs[name] = _Logits(name, tensor, t_tensor if t_act == act else None, act, axes.get(name))
    return pairs


def logit_distill_loss(s: torch.Tensor, t: torch.Tensor, activation: str, temperature: float,
                       axis: Optional[int] = None) -> torch.Tensor:
    """T^2 KL between the teacher's and the student's distributions at temperature T, on logits:
    each label's Bernoulli (summed over the labels, mean over the samples) for a Sigmoid; else the
    softmax over the classes of :func:`distill_loss` (``[N, C]``, or a map's class ``axis``; MSE
    of the logits where no class axis is known)."""
    T = temperature
    if activation == "Sigmoid":
        ls, lt = F.logsigmoid(s / T), F.logsigmoid(t / T)
        l1s, l1t = F.logsigmoid(-s / T), F.logsigmoid(-t / T)
        kl = lt.exp() * (lt - ls) + l1t.exp() * (l1t - l1s)
        return kl.reshape(kl.shape[0], -1).sum(1).mean() * T * T if kl.dim() else kl * T * T
    return distill_loss(s, t, temperature, axis=axis)


def label_loss(logits: torch.Tensor, y: torch.Tensor, activation: Optional[str], axis: Optional[int] = None) -> torch.Tensor:
    """Cross entropy of class labels ``y`` on ``logits``; for a Sigmoid's labels, binary cross
    entropy against ``y`` itself (one label: 0 / 1) or its one-hot (one-vs-rest labels). Labels
    with a class per position (``[N, H, W]``, a segmentation map's; ``[N, T]`` of a sequence) train
    each position: the classes on the logits' ``axis`` (1 unless the graph names another;
    IGNORED_LABEL skipped), a Sigmoid mask's 0 / 1 per element."""
    if y.dim() == 2 and activation != "Sigmoid" and tuple(y.shape) == tuple(logits.shape):
        return F.cross_entropy(logits, y.argmax(1))   # one-hot labels (Keras' to_categorical): their classes
    if y.dim() > 1:
        mask = activation == "Sigmoid"
        if not mask and axis is not None and logits.dim() > 2:
            logits = logits.movedim(axis, 1)   # cross_entropy reads the classes on axis 1 ([N, T, C] -> [N, C, T])
        fits = logits.numel() == y.numel() if mask else tuple(logits.shape[:1]) + tuple(logits.shape[2:]) == tuple(y.shape)
        if not fits:
            raise DataError(f"labels of shape {list(y.shape)} do not fit the model's scores {list(logits.shape)}.",
                            "give a class index per sample ([N]), one-hot labels ([N, C]), or a class per position of "
                            "the output ([N, H, W] for [N, C, H, W] scores)")
        if mask:
            return F.binary_cross_entropy_with_logits(logits.reshape(y.shape[0], -1), y.reshape(y.shape[0], -1).to(logits.dtype))
        return F.cross_entropy(logits, y, ignore_index=IGNORED_LABEL)
    flat = logits.reshape(logits.shape[0], -1)
    if activation != "Sigmoid":
        return F.cross_entropy(flat, y)
    target = y.to(flat.dtype).reshape(-1, 1) if flat.shape[1] == 1 else F.one_hot(y, flat.shape[1]).to(flat.dtype)
    return F.binary_cross_entropy_with_logits(flat, target)


def distill_loss(s: torch.Tensor, t: torch.Tensor, temperature: float, class_scores: bool = True,
                 axis: Optional[int] = None) -> torch.Tensor:
    """T^2 KL of the softmaxes over the classes, summed over the classes and averaged over the rest:
    classifier logits ([N, C], C > 1), or a map's class ``axis`` (a segmentation map's pixels, each
    a distribution of its own: the task metric's per-position KL; an MSE would also chase the shifts
    a softmax ignores); MSE otherwise, and for features (``class_scores`` false: an embedding, see
    :data:`onnxopt.task_metric.FEATURES`)."""
    if axis is None and s.dim() > 2 and len(task_metric.scores_shape(tuple(s.shape))) == 2:
        # [N, C, 1, 1] (a classifier ending in a 1x1 conv): its [N, C] scores
        s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    axis = 1 if axis is None and s.dim() == 2 else axis
    if class_scores and axis is not None and s.dim() >= 2 and s.shape[axis] > 1:
        T = temperature
        ls, lt = F.log_softmax(s / T, dim=axis), F.log_softmax(t / T, dim=axis)
        return (lt.exp() * (lt - ls)).sum(axis).mean() * T * T
    return F.mse_loss(s, t)


# ----------------------------------------------------------------------------- teacher
class _TorchTeacher:
    def __init__(self, model: ModelProto, device, features):
        self.module = OnnxModule(model).to(device).eval().requires_grad_(False)
        self.module.capture = set(features)
        self.features = list(features)

    def __call__(self, xs: list) -> tuple:
        with torch.no_grad():
            out = self.module(*xs)
        return _as_list(out), [self.module.captured[f] for f in self.features]


class _OrtTeacher:
    def __init__(self, model: ModelProto, input_names, features):
        self.outputs = [o.name for o in model.graph.output]
        self.features = list(features)
        self.sess = runtime.session(runtime.with_outputs(model, features), optimize=True)
        self.input_names = input_names
        # an export with a fixed batch (often 1) takes the training batch in slices of that size
        # (the torch student swaps the batch in its Reshapes instead; onnxruntime cannot)
        first = [vi.type.tensor_type.shape.dim[0] for vi in model.graph.input
                 if vi.name in set(input_names) and vi.type.tensor_type.shape.dim]
        sizes = {d.dim_value if d.HasField("dim_value") else None for d in first}
        self.fixed_batch = next(iter(sizes)) if len(sizes) == 1 else None   # None: dynamic or mixed

    def __call__(self, xs: list) -> tuple:
        arrays = [x.detach().cpu().numpy() for x in xs]
        names = self.outputs + self.features
        n, step = arrays[0].shape[0], self.fixed_batch
        if step and n != step and n % step == 0:
            parts = [runtime.run(self.sess, {k: a[i:i + step] for k, a in zip(self.input_names, arrays)}, names)
                     for i in range(0, n, step)]
            res = {k: np.concatenate([p[k] for p in parts]) for k in names}
        else:
            res = runtime.run(self.sess, dict(zip(self.input_names, arrays)), names)
        dev = xs[0].device
        return [torch.from_numpy(res[o]).to(dev) for o in self.outputs], [torch.from_numpy(res[f]).to(dev) for f in self.features]


# ----------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main loop
@dataclass
class _Run:
    """One finetune run's student, data and loss terms (what every step and the held-in loss read)."""
    cfg: FinetuneConfig
    student: OnnxModule
    device: "torch.device"
    tensors: dict
    label_t: Optional["torch.Tensor"]
    features: List[str] = field(default_factory=list)
    user_loss: Optional[Callable] = None
    teacher: Optional[Callable] = None
    cache: Optional[tuple] = None          # the teacher's outputs on ``tensors`` when inputs never change
    held: Optional[tuple] = None           # (tensors, labels) of the held-in split
    held_teacher: Optional[tuple] = None   # the teacher's outputs on the held-in split
    feature_outputs: set = field(default_factory=set)   # outputs of features, not class scores: MSE, not KL
    logits: dict = field(default_factory=dict)   # {graph output: _Logits}: trained on its logits (logit_pairs)
    # outputs whose length depends on the data (after NonZero, NonMaxSuppression...): no sample rows to
    # cache or to match between student and teacher, so they are not distilled
    selected: set = field(default_factory=set)

    @property
    def teacher_logits(self) -> list:
        """The outputs whose teacher logits the teacher returns after the features, in that order."""
        return [lg for lg in self.logits.values() if lg.teacher is not None]

    @property
    def n(self) -> int:
        return len(self.tensors[self.student.input_names[0]])

    def batch_loss(self, out: list, t_out, t_feat, y, xs) -> "torch.Tensor":
        cfg, student = self.cfg, self.student
        loss = out[0].new_zeros(())
        if t_out is not None:
            t_logits = dict(zip((lg.output for lg in self.teacher_logits), t_feat[len(self.features):]))
            distilled = set()   # a TopK's scores and indices read the same logits: distilled once
            for s_o, t_o, name in zip(out, t_out, student.output_names):
                if name in self.selected:
                    continue
                if s_o.shape != t_o.shape:
                    raise OnnxoptError(f"student output {tuple(s_o.shape)} and teacher output {tuple(t_o.shape)} differ.",
                                       "the teacher must have the same outputs as the model (the model before lite/prune/qdq)")
                if name in t_logits:   # behind a final Softmax/Sigmoid/ArgMax: the logits, not probabilities or ids
                    if self.logits[name].student not in distilled:
                        distilled.add(self.logits[name].student)
                        s_l = student.captured[self.logits[name].student]
                        loss = loss + cfg.distill_weight * logit_distill_loss(s_l, t_logits[name].to(s_l.dtype),
                                                                              self.logits[name].activation, cfg.temperature,
                                                                              self.logits[name].axis)
                    continue
                if not s_o.is_floating_point():   # ids or counts with no logits found before them: nothing to learn from
                    continue
                loss = loss + cfg.distill_weight * distill_loss(s_o, t_o.to(s_o.dtype), cfg.temperature,
                                                                name not in self.feature_outputs)
            for f, t_f in zip(self.features, t_feat):
                loss = loss + cfg.feature_weight * F.mse_loss(student.captured[f], t_f.to(student.captured[f].dtype))
        if y is not None:
            first = self.logits.get(student.output_names[0])
            scores = student.captured[first.student] if first is not None else out[0]
            act, axis = (first.activation, first.axis) if first is not None else (None, None)
            loss = loss + cfg.label_weight * label_loss(scores, y, act, axis)
        if self.user_loss is not None:
            loss = loss + self.user_loss(out, t_out, y, dict(zip(student.input_names, xs)))
        return loss

    def teacher_outputs(self, idx, xs, cache) -> tuple:
        """(outputs, features) of the teacher on batch ``idx`` (rows of ``cache`` or run on ``xs``), or (None, None)."""
        if self.teacher is None:
            return None, None
        if cache is not None:
            return ([None if c is None else c[idx].to(self.device) for c in cache[0]],
                    [c[idx].to(self.device) for c in cache[1]])
        return self.teacher(xs)

    def held_loss(self) -> float:
        student, device, held = self.student, self.device, self.held
        student.eval()
        total = 0.0
        with torch.no_grad():
            m = len(held[0][student.input_names[0]])
            for i in range(0, m, self.cfg.batch_size):
                idx = torch.arange(i, min(m, i + self.cfg.batch_size))
                xs = [held[0][nm][idx].to(device) for nm in student.input_names]
                out = _as_list(student(*xs))
                t_out, t_feat = self.teacher_outputs(idx, xs, self.held_teacher)
                y = held[1][idx].to(device) if held[1] is not None else None
                total += float(self.batch_loss(out, t_out, t_feat, y, xs)) * len(idx)
        return total / max(1, m)


def _as_list(out) -> list:
    return list(out) if isinstance(out, tuple) else [out]


def _check_config(cfg: FinetuneConfig) -> str:
    """Refuse bad settings; return the BN mode ``auto`` stands for."""
    if cfg.bn_mode not in ("auto", "frozen", "train"):
        raise OptionError(f"bad BN mode '{cfg.bn_mode}'.", "use auto, frozen or train")
    if cfg.optimizer not in ("adam", "sgd"):
        raise OptionError(f"bad optimizer '{cfg.optimizer}'.", "use adam or sgd")
    if cfg.epochs < 0 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise OptionError("epochs must be >= 0, batch size >= 1 and the learning rate > 0.", "check --epochs/--batch-size/--lr")
    # auto = frozen running statistics: measured best on pruned ResNet56 (docs/benchmarks.md, BN statistics)
    return cfg.bn_mode if cfg.bn_mode != "auto" else "frozen"


def _attach_teacher(run: _Run, teacher: Optional[ModelProto], model: ModelProto, log) -> None:
    """Choose the distilled features and build the teacher (torch, or onnxruntime on request)."""
    cfg, student = run.cfg, run.student
    features = list(cfg.feature_loss or ())
    if features == ["auto"]:
        if teacher is None:
            raise OptionError("--feature-loss auto needs a --teacher to match features against.", "give --teacher ORIGINAL.onnx")
        features = auto_features(teacher, model)
        log(f"feature distillation on {len(features)} tensors (activation outputs and residual sums)")
    # the teacher returns its logits behind a final Softmax/Sigmoid/ArgMax after the features
    taught = features + [lg.teacher for lg in run.teacher_logits]
    if teacher is not None:
        if cfg.teacher_runtime == "ort":
            run.teacher = _OrtTeacher(teacher, student.input_names, taught)
        else:
            try:
                run.teacher = _TorchTeacher(teacher, run.device, taught)
            except OnnxoptError as exc:  # say which model: the student converted fine
                way_out = "or give --teacher-runtime ort (onnxruntime runs the teacher)"
                raise OnnxoptError(f"the teacher cannot run in torch: {exc.message}",
                                   f"{exc.hint}; {way_out}" if exc.hint else way_out) from None
    if features:
        names_in_student = {o for node in student.program for o in node.outputs}
        missing = [f for f in features if f not in names_in_student]
        if missing:
            raise OptionError(f"--feature-loss tensor(s) not in the model: {', '.join(missing)}.", "name tensors that exist in both student and teacher")
        unbatched = _unbatched_features(run, features)
        if unbatched and list(cfg.feature_loss) != ["auto"]:   # named by the user (a list or a tuple)
            raise OptionError(f"--feature-loss tensor(s) without the samples on axis 0: {', '.join(unbatched)}.",
                              "name tensors whose first axis is the batch (a sequence-first attention tensor is not)")
        if unbatched:
            features = [f for f in features if f not in unbatched]
            run.teacher.features = [f for f in run.teacher.features if f not in unbatched]
            log(f"feature distillation: {len(unbatched)} of those tensors left out, their axis 0 is not the samples "
                f"(e.g. {unbatched[0]})")
    student.capture = set(features) | {lg.student for lg in run.logits.values()}
    run.features = features


def _unbatched_features(run: _Run, features: list) -> list:
    """The ``features`` whose axis 0 is not the samples, found by running the teacher on 1 and on 2
    samples: the loss and the teacher cache index them by sample (a transformer's sequence-first
    attention tensors crashed the cache)."""
    names = run.student.input_names
    if run.teacher is None or run.n < 2:
        return []
    rows = []
    for k in (1, 2):
        _, feats = run.teacher([run.tensors[nm][:k].to(run.device) for nm in names])
        rows.append([int(v.shape[0]) if v.dim() else 0 for v in feats[:len(features)]])
    return [f for f, a, b in zip(features, *rows) if (a, b) != (1, 2)]


def _hold_in(run: _Run, log) -> None:
    """A held-in split of the user's data (never the evaluation data): the epoch with the lowest
    loss on it is kept, and training stops when it no longer falls."""
    cfg, n = run.cfg, run.n
    k = int(round(cfg.val_split * n))
    if k < 8 or n - k < 8:
        return
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7919))
    hold, keep = order[:k], order[k:]
    label_t = run.label_t
    run.held = ({nm: v[hold] for nm, v in run.tensors.items()}, label_t[hold] if label_t is not None else None)
    run.tensors = {nm: v[keep] for nm, v in run.tensors.items()}
    run.label_t = label_t[keep] if label_t is not None else None
    log(f"held in {k} of {n} samples for early stopping (patience {cfg.patience or 'off'})")


def _prepare(model: ModelProto, data, teacher: Optional[ModelProto], cfg: FinetuneConfig, bn_mode: str, device, log) -> _Run:
    """The student, its data (with the held-in split) and the loss terms, checked before training."""
    student = OnnxModule(model, quant_mode=cfg.quant_mode, train_scales=cfg.train_scales, bn_mode=bn_mode,
                         weight_ranges=cfg.weight_ranges, weight_modes=cfg.weight_modes, float_weights=cfg.float_weights).to(device)
    arrays, labels = materialize(data, student.input_names)
    n = len(next(iter(arrays.values())))
    _check_batch(student, arrays, min(cfg.batch_size, n), device)
    user_loss = load_user_loss(cfg.user_loss) if cfg.user_loss else None
    if teacher is None and labels is None and user_loss is None and cfg.epochs > 0:
        raise OptionError("nothing to learn from: no --teacher, no labels and no --loss.",
                          "give the original model as --teacher (label-free distillation), or --labels, or --loss file.py:function")
    if labels is not None and (cfg.label_weight == 0):
        labels = None
    run = _Run(cfg, student, device, {k: torch.from_numpy(v) for k, v in arrays.items()},
               torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None, user_loss=user_loss,
               # found on the float teacher too: a quantized student's normalization reads dequantized tensors
               feature_outputs=task_metric.features_outputs(model) | (task_metric.features_outputs(teacher) if teacher is not None else set()),
               logits=logit_pairs(model, teacher), selected=task_metric.data_dependent_outputs(model))
    if run.selected and teacher is not None:
        log(f"output(s) {', '.join(sorted(run.selected))}: their length depends on the data (a selection in the graph), "
            "so they are not distilled; the other outputs and features are")
    _attach_teacher(run, teacher, model, log)
    if cfg.val_split > 0 and cfg.epochs > 0:
        _hold_in(run, log)
    skipped = {k for k, name in enumerate(student.output_names) if name in run.selected}
    # the teacher's outputs are computed once when every epoch sees the same inputs
    if run.teacher is not None and not cfg.augment:
        run.cache = _teacher_cache(run.teacher, run.tensors, student.input_names, cfg.batch_size, device, skipped)
    if run.held and run.teacher:
        run.held_teacher = _teacher_cache(run.teacher, run.held[0], student.input_names, cfg.batch_size, device, skipped)
    return run


def _optimizer(run: _Run, world: int) -> tuple:
    """Adam or SGD with a linear warm-up then a cosine decay to 0: (optimizer, scheduler)."""
    cfg = run.cfg
    params = [p for p in run.student.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    steps_per_epoch = max(1, math.ceil(math.ceil(run.n / world) / cfg.batch_size))
    total = max(1, cfg.epochs * steps_per_epoch)
    # a short linear warm-up keeps the first Adam steps (moment estimates still noisy) from wrecking
    # pretrained weights at the larger learning rates small-data recovery needs; then cosine to 0
    warm = int(round(max(0.0, min(0.5, cfg.warmup)) * total))

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(1, total - warm)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def _resume(run: _Run, ckpt_path: Optional[Path], fp: str, opt, sched, log) -> tuple:
    """(first epoch, history) from the checkpoint ``--resume`` names, or (0, []) for a fresh run."""
    cfg = run.cfg
    if not cfg.resume:
        return 0, []
    if ckpt_path is None:
        raise OptionError("--resume needs --checkpoint DIR.", "give the folder the interrupted run wrote its checkpoint to")
    if not ckpt_path.is_file():
        log(f"no checkpoint in {cfg.checkpoint} yet; starting from scratch")
        return 0, []
    state = torch.load(ckpt_path, map_location=run.device, weights_only=False)
    if state.get("model_fingerprint") != fp:
        raise OptionError(f"checkpoint '{ckpt_path}' belongs to another model (fingerprint {state.get('model_fingerprint')} != {fp}).",
                          "use a fresh --checkpoint folder or the model the checkpoint was made from")
    run.student.load_state_dict(state["module"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    log(f"resumed from {ckpt_path} after epoch {int(state['epoch'])}")
    return int(state["epoch"]), list(state["history"])


def _train_epoch(run: _Run, net, opt, sched, epoch: int, gen, scale_params: list) -> tuple:
    """One epoch over this rank's share of a shuffled order: (samples seen, summed loss)."""
    cfg, device, student = run.cfg, run.device, run.student
    rank, world, _ = dist_info()
    n = run.n
    net.train()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    # every rank takes n // world samples, so all take the same number of steps (DDP all-reduces each)
    mine = perm[rank:(n // world) * world:world] if world > 1 else perm
    batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    bar = progress_bar(len(mine), f"training, epoch {epoch + 1} of {cfg.epochs}", cfg.progress and rank == 0)
    loss_sum = 0.0
    for idx in batches:
        xs = [run.tensors[nm][idx].to(device) for nm in student.input_names]
        if cfg.augment:
            xs = [augment_batch(x, gen) for x in xs]
        out = _as_list(net(*xs))
        t_out, t_feat = run.teacher_outputs(idx, xs, run.cache)
        y = run.label_t[idx].to(device) if run.label_t is not None else None
        loss = run.batch_loss(out, t_out, t_feat, y, xs)
        if not torch.isfinite(loss):
            raise OnnxoptError(f"the loss became {float(loss)} in epoch {epoch + 1}.", "lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # a step size must stay positive
            for p in scale_params:
                p.clamp_(min=1e-8)
        loss_sum += float(loss.detach()) * len(idx)
        bar.update(len(idx))
        bar.set_postfix_str(f"loss={float(loss.detach()):.4f}")
    bar.close()
    return len(mine), loss_sum


@dataclass
class _Best:
    """The epoch with the lowest held-in loss so far, and its weights."""
    loss: float
    epoch: int
    weights: dict


def _train(run: _Run, net, opt, sched, start_epoch: int, history: list, ckpt_path: Optional[Path], fp: str, log) -> tuple:
    """The epochs from ``start_epoch``, with checkpoints and early stopping: (samples, seconds)."""
    cfg, student = run.cfg, run.student
    rank, world, _ = dist_info()
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
    train_time, train_samples = 0.0, 0
    scale_names = {aq.scale for aq in student.act_quants} | {wq.scale for wq in student.weight_quants.values()}
    scale_params = [student.value(s) for s in scale_names if s in student.param_names]
    best = None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        seen, loss_sum = _train_epoch(run, net, opt, sched, epoch, gen, scale_params)
        dt = time.perf_counter() - t0
        train_time += dt
        train_samples += seen * world
        rec = {"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "lr": sched.get_last_lr()[0],
               "seconds": round(dt, 3), "samples_per_second": round(seen * world / dt, 2) if dt > 0 else None}
        history.append(rec)
        held_text = ""
        if run.held is not None:
            rec["held_in_loss"] = run.held_loss()
            held_text = f"  held-in loss {rec['held_in_loss']:.5f}"
            if best is None or rec["held_in_loss"] < best.loss:
                best = _Best(rec["held_in_loss"], epoch + 1, {k: v.detach().clone() for k, v in student.state_dict().items()})
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {rec['loss']:.5f}{held_text}  lr {rec['lr']:.2e}  {rec['samples_per_second']} samples/s")
        if ckpt_path is not None and rank == 0:
            _save_checkpoint(ckpt_path, {"epoch": epoch + 1, "model_fingerprint": fp, "module": student.state_dict(),
                                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history})
        if best is not None and cfg.patience and epoch + 1 - best.epoch >= cfg.patience:
            log(f"early stop: the held-in loss has not fallen for {cfg.patience} epochs")
            break
    if best is not None and history and best.epoch != history[-1]["epoch"]:
        student.load_state_dict(best.weights)
        log(f"kept the weights of epoch {best.epoch} (lowest held-in loss {best.loss:.5f})")
    return train_samples, train_time


def _write_back(run: _Run, model: ModelProto, log) -> tuple:
    """Optionally re-estimate BN, write the learned values into ``model``: (model, parity)."""
    cfg, student = run.cfg, run.student
    if cfg.bn_recalib:
        recalibrate_bn(student, run.tensors, cfg.batch_size, run.device, cfg.bn_recalib_batches)
        log("re-estimated BatchNormalization statistics")
    student.eval()
    student.capture = set()
    broken = [name for name, p in student.named_parameters() if not torch.isfinite(p).all()]
    if broken:   # the loss was finite at the last step, the step after it was not
        raise OnnxoptError(f"training left non-finite values in {len(broken)} parameter(s) (e.g. {broken[0]}); "
                           "nothing was written.", "lower --lr (or --epochs)")
    result = write_back(student.cpu(), model)
    parity = parity_check(student, result, run.tensors, cfg.parity_samples)
    if parity and parity["max_abs"] > 1e-4 + 1e-5 * parity["max_ref"]:
        # Measured cause on QDQ graphs: a float op before a Q differs by ~1 ulp between torch and
        # onnxruntime (summation order), which flips a value sitting on a rounding tie by one step.
        log(f"WARNING: onnxruntime and torch differ by {parity['max_abs']:.3g} on the written model "
            "(a quantization rounding tie flipped by float summation order, or an op the two runtimes compute differently)")
    return result, parity


def _in_own_types(run: _Run, original: ModelProto, twin_result: ModelProto, parity: dict, log) -> tuple:
    """(model, parity): the learned values written into the float16/bfloat16 ``original``, rounded to
    its types -- the model keeps its size and the precision it was exported in -- or the trained
    float32 twin where they cannot be (see :func:`write_back`'s ``own_types``), with a note. The
    parity is then against the rounded model, and the float32 twin's is kept beside it."""
    narrowed = write_back(run.student, original, own_types=True)
    if narrowed is None:
        log("the trained model is written as its float32 twin (float16/bfloat16 inputs and outputs kept): "
            "its graph differs from the original's beyond the widening, or a learned value exceeds float16's range")
        return twin_result, parity
    rounded = parity_check(run.student, narrowed, run.tensors, run.cfg.parity_samples)
    if rounded:
        log(f"written in the model's own float16/bfloat16 weights: outputs within {rounded['max_abs']:.3g} of the trained "
            f"float32 module (the float32 twin: {parity.get('max_abs', 0.0):.3g})")
        rounded["float32_twin_max_abs"] = parity.get("max_abs")
    return narrowed, rounded or parity


def finetune(model: ModelProto, data, *, teacher: Optional[ModelProto] = None, config: Optional[FinetuneConfig] = None) -> FinetuneResult:
    """Train ``model`` on ``data`` (a DataSource) and return it with the learned values written back."""
    cfg = config or FinetuneConfig()
    bn_mode = _check_config(cfg)
    device = pick_device(cfg.device)
    set_threads(cfg.threads, dist_info()[1])
    distributed = _init_distributed(device)
    rank, world, _ = dist_info()
    log = cfg.log if rank == 0 else (lambda msg: None)
    # a float16 model trains as its float32 twin: Adam's eps (1e-8) is 0 in float16, and its steps
    # turned the weights to NaN; what it learned is written back into the float16 model
    original = model
    model, widened = float32_twin(model)
    if widened:
        log(f"a float16/bfloat16 model: trained as its float32 twin ({widened.describe()})")
    teacher = float32_twin(teacher)[0] if teacher is not None else None
    torch.manual_seed(cfg.seed)
    run = _prepare(model, data, teacher, cfg, bn_mode, device, log)
    opt, sched = _optimizer(run, world)
    ckpt_path = Path(cfg.checkpoint) / "finetune.pt" if cfg.checkpoint else None
    fp = fingerprint(model)
    start_epoch, history = _resume(run, ckpt_path, fp, opt, sched, log)
    net = run.student
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(run.student, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    train_samples, train_time = _train(run, net, opt, sched, start_epoch, history, ckpt_path, fp, log)
    result, parity = _write_back(run, model, log)
    if widened:
        result, parity = _in_own_types(run, original, result, parity, log)
    if distributed:
        import torch.distributed as dist
        dist.barrier()
    sps = train_samples / train_time if train_time > 0 else 0.0
    return FinetuneResult(result, history, parity, sps, run.student)


def _check_batch(student: OnnxModule, arrays: dict, batch: int, device) -> None:
    """A graph exported with a fixed batch trains at other batches when only Reshape shapes bake the
    batch in (OnnxModule handles those); anything else that fixes it fails here, with the fix."""
    declared = student.declared_batch
    if declared is None or batch == declared:
        return
    was_training = student.training
    try:
        with torch.no_grad():
            student.eval()
            student(*[torch.from_numpy(np.ascontiguousarray(arrays[k][:batch])).to(device) for k in student.input_names])
    except Exception as exc:
        raise OptionError(f"the model fixes its batch at {declared} and cannot run a batch of {batch}: {str(exc).splitlines()[0][:200]}",
                          f"use --batch-size {declared}, or re-export the model with a dynamic batch dimension") from None
    finally:
        student.train(was_training)


def _teacher_cache(t_fn, tensors, input_names, batch_size, device, skipped=()) -> tuple:
    """The teacher's outputs and features on every sample, by sample; None for the outputs at the
    ``skipped`` positions (a data-dependent selection has no rows per sample)."""
    n = len(tensors[input_names[0]])
    outs, feats = [], []   # per batch, on the CPU
    for i in range(0, n, batch_size):
        o, f = t_fn([tensors[nm][i:i + batch_size].to(device) for nm in input_names])
        outs.append([None if k in skipped else v.detach().cpu() for k, v in enumerate(o)])
        feats.append([v.detach().cpu() for v in f])
    return ([None if k in skipped else torch.cat(col) for k, col in enumerate(zip(*outs))],
            [torch.cat(col) for col in zip(*feats)])


def recalibrate_bn(module: OnnxModule, tensors: dict, batch_size: int, device, max_batches: int = 0) -> None:
    """Re-estimate every BatchNormalization's running mean/variance on the data (exact averages over
    all batches, the network otherwise in eval mode -- fake quantization included)."""
    sums: dict = {}
    names = module.input_names
    n = len(tensors[names[0]])

    def hook(m, node, ins):
        x = ins[0]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        cnt = x.numel() // x.shape[1]
        acc = sums.setdefault(node.name, [node, 0, torch.zeros_like(mean, dtype=torch.float64), torch.zeros_like(mean, dtype=torch.float64)])
        acc[1] += cnt
        acc[2] += mean.double() * cnt
        acc[3] += (var.double() + mean.double() ** 2) * cnt
        return F.batch_norm(x, mean, var, ins[1], ins[2], False, 0.0, float(node.attrs.get("epsilon", 1e-5)))

    saved = [(node, node.fn) for node in module.program if node.op == "BatchNormalization"]
    for node, _ in saved:
        node.fn = hook
    module.eval()
    try:
        with torch.no_grad():
            for b, i in enumerate(range(0, n, batch_size)):
                if max_batches and b >= max_batches:
                    break
                module(*[tensors[nm][i:i + batch_size].to(device) for nm in names])
    finally:
        for node, fn in saved:
            node.fn = fn
    with torch.no_grad():
        for node, cnt, s1, s2 in sums.values():
            mean = s1 / cnt
            var = (s2 / cnt - mean ** 2).clamp_min(0) * (cnt / max(1, cnt - 1))
            module.value(node.inputs[3]).copy_(mean.to(module.value(node.inputs[3]).dtype))
            module.value(node.inputs[4]).copy_(var.to(module.value(node.inputs[4]).dtype))


def parity_check(module: OnnxModule, model: ModelProto, tensors: dict, samples: int) -> dict:
    """Max |onnxruntime(written model) - torch module (eval)| on the first ``samples`` samples."""
    if samples <= 0:
        return {}
    names = module.input_names
    xs = [tensors[nm][:samples] for nm in names]
    module.eval()
    with torch.no_grad():
        out = _as_list(module(*xs))
    sess = runtime.session(model)
    try:
        ref = runtime.run(sess, {nm: x.numpy() for nm, x in zip(names, xs)})
    except DataError:  # a model with a fixed batch of 1: sample by sample
        parts = [runtime.run(sess, {nm: x[i:i + 1].numpy() for nm, x in zip(names, xs)}) for i in range(len(xs[0]))]
        ref = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    worst, scale = 0.0, 0.0
    for o, name in zip(out, module.output_names):
        a = o.detach().numpy().astype(np.float64)
        # NaN on both sides is no agreement: a non-finite output is an infinite difference
        d = np.where(np.isfinite(a) & np.isfinite(ref[name]), np.abs(a - ref[name]), np.inf)
        worst = max(worst, float(d.max()) if a.size else 0.0)
        scale = max(scale, float(np.abs(ref[name]).max()) if a.size else 0.0)
    return {"max_abs": worst, "max_ref": scale, "samples": int(len(xs[0]))}
