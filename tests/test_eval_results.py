"""Result files: deterministic names, atomic writes, skip on re-run, nothing left by an interrupted run, plots."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch

from streaming_llm.eval.command import format_table, register, run_plot
from streaming_llm.eval.harness import run_method
from streaming_llm.eval.methods import METHODS
from streaming_llm.eval.plots import moving_average
from streaming_llm.eval.results import list_results, read_result, result_stem, write_result
from tiny_models import VOCAB_SIZE, random_ids

DATA = {"name": "random", "kind": "test", "sha256": "0123456789abcdef"}


def _run(model, tmp_path, method_name="streaming_pos_shift", force=False, on_block=None, num_tokens=30):
    return run_method(
        METHODS[method_name],
        copy.deepcopy(model),
        random_ids(num_tokens, seed=7)[None],
        model_name="tiny-llama",
        data=DATA,
        n_sink=2,
        window_size=8,
        block_size=8,
        output_dir=tmp_path,
        force=force,
        on_block=on_block,
    )


def test_result_json_and_nlls_are_written(llama_model, tmp_path):
    run = _run(llama_model, tmp_path)
    assert not run.skipped
    assert run.json_path.name == "tiny-llama__random-01234567__T30__s2_w8__streaming_pos_shift__block8.json"
    record, nlls = read_result(run.json_path)
    assert nlls.shape == (29,) and nlls.dtype == np.float32
    assert record["perplexity"] == pytest.approx(float(np.exp(nlls.astype(np.float64).mean())), rel=1e-6)
    for key in ("model", "data", "num_tokens", "n_sink", "window_size", "method", "evaluator", "block_size",
                "perplexity", "tokens_per_s", "wall_s", "peak_memory_mib", "versions", "git_commit", "device"):
        assert key in record, key
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    assert record["peak_memory_mib"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [run.json_path.name, run.json_path.name[:-5] + ".nlls.npy"]


def test_rerun_is_skipped_unless_forced(llama_model, tmp_path):
    first = _run(llama_model, tmp_path)
    again = _run(llama_model, tmp_path)
    assert again.skipped and again.record == json.loads(first.json_path.read_text())
    forced = _run(llama_model, tmp_path, force=True)
    assert not forced.skipped and forced.record["finished_at"] >= first.record["finished_at"]


def test_interrupted_run_leaves_no_results_file(llama_model, tmp_path):
    def interrupt(end, nlls):
        if end >= 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(llama_model, tmp_path, on_block=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_write_result_failure_leaves_no_file(tmp_path):
    """A record that cannot be serialised fails before the JSON exists; no temporary file stays behind."""
    with pytest.raises(TypeError):
        write_result(tmp_path, "stem", {"bad": object()}, torch.zeros(3))
    assert not (tmp_path / "stem.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_run_in_another_dtype_is_not_taken_for_the_float32_one(llama_model, tmp_path):
    """Same model, text and method in bfloat16: its own result (and checkpoint), not the float32 run skipped."""
    float32 = _run(llama_model, tmp_path)
    bfloat16 = run_method(METHODS["streaming_pos_shift"], copy.deepcopy(llama_model).to(torch.bfloat16),
                          random_ids(30, seed=7)[None], model_name="tiny-llama", data=DATA, n_sink=2, window_size=8,
                          block_size=8, output_dir=tmp_path, dtype="bfloat16")
    assert not bfloat16.skipped and bfloat16.json_path.name.endswith("__block8__bfloat16.json")
    assert bfloat16.record["dtype"] == "bfloat16" and bfloat16.record["perplexity"] != float32.record["perplexity"]
    assert _run(llama_model, tmp_path).skipped


@pytest.mark.parametrize("dropout", ["attention_dropout", "hidden_dropout"])
def test_a_model_in_training_mode_with_dropout_is_refused(tmp_path, dropout):
    """A model left in train() mode (from a training loop) gave other NLLs on every run: its dropout drew anew. A
    model in training mode without dropout scores as in eval mode."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from streaming_llm.eval.harness import run_recompute_sample

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256, **{dropout: 0.1})
    model = GPTNeoXForCausalLM(config).train()
    module = "gpt_neox.layers.0.attention" if dropout == "attention_dropout" else "gpt_neox.emb_dropout"
    message = f"training mode with dropout \\({module}: 0.1\\).*call model.eval\\(\\)"
    for method in ("dense", "streaming_pos_shift"):
        with pytest.raises(ValueError, match=message):
            _run(model, tmp_path / method, method)
    with pytest.raises(ValueError, match=message):
        run_recompute_sample(model, random_ids(30, seed=7)[None], num_samples=2, model_name="tiny", data=DATA, n_sink=2,
                             window_size=8, output_dir=tmp_path / "recompute")
    assert not any(tmp_path.rglob("*.json"))
    scored = _run(model.eval(), tmp_path / "eval", "dense").record["perplexity"]
    setattr(config, dropout, 0.0)
    for submodule in model.modules():  # the same weights, in training mode, with no dropout to draw
        if isinstance(submodule, torch.nn.Dropout):
            submodule.p = 0.0
        if hasattr(submodule, "attention_dropout"):
            submodule.attention_dropout = 0.0
    assert _run(model.train(), tmp_path / "train", "dense").record["perplexity"] == scored


