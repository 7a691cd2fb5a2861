"""The comparison table (streaming_llm/eval/report.py) from result files with known NLLs: every number is the
exp(mean NLL) of exactly the steps its column names, or "–" where the run did not score all of them."""

import json
import math
import re

import numpy as np
import pytest
import torch

from streaming_llm.eval.report import markdown_table, segment_label, summary_rows
from streaming_llm.eval.results import write_result


def _result(folder, method, nlls, **extra_fields):
    record = {"model": "m", "data": {"kind": "file"}, "num_tokens": len(nlls) + 1, "n_sink": 1, "window_size": 3,
              "method": method, "evaluator": "decode", "perplexity": float(np.exp(np.mean(nlls))),
              "tokens_per_s": 12.5, "wall_s": 0.5, "peak_memory_mib": 100.0, "extra": {"cpu_s": 1.0}} | extra_fields
    return write_result(folder, method, record, torch.tensor(nlls, dtype=torch.float32))


def test_segments_and_recompute_samples_cover_exactly_their_steps(tmp_path):
    full = _result(tmp_path, "full", [1.0] * 4 + [2.0] * 4)  # 8 steps: two whole segments
    short = _result(tmp_path, "short", [0.5] * 6)  # 6 steps: the second segment is not all scored
    broken = _result(tmp_path, "broken", [0.25] * 4 + [float("inf")] + [0.25] * 3)
    no_nlls = _result(tmp_path, "no_nlls", [1.0] * 8)
    no_nlls.with_name("no_nlls.nlls.npy").unlink()  # a result whose companion file went missing
    rows = summary_rows([full, short, broken, no_nlls], boundaries=[0, 4, 8], sample_steps=[1, 5])
    first, second = segment_label(0, 4), segment_label(4, 8)
    assert (first, second) == ("tokens 1–4", "tokens 5–8")
    by_method = {row["method"]: row for row in rows}
    assert by_method["full"]["segments"] == {first: pytest.approx(math.e), second: pytest.approx(math.e**2)}
    assert by_method["full"]["ppl_at_recompute_samples"] == pytest.approx(math.exp(1.5))
    assert by_method["short"]["segments"] == {first: pytest.approx(math.exp(0.5)), second: None}
    assert by_method["short"]["ppl_at_recompute_samples"] == pytest.approx(math.exp(0.5))
    assert by_method["broken"]["segments"] == {first: pytest.approx(math.exp(0.25)), second: None}
    assert by_method["broken"]["ppl_at_recompute_samples"] == pytest.approx(math.exp(0.25))
    assert by_method["no_nlls"]["segments"] == {first: None, second: None}
    assert by_method["no_nlls"]["ppl_at_recompute_samples"] is None
    assert by_method["no_nlls"]["perplexity"] == pytest.approx(math.e)  # the record's own number stays
    assert by_method["full"]["cpu_s"] == 1.0 and by_method["full"]["file"] == "full.json"
    assert summary_rows([short], boundaries=[0, 4, 8], sample_steps=[1, 6])[0]["ppl_at_recompute_samples"] is None
    assert summary_rows([broken], boundaries=[0, 4, 8], sample_steps=[1, 4])[0]["ppl_at_recompute_samples"] is None

    table = markdown_table(rows).splitlines()
    assert table[0] == ("| method | evaluator | tokens | perplexity | tokens 1–4 | tokens 5–8 | at recompute samples | "
                        "tokens/s | CPU s | peak MiB |")
    assert table[2] == "| full | decode | 9 | 4.48 | 2.72 | 7.39 | 4.48 | 12.5 | 1 | 100 |"
    assert table[3] == "| short | decode | 7 | 1.65 | 1.65 | – | 1.65 | 12.5 | 1 | 100 |"


