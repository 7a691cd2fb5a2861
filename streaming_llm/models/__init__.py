"""Model adapters: where each architecture family keeps its rotary embedding and attention layers.

The streaming attention itself is architecture-independent (it only needs the cos/sin the model
passes to `cache.update` and the rotary frequencies); an adapter only says where to find them
(`rotary_embedding`, `attention_modules`), which layers rotate (`applies_rope`) and how the model pairs the rotated
features (`rope_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from streaming_llm.models import gpt_neox, llama, multimodal
from streaming_llm.rope import RotaryParams

ADAPTERS: tuple[ModuleType, ...] = (llama, gpt_neox, multimodal)
SUPPORTED_MODEL_TYPES = tuple(t for adapter in ADAPTERS for t in adapter.MODEL_TYPES)
# RoPE variants whose frequencies do not depend on the sequence length seen so far.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


# The RoPE of a layer that applies none (SmolLM3's NoPE layers): no rotated features, every rotation the identity.
NO_ROPE = RotaryParams(torch.zeros(0), 0)


class UnsupportedModelError(ValueError):
    """A method (a reference implementation such as kvpress) cannot run this model; the others still can."""


@dataclass(frozen=True)
class Architecture:
    """What the streaming code needs to know about a loaded model.

    layer_rotaries: each attention module's RoPE, the same object for layers that share it (every layer of most
    models; Gemma 3 gives its sliding and its full-attention layers different frequencies). `rotary` is the first
    layer's."""

    model_type: str
    layer_rotaries: tuple[RotaryParams, ...]
    attention_modules: list[nn.Module]
    max_positions: int | None

    @property
    def rotary(self) -> RotaryParams:
        return self.layer_rotaries[0]

    @property
    def rotary_ndims(self) -> int:
        return self.rotary.rotary_ndims

    def single_rotary(self, purpose: str) -> RotaryParams:
        """The RoPE every layer shares; UnsupportedModelError naming `purpose` for a model whose layers differ."""
        if any(rotary is not self.rotary for rotary in self.layer_rotaries):
            raise UnsupportedModelError(f"{purpose} assumes one RoPE for every layer; this {self.model_type} model's "
                                        "layers rotate with different frequencies")
        return self.rotary


@dataclass(frozen=True)
class AttentionShape:
    """Layers and the per-layer attention sizes of a config: what a KV cache for it holds."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int


def attention_shape(config) -> AttentionShape:
    """The AttentionShape of a (text) model config; kv_heads = heads without grouped-query attention, head_dim =
    hidden_size / heads where the config does not say."""
    config = config.get_text_config()
    heads = config.num_attention_heads
    return AttentionShape(
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def adapter_for(config) -> ModuleType:
    """The adapter module for a config, or ValueError naming the supported model types."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.MODEL_TYPES:
            return adapter
    raise ValueError(
        f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
        "(RoPE decoder-only models)"
    )


def sliding_windows(config) -> list[int | None]:
    """Each layer's own sliding window (it sees keys at distance < window), None for a layer without one: every layer
    of Mistral v0.1 or Ministral, the sliding layers of a hybrid model (Gemma 2 and 3, Cohere 2, EXAONE 4, OLMo 3,
    Qwen2 with use_sliding_window past max_window_layers), no layer of most models."""
    config = config.get_text_config()  # a multimodal checkpoint's language model
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    layer_types = getattr(config, "layer_types", None)
    if not window or not layer_types:
        return [window or None] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def check_capacity(config, capacity: int) -> None:
    """ValueError if a cache of `capacity` tokens exceeds what the model's attention allows.

    A step attends to capacity + 1 keys at positions 0..capacity, so the capacity stays below
    max_position_embeddings and, for a model whose every layer attends within a sliding window (Mistral v0.1,
    Ministral), below `sliding_window`: no layer of it ever attends to more keys than that, sinks included. A hybrid
    model's sliding layers keep their own window inside a larger cache (`positions.visible_in_layer`).
    Called by every streaming attention step: nothing is formatted unless the check fails.
    """
    config = config.get_text_config()  # a multimodal checkpoint's language model
    max_positions = getattr(config, "max_position_embeddings", None)
    sliding_window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if sliding_window and capacity >= sliding_window and any(
            kind != "sliding_attention" for kind in getattr(config, "layer_types", None) or ()):
        sliding_window = None  # a hybrid (sliding_windows has a None): its full-attention layers see the whole cache
    bounds = [(bound, name) for name, bound in (("max_position_embeddings", max_positions),
                                                 ("sliding_window", sliding_window)) if bound]
    if not bounds:
        return
    bound, name = min(bounds)
    if capacity >= bound:
        reason = f", but every layer of this model sees only its last {bound}" if name == "sliding_window" else ""
        raise ValueError(
            f"cache capacity n_sink + window_size = {capacity} is too large for the model's {name}={bound}: a "
            f"step attends to capacity + 1 tokens{reason}; use at most {bound - 1}"
        )


def is_mixture_of_experts(config) -> bool:
    """Mixtral, Granite-MoE, PhiMoE (num_local_experts), Qwen2/3-MoE, OLMoE (num_experts), GLM-4.5
    (n_routed_experts), ERNIE 4.5 MoE (moe_num_experts)."""
    config = config.get_text_config()
    return any(getattr(config, name, 0) for name in ("num_local_experts", "num_experts", "n_routed_experts",
                                                      "moe_num_experts"))


