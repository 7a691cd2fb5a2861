"""`streaming-llm bench` and the decoders it times: every method decodes at a constant cache length, reports its
cache bytes (and, on CUDA, what a step allocates), and the command writes one JSON + PNG (or a one-line error). Timings are never asserted."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build_llama, count_frozen_matmuls

from streaming_llm import cli
from streaming_llm.bench import COMPILED_METHODS, METHODS
from streaming_llm.bench.command import select_methods
from streaming_llm.bench.latency import dense_kv_bytes, make_decoder, measure_latency, measure_stream, prepare_attn

CAPACITY = 24
EAGER_METHODS = [m for m in METHODS if m not in COMPILED_METHODS]


@pytest.fixture(scope="module")
def model():
    return build_llama()


@pytest.mark.parametrize("method", EAGER_METHODS)
def test_every_decoder_holds_the_cache_at_capacity(model, method):
    decoder = make_decoder(method, model, n_sink=4, capacity=CAPACITY)
    prepare_attn(decoder)
    decoder.prepare()
    for _ in range(CAPACITY + 5):  # past a full turn of the ring
        decoder.step()
    # Measured from the cache itself, except where the length is fixed by construction: a StaticCache step
    # rewrites the same slot, recompute re-reads the last capacity + 1 token ids.
    if method not in ("dense_static", "recompute"):
        assert decoder.cache_length() == CAPACITY
    if method != "recompute":  # recompute keeps token ids only
        assert decoder.cache_bytes() >= dense_kv_bytes(model, CAPACITY - 1)


def test_the_frozen_dense_step_is_the_dense_step_frozen(model, monkeypatch):
    """dense_static_compiled_frozen, the dense counterpart of streaming_compiled_frozen: its compiled step gives the eager
    StaticCache step's logits, and reads the cache as it is now (the cache is written by the step, so freezing keeps
    it an input: were it a constant, the logits after the cache changed would be the old ones). And it is frozen, its
    projections concatenated, even after dense_static_compiled compiled model.forward: that compiled graph, unfrozen,
    was reused (torch.compile's guards do not cover inductor's config)."""
    compiled = make_decoder("dense_static_compiled", model, n_sink=4, capacity=CAPACITY)
    compiled.prepare()
    compiled.step()
    matmuls = count_frozen_matmuls(monkeypatch)
    decoder = make_decoder("dense_static_compiled_frozen", model, n_sink=4, capacity=CAPACITY)
    decoder.prepare()

    def logits(forward):
        return forward(input_ids=decoder.token, past_key_values=decoder.cache, cache_position=decoder.position,
                       position_ids=decoder.position[None]).logits.clone()

    before = logits(decoder.forward)
    assert torch.allclose(before, logits(model.forward), atol=1e-5)
    decoder.cache.layers[0].keys.mul_(-1)
    after = logits(decoder.forward)
    assert torch.allclose(after, logits(model.forward), atol=1e-5) and not torch.allclose(after, before, atol=1e-3)
    assert matmuls == [4 * model.config.num_hidden_layers + 1]  # q/k/v and gate/up one matmul each, and the LM head


def test_step_time_summary_is_median_and_nearest_rank_percentiles():
    """p10/p90 are the ceil(0.1 n)-th and ceil(0.9 n)-th smallest of n steps (they were one rank higher: p90 of
    10 steps was the slowest one)."""
    from streaming_llm.bench.latency import LatencyRow

    for steps, (p10, median, p90) in ((10, (1, 5.5, 9)), (30, (3, 15.5, 27)), (1, (1, 1, 1)), (4, (1, 2.5, 4))):
        summary = LatencyRow("dense", 16, step_ms=[float(t) for t in range(steps, 0, -1)]).summary()
        assert (summary["p10_ms"], summary["median_ms"], summary["p90_ms"]) == (p10, median, p90), steps


def test_measure_latency_times_every_method_round_robin(model):
    rows = measure_latency(model, EAGER_METHODS, CAPACITY, n_sink=4, rounds=2, steps_per_round=2, warmup=1)
    assert [row.method for row in rows] == EAGER_METHODS
    for row in rows:
        summary = row.summary()
        assert summary["steps"] == 4 and summary["p10_ms"] <= summary["median_ms"] <= summary["p90_ms"]
        assert summary["cache_length"] == CAPACITY
        assert (summary["step_peak_bytes"] is None) == (not torch.cuda.is_available())
        assert (summary["device_ms"] is None) == (not torch.cuda.is_available())
        # How our static step ran is recorded (eager here: EAGER_METHODS); other methods have no such wrapper.
        assert summary["step_kind"] == ("eager" if row.method == "streaming_static" else None)


def test_stream_keeps_cache_length_and_reports_each_checkpoint(model):
    rows = measure_stream(model, CAPACITY, 4, checkpoints=[CAPACITY, 300, 900], block=64, steps=2)
    assert [r["tokens_streamed"] for r in rows] == [CAPACITY + 2, 302, 902]
    assert all(r["cache_length"] == CAPACITY and r["rss_bytes"] > 0 for r in rows)


def test_method_selection():
    assert select_methods("default", "cpu") == EAGER_METHODS
    assert select_methods("default", "cuda:0") == list(METHODS)
    assert select_methods("all", "cpu") == list(METHODS)
    assert select_methods("mit, recompute", "cpu") == ["mit", "recompute"]
    with pytest.raises(ValueError, match="unknown method"):
        select_methods("mit,fastest", "cpu")
    with pytest.raises(ValueError, match=r"unknown method\(s\) 'all', 'foo'; choose from .* \(or all, or default, alone\)"):
        select_methods("all,foo", "cpu")  # the names each quoted, not the list as one


def test_bench_command_writes_json_and_png(tmp_path, capsys):
    status = cli.main(["bench", "--shape", "pythia-70m", "--cache-sizes", "16,32", "--methods",
                       "dense_static,streaming_pos_shift,streaming_static,mit,recompute", "--rounds", "1",
                       "--steps", "2", "--quiet", "--output-dir", str(tmp_path), "--tag", "t"])
    out = capsys.readouterr().out
    assert status == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert (tmp_path / "t.png").stat().st_size > 0
    assert {(r["method"], r["capacity"]) for r in report["rows"]} == {
        (m, c) for m in ("dense_static", "streaming_pos_shift", "streaming_static", "mit", "recompute") for c in (16, 32)}
    assert all(r["cache_length"] == r["capacity"] for r in report["rows"])
    assert report["bandwidth_floor"] is None and report["ratios_vs_dense_static_compiled"] == []
    assert "streaming_static" in out and "vs static" in out
    assert report["decode_attention"] == "grouped"  # "auto" resolved for the device (CPU)
    assert report["skipped"] == [] and "not timed" not in out


def test_bench_command_records_and_prints_the_methods_it_could_not_time(tmp_path, capsys):
    """A method asked for but skipped (kvpress does not support GPT-NeoX) is named with its reason and cache sizes
    under the table and in the JSON, so that a missing column is explained in the results file as well."""
    status = cli.main(["bench", "--shape", "pythia-70m", "--cache-sizes", "16,32", "--methods",
                       "streaming_static,kvpress_decode", "--rounds", "1", "--steps", "1", "--quiet",
                       "--output-dir", str(tmp_path), "--tag", "k"])
    out = capsys.readouterr().out
    assert status == 0
    report = json.loads((tmp_path / "k.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["streaming_static", "streaming_static"]
    assert [(skip["method"], skip["capacity"]) for skip in report["skipped"]] == [("kvpress_decode", 16),
                                                                                  ("kvpress_decode", 32)]
    reason = report["skipped"][0]["reason"]
    assert "kvpress 0.5.5 does not support GPTNeoXForCausalLM" in reason and report["skipped"][1]["reason"] == reason
    assert f"not timed: kvpress_decode at 16, 32: {reason}\n" in out


def test_bench_command_streams_at_the_largest_cache_size_up_to_1024(tmp_path, capsys):
    status = cli.main(["bench", "--shape", "pythia-70m", "--cache-sizes", "32,2048,16", "--methods", "streaming_static",
                       "--rounds", "1", "--steps", "1", "--stream-tokens", "60", "--quiet",
                       "--output-dir", str(tmp_path), "--tag", "s"])
    assert status == 0
    stream = json.loads((tmp_path / "s.json").read_text())["stream"]
    # each checkpoint's row is taken after its timed steps (8 tokens more)
    assert [r["tokens_streamed"] for r in stream] == [32 + 8, 60 + 8]
    assert all(r["cache_length"] == 32 for r in stream)
    assert "tokens streamed" in capsys.readouterr().out


def test_profile_reports_the_cache_stages(tmp_path, capfd):
    """--profile: Chrome traces next to the JSON and the time of each cache stage; rerotate moves its frame (re-rotates
    every stored key) at every step of every layer, pos_shift at most once in 10 steps at capacity 64 (the cache size
    nearest 1024). The traces are written first, into a new --output-dir, which its check left uncreated."""
    tmp_path = tmp_path / "new"
    status = cli.main(["bench", "--shape", "pythia-70m", "--cache-sizes", "16,64", "--methods", "streaming_pos_shift",
                       "--rounds", "1", "--steps", "1", "--profile", "--output-dir", str(tmp_path), "--tag", "p"])
    out, err = capfd.readouterr()  # the tables the user asked for go to stdout (they were status lines, hidden by -q)
    assert status == 0 and "cache: frame move" in out
    # torch's operator table once, for pos_shift (before its stages), then each mode's stages
    assert out.count("Self CPU %") == 1
    assert out.index("Self CPU %") < out.index("position_mode=pos_shift") < out.index("position_mode=rerotate")
    assert "USDT:" not in err and "profiler_start" not in err  # kineto's notices, at each profiler start and stop
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["model"] == "random weights"
    assert [profile["capacity"] for profile in report["profile"]] == [64, 64]  # the cache size nearest 1024
    layers = 6  # the pythia-70m shape
    moves = {}
    for profile in report["profile"]:
        assert (tmp_path / profile["trace"]).stat().st_size > 0
        stages = {stage["label"]: stage for stage in profile["stages"]}
        moves[profile["position_mode"]] = stages["cache: frame move (re-rotate stored window keys)"]["calls"]
        assert stages["cache: decode step of one layer (rotate q/k, write, sinks, SDPA)"]["calls"] == 10 * layers
        assert 0 < stages["cache: decode step of one layer (rotate q/k, write, sinks, SDPA)"]["share"] < 1
    assert moves["rerotate"] == 10 * layers and moves["pos_shift"] <= layers


def test_only_the_profiler_notices_are_dropped_from_stderr(capfd):
    import os

    from streaming_llm.bench.profile import _without_profiler_notices

    open_before = sorted(os.listdir("/proc/self/fd"))
    with _without_profiler_notices():
        os.write(2, b"USDT:2026-11-27 02:34:43 21903:21903 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
                    b"INFO:2026-11-27 02:34:56 21973:21973 init.cpp:148] Registering daemon config loader\n"
                    b"USDT: a line of someone else\nwarning: kept\n")
        print("also kept", file=sys.stderr)
    os.write(2, b"after\n")
    # (under capfd, print() reaches pytest's sys.stderr directly, before the captured lines are written back)
    assert sorted(capfd.readouterr().err.splitlines()) == ["USDT: a line of someone else", "after", "also kept", "warning: kept"]
    # the saved stderr and the capture file are closed: a profile leaves no file handle behind
    assert sorted(os.listdir("/proc/self/fd")) == open_before


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "--methods", "fastest"], "unknown method"),
    (["bench", "--cache-sizes", "4", "--n-sink", "4"], "must exceed --n-sink"),
    (["bench", "--shape", "gpt-5"], "error: --shape: unknown model shape 'gpt-5'"),
    (["bench", "--shape", "gpt-5", "--cache-sizes", "64"], "error: --shape: unknown model shape"),  # not --cache-sizes
    (["bench", "--methods", "mit,dense_static,mit"], "--methods names mit more than once"),
    (["bench", "--stream-tokens", "-5"], "--stream-tokens must be 0 (skip) or at least the stream's capacity (1024)"),
    (["bench", "--cache-sizes", "256,2048", "--stream-tokens", "200"], "capacity (256), got 200"),
    (["bench", "--cache-sizes", "64,128,64"], "64 given more than once"),
    (["bench", "--shape", "pythia-70m", "--model", "some/model"], "--model applies to --shape embedded only"),
    (["bench", "--tag", "../../escape"], "must be a plain file name"),
    (["bench", "--tag", " "], "must be a plain file name"),
    (["bench", "--tag", ".hidden"], "must be a plain file name"),
    # names Windows refuses (a run tagged so on Linux could not be checked out there): refused before the run
    (["bench", "--tag", "run:1"], "none of the characters < > : \" / \\ | ? * that Windows refuses"),
    (["bench", "--tag", "a<b"], "must be a plain file name"),
    (["bench", "--tag", "what?"], "must be a plain file name"),
    (["bench", "--tag", os.fsdecode(b"run\xff")], "--tag is not UTF-8 text (byte offset 3)"),  # UnicodeEncodeError
    (["bench", "--cache-sizes", "64,0"], "expected positive integers, got '64,0'"),
    (["bench", "--cache-sizes", ","], "expected comma-separated integers, got ','"),
    (["bench", "--cache-sizes", "64,,128"], "expected comma-separated integers, got '64,,128'"),
    (["bench", "--cache-sizes", "64,x"], "expected comma-separated integers"),
    # checked against the shape's config before its random weights are built (7B of them for llama-2-7b; each method
    # was skipped, then "nothing could be timed")
    (["bench", "--shape", "pythia-70m", "--cache-sizes", "4096,2048"], "--cache-sizes: every size is too large for "
     "--shape pythia-70m: cache capacity n_sink + window_size = 2048 is too large for the model's max_position_embeddings=2048"),
    (["bench", "--cache-sizes", "4,64", "--n-sink", "4"], "every cache size must exceed --n-sink (4); got 4"),
    (["bench", "--cache-sizes", "2048,4096", "--stream-tokens", "2000"], "capacity (2048), got 2000"),
    (["bench", "--steps", "0"], "--rounds and --steps must be >= 1"),
    (["bench", "--rounds", "0"], "--rounds and --steps must be >= 1"),
    (["bench", "--output-dir", __file__], "is not a folder"),
    # common options bench does not use: they were accepted and ignored (capacity 64 in pos_shift was timed)
    (["bench", "--window-size", "5000"], "bench does not use --window-size: it times each cache size of --cache-sizes"),
    (["bench", "--position-mode", "absolute"], "bench does not use --position-mode: each position mode is a method of "
                                               "--methods (streaming_pos_shift, streaming_rerotate, streaming_absolute)"),
    (["bench", "--streaming-mode", "mit"], "bench does not use --streaming-mode: each cache is a method of --methods"),
    (["bench", "--position-mode", "pos_shift"], "bench does not use --position-mode"),  # given, if as the default
])
def test_bench_bad_options(argv, fragment, capsys, monkeypatch, tmp_path):
    """Each bad option is one line on stderr and exit status 2. Were a refusal to break, the bench would fail at once
    here instead of timing the embedded model for minutes and writing into the repository's results/latency."""
    from streaming_llm.bench import latency

    def ran(*args, **kwargs):
        raise AssertionError("the bench went on to build a model")

    monkeypatch.setattr(latency, "build_model", ran)
    monkeypatch.setattr("streaming_llm.loading.load_model", ran)
    if "--output-dir" not in argv:
        argv = [*argv, "--output-dir", str(tmp_path / "results")]
    status = cli.main(argv + ["--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_bench_times_a_model_given_with_the_embedded_shape(tmp_path, tmp_path_factory, capsys):
    """--shape embedded --model PATH times that model (its keys and values: 2 layers x 2 KV heads x 16 dims x 4 bytes
    x 2 = 512 bytes a token, plus the cache's bookkeeping; SmolLM2's are 45 KiB), not the embedded one; a stream as long as its capacity is accepted; 1 is a cache size."""
    from test_cli import tiny_checkpoint

    from streaming_llm.bench.command import _int_list

    assert _int_list("1, 2") == [1, 2]
    folder = tiny_checkpoint(tmp_path_factory)
    status = cli.main(["bench", "--shape", "embedded", "--model", str(folder), "--cache-sizes", "32", "--methods",
                       "streaming_pos_shift", "--rounds", "1", "--steps", "1", "--stream-tokens", "32", "--quiet",
                       "--output-dir", str(tmp_path), "--tag", "e"])
    assert status == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "e.json").read_text())
    (row,) = report["rows"]
    assert report["model"] == str(folder) and row["cache_length"] == 32 and 32 * 512 <= row["cache_bytes"] < 2 * 32 * 512
    assert [r["tokens_streamed"] for r in report["stream"]][0] >= 32


