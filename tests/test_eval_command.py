"""`streaming-llm eval`, the README's main job, end to end on a tiny checkpoint: every method on one stream,
per-method prefixes, finished results skipped on a re-run, and a reference that cannot run the model skipped
with one line (kvpress on GPT-NeoX), not a traceback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, run_main, tiny_checkpoint
from test_experiments import load_script, stray_sigterm_handler

pytest.importorskip("kvpress")

STREAM = ["--num-tokens", "120", "--n-sink", "2", "--window-size", "20", "--block-size", "32", "--quiet", "--json"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-NeoX (Pythia's architecture) with the embedded tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from streaming_llm.loading import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=4096)
    folder = tmp_path_factory.mktemp("neox") / "tiny_neox"
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def results_of(out: str) -> dict[str, dict]:
    return {result["method"]: result for result in json.loads(out)["results"]}


def test_eval_scores_every_method_and_skips_finished_ones(model_dir, tmp_path, capsys):
    methods = "dense,streaming_pos_shift,mit,recompute:50,kvpress_decode_corrected"
    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", methods, "--decode-tokens", "40",
            "--output-dir", str(tmp_path), "--plot"]
    status, out, err = run_main(capsys, *argv)
    assert status == 0, err
    first = results_of(out)
    assert list(first) == methods.replace(":50", "").split(",")
    assert not any(result["skipped"] for result in first.values())
    assert [first[m]["num_tokens"] for m in first] == [120, 120, 120, 50, 40]
    assert first["streaming_pos_shift"]["evaluator"] == "block32" and first["kvpress_decode_corrected"]["evaluator"] == "decode"
    # MIT's cache slicing and ours are the same method (SEMANTICS.md): same perplexity on the same ids.
    assert first["mit"]["perplexity"] == pytest.approx(first["streaming_pos_shift"]["perplexity"], rel=1e-5)
    assert all(Path(result["json_path"]).is_file() for result in first.values())
    assert (tmp_path / "nll_curves_T120_s2_w20.png").read_bytes()[:4] == b"\x89PNG"

    status, out, _ = run_main(capsys, *argv)
    again = results_of(out)
    assert status == 0 and all(result["skipped"] for result in again.values())
    assert {m: r["perplexity"] for m, r in again.items()} == {m: r["perplexity"] for m, r in first.items()}


def test_each_models_figure_keeps_its_own_name_in_a_shared_folder(model_dir, neox_dir, tmp_path, capsys):
    """eval --plot named its figure by stream length and cache only: a second model's (or dtype's) eval in the same
    folder replaced the first one's figure. It is named as summaries are: by model and text once the folder holds
    several, and by a dtype other than float32."""
    argv = [*STREAM, "--methods", "dense,streaming_pos_shift", "--output-dir", str(tmp_path), "--plot"]
    assert run_main(capsys, "eval", "--model", str(model_dir), *argv)[0] == 0
    first = tmp_path / "nll_curves_T120_s2_w20.png"
    drawn = first.read_bytes()
    status, out, err = run_main(capsys, "eval", "--model", str(neox_dir), *argv)
    assert status == 0, err
    (data,) = {Path(result["json_path"]).name.split("__")[1] for result in results_of(out).values()}
    assert first.read_bytes() == drawn
    assert (tmp_path / f"nll_curves__tiny_neox__{data}_T120_s2_w20.png").read_bytes()[:4] == b"\x89PNG"
    assert run_main(capsys, "eval", "--model", str(neox_dir), *argv, "--dtype", "bfloat16")[0] == 0
    assert (tmp_path / f"nll_curves__tiny_neox__{data}_T120_s2_w20__bfloat16.png").is_file()
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_eval_skips_a_reference_that_cannot_run_the_model(neox_dir, tmp_path, capsys):
    status, out, err = run_main(capsys, "eval", "--model", str(neox_dir), *STREAM, "--output-dir", str(tmp_path),
                                "--methods", "streaming_pos_shift,kvpress_decode_corrected")
    assert status == 0
    assert list(results_of(out)) == ["streaming_pos_shift"]
    assert err.strip() == ("eval: skipping kvpress_decode_corrected: kvpress 0.5.5 does not support "
                           "GPTNeoXForCausalLM (it supports LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, "
                           "Qwen2ForCausalLM, Qwen3ForCausalLM)")
    status, _, err = run_main(capsys, "eval", "--model", str(neox_dir), *STREAM, "--output-dir", str(tmp_path),
                              "--methods", "kvpress_decode_shipped")
    assert_one_line_error(status, err.split("\n", 1)[1], "none of the chosen methods can run this model")


def test_a_multimodal_gemma3_checkpoint_streams_its_text(tmp_path, capsys, monkeypatch):
    """Gemma 3's 4B+ checkpoints are multimodal (`gemma3`, the text model inside): `info` reports the language model,
    `eval` streams it (kvpress, which presses only its full-attention layers, skipped by name), and without eviction
    it is dense — with a cache larger than its sliding layer's window of 16 (docs/semantics.md §8). Its figure marks
    the text model's trained context (the composite config has no max_position_embeddings of its own)."""
    from tiny_models import build_gemma3_multimodal

    from streaming_llm.eval import plots
    from streaming_llm.loading import embedded_tokenizer

    plotted = {}
    monkeypatch.setattr(plots, "plot_nll_curves", lambda files, png, capacity, context_length: plotted.update(
        capacity=capacity, context_length=context_length))

    tokenizer = embedded_tokenizer()
    model = build_gemma3_multimodal(vocab_size=len(tokenizer), sliding_window=16)
    folder = tmp_path / "tiny_gemma3"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    status, out, err = run_main(capsys, "info", "--model", str(folder), "--n-sink", "2", "--window-size", "20", "--json")
    assert status == 0, err
    info = json.loads(out)
    assert (info["model_type"], info["layers"], info["vocab_size"], info["max_positions"]) == ("gemma3", 2, len(tokenizer),
                                                                                               4096)
    assert (info["rotary_ndims"], info["rotary_pairs"], info["layers_without_rope"]) == (16, "rotate_half (i, i+d/2)", 0)
    assert (info["sliding_layers"], info["sliding_window"], info["cache_capacity"]) == (1, 16, 22)
    status, out, err = run_main(capsys, "eval", "--model", str(folder), *STREAM, "--output-dir", str(tmp_path / "out"),
                                "--methods", "dense,streaming_pos_shift,mit,kvpress_decode_corrected", "--plot",
                                str(tmp_path / "curves.png"))
    assert status == 0, err
    assert plotted == {"capacity": 22, "context_length": 4096}
    assert list(results_of(out)) == ["dense", "streaming_pos_shift", "mit"]
    assert "skipping kvpress_decode_corrected: kvpress 0.5.5 compresses only Gemma 3's full-attention layers" in err
    status, out, err = run_main(capsys, "eval", "--model", str(folder), *STREAM[:2], "--n-sink", "2", "--window-size",
                                "120", *STREAM[6:], "--output-dir", str(tmp_path / "wide"),
                                "--methods", "dense,streaming_pos_shift")
    assert status == 0, err
    wide = results_of(out)
    assert wide["streaming_pos_shift"]["perplexity"] == pytest.approx(wide["dense"]["perplexity"], rel=1e-5)


