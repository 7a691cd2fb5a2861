"""Behaviour of the benchmark behind the project's performance numbers that no other test pinned down (found by the
fourth mutation round, on bench/latency.py and bench/command.py): what each decoder's step feeds and holds, which
method a name measures, measure_latency's defaults, the environment's CPU name, the stream's CUDA reading off CUDA,
and the command's options, tables and JSON. Timings are injected (fake clocks, fake decoders): no wall-clock time is
ever asserted."""

from __future__ import annotations

import types

import pytest
import torch

from streaming_llm.bench import METHODS, latency
from streaming_llm.bench.latency import dense_kv_bytes, make_decoder, prepare_attn
from test_bench_mutants import _FakeCuda
from tiny_models import build_llama

CAPACITY = 16


@pytest.fixture(scope="module")
def model():
    return build_llama()


def _ready(method, model, capacity=CAPACITY):
    decoder = make_decoder(method, model, n_sink=4, capacity=capacity)
    prepare_attn(decoder)
    decoder.prepare()
    return decoder


def _forward_inputs(model):
    """The shapes of the token ids of every forward call of `model` from now on, and the hook's handle."""
    shapes = []

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        shapes.append(tuple(ids.shape))

    return shapes, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("method", ["dense_static", "dense_dynamic", "recompute"])
def test_a_dense_or_recompute_step_is_one_forward_of_one_stream(model, method):
    """A timed step decodes one token of one stream: the dense steps feed that token alone to a full cache, recompute
    re-reads the last capacity + 1 tokens in one forward, from its very first step (a shorter first window, or a
    batch of two streams, is another measurement)."""
    decoder = _ready(method, model)
    shapes, handle = _forward_inputs(model)
    try:
        decoder.step()
        decoder.step()
    finally:
        handle.remove()
    width = CAPACITY + 1 if method == "recompute" else 1
    assert shapes == [(1, width), (1, width)]


@pytest.mark.parametrize("method", ["streaming_pos_shift", "streaming_static", "mit", "kvpress_decode"])
def test_a_streaming_step_decodes_one_token_of_one_stream(model, method):
    decoder = _ready(method, model)
    stream = decoder.stepper if method == "kvpress_decode" else decoder.wrapper
    before = stream.tokens_seen
    decoder.step()
    decoder.step()
    assert stream.tokens_seen == before + 2 and tuple(decoder.token.shape) == (1, 1)


def test_the_dense_caches_hold_exactly_what_a_step_reads(model):
    """dense_static's StaticCache has capacity + 1 slots (the keys a step attends to), dense_dynamic holds capacity
    tokens between steps (cropped back after each), and recompute holds no cache: their reported cache bytes are
    those, not a slot more."""
    assert _ready("dense_static", model).cache_bytes() == dense_kv_bytes(model, CAPACITY)
    dynamic = _ready("dense_dynamic", model)
    dynamic.step()
    assert dynamic.cache_bytes() == dense_kv_bytes(model, CAPACITY - 1) and dynamic.cache_length() == CAPACITY
    recompute = _ready("recompute", model)
    recompute.step()
    assert recompute.cache_bytes() == 0 and recompute.cache_length() == CAPACITY


def test_the_kvpress_method_times_kvpress_unobserved(model):
    """kvpress_decode times kvpress as its users run it: without the adapter's record of the positions it keeps
    (a few per cent of a step), so that record is refused."""
    decoder = _ready("kvpress_decode", model)
    with pytest.raises(ValueError, match="runs kvpress unobserved"):
        decoder.stepper.kept_positions()


def test_every_method_name_makes_the_decoder_of_that_method(model):
    """Each name of METHODS makes a decoder of that name (no preparing, no compiling): the fast decoders compile
    unless static and freeze only the *_frozen step; the streaming decoders keep the position mode of their name."""
    for method in METHODS:
        assert make_decoder(method, model, n_sink=4, capacity=CAPACITY).name == method
    fast = {m: make_decoder(m, model, 4, CAPACITY, decode_attention="grouped")
            for m in ("streaming_static", "streaming_compiled", "streaming_compiled_frozen")}
    assert {m: (d.compile, d.freeze_weights, d.decode_attention) for m, d in fast.items()} == {
        "streaming_static": ("never", False, "grouped"), "streaming_compiled": ("always", False, "grouped"),
        "streaming_compiled_frozen": ("always", True, "grouped")}
    assert [(d.position_mode, d.streaming_mode) for d in (make_decoder(m, model, 4, CAPACITY) for m in (
        "streaming_pos_shift", "streaming_rerotate", "streaming_absolute", "mit"))] == [
        ("pos_shift", "ours"), ("rerotate", "ours"), ("absolute", "ours"), ("pos_shift", "mit")]
    with pytest.raises(ValueError, match="unknown method 'fastest'; choose from dense_static, "):
        make_decoder("fastest", model, 4, CAPACITY)


