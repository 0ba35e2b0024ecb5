"""Which operator versions onnxopt's rewrites know the semantics of.

The passes were reviewed up to :data:`REVIEWED_OPSET`; a later version is known when it only widened
the types of a known one (the computation is the same for every type the passes touch) or was
reviewed by hand. Anything else is left alone: :func:`hide_unknown` moves it into a private domain
while a pass runs (passes leave other domains' ops alone). Constant folding is not affected.
"""
from __future__ import annotations

import functools

import onnx

REVIEWED_OPSET = 23
MIN_REVIEWED_OPSET = 7

# Later versions whose change was read and found not to matter for any rewrite onnxopt does.
REVIEWED_LATER = {
    # round_mode only affects conversions to float8e8m0; a same-type Cast stays a no-op
    ("Cast", 24), ("Cast", 25), ("CastLike", 24), ("CastLike", 25),
}


def max_opset() -> int:
    """The newest default-domain opset the installed onnx package defines."""
    return int(onnx.defs.onnx_opset_version())


@functools.lru_cache(maxsize=None)
def known_semantics(op: str, domain: str, opset: int) -> bool:
    """True when a rewrite may treat ``op`` at the model's ``opset`` as it was reviewed."""
    if domain not in ("", "ai.onnx"):
        return True  # passes only rewrite default-domain ops; others are left alone anyway
    try:
        schema = onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return False
    version = schema.since_version
    if opset < MIN_REVIEWED_OPSET:
        # an old model: known when the operator did not change between its opset and the first reviewed one
        try:
            return version == onnx.defs.get_schema(op, MIN_REVIEWED_OPSET, "").since_version
        except onnx.defs.SchemaError:
            return False
    if version <= REVIEWED_OPSET or (op, version) in REVIEWED_LATER:
        return True
    try:
        before = onnx.defs.get_schema(op, version - 1, "")
    except onnx.defs.SchemaError:
        return False  # an operator born after the review
    if not known_semantics(op, "", before.since_version):
        return False
    if set(schema.attributes) != set(before.attributes) or (
            (len(schema.inputs), len(schema.outputs)) != (len(before.inputs), len(before.outputs))):
        return False
    old = {t.type_param_str: set(t.allowed_type_strs) for t in before.type_constraints}
    new = {t.type_param_str: set(t.allowed_type_strs) for t in schema.type_constraints}
    return all(k in new and v <= new[k] for k, v in old.items())


HIDDEN_PREFIX = "onnxopt.hidden."


def _walk(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _walk(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _walk(g)


def hide_unknown(model: onnx.ModelProto) -> list:
    """Move the nodes whose semantics are unknown at the model's opset into a private domain; returns their op types."""
    opset = next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    if not opset:
        return []
    hidden = []
    for node in _walk(model.graph):
        if node.domain in ("", "ai.onnx") and not known_semantics(node.op_type, "", opset):
            node.domain = HIDDEN_PREFIX + node.domain
            hidden.append(node.op_type)
    if hidden:
        model.opset_import.add(domain=HIDDEN_PREFIX, version=1)
    return hidden


def restore_hidden(model: onnx.ModelProto) -> None:
    """Undo :func:`hide_unknown` on a pass's output (in place)."""
    for node in _walk(model.graph):
        if node.domain.startswith(HIDDEN_PREFIX):
            node.domain = node.domain[len(HIDDEN_PREFIX):]
    keep = [i for i in model.opset_import if i.domain != HIDDEN_PREFIX]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