def test_info_says_how_a_model_rotates(tmp_path, capsys):
    """Command R7B (`cohere2`): interleaved rotary pairs, and its full-attention layer (one of two here) without RoPE."""
    from tiny_models import build_llama_family

    from streaming_llm.loading import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    folder = tmp_path / "tiny_cohere2"
    build_llama_family("cohere2", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    status, out, err = run_main(capsys, "info", "--model", str(folder), "--json")
    assert status == 0, err
    info = json.loads(out)
    assert (info["rotary_ndims"], info["rotary_pairs"], info["layers_without_rope"]) == (16, "interleaved (2i, 2i+1)", 1)
    assert (info["sliding_layers"], info["sliding_window"]) == (1, 4096)


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory) -> Path:
    """Another tiny checkpoint in a folder of the same name as model_dir's (other weights): the same result names."""
    from streaming_llm.bench.soak import save_tiny_chat_llama

    return save_tiny_chat_llama(tmp_path_factory.mktemp("twin") / "tiny_chat_llama", seed=1)


def test_eval_refuses_results_and_checkpoints_of_another_model_with_the_same_name(model_dir, twin_dir, tmp_path, capsys):
    """Result names carry the model's folder name only: the result (and the checkpoint) of one model must never
    be taken for another's. It was: the twin's run printed the first model's perplexity as `skipped (exists)`."""
    assert twin_dir.name == model_dir.name
    argv = ["eval", *STREAM, "--methods", "streaming_pos_shift", "--output-dir", str(tmp_path)]
    status, out, _ = run_main(capsys, *argv, "--model", str(model_dir))
    assert status == 0
    first = results_of(out)["streaming_pos_shift"]
    json_path = Path(first["json_path"])
    status, _, err = run_main(capsys, *argv, "--model", str(twin_dir))
    assert_one_line_error(status, err, "was made with another model of the same name")
    status, out, _ = run_main(capsys, *argv, "--model", str(model_dir))  # the same model: skipped as before
    assert status == 0 and results_of(out)["streaming_pos_shift"]["skipped"]
    status, out, _ = run_main(capsys, *argv, "--model", str(twin_dir), "--force")
    twin = results_of(out)["streaming_pos_shift"]
    assert status == 0 and not twin["skipped"] and twin["model_fingerprint"] != first["model_fingerprint"]
    assert twin["perplexity"] != first["perplexity"]

    # A checkpoint of the twin's unfinished run is refused by the first model, resumed by the twin.
    from streaming_llm.eval.harness import CHECKPOINT_SUFFIX, Checkpoint

    checkpoint_path = json_path.with_name(json_path.stem + CHECKPOINT_SUFFIX)
    json_path.unlink()
    Checkpoint(checkpoint_path, 32, 1, twin["model_fingerprint"], twin["tokens_fingerprint"]).maybe_save(
        64, torch.full((119,), 2.0))
    status, _, err = run_main(capsys, *argv, "--model", str(model_dir))
    assert_one_line_error(status, err, "was made with another model of the same name")
    status, out, _ = run_main(capsys, *argv, "--model", str(twin_dir))
    assert status == 0 and results_of(out)["streaming_pos_shift"]["resumed_from_step"] == 64
    # the checkpoint's 64 NLLs (all 2.0 here) are kept, not scored again; the steps after them are scored
    from streaming_llm.eval.results import read_result

    nlls = read_result(json_path)[1]
    assert (nlls[:64] == 2.0).all() and not (nlls[64:] == 2.0).any()


