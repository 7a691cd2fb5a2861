"""Text generation and multi-turn chat through a StreamingLLMWrapper, in constant memory.

`generate_stream(wrapper, tokenizer, prompt_ids, ...)` feeds the prompt through the wrapper in blocks
(exact: a block equals its tokens fed one by one, SEMANTICS.md §1), then samples one token at a time and
feeds it back. Every piece of state the loop keeps is bounded — the cache (n_sink + window_size tokens),
the recent tokens of the repetition penalty, the few undecoded tokens of a split UTF-8 character, the
text held back while it could still become a stop string — so a stream of any length runs in constant
memory. `StreamingChat` drives a conversation with the tokenizer's chat template through one wrapper,
feeding each turn's new tokens only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from streaming_llm.checks import check_int, is_int, is_integer_tensor, warn_at_caller
from streaming_llm.models import compute_device
from streaming_llm.sampling import SamplingConfig

# A byte-level piece may end inside a UTF-8 character (up to 4 bytes); past this many undecodable
# tokens the decoder emits what it has (with U+FFFD) rather than wait for ever.
MAX_PENDING_TOKENS = 8
# Tokens of left context decoded with each new token: enough for tokenizers whose pieces depend on
# their neighbour (SentencePiece's leading space) without re-decoding the whole output.
DECODE_CONTEXT_TOKENS = 6
DEFAULT_PREFILL_BLOCK_SIZE = 256
# Top-p first looks for its nucleus among this many most likely tokens (see TokenSampler._candidates).
NUCLEUS_PROBE = 256
# The smallest normal float32: the sampler's floor for the temperature, which a smaller value (1e-45, 1e-320)
# would round to 0 (or a denormal) in the float32 logits' arithmetic.
FLOAT32_TINY = torch.finfo(torch.float32).tiny


class TokenSampler:
    """Picks the next token id from logits [vocab]; `recent` holds the last tokens of the stream."""

    def __init__(self, config: SamplingConfig):
        self.config = config
        self._generator: torch.Generator | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self.config.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.config.seed)
        return self._generator

    def __call__(self, logits: torch.Tensor, recent: Iterable[int] = ()) -> int:
        config = self.config
        logits = logits.float()
        if config.repetition_penalty != 1.0:
            recent_ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
            if recent_ids.numel():
                logits = logits.clone()
                scores = logits[recent_ids]
                penalised = torch.where(scores > 0, scores / config.repetition_penalty, scores * config.repetition_penalty)
                # A penalty beyond float32's range is inf or 0 there: +-inf logits become the largest finite ones
                # and 0 * inf (a zero logit stays zero) is NaN; both are mapped back to numbers.
                logits[recent_ids] = torch.nan_to_num(penalised, nan=0.0)
        if config.greedy:
            return int(logits.argmax())
        temperature = max(config.temperature, FLOAT32_TINY)
        scaled = logits / temperature
        if not bool(scaled.max().isfinite()):
            # logits / a tiny temperature overflowed (to +inf, or to -inf everywhere when no logit is positive), and
            # softmax of that is NaN: scale the gaps to the best logit instead (0 for it, -inf in the limit for the
            # others: greedy). Ordinary values never come here.
            scaled = (logits - logits.max()) / temperature
        logits = scaled
        generator = self._generator_for(logits.device)
        if config.top_k == 0 and config.top_p == 1.0:
            return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        values, ids = self._candidates(logits)
        return int(ids[torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)])

    def _candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, ids) of the tokens top-k (with any tied with the k-th) and then top-p keep, most likely first.

        Without top_k, the nucleus is looked for among the NUCLEUS_PROBE most likely tokens first and
        the whole vocabulary is sorted only when they do not hold top_p of the mass: exact either way.
        """
        config, vocab = self.config, logits.shape[-1]
        count = min(config.top_k or NUCLEUS_PROBE, vocab)
        values, ids = torch.topk(logits, count)
        if config.top_k and count < vocab:
            # Tokens tied with the k-th are as likely as it: all of them stay, as with transformers' TopKLogitsWarper
            # (common in bf16), not whichever of them topk happened to return first.
            tied = int((logits >= values[-1]).sum())
            if tied > count:
                values, ids = torch.topk(logits, tied)
        if config.top_p < 1.0:
            if config.top_k:  # top-p applies to the distribution top-k left
                probabilities = torch.softmax(values, dim=-1)
            else:
                probabilities = torch.exp(values - torch.logsumexp(logits, dim=-1))
                if count < vocab and float(probabilities.sum()) < config.top_p:
                    values, ids = torch.sort(logits, descending=True)
                    probabilities = torch.softmax(values, dim=-1)
            # Keep a token while the more likely ones hold less than top_p; the most likely always stays (a top_p
            # below float32's smallest value is 0 in the comparison, which would keep none).
            keep = (torch.cumsum(probabilities, dim=-1) - probabilities) < config.top_p
            keep[0] = True
            values, ids = values[keep], ids[keep]
        return values, ids


