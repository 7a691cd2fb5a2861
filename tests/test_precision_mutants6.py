"""streaming_llm.bench.precision: what the precision study measures and records, beyond tests/test_precision.py
(found by mutation testing): the command's defaults are the committed study's; seeded rows of the committed record
come back when measured again (so each error is the one its name says: a worst case, of a difference, over the right
axis); the oracle scales by the norms' weights; the prefix is fed as the setup says; one sink and stream position 0
are measured; the float64 self-check can fail; the record's command line and seconds (on a fake clock); --help, and
the options refused."""

from __future__ import annotations

import copy
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import dense_logits, max_abs_diff

from streaming_llm.bench import precision

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "precision" / "precision.json"


class _Study:
    """Stands in for the measurements of main(): records what it is asked to measure, measures nothing."""

    def __init__(self, monkeypatch):
        from streaming_llm import loading
        from streaming_llm.bench import soak

        self.rope, self.end_to_end, self.tiny_seeds, self.threads = [], [], [], []
        self.embedded_model = object()
        monkeypatch.setattr(precision, "rope_precision", self.rope_precision)
        monkeypatch.setattr(precision, "run_end_to_end", self.run_end_to_end)
        monkeypatch.setattr(soak, "build_tiny_llama", self.build_tiny_llama)
        monkeypatch.setattr(loading, "load_model", lambda path: (self.embedded_model, None))
        monkeypatch.setattr(torch, "set_num_threads", self.threads.append)

    def rope_precision(self, mode, t, dtype, n_sink, window_size, **kwargs):
        self.rope.append((mode, t, str(dtype).removeprefix("torch."), n_sink, window_size, kwargs))
        return {"mode": mode, "stream_position": t, "dtype": str(dtype), "largest_rotary_position": t,
                "angle_error_rad": 0.0, "key_relative_error": 0.0, "score_abs_error": 0.0,
                "probability_total_variation": 0.0}

    def run_end_to_end(self, model, modes, positions, dtype_names, setup, progress=False):
        self.end_to_end.append({"model": model, "modes": list(modes), "positions": list(positions),
                                "dtypes": list(dtype_names), "setup": dict(setup), "progress": progress})
        return []

    def build_tiny_llama(self, seed=None):
        self.tiny_seeds.append(seed)
        return "tiny"


def test_the_committed_command_measures_the_committed_study_by_default(tmp_path, monkeypatch, capsys):
    """The record in results/precision/ was made with `--modes absolute pos_shift rerotate --embedded` and every other
    option at its default: run again so, the command measures the same rows (positions 10^3..10^7 in all three dtypes,
    the embedded check at 10^5..10^7 in absolute and pos_shift) with the same setups, on one thread, the tiny model
    built from seed 0, the embedded rows reported as they come."""
    committed = json.loads(COMMITTED.read_text())
    argv = committed["command"].split()[3:]
    argv[argv.index("--out") + 1] = str(tmp_path / "precision.json")
    study = _Study(monkeypatch)
    assert precision.main(argv) == 0
    capsys.readouterr()

    assert [row[:3] for row in study.rope] == [(r["mode"], r["stream_position"], r["dtype"])
                                               for r in committed["rope"]["rows"]]
    setup = committed["rope"]["setup"]
    assert {row[3:5] for row in study.rope} == {(setup["n_sink"], setup["window_size"])}
    assert {tuple(row[5]) for row in study.rope} == {()}  # num_vectors, seed, head_dim and theta at their defaults
    record = json.loads((tmp_path / "precision.json").read_text())
    assert record["rope"]["setup"] == setup

    tiny, embedded = study.end_to_end
    for run, name in ((tiny, "tiny"), (embedded, "embedded")):
        rows = committed[name]["rows"]
        assert run["setup"] == committed[name]["setup"] == record[name]["setup"]
        assert run["modes"] == list(dict.fromkeys(r["mode"] for r in rows))
        assert sorted(run["positions"]) == sorted({r["stream_position"] for r in rows})
        assert run["dtypes"] == list(dict.fromkeys(r["dtype"] for r in rows)) == ["float32", "bfloat16", "float16"]
    assert (tiny["model"], tiny["progress"]) == ("tiny", False) and study.tiny_seeds == [0]
    assert (embedded["model"], embedded["progress"]) == (study.embedded_model, True)
    assert study.threads == [1]


def test_the_record_names_the_command_line_it_was_run_with(tmp_path, monkeypatch, capsys):
    """main() without argv (as `python -m` runs it) reads sys.argv: every option after the program's name, each once."""
    out = tmp_path / "p.json"
    _Study(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["precision.py", "--positions", "1000", "--dtypes", "float32", "--out", str(out)])
    assert precision.main() == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["command"] == (
        f"python -m streaming_llm.bench.precision --positions 1000 --dtypes float32 --out {out}")