def test_eval_refuses_results_of_the_same_text_tokenized_otherwise(model_dir, tmp_path, capsys, monkeypatch):
    """Result names carry the text's sha256, not its token ids: the same text with a BOS put first or not (another
    tokenizer, a transformers upgrade that converts the GGUF tokenizer otherwise) is another stream, whose result
    was printed as `skipped (exists)` and mixed with the new ones. It is refused now; the same stream is reused."""
    from streaming_llm import data

    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "streaming_pos_shift", "--output-dir", str(tmp_path)]
    status, out, err = run_main(capsys, *argv)
    assert status == 0, err
    first = results_of(out)["streaming_pos_shift"]
    load_tokens = data.load_tokens

    def flipped(tokenizer, *args, **kwargs):  # a BOS where the tokenizer puts none by default, none where it does
        return load_tokens(tokenizer, *args, **{**kwargs, "add_bos": not data._prefix_ids(tokenizer, None)})

    monkeypatch.setattr(data, "load_tokens", flipped)
    status, _, err = run_main(capsys, *argv)
    assert_one_line_error(status, err, f"{first['json_path']} was scored on another token stream of the same text")
    assert "--force" in err
    status, out, err = run_main(capsys, *argv, "--force")
    assert status == 0, err
    other = results_of(out)["streaming_pos_shift"]
    assert not other["skipped"] and other["tokens_fingerprint"] != first["tokens_fingerprint"]
    monkeypatch.setattr(data, "load_tokens", load_tokens)
    status, _, err = run_main(capsys, *argv)
    assert_one_line_error(status, err, "was scored on another token stream of the same text")


