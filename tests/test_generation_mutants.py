"""Behaviour of streaming_llm.generation that no other test pinned down, found by a mutation-testing audit.

Each test here fails on at least one small change to generation.py (a flipped comparison, a dropped statement)
that the rest of the suite let through. Most run on stand-ins: a word-level tokenizer whose pieces carry their
leading space SentencePiece-style ("▁king"), and ScriptedWrapper, a wrapper whose logits are scripted, so the
tokens a stream samples are known in advance. The byte-level tests use the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import re
import types
import warnings

import pytest
import torch
from test_cli import tiny_checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from streaming_llm.generation import (
    MAX_PENDING_TOKENS,
    NUCLEUS_PROBE,
    IncrementalDecoder,
    SamplingConfig,
    StopStringFilter,
    StreamingChat,
    TokenSampler,
    end_of_turn_ids,
    generate_stream,
    prompt_token_ids,
)

WORDS = ["[UNK]", "</s>", "▁the", "▁king", "▁is", "▁dead", "▁long", "▁live"]


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, Metaspace pre-tokenizer and decoder: a piece decoded on its own loses its leading space
    ("▁is" -> "is"), decoded after another keeps it (" is"), as with Llama's SentencePiece tokenizer."""
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """The embedded SmolLM2 tokenizer (byte-level BPE, ChatML template), from the tiny checkpoint test_cli builds."""
    return AutoTokenizer.from_pretrained(tiny_checkpoint(tmp_path_factory))


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _Model(torch.nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 1)

    def get_input_embeddings(self):
        return self.embed


class ScriptedWrapper:
    """Stands in for a StreamingLLMWrapper: records the tokens fed, and answers each call with logits whose last
    position is `next_logits()` (the others are zeros). `speak(tokens)` scripts a greedy stream: every call makes
    the next scripted token the most likely one."""

    def __init__(self, vocab_size: int, next_logits=None):
        self.model, self.vocab_size = _Model(vocab_size), vocab_size
        self.next_logits = next_logits
        self.fed: list[int] = []
        self.calls = 0

    def speak(self, tokens: list[int]) -> ScriptedWrapper:
        script = iter(tokens)

        def next_logits():
            logits = torch.zeros(self.vocab_size)
            logits[next(script)] = 10.0
            return logits

        self.next_logits = next_logits
        return self

    def reset(self):
        self.fed, self.calls = [], 0

    @property
    def tokens_seen(self) -> int:
        return len(self.fed)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.fed += input_ids[0].tolist()
        self.calls += 1
        logits = torch.zeros(1, input_ids.shape[1], self.vocab_size)
        logits[0, -1] = self.next_logits()
        return logits


# --- TokenSampler -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(), dict(top_k=3), dict(top_p=0.9)], ids=["plain", "top_k", "top_p"])
def test_a_tiny_temperature_is_greedy_when_every_logit_is_negative(options):
    """Bug found by the audit: with temperature 1e-40 (accepted; floored to float32's tiny) and no positive logit,
    logits / temperature is -inf everywhere, which the overflow guard (it looked for +inf only) let through, and
    softmax of all -inf made torch.multinomial raise. The gaps to the best logit are used instead: greedy."""
    logits = -torch.arange(10.0) - 5.0
    logits[3] = -4.5
    sampler = TokenSampler(SamplingConfig(temperature=1e-40, seed=0, **options))
    assert [sampler(logits) for _ in range(5)] == [3] * 5


def test_greedy_takes_the_first_of_tied_best_tokens_whatever_the_seed():
    """temperature=0 is argmax (the lowest id among ties), not a draw: sampling at a vanishing temperature would
    pick among the tied tokens at random."""
    logits = torch.tensor([0.0, 3.0, 3.0, 3.0, -1.0])
    assert {TokenSampler(SamplingConfig(temperature=0.0, seed=seed))(logits) for seed in range(20)} == {1}


def test_the_sampler_leaves_the_callers_logits_untouched():
    """The repetition penalty works on a copy: the caller's float32 logits (logits.float() is the same tensor)
    are not penalised in place."""
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0])
    before = logits.clone()
    TokenSampler(SamplingConfig(repetition_penalty=3.0))(logits, recent=[0, 1])
    assert torch.equal(logits, before)


def test_repetition_penalty_divides_positive_logits_and_multiplies_negative_ones():
    """CTRL's rule, both signs and both directions: a recent token's positive logit is divided by the penalty,
    a negative one multiplied (> 1 pushes both down, < 1 pulls both up); a token repeated in the window is
    penalised once, and every id in the window is."""
    def greedy(logits, penalty, recent):
        return TokenSampler(SamplingConfig(repetition_penalty=penalty))(torch.tensor(logits), recent=recent)

    assert greedy([2.0, 1.5], 2.0, [0]) == 1  # 2 / 2 = 1 < 1.5
    assert greedy([-1.0, -1.5], 2.0, [0]) == 1  # -1 * 2 = -2 < -1.5 (divided: -0.5, still the best)
    assert greedy([-1.0, -0.6], 0.5, [0]) == 0  # -1 * 0.5 = -0.5 > -0.6
    assert greedy([0.5, 0.8], 0.5, [0]) == 0  # 0.5 / 0.5 = 1 > 0.8
    assert greedy([2.0, 0.8], 2.0, [0, 0, 0]) == 0  # once: 1 > 0.8 (three times: 0.25)
    assert greedy([1.0, 0.9, 0.1], 10.0, [0, 2]) == 1  # every recent id, not only the last


def test_a_huge_penalty_leaves_a_zero_logit_at_zero():
    """A penalty beyond float32's range makes 0 * inf = NaN for a zero logit; it is mapped back to 0 (the logit
    it was), not to another number: here it stays below an unpenalised 0.5."""
    sampler = TokenSampler(SamplingConfig(repetition_penalty=1e300))
    assert sampler(torch.tensor([0.0, 0.5, -2.0]), recent=[0]) == 1
    assert sampler(torch.tensor([0.0, -0.5, 3.0]), recent=[0, 2]) == 0  # 3 / inf = 0, ties go to the lowest id


