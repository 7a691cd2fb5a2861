"""Session fixtures: the tiny models of tiny_models.py, built once."""

from __future__ import annotations

import os
import signal
import sys
import threading

# Before transformers (and huggingface_hub, which reads it once) is imported: no test reaches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # `import reference, tiny_models` under any pytest import mode

from tiny_models import ARCHITECTURES, build_gpt_neox, build_llama  # noqa: E402

# The tests run tiny models: one thread is faster than two (and far faster on a busy machine).
torch.set_num_threads(1)

# Under CI the property tests draw the same examples every run (their seed follows the test), so that a run fails
# on a change, not on a draw; elsewhere each run draws new ones, and a failure found is kept as an @example.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# A shell that starts a command in the background without job control (`cmd &` in a script, nohup) starts it with
# Ctrl-C ignored, and its children inherit that: the tests of what Ctrl-C does (here and in the programs they start)
# then failed. They get Python's own handler back, as an interactive run has; a process started with it on passes
# SIGINT's default on to its children.
if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) == signal.SIG_IGN):
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the README's test command): one worker a CPU, four at most. Each worker runs one thread (above),
    builds its own session fixtures and holds their memory, and its CLI tests start their own Pythons.
    PYTEST_XDIST_AUTO_NUM_WORKERS, where set, decides instead (xdist's own hook reads it)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _no_grad():
    """Every test runs without autograd."""
    with torch.no_grad():
        yield


_CHANGED_MODELS: set[int] = set()  # the session models a test was already failed for changing


@pytest.fixture(autouse=True)
def _session_models_stay_as_built(request):
    """The session's tiny models are shared by every test of a worker: a test that hands one to the package (which
    switches its attention to the streaming one) changes it for the tests after it, an order-dependent failure. The
    first test to change one fails here, by name; it should stream a copy (copy.deepcopy)."""
    yield
    for name in ("llama_model", "gpt_neox_model"):  # also where the `model` fixture asked for them
        if name not in request.fixturenames:
            continue
        model = request.getfixturevalue(name)
        implementation = model.config._attn_implementation
        if implementation != "eager" and id(model) not in _CHANGED_MODELS:
            _CHANGED_MODELS.add(id(model))
            pytest.fail(f"{request.node.nodeid} changed the session's {name} (attention {implementation!r}): stream "
                        "a copy", pytrace=False)


@pytest.fixture(scope="session")
def llama_model():
    """Never passed to the package: the dense runs and the naive reference use it as-is (checked after each test)."""
    return build_llama()


@pytest.fixture(scope="session")
def gpt_neox_model():
    return build_gpt_neox()


@pytest.fixture(params=ARCHITECTURES)
def model(request) -> torch.nn.Module:
    """Each tiny architecture in turn."""
    return request.getfixturevalue(f"{request.param}_model")




@pytest.fixture(scope="session")
def embedded_load():
    """load_model(None), run once per session, with transformers' GGUF reads counted (~18 s; the count costs nothing).

    The tokenizer's per-process copy is dropped first, so that this load reads the tokenizer too, as a process's first
    load does: tests/test_validation.py holds the load to one parse of the GGUF file and one tensor-name map (a load of
    its own cost that test another ~7 s). Returns the model, the tokenizer, the files parsed, the name maps built, and
    whether the gguf module still held the (counting) functions the load found there when it returned. No skip: the
    embedded model is part of the installation, so failing to load it is a failure.
    """
    from types import SimpleNamespace

    import gguf

    from streaming_llm import loading

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parses, maps = [], []

    def counted_reader(path, *args):
        parses.append(path)
        return reader_class(path, *args)

    def counted_map(*args):
        maps.append(args)
        return name_map(*args)

    gguf.GGUFReader, gguf.get_tensor_name_map = counted_reader, counted_map
    try:
        loading._read_embedded_tokenizer.cache_clear()  # the tokenizer is read once per process: read it here
        model, tokenizer = loading.load_model(None)
        given_back = gguf.GGUFReader is counted_reader and gguf.get_tensor_name_map is counted_map
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
    return SimpleNamespace(model=model, tokenizer=tokenizer, parses=parses, maps=maps, given_back=given_back)


@pytest.fixture(scope="session")
def embedded_model(embedded_load):
    """The real embedded SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer, loaded once (embedded_load)."""
    return embedded_load.model, embedded_load.tokenizer