def test_eval_bos_chooses_whether_the_stream_begins_with_the_bos(model_dir, tmp_path, capsys, monkeypatch):
    """--bos no scores the text without the BOS the tokenizer puts first by default (the embedded GGUF tokenizer
    does, though its file says not to); --bos yes and no name their results apart from the default stream's, so
    that neither is refused as another stream of the default one's results, nor reused for it."""
    from streaming_llm import loading
    from streaming_llm.data import load_tokens
    from streaming_llm.eval.results import tokens_fingerprint

    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "streaming_pos_shift", "--output-dir", str(tmp_path)]
    runs = {}
    for bos in ("auto", "no", "yes"):
        status, out, err = run_main(capsys, *argv, *([] if bos == "auto" else ["--bos", bos]))
        assert status == 0, err
        runs[bos] = results_of(out)["streaming_pos_shift"]
        assert not runs[bos]["skipped"]
    _, tokenizer = loading.load_model(str(model_dir))
    assert load_tokens(tokenizer, None, 120)[0, 0] == tokenizer.bos_token_id  # the default stream begins with it
    for bos, add_bos in (("no", False), ("yes", True), ("auto", None)):
        assert runs[bos]["tokens_fingerprint"] == tokens_fingerprint(load_tokens(tokenizer, None, 120, add_bos=add_bos))
    names = {bos: Path(run["json_path"]).name for bos, run in runs.items()}
    label = names["auto"].split("__")[1]
    assert names["no"] == names["auto"].replace(label, f"{label}-nobos")
    assert names["yes"] == names["auto"].replace(label, f"{label}-bos")
    assert runs["no"]["perplexity"] != runs["auto"]["perplexity"]
    status, out, err = run_main(capsys, *argv, "--bos", "no")  # its own result, found again
    assert status == 0 and results_of(out)["streaming_pos_shift"]["skipped"], err

    load_model = loading.load_model

    def without_bos(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        tokenizer.bos_token = None
        return model, tokenizer

    monkeypatch.setattr(loading, "load_model", without_bos)
    status, _, err = run_main(capsys, *argv, "--bos", "yes", "--force")
    assert_one_line_error(status, err, "--bos yes: the tokenizer of tiny_chat_llama has no BOS token")


def test_eval_names_an_unreadable_result_and_offers_force(model_dir, tmp_path, capsys):
    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "dense", "--output-dir", str(tmp_path)]
    status, out, _ = run_main(capsys, *argv)
    json_path = Path(results_of(out)["dense"]["json_path"])
    json_path.write_text("{not json", encoding="utf-8")
    status, _, err = run_main(capsys, *argv)
    assert_one_line_error(status, err, f"{json_path} is not a result file")
    assert "--force" in err
    status, _, _ = run_main(capsys, *argv, "--force")
    assert status == 0 and json.loads(json_path.read_text())["method"] == "dense"


@pytest.mark.parametrize("options, message", [
    (["--methods", "all:100"], "'all' takes no token count"),
    (["--methods", "all,dense"], "'all' stands alone"),
    (["--methods", "dense:100,dense:50"], "names dense twice"),
    (["--methods", "dense:"], "must be an integer >= 2"),
    (["--methods", "window:500"], "window:500 asks for more tokens than --num-tokens 120"),
    (["--methods", "recompute", "--recompute-tokens", "121"], "--recompute-tokens 121 asks for more tokens than"),
    (["--methods", "kvpress_decode_shipped", "--decode-tokens", "500"], "--decode-tokens 500 asks for more tokens than"),
    (["--methods", "dense", "--recompute-samples", "4"], "--recompute-samples applies to the recompute method"),
    # steps 22..118 past the capacity: 97 to sample from (more were quietly dropped: the result said sample97)
    (["--methods", "recompute", "--recompute-samples", "98"], "--recompute-samples 98: the stream has 97 step(s)"),
    # recompute:N samples N's steps 22..58 (the samples were spread over all 120 tokens, past the 60 asked for)
    (["--methods", "recompute:60", "--recompute-samples", "38"], "38: the stream has 37 step(s) to sample from the "
                                                                  "cache capacity 22 to the end of recompute:60"),
    (["--methods", "recompute:60", "--recompute-tokens", "50"], "recompute:60 and --recompute-tokens 50 both cut"),
    (["--methods", " dense : 500 "], "dense:500 asks for more tokens than --num-tokens 120"),  # spaces around ':'
    (["--methods", "dense", "--decode-tokens", "40"], "--decode-tokens applies to the decode-loop methods"),
    (["--methods", "dense", "--plot", "curves.xyz"], "cannot write .xyz figures"),
    (["--methods", "dense", "--output-dir", ""], "--output-dir is empty"),
    # common options eval does not use: accepted and ignored (each method names its modes)
    (["--methods", "dense", "--position-mode", "absolute"], "eval does not use --position-mode: each method names its "
                                                             "positions (streaming_pos_shift, streaming_rerotate"),
    (["--methods", "mit", "--streaming-mode", "ours"], "eval does not use --streaming-mode: each method names its cache"),
])
def test_eval_refuses_options_it_would_ignore_before_loading_the_model(tmp_path, capsys, options, message):
    """Each of these was accepted and silently dropped or clipped (or failed only after the scoring): now one line,
    before the model is loaded (the model path does not even exist)."""
    argv = ["eval", "--model", str(tmp_path / "no-such-model"), *STREAM, "--output-dir", str(tmp_path / "out"), *options]
    status, _, err = run_main(capsys, *argv)
    assert_one_line_error(status, err, message)