@pytest.mark.parametrize("rate", [np.float32(0.1), torch.tensor(0.1), torch.nn.Dropout2d(0.1), torch.nn.AlphaDropout(0.1)],
                         ids=["numpy_float32", "tensor", "dropout2d", "alpha_dropout"])
def test_dropout_of_any_type_in_training_mode_is_refused(rate):
    """An attention_dropout held as a numpy float32 or a 0-d tensor (a config set from an array) draws as a float does,
    and every torch dropout module, not only nn.Dropout, draws in training mode: each was taken for no dropout."""
    from streaming_llm.eval.harness import check_no_dropout

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    if isinstance(rate, torch.nn.Module):
        model.append(rate)
    else:
        model[0].attention_dropout = rate
    check_no_dropout(model.eval())
    with pytest.raises(ValueError, match="training mode with dropout"):
        check_no_dropout(model.train())
    for nothing in (0.0, None, torch.tensor(0.0)):
        model[0].attention_dropout = nothing
        if isinstance(rate, torch.nn.Module):
            rate.p = 0.0
        check_no_dropout(model.train())


def test_stem_is_deterministic_and_safe():
    stem = result_stem("my model/v1", DATA, 100, 4, 1020, "dense", "block256")
    assert stem == result_stem("my model/v1", DATA, 100, 4, 1020, "dense", "block256")
    assert "/" not in stem and " " not in stem