def _decode_spelled(tokenizer, ids: list[int], skip_special_tokens: bool) -> str:
    """The text `ids` spell: tokenizer.decode without clean_up_tokenization_spaces (see IncrementalDecoder)."""
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


class IncrementalDecoder:
    """Text deltas of a growing token sequence, never splitting a character, in constant memory.

    Each new token is decoded together with a few tokens of left context, and the text beyond the
    context's own decoding is emitted. A delta that ends in U+FFFD (a byte-level piece that stops
    inside a UTF-8 character) is held back until the character completes.

    Decoding never applies the tokenizer's clean_up_tokenization_spaces: that clean-up deletes a space
    before punctuation once the punctuation arrives, i.e. it rewrites text already emitted (a stream would
    show "doctor ''she'" where the clean-up's full decode reads "doctor'she'" and the tokens spell
    "doctor 'she'"). The deltas add up to tokenizer.decode(ids, clean_up_tokenization_spaces=False).
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = [int(i) for i in list(context_ids)[-DECODE_CONTEXT_TOKENS:]]
        self.prefix_offset = 0  # tokens[prefix_offset:read_offset] is context already emitted
        self.read_offset = len(self.tokens)  # tokens[read_offset:] are not emitted yet

    def _decode(self, ids: list[int]) -> str:
        return _decode_spelled(self.tokenizer, ids, self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is incomplete)."""
        self.tokens.append(int(token_id))
        if len(self.tokens) - self.read_offset > MAX_PENDING_TOKENS:
            return self.flush()
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset :])
        if full_text.endswith("\ufffd"):
            return ""
        return self._emit(prefix_text, full_text)

    def flush(self) -> str:
        """Emit whatever is pending, complete or not."""
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        return self._emit(prefix_text, self._decode(self.tokens[self.prefix_offset :]))

    def _emit(self, prefix_text: str, full_text: str) -> str:
        # The context's text is a prefix of the new text, except where the context ends inside a character (its
        # last bytes decode to U+FFFD, which the completed character replaces): what follows the common part is new.
        delta = full_text[_common_prefix_length(prefix_text, full_text) :]
        # The newest emitted tokens become the next context; older ones are dropped.
        keep_from = max(self.read_offset, len(self.tokens) - DECODE_CONTEXT_TOKENS)
        self.tokens = self.tokens[keep_from:]
        self.prefix_offset, self.read_offset = 0, len(self.tokens)
        return delta


class StopStringFilter:
    """Cuts the text at the first stop string, holding back only text that could still start one."""

    def __init__(self, stop_strings: Sequence[str] = ()):
        self.stop_strings = [s for s in stop_strings if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached); after True, stop generating."""
        if not self.stop_strings:
            return text, False
        text = self.held + text
        matches = [index for index in (text.find(stop) for stop in self.stop_strings) if index >= 0]
        if matches:
            self.held = ""
            return text[: min(matches)], True
        hold = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:length]):
                    hold = length
                    break
        self.held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it adds to the output ('' while text is held back)."""

    token_id: int
    text: str


