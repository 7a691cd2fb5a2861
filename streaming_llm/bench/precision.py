"""Precision at long stream positions: `absolute` position mode against `pos_shift`, in fp32, bf16 and fp16.

    python -m streaming_llm.bench.precision --modes absolute pos_shift rerotate              # RoPE + tiny, ~1 min
    python -m streaming_llm.bench.precision --modes absolute pos_shift rerotate --embedded   # + SmolLM2, ~7 min

`absolute` rotates a query at its stream position t and keys at theirs, so at t = 10^7 RoPE angles are ~10^7 rad.
Angles are computed in float32 (by transformers and by this package alike, whatever the model dtype), and a
float32 near 10^7 is spaced by 1.0: a fast frequency's angle is off by up to 0.5 rad (0.16 rad measured over
SmolLM2's frequencies), independently for query and key, so the score no longer depends on the distance alone.
`pos_shift` keeps every position below 2 * capacity + 1 however long the stream runs. Three measurements, each
against float64 math on the same inputs:

1. rope: the rotation of random Gaussian query/key vectors (SmolLM2's head_dim 64, theta 1e5) at the positions
   each mode uses for a query at stream position P, through the package's own `RotaryParams.rotate` in each
   dtype: angle error, key error, score error, attention-probability error over sinks + window. The float64
   reference takes the float32 inverse frequencies as exact and computes angles and rotations in float64.
2. tiny: end to end on a 2-layer random Llama (capacity 4 + 60). The stream is made to reach P cheaply: the
   sinks are fed, then the cache's step counter is moved to Q = P - M (`jump_to`: the state a stream has when
   the tokens at [n_sink, Q) have left the window; for pos_shift its frame offset is set to the value a
   continuous stream would have), and M + L tokens are fed one at a time through the package (the decode path;
   the first window_size + 1 after a jump as one block, see jump_to).
   The logits of the last L tokens are compared with a float64 oracle of the same gapped stream (SEMANTICS §2
   closed form: distance t - p to window keys, min(t, C) - j to sinks for pos_shift, t - j for absolute; own
   RMSNorm/RoPE/softmax in float64).
3. embedded (--embedded): the same on SmolLM2-135M-Instruct (capacity 4 + 1020), the M-token prefix fed in
   blocks of 256, the last L tokens one at a time.

The jump skips the tokens in [n_sink, Q): the oracle and the package see the same gapped stream, so the error is
pure arithmetic. It does not measure what the model makes of distances it never saw in training (absolute mode
at P beyond the trained context is out of distribution even in exact arithmetic: that is a quality question,
see the eval results).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F

from streaming_llm.cli_common import measurement_output
from streaming_llm.models import attention_shape
from streaming_llm.positions import PositionPolicy
from streaming_llm.rope import RotaryParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STREAM_POSITIONS = (10**3, 10**4, 10**5, 10**6, 10**7)
# The float64 oracle rotates at stream positions: its angles are rounded by ~P * 2^-53 rad (1e-6 at 10^10, an order
# below the float32 error it measures; at 2^53 ~1 rad, and pos_shift "fails" against it). Beyond, it is no reference.
MAX_STREAM_POSITION = 10**10
# The end-to-end checks: the tiny model's, and the embedded model's (--embedded)
TINY_SETUP = {"model": "tiny random Llama (2 layers, hidden 64, 4/2 heads, vocab 128)", "n_sink": 4,
              "window_size": 60, "prefix_tokens": 180, "scored_tokens": 32, "prefix_block": 1}
EMBEDDED_SETUP = {"model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32)", "n_sink": 4,
                  "window_size": 1020, "prefix_tokens": 1024, "scored_tokens": 16, "prefix_block": 256}
SMOLLM2_HEAD_DIM, SMOLLM2_ROPE_THETA = 64, 100000.0


# -- positions ------------------------------------------------------------------------------------------------


def frame_base(policy: PositionPolicy, seen: int) -> int:
    """The frame offset `base` of stored window keys after `seen` tokens fed one at a time (the cache's own
    PositionPolicy.next_base, in closed form: a loop over its steps took ~2 s at 10^8 and years at 2^53)."""
    if policy.mode != "pos_shift":
        return policy.next_base(0, seen)
    # next_base moves base by capacity + 1 each time the newest position reaches base + 2 * capacity + 1
    capacity = policy.capacity
    return max(0, (seen - 2 * capacity - 1) // (capacity + 1) + 1) * (capacity + 1)


def attention_positions(mode: str, n_sink: int, window_size: int, t: int):
    """Where a query at stream position t and the keys it sees (sinks, then window) are rotated.

    Returns (key stream positions [k], key frame positions [k], query frame position for each key [k]): the
    query is rotated at psi_sink(t) for sink keys and psi_window(t) for window keys (positions.py).
    """
    policy = PositionPolicy(mode, n_sink, window_size)
    keys = [j for j in range(n_sink) if j <= t] + list(range(max(n_sink, t - window_size), t + 1))
    keys = torch.tensor(keys)
    base = frame_base(policy, t)
    sink_frame, window_frame = policy.query_frames(torch.tensor([t]), base)
    query_frames = torch.where(keys < n_sink, sink_frame, window_frame)
    return keys, policy.key_frame(keys, base), query_frames


# -- 1. RoPE alone --------------------------------------------------------------------------------------------


def rotate_float64(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., n, d] (float64) rotated at integer positions [n] with angles computed in float64."""
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * emb.cos() + rotated_half * emb.sin()


