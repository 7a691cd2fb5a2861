"""model.generate() with a StreamingKVCache and a TextIteratorStreamer: text appears as it is produced, and
the cache never holds more than n_sink + window_size tokens, however many are generated.

    python examples/generate_stream.py [MODEL]     (default: the embedded SmolLM2-135M-Instruct)
"""

import sys
from threading import Thread

from transformers import TextIteratorStreamer

from streaming_llm import StreamingKVCache, load_model, prepare_model
from streaming_llm.cli_common import run_script


def print_text(streamer):
    for text in streamer:
        print(text, end="", flush=True)


def main():
    model, tokenizer = load_model(sys.argv[1] if len(sys.argv) > 1 else None)
    prepare_model(model)  # attention now runs through a StreamingKVCache whenever one is passed
    cache = StreamingKVCache(n_sink=4, window_size=124)  # 128 tokens at most: the answer below runs past it

    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    # A thread prints the text as generate() produces it (a daemon: Ctrl-C during generate() need not wait for it).
    printer = Thread(target=print_text, args=(streamer,), daemon=True)
    printer.start()
    model.generate(**inputs, past_key_values=cache, streamer=streamer, max_new_tokens=200, do_sample=False)
    printer.join()
    print(f"\n[cache holds {cache.get_cache_length()} tokens of the {cache.get_seq_length()} seen]")


if __name__ == "__main__":  # a model that cannot be loaded: one line, exit status 2; Ctrl-C: 130, no traceback
    sys.exit(run_script(main))
