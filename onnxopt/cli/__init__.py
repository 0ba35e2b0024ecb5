"""The ``onnxopt`` command line: a thin layer over the Python API, one module per command (adding a
command means adding one file). User errors are one paragraph with a hint and a non-zero exit, no
traceback (``ONNXOPT_DEBUG=1`` shows it)."""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import warnings

import click

from ..version import __version__
from ..errors import InternalError, OnnxoptError

EPILOG = """\b
Examples:
  onnxopt passes                                   list passes and their options
  onnxopt info model.onnx --layers                 shapes, ops, params, MACs per layer
  onnxopt apply cleanup,bnfuse model.onnx -o out.onnx --report report.json
  onnxopt apply lite,bnfuse,qdq model.onnx -o model.int8.onnx --calib-data images/ --target tensorrt
  onnxopt compare model.onnx out.onnx --data val.npz
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}, epilog=EPILOG)
@click.version_option(__version__, prog_name="onnxopt")
def cli() -> None:
    """onnxopt -- optimize an exported ONNX model for TensorRT, TIDL and onnxruntime.

    Passes rewrite the ONNX graph directly and are chained in the order given: `cleanup`
    (dead code, constant folding), `bnfuse` (fold BatchNorm), `equalize` (cross-layer
    equalization before int8), `lite` (embedded-friendly surgery), `qdq` (int8 quantization
    with calibration), `prune` (channel pruning), `sparsify` (N:M or unstructured sparsity).
    Exact passes are verified against the input model in onnxruntime after they run;
    `onnxopt passes` lists every option.
    """


for _command in pkgutil.iter_modules(__path__):  # each command module registers itself on `cli`
    if not _command.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_command.name}")


def main(argv=None) -> None:
    """Console entry point: run the CLI, turning user errors into one clear message and an exit code."""
    # passes print their warnings through the log; the Python warning (for API users) would repeat them
    warnings.filterwarnings("ignore", category=UserWarning, module=r"onnxopt\b")
    try:
        # without standalone mode click *returns* the code of ctx.exit(n) instead of exiting
        rc = cli.main(args=argv, prog_name="onnxopt", standalone_mode=False)
    except OnnxoptError as exc:
        if os.environ.get("ONNXOPT_DEBUG"):
            raise
        click.echo(f"{'' if isinstance(exc, InternalError) else 'error: '}{exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; no output was written.", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # an unexpected failure is onnxopt's fault, not the user's: say so
        if os.environ.get("ONNXOPT_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:500]
        click.echo(str(InternalError(f"{type(exc).__name__}: {first}")), err=True)
        sys.exit(InternalError.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)
