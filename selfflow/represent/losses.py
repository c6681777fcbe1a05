"""Contrastive losses for representation learning (docs/methods.md#stablerep).

The multi-positive loss of StableRep: for a batch of n L2-normalised embeddings ``z_i`` with
caption ids ``c_i`` and temperature τ,

    logits_ij = z_i · z_j / τ               (j ≠ i; the self-similarity is left out)
    p_ij      = softmax_j(logits_i)          over every other image j of the batch
    q_ij      = [c_j = c_i] / Σ_{k≠i} [c_k = c_i]   (uniform over the other images of i's caption)
    L         = mean_i  − Σ_{j≠i} q_ij · log p_ij

An anchor with no other image of its caption has no target and is left out of the mean. With two
images per caption (two views of one image) this is SimCLR's InfoNCE (NT-Xent) exactly.

Under DDP every process holds a slice of the batch: the keys are gathered from all processes *with
their gradient* (:func:`gather_with_grad`), each process's anchors are its own rows, and its loss is
the mean over its anchors; DDP's average of the processes' gradients is then the gradient of the
1-process loss over the whole batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

TEMPERATURE = 0.1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss depends on every row
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(local n, …) → (world · n, …) in rank order, differentiable; ``x`` itself without a process group.

    Every process must pass the same number of rows. Gradient: the rows of this process receive the
    sum over processes of ∂L_r/∂rows (L_r: process r's loss)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_plain(x: torch.Tensor) -> torch.Tensor:
    """all_gather without gradient (caption ids, labels)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def multi_positive_loss(anchors: torch.Tensor, keys: torch.Tensor, anchor_ids: torch.Tensor, key_ids: torch.Tensor,
                        anchor_index: torch.Tensor, temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """The multi-positive cross-entropy of ``anchors`` (a, d) against ``keys`` (n, d).

    ``anchor_index[i]`` is anchor i's own row among the keys (left out of its logits and positives);
    ``*_ids`` are caption ids. Embeddings are L2-normalised here. Returns (loss, accuracy), where the
    accuracy is the share of anchors whose most similar other image has the same caption."""
    anchors = F.normalize(anchors.float(), dim=-1)
    keys = F.normalize(keys.float(), dim=-1)
    logits = anchors @ keys.T / temperature  # (a, n)
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[torch.arange(len(anchors), device=logits.device), anchor_index] = True
    logits = logits.masked_fill(own, float("-inf"))
    positive = (anchor_ids[:, None] == key_ids[None, :]) & ~own
    counts = positive.sum(dim=1)
    has = counts > 0
    target = positive.float() / counts.clamp(min=1)[:, None]
    log_p = torch.log_softmax(logits, dim=1).masked_fill(own, 0.0)  # 0·(−inf) would be NaN
    per_anchor = -(target * log_p).sum(dim=1)
    loss = per_anchor[has].sum() / has.sum().clamp(min=1)
    with torch.no_grad():
        nearest = logits.argmax(dim=1)
        accuracy = (key_ids[nearest] == anchor_ids).float()[has].mean() if has.any() else logits.new_zeros(())
    return loss, accuracy


def stablerep_loss(embeddings: torch.Tensor, caption_ids: torch.Tensor, temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """StableRep's loss for this process's (n, d) embeddings and (n,) caption ids, the keys gathered
    from every process (with gradient under DDP)."""
    keys = gather_with_grad(embeddings)
    key_ids = gather_plain(caption_ids)
    offset = dist.get_rank() * len(embeddings) if keys is not embeddings else 0
    index = torch.arange(len(embeddings), device=embeddings.device) + offset
    return multi_positive_loss(embeddings, keys, caption_ids, key_ids, index, temperature)


def image_text_loss(images: torch.Tensor, texts: torch.Tensor, text_index: torch.Tensor,
                    scale: torch.Tensor | float = 1 / TEMPERATURE) -> torch.Tensor:
    """StableRep+'s CLIP-style term for (n, d) image embeddings and (K, d) embeddings of the batch's K
    distinct captions; image i's caption is ``texts[text_index[i]]`` and every caption has an image.

    Both are L2-normalised, s_ic = scale · u_i · w_c (``scale``: the learned logit scale, a tensor with
    gradient, or a number), and the loss is the mean of the two directions: image → text,
    cross-entropy over the K captions; text → image, for each caption a softmax over the n images with
    a target uniform over its own images (CLIP's InfoNCE when captions and images pair one to one)."""
    u = F.normalize(images.float(), dim=-1)
    w = F.normalize(texts.float(), dim=-1)
    logits = scale * (u @ w.T)  # (n, K)
    image_to_text = F.cross_entropy(logits, text_index)
    own = (text_index[None, :] == torch.arange(len(w), device=w.device)[:, None]).float()  # (K, n)
    target = own / own.sum(dim=1, keepdim=True)
    text_to_image = -(target * torch.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (image_to_text + text_to_image)


def positives_per_anchor(ids: torch.Tensor) -> torch.Tensor:
    """The mean number of other images sharing an anchor's id in a batch of (n,) ids: m − 1 for groups of m."""
    return ((ids[:, None] == ids[None, :]).sum(dim=1) - 1).float().mean()


def info_nce(view1: torch.Tensor, view2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent, written independently of :func:`multi_positive_loss` (a test checks they agree):
    2n anchors; for anchor i its positive is the other view of the same image, the negatives are the
    2n − 2 other embeddings."""
    z = F.normalize(torch.cat([view1, view2]).float(), dim=-1)
    n = len(view1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)
