"""Differential fuzzing of the wrappers' *lifecycle*: random programs of operations on streams, each checked against a
fresh StreamingLLMWrapper fed the stream's tokens in one go.

Every program is drawn from one integer seed (random.Random(seed)): a tiny model (Llama, GPT-NeoX, or Gemma 3 with a
small sliding window on one layer), one or two stream configurations (n_sink 0-3, window_size 2-8, a position mode;
StreamingLLMWrapper, sometimes with MIT storage, or FastStreamingWrapper(compile="never")), batch 1 or 2, and 15-40
operations on a set of streams that share the model: feed a block, fast.step(), reset() (fast: reset(batch_size=...)),
Cache.reset(), copy.deepcopy of a wrapper (a new stream), a wrapper dropped (its kept caches go on), a fork
(copy.deepcopy(wrapper.cache) given to a new StreamingLLMWrapper, or to a FastStreamingWrapper), one wrapper's cache
given to another (shared), pickle / torch.save
round trips of a wrapper or of its cache, model(ids, past_key_values=cache) with any position_ids, model.generate(...,
past_key_values=cache), reads of cache / current_cache / tokens_seen (with the bookkeeping checks of
tiny_models.check_bookkeeping), a cache reference kept and fed later or given back, generate_stream consumed in part and
resumed later, StreamingChat turns; any of them under torch.inference_mode().

The oracle keeps, for every cache object, the token ids it should hold (its "shadow": its tokens since its last reset).
After every feeding operation the logits returned are compared with those of a StreamingLLMWrapper of the same model and
configuration fed the shadow in one block (fp32, max |dlogit| <= 1e-4, as the tests), and tokens_seen with the shadow's
length. Outcomes per operation: ok; refused (a RuntimeError / ValueError / TypeError / NotImplementedError raised in
streaming_llm's own code with a one-line message; the program goes on, after reset() where the message asks for it);
fail (a logit mismatch, a wrong count, an operation that ran on a stream it should have refused, or any other exception,
such as one raised inside torch or transformers).

    python tests/lifecycle_campaign.py --minutes 25 --start 0    # seeds 0, 1, 2, ... for 25 minutes (--log FILE)
    python tests/lifecycle_campaign.py --replay SEED              # one program, every operation printed
    python tests/lifecycle_campaign.py --replay SEED --ops 12     # its first 12 operations only (to shrink by hand)
    python tests/lifecycle_campaign.py --summarize LOG --out results/fuzz/NAME.json

Standalone, not a test (its name does not start with test_): one process, one thread.
"""

from __future__ import annotations

import argparse
import copy
import dis
import io
import json
import os
import pickle
import random
import re
import sys
import time
import traceback
import warnings
from collections import Counter

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

from tiny_models import VOCAB_SIZE, build_gpt_neox, build_llama, build_llama_family, check_bookkeeping  # noqa: E402
from tiny_models import tokenizer_of  # noqa: E402

from streaming_llm import StreamingLLMWrapper  # noqa: E402
from streaming_llm.fast import FastStreamingWrapper  # noqa: E402
from streaming_llm.generation import StreamingChat, generate_stream  # noqa: E402

TOLERANCE = 1e-4
POSITION_MODES = ("pos_shift", "rerotate", "absolute")
PACKAGE = os.path.join(os.path.dirname(HERE), "streaming_llm")
REFUSALS = (RuntimeError, ValueError, TypeError, NotImplementedError)

_MODELS: dict = {}
# --autograd: some operations run with autograd on (docs: the cache is for inference; it runs, and warns). Off by
# default: a cache fed so holds tensors with autograd history, which copy.deepcopy and pickle refuse inside torch.
AUTOGRAD = False


def get_model(kind: str, window: int | None):
    key = (kind, window)
    if key not in _MODELS:
        if kind == "llama":
            _MODELS[key] = build_llama()
        elif kind == "gpt_neox":
            _MODELS[key] = build_gpt_neox()
        else:  # Gemma 3: a sliding layer of window W, then a full-attention one, two RoPEs
            _MODELS[key] = build_llama_family("gemma3_text", sliding_window=window)
    return _MODELS[key]