def test_eval_refuses_more_tokens_than_the_text_can_hold_before_loading_the_model(tmp_path, capsys):
    """It was found only after the model was loaded and the text tokenized (~45 s for the embedded ones)."""
    text = tmp_path / "short.txt"
    text.write_text("Now is the winter of our discontent\n" * 2, encoding="utf-8")  # 72 bytes
    argv = ["eval", "--model", str(tmp_path / "no-such-model"), *STREAM, "--data", str(text),
            "--output-dir", str(tmp_path / "out")]
    status, _, err = run_main(capsys, *argv)
    assert_one_line_error(status, err, "--num-tokens 120: the text holds 72 bytes, and a token takes at least one")


def test_eval_names_num_tokens_when_the_text_has_fewer_tokens(model_dir, tmp_path, capsys):
    """A text of enough bytes but fewer tokens than --num-tokens was refused as "num_tokens=120, but the text has only
    21 tokens", the library's parameter, not the option the user typed."""
    text = tmp_path / "few.txt"
    text.write_text(" lighthouse" * 20, encoding="utf-8")  # 220 bytes, one token a word
    argv = ["eval", "--model", str(model_dir), *STREAM, "--data", str(text), "--output-dir", str(tmp_path / "out")]
    status, _, err = run_main(capsys, *argv)
    assert_one_line_error(status, err, "--num-tokens 120: the text has only ")
    assert not (tmp_path / "out").exists()


def test_eval_reads_a_text_from_a_pipe(model_dir, tmp_path, capsys):
    """`--data <(cmd)` (a pipe, read once) was read again to tokenize it, after the model was loaded, and refused as
    "the text is empty". Then its results were named after the pipe (`pipe:[191677]`, another each run), so a
    finished configuration was scored again and a checkpoint never resumed: a pipe is named by its text, as stdin."""
    import os

    text = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 40
    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "dense", "--output-dir", str(tmp_path)]
    results = []
    for _ in range(2):
        read_end, write_end = os.pipe()
        os.write(write_end, text.encode("utf-8"))  # ~3 KB: fits the pipe's buffer
        os.close(write_end)
        try:
            status, out, err = run_main(capsys, *argv, "--data", f"/dev/fd/{read_end}")
        finally:
            os.close(read_end)
        assert status == 0, err
        results.append(results_of(out)["dense"])
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert results[0]["data"] == {"name": "pipe", "kind": "pipe", "num_chars": len(text), "sha256": sha}
    assert Path(results[0]["json_path"]).name.startswith(f"tiny_chat_llama__pipe-{sha[:8]}__T120__")
    assert results[1]["json_path"] == results[0]["json_path"] and results[1]["skipped"] and not results[0]["skipped"]