def test_the_compiled_dense_step_is_one_whole_graph_replayed_as_a_cuda_graph(model, monkeypatch):
    """dense_static_compiled compiles the model's forward with mode="reduce-overhead" (CUDA graphs) and fullgraph=True
    (a graph break would time a step that is partly eager); torch.compile is faked: nothing is compiled."""
    calls = []

    def fake_compile(function, **options):
        calls.append(options)
        return function

    monkeypatch.setattr(torch, "compile", fake_compile)
    decoder = _ready("dense_static_compiled", model)
    decoder.step()
    assert calls == [{"mode": "reduce-overhead", "fullgraph": True}]


def test_measure_latency_defaults(monkeypatch):
    """Defaults of measure_latency (the bench command passes n_sink, rounds and steps, but not the warm-up): 4 sinks,
    5 rounds of 6 timed steps, 3 warm-up steps first (a CUDA-graph step is compiled, recorded, then replayed), the
    decode attention chosen for the device."""
    made = []

    class Decoder:
        steps = 0

        def prepare(self):
            pass

        def step(self):
            self.steps += 1

        def cache_bytes(self):
            return 0

        def cache_length(self):
            return 0

    def fake_make_decoder(method, model, n_sink, capacity, decode_attention="?"):
        made.append((method, n_sink, capacity, decode_attention, Decoder()))
        return made[-1][-1]

    monkeypatch.setattr(latency, "make_decoder", fake_make_decoder)
    monkeypatch.setattr(latency, "prepare_attn", lambda decoder: None)
    monkeypatch.setattr(latency, "synchronized_ms", lambda function, device: (function(), 1.0)[1])
    (row,) = latency.measure_latency(torch.nn.Linear(1, 1), ["a"], capacity=32)
    ((method, n_sink, capacity, decode_attention, decoder),) = made
    assert (method, n_sink, capacity, decode_attention) == ("a", 4, 32, "auto")
    assert len(row.step_ms) == 5 * 6 and decoder.steps == 3 + 5 * 6


def test_the_environment_names_the_processor_where_the_platform_does(monkeypatch):
    """environment()["cpu"] is platform.processor() ("Intel64 Family 6 ..." on Windows), and the machine only where
    no processor is named (Linux's processor() is often empty)."""
    monkeypatch.setattr(latency.platform, "machine", lambda: "AMD64")
    monkeypatch.setattr(latency.platform, "processor", lambda: "Intel64 Family 6 Model 85")
    assert latency.environment("cpu")["cpu"] == "Intel64 Family 6 Model 85"
    monkeypatch.setattr(latency.platform, "processor", lambda: "")
    info = latency.environment("cpu")
    assert info["cpu"] == "AMD64" and "gpu" not in info and info["device"] == "cpu"


def test_a_stream_off_cuda_records_no_cuda_memory(model):
    """cuda_allocated_bytes is None off CUDA (torch.cuda.memory_allocated() answers 0 on a CPU-only build, which would
    read as a stream holding no memory)."""
    rows = latency.measure_stream(model, 12, 2, checkpoints=[12], block=8, steps=1)
    assert [row["cuda_allocated_bytes"] for row in rows] == [None]


def test_the_copy_bandwidth_copies_a_gib_twenty_times(monkeypatch):
    """measure_copy_bandwidth's defaults (what the bench's bandwidth floor uses): a 1 GiB buffer, one untimed copy,
    then 20 timed ones. torch.cuda is faked (a copy takes 2 ms)."""
    cuda, sizes = _FakeCuda(), []

    class Buffer:
        def copy_(self, source):
            cuda.work += 1

    def empty(size, dtype, device):
        sizes.append(size)
        return Buffer()

    monkeypatch.setattr(latency, "torch", types.SimpleNamespace(device=torch.device, uint8=torch.uint8, cuda=cuda,
                                                                empty=empty, empty_like=lambda source: Buffer()))
    assert latency.measure_copy_bandwidth("cuda") == 2 * 2**30 * 20 / (2.0 * 20 / 1000)
    assert sizes == [2**30] and cuda.work == 1 + 20


