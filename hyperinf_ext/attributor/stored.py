"""Saved state ↔ a live attributor: ``save``/``load`` and the fit checkpoint's restore and commit.

``StoredState`` is a mixin of :class:`~hyperinf_ext.attributor.hyperinf.HyperINF` (like ``FitPass`` and
``Scoring``).  The file formats are ``hyperinf_ext.persistence``, which knows factors and configuration
values, not the attributor: this mixin hands it the attributor's factors, settings and counts, and
installs what it reads back.  It uses ``config``, ``layers``, ``model``, ``factors``, ``n_train``,
``batches_done``, ``fdtype``, ``method`` and the preparation of the attributor.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import torch

from .. import persistence
from ..persistence import (META, adapter_fingerprint, base_fingerprint, check_adapter, full_values, check_layers, read_state, stored_factors,
                           write_state)
from .config import HyperINFConfig, method_of


class StoredStateIO:
    def _layer_shapes(self) -> list[tuple[str, int, int]]:
        """The model's gradient layers as (name, rank, dim), in capture order."""
        return [(l.name, l.rank, l.dim) for l in self.layers]

    def _adapter_digest(self) -> str:
        """Fingerprint of the adapter weights of the attributor's layers (what its factors were fitted on).

        Weights sharded by FSDP2 are gathered first (``full_values``, a collective): under torch.distributed
        every rank computes it, before rank 0 alone writes."""
        with torch.no_grad():
            return adapter_fingerprint((f"{l.name}.{i}", full_values(p)) for l in self.layers
                                       for i, p in enumerate(l.parameters))

    def _lora_scalings(self) -> dict[str, float]:
        """The LoRA scaling of every attributed LoRA matrix (heads have none): recorded with the factors, as
        the gradients scale with it and the adapter fingerprint hashes only the weights."""
        return {l.name: l.scaling for l in self.layers if l.scaling is not None}

    def _base_digest(self) -> str:
        """Fingerprint of the model's weights other than the adapter's (``base_fingerprint``; a collective
        under FSDP2, like ``_adapter_digest``)."""
        with torch.no_grad():
            return base_fingerprint(self.model, adapter=(p for l in self.layers for p in l.parameters))

    def _apply_state(self, stored: persistence.StoredState) -> None:
        """Install ``stored`` after checking every layer's name and shape against the model."""
        check_layers(stored, self._layer_shapes())
        self.factors = stored_factors(stored, self.fdtype)
        self.n_train, self.batches_done = stored.meta["n_train"], stored.meta["batches_done"]

    def _restore_checkpoint(self, ckpt: persistence.Checkpoint) -> None:
        """The checkpoint's last commit, checked against this fit's settings, layers and model, installed."""
        self._apply_state(ckpt.restore(dataclasses.asdict(self.config), self._layer_shapes(), self.model,
                                       self._lora_scalings()))

    def _commit_checkpoint(self, ckpt: persistence.Checkpoint, fingerprint: persistence.DataFingerprint, *,
                           complete: bool) -> None:
        ckpt.commit(fingerprint, complete=complete, factors=self.factors, config=dataclasses.asdict(self.config),
                    n_train=self.n_train, batches_done=self.batches_done, model=self.model,
                    adapter_digest=self._adapter_digest(), lora_scaling=self._lora_scalings())

    def _write_saved(self, directory: str | Path, digests: tuple[str, str] | None = None) -> Path:
        """Factors, the current method's inverses and the configuration, committed to ``directory``
        (``digests``: ``_adapter_digest()`` and ``_base_digest()`` computed beforehand, by every rank under
        torch.distributed)."""
        self._require_fit()
        self._prepare()  # the stored inverses must belong to the stored factors and configuration
        state = getattr(self.method, "state", None) or {}
        return write_state(directory, factors=self.factors, config=dataclasses.asdict(self.config),
                           n_train=self.n_train, batches_done=self.batches_done, complete=True, method_state=state,
                           adapter_digest=digests[0] if digests else self._adapter_digest(),
                           base_digest=digests[1] if digests else self._base_digest(),
                           lora_scaling=self._lora_scalings())

    @classmethod
    def _read_saved(cls, directory: str | Path, model: torch.nn.Module, *, loss_fn=None, progress: bool = True,
                    allow_other_weights: bool = False):
        """An attributor rebuilt from ``save`` (or a finished fit checkpoint) for ``model``."""
        stored = read_state(directory)
        if not stored.complete:
            raise ValueError(f"{stored.directory}: an unfinished fit checkpoint ({stored.meta['batches_done']} "
                             f"batches); finish it with fit(train_loader, checkpoint_dir=...) before loading it")
        try:
            config = HyperINFConfig(**stored.meta["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{stored.directory / META}: invalid 'config': {e}") from None
        attr = cls(model, loss_fn=loss_fn, progress=progress, config=config)
        check_layers(stored, attr._layer_shapes())  # another shape says more than another fingerprint
        check_adapter(stored, attr._adapter_digest(), attr._base_digest(), allow_other=allow_other_weights,
                      scaling=attr._lora_scalings())
        attr._apply_state(stored)
        attr._prepare_from_stored(stored.method_state)
        return attr

    def _prepare_from_stored(self, method_state: Mapping[str, torch.Tensor]) -> None:
        """Reuse stored inverses bit for bit when they cover every layer; otherwise prepare afresh."""
        self._prepared_for = None
        if method_state and set(method_state) == set(self.factors):
            self.method = method_of(self.config)
            self.method.state = {n: t.to(self.fdtype) for n, t in method_state.items()}
            self._prepared_for = self._prepare_key()
        else:
            self._prepare()