def test_a_text_file_with_a_long_name_gives_results_whose_names_fit(model_dir, tmp_path, capsys):
    """A --data file whose name is long (200 bytes; a file name may have 255) made result names past the 255 bytes a
    file name may have: each method was scored, then its result could not be written ("File name too long", exit
    status 2, the work lost). A long model or text name is shortened in result names, with a hash of it kept."""
    text = tmp_path / ("a-tale-of-" + "very-" * 38 + "long-names.txt")
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York.\n" * 40, encoding="utf-8")
    assert len(text.name) == 214
    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "dense,streaming_pos_shift",
            "--data", str(text), "--output-dir", str(tmp_path / "out")]
    status, out, err = run_main(capsys, *argv)
    assert status == 0, err
    paths = [Path(result["json_path"]) for result in results_of(out).values()]
    assert len(set(paths)) == 2 and all(path.is_file() and len(path.name) <= 200 for path in paths)
    assert all(path.name.startswith("tiny_chat_llama__a-tale-of-very-very-") for path in paths)
    status, out, _ = run_main(capsys, *argv)  # the same configuration finds its results again
    assert status == 0 and all(result["skipped"] for result in results_of(out).values())


def test_eval_reads_standard_input_for_data_dash(model_dir, tmp_path, capsys, monkeypatch):
    """`--data -` was taken for a dataset named "-" ("dataset '-' could not be loaded"): it is standard input, read
    once (as a pipe is), and the result names it."""
    import io
    import sys

    text = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 40
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8"))))
    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "dense", "--output-dir", str(tmp_path)]
    status, out, err = run_main(capsys, *argv, "--data", "-")
    assert status == 0, err
    data = results_of(out)["dense"]["data"]
    assert data["kind"] == "stdin" and data["sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_a_leading_tilde_in_output_paths_is_the_home_folder(model_dir, tmp_path, capsys, monkeypatch):
    """`--output-dir=~/runs` (no shell expands ~ there) wrote to a folder named "~" in the working directory, and
    `--plot=~/c.png` / `plot -o=~/c.png` checked ~/c.png but wrote ./~/c.png; --data and --model expand ~."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "dense", "--output-dir", "~/runs", "--plot", "~/c.png"]
    status, out, err = run_main(capsys, *argv)
    assert status == 0, err
    assert Path(results_of(out)["dense"]["json_path"]).parent == home / "runs"
    assert (home / "c.png").is_file()
    status, out, err = run_main(capsys, "plot", "~/runs", "-o", "~/p.pdf")
    assert status == 0, err
    assert (home / "p.pdf").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("refused", [["--model", "no-such-model"], ["--data", "no-such-text.txt"]])
def test_a_refused_eval_leaves_no_folder_behind(model_dir, tmp_path, capsys, monkeypatch, refused):
    """--output-dir (and --plot's folder) were created when checked, before --data and --model were read, so a run
    refused then (exit 2) left empty new folders behind; a folder that was there is left as it was."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old").mkdir()
    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "dense", "--plot", "figs/c.png"]
    for output_dir in ("runs/new", "old"):
        status, _, err = run_main(capsys, *argv, "--output-dir", output_dir, *refused)
        assert_one_line_error(status, err, "no-such-")
        assert sorted(path.name for path in tmp_path.iterdir()) == ["old"] and not any((tmp_path / "old").iterdir())