def short_context_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint with max_position_embeddings=128: it holds cache sizes up to 127."""
    import shutil

    from test_cli import tiny_checkpoint

    folder = tmp_path_factory.mktemp("short") / "tiny_128"
    shutil.copytree(tiny_checkpoint(tmp_path_factory), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    return folder


def test_bench_streams_and_profiles_at_a_size_the_model_holds(tmp_path, tmp_path_factory, capsys):
    """A model of 128 positions, cache sizes 64 and 256: every method was timed at 64 and skipped at 256, then the
    stream (the largest size <= 1024: 256) failed with "cache capacity ... = 256 is too large", exit 2, and nothing
    was written; the profile (the size nearest 1024: 256) would have failed there too. Both now take the size they
    would among those the model holds, said on stderr, and the run is written; --stream-tokens 100, enough for the
    stream at 64, was refused as less than 256 before the model was loaded."""
    folder = short_context_checkpoint(tmp_path_factory)
    status = cli.main(["bench", "--model", str(folder), "--cache-sizes", "64,256", "--methods",
                       "streaming_pos_shift,dense_static", "--rounds", "1", "--steps", "1", "--stream-tokens", "100",
                       "--profile", "--quiet", "--output-dir", str(tmp_path), "--tag", "tb"])
    err = capsys.readouterr().err
    assert status == 0, err
    report = json.loads((tmp_path / "tb.json").read_text())
    assert [(row["method"], row["capacity"]) for row in report["rows"]] == [("streaming_pos_shift", 64),
                                                                          ("dense_static", 64)]
    assert [skip["capacity"] for skip in report["skipped"]] == [256, 256]
    assert [row["tokens_streamed"] for row in report["stream"]] == [64 + 8, 100 + 8]
    assert all(row["cache_length"] == 64 for row in report["stream"])
    assert [profile["capacity"] for profile in report["profile"]] == [64, 64]
    assert "bench: streaming at cache size 64: the model does not hold 256" in err
    assert "bench: profiling at cache size 64: the model does not hold 256" in err


def test_bench_refuses_cache_sizes_none_of_which_the_model_holds_before_timing(tmp_path, tmp_path_factory, capsys,
                                                                              monkeypatch):
    """--model with every size too large: each method was skipped at each size (and the stream failed after them);
    it is refused in one line once the model is loaded, before anything is timed."""
    from streaming_llm.bench import latency

    def timed(*args, **kwargs):
        raise AssertionError("the bench went on to time")

    monkeypatch.setattr(latency, "measure_latency", timed)
    monkeypatch.setattr(latency, "measure_stream", timed)
    folder = short_context_checkpoint(tmp_path_factory)
    status = cli.main(["bench", "--model", str(folder), "--cache-sizes", "256,128", "--methods", "streaming_pos_shift",
                       "--stream-tokens", "300", "--quiet", "--output-dir", str(tmp_path / "new"), "--tag", "tb"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert (f"error: --cache-sizes: every size is too large for {folder}: cache capacity n_sink + window_size = 128 "
            "is too large for the model's max_position_embeddings=128") in err
    assert list(tmp_path.iterdir()) == []


def test_bench_refuses_a_stream_shorter_than_its_capacity_once_known_before_timing(tmp_path, tmp_path_factory, capsys,
                                                                                 monkeypatch):
    """--stream-tokens between the smallest size and the stream's capacity waits for the model (which decides the
    capacity) and is then refused in one line, before anything is timed."""
    from streaming_llm.bench import latency
    from test_cli import tiny_checkpoint

    def timed(*args, **kwargs):
        raise AssertionError("the bench went on to time")

    monkeypatch.setattr(latency, "measure_latency", timed)
    folder = tiny_checkpoint(tmp_path_factory)
    capsys.readouterr()  # (its writing)
    status = cli.main(["bench", "--model", str(folder), "--cache-sizes", "64,256",
                       "--methods", "streaming_pos_shift", "--stream-tokens", "100", "--quiet",
                       "--output-dir", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert status == 2 and err.strip().splitlines() == [
        "streaming-llm: error: --stream-tokens must be 0 (skip) or at least the stream's capacity (256), got 100"]
    assert list(tmp_path.iterdir()) == []


def test_bench_that_can_time_nothing_fails_and_writes_nothing(tmp_path, capsys):
    """kvpress cannot hook GPT-NeoX: the only method is skipped. It wrote a JSON with no rows and an empty PNG, exit 0."""
    status = cli.main(["bench", "--shape", "pythia-70m", "--cache-sizes", "16", "--methods", "kvpress_decode", "--rounds",
                       "1", "--steps", "1", "--quiet", "--output-dir", str(tmp_path), "--tag", "k"])
    err = capsys.readouterr().err
    assert status == 2 and "no method could be timed" in err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_copy_bandwidth_is_measured_on_cuda_only():
    from streaming_llm.bench.latency import measure_copy_bandwidth

    if torch.cuda.is_available():
        assert measure_copy_bandwidth("cuda", size_bytes=2**24, repeats=2) > 0
    else:
        assert measure_copy_bandwidth("cpu") is None


def test_interrupted_plot_keeps_the_previous_png(tmp_path, monkeypatch):
    """The PNG is written as the JSON is: to a temporary file that replaces the old one only when complete."""
    from streaming_llm.bench.plots import plot_latency
    from streaming_llm.eval import results

    report = {"rows": [{"method": "mit", "capacity": c, "median_ms": 2.0 * c, "p10_ms": c, "p90_ms": 3.0 * c}
                       for c in (16, 32)]}
    png = tmp_path / "latency.png"
    plot_latency(report, png)
    first = png.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"

    def interrupted_replace(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "replace", interrupted_replace)
    report["rows"][0]["median_ms"] = 100.0
    with pytest.raises(KeyboardInterrupt):
        plot_latency(report, png)
    assert png.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["latency.png"]


def test_a_cache_beyond_the_sliding_window_skips_the_dense_methods_too(capsys):
    """A Mistral with a 16-token sliding window at cache size 32: dense_dynamic failed in its first step with
    transformers' "Cannot `crop` a `DynamicSlidingWindowLayer`" and the whole bench ended with nothing written; the
    dense methods are now skipped with the streaming methods' reason, and a size inside the window is timed."""
    from tiny_models import build_llama_family

    model = build_llama_family("mistral", sliding_window=16)
    methods = ["dense_static", "dense_dynamic", "streaming_pos_shift"]
    assert measure_latency(model, methods, capacity=32, n_sink=2, rounds=1, steps_per_round=1) == []
    skipped = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1] for line in skipped] == [f"skipping {method}" for method in methods]
    assert all("too large for the model's sliding_window=16" in line for line in skipped)
    rows = measure_latency(model, methods, capacity=8, n_sink=2, rounds=1, steps_per_round=1)
    assert [row.method for row in rows] == methods and capsys.readouterr().err == ""


