"""One StreamingKVCache across three model.generate() calls: a conversation longer than the cache.

Each call gets the whole conversation so far (previous output + the new user turn); generate() asks the
cache how many tokens it has seen (cache.get_seq_length()) and feeds only the rest, so no turn is fed
twice and positions carry on across calls.

    python examples/multi_turn.py [MODEL]     (default: the embedded SmolLM2-135M-Instruct)
"""

import sys

import torch

from streaming_llm import StreamingKVCache, load_model, prepare_model
from streaming_llm.cli_common import run_script

QUESTIONS = ["What is the capital of France?", "Tell me three facts about it.", "And what river runs through it?"]


def main():
    model, tokenizer = load_model(sys.argv[1] if len(sys.argv) > 1 else None)
    prepare_model(model)
    cache = StreamingKVCache(n_sink=4, window_size=60)  # 64 tokens: far less than the conversation

    messages = []
    seen_text = ""  # the conversation as the model has read it so far
    conversation = torch.zeros((1, 0), dtype=torch.long)
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        # The template renders the whole conversation; feed only what extends what the model has read.
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered.startswith(seen_text), "this chat template rewrites earlier turns"
        new_ids = tokenizer(rendered[len(seen_text) :], add_special_tokens=False, return_tensors="pt").input_ids
        conversation = torch.cat([conversation, new_ids], dim=1)
        output = model.generate(conversation, attention_mask=torch.ones_like(conversation), past_key_values=cache,
                                max_new_tokens=80, do_sample=False)
        answer_ids = output[0, conversation.shape[1] :]
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        seen_text = rendered + tokenizer.decode(answer_ids)  # with the end-of-turn token, if the model wrote it
        conversation = output
        print(f"> {question}\n{answer}\n[{conversation.shape[1]} tokens so far; "
              f"the cache holds {cache.get_cache_length()}]\n")


if __name__ == "__main__":  # a model that cannot be loaded: one line, exit status 2; Ctrl-C: 130, no traceback
    sys.exit(run_script(main))
