"""Saved factors carry the fingerprint of the adapter weights they were fitted on: loading them onto other
adapter weights of the same shapes is a ValueError naming both fingerprints, unless the caller says so
with ``allow_other_weights=True``; saves from before the fingerprint load with a warning (issue #24)."""
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


def test_factors_refuse_other_adapter_weights(tmp_path):
    fitted_on = model()
    attr = HyperINF(fitted_on, progress=False).fit(batches())
    attr.save(tmp_path)
    saved = json.loads((tmp_path / META).read_text())["adapter_sha256"]
    assert isinstance(saved, str) and len(saved) == 64

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same weights load silently
        same = HyperINF.load(tmp_path, fitted_on, progress=False)
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
    meta = json.loads((tmp_path / META).read_text())
    del meta["adapter_sha256"]
    (tmp_path / META).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no adapter fingerprint"):
        assert HyperINF.load(tmp_path, other, progress=False).n_train == attr.n_train
