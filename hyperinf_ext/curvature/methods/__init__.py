"""The curvature methods: every module of this folder defines one (see ``base.Method`` for what a method
says about itself), and importing this package registers them all.

Every method turns query gradients q_l [Q, r, d] into preconditioned gradients q̃_l ≈ q_l·H_l⁻¹; the
attributor then scores train example k against query q as  −Σ_l ⟨q̃_l, g_k,l⟩  (the sign convention:
``hyperinf_ext.attributor.config.SIGN_CONVENTION``).  Here: the registry (``METHODS``, ``make_method``),
``damping="auto"`` resolved from each method's own default, and the parsing of method and damping lists.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from typing import Sequence

from ... import solvers
from ...solvers import check_solver  # noqa: F401  (re-exported: the attributor checks its config with it)
from ..base import REGISTRY, GradBatches, LayerFactor, Method, groups_by_dim  # noqa: F401  (re-exported)
from ..damping import DAMPING_RULES, check_rule, resolve_rule

for _module in pkgutil.iter_modules(__path__):  # each module defines (and so registers) one method
    importlib.import_module(f"{__name__}.{_module.name}")

# a stable order for messages and listings: the library's own method first, then by name
METHODS: dict[str, type[Method]] = dict(sorted(REGISTRY.items(), key=lambda kv: (kv[0] != "hyperinf", kv[0])))
METHOD_DEFAULTS: dict[str, tuple[str, float]] = {n: m.damping_default for n, m in METHODS.items()
                                                 if m.damping_default is not None}
"""(rule, scale) of ``damping="auto"`` for each method with a curvature (each method's ``damping_default``)."""
CURVATURE_SOLVERS = solvers.INVERSE_SOLVERS  # what hyperinf/kronecker accept as solver= (they keep inverses)

HyperINFMethod = METHODS["hyperinf"]  # noqa: E305  (the names code and tests have used for these classes)
PaperSchulz = METHODS["paper"]


def make_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](**options)


def resolve(method: str, rule: float | str, scale: float | None) -> tuple[float | str, float]:
    """The concrete (rule, scale) for ``method``: expands "auto" to the method's ``damping_default``."""
    default = METHODS[method].damping_default if method in METHODS else None
    return resolve_rule(default, rule, scale)


# ------------------------------------------------------------------------------ lists of methods and dampings
# Messages name the parameter ("methods: ...", "damping: ..."), never a command-line option: the CLI
# reports them under its own option names.

Damping = float | str
"""A parsed damping: a float > 0, a rule name, or ``"rule:factor"`` (see :func:`parse_dampings`)."""


def parse_methods(value: str | Sequence[str], what: str = "methods") -> list[str]:
    """``"hyperinf,exact"`` or a list → validated method names (duplicates dropped, order kept).

    ``what`` names the parameter in error messages (e.g. ``"method"`` for a single choice).
    """
    items = [m.strip() for m in value.split(",")] if isinstance(value, str) else [str(m).strip() for m in value]
    items = [m for m in items if m]
    if not items:
        raise ValueError(f"{what}: no method given")
    for m in items:
        if m not in METHODS:
            raise ValueError(f"{what}: unknown method {m!r}; expected one of {', '.join(sorted(METHODS))}")
    return list(dict.fromkeys(items))


def parse_dampings(value: str | Sequence[float | str]) -> list[Damping]:
    """``"datainf,1e-3,spectral:3"`` or a list → validated dampings (floats must be > 0).

    ``rule:scale`` (e.g. ``spectral:3``) gives a rule its factor (``damping_scale``); it is kept as the
    normalised string ``"spectral:3"``, which :func:`split_damping` takes apart.
    """
    raw = [d.strip() for d in value.split(",")] if isinstance(value, str) else list(value)
    out: list[Damping] = []
    for d in raw:
        if isinstance(d, str) and ":" in d:
            out.append(_rule_with_factor(d))
            continue
        if isinstance(d, str):
            if not d:
                continue
            try:
                d = float(d)
            except ValueError:
                pass
        d = check_rule(d)  # its messages start with "damping: "
        # every method but tracin divides by λ (DataInf's 1/λ, the Schulz lower bound)
        if isinstance(d, float) and d <= 0:
            raise ValueError(f"damping: a numeric damping must be > 0, got {d}")
        out.append(d)
    if not out:
        raise ValueError("damping: no value given")
    return list(dict.fromkeys(out))


def _rule_with_factor(text: str) -> str:
    """``"spectral: 3"`` → ``"spectral:3"`` after checking the rule and its factor."""
    rule, _, factor = text.partition(":")
    try:
        scale = float(factor)
    except ValueError:
        raise ValueError(f"damping: {text!r}: the factor after ':' must be a number") from None
    rule = rule.strip()
    # a factor only scales a named rule; "auto" already picks each method's own factor
    if rule not in DAMPING_RULES or rule == "auto" or not (math.isfinite(scale) and scale > 0):
        named = "|".join(r for r in DAMPING_RULES if r != "auto")
        raise ValueError(f"damping: {text!r}: expected {named}:<factor > 0>")
    return f"{rule}:{scale:g}"


def damping_label(d: Damping) -> str:
    """A parsed damping as shown in tables and file columns (``0.001`` → ``"0.001"``)."""
    return f"{d:g}" if isinstance(d, float) else str(d)


def split_damping(d: Damping) -> tuple[float | str, float | None]:
    """A parsed damping → (rule, damping_scale or None): ``"spectral:3"`` → ("spectral", 3.0)."""
    if isinstance(d, str) and ":" in d:
        rule, _, factor = d.partition(":")
        return rule, float(factor)
    return d, None