# --- streaming-llm bench (bench/command.py) ---------------------------------------------------------------------------

class _StopBench(Exception):
    """Raised by a faked measurement to end a run there (cli.main lets it through)."""


class _FakeBench:
    """`streaming-llm bench` on a tiny Llama with its measurements faked: measure_latency gives each method at each
    capacity steps of 1, 2 and 3 ms (its cache of `capacity` tokens, 1 KiB each), measure_stream a row per checkpoint;
    both record their arguments. `positions` sets the model's max_position_embeddings."""

    def __init__(self, monkeypatch, positions=4096):
        from streaming_llm.bench.latency import LatencyRow

        self.model = build_llama()
        self.model.config.max_position_embeddings = positions
        self.latency_calls, self.stream_calls = [], []

        def measure_latency(model, methods, capacity, n_sink, rounds, steps, progress=None, decode_attention="auto",
                            skipped=None):
            self.latency_calls.append(dict(methods=methods, capacity=capacity, n_sink=n_sink, rounds=rounds,
                                           steps=steps, decode_attention=decode_attention))
            return [LatencyRow(method, capacity, step_ms=[1.0, 2.0, 3.0], cache_bytes=capacity * 1024,
                               cache_length=capacity) for method in methods]

        def measure_stream(model, capacity, n_sink, checkpoints, progress=None):
            self.stream_calls.append(dict(capacity=capacity, n_sink=n_sink, checkpoints=checkpoints))
            return [{"tokens_streamed": c + 8, "median_ms": 1.0, "rss_bytes": 2**20, "cache_length": capacity,
                     "cuda_allocated_bytes": None} for c in checkpoints]

        monkeypatch.setattr(latency, "build_model", lambda shape, dtype, device: self.model)
        monkeypatch.setattr(latency, "measure_latency", measure_latency)
        monkeypatch.setattr(latency, "measure_stream", measure_stream)

    def __call__(self, capsys, tmp_path, *options, tag="t"):
        """(exit status, stdout, stderr, the JSON report or None) of a run with `options`."""
        import json

        from streaming_llm import cli

        argv = ["bench", "--methods", "dense_static,mit", "--output-dir", str(tmp_path), *options]
        status = cli.main(argv + (["--tag", tag] if tag is not None and "--tag" not in options else []))
        out, err = capsys.readouterr()
        report = tmp_path / f"{tag}.json"
        return status, out, err, json.loads(report.read_text()) if tag and report.exists() else None


@pytest.fixture
def fake_bench(monkeypatch):
    return _FakeBench(monkeypatch)


def test_a_tag_may_have_200_bytes_and_no_more(fake_bench, capsys, tmp_path):
    """--tag is at most 200 bytes (a file name has 255, and up to 35 characters follow the tag): 200 are taken."""
    status, _, err, report = fake_bench(capsys, tmp_path, "--cache-sizes", "16", "--quiet", tag="é" * 100)
    assert status == 0 and report["rows"], err
    status, _, err, _ = fake_bench(capsys, tmp_path, "--cache-sizes", "16", "--quiet", tag="x" + "é" * 100)
    assert status == 2 and "--tag is 201 bytes long, at most 200" in err


def test_the_options_defaults_are_the_ones_the_help_names(capsys):
    from streaming_llm import cli

    args = cli.build_parser().parse_args(["bench"])
    assert (args.rounds, args.steps, args.stream_tokens, args.cache_sizes, args.methods, args.shape) == (
        5, 6, 0, [256, 512, 1024, 2048, 4096], "default", "embedded")
    assert cli.main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "cache size (default 5)" in text and "per round (default 6)" in text and "(default 0 = skip)" in text


def test_the_default_methods_on_cuda_are_every_method(fake_bench, monkeypatch, capsys, tmp_path):
    """--methods default on CUDA times the compiled methods too (off CUDA they are left out); the device is faked and
    the run stopped at its first measurement."""
    import streaming_llm.loading

    def measure_latency(model, methods, *args, **kwargs):
        raise _StopBench(methods)

    monkeypatch.setattr(streaming_llm.loading, "resolve_device", lambda device: "cuda:0")
    monkeypatch.setattr(latency, "measure_latency", measure_latency)
    from streaming_llm import cli

    with pytest.raises(_StopBench) as stopped:
        cli.main(["bench", "--cache-sizes", "16", "--quiet", "--output-dir", str(tmp_path)])
    assert stopped.value.args[0] == list(METHODS)
    with pytest.raises(_StopBench) as stopped:
        cli.main(["bench", "--cache-sizes", "16", "--methods", "mit", "--quiet", "--output-dir", str(tmp_path)])
    assert stopped.value.args[0] == ["mit"]


