"""Loading and saving models safely: loading validates up front (parse, IR/opset, external data) so
every later failure is about the pass, not the file; saving is atomic and never writes over the input."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Union

import onnx
from onnx import ModelProto
from onnx.external_data_helper import uses_external_data

from .errors import ModelLoadError, OnnxoptError
from .opsets import max_opset

# Default-domain opsets read: 7 to the installed onnx's newest (unreviewed operators: onnxopt.opsets).
MIN_OPSET = 7
MAX_OPSET = max_opset()
TWO_GB = 2**31
MAX_PROTO_BYTES = TWO_GB - 2**20  # keep a margin under protobuf's hard limit

ModelLike = Union[str, os.PathLike, ModelProto]


def opset_of(model: ModelProto, domain: str = "") -> int:
    """The model's opset version for ``domain`` ('' and 'ai.onnx' are the default domain)."""
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(imp.version)
    return 0


def _check_external_locations(model: ModelProto, base_dir: Path) -> None:
    """Refuse external data that escapes the model's folder or is missing, before reading any of it."""
    base = base_dir.resolve()
    for tensor in all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location):
            raise ModelLoadError(
                f"tensor '{tensor.name}' stores its data at an absolute or empty location '{location}'.",
                "external data must sit next to the model, referenced by a relative path")
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise ModelLoadError(
                f"tensor '{tensor.name}' points its external data at '{location}', which escapes the model's folder {base}.",
                "onnxopt refuses external data outside the model's folder; move the data file next to the model")
        if not target.is_file():
            raise ModelLoadError(
                f"external data file '{location}' for tensor '{tensor.name}' is missing (looked in {base}).",
                "copy the .data file that came with the model next to it")
        length = int(info.get("length", "-1") or -1)
        offset = int(info.get("offset", "0") or 0)
        if length >= 0 and offset + length > target.stat().st_size:
            raise ModelLoadError(
                f"external data file '{location}' is shorter than tensor '{tensor.name}' needs (truncated?).",
                "re-export or re-copy the model together with its data file")


def all_tensors(model: ModelProto) -> Iterable[onnx.TensorProto]:
    """Every TensorProto in the model: initializers, Constant attributes, subgraphs included."""
    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
            for sub in subgraphs(node):
                yield from walk(sub)

    yield from walk(model.graph)


def subgraph_reads(node: onnx.NodeProto) -> set:
    """Names read inside ``node``'s subgraphs (If/Loop/Scan bodies, nested ones included): the
    outer-scope tensors the node depends on without listing them as inputs."""
    names: set = set()

    def walk(graph: onnx.GraphProto):
        for inner in graph.node:
            names.update(i for i in inner.input if i)
            for sub in subgraphs(inner):
                walk(sub)

    for sub in subgraphs(node):
        walk(sub)
    return names


def subgraphs(node: onnx.NodeProto) -> list:
    """The bodies of ``node`` (If branches, Loop/Scan bodies): its GRAPH and GRAPHS attributes."""
    """The graphs in ``node``'s attributes (If/Loop/Scan bodies), not the nested ones."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def load_model(source: ModelLike, *, check: bool = True) -> ModelProto:
    """Load and validate a model from a path (or validate a ModelProto and return a copy); external
    data is loaded after its locations were checked. Raises :class:`ModelLoadError`."""
    if isinstance(source, ModelProto):
        model = ModelProto()
        model.CopyFrom(source)
        if check:
            validate_model(model, "the given model")
        return model

    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file '{path}' does not exist.", "check the path")
    if path.is_dir():
        raise ModelLoadError(f"'{path}' is a folder, not an ONNX model file.", "pass the .onnx file itself")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError / RuntimeWarning subclasses
        raise ModelLoadError(
            f"'{path}' is not a readable ONNX model ({type(exc).__name__}: {str(exc).strip() or 'parse error'}).",
            "the file may be truncated or not an ONNX protobuf; re-export it") from None
    if not model.graph.node and not model.graph.output and not model.opset_import:
        raise ModelLoadError(f"'{path}' parsed as an empty protobuf: it is not an ONNX model.",
                             "pass an .onnx file exported from your framework")
    _check_external_locations(model, path.parent)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelLoadError(f"could not load the external data of '{path}': {exc}", "check the .data file next to the model") from None
    if check:
        validate_model(model, str(path))
    return model


def validate_model(model: ModelProto, what: str = "model") -> None:
    """IR/opset range and onnx.checker; raise ModelLoadError with the checker's words."""
    opset = opset_of(model)
    if opset == 0 and _uses_default_domain(model.graph):
        raise ModelLoadError(f"{what} declares no default-domain opset.", "re-export it with an opset_import for the ai.onnx domain")
    # a model made only of other domains' ops (ai.onnx.ml...) needs no default-domain opset
    if opset and (opset < MIN_OPSET or opset > MAX_OPSET):
        raise ModelLoadError(f"{what} uses opset {opset}; onnxopt supports opsets {MIN_OPSET}..{MAX_OPSET}.",
                             "convert it with onnx.version_converter.convert_version(model, 17)")
    if model.ir_version < 3:
        raise ModelLoadError(f"{what} has IR version {model.ir_version}, older than onnxopt reads (3).", "re-export the model with a recent exporter")
    try:
        check_model(model)
    except onnx.checker.ValidationError as exc:
        # one line: the checker's message often continues on the next lines (which node, which op)
        first = " ".join(str(exc).split()) or "validation failed"
        first = first if len(first) <= 300 else first[:297] + "..."
        raise ModelLoadError(f"{what} is not a valid ONNX graph: {first}", "fix the exporter output, or run onnx.checker to see every problem") from None


