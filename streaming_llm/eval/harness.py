"""Score several methods on one stream and write one result per method (the `streaming-llm eval` engine)."""

from __future__ import annotations

import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streaming_llm.eval.methods import Method
from streaming_llm.eval.perplexity import compute_perplexity
from streaming_llm.eval.results import (
    PeakMemory,
    atomic_write,
    build_record,
    check_same_model,
    check_same_tokens,
    is_finished,
    model_fingerprint,
    read_result,
    result_paths,
    result_stem,
    tokens_fingerprint,
    write_result,
)


@dataclass
class MethodRun:
    """One method's outcome: its record (as written, or read back when skipped) and where it lives."""

    method: str
    record: dict
    json_path: Path
    skipped: bool


def _finished_run(method: str, output_dir: str | os.PathLike, stem: str, force: bool, fingerprint: str,
                  tokens: str) -> MethodRun | None:
    """The finished result of `stem` as a skipped run, or None when there is none (or `force`); ValueError when
    the result there was made with another model of the same name, or on another token stream of the same text
    (`tokens`: this stream's tokens_fingerprint)."""
    if force or not is_finished(output_dir, stem):
        return None
    json_path, _ = result_paths(output_dir, stem)
    try:
        record, _ = read_result(json_path)
    except ValueError as error:
        raise ValueError(f"{error}; remove it, or pass --force to replace it") from None
    check_same_model(record, fingerprint, json_path)
    check_same_tokens(record, tokens, json_path)
    return MethodRun(method, record, json_path, skipped=True)


def run_method(
    method: Method,
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    model_name: str,
    data: dict,
    n_sink: int,
    window_size: int,
    block_size: int,
    output_dir: str | os.PathLike,
    force: bool = False,
    progress: bool = False,
    on_block=None,
    device: str = "cpu",
    dtype: str = "float32",
    extra: dict | None = None,
    checkpoint_every: int = 1024,
) -> MethodRun:
    """Score `input_ids` [1, T] with `method` and write its result, unless a finished one exists (and not `force`).

    Every `checkpoint_every` scored tokens the NLLs so far are saved next to the result (0 = never); an
    interrupted run of the same configuration resumes from there and ends with the same numbers.

    `on_block(end, nlls)` is passed to compute_perplexity; an exception from it (or Ctrl-C) aborts the run
    and writes nothing.
    """
    num_tokens = input_ids.shape[1]
    size = method.block_size(block_size)
    evaluator = method.evaluator(block_size)
    stem = result_stem(model_name, data, num_tokens, n_sink, window_size, method.name, evaluator, dtype)
    fingerprint, tokens = model_fingerprint(model), tokens_fingerprint(input_ids)
    if (finished := _finished_run(method.name, output_dir, stem, force, fingerprint, tokens)) is not None:
        return finished
    check_no_dropout(model)
    stepper = method.build(model, n_sink, window_size)
    checkpoint = Checkpoint(Path(output_dir) / f"{stem}{CHECKPOINT_SUFFIX}", size, checkpoint_every, fingerprint, tokens)
    resume_nlls = None if force else checkpoint.load()

    def after_block(end: int, nlls: torch.Tensor) -> None:
        checkpoint.maybe_save(end, nlls)
        if on_block is not None:
            on_block(end, nlls)

    cpu_started = time.process_time()
    with PeakMemory(device) as peak:
        result = compute_perplexity(
            stepper, input_ids, block_size=size, progress=progress, description=method.name, on_block=after_block,
            resume_nlls=resume_nlls,
        )
    # CPU seconds of this process: on a shared machine, tokens per CPU-second compares runs that saw
    # different loads better than wall-clock tokens/s does.
    cpu_s = time.process_time() - cpu_started
    record = build_record(
        model_name=model_name,
        data=data,
        num_tokens=num_tokens,
        n_sink=n_sink,
        window_size=window_size,
        method=method.name,
        method_description=method.description,
        evaluator=evaluator,
        block_size=size,
        perplexity=result.perplexity,
        mean_nll=float(result.nlls.mean()),
        wall_s=result.wall_s,
        tokens_per_s=result.tokens_per_s,
        peak_memory=peak,
        device=device,
        dtype=dtype,
        extra={**(extra or {}), **result.extra, **_stepper_extra(stepper), "cpu_s": cpu_s},
        fingerprint=fingerprint,
        input_ids=input_ids,
    )
    if resume_nlls is not None:
        record["resumed_from_step"] = int(resume_nlls.shape[0])
    json_path = write_result(output_dir, stem, record, result.nlls)
    checkpoint.remove()
    return MethodRun(method.name, record, json_path, skipped=False)


DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def check_no_dropout(model: nn.Module) -> None:
    """ValueError where a part of `model` is in training mode with dropout (a torch dropout module, or an attention
    module's attention_dropout, above 0): each run would score other random draws, not the model. The CLI loads models
    in eval mode; a model from a training loop may still be in train() mode."""
    for name, module in model.named_modules():
        if not module.training:
            continue
        rate = module.p if isinstance(module, DROPOUT_MODULES) else getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, torch.Tensor) and rate.numel() == 1:
            rate = rate.item()
        if isinstance(rate, numbers.Real) and rate > 0:  # numpy's floats too (a config set from an array)
            raise ValueError(f"the model is in training mode with dropout ({name or 'the model'}: {rate}), so its NLLs "
                             "would be random draws: call model.eval() before scoring it")


CHECKPOINT_SUFFIX = ".checkpoint.npz"


class Checkpoint:
    """The per-token NLLs of an unfinished run, saved atomically every `every` scored tokens.

    Not a result: `is_finished` ignores it, and it is removed once the result is written. A later run of
    the same configuration (same stem, same block size, same model and tokens fingerprints) resumes from it (see
    compute_perplexity); one made with another model of the same name, or on another token stream of the same text,
    is refused, an unreadable one named."""

    def __init__(self, path: Path, block_size: int, every: int, fingerprint: str | None = None, tokens: str | None = None):
        self.path, self.block_size, self.every, self.fingerprint, self.tokens = path, block_size, every, fingerprint, tokens
        self.saved_at = 0

    def load(self) -> torch.Tensor | None:
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                block_size = int(saved["block_size"])
                stored = (str(saved["fingerprint"]) or None) if "fingerprint" in saved.files else None
                stored_tokens = (str(saved["tokens_fingerprint"]) or None) if "tokens_fingerprint" in saved.files else None
                nlls = torch.from_numpy(saved["nlls"].astype(np.float64))
        except (ValueError, OSError, EOFError, KeyError) as error:
            raise ValueError(f"{self.path} is not a readable checkpoint ({error}); remove it, or pass --force") from None
        check_same_model({"model_fingerprint": stored}, self.fingerprint, self.path)
        check_same_tokens({"tokens_fingerprint": stored_tokens}, self.tokens, self.path)
        if (block_size != self.block_size or (stored is None and self.fingerprint is not None)
                or (stored_tokens is None and self.tokens is not None)):
            return None  # another block size, or a checkpoint from before (tokens) fingerprints: start afresh
        self.saved_at = nlls.shape[0]
        return nlls

    def maybe_save(self, end: int, nlls: torch.Tensor) -> None:
        if self.every <= 0 or end - self.saved_at < self.every:
            return
        array = nlls[:end].detach().cpu().numpy()
        fingerprint, tokens = np.array(self.fingerprint or ""), np.array(self.tokens or "")
        atomic_write(self.path, lambda handle: np.savez(handle, nlls=array, block_size=np.int64(self.block_size),
                                                        fingerprint=fingerprint, tokens_fingerprint=tokens))
        self.saved_at = end

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def sampled_step_range(num_tokens: int, capacity: int) -> range:
    """The steps a recompute sample is spread over: [capacity, num_tokens - 2], the part of the stream past the
    first eviction (the last step alone where the stream is no longer than the capacity)."""
    last = num_tokens - 2
    return range(min(capacity, last), last + 1)


