"""The Python generation API: model.generate() with a StreamingKVCache across turns and with a streamer,
generate_stream's sampling / detokenisation / stop rules, StreamingChat's incremental feeding, examples/.

Model: the tiny random Llama with the embedded SmolLM2 tokenizer, saved by test_cli.py's checkpoint helper.
"""

from __future__ import annotations

import runpy
import sys
import warnings
from pathlib import Path
from threading import Thread

import pytest
import torch
from test_cli import tiny_checkpoint
from transformers import TextIteratorStreamer

from streaming_llm import FastStreamingWrapper, StreamingKVCache, StreamingLLMWrapper, load_model, prepare_model
from streaming_llm.generation import (
    IncrementalDecoder,
    SamplingConfig,
    StopStringFilter,
    StreamingChat,
    TokenSampler,
    end_of_turn_ids,
    generate_stream,
)

N_SINK, WINDOW_SIZE = 4, 60
CAPACITY = N_SINK + WINDOW_SIZE
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


def load_tiny(model_dir: Path):
    """A fresh (model, tokenizer); eos switched off so greedy runs always reach max_new_tokens."""
    model, tokenizer = load_model(model_dir)
    model.generation_config.eos_token_id = None
    return model, tokenizer


def user_turn(tokenizer, text: str) -> torch.Tensor:
    """The ids of one templated user turn followed by the assistant prompt (SmolLM2's ChatML)."""
    return torch.tensor(tokenizer(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])


WRAPPERS = {"general": StreamingLLMWrapper, "static_step": FastStreamingWrapper}


@pytest.mark.parametrize("wrapper_kind", WRAPPERS)
def test_multi_turn_generate_with_streamer_equals_the_wrapper_loop(model_dir, wrapper_kind):
    """Three generate() calls through one cache, each passed the whole conversation; a TextIteratorStreamer
    shows the text. The wrapper's step loop (generate_stream), fed the same tokens, picks the same ones; with
    FastStreamingWrapper its steps take the static decode step and each new turn the general block path."""
    model, tokenizer = load_tiny(model_dir)
    prepare_model(model)
    cache = StreamingKVCache(n_sink=N_SINK, window_size=WINDOW_SIZE)
    wrapper = WRAPPERS[wrapper_kind](load_tiny(model_dir)[0], n_sink=N_SINK, window_size=WINDOW_SIZE)
    new_tokens = 90

    conversation = torch.zeros(0, dtype=torch.long)
    pending: list[int] = []  # the wrapper's side: the last token of a turn is fed with the next turn
    for question in ["What is streaming attention?", "Why keep sink tokens?", "Summarise."]:
        user_ids = user_turn(tokenizer, question)
        conversation = torch.cat([conversation, user_ids])
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}
        arguments = dict(
            input_ids=conversation[None], attention_mask=torch.ones(1, len(conversation), dtype=torch.long), past_key_values=cache,
            max_new_tokens=new_tokens, do_sample=False, streamer=streamer, pad_token_id=0,
        )
        thread = Thread(target=lambda: result.update(sequences=model.generate(**arguments)))
        thread.start()
        streamed = "".join(streamer)
        thread.join()
        sequences = result["sequences"][0]
        assert torch.equal(sequences[: len(conversation)], conversation)
        generated = sequences[len(conversation) :].tolist()
        assert len(generated) == new_tokens and cache.get_cache_length() <= CAPACITY

        stream = generate_stream(wrapper, tokenizer, pending + user_ids.tolist(), max_new_tokens=new_tokens)
        pieces = list(stream)
        assert [piece.token_id for piece in pieces] == generated
        assert streamed == "".join(piece.text for piece in pieces) == tokenizer.decode(generated, skip_special_tokens=True)
        assert stream.stop_reason == "length" and stream.pending_token == generated[-1]
        pending = [stream.pending_token]
        conversation = sequences

    assert len(conversation) > 3 * CAPACITY
    assert cache.get_seq_length() == wrapper.tokens_seen == len(conversation) - 1
    assert cache.get_cache_length() == wrapper.cache.get_cache_length() == CAPACITY


