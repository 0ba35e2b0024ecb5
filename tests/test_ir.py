"""The graph-editing layer (onnxopt.ir): the editor's indexed queries agree with the one-shot
helpers, removed nodes drop out of consumer counts, the protobuf indexes, and shape inference's
one failure policy."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxopt.ir.graph import GraphEditor, export_graph, import_graph, is_graph_output, sole_consumer
from onnxopt.ir.proto import consumers, infer_shapes, producers, tensor_types


def _model(ir_version: int = 8):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])
    outs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 3]) for n in ("y", "b")]
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"), helper.make_node("Neg", ["a"], ["b"], name="neg"),
             helper.make_node("Mul", ["b", "b"], ["m"], name="mul"), helper.make_node("Add", ["m", "w"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [x], outs, [numpy_helper.from_array(np.ones((1, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = ir_version
    return model


def test_editor_queries_agree_with_the_graph_helpers():
    graph = import_graph(_model())
    ed = GraphEditor(graph)
    for t in graph.tensors().values():
        assert ed.is_output(t) == is_graph_output(graph, t), t.name
        assert ed.sole_consumer(t) is sole_consumer(graph, t), t.name
    # a tensor that is not the output object but carries its name counts as the output, as in is_graph_output
    twin = gs.Variable("y")
    assert ed.is_output(twin) and is_graph_output(graph, twin)


def test_editor_kill_drops_removed_nodes_from_consumer_counts():
    graph = import_graph(_model())
    ed = GraphEditor(graph)
    t = graph.tensors()
    ed.replace_output(t["y"], "Identity", [t["w"]])  # the Add goes, then Mul (b stays: a graph output)
    assert {n.name for n in ed.dead.values()} == {"add", "mul"}
    assert ed.consumers(t["b"]) == [] and ed.sole_consumer(t["a"]).name == "neg"
    ed.compact()
    assert [n.op for n in graph.nodes] == ["Relu", "Neg", "Identity"]
    out = export_graph(graph, like=_model())
    assert [o.name for o in out.graph.output] == ["y", "b"]
    onnx.checker.check_model(out, full_check=True)


def test_proto_indexes():
    g = _model().graph
    assert {k: n.name for k, n in producers(g).items()} == {"a": "relu", "b": "neg", "m": "mul", "y": "add"}
    assert [n.name for n in consumers(g)["b"]] == ["mul"]  # Mul reads b twice: listed once
    assert [n.name for n in consumers(g)["w"]] == ["add"]


def test_shape_inference_failure_is_returned_not_raised(monkeypatch):
    model = _model()
    inferred, why = infer_shapes(model)
    assert why is None and {v.name for v in inferred.graph.value_info} >= {"a", "m"}
    assert tensor_types(model)["m"] == (onnx.TensorProto.FLOAT, [1, 3])

    def refuse(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] an op it does not know\nmore detail")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse)
    bad = _model()
    same, why = infer_shapes(bad)
    assert same is bad and why == "[ShapeInferenceError] an op it does not know"
    skipped = []
    assert tensor_types(bad, lambda where, reason: skipped.append((where, reason))) == {}
    assert skipped == [("shape inference", "failed ([ShapeInferenceError] an op it does not know); static-shape rules disabled this round")]


def test_export_lists_initializers_as_inputs_below_ir4_and_keeps_overridable_ones():
    old = _model(ir_version=3)
    old.graph.input.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [1, 3]))
    out = export_graph(import_graph(old), like=old)
    assert [i.name for i in out.graph.input] == ["x", "w"]
    onnx.checker.check_model(out, full_check=True)
    new = _model()
    new.graph.input.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [1, 3]))  # overridable at run time
    graph = import_graph(new)
    assert graph.overridable_inputs == {"w"}
    out = export_graph(graph, like=new)
    assert [i.name for i in out.graph.input] == ["x", "w"] and [t.name for t in out.graph.initializer] == ["w"]


def test_union_find_keeps_the_first_arguments_representative():
    from onnxopt.ir.unionfind import UnionFind

    uf = UnionFind()
    assert uf.union("b", "a") == "b"
    assert uf.union("c", "a") == "c"  # a's set (named b) joins c's: c names both
    assert {uf.find(x) for x in "abc"} == {"c"} and uf.find("d") == "d" and len(uf) == 4


def test_channel_slots_keep_the_smallest_slot_as_root():
    from onnxopt.passes.prune.channels import POISON, SlotSets

    s = SlotSets()
    a, b = s.new(3), s.new(3)
    s.union_arrays(b, a)
    assert s.roots(b).tolist() == a.tolist() and len(s.parent) == 7
    s.poison(b[:1])
    assert s.find(int(a[0])) == POISON and s.find(int(a[1])) == int(a[1])


def test_region_check_takes_in_an_input_made_by_a_constant_node():
    """A rewritten node whose input comes from a Constant node: the Constant joins the cut-out
    region (it used to change the node table while it was being walked and crash the pass)."""
    from onnx import TensorProto

    from onnxopt.rewrite.engine import RuleContext
    from onnxopt.rewrite.runner import RegionChecker

    value = helper.make_tensor("cv", TensorProto.FLOAT, [1, 4], np.arange(4, dtype=np.float32))
    nodes = [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    graph = gs.import_onnx(model)
    added = [n for n in graph.nodes if n.op == "Add"]
    result = RegionChecker(onnx.shape_inference.infer_shapes(model), model).check(graph, RuleContext(graph, 17, None), added, ["y"])
    assert result["max_abs"] == 0.0 and result["region_nodes"] == {"before": 2, "after": 2}