def test_eval_checks_the_output_folder_and_the_capacity_before_scoring(model_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "dense,streaming_pos_shift"]
    status, _, err = run_main(capsys, *argv, "--output-dir", str(afile))
    assert_one_line_error(status, err, f"--output-dir {afile} is not a folder")
    # A capacity beyond the model's positions was found when streaming_pos_shift started, after dense was scored.
    status, _, err = run_main(capsys, *argv, "--window-size", "5000", "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(status, err, "too large for the model's max_position_embeddings")
    assert not list((tmp_path / "out").glob("*.json"))
    # Only the methods that hold n_sink + window_size tokens need them to fit: dense alone runs.
    status, _, err = run_main(capsys, *argv[:-1], "window", "--window-size", "5000", "--output-dir", str(tmp_path / "w"))
    assert_one_line_error(status, err, "too large for the model's max_position_embeddings")
    status, out, err = run_main(capsys, *argv[:-1], "dense", "--window-size", "5000", "--output-dir", str(tmp_path / "d"))
    assert status == 0, err
    assert list(results_of(out)) == ["dense"]


def test_recompute_sampled_and_on_a_prefix(model_dir, tmp_path, capsys, monkeypatch):
    """--recompute-samples scores recompute at sampled steps of the whole stream; with --recompute-tokens as well, it
    is also run on that prefix (two results); --recompute-tokens alone cuts recompute only. On a terminal each result
    is reported as it is written."""
    from streaming_llm import cli_common

    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "dense,recompute", "--output-dir", str(tmp_path)]
    status, out, _ = run_main(capsys, *argv, "--recompute-samples", "3", "--recompute-tokens", "50")
    runs = json.loads(out)["results"]
    assert status == 0 and [(r["method"], r["evaluator"], r["num_tokens"]) for r in runs] == [
        ("dense", "block32", 120), ("recompute", "sample3", 120), ("recompute", "recompute32", 50)]
    status, out, _ = run_main(capsys, *argv, "--recompute-samples", "3")
    assert [(r["method"], r["evaluator"]) for r in json.loads(out)["results"]] == [("dense", "block32"), ("recompute", "sample3")]
    argv[argv.index("dense,recompute")] = "dense,recompute:80"  # the samples fall in recompute's 80 tokens
    status, out, _ = run_main(capsys, *argv, "--recompute-samples", "3")
    runs = json.loads(out)["results"]
    assert [(r["method"], r["evaluator"], r["num_tokens"]) for r in runs] == [
        ("dense", "block32", 120), ("recompute", "sample3", 80)]
    steps = json.loads(Path(runs[1]["json_path"]).read_text())["extra"]["sampled_steps"]
    assert len(steps) == 3 and 22 <= min(steps) and max(steps) < 80
    argv[argv.index("dense,recompute:80")] = "dense,recompute"
    monkeypatch.setattr(cli_common, "show_progress", lambda args: True)
    status, out, err = run_main(capsys, *argv, "--recompute-samples", "3", "--recompute-tokens", "60",
                                "--plot", str(tmp_path / "c.png"))
    runs = json.loads(out)["results"]
    assert f"plot: {tmp_path / 'c.png'}" in err.splitlines()
    assert [(r["method"], r["num_tokens"]) for r in runs] == [("dense", 120), ("recompute", 120), ("recompute", 60)]
    reported = [line for line in err.splitlines() if ": ppl " in line]
    assert [line.split(" -> ")[1] for line in reported] == [r["json_path"] for r in runs]
    assert "[skipped (exists)]" in reported[0] and "[skipped (exists)]" in reported[1] and "skipped" not in reported[2]


def test_method_lists_and_option_bounds_at_their_edges():
    """The smallest accepted values are accepted: NAME:2, NAME:N at --num-tokens, 'all' alone, a bound itself."""
    import argparse

    from streaming_llm.eval.command import _model_name, _positive, check_method_options, parse_methods
    from streaming_llm.loading import EMBEDDED_MODEL

    methods, prefixes = parse_methods("dense:2, window:120")
    assert [m.name for m in methods] == ["dense", "window"] and prefixes == {"dense": 2, "window": 120}
    with pytest.raises(ValueError, match="must be an integer >= 2"):
        parse_methods("dense:1")
    assert len(parse_methods("all")[0]) > 5
    options = argparse.Namespace(num_tokens=120, recompute_samples=None, recompute_tokens=None, decode_tokens=None)
    check_method_options(options, methods, prefixes)
    # --recompute-tokens and --decode-tokens at --num-tokens; as many samples as steps 22..118 past the capacity 22
    methods, prefixes = parse_methods("recompute,kvpress_decode_shipped")
    options = argparse.Namespace(num_tokens=120, recompute_samples=97, recompute_tokens=120, decode_tokens=120,
                                 n_sink=2, window_size=20)
    check_method_options(options, methods, prefixes)
    _positive("num-tokens", 2, 2)
    with pytest.raises(ValueError, match="--num-tokens must be >= 2, got 1"):
        _positive("num-tokens", 1, 2)
    assert _model_name(None) == EMBEDDED_MODEL
    assert _model_name("/models/tiny.gguf") == "tiny" and _model_name("org/name") == "name"


