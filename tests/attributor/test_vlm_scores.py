"""HyperINF on tiny random vision-language models (LLaVA, Idefics3) against a float64 brute force.

LoRA sits on the language model's q/v projections, on every linear layer of the multimodal projector
and on the vision tower's q/v projections.  Per-example gradients come from a batch-size-1 autograd
loop (each example alone, unpadded, with its own images) with the loss written out by hand: the mean
next-token cross-entropy over the labelled (response) tokens, from float64 logits.  The GFIM + damping
is solved by torch.linalg.solve; scores must equal ``HyperINF(method="exact").scores`` to 1e-8.

Float64 end to end: SDPA attention everywhere and LlamaRMSNorm patched to compute in its input dtype
(transformers' casts to float32 and back, rounding every backpropagated signal to float32, which
separates the batched pass from the per-example loop by ~1e-7).  Training batches hold three examples
with one image each (the vision tower and projector then see one row per example); the queries run
one by one, and one of them has two images (those layers then see two rows for the one example).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _numerics import float64_rms_norms  # noqa: E402
from tiny_vlm import KINDS, build_model, build_processor, make_vlm_tokenizer, write_images  # noqa: E402

from hyperinf_ext import HyperINF  # noqa: E402
from hyperinf_ext.app.data.vlm import VLMDataset, encode_vlm, make_vlm_loader  # noqa: E402
from hyperinf_ext.app.models.vlm import vlm_lora_targets  # noqa: E402
from hyperinf_ext.capture import PerSampleGradients, find_gradient_layers  # noqa: E402

N_TRAIN, N_QUERY = 6, 3


def tiny_lora_vlm(kind):
    tok = make_vlm_tokenizer(kind)
    base = build_model(kind, tok, seed=0, attn="sdpa").double()
    targets = vlm_lora_targets(base, projector=True, vision=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    float64_rms_norms(model)
    return model.eval(), build_processor(kind, tok)


def dataset(images, n, offset, two_images_at=None):
    prompts, responses, imgs = [], [], []
    for i in range(n):
        j = offset + i
        colour = images[j % len(images)].stem.split("_")[-1]
        prompts.append([{"role": "user", "content": "what colour is the square" if j % 2 else "describe the picture"}])
        responses.append(colour if j % 2 else f"a {colour} square")
        extra = [str(images[(j + 1) % len(images)])] if i == two_images_at else []
        imgs.append([str(images[j % len(images)])] + extra)
    return VLMDataset.from_examples(prompts, responses, imgs)


@pytest.fixture(scope="module", params=KINDS)
def setup(request, tmp_path_factory):
    kind = request.param
    images = write_images(tmp_path_factory.mktemp(f"img_{kind}"), 6)
    model, proc = tiny_lora_vlm(kind)
    train, query = dataset(images, N_TRAIN, 0), dataset(images, N_QUERY, 3, two_images_at=1)
    train_enc, query_enc = encode_vlm(train, proc), encode_vlm(query, proc)
    train_loader = make_vlm_loader(train, proc, train_enc, batch_size=3)
    query_loader = make_vlm_loader(query, proc, query_enc, batch_size=1)
    return kind, model, proc, train_loader, query_loader


def brute_gradients(model, layers, loader):
    """{layer: [n, r, d]} from each example alone (its own unpadded tokens and images), loss by hand."""
    out = {l.name: {} for l in layers}
    for batch in loader:
        for b in range(batch["input_ids"].shape[0]):
            L = int(batch["attention_mask"][b].sum())
            ids = batch["input_ids"][b : b + 1, :L]
            one = _one_example_images(batch, b)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **one).logits[0]
            assert logits.dtype == torch.float64
            target = batch["labels"][b, 1:L]
            keep = target != -100
            loss = F.cross_entropy(logits[:-1][keep], target[keep])
            for l in layers:
                gw = torch.autograd.grad(loss, l.module.weight, retain_graph=True)[0]
                out[l.name][int(batch["index"][b])] = (gw.T if l.kind == "lora_B" else gw).detach()
    return {k: torch.stack([v[i] for i in sorted(v)]) for k, v in out.items()}


def _one_example_images(batch, b):
    """Example ``b``'s image tensors: its slice of the concatenated images (LLaVA) or of the batch axis (Idefics3)."""
    pv = batch["pixel_values"]
    if pv.dim() == 5:
        return {"pixel_values": pv[b : b + 1], "pixel_attention_mask": batch["pixel_attention_mask"][b : b + 1]}
    # LLaVA: one image per example in these batches, or a batch of one
    n = batch["input_ids"].shape[0]
    return {"pixel_values": pv[b : b + 1] if n > 1 else pv}


