"""What NNCF-style fast bias correction does to a model with *no* quantization.

    python tools/bench_fast_bias_float.py [--models resnet20,resnet56]

NNCF's ONNX fast bias correction (nncf 3.4, ``quantization/algorithms/fast_bias_correction``)
shifts each biased layer's bias by its float output mean minus the layer's response to a constant
input filled with its float input's per-channel means. Here the same shift is computed with the
layer's own float weights and applied to the float model, so that whatever it changes is not
quantization error: the term ``E[W*x] - W*E[x]`` (the mean response to real inputs against the
response to a spatially constant input), nonzero wherever the input's mean varies over positions
(zero-padded borders). Same models and splits as ``tools/bench_peers.py`` (CIFAR ResNets after
``cleanup,bnfuse``: 204 calibration / 813 held-out images); reports held-out top-1, agreement and
KL against fp32 and the images fixed / broken.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt import runtime, task_metric
from onnxopt.quant.recovery.bias import channel_means

sys.path.insert(0, str(Path(__file__).resolve().parent))


def constant_input_response(conv: onnx.NodeProto, inits: dict, mean: np.ndarray, shape: list, opsets) -> np.ndarray:
    """Per-channel mean output of ``conv`` alone on a constant input of the per-channel ``mean``."""
    x = np.broadcast_to(mean[None, :, None, None], (1,) + tuple(shape[1:])).astype(np.float32)
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    graph = helper.make_graph([helper.make_node("Conv", ["x", conv.input[1], conv.input[2]], ["y"], **attrs)], "one",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [inits[conv.input[1]], inits[conv.input[2]]])
    y = runtime.run(runtime.session(helper.make_model(graph, opset_imports=list(opsets))), {"x": x})["y"]
    return y.astype(np.float64).mean(axis=(0, 2, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet56")
    args = ap.parse_args()
    import bench_peers as BP

    for name in args.models.split(","):
        path, cf, ef, labels, _, _ = BP.prepare(name)
        model = onnx.load(str(path))
        inits = {t.name: t for t in model.graph.initializer}
        convs = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in inits]
        means = channel_means(model, [t for n in convs for t in (n.input[0], n.output[0])], lambda: iter(cf))
        shapes = runtime.intermediate_shapes(model, [n.input[0] for n in convs])
        corrected = onnx.ModelProto()
        corrected.CopyFrom(model)
        biases = {t.name: t for t in corrected.graph.initializer}
        for n in convs:
            shift = means[n.output[0]] - constant_input_response(n, inits, means[n.input[0]], shapes[n.input[0]], model.opset_import)
            b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
            biases[n.input[2]].CopyFrom(numpy_helper.from_array((b + shift).astype(np.float32), n.input[2]))
        out = BP.CACHE / f"{name}.float_fast_bias.onnx"
        onnx.save(corrected, out)
        ref, got = BP.outputs(path, ef), BP.outputs(out, ef)
        pr, pg = (np.array([int(np.argmax(o)) for o in outs]) for outs in (ref, got))
        kl = task_metric.measure([np.concatenate(ref)], [np.concatenate(got)]).outputs[0].kl
        print(json.dumps({"model": name, "layers": len(convs), "top1_fp32": round(100 * float(np.mean(pr == labels)), 2),
                          "top1_corrected": round(100 * float(np.mean(pg == labels)), 2),
                          "agreement": round(100 * float(np.mean(pr == pg)), 2), "kl": round(kl, 5),
                          "fixed_vs_fp32": int(np.sum((pg == labels) & (pr != labels))),
                          "broke_vs_fp32": int(np.sum((pg != labels) & (pr == labels)))}))


if __name__ == "__main__":
    main()
