"""dattri's cache/attribute workflow through IFAttributorHyperINF, against our own HyperINF.scores.

A tiny float64 BERT + LoRA (query/value, nonzero lora_B, trainable classifier head): dattri computes the
per-sample gradients by vmap(grad) of its task's loss and does the dot products; the adapter supplies
HyperINF's curvature.  dattri's sign convention is the opposite of ours, so attribute == -scores.T
(relative tolerance 1e-5 of the largest score, float64).
"""
import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
try:
    import dattri  # noqa: F401
except ImportError:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        raise  # CI installs dattri (scripts/setup.sh): its absence there is a failure, not a skip
    pytest.skip("dattri is not installed (pip install 'hyperinf-ext[dattri]'); CI runs this test",
                allow_module_level=True)

from dattri.task import AttributionTask  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.capture import classification_loss  # noqa: E402
from hyperinf_ext.integrations.dattri import IFAttributorHyperINF, lora_blocks  # noqa: E402
from tiny_bert import tiny_bert_lora  # noqa: E402

VOCAB, N_TRAIN, N_TEST, T = 40, 10, 4, 7


def tiny_model():
    return tiny_bert_lora(vocab=VOCAB, hidden=12, intermediate=16, max_positions=16, rank=2, dropout=0.1).eval()


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    for i, L in enumerate(torch.randint(3, T + 1, (n,), generator=g).tolist()):
        ids[i, :L] = torch.randint(1, VOCAB, (L,), generator=g)
        mask[i, :L] = 1  # right padding: the loss of a padded example equals the unpadded one's
    return ids, mask, torch.randint(0, 2, (n,), generator=g)


def dattri_loss(model):
    def loss_func(params, data):
        ids, mask, labels = data  # one example: [1, T], [1, T], [1]
        # transformers inspects a 2-D padding mask's values (not allowed under vmap); a 4-D additive
        # mask is used as given
        bias = (1.0 - mask[:, None, None, :].double()) * torch.finfo(torch.float64).min
        out = torch.func.functional_call(model, params, (), {"input_ids": ids, "attention_mask": bias})
        return torch.nn.functional.cross_entropy(out.logits, labels)

    return loss_func


def dict_loader(data, batch_size):
    ids, mask, labels = data
    return [{"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size],
             "labels": labels[i : i + batch_size]} for i in range(0, ids.shape[0], batch_size)]


@pytest.fixture
def float64_default():
    # dattri's attribute() accumulates into a tensor of the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("method, damping", [("hyperinf", "auto"), ("exact", "datainf")])
def test_attribute_equals_hyperinf_scores(method, damping, float64_default):
    model = tiny_model()
    train, test = make_data(N_TRAIN, 1), make_data(N_TEST, 2)
    task = AttributionTask(loss_func=dattri_loss(model), model=model, checkpoints=model.state_dict())
    attributor = IFAttributorHyperINF(task, method=method, damping=damping)
    train_loader = DataLoader(TensorDataset(*train), batch_size=4)
    attributor.cache(train_loader)
    got = attributor.attribute(train_loader, DataLoader(TensorDataset(*test), batch_size=3))
    assert got.shape == (N_TRAIN, N_TEST) and got.dtype == torch.float64

    ours = HyperINF(model, method=method, damping=damping, loss_fn=classification_loss, progress=False)
    ours.fit(dict_loader(train, 3))
    want = ours.scores(dict_loader(test, 2))  # [n_test, n_train], our sign
    scale = want.abs().max()
    assert scale > 0
    # Both sides invert the same damped float64 factors (equal to rounding, see below; κ ≈ 5–7 here):
    # by Schulz to ‖I − AX‖_F ≤ 1e-8 (hyperinf) or by a solve (exact, ~d·u·κ), so each score is within
    # ≈ 2κ·1e-8·‖g_q‖‖A⁻¹‖‖g_t‖ ≈ 1e-7·scale of the other; 1e-5·max|score| leaves 100× for cancellation
    # in the scores.  A sign, transposition, wrong layer or the other damping is off by O(scale).
    torch.testing.assert_close(got, -want.T, rtol=0, atol=1e-5 * float(scale))
    # RelatIF's "l" normaliser: each training row divided by sqrt(g_k·H⁻¹·g_k) (= −our self-influence)
    self_inf = -ours.scores(dict_loader(train, 5)).diagonal()
    got_l = attributor.attribute(train_loader, DataLoader(TensorDataset(*test), batch_size=3), relatif_method="l")
    want_l = -want.T / self_inf.sqrt()[:, None]
    torch.testing.assert_close(got_l, want_l, rtol=0, atol=1e-5 * float(want_l.abs().max()))
    # the same per-layer factors: dattri's vmap gradients reshaped rank-first (lora_B transposed)
    for name, f in ours.factors.items():
        g = attributor.factors[0][name]
        assert (g.rank, g.dim, g.count) == (f.rank, f.dim, f.count)
        # float64 per-example gradients from two autodiff paths (vmap vs backward hooks) agree to a few
        # hundred ulps on this one-layer d = 12 BERT; the GFIM sums m ≤ 8·4 rows (γ_m ≈ 4e-15).  Compared
        # normwise (was rtol 1e-8 with an absolute atol 1e-12 that ignored the factors' scale):
        # 1e-10·max|F| leaves ≥ 100×; a transposed lora_B block or a missing example is off by O(1).
        fs = float(f.gfim_sum.abs().max())
        torch.testing.assert_close(g.gfim_sum, f.gfim_sum, rtol=0, atol=1e-10 * fs)
        assert g.damping == pytest.approx(f.damping, rel=1e-8)  # a smooth function of the factor: ≲ 1e-12


