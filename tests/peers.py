"""PyTorch peers (transformers CLIP, diffusers UnCLIP) of small shapes, built locally with random
weights — nothing is downloaded. For parity tests and benchmarks; needs the test extras
(torch, diffusers)."""
from __future__ import annotations

import dataclasses
import os

import numpy as np


def tiny_clip_tokenizer(path: str, model_max_length: int = 16):
    """A character-level CLIPTokenizer (no merges) saved to `path`."""
    import transformers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,'!?-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    tok.save_pretrained(path)
    return tok, len(vocab)


def randomise(module, seed: int, scale: float = 0.2):
    """Overwrite every parameter (zero-initialised ones included) with seeded noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and ("norm" in name or "ln" in name.split(".")[-2]):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


@dataclasses.dataclass(frozen=True)
class UnCLIPArch:
    """The shapes of a diffusers UnCLIPPipeline: text encoder, prior, text_proj + decoder,
    super-resolution UNets. Defaults are tiny (CPU tests); `KARLO` is kakaobrain/karlo-v1-alpha's."""

    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 37
    context: int = 16
    prior_heads: int = 2
    prior_head_dim: int = 12
    prior_layers: int = 2
    decoder_size: int = 8
    block_out: tuple[int, ...] = (32, 64)
    decoder_layers: int = 1
    decoder_head_dim: int = 8
    cross_attention_dim: int | None = None  # None = text_dim
    super_res_size: int = 16
    super_res_block_out: tuple[int, ...] | None = None  # None = block_out
    super_res_layers: int = 1
    super_res_shift: str = "scale_shift"


# kakaobrain/karlo-v1-alpha as diffusers converts it (ViT-L/14 text tower; prior 20 x 2048;
# decoder ADM 320 x (1, 2, 3, 4), 3 res blocks, attention at 32/16/8, head 64, context 1536;
# super-res 64 -> 256 without attention)
KARLO = UnCLIPArch(
    text_dim=768, text_layers=12, text_heads=12, text_ffn=3072, context=77, prior_heads=32,
    prior_head_dim=64, prior_layers=20, decoder_size=64, block_out=(320, 640, 960, 1280),
    decoder_layers=3, decoder_head_dim=64, cross_attention_dim=1536, super_res_size=256,
    super_res_layers=3, super_res_shift="default")


def unclip_pipeline(path: str | None, arch: UnCLIPArch = UnCLIPArch(), *, seed: int = 0,
                    randomise_scale: float | None = 0.1, torch_dtype=None, device=None):
    """A diffusers UnCLIPPipeline of `arch`'s shapes with random weights, saved to `path`
    (when given; in `torch_dtype`, safetensors).

    randomise_scale: overwrite every parameter with seeded noise of this scale (so that
    zero-initialised layers do something, as parity tests need); None keeps diffusers' /
    transformers' own initialisation (benchmarks). device: where the modules are built.
    """
    import torch
    import transformers
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel
    from diffusers import UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    a = arch
    cross = a.cross_attention_dim or a.text_dim
    levels = len(a.block_out)
    torch.manual_seed(seed)
    tok, vocab = tiny_clip_tokenizer(os.path.join(path or _tmpdir(), "_tok"), a.context)
    with torch.device(device or "cpu"):
        text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=vocab, hidden_size=a.text_dim, intermediate_size=a.text_ffn,
            num_hidden_layers=a.text_layers, num_attention_heads=a.text_heads,
            max_position_embeddings=a.context, projection_dim=a.text_dim, bos_token_id=0,
            eos_token_id=1, pad_token_id=1)).eval()
        prior = PriorTransformer(num_attention_heads=a.prior_heads,
                                 attention_head_dim=a.prior_head_dim, num_layers=a.prior_layers,
                                 embedding_dim=a.text_dim, num_embeddings=a.context)
        text_proj = UnCLIPTextProjModel(clip_embeddings_dim=a.text_dim,
                                        time_embed_dim=a.block_out[0] * 4,
                                        cross_attention_dim=cross, clip_extra_context_tokens=4)
        decoder = UNet2DConditionModel(
            sample_size=a.decoder_size, in_channels=3, out_channels=6,
            layers_per_block=a.decoder_layers,
            down_block_types=("ResnetDownsampleBlock2D",)
            + ("SimpleCrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("SimpleCrossAttnUpBlock2D",) * (levels - 1)
            + ("ResnetUpsampleBlock2D",),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=a.block_out,
            cross_attention_dim=cross, attention_head_dim=a.decoder_head_dim,
            resnet_time_scale_shift="scale_shift", class_embed_type="identity")
        sr_out = a.super_res_block_out or a.block_out
        sr_kw = dict(sample_size=a.super_res_size, layers_per_block=a.super_res_layers,
                     in_channels=6, out_channels=3,
                     down_block_types=("ResnetDownsampleBlock2D",) * len(sr_out),
                     up_block_types=("ResnetUpsampleBlock2D",) * len(sr_out),
                     block_out_channels=sr_out, resnet_time_scale_shift=a.super_res_shift,
                     add_attention=False)
        sr_first, sr_last = UNet2DModel(**sr_kw), UNet2DModel(**sr_kw)
        modules = [text_encoder, prior, text_proj, decoder, sr_first, sr_last]
        if randomise_scale is not None:
            for i, m in enumerate(modules):
                randomise(m, seed * 10 + i, scale=randomise_scale)
        with torch.no_grad():  # Karlo-like embedding statistics
            g = torch.Generator().manual_seed(seed)
            prior.clip_mean.copy_(0.1 * torch.randn(prior.clip_mean.shape, generator=g))
            prior.clip_std.copy_(0.5 + torch.rand(prior.clip_std.shape, generator=g))
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder,
        tokenizer=tok, super_res_first=sr_first, super_res_last=sr_last,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range",
                                          prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log",
                                            prediction_type="epsilon"))
    if torch_dtype is not None:
        pipe = pipe.to(torch_dtype)
    if path is not None:
        pipe.save_pretrained(path)
    return pipe