@pytest.mark.parametrize(("change", "message"), [
    ({"tokens_per_s": "fast"}, '(tokens_per_s is "fast", not a number)'),  # ValueError: unknown format code 'f'
    ({"peak_memory_mib": [1]}, "(peak_memory_mib is [1], not a number)"),
    ({"extra": {"cpu_s": "1"}}, '(extra.cpu_s is "1", not a number)'),
    ({"extra": []}, "(extra is [], not an object)"),  # AttributeError: 'list' object has no attribute 'get'
    ({"extra": {"sampled_steps": [1, 99]}}, "(extra.sampled_steps is [1, 99], not a list of steps below 8)"),
    ({"evaluator": None}, "(evaluator is null, not a name)"),
    ({"window_size": 0}, "(window_size is 0, not a cache size)"),
    ({"data": "shakespeare"}, '(data is "shakespeare", not a data description)'),
    ({"model": ""}, '(model is "", not a name)'),
    ({"n_sink": -1}, "(n_sink is -1, not a cache size)"),
    ({"num_tokens": 9.0}, "(num_tokens is 9.0, not a token count)"),
    ({"num_predictions": -1}, "(num_predictions is -1, not a count)"),
    ({"wall_s": "1s"}, '(wall_s is "1s", not a number)'),
    ({"extra": {"sampled_steps": [8]}}, "(extra.sampled_steps is [8], not a list of steps below 8)"),
    ({"extra": {"sampled_steps": [-1]}}, "(extra.sampled_steps is [-1], not a list of steps below 8)"),
    ({"extra": {"sampled_steps": [1.5]}}, "(extra.sampled_steps is [1.5], not a list of steps below 8)"),
    ({"extra": {"sampled_steps": 3}}, "(extra.sampled_steps is 3, not a list of steps below 8)"),
    ({"tokens_fingerprint": "0123"}, '(tokens_fingerprint is "0123", not 16 hex digits)'),
    ({"tokens_fingerprint": 12345678901234567}, "(tokens_fingerprint is 12345678901234567, not 16 hex digits)"),
    ({"tokens_fingerprint": "0123456789ABCDEF"}, '(tokens_fingerprint is "0123456789ABCDEF", not 16 hex digits)'),
    ({"model_fingerprint": "00ff"}, '(model_fingerprint is "00ff", not 16 hex digits)'),
    ({"model_fingerprint": ["0123456789abcdef"]}, '(model_fingerprint is ["0123456789abcdef"], not 16 hex digits)'),
    ({"tokens_prefix_fingerprints": {"9": "0123456789abcdef"}},
     '(tokens_prefix_fingerprints is {"9": "0123456789abcdef"}, not fingerprints (16 hex digits) of prefixes shorter '
     'than the 9 tokens)'),
    ({"tokens_prefix_fingerprints": {"x": "0123456789abcdef"}},
     '(tokens_prefix_fingerprints is {"x": "0123456789abcdef"}, not fingerprints (16 hex digits) of prefixes shorter '
     'than the 9 tokens)'),
    ({"tokens_prefix_fingerprints": {"0": "0123456789abcdef"}},
     '(tokens_prefix_fingerprints is {"0": "0123456789abcdef"}, not fingerprints (16 hex digits) of prefixes shorter '
     'than the 9 tokens)'),
    ({"tokens_prefix_fingerprints": {"4": "0123"}},
     '(tokens_prefix_fingerprints is {"4": "0123"}, not fingerprints (16 hex digits) of prefixes shorter than the 9 '
     'tokens)'),
    ({"tokens_prefix_fingerprints": ["0123456789abcdef"]},
     '(tokens_prefix_fingerprints is ["0123456789abcdef"], not fingerprints (16 hex digits) of prefixes shorter than '
     'the 9 tokens)'),
])
def test_a_malformed_result_is_named_with_its_field(tmp_path, change, message):
    """A hand-edited result is refused naming the file and the field, before any row is made (these were
    tracebacks from the table's formatting or the summary script's lookups)."""
    path = _result(tmp_path, "full", [1.0] * 8, **change)
    with pytest.raises(ValueError) as error:
        summary_rows([path], boundaries=[0, 4, 8], sample_steps=[1, 5])
    assert str(error.value) == f"{path}: not a result file {message}"


def test_a_malformed_result_without_its_nll_file_is_still_named(tmp_path):
    """The fields are checked whether or not the companion NLL file is there: a hand-edited record whose NLLs went
    missing is refused naming the file and the field, not formatted into a row."""
    path = _result(tmp_path, "full", [1.0] * 8, tokens_per_s="fast")
    path.with_name("full.nlls.npy").unlink()
    with pytest.raises(ValueError) as error:
        summary_rows([path], boundaries=[0, 8])
    assert str(error.value) == f'{path}: not a result file (tokens_per_s is "fast", not a number)'


def test_a_bad_nll_file_is_named_by_the_records_nlls_file(tmp_path):
    """The NLL file a record names in nlls_file (not the default name next to the JSON) is the one read and the one
    the refusal names."""
    path = _result(tmp_path, "full", [1.0] * 8)
    record = json.loads(path.read_text()) | {"nlls_file": "renamed.npy"}
    path.write_text(json.dumps(record))
    np.save(tmp_path / "renamed.npy", np.ones(5), allow_pickle=False)
    with pytest.raises(ValueError) as error:
        summary_rows([path], boundaries=[0, 8])
    assert str(error.value) == f"{path}: not a result file (NLLs in renamed.npy: 5 values, the record's 9 tokens make 8 predictions)"


