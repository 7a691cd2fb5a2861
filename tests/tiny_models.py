"""Tiny randomly initialised models (fp32, eval, seeded) and the code that drives a stream through the package.

The models are built from configs, never downloaded. Weights are drawn with initializer_range=0.2 and the norm
weights/biases are perturbed away from 1/0, so logits are O(1) and differ visibly between configurations: a
comparison at 1e-4 can fail.
"""

from __future__ import annotations

import copy
import types

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from streaming_llm.bench.latency import TINY_LLAMA

VOCAB_SIZE = 128
ARCHITECTURES = ("llama", "gpt_neox")


@torch.no_grad()
def _perturb_norms_and_biases(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights 1 +- 0.1, biases +- 0.1 and GPT-OSS's sink logits +- 1, so that no parameter is a no-op the
    package could ignore."""
    for name, parameter in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            parameter.copy_(1.0 + 0.1 * torch.randn(parameter.shape, generator=generator))
        elif name.endswith("bias"):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        elif name.endswith("self_attn.sinks"):  # GPT-OSS's learned sink logits, within the scores' range
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    _perturb_norms_and_biases(model, torch.Generator().manual_seed(seed))
    # No eos: greedy generation always runs to max_new_tokens without any logits processor touching the scores.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(torch.float32).eval()


# The position-independent RoPE variants a streaming cache can honour (models.STATIC_ROPE_TYPES), at a 256-token
# context stretched from 64. YaRN also scales cos and sin (attention_scaling ~1.14 here), so q and k come out of
# the model's RoPE scaled even at position 0.
SCALED_ROPES = {
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
}


def build_llama(rope: str | None = None) -> LlamaForCausalLM:
    """2 layers, hidden 64, 4 query heads sharing 2 kv heads (GQA), full rotary; `rope` names a SCALED_ROPES type."""
    torch.manual_seed(0)
    shape = dict(TINY_LLAMA)
    if rope is not None:
        shape.update(max_position_embeddings=256,
                     rope_parameters=dict(rope_theta=shape.pop("rope_theta"), **SCALED_ROPES[rope]))
    config = LlamaConfig(vocab_size=VOCAB_SIZE, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         attn_implementation="eager", **shape)
    return _finish(LlamaForCausalLM(config), seed=1)


GRANITE_MULTIPLIERS = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                           logits_scaling=4.0)


def build_llama_family(model_type: str, **overrides) -> torch.nn.Module:
    """A tiny model of another Llama-structured type the package supports, shaped as build_llama: Mistral (with a
    sliding window longer than any test stream), Qwen2 (q/k/v biases), Qwen3 (RMSNorm on each head's q and k, head_dim 32
    where hidden / heads is 16), Phi (parallel attention and MLP, half of each head rotated, LayerNorm on q and k),
    Phi-3 (fused qkv projection), OLMo (parameter-free LayerNorm, q/k/v clipped at 0.5), OLMo-2 (norms after each
    sublayer, RMSNorm over all heads' q and k; OLMo-3 too, with sliding-window layers), StarCoder2 (LayerNorm, biases,
    GELU MLP), Granite (multipliers on the embeddings, residual branches and logits, softmax scale 0.2), Gemma
    (embeddings scaled by sqrt(hidden), norms 1 + weight, head_dim 16 where its default is 256), Gemma 2 (Gemma's,
    with norms before and after each sublayer, softmax scale 24 ** -0.5, attention scores and logits soft-capped at
    1.5 and 4, close enough to bend them), Gemma 3 (Gemma 2's layer, RMSNorm on each head's q and k, a RoPE per layer
    type: base 10 for the sliding layer, base 10^4 stretched 4x for the full one), SmolLM3 (its second layer without
    RoPE), EXAONE 4 (OLMo-2's norms, RMSNorm on each head's q and k; a sliding layer, then a full-attention layer
    without RoPE), Apertus (xIELU MLP, its own norm names, RMSNorm on each head's q and k), Arcee (ReLU^2 MLP without a
    gate), Seed-OSS (q/k/v biases), BitNet (RMSNorm on the attention output and inside the MLP); mixtures of experts,
    4 experts, 2 per token: Mixtral, Qwen2-MoE (with a shared expert), Qwen3-MoE, OLMoE (OLMo-2's q/k norm after
    Llama's, clipped), Granite-MoE (Granite's multipliers; with a shared expert too), PhiMoE (LayerNorm, sparse-mixer
    router), GLM-4.5 (a dense first layer, a shared expert, half of each head rotated, RMSNorm on each head's q and
    k), FlexOlmo (OLMo-2's layer), EXAONE MoE (EXAONE 4's attention in a pre-norm layer), MiniMax-M2 (RMSNorm over all
    heads' q and k, half of each head rotated), Solar Open, AFMoE (muP-scaled embeddings, a dense then an MoE layer,
    gated attention output, its full-attention layer without RoPE); VaultGemma (Gemma 2's soft-capping, norms before each
    sublayer only), Jais 2, Ministral, CWM (a full and a sliding layer, llama3 RoPE); interleaved rotary: Cohere (q/k
    LayerNorm, parallel residual, scaled logits), Cohere 2 (its full-attention layer without RoPE), GLM (half of each
    head rotated), GLM-4 (norms after each sublayer too), Helium, ERNIE 4.5 and its MoE."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    extra = {"mistral": dict(sliding_window=4096), "qwen3": dict(head_dim=32), "olmo": dict(clip_qkv=0.5),
             "gemma": dict(head_dim=16), "olmo3": dict(sliding_window=4096), "smollm3": dict(no_rope_layers=[1, 0]),
             "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=1.5,
                            final_logit_softcapping=4.0, sliding_window=4096),
             "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4096,
                                 layer_types=["sliding_attention", "full_attention"],
                                 rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10.0),
                                                  "full_attention": dict(rope_type="linear", rope_theta=10000.0,
                                                                         factor=4.0)}),
             "phi": dict(partial_rotary_factor=0.5, qk_layernorm=True),
             "granite": GRANITE_MULTIPLIERS,
             "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
             "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64),
             "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
             "exaone4": dict(sliding_window=4096, layer_types=["sliding_attention", "full_attention"]),
             "olmoe": dict(num_experts=4, num_experts_per_tok=2, clip_qkv=0.5),
             "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, **GRANITE_MULTIPLIERS),
             "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64,
                                      **GRANITE_MULTIPLIERS),
             "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
             "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                              first_k_dense_replace=1, use_qk_norm=True),
             "vaultgemma": dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=1.5,
                                final_logit_softcapping=4.0, sliding_window=4096),
             **dict.fromkeys(("jais2", "ministral"), dict(head_dim=16, sliding_window=4096)),
             "cwm": dict(head_dim=16, sliding_window=4096, layer_types=["full_attention", "sliding_attention"],
                         rope_parameters=dict(rope_theta=10000.0, **SCALED_ROPES["llama3"])),
             "flex_olmo": dict(num_experts=4, num_experts_per_tok=2),
             "exaone_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, sliding_window=4096,
                                layer_types=["sliding_attention", "full_attention"]),
             "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                rope_parameters=dict(rope_theta=10000.0, partial_rotary_factor=0.5)),
             "solar_open": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
             "afmoe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1,
                           num_dense_layers=1, head_dim=16, sliding_window=4096, mup_enabled=True,
                           layer_types=["sliding_attention", "full_attention"]),
             "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=4096,
                             layer_types=["sliding_attention", "full_attention"],
                             rope_parameters=dict(rope_theta=10000.0, **SCALED_ROPES["yarn"])),
             "cohere": dict(use_qk_norm=True, logit_scale=0.5),
             "cohere2": dict(head_dim=16, logit_scale=0.5, sliding_window=4096,
                             layer_types=["sliding_attention", "full_attention"]),
             **dict.fromkeys(("glm", "glm4", "helium", "ernie4_5"), dict(head_dim=16)),
             "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                                  moe_layer_start_index=1)}.get(model_type, {})
    settings = dict(vocab_size=VOCAB_SIZE, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                    attn_implementation="eager") | TINY_LLAMA | extra | overrides
    torch.manual_seed(0)
    config = CONFIG_MAPPING[model_type](**settings)
    return _finish(AutoModelForCausalLM.from_config(config), seed=1)


