"""Options are checked where they enter (the constructor and ``use``), before any data is read: an
invalid one raises a ValueError/TypeError naming it and leaves the attributor exactly as it was; None
restores a default; what the fit fixed cannot be changed without a new fit (issue #24).

The tiny float64 BERT of test_attributor.  A refused ``use`` keeps the same factors, method object and
prepared inverses, so the scores after it are bit for bit those before it (slack 0).
"""
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.attributor.config import FIXED_BY_FIT  # noqa: E402
from tiny_bert import batches, make_data, tiny_model  # noqa: E402

# (option, bad value): each out of range or of the wrong kind; the error must name the option
BAD_OPTIONS = [
    ("lissa_depth", -5), ("lissa_depth", 0), ("lissa_depth", 2.5), ("lissa_scale_factor", 0.0),
    ("lissa_scale_factor", math.inf), ("damping_scale", -1.0), ("damping_scale", 0.0), ("damping_scale", math.nan),
    ("tol", -1.0), ("tol", 0.0), ("tol", math.inf), ("damping", -1.0), ("damping", math.nan), ("damping", "lots"),
    ("solver", "magic"), ("method", "magic"), ("backend", 3),
]


@pytest.fixture(scope="module")
def fitted():
    model = tiny_model()
    train, query = make_data(10, 1), make_data(4, 2)
    attr = HyperINF(model, progress=False, lissa_depth=3).fit(batches(train, 5))
    return attr, train, query


def test_constructor_refuses_bad_arguments_before_reading_data():
    model = tiny_model()
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        HyperINF("not a model")
    with pytest.raises(TypeError, match="loss_fn"):
        HyperINF(model, loss_fn="cross-entropy")
    with pytest.raises(ValueError, match="layers: expected a list"):
        HyperINF(model, layers="query")  # a string would match layers letter by letter
    with pytest.raises(ValueError, match="dampin: unknown HyperINF setting"):
        HyperINF(model, dampin=0.1)
    for option, value in BAD_OPTIONS:
        with pytest.raises(ValueError, match=f"^{option}: "):
            HyperINF(model, **{option: value})
    # what a method refuses only once it has factors (DataInf's 1/λ) is refused here too
    with pytest.raises(ValueError, match="damping: DataInf's closed form needs λ > 0"):
        HyperINF(model, method="datainf", damping=0.0)


def test_invalid_use_leaves_the_attributor_as_it_was(fitted):
    attr, train, query = fitted
    attr.use("hyperinf", damping="auto")
    before = attr.scores(batches(query, 4))
    state = (attr.config, attr.method, {n: f.damping for n, f in attr.factors.items()})
    refused = [dict(method="lissa", lissa_depth=-5), dict(method="datainf", damping=0.0),
               dict(method="exact", tol=-1.0), dict(damping_scale=-1.0), dict(unknown_option=1),
               dict(layers=["nonexistent"]), dict(dtype="float32"), dict(include_heads=False)]
    for kwargs in refused:
        with pytest.raises(ValueError):
            attr.use(**kwargs)
        assert (attr.config, attr.method) == state[:2], kwargs
        assert {n: f.damping for n, f in attr.factors.items()} == state[2], kwargs
    torch.testing.assert_close(attr.scores(batches(query, 4)), before, rtol=0, atol=0)


def test_use_none_restores_defaults_and_refuses_what_the_fit_fixed(fitted):
    attr, _, _ = fitted
    attr.use("exact", tol=1e-10, lissa_depth=7, damping=0.5)
    assert (attr.config.tol, attr.config.lissa_depth, attr.config.damping) == (1e-10, 7, 0.5)
    attr.use(tol=None, lissa_depth=None, damping=None)
    assert (attr.config.tol, attr.config.lissa_depth, attr.config.damping) == (None, 100, "auto")
    assert attr.config.method == "exact"  # method=None keeps the method
    for option in FIXED_BY_FIT:
        other = {"layers": ["query"], "include_heads": False, "dtype": "float32", "gfim_dtype": "float64",
                 "grad_dtype": "float32", "cache": "none"}[option]
        with pytest.raises(ValueError, match=f"{option}: fixed by the fit.*fit a new HyperINF"):
            attr.use(**{option: other})
    # the value the fit used is no change
    attr.use(dtype=torch.float64, layers=attr.config.layers)
    attr.use("hyperinf")
