"""Results on disk: one JSON per (run, method) plus its per-token NLLs, written atomically.

A run is identified by its configuration (model, data, number of tokens, n_sink, window, method,
evaluator); `result_stem` turns that into a deterministic file name, so re-running a finished
configuration finds its file and can skip it. Each result is two files in one folder:

  <stem>.json        what was run and what it measured (see `build_record`)
  <stem>.nlls.npy    float32 [T-1]: nlls[t] = -log p(token t+1 | step t), natural log

Both are written to a temporary file in the same folder and moved in place with os.replace, the NLLs
first and the JSON last: a JSON exists only for a finished run, and an interruption (Ctrl-C, a crash)
leaves no results file, at most a `*.tmp` that the next write replaces.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from streaming_llm.checks import is_int, is_number

SCHEMA_VERSION = 1
NLLS_SUFFIX = ".nlls.npy"


def slug(text: str) -> str:
    """A file-name-safe form of `text`: letters, digits, '.', '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "none"


def data_label(data: dict) -> str:
    """Short name of a data source description (describe_source): its name (a file's without its suffix, a
    dataset spec's whole, dots included) plus 8 hex digits of its sha256, and -bos or -nobos where the description
    says that a BOS was put first or not by choice (eval --bos yes/no; by default, as the tokenizer does)."""
    name = str(data.get("name", "data"))
    if data.get("kind", "file") == "file":
        name = Path(name).stem
    digest = str(data.get("sha256", ""))[:8]
    bos = "-bos" if data.get("bos") is True else "-nobos" if data.get("bos") is False else ""
    return slug(f"{name}-{digest}{bos}" if digest else f"{name}{bos}")


def result_stem(model_name: str, data: dict, num_tokens: int, n_sink: int, window_size: int, method: str, evaluator: str,
                dtype: str = "float32") -> str:
    """Deterministic file stem of one configuration, e.g.
    SmolLM2-135M-Instruct__shakespeare-1a2b3c4d__T20480__s4_w1020__streaming_pos_shift__block256; a dtype other
    than float32 is part of it (…__block256__bfloat16), so that a run in another dtype is not taken for this one."""
    parts = [slug(model_name), data_label(data), f"T{num_tokens}", f"s{n_sink}_w{window_size}", slug(method), slug(evaluator)]
    stem = "__".join(parts) + dtype_suffix(dtype)
    if len(stem) <= LONGEST_STEM:  # the name it always had: earlier runs' results and checkpoints are found again
        return stem
    return "__".join(_fitting(part) for part in parts) + dtype_suffix(dtype)


# The most a name takes of a result's file name where the whole would not fit: a model folder's or a text's may be
# long (a file name may have 255 bytes), and the stem is written as ".<stem>.checkpoint.npz.<pid>.tmp" (atomic_write).
LONGEST_STEM_PART = 64
LONGEST_STEM = 255 - len(".") - len(".checkpoint.npz") - len(".4194304.tmp")  # (the largest pid Linux gives)


def _fitting(part: str) -> str:
    """`part` of a result name (a slug: ASCII), or where it is longer than LONGEST_STEM_PART its start and 16 hex
    digits of its sha256, so that two long names stay apart."""
    if len(part) <= LONGEST_STEM_PART:
        return part
    return f"{part[:LONGEST_STEM_PART - 17]}-{hashlib.sha256(part.encode()).hexdigest()[:16]}"


def dtype_suffix(dtype: str) -> str:
    """How a name carries the dtype of what it holds (results, their summary and table): "__<dtype>", or nothing for
    float32, the default."""
    return "" if dtype == "float32" else f"__{slug(dtype)}"


def result_paths(output_dir: str | os.PathLike, stem: str) -> tuple[Path, Path]:
    """(json path, nlls path) of a stem."""
    folder = Path(output_dir)
    return folder / f"{stem}.json", folder / f"{stem}{NLLS_SUFFIX}"


