"""Behaviour of the scorers that no other test pinned down (found by mutation testing): compute_perplexity's
defaults, progress bar and clock, token_nlls' row chunks, the baselines' steppers and the chunked and strided
protocols. Everything is checked on exact values, never on timings."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from streaming_llm.eval import perplexity
from streaming_llm.eval.perplexity import PerplexityResult, compute_perplexity, token_nlls
from tiny_models import TableModel, TableStepper


class _RecordingBar:
    """Stands in for tqdm: keeps its arguments and the sum of its updates."""

    made: list[_RecordingBar] = []

    def __init__(self, **kwargs):
        self.kwargs, self.count, self.closed = kwargs, kwargs.get("initial", 0), False
        _RecordingBar.made.append(self)

    def update(self, n: int) -> None:
        self.count += n

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def recording_bars(monkeypatch):
    import tqdm.auto

    _RecordingBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", _RecordingBar)
    return _RecordingBar.made


# --- compute_perplexity ------------------------------------------------------------------------------------------


def test_tokens_per_second_of_a_run_under_a_second():
    assert PerplexityResult(2.0, torch.zeros(10), num_tokens=11, wall_s=0.5).tokens_per_s == 20.0


def test_compute_perplexity_feeds_one_token_at_a_time_by_default():
    """The default is the decode loop, which decode-only steppers (kvpress) need."""
    stepper = TableStepper()
    compute_perplexity(stepper, torch.arange(9)[None])
    assert stepper.calls == [1] * 8


def test_wall_time_is_the_scoring_loops_own_clock(monkeypatch):
    clock = iter([100.0, 103.5])
    monkeypatch.setattr(perplexity, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    result = compute_perplexity(TableStepper(), torch.arange(8)[None], block_size=3)
    assert result.wall_s == 3.5 and result.tokens_per_s == 2.0


def test_the_progress_bar_counts_the_scored_tokens_and_leaves_no_line(recording_bars):
    """A bar of the T-1 predictions that ends full, from the resume point on, and is cleared when done."""
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
    whole = compute_perplexity(TableStepper(), ids, block_size=3, progress=True, description="dense")
    compute_perplexity(TableStepper(), ids, block_size=3, progress=True, resume_nlls=whole.nlls[:6])
    fresh, resumed = recording_bars
    assert fresh.kwargs == dict(total=10, initial=0, desc="dense", unit="tok", leave=False)
    assert fresh.count == 10 and fresh.closed
    assert resumed.kwargs["initial"] == 6 and resumed.count == 10 and resumed.closed


# --- token_nlls ----------------------------------------------------------------------------------------------------


def test_token_nlls_scores_as_many_rows_at_a_time_as_fit_its_budget_and_at_least_one(monkeypatch):
    """NLL_CHUNK_VALUES logits a call: 7 values of a vocabulary of 3 are 2 rows; a vocabulary larger than the budget
    goes one row at a time. The NLLs are the whole block's cross-entropy either way."""
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 2, 1, 1, 0])
    expected = F.cross_entropy(logits.double(), targets, reduction="none")
    cross_entropy, sizes = F.cross_entropy, []

    def counted(input, target, **kwargs):
        sizes.append(input.shape[0])
        return cross_entropy(input, target, **kwargs)

    monkeypatch.setattr(perplexity.F, "cross_entropy", counted)
    for budget, rows in ((7, [2, 2, 1]), (2, [1] * 5)):
        sizes.clear()
        monkeypatch.setattr(perplexity, "NLL_CHUNK_VALUES", budget)
        assert torch.equal(token_nlls(logits, targets), expected)
        assert sizes == rows, budget


# --- baselines -----------------------------------------------------------------------------------------------------


def test_the_sampled_recompute_shows_a_bar_of_its_steps_only_when_asked(recording_bars):
    from streaming_llm.eval.baselines import recompute_nlls_at

    ids = torch.arange(12)[None]
    quiet = recompute_nlls_at(TableModel(), ids, capacity=4, steps=[1, 5, 9, 10])
    assert recording_bars == []
    shown = recompute_nlls_at(TableModel(), ids, capacity=4, steps=[1, 5, 9, 10], batch_windows=2, progress=True)
    (bar,) = recording_bars
    assert bar.kwargs == dict(total=4, desc="recompute (sampled)", unit="tok", leave=False)
    assert bar.count == 4 and bar.closed and torch.equal(quiet, shown)


def test_the_recompute_stepper_holds_at_most_capacity_plus_one_tokens():
    """Each window is the token and the capacity before it: the stepper's history stays that long, however long
    the stream, and its logits are still each window's last."""
    from streaming_llm.eval.baselines import RecomputeStepper

    model = TableModel()
    stepper = RecomputeStepper(model, capacity=3)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
    logits, fed = [], 0
    for size in (5, 1, 1, 2, 3):
        logits.append(stepper(ids[:, fed:fed + size]))
        fed += size
        assert stepper.history.shape[1] <= 4
    assert torch.equal(torch.cat(logits, dim=1), model.table[ids])


# --- chunked and strided protocols ---------------------------------------------------------------------------------


def test_the_chunked_and_strided_bars_count_the_scored_tokens_and_leave_no_line(llama_model, recording_bars):
    from streaming_llm.eval.chunked import chunked_streaming_perplexity, strided_window_perplexity

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
    chunked_streaming_perplexity(llama_model, ids, 1, 3, chunk_size=3, progress=True)
    strided_window_perplexity(TableModel(), ids, context_size=5, stride=3, progress=True)
    chunked, strided = recording_bars
    assert chunked.kwargs == dict(total=10, desc="chunked3", unit="tok", leave=False)
    assert strided.kwargs == dict(total=10, desc="strided3", unit="tok", leave=False)
    assert chunked.count == strided.count == 10 and chunked.closed and strided.closed


def test_the_chunked_and_strided_runs_time_their_own_loop_and_count_every_token(llama_model, monkeypatch):
    from streaming_llm.eval import chunked

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5]])
    for run in (lambda: chunked.chunked_streaming_perplexity(llama_model, ids, 1, 3, chunk_size=3),
                lambda: chunked.strided_window_perplexity(TableModel(), ids, context_size=5, stride=3)):
        clock = iter([10.0, 12.0])
        monkeypatch.setattr(chunked, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
        result = run()
        assert result.wall_s == 2.0 and result.num_tokens == 9 and result.tokens_per_s == 4.0


def test_a_stride_of_zero_is_a_clear_error():
    from streaming_llm.eval.chunked import strided_window_perplexity

    with pytest.raises(ValueError, match="need 1 <= stride <= context_size, got stride=0, context_size=4"):
        strided_window_perplexity(TableModel(), torch.arange(10)[None], context_size=4, stride=0)
