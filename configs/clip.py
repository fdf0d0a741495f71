"""CLIP stage. Sizes: tiny (CPU tests), demo (the shapes demo), paper / karlo (ViT-L/14, as the
released OpenAI CLIP that Karlo uses; the paper's ViT-H/16 is unreleased).

    unclip-jax train --config configs/clip.py:size=tiny --workdir W

On the shapes source, without --config.tokenizer=DIR, the stage trains a BPE tokenizer on the
shapes captions into W/tokenizer; other sources need --config.tokenizer=DIR.
"""
import ml_collections

from unclip_jax.train.config import base_config, set_run_length, size_spec

SIZES = {
    "tiny": dict(text=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, max_position_embeddings=24),
                 vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                             image_size=32, patch_size=8),
                 projection_dim=32, batch=16, steps=20, image=32),
    "demo": dict(text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, max_position_embeddings=24),
                 vision=dict(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                             image_size=32, patch_size=8),
                 projection_dim=64, batch=64, steps=600, image=64),
    "karlo": dict(text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                            num_layers=12, num_heads=12, max_position_embeddings=77),
                  vision=dict(hidden_size=1024, intermediate_size=4096, num_layers=24,
                              num_heads=16, image_size=224, patch_size=14),
                  projection_dim=768, batch=32768, steps=400_000, image=224),
}
SIZES["paper"] = SIZES["karlo"]


def get_config(arg=None):
    size, s = size_spec(SIZES, arg)
    c = base_config("clip")
    c.model = ml_collections.ConfigDict(dict(
        text=dict(s["text"], hidden_act="quick_gelu", eos_token_id=1, bos_token_id=0,
                  pad_token_id=1, projection_dim=s["projection_dim"]),
        vision=dict(s["vision"], hidden_act="quick_gelu", projection_dim=s["projection_dim"]),
        projection_dim=s["projection_dim"], logit_scale_init=2.6592))
    c.tokenizer = ""  # a tokenizer directory (transformers format); "" on shapes: W/tokenizer
    c.data.image_size = s["image"]
    set_run_length(c, small=size in ("tiny", "demo"), batch=s["batch"], steps=s["steps"],
                   lr_small=1e-3, lr_large=5e-4, weight_decay_large=0.1)
    return c