REFUSED_STRATEGIES = {
    "beam search": (dict(num_beams=2), "beam search is not supported"),
    "prompt lookup": (dict(prompt_lookup_num_tokens=3), "speculative decoding"),
    "assistant model": ("assistant", "speculative decoding"),
}


@pytest.mark.parametrize("strategy", REFUSED_STRATEGIES)
def test_generate_refuses_strategies_that_take_tokens_back(model_dir, strategy):
    """Beam search reorders the cache's rows and speculative decoding crops rejected draft tokens: neither can
    work once tokens are evicted, and each is refused with a sentence naming it (speculative decoding was an
    AttributeError from inside transformers: the cache's layers had no crop)."""
    model, tokenizer = load_tiny(model_dir)
    prepare_model(model)
    options, message = REFUSED_STRATEGIES[strategy]
    if options == "assistant":
        options = dict(assistant_model=load_tiny(model_dir)[0])
    ids = user_turn(tokenizer, "Tell me a long story.")[None]
    with pytest.raises(NotImplementedError, match=message):
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=StreamingKVCache(n_sink=N_SINK, window_size=WINDOW_SIZE),
                       max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=tokenizer.eos_token_id, **options)


def test_a_continued_cache_given_more_sequences_names_why_its_batch_grew(model_dir):
    """A conversation's cache (one stream) handed to generate() with num_return_sequences=2 was refused with
    '... got 2 (reset it first)', advice that loses the conversation; the message now says what multiplied the batch,
    and the cache is left as it was."""
    model, tokenizer = load_tiny(model_dir)
    prepare_model(model)
    cache = StreamingKVCache(n_sink=N_SINK, window_size=WINDOW_SIZE)
    ids = user_turn(tokenizer, "Tell me a long story.")[None]
    options = dict(max_new_tokens=4, pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
    answer = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False, **options)
    seen = cache.get_seq_length()
    more = torch.cat([answer, ids], dim=1)
    with pytest.raises(ValueError, match=r"holds a batch of 1 streams; got 2 \(a stream goes on with its batch size: "
                                         r"generate\(\) with num_return_sequences or num_beams > 1 multiplies it"):
        model.generate(more, attention_mask=torch.ones_like(more), past_key_values=cache, num_return_sequences=2,
                       do_sample=True, **options)
    assert cache.get_seq_length() == seen


class RecordingWrapper:
    """A StreamingLLMWrapper that records every token fed; with `end_after`, the end-of-turn token wins
    the greedy choice once that many single tokens were fed in a turn (so some answers end by eos)."""

    def __init__(self, wrapper: StreamingLLMWrapper, end_id: int, end_after: int | None = None):
        self.inner, self.end_id, self.end_after = wrapper, end_id, end_after
        self.fed: list[int] = []
        self.steps_in_turn = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reset(self):
        self.inner.reset()
        self.fed = []

    def __call__(self, input_ids):
        self.fed += input_ids[0].tolist()
        self.steps_in_turn = self.steps_in_turn + 1 if input_ids.shape[1] == 1 else 0
        logits = self.inner(input_ids)
        if self.end_after is not None and self.steps_in_turn >= self.end_after:
            logits[..., self.end_id] = logits.max() + 1
        return logits


