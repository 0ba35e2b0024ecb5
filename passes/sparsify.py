"""``sparsify`` -- N:M and unstructured magnitude sparsity of layer weights (approximate).

The graph keeps its structure; weights get zeros that a sparse kernel (TensorRT's 2:4 sparse
tensor cores, TIDL's n2m) or a compressor can exploit.

* ``method=nm``: in every group of M consecutive weights along the *input-channel* dimension --
  for a Conv ``W [Cout, Cin/g, kh, kw]`` the groups are ``W[o, c0:c0+M, i, j]``; for Gemm/MatMul the
  K dimension; for ConvTranspose ``W [Cin, ...]`` axis 0 -- keep the N largest magnitudes and zero
  the rest (``nm_convention=keep``: NVIDIA's "2:4" = at most 2 non-zeros in every 4). TI's n2m
  names the number of *zeroed* weights ("41:64" with pruning ratio 41/64): write
  ``nm=41:64, nm_convention=prune``. ``nm_layout=flat`` groups consecutive weights of each output
  channel's flattened filter instead (``W.reshape(Cout, -1)``). A layer whose group dimension is
  not a multiple of M (e.g. a 3-channel stem, a depthwise conv) is skipped with the reason, so the
  pattern holds exactly in every group of M of every sparsified layer.
* ``method=unstructured``: zero the ``ratio`` smallest magnitudes, per layer (``scope=layer``) or
  with one threshold over all layers (``scope=global``); exactly ``round(ratio * n)`` weights are
  zeroed (ties broken by position).

Weights in Constant nodes count; a changed weight becomes a new constant (copy-on-write), shared by
the layers that shared the original. The report gives the sparsity reached per layer and in total
and the output error right after sparsifying (on the context's data or generated inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs
from onnx import ModelProto

from onnxopt import runtime
from onnxopt.errors import OptionError
from onnxopt.ir.graph import NameGenerator, constant_value, export_graph, import_graph, input_at, is_weight
from onnxopt.registry import PassContext, PassOptions, PassResult, compile_patterns, option, register_pass

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class SparsifyOptions(PassOptions):
    """The sparsify pass's options."""

    method: str = option("nm", "nm: N of every M weights along the input channels; unstructured: smallest magnitudes", ("nm", "unstructured"))
    nm: str = option("2:4", "the N:M pattern, e.g. 2:4 (TensorRT) or 41:64 (TI, with nm_convention=prune)")
    nm_convention: str = option("keep", "keep: N weights of every M stay non-zero (NVIDIA); prune: N of every M are zeroed (TI)", ("keep", "prune"))
    nm_layout: str = option("input_channel", "groups of M along the input channels, or along each output's flattened filter", ("input_channel", "flat"))
    ratio: float = option(0.5, "unstructured: fraction of weights set to zero")
    scope: str = option("layer", "unstructured: ratio per layer, or one magnitude threshold over all layers (global)", ("layer", "global"))
    protect: list = option([], "layers left dense: node, output or weight names or regexes (full match)")
    eval_batches: int = option(4, "batches of the data used to measure the output error")

    def validate(self, model, ctx) -> None:
        if self.method == "nm":
            _parse_nm(self.nm)
        if self.method == "unstructured" and not 0.0 <= float(self.ratio) <= 1.0:
            raise OptionError(f"sparsify.ratio must be in [0, 1], got {self.ratio}.", "e.g. --set sparsify.ratio=0.5")
        compile_patterns(self.protect, "sparsify.protect")


@dataclass
class _Weight:
    """One weight to sparsify and the layers that read it (along the same axes)."""
    value: np.ndarray
    axes: tuple          # (input-channel axis, output-channel axis)
    nodes: list
    where: str
    new: Optional[np.ndarray] = None   # the sparse value; None: left as it is


