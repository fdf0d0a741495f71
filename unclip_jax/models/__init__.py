"""Flax linen networks: CLIP, the diffusion prior transformer and the ADM UNet."""
