"""HyperINFCallback on real (tiny, CPU, float64) transformers.Trainer runs.

The factors the callback saves (at the end of training and at a checkpoint) must equal a direct
``HyperINF.fit`` on the same training data with the same weights, to 1e-10 relative in float64;
the direct fit batches the data differently (5 rows, our own collation), which only reorders sums.
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from tiny_bert import nonzero_lora_b, tiny_bert_lora  # noqa: E402

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.integrations.transformers import HyperINFCallback  # noqa: E402

VOCAB, N = 40, 11


def bert_lora():
    return tiny_bert_lora(vocab=VOCAB, hidden=12, intermediate=16, max_positions=16, rank=2, dropout=0.1)


def llama_lora():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   attn_implementation="eager")
    base = transformers.LlamaForCausalLM(cfg).double()
    lcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return nonzero_lora_b(peft.get_peft_model(base, lcfg))


def dataset(n=N, seed=1, causal=False):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(n):
        L = int(torch.randint(3, 8, (1,), generator=g))
        row = {"input_ids": torch.randint(1, VOCAB, (L,), generator=g).tolist(), "idx": 100 + k}
        if not causal:
            row["label"] = int(torch.randint(0, 2, (1,), generator=g))
        rows.append(row)
    return rows


def collate(rows):
    """Right padding; labels = the class, or the tokens with -100 at pads (causal LM)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["labels"] = (torch.tensor([r["label"] for r in rows]) if "label" in rows[0]
                       else ids.masked_fill(mask == 0, -100))
    return batch


def direct_loader(rows, size=5):
    out = []
    for s in range(0, len(rows), size):
        b = collate(rows[s : s + size])
        b["index"] = torch.arange(s, min(s + size, len(rows)))
        out.append(b)
    return out


def train(tmp_path, model, rows, callback, **overrides):
    kw = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=3, per_device_train_batch_size=4,
              per_device_eval_batch_size=3, learning_rate=5e-2, save_strategy="steps", save_steps=2,
              logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    kw.update(overrides)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**kw), train_dataset=rows,
                                   data_collator=collate, callbacks=[callback])
    trainer.train()
    return trainer


def assert_same_factors(saved, direct):
    assert saved.n_train == direct.n_train == N
    assert list(saved.factors) == list(direct.factors)
    for name, f in direct.factors.items():
        s = saved.factors[name]
        assert (s.rank, s.dim, s.count) == (f.rank, f.dim, f.count)
        scale = float(f.gfim_sum.abs().max())
        assert scale > 0, name
        # float64: the callback sums the same per-example GFIMs over the Trainer's batches (another
        # batching: another summation order and padding), ≤ γ_m·max|F| ≈ 1e-14 apart; 1e-10·max|F| is the
        # normwise check (rtol adds nothing there), a batch seen twice or lost is ≥ 1/N = 1/10 off
        torch.testing.assert_close(s.gfim_sum, f.gfim_sum, rtol=1e-10, atol=1e-10 * scale)
        torch.testing.assert_close(s.rank_sum, f.rank_sum, rtol=1e-10, atol=1e-10 * float(f.rank_sum.abs().max()))
        assert s.damping == pytest.approx(f.damping, rel=1e-10)