def tiny_unclip_pipeline(path: str, *, seed: int = 0, **shapes):
    """A diffusers UnCLIPPipeline of tiny shapes (UnCLIPArch fields) with random weights,
    saved to `path`."""
    return unclip_pipeline(path, UnCLIPArch(**shapes), seed=seed)


def tiny_clip_vision(projection_dim: int, *, image_size: int = 32, patch_size: int = 8,
                     hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0,
                     scale: float = 0.1):
    """A transformers CLIPVisionModelWithProjection of small shapes with seeded random
    weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden + 5, num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
        projection_dim=projection_dim)).eval()
    return randomise(model, seed, scale=scale)


def clip_image_processor(size: int, crop: int | None = None, **kw):
    """A transformers CLIPImageProcessor: shortest edge `size`, centre crop `crop` (default
    `size`); `kw`: image_mean, image_std, ... (the Pillow backend when torchvision is absent)."""
    import warnings

    import transformers

    crop = size if crop is None else crop
    with warnings.catch_warnings():  # "requires torchvision ... falling back to ...Pil"
        warnings.simplefilter("ignore")
        return transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                               crop_size={"height": crop, "width": crop}, **kw)


def unclip_image_variation_pipeline(path: str | None, arch: UnCLIPArch = UnCLIPArch(), *,
                                    seed: int = 0, image_size: int = 32, patch_size: int = 8,
                                    vision_hidden: int = 32, vision_layers: int = 2,
                                    randomise_scale: float | None = 0.1):
    """A diffusers UnCLIPImageVariationPipeline with random weights: `unclip_pipeline`'s text
    encoder, tokenizer, text_proj + decoder, upsamplers and schedulers, a
    CLIPVisionModelWithProjection whose projection is the decoder's CLIP embedding width
    (`arch.text_dim`) and a CLIPImageProcessor sized to it; saved to `path` when given.
    `randomise_scale`: as `unclip_pipeline`'s (the image encoder's weights are drawn at 0.1)."""
    import warnings

    from diffusers import UnCLIPImageVariationPipeline

    base = unclip_pipeline(None, arch, seed=seed, randomise_scale=randomise_scale)
    encoder = tiny_clip_vision(arch.text_dim, image_size=image_size, patch_size=patch_size,
                               hidden=vision_hidden, layers=vision_layers, seed=seed * 10 + 7)
    with warnings.catch_warnings():  # the pipeline is deprecated in diffusers
        warnings.simplefilter("ignore")
        pipe = UnCLIPImageVariationPipeline(
            decoder=base.decoder, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
            text_proj=base.text_proj, feature_extractor=clip_image_processor(image_size),
            image_encoder=encoder, super_res_first=base.super_res_first,
            super_res_last=base.super_res_last, decoder_scheduler=base.decoder_scheduler,
            super_res_scheduler=base.super_res_scheduler)
        if path is not None:
            pipe.save_pretrained(path)
    return pipe


def tiny_clip_model(path: str | None, projection_dim: int, *, image_size: int = 16,
                    patch_size: int = 4, seed: int = 0, processor=None):
    """A transformers CLIPModel (both towers) of small shapes with seeded random weights, saved
    to `path` when given, with `processor` (a CLIPImageProcessor) beside it when given."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=24, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=41, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim)).eval()
    randomise(model, seed, scale=0.1)
    if path is not None:
        model.save_pretrained(path)
        if processor is not None:
            processor.save_pretrained(path)
    return model


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="unclip_peer_")


def nchw_to_nhwc(a) -> np.ndarray:
    a = a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if a.ndim == 4 else a
