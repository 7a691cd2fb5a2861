"""Llama-structured adapter — `model.model.rotary_emb`, `model.model.layers[i].self_attn` — for Llama (SmolLM2),
Mistral, Ministral, Qwen2/3, Phi (partial rotary), Phi-3, OLMo, OLMo-2, OLMo-3, StarCoder2, Granite, Gemma, Gemma 2
(logit soft-capping), VaultGemma, Gemma 3 text (a RoPE per layer type), SmolLM3 (every fourth layer without RoPE),
EXAONE 4 (full-attention layers without RoPE beside sliding ones), Apertus, Arcee, Seed-OSS, BitNet, Jais 2, CWM; the
mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo, Granite-MoE (with or without a shared expert),
PhiMoE, GLM-4.5 (`glm4_moe`, partial rotary), EXAONE MoE, MiniMax-M2, Solar Open, AFMoE (Arcee Trinity: gated
attention output, full-attention layers without RoPE beside sliding ones), GPT-OSS (a learned sink logit per head,
sliding layers of 128 beside full ones); and the models with interleaved
rotary: Cohere (Command R), Cohere 2 (Command R7B: full-attention layers without RoPE beside sliding ones), GLM, GLM-4,
Helium, ERNIE 4.5 and its mixture of experts. What differs between them (norms, fused or biased projections, parallel
residuals, multipliers, partial rotary) happens inside the model's own modules."""

from __future__ import annotations

from torch import nn

MODEL_TYPES = ("llama", "mistral", "ministral", "qwen2", "qwen3", "phi", "phi3", "olmo", "olmo2", "olmo3", "starcoder2",
               "granite", "gemma", "gemma2", "vaultgemma", "gemma3_text", "smollm3", "exaone4", "apertus", "arcee",
               "seed_oss", "bitnet", "jais2", "cwm",
               "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "granitemoe", "granitemoeshared", "phimoe",
               "glm4_moe", "exaone_moe", "minimax_m2", "solar_open", "afmoe", "gpt_oss",
               "cohere", "cohere2", "glm", "glm4", "helium", "ernie4_5", "ernie4_5_moe")
# Model types that rotate feature pairs (2i, 2i + 1): whether their cos/sin come interleaved too (Cohere's rotary
# embedding repeats each angle in place) or as [angles, angles], interleaved inside the rotation (the others).
INTERLEAVED_ANGLES = {"cohere": True, "cohere2": True, "glm": False, "glm4": False, "helium": False, "ernie4_5": False,
                      "ernie4_5_moe": False}


def rotary_embedding(model: nn.Module) -> nn.Module:
    return model.model.rotary_emb


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def rope_layout(config) -> tuple[bool, bool]:
    """(interleaved, interleaved_angles) of RotaryParams for this model type."""
    return config.model_type in INTERLEAVED_ANGLES, INTERLEAVED_ANGLES.get(config.model_type, False)


def applies_rope(attention: nn.Module) -> bool:
    """Whether the layer rotates its queries and keys: SmolLM3 says so per layer (`use_rope`); EXAONE 4 and its MoE,
    given a sliding window, Cohere 2 and AFMoE rotate in their sliding layers only (their full-attention layers are
    NoPE)."""
    if not getattr(attention, "use_rope", True):
        return False
    model_type = attention.config.model_type
    if model_type == "cohere2":
        return attention.sliding_window is not None
    if model_type == "afmoe":
        return attention.is_local_attention
    return not (model_type in ("exaone4", "exaone_moe") and attention.sliding_window is not None
                and not attention.is_sliding)
