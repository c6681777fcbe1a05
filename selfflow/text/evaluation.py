"""How well images follow their prompts (docs/methods.md#text-to-image):

- **prompt accuracy**: the feature net (the project's FD_dom classifier) reads the digit the prompt names;
- **attribute agreement**: thickness and slant measured on the image (selfflow.text.captions), binned
  with the training set's edges (thickness edges of the digit the prompt names), equal the bin the
  prompt states; chance is 1/3 per attribute when the bins are terciles;
- **FD_dom** of all images against the real test split (selfflow.evaluation);
- **alignment**: the image–text score of a small contrastive model trained here on real images and
  their training captions (:func:`train_alignment_model`), on the prompts (held-out templates):
  top-1 retrieval of the image's own prompt among the 10 prompts that differ only in the digit.

Evaluation prompts (:func:`evaluation_prompts`) use only held-out templates.
"""
from __future__ import annotations

import random
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.text.captions import (DIGIT_NAMES, HELDOUT_TEMPLATES, SLANT_BINS, THICKNESS_BINS, AttributeBins, fill,
                                    parse_prompt)


def evaluation_prompts(seed: int = 0, templates: Sequence[str] = HELDOUT_TEMPLATES[:2]) -> list[str]:
    """One prompt per (digit, thickness, slant): 90 prompts from held-out templates (both name both attributes)."""
    prompts = []
    for label in range(10):
        for i, thickness in enumerate(THICKNESS_BINS):
            for j, slant in enumerate(SLANT_BINS):
                rng = random.Random(f"selfflow-eval-prompts:{seed}:{label}:{i}:{j}")
                prompts.append(fill(templates[(label + i + j) % len(templates)], label, thickness, slant, rng).text)
    return prompts


def prompt_scores(images: torch.Tensor, prompts: Sequence[str], *, classifier, bins: AttributeBins) -> dict:
    """Prompt accuracy and attribute agreement of ``images`` (N, C, H, W) in [−1, 1], image k made from ``prompts[k]``."""
    specs = [parse_prompt(p) for p in prompts]
    named = [k for k, s in enumerate(specs) if s.label is not None]
    out: dict = {"num_images": len(prompts)}
    thickness: list[str] = []
    if named:
        labels = torch.tensor([specs[k].label for k in named])
        predicted = classifier.predict(images[named]).cpu()
        out["prompt_accuracy"] = float((predicted == labels).float().mean())
        thickness = bins.thickness_bin(images[named], labels)
    slant = bins.slant_bin(images)
    th_ok = [thickness[i] == specs[k].thickness for i, k in enumerate(named) if specs[k].thickness is not None]
    sl_ok = [slant[k] == s.slant for k, s in enumerate(specs) if s.slant is not None]
    out["thickness_agreement"] = sum(th_ok) / len(th_ok) if th_ok else None
    out["slant_agreement"] = sum(sl_ok) / len(sl_ok) if sl_ok else None
    return out


# --------------------------------------------------------------------------------------------
# a small image–text model for the alignment score
# --------------------------------------------------------------------------------------------
class AlignmentModel(nn.Module):
    """CLIP in miniature: a conv image tower and an MLP on the frozen text encoder's pooled embedding,
    both to a unit 64-d space; ``score = cos(f(image), g(text))``."""

    def __init__(self, channels: int, text_dim: int, dim: int = 64):
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, dim),
        )
        self.text = nn.Sequential(nn.Linear(text_dim, 128), nn.GELU(), nn.Linear(128, dim))
        self.log_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def embed_texts(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(pooled), dim=-1)


def train_alignment_model(images: torch.Tensor, caption_ids: torch.Tensor, pooled: torch.Tensor, *, steps: int = 600,
                          batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> AlignmentModel:
    """Symmetric InfoNCE on (real image, one of its training captions) pairs; captions shared by several
    images in a batch count as positives for each other (caption ids)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AlignmentModel(images.shape[1], pooled.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x, c = images[idx], caption_ids[idx]
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        logits = model.log_scale.exp().clamp(max=100) * model.embed_images(x) @ model.embed_texts(pooled[c]).T
        same = (c[:, None] == c[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def alignment_score(model: AlignmentModel, images: torch.Tensor, prompts: Sequence[str], encoder) -> dict:
    """Mean cos(image, its prompt) and top-1 retrieval of the prompt among its 10 digit variants (chance 0.1)."""
    variants, index = [], []
    for prompt in prompts:
        spec = parse_prompt(prompt)
        if spec.label is None:
            index.append(None)
            continue
        names = [prompt]
        for d in range(10):
            if d != spec.label:
                text = re.sub(rf"\b{DIGIT_NAMES[spec.label]}\b", DIGIT_NAMES[d], prompt)
                text = re.sub(rf"\b{spec.label}\b", str(d), text)
                names.append(text)
        index.append(len(variants))
        variants.extend(names)
    pooled = encoder.encode(list(dict.fromkeys(variants))).pooled
    position = {t: i for i, t in enumerate(dict.fromkeys(variants))}
    text_emb = model.embed_texts(pooled)
    image_emb = model.embed_images(images)
    cos, hits = [], []
    for k, start in enumerate(index):
        if start is None:
            continue
        rows = [position[t] for t in variants[start : start + 10]]
        sims = image_emb[k] @ text_emb[rows].T
        cos.append(float(sims[0]))
        hits.append(float(sims.argmax() == 0))
    return {"alignment_cos": sum(cos) / max(len(cos), 1), "alignment_top1": sum(hits) / max(len(hits), 1)}


def real_alignment_reference(model: AlignmentModel, images: torch.Tensor, labels: torch.Tensor, bins: AttributeBins, encoder,
                             seed: int = 0, limit: Optional[int] = None) -> dict:
    """The alignment score of real test images with held-out-template prompts stating their measured attributes."""
    limit = limit or images.shape[0]
    images, labels = images[:limit], labels[:limit]
    th, sl = bins.thickness_bin(images, labels), bins.slant_bin(images)
    prompts = []
    for k in range(images.shape[0]):
        rng = random.Random(f"selfflow-eval-real:{seed}:{k}")
        prompts.append(fill(HELDOUT_TEMPLATES[k % 2], int(labels[k]), th[k], sl[k], rng).text)
    return alignment_score(model, images, prompts, encoder)
