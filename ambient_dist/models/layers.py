"""Building blocks shared by the U-Nets: initialisation, linear/conv layers with FIR
resampling, group norm, self-attention, the residual U-Net block, noise embeddings, and the
encoder/decoder "level" containers both U-Net families are assembled from.

The layer set and the initialisation rules are those of the EDM networks (Karras et al. 2022),
so that our DDPM++ / NCSN++ / ADM networks have the same layers, parameter counts and initial
weight statistics as the published configurations. Implementation choices of our own:

* Precision is left to `torch.autocast`: layers never cast their weights by hand, so bf16
  autocast gives bf16 matrix products with fp32 weights (the optimizer's master copy).
* Self-attention uses `F.scaled_dot_product_attention` (flash / memory-efficient kernels on a
  GPU); its math equals softmax(q.k / sqrt(d)) v computed explicitly.
* The [1, 1] resampling filter (DDPM++, ADM) runs as average pooling / nearest upsampling,
  which is the same linear map as the depthwise (transposed) convolution but cheaper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Init:
    """How a layer's weight and bias are drawn: a fan-based distribution times a gain.

    mode: "xavier_uniform" | "xavier_normal" | "kaiming_uniform" | "kaiming_normal", with
    fans counted over the kernel (in * k * k, out * k * k). The bias uses the same
    distribution as the weight (times `bias_gain`, 0 = zeros): ADM draws non-zero biases.
    """
    mode: str = "kaiming_normal"
    weight_gain: float = 1.0
    bias_gain: float = 0.0


def _draw(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """One tensor from the named fan-scaled distribution (unit gain)."""
    uniform = lambda bound: bound * (torch.rand(*shape) * 2 - 1)  # noqa: E731
    if mode == "xavier_uniform":
        return uniform(math.sqrt(6 / (fan_in + fan_out)))
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return uniform(math.sqrt(3 / fan_in))
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r} (xavier_uniform, xavier_normal, "
                     "kaiming_uniform or kaiming_normal)")


def _weight_and_bias(shape: Sequence[int], fan_in: int, fan_out: int, init: Init, bias: bool):
    weight = nn.Parameter(_draw(shape, init.mode, fan_in, fan_out) * init.weight_gain)
    b = nn.Parameter(_draw([shape[0]], init.mode, fan_in, fan_out) * init.bias_gain) if bias else None
    return weight, b


# --------------------------------------------------------------------------------------
# Linear, resampling, convolution, normalisation
# --------------------------------------------------------------------------------------

class Linear(nn.Module):
    """Fully connected layer with the EDM initialisation rules."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: Init = Init()):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = _weight_and_bias([out_features, in_features], in_features,
                                                  out_features, init, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Resample(nn.Module):
    """2x up- or downsampling of every channel with a separable FIR filter.

    The 2-D kernel is outer(f, f) normalised to sum 1 (x4 when upsampling, so that each output
    pixel keeps the input's scale). [1, 1] is box filtering: average pooling down and
    nearest-neighbour up, which we call directly because it is the same map and much faster
    than a depthwise convolution. [1, 3, 3, 1] (NCSN++) runs as a depthwise convolution.
    """

    def __init__(self, filter: Sequence[float], direction: str):
        super().__init__()
        if direction not in ("up", "down"):
            raise ValueError(f"Resample direction must be 'up' or 'down', got {direction!r}")
        self.direction = direction
        self.is_box = list(filter) == [1, 1]
        f = torch.as_tensor(filter, dtype=torch.float32)
        kernel = torch.outer(f, f) / f.sum().square()
        # A constant of the architecture, rebuilt from the config: kept out of checkpoints.
        self.register_buffer("kernel", kernel[None, None], persistent=False)
        self.pad = (len(filter) - 1) // 2

    def depthwise_kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.to(x.dtype).expand(x.shape[1], 1, -1, -1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.direction == "down":
            if self.is_box:
                return F.avg_pool2d(x, 2)
            return F.conv2d(x, self.depthwise_kernel(x), groups=x.shape[1], stride=2, padding=self.pad)
        if self.is_box:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.conv_transpose2d(x, self.depthwise_kernel(x) * 4, groups=x.shape[1], stride=2,
                                  padding=self.pad)

    def filter_after_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Strided filtering of an already padded convolution output (the fused down path)."""
        return F.conv2d(x, self.depthwise_kernel(x), groups=x.shape[1], stride=2)


class Conv2d(nn.Module):
    """k x k convolution ("same" padding), optionally preceded by 2x up/downsampling.

    `fused_down` (NCSN++'s residual input path) convolves first, with the padding widened by
    the filter's, and then filters with stride 2; this is a different map at the borders
    than "downsample, then convolve", and is the one the reference architecture uses.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_down: bool = False, init: Init = Init()):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        if fused_down and not down:
            raise ValueError("Conv2d: fused_down needs down=True")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.fused_down = fused_down
        fans = dict(fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight, self.bias = _weight_and_bias([out_channels, in_channels, kernel, kernel],
                                                  init=init, bias=bias, **fans)
        self.resample = Resample(resample_filter, "up" if up else "down") if (up or down) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.weight.shape[-1] // 2
        if self.fused_down:
            x = F.conv2d(x, self.weight, padding=pad + self.resample.pad)
            x = self.resample.filter_after_conv(x)
            # The filter sums to one, so adding the bias after filtering equals adding it before.
            return x if self.bias is None else x + self.bias.to(x.dtype)[:, None, None]
        if self.resample is not None:
            x = self.resample(x)
        return F.conv2d(x, self.weight, self.bias, padding=pad)


def group_norm(channels: int, eps: float) -> nn.GroupNorm:
    """Group norm with up to 32 groups of at least 4 channels (the EDM rule)."""
    groups = min(32, channels // 4)
    if groups < 1 or channels % groups:
        raise ValueError(f"group_norm: {channels} channels do not split into min(32, {channels} // 4) "
                         "equal groups; choose network.model_channels (times each channel_mult) "
                         "as a multiple of 4, and of 32 above 128")
    return nn.GroupNorm(groups, channels, eps=eps)


# --------------------------------------------------------------------------------------
# Self-attention and the U-Net block
# --------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map.

    A 1x1 conv makes q, k, v; its output channels are ordered (head, channel, q/k/v), i.e.
    q, k and v of one channel are adjacent. That ordering is part of the architecture (it
    decides which weights belong to which head), so we keep it.
    """

    def __init__(self, channels: int, num_heads: int, eps: float, init_qkv: Init, init_proj: Init):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"SelfAttention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, eps)
        self.qkv = Conv2d(channels, channels * 3, kernel=1, init=init_qkv)
        self.proj = Conv2d(channels, channels, kernel=1, init=init_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))
        # [B, 3C, H, W] -> [B, HW, heads, C/heads, 3]: a free view for channels_last input.
        qkv = qkv.permute(0, 2, 3, 1).reshape(B, H * W, self.num_heads, C // self.num_heads, 3)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(-1))  # each [B, heads, HW, C/heads]
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return self.proj(a)


class UNetBlock(nn.Module):
    """Pre-activation residual block conditioned on the embedding, with optional 2x resampling
    and optional self-attention after it (the union of the DDPM++, NCSN++ and ADM blocks).

    adaptive_scale=True (ADM): the embedding gives a per-channel scale and shift applied after
    the second norm. False (DDPM++/NCSN++): it gives a bias added before the second norm.
    resample_proj=True puts a 1x1 conv on a resampling skip path even when the channel count
    does not change (DDPM++/NCSN++); ADM resamples the skip without a projection.
    Both the residual sum and the attention sum are multiplied by `skip_scale`.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *,
                 up: bool = False, down: bool = False, attention: bool = False,
                 num_heads: Optional[int] = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: Init = Init(), init_zero: Init = Init(weight_gain=0),
                 init_attn: Optional[Init] = None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down,
                            resample_filter=resample_filter, init=init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), init=init)
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init=init_zero)

        # The skip path: identity, pure resampling, or a 1x1 projection (with resampling).
        self.skip: Optional[nn.Module] = None
        if in_channels != out_channels or up or down:
            if resample_proj or in_channels != out_channels:
                self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down,
                                   resample_filter=resample_filter, init=init)
            else:
                self.skip = Resample(resample_filter, "up" if up else "down")

        # With channels_per_head, a block narrower than one head gets no attention at all
        # (the reference rule; it only happens in toy-sized ADM configs).
        heads = (num_heads if num_heads is not None else out_channels // channels_per_head) if attention else 0
        self.attn: Optional[SelfAttention] = None
        if heads:
            self.attn = SelfAttention(out_channels, heads, eps,
                                      init_qkv=init_attn if init_attn is not None else init,
                                      init_proj=init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.attn is not None:
            x = (self.attn(x) + x) * self.skip_scale
        return x


def drop_labels(labels: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each sample's class label with probability p (classifier-free guidance training)."""
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


# --------------------------------------------------------------------------------------
# Noise-level embeddings
# --------------------------------------------------------------------------------------

class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the scalar noise conditioning.

    Frequencies (1/max_positions)^(i / n) for i < num_channels/2, with n = num_channels/2 - 1
    when `endpoint` (DDPM++: the last frequency is exactly 1/max_positions) else num_channels/2
    (ADM). `sin_first` orders the halves [sin, cos] (DDPM++) instead of [cos, sin] (ADM).
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False,
                 sin_first: bool = False):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions
        self.endpoint, self.sin_first = endpoint, sin_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        angles = torch.outer(x.float(), (1 / self.max_positions) ** exponent)
        parts = (angles.sin(), angles.cos()) if self.sin_first else (angles.cos(), angles.sin())
        return torch.cat(parts, dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise conditioning (NCSN++), ordered [sin, cos].

    The frequencies are random but fixed: a buffer saved with the weights, not a parameter.
    """

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x.float(), 2 * math.pi * self.freqs.float())
        return torch.cat([angles.sin(), angles.cos()], dim=1)


# --------------------------------------------------------------------------------------
# U-Net levels: one resolution of the encoder or decoder
# --------------------------------------------------------------------------------------

class SkipStack:
    """Encoder outputs waiting for their decoder block (last in, first out).

    Deliberately not a list: DeepSpeed ZeRO-3 wraps every submodule's forward and hands it
    copies of list and tuple arguments, so features appended to a plain list inside an
    encoder level would never reach the decoder. An opaque object is passed through as is.
    """

    def __init__(self):
        self._items: list = []

    def append(self, x: torch.Tensor) -> None:
        self._items.append(x)

    def pop(self) -> torch.Tensor:
        return self._items.pop()


class EncoderLevel(nn.Module):
    """One encoder resolution: an entry (input conv at the top level, a downsampling block
    below it), an optional `aux` input path (NCSN++), then `blocks`. Every output (the entry's
    and each block's) is pushed to `skips` for the decoder.

    `aux`, if given, is a module `aux(x, aux_state) -> (x, aux_state)` that merges a second,
    progressively downsampled view of the input image into x right after the entry.
    """

    def __init__(self, entry: nn.Module, blocks: Sequence[UNetBlock], aux: Optional[nn.Module] = None):
        super().__init__()
        self.entry = entry
        self.aux = aux
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, emb, aux_state, skips: SkipStack):
        x = self.entry(x, emb) if isinstance(self.entry, UNetBlock) else self.entry(x)
        if self.aux is not None:
            x, aux_state = self.aux(x, aux_state)
        skips.append(x)
        for block in self.blocks:
            x = block(x, emb)
            skips.append(x)
        return x, aux_state


class DecoderLevel(nn.Module):
    """One decoder resolution: entry blocks (two middle blocks at the bottom level, an
    upsampling block above it), then `blocks`, each fed the concatenation of the running
    features and the matching encoder skip, then an optional `out` path (DDPM++/NCSN++)
    `out(x, out_state) -> out_state` that accumulates the network output.
    """

    def __init__(self, entry: Sequence[UNetBlock], blocks: Sequence[UNetBlock],
                 out: Optional[nn.Module] = None):
        super().__init__()
        self.entry = nn.ModuleList(entry)
        self.blocks = nn.ModuleList(blocks)
        self.out = out

    def forward(self, x, emb, skips: SkipStack, out_state):
        for block in self.entry:
            x = block(x, emb)
        for block in self.blocks:
            x = block(torch.cat([x, skips.pop()], dim=1), emb)
        if self.out is not None:
            out_state = self.out(x, out_state)
        return x, out_state
