"""Captions for labelled digit images, and the caption file users write by hand (docs/methods.md#text-to-image).

A generated caption names the digit and, often, two attributes **measured on the image itself**:

    thickness  mean ink of the image, m = mean_{pixels} x ∈ [0, 1] (x the ink level); binned into
               thin / regular / thick at the 1/3 and 2/3 quantiles of m *within the image's class*
               on the training images (a 1 has less ink than an 8 at any stroke width)
    slant      the second-moment (shear) angle of the ink: with pixel centres (u, v), v pointing up,
               weights x, c_uv = Cov_x(u, v), c_vv = Var_x(v):  α = atan(c_uv / c_vv)  (degrees,
               > 0: the top leans right). A straight bar at angle a from the vertical gives α = a.
               Binned into left / upright / right at the 1/3 and 2/3 quantiles over all training images.

Templates fill ``{name}`` (seven), ``{numeral}`` (7), ``{thick}`` and ``{slant}`` with a word drawn
from the bin's synonyms. :data:`TRAIN_TEMPLATES` make the training captions; :data:`HELDOUT_TEMPLATES`
are never used in training (:func:`is_heldout` recognises their captions) and serve evaluation.
Everything is a function of (seed, image index, caption index): the same seed gives the same captions.

Caption file (JSONL, UTF-8), one image per line::

    {"id": "7/img_0001.png", "captions": ["a thin seven", "the digit 7, slanted right"]}
    {"id": "12", "caption": "a bold three"}

``id`` is the image's path relative to the folder for ``data.name: folder`` (as ``selfflow data``
lists it), else its index in the loaded split. Every image needs at least one caption.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from selfflow.errors import DataError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS_BINS = ("thin", "regular", "thick")
SLANT_BINS = ("left", "upright", "right")
THICKNESS_WORDS = {"thin": ("thin", "light", "fine"), "regular": ("regular", "medium"), "thick": ("thick", "bold", "heavy")}
SLANT_WORDS = {
    "left": ("slanted left", "leaning left", "tilted left"),
    "upright": ("upright", "straight", "unslanted"),
    "right": ("slanted right", "leaning right", "tilted right"),
}
TRAIN_TEMPLATES = (
    "a handwritten {name}",
    "the digit {numeral}",
    "a {thick} {name}",
    "the digit {numeral}, {thick} strokes, {slant}",
    "a {slant} {name} written with {thick} strokes",
    "number {numeral}, {slant}",
    "{name} in {thick} ink",
    "a {thick}, {slant} handwritten {numeral}",
)
HELDOUT_TEMPLATES = (
    "an image of the number {name}, drawn {slant} with {thick} lines",
    "{numeral} ({thick}, {slant})",
    "someone wrote a {name} here",
)


# --------------------------------------------------------------------------------------------
# attributes measured on the image
# --------------------------------------------------------------------------------------------
def _ink(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float ink in [0, 1] from uint8 (B, C, H, W) / (B, H, W) or float in [-1, 1] (B, C, H, W)."""
    x = images
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = (x.float() + 1.0) / 2.0
    if x.ndim == 4:
        x = x.mean(dim=1)
    return x.clamp(0.0, 1.0)


def stroke_thickness(images: torch.Tensor) -> torch.Tensor:
    """(B,) mean ink per image: the fraction of the image that is full ink (uint8, or float in [-1, 1])."""
    return _ink(images).mean(dim=(-1, -2))


def slant_angle(images: torch.Tensor) -> torch.Tensor:
    """(B,) shear angle α = atan(Cov(u, v) / Var(v)) of the ink in degrees; v points up, α > 0 leans right.

    An image without ink, or with all ink in one row, has α = 0."""
    w = _ink(images).double()
    B, H, W = w.shape
    v = (H - 1 - torch.arange(H, dtype=torch.float64))[:, None].expand(H, W)  # up
    u = torch.arange(W, dtype=torch.float64)[None, :].expand(H, W)
    mass = w.sum(dim=(-1, -2)).clamp_min(1e-12)
    mu_u = (w * u).sum(dim=(-1, -2)) / mass
    mu_v = (w * v).sum(dim=(-1, -2)) / mass
    c_uv = (w * (u - mu_u[:, None, None]) * (v - mu_v[:, None, None])).sum(dim=(-1, -2)) / mass
    c_vv = (w * (v - mu_v[:, None, None]) ** 2).sum(dim=(-1, -2)) / mass
    angle = torch.rad2deg(torch.atan2(c_uv, c_vv.clamp_min(1e-12)))
    return torch.where(c_vv > 1e-9, angle, torch.zeros_like(angle)).float()


@dataclass(frozen=True)
class AttributeBins:
    """Bin edges fitted on training images: thickness per class (C, 2), slant over all images (2,)."""

    thickness_edges: tuple[tuple[float, float], ...]
    slant_edges: tuple[float, float]

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> "AttributeBins":
        m, a = stroke_thickness(images), slant_angle(images)
        edges = []
        overall = torch.quantile(m, torch.tensor([1 / 3, 2 / 3])).tolist()
        for k in range(num_classes):
            mk = m[labels == k]
            edges.append(tuple(torch.quantile(mk, torch.tensor([1 / 3, 2 / 3])).tolist()) if len(mk) >= 3 else tuple(overall))
        return cls(tuple(edges), tuple(torch.quantile(a, torch.tensor([1 / 3, 2 / 3])).tolist()))

    def thickness_bin(self, images: torch.Tensor, labels: torch.Tensor) -> list[str]:
        m = stroke_thickness(images).tolist()
        out = []
        for value, k in zip(m, labels.tolist()):
            lo, hi = self.thickness_edges[min(int(k), len(self.thickness_edges) - 1)]
            out.append("thin" if value < lo else "thick" if value > hi else "regular")
        return out

    def slant_bin(self, images: torch.Tensor) -> list[str]:
        lo, hi = self.slant_edges
        return ["left" if a < lo else "right" if a > hi else "upright" for a in slant_angle(images).tolist()]

    def to_dict(self) -> dict:
        return {"thickness_edges": [list(e) for e in self.thickness_edges], "slant_edges": list(self.slant_edges)}