def _collect_weights(graph: gs.Graph, model: ModelProto, patterns: list, skipped: list) -> list:
    """The constant float weights of the layers sparsify handles, one entry per weight; what is
    passed over goes to ``skipped`` with the reason."""
    inputs = {i.name for i in model.graph.input}
    by_weight: dict = {}
    for node in graph.nodes:
        if node.op not in LAYERS or (node.domain or "") not in ("", "ai.onnx"):
            continue
        w = input_at(node, 1)
        where = node.name or node.outputs[0].name
        if w is None or w.name in inputs or not is_weight(graph, w):
            skipped.append(f"{where}: weight is not a constant (computed in the graph? cleanup folds constant expressions)")
            continue
        if any(p.fullmatch(x) for p in patterns for x in (node.name, node.outputs[0].name, w.name) if x):
            skipped.append(f"{where}: protected")
            continue
        value = constant_value(w)
        if value.dtype.kind != "f" or value.ndim < 2 or (node.op == "MatMul" and value.ndim != 2):
            skipped.append(f"{where}: weight is not a float matrix/filter")
            continue
        entry = by_weight.setdefault(w.name, _Weight(value, _axes(node), [], where))
        if entry.axes != _axes(node):
            skipped.append(f"{where}: weight shared with a layer that reads it along other axes")
        else:
            entry.nodes.append(node)
    return list(by_weight.values())


def _sparsify_nm(entries: list, m: int, keep_n: int, layout: str, skipped: list) -> None:
    """Keep the ``keep_n`` largest magnitudes of every group of ``m``."""
    for e in entries:
        grouped = _groups(e.value, *e.axes, layout)
        if grouped.shape[-1] % m or grouped.shape[-1] == 0:
            skipped.append(f"{e.where}: group dimension {grouped.shape[-1]} is not a multiple of {m}")
            continue
        g = grouped.reshape(grouped.shape[0], -1, m)
        order = np.argsort(-np.abs(g), axis=-1, kind="stable")
        mask = np.zeros_like(g, dtype=bool)
        np.put_along_axis(mask, order[..., :keep_n], True, axis=-1)
        e.new = _ungroup(np.where(mask, g, 0).reshape(grouped.shape), e.value, *e.axes, layout)


def _zero_smallest(entries: list, ratio: float) -> None:
    """Zero the ``ratio`` smallest magnitudes of the weights of ``entries`` together (one threshold;
    ties broken by position)."""
    mags = np.concatenate([np.abs(e.value).ravel().astype(np.float64) for e in entries]) if entries else np.zeros(0)
    k = int(round(ratio * mags.size))
    dead = np.zeros(mags.size, dtype=bool)
    if k:
        dead[np.argsort(mags, kind="stable")[:k]] = True
    for e, d in zip(entries, np.split(dead, np.cumsum([e.value.size for e in entries])[:-1])):
        e.new = np.where(d.reshape(e.value.shape), 0, e.value).astype(e.value.dtype)


def _replace_weights(graph: gs.Graph, entries: list) -> tuple:
    """Give each sparsified weight's readers a new constant (copy-on-write); returns the report rows
    and the counts of the handled layers' weights: (rows, total, zeros after, zeros before)."""
    names = NameGenerator(graph)
    layers = []
    total = zeros = zeros_before = 0
    dead: set = set()  # replaced Constant nodes, dropped here: the export's cleanup would print their arrays
    outputs = {t.name for t in graph.outputs}
    for e in entries:
        v, new = e.value, e.new
        before = int(np.count_nonzero(v == 0))
        zeros_before += before
        total += v.size
        if new is None:
            zeros += before
            continue
        old = e.nodes[0].inputs[1]
        const = gs.Constant(names(old.name + "_sparse"), np.ascontiguousarray(new.astype(v.dtype)))
        for node in e.nodes:
            node.inputs[1] = const
        if not old.outputs and len(old.inputs) == 1 and old.inputs[0].op == "Constant" and old.name not in outputs:
            dead.add(id(old.inputs[0]))
        after = int(np.count_nonzero(new == 0))
        zeros += after
        layers.append({"layer": e.where, "weight": const.name, "params": int(v.size), "sparsity_before": round(before / v.size, 4),
                       "sparsity": round(after / v.size, 4), "readers": len(e.nodes)})
    if dead:
        graph.nodes = [n for n in graph.nodes if id(n) not in dead]
    return layers, total, zeros, zeros_before


