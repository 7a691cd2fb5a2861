"""Behaviour of streaming_llm.generation that no other test pinned down, found by the sixth mutation round (a seeded
sample of generation.py's mutants against the generation tests). The stand-ins (a word-level tokenizer, the embedded
byte-level one, ScriptedWrapper with scripted logits) are test_generation_mutants.py's."""

from __future__ import annotations

import dataclasses

import pytest

from streaming_llm.generation import end_of_turn_ids, generate_stream
import test_generation_mutants as earlier

byte_tokenizer, word_tokenizer = earlier.byte_tokenizer, earlier.word_tokenizer  # the fixtures, shared


def test_a_callable_that_is_no_wrapper_is_refused_by_name(word_tokenizer):
    """A tokenizer is callable, but it is no wrapper (no model, no reset): arguments given in the wrong order are a
    TypeError naming the wrapper, before anything is fed, not an error from inside the tokenizer. So is a callable
    that holds a model but cannot be reset (a transformers pipeline, say)."""
    named = f"^wrapper must be a StreamingLLMWrapper .* around the model, got {type(word_tokenizer).__name__}$"
    with pytest.raises(TypeError, match=named):
        generate_stream(word_tokenizer, word_tokenizer, [2, 3], max_new_tokens=1)

    class Pipeline:
        def __init__(self):
            self.model = earlier.ScriptedWrapper(len(earlier.WORDS)).speak([2]).model
            self.fed = []

        def __call__(self, input_ids):
            self.fed.append(input_ids)

    pipeline = Pipeline()
    with pytest.raises(TypeError, match="^wrapper must be a StreamingLLMWrapper .* around the model, got Pipeline$"):
        generate_stream(pipeline, word_tokenizer, [2, 3], max_new_tokens=1)
    assert pipeline.fed == []


def test_a_template_that_leaves_the_answer_out_adds_no_closing_token(byte_tokenizer):
    """end_of_turn_ids looks for the text a template puts after an answer; a template that renders only the user's
    messages has none, and only the eos ids end a turn (its rendering is read whole, no error)."""
    template = byte_tokenizer.chat_template
    try:
        byte_tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n"
                                        "{% endif %}{% endfor %}")
        assert end_of_turn_ids(byte_tokenizer) == {byte_tokenizer.eos_token_id}
    finally:
        byte_tokenizer.chat_template = template


def test_pieces_and_turn_results_are_frozen(byte_tokenizer):
    """What a stream yields and a chat records cannot be changed by whoever holds it (a Piece handed to a callback, the
    TurnResult a caller keeps)."""
    chat, _ = earlier._chat(byte_tokenizer, ["Hi"])
    pieces = list(chat.send("Hello"))
    assert "".join(piece.text for piece in pieces) == "Hi" == chat.last_turn.answer
    with pytest.raises(dataclasses.FrozenInstanceError):
        pieces[0].text = "changed"
    with pytest.raises(dataclasses.FrozenInstanceError):
        chat.last_turn.answer = "changed"
