"""Saved factors carry the fingerprint of the adapter weights they were fitted on: loading them onto other
adapter weights of the same shapes is a ValueError naming both fingerprints, unless the caller says so
with ``allow_other_weights=True``; saves from before the fingerprint load with a warning (issue #24).
The same for the rest of the model (every weight outside the attributed layers): another base checkpoint
or dtype is refused, while the same model loaded frozen or fully trainable is not."""
import json
import warnings

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.persistence import META  # noqa: E402
from tiny_bert import tiny_bert_lora  # noqa: E402

VOCAB = 30


def model(seed=0):
    return tiny_bert_lora(vocab=VOCAB, hidden=12, intermediate=16, max_positions=16, rank=2, seed=seed)


def batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (n, 5), generator=g),
             "attention_mask": torch.ones(n, 5, dtype=torch.long),
             "labels": torch.randint(0, 2, (n,), generator=g), "index": torch.arange(n)}]


def forget(directory, key):
    """The save as an older version wrote it: without ``key`` in its manifest."""
    meta = json.loads((directory / META).read_text())
    del meta[key]
    (directory / META).write_text(json.dumps(meta))


def load_quietly(directory, m):
    """``HyperINF.load`` with no warning about fingerprints (others, e.g. transformers' deprecations, pass)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loaded = HyperINF.load(directory, m, progress=False)
    assert not [w for w in seen if "fingerprint" in str(w.message)]
    return loaded


def test_factors_refuse_other_adapter_weights(tmp_path):
    fitted_on = model()
    attr = HyperINF(fitted_on, progress=False).fit(batches())
    attr.save(tmp_path)
    saved = json.loads((tmp_path / META).read_text())["adapter_sha256"]
    assert isinstance(saved, str) and len(saved) == 64

    same = load_quietly(tmp_path, fitted_on)  # the same weights load silently
    # the factors themselves are read back bit for bit (safetensors round trip: slack 0)
    for name, f in attr.factors.items():
        torch.testing.assert_close(same.factors[name].gfim_sum, f.gfim_sum, rtol=0, atol=0)

    other = model()  # same shapes, another adapter: the LoRA weights moved
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "lora_" in n:
                p.add_(0.1)
    theirs = HyperINF(other, progress=False)._adapter_digest()
    assert theirs != saved
    with pytest.raises(ValueError, match=f"other adapter weights.*{saved}.*{theirs}.*allow_other_weights=True"):
        HyperINF.load(tmp_path, other, progress=False)
    assert HyperINF.load(tmp_path, other, progress=False, allow_other_weights=True).n_train == attr.n_train

    # a save from before the fingerprint: loads, with a warning that it cannot be checked
    forget(tmp_path, "adapter_sha256")
    with pytest.warns(UserWarning, match="no adapter fingerprint"):
        assert HyperINF.load(tmp_path, other, progress=False).n_train == attr.n_train


def test_factors_refuse_another_base_but_not_the_same_model_loaded_frozen(tmp_path):
    fitted_on = model()
    attr = HyperINF(fitted_on, progress=False).fit(batches())
    attr.save(tmp_path)
    saved = json.loads((tmp_path / META).read_text())["base_sha256"]
    assert isinstance(saved, str) and len(saved) == 64

    # what requires grad depends on how the model was loaded (PeftModel.from_pretrained freezes the adapter
    # too; a plain fine-tune leaves everything trainable): none of it is another model
    for flag in (False, True):
        same = model()
        for p in same.parameters():
            p.requires_grad_(flag)
        loaded = load_quietly(tmp_path, same)
        assert torch.equal(loaded.scores(batches(seed=1), batches()), attr.scores(batches(seed=1)))

    def moved(where):
        m = model()
        with torch.no_grad():
            next(p for n, p in m.named_parameters() if where(n) and p.dim() == 2).add_(0.1)
        return m

    # float32 rounds the adapter's values too, so the adapter check may speak first
    others = {"base weight": (moved(lambda n: "lora_" not in n and "classifier" not in n), "base"),
              "dtype": (model().float(), "(adapter|base)")}
    for what, (other, which) in others.items():
        theirs = HyperINF(other, progress=False)._base_digest()
        assert theirs != saved, what
        both = f"{saved}.*{theirs}.*" if which == "base" else ""  # the base check names both fingerprints
        with pytest.raises(ValueError, match=f"other {which} weights .*{both}allow_other_weights=True"):
            HyperINF.load(tmp_path, other, progress=False)
        assert HyperINF.load(tmp_path, other, progress=False, allow_other_weights=True).n_train == attr.n_train

    # a save from before the base fingerprint: checked on the adapter alone, silently
    forget(tmp_path, "base_sha256")
    assert load_quietly(tmp_path, others["base weight"][0]).n_train == attr.n_train
