"""A naive StreamingLLM reference, written straight from ../shared/SEMANTICS.md and independent of the package.

Tokens are processed one at a time. Every token's raw (pre-RoPE) keys and values are kept for every layer
(nothing is ever evicted here); for token t the visible keys are listed explicitly,

    sinks  {j : 0 <= j < n_sink, j <= t}   and   window  {p : max(n_sink, t - window_size) <= p <= t},

of which a layer with its own sliding window W (Gemma 3's sliding layers) sees only those whose position is
nearer than W to the query's. RoPE is applied by hand at positions chosen per mode:
- "pos_shift" and "rerotate": a key's position is its index in that list (stream order), the query's is the
  last index;
- "absolute": key p sits at position p, the query at t.

Only the model's own sub-modules are used (embeddings, norms, q/k/v projections, MLP, output projection);
RoPE, the attention scores, the softmax and the head mixing are written out here.
"""

from __future__ import annotations

import torch
from torch import nn

POSITION_MODES = ("pos_shift", "rerotate", "absolute")


# --- RoPE, by hand -------------------------------------------------------------------------------------------


def rotary_ndims_of(config) -> int:
    """Rotated features per head: all of them for Llama, `head_dim * rotary_pct` for GPTNeoX."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = getattr(config, "rotary_pct", None)
    if partial is None:
        partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return int(head_dim * partial)


def rope_theta_of(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(getattr(config, "rope_theta", getattr(config, "rotary_emb_base", 10000.0)))


def inv_freq_of(config, theta: float | None = None) -> torch.Tensor:
    """[rotary_ndims // 2] float32: 1 / theta^(2i / rotary_ndims), theta the config's unless given."""
    rotary_ndims = rotary_ndims_of(config)
    exponents = torch.arange(0, rotary_ndims, 2, dtype=torch.int64).to(torch.float32) / rotary_ndims
    return 1.0 / ((rope_theta_of(config) if theta is None else theta) ** exponents)


def rope_of(config, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) of the config's RoPE (of `layer_type`'s where the config keeps one per layer
    type, as Gemma 3). The default type by hand; a scaled type (linear, llama3, yarn) from transformers' own
    initialiser for it, since their frequency formulas are transformers' definition."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        parameters = parameters[layer_type]
    rope_type = parameters.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq_of(config, float(parameters["rope_theta"]) if "rope_theta" in parameters else None), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    extra = {} if layer_type is None else {"layer_type": layer_type}
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **extra)
    return inv_freq.float(), float(attention_scaling)


