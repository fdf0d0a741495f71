"""unclip_jax: unCLIP (DALL-E 2) in JAX/Flax.

Text -> CLIP text embedding -> diffusion prior -> CLIP image embedding -> diffusion decoder (64x64)
-> diffusion upsamplers. See README.md.
"""

__version__ = "0.1.0"
