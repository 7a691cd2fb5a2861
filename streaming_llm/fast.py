"""The static-shape decode step: one token through a fixed buffer, with no host-side decisions, so that the
whole step (all layers), compiled with torch.compile, can be captured in one CUDA graph and replayed per token.

`FastStreamingWrapper` is a `StreamingLLMWrapper` whose single-token steps take this path; blocks (prompts,
new chat turns) and the first `n_sink` tokens take the general path of cache.py. Both paths write the same
storage: per layer one key and one value tensor [batch, kv_heads, capacity + 1, head_dim], allocated once and
marked as static addresses (CUDA graphs may write them in place), laid out as `RingLayer` lays them out (sinks
in slots [0, n_sink), stream position p >= n_sink in slot n_sink + (p - n_sink) % (window_size + 1)), plus the
sinks' keys at their own positions j; a layer whose own sliding window W is at most window_size + 1 gets W slots
instead, position p in slot p % W, and no sinks (`RingLayer.sliding`).

What the step does differently from the general decode path (same positions, SEMANTICS.md §2):
- the model's own RoPE rotates q and k at the window frame t - base (passed as `position_ids`), instead of
  rotating at 0 and re-rotating; the slot index (`cache_position`) and t, base are device tensors;
- the sinks, kept at their own positions j, are rotated by the step's offset (window frame - sink frame) and
  written into their slots together with the new key: one index_copy_ per buffer, as transformers' StaticCache;
- attention is one call over the whole buffer per layer (`decode_attention`; by default SDPA with enable_gqa on
  CUDA and grouped-query heads folded into the query length elsewhere, never a repeat of keys), with a mask only
  while the buffer is still filling, or for a layer whose own sliding window hides kept keys (computed from t on the
  device, docs/semantics.md §8).
The frame offset `base` moves (one rotation of the stored window keys, outside the graph) when the policy says so:
once per ~capacity tokens for pos_shift, every step for rerotate, never for absolute.
"""

from __future__ import annotations

import copy
import functools
import sys
import types
import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from streaming_llm.attention import in_held_dtype, model_lock
from streaming_llm.cache import (StreamingKVCache, grouped_attention, ring_layout, sliding_ring_size,
                                 stopped_pass_error, written_outside_inference_mode)
from streaming_llm.checks import check_int, warn_at_caller
from streaming_llm.choices import COMPILE_CHOICES, DECODE_ATTENTION
from streaming_llm.models import attention_shape, compute_device, describe, is_mixture_of_experts, sliding_windows
from streaming_llm.rope import RotaryParams, apply_rotation, cos_sin, rerotate_keys
from streaming_llm.wrapper import StreamingLLMWrapper

STATIC_ATTN_IMPLEMENTATION = "streaming_llm_static"