def test_the_smallest_well_formed_results_are_read(tmp_path):
    """The bounds themselves are accepted: num_tokens 0 without num_predictions (0 predictions, not -1), n_sink 0,
    window_size 1, a sampled step at the last prediction, and null for the optional numbers."""
    from streaming_llm.eval.results import read_result

    path = _result(tmp_path, "empty", [1.0])
    path.with_name("empty.nlls.npy").unlink()
    record = json.loads(path.read_text()) | {"num_tokens": 0, "n_sink": 0, "window_size": 1}
    record.pop("num_predictions", None)
    path.write_text(json.dumps(record))
    assert read_result(path) == (record, None)
    path = _result(tmp_path, "full", [1.0] * 8, extra={"sampled_steps": [0, 7], "cpu_s": None}, perplexity=None,
                   tokens_per_s=None, wall_s=None, peak_memory_mib=None, tokens_fingerprint=None)
    assert read_result(path)[0]["extra"] == {"sampled_steps": [0, 7], "cpu_s": None}
    path = _result(tmp_path, "printed", [1.0] * 8, tokens_fingerprint="0123456789abcdef")
    assert read_result(path)[0]["tokens_fingerprint"] == "0123456789abcdef"


def test_a_result_with_no_predictions_has_no_sampled_steps(tmp_path):
    """A stream of one token makes no predictions, so no step of it can have been sampled: step 0 there is refused
    (it was accepted, as if the stream had one prediction)."""
    from streaming_llm.eval.results import read_result

    path = _result(tmp_path, "one", [1.0])
    path.with_name("one.nlls.npy").unlink()
    record = json.loads(path.read_text()) | {"num_tokens": 1, "num_predictions": 0, "extra": {"sampled_steps": [0]}}
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError) as error:
        read_result(path)
    assert str(error.value) == f"{path}: not a result file (extra.sampled_steps is [0], not a list of steps below 0)"
    path.write_text(json.dumps(record | {"extra": {"sampled_steps": []}}))
    assert read_result(path)[0]["extra"] == {"sampled_steps": []}


def test_a_result_without_speed_fields_gets_dashes(tmp_path):
    """tokens_per_s and wall_s are not among the fields every result must hold: a record without them is a row
    with "–" there (it was a KeyError)."""
    path = _result(tmp_path, "full", [1.0] * 8)
    record = json.loads(path.read_text())
    del record["tokens_per_s"], record["wall_s"]
    path.write_text(json.dumps(record))
    (row,) = summary_rows([path], boundaries=[0, 8])
    assert row["tokens_per_s"] is None and row["wall_s"] is None
    assert markdown_table([row]).splitlines()[2] == "| full | decode | 9 | 2.72 | 2.72 | – | – | 1 | 100 |"


def _stream_result(folder, name, ids, model="m", **extra_fields):
    """A result on the stream `ids` (its tokens fingerprints as eval writes them), every NLL 1."""
    from streaming_llm.eval.results import tokens_fingerprint, tokens_prefix_fingerprints

    return _result(folder, name, [1.0] * (ids.numel() - 1), model=model, data={"kind": "file", "name": "t.txt"},
                   tokens_fingerprint=tokens_fingerprint(ids), tokens_prefix_fingerprints=tokens_prefix_fingerprints(ids),
                   **extra_fields)


