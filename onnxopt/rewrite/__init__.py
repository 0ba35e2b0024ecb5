"""The rewrite engine of ``lite`` and ``bnfuse`` (:mod:`.engine`, :mod:`.runner`); one module per rule family.

Defaults follow TI's v2 table (research note tidl-and-ti-toolkit.md section 1.2) with these
differences: ``focus_to_conv`` is on (TI's ``focus_to_optimized_focus`` is off in v2, but this
rewrite is exact and TIDL does not run strided Slices), ``conv_6x6_to_5x5`` crops the trained
kernel instead of re-initialising it, ``conv_even_kernel_to_odd`` (off, from TI's v3 table) fills
the border with zeros, not ones. Only the main graph is rewritten; If/Loop bodies are left as
they are.
"""
from __future__ import annotations

from . import activations, batchnorm, focus, kernels, pooling, reduce, resize, squeeze_excite  # noqa: F401  (they declare the rules)
from .engine import Match, Rule, RuleContext, registered_rules, rule

__all__ = ["Match", "Rule", "RuleContext", "bnfuse_rules", "default_rules", "rule"]


def default_rules() -> list:
    """The lite rule table, in application order (exact rules run first; see the pass)."""
    return registered_rules("lite")


def bnfuse_rules() -> list:
    """The bnfuse rule table (:mod:`.batchnorm`), in application order."""
    return registered_rules("bnfuse")
