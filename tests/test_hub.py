"""The hub probe (streaming_llm/hub.py): a machine that cannot reach the Hugging Face hub loads a hub id or a dataset
from the local cache at once, or says in one line that it is not there, instead of after huggingface_hub's retries
(measured here, offline: 51 s for an uncached model id, 2 min for a cached one, 27 s for a dataset name)."""

import socket

import pytest
from huggingface_hub import constants

from streaming_llm import hub


@pytest.fixture
def no_network(monkeypatch):
    """A user who did not set HF_HUB_OFFLINE (the tests do) on a machine that cannot reach the hub; any connection
    attempt fails the test at once (no retry loop can swallow it)."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_probe_connects_to_the_endpoint_and_honours_offline_mode_and_proxies(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub.hub_host() == "127.0.0.1"
    assert hub.hub_reachable(timeout_s=2.0)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not hub.hub_reachable(timeout_s=2.0)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server.close()
    assert not hub.hub_reachable(timeout_s=2.0)  # nothing listens there now
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub.hub_reachable(timeout_s=2.0)  # behind a proxy, a direct connection proves nothing


def test_the_probe_takes_the_scheme_s_port_when_the_endpoint_names_none(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    tried = []

    def refuse(address, timeout):
        tried.append(address)
        raise OSError("refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for endpoint in ("https://hub.example", "http://mirror.example", "http://mirror.example:8080"):
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        assert hub.hub_reachable(timeout_s=0.1) is False
    assert tried == [("hub.example", 443), ("mirror.example", 80), ("mirror.example", 8080)]


def test_offline_mode_is_set_only_within_and_only_when_unreachable(monkeypatch):
    import datasets

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    with hub.offline_unless_reachable() as went_offline:
        assert not went_offline and not constants.HF_HUB_OFFLINE
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(KeyError), hub.offline_unless_reachable() as went_offline:
        assert went_offline and constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
        raise KeyError("restored on the way out too")
    assert not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE


@pytest.fixture
def hub_cache(tmp_path, llama_model, monkeypatch):
    """A Hugging Face hub cache holding one tiny model, "tiny/llama" (word-level tokenizer of its 128 tokens)."""
    from tiny_models import tokenizer_of

    snapshot = tmp_path / "hub" / "models--tiny--llama" / "snapshots" / "0123abcd"
    llama_model.save_pretrained(snapshot)
    tokenizer_of(["[UNK]", *(f"w{i}" for i in range(1, 128))], bos=None).save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_an_unreachable_hub_loads_a_cached_model_without_touching_the_network(hub_cache, no_network):
    from streaming_llm import load_model

    model, tokenizer = load_model("tiny/llama")
    assert model.config.model_type == "llama" and len(tokenizer) == 128
    assert not constants.HF_HUB_OFFLINE  # offline only while loading
    with pytest.raises(ValueError, match="could not load model 'tiny/absent': the hub .* cannot be reached from this "
                                         "machine and the model is not in the local Hugging Face cache"):
        load_model("tiny/absent")


def test_an_unreachable_hub_names_itself_for_a_dataset(no_network):
    from streaming_llm.data import load_text

    with pytest.raises(ValueError, match="dataset 'someone/absent' could not be loaded: the hub .* cannot be reached"):
        load_text("someone/absent")


def test_a_dataset_not_cached_under_hf_hub_offline_says_it_needs_the_network(monkeypatch):
    """With HF_HUB_OFFLINE=1 set by the user, an uncached dataset was "could not be loaded (ConnectionError: ...). Is
    the hub reachable, or the dataset cached (then set HF_HUB_OFFLINE=1)?", asking for the setting already made."""
    import datasets

    from streaming_llm.data import load_text

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as error:
        load_text("someone/absent")
    assert str(error.value).startswith("dataset 'someone/absent' could not be loaded: HF_HUB_OFFLINE is set and the "
                                       "dataset is not in the local Hugging Face cache: it needs the network")
    assert "then set HF_HUB_OFFLINE" not in str(error.value)