# --------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caption:
    text: str
    label: int
    thickness: Optional[str]  # the bin the caption states, None when it states none
    slant: Optional[str]
    template: str


def fill(template: str, label: int, thickness: str, slant: str, rng: random.Random) -> Caption:
    text = template.format(
        name=DIGIT_NAMES[label], numeral=str(label),
        thick=rng.choice(THICKNESS_WORDS[thickness]), slant=rng.choice(SLANT_WORDS[slant]),
    )
    return Caption(text, label, thickness if "{thick}" in template else None, slant if "{slant}" in template else None, template)


def caption_images(labels: Sequence[int], thickness: Sequence[str], slant: Sequence[str], *, per_image: int, seed: int,
                   templates: Sequence[str] = TRAIN_TEMPLATES) -> list[list[Caption]]:
    """``per_image`` captions for each image from ``templates``; caption j of image i depends only on (seed, i, j)."""
    out = []
    for i, (label, th, sl) in enumerate(zip(labels, thickness, slant)):
        captions = []
        for j in range(per_image):
            rng = random.Random(f"selfflow-captions:{seed}:{i}:{j}")
            captions.append(fill(rng.choice(list(templates)), int(label), th, sl, rng))
        out.append(captions)
    return out


def _template_regex(template: str) -> re.Pattern:
    names = "|".join(DIGIT_NAMES)
    thick = "|".join(w for ws in THICKNESS_WORDS.values() for w in ws)
    slant = "|".join(w for ws in SLANT_WORDS.values() for w in ws)
    pattern = re.escape(template)
    for slot, alternatives in (("name", names), ("numeral", "[0-9]"), ("thick", thick), ("slant", slant)):
        pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?:{alternatives})")
    return re.compile(f"^{pattern}$")


_HELDOUT_PATTERNS = [_template_regex(t) for t in HELDOUT_TEMPLATES]


def is_heldout(text: str) -> bool:
    """Whether ``text`` is a caption made from one of the held-out templates."""
    return any(p.match(text) for p in _HELDOUT_PATTERNS)


# --------------------------------------------------------------------------------------------
# what a prompt asks for
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSpec:
    label: Optional[int]  # the digit the prompt names (None: none, or more than one)
    thickness: Optional[str]
    slant: Optional[str]


def parse_prompt(text: str) -> PromptSpec:
    """The digit, thickness bin and slant bin a prompt names (the words of :data:`THICKNESS_WORDS` and :data:`SLANT_WORDS`)."""
    lower = text.lower()
    words = re.findall(r"[a-z]+|[0-9]", lower)
    digits = {DIGIT_NAMES.index(w) for w in words if w in DIGIT_NAMES} | {int(w) for w in words if w.isdigit()}
    thick = {b for b, ws in THICKNESS_WORDS.items() for w in ws if w in words}
    slant = {b for b, ws in SLANT_WORDS.items() for w in ws if re.search(rf"\b{w}\b", lower)}
    one = lambda s: next(iter(s)) if len(s) == 1 else None  # noqa: E731
    return PromptSpec(one(digits), one(thick), one(slant))


# --------------------------------------------------------------------------------------------
# caption files
# --------------------------------------------------------------------------------------------
def read_caption_file(path: str | Path) -> dict[str, list[str]]:
    """{image id: captions} from a JSONL caption file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"caption file not found: {path}")
    out: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text (JSONL) file") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not a JSON object ({exc.msg})") from None
        if not isinstance(record, dict) or "id" not in record:
            raise DataError(f"{where}: each line is an object with an 'id' and 'captions' (or 'caption')")
        unknown = sorted(set(record) - {"id", "captions", "caption"})
        if unknown:
            raise DataError(f"{where}: unknown key(s) {unknown}; known: id, captions, caption")
        captions = record.get("captions", [record["caption"]] if "caption" in record else None)
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise DataError(f"{where}: 'captions' must be a non-empty list of non-empty strings, got {captions!r}")
        key = str(record["id"])
        if key in out:
            raise DataError(f"{where}: image id {key!r} appears twice")
        out[key] = [c.strip() for c in captions]
    if not out:
        raise DataError(f"{path}: no captions in the file")
    return out


def write_caption_file(path: str | Path, captions: dict[str, list[str]]) -> Path:
    from selfflow.files import atomic_file

    text = "".join(json.dumps({"id": key, "captions": list(value)}) + "\n" for key, value in captions.items())
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def captions_for_ids(table: dict[str, list[str]], ids: Sequence[str], path: str | Path) -> list[list[str]]:
    """Captions in image order; an image without captions is an error naming it."""
    missing = [i for i in ids if i not in table]
    if missing:
        raise DataError(f"{path}: no captions for {len(missing)} image(s), e.g. id {missing[0]!r}")
    return [table[i] for i in ids]


def prompt_attributes_agree(spec: PromptSpec, thickness: str, slant: str) -> tuple[Optional[bool], Optional[bool]]:
    """(thickness agrees, slant agrees), None where the prompt states no such attribute."""
    return (None if spec.thickness is None else spec.thickness == thickness,
            None if spec.slant is None else spec.slant == slant)
