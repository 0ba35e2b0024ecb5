"""The pass registry: every pass declares a name, a one-line summary, an ``Options`` dataclass
and whether it is exact (output-preserving) or approximate.

A module in ``passes/`` registers itself with :func:`register_pass` (a new pass is one new file), its
``Options`` fields declared with :func:`option`. ``onnxopt passes``, ``--set``, recipes and shortcut
flags are generated from these, and user values are converted here, so a pass gets typed options.
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import pkgutil
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import onnx

import onnxopt.passes

from .errors import DataError, OptionError
from .feeds import NoFeedError, plan_feeds


_BOOL_WORDS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}


@dataclass(frozen=True)
class Option:
    """One typed pass option. ``type`` is bool, int, float, str or list (comma-separated str)."""

    name: str
    type: type
    default: Any
    help: str
    choices: Optional[Sequence[Any]] = None
    flag: Optional[str] = None   # an `onnxopt apply` shortcut, e.g. "--calib-method" (= --set PASS.NAME=...)
    path: bool = False           # the value names a file (the shortcut flag takes a file path)

    def convert(self, pass_name: str, value: Any) -> Any:
        """Convert a CLI/recipe value to this option's type, or raise OptionError."""
        where = f"{pass_name}.{self.name}"
        try:
            if value is None:
                converted = None
            elif self.type is bool:
                converted = value if isinstance(value, bool) else _BOOL_WORDS[str(value).strip().lower()]
            elif self.type is list:
                items = value if isinstance(value, (list, tuple)) else str(value).split(",")
                converted = [str(v).strip() for v in items if str(v).strip()]
            elif isinstance(value, bool) and self.type in (int, float):
                raise ValueError(value)  # True is no number here
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            else:
                converted = self.type(value)
        except (TypeError, ValueError, KeyError):
            raise OptionError(
                f"bad value {value!r} for option {where}: expected {self.type.__name__}.",
                f"{where}: {self.help}") from None
        if self.choices is not None and converted is not None:
            items = converted if isinstance(converted, list) else [converted]
            bad = [v for v in items if v not in self.choices]
            if bad:
                raise OptionError(f"bad value {bad[0]!r} for option {where}.",
                                  f"valid values: {', '.join(map(str, self.choices))}")
        return converted


def option(default: Any, help: str, choices: Optional[Sequence[Any]] = None, *, flag: Optional[str] = None,
           path: bool = False) -> Any:
    """Declare one field of a pass's ``Options`` dataclass (its type is the field's annotation)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


def compile_patterns(items: list, option_name: str) -> list:
    """The regular expressions of a list option (e.g. ``prune.protect``); a bad one is an OptionError."""
    patterns = []
    for item in items:
        try:
            patterns.append(re.compile(item))
        except re.error as exc:
            raise OptionError(f"{option_name} entry '{item}' is not a valid regex: {exc}", "escape special characters, e.g. conv\\.1") from None
    return patterns


def _option_type(hint: Any) -> type:
    """``bool``/``int``/``float``/``str``/``list[str]``/``Optional[...]`` -> the Option type."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return _option_type(next(a for a in typing.get_args(hint) if a is not type(None)))
    if hint is list or origin is list:
        return list
    return hint


@dataclass
class PassOptions:
    """Base of every pass's ``Options``: declared options, conversion of user values, a flat ``to_dict``."""

    @classmethod
    def declared(cls) -> tuple:
        """The :class:`Option` of every field, groups flattened, in declaration order."""
        if "_declared" not in cls.__dict__:  # per class: a subclass has options of its own
            cls._declared = tuple(opt for opt, _ in _walk(cls, ()))
        return cls._declared

    @classmethod
    def build(cls, pass_name: str, given: Any = None) -> "PassOptions":
        """The defaults overridden by ``given`` ({option: value}, values converted and validated)."""
        if isinstance(given, cls):
            return given
        layout = {opt.name: (opt, where) for opt, where in _walk(cls, ())}
        values: dict = {}
        for key, value in (given or {}).items():
            if key not in layout:
                raise OptionError(f"unknown option '{key}' for pass '{pass_name}'.",
                                  f"valid options of {pass_name}: {', '.join(layout) or '(none)'}")
            opt, where = layout[key]
            values.setdefault(where, {})[key] = opt.convert(pass_name, value)
        return _construct(cls, (), values)

    def validate(self, model: onnx.ModelProto, ctx: "PassContext") -> None:
        """Raise OptionError/DataError for values the types cannot rule out (ranges, data the pass
        needs). The manager calls it for every pass before the first runs, so a bad option of the
        last pass costs no minutes of the first; ``model`` is the chain's input."""

    def to_dict(self) -> dict:
        """``{option: value}`` over all groups (JSON-able: what reports and metadata record)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PassOptions):
                out.update(value.to_dict())
            else:
                out[f.name] = list(value) if isinstance(value, (list, tuple)) else value
        return out


def _walk(cls: type, where: tuple):
    """(Option, group path) for every option of ``cls``; a dataclass-typed field is a group."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from _walk(hint, where + (f.name,))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield Option(f.name, _option_type(hint), default, f.metadata.get("help", ""), f.metadata.get("choices"),
                     f.metadata.get("flag"), f.metadata.get("path", False)), where