@pytest.mark.parametrize("options", [dict(), dict(top_k=3)], ids=["plain", "top_k"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_a_draw_is_from_the_softmax_at_the_temperature(temperature, options):
    """Each draw is torch.multinomial of softmax(logits / temperature) (of the top-k logits, most likely first) with
    the generator seeded by `seed`: the same tokens as drawing by hand. A mutation campaign found that nothing failed
    when every temperature was floored to float32's tiny (a greedy sampler): the tests drew from flat logits."""
    logits = torch.tensor([0.0, 1.0, 2.5, -1.0, 0.5])
    sampler = TokenSampler(SamplingConfig(temperature=temperature, seed=7, **options))
    generator = torch.Generator().manual_seed(7)
    values, ids = torch.sort(logits, descending=True) if options else (logits, torch.arange(5))
    values, ids = values[: options.get("top_k", 5)], ids[: options.get("top_k", 5)]
    probabilities = torch.softmax(values / temperature, dim=-1)
    expected = [int(ids[torch.multinomial(probabilities, 1, generator=generator)]) for _ in range(300)]
    assert [sampler(logits) for _ in range(300)] == expected
    assert len(set(expected)) >= 3  # a draw, not the argmax


def test_unrestricted_sampling_draws_from_the_whole_vocabulary():
    """top_k=0 and top_p=1 sample the full softmax: 2000 draws from 1000 equally likely tokens reach far more than
    the NUCLEUS_PROBE most likely tokens top-p starts from."""
    sampler = TokenSampler(SamplingConfig(temperature=1.0, seed=0))
    draws = {sampler(torch.zeros(1000)) for _ in range(2000)}
    assert len(draws) > 2 * NUCLEUS_PROBE


def test_top_k_alone_keeps_k_candidates_however_unlikely():
    """With top_p=1 top-k keeps exactly k tokens (none tied), even those whose probability rounds the cumulative sum
    to 1."""
    logits = -torch.arange(50.0)
    logits[7] = 100.0
    values, ids = TokenSampler(SamplingConfig(temperature=1.0, top_k=5))._candidates(logits)
    assert ids.tolist() == [7, 0, 1, 2, 3] and len(values) == 5


def _transformers_candidates(logits: torch.Tensor, config: SamplingConfig) -> set[int]:
    """The ids transformers' own warpers leave finite, in generate()'s order: temperature, top-k, top-p."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()[None]
    for warper in (TemperatureLogitsWarper(config.temperature), TopKLogitsWarper(config.top_k) if config.top_k else None,
                   TopPLogitsWarper(config.top_p) if config.top_p < 1 else None):
        scores = warper(None, scores) if warper is not None else scores
    return set(torch.nonzero(scores[0] > -float("inf"))[:, 0].tolist())


def _candidates(logits: torch.Tensor, config: SamplingConfig) -> set[int]:
    """The ids the sampler can draw (a -inf logit kept among them has probability 0)."""
    values, ids = TokenSampler(config)._candidates(logits / config.temperature)
    return set(ids[values > -float("inf")].tolist())


@pytest.mark.parametrize("top_p", [1.0, 0.95])
def test_top_k_keeps_every_token_tied_with_the_kth_as_transformers_does(top_p):
    """Bug found by the audit: top-k kept exactly k tokens, so of the tokens tied with the k-th (30-60% of steps
    at top_k 10-50 for the embedded model in bf16) it kept whichever torch.topk returned first. transformers'
    TopKLogitsWarper keeps every token tied with the k-th; so does the sampler now, and the candidates equal
    transformers' on bf16-rounded logits of several vocabulary sizes, with -inf entries."""
    logits = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 0.0])
    config = SamplingConfig(temperature=1.0, top_k=3, top_p=top_p)
    assert _candidates(logits, config) == _transformers_candidates(logits, config) == {0, 1, 2, 3, 4}
    generator = torch.Generator().manual_seed(0)
    for vocab in (7, 100, 3000):
        logits = (torch.randn(vocab, generator=generator) * 4).to(torch.bfloat16).float()
        logits[torch.rand(vocab, generator=generator) < 0.2] = -float("inf")
        for top_k in (1, 5, 40):
            config = SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)
            assert _candidates(logits, config) == _transformers_candidates(logits, config)