def test_the_embedded_model_is_named_as_such(monkeypatch, capsys, tmp_path):
    """Without --model the embedded model is timed: the report's model is "embedded", and a refusal names "the
    embedded model" (not a --shape)."""
    fake = _FakeBench(monkeypatch, positions=128)
    status, _, err, report = fake(capsys, tmp_path, "--cache-sizes", "16", "--quiet")
    assert status == 0 and (report["model"], report["shape"]) == ("embedded", "embedded"), err
    status, _, err, _ = fake(capsys, tmp_path, "--cache-sizes", "256", "--quiet")
    assert status == 2 and "--cache-sizes: every size is too large for the embedded model: " in err


def test_a_moved_stream_or_profile_is_said_only_when_asked_for_and_moved(monkeypatch, capsys, tmp_path):
    """A model of 128 positions at sizes 64 and 256: without --stream-tokens and --profile nothing is said about
    their sizes; a model holding 256 streams there, and nothing is said either."""
    fake = _FakeBench(monkeypatch, positions=128)
    status, _, err, report = fake(capsys, tmp_path, "--cache-sizes", "64,256", "--quiet")
    assert status == 0 and "at cache size" not in err, err
    assert report["stream"] == [] and report["profile"] == []
    fake = _FakeBench(monkeypatch)
    status, _, err, report = fake(capsys, tmp_path, "--cache-sizes", "64,256", "--stream-tokens", "300", "--quiet")
    assert status == 0 and "at cache size" not in err, err
    assert fake.stream_calls == [dict(capacity=256, n_sink=4, checkpoints=[256, 300])]


def test_a_long_stream_is_read_at_its_capacity_every_power_of_ten_and_its_end(fake_bench, capsys, tmp_path):
    status, _, err, report = fake_bench(capsys, tmp_path, "--cache-sizes", "64,16", "--stream-tokens", "120000",
                                        "--quiet")
    assert status == 0, err
    assert fake_bench.stream_calls == [dict(capacity=64, n_sink=4,
                                            checkpoints=[64, 1_000, 10_000, 50_000, 100_000, 120_000])]
    assert [row["tokens_streamed"] for row in report["stream"]] == [72, 1_008, 10_008, 50_008, 100_008, 120_008]


class _RecordingBar:
    """Stands in for tqdm: its arguments, the sum of its updates, whether it was closed."""

    def __init__(self, made, **kwargs):
        self.kwargs, self.count, self.closed = kwargs, 0, False
        made.append(self)

    def update(self, n):
        self.count += n

    def refresh(self):
        pass

    def close(self):
        self.closed = True


def test_the_progress_bars_plan_every_round_and_token_and_vanish(fake_bench, monkeypatch, capsys, tmp_path):
    """On a terminal (faked) each cache size has a bar of rounds x methods steps, and the stream one of its tokens;
    each is cleared when done (leave=False), so the table that follows stands alone."""
    import tqdm.auto

    import streaming_llm.cli_common

    made = []
    monkeypatch.setattr(streaming_llm.cli_common, "show_progress", lambda args: True)
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda **kwargs: _RecordingBar(made, **kwargs))
    status, _, err, _ = fake_bench(capsys, tmp_path, "--cache-sizes", "16,32", "--rounds", "3", "--stream-tokens", "40")
    assert status == 0, err
    assert [(bar.kwargs["total"], bar.kwargs["desc"], bar.kwargs["leave"], bar.closed) for bar in made] == [
        (3 * 2, "capacity 16", False, True), (3 * 2, "capacity 32", False, True), (40, "streaming", False, True)]
    assert err.startswith("bench: shape=embedded device=cpu dtype=float32 threads=")


def test_json_on_stdout_is_the_report_written(fake_bench, capsys, tmp_path):
    status, out, err, report = fake_bench(capsys, tmp_path, "--cache-sizes", "16", "--json")
    assert status == 0, err
    assert out == (tmp_path / "t.json").read_text()


