"""Bad batches and settings given to the HyperINF engine: a clear ValueError naming the argument and the
examples (by their ``index``), never a silently wrong score or a raw error from deep inside torch.

Uses the tiny float64 BERT of test_attributor (a fit takes well under a second).
"""
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.capture import classification_loss  # noqa: E402
from tiny_bert import batches, make_data, tiny_model  # noqa: E402

ALL_METHODS = ["hyperinf", "exact", "datainf", "lissa", "tracin", "kronecker", "paper"]


def scaled_loss(model, batch):
    """Cross-entropy times a per-example factor from the batch: a NaN/Inf factor poisons one example."""
    return classification_loss(model, batch) * batch["scale"]


def with_scale(data, bad=None, value=math.nan):
    scale = torch.ones(data["labels"].shape[0], dtype=torch.float64)
    if bad is not None:
        scale[bad] = value
    return {**data, "scale": scale}


@pytest.fixture(scope="module")
def fitted():
    model = tiny_model()
    train, query = make_data(10, 1), make_data(6, 2)
    attr = HyperINF(model, loss_fn=scaled_loss, progress=False, lissa_depth=3).fit(batches(with_scale(train), 5))
    return attr, train, query


# ------------------------------------------------------------------------- non-finite loss or gradient


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_query_loss_names_the_example(fitted, method, value):
    attr, _, query = fitted
    attr.use(method)
    bad = batches(with_scale(query, bad=4, value=value), 3)  # the second batch's second example
    with pytest.raises(ValueError, match=r"validation gradients: examples \[4\] \(index\) have a non-finite"):
        attr.mean_scores(bad)
    with pytest.raises(ValueError, match=r"query gradients: examples \[4\] \(index\) have a non-finite"):
        attr.scores(bad)
    with pytest.raises(ValueError, match=r"examples \[4\]"):
        attr.query_gradients(bad)
    assert torch.isfinite(attr.mean_scores(batches(with_scale(query), 3))).all()  # a clean query still works


def test_non_finite_training_loss_names_the_example():
    model = tiny_model()
    train = with_scale(make_data(10, 1), bad=[2, 7])
    with pytest.raises(ValueError, match=r"fit: examples \[2\] \(index\) have a non-finite"):
        HyperINF(model, loss_fn=scaled_loss, progress=False).fit(batches(train, 5))
    attr = HyperINF(model, loss_fn=scaled_loss, progress=False, cache="none")
    attr.fit(batches(with_scale(make_data(10, 1)), 5))
    with pytest.raises(ValueError, match=r"train gradients: examples \[2\]"):
        attr.mean_scores(batches(with_scale(make_data(4, 2)), 4), train_loader=batches(train, 5))


# ------------------------------------------------------------------------------------ DataInf at λ = 0


def test_datainf_needs_positive_damping(fitted):
    attr, _, query = fitted
    with pytest.raises(ValueError, match=r"damping: DataInf's closed form needs λ > 0"):
        attr.use("datainf", damping=0.0)
    with pytest.raises(ValueError, match=r"damping_scale: expected a finite number > 0"):
        attr.use("datainf", damping="datainf", damping_scale=0.0)
    attr.use("datainf", damping=1e-3)
    assert torch.isfinite(attr.mean_scores(batches(with_scale(query), 3))).all()


# ------------------------------------------------------------------------------------------ batch index


def _with_index(data, index):
    return {**data, "index": index}


@pytest.mark.parametrize("index, fragment", [
    (torch.tensor([0, 1, 1, 3, 4]), r"fit: batch 0: index repeats \[1\] within the batch"),
    (torch.tensor([0, 1, 2, 3]), r"fit: batch 0: index must have shape \[5\]"),
    (torch.arange(10).view(2, 5), r"fit: batch 0: index must have shape \[5\]"),
    (torch.tensor([0, 1, -2, 3, 4]), r"fit: batch 0: index must be non-negative, got \[-2\]"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), r"fit: batch 0: index must be an integer tensor"),
    ([0, 1, 2, 3, 4], r"fit: batch 0: index must be a tensor"),
])
def test_bad_index_in_a_batch(index, fragment):
    model = tiny_model()
    first, second = batches(with_scale(make_data(10, 1)), 5)
    with pytest.raises(ValueError, match=fragment):
        HyperINF(model, loss_fn=scaled_loss, progress=False).fit([_with_index(first, index), second])