def _uses_default_domain(graph: onnx.GraphProto) -> bool:
    return any(node.domain in ("", "ai.onnx") or any(_uses_default_domain(g) for g in subgraphs(node))
               for node in graph.node)


def check_model(model: ModelProto, full: bool = False) -> None:
    """onnx.checker on a model of any size (large models are checked through a temp file)."""
    if model.ByteSize() < MAX_PROTO_BYTES:
        onnx.checker.check_model(model, full_check=full)
    else:  # pragma: no cover - needs a >2 GB model
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "m.onnx")
            onnx.save_model(model, p, save_as_external_data=True, location="m.onnx.data")
            # save_model moved the weights out of ``model``: restore them before the folder goes
            _restore_external_data(model, tmp)
            onnx.checker.check_model(p, full_check=full)


def _restore_external_data(model: ModelProto, base_dir) -> None:
    """Read back the tensor bytes that ``onnx.save_model(save_as_external_data=True)`` moved out
    of ``model`` (it edits the proto in place), leaving the proto as it was (same fingerprint)."""
    onnx.load_external_data_for_model(model, str(base_dir))
    for t in all_tensors(model):
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.DEFAULT:
            t.ClearField("data_location")


def refuse_overwriting_inputs(path: Union[str, os.PathLike], inputs: Iterable[ModelLike]) -> None:
    """Raise when ``path`` is one of the ``inputs`` model files. save_model checks it; commands
    also call it before their work, so a long run does not end in this error."""
    out = Path(path)
    for src in inputs:
        if isinstance(src, (str, os.PathLike)) and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise OnnxoptError(f"the output '{out}' is the input model; onnxopt never overwrites its input.", "choose another -o path")


def follow_umask(path: Union[str, os.PathLike]) -> None:
    """Give a file made by ``tempfile.mkstemp`` (always 0600) the mode any file the user writes
    gets (0666 less the umask), so a TensorRT/TIDL container running as another user can read it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_text_atomic(path: Union[str, os.PathLike], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (reports, caches, tables):
    readers never see half a file, and the file gets the mode of any file the user writes."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        follow_umask(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def save_model(model: ModelProto, path: Union[str, os.PathLike], *, inputs: Iterable[ModelLike] = (), external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically, refusing to write over one of ``inputs`` (the models it came
    from). Models over 2 GB (or with ``external_data``) keep their tensors in ``<name>.data`` beside it."""
    out = Path(path)
    refuse_overwriting_inputs(out, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    use_external = model.ByteSize() >= MAX_PROTO_BYTES if external_data is None else external_data
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
    os.close(fd)
    tmp_data = None
    try:
        if use_external:
            data_name = out.name + ".data"
            tmp_data_name = Path(tmp).name + ".data"
            tmp_data = out.parent / tmp_data_name
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data_name, size_threshold=1024)
            # save_model moved the bytes out of the caller's proto: read them back (no copy of a >2 GB model)
            _restore_external_data(model, out.parent)
            # the model refers to its data by name: rewrite the location before the final rename
            saved = onnx.load_model(tmp, load_external_data=False)
            for t in all_tensors(saved):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            onnx.save_model(saved, tmp)
            follow_umask(tmp_data)
            os.replace(tmp_data, out.parent / data_name)
            tmp_data = None
        else:
            onnx.save_model(model, tmp)
        follow_umask(tmp)
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, tmp_data):
            if leftover is not None and os.path.exists(leftover):
                os.unlink(leftover)
    return out


def fingerprint(model: ModelProto) -> str:
    """A stable hash of the model's graph (weights included), for caches keyed on the model."""
    h = hashlib.sha256()
    h.update(model.graph.SerializeToString(deterministic=True))
    for imp in model.opset_import:
        h.update(f"{imp.domain}:{imp.version}".encode())
    return h.hexdigest()[:16]


def record_metadata(model: ModelProto, key: str, value) -> None:
    """Set ``metadata_props[key]`` (JSON-encoded when not a string), keeping the model's other metadata."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = text
            return
    model.metadata_props.add(key=key, value=text)


# Clip bounds a pass removed (lite's ReLU6 -> ReLU), for the quantizer to put back: a Q/DQ range ending
# at 6 clips where the ReLU6 did. Passes that rescale such a tensor (equalize) drop its entry.
ACTIVATION_BOUNDS_KEY = "onnxopt.activation_bounds"


def activation_bounds(model: ModelProto) -> dict:
    """``{tensor: (lo, hi)}`` recorded under :data:`ACTIVATION_BOUNDS_KEY` ({} when absent or unreadable)."""
    for prop in model.metadata_props:
        if prop.key == ACTIVATION_BOUNDS_KEY:
            try:
                return {str(t): (float(b[0]), float(b[1])) for t, b in json.loads(prop.value).items()}
            except (ValueError, TypeError, IndexError, AttributeError):
                return {}
    return {}


def record_activation_bounds(model: ModelProto, bounds: dict) -> None:
    """Add ``{tensor: (lo, hi)}`` to the model's recorded activation bounds."""
    merged = {**activation_bounds(model), **{t: (float(lo), float(hi)) for t, (lo, hi) in bounds.items()}}
    record_metadata(model, ACTIVATION_BOUNDS_KEY, {t: list(b) for t, b in merged.items()})


def drop_activation_bounds(model: ModelProto, tensors: Iterable[str]) -> list:
    """Forget the recorded bounds of ``tensors`` (their values changed); returns the names dropped."""
    bounds = activation_bounds(model)
    dropped = sorted(t for t in set(tensors) if t in bounds)
    if dropped:
        record_metadata(model, ACTIVATION_BOUNDS_KEY, {t: list(b) for t, b in bounds.items() if t not in dropped})
    return dropped