def test_the_bandwidth_floor_is_the_bytes_a_step_reads_over_the_copy_bandwidth(fake_bench, monkeypatch, capsys,
                                                                               tmp_path):
    """On CUDA (the copy bandwidth faked at 0.5 TB/s) the floor at each size is (weight bytes + dense KV bytes of
    capacity + 1 tokens) / bandwidth, in ms, in the JSON and under the table."""
    monkeypatch.setattr(latency, "measure_copy_bandwidth", lambda device: 0.5e12)
    status, out, err, report = fake_bench(capsys, tmp_path, "--cache-sizes", "16,32")
    assert status == 0, err
    weights = latency.weight_bytes(fake_bench.model)
    kv = {c: dense_kv_bytes(fake_bench.model, c) for c in (16, 32)}
    assert report["bandwidth_floor"] == {
        "copy_bandwidth_bytes_per_s": 0.5e12, "weight_bytes": weights,
        "per_capacity": [{"capacity": c, "kv_bytes": kv[c], "floor_ms": 1000 * (weights + kv[c]) / 0.5e12}
                         for c in (16, 32)]}
    floors = [1000 * (weights + kv[c]) / 0.5e12 for c in (16, 32)]
    assert (f"bandwidth floor (weights + KV) / 0.50 TB/s: {floors[0]:.2f} ms at 16, {floors[1]:.2f} ms at 32\n"
            in out)


def test_the_profiles_go_into_an_output_folder_that_exists_or_not(fake_bench, monkeypatch, capsys, tmp_path):
    """--profile writes its traces first: into the default results/latency that exists after a first run, and into a
    new nested folder (the profiler is faked)."""
    from streaming_llm.bench import profile

    profiled = []

    def profile_decode(model, capacity, n_sink, position_mode, trace_path):
        profiled.append((capacity, position_mode, trace_path))
        return types.SimpleNamespace(top_operators="TOP", stages=[], text=lambda: f"stages of {position_mode}")

    monkeypatch.setattr(profile, "profile_decode", profile_decode)
    for folder in (tmp_path, tmp_path / "new" / "sub"):
        status, out, err, report = fake_bench(capsys, folder, "--cache-sizes", "16,64", "--profile")
        assert status == 0, err
        assert profiled[-2:] == [(64, "pos_shift", str(folder / "t.pos_shift.trace.json")),
                                 (64, "rerotate", str(folder / "t.rerotate.trace.json"))]
        assert out.index("TOP") < out.index("stages of pos_shift") < out.index("stages of rerotate")


def test_the_stream_and_profile_sizes_around_1024():
    """The stream's size is the largest up to 1024 (1025 is beyond), the profile's the one nearest 1024."""
    from streaming_llm.bench.command import _profile_capacity, _stream_capacity

    assert _stream_capacity([512, 1025]) == 512 and _stream_capacity([1024, 2048]) == 1024
    assert _profile_capacity([1026, 1023]) == 1023 and _profile_capacity([1022, 1025]) == 1025


def test_the_compile_counters_count_graphs_and_cuda_graph_skips_only(monkeypatch):
    """No graph compiled is 0 graphs; of inductor's counters only the CUDA-graph ones are kept."""
    import collections

    import torch._dynamo.utils

    from streaming_llm.bench.command import _compile_counters

    counters = collections.defaultdict(collections.Counter)
    monkeypatch.setattr(torch._dynamo.utils, "counters", counters)
    assert _compile_counters() == {"unique_graphs": 0}
    counters["stats"]["unique_graphs"] = 3
    counters["inductor"].update(cudagraph_skips=2, fxgraph_cache_miss=5)
    assert _compile_counters() == {"unique_graphs": 3, "cudagraph_skips": 2}