def layer_ropes(config) -> list[tuple[torch.Tensor, float]]:
    """rope_of each layer: one RoPE for all, or each layer's type's (config.layer_types, Gemma 3); no frequencies at
    all for a layer without RoPE (config.no_rope_layers[i] == 0, SmolLM3; EXAONE 4's and Cohere 2's full-attention
    layers)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if parameters and all(isinstance(value, dict) for value in parameters.values()):
        ropes = [rope_of(config, layer_type) for layer_type in config.layer_types]
    else:
        ropes = [rope_of(config)] * config.num_hidden_layers
    uses_rope = getattr(config, "no_rope_layers", None) or [1] * config.num_hidden_layers
    if (config.model_type in ("exaone4", "exaone_moe") and config.sliding_window) or config.model_type in ("cohere2",
                                                                                                        "afmoe"):
        # hybrid EXAONE 4 (and MoE), Cohere 2, AFMoE: their full-attention layers are NoPE
        uses_rope = [layer_type == "sliding_attention" for layer_type in config.layer_types]
    return [rope if used else (torch.zeros(0), 1.0) for rope, used in zip(ropes, uses_rope)]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# Models that turn features (2i, 2i + 1) together, where Llama turns (i, i + rotary_ndims / 2).
INTERLEAVED_ROPE_TYPES = ("cohere", "cohere2", "glm", "glm4", "helium", "ernie4_5", "ernie4_5_moe")


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]: each adjacent pair turned by 90 degrees."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0,
         interleaved: bool = False) -> torch.Tensor:
    """x [..., seq, head_dim] rotated at integer `positions` [seq]; only the first 2*len(inv_freq) features turn.
    `scaling` multiplies cos and sin (YaRN's attention factor), as transformers' RoPE does. Frequency i turns
    features (i, i + rotary_ndims / 2), or (2i, 2i + 1) when `interleaved`."""
    rotary_ndims = 2 * inv_freq.shape[-1]
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # [seq, rotary_ndims/2]
    if interleaved:
        emb = angles.repeat_interleave(2, dim=-1)  # [seq, rotary_ndims]: a0 a0 a1 a1 ...
    else:
        emb = torch.cat((angles, angles), dim=-1)  # [seq, rotary_ndims]: a0 a1 ... a0 a1 ...
    cos, sin = (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)
    x_rot, x_pass = x[..., :rotary_ndims], x[..., rotary_ndims:]
    turned = rotate_pairs(x_rot) if interleaved else rotate_half(x_rot)
    return torch.cat((x_rot * cos + turned * sin, x_pass), dim=-1)


# --- which keys a token sees, and where ----------------------------------------------------------------------


def visible_keys(t: int, n_sink: int, window_size: int | None) -> list[int]:
    """Stream indices of the keys token t attends to, in stream order (SEMANTICS §1). None = dense."""
    if window_size is None:
        return list(range(t + 1))
    sinks = [j for j in range(n_sink) if j <= t]
    window = list(range(max(n_sink, t - window_size), t + 1))
    return sinks + window


def layer_windows(config) -> list[int | None]:
    """Each layer's own sliding window, None for none: transformers' models hide a key at distance >= window from a
    layer of type "sliding_attention" (every layer of a model without layer_types: Mistral)."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    kinds = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return [window if window and kind == "sliding_attention" else None for kind in kinds]


def positions_for(t: int, keys: list[int], position_mode: str) -> tuple[torch.Tensor, int]:
    """(key positions [len(keys)], query position) for token t under `position_mode` (SEMANTICS §2)."""
    if position_mode in ("pos_shift", "rerotate"):
        return torch.arange(len(keys)), len(keys) - 1
    if position_mode == "absolute":
        return torch.tensor(keys), t
    raise ValueError(f"unknown position_mode {position_mode!r}")


# --- the architectures, layer by layer -----------------------------------------------------------------------


def _attend(query, keys, values, key_positions, query_position, inv_freq, n_heads, scaling=1.0, softmax_scale=None,
            softcap=None, interleaved=False, sink_logits=None):
    """One token's attention. query [n_heads, head_dim]; keys, values [n_keys, n_kv_heads, head_dim] (raw).
    `sink_logits` [n_heads] (GPT-OSS): one more score per head, of a key without a value, in the softmax."""
    n_kv_heads, head_dim = keys.shape[1], keys.shape[2]
    query = rope(query[:, None, :], torch.tensor([query_position]), inv_freq, scaling,
                 interleaved)[:, 0, :]  # [n_heads, head_dim]
    keys = rope(keys.transpose(0, 1), key_positions, inv_freq, scaling, interleaved)  # [n_kv_heads, n_keys, head_dim]
    values = values.transpose(0, 1)  # [n_kv_heads, n_keys, head_dim]
    group = n_heads // n_kv_heads  # query head h reads kv head h // group (GQA)
    outputs = []
    for head in range(n_heads):
        scores = keys[head // group] @ query[head] * (softmax_scale or head_dim**-0.5)  # [n_keys]
        if softcap is not None:  # Gemma 2
            scores = softcap * torch.tanh(scores / softcap)
        if sink_logits is not None:
            scores = torch.cat([scores, sink_logits[head : head + 1].to(scores.dtype)])
        weights = torch.softmax(scores, dim=-1)[: keys.shape[1]]  # the sink logit's share goes nowhere
        outputs.append(weights @ values[head // group])  # [head_dim]
    return torch.cat(outputs)  # [n_heads * head_dim]


def _llama_layer_qkv(layer, x, config):
    n_heads, n_kv_heads, head_dim = _heads(config)
    h = layer.input_layernorm(x)
    attn = layer.self_attn
    query, key = attn.q_proj(h).view(n_heads, head_dim), attn.k_proj(h).view(n_kv_heads, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's features, before RoPE
        query, key = attn.q_norm(query), attn.k_norm(key)
    value = attn.v_proj(h).view(n_kv_heads, head_dim)
    clip = getattr(config, "clip_qkv", None)  # OLMo
    if clip is not None:
        query, key, value = (tensor.clamp(-clip, clip) for tensor in (query, key, value))
    return query, key, value


def sink_logits_of(layer) -> torch.Tensor | None:
    """GPT-OSS's learned sink logit per query head (`self_attn.sinks`); None for every other model."""
    return getattr(getattr(layer, "self_attn", None), "sinks", None)


def _mlp(layer, h):
    """The layer's MLP on one token [hidden]; a mixture of experts (Mixtral, Qwen-MoE, OLMoE) takes [batch, seq,
    hidden] and may return its router logits too."""
    out = layer.mlp(h[None, None])
    return (out[0] if isinstance(out, tuple) else out)[0, 0]


def _llama_layer_out(layer, x, attended):
    x = x + layer.self_attn.o_proj(attended)
    return x + _mlp(layer, layer.post_attention_layernorm(x))


def _heads(config) -> tuple[int, int, int]:
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    return n_heads, n_kv_heads, getattr(config, "head_dim", None) or config.hidden_size // n_heads


def _phi_layer_qkv(layer, x, config):
    n_heads, n_kv_heads, head_dim = _heads(config)
    h, attn = layer.input_layernorm(x), layer.self_attn
    query, key = attn.q_proj(h).view(n_heads, head_dim), attn.k_proj(h).view(n_kv_heads, head_dim)
    if attn.qk_layernorm:  # LayerNorm over each head's features, before RoPE
        query, key = attn.q_layernorm(query), attn.k_layernorm(key)
    return query, key, attn.v_proj(h).view(n_kv_heads, head_dim)


def _phi_layer_out(layer, x, attended):
    """Attention and MLP side by side on the same normed input (parallel residual)."""
    return x + layer.self_attn.dense(attended) + layer.mlp(layer.input_layernorm(x))


def _phi3_layer_qkv(layer, x, config):
    """One fused projection, laid out [q (heads) | k (kv heads) | v (kv heads)]."""
    n_heads, n_kv_heads, head_dim = _heads(config)
    qkv = layer.self_attn.qkv_proj(layer.input_layernorm(x))
    query, key, value = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim])
    return query.view(n_heads, head_dim), key.view(n_kv_heads, head_dim), value.view(n_kv_heads, head_dim)


def _olmo2_layer_qkv(layer, x, config):
    """No norm before attention; RMSNorm over the whole q and k projections (all heads), before RoPE."""
    n_heads, n_kv_heads, head_dim = _heads(config)
    attn = layer.self_attn
    query, key = attn.q_norm(attn.q_proj(x)), attn.k_norm(attn.k_proj(x))
    return query.view(n_heads, head_dim), key.view(n_kv_heads, head_dim), attn.v_proj(x).view(n_kv_heads, head_dim)


def _olmo2_layer_out(layer, x, attended):
    """Norms after each sublayer, inside the residual."""
    x = x + layer.post_attention_layernorm(layer.self_attn.o_proj(attended))
    return x + layer.post_feedforward_layernorm(_mlp(layer, x))


def _olmoe_layer_qkv(layer, x, config):
    """Llama's norm before attention, then OLMo-2's RMSNorm over the whole q and k projections, then OLMo's clip
    (OLMoE; MiniMax-M2 without the clip)."""
    n_heads, n_kv_heads, head_dim = _heads(config)
    h, attn = layer.input_layernorm(x), layer.self_attn
    query, key, value = attn.q_norm(attn.q_proj(h)), attn.k_norm(attn.k_proj(h)), attn.v_proj(h)
    clip = getattr(config, "clip_qkv", None)
    if clip is not None:
        query, key, value = (tensor.clamp(-clip, clip) for tensor in (query, key, value))
    return query.view(n_heads, head_dim), key.view(n_kv_heads, head_dim), value.view(n_kv_heads, head_dim)


def _exaone4_layer_qkv(layer, x, config):
    """No norm before attention; RMSNorm over each head's q and k."""
    n_heads, n_kv_heads, head_dim = _heads(config)
    attn = layer.self_attn
    query = attn.q_norm(attn.q_proj(x).view(n_heads, head_dim))
    key = attn.k_norm(attn.k_proj(x).view(n_kv_heads, head_dim))
    return query, key, attn.v_proj(x).view(n_kv_heads, head_dim)


def _bitnet_layer_out(layer, x, attended):
    """Llama's, with an RMSNorm on the attention output before o_proj."""
    x = x + layer.self_attn.o_proj(layer.self_attn.attn_sub_norm(attended))
    return x + _mlp(layer, layer.post_attention_layernorm(x))


def _cohere_layer_out(layer, x, attended):
    """Attention and MLP side by side on the same normed input (parallel residual)."""
    return x + layer.self_attn.o_proj(attended) + layer.mlp(layer.input_layernorm(x))


def _glm4_layer_out(layer, x, attended):
    """Llama's, with a norm after each sublayer too, inside the residual."""
    x = x + layer.post_self_attn_layernorm(layer.self_attn.o_proj(attended))
    return x + layer.post_mlp_layernorm(layer.mlp(layer.post_attention_layernorm(x)))


def _afmoe_layer_out(layer, x, attended):
    """The attention output gated per feature by sigmoid(gate_proj) of the layer's normed input; norms before and after
    each sublayer."""
    gate = torch.sigmoid(layer.self_attn.gate_proj(layer.input_layernorm(x)))
    x = x + layer.post_attention_layernorm(layer.self_attn.o_proj(attended * gate))
    return x + layer.post_mlp_layernorm(_mlp(layer, layer.pre_mlp_layernorm(x)))


def _neox_layer_qkv(layer, x, config):
    n_heads = config.num_attention_heads
    head_dim = config.hidden_size // n_heads
    # query_key_value is laid out per head: [q_h | k_h | v_h] for h = 0..n_heads-1.
    qkv = layer.attention.query_key_value(layer.input_layernorm(x)).view(n_heads, 3 * head_dim)
    return qkv[:, :head_dim], qkv[:, head_dim : 2 * head_dim], qkv[:, 2 * head_dim :]


def _neox_layer_out(layer, x, attended):
    attn_out = layer.attention.dense(attended)
    if layer.use_parallel_residual:
        return x + attn_out + layer.mlp(layer.post_attention_layernorm(x))
    x = x + attn_out
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _apertus_layer_qkv(layer, x, config):
    """Llama's, with the pre-attention norm named attention_layernorm (and RMSNorm on each head's q and k)."""
    n_heads, n_kv_heads, head_dim = _heads(config)
    h, attn = layer.attention_layernorm(x), layer.self_attn
    query = attn.q_norm(attn.q_proj(h).view(n_heads, head_dim))
    key = attn.k_norm(attn.k_proj(h).view(n_kv_heads, head_dim))
    return query, key, attn.v_proj(h).view(n_kv_heads, head_dim)


def _apertus_layer_out(layer, x, attended):
    x = x + layer.self_attn.o_proj(attended)
    return x + layer.mlp(layer.feedforward_layernorm(x))


# (qkv fn, layer-output fn) of the models kept at `model.model`, Llama-style: what differs is inside their modules.
_LLAMA_STYLE_LAYERS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "olmo", "starcoder2", "gemma", "smollm3", "arcee", "seed_oss",
                     "mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "glm4_moe", "glm", "helium", "ernie4_5",
                     "ernie4_5_moe", "jais2", "ministral", "cwm", "exaone_moe", "solar_open", "gpt_oss"),
                    (_llama_layer_qkv, _llama_layer_out)),
    **dict.fromkeys(("olmoe", "minimax_m2"), (_olmoe_layer_qkv, _llama_layer_out)),
    "glm4": (_llama_layer_qkv, _glm4_layer_out),
    "afmoe": (_llama_layer_qkv, _afmoe_layer_out),
    "phi": (_phi_layer_qkv, _phi_layer_out),
    "phi3": (_phi3_layer_qkv, _llama_layer_out),
    **dict.fromkeys(("olmo2", "olmo3", "flex_olmo"), (_olmo2_layer_qkv, _olmo2_layer_out)),
    "exaone4": (_exaone4_layer_qkv, _olmo2_layer_out),
    "bitnet": (_llama_layer_qkv, _bitnet_layer_out),
    "apertus": (_apertus_layer_qkv, _apertus_layer_out),
}


