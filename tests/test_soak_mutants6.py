"""Behaviour of the soak (streaming_llm/bench/soak.py) that no other test pinned down, found by the sixth mutation
round: the tiny models' shapes and seeds, the token sources, the interval bookkeeping at an interval of one token,
the progress lines, the clock readings (a fake clock: every number is asserted exactly), the memory check's other
fields, and what `main` hands the soak and writes (the soak itself replaced where only its inputs matter)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from transformers import LlamaForCausalLM

from streaming_llm import StreamingLLMWrapper
from streaming_llm.bench import soak
from test_generation_mutants import _Clock  # soak.py's `time`: perf_counter() steps by `step` from `start`
from test_soak import _records, _tiny_wrapper

# -- the models and the token sources ------------------------------------------------------------------------


def test_the_tiny_model_is_the_documented_shape_and_seeded_zero_by_default():
    """build_tiny_llama's docstring: 2 layers, hidden 64, 4 query / 2 key-value heads, vocabulary 128; seed 0 unless
    told (the soak's results and the precision tests rely on one model)."""
    model = soak.build_tiny_llama()
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size) == (2, 64, 4, 2, 128)
    assert soak.TINY_VOCAB_SIZE == 128
    seeded = {seed: soak.build_tiny_llama(seed=seed).state_dict() for seed in (0, 1)}
    weights = model.state_dict()
    assert all(torch.equal(weights[name], seeded[0][name]) for name in weights)
    assert not all(torch.equal(weights[name], seeded[1][name]) for name in weights)


def test_the_tiny_chat_model_is_seeded_zero_by_default_and_ties_its_embeddings(tmp_path, monkeypatch):
    """save_tiny_chat_llama's model (the one every CLI test's tiny checkpoint is) shares its input embeddings with
    its output layer, and is seed 0's unless told. The models are caught at save_pretrained, not written."""
    saved = []
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", lambda model, folder, **kwargs: saved.append(model))
    soak.save_tiny_chat_llama(tmp_path / "default")
    soak.save_tiny_chat_llama(tmp_path / "zero", seed=0)
    soak.save_tiny_chat_llama(tmp_path / "one", seed=1)
    default, zero, one = (model.model.embed_tokens.weight for model in saved)
    assert torch.equal(default, zero) and not torch.equal(default, one)
    assert saved[0].config.tie_word_embeddings
    assert saved[0].lm_head.weight.data_ptr() == saved[0].model.embed_tokens.weight.data_ptr()


def test_random_ids_are_one_row_over_the_whole_vocabulary():
    """Each block is [1, count], drawn from every id of the vocabulary, 0 and vocab_size - 1 included."""
    source = soak.random_token_source(8, seed=0)
    ids = source(0, 500)
    assert ids.shape == (1, 500)
    assert int(ids.min()) == 0 and int(ids.max()) == 7
    assert source(500, 3).shape == (1, 3)


def test_a_text_is_fed_in_consecutive_slices():
    ids = torch.arange(10)[None]
    source = soak.slice_token_source(ids)
    assert source(3, 4).tolist() == [[3, 4, 5, 6]]
    assert source(0, 2).tolist() == [[0, 1]]


def test_a_soak_over_a_text_reads_it_once_in_order():
    """The embedded soak's source: the stream is the text's ids in order, each once (the same records as the same ids
    drawn block by block), and it ends at the text's end."""
    ids = soak.random_token_source(soak.TINY_VOCAB_SIZE, seed=3)(0, 20)
    wrapper = _tiny_wrapper(n_sink=1, window_size=7)
    read = []

    def source(start, count):
        read.append((start, count))
        return soak.slice_token_source(ids)(start, count)

    outcome = soak.run_soak(wrapper, source, 20, 10, 4, 10)
    assert read == [(0, 4), (4, 4), (8, 2), (10, 4), (14, 4), (18, 2)]
    drawn = soak.run_soak(wrapper, soak.random_token_source(soak.TINY_VOCAB_SIZE, seed=3), 20, 10, 4, 10)
    assert [r["mean_nll"] for r in outcome["records"]] == pytest.approx([r["mean_nll"] for r in drawn["records"]])


# -- the loop ------------------------------------------------------------------------------------------------


