"""The rewrite engine of the ``lite`` pass and its rules, one module per rule family.

:mod:`.engine` holds :class:`Rule`, :class:`Match`, :class:`RuleContext` and the :func:`rule`
registry; each family module declares its rules with ``@rule(...)``: :mod:`.focus`,
:mod:`.pooling`, :mod:`.reduce`, :mod:`.resize`, :mod:`.kernels`, :mod:`.squeeze_excite`, :mod:`.activations`.

Defaults follow TI's v2 table (research note tidl-and-ti-toolkit.md section 1.2) with these
differences: ``focus_to_conv`` is on (TI's ``focus_to_optimized_focus`` is off in v2, but this
rewrite is exact and TIDL does not run strided Slices), ``conv_6x6_to_5x5`` crops the trained
kernel instead of re-initialising it, ``conv_even_kernel_to_odd`` (off, from TI's v3 table) fills
the border with zeros, not ones. Only the main graph is rewritten; If/Loop bodies are left as
they are.
"""
from __future__ import annotations

from . import activations, focus, kernels, pooling, reduce, resize, squeeze_excite  # noqa: F401  (they declare the rules)
from .engine import Match, Rule, RuleContext, registered_rules, rule

__all__ = ["Match", "Rule", "RuleContext", "default_rules", "rule"]


def default_rules() -> list:
    """The default rule table, in application order (exact rules run first; see the pass)."""
    return registered_rules()