@pytest.mark.parametrize("top_k", [0, 4])
def test_top_p_keeps_the_smallest_set_that_reaches_it(top_k):
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in float32): top_p=0.5 is reached by the first token alone,
    0.75 by two, and a hair above 0.5 needs the second."""
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))

    def candidates(top_p):
        return TokenSampler(SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p))._candidates(logits)[1].tolist()

    assert candidates(0.5) == [0]
    assert candidates(0.5 + 1e-6) == [0, 1]
    assert candidates(0.75) == [0, 1]
    assert sorted(candidates(0.999)) == [0, 1, 2, 3]  # the tied 1/8s in either order


@pytest.mark.parametrize("top_k", [0, 4])
def test_top_p_measures_probabilities_not_logits(top_k):
    """Logits that are not log-probabilities (log p + 3, as a model's are): top_p is a share of the softmax's mass,
    whatever the logits' offset. A mutation campaign found that `exp(values + logsumexp)` in place of `- logsumexp`
    failed no test: every top-p test gave normalised logits, whose logsumexp is 0."""
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125])) + 3.0

    def candidates(top_p):
        return TokenSampler(SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p))._candidates(logits)[1].tolist()

    assert candidates(0.3) == [0] and candidates(0.6) == [0, 1] and len(candidates(0.8)) == 3  # 2 and 3 tie


def test_a_nucleus_wider_than_the_probe_is_the_most_likely_tokens():
    """Where the NUCLEUS_PROBE most likely tokens hold less than top_p, the whole vocabulary is sorted, most likely
    first: the nucleus of 1,000 slowly falling logits at top_p=0.5 is their first ~380 tokens (an ascending sort,
    which kept the least likely ones, failed no test)."""
    logits = torch.linspace(0.0, -1.0, 1000)
    ids = TokenSampler(SamplingConfig(temperature=1.0, top_p=0.5))._candidates(logits)[1].tolist()
    probabilities = torch.softmax(logits.double(), dim=-1)
    expected = int(((torch.cumsum(probabilities, dim=-1) - probabilities) < 0.5).sum())
    assert expected > NUCLEUS_PROBE and abs(len(ids) - expected) <= 1 and ids == list(range(len(ids)))


@pytest.mark.parametrize("top_k", [0, 4])
def test_a_top_p_below_float32s_smallest_value_keeps_the_most_likely_token(top_k):
    """Bug found by a tester: --top-p 1e-46 (accepted: 0 < top_p <= 1) is 0 in float32, so `0 < top_p` kept no
    token and torch.multinomial raised on the empty distribution (a traceback from `generate`). The most likely
    token always stays."""
    logits = torch.log(torch.tensor([0.125, 0.5, 0.25, 0.125]))
    for top_p in (1e-46, 1e-300, float.fromhex("0x1p-1074")):
        sampler = TokenSampler(SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p, seed=0))
        assert sampler._candidates(logits)[1].tolist() == [1]
        assert [sampler(logits) for _ in range(3)] == [1] * 3


def test_unseeded_samplers_draw_differently():
    """seed=None seeds each sampler's generator from a fresh random source (not a fixed default): two samplers
    over 1000 equally likely tokens draw different sequences."""
    logits = torch.zeros(1000)
    first, second = (TokenSampler(SamplingConfig(temperature=1.0)) for _ in range(2))
    assert [first(logits) for _ in range(20)] != [second(logits) for _ in range(20)]


# --- IncrementalDecoder ---------------------------------------------------------------------------------------


def test_the_decoder_keeps_the_leading_space_its_context_gives(word_tokenizer):
    """A SentencePiece-style piece decodes without its space at the start of a text: the context tokens (the
    prompt's last ones) make the first generated word come out as " is", and a decoder without context starts
    the text with "the"."""
    ids = ids_of(word_tokenizer, "the king is dead")
    decoder = IncrementalDecoder(word_tokenizer, context_ids=ids[:2])
    assert [decoder.push(i) for i in ids[2:]] + [decoder.flush()] == [" is", " dead", ""]
    decoder = IncrementalDecoder(word_tokenizer)
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == "the king is dead"


def test_generate_stream_text_continues_the_prompt(word_tokenizer):
    """generate_stream gives its decoder the prompt's last tokens as context: the first piece is " is", not "is"."""
    ids = ids_of(word_tokenizer, "the king is dead")
    wrapper = ScriptedWrapper(len(WORDS)).speak(ids[2:])
    pieces = list(generate_stream(wrapper, word_tokenizer, ids[:2], max_new_tokens=2))
    assert [piece.text for piece in pieces] == [" is", " dead"]


QUOTED = "Why, doctor 'she': my lord, and 'spare not me'? You 're sure , ask him 's  aunt ."


@pytest.mark.parametrize("clean_up", [True, False])
def test_the_streamed_text_is_the_tokens_text_whatever_the_clean_up_setting(byte_tokenizer, monkeypatch, clean_up):
    """Bug found by reading the stream of the embedded Shakespeare: with clean_up_tokenization_spaces on (as
    transformers' GGUF reader sets it), decode deletes the space before "'s", "'re", " ," once they arrive, after the
    space was emitted; the stream read "doctor ''she'". The decoder decodes without the clean-up: its deltas add up
    to the text the tokens spell, also as a prompt's continuation."""
    monkeypatch.setattr(byte_tokenizer, "clean_up_tokenization_spaces", clean_up)
    ids = ids_of(byte_tokenizer, QUOTED)
    assert (byte_tokenizer.decode(ids) == QUOTED) is not clean_up  # the clean-up does rewrite this text
    decoder = IncrementalDecoder(byte_tokenizer)
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == QUOTED
    for cut in range(1, len(ids)):
        decoder = IncrementalDecoder(byte_tokenizer, context_ids=ids[:cut])
        prompt = byte_tokenizer.decode(ids[:cut], clean_up_tokenization_spaces=False)
        assert prompt + "".join([decoder.push(i) for i in ids[cut:]] + [decoder.flush()]) == QUOTED


def test_the_embedded_tokenizer_round_trips_text(embedded_model):
    """The GGUF reader's clean-up is turned off at loading: decode(encode(text)) is the text. The tokenizer alone
    (embedded_tokenizer, which the tiny checkpoints are saved with) is the same."""
    from streaming_llm.loading import embedded_tokenizer

    _, tokenizer = embedded_model
    for tokenizer in (tokenizer, embedded_tokenizer()):
        assert not tokenizer.clean_up_tokenization_spaces
        assert tokenizer.decode(ids_of(tokenizer, QUOTED)) == QUOTED


def test_a_gguf_files_tokenizer_is_loaded_without_the_clean_up(monkeypatch):
    """load_model of a .gguf path (any GGUF file, not only the embedded model): transformers' GGUF reader turns
    clean_up_tokenization_spaces on, and load_model turns it off again, so the tokens round-trip the text. The
    readers are stood in for (the real ones take ~20 s): the tokenizer as the GGUF reader gives it, a tiny model."""
    import transformers
    from tiny_models import build_llama

    from streaming_llm import load_model
    from streaming_llm.loading import embedded_model_path, embedded_tokenizer

    as_read = embedded_tokenizer()
    as_read.clean_up_tokenization_spaces = True
    asked = []

    def read_tokenizer(source, **kwargs):
        asked.append(kwargs.get("gguf_file"))
        return as_read

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", read_tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda source, **kwargs: build_llama())
    _, tokenizer = load_model(embedded_model_path())
    assert asked == [embedded_model_path().name] and tokenizer is as_read
    assert not tokenizer.clean_up_tokenization_spaces
    assert tokenizer.decode(ids_of(tokenizer, QUOTED)) == QUOTED


def test_the_embedded_tokenizer_is_read_once_and_each_caller_gets_its_own():
    """embedded_tokenizer() parses the GGUF file once per process; each call returns a copy, so that one caller's
    change (a chat template, a padding side) is not another's."""
    from streaming_llm import loading

    first, second = loading.embedded_tokenizer(), loading.embedded_tokenizer()
    assert loading._read_embedded_tokenizer.cache_info().currsize == 1
    assert first is not second and first(QUOTED)["input_ids"] == second(QUOTED)["input_ids"]
    first.chat_template = "changed"
    assert second.chat_template != "changed" and loading.embedded_tokenizer().chat_template != "changed"


def _orphan_byte_token(tokenizer) -> int:
    """A token that is a lone UTF-8 continuation byte: it never completes a character."""
    for token_id in range(300):
        if tokenizer.decode([token_id]) == "\ufffd" and tokenizer.decode([token_id] * 3) == "\ufffd" * 3:
            return token_id
    raise AssertionError("no lone-continuation-byte token among the first 300 ids")


def test_the_decoder_gives_up_on_a_character_after_max_pending_tokens(byte_tokenizer):
    """Undecodable pieces are held back for MAX_PENDING_TOKENS tokens and emitted (as U+FFFD) with the next one,
    so the decoder's memory stays bounded even when the bytes never form a character."""
    orphan = _orphan_byte_token(byte_tokenizer)
    decoder = IncrementalDecoder(byte_tokenizer, context_ids=ids_of(byte_tokenizer, "Hi"))
    assert [decoder.push(orphan) for _ in range(MAX_PENDING_TOKENS)] == [""] * MAX_PENDING_TOKENS
    assert decoder.push(orphan) == "\ufffd" * (MAX_PENDING_TOKENS + 1)
    assert len(decoder.tokens) <= MAX_PENDING_TOKENS
    assert decoder.push(byte_tokenizer.encode(" ok", add_special_tokens=False)[0]) == " ok"


def test_a_context_that_ends_inside_a_character_is_not_emitted_again(byte_tokenizer):
    """Bug found by the audit: when the context (a prompt cut at any token) ends with the first bytes of a
    character, the text of the context was not a prefix of the completed text and the decoder emitted the whole
    context again ("Hi 日" after a prompt "Hi" + one byte of 日). It emits only what follows the text the context
    shows complete, for a prompt cut at every token."""
    text = "Hi 日本語のテキスト 🚀𝄞 end"
    ids = ids_of(byte_tokenizer, text)
    cut_inside = 0
    for cut in range(1, len(ids)):
        shown = byte_tokenizer.decode(ids[:cut])
        complete = shown.rstrip("\ufffd")
        cut_inside += complete != shown
        decoder = IncrementalDecoder(byte_tokenizer, context_ids=ids[:cut])
        pieces = [decoder.push(i) for i in ids[cut:]] + [decoder.flush()]
        assert "".join(pieces) == text[len(complete) :], cut
    assert cut_inside >= 5


# --- StopStringFilter -----------------------------------------------------------------------------------------


def test_a_longer_possible_stop_is_held_even_when_another_stop_matches_less():
    """The text held back is the longest tail that could begin any stop string: "abc" (of "abcd") is held although
    "c" alone would do for "cx", so a following "d" still stops."""
    stopper = StopStringFilter(["abcd", "cx"])
    assert stopper.push("zabc") == ("z", False)
    assert stopper.push("d!") == ("", True)


def test_a_self_overlapping_stop_string_is_held_in_full():
    """For "aaa", the tail "aa" is held, not just "a": the next "a" completes the stop string."""
    stopper = StopStringFilter(["aaa"])
    assert stopper.push("xaa") == ("x", False)
    assert stopper.push("a") == ("", True)


def test_empty_stop_strings_are_ignored_and_nothing_is_held_after_a_stop():
    """An empty stop string would match everywhere: it is dropped. Once a stop string is reached, flush()
    has nothing left to give."""
    assert StopStringFilter(["", "END"]).push("some text") == ("some text", False)
    stopper = StopStringFilter(["STOP"])
    assert stopper.push("go S") == ("go ", False)
    assert stopper.push("TOP now") == ("", True)
    assert stopper.flush() == ""


def test_flush_gives_the_held_text_once():
    """flush() hands over the text held back and forgets it: a second flush gives nothing."""
    stopper = StopStringFilter(["STOP"])
    assert stopper.push("go ST") == ("go ", False)
    assert stopper.flush() == "ST" and stopper.flush() == ""
    assert stopper.push("OP") == ("OP", False)


# --- GenerationStream -----------------------------------------------------------------------------------------


def test_prompt_ids_at_the_edges_of_the_vocabulary(word_tokenizer):
    """Ids 0 and vocab - 1 are tokens of the model; vocab and -1 are refused before anything is fed."""
    vocab = len(WORDS)
    wrapper = ScriptedWrapper(vocab).speak([2, 2])
    assert [piece.token_id for piece in generate_stream(wrapper, word_tokenizer, [0, vocab - 1, 3], max_new_tokens=1)] == [2]
    for bad in ([1, vocab], [-1, 2]):
        wrapper = ScriptedWrapper(vocab).speak([2])
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            generate_stream(wrapper, word_tokenizer, bad, max_new_tokens=1)
        assert wrapper.fed == []


@pytest.mark.parametrize("window, prompt, expected", [
    (2, [0], [1, 2, 0, 1, 2, 0]),  # the prompt's token is recent; two tokens of memory: 1, 2, then 0 again
    (3, [0], [1, 2, 3, 0, 1, 2]),
    (2, [0, 1], [2, 0, 1, 2, 0, 1]),  # both prompt tokens are recent
    (1, [1, 0], [1, 0, 1, 0, 1, 0]),  # only the prompt's last token is
])
def test_the_repetition_window_holds_the_last_tokens_of_prompt_and_output(word_tokenizer, window, prompt, expected):
    """Greedy with a strong penalty over fixed logits 3, 2, 1, 0.5, -1...: a token is penalised while it is among
    the last `repetition_window` tokens of the stream (prompt included, generated tokens added, older ones
    forgotten), which decides every choice here."""
    base = torch.tensor([3.0, 2.0, 1.0, 0.5, -1.0, -1.0, -1.0, -1.0])
    wrapper = ScriptedWrapper(len(WORDS), next_logits=lambda: base.clone())
    sampling = SamplingConfig(repetition_penalty=100.0, repetition_window=window)
    stream = generate_stream(wrapper, word_tokenizer, prompt, sampling, max_new_tokens=len(expected))
    assert [piece.token_id for piece in stream] == expected


@pytest.mark.parametrize("end", ["length", "eos"])
def test_text_held_for_a_possible_stop_string_is_emitted_when_the_stream_ends(word_tokenizer, end):
    """" dead" could begin the stop string " dead end", so it is held back; when the stream ends without it (by
    max_new_tokens or by a stop token), the held text is emitted with the last piece."""
    ids = ids_of(word_tokenizer, "the king is dead")
    eos = word_tokenizer.convert_tokens_to_ids("</s>")
    script = ids[2:] + ([eos] if end == "eos" else [])
    wrapper = ScriptedWrapper(len(WORDS)).speak(script)
    stream = generate_stream(wrapper, word_tokenizer, ids[:2], stop=" dead end", max_new_tokens=len(script),
                             stop_token_ids={eos})
    pieces = list(stream)
    assert [piece.text for piece in pieces][-1].endswith(" dead") and "".join(p.text for p in pieces) == " is dead"
    assert stream.stop_reason == end and [piece.token_id for piece in pieces] == script


@pytest.mark.parametrize("end, reason", [("eos", "eos"), ("length", "stop")])
def test_a_stop_string_completed_by_the_final_flush_still_cuts_the_text(byte_tokenizer, end, reason):
    """When the stream ends (stop token or max_new_tokens) the decoder's held bytes are flushed through the
    stop-string filter too: "o" (held, it may begin "o ") followed by a flushed " \\ufffd" (a space and an
    unfinished character) makes "o ", so the text ends before it. Without the filter the held "o" would even come
    out after the flushed text. At max_new_tokens the stream reports the stop string as its reason; a sampled stop
    token stays "eos" (StreamingChat drops that token from the answer)."""
    hello = ids_of(byte_tokenizer, "Hello")
    partial = ids_of(byte_tokenizer, " 日")[0]
    assert byte_tokenizer.decode([partial]) == " \ufffd"
    eos = byte_tokenizer.convert_tokens_to_ids("<|im_end|>")
    script = hello + [partial] + ([eos] if end == "eos" else [])
    wrapper = ScriptedWrapper(len(byte_tokenizer)).speak(script)
    stream = generate_stream(wrapper, byte_tokenizer, ids_of(byte_tokenizer, "Say"), stop="o ",
                             max_new_tokens=10 if end == "eos" else len(script), stop_token_ids={eos})
    pieces = list(stream)
    assert [piece.token_id for piece in pieces] == script and stream.stop_reason == reason
    assert "".join(piece.text for piece in pieces) == "Hell"


def test_a_generation_stream_runs_once(word_tokenizer):
    """Iterating a GenerationStream a second time is a RuntimeError, not a second generation from stale logits."""
    ids = ids_of(word_tokenizer, "the king is dead")
    stream = generate_stream(ScriptedWrapper(len(WORDS)).speak(ids[2:]), word_tokenizer, ids[:2], max_new_tokens=2)
    assert len(list(stream)) == 2
    with pytest.raises(RuntimeError, match="iterated once"):
        iter(stream)


def test_complex_ids_and_foreign_sampling_objects_are_refused(word_tokenizer):
    """Complex token ids are not integers (their imaginary part would be dropped); sampling must be a
    SamplingConfig, not a dict of its fields."""
    with pytest.raises(ValueError, match="integer token ids"):
        prompt_token_ids(torch.tensor([2 + 0j, 3 + 1j]))
    with pytest.raises(TypeError, match="sampling must be a SamplingConfig"):
        generate_stream(ScriptedWrapper(len(WORDS)).speak([2]), word_tokenizer, [2], sampling={"temperature": 1.0})


# --- end_of_turn_ids ------------------------------------------------------------------------------------------


def test_end_of_turn_ids_take_every_eos_source(byte_tokenizer):
    """The model's eos (an int or a list), the tokenizer's eos and the template's closing special token all end
    a turn; a template that closes a message with ordinary text adds nothing."""
    def model_with_eos(eos):
        return types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=eos))

    closing = byte_tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer_eos = byte_tokenizer.eos_token_id
    assert tokenizer_eos is not None
    assert end_of_turn_ids(byte_tokenizer, model_with_eos([5, 7])) == {5, 7, tokenizer_eos, closing}
    assert end_of_turn_ids(byte_tokenizer, model_with_eos(9)) == {9, tokenizer_eos, closing}
    template = byte_tokenizer.chat_template
    try:
        byte_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}"
        assert end_of_turn_ids(byte_tokenizer) == {tokenizer_eos}
    finally:
        byte_tokenizer.chat_template = template