def build_gemma3_multimodal(vocab_size: int = VOCAB_SIZE, **text_overrides) -> torch.nn.Module:
    """Gemma 3 as its 4B+ checkpoints come (`gemma3`: a vision tower and the text model at model.model.language_model),
    its text model shaped as build_llama_family("gemma3_text", **text_overrides), a one-layer vision tower beside it."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = build_llama_family("gemma3_text", **text_overrides).config.to_dict() | dict(vocab_size=vocab_size)
    torch.manual_seed(0)
    config = Gemma3Config(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                               num_attention_heads=2, image_size=28, patch_size=14),
                          mm_tokens_per_image=4, attn_implementation="eager")
    return _finish(AutoModelForCausalLM.from_config(config), seed=1)


def build_gpt_neox() -> GPTNeoXForCausalLM:
    """2 layers, hidden 64, 4 heads, rotary on 25% of each head (4 of 16 features), parallel residual."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        max_position_embeddings=4096,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="eager",
    )
    return _finish(GPTNeoXForCausalLM(config), seed=2)


def random_ids(length: int, seed: int, batch: int | None = None) -> torch.Tensor:
    """Token ids [length] (or [batch, length]) drawn from a fixed seed."""
    shape = (length,) if batch is None else (batch, length)
    return torch.randint(0, VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))


