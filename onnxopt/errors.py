"""User-facing errors (see STYLE "two kinds of error").

:class:`OnnxoptError` and its subclasses are *user* errors with a message (what is wrong) and a
hint (how to fix it), printed by the CLI as one paragraph without a traceback.
:class:`InternalError` is onnxopt's own fault caught by one of its checks; it asks for a report.
Anything else is reported as onnxopt's fault too; ``ONNXOPT_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import importlib


class OnnxoptError(Exception):
    """A user error: the message says what is wrong, the hint how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class InternalError(OnnxoptError):
    """A bug in onnxopt, found by its own checks: not the user's fault."""

    exit_code = 70  # EX_SOFTWARE
    REPORT = "this is a bug in onnxopt, not in your model or options; please report it with the input model (ONNXOPT_DEBUG=1 shows the traceback)"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message if message.startswith("internal error") else f"internal error: {message}", hint or self.REPORT)


class ModelLoadError(OnnxoptError):
    """The model file cannot be read, parsed, or is not a valid ONNX model."""


class OptionError(OnnxoptError):
    """An unknown pass, unknown option or bad option value."""

    exit_code = 2


class DataError(OnnxoptError):
    """Input/calibration data that does not fit the model (shape, dtype, NaN, empty folder)."""


class VerificationError(OnnxoptError):
    """An exact pass changed the model's outputs beyond tolerance."""


class MissingDependencyError(OnnxoptError):
    """An optional dependency (torch, tensorrt, matplotlib) is needed but not installed."""

    def __init__(self, package: str, feature: str, install: str | None = None):
        super().__init__(f"{feature} needs the optional package '{package}', which is not installed.",
                         f"install it with: {install or 'pip install ' + package}")
        self.package = package


class GateFailure(OnnxoptError):
    """An acceptance gate (size, latency, agreement, accuracy drop) was not met."""

    exit_code = 3


def require(package: str, feature: str, install: str | None = None):
    """Import an optional dependency or raise a :class:`MissingDependencyError` saying how to get it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(package, feature, install) from exc
