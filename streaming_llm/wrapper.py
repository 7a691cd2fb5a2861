"""StreamingLLMWrapper: a loaded model + a StreamingKVCache, fed the stream a block at a time."""

from __future__ import annotations

import torch
from torch import nn

from streaming_llm.attention import model_lock, prepare_model
from streaming_llm.cache import StreamingKVCache, validate_config
from streaming_llm.checks import check_int, is_integer_tensor
from streaming_llm.models import adapter_for, check_capacity, describe, transformers_model


class StreamingLLMWrapper:
    """Feed an endless stream through `model` with a cache of `n_sink + window_size` tokens.

    `wrapper(input_ids)` takes the next tokens of the stream, [batch, n] with n >= 1 (on any device: they are moved to
    the model's embeddings), and returns their logits [batch, n, vocab]. Feeding n tokens at once equals feeding them
    one at a time: a long prompt is streamed through the window with its sinks, never attended densely. Every row of
    a batch is an independent stream of the same length. Inputs longer than `max_block` tokens are fed in blocks of
    that size (exact, and it bounds the activations of one forward pass; the cache itself attends a block in pieces
    of at most capacity + 1 tokens, `cache.BLOCK_PIECE`).
    """

    def __init__(
        self,
        model: nn.Module,
        n_sink: int = 4,
        window_size: int = 1020,
        position_mode: str = "pos_shift",
        streaming_mode: str = "ours",
        max_block: int = 512,
    ):
        n_sink, window_size = validate_config(n_sink, window_size, position_mode, streaming_mode)
        self.max_block = check_int("max_block", max_block, 1)
        self.architecture = describe(model)
        check_capacity(model.config, n_sink + window_size)
        self.model = prepare_model(model)
        self._rotary_embedding = adapter_for(model.config).rotary_embedding  # a function: a copy of the wrapper shares it
        self._transformers_model = transformers_model(model)  # where _rotary_embedding looks (a PEFT model's base model)
        self._frequency_names = [name for name in self._rotary_embedding(self._transformers_model)._buffers
                                 if name.endswith("inv_freq")]
        self._made_for, self._frequencies = self._placement(), self._rope_frequencies()
        self.n_sink, self.window_size = n_sink, window_size
        self.position_mode, self.streaming_mode = position_mode, streaming_mode
        self.cache = self._new_cache()

    def _new_cache(self) -> StreamingKVCache:
        return StreamingKVCache(self.n_sink, self.window_size, self.position_mode, self.streaming_mode)

    @property
    def cache(self) -> StreamingKVCache:
        """The stream's StreamingKVCache (transformers' Cache contract: model() and generate() take it as
        past_key_values). Another may be given (a copy or a saved stream) if it has the wrapper's settings."""
        return self._cache

    @cache.setter
    def cache(self, cache: StreamingKVCache) -> None:
        self._check_cache_given(cache)
        self._cache = cache

    def __setstate__(self, state: dict) -> None:
        """Loaded (pickle, torch.load): a wrapper saved while `cache` was a plain attribute holds it as "cache", which
        the property hid (every call failed: no attribute '_cache')."""
        if "cache" in state and "_cache" not in state:
            state = {("_cache" if name == "cache" else name): value for name, value in state.items()}
        self.__dict__.update(state)

    def _check_cache_given(self, cache) -> None:
        """Refuse, when it is given, a cache the wrapper would not stream with as it says: any other Cache (a
        DynamicCache was fed as is, growing without bound) or None (each call was a stream of its own), and a
        StreamingKVCache of other settings (streamed by them while n_sink, window_size... reported the wrapper's)."""
        if not isinstance(cache, StreamingKVCache):
            raise TypeError(f"wrapper.cache must be a StreamingKVCache, the stream the wrapper keeps; got "
                            f"{type(cache).__name__} (use the model itself for another cache, reset() for a new stream)")
        given = (cache.n_sink, cache.window_size, cache.position_mode, cache.streaming_mode)
        made_for = (self.n_sink, self.window_size, self.position_mode, self.streaming_mode)
        if given != made_for:
            settings = "n_sink={}, window_size={}, position_mode={!r}, streaming_mode={!r}".format
            raise ValueError(f"this cache streams with {settings(*given)}; the wrapper was made with "
                             f"{settings(*made_for)}: make a wrapper with the cache's settings for it")
        # A cache may be made for more layers than the model's (StreamingKVCache(num_layers=...)), the rest left empty.
        # One that holds a deeper model's stream was fed once, its first layers with this model's keys beside the other
        # model's, and refused only at the next call ("a forward pass ... stopped part-way").
        depth = len(self.architecture.attention_modules)
        if any(layer.seen for layer in cache.layers[depth:]):
            raise ValueError(f"this cache holds the stream of a model with more layers ({len(cache.layers)}) than this "
                             f"wrapper's model ({depth}): make a new one for this model")

    @property
    def cache_capacity(self) -> int:
        return self.n_sink + self.window_size

    @property
    def tokens_seen(self) -> int:
        return self.cache.get_seq_length()

    @property
    def current_cache(self) -> StreamingKVCache:
        """The current stream's cache object as it is (FastStreamingWrapper's `cache` first brings every layer up to
        date, a few tensor operations per layer). reset() replaces it, so it tells one stream from the next."""
        return self.cache

    def reset(self) -> None:
        """Forget the stream: the next call starts at stream position 0."""
        self.cache = self._new_cache()

    def _placement(self) -> tuple:
        """What the wrapper took from the model when it was made: its RoPE frequencies, in the model's dtype."""
        return (next(self.model.parameters()).dtype,)

    def _rope_frequencies(self) -> tuple:
        """The model's rotary module and its RoPE frequency tensors as they are now (inv_freq; Gemma 3's one per layer
        type): the objects themselves, which a cast replaces (and a model whose dtype and device are unchanged keeps).
        Read from the module's buffer dict (named_buffers() would build a generator: ~5 us at every step)."""
        rotary_embedding = self._rotary_embedding(self._transformers_model)
        buffers = rotary_embedding._buffers
        return (rotary_embedding, *(buffers.get(name) for name in self._frequency_names))

    def _check_model_unchanged(self) -> None:
        """A model cast (model.half(), .to(torch.bfloat16)) after the wrapper was made casts its RoPE frequencies too,
        which the wrapper had taken before: refused, rather than streamed with frequencies the model no longer has.
        So is a cast back (model.half().float()): the dtype is the same again, but the frequencies were rounded (the
        wrapper streamed on with the old ones, ~1e-3 off a new wrapper's logits on a tiny model, and the fast step
        rotated the sinks with the old ones and the new token with the new ones). And a model that would drop the
        cache (gradient checkpointing in training mode)."""
        placement = self._placement()
        if placement != self._made_for:
            made, now = (" on ".join(map(str, state)) for state in (self._made_for, placement))
            raise ValueError(f"the model was cast or moved after this wrapper was made ({made}, now {now}); the "
                             "wrapper took its RoPE frequencies (and its buffers) then: make a new wrapper for it")
        if any(now is not made for now, made in zip(self._rope_frequencies(), self._frequencies)):
            raise ValueError("the model's RoPE frequencies were replaced after this wrapper was made (a cast does, even "
                             "one cast back: model.half().float() rounds them); the wrapper took them then: make a new "
                             "wrapper for it")
        # A model left in training mode with gradient checkpointing on (as after fine-tuning): transformers' layers then
        # drop every cache, so each token was attended alone, silently (logits off by ~8 on the tiny Llama, nothing
        # kept). Looked for only in training mode: model.training is one attribute, the layers' flags a walk.
        if self.model.training and getattr(self.model, "is_gradient_checkpointing", False):
            raise ValueError("the model is in training mode with gradient checkpointing on, in which transformers drops "
                             "every cache: call model.eval() (or model.gradient_checkpointing_disable()) to stream")

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_model_unchanged()
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or min(input_ids.shape) < 1:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, n] tensor with batch, n >= 1; got {shape}")
        if not is_integer_tensor(input_ids):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        input_ids = input_ids.long()  # first: torch has no min/max for uint16/32/64 (a uint64 past 2**63 turns negative)
        embeddings = self.model.get_input_embeddings()
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= embeddings.num_embeddings:
            raise ValueError(f"token ids must lie in [0, {embeddings.num_embeddings}) for this model; got values in "
                             f"[{low}, {high}]")
        device = embeddings.weight.device
        # Weights offloaded by accelerate are on the meta device until its hook loads them; the hook also moves the ids.
        if device.type != "meta" or getattr(embeddings, "_hf_hook", None) is None:
            input_ids = input_ids.to(device)  # a tokenizer's CPU ids for a model on a GPU
        with model_lock(self.model):  # wrappers of one model in several threads take turns (attention.model_lock)
            logits = [self._feed(block) for block in input_ids.split(self.max_block, dim=1)]
        return logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)

    def _feed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Position 0 makes the model's own RoPE the identity (a scale by attention_scaling for YaRN, which the cache
        # undoes); the cache applies the real positions.
        position_ids = torch.zeros_like(input_ids)
        output = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache, use_cache=True)
        return output.logits
