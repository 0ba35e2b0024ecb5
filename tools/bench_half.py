"""A float16 export quantized with the defaults, against the float32 model it came from.

For each model: the float32 model (as ``bench_peers.prepare`` builds it, same fold split) and its
float16 export (every float weight, constant and graph input/output in float16, as ``model.half()``
before ``torch.onnx.export`` gives) are each quantized by ``qdq`` with no option but the target,
on the same calibration images (cast to float16 for the float16 model). Top-1 on the evaluation
images and agreement with the float32 model; ``fp16 -> int8`` is the row this bench is for: before
onnxopt quantized a float16 model as its float32 twin, that run failed on its own output.

    ONNXOPT_BENCH_CACHE=/tmp/H nice python tools/bench_half.py --models resnet20,effnet [--json out.json]

``--finetune``: the float16 export distilled from itself for one epoch (``finetune``, on the
calibration images) instead: the written model's size and initializer types against the float16
model's and its float32 twin's (what ``finetune`` wrote before it wrote back in float16), top-1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_peers  # noqa: E402
from onnxopt import manager  # noqa: E402
from onnxopt.registry import PassContext  # noqa: E402


def half_export(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as a float16 export: float32 initializers, Constant values, Casts to float32 and
    the graph's float inputs/outputs become float16 (shapes kept, inferred value_info dropped)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for node in g.node:
        for attr in node.attribute:
            if attr.type == attr.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    for v in (*g.input, *g.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del g.value_info[:]
    onnx.checker.check_model(out, full_check=True)
    return out


def _half_feeds(feeds: list) -> list:
    return [{k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in f.items()} for f in feeds]


def quantize(model, feeds, target: str):
    """(quantized model, seconds) with the defaults and ``target``."""
    t0 = time.perf_counter()
    q, _ = manager.apply(model, "qdq", {"qdq": {"target": target}},
                         context=PassContext(data=lambda: iter(feeds), progress=False), summarize_layers=False)
    return q, time.perf_counter() - t0


def run_model(name: str, targets: list) -> list:
    path, cf, ef, labels, kind, _ = bench_peers.prepare(name)
    if kind != "cls":
        raise SystemExit(f"{name}: a classifier is needed (top-1)")
    fp32 = onnx.load(str(path))
    fp16 = half_export(fp32)
    images = np.concatenate([f[next(iter(f))] for f in ef])
    ref = bench_peers.top1(fp32, images)
    rows = []

    def row(what, model, x, seconds=None):
        pred = bench_peers.top1(model, x)
        rows.append({"model": name, "what": what, "top1": float(np.mean(pred == labels)) * 100,
                     "agreement_with_fp32": float(np.mean(pred == ref)) * 100, "seconds": seconds})
        bench_peers.log(f"{name:10s} {what:24s} top-1 {rows[-1]['top1']:.2f} %  agreement {rows[-1]['agreement_with_fp32']:.2f} %")

    row("fp32", fp32, images)
    row("fp16 export", fp16, images.astype(np.float16))
    for target in targets:
        q32, s32 = quantize(fp32, cf, target)
        row(f"fp32 -> int8 ({target})", q32, images, round(s32, 1))
        q16, s16 = quantize(fp16, _half_feeds(cf), target)
        row(f"fp16 -> int8 ({target})", q16, images.astype(np.float16), round(s16, 1))
    return rows


def finetune_row(name: str) -> dict:
    """``--finetune``: the float16 export distilled from itself for one epoch on the calibration images."""
    import tempfile

    from onnxopt.data import DataSpec, open_data
    from onnxopt.quant.upcast import float32_twin
    from onnxopt.torch.train import FinetuneConfig, finetune

    path, cf, ef, labels, kind, _ = bench_peers.prepare(name)
    fp16 = half_export(onnx.load(str(path)))
    x = _half_feeds(cf)
    images = np.concatenate([f[next(iter(f))] for f in ef]).astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        key = next(iter(x[0]))
        np.savez(Path(tmp) / "train.npz", **{key: np.concatenate([f[key] for f in x])})
        res = finetune(fp16, open_data(DataSpec(str(Path(tmp) / "train.npz"), batch_size=32), fp16), teacher=fp16,
                       config=FinetuneConfig(epochs=1, lr=1e-4, batch_size=32, progress=False, log=bench_peers.log))
    top1 = lambda m: float(np.mean(bench_peers.top1(m, images) == labels)) * 100   # noqa: E731
    return {"model": name, "fp16_mb": fp16.ByteSize() / 1e6, "twin_mb": float32_twin(fp16)[0].ByteSize() / 1e6,
            "written_mb": res.model.ByteSize() / 1e6,
            "written_types": sorted({TensorProto.DataType.Name(t.data_type) for t in res.model.graph.initializer}),
            "fp16_top1": top1(fp16), "written_top1": top1(res.model), "parity": res.parity}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,effnet")
    ap.add_argument("--targets", default="ort,tensorrt")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--finetune", action="store_true", help="finetune's write-back of a float16 model instead")
    args = ap.parse_args(argv)
    if args.finetune:
        rows = [finetune_row(name) for name in args.models.split(",")]
        print("| model | float16 model | its float32 twin | written | written initializers | top-1 float16 / written | ORT vs torch |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['fp16_mb']:.3f} MB | {r['twin_mb']:.3f} MB | {r['written_mb']:.3f} MB | "
                  f"{', '.join(r['written_types'])} | {r['fp16_top1']:.2f} / {r['written_top1']:.2f} % | {r['parity'].get('max_abs', 0):.3g} |")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args.targets.split(","))
    print("| model | what | top-1 % | agreement with fp32 % | qdq seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['what']} | {r['top1']:.2f} | {r['agreement_with_fp32']:.2f} | {r['seconds'] or ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
