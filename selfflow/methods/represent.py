"""Representation learning as methods of the one trainer (docs/methods.md#stablerep).

The network the trainer trains here is an encoder (:func:`selfflow.represent.encoders.build_encoder`),
not the DiT; the head (and the supervised classifier) are the method's own parameters, saved in
``method.safetensors``. Every random number (the augmentations, the images drawn per caption row) comes
from ``batch.random``, so a resumed or multi-process run is the same as one uninterrupted process.

``stablerep``  batch: a synth set's groups, x0 (B, m, C, H, W) and group ids (B, m): each caption row
               (group) is one identity, its m independent draws are positives, every other row a
               negative (the paper's label-free positives). ``images_per_caption`` k < m: k of a row's
               m images drawn per batch. One augmented view per image; the multi-positive loss over the
               ids, keys gathered from every process. StableRep+ (``caption_weight`` > 0, a synth set
               made from a caption file): plus the image–text contrastive term between a separate linear
               projection of the encoder's features and a linear map of the frozen caption-text
               embeddings, with a learned logit scale (init 1/0.07, capped at 100), over the gathered batch.
``supcon``     the same loss with **class labels** as identities (labelled real images, or a synth set's
               classes): supervised contrastive learning, label-supervised.
``simclr``     images (B, C, H, W), or a synth set's groups flattened (its captions unused); two
               augmented views per image; InfoNCE, keys gathered from every process.
``supervised`` labelled images; one augmented view; cross-entropy through a linear classifier.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.methods import register
from selfflow.methods.base import Batch, Method
from selfflow.represent.augment import NUM_DRAWS, augment
from selfflow.represent.encoders import MLPHead, build_encoder
from selfflow.errors import ConfigError
from selfflow.represent.losses import (gather_plain, gather_with_grad, image_text_loss, multi_positive_loss, positives_per_anchor,
                                      stablerep_loss)


class _Represent(Method):
    def __init__(self, config, model: nn.Module):
        super().__init__(config, model)
        self.feature_dim = model.feature_dim
        self.head = MLPHead(model.feature_dim, config.head_hidden, config.embed_dim)

    @classmethod
    def build_network(cls, run) -> nn.Module:
        return build_encoder(run)

    def views(self, x: torch.Tensor, batch: Batch, copies: int) -> torch.Tensor:
        """``copies`` augmented views of the (B, m, C, H, W) images: (copies, B, m, C, H, W)."""
        B, m = x.shape[:2]
        draws = batch.random.rand(copies, m, NUM_DRAWS)  # (B, copies, m, 6), drawn for the global batch
        draws = draws.transpose(0, 1).reshape(-1, NUM_DRAWS)
        images = x[None].expand(copies, *x.shape).reshape(-1, *x.shape[2:])
        return augment(images, draws, self.config.augment_strength).reshape(copies, B, m, *x.shape[2:])

    def pick(self, x: torch.Tensor, ids: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """k of each row's m images (``images_per_caption``), a random subset per row and batch."""
        k, m = getattr(self.config, "images_per_caption", 0), x.shape[1]
        if k == 0 or k >= m:
            return x, ids
        chosen = batch.random.rand(m).argsort(dim=1)[:, :k].to(x.device)  # (B, k)
        return x[torch.arange(len(x), device=x.device)[:, None], chosen], ids.gather(1, chosen)


def _groups(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, m, C, H, W) images and (B, m) ids: a synth set's groups, or labelled images as groups of one."""
    if batch.x0.ndim == 5:
        return batch.x0, batch.y
    return batch.x0[:, None], batch.y[:, None]


LOGIT_SCALE_INIT = math.log(1 / 0.07)  # StableRep+ / CLIP: the image–text logit scale starts at 1/0.07 ...
LOGIT_SCALE_MAX = math.log(100.0)  # ... and is capped at 100


def _contrast(method: "_Represent", model, x: torch.Tensor, ids: torch.Tensor, batch: Batch):
    """One augmented view per image of (B, m, …) ``x``, the multi-positive loss over ``ids`` (B, m).
    Returns (loss, logs, encoder features (B·m, F))."""
    views = method.views(x, batch, 1)[0]  # (B, m, C, H, W)
    features = model(views.flatten(0, 1))
    z = method.head(features)
    loss, accuracy = stablerep_loss(z, ids.flatten(), method.config.temperature)
    return loss, {"positive_top1": accuracy, "positives": positives_per_anchor(gather_plain(ids.flatten()))}, features


