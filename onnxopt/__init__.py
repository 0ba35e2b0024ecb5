"""onnxopt: a graph-level ONNX model optimizer for TensorRT, TIDL and onnxruntime deployments.

Python API (everything the CLI does)::

    import onnxopt
    model, report = onnxopt.apply("model.onnx", "cleanup,bnfuse")
    onnxopt.save_model(model, "model.opt.onnx")
    print(report.to_json())
"""
from .version import __version__  # noqa: E402
from .errors import OnnxoptError  # noqa: E402
from .model_io import load_model, save_model  # noqa: E402
from .manager import apply, Report  # noqa: E402
from .registry import all_passes, get_pass, register_pass, option, Option, PassContext, PassOptions, PassResult  # noqa: E402
from .stats import summarize  # noqa: E402
from .compare import compare_models, measure_latency, model_info  # noqa: E402

__all__ = [
    "__version__", "OnnxoptError", "load_model", "save_model", "apply", "Report",
    "all_passes", "get_pass", "register_pass", "option", "Option", "PassContext", "PassOptions", "PassResult", "summarize",
    "compare_models", "measure_latency", "model_info",
]