@pytest.mark.parametrize("wrapper_kind", WRAPPERS)
@pytest.mark.parametrize("end_after", [None, 5], ids=["answers-cut-by-length", "answers-end-with-eos"])
def test_chat_feeds_each_turn_once_and_matches_the_template(model_dir, end_after, wrapper_kind):
    """After every user turn, the tokens fed so far decode to exactly the template's rendering of the
    conversation: each turn adds only its suffix, and no token of the history is fed twice."""
    model, tokenizer = load_tiny(model_dir)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    wrapper = RecordingWrapper(WRAPPERS[wrapper_kind](model, n_sink=N_SINK, window_size=WINDOW_SIZE), end_id, end_after)
    chat = StreamingChat(wrapper, tokenizer, system_prompt="Be brief.", max_new_tokens=12)
    assert end_id in chat.stop_token_ids
    for turn, question in enumerate(["Hello!", "What is 2 + 2?", "Why?", "Thanks, bye."]):
        for index, piece in enumerate(chat.send(question)):
            if index == 0:
                rendered = tokenizer.apply_chat_template(chat.messages, tokenize=False, add_generation_prompt=True)
                assert tokenizer.decode(wrapper.fed, skip_special_tokens=False) == rendered
        assert chat.last_turn.stop_reason == ("eos" if end_after else "length")
        assert chat.last_turn.new_tokens == (end_after + 1 if end_after else 12)
        assert len(chat.messages) == 1 + 2 * (turn + 1) and chat.messages[-1]["role"] == "assistant"
        assert wrapper.tokens_seen == len(wrapper.fed)
    assert wrapper.tokens_seen > CAPACITY and wrapper.cache.get_cache_length() == CAPACITY
    chat.reset()
    assert wrapper.tokens_seen == 0 and chat.messages == [{"role": "system", "content": "Be brief."}]
    assert isinstance(chat.ask("Again?"), str) and chat.turns == 1


def test_chat_reset_during_an_answer_abandons_it(model_dir):
    """reset() called while an answer was iterated: the answer went on, feeding its tokens into the new, empty cache,
    and was recorded as the new conversation's first turn (an assistant message and no user one), so the next turn
    warned that the template "re-formats the last answer" and fed after those stray tokens. It now ends there."""
    model, tokenizer = load_tiny(model_dir)
    wrapper = RecordingWrapper(StreamingLLMWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE), end_id=-1)
    chat = StreamingChat(wrapper, tokenizer, system_prompt="Be brief.", max_new_tokens=12)
    answer = chat.send("Hello!")
    next(answer)
    chat.reset()
    assert list(answer) == [] and wrapper.fed == [] and chat.turns == 0 and chat.last_turn is None
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = chat.ask("Hello!")
    fresh = StreamingChat(StreamingLLMWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE), tokenizer,
                          system_prompt="Be brief.", max_new_tokens=12)
    assert again == fresh.ask("Hello!") and chat.messages == fresh.messages


def test_chat_refuses_to_go_on_after_an_interrupted_model_step(model_dir):
    """KeyboardInterrupt (Ctrl-C in a notebook or a script) in the middle of a model step left that token in some
    layers' cache, or all of them, while the answer was recorded with it as not yet fed: the next turn fed it again,
    silently (tokens_seen one more than the tokens of the conversation). The next send() is now a RuntimeError that
    asks for reset(). Stopping the iteration between two tokens stays clean: the answer is recorded and the next turn
    goes on from it."""
    model, tokenizer = load_tiny(model_dir)
    wrapper = RecordingWrapper(StreamingLLMWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE), end_id=-1)
    chat = StreamingChat(wrapper, tokenizer, max_new_tokens=12)
    answer = chat.send("Hello!")
    for index, _ in enumerate(answer):
        if index == 2:
            break
    answer.close()
    assert chat.last_turn.stop_reason == "interrupted" and chat.last_turn.new_tokens == 3
    assert wrapper.tokens_seen == len(wrapper.fed)

    steps = []

    def interrupt_the_third_step(module, args, output):
        steps.append(args[0].shape[1] == 1)
        if sum(steps) == 3 and steps[-1]:
            raise KeyboardInterrupt  # after the first layer has stored the token

    hook = model.model.layers[0].register_forward_hook(interrupt_the_third_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            chat.ask("Why?")
    finally:
        hook.remove()
    with pytest.raises(RuntimeError, match=r"ended with KeyboardInterrupt .* call reset\(\)"):
        chat.send("Go on.")
    assert chat.turns == 1  # the broken answer is not recorded
    chat.reset()
    fresh = StreamingChat(StreamingLLMWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE), tokenizer, max_new_tokens=12)
    assert chat.ask("Go on.") == fresh.ask("Go on.")