class GenerationStream:
    """Iterate to generate: yields one Piece per sampled token, then sets the fields below.

    stop_reason: "length" (max_new_tokens reached), "eos" (a stop token id was sampled; its Piece is the
    last one, and the text may still end before a stop string that its flushed text completed), "stop" (a
    stop string appeared, also one completed by the last token's flushed text; the text ends right before it)
    or "reset" (the wrapper was reset while the stream was iterated: it ends after the Piece being handled, and
    nothing more is fed into the new, empty stream; text still held back is dropped, pending_token is None).
    A wrapper fed by anything else while the stream is suspended (a second generate_stream, a call of the wrapper) is a
    RuntimeError at the next token: one generation at a time per wrapper.
    pending_token: the last sampled token, which is never fed to the model (as in model.generate()); a
    caller that continues the stream feeds it first (StreamingChat does).
    """

    def __init__(self, wrapper, tokenizer, prompt_ids, sampling, stop, max_new_tokens, stop_token_ids, prefill_block_size, progress,
                 *, sampler: TokenSampler | None = None, earlier_ids: Sequence[int] = ()):
        check_wrapper(wrapper)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        prefill_block_size = check_int("prefill_block_size", prefill_block_size, 1)
        ids = prompt_token_ids(prompt_ids)
        if ids.numel() == 0:
            raise ValueError("the prompt is empty: generation needs at least one token to continue from")
        self.sampling = sampling_config(sampling)
        self.stop = stop_strings(stop)
        self.stop_token_ids = stop_token_id_set(stop_token_ids)
        check_tokenizer(tokenizer)
        vocab = wrapper.model.get_input_embeddings().num_embeddings
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise ValueError(
                f"token id {bad} ({tokenizer.convert_ids_to_tokens(bad) if bad >= 0 else 'negative'}) is outside the "
                f"model's vocabulary of {vocab}: the tokenizer knows tokens the model does not"
            )
        self.wrapper, self.tokenizer = wrapper, tokenizer
        self.prompt_ids = ids
        self.max_new_tokens = max_new_tokens
        self.prefill_block_size = prefill_block_size
        self.progress = progress
        # A sampler that outlives the stream (StreamingChat's, one per conversation) draws on where it stopped.
        self._sampler = TokenSampler(self.sampling) if sampler is None else sampler
        # The stream's tokens before prompt_ids (StreamingChat's earlier turns), where the repetition window begins.
        self._earlier_ids = list(earlier_ids)[-self.sampling.repetition_window :]
        self.prompt_tokens = ids.numel()
        self.new_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.stop_reason: str | None = None
        self.pending_token: int | None = None
        self._started = False

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second after the prompt (sampling, feeding and detokenisation included)."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def __iter__(self) -> Iterator[Piece]:
        if self._started:
            raise RuntimeError("a GenerationStream can be iterated once")
        self._started = True
        return self._run()

    def _prefill(self, device: torch.device) -> torch.Tensor:
        """Feed the prompt in blocks; the last logits [vocab]."""
        from tqdm.auto import tqdm

        blocks = self.prompt_ids.split(self.prefill_block_size)
        bar = tqdm(blocks, desc="prompt", unit="block", disable=not self.progress or len(blocks) < 4, leave=False)
        for block in bar:
            logits = self.wrapper(block[None].to(device))[0, -1]
        return logits

    def _run(self) -> Iterator[Piece]:
        device = compute_device(self.wrapper.model)  # (an offloaded model's weights are on the meta device)
        start = time.perf_counter()
        logits = self._prefill(device)
        stream = current_cache(self.wrapper)  # reset() replaces it: the stream this generation continues
        fed = tokens_seen(self.wrapper)  # what it held when this generation last fed it
        self.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()

        sampler = self._sampler
        recent = deque(self._earlier_ids + self.prompt_ids[-self.sampling.repetition_window :].tolist(),
                       maxlen=self.sampling.repetition_window)
        decoder = IncrementalDecoder(self.tokenizer, context_ids=self.prompt_ids[-DECODE_CONTEXT_TOKENS:].tolist())
        stopper = StopStringFilter(self.stop)

        def final_text() -> tuple[str, bool]:
            text, reached = stopper.push(decoder.flush())
            return (text, True) if reached else (text + stopper.flush(), False)

        while True:
            token = sampler(logits, recent)
            self.new_tokens += 1
            self.pending_token = token
            if token in self.stop_token_ids:
                self.stop_reason = "eos"
                text, _ = final_text()
            else:
                text, reached = stopper.push(decoder.push(token))
                if not reached and self.new_tokens == self.max_new_tokens:
                    # The flushed text (held bytes, held stop-string prefix) may still complete a stop string.
                    rest, reached = final_text()
                    text += rest
                    self.stop_reason = "stop" if reached else "length"
                elif reached:
                    self.stop_reason = "stop"
            if self.stop_reason is not None:
                self.decode_seconds = time.perf_counter() - start
                yield Piece(token, text)
                return
            yield Piece(token, text)
            if current_cache(self.wrapper) is not stream:  # wrapper.reset() while the Piece was handled
                self.stop_reason, self.pending_token = "reset", None
                self.decode_seconds = time.perf_counter() - start
                return
            if tokens_seen(self.wrapper) != fed:
                # Going on, it fed its token after another's and took their logits for its own, silently.
                raise RuntimeError(f"the wrapper's stream was fed outside this generation since it last fed it "
                                   f"({tokens_seen(self.wrapper) - fed:+d} tokens: another generate_stream or "
                                   "StreamingChat on the same wrapper, or a call of the wrapper itself), so the model no "
                                   "longer holds what it has fed; give each stream a wrapper of its own (wrappers of one model "
                                   "share its weights: make another on the same model)")
            recent.append(token)
            logits = self.wrapper(torch.tensor([[token]], device=device))[0, -1]
            fed = tokens_seen(self.wrapper)
            self.pending_token = None
            self.decode_seconds = time.perf_counter() - start


