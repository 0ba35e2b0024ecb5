"""TensorRT INT8 calibration tables (the text cache TensorRT's IInt8 calibrators read and write).

Format, as TensorRT writes it from ``writeCalibrationCache``::

    TRT-8601-EntropyCalibration2
    input: 3c010a14
    conv1_out: 3d8f5c29

The first line names the TensorRT version and the calibration algorithm (``EntropyCalibration2``,
``EntropyCalibration``, ``MinMaxCalibration``, ``LegacyCalibration``). Every other line is
``<tensor name>: <hex>`` where ``<hex>`` is the IEEE-754 float32 *scale* written as the hexadecimal
value of its 32 bits (i.e. the big-endian bytes), and the scale is the tensor's dynamic range
divided by 127: ``scale = amax / 127`` (TensorRT's implicit INT8 is symmetric, [-127, 127]).
TensorRT prints the 32-bit value without leading zeros, so a reader accepts 1..8 hex digits.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Mapping

from ..errors import DataError, OnnxoptError
from ..model_io import write_text_atomic

DEFAULT_TRT_VERSION = "TRT-8601-EntropyCalibration2"
INT8_MAX = 127.0


def write_trt_calibration_table(amax: Mapping[str, float], path, version: str = DEFAULT_TRT_VERSION) -> Path:
    """Write ``{tensor: amax}`` as a TensorRT calibration table at ``path`` (atomically)."""
    if not version.startswith("TRT-") or "\n" in version:
        raise OnnxoptError(f"'{version}' is not a TensorRT calibration table header.", "use something like TRT-8601-EntropyCalibration2")
    lines = [version]
    for name, value in amax.items():
        if "\n" in name:
            raise OnnxoptError(f"tensor name {name!r} holds a newline and cannot go in a TensorRT calibration table.", "rename the tensor")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise OnnxoptError(f"tensor '{name}' has an invalid dynamic range {value}.", "ranges must be finite and non-negative")
        lines.append(f"{name}: {struct.pack('>f', value / INT8_MAX).hex()}")
    return write_text_atomic(path, "\n".join(lines) + "\n")


def read_trt_calibration_table(path) -> dict:
    """``{tensor: amax}`` from a TensorRT calibration table (amax = scale * 127)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"TensorRT calibration table '{p}' does not exist.", "check the path")
    lines = p.read_text(errors="replace").splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise DataError(f"'{p}' is not a TensorRT calibration table (its first line should look like TRT-8601-EntropyCalibration2).",
                        "give a cache written by TensorRT or by onnxopt")
    out = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        value = value.strip()
        if not sep or not name or not value or len(value) > 8 or any(c not in "0123456789abcdefABCDEF" for c in value):
            raise DataError(f"line {number} of '{p}' is not '<tensor>: <hex scale>': {line[:120]!r}", "the file is damaged; regenerate it")
        out[name] = struct.unpack(">f", bytes.fromhex(value.zfill(8)))[0] * INT8_MAX
    return out