def softmax_scale(config) -> float | None:
    """Granite's attention_multiplier, Gemma 2's query_pre_attn_scalar ** -0.5; None: head_dim ** -0.5."""
    if getattr(config, "attention_multiplier", None):
        return config.attention_multiplier
    scalar = getattr(config, "query_pre_attn_scalar", None)
    return scalar**-0.5 if scalar else None


def _parts(model):
    """(embedding, layers, final norm, output projection, qkv fn, layer-output fn) of a causal LM (of the language
    model of a multimodal one, Gemma 3: `model.model.language_model`)."""
    config = model.config.get_text_config()
    model_type = config.model_type
    if model_type == "gpt_neox":
        body = model.gpt_neox
        return body.embed_in, body.layers, body.final_layer_norm, model.embed_out, _neox_layer_qkv, _neox_layer_out
    body = getattr(model.model, "language_model", model.model)
    if model_type in ("granite", "granitemoe", "granitemoeshared"):  # Llama's layer with multipliers on the
        # embeddings, each residual branch, the logits; the MoE ones' experts (and shared expert) for its MLP

        def feed_forward(layer, h):
            if not hasattr(layer, "block_sparse_moe"):
                return layer.mlp(h)
            out = layer.block_sparse_moe(h[None, None])[0, 0]
            return out if getattr(layer, "shared_mlp", None) is None else out + layer.shared_mlp(h)

        def granite_layer_out(layer, x, attended):
            x = x + layer.self_attn.o_proj(attended) * config.residual_multiplier
            return x + feed_forward(layer, layer.post_attention_layernorm(x)) * config.residual_multiplier

        return (lambda token: body.embed_tokens(token) * config.embedding_multiplier), body.layers, body.norm, \
            (lambda hidden: model.lm_head(hidden) / config.logits_scaling), _llama_layer_qkv, granite_layer_out
    if model_type in ("gemma", "gemma2", "gemma3_text", "vaultgemma"):  # embeddings scaled by sqrt(hidden_size)
        normalizer = torch.tensor(config.hidden_size**0.5, dtype=body.embed_tokens.weight.dtype)

        def embed(token):  # Gemma 3's embedding module scales them itself
            return body.embed_tokens(token) * (1.0 if model_type == "gemma3_text" else normalizer)

        if model_type == "gemma":
            return embed, body.layers, body.norm, model.lm_head, _llama_layer_qkv, _llama_layer_out
        cap = config.final_logit_softcapping  # the logits soft-capped too (Gemma 2; Gemma 3 may)

        def gemma2_layer_out(layer, x, attended):  # norms before and after each sublayer (VaultGemma: before only)
            if model_type == "vaultgemma":
                x = x + layer.self_attn.o_proj(attended)
                return x + layer.mlp(layer.pre_feedforward_layernorm(x))
            x = x + layer.post_attention_layernorm(layer.self_attn.o_proj(attended))
            return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))

        def output(hidden):
            logits = model.lm_head(hidden)
            return logits if cap is None else cap * torch.tanh(logits / cap)

        return embed, body.layers, body.norm, output, _llama_layer_qkv, gemma2_layer_out
    if model_type in ("cohere", "cohere2"):  # the logits scaled
        return body.embed_tokens, body.layers, body.norm, (lambda hidden: model.lm_head(hidden) * config.logit_scale), \
            _llama_layer_qkv, _cohere_layer_out
    if model_type == "afmoe" and config.mup_enabled:  # embeddings scaled by sqrt(hidden_size)
        return (lambda token: body.embed_tokens(token) * config.hidden_size**0.5), body.layers, body.norm, \
            model.lm_head, *_LLAMA_STYLE_LAYERS[model_type]
    if model_type not in _LLAMA_STYLE_LAYERS:
        raise NotImplementedError(f"reference has no adapter for {model_type!r}")
    final_norm = body.final_layernorm if model_type == "phi" else body.norm
    return (body.embed_tokens, body.layers, final_norm, model.lm_head, *_LLAMA_STYLE_LAYERS[model_type])