def test_the_record_holds_the_seconds_the_study_took(tmp_path, monkeypatch, capsys):
    """wall_s: from before the first measurement to after the last, on the study's clock (a fake one here)."""
    _Study(monkeypatch)
    clock = itertools.count(100.0, 2.5)
    monkeypatch.setattr(precision.time, "perf_counter", lambda: next(clock))
    out = tmp_path / "p.json"
    precision.main(["--positions", "1000", "--dtypes", "float32", "--out", str(out)])
    capsys.readouterr()
    assert json.loads(out.read_text())["wall_s"] == 2.5


def test_run_end_to_end_is_silent_unless_asked(capsys):
    """Only the embedded check (minutes a row) reports its rows as they come; the tiny one prints nothing itself."""
    from streaming_llm.bench.soak import build_tiny_llama

    setup = {"n_sink": 4, "window_size": 12, "prefix_tokens": 13, "scored_tokens": 2, "prefix_block": 1}
    rows = precision.run_end_to_end(build_tiny_llama(seed=0), ["pos_shift"], [17], ["float32"], setup)
    assert len(rows) == 1 and capsys.readouterr() == ("", "")


@pytest.fixture(scope="module")
def tiny():
    from streaming_llm.bench.soak import build_tiny_llama

    return build_tiny_llama(seed=0)


def test_the_oracle_scales_by_each_norms_weight(tiny):
    """A built Llama's RMSNorm weights are all ones, so the oracle dividing by them would pass on it; a trained model's
    are not. With weights drawn in [0.5, 1.5] the oracle is still the dense model over a window that holds the
    whole stream."""
    model = copy.deepcopy(tiny)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(6))
    dense = dense_logits(model, ids).double()
    assert max_abs_diff(dense, dense_logits(tiny, ids)) > 1e-2  # the weights change the logits
    for mode in ("pos_shift", "absolute"):
        assert max_abs_diff(precision.oracle_logits(model, ids, torch.arange(24), 2, 24, mode), dense) <= 1e-4


@pytest.mark.parametrize("mode, position, dtype", [("absolute", 10**7, "float32"), ("pos_shift", 10**7, "bfloat16")])
def test_the_committed_rope_rows_are_measured_again(mode, position, dtype):
    """The RoPE study is seeded: run again, a row of the committed record comes back. Its float64 quantities (the rms
    of the exact scores, the largest rotary position) to float64 rounding, each error to within 10% (a CPU whose
    float32 cos and sin round differently moves them a little; a worst case taken as a best case, a sum for a
    difference or a sum over the wrong axis moves them by far more)."""
    committed = json.loads(COMMITTED.read_text())["rope"]
    expected = next(row for row in committed["rows"]
                    if (row["mode"], row["stream_position"], row["dtype"]) == (mode, position, dtype))
    setup = committed["setup"]
    row = precision.rope_precision(mode, position, precision.DTYPES[dtype], setup["n_sink"], setup["window_size"])
    assert {key: row[key] for key in ("mode", "stream_position", "dtype", "largest_rotary_position")} == {
        key: expected[key] for key in ("mode", "stream_position", "dtype", "largest_rotary_position")}
    assert row["score_rms"] == pytest.approx(expected["score_rms"], rel=1e-9)
    for key in ("angle_error_rad", "key_relative_error", "score_abs_error", "probability_abs_error",
                "probability_total_variation"):
        assert row[key] == pytest.approx(expected[key], rel=0.1), key
    assert row["float64_distance_check"] < 1e-9


def test_one_sink_and_the_first_position_are_measured():
    """With one sink the query's sink frame is that sink's; at stream position 0 the query sees only itself. Both are
    measured like any other position: the rotary positions they use, errors at float32 rounding."""
    one_sink = precision.rope_precision("pos_shift", 1000, torch.float32, 1, 60)
    first = precision.rope_precision("pos_shift", 0, torch.float32, 4, 60)
    assert (one_sink["largest_rotary_position"], first["largest_rotary_position"]) == (1000 - 15 * 62, 0)
    for row in (one_sink, first):
        assert row["angle_error_rad"] < 1e-4 and row["probability_total_variation"] < 1e-5
        assert row["float64_distance_check"] < 1e-9
    assert first["angle_error_rad"] == first["probability_total_variation"] == 0.0


def test_the_float64_check_reports_the_worst_key(monkeypatch):
    """float64_distance_check compares scores rotated at the frames with scores at the distances alone: if one window
    key's distance disagreed with its frames it must show (the largest gap over every vector and key, not the
    smallest)."""
    attention_positions = precision.attention_positions

    def one_key_off(mode, n_sink, window_size, t):
        keys, key_frames, query_frames = attention_positions(mode, n_sink, window_size, t)
        query_frames = query_frames.clone()
        query_frames[n_sink + 3] += 1
        return keys, key_frames, query_frames

    monkeypatch.setattr(precision, "attention_positions", one_key_off)
    row = precision.rope_precision("pos_shift", 1000, torch.float32, 4, 60)
    assert row["float64_distance_check"] > 1e-2


