"""The rewrite engine of ``lite`` and ``bnfuse``: :class:`Rule`, :class:`Match`, :class:`RuleContext`, :func:`rule`.

A rule's ``match`` looks at one *anchor* node (``rule.anchors``) and walks a bounded neighbourhood,
so a rule scan is linear in the graph size; it returns a :class:`Match`, a *reason* for a near-match
that must not be rewritten (recorded in the report), or None. A rewrite keeps the public name of
the tensor it replaces (the new node writes it, so consumers and graph outputs are untouched), and
nodes left without consumers are removed at once, which keeps consumer counts exact for the
matches that follow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import onnx_graphsurgeon as gs

from ..ir.graph import GraphEditor


@dataclass
class Match:
    """A place a rule will rewrite: ``output`` is the tensor whose producer changes (its name is kept);
    ``data`` holds what the rewrite needs; ``preserved`` names the tensors an exact rule keeps (default:
    ``output``), which the pass verifies. ``data["clip"] = (lo, hi)``: the rewrite drops a clip of
    ``output`` (ReLU6 -> ReLU); ``qdq`` then quantizes ``output`` with a range that ends there."""

    output: gs.Tensor
    data: dict = field(default_factory=dict)
    preserved: Optional[list] = None
    change: Optional[str] = None   # what the pass counts the rewrite as (bnfuse: "bn_folded_into_conv"...)
    note: str = ""                 # a line for the report, set by the rewrite


MatchFn = Callable[[gs.Graph, gs.Node, "RuleContext"], Union[Match, str, None]]
RewriteFn = Callable[[gs.Graph, Match, "RuleContext"], None]


@dataclass(frozen=True)
class Rule:
    """One lite rule. ``anchors`` are the op types ``match`` is called on (empty = every node)."""

    name: str
    summary: str
    exact: bool
    default: bool
    anchors: tuple
    match: MatchFn
    rewrite: RewriteFn
    priority: int = 1000   # place in the default table (lower first); user rules go by ``before``
    opsets: tuple = (1, None)   # (first, last) default-domain opset the rule applies to; None: no upper bound

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"rule name {self.name!r} must be a non-empty identifier")
        if not callable(self.match) or not callable(self.rewrite):
            raise TypeError(f"rule {self.name}: match and rewrite must be callables")
        object.__setattr__(self, "anchors", tuple(self.anchors or ()))

    def applies_to(self, opset: int) -> bool:
        first, last = self.opsets
        return opset >= first and (last is None or opset <= last)


class RuleContext(GraphEditor):
    """Per-run state shared by a pass's rules: the graph editor, the opset, the pass's options and
    the names of the rules enabled in this run."""

    def __init__(self, graph: gs.Graph, opset: int, options, active: frozenset = frozenset()):
        super().__init__(graph)
        self.opset = opset
        self.options = options
        self.active = active
        # rule -> tensors whose rewrite failed its check in an earlier run: left as they are
        self.reverted: dict = {}


_REGISTRY: dict = {}


def rule(name: str, summary: str, *, exact: bool, anchors: tuple, rewrite: RewriteFn, priority: int, default: bool = True,
         opsets: tuple = (1, None), family: str = "lite"):
    """Declare a default rule: ``@rule(...)`` on its match function (returned unchanged). ``exact``: the
    rewrite keeps the outputs (verified on its region); ``priority``: its place in the table (exact
    rules first); ``family``: the pass whose table it joins (see :class:`Rule` for the others)."""
    def register(match: MatchFn) -> MatchFn:
        if name in _REGISTRY:
            raise ValueError(f"rule {name} declared twice")
        _REGISTRY[name] = (family, Rule(name, summary, exact, default, anchors, match, rewrite, priority, opsets))
        return match
    return register


def registered_rules(family: str = "lite") -> list:
    """Every rule declared for ``family`` (a pass name), in table order."""
    return sorted((r for f, r in _REGISTRY.values() if f == family), key=lambda r: r.priority)
