"""Weight import from PyTorch formats (transformers CLIP, diffusers UnCLIP) into our params."""
