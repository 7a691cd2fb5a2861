"""Behaviour of streaming_llm.data that no other test pinned down, found by a mutation-testing audit.

Each test here fails on at least one small change to data.py (a flipped comparison, a dropped condition) that the
rest of the suite let through. The tokenizers are tiny word-level ones (tiny_models.tokenizer_of).
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import normalizers, pre_tokenizers
from tiny_models import tokenizer_of

from streaming_llm import data
from streaming_llm.data import describe_source, load_text, load_tokens


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_no_second_bos_when_the_text_tokenization_already_starts_with_it(tmp_path):
    """add_bos=None prepends BOS only when the tokenizer adds it with special tokens and not without them: a
    tokenizer that puts "<s>" before every text itself (here by a normalizer) gets exactly one."""
    tokenizer = tokenizer_of(["[UNK]", "<s>", "the", "king"], normalizer=normalizers.Prepend("<s> "))
    assert tokenizer.encode("the", add_special_tokens=False)[:1] == [1]
    path = write(tmp_path / "verse.txt", "the king the king")
    assert load_tokens(tokenizer, path).tolist() == [[1, 2, 3, 2, 3]]


def test_add_bos_true_needs_a_bos_token(tmp_path):
    tokenizer = tokenizer_of(["[UNK]", "the", "king"], bos=None)
    path = write(tmp_path / "verse.txt", "the king")
    with pytest.raises(ValueError, match="add_bos=True, but the tokenizer has no bos_token_id"):
        load_tokens(tokenizer, path, add_bos=True)
    assert load_tokens(tokenizer, path).tolist() == [[1, 2]]  # and add_bos=None adds none


def test_a_text_of_exactly_two_tokens_is_enough(tmp_path):
    """Two tokens make one prediction: accepted, with or without num_tokens=2."""
    tokenizer = tokenizer_of(["[UNK]", "<s>", "the", "king"])
    path = write(tmp_path / "two.txt", "the king\n")
    assert load_tokens(tokenizer, path).tolist() == [[2, 3]]
    assert load_tokens(tokenizer, path, num_tokens=2).tolist() == [[2, 3]]
    assert load_tokens(tokenizer, path, num_tokens=2, add_bos=True).tolist() == [[1, 2]]


def test_the_tokenize_margin_keeps_the_cut_out_of_the_kept_ids(tmp_path):
    """With num_tokens, load_tokens tokenizes a prefix of the text cut at a line break, and keeps ids only from a
    prefix that yields 512 more than it needs. Here the tokens span line breaks (16-character words
    "xxxxxxx\\nyyyyyyy ", as SentencePiece pieces can): the cut turns the prefix's last word into "xxxxxxx", and the
    first prefix tried (8 * (512 + 512) characters) yields exactly 512 ids, that artefact last. Without the margin
    it would be kept; with it a longer prefix is tokenized and the ids are those of the whole text."""
    word = "xxxxxxx\nyyyyyyy"
    tokenizer = tokenizer_of(["[UNK]", "<s>", word, "xxxxxxx"], pre_tokenizer=pre_tokenizers.Split(" ", "removed"))
    path = write(tmp_path / "words.txt", (word + " ") * 2000)
    whole = load_tokens(tokenizer, path, add_bos=False)
    assert whole.shape == (1, 2000) and bool((whole == 2).all())
    assert load_tokens(tokenizer, path, num_tokens=512, add_bos=False).tolist() == [[2] * 512]
    assert torch.equal(load_tokens(tokenizer, path, num_tokens=1500, add_bos=False), whole[:, :1500])


@pytest.mark.parametrize("name", ["no-such-book", "MISSING.TXT", "./missing", "../missing", "~/missing-streaming-llm-book"])
def test_sources_that_read_as_paths_say_no_such_file(name, tmp_path, monkeypatch):
    """A pathlib.Path is always a path, so is a string with an upper-case text suffix or starting with ./ ../ ~:
    missing, each is "no such file", not a dataset the hub is asked for."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    source = Path(name) if name == "no-such-book" else name
    with pytest.raises(ValueError, match="no such file"):
        load_text(source)


def test_a_relative_path_is_described_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "book.txt", "To be.")
    description = describe_source("book.txt")
    assert description["path"] == str((tmp_path / "book.txt").resolve()) and description["name"] == "book.txt"


def _fake_datasets(monkeypatch, rows, offline: bool):
    """A stand-in for the `datasets` package that records the streaming flag it is called with."""
    from streaming_llm import hub

    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append(streaming)
        return iter(rows)

    module = types.SimpleNamespace(load_dataset=load_dataset, config=types.SimpleNamespace(HF_HUB_OFFLINE=offline))
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    return calls


def test_a_single_column_dataset_gives_that_column(monkeypatch):
    """Without a "text" column, a dataset with one column is read from it."""
    _fake_datasets(monkeypatch, [{"content": "First."}, {"content": "Second."}], offline=False)
    assert load_text("some/corpus") == "First.\n\nSecond."


def test_offline_datasets_are_loaded_without_streaming(monkeypatch):
    """Offline, only a prepared cache can answer, which needs a non-streaming load; online the split is streamed."""
    calls = _fake_datasets(monkeypatch, [{"text": "Only."}], offline=True)
    assert load_text("some/corpus") == "Only."
    calls_online = _fake_datasets(monkeypatch, [{"text": "Only."}], offline=False)
    load_text("some/corpus")
    assert calls == [False] and calls_online == [True]


def test_the_embedded_source_is_named_either_way():
    """None and "shakespeare" are the embedded corpus, described as such."""
    assert data._is_embedded(None) and data._is_embedded("shakespeare") and not data._is_embedded("shakespeare.txt")


def test_an_error_while_probing_the_hub_is_named_not_taken_for_an_unreachable_hub(monkeypatch):
    """The hub probe itself can fail (here HF_ENDPOINT's port is no number) before it says whether it went offline:
    the message names that error, and does not claim the hub cannot be reached, which nothing found out."""
    from huggingface_hub import constants

    from streaming_llm import hub

    module = types.SimpleNamespace(load_dataset=lambda *args, **kwargs: iter([{"text": "x"}]),
                                   config=types.SimpleNamespace(HF_HUB_OFFLINE=False))
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example:notaport")
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError) as raised:
        load_text("some/corpus")
    message = str(raised.value)
    assert message.startswith("dataset 'some/corpus' could not be loaded (ValueError: Port could not be cast")
    assert "cannot be reached" not in message and "HF_HUB_OFFLINE is set" not in message


def test_a_text_longer_than_the_models_context_is_tokenized_without_a_warning(tmp_path):
    """An evaluation text is longer than model_max_length by design: transformers' warning that it is too long for
    the model (logged once per tokenizer) is not logged by load_tokens, with or without num_tokens."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect()
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        path = write(tmp_path / "verse.txt", "the king " * 40)
        loud = tokenizer_of(["[UNK]", "<s>", "the", "king"])
        loud.model_max_length = 8
        loud.encode("the king " * 40, add_special_tokens=False)
        assert any("longer than the specified maximum" in record.getMessage() for record in records)
        records.clear()
        for num_tokens, expected in ((None, 80), (30, 30)):
            tokenizer = tokenizer_of(["[UNK]", "<s>", "the", "king"])
            tokenizer.model_max_length = 8
            assert load_tokens(tokenizer, path, num_tokens=num_tokens).shape == (1, expected)
        assert [record.getMessage() for record in records] == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
