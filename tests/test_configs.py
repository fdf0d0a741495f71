"""The `karlo` sizes of the configs against Karlo's published architecture.

The expected values are facts copied from Karlo's released files (named at each table), not from
our code: the diffusers config.json of kakaobrain/karlo-v1-alpha's decoder and super_res_first
(the same files are mirrored in fusing/karlo-image-variations-diffusers), and Karlo's training
config kakaobrain/karlo configs/decoder_900M_vit_l.yaml for what config.json does not record
(dropout matters for training only, so diffusers' config has no key for it).
"""
import dataclasses
import os

from unclip_jax.convert.diffusers_unet import unet_config_from_diffusers
from unclip_jax.models.decoder import DecoderConfig
from unclip_jax.models.unet import UNetConfig
from unclip_jax.train.config import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# kakaobrain/karlo-v1-alpha decoder/config.json (diffusers UNet2DConditionModel)
KARLO_DECODER_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 64,
    "block_out_channels": [320, 640, 960, 1280], "center_input_sample": False,
    "class_embed_type": "identity", "cross_attention_dim": 1536,
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 3, "layers_per_block": 3, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 6,
    "resnet_time_scale_shift": "scale_shift", "sample_size": 64,
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "upcast_attention": False, "use_linear_projection": False,
}
# kakaobrain/karlo configs/decoder_900M_vit_l.yaml: model.hparams
KARLO_DECODER_DROPOUT = 0.1
KARLO_DECODER_CLIP_DIM = 768        # clip_dim
KARLO_DECODER_CONTEXT = 1536        # xf_width (the cross-attention width)
KARLO_DECODER_CLIP_TOKENS = 4       # clip_emb_mult

# kakaobrain/karlo-v1-alpha super_res_first/config.json (diffusers UNet2DModel)
KARLO_SUPER_RES_FIRST = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "add_attention": False,
    "attention_head_dim": 8, "block_out_channels": [320, 640, 960, 1280],
    "center_input_sample": False, "down_block_types": ["ResnetDownsampleBlock2D"] * 4,
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 6,
    "layers_per_block": 3, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 3, "resnet_time_scale_shift": "default", "sample_size": 256,
    "time_embedding_type": "positional", "up_block_types": ["ResnetUpsampleBlock2D"] * 4,
}

# how a model is run and trained, not its architecture
_NOT_ARCHITECTURE = {"dtype", "param_dtype", "remat", "remat_policy", "attention_impl", "dropout"}


def _architecture_diff(ours: UNetConfig, published: dict) -> dict:
    theirs = unet_config_from_diffusers(published)
    skip = set(_NOT_ARCHITECTURE)
    if not any(ours.attention_levels) and ours.mid_block == "resnets":  # no attention anywhere:
        skip |= {"attention_head_dim", "up_attention_head_dim", "mid_attention_head_dim"}
    return {f.name: (getattr(ours, f.name), getattr(theirs, f.name))
            for f in dataclasses.fields(UNetConfig)
            if f.name not in skip and getattr(ours, f.name) != getattr(theirs, f.name)}


def test_karlo_decoder_is_karlos_decoder():
    cfg = load_config(os.path.join(CONFIGS, "decoder.py") + ":size=karlo")
    dec = DecoderConfig.from_dict(cfg.model.to_dict())
    assert _architecture_diff(dec.unet, KARLO_DECODER_UNET) == {}
    assert dec.unet.dropout == KARLO_DECODER_DROPOUT
    assert dec.unet.resnet_time_scale_shift == KARLO_DECODER_UNET["resnet_time_scale_shift"]
    assert dec.clip_embed_dim == KARLO_DECODER_CLIP_DIM
    assert dec.unet.context_dim == KARLO_DECODER_CONTEXT
    assert dec.clip_extra_context_tokens == KARLO_DECODER_CLIP_TOKENS
    assert dec.unet.out_channels == 6 and cfg.diffusion.variance == "learned_range"


def test_karlo_upsampler_is_karlos_super_res_first():
    cfg = load_config(os.path.join(CONFIGS, "upsampler.py") + ":size=karlo")
    unet = UNetConfig.from_dict(cfg.model.to_dict())
    assert _architecture_diff(unet, KARLO_SUPER_RES_FIRST) == {}
    assert unet.resnet_time_scale_shift == KARLO_SUPER_RES_FIRST["resnet_time_scale_shift"]
    assert not any(unet.attention_levels)
    assert cfg.upsample.low_res_size == 64 and unet.sample_size == 256


def test_the_papers_sr256_keeps_its_layout():
    """sr256 (the paper's 64 -> 256) is Karlo's layout with ADM's scale-shift norm."""
    sr256 = UNetConfig.from_dict(
        load_config(os.path.join(CONFIGS, "upsampler.py") + ":size=sr256").model.to_dict())
    karlo = UNetConfig.from_dict(
        load_config(os.path.join(CONFIGS, "upsampler.py") + ":size=karlo").model.to_dict())
    assert sr256.resnet_time_scale_shift == "scale_shift"
    assert dataclasses.replace(sr256, resnet_time_scale_shift="default") == karlo
