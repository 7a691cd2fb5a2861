"""streaming_llm.bench.precision: the instruments of the precision study (docs/reliability.md) measure what they say.

The study's numbers rest on three pieces that are not the package's streaming code: `frame_base` (the frame offset
a continuous stream has), `jump_to` (a stream moved far ahead cheaply) and `oracle_logits` (float64 math with the
closed-form distances of SEMANTICS.md §2). Each is checked here against the package's own decode loop, where that
loop is exact (fp32, short streams), so that at 10^7 tokens the reported error is arithmetic, not a bug in them.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from unittest import mock

import pytest
import torch
from tiny_models import dense_logits, max_abs_diff

from streaming_llm import StreamingLLMWrapper
from streaming_llm.bench import precision
from streaming_llm.bench.soak import build_tiny_llama
from streaming_llm.positions import PositionPolicy

MODES = ("pos_shift", "rerotate", "absolute")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(seed=0)


@pytest.mark.parametrize("mode", MODES)
def test_frame_base_is_the_offset_a_stream_fed_token_by_token_has(tiny, mode):
    """Capacity 2 + 6 over 60 steps, which cross several re-bases."""
    wrapper = StreamingLLMWrapper(tiny, n_sink=2, window_size=6, position_mode=mode)
    policy = PositionPolicy(mode, 2, 6)
    bases = []
    for token in torch.randint(0, 128, (60,), generator=torch.Generator().manual_seed(0)).tolist():
        wrapper(torch.tensor([[token]]))
        layer = wrapper.cache.layers[0]
        assert precision.frame_base(policy, layer.seen) == layer.base, f"after {layer.seen} tokens"
        bases.append(layer.base)
    # pos_shift: first at 17 tokens, then every capacity + 1; rerotate: at every eviction
    assert len(set(bases)) == {"pos_shift": 6, "rerotate": 53, "absolute": 1}[mode]


@pytest.mark.parametrize("mode", MODES)
def test_the_float64_oracle_is_the_decode_loop_on_a_contiguous_stream(tiny, mode):
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    oracle = precision.oracle_logits(tiny, ids, torch.arange(40), n_sink=2, window_size=8, mode=mode)
    wrapper = StreamingLLMWrapper(tiny, n_sink=2, window_size=8, position_mode=mode)
    decoded = torch.cat([wrapper(ids[None, i : i + 1])[0] for i in range(40)])
    assert max_abs_diff(decoded.double(), oracle) <= 1e-4
    # With the window over the whole stream it is the dense model; with 8 it is not (the check can fail).
    dense = dense_logits(tiny, ids).double()
    assert max_abs_diff(precision.oracle_logits(tiny, ids, torch.arange(40), 2, 40, mode), dense) <= 1e-4
    assert max_abs_diff(oracle, dense) > 1e-2


def test_attention_positions_follow_the_closed_form_distances():
    """pos_shift: window keys at their true distance, sinks at min(t, C) - j; absolute: t - j for every key."""
    n_sink, window_size, t = 4, 10, 1000
    for mode in ("pos_shift", "rerotate"):
        keys, key_frames, query_frames = precision.attention_positions(mode, n_sink, window_size, t)
        assert keys.tolist() == [0, 1, 2, 3, *range(990, 1001)]
        expected = torch.where(keys < n_sink, n_sink + window_size - keys, t - keys)
        assert torch.equal(query_frames - key_frames, expected)
        assert int(torch.maximum(key_frames.max(), query_frames.max())) <= 2 * (n_sink + window_size) + 1
    keys, key_frames, query_frames = precision.attention_positions("absolute", n_sink, window_size, t)
    assert torch.equal(key_frames, keys) and set(query_frames.tolist()) == {t}
    # Before the sinks are full: the query sees itself and the tokens before it, all sinks.
    keys, key_frames, query_frames = precision.attention_positions("pos_shift", n_sink, window_size, 2)
    assert keys.tolist() == [0, 1, 2] and (query_frames - key_frames).tolist() == [2, 1, 0]


@pytest.mark.parametrize("mode, position, tolerance", [
    ("pos_shift", 10**5, 1e-4), ("rerotate", 10**5, 1e-4), ("absolute", 1000, 1e-3),
])
def test_a_jumped_stream_is_scored_exactly_in_float32(tiny, mode, position, tolerance):
    """jump_to and the oracle of the same gapped stream agree to fp32 rounding (absolute only where its angles are
    still accurate), from the first token after a prefix of window_size + 1 tokens fed one at a time. The jump
    leaves the ring's window slots empty; fed as one-token decode steps, the first tokens read them as keys (off
    by 0.02 here, and 2 layers x 13 tokens later still), so end_to_end refills the ring with one block first."""
    setup = {"n_sink": 4, "window_size": 12, "prefix_tokens": 20, "scored_tokens": 6, "prefix_block": 1}
    row = precision.end_to_end(tiny, tiny, mode, position, **setup)
    assert row["finite"] and row["top1_agreement"] == 1.0 and row["max_abs_logit_error"] <= tolerance
    with pytest.raises(ValueError, match="stream_position 10 < n_sink \\+ prefix_tokens \\(24\\)"):
        precision.end_to_end(tiny, tiny, mode, 10, **setup)
    with pytest.raises(ValueError, match="prefix_tokens 12 < window_size \\+ 1 \\(13\\)"):
        precision.end_to_end(tiny, tiny, mode, position, **{**setup, "prefix_tokens": 12})
    # The shortest prefix that refills the ring; no jump (a contiguous stream) needs no refill.
    for stream_position, prefix_tokens in ((position, 13), (4 + 5, 5)):
        row = precision.end_to_end(tiny, tiny, mode, stream_position, **{**setup, "prefix_tokens": prefix_tokens})
        assert row["max_abs_logit_error"] <= tolerance


def test_end_to_end_reports_worst_cases(tiny):
    """max_abs_logit_error is the largest error over the scored logits (>= their mean), relative to the largest
    logit; a bfloat16 model makes the errors large enough to tell a maximum from a mean or a minimum."""
    row = precision.end_to_end(tiny, copy.deepcopy(tiny).to(torch.bfloat16), "pos_shift", 100, 4, 12, 20, 6, 1)
    assert row["max_abs_logit_error"] > 2 * row["mean_abs_logit_error"] > 0
    assert row["relative_error"] == pytest.approx(row["max_abs_logit_error"] / row["max_abs_logit"])
    assert row["max_abs_logit"] > 1.0 and row["dtype"] == "bfloat16"


def test_jump_to_refuses_a_cache_that_holds_window_tokens(tiny):
    wrapper = StreamingLLMWrapper(tiny, n_sink=2, window_size=6)
    wrapper(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="holds only sinks"):
        precision.jump_to(wrapper, 1000)


def test_float32_angles_lose_absolute_positions_but_not_pos_shift():
    """The study's headline on RoPE alone: at 10^7 absolute positions the float32 angle is off by > 0.01 rad and
    the attention probabilities move; pos_shift stays at float32 rounding. The float64 reference itself only
    depends on distances (its check is ~1e-12)."""
    absolute = precision.rope_precision("absolute", 10**7, torch.float32, 4, 60)
    pos_shift = precision.rope_precision("pos_shift", 10**7, torch.float32, 4, 60)
    assert absolute["largest_rotary_position"] == 10**7 and pos_shift["largest_rotary_position"] <= 2 * 64 + 1
    assert absolute["angle_error_rad"] > 1e-2 and pos_shift["angle_error_rad"] < 1e-4
    assert absolute["probability_total_variation"] > 100 * pos_shift["probability_total_variation"]
    assert max(absolute["float64_distance_check"], pos_shift["float64_distance_check"]) < 1e-9
    for row in (absolute, pos_shift):  # one probability's error is at most the total variation of its row
        assert 0 < row["probability_abs_error"] <= row["probability_total_variation"] <= 1


def test_the_command_writes_its_tables_as_json(tmp_path, capsys):
    out = tmp_path / "precision.json"
    assert precision.main(["--positions", "1000", "--dtypes", "float32", "--modes", "pos_shift", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [row["stream_position"] for row in payload["rope"]["rows"]] == [1000]
    assert [row["stream_position"] for row in payload["tiny"]["rows"]] == [184, 1000]
    assert all(row["max_abs_logit_error"] <= 1e-4 for row in payload["tiny"]["rows"])
    assert payload["command"] == f"python -m streaming_llm.bench.precision --positions 1000 --dtypes float32 --modes pos_shift --out {out}"
    err = capsys.readouterr().err
    assert "embedded" not in payload and "## tiny Llama end to end" in err
    # errors in e-notation, the top-1 agreement as a fraction
    assert "| pos_shift | 1000 | float32 | " in err and " | 1.0 |" in err
    row = payload["tiny"]["rows"][1]
    assert f"| {row['max_abs_logit_error']:.2e} | {row['relative_error']:.2e} | 1.0 |" in err


@pytest.mark.parametrize("where", ["empty", "folder", "under a file"])
def test_a_bad_out_is_refused_before_the_measurements(tmp_path, monkeypatch, capsys, where):
    """--out is checked up front (exit status 2, one line naming --out), not after minutes of measurements."""
    (tmp_path / "file").write_text("x")
    out = {"empty": "", "folder": str(tmp_path), "under a file": str(tmp_path / "file" / "precision.json")}[where]

    def no_measurement(*args, **kwargs):
        raise AssertionError("the study ran")

    monkeypatch.setattr(precision, "rope_precision", no_measurement)
    with pytest.raises(SystemExit) as exit_info:
        precision.main(["--positions", "1000", "--dtypes", "float32", "--modes", "pos_shift", "--out", out])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m streaming_llm.bench.precision: error: --out ") and "Traceback" not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("argv, message", [
    (["--positions", "1000", "100"], "--positions: each stream position must be at least 184 (the sinks and the prefix "
                                     "fed before it); got 100"),
    (["--embedded", "--embedded-positions", "1027"], "--embedded-positions: each stream position must be at least "
                                                     "1028 (the sinks and the prefix fed before it); got 1027"),
    (["--positions", "100000000000000000000"], "--positions: each stream position must be at most 10000000000 (beyond, "
                                                "the float64 oracle's own angles are off by over 1e-6 rad); got "
                                                "100000000000000000000"),
    (["--embedded", "--embedded-positions", "10000000001"], "--embedded-positions: each stream position must be at "
                                                            "most 10000000000 (beyond, the float64 oracle's own angles "
                                                            "are off by over 1e-6 rad); got 10000000001"),
    (["--threads", "0"], "--threads must be at least 1; got 0"),
])
def test_a_stream_position_the_study_cannot_measure_is_refused_before_the_measurements(
        argv, message, tmp_path, monkeypatch, capsys):
    """A position inside the sinks and prefix of the end-to-end check failed with a ValueError traceback after the
    RoPE study had run; --positions 10^20 with a traceback (ValueError: Overflow when unpacking long long), and below
    that, positions near 2^53 ran (frame_base looping for years at the largest) against an oracle whose own angles were
    off by ~1 rad; --threads 0 was a RuntimeError traceback. Each is refused up front in one line (status 2)."""
    def no_measurement(*args, **kwargs):
        raise AssertionError("the study ran")

    monkeypatch.setattr(precision, "rope_precision", no_measurement)
    with pytest.raises(SystemExit) as exit_info:
        precision.main([*argv, "--dtypes", "float32", "--out", str(tmp_path / "p.json")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m streaming_llm.bench.precision: error: {message}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", MODES)
def test_frame_base_is_closed_form_at_large_positions(mode):
    """frame_base looped over every eviction step: ~2 s per call at 10^8 for the tiny capacity, years at 10^15. Now
    closed form: the loop's value at a few positions, and 10^10 at once."""
    policy = PositionPolicy(mode, 4, 60)

    def stepped(seen):
        base, step = 0, 0
        while step < seen:
            step = min(seen, base + 2 * policy.capacity + 1) if mode == "pos_shift" else seen
            base = policy.next_base(base, step)
        return base

    for seen in [*range(0, 400), 10**5 + 3]:
        assert precision.frame_base(policy, seen) == stepped(seen)
    start = time.perf_counter()
    base = precision.frame_base(policy, 10**10)
    assert base == stepped(10**10) if mode != "pos_shift" else 0 <= 10**10 - base <= 2 * policy.capacity + 1
    assert time.perf_counter() - start < 0.1