def test_chat_names_what_ended_a_broken_answer(model_dir):
    """An answer broken off by generate_stream's refusal (its wrapper fed by a call of its own between two tokens): the
    next send() said only that the answer "ended with RuntimeError while the model was fed", which reads as a failure
    of the model; it now quotes the refusal, which names the feed from outside."""
    model, tokenizer = load_tiny(model_dir)
    wrapper = StreamingLLMWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE)
    chat = StreamingChat(wrapper, tokenizer, max_new_tokens=8)
    answer = chat.send("Hello!")
    next(answer)
    wrapper(torch.tensor([[5, 6, 7]]))
    with pytest.raises(RuntimeError, match="fed outside this generation"):
        next(answer)
    with pytest.raises(RuntimeError, match=r"ended with RuntimeError \(the wrapper's stream was fed outside this generation .*\) "
                                           r"while the model was fed, .* call reset\(\)"):
        chat.send("And then?")


SHARED_WRAPPER = {
    "a second StreamingChat made on it": lambda chat, wrapper: StreamingChat(wrapper, chat.tokenizer).ask("Hi!"),
    "a call of the wrapper": lambda chat, wrapper: wrapper(torch.tensor([[5, 6, 7]])),
    "wrapper.reset() during an answer": lambda chat, wrapper: [wrapper.reset() for _ in chat.send("Hmm?")],
    "an answer left unfinished": lambda chat, wrapper: [answer := chat.send("Hmm?"), next(answer), next(answer)],
}


@pytest.mark.parametrize("outside", SHARED_WRAPPER)
def test_chat_refuses_to_go_on_after_its_wrapper_was_reset_or_fed_outside_it(model_dir, outside):
    """Between two turns of a StreamingChat, its wrapper was reset (by a second StreamingChat made on it, or during an
    answer) or fed (by a call of its own, or an answer still suspended): the next turn fed only its new part, so the
    model answered without the conversation, or with another's tokens in it, silently. send() now refuses, saying why,
    until reset(); the conversation then starts again as a fresh one."""
    model, tokenizer = load_tiny(model_dir)
    wrapper = StreamingLLMWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE)
    chat = StreamingChat(wrapper, tokenizer, max_new_tokens=8)
    chat.ask("Hello!")
    kept = SHARED_WRAPPER[outside](chat, wrapper)  # an unfinished answer is kept suspended until the refusal
    with pytest.raises(RuntimeError, match=r"wrapper was reset or fed outside it since its last answer .* call reset\(\)"):
        chat.send("And then?")
    del kept
    chat.reset()
    fresh = StreamingChat(StreamingLLMWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE), tokenizer, max_new_tokens=8)
    assert chat.ask("And then?") == fresh.ask("And then?") and chat.ask("Why?") == fresh.ask("Why?")


@pytest.mark.parametrize("wrapper_kind", WRAPPERS)
def test_chat_goes_on_on_its_wrapper_reset_before_its_first_turn(model_dir, wrapper_kind):
    """wrapper.reset() between making a StreamingChat and its first turn leaves an empty stream, which holds all of the
    conversation so far: its first send() was refused as if the wrapper had been reset in the middle of it. A wrapper fed
    before the first turn is still refused."""
    model, tokenizer = load_tiny(model_dir)
    wrapper = WRAPPERS[wrapper_kind](model, n_sink=N_SINK, window_size=WINDOW_SIZE)
    chat = StreamingChat(wrapper, tokenizer, max_new_tokens=4)
    wrapper.reset()
    fresh = StreamingChat(WRAPPERS[wrapper_kind](model, n_sink=N_SINK, window_size=WINDOW_SIZE), tokenizer, max_new_tokens=4)
    assert [chat.ask("Hello!"), chat.ask("And then?")] == [fresh.ask("Hello!"), fresh.ask("And then?")]
    chat.reset()
    wrapper(torch.tensor([[5, 6, 7]]))
    with pytest.raises(RuntimeError, match="wrapper was reset or fed outside it"):
        chat.send("Hello!")