@pytest.mark.parametrize("stream_position, prefix_block, fed", [
    (10**5, 1, [4, 13, *[1] * 7, *[1] * 6]),  # a jump: the ring refilled as one block, then one token a step
    (24, 1, [4, *[1] * 20, *[1] * 6]),  # no jump (a contiguous stream): one token a step from the start
    (10**5, 7, [4, 7, 7, 6, *[1] * 6]),  # in blocks: every block whole, the last one cut short
    (24, 7, [4, 7, 7, 6, *[1] * 6]),
])
def test_the_prefix_is_fed_as_the_setup_says(tiny, monkeypatch, stream_position, prefix_block, fed):
    """The sinks as one block; the prefix in blocks of prefix_block, except that one token a step after a jump starts
    with the window_size + 1 tokens that refill the ring (see jump_to); the scored tokens one at a time. Blocks
    re-rotate rerotate's keys once per block, so how the prefix is fed is part of what the study measures."""
    from streaming_llm.wrapper import StreamingLLMWrapper

    call, lengths = StreamingLLMWrapper.__call__, []

    def recording_call(self, input_ids):
        lengths.append(input_ids.shape[-1])
        return call(self, input_ids)

    monkeypatch.setattr(StreamingLLMWrapper, "__call__", recording_call)
    setup = {"n_sink": 4, "window_size": 12, "prefix_tokens": 20, "scored_tokens": 6, "prefix_block": prefix_block}
    row = precision.end_to_end(tiny, tiny, "pos_shift", stream_position, **setup)
    assert lengths == fed and row["max_abs_logit_error"] <= 1e-4


def test_the_committed_tiny_rows_are_measured_again(tiny):
    """The end-to-end check is seeded (its tokens from seed 0, the model the command builds from seed 0): run again, a
    bfloat16 row of the committed record comes back: the oracle's largest logit to float64 rounding, the errors to
    within 10%, the top-1 agreement to one token in 32."""
    committed = json.loads(COMMITTED.read_text())["tiny"]
    expected = next(row for row in committed["rows"]
                    if (row["mode"], row["stream_position"], row["dtype"]) == ("absolute", 1000, "bfloat16"))
    setup = {key: value for key, value in committed["setup"].items() if key != "model"}
    row = precision.end_to_end(tiny, copy.deepcopy(tiny).to(torch.bfloat16), "absolute", 1000, **setup)
    assert row["max_abs_logit"] == pytest.approx(expected["max_abs_logit"], rel=1e-9)
    for key in ("max_abs_logit_error", "mean_abs_logit_error", "relative_error"):
        assert row[key] == pytest.approx(expected[key], rel=0.1), key
    assert row["top1_agreement"] == pytest.approx(expected["top1_agreement"], abs=1 / 32)


def test_each_reported_row_is_flushed_as_it_is_measured(tiny, monkeypatch):
    """The embedded check takes minutes a row: each row is pushed out when measured, also through a buffered stderr."""
    events = []

    class Buffered:
        def write(self, text):
            events.append("write")

        def flush(self):
            events.append("flush")

    monkeypatch.setattr(sys, "stderr", Buffered())
    setup = {"n_sink": 4, "window_size": 12, "prefix_tokens": 13, "scored_tokens": 2, "prefix_block": 1}
    precision.run_end_to_end(tiny, ["pos_shift"], [17, 1000], ["float32"], setup, progress=True)
    assert events and events[-1] == "flush" and events.count("flush") == 2


def test_help_describes_the_study(capsys):
    with pytest.raises(SystemExit) as exit_info:
        precision.main(["--help"])
    assert exit_info.value.code == 0
    assert ("Precision at long stream positions: `absolute` position mode against `pos_shift`, in fp32, bf16 and "
            "fp16.") in " ".join(capsys.readouterr().out.split())  # as argparse wraps it


def test_an_abbreviated_option_is_refused(tmp_path, monkeypatch, capsys):
    """`--embedded` is an option of its own and a prefix of two others: no option is taken from a prefix."""
    _Study(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        precision.main(["--position", "1000", "--out", str(tmp_path / "p.json")])
    assert exit_info.value.code == 2 and "unrecognized arguments: --position" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--positions", "--embedded-positions"])
def test_every_stream_position_is_checked_against_the_largest(option, tmp_path, monkeypatch, capsys):
    """The bound is on each position, not only on the least one given; 10^10 itself is measured."""
    study = _Study(monkeypatch)
    argv = ["--embedded", option, "2000", str(10**10 + 1), "--dtypes", "float32", "--out", str(tmp_path / "p.json")]
    with pytest.raises(SystemExit) as exit_info:
        precision.main(argv)
    assert exit_info.value.code == 2 and f"got {10**10 + 1}" in capsys.readouterr().err
    argv[3] = str(10**10)
    assert precision.main(argv) == 0
    capsys.readouterr()
    measured = [run["positions"] for run in study.end_to_end]
    assert measured[0 if option == "--positions" else 1][-1] == 10**10
