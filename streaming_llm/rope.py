"""Rotary position embedding (RoPE) math: rotate, un-rotate and re-rotate keys and queries.

Convention: the `rotate_half` form used by Llama and GPTNeoX in transformers, which pairs feature i with
i + rotary_ndims / 2. Only the first `rotary_ndims` features of each head are rotated (partial rotary, GPTNeoX
`rotary_pct`); the rest pass through unchanged in every function here. Models that pair features (2i, 2i + 1)
instead (Cohere, GLM, ERNIE 4.5: "interleaved") are brought to this form by a permutation of the features, applied
to queries and keys alike, which leaves every score q·k unchanged (`RotaryParams.to_half_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `positions[..., seq] * inv_freq`, shaped [..., seq, rotary_ndims], in float32.

    Computed the way transformers computes them (float32 outer product, then duplicated halves), so
    that a key rotated here at position p equals the model's own key at p bit for bit or nearly so.
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` features of x ([..., seq, head_dim]) by the angles in cos/sin."""
    rotary_ndims = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if rotary_ndims == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_ndims], x[..., rotary_ndims:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def undo_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rotation` with the same cos/sin (rotation by the negative angle)."""
    return apply_rotation(x, cos, -sin)


def rerotate_keys(
    keys: torch.Tensor,
    delta: int | torch.Tensor,
    inv_freq: torch.Tensor,
    rotary_ndims: int | None = None,
) -> torch.Tensor:
    """Rotate already-rotated keys [..., seq, head_dim] by a position delta.

    `delta` is an int or a LongTensor broadcastable to [..., seq]; `rotary_ndims` defaults to
    2 * len(inv_freq). Satisfies rerotate_keys(rope(k, p), q - p, ...) == rope(k, q), since RoPE
    rotations compose additively.
    """
    ndims = 2 * inv_freq.shape[-1]
    if rotary_ndims is not None and rotary_ndims != ndims:
        raise ValueError(f"rotary_ndims={rotary_ndims} does not match inv_freq ({inv_freq.shape[-1]} frequencies)")
    if not (keys.is_floating_point() and keys.dim() >= 2 and keys.shape[-1] >= ndims):
        raise ValueError(f"keys must be a floating-point tensor [..., seq, head_dim] with head_dim >= {ndims} (the "
                         f"rotated features); got shape {tuple(keys.shape)}, {keys.dtype}")
    delta = torch.as_tensor(delta, device=keys.device)
    if delta.ndim == 0:
        delta = delta.expand(keys.shape[-2])
    elif delta.shape[-1] not in (1, keys.shape[-2]):
        raise ValueError(f"delta has shape {tuple(delta.shape)}; its last dimension must be 1 or the keys' sequence "
                         f"length {keys.shape[-2]}")
    cos, sin = cos_sin(delta, inv_freq)
    return apply_rotation(keys, cos, sin)


@dataclass(frozen=True)
class RotaryParams:
    """What the cache needs to rotate keys and queries at positions of its choosing.

    inv_freq: [rotary_ndims // 2] float32 frequencies; rotary_ndims: rotated features per head;
    attention_scaling: the factor some RoPE variants fold into cos/sin (1.0 for the default type);
    interleaved: the model rotates pairs (2i, 2i + 1), not (i, i + rotary_ndims / 2); interleaved_angles: its cos/sin
    come in that pair order too (Cohere), not as transformers' usual [angles, angles] (GLM, ERNIE 4.5, Helium, which
    interleave the first half inside their rotation).
    """

    inv_freq: torch.Tensor
    rotary_ndims: int
    attention_scaling: float = 1.0
    interleaved: bool = False
    interleaved_angles: bool = False

    def to_half_layout(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., head_dim] (queries or keys as the model rotated them) with an interleaved model's rotated features
        reordered [0, 2, 4, ..., 1, 3, 5, ...], so that each rotated pair sits at (i, i + rotary_ndims / 2) as every
        function here expects; x itself for a rotate-half model."""
        if not self.interleaved:
            return x
        return _reorder(x, self.rotary_ndims, (self.rotary_ndims // 2, 2))

    def to_model_layout(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_half_layout`."""
        if not self.interleaved:
            return x
        return _reorder(x, self.rotary_ndims, (2, self.rotary_ndims // 2))

    def model_angles(self, angles: torch.Tensor) -> torch.Tensor:
        """The model's cos or sin [..., rotary_ndims] in this module's [angles, angles] form."""
        return _reorder(angles, angles.shape[-1], (angles.shape[-1] // 2, 2)) if self.interleaved_angles else angles

    def rerotate(self, keys: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
        """`rerotate_keys` for keys [..., seq, head_dim] in the model's own layout, returned in it."""
        return self.to_model_layout(rerotate_keys(self.to_half_layout(keys), delta, self.inv_freq))

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin [..., seq, rotary_ndims] (float32) this RoPE rotates with at `positions`: `cos_sin` scaled
        by attention_scaling, as the model's rotary embedding returns them."""
        cos, sin = cos_sin(positions, self.inv_freq)
        return cos * self.attention_scaling, sin * self.attention_scaling

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [..., seq, head_dim] rotated at `positions` [seq] (or broadcastable [..., seq])."""
        return apply_rotation(x, *self.angles(positions))

    def is_identity(self, sin: torch.Tensor) -> bool:
        """Whether the model's rotation with these angles left x unchanged: a layer without RoPE (whatever angles its
        model passes), or position 0 (sin 0) and no `attention_scaling` (at position 0 the model's cos is
        attention_scaling, so YaRN still scales q and k)."""
        return self.rotary_ndims == 0 or (self.attention_scaling == 1.0 and not bool(sin.any()))

    def unrotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Recover pre-RoPE features from x rotated by the model with (cos, sin) [batch, seq, rotary_ndims].

        cos/sin carry `attention_scaling` a (x = a * R(theta) x_raw), so the inverse rotation is
        scaled by 1 / a**2; the features past rotary_ndims were never touched.
        """
        inverse_scale = 1.0 / (self.attention_scaling**2)
        return undo_rotation(x, cos[:, None] * inverse_scale, sin[:, None] * inverse_scale)


def _reorder(x: torch.Tensor, ndims: int, pairs: tuple[int, int]) -> torch.Tensor:
    """The first `ndims` features of x viewed as `pairs` and transposed (interleaved <-> half layout); the rest kept."""
    reordered = x[..., :ndims].unflatten(-1, pairs).transpose(-1, -2).flatten(-2)
    return reordered if ndims == x.shape[-1] else torch.cat((reordered, x[..., ndims:]), dim=-1)


def rotation_matrix(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The [..., head_dim, head_dim] matrix M with x @ M == apply_rotation(x, cos, sin).

    cos/sin [..., rotary_ndims] for one position each. A rotation is linear, so M's rows are the rotated
    unit vectors; one matmul then replaces the slice/neg/cat/mul/add sequence on the decode path.
    """
    eye = torch.eye(head_dim, dtype=cos.dtype, device=cos.device)
    return apply_rotation(eye.expand(*cos.shape[:-1], head_dim, head_dim), cos[..., None, :], sin[..., None, :])