# --- StreamingChat --------------------------------------------------------------------------------------------


def _chat(byte_tokenizer, answers: list[str], **options):
    """A StreamingChat over a ScriptedWrapper that answers `answers` in turn, each closed by <|im_end|>."""
    end = byte_tokenizer.convert_tokens_to_ids("<|im_end|>")
    script = [token for answer in answers for token in ids_of(byte_tokenizer, answer) + [end]]
    wrapper = ScriptedWrapper(len(byte_tokenizer)).speak(script)
    return StreamingChat(wrapper, byte_tokenizer, stop_token_ids={end}, **options), wrapper


def test_an_empty_system_prompt_adds_no_system_message(byte_tokenizer):
    chat, _ = _chat(byte_tokenizer, ["Hi"], system_prompt="")
    assert chat.messages == []
    assert chat.ask("Hello") == "Hi" and [m["role"] for m in chat.messages] == ["user", "assistant"]


def test_a_seeded_chat_draws_on_across_turns_and_replays_after_reset(byte_tokenizer):
    """Bug found by the audit: each turn made a new sampler from the seed, so every answer of a seeded chat drew the
    same random numbers (three questions over the same distribution got three identical answers). The seed now
    seeds the conversation once; a new chat with the same seed, or reset(), replays it."""
    def uniform():  # 1000 ordinary tokens, equally likely
        logits = torch.full((len(byte_tokenizer),), -float("inf"))
        logits[3000:4000] = 0.0
        return logits

    def answers(chat, count=3):
        return [chat.ask(question) for question in ("a", "b", "c")[:count]]

    def new_chat():
        sampling = SamplingConfig(temperature=1.0, seed=0)
        return StreamingChat(ScriptedWrapper(len(byte_tokenizer), uniform), byte_tokenizer, sampling=sampling,
                             max_new_tokens=6, stop_token_ids=())

    chat = new_chat()
    first = answers(chat)
    assert len(set(first)) == 3 and answers(new_chat()) == first
    chat.reset()
    assert answers(chat, 1) == first[:1]


