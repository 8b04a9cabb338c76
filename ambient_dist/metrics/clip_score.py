"""CLIP score of text-conditional samples: how well each image matches its prompt.

    score(image, text) = 100 * max(cos(E_img(image), E_txt(text)), 0)     (Hessel et al. 2021)

reported as the mean (and the per-image list) over a set of (image, prompt) pairs. The CLIP
model and its tokenizer come from one local transformers directory (CLIPModel +
AutoTokenizer, local_files_only); nothing is downloaded. Images follow CLIP's own
preprocessing: [0, 1], short side resized (bicubic) to the vision tower's size, centre crop,
mean/std from the directory's preprocessor_config.json (OpenAI's values if it has none).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ambient_dist.metrics.features import FeatureError, as_model_units, as_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    def __init__(self, path: str | Path, device="cpu"):
        from transformers import AutoTokenizer, CLIPModel
        path = Path(path) if path else None
        if path is None or not path.is_dir():
            raise FeatureError(f"CLIP score needs a local transformers directory (--clip-path); got {path}")
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FeatureError(f"--clip-path {path}: cannot load CLIPModel and its tokenizer ({e})") from None
        self.device = torch.device(device)
        self.size = int(self.model.config.vision_config.image_size)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = torch.tensor(mean, device=self.device)[:, None, None]
        self.std = torch.tensor(std, device=self.device)[:, None, None]
        self.name = f"clip/{path.name}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = ((as_rgb(as_model_units(images.to(self.device))) + 1) / 2).clamp(0, 1)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False).clamp(0, 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[:, :, top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def scores(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Per-pair CLIP scores [N] (float32, CPU) for images [N, C, H, W] and N prompts."""
        if len(images) != len(texts):
            raise ValueError(f"CLIP score: {len(images)} images but {len(texts)} prompts")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True,
                                max_length=self.max_tokens, return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=self.preprocess(images))
        txt = self.model.get_text_features(input_ids=tokens["input_ids"],
                                           attention_mask=tokens.get("attention_mask"))
        img, txt = _as_embedding(img), _as_embedding(txt)
        cos = F.cosine_similarity(img.float(), txt.float(), dim=1)
        return (100 * cos.clamp_min(0)).cpu()


def _as_embedding(out) -> torch.Tensor:
    # Newer transformers return a ModelOutput with the projected embedding as pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_score(images: torch.Tensor, texts: Sequence[str], model_path: str | Path,
               device="cpu", batch_size: int = 64) -> dict:
    """Mean CLIP score of (image, prompt) pairs -> {"model", "mean", "scores"}."""
    scorer = ClipScorer(model_path, device)
    scores = torch.cat([scorer.scores(images[i:i + batch_size], texts[i:i + batch_size])
                        for i in range(0, len(images), batch_size)])
    return {"model": scorer.name, "mean": float(scores.mean()), "scores": [float(s) for s in scores]}
