"""Fuzzing: random programs of feeds (one token or many), resets and model.generate() calls on one stream,
checked against the naive reference of SEMANTICS.md (tests/reference.py).

A program runs on one StreamingLLMWrapper. `generate` calls go through the wrapper's prepared model with the
wrapper's own StreamingKVCache as `past_key_values`, so the wrapper and generate() continue the same stream:
generate() is handed every token fed so far plus a new prompt, and feeds only what the cache has not seen.
Every logit the package returns is recorded at its stream position; when a stream ends (reset or end of the
program) the reference scores the whole stream once and every recorded logit is compared (fp32, 1e-4).
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import naive_streaming_logits
from tiny_models import VOCAB_SIZE, make_wrapper

TOLERANCE = 1e-4

feed_op = st.tuples(st.just("feed"), st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=16))
generate_op = st.tuples(
    st.just("generate"),
    st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=4),  # new prompt tokens
    st.integers(1, 6),  # max_new_tokens
)
reset_op = st.tuples(st.sampled_from(["wrapper_reset", "cache_reset"]))
programs = st.lists(st.one_of(feed_op, feed_op, generate_op, reset_op), min_size=1, max_size=10)


class StreamChecker:
    """The tokens fed into the current stream and the package's logits at their positions."""

    def __init__(self, reference_model, n_sink, window_size, position_mode):
        self.reference_model = reference_model
        self.config = (n_sink, window_size, position_mode)
        self.fed: list[int] = []
        self.logits: dict[int, torch.Tensor] = {}  # stream position -> logits [vocab] of the package
        self.streams_checked = 0

    def record(self, start: int, logits: torch.Tensor) -> None:
        for offset, row in enumerate(logits):
            self.logits[start + offset] = row.float()

    def check_and_clear(self) -> None:
        if self.fed:
            expected = naive_streaming_logits(self.reference_model, torch.tensor(self.fed), *self.config)
            for position, logits in self.logits.items():
                difference = (logits - expected[position]).abs().max().item()
                assert difference <= TOLERANCE, (self.config, position, difference, len(self.fed))
            self.streams_checked += 1
        self.fed, self.logits = [], {}


def run_program(wrapper, checker: StreamChecker, program) -> None:
    for op in program:
        kind = op[0]
        if kind == "feed":
            logits = wrapper(torch.tensor([op[1]]))[0]
            checker.record(len(checker.fed), logits)
            checker.fed += op[1]
        elif kind == "generate":
            prompt = torch.tensor([checker.fed + op[1]])
            output = wrapper.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                past_key_values=wrapper.cache,
                max_new_tokens=op[2],
                min_new_tokens=op[2],
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
            sequence = output.sequences[0].tolist()
            # Step i's logits belong to the token at position len(prompt) - 1 + i; the last new token is never fed.
            checker.record(prompt.shape[1] - 1, torch.cat(output.logits))
            checker.fed = sequence[:-1]
            assert sequence[: prompt.shape[1]] == prompt[0].tolist()
        elif kind == "wrapper_reset":
            checker.check_and_clear()
            wrapper.reset()
        else:  # transformers' Cache.reset(): the same cache object, emptied
            checker.check_and_clear()
            wrapper.cache.reset()
        assert wrapper.cache.get_seq_length() == len(checker.fed)
        assert wrapper.cache.get_cache_length() == min(len(checker.fed), wrapper.cache_capacity)
    checker.check_and_clear()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    architecture=st.sampled_from(["llama", "gpt_neox"]),
    n_sink=st.integers(0, 4),
    window_size=st.integers(1, 12),
    position_mode=st.sampled_from(["pos_shift", "rerotate", "absolute"]),
    streaming_mode=st.sampled_from(["ours", "mit"]),
    program=programs,
)
def test_random_programs_match_reference(
    llama_model, gpt_neox_model, architecture, n_sink, window_size, position_mode, streaming_mode, program
):
    model = llama_model if architecture == "llama" else gpt_neox_model
    wrapper = make_wrapper(model, n_sink, window_size, position_mode=position_mode, streaming_mode=streaming_mode)
    run_program(wrapper, StreamChecker(model, n_sink, window_size, position_mode), program)


def test_generate_after_cache_reset_at_the_same_step(llama_model):
    """A fixed program that the fuzzer can hit: a decode step at stream position t, Cache.reset(), then a block
    of t tokens and a generate() decode step at the same t (the per-step rotation matrices must not be reused)."""
    wrapper = make_wrapper(llama_model, 2, 8)
    checker = StreamChecker(llama_model, 2, 8, "pos_shift")
    program = [("feed", [1, 2, 3, 4, 5]), ("feed", [6]), ("cache_reset",), ("feed", [7, 8, 9, 10, 11]),
               ("generate", [12], 3), ("feed", [13])]
    run_program(wrapper, checker, program)