def test_seq_cls_end_and_checkpoint(tmp_path):
    model, rows = bert_lora(), dataset()
    callback = HyperINFCallback(at_checkpoints=True)
    trainer = train(tmp_path, model, rows, callback)
    # the Trainer also saves a checkpoint at the last step (3)
    assert callback.saved == [tmp_path / f"checkpoint-{s}" / "hyperinf" for s in (2, 3)] + [tmp_path / "hyperinf"]

    final = HyperINF.load(tmp_path / "hyperinf", model, progress=False)
    direct = HyperINF(model, progress=False).fit(direct_loader(rows))
    assert_same_factors(final, direct)
    # scores later from the saved factors, streaming the training data again
    queries = direct_loader(dataset(4, seed=2), size=2)
    # Scores from factors ~1e-14 apart (see assert_same_factors): Schulz takes the same steps (its last
    # residual is orders of magnitude from tol, not 1e-14 relative) and X moves by ≈ κ·1e-14; normwise
    # 1e-10·max|score| (was an absolute atol 1e-12, blind to the scores' scale)
    want = direct.scores(queries)
    sscale = float(want.abs().max())
    torch.testing.assert_close(final.scores(queries, direct_loader(rows, 3)), want, rtol=1e-10, atol=1e-10 * sscale)

    # the callback's batches come from the Trainer's (shuffling, column-dropping) dataloader; their
    # index is the dataset position, so scoring through them gives the same columns; they come grouped by
    # length (group_by_length=True, the default): every row once, shortest first
    examples = list(callback.examples(trainer.args, trainer.get_train_dataloader()))
    order = torch.cat([b["index"] for b in examples])
    assert sorted(order.tolist()) == list(range(N))
    assert order.tolist() == sorted(range(N), key=lambda k: len(rows[k]["input_ids"]))
    for b in examples:
        assert "idx" not in b  # dropped by the Trainer's collator wrapper: BERT's forward does not take it
        for j, k in enumerate(b["index"].tolist()):
            L = len(rows[k]["input_ids"])
            assert b["input_ids"][j, :L].tolist() == rows[k]["input_ids"] and int(b["attention_mask"][j].sum()) == L
    torch.testing.assert_close(final.scores(queries, examples), want, rtol=1e-10, atol=1e-10 * sscale)

    # the checkpoint's factors belong to the checkpoint's weights (step 2), not the final ones
    at_step2 = copy.deepcopy(model)
    state = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    peft.set_peft_model_state_dict(at_step2, state)
    ckpt = HyperINF.load(tmp_path / "checkpoint-2" / "hyperinf", at_step2, progress=False)
    assert_same_factors(ckpt, HyperINF(at_step2, progress=False).fit(direct_loader(rows)))
    name = next(iter(direct.factors))
    assert not torch.allclose(ckpt.factors[name].gfim_sum, final.factors[name].gfim_sum, rtol=1e-3, atol=0)


def test_causal_lm_padding_and_labels(tmp_path):
    model, rows = llama_lora(), dataset(causal=True)
    callback = HyperINFCallback(batch_size=4, method="exact", damping="datainf")
    train(tmp_path, model, rows, callback, save_strategy="no")
    assert callback.saved == [tmp_path / "hyperinf"]
    saved = HyperINF.load(tmp_path / "hyperinf", model, progress=False)
    assert saved.config.method == "exact" and saved.config.cache == "none"
    assert_same_factors(saved, HyperINF(model, method="exact", damping="datainf", progress=False)
                        .fit(direct_loader(rows)))


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="method"):
        HyperINFCallback(method="nope")
    with pytest.raises(ValueError, match="unknown HyperINF setting"):
        HyperINFCallback(dampin=0.1)
    with pytest.raises(ValueError, match="subdir"):
        HyperINFCallback(subdir="../elsewhere")

    torch.manual_seed(0)
    plain = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16)).double()
    with pytest.raises(ValueError, match="no active LoRA layers"):
        train(tmp_path / "plain", plain, dataset(), HyperINFCallback())
    assert not (tmp_path / "plain" / "checkpoint-2").exists()  # refused before training

    def packed(rows):  # padding-free collation: every example in one row
        b = collate(rows)
        keep = b["attention_mask"].bool()
        return {"input_ids": b["input_ids"][keep][None], "labels": b["input_ids"][keep][None]}

    model = llama_lora()
    with pytest.raises(ValueError, match="one row per example"):
        train(tmp_path / "packed", model, dataset(causal=True), HyperINFCallback(data_collator=packed))

    def no_labels(rows):
        b = collate(rows)
        del b["labels"]
        return b

    with pytest.raises(ValueError, match="no 'labels'"):
        train(tmp_path / "nolabels", model, dataset(causal=True), HyperINFCallback(data_collator=no_labels))