def dense_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The unmodified model's logits [T, vocab] for one stream [T], one forward, explicit all-ones mask."""
    ids = input_ids[None]
    return model(ids, attention_mask=torch.ones_like(ids)).logits[0].float()


def make_wrapper(model: torch.nn.Module, n_sink: int, window_size: int, **modes):
    """A StreamingLLMWrapper around a private copy of `model`, so that prepare_model never touches the fixture."""
    from streaming_llm import StreamingLLMWrapper

    return StreamingLLMWrapper(copy.deepcopy(model), n_sink=n_sink, window_size=window_size, **modes)


def block_sizes_covering(length: int, pattern: list[int]) -> list[int]:
    """Cycle through `pattern` until `length` tokens are covered (the last block is cut to fit)."""
    sizes, index = [], 0
    while sum(sizes) < length:
        sizes.append(min(pattern[index % len(pattern)], length - sum(sizes)))
        index += 1
    return sizes


def feed_stream(wrapper, input_ids: torch.Tensor, block_sizes: list[int] | None = None) -> torch.Tensor:
    """Feed `input_ids` [T] or [batch, T] through `wrapper` in blocks; logits [T, vocab] or [batch, T, vocab].

    After every call checks the cache bookkeeping (check_bookkeeping).
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    length = ids.shape[1]
    block_sizes = block_sizes or [1] * length
    assert sum(block_sizes) == length
    logits, seen = [], 0
    for size in block_sizes:
        block_logits = wrapper(ids[:, seen : seen + size])
        assert block_logits.shape == (ids.shape[0], size, VOCAB_SIZE)
        seen += size
        check_bookkeeping(wrapper.cache, seen)
        logits.append(block_logits.float())
    logits = torch.cat(logits, dim=1)
    return logits if input_ids.dim() == 2 else logits[0]


def check_bookkeeping(cache, seen: int, compressed_layers=(0,)) -> None:
    """A cache that has seen `seen` tokens: get_seq_length() == seen, get_cache_length() == min(seen, capacity) (per
    layer: a sliding ring, RingLayer.sliding = W, holds min(seen, W - 1)), compress(layer) returns exactly the held
    tokens for each of `compressed_layers` (None: every layer), and where the stored keys sit (check_stored_frame)."""
    capacity = cache.cache_capacity
    assert cache.get_seq_length() == seen
    assert cache.get_cache_length() == min(seen, capacity), (seen, capacity)
    check_stored_frame(cache)
    for index, layer in enumerate(cache.layers):  # a sliding ring holds what its next token sees
        held = min(seen, capacity if layer.sliding is None else layer.sliding - 1)
        assert cache.get_cache_length(index) == held, (index, seen, capacity)
    for index in range(len(cache.layers)) if compressed_layers is None else compressed_layers:
        compressed_keys, compressed_values = cache.compress(index)
        assert compressed_keys.shape[-2] == compressed_values.shape[-2] == cache.get_cache_length(index), index


def check_stored_frame(cache) -> None:
    """Where the stored (rotated) window keys sit, as PositionPolicy documents it: rerotate keeps every held key at
    its cache slot (the seed's method), pos_shift's lazy frame keeps positions <= 2 * capacity, absolute never moves.
    Distances, hence logits, do not show these, so the frame is checked directly."""
    for layer in cache.layers:
        if layer.positions is None or layer.stores_raw_keys:
            continue
        policy = layer.policy
        window = torch.sort(layer.positions[layer.held_mask() & (layer.positions >= policy.n_sink)]).values
        frame = policy.key_frame(window, layer.base)
        if policy.mode == "rerotate":  # the held window keys end at the newest slot (a sliding ring holds its tail)
            top = min(layer.seen, policy.capacity)
            assert frame.tolist() == list(range(top - window.numel(), top)), (layer.seen, layer.base)
        elif policy.mode == "pos_shift":
            assert window.numel() == 0 or int(frame.max()) <= 2 * policy.capacity, (layer.seen, layer.base)
        else:
            assert layer.base == 0


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_compiled_step_graphs(model: torch.nn.Module, n_sink: int, window_size: int,
                              steps: tuple[bool, ...] = (True, False)) -> None:
    """What CUDA graphs need, checked on CPU: torch.compile traces the whole static step with fullgraph=True (a graph
    break raises), and every tensor the graph writes in place is a static input (the per-layer buffers); a write to
    any other input (a view of a buffer, say) makes inductor skip CUDA-graph capture on GPU. And each buffer is
    written by exactly one index_copy, as in transformers' StaticCache step: a slice write (slice_scatter) made
    inductor copy the whole key buffer twice per layer per step (+1.2 ms of 8.5 at the 7B shape on an H100). The
    traced step streams the same logits as the general path. `steps`: which to trace, the filling (True) and the full
    (False) step; one not traced runs eagerly. They differ only in the mask the step passes to the same modeling code,
    and each trace takes seconds: the test of every model type traces the full step alone."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext

    from streaming_llm.fast import FastStreamingWrapper

    graphs = []

    def inspect(graph_module, example_inputs):
        metadata = TracingContext.get().fw_metadata
        mutated = list(metadata.mutated_inp_runtime_indices)
        targets = [str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"]
        graphs.append({"mutated": mutated, "not_static": sorted(set(mutated) - set(metadata.static_input_indices)),
                       "index_copy": sum("index_copy" in t for t in targets),
                       "scatter": sum("scatter" in t for t in targets)})
        return make_boxed_func(graph_module.forward)

    torch._dynamo.reset()
    fast = FastStreamingWrapper(copy.deepcopy(model), n_sink=n_sink, window_size=window_size)
    fast.step_kind = "eager"  # compiled below with the inspecting backend instead of inductor
    for filling in steps:
        function = FastStreamingWrapper._static_step_filling if filling else FastStreamingWrapper._static_step_full
        fast._compiled[filling] = torch.compile(function, backend=aot_autograd(fw_compiler=inspect), fullgraph=True)
    input_ids = random_ids(60, seed=47)
    streamed = feed_stream(fast, input_ids)
    assert max_abs_diff(streamed, feed_stream(make_wrapper(model, n_sink, window_size), input_ids)) <= 1e-4
    assert len(graphs) == len(steps)  # the filling and the full step, each traced once: no recompilation along the stream
    for graph in graphs:
        layers = model.config.get_text_config().num_hidden_layers
        assert len(graph["mutated"]) == 2 * layers  # each layer's key and value buffer, nothing else
        assert graph["not_static"] == []
        assert graph["index_copy"] == 2 * layers and graph["scatter"] == 0, graph


def count_frozen_matmuls(monkeypatch) -> list[int]:
    """From now on, for each graph inductor freezes (FastStreamingWrapper(freeze_weights=True), fast.frozen), the
    matrix products left in it once the weights are folded: appended to the list returned."""
    import torch._inductor.freezing as freezing

    matmuls = []
    freeze = freezing.freeze

    def counting_freeze(*args):
        graph_module, preserved = freeze(*args)
        matmuls.append(sum(node.op == "call_function" and ("mm" in str(node.target) or "linear" in str(node.target))
                           for node in graph_module.graph.nodes))
        return graph_module, preserved

    monkeypatch.setattr(freezing, "freeze", counting_freeze)
    return matmuls


def tokenizer_of(vocab: list[str], bos: str | None = "<s>", pre_tokenizer=None, normalizer=None) -> PreTrainedTokenizerFast:
    """Word-level over `vocab` (split on whitespace unless `pre_tokenizer`); no special token is added by default."""
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizer or pre_tokenizers.WhitespaceSplit()
    if normalizer is not None:
        backend.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token=bos)


class TableStepper:
    """A stepper (reset(), ids -> logits) whose logits for each token are a fixed row of a random table: the next token
    depends on this one only, so long texts score in no time. It records the length of every call."""

    def __init__(self, vocab: int = 16, seed: int = 0):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
        self.calls: list[int] = []

    def reset(self) -> None:
        self.calls = []

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(input_ids.shape[1])
        return self.table[input_ids]


class TableModel(TableStepper):
    """The table as a causal LM: model(ids, logits_to_keep=k, **anything).logits, the last k positions' rows."""

    def __call__(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **kwargs):
        logits = super().__call__(input_ids)
        return types.SimpleNamespace(logits=logits[:, -logits_to_keep:])
