"""Loading the user's own Python files (data loaders, losses, lite rules): a missing file, a failed
import or a missing function is a user error of the caller's kind with a hint, not a traceback."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Callable

from .errors import OnnxoptError, OptionError


def import_user_file(path, what: str, error: type = OptionError, hint: str = "") -> ModuleType:
    """Import the Python file ``path`` as a fresh module; ``what`` names it in messages ("data script")."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} '{p}' does not exist.", hint or "give the path of a Python file")
    spec = importlib.util.spec_from_file_location(f"onnxopt_user_{abs(hash(str(p.resolve())))}", str(p))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except OnnxoptError:
        raise
    except Exception as exc:
        raise error(f"{what} '{p}' failed to import: {type(exc).__name__}: {exc}",
                    f"fix the file; it must import cleanly with `python {p}`") from None
    return module


def load_user_function(spec: str, what: str, expects: str, error: type = OptionError) -> Callable:
    """The function named by ``path/to/file.py:function``; ``expects`` says what it must do (for the hint)."""
    path, _, func = spec.rpartition(":")
    if not path or not func:
        raise error(f"bad {what} '{spec}'.", "write it as path/to/file.py:function")
    module = import_user_file(path, what, error, "write it as path/to/file.py:function")
    fn = getattr(module, func, None)
    if not callable(fn):
        raise error(f"'{path}' has no function '{func}'.", expects)
    return fn