def test_chat_goes_on_on_a_fast_wrapper_last_reset_for_another_batch_size(model_dir):
    """A FastStreamingWrapper reset for (or fed) a batch of 2 before a StreamingChat was made on it starts a new stream,
    a new cache object, for the first turn's batch of 1: the chat's second send() was refused as if the wrapper had
    been reset outside it."""
    model, tokenizer = load_tiny(model_dir)
    wrapper = FastStreamingWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE, compile="never")
    wrapper.reset(batch_size=2)
    chat = StreamingChat(wrapper, tokenizer, max_new_tokens=4)
    fresh = StreamingChat(FastStreamingWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE, compile="never"), tokenizer,
                          max_new_tokens=4)
    assert [chat.ask("Hello!"), chat.ask("And then?")] == [fresh.ask("Hello!"), fresh.ask("And then?")]


@pytest.mark.parametrize("wrapper_kind", WRAPPERS)
def test_generate_stream_ends_when_its_wrapper_is_reset(model_dir, wrapper_kind):
    """wrapper.reset() while a generate_stream was iterated: the stream went on, feeding its tokens into the new, empty
    stream (as StreamingChat.reset() did before 911bfa3). It now ends after the Piece being handled, stop_reason
    "reset", with nothing fed into the new stream and no pending token to continue from."""
    model, tokenizer = load_tiny(model_dir)
    wrapper = WRAPPERS[wrapper_kind](model, n_sink=N_SINK, window_size=WINDOW_SIZE)
    prompt = tokenizer("A long time ago")["input_ids"]
    stream = generate_stream(wrapper, tokenizer, prompt, max_new_tokens=20)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 3:
            wrapper.reset()
    assert len(pieces) == 3 and stream.stop_reason == "reset" and stream.pending_token is None
    assert wrapper.tokens_seen == 0 and stream.new_tokens == 3
    again = [piece.token_id for piece in generate_stream(wrapper, tokenizer, prompt, max_new_tokens=5)]
    fresh = WRAPPERS[wrapper_kind](model, n_sink=N_SINK, window_size=WINDOW_SIZE)
    assert again == [piece.token_id for piece in generate_stream(fresh, tokenizer, prompt, max_new_tokens=5)]
    assert again[:3] == [piece.token_id for piece in pieces]


@pytest.mark.parametrize("wrapper_kind", WRAPPERS)
@pytest.mark.parametrize("other", ["the wrapper itself", "another generate_stream"])
def test_generate_stream_refuses_to_go_on_after_its_wrapper_was_fed_elsewhere(model_dir, wrapper_kind, other):
    """A generate_stream suspended between two tokens while the same wrapper was fed by a call of its own or by a second
    generate_stream: resumed, it fed its token after those and sampled from their logits as if they were its own (each
    of two interleaved streams then continued neither's text). It now refuses to go on, saying why; the other stream
    and the wrapper are left as they are."""
    model, tokenizer = load_tiny(model_dir)
    wrapper = WRAPPERS[wrapper_kind](model, n_sink=N_SINK, window_size=WINDOW_SIZE)
    first, second = tokenizer("A long time ago")["input_ids"], tokenizer("Once upon a time")["input_ids"]
    stream = iter(generate_stream(wrapper, tokenizer, first, max_new_tokens=20))
    taken = [next(stream).token_id for _ in range(3)]  # the first two are fed, the third is pending
    if other == "the wrapper itself":
        wrapper(torch.tensor([second]))
    else:
        intruder = iter(generate_stream(wrapper, tokenizer, second, max_new_tokens=6))
        intruded = [next(intruder).token_id]
    seen = wrapper.tokens_seen
    with pytest.raises(RuntimeError, match=r"fed outside this generation since it last fed it \(\+\d+ tokens.*give "
                                           r"each stream a wrapper of its own"):
        next(stream)
    assert wrapper.tokens_seen == seen
    if other == "another generate_stream":  # the second goes on, after the first's prompt and its two fed tokens
        intruded += [piece.token_id for piece in intruder]
        fresh = WRAPPERS[wrapper_kind](model, n_sink=N_SINK, window_size=WINDOW_SIZE)
        fresh(torch.tensor([first + taken[:2]]))
        assert intruded == [piece.token_id for piece in generate_stream(fresh, tokenizer, second, max_new_tokens=6)]