def test_a_hybrid_model_is_timed_with_a_cache_beyond_its_sliding_window(capsys):
    """Gemma 3 with an 8-token window in its sliding layer at cache size 16 (docs/semantics.md §8): every method is timed;
    dense_dynamic, whose DynamicCache made from the config could not be cropped past the window, keeps plain layers."""
    from tiny_models import build_llama_family

    model = build_llama_family("gemma3_text", sliding_window=8)
    methods = ["dense_static", "dense_dynamic", "streaming_pos_shift", "streaming_static", "mit", "recompute"]
    rows = measure_latency(model, methods, capacity=16, n_sink=2, rounds=1, steps_per_round=1)
    assert [row.method for row in rows] == methods and capsys.readouterr().err == ""


def test_cache_sizes_accept_a_trailing_comma_and_spaces():
    from streaming_llm.bench.command import _int_list

    assert _int_list("64,128,") == _int_list(" 64 , 128") == [64, 128]


def test_a_hybrid_shapes_streaming_cache_holds_what_a_static_cache_holds():
    """The gemma3-1b-attention shape (6 of its layers here, one of them full attention, window 8): at capacity 32 the
    static step's buffers hold what transformers' StaticCache holds (its sliding layers keep their window, 8 slots;
    its full layers capacity + 1), plus the sinks' own keys in the full layer. Before the sliding rings, every
    layer of ours kept 33 slots."""
    from streaming_llm.bench.latency import build_model, shape_config

    types = shape_config("gemma3-1b-attention").layer_types[:6]
    model = build_model("gemma3-1b-attention", torch.float32, "cpu", num_hidden_layers=6, layer_types=types,
                        sliding_window=8)
    decoders = {}
    for method in ("dense_static", "streaming_static"):
        decoders[method] = make_decoder(method, model, n_sink=4, capacity=32)
        prepare_attn(decoders[method])
        decoders[method].prepare()
        decoders[method].step()
    assert types.count("full_attention") == 1 and decoders["streaming_static"].wrapper.keys[0].shape[-2] == 8
    sink_bytes = 4 * 1 * 256 * 4  # 4 sinks x 1 kv head x 256 dims x fp32, in the one full layer
    assert decoders["streaming_static"].cache_bytes() == decoders["dense_static"].cache_bytes() + sink_bytes


