"""The CPU block path's fused attention (window keys through the flash kernel, sink columns merged in through its
log-sum-exp) against an explicit float64 softmax over SEMANTICS.md's visible keys (listed by the naive reference,
not by the package's mask)."""

import pytest
import torch
from reference import visible_keys

from streaming_llm.cache import RingLayer
from streaming_llm.positions import PositionPolicy

N_SINK, WINDOW_SIZE, HEADS, KV_HEADS, DIM = 2, 6, 4, 2, 8


def explicit_attention(query_window, query_sink, keys, values, positions, new_positions, scaling):
    """float64: window columns scored with the window query, sink columns with the sink query, one softmax."""
    groups = HEADS // KV_HEADS
    keys, values = keys.double().repeat_interleave(groups, 1), values.double().repeat_interleave(groups, 1)
    is_sink = ((positions >= 0) & (positions < N_SINK))[None, None, None, :]
    scores = torch.where(is_sink, query_sink.double() @ keys.transpose(-1, -2), query_window.double() @ keys.transpose(-1, -2))
    seen = torch.tensor([[p in visible_keys(t, N_SINK, WINDOW_SIZE) for p in positions.tolist()]
                         for t in new_positions.tolist()])
    scores = (scores * scaling).masked_fill(~seen, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


@pytest.mark.parametrize("sink_scale", [1.0, 300.0])
def test_fused_block_attention_is_the_explicit_softmax(sink_scale):
    """sink_scale 300 puts the sink scores ~1e3 above the window's log-sum-exp (attention sinks are where the
    largest scores go): the two parts must be merged around a common peak, or exp overflows to inf."""
    generator = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 4, 5, 6, 7, 8, 9, -1])  # two sinks, the ring (one slot empty)
    new_positions = torch.tensor([10, 11, 12])
    n = new_positions.shape[0]
    keys = torch.randn(1, KV_HEADS, positions.shape[0] + n, DIM, generator=generator)
    keys[:, :, :N_SINK] *= sink_scale
    values = torch.randn(1, KV_HEADS, positions.shape[0] + n, DIM, generator=generator)
    query_window = torch.randn(1, HEADS, n, DIM, generator=generator)
    query_sink = query_window.abs() * keys[:, :1, :1].sign()  # the first sink's scores large and positive
    all_positions = torch.cat([positions, new_positions])
    layer = RingLayer(PositionPolicy("pos_shift", N_SINK, WINDOW_SIZE), shared={})
    layer.seen = 10
    fused = layer._fused_block_attention(query_window, query_sink, keys, values, all_positions, new_positions, DIM**-0.5)
    expected = explicit_attention(query_window, query_sink, keys, values, all_positions, new_positions, DIM**-0.5)
    assert torch.isfinite(fused).all()
    assert (fused.double() - expected).abs().max() <= 1e-5
