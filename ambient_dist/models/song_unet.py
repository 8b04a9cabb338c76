"""DDPM++ and NCSN++ (Song et al., "Score-Based Generative Modeling through SDEs") as
configured in EDM (Karras et al. 2022): one `SongUNet` class; the two presets (precond.py) are

    DDPM++: positional noise embedding, standard encoder and decoder, box [1, 1] resampling.
    NCSN++: random Fourier embedding (twice as wide), "residual" encoder (a second path that
            downsamples the input image and is merged into every level), [1, 3, 3, 1]
            resampling. EDM's NCSN++ uses the standard decoder; the "skip" decoder (an output
            image summed over all resolutions) is available through `decoder_type`.

Shape of the network: a mapping network turns (noise level, class label, augmentation
labels) into one embedding vector that conditions every block; the encoder has
`num_blocks` blocks per resolution (attention at `attn_resolutions`), the bottom has two
middle blocks (the first with attention), the decoder has `num_blocks + 1` blocks per
resolution, each fed an encoder skip, with attention only in the last one of a resolution.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (Conv2d, DecoderLevel, EncoderLevel, FourierEmbedding, Init, Linear,
                     PositionalEmbedding, Resample, SkipStack, UNetBlock, drop_labels, group_norm)

_INIT = Init("xavier_uniform")
_INIT_ZERO = Init("xavier_uniform", weight_gain=1e-5)      # near-zero: blocks start as identity
_INIT_ATTN = Init("xavier_uniform", weight_gain=math.sqrt(0.2))


class SkipInput(nn.Module):
    """Encoder "skip" input path: downsample the image, add a 1x1 projection of it to x."""

    def __init__(self, image_channels: int, channels: int, resample_filter: Sequence[float]):
        super().__init__()
        self.down = Resample(resample_filter, "down")
        self.proj = Conv2d(image_channels, channels, 1, init=_INIT)

    def forward(self, x, image):
        image = self.down(image)
        return x + self.proj(image), image


class ResidualInput(nn.Module):
    """Encoder "residual" input path (NCSN++): a strided 3x3 conv of the previous level's
    merged features, averaged with x; the result is also the next level's path input."""

    def __init__(self, in_channels: int, channels: int, resample_filter: Sequence[float]):
        super().__init__()
        self.conv = Conv2d(in_channels, channels, 3, down=True, resample_filter=resample_filter,
                           fused_down=True, init=_INIT)

    def forward(self, x, prev):
        x = (x + self.conv(prev)) / math.sqrt(2)
        return x, x


class OutputHead(nn.Module):
    """Norm, SiLU, 3x3 conv to image channels, added to the (upsampled) running output."""

    def __init__(self, channels: int, out_channels: int, upsample: Optional[Resample]):
        super().__init__()
        self.up = upsample
        self.norm = group_norm(channels, eps=1e-6)
        self.conv = Conv2d(channels, out_channels, 3, init=_INIT_ZERO)

    def forward(self, x, out):
        y = self.conv(F.silu(self.norm(x)))
        if out is None:
            return y
        return y + (self.up(out) if self.up is not None else out)


class SongUNet(nn.Module):
    def __init__(self, img_resolution: int, in_channels: int, out_channels: int,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 128,
                 channel_mult: Sequence[int] = (2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"SongUNet: embedding_type {embedding_type!r} is not 'positional' or 'fourier'")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"SongUNet: encoder_type {encoder_type!r} is not standard, skip or residual")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"SongUNet: decoder_type {decoder_type!r} is not standard or skip")
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout,
                     skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                     resample_proj=True, adaptive_scale=False,
                     init=_INIT, init_zero=_INIT_ZERO, init_attn=_INIT_ATTN)

        # Mapping network: noise level (+ class, + augmentation) -> embedding.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True, sin_first=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, init=_INIT) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, init=_INIT) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, init=_INIT)
        self.map_layer1 = Linear(emb_channels, emb_channels, init=_INIT)

        # Encoder.
        self.encoder = nn.ModuleList()
        skip_channels = []
        cout, caux = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            aux = None
            if level == 0:
                entry = Conv2d(cout, model_channels, 3, init=_INIT)
                cout = model_channels
            else:
                entry = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    aux = SkipInput(caux, cout, resample_filter)
                elif encoder_type == "residual":
                    aux = ResidualInput(caux, cout, resample_filter)
                    caux = cout
            skip_channels.append(cout)
            blocks = []
            for _ in range(num_blocks):
                blocks.append(UNetBlock(cout, model_channels * mult, attention=res in attn_resolutions, **block))
                cout = model_channels * mult
                skip_channels.append(cout)
            self.encoder.append(EncoderLevel(entry, blocks, aux))

        # Decoder.
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            bottom = level == len(channel_mult) - 1
            if bottom:
                entry = [UNetBlock(cout, cout, attention=True, **block), UNetBlock(cout, cout, **block)]
            else:
                entry = [UNetBlock(cout, cout, up=True, **block)]
            blocks = []
            for idx in range(num_blocks + 1):
                cin = cout + skip_channels.pop()
                cout = model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                blocks.append(UNetBlock(cin, cout, attention=attn, **block))
            head = None
            if decoder_type == "skip" or level == 0:
                up = Resample(resample_filter, "up") if decoder_type == "skip" and not bottom else None
                head = OutputHead(cout, out_channels, up)
            self.decoder.append(DecoderLevel(entry, blocks, head))

    def embed(self, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = drop_labels(labels, self.label_dropout)
            # Scaled so that a one-hot label has the magnitude of a unit-variance input.
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips = SkipStack()
        aux = x
        for level in self.encoder:
            x, aux = level(x, emb, aux, skips)
        out = None
        for level in self.decoder:
            x, out = level(x, emb, skips, out)
        return out