def is_finished(output_dir: str | os.PathLike, stem: str) -> bool:
    """True when both files of a result exist (the JSON is written last)."""
    json_path, nlls_path = result_paths(output_dir, stem)
    return json_path.is_file() and nlls_path.is_file()


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file next to `path`, then move it in place (never a half file). A `path` that
    is a symbolic link is written through it, into the file it points to (the link stays, as with `>` and cp)."""
    path = Path(os.path.realpath(path))
    if path.is_dir():  # (os.replace would refuse it only after the write, naming the temporary file)
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def prepare_output_dir(path: str | os.PathLike, option: str = "--output-dir") -> Path:
    """The folder results go to (a leading ~ expanded); ValueError naming `option` and the path when it cannot be
    created or written (checked before any work, so that a long run does not fail at its first write). A missing
    folder is created for the check and removed again (trial_folder), so that a run refused later leaves none
    behind: the first write creates it (atomic_write)."""
    from streaming_llm.cli_common import trial_folder

    if not str(path).strip():
        raise ValueError(f"{option} is empty: give a folder")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {path} is not a folder")
    with trial_folder(folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{option} {path}: cannot create it ({error.strerror or error})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path} is not writable")
    return folder


def write_result(output_dir: str | os.PathLike, stem: str, record: dict, nlls: torch.Tensor) -> Path:
    """Write <stem>.nlls.npy then <stem>.json atomically; return the JSON path."""
    json_path, nlls_path = result_paths(output_dir, stem)
    array = nlls.detach().cpu().to(torch.float32).numpy()
    atomic_write(nlls_path, lambda handle: np.save(handle, array, allow_pickle=False))
    record = dict(record, nlls_file=nlls_path.name)
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    atomic_write(json_path, lambda handle: handle.write(text.encode("utf-8")))
    return json_path


def partial_path(path: str | os.PathLike) -> Path:
    """Where a run stopped part way keeps what it finished, beside the file it would have written: answers.jsonl ->
    answers.partial.jsonl, <tag>.json -> <tag>.partial.json (never that file itself, which holds a whole run or
    nothing)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def write_json_atomically(path: str | os.PathLike, payload) -> Path:
    """Any JSON-ready payload to `path`, atomically (summaries, comparisons)."""
    path = Path(path)
    text = json.dumps(payload, indent=2) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    return path


# What every result record holds (build_record writes more); a file without them is not a result.
RECORD_KEYS = ("model", "data", "num_tokens", "n_sink", "window_size", "method", "evaluator", "perplexity")


def read_result(json_path: str | os.PathLike) -> tuple[dict, np.ndarray | None]:
    """(record, nlls or None if the companion file is missing) of a result JSON; ValueError naming the file
    when it is not a readable result (invalid JSON, another kind of JSON, an unreadable NLL file) and naming the
    file and the field when a field the readers use is malformed (`check_result_fields`)."""
    json_path = Path(json_path)
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{json_path} is not a result file: not valid JSON ({error})") from None
    missing = [key for key in RECORD_KEYS if key not in record] if isinstance(record, dict) else list(RECORD_KEYS)
    if missing:
        raise ValueError(f"{json_path} is not a result file of streaming-llm eval (no {', '.join(missing)})")
    nlls_path = nlls_path_of(json_path, record)
    if not nlls_path.is_file():
        nlls = None
    else:
        try:
            nlls = np.load(nlls_path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"{nlls_path} is not a readable NLL file ({error})") from None
    check_result_fields(json_path, record, nlls)
    return record, nlls


def nlls_path_of(json_path: str | os.PathLike, record: dict) -> Path:
    """Where the per-token NLLs of the result `json_path` holds are: its nlls_file, next to it."""
    json_path = Path(json_path)
    return json_path.with_name(str(record.get("nlls_file", json_path.stem + NLLS_SUFFIX)))


def is_fingerprint(value) -> bool:
    """True for a fingerprint as model_fingerprint and tokens_fingerprint write them: 16 lowercase hex digits."""
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{16}", value) is not None


