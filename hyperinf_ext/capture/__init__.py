"""Per-sample gradients of the LoRA layers (and trainable heads) of a PEFT model.

One batched forward + backward pass is enough: a forward hook on every captured
``nn.Linear`` records the input it was fed, and a tensor hook on its output
receives the gradient of the loss w.r.t. that output.  For a linear layer
``y = x W^T + b`` the gradient of example ``i``'s loss w.r.t. ``W`` is
``sum_t delta[i, t]^T x[i, t]``, so per-sample gradients come from one einsum
over the token axis.  This works because every example's loss depends only on
its own row of the batch (true for the supported transformer models as long as
padding is masked and the model runs in eval mode).

All gradients are returned *rank-first*, i.e. as ``[n, r, d]`` with ``r`` the
LoRA rank, which is the layout the GFIM / Schulz kernels expect:

* ``lora_A``  (weight ``[r, d_in]``):   gradient ``[n, r, d_in]``
* ``lora_B``  (weight ``[d_out, r]``):  gradient transposed, ``[n, r, d_out]``
* ``head``    (weight ``[out, in]`` + bias ``[out]``): ``[n, out, in + 1]``,
  the bias gradient being the last column.

Also captured: DoRA's magnitude vector (``magnitude``, ``[n, 1, d_out]``) and embedding LoRA
(``embedding_A`` ``[n, r, vocab]``, ``embedding_B`` ``[n, r, d_out]``); the formulas per kind are in
:mod:`.rules`. LoRA layers the hooks cannot capture exactly are refused, other trainable parameters
named in a warning (:mod:`.coverage`). :meth:`PerSampleGradients.compute` runs the model in eval mode,
where transformers does not checkpoint; a block recomputed during backward (a model's own non-reentrant
``torch.utils.checkpoint``) is recorded once, from its first forward.

Modules: :mod:`.layers` (which matrices), :mod:`.losses` (per-example losses and model inputs),
:mod:`.hooks` (:class:`PerSampleGradients`, the capture itself), :mod:`.rules` (per-kind formulas),
:mod:`.coverage` (what is left out: errors and warnings).
"""
from .hooks import PerSampleGradients
from .layers import GradientLayer, find_gradient_layers
from .losses import (
    MODEL_INPUT_KEYS,
    ExampleError,
    LossFn,
    causal_lm_loss,
    classification_loss,
    default_loss_fn,
    model_inputs,
)

__all__ = [
    "GradientLayer",
    "find_gradient_layers",
    "PerSampleGradients",
    "classification_loss",
    "causal_lm_loss",
    "default_loss_fn",
    "model_inputs",
    "MODEL_INPUT_KEYS",
    "ExampleError",
]
