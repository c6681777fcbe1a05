"""Representation learning as methods of the one trainer (docs/methods.md#stablerep).

The network the trainer trains here is an encoder (:func:`selfflow.represent.encoders.build_encoder`),
not the DiT; the head (and the supervised classifier) are the method's own parameters, saved in
``method.safetensors``. Every random number (the augmentations) comes from ``batch.random``, so a
resumed or multi-process run is the same as one uninterrupted process.

``stablerep``  batch: a synth set's groups, x0 (B, m, C, H, W) and caption ids (B, m) — or labelled
               images (B, C, H, W), whose labels are the captions. One augmented view per image;
               the multi-positive loss over caption ids, keys gathered from every process.
               StableRep+ (``caption_weight`` > 0, a synth set made from a caption file): plus the
               image–text contrastive term against the frozen embeddings of the captions' texts
               through a learned linear projection, over the whole (gathered) batch.
``simclr``     images (B, C, H, W), or a synth set's groups flattened (its captions unused); two
               augmented views per image; InfoNCE, keys gathered from every process.
``supervised`` labelled images; one augmented view; cross-entropy through a linear classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.methods import register
from selfflow.methods.base import Batch, Method
from selfflow.represent.augment import NUM_DRAWS, augment
from selfflow.represent.encoders import MLPHead, build_encoder
from selfflow.errors import ConfigError
from selfflow.represent.losses import gather_plain, gather_with_grad, image_text_loss, multi_positive_loss, stablerep_loss


class _Represent(Method):
    def __init__(self, config, model: nn.Module):
        super().__init__(config, model)
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


def _groups(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, m, C, H, W) images and (B, m) ids: a synth set's groups, or labelled images as groups of one."""
    if batch.x0.ndim == 5:
        return batch.x0, batch.y
    return batch.x0[:, None], batch.y[:, None]


@register
class StableRep(_Represent):
    name = "stablerep"

    def __init__(self, config, model: nn.Module):
        super().__init__(config, model)
        self.text_proj: nn.Linear | None = None  # StableRep+: caption text embedding → the head's embedding space
        self.register_buffer("caption_text", torch.zeros(0, 0), persistent=False)  # (L, Dt) frozen pooled text embeddings

    def bind_data(self, dataset) -> None:
        """StableRep+: encode the set's caption table once (the generator's text encoder, disk cache)."""
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
        self.text_proj = nn.Linear(embedding.shape[1], self.config.embed_dim)

    def loss(self, model, batch):
        x, ids = _groups(batch)
        views = self.views(x, batch, 1)[0]  # (B, m, C, H, W)
        z = self.head(model(views.flatten(0, 1)))
        loss, accuracy = stablerep_loss(z, ids.flatten(), self.config.temperature)
        logs = {"positive_top1": accuracy}
        if self.text_proj is not None:
            images, captions = gather_with_grad(z), gather_plain(ids.flatten())  # the whole batch on every process
            distinct, index = torch.unique(captions, return_inverse=True)
            texts = self.text_proj(self.caption_text[distinct].to(z.device))
            caption_loss = image_text_loss(images, texts, index, self.config.temperature)
            loss = loss + self.config.caption_weight * caption_loss
            logs["loss_caption"] = caption_loss.detach()
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
