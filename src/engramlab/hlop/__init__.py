"""HLOP (Xiao et al., ICLR 2024): Hebbian learning of principal subspaces and orthogonal gradient projection for
continual learning of spiking networks, with its baselines (GPM, EWC, multitask)."""