def current_cache(wrapper):
    """The wrapper's current cache object, to notice a reset after each token: `current_cache` where the wrapper has
    it (`cache` on a FastStreamingWrapper first rebuilds every layer's slot positions: a few tensor operations per
    layer, which read per token slowed every step), else `cache`."""
    return wrapper.current_cache if hasattr(wrapper, "current_cache") else getattr(wrapper, "cache", None)


def tokens_seen(wrapper) -> int | None:
    """The tokens the wrapper's stream has taken (None for a wrapper that does not say)."""
    return getattr(wrapper, "tokens_seen", None)


def prompt_token_ids(prompt_ids) -> torch.Tensor:
    """The prompt as a LongTensor [n]: from a list of ints or an integer tensor [n] or [1, n]; ValueError otherwise
    (a [2, n] batch was flattened into one stream, float ids truncated, bool ids taken as 0/1)."""
    if isinstance(prompt_ids, (str, bytes)) or (
        isinstance(prompt_ids, (list, tuple)) and any(isinstance(item, (str, bytes)) for item in prompt_ids)
    ):
        raise ValueError("prompt_ids must be token ids, not text: tokenize it first (tokenizer(text)['input_ids'])")
    if isinstance(prompt_ids, Mapping):  # a tokenizer's whole output (a BatchEncoding): its ids are one entry of it
        raise ValueError("prompt_ids must be token ids, not the tokenizer's whole output: pass its ['input_ids']")
    if prompt_ids is None:
        raise ValueError("prompt_ids must be a list or a tensor of token ids, got None")
    try:
        ids = prompt_ids if isinstance(prompt_ids, torch.Tensor) else torch.as_tensor(prompt_ids)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"prompt_ids must be a list or a tensor of token ids, got {type(prompt_ids).__name__} ({error})") from None
    if ids.numel() == 0:
        ids = ids.to(torch.long)  # an empty list is a float tensor: refused as empty below, not as floats
    if not is_integer_tensor(ids):
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"prompt_ids must be a list or a tensor [n] or [1, n] (one stream), got shape {tuple(ids.shape)}")
    return ids.to(torch.long)


