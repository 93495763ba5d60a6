"""A classification loss refuses labels it would truncate (issue #24 §5): float labels that are not whole
numbers, and a one-output (regression) head whose cross-entropy is 0 for every example."""
from __future__ import annotations

import pytest
import torch

from hyperinf_ext.capture.losses import ExampleError, causal_lm_loss, classification_loss


class Head(torch.nn.Module):
    def __init__(self, outputs: int, vocab: int | None = None):
        super().__init__()
        self.outputs, self.vocab = outputs, vocab

    def forward(self, input_ids, **_):
        g = torch.Generator().manual_seed(0)
        if self.vocab:
            return (torch.randn(*input_ids.shape, self.vocab, generator=g),)
        return (torch.randn(input_ids.shape[0], self.outputs, generator=g),)


def test_classification_losses_refuse_labels_they_would_truncate():
    ids = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ExampleError, match=r"batch rows \[1\]: class labels \[0\.699\d*\] are not class ids"):
        classification_loss(Head(2), {"input_ids": ids, "labels": torch.tensor([1.0, 0.7, 0.0])})
    whole = classification_loss(Head(2), {"input_ids": ids, "labels": torch.tensor([1.0, 0.0, 1.0])})
    assert torch.equal(whole, classification_loss(Head(2), {"input_ids": ids, "labels": torch.tensor([1, 0, 1])}))
    with pytest.raises(ValueError, match="one output .*regression head"):
        classification_loss(Head(1), {"input_ids": ids, "labels": torch.tensor([0, 0, 0])})
    with pytest.raises(ExampleError, match="token labels .* are not class ids"):
        causal_lm_loss(Head(0, vocab=5), {"input_ids": ids, "labels": torch.full((3, 4), 1.5)})