def _penalised_chat(tokenizer, steps, end: int) -> StreamingChat:
    """A chat with repetition penalty 100 whose model gives, at each step, the next of `steps` ({token: logit}, every
    other logit 0); `end` ends a turn."""

    def next_logits():
        logits = torch.zeros(len(tokenizer))
        for token, value in next(steps).items():
            logits[token] = value
        return logits

    return StreamingChat(ScriptedWrapper(len(tokenizer), next_logits), tokenizer, stop_token_ids={end},
                         sampling=SamplingConfig(repetition_penalty=100.0))


def test_the_repetition_window_of_a_chat_reaches_back_into_the_previous_answer(byte_tokenizer):
    """Bug found by the audit: each turn's repetition window began with that turn's fed tokens, so the previous
    answer, among the last repetition_window tokens of the conversation, went unpenalised, and a model could
    repeat it (transformers' generate(), given the whole conversation, penalises it). Here the second answer's
    most likely token (1.0) is the first answer's word; the penalty 100 brings it to 0.01, under another's 0.5."""
    paris, rome = ids_of(byte_tokenizer, "Paris") + ids_of(byte_tokenizer, "Rome")
    end = byte_tokenizer.convert_tokens_to_ids("<|im_end|>")
    steps = iter([{paris: 10.0}, {end: 10.0}, {paris: 1.0, rome: 0.5}])
    chat = _penalised_chat(byte_tokenizer, steps, end)
    assert chat.ask("Capital of France?") == "Paris"
    assert chat.ask("And of Italy?", max_new_tokens=1) == "Rome"


