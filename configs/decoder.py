"""Decoder stage (the unCLIP decoder: CLIP conditioning + ADM UNet). Sizes: tiny (CPU tests),
demo (32x32), karlo (64x64, 320 x (1,2,3,4), 3 res blocks, attention at 32/16/8, head dim 64,
learned variance), paper (GLIDE-like, 512 x (1,2,3,4)).

    unclip-jax train --config configs/decoder.py:size=tiny --workdir W   (needs W/clip trained)
"""
import ml_collections

from unclip_jax.train.config import base_config, set_run_length, size_spec

SIZES = {
    "tiny": dict(channels=(16, 32), layers=1, attn=(False, True), head=8, size=16, clip=32,
                 context=32, groups=8, batch=8, steps=20, image=32),
    # 2x2 patches (space-to-depth: the levels run at 16 and 8 px), which halves the step's time
    # at the same learning per step (measured: patch 2 x (32, 64) and the unpatched (16, 32, 64)
    # both place ~30% of single objects fully right after batch 8 x 1800; patched 3600 steps,
    # 34-48%, but that fresh-clone demo took 19.6 min on a slower day). At a fixed budget
    # many small batches beat few large ones (batch 32 x 450 steps places 31% of single objects
    # in the right cell, 16 x 900 60%, 8 x 1800 96%). 7500 steps: what the
    # demo's 13.5-minute budget leaves for the decoder on a quiet 2-core machine (~17 steps/s;
    # fresh clone 10.9-11.6 min, 69% csp; 8 x 5000: 8.7 min, 58%; README, "The shapes demo");
    # timesteps logit-normal (loss.t_logit_std below).
    "demo": dict(channels=(32, 64), layers=1, attn=(False, True), head=32, size=32, patch=2,
                 clip=64, context=64, groups=8, batch=8, steps=7500, image=64),
    "karlo": dict(channels=(320, 640, 960, 1280), layers=3, attn=(False, True, True, True),
                  head=64, size=64, clip=768, context=1536, groups=32, batch=2048,
                  steps=800_000, image=224,
                  dropout=0.1),  # Karlo's configs/decoder_900M_vit_l.yaml: dropout 0.1
    "paper": dict(channels=(512, 1024, 1536, 2048), layers=3, attn=(False, True, True, True),
                  head=64, size=64, clip=768, context=2048, groups=32, batch=2048,
                  steps=800_000, image=224),
}


def get_config(arg=None):
    size, s = size_spec(SIZES, arg)
    c = base_config("decoder")
    c.model = ml_collections.ConfigDict(dict(
        unet=dict(in_channels=3, out_channels=6, sample_size=s["size"],
                  block_out_channels=s["channels"], layers_per_block=s["layers"],
                  attention_levels=s["attn"], attention_head_dim=s["head"],
                  norm_groups=s["groups"], dropout=s.get("dropout", 0.0),
                  resnet_time_scale_shift="scale_shift",
                  resblock_updown=True, context_dim=s["context"], time_cond=True,
                  coord_input=size == "demo", patch_size=s.get("patch", 1),
                  dtype="float32", param_dtype="float32"),
        clip_embed_dim=s["clip"], clip_extra_context_tokens=4))
    # The demo predicts x0 with a flat x0 loss and samples with DDIM. A small, briefly trained
    # UNet's eps error (~0.04 MSE whatever t) is amplified by 1/sqrt(abar_t) into x0 at high
    # noise, so an eps decoder fails from t=999; and v with min-SNR-5 weighting (x0-space weight
    # min(SNR, 5)) starves the high-noise steps that decide where things go: such a decoder
    # ignored its CLIP embedding (README, "The shapes demo"). Karlo and the paper predict eps.
    demo = size == "demo"
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine", num_train_steps=1000, prediction="x0" if demo else "eps",
        variance="learned_range", beta_start=1e-4, beta_end=0.02,
        sigma_data=0.5))
    # The demo draws its training timesteps logit-normal (std 1: Esser et al. 2024's density,
    # fewer of the near-clean and near-pure-noise steps): at 8 x 2000 steps, 34% / 33% csp
    # (true / prior embeddings, 128 prompts) vs 32% / 30% uniform, background noise at 32 px
    # 1.9 vs 3.0, shape kept from t = 300 64% vs 42% (README, "The shapes demo").
    c.loss = ml_collections.ConfigDict({"type": "hybrid", "vlb_weight": 1e-3, "p2_gamma": 0.0,
                                        "min_snr_gamma": 0.0, "snr_floor": 0.0,
                                        "t_logit_mean": 0.0,
                                        "t_logit_std": 1.0 if demo else 0.0})
    # how the pipeline samples this decoder by default (DDPM at guidance 8: Karlo's; the demo's
    # x0 decoder: DDIM, unguided)
    c.sampling = ml_collections.ConfigDict(
        dict(method="ddim", eta=0.0, guidance=1.0) if demo
        else dict(method="ddpm", eta=0.0, guidance=8.0))
    c.cond_drop = ml_collections.ConfigDict({"image": 0.1, "text": 0.5})
    c.clip_dir = ""
    c.tokenizer = ""
    c.data.image_size = s["image"]
    set_run_length(c, small=size in ("tiny", "demo"), batch=s["batch"], steps=s["steps"],
                   lr_small=1e-3, lr_large=1.2e-4)
    if size in ("karlo", "paper"):
        c.model.unet.dtype = "bfloat16"
        c.model.unet.remat = True
    return c