def test_the_command_ends_on_ctrl_c_without_a_traceback(tmp_path, monkeypatch, capsys):
    """`python -m streaming_llm.bench.precision` ran main() bare: Ctrl-C printed a KeyboardInterrupt traceback. It runs
    under run_script now: exit status 130, a line break on stderr. Raised where main sets its threads."""
    import runpy

    monkeypatch.setattr(torch, "set_num_threads", mock.Mock(side_effect=KeyboardInterrupt))
    monkeypatch.setattr(sys, "argv", ["precision.py", "--positions", "1000", "--out", str(tmp_path / "p.json")])
    monkeypatch.delitem(sys.modules, "streaming_llm.bench.precision")  # runpy warns about a module already imported
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("streaming_llm.bench.precision", run_name="__main__")
    assert (exit_info.value.code, capsys.readouterr().err) == (130, "\n")


def test_run_end_to_end_reports_each_row_as_it_is_measured(tiny, capsys):
    setup = {"n_sink": 4, "window_size": 12, "prefix_tokens": 13, "scored_tokens": 2, "prefix_block": 1}
    rows = precision.run_end_to_end(tiny, ["pos_shift"], [1000, 17], ["float32"], setup, progress=True)
    assert [row["stream_position"] for row in rows] == [17, 1000]
    printed = capsys.readouterr().err.splitlines()
    assert len(printed) == 2 and "'stream_position': 1000" in printed[0] and "'stream_position': 17" in printed[1]