def rope_precision(mode: str, t: int, dtype: torch.dtype, n_sink: int, window_size: int, num_vectors: int = 64,
                   seed: int = 0, head_dim: int = SMOLLM2_HEAD_DIM, theta: float = SMOLLM2_ROPE_THETA) -> dict:
    """Errors of one query position t in one dtype (see the module docstring, part 1)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rotary = RotaryParams(inv_freq, head_dim)
    keys_stream, key_frames, query_frames = attention_positions(mode, n_sink, window_size, t)
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(num_vectors, 1, head_dim, generator=generator).to(dtype)  # one query per sample
    keys = torch.randn(num_vectors, keys_stream.shape[0], head_dim, generator=generator).to(dtype)
    scale = head_dim**-0.5

    is_sink = keys_stream < n_sink
    window_frame = int(query_frames[-1])
    sink_frame = int(query_frames[is_sink][0]) if bool(is_sink.any()) else window_frame

    def scores_with(rotate, q, k):
        """Scores [num_vectors, keys]: the query at its sink frame for sink keys, at its window frame otherwise."""
        k_rotated = rotate(k, key_frames)
        by_frame = {p: (rotate(q, torch.tensor([p])) * k_rotated).sum(-1) for p in {sink_frame, window_frame}}
        return torch.where(is_sink, by_frame[sink_frame], by_frame[window_frame]).double() * scale, k_rotated

    # In the dtype, the package's way (RotaryParams.rotate: float32 angles, cos/sin cast to the dtype).
    scores, keys_rotated = scores_with(rotary.rotate, query, keys)
    # float64 angles and arithmetic on the same (dtype-rounded) vectors.
    scores_exact, keys_exact = scores_with(lambda x, p: rotate_float64(x, p, inv_freq), query.double(), keys.double())
    # For any RoPE the score is a function of the distance only: the key turned back by the distance, query unturned.
    distances = query_frames - key_frames
    scores_by_distance = (query.double() * rotate_float64(keys.double(), -distances, inv_freq)).sum(-1) * scale

    largest = int(torch.maximum(key_frames.max(), query_frames.max()))
    angle_float32 = (torch.tensor(float(largest), dtype=torch.float32) * inv_freq).double()
    angle_exact = float(largest) * inv_freq.double()
    probabilities = torch.softmax(scores, -1)
    probabilities_exact = torch.softmax(scores_exact, -1)
    key_error = (keys_rotated.double() - keys_exact).norm(dim=-1) / keys.double().norm(dim=-1)
    return {
        "mode": mode,
        "stream_position": t,
        "dtype": str(dtype).removeprefix("torch."),
        "largest_rotary_position": largest,
        "angle_error_rad": float((angle_float32 - angle_exact).abs().max()),
        "key_relative_error": float(key_error.max()),
        "score_abs_error": float((scores - scores_exact).abs().max()),
        "score_rms": float(scores_exact.pow(2).mean().sqrt()),
        "probability_abs_error": float((probabilities - probabilities_exact).abs().max()),
        "probability_total_variation": float(0.5 * (probabilities - probabilities_exact).abs().sum(-1).max()),
        "float64_distance_check": float((scores_exact - scores_by_distance).abs().max()),
    }


# -- 2./3. end to end against a float64 oracle -----------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double())


@torch.no_grad()
def oracle_logits(model, ids: torch.Tensor, stream_positions: torch.Tensor, n_sink: int, window_size: int,
                  mode: str) -> torch.Tensor:
    """float64 logits [T, vocab] of a Llama-family model on tokens `ids` [T] at `stream_positions` [T]
    (increasing, gaps allowed), with SEMANTICS.md's visibility and the closed-form distances of §2."""
    config = model.config
    body = model.model
    shape = attention_shape(config)
    n_heads, n_kv_heads, head_dim = shape.heads, shape.kv_heads, shape.head_dim
    inv_freq = body.rotary_emb.inv_freq.double()
    capacity = n_sink + window_size
    t, p = stream_positions[:, None], stream_positions[None, :]
    visible = (p <= t) & ((p < n_sink) | (p >= torch.clamp(t - window_size, min=n_sink)))
    is_sink = (p < n_sink).expand_as(visible)
    sink_query_positions = stream_positions if mode == "absolute" else stream_positions.clamp(max=capacity)
    x = body.embed_tokens.weight.double()[ids]  # [T, hidden]
    for layer in body.layers:
        attention = layer.self_attn
        h = _rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        q = _linear(h, attention.q_proj).view(-1, n_heads, head_dim).transpose(0, 1)  # [heads, T, d]
        k = _linear(h, attention.k_proj).view(-1, n_kv_heads, head_dim).transpose(0, 1)
        v = _linear(h, attention.v_proj).view(-1, n_kv_heads, head_dim).transpose(0, 1)
        k = rotate_float64(k, stream_positions, inv_freq).repeat_interleave(n_heads // n_kv_heads, 0)
        v = v.repeat_interleave(n_heads // n_kv_heads, 0)
        window_scores = rotate_float64(q, stream_positions, inv_freq) @ k.transpose(-1, -2)
        sink_scores = rotate_float64(q, sink_query_positions, inv_freq) @ k.transpose(-1, -2)
        scores = torch.where(is_sink, sink_scores, window_scores) * head_dim**-0.5
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
        attended = (weights @ v).transpose(0, 1).reshape(x.shape[0], n_heads * head_dim)
        x = x + _linear(attended, attention.o_proj)
        h = _rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        mlp = layer.mlp
        x = x + _linear(F.silu(_linear(h, mlp.gate_proj)) * _linear(h, mlp.up_proj), mlp.down_proj)
    return _linear(_rms_norm(x, body.norm.weight, body.norm.variance_epsilon), model.lm_head)


def jump_to(wrapper, seen: int) -> None:
    """Move every cache layer's step counter to `seen` (>= the tokens fed so far, >= n_sink): as if tokens up to
    seen - 1 had been fed and had all left the window (only the sinks are held). The frame offset is set to
    the one a continuous stream has at `seen`.

    The ring's window slots are empty then, which no real stream past its capacity has: the one-token decode step
    attends to every slot once the stream has passed the capacity, so it would read the empty ones as keys. Feed
    the first window_size + 1 tokens after a jump as one block (the general path reads each slot's position);
    end_to_end does."""
    policy = wrapper.cache.policy
    base = frame_base(policy, seen)
    for layer in wrapper.cache.layers:
        if layer.get_cache_length() > min(layer.seen, policy.n_sink):
            raise ValueError("jump_to needs a cache that holds only sinks")
        layer.seen, layer.base = seen, base


@torch.no_grad()
def end_to_end(model, cast_model, mode: str, stream_position: int, n_sink: int, window_size: int,
               prefix_tokens: int, scored_tokens: int, prefix_block: int, seed: int = 0,
               oracle_cache: dict | None = None) -> dict:
    """Logit error of the last `scored_tokens` tokens of a gapped stream whose first scored token sits at
    `stream_position` (see the module docstring, parts 2 and 3): `cast_model` (the model in the dtype under
    test) through the package against the float64 oracle of `model`."""
    from streaming_llm.wrapper import StreamingLLMWrapper

    total = prefix_tokens + scored_tokens
    jump = stream_position - prefix_tokens  # Q: stream position of the first token after the sinks
    if jump < n_sink:
        raise ValueError(f"stream_position {stream_position} < n_sink + prefix_tokens ({n_sink + prefix_tokens})")
    refill = window_size + 1  # tokens after the jump until the ring holds no empty slot (see jump_to)
    if jump > n_sink and prefix_tokens < refill:
        raise ValueError(f"prefix_tokens {prefix_tokens} < window_size + 1 ({refill}): the scored tokens would see "
                         "window slots the jump left empty")
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (n_sink + total,), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(n_sink), torch.arange(jump, jump + total)])
    key = (mode, stream_position)
    if oracle_cache is not None and key in oracle_cache:
        expected = oracle_cache[key]
    else:
        expected = oracle_logits(model, ids, positions, n_sink, window_size, mode)[-scored_tokens:]
        if oracle_cache is not None:
            oracle_cache[key] = expected

    dtype = next(cast_model.parameters()).dtype
    wrapper = StreamingLLMWrapper(cast_model, n_sink, window_size, position_mode=mode)
    if n_sink:
        wrapper(ids[None, :n_sink])
    jump_to(wrapper, jump)
    body = ids[n_sink : n_sink + prefix_tokens]
    first = 0
    if prefix_block == 1 and jump > n_sink:  # one-token steps only once the ring is refilled (see jump_to)
        wrapper(body[None, :refill])
        first = refill
    for start in range(first, prefix_tokens, prefix_block):
        wrapper(body[None, start : start + prefix_block])
    logits = torch.cat([wrapper(ids[None, i : i + 1])[0] for i in range(n_sink + prefix_tokens, n_sink + total)])
    assert wrapper.cache.get_seq_length() == jump + total
    difference = (logits.double() - expected).abs()
    return {
        "mode": mode,
        "stream_position": stream_position,
        "dtype": str(dtype).removeprefix("torch."),
        "max_abs_logit_error": float(difference.max()),
        "mean_abs_logit_error": float(difference.mean()),
        "max_abs_logit": float(expected.abs().max()),
        "relative_error": float(difference.max() / expected.abs().max()),
        "top1_agreement": float((logits.argmax(-1) == expected.argmax(-1)).double().mean()),
        "finite": bool(torch.isfinite(logits).all()),
    }


