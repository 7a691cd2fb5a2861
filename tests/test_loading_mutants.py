"""Behaviour of streaming_llm/loading.py that no other test pinned down (found by mutation testing): the GGUF header
reader on every value type, the special tokens a GGUF file declares, and the checks load_model makes before it reads
a model. GGUF files are written here by the gguf package's own writer (no tensors: the header is what is read)."""

from __future__ import annotations

import gguf
import pytest

from streaming_llm import loading
from tiny_models import tokenizer_of

EVERY_SCALAR = {  # GGUF value type: (key, value), one of each scalar type of the format
    gguf.GGUFValueType.UINT8: ("t.u8", 250),
    gguf.GGUFValueType.INT8: ("t.i8", -7),
    gguf.GGUFValueType.UINT16: ("t.u16", 65_000),
    gguf.GGUFValueType.INT16: ("t.i16", -30_000),
    gguf.GGUFValueType.UINT32: ("t.u32", 4_000_000_000),
    gguf.GGUFValueType.INT32: ("t.i32", -2_000_000_000),
    gguf.GGUFValueType.FLOAT32: ("t.f32", 0.5),
    gguf.GGUFValueType.BOOL: ("t.bool", True),
    gguf.GGUFValueType.UINT64: ("t.u64", 2**63 + 1),
    gguf.GGUFValueType.INT64: ("t.i64", -(2**62)),
    gguf.GGUFValueType.FLOAT64: ("t.f64", 0.1),
}


def _write_gguf(path, values: dict, arrays: dict | None = None):
    """A GGUF file (version 3, no tensors) holding `values` ({key: (type, value)}), then `arrays` ({key: (item type,
    items)}), then the string "t.last" = "end", which is read only if every value before it was walked past exactly."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (kind, value) in values.items():
        writer.add_key_value(key, value, kind)
    for key, (item_kind, items) in (arrays or {}).items():
        writer.add_key_value(key, items, gguf.GGUFValueType.ARRAY, sub_type=item_kind)
    writer.add_string("t.last", "end")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_the_gguf_header_reader_reads_every_scalar_type_and_walks_past_every_array(tmp_path):
    """gguf_metadata, not the gguf package, reads the special tokens of a GGUF file: each scalar type with its own
    width and sign, strings as UTF-8, and arrays (of numbers, of strings) skipped, so the values after them are
    still read."""
    values = {key: (kind, value) for kind, (key, value) in EVERY_SCALAR.items()}
    values["t.text"] = (gguf.GGUFValueType.STRING, "héllo, wörld")
    arrays = {
        "t.bytes": (gguf.GGUFValueType.UINT8, [1, 2, 3]),
        "t.doubles": (gguf.GGUFValueType.FLOAT64, [0.25, 0.5]),
        "t.words": (gguf.GGUFValueType.STRING, ["x", "yz", "ü"]),
    }
    path = _write_gguf(tmp_path / "every.gguf", values, arrays)
    found = loading.gguf_metadata(path)
    assert found == {"general.architecture": "llama", **{key: value for key, (_, value) in values.items()},
                     "t.last": "end"}
    assert found["t.f32"] == 0.5 and type(found["t.bool"]) is bool and found["t.f64"] == 0.1


def test_the_gguf_header_reader_takes_versions_2_and_3_only(tmp_path):
    """Versions 2 and 3 have the same header layout (64-bit lengths); version 1 (32-bit) and unknown later ones are
    refused, as is a file that is not GGUF."""
    path = _write_gguf(tmp_path / "v.gguf", {"t.u8": (gguf.GGUFValueType.UINT8, 1)})
    data = bytearray(path.read_bytes())
    for version, readable in ((1, False), (2, True), (3, True), (4, False)):
        data[4:8] = version.to_bytes(4, "little")
        path.write_bytes(bytes(data))
        if readable:
            assert loading.gguf_metadata(path) == {"general.architecture": "llama", "t.u8": 1, "t.last": "end"}
        else:
            with pytest.raises(ValueError, match="not a GGUF file of version 2 or 3"):
                loading.gguf_metadata(path)
    path.write_bytes(b"GGUG" + bytes(data[4:]))
    with pytest.raises(ValueError, match="not a GGUF file of version 2 or 3"):
        loading.gguf_metadata(path)


def test_a_gguf_files_special_tokens_are_taken_where_they_are_tokens(tmp_path):
    """The eos and pad token ids a GGUF file declares set the tokenizer's eos and pad tokens when they are ids of the
    tokenizer (0 and the last included); an id past it is ignored (the tokenizer's own token stays), and the clean-up
    is turned off."""
    vocab = ["[UNK]", "a", "b", "c"]
    cases = [(0, 3, "[UNK]", "c"), (3, 4, "c", "a")]  # (eos id, pad id, eos token, pad token)
    for eos_id, pad_id, eos_token, pad_token in cases:
        path = _write_gguf(tmp_path / f"special{eos_id}.gguf", {
            "tokenizer.ggml.eos_token_id": (gguf.GGUFValueType.UINT32, eos_id),
            "tokenizer.ggml.padding_token_id": (gguf.GGUFValueType.UINT32, pad_id),
        })
        tokenizer = tokenizer_of(vocab, bos=None)
        tokenizer.clean_up_tokenization_spaces, tokenizer.pad_token = True, "a"
        assert loading._as_the_file_declares(tokenizer, path) is tokenizer
        assert (tokenizer.eos_token, tokenizer.pad_token) == (eos_token, pad_token), eos_id
        assert not tokenizer.clean_up_tokenization_spaces


# --- what load_model takes a name for ----------------------------------------------------------------------------


@pytest.fixture
def llama_folder(llama_model, tmp_path):
    """A model folder named "llama" with the tiny Llama's config, weights and a 128-word tokenizer."""
    folder = tmp_path / "llama"
    llama_model.save_pretrained(folder)
    tokenizer_of(["[UNK]", *(f"w{i}" for i in range(1, 128))], bos=None).save_pretrained(folder)
    return folder


def test_a_folder_named_relative_to_the_working_directory_is_read_without_asking_the_hub(llama_folder, monkeypatch):
    """"llama" (no ./ in front) is the folder of that name when there is one, not a hub id: the hub is not probed."""
    def no_hub():
        raise AssertionError("the hub was probed for a local folder")

    monkeypatch.setattr(loading, "offline_unless_reachable", no_hub)
    monkeypatch.chdir(llama_folder.parent)
    model, tokenizer = loading.load_model("llama")
    assert model.config.model_type == "llama" and len(tokenizer) == 128


# --- Ctrl-C while loading ------------------------------------------------------------------------------------------


def test_loading_in_another_thread_leaves_signals_alone():
    """Python lets only the main thread set signal handlers: a model loaded in a worker thread (a server's) loads, with
    the handlers as they were."""
    import threading

    failures = []

    def load():
        try:
            with loading._interrupt_kept():
                pass
        except Exception as error:  # (a ValueError: signal only works in main thread)
            failures.append(error)

    worker = threading.Thread(target=load)
    worker.start()
    worker.join()
    assert failures == []


def test_a_programs_own_ctrl_c_handler_is_kept_while_loading():
    """Where the program has its own SIGINT handler (Ctrl-C does not raise KeyboardInterrupt), loading keeps it."""
    import signal

    def own_handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, own_handler)
    try:
        with loading._interrupt_kept():
            assert signal.getsignal(signal.SIGINT) is own_handler
        assert signal.getsignal(signal.SIGINT) is own_handler
    finally:
        signal.signal(signal.SIGINT, previous)