@pytest.mark.parametrize("block", [1, 5])
def test_mit_storage_with_pos_shift_rotates_within_the_cache(tiny, monkeypatch, block):
    """streaming_mode="mit" keeps pos_shift keys un-rotated and rotates them at every step with the newest query at
    slot min(t, C) (PositionPolicy.step_base): however long the stream, no rotary position passes the capacity."""
    from streaming_llm.rope import RotaryParams

    rotate, largest = RotaryParams.rotate, []

    def recording_rotate(self, x, positions):
        if positions.numel():
            largest.append(int(positions.max()))
        return rotate(self, x, positions)

    monkeypatch.setattr(RotaryParams, "rotate", recording_rotate)
    wrapper = StreamingLLMWrapper(tiny, n_sink=2, window_size=6, position_mode="pos_shift", streaming_mode="mit")
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(3))
    for start in range(0, 200, block):
        wrapper(ids[:, start : start + block])
    assert len(largest) > 200 // block and max(largest) == 8


def test_mit_storage_fed_token_by_token_rotates_at_the_cache_slots(tiny, monkeypatch):
    """MIT's pos-shift, one token a step: the held keys and the new token are rotated at their slots in the cache,
    0..min(t, C) (MIT's arange(kv_seq_len)), never below 0 nor short of the newest query's slot min(t, C)."""
    from streaming_llm.rope import RotaryParams

    rotate, rotated = RotaryParams.rotate, set()

    def recording_rotate(self, x, positions):
        rotated.update(positions.reshape(-1).tolist())
        return rotate(self, x, positions)

    monkeypatch.setattr(RotaryParams, "rotate", recording_rotate)
    wrapper = StreamingLLMWrapper(tiny, n_sink=2, window_size=6, position_mode="pos_shift", streaming_mode="mit")
    for t, token in enumerate(torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(4)).tolist()):
        rotated.clear()
        wrapper(torch.tensor([[token]]))
        assert rotated == set(range(min(t, 8) + 1)), f"step {t}"


def test_a_prefix_fed_in_blocks_is_fed_whole(tiny):
    """prefix_block > 1 (the embedded model's setup feeds its prefix 256 tokens at a time): every block is fed whole, the
    last one cut short, and the scored tokens after a jump still agree with the oracle to fp32 rounding."""
    setup = {"n_sink": 4, "window_size": 12, "prefix_tokens": 20, "scored_tokens": 6, "prefix_block": 7}
    row = precision.end_to_end(tiny, tiny, "pos_shift", 10**5, **setup)
    assert row["finite"] and row["top1_agreement"] == 1.0 and row["max_abs_logit_error"] <= 1e-4