def test_a_record_of_one_token_has_the_nll_of_that_token_alone():
    """Recording every token: the stream's first token has no prediction (mean NLL 0 over no tokens, not a division
    by zero), and each later record's mean NLL is its one token's."""
    wrapper = _tiny_wrapper(n_sink=1, window_size=7)
    outcome = soak.run_soak(wrapper, soak.random_token_source(soak.TINY_VOCAB_SIZE, seed=3), num_tokens=4, every=1,
                            block_size=1, warmup_tokens=1)
    ids = soak.random_token_source(soak.TINY_VOCAB_SIZE, seed=3)(0, 4)
    wrapper.reset()
    logits = wrapper(ids)[0]
    nlls = -torch.log_softmax(logits[:-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert [r["mean_nll"] for r in outcome["records"]] == pytest.approx([0.0, *nlls.tolist()], rel=1e-5)


def test_the_soak_is_silent_unless_asked_and_then_prints_a_line_per_record(capsys):
    """progress=False by default; with progress=True each record prints one stderr line, led by its own token count."""
    wrapper = _tiny_wrapper(n_sink=1, window_size=7)
    soak.run_soak(wrapper, soak.random_token_source(soak.TINY_VOCAB_SIZE, seed=3), 30, 10, 5, 10)
    assert capsys.readouterr() == ("", "")
    outcome = soak.run_soak(wrapper, soak.random_token_source(soak.TINY_VOCAB_SIZE, seed=3), 30, 10, 5, 10,
                            progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert [line.split()[0] for line in lines] == ["10", "20", "30"]
    assert all(f"held {r['cache_length']}" in line for line, r in zip(lines, outcome["records"]))


def test_the_elapsed_and_wall_times_are_read_from_the_start_of_the_stream(monkeypatch):
    """The clock is read at the start, at each record and at the end: elapsed_s is seconds since the start, rounded to
    milliseconds; wall_s the whole stream's, and tokens_per_s the tokens over it."""
    monkeypatch.setattr(soak, "time", _Clock(start=100.0, step=1.23456))
    wrapper = _tiny_wrapper(n_sink=1, window_size=7)
    outcome = soak.run_soak(wrapper, soak.random_token_source(soak.TINY_VOCAB_SIZE, seed=3), 20, 10, 5, 10)
    assert [r["elapsed_s"] for r in outcome["records"]] == [1.235, 2.469]
    assert outcome["wall_s"] == pytest.approx(3 * 1.23456)
    assert outcome["tokens_per_s"] == pytest.approx(20 / (3 * 1.23456))


@pytest.mark.parametrize("step, tokens_per_s", [(0.0, None), (0.25, 20 / 0.75)])
def test_a_stream_timed_at_zero_seconds_has_no_speed(monkeypatch, step, tokens_per_s):
    """A clock that did not move (a coarse timer): tokens_per_s is None, not a division by zero; under a second it is
    the tokens over the seconds."""
    monkeypatch.setattr(soak, "time", _Clock(start=100.0, step=step))
    wrapper = _tiny_wrapper(n_sink=1, window_size=7)
    outcome = soak.run_soak(wrapper, soak.random_token_source(soak.TINY_VOCAB_SIZE, seed=3), 20, 10, 5, 10)
    assert outcome["tokens_per_s"] == (None if tokens_per_s is None else pytest.approx(tokens_per_s))


def test_each_record_holds_the_live_and_raw_rss_rounded_to_a_thousandth_of_a_mib(monkeypatch):
    """The raw reading is taken before the free memory is released, the live one after; each is rounded to 3 places."""
    readings = iter([200.00049, 100.00051, 300.0004, 150.0006])
    released = []
    monkeypatch.setattr(soak, "resident_memory_mib", lambda: next(readings))
    monkeypatch.setattr(soak, "release_free_memory", lambda: released.append(True))
    wrapper = _tiny_wrapper(n_sink=1, window_size=7)
    outcome = soak.run_soak(wrapper, soak.random_token_source(soak.TINY_VOCAB_SIZE, seed=3), 20, 10, 5, 10)
    assert [(r["rss_raw_mib"], r["rss_mib"]) for r in outcome["records"]] == [(200.0, 100.001), (300.0, 150.001)]
    assert len(released) == 2


# -- the checks ----------------------------------------------------------------------------------------------


def test_rss_growth_of_exactly_the_limit_fails():
    """The check is growth < 1%: a climb of exactly 1% over the warm-up's peak is a failure."""
    check = soak.evaluate_checks(_records({100: 100.0, 200: 101.0, 300: 100.5}), 64, 100, 0)["rss_growth"]
    assert check["growth"] == soak.RSS_GROWTH_LIMIT == 0.01
    assert check["passed"] is False


def test_the_memory_check_reports_the_raw_peak_and_the_last_reading_after_the_warm_up():
    records = _records({100: 100.0, 200: 100.0, 300: 100.2, 400: 100.1})
    for record, raw in zip(records, (150.0, 90.0, 104.0, 120.0)):
        record["rss_raw_mib"] = raw
    check = soak.evaluate_checks(records, 64, 100, 0)["rss_growth"]
    assert check["max_raw_after_warmup_mib"] == 120.0
    assert check["final_mib"] == 100.1 and check["max_after_warmup_mib"] == 100.2


def test_the_cache_check_names_the_first_ten_wrong_lengths():
    records = _records({t: 1.0 for t in range(100, 1300, 100)})
    for record in records:
        record["cache_length"] = 63
    check = soak.evaluate_checks(records, 64, 100, 0)["cache_length"]
    assert not check["passed"]
    assert check["wrong_at"] == [(t, 63) for t in range(100, 1100, 100)]


def test_the_finite_check_reports_the_largest_logit_of_the_stream():
    records = _records({100: 1.0, 200: 1.0, 300: 1.0})
    for record, largest in zip(records, (2.0, 7.5, 3.0)):
        record["max_abs_logit"] = largest
    assert soak.evaluate_checks(records, 64, 100, 0)["finite"]["max_abs_logit"] == 7.5
    assert soak.evaluate_checks([], 64, 100, 0)["finite"]["max_abs_logit"] is None


# -- the command line ----------------------------------------------------------------------------------------


def test_the_options_default_as_the_help_says(capsys):
    args = soak.parse_args([])
    assert (args.model, args.tokens, args.every, args.block, args.n_sink, args.window_size, args.position_mode,
            args.streaming_mode, args.warmup, args.seed, args.threads, args.out, args.quiet) == (
        "tiny", 20_000, 1_000, 256, 4, None, "pos_shift", "ours", None, 0, 1, None, False)
    with pytest.raises(SystemExit) as exit_info:
        soak.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert soak.__doc__.splitlines()[0] in " ".join(capsys.readouterr().out.split())


def test_each_count_is_taken_at_its_least_value():
    """The refusals of test_soak stop one below each least value; the least value itself is taken."""
    args = soak.parse_args(["--tokens", "1", "--every", "1", "--block", "1", "--n-sink", "0", "--window-size", "1",
                            "--warmup", "0", "--threads", "1"])
    assert (args.tokens, args.every, args.block, args.n_sink, args.window_size, args.warmup, args.threads) == (
        1, 1, 1, 0, 1, 0, 1)


def _outcome(passed=True, checks=None):
    checks = checks or {"cache_length": {"passed": True}, "rss_growth": {"passed": True}, "finite": {"passed": True}}
    return {"records": [], "checks": checks, "passed": passed, "wall_s": 1.5, "tokens_per_s": 2000.0}


class _SoakSpy:
    """Stands in for run_soak: keeps what main handed it and answers `outcome`."""

    def __init__(self, outcome=None):
        self.calls, self.outcome = [], outcome or _outcome()

    def __call__(self, wrapper, next_ids, num_tokens, every, block_size, warmup_tokens, progress=False):
        self.calls.append(types.SimpleNamespace(wrapper=wrapper, next_ids=next_ids, num_tokens=num_tokens, every=every,
                                                block_size=block_size, warmup=warmup_tokens, progress=progress))
        return self.outcome


@pytest.mark.parametrize("argv, warmup", [
    (["--tokens", "3000", "--every", "100"], 300),  # a tenth of the stream
    (["--tokens", "1000", "--every", "100"], 256),  # four capacities (64)
    (["--tokens", "1000", "--every", "500"], 500),  # one record
    (["--tokens", "1000", "--warmup", "7"], 7),
])
def test_the_warm_up_is_the_largest_of_its_three_floors_unless_given(monkeypatch, argv, warmup):
    spy = _SoakSpy()
    monkeypatch.setattr(soak, "run_soak", spy)
    assert soak.main([*argv, "--quiet"]) == 0
    assert spy.calls[0].warmup == warmup


def test_the_tiny_soak_streams_ids_of_the_next_seed_and_shows_progress_unless_quiet(monkeypatch, tmp_path):
    """--seed S: the model's weights are seed S's and the ids seed S + 1's (so they are not drawn from the same
    generator state); the JSON says which; the progress lines are on unless --quiet."""
    spy = _SoakSpy()
    monkeypatch.setattr(soak, "run_soak", spy)
    out = tmp_path / "soak.json"
    soak.main(["--seed", "3", "--tokens", "100", "--out", str(out)])
    soak.main(["--seed", "3", "--tokens", "100", "--quiet"])
    assert [call.progress for call in spy.calls] == [True, False]
    assert torch.equal(spy.calls[0].next_ids(0, 20), soak.random_token_source(soak.TINY_VOCAB_SIZE, 4)(0, 20))
    weights = spy.calls[0].wrapper.model.state_dict()
    expected = soak.build_tiny_llama(seed=3).state_dict()
    assert all(torch.equal(weights[name], expected[name]) for name in weights)
    payload = json.loads(out.read_text())
    assert payload["data"] == {"kind": "uniform random ids", "vocab_size": 128, "seed": 4}
    assert payload["command"] == "python -m streaming_llm.bench.soak --seed 3 --tokens 100 --out " + str(out)


def test_the_command_recorded_is_the_programs_own_arguments(monkeypatch, tmp_path):
    """main() with no argv reads sys.argv, and records it without the program's path."""
    monkeypatch.setattr(soak, "run_soak", _SoakSpy())
    out = tmp_path / "soak.json"
    monkeypatch.setattr(sys, "argv", ["/somewhere/soak.py", "--tokens", "100", "--quiet", "--out", str(out)])
    assert soak.main() == 0
    assert json.loads(out.read_text())["command"] == (
        "python -m streaming_llm.bench.soak --tokens 100 --quiet --out " + str(out))


def test_the_summary_names_each_checks_verdict_and_a_failed_soak_exits_one(monkeypatch, capsys):
    checks = {"cache_length": {"passed": True}, "rss_growth": {"passed": None}, "finite": {"passed": False}}
    monkeypatch.setattr(soak, "run_soak", _SoakSpy(_outcome(passed=False, checks=checks)))
    assert soak.main(["--tokens", "100", "--quiet"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "soak tiny-llama-random: 100 tokens in 1.5 s; cache_length ok, rss_growth not measured, finite FAILED")


def test_the_embedded_soak_streams_the_corpus_through_a_window_of_1020(monkeypatch, tmp_path):
    """--model embedded: the corpus's tokens, fed slice by slice, through 4 sinks and a window of 1,020 by default.
    The model and the tokens are stood in for (a tiny Llama, ids 0..99): only what main does with them is tested."""
    from streaming_llm.loading import EMBEDDED_MODEL

    ids = torch.arange(100)[None]
    loaded = []
    monkeypatch.setattr("streaming_llm.loading.load_model", lambda path: (soak.build_tiny_llama(), "tokenizer"))

    def load_tokens(tokenizer, path, num_tokens, option):
        loaded.append((tokenizer, path, num_tokens, option))
        return ids

    monkeypatch.setattr("streaming_llm.data.load_tokens", load_tokens)
    spy = _SoakSpy()
    monkeypatch.setattr(soak, "run_soak", spy)
    out = tmp_path / "soak.json"
    assert soak.main(["--model", "embedded", "--tokens", "100", "--quiet", "--out", str(out)]) == 0
    assert loaded == [("tokenizer", None, 100, "--tokens")]
    call = spy.calls[0]
    assert isinstance(call.wrapper, StreamingLLMWrapper) and call.wrapper.cache_capacity == 1024
    assert call.next_ids(10, 5).tolist() == [[10, 11, 12, 13, 14]]
    payload = json.loads(out.read_text())
    assert (payload["model"], payload["window_size"], payload["cache_capacity"]) == (EMBEDDED_MODEL, 1020, 1024)
    assert payload["data"]["num_tokens"] == 100