def test_generate_stream_does_not_rebuild_the_static_steps_cache_per_token(model_dir, monkeypatch):
    """generate_stream looks after each token whether its wrapper was reset. It read `wrapper.cache`, which on a
    FastStreamingWrapper rebuilds every layer's slot positions after static steps (RingLayer.resume): a few tensor
    operations per layer and token, 37% of a CPU step, kernel launches on a GPU. It now compares the cache object as it
    is (`current_cache`): nothing is rebuilt while it generates."""
    from streaming_llm.cache import RingLayer

    model, tokenizer = load_tiny(model_dir)
    wrapper = FastStreamingWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE)
    resumed = []
    resume = RingLayer.resume
    monkeypatch.setattr(RingLayer, "resume", lambda layer, *args: resumed.append(layer) or resume(layer, *args))
    pieces = list(generate_stream(wrapper, tokenizer, tokenizer("A long time ago")["input_ids"], max_new_tokens=20))
    assert len(pieces) == 20 and resumed == []
    assert wrapper.cache.get_seq_length() == wrapper.tokens_seen and len(resumed) == len(wrapper.cache.layers)


def test_generate_stream_stop_rules(model_dir):
    model, tokenizer = load_tiny(model_dir)
    wrapper = StreamingLLMWrapper(model, n_sink=N_SINK, window_size=WINDOW_SIZE)
    prompt = tokenizer("A long time ago")["input_ids"]
    reference = list(generate_stream(wrapper, tokenizer, prompt, max_new_tokens=40))
    ids, text = [piece.token_id for piece in reference], "".join(piece.text for piece in reference)

    wrapper.reset()  # a stop token id ends the stream; its Piece is the last one
    stream = generate_stream(wrapper, tokenizer, prompt, max_new_tokens=40, stop_token_ids={ids[7]})
    assert [piece.token_id for piece in stream] == ids[: ids.index(ids[7]) + 1] and stream.stop_reason == "eos"

    wrapper.reset()  # a stop string ends the text right before it
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stream = generate_stream(wrapper, tokenizer, prompt, max_new_tokens=40, stop=[stop, "never appears"])
    assert "".join(piece.text for piece in stream) == text[: text.index(stop)] and stream.stop_reason == "stop"

    wrapper.reset()  # prefill in blocks of 3 is exact: the same greedy tokens
    assert [p.token_id for p in generate_stream(wrapper, tokenizer, prompt, max_new_tokens=40, prefill_block_size=3)] == ids

    wrapper.reset()
    stream = generate_stream(wrapper, tokenizer, prompt, max_new_tokens=1)
    assert len(list(stream)) == 1 and stream.stop_reason == "length" and wrapper.tokens_seen == len(prompt)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_stream(wrapper, tokenizer, [], max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_stream(wrapper, tokenizer, prompt, max_new_tokens=0)


def test_end_of_turn_ids_include_the_template_closing_token(model_dir):
    model, tokenizer = load_model(model_dir)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tokenizer, model)


def test_incremental_decoder_never_splits_characters(model_dir):
    _, tokenizer = load_model(model_dir)
    text = " naïve café — 日本語のテキスト 🙂🚀 and ASCII again\n\tend"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some pieces do end inside a character
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    assert len(decoder.tokens) <= 8  # constant memory


def test_stop_string_filter_holds_back_only_possible_prefixes():
    stopper = StopStringFilter(["</s>", "STOP"])
    assert stopper.push("hello <") == ("hello ", False)
    assert stopper.push("/") == ("", False)
    assert stopper.push("x> ok ST") == ("</x> ok ", False)
    assert stopper.push("OP and more") == ("", True)
    stopper = StopStringFilter(["ab", "b"])
    assert stopper.push("xab") == ("x", True)  # the earliest match wins
    assert StopStringFilter([]).push("anything") == ("anything", False)


