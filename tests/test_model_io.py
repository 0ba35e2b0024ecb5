"""Model I/O: loading with validation and external-data checks, atomic saving, metadata."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures import models
from fixtures.testpasses import SCALE_OPTIONS, scale_outputs, temporary_pass
from helpers import assert_equivalent, make_model, rand
from onnxopt import apply, model_io
from onnxopt.errors import ModelLoadError, OnnxoptError


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ----------------------------------------------------------------------------------- loading
def test_load_path_with_external_data(tmp_path):
    model = models.big_weight_model()
    path = models.save(model, tmp_path / "m.onnx", external=True)
    assert (tmp_path / "m.onnx.data").stat().st_size == 4096 * 4
    loaded = model_io.load_model(path)
    np.testing.assert_array_equal(_weights(loaded)["w"], _weights(model)["w"])
    # the weights are in memory now: the model runs without its folder
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in loaded.graph.initializer)
    assert_equivalent(model, loaded)


@pytest.mark.parametrize("kind, words", [
    ("truncated", "not a readable ONNX model"),
    ("not_onnx", "not a readable ONNX model"),
    ("garbage", "not a readable ONNX model"),
    ("empty_file", "not an ONNX model"),
    ("invalid_graph", "not a valid ONNX graph"),
    ("opset_low", "opset 5"),
    ("opset_high", "opset 40"),
    ("missing_external", "is missing"),
    ("escaping_external", "escapes the model's folder"),
    ("absolute_external", "absolute"),
    ("short_external", "shorter than"),
])
def test_broken_files_raise_model_load_error(tmp_path, kind, words):
    path = models.broken(kind, tmp_path / "m")
    with pytest.raises(ModelLoadError) as err:
        model_io.load_model(path)
    assert words in str(err.value)
    assert err.value.hint  # every load error says how to fix it


def test_escaping_external_is_refused_before_reading(tmp_path, monkeypatch):
    path = models.broken("escaping_external", tmp_path / "m")
    monkeypatch.setattr(onnx, "load_external_data_for_model", lambda *a, **k: pytest.fail("external data was read"))
    with pytest.raises(ModelLoadError, match="escapes"):
        model_io.load_model(path)


def test_symlink_escaping_the_folder_is_refused(tmp_path):
    folder = tmp_path / "m"
    path = models.save(models.big_weight_model(), folder / "m.onnx", external=True)
    outside = tmp_path / "outside.data"
    (folder / "m.onnx.data").rename(outside)
    (folder / "m.onnx.data").symlink_to(outside)
    with pytest.raises(ModelLoadError, match="escapes"):
        model_io.load_model(path)


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        model_io.load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="folder"):
        model_io.load_model(tmp_path)


def test_load_proto_returns_a_validated_copy():
    model = models.tiny_cnn()
    copy = model_io.load_model(model)
    assert copy is not model and copy == model
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.opset_import[0].version = 99
    with pytest.raises(ModelLoadError, match="opset 99"):
        model_io.load_model(bad)


def test_no_default_opset_is_refused():
    model = models.tiny_cnn()
    model.opset_import[0].domain = "com.example"
    with pytest.raises(ModelLoadError, match="no default-domain opset"):
        model_io.load_model(model)


def test_opset_of_accepts_ai_onnx_spelling():
    model = models.tiny_cnn(opset=13)
    assert model_io.opset_of(model) == 13
    model.opset_import[0].domain = "ai.onnx"
    assert model_io.opset_of(model) == 13


# ------------------------------------------------------------------------------------ saving
def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_save_is_atomic_and_leaves_no_temp_file(tmp_path):
    model = models.tiny_cnn()
    out = model_io.save_model(model, tmp_path / "sub" / "out.onnx")
    assert out.exists() and _leftovers(out.parent) == []
    assert model_io.load_model(out) == model


def test_interrupted_save_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous content")

    def boom(*args, **kwargs):
        with open(args[1], "wb") as f:  # half-written temp file
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        model_io.save_model(models.tiny_cnn(), out)
    assert out.read_bytes() == b"previous content"
    assert _leftovers(tmp_path) == []


def test_save_never_overwrites_the_input(tmp_path):
    src = models.save(models.tiny_cnn(), tmp_path / "in.onnx")
    before = src.read_bytes()
    with pytest.raises(OnnxoptError, match="never overwrites its input"):
        model_io.save_model(models.tiny_cnn(noise=1.0), src, inputs=[src])
    # also through another spelling of the same path
    with pytest.raises(OnnxoptError):
        model_io.save_model(models.tiny_cnn(noise=1.0), tmp_path / "." / "in.onnx", inputs=[str(src)])
    assert src.read_bytes() == before


def test_external_data_round_trip_keeps_the_callers_model(tmp_path):
    model = models.big_weight_model()
    before = model.SerializeToString()
    out = model_io.save_model(model, tmp_path / "big.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    # the saved model references its data by the final name, not the temp name
    raw = onnx.load_model(str(out), load_external_data=False)
    locations = {e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}
    # regression: onnx.save_model(save_as_external_data=True) used to strip the caller's weights
    assert model.SerializeToString() == before
    loaded = model_io.load_model(out)
    np.testing.assert_array_equal(_weights(loaded)["w"], _weights(model)["w"])
    assert_equivalent(model, loaded)


def test_models_over_the_proto_limit_go_to_external_data(tmp_path, monkeypatch):
    """The >2 GB path, exercised by lowering the limit: automatic external data on save, and
    check_model through a temporary file -- both leave the in-memory model intact."""
    model = models.big_weight_model()
    before = model.SerializeToString()
    monkeypatch.setattr(model_io, "MAX_PROTO_BYTES", 1000)
    model_io.check_model(model, full=True)
    assert model.SerializeToString() == before
    out = model_io.save_model(model, tmp_path / "huge.onnx")
    assert (tmp_path / "huge.onnx.data").exists()
    assert model.SerializeToString() == before
    monkeypatch.undo()
    np.testing.assert_array_equal(_weights(model_io.load_model(out))["w"], _weights(model)["w"])


def test_fingerprint_is_stable_and_sensitive():
    a, b = models.tiny_cnn(), models.tiny_cnn()
    assert model_io.fingerprint(a) == model_io.fingerprint(b)
    assert model_io.fingerprint(a) != model_io.fingerprint(models.tiny_cnn(noise=0.1))


def test_record_metadata_replaces_and_keeps_others():
    model = models.tiny_cnn()
    model.metadata_props.add(key="author", value="me")
    model_io.record_metadata(model, "k", {"b": 1, "a": [2]})
    model_io.record_metadata(model, "k", "text")
    props = {p.key: p.value for p in model.metadata_props}
    assert props == {"author": "me", "k": "text"}


def test_metadata_kept_and_passes_recorded(tmp_path):
    model = models.tiny_cnn()
    model.metadata_props.add(key="author", value="unit test")
    model.doc_string = "keep me"
    src = models.save(model, tmp_path / "in.onnx")
    with temporary_pass("t_meta", scale_outputs, exact=True, options=SCALE_OPTIONS):
        out, _ = apply(src, "t_meta", options={"t_meta": {"count": "2"}})
        out2, _ = apply(out, "t_meta")
    path = model_io.save_model(out2, tmp_path / "out.onnx", inputs=[src])
    saved = model_io.load_model(path)
    props = {p.key: p.value for p in saved.metadata_props}
    assert props["author"] == "unit test"
    assert saved.doc_string == "keep me"
    history = json.loads(props["onnxopt.passes"])
    assert [h["pass"] for h in history] == ["t_meta", "t_meta"]
    assert history[0]["options"]["count"] == 2 and history[1]["options"]["count"] == 1
    assert "onnxopt.version" in props
    onnx.checker.check_model(saved, full_check=True)
    onnx.shape_inference.infer_shapes(saved, strict_mode=True)


def test_constant_node_weights_count_like_initializers():
    from onnxopt import stats

    w = rand(4, 3, 3, 3)
    conv_init = make_model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 3, 5, 5])], [("y", [1, 4, 3, 3])], [("w", w)])
    conv_const = make_model([helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
                             helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 3, 5, 5])], [("y", [1, 4, 3, 3])])
    assert stats.param_count(conv_init) == stats.param_count(conv_const) == w.size
    assert stats.total_macs(conv_init) == stats.total_macs(conv_const) == 4 * 3 * 3 * 27
    assert_equivalent(conv_init, conv_const)


# ------------------------------------------------- graph helpers (regressions of core fixes)
def _constant_model(as_output: bool):
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(rand(2, seed=4)))
    outputs = [("y", [2])] + ([("c", [2])] if as_output else [])
    # Mul(c, c) reads the constant twice: both reads must be rewired
    return make_model([c, helper.make_node("Mul", ["c", "c"], ["m"]), helper.make_node("Add", ["x", "m"], ["y"])],
                      [("x", [2])], outputs)


@pytest.mark.parametrize("as_output", [False, True])
def test_lift_constant(as_output):
    """Regression: lift_constant used slice assignment on gs's synchronized input lists (which
    raises), and rewired consumers before noticing a graph output (two producers of one name)."""
    from onnxopt.ir import graph as G

    model = _constant_model(as_output)
    g = G.import_graph(model)
    const = G.lift_constant(g, g.tensors()["c"])
    out = G.export_graph(g, model)
    if as_output:
        assert const is None and [n.op_type for n in out.graph.node] == ["Constant", "Mul", "Add"]
    else:
        assert const is not None and [n.op_type for n in out.graph.node] == ["Mul", "Add"]
        assert [i.name for i in out.graph.initializer] == ["c"]
    assert_equivalent(model, out)


def test_replace_tensor_rewires_every_read_and_keeps_output_names():
    from onnxopt.ir import graph as G

    model = make_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"]),
                        helper.make_node("Mul", ["b", "b"], ["y"])], [("x", [3])], [("y", [3]), ("b", [3])])
    g = G.import_graph(model)
    t = g.tensors()
    G.replace_tensor(g, t["b"], t["a"])  # drop the Identity
    out = G.export_graph(g, model)
    assert [n.op_type for n in out.graph.node] == ["Relu", "Mul"]
    assert [o.name for o in out.graph.output] == ["y", "b"]  # the public output name survives
    assert_equivalent(model, out)


def test_replace_tensor_refuses_to_rename_a_graph_input():
    from onnxopt.ir import graph as G

    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", [3])], [("y", [3])])
    g = G.import_graph(model)
    t = g.tensors()
    with pytest.raises(ValueError, match="cannot become graph input"):
        G.replace_tensor(g, t["y"], t["x"])
    assert [i.name for i in g.inputs] == ["x"] and [o.name for o in g.outputs] == ["y"]
