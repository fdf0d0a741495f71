"""The PyTorch peers of bench/bench_stage_steps.py: each demo stage's training step built from
its config with transformers / diffusers modules of the same shapes (`torch_peer`), the same
batch, AdamW + clipping + EMA (`TorchStep`). Bench-only: nothing in the package imports it."""
from __future__ import annotations


def _torch_clip(c):
    """transformers CLIPModel of our CLIPConfig's shapes."""
    import transformers

    t, v = c.text, c.vision
    hf = transformers.CLIPConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                         intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                         num_attention_heads=t.num_heads,
                         max_position_embeddings=t.max_position_embeddings,
                         hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
                         eos_token_id=t.eos_token_id, bos_token_id=t.bos_token_id,
                         pad_token_id=t.pad_token_id, projection_dim=c.projection_dim),
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                           image_size=v.image_size, patch_size=v.patch_size,
                           num_channels=v.num_channels, hidden_act=v.hidden_act,
                           layer_norm_eps=v.layer_norm_eps, projection_dim=c.projection_dim),
        projection_dim=c.projection_dim, logit_scale_init_value=c.logit_scale_init)
    return transformers.CLIPModel(hf)


def _unet_io(u, what):
    """(in_channels, out_channels, side divisor) of the torch UNet behind our UNetConfig `u`:
    coordinate channels and patch_size p (space-to-depth) are done around the torch UNet."""
    if u.noise_level_cond:
        raise NotImplementedError(f"{what}: no diffusers peer for noise_level_cond")
    if not u.resblock_updown:
        raise NotImplementedError(f"{what}: the peer is written for resblock_updown=True")
    p = int(u.patch_size)
    return (u.in_channels + 2 * bool(u.coord_input)) * p * p, u.out_channels * p * p, p