def _construct(cls: type, where: tuple, values: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[f.name] = _construct(hint, where + (f.name,), values)
        elif f.name in values.get(where, {}):
            kwargs[f.name] = values[where][f.name]
    return cls(**kwargs)


@dataclass
class NoOptions(PassOptions):
    """The options of a pass that takes none."""


@dataclass
class PassResult:
    """What a pass returns: the new model and a JSON-able record: ``changes`` counts rewrites,
    ``details`` lists them, ``skipped`` says why each place left unchanged was, ``extra`` holds
    anything else worth reporting (errors measured, calibration summary...)."""

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
    """What the pass manager hands every pass besides the model and its options. ``data``: a callable
    returning a fresh iterable of feed dicts, or None; ``check_data``: the same for the samples qdq's
    fallback=auto checks its budget on instead of ``data`` (images the model never trained on, as a
    validation split; None: the calibration data); ``require_verify``: an exact pass that cannot be
    verified is an error, not a pass written unverified."""

    data: Optional[Callable[[], Any]] = None
    data_spec: Optional[Any] = None
    check_data: Optional[Callable[[], Any]] = None
    progress: bool = True
    input_shapes: Optional[dict] = None
    log: Callable[[str], None] = lambda msg: None
    require_verify: bool = False
    _plans: dict = field(default_factory=dict, repr=False, compare=False)

    def feed_plan(self, model: onnx.ModelProto):
        """The generated-input plan for ``model`` (:func:`onnxopt.feeds.plan_feeds`), built once per
        input signature: every pass of a chain keeps the inputs, so later passes reuse it. A model
        no feed runs on raises :class:`onnxopt.feeds.NoFeedError` (remembered too)."""
        key = tuple((vi.name, vi.type.SerializeToString()) for vi in model.graph.input) + (repr(self.input_shapes),)
        if key not in self._plans:
            try:
                self._plans[key] = plan_feeds(model, self.input_shapes)
            except NoFeedError as exc:
                self._plans[key] = exc
        plan = self._plans[key]
        if isinstance(plan, NoFeedError):
            raise plan
        return plan

    def verification_feeds(self, model: onnx.ModelProto) -> tuple:
        """Feeds an exact pass is verified on: the user's data (2 batches), else generated inputs at
        every size the plan found (two seeds at the first size, one at the second)."""
        if self.data is not None:
            return self.sample_feeds(model, 2)
        plan = self.feed_plan(model)
        feeds = [plan.feed(0, 0), plan.feed(0, 1)] + [plan.feed(i, 2 + i) for i in range(1, len(plan.sizes))]
        return feeds, "generated"

    def sample_feeds(self, model: onnx.ModelProto, batches: int = 2) -> tuple:
        """``(feeds, "data" | "generated")``: up to ``batches`` feed dicts from the user's data, else
        generated inputs. Data that yields nothing is an error, never a silent switch to random inputs."""
        if self.data is None:
            plan = self.feed_plan(model)
            return [plan.feed(0, s) for s in range(max(batches, 1))], "generated"
        feeds = list(itertools.islice(self.data(), max(batches, 1)))
        if not feeds:
            raise DataError("the data given yielded no samples.", "check --data (an empty folder or a selection that takes nothing?)")
        return feeds, "data"


PassFn = Callable[[onnx.ModelProto, PassOptions, PassContext], PassResult]


@dataclass(frozen=True)
class PassInfo:
    name: str
    summary: str
    exact: bool
    options_type: type
    run: PassFn

    @property
    def options(self) -> tuple:
        """The pass's declared :class:`Option` s (groups flattened)."""
        return self.options_type.declared()

    def resolve(self, given: Any = None) -> PassOptions:
        """The pass's ``Options``: defaults overridden by ``given`` (converted and validated)."""
        return self.options_type.build(self.name, given)


_REGISTRY: dict[str, PassInfo] = {}
_DISCOVERED = False


def register_pass(name: str, summary: str, *, exact: bool, options: Optional[type] = None):
    """Decorator registering ``fn(model, options, ctx) -> PassResult`` as pass ``name``."""
    options_type = options or NoOptions
    if not (isinstance(options_type, type) and issubclass(options_type, PassOptions)):
        raise TypeError(f"pass '{name}': options must be a PassOptions dataclass, not {options!r}")

    def wrap(fn: PassFn) -> PassFn:
        if name in _REGISTRY and _REGISTRY[name].run is not fn:
            raise RuntimeError(f"pass '{name}' registered twice")
        _REGISTRY[name] = PassInfo(name, summary, exact, options_type, fn)
        return fn

    return wrap


def all_passes() -> dict[str, PassInfo]:
    global _DISCOVERED
    if not _DISCOVERED:  # every module of passes/ registers its pass on import
        for mod in pkgutil.iter_modules(onnxopt.passes.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"onnxopt.passes.{mod.name}")
        _DISCOVERED = True
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> PassInfo:
    passes = all_passes()
    if name not in passes:
        raise OptionError(f"unknown pass '{name}'.", f"valid passes: {', '.join(passes) or '(none)'}")
    return passes[name]


def shortcut_flags() -> dict:
    """``{"--calib-method": [(pass, Option), ...]}``: the ``apply`` flags the passes declare."""
    flags: dict = {}
    for name, info in all_passes().items():
        for opt in info.options:
            if opt.flag:
                flags.setdefault(opt.flag, []).append((name, opt))
    return flags
