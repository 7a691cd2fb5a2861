"""Session fixtures: the tiny models of tiny_models.py, built once."""

from __future__ import annotations

import os
import sys

# Before transformers (and huggingface_hub, which reads it once) is imported: no test reaches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # `import reference, tiny_models` under any pytest import mode

from tiny_models import ARCHITECTURES, build_gpt_neox, build_llama  # noqa: E402

# The tests run tiny models: one thread is faster than two (and far faster on a busy machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_grad():
    """Every test runs without autograd."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def llama_model():
    """Never passed to the package: the dense runs and the naive reference use it as-is."""
    return build_llama()


@pytest.fixture(scope="session")
def gpt_neox_model():
    return build_gpt_neox()


@pytest.fixture(params=ARCHITECTURES)
def model(request) -> torch.nn.Module:
    """Each tiny architecture in turn."""
    return request.getfixturevalue(f"{request.param}_model")




@pytest.fixture(scope="session")
def embedded_model():
    """The real embedded SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer, loaded once (~18 s).

    No skip: the embedded model is part of the installation, so failing to load it is a failure.
    """
    from streaming_llm.loading import load_model

    return load_model(None)
