"""The "wild zoo": small models shaped like real exports, built in the test run (nothing downloaded).

Each entry is what a user brings from the wild (see shared/research/real-models-in-the-wild.md):
torch exports with dynamic batch/height/width or sequence axes from both exporters (and the dynamo
exporter with ``optimize=False``), GRU/LSTM text models with int64 tokens through an Embedding,
a transformer encoder (LayerNormalization, attention), models quantized by onnxruntime's
``quantize_static`` and ``quantize_dynamic``, external data, a graph output with a shape-less
``value_info`` entry, models converted up to opset 24+ by ``onnx.version_converter``.

``build_zoo(folder)`` writes every model (``NAME.onnx``, external data beside it) and returns
``{name: path}``; models whose builder needs something missing (torch, onnxscript) are left out
and listed in ``build_zoo.missing``. Dims are small so the whole zoo builds in seconds.

Also a command: ``python tests/wild_zoo.py OUT_DIR`` (tools/bench_wild.py uses it).
"""
from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

IMAGE = (1, 3, 32, 32)
VOCAB, SEQ = 40, 8


def _torch():
    import torch

    torch.manual_seed(0)
    return torch


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings; the zoo is built silently."""
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------ torch modules
def _cnn_module():
    torch = _torch()
    nn = torch.nn

    class SmallCNN(nn.Module):
        """Conv-BN-ReLU stem, a depthwise block with ReLU6 and a residual Add, an SE gate with
        HardSigmoid, SiLU, global pooling, a classifier."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.bn2 = nn.BatchNorm2d(8)
            self.pw = nn.Conv2d(8, 8, 1)
            self.bn3 = nn.BatchNorm2d(8)
            self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
            self.head = nn.Conv2d(8, 16, 1)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            y = torch.relu(self.bn1(self.stem(x)))
            z = nn.functional.relu6(self.bn2(self.dw(y)))
            z = self.bn3(self.pw(z))
            y = y + z
            g = nn.functional.hardsigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
            y = nn.functional.silu(self.head(y * g))
            return self.fc(y.mean((2, 3)))

    m = SmallCNN().eval()
    for mod in m.modules():  # non-trivial BN statistics, so folding them is a real computation
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


def _text_module(kind: str):
    torch = _torch()
    nn = torch.nn

    class TextRNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 16)
            self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(16, 12, batch_first=True)
            self.fc = nn.Linear(12, 3)

        def forward(self, tokens):
            out, _ = self.rnn(self.emb(tokens))
            return self.fc(out[:, -1])

    return TextRNN().eval()


def _transformer_module():
    torch = _torch()
    nn = torch.nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 16)
            self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
            self.norm = nn.LayerNorm(16)
            self.fc = nn.Linear(16, 4)

        def forward(self, tokens):
            return self.fc(self.norm(self.layer(self.emb(tokens))).mean(1))

    m = Encoder().eval()
    m.layer.self_attn.batch_first = True
    return m


# ------------------------------------------------------------------------------ exports
def _export_ts(module, args, path, names, dynamic_axes, opset=17, preserve_bn=False):
    torch = _torch()
    kwargs = {"training": torch.onnx.TrainingMode.PRESERVE} if preserve_bn else {}
    with _quiet():
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=names[0], output_names=names[1],
                          dynamic_axes=dynamic_axes, opset_version=opset, **kwargs)


def _export_dynamo(module, args, path, names, dynamic_shapes, optimize=True):
    torch = _torch()
    with _quiet():
        program = torch.onnx.export(module, args, dynamo=True, input_names=names[0], output_names=names[1],
                                    dynamic_shapes=dynamic_shapes, optimize=optimize, external_data=False)
        program.save(str(path))


def _image_dims():
    torch = _torch()
    b = torch.export.Dim("batch", max=64)
    h = torch.export.Dim("height", min=8, max=1024)
    w = torch.export.Dim("width", min=8, max=1024)
    return {"x": {0: b, 2: 2 * h, 3: 2 * w}}