def test_index_repeated_across_batches():
    model = tiny_model()
    first, second = batches(with_scale(make_data(10, 1)), 5)
    second = _with_index(second, torch.tensor([5, 6, 2, 8, 9]))
    with pytest.raises(ValueError, match=r"fit: batch 1: index \[2\] already used by an earlier batch"):
        HyperINF(model, loss_fn=scaled_loss, progress=False).fit([first, second])


def test_index_checked_in_query_and_second_train_pass(fitted):
    attr, train, query = fitted
    q = batches(with_scale(query), 3)
    q[1] = _with_index(q[1], torch.tensor([3, 0, 5]))
    with pytest.raises(ValueError, match=r"validation gradients: batch 1: index \[0\] already used"):
        attr.mean_scores(q)
    t = batches(with_scale(train), 5)
    t[1] = _with_index(t[1], torch.tensor([5, 6, 7, 8, 8]))
    with pytest.raises(ValueError, match=r"train gradients: batch 1: index repeats \[8\]"):
        attr.mean_scores(batches(with_scale(query), 3), train_loader=t)


def test_query_index_must_number_the_rows(fitted):
    attr, _, query = fitted
    q = batches(with_scale(query), 3)
    q[1] = _with_index(q[1], torch.tensor([3, 4, 9]))
    with pytest.raises(ValueError, match=r"query_loader: index must number the 6 query examples 0\.\.5"):
        attr.scores(q)


def test_empty_batch():
    model = tiny_model()
    first, second = batches(with_scale(make_data(10, 1)), 5)
    empty = {k: v[:0] for k, v in second.items()}
    with pytest.raises(ValueError, match=r"fit: batch 1 is empty"):
        HyperINF(model, loss_fn=scaled_loss, progress=False).fit([first, empty, second])


# --------------------------------------------------------------------------------- unlabelled examples


def test_unlabelled_and_out_of_range_class_labels():
    model = tiny_model()
    data = make_data(10, 1)
    unlabelled = {**data, "labels": data["labels"].masked_fill(torch.arange(10) >= 6, -100)}
    with pytest.raises(ValueError, match=r"fit: examples \[6, 7, 8, 9\] \(index\): label -100 \(ignored\), "
                                         r"so they have no loss"):
        HyperINF(model, progress=False).fit(batches(unlabelled, 5))
    all_unlabelled = {**data, "labels": torch.full((10,), -100)}
    with pytest.raises(ValueError, match=r"examples \[0, 1, 2, 3, 4\] \(index\): label -100"):
        HyperINF(model, progress=False).fit(batches(all_unlabelled, 5))
    out_of_range = {**data, "labels": data["labels"].index_fill(0, torch.tensor([3]), 2)}
    with pytest.raises(ValueError, match=r"examples \[3\] \(index\): class labels \[2\] outside \[0, 2\)"):
        HyperINF(model, progress=False).fit(batches(out_of_range, 5))
    negative = {**data, "labels": data["labels"].index_fill(0, torch.tensor([8]), -1)}
    with pytest.raises(ValueError, match=r"examples \[8\] \(index\): class labels \[-1\] outside"):
        HyperINF(model, progress=False).fit(batches(negative, 5))
    attr = HyperINF(model, progress=False).fit(batches(data, 5))
    with pytest.raises(ValueError, match=r"validation gradients: examples \[7\] \(index\): label -100"):
        attr.mean_scores(batches({**data, "labels": data["labels"].index_fill(0, torch.tensor([7]), -100)}, 5))