def compute_device(model: nn.Module) -> torch.device:
    """The device `model` computes on: its first parameter's, or, for weights offloaded by accelerate (on the meta
    device until its hooks load them for a forward pass: `device_map` with "cpu" or "disk", `cpu_offload`), the device
    its hooks load them to (the first hook's `execution_device`, in module order)."""
    device = next(model.parameters()).device
    if device.type != "meta":
        return device
    for module in model.modules():
        execution_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if execution_device is not None and torch.device(execution_device).type != "meta":
            return torch.device(execution_device)
    raise ValueError("the model's weights are on the meta device (not loaded) and no accelerate hook loads them: "
                     "load the model's weights first")


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (`peft.get_peft_model`), whose adapters (LoRA) sit inside its modules:
    its attention modules and rotary embedding are the ones that run. Any other model as it is. ValueError for a PEFT
    model with prompt learning (prefix or prompt tuning), whose virtual tokens every forward pass adds (a cache of
    their own, or embeddings before the ids): a stream fed into a cache of sinks and a window has no place for them."""
    get_base_model = getattr(model, "get_base_model", None)
    if not callable(get_base_model):
        return model
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        raise ValueError("a PEFT model with prompt learning (prefix or prompt tuning) adds its virtual tokens to every "
                         "forward pass, which a streaming cache cannot take: stream the base model, or a model with "
                         "adapters such as LoRA")
    return get_base_model()


def model_type_name(config) -> str:
    return str(getattr(config, "model_type", type(config).__name__))


def describe(model: nn.Module) -> Architecture:
    """Inspect a loaded Hugging Face causal LM; ValueError if streaming cannot support it."""
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None:
        inner = getattr(model, "module", None)  # torch's DataParallel and DistributedDataParallel hold the model here
        hint = "; pass the model it holds (.module)" if isinstance(inner, nn.Module) and hasattr(inner, "config") else ""
        raise TypeError(f"expected a Hugging Face causal language model (a torch module with a .config), got "
                        f"{type(model).__name__}{hint}")
    output_embeddings = getattr(model, "get_output_embeddings", lambda: None)()
    if output_embeddings is None:  # AutoModel's bare decoder: no logits to stream
        raise TypeError(f"expected a causal language model with its head (AutoModelForCausalLM), got a "
                        f"{type(model).__name__}, which has none")
    adapter = adapter_for(config)
    text_config = config.get_text_config()  # the config itself, or a multimodal checkpoint's language model's
    rope_parameters = getattr(text_config, "rope_parameters", None) or {}
    # one set of parameters, or one per layer type (Gemma 3: {"sliding_attention": {...}, "full_attention": {...}})
    per_type = tuple(rope_parameters.values()) if all(isinstance(v, dict) for v in rope_parameters.values()) else ()
    for parameters in per_type or (rope_parameters,):
        rope_type = parameters.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(
                f"RoPE type {rope_type!r} changes its frequencies with the sequence length, which a fixed-position "
                f"streaming cache cannot honour; supported RoPE types: {', '.join(STATIC_ROPE_TYPES)}"
            )
    # (a PEFT model's `model` attribute is not the transformers model's, so the adapters read the transformers model)
    inner = transformers_model(model)
    rotary_emb, attention_modules = adapter.rotary_embedding(inner), adapter.attention_modules(inner)
    return Architecture(
        model_type=config.model_type,
        layer_rotaries=_layer_rotaries(rotary_emb, attention_modules, [adapter.applies_rope(module) for module in
                                                                      attention_modules],
                                       adapter.rope_layout(config), model_type_name(config)),
        attention_modules=attention_modules,
        max_positions=getattr(text_config, "max_position_embeddings", None),
    )


def _layer_rotaries(rotary_emb: nn.Module, attention_modules: list[nn.Module], rotated: list[bool],
                    layout: tuple[bool, bool], model_type: str) -> tuple[RotaryParams, ...]:
    """Each attention module's RoPE: the rotary embedding's `inv_freq`, or, for a rotary embedding that keeps one set
    per layer type (`{layer_type}_inv_freq`, Gemma 3), the set of the module's `layer_type`. A module that rotates
    nothing (`rotated[i]` false: SmolLM3's every fourth layer, EXAONE 4's full-attention layers) gets NO_ROPE, the
    identity at every position. `layout`: RotaryParams' (interleaved, interleaved_angles) for the model type."""
    made: dict[str, RotaryParams] = {}
    if not any(rotated):
        raise ValueError(f"this {model_type} model rotates no features in any layer: streaming needs rotary "
                         "position embeddings")

    def params(prefix: str) -> RotaryParams:
        if prefix not in made:
            inv_freq = getattr(rotary_emb, f"{prefix}inv_freq", None)
            if inv_freq is None:
                raise ValueError(f"this {model_type} model's rotary embedding has no {prefix}inv_freq: streaming "
                                 "cannot find the frequencies its layers rotate with")
            inv_freq = inv_freq.detach().float()
            if inv_freq.numel() == 0:
                raise ValueError(f"this {model_type} model rotates no features (rotary dimensions = 0): streaming "
                                 "needs rotary position embeddings")
            scaling = float(getattr(rotary_emb, f"{prefix}attention_scaling", 1.0))
            made[prefix] = RotaryParams(inv_freq, 2 * inv_freq.shape[0], scaling, *layout)
        return made[prefix]

    if hasattr(rotary_emb, "inv_freq"):
        rotaries = (params(""),) * len(attention_modules)
    else:
        rotaries = tuple(params(f"{getattr(module, 'layer_type', None)}_") for module in attention_modules)
    return tuple(rotary if uses_rope else NO_ROPE for rotary, uses_rope in zip(rotaries, rotated))