def _seq_dims():
    torch = _torch()
    return {"tokens": {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", min=2, max=512)}}


def cnn_torchscript(path):
    torch = _torch()
    _export_ts(_cnn_module(), (torch.randn(*IMAGE),), path, (["x"], ["logits"]),
               {"x": {0: "batch", 2: "height", 3: "width"}}, preserve_bn=True)


def cnn_fp16(path):
    """The CNN exported in half precision (``model.half()``, BN kept): float16 weights, inputs and outputs."""
    torch = _torch()
    _export_ts(_cnn_module().half(), (torch.randn(*IMAGE).half(),), path, (["x"], ["logits"]),
               {"x": {0: "batch", 2: "height", 3: "width"}}, preserve_bn=True)


def _selecting_module():
    """The CNN's classifier plus post-processing in the graph: the scores of a second head above
    0.5, picked by a boolean mask (exported as NonZero + GatherND: an output whose length depends
    on the data, as in detectors exported with their box selection)."""
    torch = _torch()

    class Select(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _cnn_module()
            self.head = torch.nn.Conv2d(3, 6, 3, padding=1, stride=4)

        def forward(self, x):
            scores = torch.sigmoid(self.head(x)).flatten(1)
            return self.body(x), scores[scores > 0.5]

    return Select().eval()


def cnn_select(path):
    torch = _torch()
    _export_ts(_selecting_module(), (torch.randn(*IMAGE),), path, (["x"], ["logits", "picked"]),
               {"x": {0: "batch", 2: "height", 3: "width"}}, preserve_bn=True)


def cnn_embedding(path):
    """The CNN as a retrieval / re-identification embedding: its features L2-normalized by
    F.normalize (exported as ReduceL2 -> Clip -> Expand -> Div), output named ``output``."""
    torch = _torch()

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _cnn_module()

        def forward(self, x):
            return torch.nn.functional.normalize(self.body(x), dim=1)

    _export_ts(Embed().eval(), (torch.randn(*IMAGE),), path, (["x"], ["output"]),
               {"x": {0: "batch", 2: "height", 3: "width"}}, preserve_bn=True)


def cnn_keep_inputs(path):
    """The CNN exported with ``keep_initializers_as_inputs=True``: every weight is also a graph
    input, overridable at run time (IR 8), as older deployment recipes export."""
    torch = _torch()
    with _quiet():
        torch.onnx.export(_cnn_module(), (torch.randn(*IMAGE),), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}}, opset_version=17, dynamo=False,
                          keep_initializers_as_inputs=True, training=torch.onnx.TrainingMode.PRESERVE)


def cnn_ir3(path):
    """The CNN as the ONNX model zoo's old exports are: opset 9, IR 3, every initializer listed as
    a graph input (a constant at IR 3, not an input to feed)."""
    torch = _torch()
    _export_ts(_cnn_module(), (torch.randn(*IMAGE),), path, (["x"], ["logits"]),
               {"x": {0: "batch", 2: "height", 3: "width"}}, opset=9, preserve_bn=True)
    m = onnx.load(str(path))
    listed = {vi.name for vi in m.graph.input}
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                         for t in m.graph.initializer if t.name not in listed)
    m.ir_version = 3
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def cnn_dynamo(path):
    torch = _torch()
    _export_dynamo(_cnn_module(), (torch.randn(*IMAGE),), path, (["x"], ["logits"]), _image_dims())


def cnn_dynamo_noopt(path):
    torch = _torch()
    _export_dynamo(_cnn_module(), (torch.randn(*IMAGE),), path, (["x"], ["logits"]), _image_dims(), optimize=False)


def gru_text(path):
    torch = _torch()
    _export_ts(_text_module("gru"), (torch.randint(0, VOCAB, (1, SEQ)),), path, (["tokens"], ["scores"]),
               {"tokens": {0: "batch", 1: "seq"}})


def lstm_text(path):
    torch = _torch()
    _export_ts(_text_module("lstm"), (torch.randint(0, VOCAB, (1, SEQ)),), path, (["tokens"], ["scores"]),
               {"tokens": {0: "batch", 1: "seq"}})


def transformer(path):
    torch = _torch()
    _export_ts(_transformer_module(), (torch.randint(0, VOCAB, (1, SEQ)),), path, (["tokens"], ["scores"]),
               {"tokens": {0: "batch", 1: "seq"}})


