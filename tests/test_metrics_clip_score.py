"""ambient_dist.metrics.clip_score: CLIP score through a local directory of tiny CLIP components."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
    words = ["<pad>", "<unk>", "a", "red", "blue", "cat", "dog", "photo", "of"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0),
        vision_config=dict(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).eval().save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_clip_score_through_a_local_directory(tiny_clip):
    from ambient_dist.metrics.clip_score import ClipScorer, clip_score
    from transformers import CLIPModel
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    texts = ["a red cat", "photo of a dog", "blue"]
    out = clip_score(images, texts, tiny_clip, batch_size=2)
    assert out["model"].startswith("clip/") and len(out["scores"]) == 3
    assert all(0 <= s <= 100 for s in out["scores"])
    assert out["mean"] == pytest.approx(np.mean(out["scores"]))
    # independent recomputation of the first pair's cosine
    scorer = ClipScorer(tiny_clip)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pix = scorer.preprocess(images[:1])
    assert pix.shape == (1, 3, 28, 28)
    ids = scorer.tokenizer(["a red cat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pix)
        txt = model.get_text_features(input_ids=ids)
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    expected = max(100 * F.cosine_similarity(img, txt).item(), 0.0)
    assert out["scores"][0] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.scores(images[:2], ["a"])