@torch.no_grad()
def naive_streaming_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    n_sink: int,
    window_size: int | None,
    position_mode: str = "pos_shift",
) -> torch.Tensor:
    """Logits [T, vocab] of one stream `input_ids` [T], token by token, under SEMANTICS.md.

    `window_size=None` means dense attention (no eviction); the positions are then the plain 0..t in every mode.
    """
    if position_mode not in POSITION_MODES:
        raise ValueError(f"unknown position_mode {position_mode!r}")
    config = model.config.get_text_config()
    embed, layers, final_norm, output, layer_qkv, layer_out = _parts(model)
    ropes = layer_ropes(config)
    windows = layer_windows(config)
    n_heads = config.num_attention_heads
    raw_keys = [[] for _ in layers]  # per layer, per token: [n_kv_heads, head_dim], before RoPE
    raw_values = [[] for _ in layers]
    logits = []
    for t, token in enumerate(input_ids.tolist()):
        keys_seen = visible_keys(t, n_sink, window_size)
        key_positions, query_position = positions_for(t, keys_seen, position_mode)
        x = embed(torch.tensor(token))  # [hidden]
        for layer_idx, layer in enumerate(layers):
            query, key, value = layer_qkv(layer, x, config)
            raw_keys[layer_idx].append(key)
            raw_values[layer_idx].append(value)
            seen, positions = keys_seen, key_positions
            if windows[layer_idx] is not None:  # of those keys, the ones nearer than the layer's window
                near = (query_position - key_positions < windows[layer_idx]).tolist()
                seen = [p for p, kept in zip(keys_seen, near) if kept]
                positions = key_positions[torch.tensor(near)]
            keys = torch.stack([raw_keys[layer_idx][p] for p in seen])
            values = torch.stack([raw_values[layer_idx][p] for p in seen])
            inv_freq, rope_scaling = ropes[layer_idx]
            attended = _attend(query, keys, values, positions, query_position, inv_freq, n_heads, rope_scaling,
                               softmax_scale(config), getattr(config, "attn_logit_softcapping", None),
                               config.model_type in INTERLEAVED_ROPE_TYPES, sink_logits_of(layer))
            x = layer_out(layer, x, attended)
        logits.append(output(final_norm(x)))
    return torch.stack(logits)