def test_send_takes_max_new_tokens_as_given(byte_tokenizer):
    """send(max_new_tokens=0) is refused (it once meant the default); a number caps that turn only."""
    chat, wrapper = _chat(byte_tokenizer, ["one two three four five"], max_new_tokens=50)
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(chat.send("Count.", max_new_tokens=0))
    assert wrapper.fed == []
    assert chat.ask("Count.", max_new_tokens=2) == "one two"
    assert chat.last_turn.stop_reason == "length" and chat.last_turn.new_tokens == 2


def test_an_interrupted_turn_is_recorded_as_interrupted(byte_tokenizer):
    """A caller that stops iterating after the first piece: the turn is recorded with the tokens it produced,
    stop_reason "interrupted", and the prompt's token count."""
    chat, wrapper = _chat(byte_tokenizer, ["one two three"], max_new_tokens=50)
    stream = chat.send("Count.")
    first = next(stream)
    stream.close()
    turn = chat.last_turn
    assert turn.stop_reason == "interrupted" and turn.new_tokens == 1 and turn.answer == first.text == "one"
    assert turn.fed_tokens == len(wrapper.fed) and chat.messages[-1] == {"role": "assistant", "content": "one"}


def test_a_chat_with_clean_up_configured_keeps_the_answers_text(byte_tokenizer, monkeypatch):
    """The answer's text (returned, recorded, seen by the next turn) is what its tokens spell, with the tokenizer's
    clean_up_tokenization_spaces on: the next turn is fed without a re-formatting warning."""
    monkeypatch.setattr(byte_tokenizer, "clean_up_tokenization_spaces", True)
    chat, _ = _chat(byte_tokenizer, [QUOTED, "Fine ."])
    assert chat.ask("Hello") == QUOTED and chat.messages[-1]["content"] == QUOTED
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert chat.ask("And?") == "Fine ."


def _trimming_template(tokenizer) -> str:
    """ChatML that strips each message's surrounding whitespace, as some templates do with answers."""
    return tokenizer.chat_template.replace("message['content']", "message['content'] | trim")


def test_a_template_that_reformats_the_last_answer_is_fed_from_the_first_difference(byte_tokenizer):
    """The template trims the answer " Hi " to "Hi": the model has seen " Hi " (the trailing space's token is
    pending, never fed), so the next turn warns and feeds the rendering from the first character that differs,
    which is where the answer begins."""
    template = byte_tokenizer.chat_template
    assert "message['content']" in template
    try:
        byte_tokenizer.chat_template = _trimming_template(byte_tokenizer)
        chat, wrapper = _chat(byte_tokenizer, [" Hi ", "Fine."])
        assert chat.ask("Hello") == " Hi "
        first_turn = byte_tokenizer.decode(wrapper.fed, skip_special_tokens=False)
        seen = chat.seen_text
        fed_before = len(wrapper.fed)
        with pytest.warns(UserWarning, match="re-formats the last answer"):
            assert chat.ask("How are you?") == "Fine."
        rendered = byte_tokenizer.apply_chat_template(chat.messages[:-1], tokenize=False, add_generation_prompt=True)
        answer_start = rendered.index("Hi<|im_end|>")
        assert first_turn == seen and seen[:answer_start] == rendered[:answer_start]
        prompt_fed = wrapper.fed[fed_before : fed_before + chat.last_turn.fed_tokens]
        assert byte_tokenizer.decode(prompt_fed, skip_special_tokens=False) == rendered[answer_start:]
    finally:
        byte_tokenizer.chat_template = template


def test_a_template_that_rewrites_earlier_turns_is_refused(byte_tokenizer):
    """A rendering that changes text the model saw before the last answer (here: the number of messages, at the
    top) cannot be streamed: ValueError, and nothing of the turn is fed."""
    template = byte_tokenizer.chat_template
    try:
        byte_tokenizer.chat_template = "{{ messages | length }} messages\n" + template
        chat, wrapper = _chat(byte_tokenizer, ["Hi", "Fine."])
        chat.ask("Hello")
        fed_before = len(wrapper.fed)
        with pytest.raises(ValueError, match="rewrites earlier turns"):
            chat.ask("How are you?")
        assert len(wrapper.fed) == fed_before
    finally:
        byte_tokenizer.chat_template = template