def _torch_decoder(dc):
    """diffusers UNet2DConditionModel + UnCLIPTextProjModel of our DecoderConfig's shapes (the
    block types diffusers_unet.unet_config_from_diffusers maps to ours)."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    u = dc.unet
    cin, cout, p = _unet_io(u, "decoder")
    if dc.text_hidden_dim not in (None, dc.clip_embed_dim):
        raise NotImplementedError("UnCLIPTextProjModel projects text states of clip_embed_dim")
    mids = {"attention": "UNetMidBlock2DSimpleCrossAttn", "none": None}
    if u.mid_block not in mids:
        raise NotImplementedError(f"decoder peer: mid_block {u.mid_block!r}")
    down = tuple("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D"
                 for a in u.attention_levels)
    up = tuple("SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D"
               for a in reversed(u.attention_levels))
    unet = UNet2DConditionModel(
        sample_size=int(u.sample_size) // p, in_channels=cin, out_channels=cout,
        layers_per_block=u.layers_per_block, down_block_types=down, up_block_types=up,
        mid_block_type=mids[u.mid_block], block_out_channels=u.block_out_channels,
        cross_attention_dim=u.context_dim, attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_groups, norm_eps=u.norm_eps, dropout=u.dropout,
        resnet_time_scale_shift=u.resnet_time_scale_shift, class_embed_type="identity",
        flip_sin_to_cos=u.flip_sin_to_cos, freq_shift=int(u.freq_shift),
        time_embedding_dim=u.time_embed_dim)
    proj = UnCLIPTextProjModel(clip_extra_context_tokens=dc.clip_extra_context_tokens,
                               clip_embeddings_dim=dc.clip_embed_dim, time_embed_dim=u.emb_dim,
                               cross_attention_dim=u.context_dim)
    return unet, proj


def _torch_upsampler(u):
    from diffusers import UNet2DModel

    cin, cout, p = _unet_io(u, "upsampler")
    if any(u.attention_levels) or u.mid_block not in ("resnets", "none"):
        raise NotImplementedError("upsampler peer: written for the attention-free UNet")
    n = len(u.block_out_channels)
    return UNet2DModel(
        sample_size=int(u.sample_size) // p, in_channels=cin, out_channels=cout,
        layers_per_block=u.layers_per_block, block_out_channels=u.block_out_channels,
        down_block_types=("ResnetDownsampleBlock2D",) * n,
        up_block_types=("ResnetUpsampleBlock2D",) * n, add_attention=False,
        mid_block_type=None if u.mid_block == "none" else "UNetMidBlock2D",
        norm_num_groups=u.norm_groups, norm_eps=u.norm_eps, dropout=u.dropout,
        resnet_time_scale_shift=u.resnet_time_scale_shift, flip_sin_to_cos=u.flip_sin_to_cos,
        freq_shift=int(u.freq_shift), time_embedding_dim=u.time_embed_dim)


class TorchStep:
    """One training step of a torch network: the stage's loss (`loss_fn()`), backward, global
    norm clipping, AdamW with the config's hyper-parameters (constant lr: the schedule's cost is
    nil), EMA with the trainer's warm-up rule. `foreach` kernels throughout (torch's fastest
    CPU path)."""

    def __init__(self, modules, loss_fn, cfg, trainable=None):
        import torch

        self.torch = torch
        self.modules = modules
        self.params = [p for m in modules for p in m.parameters()
                       if trainable is None or trainable(p)]
        o = cfg.optimizer
        wd = float(o.get("weight_decay", 0.0))
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": wd},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=float(o.lr), betas=(o.get("b1", 0.9),
                                     o.get("b2", 0.999)), eps=o.get("eps", 1e-8), foreach=True)
        self.clip = float(o.get("clip_norm") or 0.0)
        self.decay = float(cfg.ema.decay)
        self.ema = [p.detach().clone() for p in self.params]
        self.loss_fn = loss_fn
        self.step_count = 0
        for m in modules:
            m.train()

    def step(self):
        torch = self.torch
        loss = self.loss_fn()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        d = min(self.decay, (1.0 + self.step_count) / (10.0 + self.step_count))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - d)
        self.step_count += 1
        return loss


def torch_peer(stage, config, host_batch, *, channels_last: bool = False):
    """(TorchStep, torch parameter count, what differs from the JAX step) for `stage`, on the
    trainer's last batch (numpy). The networks are built from the stage's own config objects;
    the frozen CLIP of the prior / decoder runs inside the step under no_grad, as ours does."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from unclip_jax.images import CLIP_MEAN, CLIP_STD

    torch.manual_seed(0)
    b = {k: torch.from_numpy(np.asarray(v)) for k, v in host_batch.items()}
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def resize(images_uint8, size, lo=0.0, hi=1.0):  # NHWC uint8 -> NCHW float, bicubic AA
        x = images_uint8.permute(0, 3, 1, 2).float() / 255.0 * (hi - lo) + lo
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                              align_corners=False)
        return x.contiguous(memory_format=fmt)

    def clip_pixels(images, size):
        m = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        s = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (resize(images, size) - m) / s

    abar = None
    if hasattr(stage, "diffusion"):
        abar = torch.tensor(np.asarray(stage.diffusion.alphas_cumprod), dtype=torch.float32)
        T = len(abar)

    def noised(x0):
        t = torch.randint(0, T, (x0.shape[0],))
        a = abar[t].view((-1,) + (1,) * (x0.ndim - 1))
        noise = torch.randn_like(x0)
        return t, noise, a.sqrt() * x0 + (1 - a).sqrt() * noise, a

    def frozen_clip(clip_cfg):
        m = _torch_clip(clip_cfg).eval()
        m.requires_grad_(False)
        null_ids = torch.from_numpy(np.asarray(stage.null_ids)).long()

        def encode(ids, images, size):
            with torch.no_grad():
                img = m.visual_projection(m.vision_model(
                    pixel_values=clip_pixels(images, size)).pooler_output)
                out = m.text_model(input_ids=ids.long())
                text = m.text_projection(out.pooler_output)
                nul = m.text_model(input_ids=null_ids)  # the empty prompt, every step (as ours)
                return (img, text, out.last_hidden_state, m.text_projection(nul.pooler_output),
                        nul.last_hidden_state)
        return m, encode

    def drop_rows(p, n):
        return torch.rand(n) < p

    name = stage.name
    if name == "clip":
        model = _torch_clip(stage.cfg)
        size = stage.cfg.vision.image_size

        def loss_fn():
            return model(input_ids=b["input_ids"].long(),
                         pixel_values=clip_pixels(b["image"], size), return_loss=True).loss
        return (TorchStep([model], loss_fn, config), _n_params_torch([model]),
                "transformers CLIPModel, its contrastive loss (return_loss=True)")

    if name == "prior":
        from diffusers import PriorTransformer

        pc = stage.cfg
        prior = PriorTransformer(
            num_attention_heads=pc.num_heads, attention_head_dim=pc.head_dim,
            num_layers=pc.num_layers, embedding_dim=pc.embedding_dim,
            num_embeddings=pc.num_text_tokens, additional_embeddings=pc.additional_embeddings,
            dropout=pc.dropout, time_embed_act_fn=pc.time_embed_act_fn,
            time_embed_dim=pc.time_embed_dim, norm_in_type=pc.norm_in_type,
            embedding_proj_norm_type=pc.embedding_proj_norm_type,
            encoder_hid_proj_type=pc.encoder_hid_proj_type, added_emb_type=pc.added_emb_type,
            embedding_proj_dim=pc.embedding_proj_dim, clip_embed_dim=pc.clip_embed_dim)
        clipm, encode = frozen_clip(stage.clip.config)
        size = stage.clip.vision_config.image_size
        p_drop = float(config.cond_drop.text)

        def loss_fn():
            img, text, hidden, ntext, nhidden = encode(b["input_ids"], b["image"], size)
            mask = b["text_mask"]
            d = drop_rows(p_drop, img.shape[0])
            text = torch.where(d[:, None], ntext, text)
            hidden = torch.where(d[:, None, None], nhidden, hidden)
            mask = torch.where(d[:, None], torch.from_numpy(np.asarray(stage.null_mask)), mask)
            x0 = (img - prior.clip_mean) / prior.clip_std
            t, _, x_t, _ = noised(x0)
            pred = prior(x_t, t, proj_embedding=text, encoder_hidden_states=hidden,
                         attention_mask=mask).predicted_image_embedding
            return F.mse_loss(pred, x0)
        trainable = lambda p: p is not prior.clip_mean and p is not prior.clip_std  # noqa: E731
        return (TorchStep([prior], loss_fn, config, trainable), _n_params_torch([prior]),
                "diffusers PriorTransformer, x0 MSE; frozen transformers CLIP in the step")

    if name in ("decoder", "upsampler"):
        u = stage.cfg.unet if name == "decoder" else stage.cfg
        cin, cout, p = _unet_io(u, name)

        def coords(bsz, h, w):
            ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
            xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
            g = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), 0)
            return g[None].expand(bsz, 2, h, w)

        def unet_in(x):
            if u.coord_input:
                x = torch.cat([x, coords(x.shape[0], x.shape[2], x.shape[3])], 1)
            if p > 1:
                x = F.pixel_unshuffle(x, p)
            return x.contiguous(memory_format=fmt)

        def unet_out(y):
            return F.pixel_shuffle(y, p) if p > 1 else y

    if name == "decoder":
        dc = stage.cfg
        unet, proj = _torch_decoder(dc)
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        clipm, encode = frozen_clip(stage.clip.config)
        csize = stage.clip.vision_config.image_size
        size, n_tok = stage.size, dc.clip_extra_context_tokens
        p_text, p_img = float(config.cond_drop.text), float(config.cond_drop.image)
        prediction = stage.diffusion.config.prediction

        def loss_fn():
            img, text, hidden, ntext, nhidden = encode(b["input_ids"], b["image"], csize)
            bsz = img.shape[0]
            d = drop_rows(p_text, bsz)
            text = torch.where(d[:, None], ntext, text)
            hidden = torch.where(d[:, None, None], nhidden, hidden)
            mask = torch.where(d[:, None], torch.from_numpy(np.asarray(stage.null_mask)),
                               b["text_mask"])
            img = torch.where(drop_rows(p_img, bsz)[:, None],
                              proj.learned_classifier_free_guidance_embeddings[None], img)
            ctx, add_time = proj(image_embeddings=img, prompt_embeds=text,
                                 text_encoder_hidden_states=hidden,
                                 do_classifier_free_guidance=False)
            mask = F.pad(mask, (n_tok, 0), value=True)
            x0 = resize(b["image"], size, -1.0, 1.0).clamp(-1, 1)
            t, noise, x_t, _ = noised(x0)
            out = unet_out(unet(unet_in(x_t), t, encoder_hidden_states=ctx,
                                class_labels=add_time, attention_mask=mask).sample)
            target = noise if prediction == "eps" else x0
            # the mean channels' MSE + a small term on the variance channels (ours: the
            # hybrid loss, whose VLB term is elementwise work on the same outputs)
            return F.mse_loss(out[:, :3], target) + 1e-3 * out[:, 3:].square().mean()
        return (TorchStep([unet, proj], loss_fn, config), _n_params_torch([unet, proj]),
                "diffusers UNet2DConditionModel + UnCLIPTextProjModel; MSE of the mean channels "
                "to the x0/eps target + 1e-3 x the variance channels' mean square in place of "
                "the hybrid (VLB) loss; frozen transformers CLIP in the step"
                + (f"; pixel_unshuffle({p}) / pixel_shuffle around the UNet" if p > 1 else "")
                + ("; coordinate channels" if u.coord_input else ""))

    if name == "upsampler":
        unet = _torch_upsampler(u)
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        crop = stage.crop
        gamma = float(config.loss.get("min_snr_gamma", 0.0))
        prediction = stage.diffusion.config.prediction

        def loss_fn():
            x0 = resize(b["hr"], crop, -1.0, 1.0)
            lr = resize(b["lr"], b["lr"].shape[1], -1.0, 1.0)
            low = F.interpolate(lr, size=(crop, crop), mode="bicubic", antialias=True,
                                align_corners=False)
            t, noise, x_t, a = noised(x0)
            out = unet_out(unet(unet_in(torch.cat([x_t, low], 1)), t).sample)
            if prediction == "v":
                target = a.sqrt() * noise - (1 - a).sqrt() * x0
            else:
                target = noise if prediction == "eps" else x0
            w = torch.ones_like(a)
            if gamma:
                snr = a / (1 - a)
                w = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
            return (w * (out - target).square()).mean()
        return (TorchStep([unet], loss_fn, config), _n_params_torch([unet]),
                "diffusers UNet2DModel, the v / eps MSE with min-SNR weights"
                + (f"; pixel_unshuffle({p}) / pixel_shuffle around the UNet" if p > 1 else ""))
    raise ValueError(name)


def _n_params_torch(modules) -> int:
    return int(sum(p.numel() for m in modules for p in m.parameters()))