def test_the_help_names_every_shape(capsys):
    """bench's --help lists its shapes by hand (the parser is built without importing torch): every one of them."""
    from streaming_llm.bench.latency import MODEL_SHAPES

    assert cli.main(["bench", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(shape in out for shape in MODEL_SHAPES)


def test_bench_help_says_which_common_options_it_does_not_use(capsys):
    """bench took --window-size, --position-mode and --streaming-mode, described in its --help as for the other commands
    ("the most recent N tokens kept"), and ignored them. Its help now says they are refused and what it uses instead;
    the commands that use them keep their help and defaults, and bench the common options it does use."""
    assert cli.main(["bench", "--help"]) == 0
    bench_help = " ".join(capsys.readouterr().out.split())
    assert "most recent N tokens" not in bench_help and "positions RoPE sees" not in bench_help
    for option in ("--window-size N", "--position-mode {pos_shift,rerotate,absolute}", "--streaming-mode {ours,mit}"):
        assert f"{option} not used by bench (refused):" in bench_help
    assert cli.main(["generate", "--help"]) == 0
    assert "most recent N tokens" in " ".join(capsys.readouterr().out.split())
    parser = cli.build_parser()
    generate = parser.parse_args(["generate", "-p", "hi"])
    assert (generate.window_size, generate.position_mode, generate.streaming_mode) == (1020, "pos_shift", "ours")
    bench = parser.parse_args(["bench", "--n-sink", "2", "--dtype", "bfloat16", "--device", "cpu", "--threads", "1"])
    cli.validate_common_args(bench)  # the common options bench uses are taken
    assert (bench.n_sink, bench.dtype, bench.device, bench.threads) == (2, "bfloat16", "cpu", 1)


def test_cache_sizes_drop_one_trailing_empty_entry_only():
    """A trailing comma is dropped, also after one size and with spaces around it; an empty --cache-sizes is not a list
    of integers (it is not reported as one of no sizes)."""
    import argparse

    from streaming_llm.bench.command import _int_list

    assert _int_list("64,") == [64] and _int_list(" 64 , 128 , ") == [64, 128]
    with pytest.raises(argparse.ArgumentTypeError, match="^expected comma-separated integers, got ''$"):
        _int_list("")


def test_bench_refuses_bad_methods_before_creating_the_output_folder(tmp_path, capsys):
    """--methods is checked before --output-dir is created: a refused run leaves no empty folder behind."""
    assert cli.main(["bench", "--methods", "fastest", "--output-dir", str(tmp_path / "new"), "--quiet"]) == 2
    assert "unknown method" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_bench_refused_after_its_output_check_leaves_no_folder_behind(tmp_path, capsys):
    """--output-dir was created when checked, before the model was loaded: a --model that cannot be loaded (or a
    bench that could time nothing) left an empty new folder behind."""
    assert cli.main(["bench", "--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "new" / "sub"),
                     "--quiet"]) == 2
    assert "no-such-model" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    assert cli.main(["bench", "--shape", "pythia-70m", "--cache-sizes", "16", "--methods", "kvpress_decode", "--rounds",
                     "1", "--steps", "1", "--quiet", "--output-dir", str(tmp_path / "new"), "--tag", "k"]) == 2
    assert "no method could be timed" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_the_dense_methods_stop_one_below_the_sliding_window():
    """Like the streaming methods, the dense ones are skipped at a capacity equal to a sliding-only model's window (a
    step would attend to window + 1 keys) and timed one below it."""
    from tiny_models import build_llama_family

    model = build_llama_family("mistral", sliding_window=16)
    methods = ["dense_static", "dense_dynamic"]
    assert measure_latency(model, methods, capacity=16, n_sink=2, rounds=1, steps_per_round=1) == []
    rows = measure_latency(model, methods, capacity=15, n_sink=2, rounds=1, steps_per_round=1)
    assert [row.method for row in rows] == methods


def test_the_gemma3_shape_has_gemma_3_1bs_attention():
    """The gemma3-1b-attention shape (docs/performance.md, experiments/sliding_ring_memory.py) is Gemma 3 1B's attention:
    26 layers, every sixth full attention, the others sliding in 512 tokens, 4 query heads and 1 kv head of 256, RoPE
    base 10^4 in the sliding layers and 10^6 in the full ones, timed with SDPA; no weights are built for it."""
    from streaming_llm.bench.latency import shape_config

    config = shape_config("gemma3-1b-attention")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.sliding_window) == (26, 1152, 4, 1, 256, 512)
    assert [index for index, kind in enumerate(config.layer_types) if kind == "full_attention"] == [5, 11, 17, 23]
    assert {kind: rope["rope_theta"] for kind, rope in config.rope_parameters.items()} == {
        "sliding_attention": 10000.0, "full_attention": 1000000.0}
    assert config._attn_implementation == "sdpa"


def test_the_profiler_notice_filter_keeps_undecodable_bytes_and_runs_without_stderr(capfd):
    """A line that is not UTF-8 is kept (its bad bytes replaced), not raised on; where stderr cannot be duplicated
    (no stderr), the profiled block runs unfiltered and the context ends normally."""
    import os
    from unittest import mock

    from streaming_llm.bench import profile

    with profile._without_profiler_notices():
        os.write(2, b"bad \xff byte\n")
    assert capfd.readouterr().err == "bad \ufffd byte\n"

    def no_stderr(fd):
        raise OSError("bad file descriptor")

    ran = []
    with mock.patch.object(profile.os, "dup", no_stderr), profile._without_profiler_notices():
        ran.append(1)
    assert ran == [1]