def test_plot_file_is_produced(llama_model, tmp_path):
    for name in ("dense", "window", "streaming_pos_shift"):
        _run(llama_model, tmp_path, method_name=name)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    png = tmp_path / "curves.png"
    args = parser.parse_args(["plot", str(tmp_path), "--output", str(png), "--smooth", "4"])
    assert args.handler is run_plot
    assert args.handler(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table([read_result(path)[0] for path in list_results(tmp_path)])
    assert table.count("\n") == 4 and "streaming_pos_shift" in table


def test_plot_of_nothing_is_a_clear_error(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["plot", str(tmp_path)])
    with pytest.raises(ValueError, match="no result JSON"):
        args.handler(args)


def test_moving_average():
    values = np.array([1.0, 3.0, 5.0, 7.0])
    assert moving_average(values, 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert moving_average(values, 1).tolist() == values.tolist()


def test_a_result_without_its_nlls_is_run_again(llama_model, tmp_path):
    """A JSON whose NLL file is gone is no finished result (the table could not show its segments): eval runs it
    again instead of reporting it as skipped."""
    first = _run(llama_model, tmp_path)
    first.json_path.with_name(first.json_path.name[:-5] + ".nlls.npy").unlink()
    again = _run(llama_model, tmp_path)
    assert not again.skipped and read_result(again.json_path)[1].shape == (29,)
    assert again.record["num_predictions"] == 29 and again.record["num_tokens"] == 30


def test_stem_parts_and_hidden_files():
    """Slugs lose separators at their ends; hidden JSON files (macOS's "._x.json" beside a copied result) are no
    results."""
    from streaming_llm.eval.results import slug

    assert slug(" /models/my model/ ") == "models-my-model" and slug("///") == "none"


def test_list_results_skips_hidden_json(tmp_path):
    (tmp_path / "._a.json").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (tmp_path / "b.json").write_text("{}")
    assert [path.name for path in list_results(tmp_path)] == ["b.json"]


def test_fingerprint_tells_weights_apart_and_ignores_where_and_how_a_model_was_loaded(llama_model, tmp_path):
    """The same weights loaded from two folders give the same fingerprint; a change in any parameter's last value gives another. Only a record and a model that both have
    fingerprints can disagree."""
    from transformers import AutoModelForCausalLM

    from streaming_llm.eval.results import check_same_model, model_fingerprint

    copy.deepcopy(llama_model).save_pretrained(tmp_path / "one")  # saving records `architectures` in the config
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "one", dtype=torch.float32)
    first.save_pretrained(tmp_path / "two")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert reloaded.config.name_or_path != first.config.name_or_path
    fingerprint = model_fingerprint(first)
    assert model_fingerprint(reloaded) == fingerprint
    with torch.no_grad():
        parameters = list(reloaded.parameters())
        parameters[-1].view(-1)[-1] += 1.0
        assert model_fingerprint(reloaded) != fingerprint
        parameters[-1].view(-1)[-1] -= 1.0
        largest = max(parameters, key=lambda parameter: parameter.numel())
        assert largest.numel() > 2048
        largest.view(-1)[-1] += 1.0  # past the first 1,024 values of a large parameter
    assert model_fingerprint(reloaded) != fingerprint
    check_same_model({"model": "m"}, fingerprint, "old.json")  # written before fingerprints: taken as it was
    check_same_model({"model": "m", "model_fingerprint": "abc"}, None, "x.json")  # no fingerprint to compare with
    with pytest.raises(ValueError, match="made with another model of the same name"):
        check_same_model({"model": "m", "model_fingerprint": "abc"}, fingerprint, "x.json")


def git(folder, *commands) -> None:
    """Run each git command (a list of arguments) in `folder` as a fixed author, quietly; any failure fails the test."""
    import subprocess

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin"}
    for command in commands:
        subprocess.run(["git", *command], cwd=folder, check=True, env=env, capture_output=True)


def test_git_commit_marks_a_dirty_tree(tmp_path):
    import subprocess

    from streaming_llm.eval.results import git_commit

    assert git_commit(tmp_path) is None  # not a repository
    (tmp_path / "f.txt").write_text("a")
    git(tmp_path, ["init", "-q"], ["add", "f.txt"], ["commit", "-q", "-m", "x"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "f.txt").write_text("b")
    assert git_commit(tmp_path) == head + "+dirty"


def test_git_commit_of_a_package_the_repository_does_not_track_is_none(tmp_path):
    """A wheel installed in a virtual environment inside a user's own repository: that project's HEAD was recorded
    in every result file as this code's commit."""
    from streaming_llm.eval.results import git_commit

    (tmp_path / ".gitignore").write_text(".venv/\n")
    package = tmp_path / ".venv" / "lib" / "site-packages" / "streaming_llm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    git(tmp_path, ["init", "-q"], ["add", ".gitignore"], ["commit", "-q", "-m", "x"])
    assert git_commit(tmp_path) is not None and git_commit(package) is None


def test_checkpoint_rules(tmp_path):
    """A checkpoint is resumed only by the same block size, model and token stream; one written before (tokens)
    fingerprints existed is not taken by a run that has one (it starts afresh); after a resume the next save waits a
    whole interval."""
    from streaming_llm.eval.harness import Checkpoint

    path = tmp_path / "run.checkpoint.npz"
    Checkpoint(path, 8, 16, "f1").maybe_save(16, torch.ones(20))
    assert Checkpoint(path, 4, 16, "f1").load() is None  # another block size
    resumed = Checkpoint(path, 8, 16, "f1")
    assert resumed.load().shape == (16,) and resumed.saved_at == 16
    resumed.maybe_save(24, torch.full((30,), 2.0))  # 8 tokens after the resume point: not yet
    assert Checkpoint(path, 8, 16, "f1").load().shape == (16,)
    np.savez(path, nlls=np.ones(16), block_size=np.int64(8))  # no fingerprint: written before they existed
    assert Checkpoint(path, 8, 16, "f1").load() is None and Checkpoint(path, 8, 16, None).load().shape == (16,)
    # the tokens fingerprint likewise: another stream's checkpoint is refused, one without it is not resumed
    Checkpoint(path, 8, 16, "f1", "t1").maybe_save(16, torch.ones(20))
    assert Checkpoint(path, 8, 16, "f1", "t1").load().shape == (16,)
    with pytest.raises(ValueError, match="was scored on another token stream of the same text"):
        Checkpoint(path, 8, 16, "f1", "t2").load()
    np.savez(path, nlls=np.ones(16), block_size=np.int64(8), fingerprint=np.array("f1"))
    assert Checkpoint(path, 8, 16, "f1", "t1").load() is None and Checkpoint(path, 8, 16, "f1").load().shape == (16,)


def test_recompute_samples_fit_a_stream_shorter_than_the_capacity():
    from streaming_llm.eval.harness import sample_steps

    assert sample_steps(1000, 100, 3) == [100, 549, 998]
    assert sample_steps(10, 20, 3) == [8]  # nothing past the capacity: the last step only


def test_stepper_extra_counts_every_kept_position_and_lists_the_first_16():
    from streaming_llm.eval.harness import _stepper_extra

    class Stepper:
        def kept_positions(self):
            return torch.arange(40).reshape(2, 20)  # [kv_heads, held]: the first head's

    assert _stepper_extra(Stepper()) == {"final_kept_positions_head": list(range(16)), "final_kept_count": 20}


def test_methods_are_taken_once_each_in_the_order_given():
    from streaming_llm.eval.methods import get_methods

    assert [method.name for method in get_methods("mit, dense,mit,dense")] == ["mit", "dense"]


def test_a_long_name_that_fit_keeps_the_result_name_it_had(llama_model, tmp_path):
    """Result names are cut only where they would not fit in a file name: a model or text name of 65 to ~150
    characters made names that fit, and its results (and checkpoints) were found again by a later run; cut at 64
    characters whatever the length, they were no longer found, and every method was scored again."""
    data = {**DATA, "name": "the-complete-works-of-william-shakespeare-in-modern-spelling-first-folio"}
    stem = result_stem("tiny-llama", data, 30, 2, 8, "streaming_pos_shift", "block8")
    assert stem == "tiny-llama__" + data["name"] + "-01234567__T30__s2_w8__streaming_pos_shift__block8"
    run = run_method(METHODS["streaming_pos_shift"], copy.deepcopy(llama_model), random_ids(30, seed=7)[None],
                     model_name="tiny-llama", data=data, n_sink=2, window_size=8, block_size=8, output_dir=tmp_path)
    assert run.json_path.name == stem + ".json"
    long_data = {**DATA, "name": "x" * 200}  # one that would not fit: cut, with a hash of it
    assert len(result_stem("tiny-llama", long_data, 30, 2, 8, "streaming_pos_shift", "block8")) < 150


def test_a_summary_is_named_by_its_model_and_text_only_beside_another_models_or_texts(tmp_path):
    """summary_source: "" in a folder of one model's results on one text (the names summaries always had), the model
    and data label beside another's; a JSON that is no result (or a broken one) names nothing. It was read as a
    result, so run_decode_perplexity.py failed at its summary, after its runs, in a folder holding one."""
    from streaming_llm.eval.results import data_label, result_sources, summary_source

    data = {"name": "text.txt", "kind": "file", "sha256": "0" * 64}
    record = {"model": "tiny", "data": data, "num_tokens": 5, "n_sink": 1, "window_size": 2, "method": "dense",
              "evaluator": "block2", "perplexity": 2.0}
    write_result(tmp_path, "one", record, torch.zeros(4))
    (tmp_path / "notes.json").write_text('{"kind": "something else"}')
    assert summary_source(result_sources(tmp_path), "tiny", data) == ""
    write_result(tmp_path, "two", {**record, "model": "huge"}, torch.zeros(4))
    assert summary_source(result_sources(tmp_path), "tiny", data) == f"__tiny__{data_label(data)}"