_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = tokenizer_of(["[UNK]", "<s>"] + [f"w{i}" for i in range(2, VOCAB_SIZE)])
        _TOKENIZER.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return _TOKENIZER


class Fail(Exception):
    """The oracle disagrees with what the package did."""


class Recording:
    """A wrapper as StreamingChat sees it, recording every block fed and its logits (StreamingChat feeds what it
    renders; the oracle needs the ids)."""

    def __init__(self, inner):
        self.inner = inner
        self.fed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reset(self):
        self.inner.reset()

    def __call__(self, input_ids):
        logits = self.inner(input_ids)
        self.fed.append((input_ids.clone(), logits.clone()))
        return logits


class Stream:
    def __init__(self, wrapper, kind: str, config: dict, name: str):
        self.wrapper, self.kind, self.config, self.name = wrapper, kind, config, name
        self.chat = None

    def __repr__(self):
        return self.name


def raised_by_statement(error: BaseException) -> bool:
    """Whether the innermost frame raised `error` with a `raise` statement (the package's own refusal), not a call of a
    torch op that failed in C++ (read from the bytecode: the source on disk may change while a campaign runs)."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code.co_code
    return code[tb.tb_lasti] in (dis.opmap["RAISE_VARARGS"], dis.opmap.get("RERAISE", -1))


def describe(shadow) -> str:
    return shadow if isinstance(shadow, str) else str(tuple(shadow.shape))


def empty(batch: int) -> torch.Tensor:
    return torch.zeros(batch, 0, dtype=torch.long)


class Program:
    def __init__(self, seed: int, verbose: bool = False, max_ops: int | None = None):
        self.seed, self.verbose = seed, verbose
        rng = self.rng = random.Random(seed)
        self.kind = rng.choice(["llama", "llama", "gpt_neox", "gemma3"])
        self.window = rng.randint(2, 10) if self.kind == "gemma3" else None
        base = get_model(self.kind, self.window)
        self.model = copy.deepcopy(base)  # the streams' shared model (never the cached one)
        self.configs = []
        for _ in range(rng.choice([1, 1, 2])):
            self.configs.append(dict(n_sink=rng.randint(0, 3), window_size=rng.randint(2, 8),
                                     position_mode=rng.choice(POSITION_MODES)))
        self.n_ops = rng.randint(15, 40)
        if max_ops is not None:
            self.n_ops = min(self.n_ops, max_ops)
        self.shadows: dict[int, list] = {}  # id(cache) -> [cache, shadow [b, T] or "ended"]
        self.streams: list[Stream] = []
        self.kept: list = []  # cache objects kept aside
        self.generations: list = []  # suspended generate_stream iterations
        self.references: dict = {}
        self.counts = Counter()
        self.refusals: list = []
        self.failures: list = []
        self.names = 0
        self.log = []

    # -- oracle ------------------------------------------------------------------------------------------------
    def say(self, text):
        self.log.append(text)
        if self.verbose:
            print(text, flush=True)

    def track(self, cache, shadow) -> None:
        self.shadows[id(cache)] = [cache, shadow]

    def shadow(self, cache):
        entry = self.shadows.get(id(cache))
        if entry is None or entry[0] is not cache:
            raise Fail(f"an untracked cache object {type(cache).__name__} (seen {cache.get_seq_length()})")
        return entry[1]

    def reference(self, config: dict, shadow: torch.Tensor) -> torch.Tensor:
        key = json.dumps(config, sort_keys=True)
        if key not in self.references:
            self.references[key] = StreamingLLMWrapper(self.model, **config)
        ref = self.references[key]
        ref.reset()
        with torch.no_grad():
            return ref(shadow).float()

    def compare(self, config, shadow, logits, start: int, what: str) -> float:
        """logits [b, n, vocab] of the shadow's positions start..start+n-1."""
        expected = self.reference(config, shadow)[:, start:start + logits.shape[1]]
        if expected.shape != logits.shape:
            raise Fail(f"{what}: logits shape {tuple(logits.shape)}, expected {tuple(expected.shape)}")
        diff = (logits.detach().float() - expected).abs().max().item()
        if not diff <= TOLERANCE:
            raise Fail(f"{what}: max |dlogit| {diff:.3g} over {tuple(logits.shape)} at positions {start}..")
        return diff

    def check_count(self, stream: Stream, shadow) -> None:
        if isinstance(shadow, str):
            return
        seen = stream.wrapper.tokens_seen
        if seen != shadow.shape[1]:
            raise Fail(f"{stream}: tokens_seen {seen}, the stream holds {shadow.shape[1]}")

    def config_of(self, cache) -> dict:
        return dict(n_sink=cache.n_sink, window_size=cache.window_size, position_mode=cache.position_mode)

    # -- drawing -------------------------------------------------------------------------------------------------
    def ids(self, batch: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.rng.randrange(2**31))
        return torch.randint(0, VOCAB_SIZE, (batch, n), generator=g)

    def block_length(self, config) -> int:
        capacity = config["n_sink"] + config["window_size"]
        return self.rng.choice([1, 1, 1, 2, 3, capacity, capacity + 1, self.rng.randint(1, 2 * capacity + 3)])

    def batch_for(self, shadow) -> int:
        if not isinstance(shadow, str) and shadow.shape[1]:
            return shadow.shape[0]
        return self.rng.choice([1, 1, 2])

    def new_stream(self, config=None, kind=None) -> Stream:
        config = config or self.rng.choice(self.configs)
        kind = kind or self.rng.choice(["general", "general", "fast", "fast", "mit"])
        self.names += 1
        name = f"{kind}{self.names}"
        if kind == "fast":
            wrapper = FastStreamingWrapper(self.model, compile="never", **config)
            if self.rng.random() < 0.3:
                wrapper.reset(batch_size=self.rng.choice([1, 2]))
        else:
            wrapper = StreamingLLMWrapper(self.model, streaming_mode="mit" if kind == "mit" else "ours", **config)
        stream = Stream(wrapper, "general" if kind == "mit" else kind, config, name)
        self.track(wrapper.current_cache, empty(1))
        self.streams.append(stream)
        return stream

    # -- operations ----------------------------------------------------------------------------------------------
    def op_feed(self, s: Stream):
        before = self.shadow(s.wrapper.current_cache)
        batch = self.batch_for(before)
        if not isinstance(before, str) and before.shape[1] and self.rng.random() < 0.05:
            batch = 3 - batch  # another batch size on a stream under way: refused
        ids = self.ids(batch, self.block_length(s.config))
        use_step = s.kind == "fast" and ids.shape[1] == 1 and self.rng.random() < 0.6
        self.say(f"  {s}.{'step' if use_step else '__call__'}({tuple(ids.shape)}) on {describe(before)}")
        logits = s.wrapper.step(ids) if use_step else s.wrapper(ids)
        return self.fed(s, before, ids, logits)

    def fed(self, s: Stream, before, ids, logits):
        if isinstance(before, str):
            raise Fail(f"{s}: a stream ended by reset() was fed without refusal")
        if before.shape[1] and before.shape[0] != ids.shape[0]:
            raise Fail(f"{s}: a batch of {ids.shape[0]} fed to a stream of {before.shape[0]} without refusal")
        after = torch.cat([before if before.shape[1] else empty(ids.shape[0]), ids], dim=1)
        self.track(s.wrapper.current_cache, after)  # (a fast wrapper takes a new batch with a new cache object)
        self.compare(s.config, after, logits, after.shape[1] - ids.shape[1], f"{s} fed {tuple(ids.shape)}")
        self.check_count(s, after)

    def op_reset(self, s: Stream):
        old = s.wrapper.current_cache
        if s.kind == "fast" and self.rng.random() < 0.5:
            batch = self.rng.choice([1, 2])
            self.say(f"  {s}.reset(batch_size={batch})")
            s.wrapper.reset(batch_size=batch)
        else:
            self.say(f"  {s}.reset()")
            s.wrapper.reset()
        self.after_reset(s, old)
        self.check_count(s, empty(1))

    def after_reset(self, s: Stream, old) -> None:
        """A FastStreamingWrapper's reset() zeroes the buffers its own cache holds: that cache's stream has ended (not
        when it allocates new ones, for another batch size: the old ones, and their stream, are left as they were)."""
        held = getattr(s.wrapper, "keys", None)
        if (s.kind == "fast" and getattr(old, "_wrapper", lambda: None)() is s.wrapper and old.layers
                and held is not None and old.layers[0].keys is held[0]):
            self.shadows[id(old)][1] = "ended"
        self.track(s.wrapper.current_cache, empty(1))

    def op_cache_reset(self, s: Stream):
        cache = s.wrapper.cache
        self.say(f"  {s}.cache.reset()")
        cache.reset()
        self.track(cache, empty(1))

    def op_deepcopy(self, s: Stream):
        self.say(f"  copy.deepcopy({s})")
        shadow = self.shadow(s.wrapper.current_cache)
        copied = copy.deepcopy(s.wrapper)
        self.names += 1
        new = Stream(copied, s.kind, s.config, f"copy{self.names}_of_{s}")
        self.track(copied.current_cache, shadow.clone() if not isinstance(shadow, str) else shadow)
        self.streams.append(new)
        if not isinstance(shadow, str):
            self.check_count(new, shadow)

    def op_fork(self, s: Stream):
        shadow = self.shadow(s.wrapper.current_cache)
        into_fast = self.rng.random() < 0.15
        self.say(f"  fork {s}: copy.deepcopy(cache) into a new {'Fast' if into_fast else 'StreamingLLM'}Wrapper")
        copied = copy.deepcopy(s.wrapper.cache)
        self.track(copied, shadow.clone() if not isinstance(shadow, str) else shadow)
        new = self.new_stream(s.config, "fast" if into_fast else "general")
        new.wrapper.cache = copied
        if not isinstance(shadow, str):
            self.check_count(new, shadow)

    def op_share(self, s: Stream):
        others = [o for o in self.streams if o is not s and o.config == s.config]
        if not others:
            return self.op_fork(s)
        other = self.rng.choice(others)
        self.say(f"  {other}.cache = {s}.cache (shared)")
        other.wrapper.cache = s.wrapper.cache

    def op_pickle_wrapper(self, s: Stream):
        shadow = self.shadow(s.wrapper.current_cache)
        use_torch = self.rng.random() < 0.3
        self.say(f"  {'torch.save' if use_torch else 'pickle'} round trip of {s}")
        if use_torch:
            buffer = io.BytesIO()
            torch.save(s.wrapper, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
        else:
            loaded = pickle.loads(pickle.dumps(s.wrapper))
        self.names += 1
        new = Stream(loaded, s.kind, s.config, f"loaded{self.names}_of_{s}")
        self.track(loaded.current_cache, shadow.clone() if not isinstance(shadow, str) else shadow)
        self.streams.append(new)
        if not isinstance(shadow, str):
            self.check_count(new, shadow)

    def op_pickle_cache(self, s: Stream):
        cache = s.wrapper.cache
        shadow = self.shadow(cache)
        loaded = pickle.loads(pickle.dumps(cache))
        self.track(loaded, shadow.clone() if not isinstance(shadow, str) else shadow)
        if s.kind == "general" and self.rng.random() < 0.5:
            self.say(f"  {s}.cache = pickle round trip of its cache")
            s.wrapper.cache = loaded
        else:
            new = self.new_stream(s.config, "general")
            self.say(f"  {new}.cache = pickle round trip of {s}.cache")
            new.wrapper.cache = loaded

    def _model_feed(self, cache, model, what: str):
        shadow = self.shadow(cache)
        config = self.config_of(cache)
        batch = self.batch_for(shadow) if not isinstance(shadow, str) else 1
        ids = self.ids(batch, self.block_length(config))
        seen = 0 if isinstance(shadow, str) else shadow.shape[1]
        kwargs = {}
        choice = self.rng.choice(["none", "none", "stream", "zeros", "random"])
        if choice == "stream":
            kwargs["position_ids"] = torch.arange(seen, seen + ids.shape[1]).expand(batch, -1)
        elif choice == "zeros":
            kwargs["position_ids"] = torch.zeros_like(ids)
        elif choice == "random":
            kwargs["position_ids"] = torch.randint(0, 50, (batch, 1)) + torch.arange(ids.shape[1])
        if self.rng.random() < 0.3:
            kwargs["attention_mask"] = torch.ones(batch, seen + ids.shape[1], dtype=torch.long)
        self.say(f"  model({tuple(ids.shape)}, past_key_values={what}, {sorted(kwargs)} positions={choice}) on "
                 f"{shadow if isinstance(shadow, str) else tuple(shadow.shape)}")
        logits = model(ids, past_key_values=cache, use_cache=True, **kwargs).logits
        if isinstance(shadow, str):
            raise Fail(f"model(..., past_key_values={what}) ran on a stream ended by reset()")
        if shadow.shape[1] and shadow.shape[0] != batch:
            raise Fail(f"{what}: a batch of {batch} fed to a stream of {shadow.shape[0]} without refusal")
        after = torch.cat([shadow if shadow.shape[1] else empty(batch), ids], dim=1)
        self.track(cache, after)
        self.compare(config, after, logits, seen, f"model() on {what}")

    def op_model_call(self, s: Stream):
        cache = s.wrapper.cache if self.rng.random() < 0.7 else s.wrapper.current_cache
        self._model_feed(cache, s.wrapper.model, f"{s}.cache")
        self.check_count(s, self.shadow(s.wrapper.current_cache))

    def op_generate(self, s: Stream):
        cache = s.wrapper.cache
        shadow = self.shadow(cache)
        batch = self.batch_for(shadow)
        new = self.ids(batch, self.rng.randint(1, 4))
        ended = isinstance(shadow, str)
        prompt = torch.cat([shadow if not ended and shadow.shape[1] else empty(batch), new], dim=1)
        if ended:  # as long as the count it had: generate() feeds what is past it
            prompt = torch.cat([self.ids(batch, cache.get_seq_length()), new], dim=1)
        k = self.rng.randint(1, 6)
        self.say(f"  {s}.model.generate(prompt {tuple(prompt.shape)}, past_key_values={s}.cache, max_new_tokens={k})")
        output = s.wrapper.model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                                          max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                          return_dict_in_generate=True, output_logits=True)
        if ended:
            raise Fail(f"generate on {s}: ran on a stream ended by reset()")
        sequences = output.sequences
        after = sequences[:, :-1]
        self.track(cache, after)
        logits = torch.stack([step.float() for step in output.logits], dim=1)
        self.compare(s.config, after, logits, prompt.shape[1] - 1, f"generate on {s}")
        self.check_count(s, self.shadow(s.wrapper.current_cache))

    def op_read(self, s: Stream):
        self.say(f"  read {s}.cache / current_cache / tokens_seen")
        current = s.wrapper.current_cache
        shadow = self.shadow(current)
        if isinstance(shadow, str):
            return
        seen = s.wrapper.tokens_seen
        cache = s.wrapper.cache
        if cache is not current:
            raise Fail(f"{s}: cache is not current_cache")
        if seen != shadow.shape[1]:
            raise Fail(f"{s}: tokens_seen {seen}, the stream holds {shadow.shape[1]}")
        if shadow.shape[1]:
            try:
                check_bookkeeping(cache, shadow.shape[1])
            except AssertionError as error:
                raise Fail(f"{s}: bookkeeping {error!r}") from None

    def op_keep(self, s: Stream):
        cache = s.wrapper.cache if self.rng.random() < 0.6 else s.wrapper.current_cache
        self.say(f"  keep a reference to {s}'s cache")
        self.kept.append(cache)

    def op_feed_kept(self, s: Stream):
        if not self.kept:
            return self.op_keep(s)
        cache = self.rng.choice(self.kept)
        self._model_feed(cache, self.model, "a kept cache")

    def op_restore_kept(self, s: Stream):
        candidates = [c for c in self.kept if self.config_of(c) == s.config]
        if not candidates:
            return self.op_keep(s)
        cache = self.rng.choice(candidates)
        self.say(f"  {s}.cache = a kept cache ({describe(self.shadow(cache))})")
        s.wrapper.cache = cache  # (an ended one: a FastStreamingWrapper refuses it here, a StreamingLLMWrapper when fed)

    def op_generate_stream(self, s: Stream):
        shadow = self.shadow(s.wrapper.current_cache)
        if isinstance(shadow, str) or (shadow.shape[1] and shadow.shape[0] != 1):
            return self.op_feed(s)
        prompt = self.ids(1, self.rng.randint(1, 4))[0]
        k = self.rng.randint(1, 6)
        take = self.rng.randint(0, k)
        self.say(f"  generate_stream({s}, prompt {len(prompt)}, max_new_tokens={k}): take {take}")
        generation = generate_stream(s.wrapper, tokenizer(), prompt.tolist(), max_new_tokens=k)
        iterator = iter(generation)
        state = {"stream": s, "iterator": iterator, "generation": generation, "left": k}
        for _ in range(take):
            self._next_piece(state, first=state.get("fed") is None, prompt=prompt)
        if 0 < take < k:
            self.generations.append(state)

    def _next_piece(self, state, first=False, prompt=None):
        s = state["stream"]
        if first:
            shadow = self.shadow(s.wrapper.current_cache)
            shadow = torch.cat([shadow if shadow.shape[1] else empty(1), prompt[None]], dim=1)
        else:
            shadow = torch.cat([state["fed"], torch.tensor([[state["last"]]])], dim=1)
        piece = next(state["iterator"])
        self.track(s.wrapper.current_cache, shadow)
        self.check_count(s, shadow)
        expected = self.reference(s.config, shadow)[0, -1]
        if expected[piece.token_id] < expected.max() - TOLERANCE:
            raise Fail(f"generate_stream on {s}: picked {piece.token_id}, the reference's argmax is {int(expected.argmax())}")
        state.update(fed=shadow, last=piece.token_id, cache=s.wrapper.current_cache)
        state["left"] -= 1

    def op_resume_generation(self, s: Stream):
        if not self.generations:
            return self.op_generate_stream(s)
        state = self.generations.pop(self.rng.randrange(len(self.generations)))
        s = state["stream"]
        current = s.wrapper.current_cache
        changed = current is not state["cache"]
        moved = not changed and s.wrapper.tokens_seen != state["fed"].shape[1]
        self.say(f"  resume a generate_stream on {s} (reset since: {changed}, fed since: {moved})")
        if changed:
            try:
                next(state["iterator"])
            except StopIteration:
                if state["generation"].stop_reason != "reset":
                    raise Fail(f"a generation whose wrapper was reset ended with {state['generation'].stop_reason}")
                return
            raise Fail("a generation went on after its wrapper was reset")
        if moved:
            next(state["iterator"])  # refused (RuntimeError) is right
            raise Fail("a generation went on after its wrapper was fed elsewhere")
        self._next_piece(state)
        if state["left"] > 0:
            self.generations.append(state)

    def op_chat(self, s: Stream):
        if s.chat is None or self.rng.random() < 0.2:
            self.say(f"  StreamingChat({s})")
            old = s.wrapper.current_cache
            s.chat = StreamingChat(Recording(s.wrapper), tokenizer(), max_new_tokens=4, stop_token_ids=[])
            self.after_reset(s, old)
        chat, recording = s.chat, s.chat.wrapper
        before = self.shadow(s.wrapper.current_cache)
        words = " ".join(f"w{self.rng.randint(2, VOCAB_SIZE - 1)}" for _ in range(self.rng.randint(1, 3)))
        k = self.rng.randint(1, 5)
        self.say(f"  chat.ask({words!r}, max_new_tokens={k}) on {s} {tuple(before.shape) if not isinstance(before, str) else before}")
        recording.fed = []
        try:
            chat.ask(words, max_new_tokens=k)
        except BaseException:
            s.chat = None
            raise
        if isinstance(before, str):
            raise Fail(f"chat on {s}: fed an ended stream")
        shadow = before if before.shape[1] else empty(1)
        for ids, logits in recording.fed:
            shadow = torch.cat([shadow, ids], dim=1)
            self.compare(s.config, shadow, logits.float(), shadow.shape[1] - ids.shape[1], f"chat on {s}")
        self.track(s.wrapper.current_cache, shadow)
        self.check_count(s, shadow)

    OPS = {"feed": 30, "reset": 5, "cache_reset": 1, "deepcopy": 3, "fork": 4, "share": 2, "pickle_wrapper": 2,
           "pickle_cache": 3, "model_call": 8, "generate": 6, "read": 6, "keep": 4, "feed_kept": 4, "restore_kept": 3,
           "generate_stream": 4, "resume_generation": 3, "chat": 2, "new_stream": 2, "drop": 2}

    def op_drop(self, s: Stream):
        """`del wrapper`: the caches kept from it go on (feed_kept, restore_kept) as it left them. Half the time a
        FastStreamingWrapper's cache is kept first and the wrapper takes static steps before it goes (the kept layers
        then lag behind its buffers until the wrapper brings them up to date)."""
        if s.kind == "fast" and self.rng.random() < 0.5:
            self.kept.append(s.wrapper.cache)
            for _ in range(self.rng.randint(1, 3)):
                before = self.shadow(s.wrapper.current_cache)
                if isinstance(before, str) or not before.shape[1]:
                    break
                ids = self.ids(before.shape[0], 1)
                self.say(f"  keep {s}.cache, then {s}.step({tuple(ids.shape)})")
                self.fed(s, before, ids, s.wrapper.step(ids))
        if len(self.streams) == 1:
            self.op_new_stream(s)
        self.say(f"  del {s} (what was kept of it goes on)")
        self.streams.remove(s)
        self.generations = [state for state in self.generations if state["stream"] is not s]  # (they hold it)
        s.wrapper = None

    def op_new_stream(self, s: Stream):
        new = self.new_stream()
        self.say(f"  new stream {new} {new.config}")

    # -- running -------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.time()
        self.say(f"seed {self.seed}: {self.kind} W={self.window} configs={self.configs}")
        for _ in range(self.rng.randint(1, 3)):
            stream = self.new_stream()
            self.say(f"  new stream {stream} {stream.config}")
        names, weights = zip(*self.OPS.items())
        for index in range(self.n_ops):
            op = self.rng.choices(names, weights)[0]
            stream = self.rng.choice(self.streams)
            mode = self.rng.choices(["no_grad", "inference_mode", "grad"], [70, 25, 5 if AUTOGRAD else 0])[0]
            self.say(f"op {index}: {op} [{mode}]")
            context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
            try:
                with context():
                    getattr(self, f"op_{op}")(stream)
                self.counts["ok"] += 1
            except Fail as error:
                self.counts["fail"] += 1
                self.failures.append({"op": index, "name": op, "kind": "fail", "message": str(error)[:500]})
                self.say(f"  FAIL: {error}")
                if self.verbose:
                    traceback.print_exc()
                break
            except StopIteration:  # a generation ended (its stream reset): nothing to check
                self.counts["ok"] += 1
            except Exception as error:
                tb = traceback.extract_tb(error.__traceback__)
                origin = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
                message = f"{type(error).__name__}: {error}"
                ours = tb and os.path.abspath(tb[-1].filename).startswith(PACKAGE) and raised_by_statement(error)
                if isinstance(error, REFUSALS) and ours and "\n" not in str(error).strip():
                    self.counts["refused"] += 1
                    self.refusals.append({"op": index, "name": op, "message": message[:300],
                                          "origin": os.path.relpath(tb[-1].filename, os.path.dirname(PACKAGE))
                                          + f":{tb[-1].lineno}"})
                    self.say(f"  refused: {message[:300]}")
                    try:
                        self.recover(stream, message)
                    except Exception as failure:  # reset() itself failed
                        self.counts["fail"] += 1
                        self.failures.append({"op": index, "name": "reset after a refusal", "kind": "error",
                                              "message": f"{type(failure).__name__}: {failure}"[:500]})
                        self.say(f"  ERROR in reset(): {failure!r}")
                        break
                else:
                    self.counts["fail"] += 1
                    self.failures.append({"op": index, "name": op, "kind": "error", "message": message[:500],
                                          "origin": origin})
                    self.say(f"  ERROR: {message[:500]} at {origin}")
                    if self.verbose:
                        traceback.print_exc()
                    break
        return {"seed": self.seed, "model": self.kind, "sliding_window": self.window, "configs": self.configs,
                "ops": sum(self.counts.values()), "outcomes": dict(self.counts), "refusals": self.refusals,
                "failures": self.failures, "seconds": round(time.time() - started, 2)}

    def recover(self, stream: Stream, message: str) -> None:
        """After a refusal that asks for a reset, the streams it names start again; any other leaves every stream as
        it was (a refusal changes nothing)."""
        if "reset" not in message:
            return
        for s in self.streams:
            try:
                shadow = self.shadow(s.wrapper.current_cache)
                if isinstance(shadow, str) or s.wrapper.tokens_seen != shadow.shape[1]:
                    raise Fail("")
            except Exception:
                self.say(f"  (recover: {s}.reset())")
                s.wrapper.reset()
                self.track(s.wrapper.current_cache, empty(1))
                s.chat = None
        self.kept = [c for c in self.kept if not isinstance(self.shadows[id(c)][1], str)]
        self.generations = []


