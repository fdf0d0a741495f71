"""Autoregressive prior stage (the paper's section 2.2): CLIP image embeddings reduced by PCA to
the components holding >= 99% of the variance, each quantised into buckets, predicted token by
token by a decoder-only transformer after the caption's encodings, the CLIP text embedding and a
quantised (z_i . z_t) token. Sizes: tiny (CPU tests), demo (the shapes demo's CLIP: width 64),
paper (1024 buckets, width 2048, 24 blocks, 77 text tokens; the paper keeps 319 components).

    unclip-jax train --config configs/ar_prior.py:size=demo --workdir W   (needs W/clip trained)
"""
import ml_collections

from unclip_jax.train.config import base_config, set_run_length, size_spec

SIZES = {
    "tiny": dict(embedding_dim=32, text_width=32, num_text_tokens=24, num_layers=2, num_heads=2,
                 head_dim=16, buckets=32, dot_buckets=8, batch=16, steps=20, image=32,
                 fit_batches=8),
    "demo": dict(embedding_dim=64, text_width=64, num_text_tokens=24, num_layers=4, num_heads=4,
                 head_dim=32, buckets=32, dot_buckets=16, batch=64, steps=800, image=64,
                 fit_batches=32),
    # demo: 32 buckets x 800 steps samples embeddings at cosine 0.93-0.98 to the true ones (64
    # single-object prompts); 128 buckets x 400 steps gave 0.33-0.58 (README, the priors compared)
    "paper": dict(embedding_dim=768, text_width=768, num_text_tokens=77, num_layers=24,
                  num_heads=32, head_dim=64, buckets=1024, dot_buckets=1024, batch=4096,
                  steps=1_000_000, image=224, fit_batches=64),
}


def get_config(arg=None):
    size, s = size_spec(SIZES, arg)
    c = base_config("ar_prior")
    c.model = ml_collections.ConfigDict(dict(
        embedding_dim=s["embedding_dim"], text_width=s["text_width"],
        num_text_tokens=s["num_text_tokens"], num_layers=s["num_layers"],
        num_heads=s["num_heads"], head_dim=s["head_dim"], num_buckets=s["buckets"],
        num_dot_buckets=s["dot_buckets"], dropout=0.0, dtype="float32",
        param_dtype="float32", remat=False, remat_policy="full", scan_layers=False))
    # the codebook: fitted once from `fit_batches` batches of CLIP embeddings when the stage
    # starts, written to WORKDIR/ar_prior/codebook.npz and read back on resume (never refitted)
    c.codebook = ml_collections.ConfigDict(dict(
        variance=0.99,        # keep the components that hold this fraction of the variance
        num_components=0,     # > 0: keep exactly this many instead
        fit_batches=s["fit_batches"]))
    # how the pipeline samples it by default (recorded with the stage)
    c.sampling = ml_collections.ConfigDict(dict(
        temperature=1.0, top_k=0,  # 0: no top-k (guidance: the pipeline's prior_guidance)
        dot_quantiles=(0.5, 1.0)))  # z_i . z_t drawn from this range of its training quantiles
    c.cond_drop = ml_collections.ConfigDict({"text": 0.1})
    c.clip_dir = ""  # default: WORKDIR/clip
    c.tokenizer = ""  # default: the CLIP stage's tokenizer
    c.data.image_size = s["image"]
    set_run_length(c, small=size in ("tiny", "demo"), batch=s["batch"], steps=s["steps"],
                   lr_small=1e-3, lr_large=1e-4, weight_decay_large=1e-2)
    if size == "paper":
        c.model.dtype = "bfloat16"
        c.model.scan_layers = True
        c.model.remat = True
        c.model.remat_policy = "dots"
    return c