def resolve_decode_attention(variant: str, device: torch.device | str) -> str:
    """"auto" is the formulation measured fastest on the device type: `gqa` on CUDA (H100 microbenchmark,
    results/latency/h100_attention_microbench.json), `grouped` elsewhere (CPU); anything else is checked and kept."""
    if variant == "auto":
        return "gqa" if torch.device(device).type == "cuda" else "grouped"
    if variant not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention must be auto or one of {', '.join(DECODE_ATTENTION)}; got {variant!r}")
    return variant


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None, variant: str = "grouped", softcap: float | None = None,
                     s_aux: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per head over a buffer of keys; [b, heads, 1, d] -> [b, heads, 1, dv].

    The formulations differ only in which kernel does the work (results agree to rounding):
    - grouped: the query heads sharing a kv head become rows of one query block ([b, kv_heads, groups, d]), so
      keys and values are read once per kv head; one SDPA call, any backend;
    - gqa: SDPA with enable_gqa (the kernel maps query heads to kv heads);
    - expanded_masked: what transformers' compiled StaticCache step does: keys/values repeated per query head and
      an explicit mask (which selects SDPA's masked kernels);
    - matmul: q·kᵀ, softmax in float32, ·v as plain batched matmuls (cuBLAS splits the long key axis).
    `mask` is additive, broadcastable to [b, *, 1, slots], or None. With `softcap` (Gemma 2's logit soft-capping) or
    `s_aux` (GPT-OSS's learned sink logits), which no SDPA kernel applies, every variant is computed as matmul.
    """
    batch, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if variant not in DECODE_ATTENTION:
        raise ValueError(f"decode attention must be one of {', '.join(DECODE_ATTENTION)}; got {variant!r}")
    if variant == "matmul" or softcap is not None or s_aux is not None:
        return grouped_attention(query, key, value, dim**-0.5 if scaling is None else scaling, mask, softcap, s_aux)
    if variant == "gqa":
        return sdpa(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
    if variant == "expanded_masked":
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        if mask is None:
            mask = torch.zeros(1, 1, 1, key.shape[-2], dtype=query.dtype, device=query.device)
        return sdpa(query, key, value, attn_mask=mask, scale=scaling)
    grouped = query.reshape(batch, kv_heads, groups * n, dim)  # "grouped": the layout of cache.grouped_scores
    output = sdpa(grouped, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(batch, heads, n, value.shape[-1])


def static_streaming_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    streaming_mask: torch.Tensor | None = None,
    streaming_decode_attention: str | None = None,
    streaming_window_masks: dict[int, torch.Tensor | None] | None = None,
    streaming_ring_masks: dict[int, torch.Tensor | None] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """One query token over the whole buffer [b, kv_heads, capacity + 1, d]; `streaming_mask` hides empty slots,
    `streaming_window_masks[w]` (where not None) also the keys a layer with its own sliding window w does not see.
    A layer that keeps only its last w tokens (a ring of w slots, `cache.sliding_ring_size`) takes
    `streaming_ring_masks[w]` instead: its empty slots in the filling step (t < capacity; none once t >= w - 1),
    None (no mask) in the full one."""
    if streaming_decode_attention is None:  # the step's keyword arguments, the mask among them, never arrived
        raise RuntimeError(f"{type(module).__name__}'s model does not pass keyword arguments on to its attention; "
                           "the static decode step cannot run it (use StreamingLLMWrapper)")
    window = module.streaming_window
    if window in streaming_ring_masks:
        streaming_mask = streaming_ring_masks[window]
    elif window is not None and streaming_window_masks[window] is not None:
        streaming_mask = streaming_window_masks[window]
    query = module.streaming_rotary.to_half_layout(query)  # as the buffer's keys (StaticStepLayer.update)
    output = decode_attention(query, key, value, streaming_mask, scaling, streaming_decode_attention, kwargs.get("softcap"),
                              kwargs.get("s_aux"))
    return output.transpose(1, 2).contiguous(), None


# Registered without a mask function: transformers then builds no mask at all for this implementation.
AttentionInterface.register(STATIC_ATTN_IMPLEMENTATION, static_streaming_attention_forward)


class StaticStepLayer(CacheLayerMixin):
    """One layer's buffers; `update` writes the step's key/value at the slot it is given (`cache_position`) and
    the layer's sinks, rotated to the step's frame by `rotate_sinks`, into slots [0, n_sink). A sliding ring
    (`ring_position` = the step's t, a device tensor) writes at t % its slots instead, and has no sinks."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, sink_keys: torch.Tensor, rotary: RotaryParams,
                 rotate_sinks, ring_position: torch.Tensor | None = None):
        super().__init__()
        self.keys, self.values, self.sink_keys, self.rotate_sinks = keys, values, sink_keys, rotate_sinks
        self.to_half_layout = rotary.to_half_layout  # buffers hold keys in rotate-half order, as the general path's
        self.ring_position = ring_position
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # the buffers exist from the start
        pass

    def update(self, key_states, value_states, cache_kwargs=None):
        slot = slots = cache_kwargs["cache_position"]
        if self.ring_position is not None:
            slot = slots = (self.ring_position % self.keys.shape[-2]).reshape(1)
        if (key_states.dtype, value_states.dtype) != (self.keys.dtype, self.values.dtype):
            # under torch.autocast (StreamingLayer._held_dtype): the buffers hold the model's dtype
            key_states, value_states = key_states.to(self.keys.dtype), value_states.to(self.values.dtype)
        n_sink = self.sink_keys.shape[-2]
        # (the reordering of a partly rotated interleaved head, GLM's, is a torch.cat too: under autocast of the other
        # half dtype, in the held dtype with autocast off, as the sinks)
        with in_held_dtype(self.keys):
            key_states = self.to_half_layout(key_states)
            if n_sink:
                # One write per buffer, as StaticCache's step, which inductor performs in place. Writing the sinks
                # through a slice instead made it copy the whole key buffer twice per layer per step.
                slots = torch.cat([torch.arange(n_sink, device=slot.device), slot])
                key_states = torch.cat([self.rotate_sinks(self.sink_keys).to(key_states.dtype), key_states], dim=2)
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slot, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        raise NotImplementedError("the static step is driven by FastStreamingWrapper, which passes every position")

    def get_mask_sizes(self, cache_position):
        return self.keys.shape[-2], 0

    def get_max_cache_shape(self) -> int:
        return self.keys.shape[-2]


class StaticStepCache(Cache):
    """The `Cache` the compiled step hands the model: the per-layer buffers the general path also uses."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], sink_keys: list[torch.Tensor],
                 rotaries: list[RotaryParams], rotate_sinks: list, ring_positions: list[torch.Tensor | None]):
        """rotaries: each layer's RoPE; rotate_sinks: one function per layer (rotating with that RoPE);
        ring_positions: the step's t for each sliding ring, None for the other layers."""
        super().__init__(layers=[StaticStepLayer(*tensors) for tensors in zip(keys, values, sink_keys, rotaries,
                                                                               rotate_sinks, ring_positions)])

    @property
    def is_compileable(self) -> bool:
        return True


class WrapperCache(StreamingKVCache):
    """FastStreamingWrapper's StreamingKVCache, over the wrapper's buffers. While its stream is empty it takes the
    batch size of the first tokens it is given, as a StreamingKVCache of one's own does (the buffers, allocated for
    the wrapper's last batch size, are replaced for both). It holds the wrapper weakly: a copy of the cache
    (copy.deepcopy) copies its buffers, not the wrapper and its model, and goes on as a StreamingKVCache of its own."""

    @property
    def _ended(self) -> bool:
        """Set by the wrapper's reset(), which zeroes the buffers this cache holds for the next stream: a reference kept
        across it (`old = fast.cache; fast.reset(); fast.cache = old`, or model(..., past_key_values=old)) went on with
        its count over zeroed keys, or wrote into the new stream, silently. Fed or given back, it is refused. Kept on
        the first layer, which a shallow copy of the cache (copy.copy) shares: such a copy fed on over the zeroed
        buffers (logits off by ~5)."""
        return bool(self.layers) and getattr(self.layers[0], "ended_by_reset", False)

    @_ended.setter
    def _ended(self, ended: bool) -> None:
        if self.layers:
            self.layers[0].ended_by_reset = ended

    def __init__(self, wrapper: FastStreamingWrapper, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wrapper = weakref.ref(wrapper)

    def _take_up_static_steps(self) -> None:
        """Bring the layers up to date with the wrapper's static steps since they were last read, as `wrapper.cache`
        does: a reference kept from before those steps (or `wrapper.current_cache`) held the stream as it was then, so
        model(...) or generate() fed it from there, over the tokens since, silently (logits off by ~7 on the tiny
        Llama)."""
        wrapper = self._wrapper()
        if wrapper is not None and not wrapper._ring_current and wrapper._cache is self:
            wrapper._resume_layers()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        self._take_up_static_steps()  # generate() feeds the ids past this count
        return super().get_seq_length(layer_idx)

    # What the layers hold, read through a reference kept from before static steps: as the stream is now (they reported
    # it as it was when the reference was read: the length, slots and positions of before).
    def get_cache_length(self, layer_idx: int | None = None) -> int:
        self._take_up_static_steps()
        return super().get_cache_length(layer_idx)

    def kept_positions(self, layer_idx: int | None = None) -> torch.Tensor:
        self._take_up_static_steps()
        return super().kept_positions(layer_idx)

    def compress(self, layer_idx: int = 0, rotary=None):
        self._take_up_static_steps()
        return super().compress(layer_idx, rotary)

    def __deepcopy__(self, memo):
        """A copy of the stream as it is now: a reference kept from before static steps (or `wrapper.current_cache`)
        takes them up first, as when it is fed. Its copy held the buffers as the steps left them with the count and slot
        positions of before, and fed on from there (logits off by ~8 on the tiny Llama)."""
        self._take_up_static_steps()
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def __getstate__(self) -> dict:
        """Pickled (pickle, torch.save), the stream as it is now (static steps taken up, as by a copy) without the
        wrapper, which a weak reference cannot carry (pickling failed: "cannot pickle 'weakref.ReferenceType' object"):
        loaded, it goes on as a StreamingKVCache of its own, as a copy does; a wrapper pickled with it holds it again."""
        self._take_up_static_steps()
        return {**self.__dict__, "_wrapper": _no_wrapper}

    def reset(self) -> None:
        """transformers' Cache.reset(), also through a reference read before static steps: the steps are taken up first,
        so that the wrapper sees the layers reset at its next call and refuses to go on (_follow_cache), as after
        `fast.cache.reset()`. It went on with its own count over the buffers, the stream the caller had reset, silently,
        and its `cache` then failed inside the package (AttributeError: 'NoneType' object has no attribute ...)."""
        self._take_up_static_steps()
        super().reset()

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if layer_idx == 0:
            if self._ended:
                raise ended_stream_error()
            wrapper = self._wrapper()
            if wrapper is not None:
                self._take_up_static_steps()
                if (wrapper._cache is self and written_outside_inference_mode(wrapper.keys[0])
                        and self.layers[0].keys is wrapper.keys[0]):  # (not layers emptied by Cache.reset(), fed since)
                    # buffers made in torch.inference_mode(), fed outside it (generate()): copies the wrapper shares,
                    # not the layers' own (it then refused its cache as "given new buffers outside the wrapper")
                    wrapper._leave_inference_mode()
                if key_states.shape[0] != self.max_batch_size:
                    wrapper._take_new_batch(self, key_states.shape[0])
        return super().update(key_states, value_states, layer_idx, cache_kwargs)


def ended_stream_error() -> RuntimeError:
    return RuntimeError("this cache's stream was ended by the FastStreamingWrapper's reset(), which zeroed the buffers "
                        "it shares with the wrapper's next stream; to keep a stream, copy it first "
                        "(copy.deepcopy(wrapper.cache), or of the wrapper)")


def _no_wrapper() -> None:
    """The wrapper of a WrapperCache loaded from a pickle (`WrapperCache.__getstate__`): none."""
    return None


class SinkAngles:
    """The cos and sin of a static step's sink offset, per RoPE (by id): set by the step, read by every layer's
    `rotate_sinks_by`. Held apart from the wrapper, so that the functions of its StaticStepCache do not refer to it."""

    by_rotary: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


def rotate_sinks_by(angles: SinkAngles, rotary: RotaryParams, sink_keys: torch.Tensor) -> torch.Tensor:
    """A layer's sinks, kept at their own positions, rotated by this step's offset (the angles the step set for the
    layer's RoPE)."""
    cos, sin = angles.by_rotary[id(rotary)]
    return apply_rotation(sink_keys.float(), cos, sin)


class GraphedStep:
    """A compiled step captured in one CUDA graph of our own. Each call copies the token ids into the graph's
    input buffer, replays, and returns a copy of the logits: no guard evaluation and no bookkeeping of
    torch.compile's CUDA-graph trees on the host (measured on an H100: ~1 ms of host time per step at the
    Llama-2-7B shape). Every other input of the step is a tensor at a fixed address (buffers, t, frame offset)."""

    def __init__(self, function, wrapper: FastStreamingWrapper, token_ids: torch.Tensor):
        """`function(wrapper, token_ids)`: the step captured; neither is kept (the graph holds the buffers)."""
        self.token_ids = token_ids.clone()
        function = functools.partial(function, wrapper)
        self._warm_up(function)
        self.graph, self.logits = self._capture(function)

    def _warm_up(self, function) -> None:
        """Compile, then run once more with every lazy initialisation done, on a side stream (as capture wants).
        Running the step again for the same token at the same t writes the same slots with the same keys, so
        this changes no state."""
        device = self.token_ids.device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                function(self.token_ids)
        torch.cuda.current_stream(device).wait_stream(stream)

    def _capture(self, function) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.token_ids.device), torch.cuda.graph(graph):  # the model's GPU, not the current one
            logits = function(self.token_ids)
        return graph, logits

    def __call__(self, wrapper: FastStreamingWrapper, token_ids: torch.Tensor) -> torch.Tensor:
        self.token_ids.copy_(token_ids)
        self.graph.replay()
        return self.logits.clone()


class TreesStep:
    """A step compiled with torch.compile(mode="reduce-overhead"): its output buffer is reused by the next replay."""

    def __init__(self, function):
        self.function = function

    def __call__(self, wrapper: FastStreamingWrapper, token_ids: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.function(wrapper, token_ids).clone()


# Inductor's freezing: the weights (and every other tensor the step reads but never writes that dynamo takes for
# static) become constants of the compiled graph, folded at compile time; its patterns then concatenate matmuls that
# read the same input (q/k/v, gate/up) into one each. Off CUDA that concatenation is off by default: turned on where
# this torch has the switch.
FREEZING = {"freezing": True}
if hasattr(torch._inductor.config.cpp, "enable_concat_linear"):
    FREEZING["cpp.enable_concat_linear"] = True


def frozen(function):
    """`function` (compiled with torch.compile) run with inductor freezing. The config is read while dynamo traces
    (which tensors become graph attributes) and while inductor compiles, both inside a call, so every call is made
    under it; a step captured in a CUDA graph calls it only to warm up and capture."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        with torch._inductor.config.patch(FREEZING):
            return function(*args, **kwargs)

    return call


def own_code(function):
    """`function` (a bound method or a plain function) on a code object of its own. torch.compile keeps its compiled
    graphs, and counts recompilations (8 at most by default; then fullgraph=True fails), per code object: with the
    class's methods shared, the 9th wrapper compiled in a process failed (FailOnRecompileLimitHit). Each compiled step
    gets its own code, dropped with the step."""
    bound = getattr(function, "__self__", None)
    plain = getattr(function, "__func__", function)
    own = types.FunctionType(plain.__code__.replace(), plain.__globals__, plain.__name__, plain.__defaults__,
                             plain.__closure__)
    own.__qualname__, own.__kwdefaults__ = plain.__qualname__, plain.__kwdefaults__
    return own if bound is None else types.MethodType(own, bound)


# How many parameters modules of this process have registered (`module.weight = Parameter(...)`,
# `load_state_dict(..., assign=True)`, the new embedding of `resize_token_embeddings`): a step compiled or captured on a
# model's parameters compares it at every step, an integer, and looks at the parameters themselves only when it moved.
_registered_parameters = 0


def _count_registration(module: nn.Module, name: str, parameter) -> None:
    global _registered_parameters
    _registered_parameters += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


# What torch.compile raises when it cannot trace a step (dynamo's own errors, and a guard on a value known only at run
# time, as a mixture of experts' loop over the experts a token picked): refused in one sentence (`_static_token`).
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode)


def parameter_signature(model: nn.Module) -> tuple:
    """Which tensors, at which addresses, a model's parameters are: what a captured CUDA graph reads."""
    return tuple((id(parameter), parameter.data_ptr()) for parameter in model.parameters())


def compiles_step(compile: str, device_type: str, config) -> bool:
    """Whether FastStreamingWrapper(compile=...) compiles the step of this model on this device type."""
    return compile == "always" or (compile == "auto" and device_type == "cuda" and not is_mixture_of_experts(config))


def check_compilable(model: nn.Module) -> None:
    """ValueError where torch.compile is known not to trace the step of this model: transformers' grouped_mm experts
    (the default experts of its mixtures of experts) trace in bfloat16 only (torch's grouped matmul has no other dtype
    in its tracing rule), while its batched_mm experts trace in any dtype."""
    config = model.config.get_text_config()
    dtype = next(model.parameters()).dtype
    if (is_mixture_of_experts(config) and getattr(config, "_experts_implementation", None) == "grouped_mm"
            and dtype != torch.bfloat16):
        raise ValueError(f"compile='always' cannot compile this mixture of experts in {str(dtype).removeprefix('torch.')}: "
                         "its experts are transformers' grouped_mm, which compiles in bfloat16 only. Load the model in "
                         "bfloat16, or call model.set_experts_implementation('batched_mm') first (any dtype), or run the "
                         "step eagerly (compile='never')")


class FastStreamingWrapper(StreamingLLMWrapper):
    """A StreamingLLMWrapper whose one-token steps run the static decode step, compiled on CUDA.

    compile: "auto" compiles the step with `torch.compile(fullgraph=True)` and captures it in a CUDA graph
    (`GraphedStep`) when the model is on a CUDA device and is no mixture of experts (whose compiled step is not verified
    on a GPU), and runs it eagerly elsewhere; "always" compiles on any device (captured on CUDA), and refuses a mixture
    of experts whose experts do not trace in its dtype (`check_compilable`) at once, any other step torch.compile cannot
    trace at its first step (ValueError); "never" runs it eagerly. `step_kind` says which. decode_attention: see
    `decode_attention`; "auto" picks the formulation measured fastest on the device type.
    freeze_weights: compile the step for a full buffer with inductor freezing (`frozen`), so that the projections which
    read the same input (q/k/v, gate/up) run as one matmul each. That step then holds the weights as they were when it
    was built (edits in place are not seen, nor refused: make a new wrapper; replaced parameters build it again, see
    below) and a concatenated copy of those projections' weights (about 2/3 of a Llama's parameters, once more on the
    device; on CPU ~1.9x the parameters' bytes, docs/performance.md), which torch's cache of compiled code keeps for
    the life of the process, after the wrapper is gone (torch 2.13, CPU). Ignored where the step is not compiled.
    Results equal StreamingLLMWrapper's (same positions, same kept tokens) to rounding. A compiled or captured step is
    built again when the model's parameters become other tensors (`load_state_dict(..., assign=True)`, a resized
    embedding; `parameter.data = ...` at the next reset()): a CUDA graph reads the memory of its capture.
    `step(token_ids)` is the hot path for loops that produce their own tokens ([batch, 1] on the model's device):
    of its input it checks the batch size only (a new stream takes it, a stream under way refuses another); calling
    the wrapper validates its input as StreamingLLMWrapper does.
    """

    def __init__(self, model: nn.Module, n_sink: int = 4, window_size: int = 1020, position_mode: str = "pos_shift",
                 max_block: int = 512, compile: str = "auto", decode_attention: str = "auto",
                 freeze_weights: bool = False):
        if compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}; got {compile!r}")
        if not isinstance(freeze_weights, bool):
            raise ValueError(f"freeze_weights must be True or False; got {freeze_weights!r}")
        self.freeze_weights = freeze_weights  # read by _use_buffers, which the first reset() calls
        describe(model)  # StreamingLLMWrapper's refusal of what is no supported model, before its config is read here
        self.device = compute_device(model)  # where the buffers go (an offloaded model's: where accelerate runs it)
        if compiles_step(compile, self.device.type, model.config):
            check_compilable(model)  # before the model is prepared: a refused model is left as it was
        self.decode_attention = resolve_decode_attention(decode_attention, self.device)
        super().__init__(model, n_sink, window_size, position_mode, "ours", max_block)
        # The RoPEs the layers use (one for most models), each rotating the sinks once per step in _static_step.
        # (a list, looked up by id() at each step: a copy of the wrapper holds copies of the rotaries, with new ids)
        self._distinct_rotaries = list({id(rotary): rotary for rotary in self.architecture.layer_rotaries}.values())
        # The layers' own sliding windows, and whether each ever hides a kept key (then its layers get its mask).
        policy, capacity = self._cache.policy, self.n_sink + self.window_size
        self._sliding_windows = {window: policy.window_hides(window, max(capacity, window))
                                 for window in set(sliding_windows(model.config)) - {None} - set(self._rings)}
        compiled = compiles_step(compile, self.device.type, model.config)
        # How a one-token step runs: "cuda_graph" (compiled, captured in our own CUDA graph: one replay per step,
        # no guard evaluation), "cuda_graph_trees" (torch.compile's reduce-overhead graphs, the fallback),
        # "compiled" (off CUDA), "eager".
        self.step_kind = ("cuda_graph" if self.device.type == "cuda" else "compiled") if compiled else "eager"
        self._compiled: dict[bool, object] = {}
        self._built_on, self._parameters_seen = (), _registered_parameters  # see _follow_parameters

    # -- storage shared by both paths -------------------------------------------------------------------------
    def _new_cache(self) -> StreamingKVCache:
        """A fresh stream over the buffers (allocated on first use or for a new batch size, zeroed otherwise, so
        that the compiled graphs, which hold their addresses, stay valid); the general path's RingLayers get the
        same tensors."""
        self._fresh_buffers()
        self.seen = self.base = 0
        self._ring_current = True  # the RingLayers' host state matches the buffers
        cache = WrapperCache(self, self.n_sink, self.window_size, self.position_mode, "ours", num_layers=len(self.keys))
        self._hold(cache)
        return cache

    def _fresh_buffers(self) -> None:
        """Buffers for a new stream of `_batch_size`: new ones for another batch size (or after inference mode), else
        the same ones zeroed, so that the compiled graphs, which hold their addresses, stay valid. The caches over
        zeroed buffers are ended."""
        # The stream left behind goes on where a reference kept to it is fed (its buffers are left as they are for a
        # new batch size): with the static steps since the cache was last read, not from before them.
        self._resume_layers()
        if not self._buffers_reusable():
            self._allocate()
            return
        for tensor in (*self.keys, *self.values, *self.sink_keys, self.step_position, self.frame_base):
            tensor.zero_()
        # Every cache over these buffers: the wrapper's, and the one it made (a cache given to the wrapper takes the
        # buffers and lets the one it replaces go on copies: `_let_go`), not a copy given to it.
        for ended in (getattr(self, "_cache", None), getattr(self, "_own_cache", None)):
            if ended is not None and ended.layers and ended.layers[0].keys is self.keys[0]:
                ended._ended = True

    def _buffers_reusable(self) -> bool:
        return (getattr(self, "keys", None) is not None and self.keys[0].shape[0] == self._batch_size
                and not written_outside_inference_mode(self.keys[0]))

    def _let_go(self) -> None:
        """The stream the buffers hold goes on in the caches over them, on copies of their own, before a cache given to
        the wrapper takes the buffers: kept aside, the replaced stream stays as it was, as a StreamingLLMWrapper leaves
        it (new buffers, for another batch size, leave it the old ones)."""
        if not self._buffers_reusable():
            return
        for cache in {id(cache): cache for cache in (self._cache, self._own_cache)}.values():
            if cache.layers and cache.layers[0].keys is self.keys[0]:
                for layer in cache.layers:
                    layer.keys, layer.values, layer.sink_keys = (tensor.clone() for tensor in
                                                                 (layer.keys, layer.values, layer.sink_keys))

    def _hold(self, cache: WrapperCache, seen: int = 0, base: int = 0) -> None:
        """Make `cache` the stream over the buffers, which hold its first `seen` tokens (window keys at p - base)."""
        self._own_cache = cache
        self._adopt_buffers(cache)
        for layer, rotary in zip(cache.layers, self.architecture.layer_rotaries):
            layer.rotary = rotary
            if seen:
                layer.resume(seen, base)

    def _adopt_buffers(self, cache: StreamingKVCache) -> None:
        for layer, keys, values, sink_keys, ring in zip(cache.layers, self.keys, self.values, self.sink_keys, self._rings):
            layer.adopt(keys, values, sink_keys, ring)

    def _take_up_given(self, cache: StreamingKVCache) -> None:
        """`wrapper.cache = cache` with a cache over other tensors (a copy, a loaded one, a StreamingLLMWrapper's): its
        stream is copied into the wrapper's buffers, which its layers then hold, so that it goes on, in this very
        object, through the static step (its graphs keep their buffers); the stream it replaces stays as it was, on
        copies (`_let_go`). Refused, the wrapper left as it was, where the cache holds another FastStreamingWrapper's
        buffers, another model's keys, or layers that hold different numbers of tokens."""
        if type(cache) not in (StreamingKVCache, WrapperCache):
            raise TypeError(f"a FastStreamingWrapper takes a StreamingKVCache as its stream; got a {type(cache).__name__}")
        layers = cache.layers
        owner = cache._wrapper() if isinstance(cache, WrapperCache) else None
        if owner is not None and owner is not self and layers and layers[0].keys is getattr(owner, "keys", [None])[0]:
            raise ValueError("this cache is another FastStreamingWrapper's stream (it holds that wrapper's buffers); give "
                             "this wrapper a copy of it: copy.deepcopy(other.cache)")
        # A cache made for more layers than the model's (StreamingKVCache(num_layers=...), which a StreamingLLMWrapper
        # streams with, the rest left empty; _check_cache_given refuses one whose extra layers hold tokens): its layers
        # past the model's are dropped when it is taken up. It was taken empty, the wrapper's stream let go, and every
        # call then refused it ("cache was reset (Cache.reset())").
        layers = layers[: len(self.keys)]
        if all(layer.seen == 0 for layer in layers):
            self._let_go()
            self._fresh_buffers()  # nothing held yet: a new stream over the buffers, in this cache
            self.seen = self.base = 0
            self._ring_current = True
            self._become_wrapper_cache(cache, len(self.keys))
            self._hold(cache)
            return
        seen, base = layers[0].seen, layers[0].base
        if len(layers) != len(self.keys) or any(layer.seen != seen for layer in layers):
            raise stopped_pass_error(seen, next((layer.seen for layer in layers if layer.seen != seen), 0))
        batch = layers[0].values.shape[0]
        expected = [((batch, *keys.shape[1:]), (batch, *sinks.shape[1:]), ring)
                    for keys, sinks, ring in zip(self.keys, self.sink_keys, self._rings)]
        given = [(tuple(layer.keys.shape), tuple(layer.sink_keys.shape), layer.sliding) for layer in layers]
        placement = (self.keys[0].dtype, self.keys[0].device)
        if given != expected or any((layer.keys.dtype, layer.keys.device) != placement for layer in layers):
            expected, given = [shapes[0] for shapes in expected], [shapes[0] for shapes in given]
            raise ValueError(f"this cache holds keys of another shape, dtype or device (layers of {given[0]}, "
                             f"{layers[0].keys.dtype}, {layers[0].keys.device}) than this wrapper's model streams "
                             f"({expected[0]}, {placement[0]}, {placement[1]}): make a new one for this model")
        self._batch_size = batch
        self._let_go()
        self._fresh_buffers()
        with torch.no_grad():
            for layer, keys, values, sink_keys in zip(layers, self.keys, self.values, self.sink_keys):
                keys.copy_(layer.keys)
                values.copy_(layer.values)
                sink_keys.copy_(layer.sink_keys)
        self._become_wrapper_cache(cache, len(self.keys))
        self._hold(cache, seen, base)
        self._ring_current = True
        self.seen, self.base = seen, base
        self.step_position.fill_(seen)
        self.frame_base.fill_(base)

    def _become_wrapper_cache(self, cache: StreamingKVCache, num_layers: int) -> None:
        """A StreamingKVCache given to the wrapper becomes a WrapperCache of it (a reference kept to it takes up the
        static steps when fed or read, as `wrapper.cache` itself does), with one layer per buffer."""
        cache.__class__ = WrapperCache
        cache._wrapper, cache._ended = weakref.ref(self), False
        del cache.layers[num_layers:]  # (empty: `_take_up_given` refuses a cache whose layers past the model's hold tokens)
        cache._depth = min(cache._depth, num_layers - 1)
        while len(cache.layers) < num_layers:
            cache.layers.append(cache._new_layer())

    def _take_new_batch(self, cache: StreamingKVCache, batch: int) -> None:
        """The wrapper's empty stream fed a batch of another size through its cache (model.generate()): new buffers
        of that size, as the wrapper's own calls take it (_take_batch). Anything else is left to the cache's layers,
        which refuse it."""
        if batch >= 1 and cache is self._cache and self.seen == 0 and cache.get_seq_length() == 0:
            self._batch_size = batch
            self._allocate()
            self._adopt_buffers(cache)

    def _allocate(self) -> None:
        shape = attention_shape(self.model.config)
        dtype, device = next(self.model.parameters()).dtype, self.device
        kv_heads, head_dim = shape.kv_heads, shape.head_dim
        batch = self._batch_size
        # Layers whose window is at most window_size + 1 keep a ring of their last `window` tokens (RingLayer.sliding).
        windows = sliding_windows(self.model.config)
        self._rings = [sliding_ring_size(self.window_size, window) for window in windows]
        layouts = [ring_layout(self.n_sink, self.window_size, window) for window in windows]
        # One tensor per layer, each its own allocation (as transformers' StaticCache): a CUDA graph may mutate a
        # static input in place, but not a view of one, which would be a different input aliasing it. A sliding ring
        # has as many slots as its window and no sinks.
        self.keys = [torch.zeros(batch, kv_heads, sinks + ring, head_dim, dtype=dtype, device=device)
                     for sinks, ring in layouts]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        self.sink_keys = [torch.zeros(batch, kv_heads, sinks, head_dim, dtype=dtype, device=device) for sinks, _ in layouts]
        self.step_position = torch.zeros((), dtype=torch.long, device=device)  # t of the next token
        self.frame_base = torch.zeros((), dtype=torch.long, device=device)
        self._use_buffers()

    def _use_buffers(self) -> None:
        """Make the static step work on the buffers just allocated or copied. Frozen (freeze_weights), a static
        tensor the step only reads would become a constant of the graph: the sinks, t and the frame offset, which
        change between steps, are then ordinary inputs (read from the same address every step all the same)."""
        written = (*self.keys, *self.values)
        read = (*self.sink_keys, self.step_position, self.frame_base)
        for tensor in written if self.freeze_weights else (*written, *read):
            torch._dynamo.mark_static_address(tensor)
        self._sink_angles = SinkAngles()
        rotate_sinks = [functools.partial(rotate_sinks_by, self._sink_angles, rotary)
                        for rotary in self.architecture.layer_rotaries]
        self.static_cache = StaticStepCache(self.keys, self.values, self.sink_keys, self.architecture.layer_rotaries,
                                            rotate_sinks, [self.step_position if ring else None for ring in self._rings])
        if hasattr(self, "_compiled"):
            self._compiled.clear()  # new addresses: the graphs are traced again

    def _leave_inference_mode(self) -> None:
        """Go on outside torch.inference_mode() with buffers allocated inside it (inference tensors may not be
        written in place outside that mode): copies, shared again with the cache's layers (where they hold them: a
        cache given to the wrapper since keeps its own, and is refused by _follow_cache)."""
        held = self.keys
        self.keys, self.values, self.sink_keys = ([tensor.clone() for tensor in group]
                                                  for group in (self.keys, self.values, self.sink_keys))
        self.step_position, self.frame_base = self.step_position.clone(), self.frame_base.clone()
        self._use_buffers()
        for layer, old, keys, values, sink_keys in zip(self._cache.layers, held, self.keys, self.values, self.sink_keys):
            if layer.keys is old:
                layer.keys, layer.values, layer.sink_keys = keys, values, sink_keys
                layer.leave_inference_mode()  # the slot positions

    _batch_size = 1
    _ring_current = True  # (before the first cache is made)

    def _placement(self) -> tuple:
        """The dtype (RoPE frequencies, buffers) and the device (buffers, compiled step) the wrapper was made for."""
        parameter = next(self.model.parameters())
        return parameter.dtype, parameter.device

    @property
    def tokens_seen(self) -> int:
        self._follow_cache()
        return self.seen

    def _follow_cache(self) -> None:
        """Take up the stream where the cache's layers have it, when they are the current state (no static step
        since `cache` was last read): whoever holds `wrapper.cache` may have fed it since (model.generate(...,
        past_key_values=wrapper.cache)), on the same buffers through the general path. Buffers made under
        torch.inference_mode() and used outside it are copied first (~0.3 us per call): the step counters written here
        and the static step's writes would fail inside torch (a stream begun by generate() under the mode too)."""
        if written_outside_inference_mode(self.keys[0]):
            self._leave_inference_mode()
        if not self._ring_current:
            return
        layers = self._cache.layers
        if len(layers) != len(self.keys) or any(layer.keys is not keys for layer, keys in zip(layers, self.keys)):
            raise RuntimeError("this FastStreamingWrapper's cache was reset (Cache.reset()) or given new "
                               "buffers outside the wrapper; call wrapper.reset() to start a new stream")
        if (layers[0].seen, layers[0].base) != (self.seen, self.base):
            if layers[-1].seen != layers[0].seen:  # a block stopped between two layers (StreamingKVCache.update)
                raise stopped_pass_error(layers[0].seen, layers[-1].seen)
            self.seen, self.base = layers[0].seen, layers[0].base
            self.step_position.fill_(self.seen)
            self.frame_base.fill_(self.base)

    @property
    def cache(self) -> StreamingKVCache:
        """The StreamingKVCache over the shared buffers, brought up to date with the static steps taken since."""
        self._resume_layers()
        return self._cache

    def __del__(self, _exiting=sys.is_finalizing) -> None:
        """A wrapper dropped leaves its stream current: a reference kept to its cache from before its last static steps
        (`kept = fast.cache`, `fast.step(...)`, `del fast`) held the count and slots of then, over buffers the steps had
        moved on, and model(..., past_key_values=kept) fed on from there, silently (logits off by ~7 on the tiny
        Llama): the cache takes the steps up from the wrapper, which was gone. Not by a shallow copy (copy.copy) of a
        wrapper that lives on, whose stream it shares with counts that may be older (the cache's weak reference names
        its wrapper; it is already cleared when the cycle collector frees it); nor where __init__ failed (no stream)."""
        if _exiting():  # the interpreter is exiting (its modules' names may be gone): no caller is left to feed a cache
            return
        cache = self.__dict__.get("_cache")
        if cache is not None and not self._ring_current and cache._wrapper() in (self, None):
            self._resume_layers()

    def _resume_layers(self) -> None:
        """Bring the cache's layers up to date with the static steps taken since they were last current (none: nothing
        to do)."""
        if self._ring_current:
            return
        for layer in self._cache.layers:
            layer.resume(self.seen, self.base)
        # The static steps went through every layer: a pass has reached the last one (StreamingKVCache._depth; with
        # n_sink = 0 the first token is a static step, and the first block after it was refused as a stopped pass).
        self._cache._depth = len(self._cache.layers) - 1
        self._ring_current = True

    @cache.setter
    def cache(self, cache: StreamingKVCache) -> None:
        self._check_cache_given(cache)
        if getattr(cache, "_ended", False):
            raise ended_stream_error()
        # The static steps since the cache was last read go with the cache replaced: kept aside and fed (model(...,
        # past_key_values=old)), it took them up only while it was the wrapper's, and fed on from before them.
        self._resume_layers()
        if not cache.layers or cache.layers[0].keys is not self.keys[0]:
            self._take_up_given(cache)  # before, the next call refused it ("replaced ... call wrapper.reset()")
        # Marked current, so that the next call takes up the cache's count (_follow_cache).
        self._cache, self._ring_current = cache, True

    @property
    def current_cache(self) -> StreamingKVCache:
        return self._cache

    def __deepcopy__(self, memo):
        """A copy (model, buffers, stream) that compiles steps of its own: a compiled step works on the buffers it was
        traced with, so the copy's steps ran the original's step on the original's buffers (and a captured CUDA graph
        cannot be copied). The copy's cache holds the copy (deepcopy keeps a weak reference as it is)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy({name: value for name, value in self.__dict__.items() if name != "_compiled"},
                                             memo))
        copied._compiled = {}
        copied._use_buffers()
        copied._cache._wrapper = weakref.ref(copied)
        return copied

    def __getstate__(self) -> dict:
        """Pickled (pickle, torch.save), as a copy is made: the model, the buffers and the stream as it is now, without
        the built steps (a compiled step, a captured CUDA graph), which the loaded wrapper builds again on its own
        buffers (pickling failed on the cache's weak reference to the wrapper)."""
        self._resume_layers()  # the layers brought up to date with the static steps, as `cache` does
        return {name: value for name, value in self.__dict__.items() if name not in ("_compiled", "static_cache")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._compiled = {}
        self._use_buffers()
        self._cache._wrapper = weakref.ref(self)

    def __copy__(self):
        """copy.copy: Python's shallow copy (buffers, cache and steps shared), not through the pickling hooks above,
        whose __setstate__ pointed the cache both share at the copy (the original's cache then lost its wrapper)."""
        copied = type(self).__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def reset(self, batch_size: int | None = None) -> None:
        """Forget the stream; the compiled steps are kept unless the batch size changes (new buffers) or the model's
        parameters are other tensors (`_follow_parameters`)."""
        if batch_size is not None:
            self._batch_size = check_int("batch_size", batch_size, 1)
        self.cache = self._new_cache()
        if getattr(self, "_compiled", None):  # here also a parameter given new memory in place (`parameter.data = ...`)
            self._follow_parameters()

    def _follow_parameters(self) -> None:
        """Drop the built steps if the model's parameters are no longer the tensors they were built on (replaced by
        `load_state_dict(..., assign=True)`, a resized embedding): a step captured in a CUDA graph reads its
        parameters at the addresses of its capture, so it would go on with the old weights, or with memory freed
        since. The next step builds (compiles, captures) them again. A frozen step (freeze_weights) then freezes the
        new weights; edits in place remain unseen by it."""
        self._parameters_seen = _registered_parameters
        if parameter_signature(self.model) != self._built_on:
            self._compiled.clear()

    # -- feeding ------------------------------------------------------------------------------------------------
    def _feed(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._follow_cache()
        self._take_batch(input_ids.shape[0])
        if input_ids.shape[1] == 1 and self.seen >= self.n_sink:
            return self._static_token(input_ids)
        return self._feed_general(input_ids)

    def _take_batch(self, batch: int) -> None:
        """A new stream takes the batch size it is given (new buffers); a stream under way refuses another one."""
        if batch != self._batch_size:
            if self.seen:
                raise ValueError(f"this stream holds a batch of {self._batch_size}; got {batch} (reset it first)")
            self.reset(batch)

    def _feed_general(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Blocks and the first n_sink tokens: the general path of cache.py on the same buffers."""
        self.model.set_attn_implementation("streaming_llm")
        logits = super()._feed(input_ids)
        layer = self.cache.layers[0]
        self.seen, self.base = layer.seen, layer.base
        self.step_position.fill_(self.seen)
        self.frame_base.fill_(self.base)
        return logits

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Decode one token per stream ([batch, 1] ids on the model's device); logits [batch, 1, vocab]."""
        self._check_model_unchanged()
        with model_lock(self.model):  # as __call__: the step switches the model's attention for its duration
            self._follow_cache()
            self._take_batch(token_ids.shape[0])
            if self.seen < self.n_sink:
                return self._feed_general(token_ids)
            return self._static_token(token_ids)

    def _static_token(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token t >= n_sink of every stream through the static step, once the stream is taken up (_follow_cache)
        and its batch size checked (_take_batch): by step(), or by _feed for a call with one token."""
        filling = self.seen < self.n_sink + self.window_size  # some slot is still empty
        if self._parameters_seen != _registered_parameters and self._compiled:
            self._follow_parameters()
        # The model runs the static attention for this step only, so that the model keeps working with a plain
        # StreamingKVCache in between (set on the config directly: set_attn_implementation walks every module).
        config = self.model.config
        previous = config._attn_implementation
        config._attn_implementation = STATIC_ATTN_IMPLEMENTATION
        try:
            logits = self._step_function(filling, token_ids)(self, token_ids)
        except COMPILE_ERRORS as error:  # the stream is as it was: the graph failed before it ran
            self._compiled.pop(filling, None)
            cause = str(error).strip().split("\n")[0]
            raise ValueError(f"torch.compile could not compile this model's decode step ({type(error).__name__}: "
                             f"{cause}); run the step eagerly: compile='never' (--compile never)") from error
        finally:
            config._attn_implementation = previous
        # t advances outside the graph: a graph input it reads, never one it writes besides the buffers.
        self.step_position.add_(1)
        self._ring_current = False
        self.seen += 1
        new_base = self._cache.policy.next_base(self.base, self.seen)
        if new_base != self.base:
            with in_held_dtype(self.keys[0]):
                for keys, sink_keys, rotary in zip(self.keys, self.sink_keys, self.architecture.layer_rotaries):
                    # the ring: after the sinks' slots, or a sliding ring's every slot (RingLayer.shift_window_keys)
                    window = keys[:, :, sink_keys.shape[-2] :]
                    window.copy_(rerotate_keys(window, self.base - new_base, rotary.inv_freq))
            self.base = new_base
            self.frame_base.fill_(new_base)
        return logits

    def _step_function(self, filling: bool, token_ids: torch.Tensor):
        """The step for a filling or a full buffer, called as `step(wrapper, token_ids)`: eager, compiled, or compiled
        and captured in a CUDA graph. It is given the wrapper at each call, not bound to it: the steps the wrapper
        keeps then make no reference cycle with it, so that a wrapper dropped is freed at once (its buffers, and the
        model if nothing else holds it), not at some later run of Python's cycle collector."""
        if filling not in self._compiled:
            if not self._compiled:
                self._built_on, self._parameters_seen = parameter_signature(self.model), _registered_parameters
            function = type(self)._static_step_filling if filling else type(self)._static_step_full
            if self.step_kind != "eager":
                function = own_code(function)
            if self.step_kind == "cuda_graph":
                try:
                    function = GraphedStep(self._compile(function, filling, fullgraph=True), self, token_ids)
                except COMPILE_ERRORS:
                    raise  # the step does not compile at all: reduce-overhead would not either
                except RuntimeError as error:  # a capture this torch/driver refuses: torch.compile's own graphs
                    warn_at_caller(f"capturing the decode step in a CUDA graph failed ({error}); using "
                                   "torch.compile(mode='reduce-overhead') instead", RuntimeWarning)
                    self.step_kind = "cuda_graph_trees"
            if self.step_kind == "cuda_graph_trees":
                function = TreesStep(self._compile(function, filling, mode="reduce-overhead", fullgraph=True))
            elif self.step_kind == "compiled":
                function = self._compile(function, filling, fullgraph=True)
            self._compiled[filling] = function
        return self._compiled[filling]

    def _compile(self, function, filling: bool, **options):
        """torch.compile; frozen (freeze_weights) for the full buffer's step only: each frozen graph holds its own
        concatenated weights, and the filling step serves only the first window_size tokens of a stream."""
        compiled = torch.compile(function, **options)
        return frozen(compiled) if self.freeze_weights and not filling else compiled

    def _static_step_filling(self, token_ids: torch.Tensor) -> torch.Tensor:
        slots = torch.arange(self.n_sink + self.window_size + 1, device=self.step_position.device)
        rings = {ring: self._additive(slots[:ring] <= self.step_position) for ring in set(self._rings) - {None}}
        return self._static_step(token_ids, self._additive(slots <= self.step_position), rings)

    def _static_step_full(self, token_ids: torch.Tensor) -> torch.Tensor:
        # Token t >= capacity: every slot of every buffer is filled; a sliding ring (window <= window_size + 1)
        # holds exactly the keys its layer sees.
        return self._static_step(token_ids, None, dict.fromkeys(set(self._rings) - {None}))

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """[1, 1, 1, slots]: 0 where a boolean [slots] is true, -inf elsewhere."""
        hidden = torch.zeros(visible.shape, dtype=self.keys[0].dtype, device=visible.device)
        return hidden.masked_fill(~visible, float("-inf"))[None, None, None]

    def _window_masks(self, sink_position: torch.Tensor) -> dict[int, torch.Tensor | None]:
        """Per sliding window of the model's layers: the mask of the slots such a layer sees at step t (filled, at a
        distance below the window; `positions.visible_in_layer`), or None where the window never hides a kept key.
        Slot j < n_sink holds sink j (distance sink_position - j), ring slot s the latest p with
        p = s (mod window_size + 1) (distance (t - s) mod (window_size + 1))."""
        if not any(self._sliding_windows.values()):
            return dict.fromkeys(self._sliding_windows)
        t = self.step_position
        slots = torch.arange(self.n_sink + self.window_size + 1, device=t.device)
        distance = torch.where(slots < self.n_sink, sink_position - slots, (t - slots) % (self.window_size + 1))
        return {window: self._additive((slots <= t) & (distance < window)) if hides else None
                for window, hides in self._sliding_windows.items()}

    def _static_step(self, token_ids: torch.Tensor, mask: torch.Tensor | None,
                     ring_masks: dict[int, torch.Tensor | None]) -> torch.Tensor:
        """Token t (t >= n_sink) of every stream: the whole step on device tensors, nothing read back. `mask`: the
        empty slots of the capacity + 1 buffers, `ring_masks`: of each sliding ring (None: none empty)."""
        policy, t = self._cache.policy, self.step_position
        window_position = t - self.frame_base
        ring_slot = self.n_sink + (t - self.n_sink) % (self.window_size + 1)
        # The sinks' offset (window frame - sink frame), once per step and RoPE for every layer's rotate_sinks_by.
        sink_position = t if policy.mode == "absolute" else t.clamp(max=policy.capacity)
        offset = (window_position - sink_position).reshape(1)
        self._sink_angles.by_rotary = {id(rotary): cos_sin(offset, rotary.inv_freq)
                                       for rotary in self._distinct_rotaries}
        batch = token_ids.shape[0]
        output = self.model(
            input_ids=token_ids,
            position_ids=window_position.reshape(1, 1).expand(batch, 1),
            cache_position=ring_slot.reshape(1),
            past_key_values=self.static_cache,
            use_cache=True,
            streaming_mask=mask,
            streaming_decode_attention=self.decode_attention,
            streaming_window_masks=self._window_masks(sink_position),
            streaming_ring_masks=ring_masks,
        )
        self._sink_angles.by_rotary = None
        return output.logits