def check_result_fields(path: str | os.PathLike, record: dict, nlls: np.ndarray | None) -> None:
    """ValueError "<file>: not a result file (<field> ...)" unless the fields that the eval, the table and the
    figures read are well formed: model, method and evaluator non-empty strings, data a description, num_tokens,
    n_sink, window_size (and num_predictions) counts, perplexity, tokens_per_s, wall_s, peak_memory_mib numbers or
    null, model_fingerprint and tokens_fingerprint (if any) 16 hex digits, tokens_prefix_fingerprints (if any) such fingerprints keyed by
    prefix lengths below num_tokens, extra an object whose sampled_steps (if any) are step indices, and the NLLs a
    1-D float array of num_predictions values (NaN marks a sampled result's unscored steps). A hand-edited file is
    named here, not met as a traceback in a table or a figure (or, for a fingerprint, as a refusal saying that the
    result was scored on another token stream)."""

    def refuse(what: str) -> ValueError:
        return ValueError(f"{path}: not a result file ({what})")

    def shown(value) -> str:
        return json.dumps(value, default=str)

    for key in ("model", "method", "evaluator"):
        if not isinstance(record[key], str) or not record[key]:
            raise refuse(f"{key} is {shown(record[key])}, not a {'method name' if key == 'method' else 'name'}")
    if not isinstance(record["data"], dict):
        raise refuse(f"data is {shown(record['data'])}, not a data description")
    for key, minimum in (("num_tokens", 0), ("n_sink", 0), ("window_size", 1)):
        if not is_int(record[key]) or record[key] < minimum:
            raise refuse(f"{key} is {shown(record[key])}, not {'a token count' if key == 'num_tokens' else 'a cache size'}")
    expected = record.get("num_predictions", max(record["num_tokens"] - 1, 0))
    if not is_int(expected) or expected < 0:
        raise refuse(f"num_predictions is {shown(expected)}, not a count")
    for key in ("perplexity", "tokens_per_s", "wall_s", "peak_memory_mib"):
        if record.get(key) is not None and not is_number(record[key]):
            raise refuse(f"{key} is {shown(record[key])}, not a number")
    for key in ("model_fingerprint", "tokens_fingerprint"):
        if record.get(key) is not None and not is_fingerprint(record[key]):
            raise refuse(f"{key} is {shown(record[key])}, not 16 hex digits")
    prefixes = record.get("tokens_prefix_fingerprints")
    if prefixes is not None and not (
        isinstance(prefixes, dict)
        and all(n.isascii() and n.isdigit() and 0 < int(n) < record["num_tokens"] and is_fingerprint(value)
                for n, value in prefixes.items())
    ):
        raise refuse(f"tokens_prefix_fingerprints is {shown(prefixes)}, not fingerprints (16 hex digits) of prefixes "
                     f"shorter than the {record['num_tokens']} tokens")
    extra = record.get("extra", {})
    if not isinstance(extra, dict):
        raise refuse(f"extra is {shown(extra)}, not an object")
    if extra.get("cpu_s") is not None and not is_number(extra["cpu_s"]):
        raise refuse(f"extra.cpu_s is {shown(extra['cpu_s'])}, not a number")
    steps = extra.get("sampled_steps")
    if steps is not None and not (isinstance(steps, list) and all(is_int(step) and 0 <= step < expected for step in steps)):
        raise refuse(f"extra.sampled_steps is {shown(steps)}, not a list of steps below {expected}")
    if nlls is None:
        return
    where = f"NLLs in {record.get('nlls_file', Path(path).stem + NLLS_SUFFIX)}"
    if nlls.dtype.kind != "f":
        raise refuse(f"{where} are of type {nlls.dtype}, not floats")
    if nlls.ndim != 1:
        raise refuse(f"{where} have shape {nlls.shape}, not one value per token")
    if nlls.size != expected:
        raise refuse(f"{where}: {nlls.size} values, the record's {record['num_tokens']} tokens make {expected} predictions")


