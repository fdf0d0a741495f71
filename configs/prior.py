"""Diffusion prior stage. Sizes: tiny (CPU tests), demo, karlo (width 2048 = 32 x 64, 20 layers,
77 text tokens), paper (width 2048, 24 blocks, embeddings scaled by 17.2).

    unclip-jax train --config configs/prior.py:size=tiny --workdir W   (needs W/clip trained)
"""
import ml_collections

from unclip_jax.train.config import base_config, set_run_length, size_spec

SIZES = {
    "tiny": dict(embedding_dim=32, num_layers=2, num_heads=2, head_dim=16, num_text_tokens=24,
                 batch=16, steps=20, image=32, norm="meanstd"),
    "demo": dict(embedding_dim=64, num_layers=4, num_heads=4, head_dim=32, num_text_tokens=24,
                 batch=64, steps=300, image=64, norm="meanstd"),
    "karlo": dict(embedding_dim=768, num_layers=20, num_heads=32, head_dim=64,
                  num_text_tokens=77, batch=4096, steps=1_000_000, image=224, norm="meanstd"),
    "paper": dict(embedding_dim=768, num_layers=24, num_heads=32, head_dim=64,
                  num_text_tokens=77, batch=4096, steps=1_000_000, image=224, norm="scale"),
}


def get_config(arg=None):
    size, s = size_spec(SIZES, arg)
    c = base_config("prior")
    c.model = ml_collections.ConfigDict(dict(
        embedding_dim=s["embedding_dim"], num_layers=s["num_layers"], num_heads=s["num_heads"],
        head_dim=s["head_dim"], num_text_tokens=s["num_text_tokens"], dropout=0.0,
        embedding_norm=s["norm"], embedding_scale=17.2, clip_x0=5.0 if s["norm"] == "meanstd"
        else None, dtype="float32", param_dtype="float32"))
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine", num_train_steps=1000, prediction="x0", variance="fixed_small_log",
        beta_start=1e-4, beta_end=0.02))
    c.cond_drop = ml_collections.ConfigDict({"text": 0.1})
    # the guidance scale the pipeline samples this prior at by default: the demo's at 2 places
    # more single objects fully right than at Karlo's 4 (82.0% vs 77.3% of 256 prompts; the
    # same figures on another 128 with the older upsampler; README, "The shapes demo"); 8: 27%
    c.sampling = ml_collections.ConfigDict(dict(guidance=2.0 if size == "demo" else 4.0))
    c.clip_dir = ""  # default: WORKDIR/clip
    c.tokenizer = ""  # default: the CLIP stage's tokenizer
    c.stats_batches = 8
    c.data.image_size = s["image"]
    set_run_length(c, small=size in ("tiny", "demo"), batch=s["batch"], steps=s["steps"],
                   lr_small=1e-3, lr_large=1.1e-4, weight_decay_large=6e-2)
    if size in ("karlo", "paper"):
        c.model.dtype = "bfloat16"
        # one compiled block for all layers (compile ~3x faster), per-layer activations kept to
        # the projections' outputs (docs/PERFORMANCE.md)
        c.model.scan_layers = True
        c.model.remat = True
        c.model.remat_policy = "dots"
    return c