def sample_steps(num_tokens: int, capacity: int, num_samples: int) -> list[int]:
    """`num_samples` steps spread evenly over `sampled_step_range`, as distinct sorted ints."""
    steps = sampled_step_range(num_tokens, capacity)
    first, last = steps.start, steps.stop - 1
    if num_samples < 1:
        raise ValueError(f"need at least one sample, got {num_samples}")
    return sorted({int(round(first + (last - first) * i / max(1, num_samples - 1))) for i in range(num_samples)})


def run_recompute_sample(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    num_samples: int,
    model_name: str,
    data: dict,
    n_sink: int,
    window_size: int,
    output_dir: str | os.PathLike,
    force: bool = False,
    progress: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
) -> MethodRun:
    """The recompute oracle at `num_samples` steps spread over the stream past the capacity (see
    baselines.recompute_nlls_at). Its NLL file holds NaN at the steps not scored; its perplexity is over the
    scored steps only (compare other methods on the same steps with `perplexity_at`)."""
    from streaming_llm.eval.baselines import recompute_nlls_at
    from streaming_llm.eval.methods import METHODS

    num_tokens, capacity = input_ids.shape[1], n_sink + window_size
    steps = sample_steps(num_tokens, capacity, num_samples)
    evaluator = f"sample{len(steps)}"
    stem = result_stem(model_name, data, num_tokens, n_sink, window_size, "recompute", evaluator, dtype)
    fingerprint, tokens = model_fingerprint(model), tokens_fingerprint(input_ids)
    if (finished := _finished_run("recompute", output_dir, stem, force, fingerprint, tokens)) is not None:
        return finished
    check_no_dropout(model)
    cpu_started, started = time.process_time(), time.perf_counter()
    with PeakMemory(device) as peak:
        sampled = recompute_nlls_at(model, input_ids, capacity, steps, progress=progress)
    wall, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    nlls = torch.full((num_tokens - 1,), float("nan"), dtype=torch.float64)
    nlls[steps] = sampled
    record = build_record(
        model_name=model_name,
        data=data,
        num_tokens=num_tokens,
        n_sink=n_sink,
        window_size=window_size,
        method="recompute",
        method_description=METHODS["recompute"].description + f", at {len(steps)} steps spread over [{steps[0]}, {steps[-1]}]",
        evaluator=evaluator,
        block_size=8,
        perplexity=float(torch.exp(sampled.mean())),
        mean_nll=float(sampled.mean()),
        wall_s=wall,
        tokens_per_s=len(steps) / wall if wall > 0 else float("inf"),
        peak_memory=peak,
        device=device,
        dtype=dtype,
        extra={"sampled_steps": steps, "cpu_s": cpu_s},
        fingerprint=fingerprint,
        input_ids=input_ids,
    )
    json_path = write_result(output_dir, stem, record, nlls)
    return MethodRun("recompute", record, json_path, skipped=False)


def perplexity_at(nlls, steps: list[int]) -> float:
    """exp(mean NLL) over the given steps of a per-token NLL array (nlls[t] scores token t+1)."""
    values = torch.as_tensor(nlls, dtype=torch.float64)[list(steps)]
    return float(torch.exp(values.mean()))


def _stepper_extra(stepper) -> dict:
    """What a stepper reports about itself after a run (kvpress: the kept positions at the end)."""
    extra = {}
    kept = getattr(stepper, "kept_positions", None)
    if callable(kept):
        try:
            positions = kept()
        except Exception:  # a stepper that cannot say: nothing recorded
            return extra
        positions = torch.as_tensor(positions)
        if positions.dim() == 2:  # [kv_heads, held] (kvpress): the first head's
            positions = positions[0]
        positions = [int(p) for p in positions.tolist()]
        extra["final_kept_positions_head"] = positions[:16]
        extra["final_kept_count"] = len(positions)
    return extra