@register_pass("sparsify", "N:M (2:4 for TensorRT, TI's n2m) or unstructured magnitude sparsity of layer weights.", exact=False, options=SparsifyOptions)
def sparsify(model: ModelProto, options: SparsifyOptions, ctx: PassContext) -> PassResult:
    """N:M or unstructured magnitude sparsity; see the module docstring."""
    options.validate(model, ctx)
    method = options.method
    n, m = _parse_nm(options.nm) if method == "nm" else (0, 0)
    ratio = float(options.ratio)
    graph = import_graph(model)
    skipped: list = []
    entries = _collect_weights(graph, model, compile_patterns(options.protect, "sparsify.protect"), skipped)
    if method == "nm":
        _sparsify_nm(entries, m, n if options.nm_convention == "keep" else m - n, options.nm_layout, skipped)
    else:  # unstructured: one magnitude threshold per layer, or over all layers
        for group in ([e] for e in entries) if options.scope == "layer" else [entries]:
            _zero_smallest(group, ratio)
    layers, total, zeros, zeros_before = _replace_weights(graph, entries)
    new_model = export_graph(graph, like=model)
    extra = {
        "method": method,
        "pattern": f"{n}:{m} ({options.nm_convention}, {options.nm_layout})" if method == "nm" else f"ratio {ratio} ({options.scope})",
        "layers": layers,
        "sparsity": {"sparsified_layers": round(sum(r["sparsity"] * r["params"] for r in layers) / max(sum(r["params"] for r in layers), 1), 4),
                     "all_layer_weights": round(zeros / total, 4) if total else 0.0,
                     "all_layer_weights_before": round(zeros_before / total, 4) if total else 0.0,
                     "layer_params": total},
        # nothing changed: no onnxruntime run (a model with ops it lacks is still left as it is)
        "output_error": _error(model, new_model, ctx, options.eval_batches) if layers else {"max_abs": 0.0, "max_rel": 0.0, "inputs": None},
    }
    if not layers and not skipped:
        skipped.append(f"nothing sparsified: the model has no {'/'.join(sorted(LAYERS))} layer")
    changes = {"layers_sparsified": len(layers), "weights_zeroed": zeros - zeros_before}
    details = [f"{r['layer']}: sparsity {r['sparsity_before']:.3f} -> {r['sparsity']:.3f}" for r in layers]
    extra["ways_out"] = ("finetune the sparse model against the original (onnxopt finetune OUT --teacher MODEL --data DATA), "
                         "or a lower sparsify.ratio, sparsify.protect for the sensitive layers")
    return PassResult(new_model, changes=changes, details=details, skipped=skipped, extra=extra)


def _parse_nm(text: str) -> tuple:
    try:
        n, m = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise OptionError(f"sparsify.nm must look like N:M, got '{text}'.", "e.g. --set sparsify.nm=2:4") from None
    if not 0 < n < m:
        raise OptionError(f"sparsify.nm needs 0 < N < M, got {n}:{m}.", "e.g. 2:4, or 41:64 with nm_convention=prune")
    return n, m


def _axes(node: gs.Node) -> tuple:
    """(input-channel axis, output-channel axis) of the node's weight: [out, in, ...] for Conv and a
    transB Gemm, [in, out, ...] for ConvTranspose, Gemm and MatMul."""
    out_first = node.op == "Conv" or (node.op == "Gemm" and int(node.attrs.get("transB", 0)))
    return (1, 0) if out_first else (0, 1)


def _groups(w: np.ndarray, in_axis: int, out_axis: int, layout: str) -> np.ndarray:
    """The weight as [rows, L]: each row is cut into groups of M consecutive weights."""
    if layout == "flat":
        return np.moveaxis(w, out_axis, 0).reshape(w.shape[out_axis], -1)
    return np.moveaxis(w, in_axis, -1).reshape(-1, w.shape[in_axis])


def _ungroup(g: np.ndarray, like: np.ndarray, in_axis: int, out_axis: int, layout: str) -> np.ndarray:
    """The inverse of :func:`_groups` for a weight shaped like ``like``."""
    src, dst = (out_axis, 0) if layout == "flat" else (in_axis, -1)
    return np.moveaxis(g.reshape(np.moveaxis(like, src, dst).shape), dst, src)


def _error(before: ModelProto, after: ModelProto, ctx: PassContext, batches: int) -> dict:
    feeds, source = ctx.sample_feeds(before, batches)
    s_ref, s_new = runtime.session(before), runtime.session(after)
    err = {"max_abs": 0.0, "max_rel": 0.0, "inputs": source}
    for feed in feeds:
        e = runtime.output_error(runtime.run(s_ref, feed), runtime.run(s_new, feed))
        err["max_abs"], err["max_rel"] = max(err["max_abs"], e["max_abs"]), max(err["max_rel"], e["max_rel"])
    return err