def first_scored_position(setup: dict) -> int:
    """The least stream position an end-to-end setup can score: after its sinks and its prefix (end_to_end refuses an
    earlier one); the baseline row of each check."""
    return setup["n_sink"] + setup["prefix_tokens"]


def run_end_to_end(model, modes, positions, dtype_names, setup: dict, progress: bool = False) -> list[dict]:
    """end_to_end over modes x positions x dtypes; the model is cast once per dtype, the oracle run once per
    (mode, position)."""
    rows, oracles = [], {}
    for dtype_name in dtype_names:
        cast_model = copy.deepcopy(model).to(DTYPES[dtype_name])
        for mode in modes:
            for position in positions:
                rows.append(end_to_end(
                    model, cast_model, mode, position, setup["n_sink"], setup["window_size"], setup["prefix_tokens"],
                    setup["scored_tokens"], setup["prefix_block"], oracle_cache=oracles,
                ))
                if progress:
                    print(rows[-1], file=sys.stderr, flush=True)
        del cast_model
    order = {"mode": modes.index, "dtype": dtype_names.index}
    return sorted(rows, key=lambda r: (order["mode"](r["mode"]), r["stream_position"], order["dtype"](r["dtype"])))


# -- command line ---------------------------------------------------------------------------------------------


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, name in columns:
            value = row[name]
            cells.append(f"{value:.2e}" if isinstance(value, float) and name != "top1_agreement" else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming_llm.bench.precision", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--positions", type=int, nargs="+", default=list(STREAM_POSITIONS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["absolute", "pos_shift"],
                        choices=["absolute", "pos_shift", "rerotate"])
    parser.add_argument("--embedded", action="store_true", help="also the end-to-end check on SmolLM2 (minutes)")
    parser.add_argument("--embedded-positions", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    parser.add_argument("--embedded-modes", nargs="+", default=["absolute", "pos_shift"],
                        choices=["absolute", "pos_shift", "rerotate"],
                        help="rerotate is left out by default: its prefix is fed in blocks, which re-rotates the kept "
                        "keys once per block instead of once per token, so its rounding would be under-counted")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/precision/precision.json")
    args = parser.parse_args(argv)
    out = measurement_output(parser, args.out, option="--out")  # checked before the measurements, not after them
    # A stream position is where the scored tokens begin, after the sinks and the prefix of each end-to-end check
    for option, positions, setup in (("--positions", args.positions, TINY_SETUP),
                                     ("--embedded-positions", args.embedded_positions if args.embedded else [],
                                      EMBEDDED_SETUP)):
        least = first_scored_position(setup)
        if min(positions, default=least) < least:
            parser.error(f"{option}: each stream position must be at least {least} (the sinks and the prefix fed "
                         f"before it); got {min(positions)}")
        if max(positions, default=0) > MAX_STREAM_POSITION:
            parser.error(f"{option}: each stream position must be at most {MAX_STREAM_POSITION} (beyond, the float64 "
                         f"oracle's own angles are off by over 1e-6 rad); got {max(positions)}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1; got {args.threads}")
    torch.set_num_threads(args.threads)
    from streaming_llm.bench.soak import build_tiny_llama
    from streaming_llm.eval.results import write_json_atomically
    from streaming_llm.eval.results import device_description, git_commit, versions

    started = time.perf_counter()
    payload: dict = {
        "benchmark": "precision",
        "command": " ".join(["python -m streaming_llm.bench.precision", *(argv if argv is not None else sys.argv[1:])]),
        "device": device_description("cpu"),
        "versions": versions(),
        "git_commit": git_commit(),
    }

    rope_rows = []
    rope_setup = {"n_sink": 4, "window_size": 1020, "head_dim": SMOLLM2_HEAD_DIM, "rope_theta": SMOLLM2_ROPE_THETA,
                  "num_vectors": 64, "vectors": "standard normal q and k, rounded to the dtype"}
    for mode in args.modes:
        for position in args.positions:
            for dtype_name in args.dtypes:
                rope_rows.append(rope_precision(mode, position, DTYPES[dtype_name], 4, 1020))
    payload["rope"] = {"setup": rope_setup, "rows": rope_rows}
    print("## RoPE alone (query at stream position P; 4 sinks + 1020 window keys)\n", file=sys.stderr)
    print(_table(rope_rows, [("mode", "mode"), ("P", "stream_position"), ("dtype", "dtype"),
                             ("max rotary pos", "largest_rotary_position"), ("angle err rad", "angle_error_rad"),
                             ("key rel err", "key_relative_error"), ("score err", "score_abs_error"),
                             ("prob TV", "probability_total_variation")]), file=sys.stderr)

    tiny = build_tiny_llama(seed=0)
    tiny_setup = dict(TINY_SETUP)
    tiny_rows = run_end_to_end(tiny, args.modes, [first_scored_position(tiny_setup), *args.positions], args.dtypes,
                               tiny_setup)
    payload["tiny"] = {"setup": tiny_setup, "rows": tiny_rows}
    columns = [("mode", "mode"), ("P", "stream_position"), ("dtype", "dtype"), ("max |Δlogit|", "max_abs_logit_error"),
               ("relative", "relative_error"), ("top-1 agree", "top1_agreement")]
    print("\n## tiny Llama end to end\n", file=sys.stderr)
    print(_table(tiny_rows, columns), file=sys.stderr)

    if args.embedded:
        from streaming_llm.loading import load_model

        model, _ = load_model(None)
        setup = dict(EMBEDDED_SETUP)
        positions = [first_scored_position(setup), *args.embedded_positions]
        rows = run_end_to_end(model, args.embedded_modes, positions, args.dtypes, setup, progress=True)
        payload["embedded"] = {"setup": setup, "rows": rows}
        print("\n## SmolLM2-135M end to end\n", file=sys.stderr)
        print(_table(rows, columns), file=sys.stderr)

    payload["wall_s"] = time.perf_counter() - started
    print(f"-> {write_json_atomically(out, payload)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main, prog="python -m streaming_llm.bench.precision"))