@pytest.mark.parametrize("option", [["--model", "embedded"], ["--n-sink", "2"], ["--window-size", "60"],
                                    ["--position-mode", "rerotate"], ["--streaming-mode", "mit"], ["--device", "cpu"],
                                    ["--dtype", "bfloat16"], ["--threads", "1"]])
def test_plot_refuses_the_common_options_it_does_not_use(tmp_path, capsys, option):
    """plot took every common option (--window-size 60, --dtype bfloat16, ...) and ignored it: the figure drew what the
    results hold whatever was asked. Each is refused in one line, nothing is written, and plot's help lists none."""
    status, _, err = run_main(capsys, "plot", str(tmp_path), "-o", str(tmp_path / "c.png"), *option)
    assert_one_line_error(status, err, f"plot does not use {option[0]}: the results it draws say what they were run with")
    assert list(tmp_path.iterdir()) == []
    _, help_text, _ = run_main(capsys, "plot", "--help")
    assert "--smooth" in help_text and "--json" in help_text and option[0] not in help_text


def test_plot_names_the_file_it_cannot_read_and_writes_the_format_asked(model_dir, tmp_path, capsys):
    argv = ["eval", "--model", str(model_dir), *STREAM, "--methods", "dense,window", "--output-dir", str(tmp_path)]
    assert run_main(capsys, *argv)[0] == 0
    status, out, _ = run_main(capsys, "plot", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "curves.pdf"), "--json")
    assert status == 0 and json.loads(out)["figure"] == str(tmp_path / "curves.pdf")
    assert (tmp_path / "curves.pdf").read_bytes()[:4] == b"%PDF"
    for name, text, message in [("list.json", "[1, 2]", "is not a result file of streaming-llm eval"),
                                ("partial.json", '{"method": "dense"}', "is not a result file of streaming-llm eval (no model, data, num_tokens"),
                                ("broken.json", "{'a': 1}", "is not a result file: not valid JSON")]:
        bad = tmp_path / "bad" / name  # these were AttributeError / KeyError tracebacks, or an error naming no file
        bad.parent.mkdir(exist_ok=True)
        bad.write_text(text)
        status, _, err = run_main(capsys, "plot", str(bad))
        assert_one_line_error(status, err, f"{bad} {message}")
        bad.unlink()


def test_sigterm_while_a_result_is_written_ends_the_command_with_no_file_left(model_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM (`kill`, a job scheduler's stop) killed the command where it stood: a result being written left its
    hidden `.<name>.<pid>.tmp` beside the results for good. It now ends the command as SystemExit, exit status 143
    (128 + 15), after the write's own cleanup, and the handler before it is put back."""
    import os
    import signal

    fsync, calls = os.fsync, []

    def terminated_during_write(fd):
        calls.append(fd)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", terminated_during_write)
    with stray_sigterm_handler():
        status, out, _ = run_main(capsys, "eval", "--model", str(model_dir), *STREAM, "--methods", "dense",
                                  "--output-dir", str(tmp_path))
    assert (status, out, len(calls)) == (143, "", 1)
    assert [path.name for path in tmp_path.rglob("*") if path.is_file()] == []


@pytest.mark.parametrize("argv", [["eval", *STREAM, "--methods", "dense"], ["bench", "--methods", "dense_static"]])
def test_an_abbreviated_option_is_refused_not_taken_for_a_longer_one(model_dir, tmp_path, capsys, monkeypatch, argv):
    """argparse took any unambiguous prefix for the whole option: `eval --output x.json` (chat's and plot's --output is
    a file) was eval's --output-dir, and the results went into a new folder named x.json. Options are now whole names
    only, in every subcommand and experiment script; the CLI names the options an unknown one begins."""
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(capsys, *argv, "--model", str(model_dir), "--output", "x.json")
    assert_one_line_error(status, err, f"unrecognized arguments: --output x.json; did you mean --output-dir? "
                                       f"(see streaming-llm {argv[0]} --help)")
    assert list(tmp_path.iterdir()) == []
    script = load_script("eval_kvpress")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--output", "x"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --output x" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
