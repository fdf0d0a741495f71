"""Upsampler stage. Sizes: tiny (16 -> 32, CPU tests), demo (32 -> 64), sr256 (the paper's
64 -> 256 with Gaussian blur, Karlo-like 320-wide, no attention), karlo (sr256 as Karlo's
super_res_first: timestep embedding added, no scale-shift norm), sr1024 (256 -> 1024 with
BSR degradation), tiny2 (32 -> 64 with BSR degradation: the second step of a tiny cascade, CPU
tests). Trained on random crops of 1/4 of the target area.

The cascade's second stages (sr1024, tiny2) train into WORKDIR/upsampler2 by default
(config.stage_dir; the first stages into WORKDIR/upsampler), where the pipeline finds them:

    unclip-jax train --config configs/upsampler.py:size=sr256 --workdir W    # W/upsampler
    unclip-jax train --config configs/upsampler.py:size=sr1024 --workdir W   # W/upsampler2

A third stage would take --config.stage_dir=upsampler3.
"""
import ml_collections

from unclip_jax.train.config import base_config, set_run_length, size_spec

SIZES = {
    "tiny": dict(channels=(16, 32), layers=1, groups=8, out=32, low=16, crop=16, deg="blur",
                 batch=8, steps=20),
    # demo: batch 8 x 600 steps (73 s; 16 x 200: 55 s). On the demo's decoder images (128
    # single-object prompts) it keeps more of the decoder's shapes and leaves less grain:
    # final csp 83.6% vs 77-82%, background noise 1.45 vs 2.25 grey levels (real: 0);
    # 16 x 600 (113 s): 84.4%, 1.44 (README, "The shapes demo").
    "demo": dict(channels=(16, 32, 32), layers=1, groups=8, out=64, low=32, crop=32, deg="blur",
                 batch=8, steps=600),
    "sr256": dict(channels=(320, 640, 960, 1280), layers=3, groups=32, out=256, low=64, crop=128,
                  deg="blur", batch=1024, steps=1_000_000),
    "sr1024": dict(channels=(192, 384, 576, 768), layers=2, groups=32, out=1024, low=256,
                   crop=512, deg="bsr", batch=512, steps=1_000_000),
    "tiny2": dict(channels=(16, 32), layers=1, groups=8, out=64, low=32, crop=32, deg="bsr",
                  batch=8, steps=20),
}
#: the sizes that are the cascade's second step: trained into WORKDIR/upsampler2 by default
SECOND_STAGES = ("sr1024", "tiny2")
SMALL = ("tiny", "tiny2", "demo")
# Karlo's 64 -> 256 super_res_first: sr256's layout with the timestep embedding added to the
# hidden state (diffusers' resnet_time_scale_shift="default", not ADM's scale-shift norm)
SIZES["karlo"] = dict(SIZES["sr256"], time_shift="default")


def get_config(arg=None):
    size, s = size_spec(SIZES, arg)
    c = base_config("upsampler")
    c.stage_dir = "upsampler2" if size in SECOND_STAGES else ""
    c.model = ml_collections.ConfigDict(dict(
        in_channels=6, out_channels=3, sample_size=s["out"], block_out_channels=s["channels"],
        layers_per_block=s["layers"], attention_levels=(False,) * len(s["channels"]),
        mid_block="resnets", norm_groups=s["groups"],
        resnet_time_scale_shift=s.get("time_shift", "scale_shift"),
        resblock_updown=True, noise_level_cond=False, output_skip=3 if size == "demo" else 0,
        dtype="float32", param_dtype="float32"))
    # The demo's upsampler predicts x0 as bicubic(low_res) + a correction (output_skip: the last
    # 3 input channels, the bicubic image, added to the output) with a flat x0 loss, sampled with
    # DDIM: trained 200 steps it upsamples real 32 px test images with background noise 2.0
    # grey levels and every shape kept (64 images); the v / min-SNR-5 upsampler it replaced left
    # 13.5 levels of grain and lost 17% of the shapes (README, "The shapes demo").
    demo = size == "demo"
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine", num_train_steps=1000, prediction="x0" if demo else "eps",
        variance="fixed_small_log", beta_start=1e-4, beta_end=0.02))
    c.loss = ml_collections.ConfigDict({"type": "mse", "vlb_weight": 1e-3,
                                        "min_snr_gamma": 0.0,
                                        "snr_floor": 0.0})
    # how the pipeline samples it (Karlo: DDPM, 7 steps)
    c.sampling = ml_collections.ConfigDict(dict(method="ddim" if demo else "ddpm", eta=0.0))
    c.upsample = ml_collections.ConfigDict(dict(
        low_res_size=s["low"], crop_size=s["crop"], degradation=s["deg"],
        blur_sigma=(0.4, 0.6), noise_aug_max=0, sample_noise_level=0))
    c.data.image_size = s["out"]
    set_run_length(c, small=size in SMALL, batch=s["batch"], steps=s["steps"],
                   lr_small=1e-3, lr_large=1.2e-4)
    if size not in SMALL:
        c.model.dtype = "bfloat16"
        c.model.remat = True
    return c
