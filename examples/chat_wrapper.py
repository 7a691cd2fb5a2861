"""The wrapper API: StreamingLLMWrapper + generate_stream for endless text, StreamingChat for a conversation.

    python examples/chat_wrapper.py [MODEL]     (default: the embedded SmolLM2-135M-Instruct)
"""

import sys

from streaming_llm import StreamingLLMWrapper, load_model
from streaming_llm.cli_common import run_script
from streaming_llm.generation import SamplingConfig, StreamingChat, generate_stream


def main():
    model, tokenizer = load_model(sys.argv[1] if len(sys.argv) > 1 else None)
    wrapper = StreamingLLMWrapper(model, n_sink=4, window_size=124)  # a cache of 128 tokens

    # Endless text: the prompt is fed in blocks, then one token at a time; sampling is seeded.
    prompt_ids = tokenizer("The old lighthouse stood", add_special_tokens=False)["input_ids"]
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=0)
    stream = generate_stream(wrapper, tokenizer, prompt_ids, sampling, max_new_tokens=150)
    for piece in stream:
        print(piece.text, end="", flush=True)
    print(f"\n[{stream.new_tokens} tokens at {stream.tokens_per_second:.1f} tokens/s; cache {wrapper.cache.get_cache_length()}/{wrapper.cache_capacity}]\n")

    # A conversation: each turn feeds only its new tokens through the same fixed cache.
    chat = StreamingChat(wrapper, tokenizer, max_new_tokens=60)  # starts from an empty cache
    for question in ["Hi! Who are you?", "What is a lighthouse for?", "Summarise our chat in one sentence."]:
        print(f"> {question}")
        for piece in chat.send(question):
            print(piece.text, end="", flush=True)
        print(f"\n[{chat.last_turn.new_tokens} tokens; {wrapper.tokens_seen} seen, cache {wrapper.cache.get_cache_length()}/{wrapper.cache_capacity}]\n")


if __name__ == "__main__":  # a model that cannot be loaded: one line, exit status 2; Ctrl-C: 130, no traceback
    sys.exit(run_script(main))
