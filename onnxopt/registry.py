"""The pass registry: every pass declares a name, a one-line summary, typed options with defaults
and help, and whether it is exact (output-preserving) or approximate.

A pass module in ``passes/`` registers itself with :func:`register_pass`; the package imports
every module in that folder, so a new pass is one new file. Options are validated and converted
here, so a pass receives a plain ``dict`` of typed values.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import onnx

from .errors import OptionError


@dataclass(frozen=True)
class Option:
    """One typed pass option. ``type`` is bool, int, float, str or list (comma-separated str)."""

    name: str
    type: type
    default: Any
    help: str
    choices: Optional[Sequence[Any]] = None

    def convert(self, pass_name: str, value: Any) -> Any:
        """Convert a CLI/recipe value to this option's type, or raise OptionError."""
        where = f"{pass_name}.{self.name}"
        try:
            if value is None:
                converted = None
            elif self.type is bool:
                if isinstance(value, bool):
                    converted = value
                elif str(value).strip().lower() in ("1", "true", "yes", "on"):
                    converted = True
                elif str(value).strip().lower() in ("0", "false", "no", "off"):
                    converted = False
                else:
                    raise ValueError(value)
            elif self.type is list:
                if isinstance(value, (list, tuple)):
                    converted = [str(v).strip() for v in value if str(v).strip()]
                else:
                    converted = [v.strip() for v in str(value).split(",") if v.strip()]
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                converted = int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                converted = float(value)
            else:
                converted = self.type(value)
        except (TypeError, ValueError):
            raise OptionError(
                f"bad value {value!r} for option {where}: expected {self.type.__name__}.",
                f"{where}: {self.help}",
            ) from None
        if self.choices is not None and converted is not None:
            items = converted if isinstance(converted, list) else [converted]
            bad = [v for v in items if v not in self.choices]
            if bad:
                raise OptionError(
                    f"bad value {bad[0]!r} for option {where}.",
                    f"valid values: {', '.join(map(str, self.choices))}",
                )
        return converted


@dataclass
class PassResult:
    """What a pass returns: the new model, and a JSON-able record of what it did.

    ``changes`` counts what was rewritten (e.g. {"bn_folded_into_conv": 19}); ``details`` lists
    individual rewrites (tensor names, rule names); ``skipped`` says, for each place the pass could
    not apply safely, why -- the graph is left unchanged there. ``extra`` holds anything else
    worth reporting (errors measured, calibration summary...).
    """

    model: onnx.ModelProto
    changes: dict = field(default_factory=dict)
    details: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return any(bool(v) for v in self.changes.values())


@dataclass
class PassContext:
    """What the pass manager hands every pass besides the model and its options.

    ``data`` is a callable returning a fresh iterable of feed dicts (calibration/evaluation data),
    or None when the user gave none. ``progress`` says whether progress bars may be shown.
    ``input_shapes`` overrides dynamic input dimensions for generated inputs.
    """

    data: Optional[Callable[[], Any]] = None
    data_spec: Optional[Any] = None
    progress: bool = True
    input_shapes: Optional[dict] = None
    log: Callable[[str], None] = lambda msg: None
    settings: dict = field(default_factory=dict)

    def sample_feeds(self, model: onnx.ModelProto, batches: int = 2) -> tuple:
        """Up to ``batches`` feed dicts from the user's data, else generated inputs.

        Returns ``(feeds, "data" | "generated")``: what passes use to measure or verify their
        output error. Data that yields nothing is an error, never a silent switch to random inputs.
        """
        from .errors import DataError
        from .runtime import generate_inputs

        if self.data is None:
            return [generate_inputs(model, seed=s, overrides=self.input_shapes) for s in range(max(batches, 1))], "generated"
        feeds = []
        for feed in self.data():
            feeds.append(feed)
            if len(feeds) >= max(batches, 1):
                break
        if not feeds:
            raise DataError("the data given yielded no samples.", "check --data (an empty folder or a selection that takes nothing?)")
        return feeds, "data"


PassFn = Callable[[onnx.ModelProto, dict, PassContext], PassResult]


@dataclass(frozen=True)
class PassInfo:
    name: str
    summary: str
    exact: bool
    options: tuple
    run: PassFn
    description: str = ""

    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        raise OptionError(
            f"unknown option '{name}' for pass '{self.name}'.",
            f"valid options of {self.name}: {', '.join(o.name for o in self.options) or '(none)'}",
        )

    def resolve(self, given: Optional[dict]) -> dict:
        """Defaults overridden by ``given`` (converted and validated)."""
        values = {o.name: o.default for o in self.options}
        for key, value in (given or {}).items():
            values[key] = self.option(key).convert(self.name, value)
        return values


_REGISTRY: dict[str, PassInfo] = {}
_DISCOVERED = False


def register_pass(name: str, summary: str, *, exact: bool, options: Sequence[Option] = ()):
    """Decorator registering ``fn(model, options, ctx) -> PassResult`` as pass ``name``."""

    def wrap(fn: PassFn) -> PassFn:
        if name in _REGISTRY and _REGISTRY[name].run is not fn:
            raise RuntimeError(f"pass '{name}' registered twice")
        _REGISTRY[name] = PassInfo(name, summary, exact, tuple(options), fn, (fn.__doc__ or "").strip())
        return fn

    return wrap


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import onnxopt.passes as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"onnxopt.passes.{mod.name}")
    _DISCOVERED = True


def all_passes() -> dict[str, PassInfo]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> PassInfo:
    passes = all_passes()
    if name not in passes:
        raise OptionError(f"unknown pass '{name}'.", f"valid passes: {', '.join(passes) or '(none)'}")
    return passes[name]
