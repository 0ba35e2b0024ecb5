"""Embedding models quantized with the defaults: the output measured as features (cosine, SQNR)
against the same output taken for class scores (top-1 agreement of its argmax, the behaviour
before ``task_metric.FEATURES``).

Each shared classifier becomes the embedding model a retrieval or re-identification user exports:
the penultimate features (the input of the final Gemm/MatMul) L2-normalized by LpNormalization,
output ``embedding``. ``qdq`` runs with no option but the target on the bench's calibration
images (``bench_peers.prepare``, fold 0), once as it runs now and once with the features
recognition switched off, so that ``fallback=auto``'s 1-point budget reads the argmax of the
embedding. On the evaluation images, per run:

* units kept in float and their share of the MACs, onnxruntime latency against the float model;
* cosine between the float and quantized embeddings (mean and worst image);
* retrieval: the share of images whose nearest other image (cosine) is the same for both models,
  and leave-one-out 1-NN top-1 against the labels (float model: the same figure).

    ONNXOPT_BENCH_CACHE=/tmp/E nice python tools/bench_embedding.py [--models resnet20,resnet56,effnet]
        [--targets ort,tensorrt] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_peers  # noqa: E402
from onnxopt import manager, runtime, task_metric  # noqa: E402
from onnxopt.compare import measure_latency  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402


def embedding_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` cut before its last Gemm/MatMul, the features L2-normalized (output ``embedding``)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    last = max(i for i, n in enumerate(g.node) if n.op_type in ("Gemm", "MatMul"))
    features = g.node[last].input[0]
    keep = list(g.node[:last])
    del g.node[:]
    g.node.extend(keep + [helper.make_node("LpNormalization", [features], ["embedding"], axis=1, p=2, name="l2norm")])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", "features"]))
    del g.value_info[:]
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    onnx.checker.check_model(out, full_check=True)
    return out


class _AsClassScores:
    """The features recognition switched off: the embedding's argmax is read as a class (before)."""

    def __enter__(self):
        self.saved = task_metric._l2_normalized, task_metric._FEATURE_NAME
        task_metric._l2_normalized = lambda node, producer: False
        task_metric._FEATURE_NAME = re.compile(r"(?!)")

    def __exit__(self, *exc):
        task_metric._l2_normalized, task_metric._FEATURE_NAME = self.saved


def embeddings(model, feeds) -> np.ndarray:
    sess = runtime.session(model, optimize=True)
    return np.concatenate([sess.run(["embedding"], f)[0].reshape(len(next(iter(f.values()))), -1) for f in feeds])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine between each row of ``a`` and the same row of ``b`` (float and quantized embeddings)."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def retrieval(e: np.ndarray, labels) -> tuple:
    """(nearest other image of each, leave-one-out 1-NN top-1 %; None without labels or with one
    image per class, as in the ImageNet folder)."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(1)
    single = labels is None or len(set(np.asarray(labels).tolist())) == len(labels)
    acc = None if single else 100.0 * float(np.mean(np.asarray(labels)[nn] == np.asarray(labels)))
    return nn, acc


def run(name: str, targets: list) -> list:
    path, cf, ef, labels, _, _ = bench_peers.prepare(name)
    float_model = embedding_model(onnx.load(str(path)))
    ref = embeddings(float_model, ef)
    ref_nn, ref_acc = retrieval(ref, labels)
    t_float = measure_latency(float_model, ef[0], runs=30, warmup=3, threads=1)["median_ms"]
    rows = [{"model": name, "target": "float", "read_as": "-", "kept": 0, "mac_share": 0.0, "latency_x": 1.0,
             "cos_mean": 1.0, "cos_min": 1.0, "nn_agreement": 100.0, "knn_top1": ref_acc}]
    for target in targets:
        for read_as in ("features", "class scores"):
            ctx = PassContext(data=lambda: iter(cf), progress=False, log=lambda m: None,
                              input_shapes={k: list(v.shape) for k, v in cf[0].items()} if target.startswith("tidl") else None)
            t0 = time.perf_counter()
            if read_as == "features":
                q, report = manager.apply(float_model, ["qdq"], {"qdq": {"target": target}}, context=ctx, verify=False, summarize_layers=False)
            else:
                with _AsClassScores():
                    q, report = manager.apply(float_model, ["qdq"], {"qdq": {"target": target}}, context=ctx, verify=False, summarize_layers=False)
            seconds = time.perf_counter() - t0
            fb = (report.passes[-1].extra.get("recovery") or {}).get("fallback") or {}
            got = embeddings(q, ef)
            cos = cosines(ref, got)
            nn, acc = retrieval(got, labels)
            row = {"model": name, "target": target, "read_as": read_as, "kept": len(fb.get("high_precision_layers", [])),
                   "mac_share": fb.get("high_precision_mac_share", 0.0),
                   "latency_x": measure_latency(q, ef[0], runs=30, warmup=3, threads=1)["median_ms"] / t_float,
                   "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                   "nn_agreement": 100.0 * float(np.mean(nn == ref_nn)), "knn_top1": acc, "seconds": round(seconds, 1)}
            bench_peers.log(json.dumps(row))
            rows.append(row)
    return rows


def markdown(rows: list) -> str:
    lines = ["| model | target | output read as | units kept (MAC share) | latency vs float | cosine mean / worst | "
             "nearest neighbour kept | 1-NN top-1 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        knn = "-" if r["knn_top1"] is None else f"{r['knn_top1']:.2f} %"
        lines.append(f"| {r['model']} | {r['target']} | {r['read_as']} | {r['kept']} ({100 * r['mac_share']:.0f} %) | "
                     f"{r['latency_x']:.2f}× | {r['cos_mean']:.5f} / {r['cos_min']:.4f} | {r['nn_agreement']:.2f} % | {knn} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet20,resnet56,effnet")
    ap.add_argument("--targets", default="ort,tensorrt")
    bench_peers.add_rows_options(ap)
    args = ap.parse_args(argv)
    return bench_peers.rows_main(args, lambda: [r for m in args.models.split(",") for r in run(m, args.targets.split(","))], markdown)


if __name__ == "__main__":
    sys.exit(main())
