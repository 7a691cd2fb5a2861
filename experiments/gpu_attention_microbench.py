"""Which kernel formulation of the one-token decode attention is fastest on this device, at the decode shapes
of the benchmark models (a full buffer of capacity + 1 keys per layer).

Each variant of `streaming_llm.fast.decode_attention` runs once per layer (separate key/value buffers, as in a
model) inside one CUDA graph, replayed; reported: microseconds per layer and the bandwidth that implies over the
key/value bytes read. Also timed: transformers' compiled StaticCache formulation with its boolean mask.

    python experiments/gpu_attention_microbench.py --output results/latency/attention_microbench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm.cli_common import measurement_output, require_cuda, validate_common_args  # noqa: E402
from streaming_llm.eval.results import write_json_atomically  # noqa: E402
from streaming_llm.fast import DECODE_ATTENTION, decode_attention  # noqa: E402

SHAPES = {  # name: (layers, heads, kv_heads, head_dim, slots)
    "llama-2-7b@4096": (32, 32, 32, 128, 4097),
    "smollm2-135m@1024": (30, 9, 3, 64, 1025),
    "smollm2-135m@4096": (30, 9, 3, 64, 4097),
}


def time_layers(function, layers: int, replays: int, device) -> float:
    """Microseconds per call of function(layer) when all layers run in one CUDA graph (eager off CUDA)."""
    if device.type != "cuda":  # a CPU smoke run checks that each variant runs; it does not time them
        for layer in range(layers):
            function(layer)
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for layer in range(layers):  # warm-up outside the capture
            function(layer)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            function(layer)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (replays * layers)


def _divisor_chunks(slots: int, target: int = 32) -> int:
    """The number of equal chunks (a divisor of slots) nearest `target`."""
    divisors = [n for n in range(1, slots + 1) if slots % n == 0]
    return min(divisors, key=lambda n: abs(n - target))


def diagnostic_variants(query, keys, values) -> dict:
    """Not selectable in the library; they tell which kernel a faster formulation would need: each SDPA backend
    forced (no mask), and the P·V product split along the key axis (as flash-decoding splits it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads, _, dim = query.shape
    kv_heads, slots = keys[0].shape[1], keys[0].shape[2]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    variants = {}
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        def forced(layer, backend=getattr(SDPBackend, backend)):
            with sdpa_kernel(backend):
                output = torch.nn.functional.scaled_dot_product_attention(grouped, keys[layer], values[layer])
                return output.reshape(batch, heads, 1, dim)
        variants[f"sdpa_{backend.lower()}"] = forced
    chunks = _divisor_chunks(slots)

    def matmul_split(layer):
        groups = heads // kv_heads
        scores = torch.matmul(grouped, keys[layer].transpose(-1, -2)).float() * dim**-0.5  # [b, kv, g, slots]
        probabilities = torch.softmax(scores, dim=-1).to(values[layer].dtype)
        p = probabilities.reshape(batch, kv_heads, groups, chunks, slots // chunks).transpose(2, 3)
        v = values[layer].reshape(batch, kv_heads, chunks, slots // chunks, dim)
        partial = torch.matmul(p, v)  # [b, kv, chunks, g, d]
        return partial.float().sum(2).to(query.dtype).reshape(batch, heads, 1, dim)
    variants[f"matmul_split{chunks}"] = matmul_split
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu runs a smoke check (2 layers, 65 slots, every variant against matmul, "
                             "no timing)")
    parser.add_argument("--replays", type=int, default=20, help="timed replays per variant (default 20)")
    parser.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args()
    validate_common_args(args)  # --device
    args.device = require_cuda(args.device)  # auto: cuda where there is one
    output = measurement_output(parser, args.output)  # ~ expanded; checked before the run
    device = torch.device(args.device)
    dtype = torch.bfloat16
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shapes": {}}
    if device.type != "cuda":
        report["smoke_run"] = "CPU: every shape as 2 layers x 65 slots, each variant checked against matmul, not timed"
    for name, (layers, heads, kv_heads, head_dim, slots) in SHAPES.items():
        if device.type != "cuda":
            layers, slots = 2, 65
        torch.manual_seed(0)
        query = torch.randn(1, heads, 1, head_dim, device=device, dtype=dtype)
        keys = [torch.randn(1, kv_heads, slots, head_dim, device=device, dtype=dtype) for _ in range(layers)]
        values = [torch.randn_like(k) for k in keys]
        bool_mask = torch.ones(1, 1, 1, slots, dtype=torch.bool, device=device)
        groups = heads // kv_heads

        def transformers_static(layer):  # repeat_kv + boolean mask, as transformers' sdpa path with a StaticCache
            k = keys[layer].repeat_interleave(groups, dim=1) if groups > 1 else keys[layer]
            v = values[layer].repeat_interleave(groups, dim=1) if groups > 1 else values[layer]
            return torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=bool_mask)

        variants = {v: (lambda layer, v=v: decode_attention(query, keys[layer], values[layer], None, None, v))
                    for v in DECODE_ATTENTION}
        variants["transformers_static_masked"] = transformers_static
        variants.update(diagnostic_variants(query, keys, values))
        reference = decode_attention(query, keys[0], values[0], None, None, "matmul").float()
        kv_bytes = 2 * kv_heads * slots * head_dim * 2
        rows = {}
        for variant, function in variants.items():
            try:
                error = (function(0).float() - reference).abs().max().item()
                microseconds = time_layers(function, layers, args.replays, device)
                rows[variant] = {"us_per_layer": microseconds, "max_abs_diff_vs_matmul": error,
                                 "kv_bandwidth_tb_s": None if microseconds is None else kv_bytes / (microseconds * 1e-6) / 1e12}
            except RuntimeError as exc:  # a backend that does not take this shape
                rows[variant] = {"error": str(exc).splitlines()[0][:200]}
        selectable = {v: r["us_per_layer"] for v, r in rows.items() if v in DECODE_ATTENTION and r.get("us_per_layer") is not None}
        best = min(selectable, key=lambda v: selectable[v]) if selectable else None
        report["shapes"][name] = {"layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                                  "slots": slots, "kv_bytes_per_layer": kv_bytes, "variants": rows, "best": best}
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        write_json_atomically(output, report)
    return 0


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main))
