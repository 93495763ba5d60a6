"""A curvature method describes itself in its own module and is registered by being defined (issue #21).

Checked: every module of curvature/methods/ registers exactly one method under its own file name; what a
method declares (damping default, fitted statistics, exact twin) is what the rest of the library reads;
a method defined anywhere is usable by name without touching another file, in float64 against a brute
force; a second definition of a name is refused.
"""
from __future__ import annotations

import pkgutil

import pytest
import torch

from hyperinf_ext.curvature import base, methods
from hyperinf_ext.curvature.damping import DEFAULT_SCALE, check_rule
from hyperinf_ext.curvature.methods import METHOD_DEFAULTS, METHODS, make_method, resolve


def test_every_module_registers_the_method_it_is_named_after():
    names = sorted(m.name for m in pkgutil.iter_modules(methods.__path__))
    assert names == sorted(METHODS), (names, sorted(METHODS))
    for name, cls in METHODS.items():
        assert cls.__module__ == f"{methods.__name__}.{name}", (name, cls.__module__)


def test_what_methods_declare():
    for name, cls in METHODS.items():
        if cls.damping_default is None:
            continue
        rule, scale = cls.damping_default
        assert check_rule(rule) == rule and rule != "auto" and scale > 0, name
        assert resolve(name, "auto", None) == (rule, scale)
        assert resolve(name, "auto", 3.0) == (rule, 3.0)  # a given scale wins
        assert set(cls.fits) <= {"gfim_sum", "rank_sum"} and "gfim_sum" in cls.fits
    assert METHODS["tracin"].damping_default is None and "tracin" not in METHOD_DEFAULTS
    assert METHOD_DEFAULTS["hyperinf"] == METHOD_DEFAULTS["exact"]  # one estimator, one default
    assert METHODS["exact"].reference_for == "hyperinf"
    assert "rank_sum" in METHODS["kronecker"].fits
    assert resolve("no-such-method", "auto", None) == ("datainf", DEFAULT_SCALE)


def test_a_method_defined_elsewhere_is_registered_and_scores_like_its_brute_force():
    class Diagonal(base.Method):
        """Test-only curvature: q̃ = q·(diag(G) + λI)⁻¹."""

        name = "test-diagonal"
        damping_default = ("spectral", 0.5)

        def prepare(self, factors):
            self.state = {n: 1.0 / (torch.diagonal(f.gfim) + f.damping) for n, f in factors.items()}

        def precondition(self, q, factors, train_batches):
            return {n: v * self.state[n] for n, v in q.items()}

    try:
        assert base.REGISTRY["test-diagonal"] is Diagonal
        g = torch.randn(9, 3, 5, dtype=torch.float64)
        G_sum = torch.einsum("nrd,nre->de", g, g)
        f = base.LayerFactor("l", 3, 5, G_sum, 9, damping=0.25)
        m = base.REGISTRY["test-diagonal"]()
        m.prepare({"l": f})
        q = torch.randn(2, 3, 5, dtype=torch.float64)
        want = q / (torch.diagonal(G_sum / 9) + 0.25)  # brute force
        got = m.precondition({"l": q}, {"l": f}, lambda: [])["l"]
        # a few roundings of the division and the sum: 8 units of float64 roundoff, relative
        assert torch.allclose(got, want, rtol=8 * torch.finfo(torch.float64).eps, atol=0)
    finally:
        base.REGISTRY.pop("test-diagonal", None)


def test_a_second_definition_of_a_name_is_refused():
    with pytest.raises(TypeError, match="'hyperinf' is defined twice"):
        class Again(base.Method):  # noqa: F841
            name = "hyperinf"
    assert METHODS["hyperinf"] is base.REGISTRY["hyperinf"]


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown method 'nope'; expected one of"):
        make_method("nope")