def test_labels_cover_response_tokens_only(setup):
    kind, _, proc, train_loader, _ = setup
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    for batch in train_loader:
        labels, ids = batch["labels"], batch["input_ids"]
        assert not bool((labels == image_id).any())
        assert bool((ids == image_id).any(1).all())
        for b in range(ids.shape[0]):
            lab = labels[b][labels[b] != -100]
            text = proc.tokenizer.decode(lab)
            assert "<|im_end|>" in text and "<image>" not in text and "what" not in text, text


def test_per_example_gradients_match_brute_force(setup):
    kind, model, _, train_loader, query_loader = setup
    layers = find_gradient_layers(model)
    assert any("projector" in l.name or "connector" in l.name for l in layers)
    assert any("vision" in l.name for l in layers)
    for loader in (train_loader, query_loader):
        ref = brute_gradients(model, layers, loader)
        got = {l.name: {} for l in layers}
        with PerSampleGradients(model, layers) as psg:
            for batch in loader:
                g = psg.compute(batch)
                for name, v in g.items():
                    for r, i in enumerate(batch["index"].tolist()):
                        got[name][i] = v[r]
        for name, r in ref.items():
            assert r.abs().max() > 0, name
            g = torch.stack([got[name][i] for i in sorted(got[name])])
            assert (g - r).abs().max() <= 1e-10 * r.abs().max(), (kind, name)


def test_exact_scores_equal_brute_force(setup):
    kind, model, _, train_loader, query_loader = setup
    attr = HyperINF(model, method="exact", damping="datainf", progress=False).fit(train_loader)
    layers = attr.layers
    gt, gq = brute_gradients(model, layers, train_loader), brute_gradients(model, layers, query_loader)
    ref = torch.zeros(N_QUERY, N_TRAIN, dtype=torch.float64)
    for l in layers:
        g = gt[l.name]
        lam = 0.1 * float((g**2).mean())  # the "datainf" damping rule
        G = torch.einsum("nri,nrj->ij", g, g) / g.shape[0] + lam * torch.eye(g.shape[2], dtype=torch.float64)
        q = gq[l.name]
        pre = torch.linalg.solve(G, q.reshape(-1, G.shape[0]).T).T.reshape(q.shape)
        ref -= torch.einsum("qrd,nrd->qn", pre, g)
    s = attr.scores(query_loader)
    assert s.shape == (N_QUERY, N_TRAIN) and s.dtype == torch.float64
    assert (s - ref).abs().max() <= 1e-8 * ref.abs().max(), kind


def test_a_batch_whose_examples_hold_different_image_counts_is_refused(setup):
    """LLaVA's vision tower sees one row per image: an example with two images beside one with none makes as
    many rows as examples, so the shape check passed and the text-only example got the second image's
    gradient (77–110 % off on 8 of 16 layers).  Refused now, naming the image-token counts."""
    kind, model, _, _, query_loader = setup
    if kind != "llava":
        pytest.skip("LLaVA concatenates a batch's images (Idefics3 keeps an image axis per example)")
    two = [b for b in query_loader if b["pixel_values"].shape[0] == 2][0]  # one example, two images
    token = model.get_base_model().config.image_token_index
    ids = two["input_ids"].repeat(2, 1)
    ids[1][ids[1] == token] = int(ids[0, 0])  # the second row: the same text, no image
    batch = {**{k: v.repeat(2, 1) for k, v in two.items() if k in ("attention_mask", "labels")},
             "input_ids": ids, "pixel_values": two["pixel_values"], "index": torch.tensor([0, 1])}
    layers = find_gradient_layers(model)
    n_tokens = int((ids[0] == token).sum())
    with PerSampleGradients(model, layers) as psg:
        with pytest.raises(RuntimeError, match=rf"hold \[{n_tokens}, 0\] image tokens.*one image each"):
            psg.compute(batch)
