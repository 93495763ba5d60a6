"""Tiny random vision-language models with their processors, built offline (nothing downloaded).

Two layouts, as in transformers:

* LLaVA (``LlavaForConditionalGeneration``): CLIP vision tower → ``multi_modal_projector`` (two linear
  layers) → Llama; 8×8 images, 4×4 patches, ``<image>`` expanded to 4 tokens.
* Idefics3 / SmolVLM (``Idefics3ForConditionalGeneration``): SigLIP-style ``vision_model`` → ``connector``
  (pixel shuffle + one linear ``modality_projection``) → Llama (``text_model``); 5-D ``pixel_values
  [batch, images, 3, H, W]`` with ``pixel_attention_mask``; 8×8 images, 2×2 patches, shuffled 2×2 →
  4 ``<image>`` tokens between ``<fake_token_around_image><global-img>`` and ``<fake_token_around_image>``.
  (Qwen2-VL builds too, but its processor needs torchvision for the video processor, absent here.)

Both share one word-level tokenizer (:func:`make_vlm_tokenizer`); :func:`make_tiny_vlm` saves model +
processor (tokenizer, image processor, chat template) into a folder ``AutoProcessor`` and
``AutoModelForImageTextToText`` load.  :func:`write_images` writes small PNGs (PIL).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("what is in the image describe colour shape a red green blue square circle dark light picture "
         "yes no it answer user assistant system").split()
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<fake_token_around_image>", "<global-img>",
            "<end_of_utterance>"]
IMAGE_MARK = {"llava": "<image>", "idefics3": "<image>"}
KINDS = ("llava", "idefics3")


def chat_template(kind: str) -> str:
    """``<|im_start|>role content<|im_end|>`` turns; an image entry of a content list becomes the image mark."""
    mark = IMAGE_MARK[kind]
    return ("{% for m in messages %}<|im_start|>{{ m['role'] }} "
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}" + mark + " {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def make_vlm_tokenizer(kind: str = "llava"):
    """PreTrainedTokenizerFast over a WordLevel vocabulary (specials first, then :data:`WORDS`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("<|im_start|>", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=SPECIALS[2:], extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = chat_template(kind)
    return fast


def _text_config(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=None)


def build_model(kind: str, tok, *, seed: int = 0, attn: str = "sdpa"):
    """A random tiny VLM of ``kind`` (``"llava"`` or ``"idefics3"``) for the vocabulary of ``tok``."""
    import transformers as T

    ids = tok.convert_tokens_to_ids
    if kind == "llava":
        cfg = T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=8, patch_size=4, projection_dim=16),
            text_config=T.LlamaConfig(**_text_config(tok)), image_token_id=ids("<image>"),
            vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
        cls = T.LlavaForConditionalGeneration
    elif kind == "idefics3":
        cfg = T.Idefics3Config(
            vision_config=T.Idefics3VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=8, patch_size=2),
            text_config=T.LlamaConfig(**_text_config(tok)), image_token_id=ids("<image>"), scale_factor=2,
            tie_word_embeddings=False)
        cls = T.Idefics3ForConditionalGeneration
    else:
        raise ValueError(kind)
    cfg._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


def build_processor(kind: str, tok=None):
    import transformers as T

    tok = tok or make_vlm_tokenizer(kind)
    if kind == "llava":
        ip = T.CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
        return T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=4,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=chat_template(kind))
    ip = T.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 8},
                                  max_image_size={"longest_edge": 8})
    return T.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=chat_template(kind))


def make_tiny_vlm(folder: Path, kind: str = "llava", *, seed: int = 0) -> Path:
    """Save a random tiny VLM of ``kind`` and its processor into ``folder``; returns ``folder``."""
    tok = make_vlm_tokenizer(kind)
    proc = build_processor(kind, tok)
    model = build_model(kind, tok, seed=seed)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    proc.save_pretrained(str(folder))
    return folder


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_images(folder: Path, n: int = 6, size: int = 8, seed: int = 0) -> list[Path]:
    """``n`` small PNGs (a coloured square on a noisy background), named ``img<i>_<colour>.png``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    names = list(COLOURS)
    out = []
    for i in range(n):
        colour = names[i % len(names)]
        px = torch.randint(0, 60, (size, size, 3), generator=g, dtype=torch.uint8)
        px[1:size - 1, 1:size - 1] = torch.tensor(COLOURS[colour], dtype=torch.uint8)
        path = folder / f"img{i}_{colour}.png"
        Image.fromarray(px.numpy()).save(path)
        out.append(path)
    return out


def vlm_rows(images: list[Path], *, relative_to: Path | None = None) -> list[dict]:
    """One prompt/response row per image: "what colour is the square" → its colour."""
    rows = []
    for i, p in enumerate(images):
        colour = p.stem.split("_")[-1]
        name = str(p.relative_to(relative_to)) if relative_to else str(p)
        if i % 3 == 2:
            rows.append({"image": name, "messages": [{"role": "user", "content": "describe the colour of the square"},
                                                      {"role": "assistant", "content": f"a {colour} square"}]})
        else:
            rows.append({"image": name, "prompt": "what colour is the square", "response": colour})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
