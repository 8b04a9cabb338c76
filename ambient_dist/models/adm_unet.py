"""ADM (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis") as configured in
EDM (Karras et al. 2022): `DhariwalUNet`.

Differences from DDPM++ that matter: blocks use adaptive group norm (the embedding gives a
scale and a shift), residual sums are not rescaled, attention uses 64 channels per head and
sits in every block of an attention resolution (decoder included), resampling skips have no
projection, and weights use a scaled Kaiming-uniform initialisation with non-zero biases.
The class label enters after the noise MLP (not before it, as in DDPM++).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (Conv2d, DecoderLevel, EncoderLevel, Init, Linear, PositionalEmbedding,
                     SkipStack, UNetBlock, drop_labels, group_norm)

_INIT = Init("kaiming_uniform", weight_gain=math.sqrt(1 / 3), bias_gain=math.sqrt(1 / 3))
_INIT_ZERO = Init("kaiming_uniform", weight_gain=0.0, bias_gain=0.0)


class DhariwalUNet(nn.Module):
    def __init__(self, img_resolution: int, in_channels: int, out_channels: int,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                     init=_INIT, init_zero=_INIT_ZERO)

        # Mapping network.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, init=_INIT_ZERO) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, init=_INIT)
        self.map_layer1 = Linear(emb_channels, emb_channels, init=_INIT)
        # Unit-variance rows: a one-hot label adds an O(1) vector to the embedding.
        self.map_label = (Linear(label_dim, emb_channels, bias=False,
                                 init=Init("kaiming_normal", weight_gain=math.sqrt(label_dim)))
                          if label_dim else None)

        # Encoder.
        self.encoder = nn.ModuleList()
        skip_channels = []
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                entry = Conv2d(cout, model_channels * mult, 3, init=_INIT)
                cout = model_channels * mult
            else:
                entry = UNetBlock(cout, cout, down=True, **block)
            skip_channels.append(cout)
            blocks = []
            for _ in range(num_blocks):
                blocks.append(UNetBlock(cout, model_channels * mult, attention=res in attn_resolutions, **block))
                cout = model_channels * mult
                skip_channels.append(cout)
            self.encoder.append(EncoderLevel(entry, blocks))

        # Decoder.
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                entry = [UNetBlock(cout, cout, attention=True, **block), UNetBlock(cout, cout, **block)]
            else:
                entry = [UNetBlock(cout, cout, up=True, **block)]
            blocks = []
            for _ in range(num_blocks + 1):
                cin = cout + skip_channels.pop()
                cout = model_channels * mult
                blocks.append(UNetBlock(cin, cout, attention=res in attn_resolutions, **block))
            self.decoder.append(DecoderLevel(entry, blocks))
        self.out_norm = group_norm(cout, eps=1e-5)
        self.out_conv = Conv2d(cout, out_channels, 3, init=_INIT_ZERO)

    def embed(self, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = drop_labels(labels, self.label_dropout)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels)
        skips = SkipStack()
        for level in self.encoder:
            x, _ = level(x, emb, None, skips)
        for level in self.decoder:
            x, _ = level(x, emb, skips, None)
        return self.out_conv(F.silu(self.out_norm(x)))