def test_dora_magnitude_equals_hyperinf_scores(float64_default):
    """DoRA (use_dora=True): the magnitude vector [d_out] is a rank-1 layer [1, d_out] in dattri's flat
    gradient as in capture; scores agree as in the plain-LoRA test above (same tolerance argument)."""
    model = tiny_bert_lora(vocab=VOCAB, hidden=12, intermediate=16, max_positions=16, rank=2, dropout=0.0,
                           use_dora=True).eval()
    blocks = lora_blocks(model, layers=None, include_heads=True)
    assert "magnitude" in {b.layer.kind for b in blocks}
    for b in blocks:
        flat = torch.randn(2, b.numel, dtype=torch.float64)
        torch.testing.assert_close(b.flatten(b.rank_first(flat)), flat, rtol=0, atol=0)
    train, test = make_data(N_TRAIN, 1), make_data(N_TEST, 2)
    task = AttributionTask(loss_func=dattri_loss(model), model=model, checkpoints=model.state_dict())
    attributor = IFAttributorHyperINF(task, method="exact", damping="datainf")
    train_loader = DataLoader(TensorDataset(*train), batch_size=4)
    attributor.cache(train_loader)
    got = attributor.attribute(train_loader, DataLoader(TensorDataset(*test), batch_size=3))
    ours = HyperINF(model, method="exact", damping="datainf", loss_fn=classification_loss, progress=False)
    want = ours.fit(dict_loader(train, 3)).scores(dict_loader(test, 2))
    torch.testing.assert_close(got, -want.T, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_layout_round_trip_and_transpose():
    model = tiny_model()
    blocks = lora_blocks(model, layers=None, include_heads=True)
    kinds = {b.layer.kind for b in blocks}
    assert kinds == {"lora_A", "lora_B", "head"}
    for b in blocks:
        flat = torch.randn(3, b.numel, dtype=torch.float64)
        g = b.rank_first(flat)
        assert g.shape == (3, b.layer.rank, b.layer.dim)
        # a pure reshape/transpose/slice: bit-exact by construction
        torch.testing.assert_close(b.flatten(g), flat, rtol=0, atol=0)
        w = flat[:, : b.layer.module.weight.numel()].reshape(3, *b.layer.module.weight.shape)
        if b.layer.kind == "lora_B":  # weight [d_out, r] → rank-first [r, d_out]
            torch.testing.assert_close(g, w.transpose(1, 2), rtol=0, atol=0)
        elif b.layer.kind == "head":  # weight [out, in] and bias [out] → [out, in + 1]
            torch.testing.assert_close(g[:, :, :-1], w, rtol=0, atol=0)
            torch.testing.assert_close(g[:, :, -1], flat[:, -b.layer.rank :], rtol=0, atol=0)


def test_bad_input():
    model = tiny_model()
    task = AttributionTask(loss_func=dattri_loss(model), model=model, checkpoints=model.state_dict())
    with pytest.raises(ValueError, match="method"):
        IFAttributorHyperINF(task, method="datainf")
    with pytest.raises(ValueError, match="damping"):
        IFAttributorHyperINF(task, damping="nope")
    with pytest.raises(ValueError, match="match no gradient layer"):
        IFAttributorHyperINF(task, layers=["nonexistent"])
    attributor = IFAttributorHyperINF(task)
    loader = DataLoader(TensorDataset(*make_data(4, 3)), batch_size=2)
    with pytest.raises(RuntimeError, match="cache"):
        attributor.attribute(loader, loader)
    with pytest.raises(ValueError, match="flat LoRA gradients"):
        attributor._split(torch.zeros(2, 5, dtype=torch.float64))

    plain = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    plain_task = AttributionTask(loss_func=dattri_loss(plain), model=plain, checkpoints=plain.state_dict())
    with pytest.raises(ValueError, match="no active LoRA layers"):
        IFAttributorHyperINF(plain_task)

    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        IFAttributorHyperINF(AttributionTask(loss_func=dattri_loss(model), model=model, checkpoints=model.state_dict()))


def test_several_checkpoints_average(float64_default):
    """dattri averages attribute() over the task's checkpoints; factors are fitted per checkpoint."""
    model = tiny_model()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    second = {k: (v + 0.2 * torch.randn_like(v)) if "lora_" in k else v.clone() for k, v in first.items()}
    train, test = make_data(6, 4), make_data(2, 5)
    task = AttributionTask(loss_func=dattri_loss(model), model=model, checkpoints=[first, second])
    attributor = IFAttributorHyperINF(task, method="exact")
    loader = DataLoader(TensorDataset(*train), batch_size=4)
    attributor.cache(loader)
    got = attributor.attribute(loader, DataLoader(TensorDataset(*test), batch_size=2))
    want = []
    for state in (first, second):
        model.load_state_dict(state)
        ours = HyperINF(model, method="exact", loss_fn=classification_loss, progress=False).fit(dict_loader(train, 6))
        want.append(-ours.scores(dict_loader(test, 2)).T)
    assert not torch.allclose(want[0], want[1], rtol=1e-3, atol=0)  # the checkpoints really differ
    scale = float(torch.stack(want).abs().max())
    # method exact on both sides (solves, ~d·u·κ) and one float64 average: 1e-5·scale as above; a
    # checkpoint dropped from the average is off by |want0 − want1|/2, ≥ 1e-3 relative (asserted above)
    torch.testing.assert_close(got, (want[0] + want[1]) / 2, rtol=0, atol=1e-5 * scale)


def dict_loss(model):
    """The task's loss for dict batches: the adapter hands loss_func each example as a dict."""
    per_tuple = dattri_loss(model)

    def loss_func(params, data):
        return per_tuple(params, (data["input_ids"], data["attention_mask"], data["labels"]))

    return loss_func


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, data):
        self.ids, self.mask, self.labels = data

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def test_batch_formats(float64_default):
    """Tuples (dattri's own examples: a TensorDataset), lists and this library's dicts give the same scores;
    anything else is a ValueError naming the formats (never an AttributeError from inside dattri)."""
    model = tiny_model()
    train, test = make_data(6, 6), make_data(3, 7)
    results = []
    for loss, wrap in ((dattri_loss, lambda d: TensorDataset(*d)), (dict_loss, DictDataset)):
        task = AttributionTask(loss_func=loss(model), model=model, checkpoints=model.state_dict())
        attributor = IFAttributorHyperINF(task, method="exact")
        attributor.cache(DataLoader(wrap(train), batch_size=4))
        results.append(attributor.attribute(DataLoader(wrap(train), batch_size=4),
                                            DataLoader(wrap(test), batch_size=2)))
        if loss is dattri_loss:  # lists of tensors, as a collate_fn may give them
            as_lists = [list(b) for b in DataLoader(wrap(train), batch_size=4)]
            attributor.cache(as_lists)
            results.append(attributor.attribute(DataLoader(wrap(train), batch_size=4),
                                                DataLoader(wrap(test), batch_size=2)))
    # the same float64 per-example gradients (the dict path only renames the loss's inputs) and the same
    # exact solves: equal to rounding, ≤ 1e-10 of the largest score (a wrong example order is O(1) off)
    scale = float(results[0].abs().max())
    assert scale > 0
    for got in results[1:]:
        torch.testing.assert_close(got, results[0], rtol=0, atol=1e-10 * scale)

    task = AttributionTask(loss_func=dattri_loss(model), model=model, checkpoints=model.state_dict())
    attributor = IFAttributorHyperINF(task)
    with pytest.raises(ValueError, match="batches must be a tuple or list of tensors.*or a dict"):
        attributor.cache([["not", "tensors"]])
    with pytest.raises(ValueError, match="batches must be"):
        attributor.cache([{"input_ids": "text"}])
    attributor.cache(DataLoader(TensorDataset(*train), batch_size=4))
    with pytest.raises(ValueError, match="train_dataloader: dattri's attribute needs a torch DataLoader"):
        attributor.attribute([tuple(train)], DataLoader(TensorDataset(*test), batch_size=2))
    # dattri puts batch b's scores at rows b·batch_size...: a loader that drops its last rows, or whose dict
    # batches name other rows (this library's 'index', from a sorting sampler), is refused
    with pytest.raises(ValueError, match="train_dataloader: drop_last=True leaves the last rows"):
        attributor.attribute(DataLoader(TensorDataset(*train), batch_size=4, drop_last=True),
                             DataLoader(TensorDataset(*test), batch_size=2))

    class Indexed(DictDataset):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "index": torch.tensor(i)}

    indexed = AttributionTask(loss_func=dict_loss(model), model=model, checkpoints=model.state_dict())
    attributor = IFAttributorHyperINF(indexed, method="exact")
    attributor.cache(DataLoader(Indexed(train), batch_size=4))
    in_order = attributor.attribute(DataLoader(Indexed(train), batch_size=4),
                                    DataLoader(DictDataset(test), batch_size=2))
    torch.testing.assert_close(in_order, results[0], rtol=0, atol=1e-10 * scale)
    with pytest.raises(ValueError, match=r"a batch's 'index' is \[5, 4, 3, 2\]\.\.\., but dattri places its "
                                         r"scores at rows 0\.\.3"):
        attributor.attribute(DataLoader(Indexed(train), batch_size=4, sampler=list(range(5, -1, -1))),
                             DataLoader(DictDataset(test), batch_size=2))
