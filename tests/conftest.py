import pytest
import torch

CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ],
)
DEVICES = ["cpu", CUDA]


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _float32_on_every_cpu(monkeypatch):
    """``precision: auto`` is float32 on the CPU in tests, whatever bf16 the CPU has.

    Tests that compare fits to tight tolerances then hold on every machine; those about bf16
    ask for it (``precision: bf16-mixed``) or patch the detection themselves.
    """
    monkeypatch.setattr("deepdewedge.pipeline.common.has_native_bf16", lambda: False)
