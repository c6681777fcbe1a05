"""(image, caption) pairs for training on text, and the caption bank the text model reads.

:class:`CaptionedDataset` wraps an image set: item k is one (image, caption) pair, all captions of
all images in order, so the index stream, resume and the batch split work exactly as for labels.
``get_batch`` returns (images, caption ids): indices into the set's unique captions, which
:meth:`CaptionedDataset.attach` encodes once (through the disk cache) and installs as the model's
caption bank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from selfflow.config import TextConfig
from selfflow.data.images import _image_files
from selfflow.errors import DataError
from selfflow.text.captions import AttributeBins, Caption, caption_images, captions_for_ids, read_caption_file


def folder_image_ids(root: str | Path) -> list[str]:
    """The ids of a ``data.name: folder`` set in its load order: each image's path relative to the folder."""
    root = Path(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    dirs = class_dirs or [root]
    return [p.relative_to(root).as_posix() for d in dirs for p in _image_files(d)]


def generated_captions(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, per_image: int, seed: int,
                       bins: Optional[AttributeBins] = None) -> tuple[list[list[Caption]], AttributeBins]:
    """Training captions for labelled images, attributes measured on each image; bins fitted here unless given."""
    if bins is None:
        bins = AttributeBins.fit(images, labels, num_classes)
    thickness, slant = bins.thickness_bin(images, labels), bins.slant_bin(images)
    return caption_images(labels.tolist(), thickness, slant, per_image=per_image, seed=seed), bins


@dataclass
class CaptionedDataset:
    base: object  # an ImageDataset
    captions: list[list[str]]  # per image
    pairs: torch.Tensor = field(init=False)  # (P, 2) int64: (image index, caption id)
    texts: list[str] = field(init=False)  # the unique captions; caption id = position
    bins: Optional[AttributeBins] = None

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.base):
            raise DataError(f"{len(self.captions)} caption lists for {len(self.base)} images")
        ids: dict[str, int] = {}
        rows = []
        for i, caps in enumerate(self.captions):
            for c in caps:
                rows.append((i, ids.setdefault(c, len(ids))))
        self.texts = list(ids)
        self.pairs = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)

    # what the trainer reads of a data set
    num_classes = 0  # the model's classes: none (captions are the condition)
    is_latent = False

    @property
    def image_size(self) -> int:
        return self.base.image_size

    @property
    def channels(self) -> int:
        return self.base.channels

    def __len__(self) -> int:
        return int(self.pairs.shape[0])

    def get_batch(self, indices):
        index = torch.as_tensor(indices, dtype=torch.int64)
        rows = self.pairs[index]
        x0, _ = self.base.get_batch(rows[:, 0])
        return x0, rows[:, 1].clone()

    def attach(self, model, encoder) -> None:
        """Encode every unique caption (disk cache) and install them as ``model``'s caption bank."""
        model.set_bank(encoder.encode(self.texts))


def make_encoder(text: TextConfig, device="cpu"):
    from selfflow.text.encoders import build_encoder

    return build_encoder(text.encoder, hashed_dim=text.hashed_dim, max_tokens=text.max_tokens, cache_dir=text.cache_dir, device=device)


def caption_source(base) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) that generated captions are measured on: an image set's images; for a set of
    moving-digit clips (N, 1, T, S, S) each clip's first frame, which shows its digit whole (the digit is
    translated, never cut: ink and slant are the digit's own)."""
    if getattr(base, "kind", None) == "video":
        return base.x[:, :, 0], base.y
    return base.images, base.labels


def check_caption_source(text: TextConfig) -> None:
    """A caption file the ``text`` section names must exist ('generated' needs nothing)."""
    if text.captions != "generated" and not Path(text.captions).is_file():
        raise DataError(f"text.captions={text.captions!r}: no such caption file (JSONL); or use 'generated'")


def captioned_dataset(base, text: TextConfig, data_name: str, data_path: Optional[str]) -> CaptionedDataset:
    """Wrap an image set, or a video set (caption-conditioned video), with the captions a ``text`` section
    names (generated, or a JSONL file whose ids are the item indices)."""
    if text.captions == "generated":
        images, labels = caption_source(base)
        captions, bins = generated_captions(images, labels, base.num_classes, per_image=text.captions_per_image,
                                            seed=text.caption_seed)
        return CaptionedDataset(base, [[c.text for c in caps] for caps in captions], bins=bins)
    check_caption_source(text)
    table = read_caption_file(text.captions)
    if data_name == "folder":
        ids = folder_image_ids(data_path)
        if len(ids) != len(base):
            raise DataError(f"{data_path}: found {len(ids)} image files but loaded {len(base)} images")
    else:
        ids = [str(i) for i in range(len(base))]
    return CaptionedDataset(base, captions_for_ids(table, ids, text.captions))


def encoding_of(text: TextConfig) -> dict:
    """The keys of a text section that decide what a caption's embedding is (hashed_dim only for ``hashed``)."""
    keys = ("encoder", "max_tokens", "hashed_dim") if text.encoder == "hashed" else ("encoder", "max_tokens")
    return {key: getattr(text, key) for key in keys}


def encoding_difference(mine: TextConfig, theirs: TextConfig, prefix: str = "text") -> Optional[str]:
    """``"text.KEY=mine (theirs: …)"`` for the first encoding key that differs, None when they embed alike."""
    a, b = encoding_of(mine), encoding_of(theirs)
    for key in dict.fromkeys([*a, *b]):
        if a.get(key) != b.get(key):
            return f"{prefix}.{key}={getattr(mine, key)!r} ({getattr(theirs, key)!r} there)"
    return None


def load_text_pairs(text: TextConfig, path):
    """A pairs set made from caption prompts (``generate-set --kind pairs --prompts``), checked against the run's text section."""
    from selfflow.config import from_dict
    from selfflow.data.pairs import load_pairs

    pairs = load_pairs(path)
    if pairs.texts is None:
        raise DataError(f"data.path={path}: a class-label pair set (no prompts in set.json), but the run has a text section; "
                        f"make pairs from prompts with a caption-conditioned teacher (generate-set --kind pairs --prompts FILE)")
    raw = pairs.manifest.get("text")
    if raw is not None:
        different = encoding_difference(text, from_dict(TextConfig, raw, f"{path}/set.json:text"))
        if different:
            raise DataError(f"data.path={path}: the run's {different} differs from the teacher that made the pairs; "
                            f"use the teacher's text section")
    return pairs


def load_captioned(text: TextConfig, data_name: str, path, split: str, image_size=None, channels=None):
    """Images with their captions, or (data.name: pairs) a pairs set made from prompts."""
    from selfflow.data import load_dataset

    if data_name == "pairs":
        return load_text_pairs(text, path)
    base = load_dataset(data_name, path=path, split=split, image_size=image_size, channels=channels)
    return captioned_dataset(base, text, data_name, path)


__all__ = ["CaptionedDataset", "caption_source", "captioned_dataset", "encoding_difference", "encoding_of", "folder_image_ids", "generated_captions",
           "load_captioned", "load_text_pairs", "make_encoder"]
