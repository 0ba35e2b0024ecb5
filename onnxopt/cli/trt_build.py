"""``onnxopt trt-build MODEL -o model.engine``: build a TensorRT engine (needs tensorrt and a GPU)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import OnnxoptError, require
from . import cli


def build_engine(model_path: str, output: str, *, fp16: bool = False, int8: bool = False, workspace_mb: int = 2048,
                 calib_table: str | None = None) -> Path:
    """Parse ``model_path`` with TensorRT's ONNX parser and serialize an engine to ``output``; a QDQ
    model needs no ``int8`` (explicit quantization), implicit quantization reads ``calib_table``."""
    trt = require("tensorrt", "onnxopt trt-build", "pip install tensorrt (needs an NVIDIA GPU and driver)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(model_path, "rb") as fh:
        ok = parser.parse(fh.read())
    if not ok:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OnnxoptError(f"TensorRT cannot parse '{model_path}': {errors[:800]}",
                           "run `onnxopt check MODEL --target tensorrt` to find the rule it breaks")
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
        if calib_table:
            config.int8_calibrator = _TableCalibrator(trt, calib_table)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise OnnxoptError("TensorRT failed to build the engine (see the TensorRT log above).", "try without --int8/--fp16 to isolate the layer")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(engine))
    return out


def _TableCalibrator(trt, table_path):
    """An IInt8 calibrator that only replays a calibration table (no data)."""
    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.cache = Path(table_path).read_bytes()

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return self.cache

        def write_calibration_cache(self, cache):
            pass

    return Calibrator()


@cli.command("trt-build", epilog="""\b
Examples:
  onnxopt trt-build model.int8.onnx -o model.engine          # explicit quantization (QDQ model)
  onnxopt trt-build model.onnx -o model.engine --fp16
  onnxopt trt-build model.onnx -o model.engine --int8 --calib-table calib.table
""")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the serialized engine.")
@click.option("--fp16", is_flag=True, help="Allow fp16 kernels.")
@click.option("--int8", is_flag=True, help="Allow int8 kernels (implicit quantization; a QDQ model needs no flag).")
@click.option("--calib-table", type=click.Path(exists=True, dir_okay=False), help="TensorRT calibration table for --int8 without Q/DQ.")
@click.option("--workspace-mb", type=int, default=2048, show_default=True, help="Builder workspace limit.")
def trt_build_cmd(model, output, fp16, int8, calib_table, workspace_mb):
    """Build a TensorRT engine from MODEL (requires the tensorrt package and an NVIDIA GPU)."""
    out = build_engine(model, output, fp16=fp16, int8=int8, workspace_mb=workspace_mb, calib_table=calib_table)
    click.echo(f"wrote {out}")