def summarize(log_path: str) -> dict:
    with open(log_path) as log:
        results = [json.loads(line) for line in log if line.strip()]
    seeds = sorted(r["seed"] for r in results)
    outcomes = Counter()
    for r in results:
        outcomes.update(r["outcomes"])
    refusals = Counter()
    for r in results:
        for refusal in r["refusals"]:
            refusals[(refusal["name"], re.sub(r"\d+", "N", refusal["message"])[:100], refusal["origin"])] += 1
    from streaming_llm.eval.results import git_commit, versions

    return {"kind": "lifecycle_campaign", "log": os.path.basename(log_path), "tolerance": TOLERANCE,
            "programs": len(results), "seed_range": [seeds[0], seeds[-1]],
            "run_at_commits": sorted({r.get("git_commit") for r in results} - {None}),
            "operations": sum(outcomes.values()), "outcomes": dict(outcomes),
            "programs_by_model": dict(Counter(r["model"] for r in results)),
            "refusals": [{"op": op, "message": message, "origin": origin, "count": count}
                         for (op, message, origin), count in refusals.most_common()],
            "failures": [{"seed": r["seed"], **f} for r in results for f in r["failures"]],
            "summarized_at_commit": git_commit(HERE), "versions": versions()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--replay", type=int)
    parser.add_argument("--ops", type=int, help="with --replay: run only this many operations")
    parser.add_argument("--minutes", type=float, default=0)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=10**9)
    parser.add_argument("--log", default="lifecycle_log.jsonl")
    parser.add_argument("--summarize", metavar="LOG")
    parser.add_argument("--autograd", action="store_true", help="run some operations with autograd on")
    parser.add_argument("--out")
    args = parser.parse_args()
    global AUTOGRAD
    AUTOGRAD = args.autograd
    if args.summarize:
        if args.out:
            from streaming_llm.eval.results import write_json_atomically

            write_json_atomically(args.out, summarize(args.summarize))
        else:
            print(json.dumps(summarize(args.summarize), indent=2))
        return
    if args.replay is not None:
        result = Program(args.replay, verbose=True, max_ops=args.ops).run()
        print(json.dumps(result, indent=1))
        return
    from streaming_llm.eval.results import git_commit

    commit = git_commit(HERE)
    deadline = time.time() + args.minutes * 60 if args.minutes else float("inf")
    seed = args.start
    with open(args.log, "a") as log:
        while time.time() < deadline and seed < args.start + args.count:
            result = Program(seed).run()
            result["git_commit"] = commit
            log.write(json.dumps(result) + "\n")
            log.flush()
            if result["failures"]:
                f = result["failures"][0]
                print(f"seed {seed}: {f['kind']} at op {f['op']} ({f['name']}): {f['message'][:200]}", flush=True)
            seed += 1
    print(f"last seed {seed - 1}")


if __name__ == "__main__":
    main()