def transformer_dynamo(path):
    torch = _torch()
    _export_dynamo(_transformer_module(), (torch.randint(0, VOCAB, (2, SEQ)),), path, (["tokens"], ["scores"]), _seq_dims())


def _from(folder: Path, name: str) -> onnx.ModelProto:
    return onnx.load(str(folder / f"{name}.onnx"))


def cnn_external_data(path):
    """The TorchScript CNN saved with its weights in ``NAME.onnx.data`` (the dynamo default)."""
    m = _from(Path(path).parent, "cnn_torchscript")
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(path).name + ".data", size_threshold=0)


def cnn_shapeless_output_info(path):
    """The graph output also listed in value_info without a shape (seen in real exports)."""
    m = _from(Path(path).parent, "cnn_torchscript")
    m.graph.value_info.append(helper.make_empty_tensor_value_info(m.graph.output[0].name))
    m.graph.value_info[-1].type.tensor_type.elem_type = m.graph.output[0].type.tensor_type.elem_type
    onnx.save(m, str(path))


def _converted(path, source: str, opset: int):
    from onnx import version_converter

    m = version_converter.convert_version(_from(Path(path).parent, source), opset)
    onnx.save(m, str(path))


def cnn_opset24(path):
    _converted(path, "cnn_torchscript", 24)


def gru_opset25(path):
    _converted(path, "gru_text", 25)


class _Reader:
    """onnxruntime's CalibrationDataReader over a few random images."""

    def __init__(self, n=4):
        rng = np.random.default_rng(0)
        self._feeds = iter([{"x": rng.standard_normal(IMAGE).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self._feeds, None)


def cnn_ort_static_qdq(path):
    """The CNN quantized by onnxruntime's quantize_static (QDQ, per-channel): an already-quantized model."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    src = Path(path).parent / "cnn_torchscript.onnx"
    with _quiet():
        quantize_static(str(src), str(path), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True)


def transformer_ort_dynamic(path):
    """The transformer quantized by onnxruntime's quantize_dynamic (MatMulInteger, DynamicQuantizeLinear)."""
    from onnxruntime.quantization import quantize_dynamic

    src = Path(path).parent / "transformer.onnx"
    with _quiet():
        quantize_dynamic(str(src), str(path))


# name -> builder, in build order (later ones read earlier ones' files)
BUILDERS = {
    "cnn_torchscript": cnn_torchscript,
    "cnn_fp16": cnn_fp16,
    "cnn_select": cnn_select,
    "cnn_embedding": cnn_embedding,
    "cnn_keep_inputs": cnn_keep_inputs,
    "cnn_ir3": cnn_ir3,
    "cnn_dynamo": cnn_dynamo,
    "cnn_dynamo_noopt": cnn_dynamo_noopt,
    "gru_text": gru_text,
    "lstm_text": lstm_text,
    "transformer": transformer,
    "transformer_dynamo": transformer_dynamo,
    "cnn_external_data": cnn_external_data,
    "cnn_shapeless_output_info": cnn_shapeless_output_info,
    "cnn_opset24": cnn_opset24,
    "gru_opset25": gru_opset25,
    "cnn_ort_static_qdq": cnn_ort_static_qdq,
    "transformer_ort_dynamic": transformer_ort_dynamic,
}
# what each model exercises, for reports
QUANTIZED = {"cnn_ort_static_qdq", "transformer_ort_dynamic"}


def build_zoo(folder) -> dict:
    """Write every buildable zoo model into ``folder``; {name: path}. Missing ones are listed in
    ``build_zoo.missing`` ({name: reason})."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    built, missing = {}, {}
    for name, fn in BUILDERS.items():
        path = folder / f"{name}.onnx"
        try:
            fn(path)
        except ImportError as exc:
            missing[name] = f"needs {exc.name or exc}"
            continue
        except FileNotFoundError as exc:  # built from a model that is missing
            missing[name] = f"its source is missing ({exc})"
            continue
        built[name] = path
    build_zoo.missing = missing
    return built


build_zoo.missing = {}


if __name__ == "__main__":
    out = build_zoo(sys.argv[1] if len(sys.argv) > 1 else "wild_zoo")
    for name, p in out.items():
        print(name, p)
    for name, why in build_zoo.missing.items():
        print(f"missing {name}: {why}")
