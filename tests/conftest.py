"""Test-session set-up shared by every test module.

TRITON_INTERPRET must be set before triton is first imported for the Triton kernels to run on CPU
tensors; the tests run the kernels through the interpreter (numbers) and compile them ahead of time
for sm_80/sm_90 (code generation).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