def test_set_ups_the_callback_cannot_serve_are_refused_when_training_begins(tmp_path, monkeypatch):
    """Several processes (rank 0 alone would fit while the others wait in their next collective), TRL's
    dataset-level packing (a row is a chunk of examples) and a hyperparameter search (every trial into one
    folder): each a ValueError at on_train_begin, before any step."""
    from types import SimpleNamespace as NS

    cb, model = HyperINFCallback(), bert_lora()
    args = dict(output_dir=str(tmp_path), world_size=1, packing=False)
    for change, state, message in ((dict(world_size=2), NS(), "this Trainer runs 2 processes"),
                                   (dict(packing=True), NS(), "packing=True merges several examples"),
                                   ({}, NS(is_hyper_param_search=True), "hyperparameter search")):
        with pytest.raises(ValueError, match=message):
            cb.on_train_begin(NS(**{**args, **change}), state, None, model=model)
    out = tmp_path / "ddp"
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to="none", max_steps=1, save_strategy="steps", save_steps=1),
        train_dataset=dataset(), data_collator=collate, callbacks=[cb])
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))  # what 2 torchrun ranks report
    with pytest.raises(ValueError, match="runs 2 processes"):  # through a Trainer: before the first step
        trainer.train()
    assert not (out / "checkpoint-1").exists()


def test_bad_options_fail_before_training(tmp_path):
    """Every option is refused where it enters (the callback's __init__), or — for the folder, which
    needs the Trainer's output_dir — when training begins: never after a run whose factors are lost."""
    for options, name in ((dict(damping_scale=-1.0), "damping_scale"), (dict(tol=-1.0), "tol"),
                          (dict(method="datainf", damping=0.0), "damping"), (dict(lissa_depth=-5), "lissa_depth"),
                          (dict(batch_size=0), "batch_size"), (dict(subdir=3), "subdir")):
        with pytest.raises(ValueError, match=f"{name}"):
            HyperINFCallback(**options)
    out = tmp_path / "run"
    out.mkdir()
    (out / "hyperinf").write_text("a file where the factors would go")
    with pytest.raises(ValueError, match="subdir: .* exists and is not a folder"):
        train(out, bert_lora(), dataset(), HyperINFCallback())
    assert not (out / "checkpoint-2").exists()  # refused before the first step


def test_group_by_length_pads_less_and_scores_the_same():
    """Length-grouped batches: every row once, with its own index, fewer padded tokens, the same scores
    (float64: per-example gradients do not depend on their batch-mates; the sums differ only in order,
    1e-10 relative as above)."""
    from hyperinf_ext.integrations.transformers import ExampleBatches

    model, rows = llama_lora(), dataset(n=23, causal=True)
    plain = ExampleBatches(rows, collate, 4)
    grouped = ExampleBatches(rows, collate, 4, group_by_length=True)
    seen = torch.cat([b["index"] for b in grouped])
    assert sorted(seen.tolist()) == list(range(23)) and len(grouped) == len(plain) == 6
    for b in grouped:  # each row is where its index says
        for i, k in enumerate(b["index"].tolist()):
            n = len(rows[k]["input_ids"])
            assert b["input_ids"][i, :n].tolist() == rows[k]["input_ids"] and int(b["attention_mask"][i].sum()) == n
    lengths = [len(rows[k]["input_ids"]) for k in seen.tolist()]
    assert lengths == sorted(lengths)
    padded = lambda batches: sum(b["input_ids"].numel() for b in batches)  # noqa: E731
    assert padded(grouped) < padded(plain)
    queries = direct_loader(dataset(n=3, seed=7, causal=True), size=3)
    a = HyperINF(model, method="exact", damping="datainf", progress=False).fit(plain).scores(queries, plain)
    b = HyperINF(model, method="exact", damping="datainf", progress=False).fit(grouped).scores(queries, grouped)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * float(a.abs().max()))
    unlabelled = ExampleBatches([{"x": torch.ones(2)}] * 3, lambda r: {"x": torch.stack([t["x"] for t in r]),
                                                                        "labels": torch.zeros(len(r))}, 2,
                                group_by_length=True)
    assert unlabelled.order == [0, 1, 2]  # no input_ids: dataset order
