"""Fit HyperINF factors from a Hugging Face ``Trainer`` run (and so TRL's ``SFTTrainer``).

:class:`HyperINFCallback` fits the per-layer GFIM factors on the training set when training ends
(and, with ``at_checkpoints=True``, at every checkpoint the Trainer saves) and writes them with
``HyperINF.save`` to ``<output_dir>/hyperinf`` (``<output_dir>/checkpoint-<step>/hyperinf``), beside
the adapter.  Scores come later from ``HyperINF.load(dir, model).scores(query_loader, train_loader)``.

The Trainer's own train dataloader shuffles and drops columns the model does not take (``index``
among them), so the callback builds its own per-example batches: the training dataset in its stored
order — or, with ``group_by_length=True`` (the default), ordered by token length so that each batch pads
little — ``batch_size`` rows at a time, through the Trainer's collator (the one its dataloader uses,
i.e. with unused columns already removed), plus ``index`` = the row's position in the dataset — so
``scores[..., k]`` belongs to ``train_dataset[k]`` whatever the order.  Every collated tensor must keep
one row per example (packing / padding-free collators, which merge examples into one row, are refused, and
so is TRL's ``packing=True``).  The callback fits in one process: a Trainer of several processes is
refused when training begins (fit after training under torchrun instead), as is a hyperparameter search.
On the embedded LLM's data grouping cuts the pad tokens of a fit from 17–18% of its tokens to under 1%
(bench/BUCKETING.md); data of more varied lengths gain more.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..attributor.config import check_method_options
from ..attributor.hyperinf import HyperINF, HyperINFConfig
from ..capture import find_gradient_layers

__all__ = ["HyperINFCallback", "ExampleBatches"]


class ExampleBatches:
    """Re-iterable per-example batches of a map-style dataset through a collator.

    Yields ``collate_fn([dataset[i] for i in rows])`` as a dict with ``index`` ([B] int64, the rows'
    positions in ``dataset``) added; raises ValueError when a collated tensor does not have one row
    per example (packing / padding-free collation) or ``labels`` is missing while ``need_labels``.

    ``group_by_length``: rows sorted by the length of their ``input_ids`` (stable: ties keep dataset
    order) before they are cut into batches, which cuts the padding a batch carries; rows without
    ``input_ids`` keep dataset order.  The scores do not depend on the order (``index`` places them).
    """

    def __init__(self, dataset: Any, collate_fn: Callable[[list], Mapping[str, Any]], batch_size: int,
                 need_labels: bool = True, group_by_length: bool = False):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or isinstance(
                dataset, torch.utils.data.IterableDataset):
            raise ValueError("train_dataset: HyperINFCallback needs a map-style dataset (len() and indexing), "
                             f"got {type(dataset).__name__}; pass train_dataset=... to the callback")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("train_dataset: is empty")
        self.dataset, self.collate_fn = dataset, collate_fn
        self.batch_size, self.need_labels = int(batch_size), need_labels
        self.order = list(range(len(dataset)))
        if group_by_length:
            lengths = [_length(dataset[i]) for i in self.order]
            if all(n is not None for n in lengths):
                self.order.sort(key=lambda i: lengths[i])

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def batch(self, start: int, stop: int) -> dict[str, Any]:
        """The collated rows at positions ``start..stop-1`` of the iteration order, with ``index``."""
        n = stop - start
        rows = self.order[start:stop]
        batch = dict(self.collate_fn([self.dataset[i] for i in rows]))
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != n:
                raise ValueError(
                    f"collator: {key!r} has {value.shape[0]} rows for {n} examples; per-example influence needs "
                    "one row per example (turn off packing / padding_free, or pass data_collator=...)"
                )
        if self.need_labels and batch.get("labels") is None:
            raise ValueError(f"collator: batches have no 'labels' (keys: {sorted(batch)}); the default loss needs "
                             "them — use a collator that sets labels, or pass loss_fn=...")
        batch["index"] = torch.tensor(rows, dtype=torch.long, device="cpu")
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self.dataset), self.batch_size):
            yield self.batch(start, min(start + self.batch_size, len(self.dataset)))


def _length(item: Any) -> int | None:
    """Tokens of a dataset row (its ``input_ids``), or None when it has none."""
    ids = item.get("input_ids") if isinstance(item, Mapping) else None
    if ids is None:
        return None
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else len(ids)


class HyperINFCallback(TrainerCallback):
    """Fits and saves HyperINF factors at the end of training (optionally at every checkpoint).

    >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, data_collator=collator,
    ...                   callbacks=[HyperINFCallback()])
    >>> trainer.train(); trainer.save_model()          # adapter and <output_dir>/hyperinf
    >>> attr = HyperINF.load(f"{args.output_dir}/hyperinf", peft_model)

    Args:
        subdir: folder name of the factors inside ``output_dir`` / each checkpoint folder.
        at_end: fit and save when training ends (``<output_dir>/<subdir>``).
        at_checkpoints: also fit and save at every checkpoint (``<checkpoint>/<subdir>``).
        batch_size: examples per batch of the fit (default: ``per_device_eval_batch_size``).
        group_by_length: batch rows of similar length together (default True; False: dataset order).
        train_dataset, data_collator: override the Trainer's (default: those of its train dataloader).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-example losses (default: HyperINF's —
            cross-entropy for classification, mean token loss over ``labels != -100`` for causal LMs).
        **options: ``HyperINF`` settings (``method``, ``damping``, ``layers``, ``dtype``, and the fields of
            ``HyperINFConfig``); ``cache`` defaults to ``"none"`` (no gradients are kept).

    After a fit, ``self.attributor`` is the fitted ``HyperINF`` and ``self.saved`` lists the folders
    written.  Only the main process fits (``state.is_world_process_zero``).
    """

    def __init__(
        self,
        *,
        subdir: str = "hyperinf",
        at_end: bool = True,
        at_checkpoints: bool = False,
        batch_size: int | None = None,
        train_dataset: Any = None,
        data_collator: Callable[[list], Mapping[str, Any]] | None = None,
        loss_fn: Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
        group_by_length: bool = True,
        **options: Any,
    ):
        # Every option is checked here, where it enters: a bad one found after training would lose the run.
        if not isinstance(subdir, (str, Path)) or not str(subdir) or Path(subdir).is_absolute() or ".." in Path(
                subdir).parts:
            raise ValueError(f"subdir: expected a relative folder name, got {subdir!r}")
        for name, flag in (("at_end", at_end), ("at_checkpoints", at_checkpoints), ("group_by_length", group_by_length)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}: expected True or False, got {flag!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size: expected a whole number >= 1, got {batch_size!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn: expected a callable loss_fn(model, batch) -> Tensor[B], got {loss_fn!r}")
        unknown = sorted(set(options) - set(HyperINFConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"options: unknown HyperINF setting(s) {unknown}; expected fields of HyperINFConfig")
        dtype = options.pop("dtype", "float64")
        options.setdefault("cache", "none")
        self.config = HyperINFConfig(dtype=str(dtype).replace("torch.", ""), **options)  # validates options
        check_method_options(self.config)  # what the method itself refuses (e.g. DataInf at λ = 0)
        self.subdir, self.at_end, self.at_checkpoints = subdir, at_end, at_checkpoints
        self.batch_size, self.train_dataset, self.data_collator = batch_size, train_dataset, data_collator
        self.loss_fn, self.group_by_length = loss_fn, group_by_length
        self.attributor: HyperINF | None = None
        self.saved: list[Path] = []

    # ------------------------------------------------------------------------------------ data

    def examples(self, args: Any, train_dataloader: Any = None) -> ExampleBatches:
        """The per-example batches the fit streams (see the module docstring)."""
        dataset = self.train_dataset if self.train_dataset is not None else getattr(train_dataloader, "dataset", None)
        collate = self.data_collator or getattr(train_dataloader, "collate_fn", None)
        if dataset is None or collate is None:
            raise ValueError("HyperINFCallback: no training dataset/collator from the Trainer; "
                             "pass train_dataset=... and data_collator=...")
        return ExampleBatches(dataset, collate, self.batch_size or args.per_device_eval_batch_size,
                              need_labels=self.loss_fn is None, group_by_length=self.group_by_length)

    # ----------------------------------------------------------------------------------- events

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        # Fail before training, not after it: the model must have LoRA layers and the data must
        # collate into per-example batches with labels.
        if model is None:
            raise ValueError("HyperINFCallback: the Trainer passed no model")
        world = int(getattr(args, "world_size", 1) or 1)
        if world > 1:
            # rank 0 alone would fit while the other ranks wait in the next collective (a sharded FSDP /
            # ZeRO-3 model cannot even run forward there): refuse instead of hanging after training
            raise ValueError(f"HyperINFCallback: fits in the main process only, but this Trainer runs {world} "
                             "processes; train in one process with the callback, or fit after training under "
                             "torchrun with HyperINF(model).fit(loader) (docs/scale-out.md)")
        if getattr(args, "packing", False):
            # TRL packs at the dataset level: a row is a chunk of several examples, which no check of the
            # collated batches can see
            raise ValueError("HyperINFCallback: packing=True merges several examples into one training row, so "
                             "a score column would be a chunk, not an example; train with packing=False")
        if getattr(state, "is_hyper_param_search", False):
            raise ValueError("HyperINFCallback: under a hyperparameter search every trial saves to its own "
                             "output_dir/run-N, but the factors would all go to <output_dir>/<subdir>; fit the "
                             "chosen trial's model after the search")
        # the first place output_dir is known: a file where the factors go would fail only at the end
        for target in self._targets(args):
            if target.exists() and not target.is_dir():
                raise ValueError(f"subdir: {target} exists and is not a folder; the factors are written there "
                                 "after training — pass another subdir=... or remove it")
        find_gradient_layers(model, include_heads=self.config.include_heads, layers=self.config.layers)
        examples = self.examples(args, train_dataloader)
        examples.batch(0, min(2, len(examples.dataset)))

    def _targets(self, args: Any) -> list[Path]:
        """``<output_dir>/<subdir>`` and its folders below output_dir (checkpoint folders do not exist yet)."""
        if not self.at_end:
            return []
        target = Path(args.output_dir) / self.subdir
        return [target] + [Path(args.output_dir) / p for p in Path(self.subdir).parents if str(p) != "."]

    def on_save(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.at_checkpoints and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self._fit_and_save(args, model, train_dataloader, folder / self.subdir)

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.at_end and state.is_world_process_zero:
            self._fit_and_save(args, model, train_dataloader, Path(args.output_dir) / self.subdir)

    def _fit_and_save(self, args: Any, model: torch.nn.Module, train_dataloader: Any, directory: Path) -> None:
        attr = HyperINF(model, loss_fn=self.loss_fn, progress=not args.disable_tqdm, config=self.config)
        attr.fit(self.examples(args, train_dataloader))
        attr.save(directory)
        self.attributor = attr
        self.saved.append(directory)