class _Clock:
    """Stands in for generation.py's `time`: each perf_counter() reads `step` seconds more than the one before, so a
    stream's timings are exact counts of its clock readings."""

    def __init__(self, start: float = 10.0, step: float = 0.25):
        self.now, self.step = start - step, step

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


def test_a_streams_timings_are_its_prefill_and_decode_intervals(word_tokenizer, monkeypatch):
    """The clock is read before and after the prompt (0.25 s apart here), then after each fed token and at the
    end: decode_seconds grows by 0.25 s per token fed, tokens_per_second is new tokens over decode_seconds, and
    nan before any decoding (not a division by zero)."""
    import streaming_llm.generation as generation

    monkeypatch.setattr(generation, "time", _Clock())
    stream = generate_stream(ScriptedWrapper(len(WORDS)).speak([2, 3, 4]), word_tokenizer, [5, 6], max_new_tokens=3)
    assert stream.tokens_per_second != stream.tokens_per_second  # nan
    seen = [(piece.token_id, stream.prefill_seconds, stream.decode_seconds) for piece in stream]
    assert seen == [(2, 0.25, 0.0), (3, 0.25, 0.25), (4, 0.25, 0.75)]
    assert stream.stop_reason == "length" and stream.tokens_per_second == 4.0


def test_a_stream_ended_by_a_reset_keeps_its_decode_time(word_tokenizer, monkeypatch):
    import streaming_llm.generation as generation

    monkeypatch.setattr(generation, "time", _Clock())
    wrapper = ScriptedWrapper(len(WORDS)).speak([2, 3, 4])
    wrapper.cache = object()
    stream = generate_stream(wrapper, word_tokenizer, [5, 6], max_new_tokens=3)
    for piece in stream:
        wrapper.cache = object()  # as wrapper.reset() makes a new cache
    assert piece.token_id == 2 and stream.stop_reason == "reset" and stream.pending_token is None
    assert (stream.prefill_seconds, stream.decode_seconds, stream.tokens_per_second) == (0.25, 0.25, 4.0)


def test_a_chat_turns_seconds_are_its_prefill_and_decode_time(byte_tokenizer, monkeypatch):
    import streaming_llm.generation as generation

    monkeypatch.setattr(generation, "time", _Clock())
    chat, _ = _chat(byte_tokenizer, ["Hi"])
    assert chat.ask("Hello") == "Hi"
    turn = chat.last_turn
    assert (turn.new_tokens, turn.stop_reason) == (2, "eos")  # "Hi" and <|im_end|>
    assert (turn.seconds, turn.tokens_per_second) == (0.25 + 0.5, 2 / 0.5)


@pytest.mark.parametrize("progress, blocks, shown", [(False, 4, False), (True, 3, False), (True, 4, True)])
def test_the_prompts_progress_bar_shows_from_four_blocks_and_is_cleared(word_tokenizer, capsys, progress, blocks, shown):
    """progress=True shows a bar while a prompt of four blocks or more is fed (fewer go by too fast to need one), and
    clears it when done; progress=False never shows one. The prompt is fed one block per call."""
    wrapper = ScriptedWrapper(len(WORDS), next_logits=lambda: torch.tensor([0.0, 0.0, 1.0, 0, 0, 0, 0, 0]))
    stream = generate_stream(wrapper, word_tokenizer, [3, 4, 5, 6][:blocks], max_new_tokens=1, prefill_block_size=1,
                             progress=progress)
    assert [piece.token_id for piece in stream] == [2]
    assert wrapper.fed == [3, 4, 5, 6][:blocks] and wrapper.calls == blocks
    err = capsys.readouterr().err
    assert ("prompt" in err) is shown and "\n" not in err


def test_a_prefill_block_size_below_one_is_refused_before_anything_is_fed(word_tokenizer):
    wrapper = ScriptedWrapper(len(WORDS)).speak([2])
    with pytest.raises(ValueError, match="prefill_block_size must be an integer >= 1, got 0"):
        generate_stream(wrapper, word_tokenizer, [3], prefill_block_size=0)
    assert wrapper.fed == []


@pytest.mark.parametrize("prompt, named", [([1, 8], "token id 8 ("), ([-1, 2], "token id -1 (negative)"),
                                           ([-1, 9], "token id 9 (")])
def test_a_prompt_id_outside_the_vocabulary_is_named(word_tokenizer, prompt, named):
    """The refusal names the id out of range: the one past the vocabulary's end when there is one, else the negative
    one."""
    assert len(WORDS) == 8
    with pytest.raises(ValueError, match=re.escape(named)):
        generate_stream(ScriptedWrapper(len(WORDS)).speak([2]), word_tokenizer, prompt, max_new_tokens=1)


def test_a_chat_answers_up_to_256_tokens_by_default(byte_tokenizer):
    """A model that never ends its answer is cut at the documented default of 256 new tokens a turn."""
    word = ids_of(byte_tokenizer, " la")[0]

    def next_logits():
        logits = torch.zeros(len(byte_tokenizer))
        logits[word] = 10.0
        return logits

    chat = StreamingChat(ScriptedWrapper(len(byte_tokenizer), next_logits), byte_tokenizer, stop_token_ids=())
    chat.ask("Sing.")
    assert (chat.last_turn.new_tokens, chat.last_turn.stop_reason) == (256, "length")


def test_a_chats_max_new_tokens_is_checked_when_it_is_made(byte_tokenizer):
    """max_new_tokens=0 is refused by the constructor, not at the first send(); 1 answers one token a turn."""
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        _chat(byte_tokenizer, ["Hi there"], max_new_tokens=0)
    chat, _ = _chat(byte_tokenizer, ["Hi there"], max_new_tokens=1)
    assert chat.ask("Hello") == "Hi" and (chat.last_turn.new_tokens, chat.last_turn.stop_reason) == (1, "length")


def test_send_refuses_max_new_tokens_below_one_when_called(byte_tokenizer):
    """send(max_new_tokens=0) is refused by the call itself, as a bad user_text is, not later by its first piece."""
    chat, wrapper = _chat(byte_tokenizer, ["Hi"])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        chat.send("Hello", max_new_tokens=0)
    assert wrapper.fed == [] and chat.ask("Hello", max_new_tokens=1) == "Hi"