def model_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits that tell models apart: the config (without its private and version fields) and, for every
    parameter, its name, shape, dtype and first and last 1,024 values. Two folders of the same name holding
    different weights get different fingerprints; the same model loaded again (any path, any machine) the same."""
    digest = hashlib.sha256()
    config = {key: value for key, value in model.config.to_dict().items()
              if not key.startswith("_") and key not in ("transformers_version", "dtype", "torch_dtype", "name_or_path")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}".encode())
            if parameter.device.type == "meta":
                continue
            flat = parameter.detach().reshape(-1)
            ends = torch.cat([flat[:1024], flat[-1024:]]) if flat.numel() > 2048 else flat
            digest.update(ends.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_same_model(record: dict, fingerprint: str | None, path: str | os.PathLike) -> None:
    """ValueError when `record` (a finished result or a checkpoint) was made with a model other than the one
    whose fingerprint is given: result names carry the model's folder name only, which two models can share.
    Records written before fingerprints existed carry none and are taken as they were."""
    stored = record.get("model_fingerprint")
    if stored is not None and fingerprint is not None and stored != fingerprint:
        raise ValueError(
            f"{path} was made with another model of the same name ({record.get('model')}: fingerprint {stored}, "
            f"this model {fingerprint}); use another --output-dir, or --force to replace it"
        )


def _stream_ids(input_ids: torch.Tensor) -> np.ndarray:
    """The ids of a token stream as the fingerprints hash them: little-endian int64, in order, flat."""
    return input_ids.detach().reshape(-1).to("cpu", torch.int64).numpy().astype("<i8", copy=False)


def tokens_fingerprint(input_ids: torch.Tensor) -> str:
    """16 hex digits of the sha256 of a token stream: its ids as little-endian int64, in order (the BOS or other
    prefix included). The same text tokenized by another tokenizer, or with a BOS added or not, gets another."""
    return hashlib.sha256(_stream_ids(input_ids).tobytes()).hexdigest()[:16]


# tokens_prefix_fingerprints holds the fingerprint of the stream's first n ids for every power of two n from this one
# up to (not including) its length, so that results on prefixes of different lengths can be told apart in one table.
FIRST_PREFIX_FINGERPRINT = 16


def tokens_prefix_fingerprints(input_ids: torch.Tensor) -> dict[str, str]:
    """{"n": tokens_fingerprint of the first n ids} for n = 16, 32, 64, ... below the stream's length (keys are
    strings, as JSON has them)."""
    ids = _stream_ids(input_ids)
    digest, done, found = hashlib.sha256(), 0, {}
    length = FIRST_PREFIX_FINGERPRINT
    while length < ids.size:
        digest.update(ids[done:length].tobytes())
        found[str(length)] = digest.hexdigest()[:16]
        done, length = length, 2 * length
    return found


def check_same_tokens(record: dict, fingerprint: str | None, path: str | os.PathLike) -> None:
    """ValueError when `record` (a finished result or a checkpoint) was scored on another token stream than the one
    whose fingerprint is given: result names carry the text's sha256, not its tokenization (another tokenizer, or a
    BOS added or not, gives other ids). Records written before tokens fingerprints existed carry none and are taken
    as they were."""
    stored = record.get("tokens_fingerprint")
    if stored is not None and fingerprint is not None and stored != fingerprint:
        raise ValueError(
            f"{path} was scored on another token stream of the same text (fingerprint {stored}, this stream "
            f"{fingerprint}: another tokenizer, or a BOS added or not); use another --output-dir, or --force to replace it"
        )


def _stream_fingerprints(record: dict) -> dict[int, str]:
    """{n: fingerprint of the first n ids} that `record` carries (its whole stream's included); {} for none."""
    if record.get("tokens_fingerprint") is None:
        return {}
    found = {int(n): value for n, value in (record.get("tokens_prefix_fingerprints") or {}).items()}
    found[record["num_tokens"]] = record["tokens_fingerprint"]
    return found


def check_comparable_results(results: list[tuple[str | os.PathLike, dict]]) -> None:
    """ValueError naming two files when (path, record) results of one model on one text (the same model name and
    data_label) were scored on different token streams: a table or a figure would compare their NLLs as if token t
    were the same token in both. Two results are compared over the longest prefix both carry a fingerprint of (the
    shorter one's whole stream when its length equals the other's or is a power of two from 16, else at least its
    first half). Results without a tokens fingerprint (written before they existed) are taken as they were.

    Likewise for results of two models that share a name (two folders of the same name, a model fine-tuned in
    place): their model fingerprints differ, and the table would show them as rows of one model. The fingerprint
    holds the weights' dtype, so results of one model in two dtypes (…__bfloat16 next to the float32 ones, as
    eval writes them into one --output-dir) are compared, not taken for two models."""
    models: dict[tuple, tuple] = {}
    for path, record in results:
        fingerprint = record.get("model_fingerprint")
        if fingerprint is None:
            continue
        other_path, other = models.setdefault((record["model"], record.get("dtype", "float32")), (path, fingerprint))
        if other != fingerprint:
            raise ValueError(
                f"{other_path} and {path} were made with different models of the same name, {record['model']} "
                f"(fingerprints {other} and {fingerprint}) and cannot be compared; keep each model's results in its "
                "own --output-dir"
            )
    seen: dict[tuple, list[tuple]] = {}
    for path, record in results:
        prints = _stream_fingerprints(record)
        if not prints:
            continue
        key = (record["model"], data_label(record["data"]))
        for other_path, other in seen.setdefault(key, []):
            common = prints.keys() & other.keys()
            if common and prints[length := max(common)] != other[length]:
                raise ValueError(
                    f"{other_path} and {path} were scored on different token streams of {key[0]} on {key[1]} (the "
                    f"first {length:,} tokens: fingerprints {other[length]} and {prints[length]}; another tokenizer, "
                    "or a BOS added or not) and cannot be compared; score the older again (streaming-llm eval "
                    "--force), or keep each stream's results in its own --output-dir"
                )
        seen[key].append((path, prints))


def list_results(folder: str | os.PathLike) -> list[Path]:
    """Result JSONs in `folder` (not recursive), sorted by name."""
    return sorted(path for path in Path(folder).glob("*.json") if not path.name.startswith("."))


def result_sources(folder: str | os.PathLike) -> set[tuple[str, str]]:
    """(model, data label) of each result in `folder`; a JSON that is no result (or a broken one) names none."""
    sources = set()
    for path in list_results(folder):
        try:
            record, _ = read_result(path)
        except ValueError:  # another JSON: no model or text whose summary a summary here could replace
            continue
        sources.add((str(record["model"]), data_label(record["data"])))
    return sources


def summary_source(sources: set[tuple[str, str]], model_name: str, data: dict) -> str:
    """The part of a summary's file name that names its model and text ("__<model>__<data label>"), where the
    folder's results are of several models or texts (`sources`, as result_sources gives them; else "": the name a
    one-stream folder's summary always had), so that the summary of one does not replace another's."""
    if sources <= {(model_name, data_label(data))}:
        return ""
    return f"__{slug(model_name)}__{data_label(data)}"


def versions() -> dict:
    """Versions of what produced a result."""
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        found["kvpress"] = version("kvpress")
    except Exception:  # not installed: recorded as absent
        found["kvpress"] = None
    try:
        import streaming_llm

        found["streaming_llm"] = streaming_llm.__version__
    except Exception:
        found["streaming_llm"] = None
    return found


def git_commit(folder: str | os.PathLike | None = None) -> str | None:
    """HEAD of the repository holding this package, with '+dirty' when tracked files differ; None outside git, and
    where the repository does not track the folder (a wheel installed in a virtual environment inside another
    project's repository: that HEAD is not this code's)."""
    folder = folder or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        subprocess.run(["git", "ls-files", "--error-unmatch", "."], cwd=folder, capture_output=True, timeout=10, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def device_description(device: str | torch.device) -> str:
    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


class PeakMemory:
    """Peak memory while the `with` block runs, in MiB.

    CUDA: torch.cuda.max_memory_allocated after a reset (tensor memory only). CPU: the process's peak
    resident set size. Linux lets a process reset its peak RSS (writing 5 to /proc/self/clear_refs), so
    the value is this block's peak ("kind": "rss_block"); where that is refused it is the process's peak
    since start, getrusage's ru_maxrss ("kind": "rss_process": macOS, or Linux without /proc; KiB on Linux,
    bytes on macOS, both read as MiB), an upper bound. Where there is no getrusage (Windows: no `resource` module)
    peak_mib is None ("kind": "unavailable").

    MPS (Apple GPU): torch keeps no peak there. The value is the Metal memory torch's MPS allocator holds at the
    block's end (torch.mps.driver_allocated_memory; its cache emptied on entry, "kind": "mps_driver_allocated"): the
    allocator keeps freed buffers for reuse, so this covers the block's peak tensor memory (plus what was live
    before it, and the allocator's rounding), an estimate that misses what the allocator gave back under memory
    pressure. Not the process's RSS, which need not count GPU buffers.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = str(device)
        self.peak_mib: float | None = None
        self.kind = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
        elif self.device.startswith("mps"):
            torch.mps.synchronize()
            torch.mps.empty_cache()
            self.kind = "mps_driver_allocated"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.kind = "rss_block"
            except OSError:
                self.kind = "rss_process"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "mps_driver_allocated":
            torch.mps.synchronize()
            self.peak_mib = torch.mps.driver_allocated_memory() / 2**20
        elif self.kind == "rss_block":
            self.peak_mib = _vm_hwm_mib()
        else:
            from streaming_llm.cli_common import peak_memory_mb  # ru_maxrss: KiB on Linux, bytes on macOS

            self.peak_mib = peak_memory_mb()
            if self.peak_mib is None:
                self.kind = "unavailable"


def _vm_hwm_mib() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024  # the line is "VmHWM:   123456 kB"
    from streaming_llm.cli_common import peak_memory_mb

    return peak_memory_mb()


def build_record(
    *,
    model_name: str,
    data: dict,
    num_tokens: int,
    n_sink: int,
    window_size: int,
    method: str,
    method_description: str,
    evaluator: str,
    block_size: int,
    perplexity: float,
    mean_nll: float,
    wall_s: float,
    tokens_per_s: float,
    peak_memory: PeakMemory,
    device: str,
    dtype: str,
    extra: dict | None = None,
    fingerprint: str | None = None,
    input_ids: torch.Tensor | None = None,
) -> dict:
    """The JSON record of one finished (run, method); `input_ids`, the stream scored, gives its tokens fingerprints."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model_name,
        "model_fingerprint": fingerprint,
        "tokens_fingerprint": None if input_ids is None else tokens_fingerprint(input_ids),
        "tokens_prefix_fingerprints": None if input_ids is None else tokens_prefix_fingerprints(input_ids),
        "data": data,
        "num_tokens": num_tokens,
        "num_predictions": num_tokens - 1,
        "n_sink": n_sink,
        "window_size": window_size,
        "cache_capacity": n_sink + window_size,
        "method": method,
        "method_description": method_description,
        "evaluator": evaluator,
        "block_size": block_size,
        "perplexity": perplexity,
        "mean_nll": mean_nll,
        "tokens_per_s": tokens_per_s,
        "wall_s": wall_s,
        "peak_memory_mib": peak_memory.peak_mib,
        "peak_memory_kind": peak_memory.kind,
        "device": device_description(device),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "extra": extra or {},
    }