def stop_token_id_set(stop_token_ids) -> frozenset[int]:
    """The stop token ids: an iterable of integer ids (or one id); ValueError otherwise."""
    def is_id(value) -> bool:
        return is_int(value) or (isinstance(value, torch.Tensor) and value.numel() == 1 and is_integer_tensor(value))

    if stop_token_ids is None:
        return frozenset()
    if is_id(stop_token_ids) or isinstance(stop_token_ids, (str, bytes)) or not isinstance(stop_token_ids, Iterable):
        ids = [stop_token_ids]
    elif isinstance(stop_token_ids, torch.Tensor):
        ids = list(stop_token_ids.reshape(-1))
    else:
        ids = list(stop_token_ids)
    if not all(is_id(i) for i in ids):
        raise ValueError(f"stop_token_ids must be integer token ids, got {stop_token_ids!r}")
    return frozenset(int(i) for i in ids)


def stop_strings(stop) -> list[str]:
    """The stop strings: a sequence of non-empty strings, or one string (which is one stop string, not its
    characters)."""
    if stop is None:
        return []
    texts = [stop] if isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable) else list(stop)
    if not all(isinstance(text, str) and text for text in texts):
        raise ValueError(f"stop must be a string or a sequence of non-empty strings, got {stop!r}")
    return texts


def check_wrapper(wrapper) -> None:
    """TypeError for the model itself where a wrapper around it is expected (a model's output is no logits tensor), and
    for anything else that is no wrapper (it failed later on its missing .model)."""
    if isinstance(wrapper, torch.nn.Module):
        raise TypeError(f"wrapper must be a StreamingLLMWrapper (or FastStreamingWrapper) around the model, got the model "
                        f"itself ({type(wrapper).__name__}): wrap it first, StreamingLLMWrapper(model, n_sink, window_size)")
    if not (callable(wrapper) and hasattr(wrapper, "model") and hasattr(wrapper, "reset")):
        raise TypeError(f"wrapper must be a StreamingLLMWrapper (or FastStreamingWrapper) around the model, got "
                        f"{_type_name(wrapper)}")


def check_tokenizer(tokenizer) -> None:
    """TypeError unless `tokenizer` is a transformers tokenizer (it decodes the ids it is given; None failed at the first
    generated token, after the prompt was fed)."""
    if not all(callable(getattr(tokenizer, name, None)) for name in ("decode", "convert_ids_to_tokens")):
        raise TypeError(f"tokenizer must be the model's tokenizer (a transformers tokenizer, as load_model returns), got "
                        f"{_type_name(tokenizer)}")


def check_user_text(user_text) -> str:
    """The text of a user message; TypeError for anything else (None failed inside the chat template's Jinja code)."""
    if isinstance(user_text, bytes):
        raise TypeError("user_text must be a string, got bytes: decode it first (user_text.decode('utf-8'))")
    if not isinstance(user_text, str):
        raise TypeError(f"user_text must be a string (the user's message), got {_type_name(user_text)}")
    return user_text


def _type_name(value) -> str:
    return "None" if value is None else type(value).__name__


def sampling_config(sampling) -> SamplingConfig:
    if sampling is None:
        return SamplingConfig()
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig (or None for greedy), got {type(sampling).__name__}")
    return sampling