@pytest.mark.parametrize("shape, dims, extra", [
    # SmolLM2-135M: 30 layers, 9 query heads sharing 3 kv heads of 64, a tied 49,152-token embedding, RoPE base 10^5
    ("smollm2-135m", dict(hidden_size=576, intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                          tie_word_embeddings=True), dict(layers=30, heads=9, kv_heads=3, head_dim=64, theta=100000.0)),
    # Pythia-70M: 6 layers, 8 heads of 64, a quarter of each head rotated, parallel residual
    ("pythia-70m", dict(hidden_size=512, intermediate_size=2048, vocab_size=50304, max_position_embeddings=2048,
                        use_parallel_residual=True), dict(layers=6, heads=8, kv_heads=8, head_dim=64, theta=10000)),
    # Llama-2-7B: 32 layers, 32 heads of 128 (no GQA), 11,008 MLP; positions raised to 8192 to time a 4096 cache
    ("llama-2-7b", dict(hidden_size=4096, intermediate_size=11008, vocab_size=32000, max_position_embeddings=8192),
     dict(layers=32, heads=32, kv_heads=32, head_dim=128, theta=10000.0)),
])
def test_each_shape_is_the_published_models(shape, dims, extra):
    """The random-weight shapes time the models they are named after (docs/performance.md's numbers): their attention,
    MLP and vocabulary as published; no weights are built."""
    from streaming_llm.models import attention_shape

    config = latency.shape_config(shape)
    assert {name: getattr(config, name) for name in dims} == dims
    attention = attention_shape(config)
    assert (attention.layers, attention.heads, attention.kv_heads, attention.head_dim) == (
        extra["layers"], extra["heads"], extra["kv_heads"], extra["head_dim"])
    rope = config.rope_parameters
    assert rope["rope_theta"] == extra["theta"] and rope.get("partial_rotary_factor", 1.0) == (
        0.25 if shape == "pythia-70m" else 1.0)
    assert config._attn_implementation == "sdpa"


def test_the_gemma3_shapes_mlp_vocabulary_and_positions():
    """The gemma3-1b-attention shape cuts Gemma 3 1B's MLP to 1,152 and its vocabulary to 4,096 (so that a CPU times
    it) and keeps its 32,768 positions and query scale of 256 (its attention, test_bench.py checks)."""
    config = latency.shape_config("gemma3-1b-attention")
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings,
            config.query_pre_attn_scalar) == (1152, 4096, 32768, 256)


def test_a_model_given_is_the_model_timed(fake_bench, monkeypatch, capsys, tmp_path):
    """--model PATH (with the embedded shape) loads and times that model, never the embedded one (which a real run
    would then time for minutes: the mutation campaign saw a timeout, not a failure)."""
    import streaming_llm.loading

    loaded = []

    def load_model(path, dtype, device):
        loaded.append((path, dtype, device))
        return fake_bench.model, None

    def build_model(shape, dtype, device):
        raise AssertionError(f"built the {shape} model")

    monkeypatch.setattr(streaming_llm.loading, "load_model", load_model)
    monkeypatch.setattr(latency, "build_model", build_model)
    status, _, err, report = fake_bench(capsys, tmp_path, "--model", "some/model", "--cache-sizes", "16", "--quiet")
    assert status == 0, err
    assert loaded == [("some/model", torch.float32, "cpu")] and report["model"] == "some/model"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, _StopBench], ids=["ctrl_c", "crash"])
def test_a_bench_stopped_part_way_keeps_the_sizes_it_finished(fake_bench, monkeypatch, capsys, tmp_path, stop):
    """A run stopped in its second cache size (Ctrl-C, a machine's time limit, a crash) wrote nothing: the JSON came
    at the end. Each finished size is now kept in <tag>.partial.json, marked partial; the run that completes writes
    <tag>.json and removes it."""
    import json

    plain = latency.measure_latency

    def measure_latency(model, methods, capacity, *args, **kwargs):
        if capacity == 32:
            raise stop()
        return plain(model, methods, capacity, *args, **kwargs)

    monkeypatch.setattr(latency, "measure_latency", measure_latency)
    options = ("--cache-sizes", "16,32", "--quiet")
    if stop is KeyboardInterrupt:
        assert fake_bench(capsys, tmp_path, *options)[0] == 130
    else:
        with pytest.raises(_StopBench):
            fake_bench(capsys, tmp_path, *options)
    partial = tmp_path / "t.partial.json"
    kept = json.loads(partial.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["t.partial.json"]
    assert kept["partial"] is True and kept["kind"] == "decode_latency" and kept["environment"]["device"] == "cpu"
    assert [(row["method"], row["capacity"]) for row in kept["rows"]] == [("dense_static", 16), ("mit", 16)]

    monkeypatch.setattr(latency, "measure_latency", plain)
    status, _, err, report = fake_bench(capsys, tmp_path, *options)
    assert status == 0 and "partial" not in report, err
    assert [row["capacity"] for row in report["rows"]] == [16, 16, 32, 32]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.png"]
