"""Text as a condition (docs/methods.md#text-to-image): captions, text encoders, the text-conditioned DiT.

=====================  =====================================================================
``captions``           captions from labels + attributes measured on the image; held-out templates; JSONL files
``encoders``           the ``encode(list[str]) → (pooled, tokens, mask)`` interface: MiniLM, hashed, disk cache
``data``               :class:`CaptionedDataset`: (image, caption) pairs and the caption bank the model reads
``model``              caption models: the one DiT with a caption condition (cross-attention to caption tokens)
``generate``           sampling from prompts, with guidance on text
``evaluation``         prompt accuracy, attribute agreement, the image–text alignment score
``cli``                ``selfflow sample --prompt`` / ``--prompts`` for caption-conditioned checkpoints
=====================  =====================================================================
"""