def generate_stream(
    wrapper,
    tokenizer,
    prompt_ids,
    sampling: SamplingConfig | None = None,
    stop: Sequence[str] = (),
    max_new_tokens: int = 100,
    *,
    stop_token_ids: Iterable[int] | None = None,
    prefill_block_size: int = DEFAULT_PREFILL_BLOCK_SIZE,
    progress: bool = False,
) -> GenerationStream:
    """Continue `wrapper`'s stream with `prompt_ids` and generate up to `max_new_tokens` tokens.

    prompt_ids: the next tokens of the stream, a list or tensor [n] or [1, n] with n >= 1: the whole
    prompt on a fresh wrapper, only the new part when continuing (the wrapper keeps its cache).
    sampling: SamplingConfig (default greedy; its repetition window begins with prompt_ids). stop: strings that end generation (not included in the
    text). stop_token_ids: ids that end generation (e.g. `end_of_turn_ids(...)`; default none).
    Returns a GenerationStream: iterate it for Pieces (token id + text delta), e.g.

        for piece in generate_stream(wrapper, tokenizer, ids, max_new_tokens=50):
            print(piece.text, end="", flush=True)
    """
    return GenerationStream(
        wrapper, tokenizer, prompt_ids, sampling, stop, max_new_tokens, stop_token_ids, prefill_block_size, progress
    )


