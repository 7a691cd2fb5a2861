"""Differential fuzzing campaign: streaming_llm against the naive reference of SEMANTICS.md (tests/reference.py).

Every case is drawn from one integer seed (random.Random(seed)): a model (type + config overrides), n_sink,
window_size, position mode, path, stream length, block splits, tokens. The package's logits are compared with
naive_streaming_logits (fp32, max |dlogit| <= 1e-4, as the tests) and its cache bookkeeping is checked after
every call (get_seq_length, get_cache_length per layer, compress, kept_positions).

    python tests/fuzz_campaign.py --minutes 60 --start 0    # run seeds 0, 1, 2, ... for 60 minutes
    python tests/fuzz_campaign.py --replay SEED             # one case, verbose
    python tests/fuzz_campaign.py --params '{"...": ...}'   # an explicit (e.g. shrunk) case, verbose
    python tests/fuzz_campaign.py --replay SEED --shrink    # greedy shrink of a failing case
    python tests/fuzz_campaign.py --replay SEED --float64   # over tolerance: rounding, or a defect? (float64_errors)
    python tests/fuzz_campaign.py --summarize LOG --out results/fuzz/NAME.json   # a log's counts, as JSON

Outcomes: ok, refused (a ValueError raised by the package when the wrapper/cache is built: a documented
refusal), fail_logits, fail_bookkeeping, error (any other exception: a traceback from inside).
Standalone, not a test: one process, one thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
import traceback
from collections import Counter, OrderedDict
from unittest import mock

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))  # tests/: reference.py, tiny_models.py
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import warnings  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

from reference import naive_streaming_logits  # noqa: E402
from tiny_models import (VOCAB_SIZE, build_gemma3_multimodal, build_gpt_neox, build_llama,  # noqa: E402
                         build_llama_family)
from tiny_models import check_bookkeeping as check_cache  # noqa: E402

from streaming_llm import StreamingLLMWrapper  # noqa: E402
from streaming_llm import cache as cache_module  # noqa: E402
from streaming_llm.fast import FastStreamingWrapper  # noqa: E402
from streaming_llm.models import SUPPORTED_MODEL_TYPES  # noqa: E402

TOLERANCE = 1e-4
POSITION_MODES = ("pos_shift", "rerotate", "absolute")

# --- the model population ------------------------------------------------------------------------------------

# Hybrid: some layers slide, the others attend to everything; overrides(W) gives the config with sliding window W.
HYBRID = {
    **{t: (lambda W: dict(sliding_window=W)) for t in (
        "gemma2", "gemma3_text", "vaultgemma", "cohere2", "exaone4", "exaone_moe", "cwm", "afmoe", "gpt_oss")},
    "gemma3": lambda W: dict(sliding_window=W),  # multimodal wrapper around gemma3_text
    "olmo3": lambda W: dict(sliding_window=W, layer_types=["sliding_attention", "full_attention"]),
    **{t: (lambda W: dict(sliding_window=W, use_sliding_window=True, max_window_layers=1))
       for t in ("qwen2", "qwen2_moe", "qwen3")},
    "smollm3": lambda W: dict(sliding_window=W, use_sliding_window=True),
}
# Three-layer hybrids with another layer pattern (layer_types given explicitly).
HYBRID3 = ("gemma2", "gemma3_text", "cohere2", "exaone4", "gpt_oss", "olmo3", "cwm")
# Every layer slides: capacity must stay below W (documented refusal otherwise).
EVERY_LAYER = {
    **{t: (lambda W: dict(sliding_window=W)) for t in ("mistral", "ministral", "phimoe", "mixtral", "phi3",
                                                       "starcoder2")},
    "qwen2_all": lambda W: dict(sliding_window=W, use_sliding_window=True, max_window_layers=0),
}
INTERLEAVED = ("cohere", "glm", "glm4", "ernie4_5", "ernie4_5_moe", "helium")
PARTIAL = ("phi", "gpt_neox", "minimax_m2", "glm4_moe")
NOPE = ("smollm3",)
SCALED = ("llama_linear", "llama_llama3", "llama_yarn")

SEGMENT2 = 100000  # first seed drawn with the extra knobs of draw_case
SEGMENT3 = 200000  # first seed drawn with rope_theta / max_position_embeddings overrides
PATHS = ("general", "general_mit", "fast", "generate", "generate_fast", "batch", "batch_fast", "batch_mit")
PATH_WEIGHTS = (5, 2, 4, 2, 1, 2, 1, 1)


def draw_model(rng: random.Random) -> dict:
    """{"type", "overrides", "family"}: family names why it was drawn."""
    group = rng.choices(["hybrid", "hybrid3", "every", "interleaved", "partial", "nope", "scaled", "other"],
                        weights=[30, 6, 10, 10, 10, 4, 6, 12])[0]
    if group in ("hybrid", "hybrid3", "every"):
        W = rng.choice([1] + list(range(2, 13)) * 4) if group != "every" else rng.randint(2, 16)
        if group == "hybrid":
            model_type = rng.choice(sorted(HYBRID))
            overrides = HYBRID[model_type](W)
        elif group == "hybrid3":
            model_type = rng.choice(HYBRID3)
            kinds = rng.choice([["full_attention", "sliding_attention", "sliding_attention"],
                                ["sliding_attention", "sliding_attention", "full_attention"],
                                ["full_attention", "full_attention", "sliding_attention"],
                                ["sliding_attention", "full_attention", "sliding_attention"]])
            overrides = dict(sliding_window=W, num_hidden_layers=3, layer_types=kinds)
        else:
            model_type = rng.choice(sorted(EVERY_LAYER))
            overrides = EVERY_LAYER[model_type](W)
        return {"type": model_type, "overrides": overrides, "family": group}
    if group == "interleaved":
        return {"type": rng.choice(INTERLEAVED), "overrides": {}, "family": group}
    if group == "partial":
        return {"type": rng.choice(PARTIAL), "overrides": {}, "family": group}
    if group == "nope":
        return {"type": "smollm3", "overrides": rng.choice([{}, dict(no_rope_layers=[0, 1])]), "family": group}
    if group == "scaled":
        return {"type": rng.choice(SCALED), "overrides": {}, "family": group}
    others = [t for t in SUPPORTED_MODEL_TYPES]
    return {"type": rng.choice(others), "overrides": {}, "family": group}


_MODELS: OrderedDict = OrderedDict()


def get_model(model_type: str, overrides: dict) -> torch.nn.Module:
    """Built once per (type, overrides); an LRU of 24 models."""
    key = json.dumps([model_type, overrides], sort_keys=True)
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key]
    if model_type == "llama":
        model = build_llama()
    elif model_type.startswith("llama_"):
        model = build_llama(rope=model_type.split("_", 1)[1])
    elif model_type == "gpt_neox":
        model = build_gpt_neox()
    elif model_type == "gemma3":
        model = build_gemma3_multimodal(**overrides)
    elif model_type == "qwen2_all":
        model = build_llama_family("qwen2", **overrides)
    else:
        model = build_llama_family(model_type, **overrides)
    _MODELS[key] = model
    while len(_MODELS) > 24:
        _MODELS.popitem(last=False)
    return model


# --- drawing a case ------------------------------------------------------------------------------------------


def random_blocks(rng: random.Random, length: int, capacity: int) -> list[int]:
    sizes, left = [], length
    while left:
        kind = rng.random()
        if kind < 0.45:
            size = 1
        elif kind < 0.8:
            size = rng.randint(1, max(1, capacity))
        else:
            size = rng.randint(capacity + 1, 3 * capacity + 3)  # longer than the capacity
        sizes.append(min(size, left))
        left -= sizes[-1]
    return sizes


def draw_case(seed: int) -> dict:
    rng = random.Random(seed)
    model = draw_model(rng)
    n_sink = rng.randint(0, 5)
    window_size = rng.randint(1, 12)
    W = model["overrides"].get("sliding_window")
    if model["family"] == "every" and n_sink + window_size >= W and rng.random() < 0.75:
        # mostly keep an every-layer-sliding model within its window (else the documented refusal)
        if W - 1 - n_sink >= 1:
            window_size = rng.randint(1, W - 1 - n_sink)
        else:
            n_sink = rng.randint(0, W - 2)
            window_size = rng.randint(1, W - 1 - n_sink)
    position_mode = rng.choice(POSITION_MODES)
    path = (rng.choices(PATHS, weights=PATH_WEIGHTS) if seed < SEGMENT2 else
            rng.choices(PATHS + ("generate_batch",), weights=PATH_WEIGHTS + (1,)))[0]
    capacity = n_sink + window_size
    max_length = 3 * capacity + (W or 0) + 2
    length = rng.randint(1, max_length) if rng.random() < 0.3 else rng.randint(max(1, max_length // 2), max_length)
    case = dict(seed=seed, model=model, n_sink=n_sink, window_size=window_size, position_mode=position_mode,
                path=path, length=length, token_seed=rng.randint(0, 2**31 - 1))
    if path in ("general", "general_mit", "batch", "batch_mit"):
        case["blocks"] = random_blocks(rng, length, capacity)
        case["block_piece"] = rng.choice([None, None, None, rng.randint(1, 6)])
        case["reset_first"] = rng.random() < 0.15  # feed part of another stream, reset, then the case's stream
    elif path in ("fast", "batch_fast"):
        case["prefill"] = rng.randint(1, length) if rng.random() < 0.8 else 1
        case["use_step"] = rng.random() < 0.5  # .step() for the one-token steps, else __call__
        case["mid_blocks"] = rng.random() < 0.2  # a few general-path blocks among the steps
        case["reset_first"] = rng.random() < 0.15
        if case["mid_blocks"]:
            case["blocks"] = random_blocks(rng, length, capacity)
        # A batch of 2 through the unchecked .step() needs buffers of that batch size first (reset(batch_size=2));
        # cases logged before this key existed ran without it (see the report: step() on a fresh wrapper).
        case["presize"] = path == "batch_fast"
    else:  # generate, generate_fast, generate_batch
        prompt = rng.randint(1, max(1, length - 1))
        case["fed_before"] = rng.randint(0, prompt - 1) if rng.random() < 0.4 else 0  # tokens fed by the wrapper first
        case["prompt"] = prompt
        case["new_tokens"] = max(1, length - prompt)
        case["after_steps"] = rng.randint(0, 4) if path == "generate_fast" else 0
        case["length"] = prompt + case["new_tokens"]
    # Extra knobs (added after the first 20-minute segment), from a separate generator so that the fields above stay
    # what segment 1 drew for the same seed.
    if seed < SEGMENT2:  # segment 1 (seeds 0..99999) ran without these knobs: --replay stays exact for its seeds
        case["presize"] = False
        return case
    extra = random.Random(seed * 7919 + 1)
    if model["type"] not in ("gpt_neox", "gemma3") and not model["type"].startswith("llama") and extra.random() < 0.3:
        model["overrides"] = dict(model["overrides"], num_key_value_heads=extra.choice([1, 4]))  # MQA / MHA
    if extra.random() < 0.15 and not path.startswith("generate"):  # a longer stream
        case["length"] = length = extra.randint(3 * capacity, 6 * capacity + (W or 0) + 4)
        if "blocks" in case:
            case["blocks"] = random_blocks(extra, length, capacity)
        if "prefill" in case:
            case["prefill"] = min(case["prefill"], length)
    if seed >= SEGMENT3 and model["type"] not in ("gpt_neox", "gemma3", "gemma3_text", "gpt_oss", "cwm", "minimax_m2") \
            and not model["type"].startswith("llama"):
        knobs = random.Random(seed * 104729 + 2)
        if knobs.random() < 0.25:  # a small base: every rotary pair turns fast, so a wrong position shows
            model["overrides"] = dict(model["overrides"], rope_theta=knobs.choice([10.0, 100.0]))
        if knobs.random() < 0.25:  # a trained context just above the capacity: pos_shift's frame (up to 3C) and
            # absolute positions (up to T) run past max_position_embeddings
            model["overrides"] = dict(model["overrides"], max_position_embeddings=capacity + 1 + knobs.randint(0, 3))
    if path in ("general", "general_mit", "batch", "batch_mit", "fast", "batch_fast"):
        case["max_block"] = extra.choice([512, 512, 512, extra.randint(1, 2 * capacity + 2)])
    if path in ("fast", "batch_fast", "generate_fast"):
        case["decode_attention"] = extra.choice(["auto", "grouped", "gqa", "expanded_masked", "matmul"])
    if path in ("generate", "generate_batch"):
        case["streaming_mode"] = extra.choice(["ours", "ours", "mit"])
    return case


# --- running a case ------------------------------------------------------------------------------------------


class Bookkeeping(AssertionError):
    pass


def check_bookkeeping(wrapper, seen: int, where: str) -> None:
    """The tests' bookkeeping checks (tiny_models.check_bookkeeping, compress of every layer), the positions kept
    (SEMANTICS §1) and finite compressed keys and values; a failure is a Bookkeeping outcome."""
    cache = wrapper.cache
    try:
        check_cache(cache, seen, compressed_layers=None)
    except AssertionError as error:
        raise Bookkeeping(f"{where}: {error!r}") from None
    n_sink, window = wrapper.n_sink, wrapper.window_size
    expected_kept = list(range(min(n_sink, seen))) + list(range(max(n_sink, seen - window), seen))
    kept = cache.kept_positions()
    kept_list = kept.tolist() if kept.dim() == 1 else kept[0].tolist()
    if kept_list != expected_kept:
        raise Bookkeeping(f"{where}: kept_positions {kept_list} != {expected_kept}")
    for index in range(len(cache.layers)):
        keys, values = cache.compress(index)
        if not bool(torch.isfinite(keys).all() and torch.isfinite(values).all()):
            raise Bookkeeping(f"{where}: layer {index} compress not finite")


def check_compress_layer0(wrapper, model, ids):
    """compress(0) against the model itself: layer 0's keys depend on the token alone, so the kept tokens run densely
    (DynamicCache, positions 0..n-1) give the keys at cache slots 0..n-1 that compress() must hand out. ids [b, T]."""
    from transformers import DynamicCache

    cache = wrapper.cache
    kept = cache.kept_positions(0)
    keys, values = cache.compress(0)
    worst = 0.0
    if kept.numel() == 0:  # a sliding ring of W = 1 holds nothing between steps
        if keys.shape[-2] or values.shape[-2]:
            raise Bookkeeping(f"compress(0) gave {keys.shape[-2]} tokens where kept_positions(0) is empty")
        return worst
    for row in range(ids.shape[0]):
        kept_ids = ids[row, kept][None]
        dense = DynamicCache()
        with torch.no_grad():
            model(kept_ids, attention_mask=torch.ones_like(kept_ids), past_key_values=dense, use_cache=True)
        want_keys, want_values = dense.layers[0].keys, dense.layers[0].values
        if want_keys.shape != keys[row:row + 1].shape:
            raise Bookkeeping(f"compress(0) shape {tuple(keys.shape)} vs dense {tuple(want_keys.shape)}")
        worst = max(worst, (keys[row:row + 1] - want_keys).abs().max().item(),
                    (values[row:row + 1] - want_values).abs().max().item())
    return worst


def make(case, model, fast=False, streaming_mode="ours"):
    max_block = case.get("max_block", 512)
    if fast:
        return FastStreamingWrapper(copy.deepcopy(model), case["n_sink"], case["window_size"],
                                    position_mode=case["position_mode"], compile="never", max_block=max_block,
                                    decode_attention=case.get("decode_attention", "auto"))
    return StreamingLLMWrapper(copy.deepcopy(model), n_sink=case["n_sink"], window_size=case["window_size"],
                               position_mode=case["position_mode"], streaming_mode=streaming_mode, max_block=max_block)


def feed_blocks(wrapper, ids, blocks, step_mode=None):
    """ids [b, T]; logits [b, T, vocab]; bookkeeping after every call. step_mode: for the fast wrapper, how one-token
    feeds go (True: .step(), False: __call__)."""
    seen, out = 0, []
    for size in blocks:
        piece = ids[:, seen:seen + size]
        if step_mode and size == 1:
            logits = wrapper.step(piece)
        else:
            logits = wrapper(piece)
        if tuple(logits.shape) != (ids.shape[0], size, VOCAB_SIZE):
            raise Bookkeeping(f"logits shape {tuple(logits.shape)}")
        seen += size
        check_bookkeeping(wrapper, seen, f"after {seen} tokens")
        out.append(logits.float())
    return torch.cat(out, dim=1)


def tokens(case, batch=None):
    g = torch.Generator().manual_seed(case["token_seed"])
    shape = (case["length"],) if batch is None else (batch, case["length"])
    return torch.randint(0, VOCAB_SIZE, shape, generator=g)


def run_path(case, model):
    """(package logits [rows, T, vocab], ids [rows, T], extra diffs dict) for the case's path."""
    path, length = case["path"], case["length"]
    extra = {}
    if path in ("general", "general_mit", "batch", "batch_mit", "fast", "batch_fast"):
        batch = 2 if path.startswith("batch") else None
        ids = tokens(case, batch)
        ids2 = ids if batch else ids[None]
        fast = path in ("fast", "batch_fast")
        mode = "mit" if path.endswith("mit") else "ours"
        if fast:
            prefill = case["prefill"]
            blocks = case.get("blocks") if case.get("mid_blocks") else None
            if blocks is None:
                blocks = ([prefill] if prefill else []) + [1] * (length - prefill)
        else:
            blocks = case["blocks"]
        piece = case.get("block_piece")
        context = mock.patch.object(cache_module, "BLOCK_PIECE", piece) if piece else _null()
        with context, torch.no_grad():
            wrapper = make(case, model, fast=fast, streaming_mode=mode)
            if case.get("presize"):
                wrapper.reset(batch_size=ids2.shape[0])
            if case.get("reset_first"):
                other = torch.randint(0, VOCAB_SIZE, ids2.shape, generator=torch.Generator().manual_seed(case["seed"]))
                feed_blocks(wrapper, other[:, : max(1, length // 2)], [max(1, length // 2)] if not fast else
                            [1] * max(1, length // 2), step_mode=fast and case.get("use_step"))
                wrapper.reset()
                if case.get("presize"):
                    wrapper.reset(batch_size=ids2.shape[0])
            got = feed_blocks(wrapper, ids2, blocks, step_mode=fast and case.get("use_step"))
            extra["compress0_vs_dense"] = check_compress_layer0(wrapper, model, ids2)
            if batch:  # each row alone, same path
                for row in range(batch):
                    wrapper.reset() if not fast else wrapper.reset(batch_size=1)
                    alone = feed_blocks(wrapper, ids2[row:row + 1], blocks, step_mode=fast and case.get("use_step"))
                    extra[f"row{row}_vs_alone"] = (got[row] - alone[0]).abs().max().item()
        return got, ids2, extra
    # generate paths: generate_batch runs 2 prompts of the same length through one cache
    rows = 2 if path == "generate_batch" else 1
    ids = tokens(case, rows)  # [rows, T]
    prompt, new = case["prompt"], case["new_tokens"]
    fast = path == "generate_fast"
    with torch.no_grad():
        wrapper = make(case, model, fast=fast, streaming_mode=case.get("streaming_mode", "ours"))
        recorded = {}  # position -> logits [rows, vocab]
        fed_before = case["fed_before"]
        if fed_before:
            logits = wrapper(ids[:, :fed_before])
            for i in range(fed_before):
                recorded[i] = logits[:, i].float()
            check_bookkeeping(wrapper, fed_before, "after the wrapper's feed")
        prompt_ids = ids[:, :prompt]
        output = wrapper.model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                        past_key_values=wrapper.cache, max_new_tokens=new, min_new_tokens=new,
                                        do_sample=False, return_dict_in_generate=True, output_logits=True)
        sequences = output.sequences
        if sequences[:, :prompt].tolist() != prompt_ids.tolist():
            raise Bookkeeping("generate changed the prompt")
        for i, step_logits in enumerate(output.logits):
            recorded[prompt - 1 + i] = step_logits.float()
        fed = sequences.shape[1] - 1
        check_bookkeeping(wrapper, fed, "after generate")
        stream = sequences[:, :-1]
        after = case.get("after_steps", 0)
        if after:
            extra_ids = torch.randint(0, VOCAB_SIZE, (rows, after), generator=torch.Generator().manual_seed(case["seed"]))
            nxt = torch.cat([sequences[:, -1:], extra_ids[:, : after - 1]], dim=1)
            for k in range(after):
                token = nxt[:, k:k + 1]
                logits = wrapper(token)[:, 0]
                recorded[stream.shape[1]] = logits.float()
                stream = torch.cat([stream, token], dim=1)
                check_bookkeeping(wrapper, stream.shape[1], "after a step following generate")
        extra["compress0_vs_dense"] = check_compress_layer0(wrapper, model, stream)
        T = stream.shape[1]
        positions = [i for i in range(T) if i in recorded]
        got = torch.stack([recorded[i] for i in positions], dim=1)  # [rows, n, vocab]
        extra["positions"] = positions
        return got, stream, extra


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_case(case, verbose=False) -> dict:
    started = time.time()
    result = dict(case=case)
    try:
        model = get_model(case["model"]["type"], case["model"]["overrides"])
    except Exception as error:  # a config transformers refuses: not the package's
        result.update(outcome="model_build_error", message=f"{type(error).__name__}: {error}"[:300])
        return result
    try:
        got, ids, extra = run_path(case, model)
    except Bookkeeping as error:
        result.update(outcome="fail_bookkeeping", message=str(error)[:500])
        return finish(result, started, verbose)
    except ValueError as error:
        tb = traceback.extract_tb(error.__traceback__)
        origin = tb[-1].filename if tb else "?"
        result.update(outcome="refused" if "streaming_llm" in origin else "error",
                      message=f"{type(error).__name__}: {error}"[:400], origin=f"{origin}:{tb[-1].lineno}")
        if verbose:
            traceback.print_exc()
        return finish(result, started, verbose)
    except Exception as error:
        tb = traceback.extract_tb(error.__traceback__)
        result.update(outcome="error", message=f"{type(error).__name__}: {error}"[:400],
                      origin=f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?")
        if verbose:
            traceback.print_exc()
        return finish(result, started, verbose)
    diffs = {}
    for row in range(ids.shape[0]):
        expected = naive_streaming_logits(model, ids[row], case["n_sink"], case["window_size"], case["position_mode"])
        if "positions" in extra:
            expected = expected[extra["positions"]]
        per_token = (got[row] - expected).abs().amax(dim=-1)
        diffs[f"row{row}"] = per_token.max().item()
        if verbose:
            print(f"row {row}: per-token max |dlogit|:", [round(v, 6) for v in per_token.tolist()])
            bad = (per_token > TOLERANCE).nonzero().flatten().tolist()
            print(f"row {row}: tokens over tolerance: {bad}")
    diffs.update({k: v for k, v in extra.items() if k != "positions"})
    worst = max(diffs.values())
    result.update(max_diff=worst, diffs=diffs)
    bad = [k for k, v in diffs.items() if not v <= TOLERANCE]  # NaN counts as bad
    result["outcome"] = "ok" if not bad else ("fail_compress" if bad == ["compress0_vs_dense"] else "fail_logits")
    result["bad"] = bad
    return finish(result, started, verbose)


def finish(result, started, verbose):
    result["seconds"] = round(time.time() - started, 3)
    if verbose:
        print(json.dumps(result, indent=1, default=str))
    return result


def _reference_rows(model, case, ids, positions) -> list[torch.Tensor]:
    rows = [naive_streaming_logits(model, ids[row], case["n_sink"], case["window_size"], case["position_mode"])
            for row in range(ids.shape[0])]
    return [logits[positions] for logits in rows] if positions is not None else rows


def float64_errors(case: dict, sensitivity_eps: float = 1e-6, trials: int = 3) -> dict:
    """Per row of a case over TOLERANCE, is it rounding or a defect?

    - "package", "reference": max |dlogit| of the package's logits and of the reference's, both float32, against the
      reference run on the model cast to float64, same tokens (a mixture of experts with transformers' eager expert
      loop: its grouped matmul takes no float64). Not float64 throughout: the reference turns RoPE angles in float32,
      as transformers does, and some of the model's own modules (Gemma's RMSNorm) compute in float32 whatever the
      dtype (SEMANTICS.md §6). Of one size: both round, and the model amplifies it.
    - "sensitivity": the largest max |dlogit| of the float32 reference when every weight is scaled by
      1 + sensitivity_eps * N(0, 1) (`trials` draws): a few float32 ulps. As large as the difference found: the
      logits jump at a rounding-level change of their inputs (a router choosing between two experts whose scores
      tie to ~1e-7), so neither side is wrong; far smaller: a defect.
    """
    from streaming_llm.models import is_mixture_of_experts

    model = get_model(case["model"]["type"], case["model"]["overrides"])
    with torch.no_grad():
        got, ids, extra = run_path(case, model)
        positions = extra.get("positions")
        expected = _reference_rows(model, case, ids, positions)
        exact_model = copy.deepcopy(model).double()
        if is_mixture_of_experts(model.config):
            exact_model.set_experts_implementation("eager")
        exact = _reference_rows(exact_model, case, ids, positions)
        sensitivity = [0.0] * ids.shape[0]
        for trial in range(trials):
            perturbed = copy.deepcopy(model)
            generator = torch.Generator().manual_seed(trial)
            for parameter in perturbed.parameters():
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.mul_((1 + sensitivity_eps * noise).to(parameter.dtype))
            for row, logits in enumerate(_reference_rows(perturbed, case, ids, positions)):
                sensitivity[row] = max(sensitivity[row], (logits - expected[row]).abs().max().item())
    return {f"row{row}": {"package": (got[row].double() - exact[row]).abs().max().item(),
                          "reference": (expected[row].double() - exact[row]).abs().max().item(),
                          "sensitivity": sensitivity[row], "sensitivity_eps": sensitivity_eps,
                          "max_abs_logit": exact[row].abs().max().item()}
            for row in range(ids.shape[0])}


def summarize(log_path: str, commit: str | None = None) -> dict:
    """A campaign log's seeds, the commits it ran at (`commit` for lines that do not say: logs written before
    2026-11-27 21:10), outcomes (per path and model type), the spread of max |dlogit|, and every case that was not ok
    or refused (a fail_logits case with its float64_errors)."""
    with open(log_path) as log:
        results = [json.loads(line) for line in log if line.strip()]
    if not results:
        raise SystemExit(f"{log_path}: no cases")
    seeds = sorted(result["case"]["seed"] for result in results)
    runs = []  # contiguous seed ranges [first, last]
    for seed in seeds:
        if runs and seed == runs[-1][1] + 1:
            runs[-1][1] = seed
        else:
            runs.append([seed, seed])
    diffs = sorted(result["max_diff"] for result in results if isinstance(result.get("max_diff"), float))

    def quantile(q: float) -> float:  # nearest rank
        return diffs[min(len(diffs) - 1, math.ceil(q * len(diffs)) - 1)]

    findings = []
    for result in results:
        if result["outcome"] in ("ok", "refused"):
            continue
        case = result["case"]
        finding = {"seed": case["seed"], "outcome": result["outcome"], "model": case["model"]["type"],
                   "path": case["path"], "position_mode": case["position_mode"], "max_diff": result.get("max_diff"),
                   "bad": result.get("bad"), "message": result.get("message")}
        if result["outcome"] == "fail_logits":
            finding["float64"] = float64_errors(case)
        findings.append(finding)
    from streaming_llm.eval.results import git_commit, versions

    return {
        "kind": "fuzz_campaign", "log": os.path.basename(log_path), "tolerance": TOLERANCE, "cases": len(results),
        "seed_ranges": runs,
        "run_at_commits": sorted({result.get("git_commit") or commit for result in results} - {None}),
        "outcomes": dict(Counter(result["outcome"] for result in results)),
        "outcomes_by_path": {path: dict(Counter(r["outcome"] for r in results if r["case"]["path"] == path))
                             for path in sorted({r["case"]["path"] for r in results})},
        "cases_by_model_type": dict(sorted(Counter(r["case"]["model"]["type"] for r in results).items())),
        "max_abs_dlogit": {"cases": len(diffs), "median": quantile(0.5), "p99": quantile(0.99), "max": diffs[-1]}
        if diffs else None,
        "findings": findings,
        "summarized_at_commit": git_commit(HERE), "versions": versions(),
    }


# --- shrinking -----------------------------------------------------------------------------------------------


def shrink(case: dict, budget_s: float = 600) -> dict:
    """Greedy: try smaller variants while the same outcome persists."""
    base = run_case(case)
    outcome = base["outcome"]
    if outcome in ("ok", "refused"):
        print("case does not fail:", outcome)
        return case
    print("shrinking", outcome, base.get("max_diff"), base.get("message"))
    deadline = time.time() + budget_s
    current = copy.deepcopy(case)

    def candidates(c):
        out = []
        L = c["length"]
        for new_length in sorted({1, L // 2, L - 1, L - 2, L - 3} - {L}):
            if new_length >= 1:
                d = copy.deepcopy(c)
                d["length"] = new_length
                if "blocks" in d:
                    blocks, total = [], 0
                    for b in d["blocks"]:
                        if total >= new_length:
                            break
                        blocks.append(min(b, new_length - total))
                        total += blocks[-1]
                    d["blocks"] = blocks
                if "prefill" in d:
                    d["prefill"] = min(d["prefill"], new_length)
                if "prompt" in d:
                    if new_length < 2:
                        continue
                    d["prompt"] = min(d["prompt"], new_length - 1)
                    d["new_tokens"] = new_length - d["prompt"]
                    d["fed_before"] = min(d["fed_before"], d["prompt"] - 1)
                out.append(d)
        for key, low in (("n_sink", 0), ("window_size", 1)):
            if c[key] > low:
                for value in sorted({low, c[key] - 1}):
                    d = copy.deepcopy(c)
                    d[key] = value
                    out.append(d)
        W = c["model"]["overrides"].get("sliding_window")
        if W and W > 1:
            for value in sorted({1, 2, W - 1} - {W}):
                if value >= 1:
                    d = copy.deepcopy(c)
                    d["model"] = copy.deepcopy(c["model"])
                    d["model"]["overrides"] = dict(d["model"]["overrides"], sliding_window=value)
                    out.append(d)
        if "blocks" in c and any(b > 1 for b in c["blocks"]):
            d = copy.deepcopy(c)
            d["blocks"] = [1] * d["length"]
            out.append(d)
            # merge neighbouring blocks
            for i in range(len(c["blocks"]) - 1):
                d = copy.deepcopy(c)
                d["blocks"] = c["blocks"][:i] + [c["blocks"][i] + c["blocks"][i + 1]] + c["blocks"][i + 2:]
                out.append(d)
        if "blocks" in c and len(c["blocks"]) > 1:
            d = copy.deepcopy(c)
            d["blocks"] = [d["length"]]
            out.append(d)
        for flag in ("reset_first", "mid_blocks", "use_step"):
            if c.get(flag):
                d = copy.deepcopy(c)
                d[flag] = False
                out.append(d)
        if c.get("max_block", 512) != 512:
            d = copy.deepcopy(c)
            d["max_block"] = 512
            out.append(d)
        if c.get("decode_attention", "auto") != "auto":
            d = copy.deepcopy(c)
            d["decode_attention"] = "auto"
            out.append(d)
        if c.get("block_piece"):
            d = copy.deepcopy(c)
            d["block_piece"] = None
            out.append(d)
        if c.get("fed_before"):
            d = copy.deepcopy(c)
            d["fed_before"] = 0
            out.append(d)
        if c.get("after_steps"):
            d = copy.deepcopy(c)
            d["after_steps"] = 0
            out.append(d)
        if c["position_mode"] != "pos_shift":
            d = copy.deepcopy(c)
            d["position_mode"] = "pos_shift"
            out.append(d)
        return out

    improved = True
    while improved and time.time() < deadline:
        improved = False
        for candidate in candidates(current):
            if time.time() > deadline:
                break
            r = run_case(candidate)
            if r["outcome"] == outcome:
                current = candidate
                print("  ->", json.dumps({k: v for k, v in current.items() if k != "seed"}), r.get("max_diff"),
                      (r.get("message") or "")[:120])
                improved = True
                break
    print("SHRUNK:", json.dumps(current))
    run_case(current, verbose=True)
    return current


# --- main ----------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--replay", type=int)
    parser.add_argument("--params", type=str, help="a case as JSON (as logged, or shrunk)")
    parser.add_argument("--shrink", action="store_true")
    parser.add_argument("--minutes", type=float, default=0)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=10**9)
    parser.add_argument("--log", type=str, default="fuzz_log.jsonl")
    parser.add_argument("--float64", action="store_true", help="with --replay/--params: errors against float64")
    parser.add_argument("--summarize", metavar="LOG", help="write the summary of a campaign log (to --out or stdout)")
    parser.add_argument("--out", help="the summary's JSON file")
    parser.add_argument("--commit", help="with --summarize: the commit a log ran at, where its lines do not say")
    args = parser.parse_args()
    if args.summarize:
        if args.out:
            from streaming_llm.eval.results import write_json_atomically

            write_json_atomically(args.out, summarize(args.summarize, args.commit))
        else:
            print(json.dumps(summarize(args.summarize, args.commit), indent=2))
        return
    if args.replay is not None or args.params:
        case = json.loads(args.params) if args.params else draw_case(args.replay)
        print("case:", json.dumps(case))
        if args.shrink:
            shrink(case)
        elif args.float64:
            print(json.dumps(float64_errors(case), indent=1))
        else:
            run_case(case, verbose=True)
        return
    deadline = time.time() + args.minutes * 60 if args.minutes else float("inf")
    seed = args.start
    from streaming_llm.eval.results import git_commit

    commit = git_commit(HERE)
    with open(args.log, "a") as log:
        while time.time() < deadline and seed < args.start + args.count:
            case = draw_case(seed)
            result = run_case(case)
            result["git_commit"] = commit
            log.write(json.dumps(result, default=str) + "\n")
            log.flush()
            if result["outcome"] not in ("ok", "refused"):
                print(f"seed {seed}: {result['outcome']} {result.get('max_diff')} {result.get('message', '')[:200]}",
                      flush=True)
            seed += 1
    print(f"last seed {seed - 1}")


if __name__ == "__main__":
    main()
