"""Test-session set-up shared by every test module.

TRITON_INTERPRET must be set before triton is first imported for the Triton kernels to run on CPU
tensors; the tests run the kernels through the interpreter (numbers) and compile them ahead of time
for sm_80/sm_90 (code generation).

HYPERINF_TEST_DEVICE=cuda (set by the GPU check, bench/gpu.py, with TRITON_INTERPRET=0) makes CUDA
the default device of every test, so the tests that build their tensors with the factory functions
(tests/ops/test_triton_kernels.py) run the compiled kernels on the GPU against the same float64 references.
"""
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TEST_DEVICE = os.environ.get("HYPERINF_TEST_DEVICE", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # An unusable device (a typo, no GPU on this machine) fails the session at once with one message,
    # rather than every test with a device error of its own.
    if TEST_DEVICE != "cpu":
        try:
            torch.empty(0, device=TEST_DEVICE)
        except (RuntimeError, AssertionError) as e:
            raise pytest.UsageError(f"HYPERINF_TEST_DEVICE={TEST_DEVICE!r} is not usable here: {e}") from None
    # The C++ ops' tests skip where hyperinf_ext._C is not built (a source checkout); under CI they must not:
    # a build that silently failed would turn a few hundred tests into skips and still pass.
    if os.environ.get("CI"):
        from hyperinf_ext.backends import cpp

        if not cpp.is_available():
            raise pytest.UsageError("CI is set but hyperinf_ext._C (the C++ ops) is not built or does not load: "
                                    "run `bash scripts/setup.sh` (or `pip install --no-build-isolation -e .`)")


def pytest_report_header(config):
    lines = [f"HYPERINF_TEST_DEVICE={TEST_DEVICE} (default device of every test), "
             f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}"]
    # the resolved versions and what moved since scripts/known-good.txt, so a red run names its suspects
    # even when pytest is started directly rather than through scripts/test.sh
    script = Path(__file__).resolve().parents[1] / "scripts" / "versions.py"
    if script.is_file():
        spec = importlib.util.spec_from_file_location("hyperinf_versions_script", script)
        versions = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(versions)
        lines += versions.report(versions.resolved(), versions.read_known_good()).splitlines()
    return lines


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _test_device():
    if TEST_DEVICE == "cpu":
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device(TEST_DEVICE)
    try:
        yield
    finally:
        torch.set_default_device(previous)