def test_the_re_formatting_warning_points_at_the_code_that_iterates_the_answer(byte_tokenizer):
    """The warning is attributed to the caller's file (where the answer is iterated), not to generation.py or to
    whatever called the caller."""
    template = byte_tokenizer.chat_template
    try:
        byte_tokenizer.chat_template = _trimming_template(byte_tokenizer)
        chat, _ = _chat(byte_tokenizer, [" Hi ", "Fine."])
        chat.ask("Hello")
        with pytest.warns(UserWarning, match="re-formats the last answer") as warned:
            answer = []
            for piece in chat.send("How are you?"):  # (a comprehension is a frame of its own in 3.11)
                answer.append(piece.text)
        assert "".join(answer) == "Fine." and [record.filename for record in warned] == [__file__]
    finally:
        byte_tokenizer.chat_template = template


def test_a_chat_feeds_a_long_turn_without_a_progress_bar(byte_tokenizer, capsys):
    """A user turn of four prompt blocks or more (here ~1000 tokens) is fed quietly: a chat shows only its answer."""
    end = byte_tokenizer.convert_tokens_to_ids("<|im_end|>")
    wrapper = ScriptedWrapper(len(byte_tokenizer), next_logits=lambda: torch.nn.functional.one_hot(
        torch.tensor(end), len(byte_tokenizer)).float())
    chat = StreamingChat(wrapper, byte_tokenizer, stop_token_ids={end})
    assert chat.ask("la " * 1000) == "" and chat.last_turn.stop_reason == "eos" and len(wrapper.fed) > 3 * 256
    assert "prompt" not in capsys.readouterr().err


def test_a_chat_records_the_answer_as_it_continues_a_short_turn(word_tokenizer):
    """A turn fed in fewer tokens than the decoder's context (here two, with a template that renders only the
    messages' text): the recorded answer keeps the leading space its context gives, as the answer itself has it."""
    template = word_tokenizer.chat_template
    try:
        word_tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
        wrapper = ScriptedWrapper(len(WORDS)).speak(ids_of(word_tokenizer, "is dead") + [1])
        chat = StreamingChat(wrapper, word_tokenizer, stop_token_ids={1})
        assert chat.ask("the king") == " is dead" and wrapper.fed == ids_of(word_tokenizer, "the king is dead")
        assert chat.messages[-1] == {"role": "assistant", "content": " is dead"}
    finally:
        word_tokenizer.chat_template = template


def test_a_chat_feeds_the_last_token_of_an_answer_as_it_was_sampled(word_tokenizer):
    """The last token of an answer, sampled but not fed, is fed first at the next turn where the rendering holds its
    text, as it continues the answer (" dead"). Here the template glues the next message to it ("dead" + "long"):
    tokenizing that text again would make one unknown word of the two."""
    template = word_tokenizer.chat_template
    try:
        word_tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
        wrapper = ScriptedWrapper(len(WORDS)).speak(ids_of(word_tokenizer, "king is dead live"))
        chat = StreamingChat(wrapper, word_tokenizer, max_new_tokens=3, stop_token_ids={1})
        assert chat.ask("the") == " king is dead"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert chat.ask("long", max_new_tokens=1) == " live"
        assert wrapper.fed == ids_of(word_tokenizer, "the king is dead long")
    finally:
        word_tokenizer.chat_template = template


def test_the_repetition_window_of_a_chat_holds_every_fed_token_of_the_previous_answer(byte_tokenizer):
    """The previous answer's tokens all enter the window (not only its first): here its second token, most likely
    again (1.0), is penalised to 0.01, under another token's 0.5."""
    paris, rome = ids_of(byte_tokenizer, "Paris") + ids_of(byte_tokenizer, "Rome")
    other = ids_of(byte_tokenizer, "Oslo")[0]
    end = byte_tokenizer.convert_tokens_to_ids("<|im_end|>")
    steps = iter([{paris: 10.0}, {rome: 10.0}, {end: 10.0}, {rome: 1.0, other: 0.5}])
    chat = _penalised_chat(byte_tokenizer, steps, end)
    assert chat.ask("Two capitals?") == "ParisRome"
    assert [piece.token_id for piece in chat.send("One more?", max_new_tokens=1)] == [other]


def test_the_streamed_text_leaves_out_special_tokens_that_are_not_stop_tokens(byte_tokenizer):
    """A special token sampled mid-answer (here <|im_start|>, no stop token) is a Piece of its own with no text, as
    model.generate's decode(skip_special_tokens=True) would show it."""
    start = byte_tokenizer.convert_tokens_to_ids("<|im_start|>")
    script = ids_of(byte_tokenizer, "Hello") + [start] + ids_of(byte_tokenizer, " there")
    wrapper = ScriptedWrapper(len(byte_tokenizer)).speak(script)
    pieces = list(generate_stream(wrapper, byte_tokenizer, ids_of(byte_tokenizer, "Say"), max_new_tokens=len(script)))
    assert [piece.token_id for piece in pieces] == script and "".join(piece.text for piece in pieces) == "Hello there"


@pytest.mark.parametrize("cut", [2, 3], ids=["one_byte", "two_bytes"])
def test_a_chat_answer_cut_inside_a_character_is_continued_from_its_own_bytes(byte_tokenizer, cut):
    """An answer cut by max_new_tokens inside a multi-byte character (龘 is three byte tokens here) renders as U+FFFD
    in the next turn's template; the model is fed on from the bytes it sampled, with no re-formatting warning,
    not from the replacement character's own three bytes."""
    answer = ids_of(byte_tokenizer, "a龘")
    assert len(answer) == 4  # "a" and the character's three bytes
    end = byte_tokenizer.convert_tokens_to_ids("<|im_end|>")
    chat, wrapper = _chat(byte_tokenizer, ["a龘"])
    assert chat.ask("x", max_new_tokens=cut) == "a\ufffd"
    start = len(wrapper.fed) - (cut - 1)  # where the answer's fed tokens begin (all but the last sampled)
    wrapper.speak(ids_of(byte_tokenizer, "ok") + [end])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert chat.ask("y") == "ok"
    assert wrapper.fed[start : start + cut + 1] == answer[:cut] + [end]
