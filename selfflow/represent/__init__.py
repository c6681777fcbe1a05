"""StableRep and its baselines: representation learning from synthetic (or real) images.

=================  ===========================================================================
``losses``         the multi-positive contrastive loss, SimCLR's InfoNCE, all-gather with gradient
``augment``        batched, seeded image augmentations (crops, shifts, contrast, noise)
``encoders``       a small ViT made of the generator's DiT blocks, a small ResNet-style CNN, MLP head
``synth``          synthetic sets with caption ids (``selfflow synth``)
``probes``         linear probe, k-NN and few-shot probes on frozen features
``cli``            ``selfflow synth`` and ``selfflow represent train|probe``
=================  ===========================================================================

The training objectives are methods of the one trainer: :mod:`selfflow.methods.represent`.
Equations: docs/methods.md#stablerep.
"""