def test_sampler():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    best = int(logits.argmax())
    assert TokenSampler(SamplingConfig())(logits) == best
    assert TokenSampler(SamplingConfig(temperature=1.0, top_k=1, seed=0))(logits) == best
    assert TokenSampler(SamplingConfig(temperature=1.0, top_p=1e-6, seed=0))(logits) == best
    draws = [[TokenSampler(SamplingConfig(temperature=1.0, seed=seed))(logits) for _ in range(5)] for seed in (7, 7, 8)]
    sampler = TokenSampler(SamplingConfig(temperature=1.0, seed=7))
    assert [sampler(logits) for _ in range(20)] != [sampler(logits) for _ in range(20)]  # the generator advances
    assert draws[0] == draws[1] != draws[2]  # a seed repeats its draws; another seed draws others
    # The repetition penalty only looks at the recent window: the best token, recently seen, loses to the second.
    second = int(logits.topk(2).indices[1])
    penalised = TokenSampler(SamplingConfig(repetition_penalty=1e3))
    assert penalised(logits, recent=[best]) == second and penalised(logits, recent=[]) == best


@pytest.mark.parametrize("top_k, top_p", [(0, 0.5), (0, 0.999), (40, 0.8), (40, 1.0)])
def test_sampler_candidates_are_exact_top_k_then_top_p(top_k, top_p):
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 2
    _, ids = TokenSampler(SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p))._candidates(logits)
    values, order = torch.sort(logits, descending=True)  # the definition, over the sorted vocabulary
    if top_k:
        values, order = values[:top_k], order[:top_k]
    probabilities = torch.softmax(values, dim=-1)
    expected = order[(torch.cumsum(probabilities, dim=-1) - probabilities) < top_p]
    assert ids.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "field, value, message",
    [("temperature", -0.1, "temperature"), ("top_p", 0.0, "top_p"), ("top_k", -1, "top_k"), ("repetition_penalty", 0.0, "repetition_penalty"), ("repetition_window", 0, "repetition_window")],
)
def test_sampling_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**{field: value})


def run_example(example: str, monkeypatch, *argv: str) -> int:
    """`python examples/<example> argv...` in this process: its exit status. A KeyboardInterrupt it lets out (a
    traceback for its user) fails the test instead of stopping pytest."""
    monkeypatch.setattr(sys, "argv", [example, *argv])
    try:
        with pytest.raises(SystemExit) as exit:
            runpy.run_path(str(EXAMPLES / example), run_name="__main__")
    except KeyboardInterrupt:
        pytest.fail(f"{example} let a KeyboardInterrupt out")
    return exit.value.code


EXAMPLE_SCRIPTS = ["generate_stream.py", "multi_turn.py", "chat_wrapper.py"]


@pytest.mark.parametrize("example", EXAMPLE_SCRIPTS)
def test_examples_run(example, model_dir, monkeypatch, capsys):
    assert run_example(example, monkeypatch, str(model_dir)) == 0
    out = capsys.readouterr().out
    assert "cache" in out


@pytest.mark.parametrize("example", EXAMPLE_SCRIPTS)
def test_examples_refuse_a_bad_model_in_one_line_and_stop_quietly_on_ctrl_c(example, tmp_path, monkeypatch, capsys):
    """A model path that does not exist (or Ctrl-C) ended the examples in a traceback; they run under run_script, as
    the experiment scripts do: '<example>: error: <reason>', exit status 2; Ctrl-C, exit status 130 and no traceback."""
    import streaming_llm

    assert run_example(example, monkeypatch, str(tmp_path / "no-such-model")) == 2
    assert capsys.readouterr().err == f"{example}: error: model path not found or not a folder: {tmp_path / 'no-such-model'}\n"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming_llm, "load_model", interrupted)
    assert run_example(example, monkeypatch) == 130
    assert capsys.readouterr().err == "\n"
