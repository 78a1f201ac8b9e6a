"""Continual test-time adaptation (Wang et al., CVPR 2022): CoTTA and its baselines (Source, BN, TENT),
augmentations, corruption streams and source models."""