def end_of_turn_ids(tokenizer, model=None) -> set[int]:
    """Token ids that end an answer: the model's and tokenizer's eos, and the special token the chat
    template closes a message with (e.g. SmolLM2's <|im_end|>)."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00end-of-message\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        closing = rendered.split(marker, 1)[-1]
        closing_ids = tokenizer(closing, add_special_tokens=False)["input_ids"] if closing else []
        if closing_ids and closing_ids[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
            ids.add(closing_ids[0])
    return ids


@dataclass(frozen=True)
class TurnResult:
    """One answer of a StreamingChat. answer: its text (special tokens and stop strings removed);
    fed_tokens: the tokens fed for the user turn (template included); stop_reason as GenerationStream's,
    or "interrupted" when the caller stopped iterating."""

    answer: str
    new_tokens: int
    fed_tokens: int
    stop_reason: str
    seconds: float
    tokens_per_second: float


class StreamingChat:
    """A multi-turn conversation through one wrapper, using the tokenizer's chat template.

    The template renders a whole conversation, but a streaming cache must see each token once. So each
    turn renders the conversation with the new user message and feeds only the part the model has not
    seen: rendered[len(seen_text):], where seen_text is the previous rendering plus the answer exactly as
    the model produced it. A template that rewrites earlier turns (its rendering of the longer
    conversation does not extend what the model saw before the last answer) cannot be streamed:
    ValueError. One that only re-formats the last answer (e.g. strips its trailing spaces) is fed from
    the first character that differs (with a warning).

    A seeded `sampling` seeds the conversation once: later turns draw on from where the earlier ones stopped.
    `send(text)` yields the answer's Pieces; once it is exhausted, `last_turn` describes the turn.
    `messages` holds the conversation text (the template needs it); the model's memory of it is the
    fixed cache. An exception raised while a turn is fed or generated (KeyboardInterrupt in the middle of a model
    step, an error) leaves the cache in an unknown state: the next send() is a RuntimeError until reset(). Stopping
    the iteration of an answer (break, close()) is clean: the answer is recorded as far as it went. A wrapper reset or fed
    outside the conversation between two turns (another StreamingChat on it) makes the next send() a RuntimeError too.
    """

    def __init__(
        self,
        wrapper,
        tokenizer,
        system_prompt: str | None = None,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        stop_token_ids: Iterable[int] | None = None,
    ):
        check_wrapper(wrapper)
        check_tokenizer(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; StreamingChat needs an instruct model's tokenizer")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string or None, got {_type_name(system_prompt)}")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        self.wrapper, self.tokenizer = wrapper, tokenizer
        self.system_prompt = system_prompt
        self.sampling = sampling_config(sampling)
        self.max_new_tokens = max_new_tokens
        self.stop = stop_strings(stop)
        self.stop_token_ids = set(end_of_turn_ids(tokenizer, wrapper.model) if stop_token_ids is None
                                  else stop_token_id_set(stop_token_ids))
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and empty the cache. An answer being iterated ends there, and is not recorded."""
        self._conversation = object()  # the answer being iterated belongs to the conversation it started in
        self.wrapper.reset()
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.seen_text = ""  # the conversation text fed to the model so far
        self._answer_start = 0  # len(seen_text) where the last answer begins
        self._pending_token: int | None = None  # last sampled token, not fed yet
        self._pending_text = ""  # its text, as it continues the answer
        # One sampler for the conversation: a seed is drawn from once, not again from its start each turn.
        self._sampler = TokenSampler(self.sampling)
        # The last tokens fed, for the repetition penalty's window, which reaches back into earlier turns.
        self._recent: deque[int] = deque(maxlen=self.sampling.repetition_window)
        self.turns = 0
        self.last_turn: TurnResult | None = None
        self._failure: str | None = None  # what ended a turn while the model was fed: the cache may hold part of it
        # The wrapper's stream as this conversation left it (its cache object, the tokens it has taken), so that a reset
        # or a feed from outside (another StreamingChat on the same wrapper) is noticed at the next send().
        self._stream = (current_cache(self.wrapper), tokens_seen(self.wrapper))

    def _decode_after(self, context_ids: list[int], ids: list[int]) -> str:
        """Text of `ids` as they continue `context_ids` (so a leading space is kept; no clean-up, which could
        rewrite the end of the context, see IncrementalDecoder)."""
        context_text = _decode_spelled(self.tokenizer, context_ids, skip_special_tokens=False)
        return _decode_spelled(self.tokenizer, context_ids + ids, skip_special_tokens=False)[len(context_text) :]

    def _ids_to_reach(self, rendered: str) -> tuple[list[int], str]:
        """(token ids that bring the model from what it has seen to `rendered`, the text they stand for)."""
        feed: list[int] = []
        seen = self.seen_text
        if self._pending_token is not None and rendered.startswith(seen + self._pending_text):
            feed, seen = [self._pending_token], seen + self._pending_text
        if not rendered.startswith(seen):
            common = _common_prefix_length(rendered, seen)
            if common < self._answer_start:
                raise ValueError(
                    "the chat template rewrites earlier turns of the conversation, which a streaming cache has "
                    "already consumed; use a template whose rendering of a conversation extends the rendering "
                    "of every earlier part"
                )
            warn_at_caller(
                f"the chat template re-formats the last answer ({len(seen) - common} characters differ); "
                "feeding the rendered conversation from the first difference"
            )
            seen = rendered[:common]
        suffix = rendered[len(seen) :]
        if suffix:
            feed += self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        return feed, rendered

    def send(self, user_text: str, max_new_tokens: int | None = None) -> Iterator[Piece]:
        """Add a user message and generate the answer: yields its Pieces (iterate to the end). A `user_text` that is no
        string is a TypeError here, before anything is fed."""
        check_user_text(user_text)
        if max_new_tokens is not None:
            check_int("max_new_tokens", max_new_tokens, 1)
        if self._failure is not None:
            raise RuntimeError(f"an earlier answer of this conversation ended with {self._failure} while the model was "
                               "fed, so the cache may hold part of a token or of a message: call reset() to start a "
                               "new conversation")
        cache, fed = self._stream
        seen = tokens_seen(self.wrapper)
        # A conversation that has fed nothing goes on on any empty stream (its wrapper reset again before the first turn).
        if not (fed == 0 and seen == 0) and (current_cache(self.wrapper) is not cache or seen != fed):
            raise RuntimeError("this conversation's wrapper was reset or fed outside it since its last answer (another "
                               "StreamingChat or generate_stream on the same wrapper, a call of the wrapper itself, or "
                               "an answer of this conversation still being iterated), so the model no longer holds the "
                               "conversation: give each conversation a wrapper of its own, finish the answer (or close() "
                               "it), or call reset() to start a new conversation")
        return self._answer(user_text, max_new_tokens)

    def _answer(self, user_text: str, max_new_tokens: int | None) -> Iterator[Piece]:
        messages = self.messages + [{"role": "user", "content": user_text}]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        feed, seen_text = self._ids_to_reach(rendered)
        stream = GenerationStream(
            self.wrapper,
            self.tokenizer,
            feed,
            self.sampling,
            self.stop,
            self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            self.stop_token_ids,
            prefill_block_size=DEFAULT_PREFILL_BLOCK_SIZE,
            progress=False,
            sampler=self._sampler,
            earlier_ids=self._recent,
        )
        context_ids = feed[-DECODE_CONTEXT_TOKENS:]
        conversation = self._conversation
        answer_ids: list[int] = []
        answer_text: list[str] = []
        try:
            for piece in stream:
                if not answer_ids:  # the prompt has been fed
                    self.messages, self.seen_text, self._answer_start = messages, seen_text, len(seen_text)
                    self._pending_token = None
                    # into the stream the wrapper holds now: a FastStreamingWrapper made or last reset for another
                    # batch size starts a new one for the first turn's batch of 1 (the next send() was refused)
                    self._stream = (current_cache(self.wrapper), self._stream[1])
                answer_ids.append(piece.token_id)
                answer_text.append(piece.text)
                yield piece
                if self._conversation is not conversation:  # reset() in between: feed nothing more into the new one
                    return
        except GeneratorExit:  # the caller stopped iterating, between two tokens
            raise
        except BaseException as error:  # raised by the stream: a token may be in some layers' cache and not in others
            if self._conversation is conversation:
                self._failure = _what_ended(error)
            raise
        finally:
            if answer_ids and self._conversation is conversation and self._failure is None:
                self._record_answer(stream, context_ids, answer_ids, "".join(answer_text), feed)

    def _record_answer(self, stream: GenerationStream, context_ids: list[int], answer_ids: list[int], answer_text: str, feed: list[int]) -> None:
        content_ids = answer_ids[:-1] if stream.stop_reason == "eos" else answer_ids
        self.messages = self.messages + [{"role": "assistant", "content": self._decode_after(context_ids, content_ids)}]
        # Every generated token has been fed except the last one, which the next turn feeds if the template agrees.
        fed_text = self._decode_after(context_ids, answer_ids[:-1])
        self._pending_token = answer_ids[-1]
        self._pending_text = self._decode_after((context_ids + answer_ids[:-1])[-DECODE_CONTEXT_TOKENS:], answer_ids[-1:])
        self.seen_text += fed_text
        self._recent.extend(feed + answer_ids[:-1])
        cache, fed = self._stream
        self._stream = (cache, None if fed is None else fed + len(feed) + len(answer_ids) - 1)
        self.turns += 1
        self.last_turn = TurnResult(
            answer=answer_text,
            new_tokens=len(answer_ids),
            fed_tokens=len(feed),
            stop_reason=stream.stop_reason or "interrupted",
            seconds=stream.prefill_seconds + stream.decode_seconds,
            tokens_per_second=stream.tokens_per_second,
        )

    def ask(self, user_text: str, max_new_tokens: int | None = None) -> str:
        """Send a message and return the whole answer."""
        return "".join(piece.text for piece in self.send(user_text, max_new_tokens))


def _what_ended(error: BaseException) -> str:
    """An error that ended a turn, as the next send() names it: its type and the first line of its message (so a
    refusal from inside the turn, such as a wrapper fed outside the conversation, is named, not only "RuntimeError")."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__} ({lines[0]})" if lines else type(error).__name__


def _common_prefix_length(a: str, b: str) -> int:
    length = 0
    for char_a, char_b in zip(a, b):
        if char_a != char_b:
            break
        length += 1
    return length