@register
class StableRep(_Represent):
    name = "stablerep"

    def __init__(self, config, model: nn.Module):
        super().__init__(config, model)
        self.image_proj: nn.Linear | None = None  # StableRep+: encoder features → the image–text space
        self.text_proj: nn.Linear | None = None  # StableRep+: frozen caption text embedding → the image–text space
        self.logit_offset: nn.Parameter | None = None  # StableRep+: log logit scale − log(1/0.07)
        self.register_buffer("caption_text", torch.zeros(0, 0), persistent=False)  # (L, Dt) frozen pooled text embeddings
        self.register_buffer("group_caption", torch.zeros(0, dtype=torch.int64), persistent=False)  # (groups,) caption line

    def bind_data(self, dataset) -> None:
        """Check k against m; StableRep+: encode the set's caption table once (the generator's text encoder, disk cache)."""
        k, m = self.config.images_per_caption, getattr(dataset, "per_caption", 1)
        if k > m:
            raise ConfigError(f"method.images_per_caption={k} but the set has {m} images per caption row "
                              f"({getattr(dataset, 'source', 'the data')}); use at most {m} (0: all)")
        weight = self.config.caption_weight
        if weight == 0:
            return
        manifest = getattr(dataset, "manifest", None) or {}
        table, text = (manifest.get("captions") or {}).get("table"), manifest.get("text")
        if not table or text is None:
            raise ConfigError(f"method.caption_weight={weight}: StableRep+ needs caption texts, a synth set made from a caption "
                              f"file by a caption-conditioned generator (selfflow synth --captions FILE); "
                              f"{getattr(dataset, 'source', 'the data')} has none")
        from selfflow.config import TextConfig, from_dict
        from selfflow.text.data import make_encoder

        embedding = make_encoder(from_dict(TextConfig, text, "set.json:text")).encode(list(table)).pooled.float()
        self.caption_text = embedding
        self.group_caption = dataset.group_captions.clone()
        self.text_proj = nn.Linear(embedding.shape[1], self.config.embed_dim)
        self.image_proj = nn.Linear(self.feature_dim, self.config.embed_dim)
        # the learned scale is log(1/0.07) + offset: weight decay pulls the offset to 0, i.e. to the paper's start
        self.logit_offset = nn.Parameter(torch.zeros(()))

    def logit_scale(self) -> torch.Tensor:
        """exp(min(log(1/0.07) + offset, log 100)): StableRep+'s learned image–text logit scale."""
        return (LOGIT_SCALE_INIT + self.logit_offset).clamp(max=LOGIT_SCALE_MAX).exp()

    def loss(self, model, batch):
        if batch.x0.ndim != 5:
            raise ValueError("stablerep trains on a synth set's caption rows (B, m, C, H, W); labelled images: use supcon")
        x, ids = self.pick(batch.x0, batch.y, batch)
        loss, logs, features = _contrast(self, model, x, ids, batch)
        if self.text_proj is not None:
            images = gather_with_grad(self.image_proj(features))  # the whole batch on every process
            groups = gather_plain(ids.flatten())
            distinct, index = torch.unique(groups, return_inverse=True)
            texts = self.text_proj(self.caption_text[self.group_caption[distinct.cpu()]].to(features.device))
            scale = self.logit_scale()
            caption_loss = image_text_loss(images, texts, index, scale)
            loss = loss + self.config.caption_weight * caption_loss
            logs["loss_caption"] = caption_loss.detach()
            logs["logit_scale"] = scale.detach()
        return loss, logs


@register
class SupCon(_Represent):
    name = "supcon"

    def __init__(self, config, model: nn.Module):
        super().__init__(config, model)
        self.register_buffer("group_label", torch.zeros(0, dtype=torch.int64), persistent=False)  # (groups,) a synth set's classes

    def bind_data(self, dataset) -> None:
        if hasattr(dataset, "group_labels"):
            labels = dataset.group_labels
            if bool((labels < 0).any()):
                raise ConfigError(f"method.name=supcon: {getattr(dataset, 'source', 'the set')} has images without a class "
                                  f"(an unconditional or text generator); supcon needs class labels")
            self.group_label = labels.clone()

    def loss(self, model, batch):
        x, ids = _groups(batch)
        if batch.x0.ndim == 5:  # a synth set's group ids → the classes the groups were drawn for
            x, ids = self.pick(x, ids, batch)
            ids = self.group_label.to(ids.device)[ids]
        loss, logs, _ = _contrast(self, model, x, ids, batch)
        return loss, logs


@register
class SimClr(_Represent):
    name = "simclr"

    def loss(self, model, batch):
        x, _ = _groups(batch)
        views = self.views(x, batch, 2).flatten(1, 2)  # (2, B·m, C, H, W)
        n = views.shape[1]
        z = self.head(model(views.flatten(0, 1))).reshape(2, n, -1)
        # caption id = the image's index in the global batch, the same for both views
        image = torch.arange(n, device=z.device) + (batch.random.rows.start * x.shape[1])
        local = torch.cat([z[0], z[1]])
        ids = torch.cat([image, image])
        keys = gather_with_grad(local)
        key_ids = gather_plain(ids)
        rank_offset = 0 if keys is local else torch.distributed.get_rank() * len(local)
        index = torch.arange(len(local), device=z.device) + rank_offset
        loss, accuracy = multi_positive_loss(local, keys, ids, key_ids, index, self.config.temperature)
        return loss, {"positive_top1": accuracy}


@register
class Supervised(_Represent):
    name = "supervised"

    def __init__(self, config, model: nn.Module):
        Method.__init__(self, config, model)
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.classifier = nn.Linear(model.feature_dim, max(num_classes, 1))

    @classmethod
    def build_network(cls, run) -> nn.Module:
        encoder = build_encoder(run)
        encoder.num_classes = run.model.num_classes
        return encoder

    def loss(self, model, batch):
        if batch.x0.ndim != 4:
            raise ValueError("supervised training takes labelled images (B, C, H, W)")
        views = self.views(batch.x0[:, None], batch, 1)[0, :, 0]
        logits = self.classifier(model(views))
        loss = F.cross_entropy(logits, batch.y)
        return loss, {"accuracy": (logits.argmax(1) == batch.y).float().mean()}
