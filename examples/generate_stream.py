"""model.generate() with a StreamingKVCache and a TextIteratorStreamer: text appears as it is produced, and
the cache never holds more than n_sink + window_size tokens, however many are generated.

    python examples/generate_stream.py [MODEL]     (default: the embedded SmolLM2-135M-Instruct)
"""

import sys
from threading import Thread

from transformers import TextIteratorStreamer

from streaming_llm import StreamingKVCache, load_model, prepare_model

model, tokenizer = load_model(sys.argv[1] if len(sys.argv) > 1 else None)
prepare_model(model)  # attention now runs through a StreamingKVCache whenever one is passed
cache = StreamingKVCache(n_sink=4, window_size=124)  # 128 tokens at most: the answer below runs past it

messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
arguments = dict(**inputs, past_key_values=cache, streamer=streamer, max_new_tokens=200, do_sample=False)
thread = Thread(target=model.generate, kwargs=arguments)
thread.start()
for text in streamer:
    print(text, end="", flush=True)
thread.join()
print(f"\n[cache holds {cache.get_cache_length()} tokens of the {cache.get_seq_length()} seen]")