def test_results_of_one_text_scored_on_different_token_streams_are_not_compared(tmp_path):
    """The same text with a BOS put first or not (or another tokenizer) is another stream of ids: a table or a figure
    put its results beside the other stream's as if token t were the same token in both. They are refused, naming
    both files; results on prefixes of one stream (a method on its first N tokens), of another model, or written
    before tokens fingerprints existed are compared as before."""
    from streaming_llm.eval.plots import plot_nll_curves
    from streaming_llm.eval.results import tokens_fingerprint, tokens_prefix_fingerprints

    ids = torch.arange(3, 123)
    with_bos = torch.cat([torch.tensor([1]), ids[:-1]])
    whole = _stream_result(tmp_path, "whole", ids)
    prefix = _stream_result(tmp_path, "prefix", ids[:40])  # compared on its first 32 tokens
    power = _stream_result(tmp_path, "power", ids[:64])  # compared on all of its 64 tokens
    same = _stream_result(tmp_path, "same", ids)
    assert [row["file"] for row in summary_rows([whole, prefix, power, same], [0, 8])] == [
        "whole.json", "prefix.json", "power.json", "same.json"]
    assert tokens_prefix_fingerprints(ids) == {str(n): tokens_fingerprint(ids[:n]) for n in (16, 32, 64)}

    for name, stream, length in (("bos", with_bos, 120), ("bos_prefix", with_bos[:40], 32), ("bos_power", with_bos[:64], 64)):
        other = _stream_result(tmp_path, name, stream)
        for table in ([whole, other], [other, whole]):
            message = (f"{table[0]} and {table[1]} were scored on different token streams of m on t (the first "
                       f"{length} tokens: fingerprints ")
            with pytest.raises(ValueError, match=re.escape(message) + r".*BOS added or not\) and cannot be compared; "
                               r"score the older again \(streaming-llm eval --force\), or keep each stream's results "
                               r"in its own --output-dir"):
                summary_rows(table, [0, 8])
        with pytest.raises(ValueError, match="were scored on different token streams of m on t"):
            plot_nll_curves([whole, other], tmp_path / "curves.png")
    # only the 16th token differs: compared on the first 32 tokens, the shorter result's longest fingerprinted prefix
    late = ids.clone()
    late[15] = 0
    with pytest.raises(ValueError, match="the first 32 tokens"):
        summary_rows([whole, _stream_result(tmp_path, "late", late[:40])], [0, 8])

    bos = tmp_path / "bos.json"
    other_model = _stream_result(tmp_path, "other_model", with_bos, model="m2")
    old = json.loads(bos.read_text())
    for key in ("tokens_fingerprint", "tokens_prefix_fingerprints"):
        old.pop(key)
    (tmp_path / "old.json").write_text(json.dumps(old | {"nlls_file": "bos.nlls.npy"}))
    assert len(summary_rows([whole, other_model, tmp_path / "old.json"], [0, 8])) == 3
    assert plot_nll_curves([whole, other_model, tmp_path / "old.json"], tmp_path / "curves.png").is_file()


def test_results_of_two_models_of_one_name_are_not_compared(tmp_path):
    """Two folders named alike (or a model fine-tuned in place) give results of the same model name whose model
    fingerprints differ: a table or a figure would show them as rows of one model. They are refused, naming both
    files; results of the same model, of another name, or written before model fingerprints existed are compared as
    before."""
    from streaming_llm.eval.plots import plot_nll_curves

    first = _result(tmp_path, "first", [1.0] * 8, model_fingerprint="0123456789abcdef")
    again = _result(tmp_path, "again", [1.0] * 8, model_fingerprint="0123456789abcdef")
    renamed = _result(tmp_path, "renamed", [1.0] * 8, model="m2", model_fingerprint="fedcba9876543210")
    old = _result(tmp_path, "old", [1.0] * 8)
    assert len(summary_rows([first, again, renamed, old], [0, 8])) == 4
    twin = _result(tmp_path, "twin", [1.0] * 8, model_fingerprint="fedcba9876543210")
    message = (f"{first} and {twin} were made with different models of the same name, m (fingerprints "
               "0123456789abcdef and fedcba9876543210) and cannot be compared; keep each model's results in its own "
               "--output-dir")
    with pytest.raises(ValueError, match=re.escape(message)):
        summary_rows([first, old, twin], [0, 8])
    with pytest.raises(ValueError, match="were made with different models of the same name"):
        plot_nll_curves([first, twin], tmp_path / "curves.png")



def test_results_of_one_model_in_two_dtypes_are_compared(tmp_path, monkeypatch):
    """eval writes a bfloat16 run next to the float32 ones (…__bfloat16); the weights' dtype is part of the model
    fingerprint, so the two fingerprints differ. `streaming-llm plot` of that folder stopped with "made with different
    models of the same name"; the results are compared, and the figure names the dtype of the non-float32 curves.
    Two fingerprints in one dtype are still refused."""
    import matplotlib.axes

    from streaming_llm.eval.plots import plot_nll_curves

    single = _result(tmp_path, "single", [1.0] * 8, model_fingerprint="0123456789abcdef", dtype="float32")
    half = _result(tmp_path, "half", [1.1] * 8, model_fingerprint="fedcba9876543210", dtype="bfloat16")
    assert len(summary_rows([single, half], [0, 8])) == 2
    labels, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *args, **kwargs: labels.append(kwargs.get("label")) or plot(self, *args, **kwargs))
    assert plot_nll_curves([single, half], tmp_path / "curves.png").is_file()
    assert sorted(label.split(" (")[0] for label in labels) == ["half bfloat16", "single"]
    twin = _result(tmp_path, "twin", [1.0] * 8, model_fingerprint="0000000000000000", dtype="bfloat16")
    with pytest.raises(ValueError, match="were made with different models of the same name"):
        summary_rows([half, twin], [0, 8])
