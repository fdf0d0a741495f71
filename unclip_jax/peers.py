"""PyTorch peers (transformers CLIP, diffusers UnCLIP) of small shapes, built locally with random
weights — nothing is downloaded. For parity tests and benchmarks; needs the test extras
(torch, diffusers)."""
from __future__ import annotations

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


def tiny_unclip_pipeline(path: str, *, seed: int = 0, text_dim: int = 32, context: int = 16,
                         decoder_size: int = 8, super_res_size: int = 16,
                         block_out=(32, 64), prior_heads: int = 2, prior_head_dim: int = 12):
    """A diffusers UnCLIPPipeline of tiny shapes with random weights, saved to `path`."""
    import torch
    import transformers
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel
    from diffusers import UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(seed)
    tok, vocab = tiny_clip_tokenizer(os.path.join(path, "_tok"), context)
    text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=text_dim, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=context, projection_dim=text_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    prior = PriorTransformer(num_attention_heads=prior_heads, attention_head_dim=prior_head_dim,
                             embedding_dim=text_dim, num_layers=2, num_embeddings=context)
    text_proj = UnCLIPTextProjModel(clip_embeddings_dim=text_dim, time_embed_dim=block_out[0] * 4,
                                    cross_attention_dim=text_dim, clip_extra_context_tokens=4)
    decoder = UNet2DConditionModel(
        sample_size=decoder_size, in_channels=3, out_channels=6, layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=block_out,
        cross_attention_dim=text_dim, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity")
    sr_kw = dict(sample_size=super_res_size, layers_per_block=1, in_channels=6, out_channels=3,
                 down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
                 up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
                 block_out_channels=block_out, resnet_time_scale_shift="scale_shift",
                 add_attention=False)
    sr_first, sr_last = UNet2DModel(**sr_kw), UNet2DModel(**sr_kw)
    for i, m in enumerate([text_encoder, prior, text_proj, decoder, sr_first, sr_last]):
        randomise(m, seed * 10 + i, scale=0.1)
    with torch.no_grad():  # Karlo-like embedding statistics
        prior.clip_mean.copy_(0.1 * torch.randn(prior.clip_mean.shape))
        prior.clip_std.copy_(0.5 + torch.rand(prior.clip_std.shape))
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder,
        tokenizer=tok, super_res_first=sr_first, super_res_last=sr_last,
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range",
                                          prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log",
                                            prediction_type="epsilon"))
    pipe.save_pretrained(path)
    return pipe


def nchw_to_nhwc(a) -> np.ndarray:
    a = a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if a.ndim == 4 else a
