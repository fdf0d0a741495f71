"""Where a training step's time goes, per demo stage: model FLOPs per step, the compiled step's
steady-state time, the trainer's loop time around it (host overhead), the achieved FLOP/s next
to two references measured in the same run — XLA:CPU's best FLOP/s on the stage's dominant
conv / matmul shapes alone, and the same training step in PyTorch — as a markdown table.

    python bench/bench_stage_steps.py [--stages clip,prior,decoder,upsampler] [--steps N]

Each stage is read from `configs/<stage>.py:size=demo` at run time (shapes, patch size,
prediction, batch: whatever the config says) and trained by the real trainer
(`unclip_jax.stages.build_stage` + `unclip_jax.train.trainer.train`) for (1 + windows) x K steps
(K = ceil(steps / windows)) into a scratch directory, on the shapes data. The trainer's own
windows (its steps/s between two log steps: batches made on the host,
`make_array_from_process_local_data`, the step, a metrics fetch per window) are the *loop* time.
Between two windows, with the trainer's clock paused (its `on_log` hook), the bench times K
steps of each of, in rotating order:

  step     the trainer's compiled step `(state, batch, frozen) -> state` on a copy of its state
           (packed on one device: train/packed.py) and its last batch, block_until_ready at the
           end (no host work)
  update   the step's second half alone, as the step runs it (trainer.make_update): optimizer,
           EMA and metric norms on fixed gradients (grad = step - update)
  host     the loop's host work alone: K batches from the stage's `batches` and their device
           arrays (jax.make_array_from_process_local_data), as the trainer makes them
  torch    the same training step in PyTorch (`torch_peer`: the same network and sizes built
           from the stage's config, the same batch, AdamW + clipping + EMA; the loss may be a
           plain MSE where ours is fancier: printed per stage)
  ops      each dominant conv / matmul shape of the loss's forward jaxpr alone under jax.jit
           (`flops.jaxpr_ops`: grouped by shape, ranked by FLOPs), and a 1024^3 matmul
  matmuls  every conv / matmul shape of the gradient computation's jaxpr (forward and
           backward; --cover of its FLOPs, at most --max-ops shapes) alone, times its count
           per step, summed: the step's time if everything else were free

and with --before also the pre-fix step and update (the per-parameter state layout, as
`pack_state=False` runs) and host batches (tokenization without the token cache). Every figure
of a stage comes from these interleaved windows (loop, step, update, host, torch, ops, matmuls,
loop, ...): medians over the windows after a warm-up one; "loop - step" and "before / after"
are medians of window-by-window (adjacent in time) differences / ratios. FLOPs are the
trainer's (`_model_flops_per_device`: 3 x the loss's forward matrix products / convolutions,
frozen CLIP inside the prior's and decoder's loss counted as trained). The prior and the
decoder need a trained CLIP: the CLIP stage's run provides it (or a 2-step CLIP run when clip is
not benchmarked, or --workdir W with W/clip). torch runs with OMP_WAIT_POLICY=PASSIVE unless
set (see --omp-wait-policy). Prints the tables of docs/PERFORMANCE.md; --out appends JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("clip", "prior", "decoder", "upsampler")


def _load():
    return "%.2f %.2f %.2f" % os.getloadavg()


def _n_params(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# the PyTorch peers: the same network, batch, optimizer and EMA

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


# ---------------------------------------------------------------------------------------------
# the probe: what runs between the trainer's windows

class Probe:
    def __init__(self, stage, config, *, k: int, windows: int, top_ops: int, torch_on: bool,
                 channels_last: bool, before: bool = False, cover: float = 0.99,
                 max_ops: int = 60):
        self.before, self.cover, self.max_ops = before, cover, max_ops
        self.stage, self.config, self.k, self.windows = stage, config, k, windows
        self.top_ops, self.torch_on, self.channels_last = top_ops, torch_on, channels_last
        self.calls = 0
        self.times: dict[str, list[float]] = {}
        self.loop_ms: list[float] = []
        self.info: dict = {}

    def _setup_before(self, probe, mesh):
        """The pre-fix step, update and host batches, to time interleaved with the current ones:
        the per-parameter state layout (the trainer with pack_state=False) and tokenization
        without the token cache."""
        import jax
        import jax.numpy as jnp

        from unclip_jax.train.optim import make_optimizer
        from unclip_jax.train.sharding import get_rules
        from unclip_jax.train.trainer import make_train_step, make_update

        stage, cfg, packing = self.stage, self.config, probe.get("packing")
        if packing is None:
            return
        rules = get_rules(cfg.sharding if isinstance(cfg.sharding, str) else list(cfg.sharding))
        tx, schedule = make_optimizer(cfg.optimizer, int(cfg.total_steps),
                                      stage.trainable(probe["params"]))
        with jax.set_mesh(mesh):
            self.b_state = jax.jit(packing.unpack_state)(self.state)
            self.b_step = jax.jit(make_train_step(stage, tx, schedule, cfg, mesh, rules),
                                  donate_argnums=(0,)).lower(
                self.b_state, self.batch, self.frozen).compile()
            self.b_upd_state = jax.tree.map(jnp.copy, self.b_state)
            self.b_grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), self.b_state.params)
            self.b_update = jax.jit(make_update(tx, schedule, cfg), donate_argnums=(0,)).lower(
                self.b_upd_state, self.b_grads).compile()

    # -- set up on the first call -------------------------------------------------------------
    def _setup(self, probe):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from unclip_jax.train import flops as flops_lib
        from unclip_jax.train.sharding import make_mesh

        stage, cfg = self.stage, self.config
        self.step_fn, self.batch, self.frozen = probe["step_fn"], probe["batch"], probe["frozen"]
        self.state = jax.tree.map(jnp.copy, probe["state"])
        params = probe["params"]  # the per-parameter tree (the state may be packed)
        packing = probe.get("packing")
        self.info["step_flops"] = probe["step_flops"]
        self.info["params"] = _n_params(params)
        self.info["leaves"] = len(jax.tree.leaves(params))
        self.info["packed"] = packing is not None
        self.info["state_buffers"] = len(jax.tree.leaves(self.state))

        # the step's second half alone (trainer.make_update, as the step runs it): optimizer,
        # EMA and the metric norms on fixed gradients (grad = step - update)
        mesh = make_mesh(dict(cfg.mesh))
        with jax.set_mesh(mesh):
            self.grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), self.state.params)
            self.upd_state = jax.tree.map(jnp.copy, self.state)
            self.update_c = jax.jit(probe["update"], donate_argnums=(0,)).lower(
                self.upd_state, self.grads).compile()
        if self.before:
            self._setup_before(probe, mesh)

        # the loop's host work alone: the stage's next batch and its device arrays, as the
        # trainer makes them (from a step far from the trainer's own)
        from unclip_jax.train.sharding import batch_sharding

        self.bsh = batch_sharding(mesh)
        self.host_gen = stage.batches(batch_size=int(cfg.batch_size), seed=int(cfg.seed),
                                      start_step=100_000, process_index=0, process_count=1)

        # the forward loss's dominant ops, each alone
        loss0 = lambda p, b, f: stage.loss(p, b, jax.random.key(0), f)[0]  # noqa: E731
        ops = flops_lib.jaxpr_ops(loss0, params, self.batch, self.frozen)
        fwd = sum(o["total_flops"] for o in ops)
        self.info["fwd_flops"] = fwd
        if hasattr(stage, "conditioning") and self.frozen is not None and "image" in self.batch:
            self.info["frozen_fwd_flops"] = flops_lib.jaxpr_flops(
                lambda f, b: stage.conditioning(f, b), self.frozen, self.batch)
        self.ops = []
        rng = np.random.default_rng(0)
        for o in ops[:self.top_ops]:
            a = jnp.asarray(rng.standard_normal(o["lhs"].shape), o["lhs"].dtype)
            w = jnp.asarray(rng.standard_normal(o["rhs"].shape), o["rhs"].dtype)
            prim, prm = o["bind"], o["params"]
            fn = jax.jit(lambda x, y, prim=prim, prm=prm: prim.bind(x, y, **prm))
            self.ops.append(dict(name=_op_name(o), flops=o["flops"],
                                 share=o["total_flops"] / fwd if fwd else 0.0,
                                 count=o["count"], fn=fn, args=(a, w)))
        big = jnp.asarray(rng.standard_normal((1024, 1024)), jnp.float32)
        self.ops.append(dict(name="matmul 1024x1024 @ 1024x1024 (peak reference)",
                             flops=2.0 * 1024 ** 3, share=None, count=None,
                             fn=jax.jit(lambda x, y: x @ y), args=(big, big)))
        for op in self.ops:  # compile, warm up, and pick repetitions filling ~0.1 s
            op["reps"] = _reps(op["fn"], op["args"], 0.1, 3)

        # every matrix product / convolution of the step's gradient computation (forward and
        # backward, frozen CLIP forward only: the jaxpr of value_and_grad(loss)), each shape
        # alone: their time summed over a step is what the step would take if everything else
        # (elementwise work, norms, layout changes, the update) were free
        gfn = jax.value_and_grad(lambda p, b, f: stage.loss(p, b, jax.random.key(0), f)[0])
        gops = flops_lib.jaxpr_ops(gfn, params, self.batch, self.frozen)
        total = sum(o["total_flops"] for o in gops)
        self.gops, acc = [], 0.0
        for o in gops:
            if acc >= self.cover * total or len(self.gops) >= self.max_ops:
                break
            acc += o["total_flops"]
            args = tuple(jnp.asarray(rng.standard_normal(v.shape).astype(v.dtype))
                         for v in (o["lhs"], o["rhs"]))
            prim, prm = o["bind"], o["params"]
            fn = jax.jit(lambda x, y, prim=prim, prm=prm: prim.bind(x, y, **prm))
            self.gops.append(dict(fn=fn, args=args, count=o["count"],
                                  reps=_reps(fn, args, 0.004, 1)))
        self.info.update(grad_jaxpr_flops=total, grad_ops_covered=acc / total if total else 0.0,
                         grad_op_groups=len(self.gops), grad_op_groups_all=len(gops))

        if self.torch_on:
            host = {k: np.asarray(v) for k, v in self.batch.items()}
            try:
                self.torch_step, n_torch, what = torch_peer(stage, cfg, host,
                                                            channels_last=self.channels_last)
                self.info["torch_params"], self.info["torch_what"] = n_torch, what
                trained = stage.trainable(params)
                self.info["params_trained"] = self.info["params"] if trained is None else int(
                    sum(np.prod(p.shape) for p, t in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(trained)) if t))
            except NotImplementedError as e:
                self.torch_step = None
                self.info["torch_what"] = f"no peer: {e}"
        # warm-up of everything timed
        for name, fn in self.methods():
            fn(1)

    def methods(self):
        import jax

        k = self.k

        def looped(attr, fn, *args):  # n calls of fn on the state held in self.<attr>
            def run(n=k):
                s = getattr(self, attr)
                for _ in range(n):
                    s, _m = fn(s, *args)
                jax.block_until_ready(s)
                setattr(self, attr, s)
            return run

        step = looped("state", self.step_fn, self.batch, self.frozen)
        update = looped("upd_state", self.update_c, self.grads)

        def host(n=k):
            import numpy as np

            arrays = None
            for _ in range(n):
                hb, _skipped = next(self.host_gen)
                arrays = {key: jax.make_array_from_process_local_data(self.bsh, np.asarray(v))
                          for key, v in hb.items()}
            jax.block_until_ready(arrays)

        out = [("step", step), ("update", update), ("host", host)]
        if self.before and getattr(self, "b_step", None) is not None:
            step_before = looped("b_state", self.b_step, self.batch, self.frozen)
            update_before = looped("b_upd_state", self.b_update, self.b_grads)
            out += [("step_before", step_before), ("update_before", update_before)]
        if self.before:
            def host_before(n=k):
                import warnings

                from unclip_jax.data.tokenizer import tokenize
                from unclip_jax.stages import clip as clip_mod, conditioning, decoder

                def old_tokenize_captions(tokenizer, captions, context_length):
                    # tokenize_captions before the token cache: two tokenizer passes, no cache
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ids, mask = tokenize(tokenizer, list(captions), context_length)
                    return ids, mask.astype(bool)

                mods = (clip_mod, conditioning, decoder)
                saved = [m.tokenize_captions for m in mods]
                for m in mods:
                    m.tokenize_captions = old_tokenize_captions
                try:
                    host(n)
                finally:
                    for m, f in zip(mods, saved):
                        m.tokenize_captions = f

            out.append(("host_before", host_before))
        if self.torch_on and getattr(self, "torch_step", None) is not None:
            def torch_(n=k):
                for _ in range(n):
                    self.torch_step.step()
            out.append(("torch", torch_))
        for i, op in enumerate(self.ops):
            def run(n=None, op=op):
                r = op["reps"] if n is None or n != 1 else 1
                y = None
                for _ in range(r):
                    y = op["fn"](*op["args"])
                jax.block_until_ready(y)
            out.append((f"op{i}", run))
        out.append(("matmuls", lambda n=None: self._matmuls()))
        return out

    def _matmuls(self):
        """ms of one step's matrix products / convolutions, each shape alone, summed."""
        import jax

        total = 0.0
        for op in self.gops:
            t0 = time.perf_counter()
            y = None
            for _ in range(op["reps"]):
                y = op["fn"](*op["args"])
            jax.block_until_ready(y)
            total += (time.perf_counter() - t0) / op["reps"] * op["count"]
        return 1000.0 * total

    def on_log(self, step, metrics, probe):
        self.calls += 1
        self.loop_ms.append(1000.0 / metrics["steps_per_s"])
        if self.calls == 1:
            t0 = time.perf_counter()
            self._setup(probe)
            self.info["setup_s"] = time.perf_counter() - t0
            return
        methods = self.methods()
        r = (self.calls - 2) % len(methods)  # rotate the order window by window
        for name, fn in methods[r:] + methods[:r]:
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            n = self.ops[int(name[2:])]["reps"] if name.startswith("op") else self.k
            self.times.setdefault(name, []).append(out if name == "matmuls"
                                                   else 1000.0 * dt / n)
        self.info.setdefault("load", []).append(os.getloadavg()[0])

    # -- results -------------------------------------------------------------------------------
    def result(self) -> dict:
        med = {k: statistics.median(v) for k, v in self.times.items()}
        loop = statistics.median(self.loop_ms[1:]) if len(self.loop_ms) > 1 else float("nan")
        flops = self.info.get("step_flops") or float("nan")
        ops = []
        for i, op in enumerate(self.ops):
            ms = med.get(f"op{i}", float("nan"))
            ops.append(dict(name=op["name"], share=op["share"], count=op["count"], ms=ms,
                            gflops=op["flops"] / ms / 1e6))
        shape_ops = [o for o in ops if o["share"] is not None]
        best = max(shape_ops, key=lambda o: o["gflops"]) if shape_ops else None
        # paired figures: window i of one method against window i of another (adjacent in
        # time), robust to the machine's load drifting between windows
        step_w = self.times.get("step", [])
        loops = self.loop_ms[1:]
        host_paired = (statistics.median([a - b for a, b in zip(loops, step_w)])
                       if loops and step_w else float("nan"))
        ratios = [b / a for a, b in zip(step_w, self.times.get("step_before", []))]
        before_ratio = (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None
        return dict(
            stage=self.stage.name, batch=int(self.config.batch_size),
            gflop=flops / 1e9, step_ms=med.get("step"), loop_ms=loop,
            host_ms=host_paired, batches_ms=med.get("host"), before_ratio=before_ratio,
            matmuls_ms=med.get("matmuls"),
            grad_ms=med["step"] - med["update"] if "update" in med else None,
            update_ms=med.get("update"), torch_ms=med.get("torch"),
            achieved=flops / med["step"] / 1e6 if med.get("step") else float("nan"),
            roofline=best, peak=ops[-1] if ops else None, ops=ops, windows=len(self.loop_ms) - 1,
            k=self.k, raw=self.times, raw_loop=self.loop_ms,
            before={k: med.get(f"{k}_before") for k in ("step", "update", "host")}, **{
                k: v for k, v in self.info.items() if k != "load"},
            load=self.info.get("load", []))


def _reps(fn, args, seconds: float, least: int) -> int:
    """Compile and warm up fn(*args); the repetitions that fill about `seconds`."""
    import jax

    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return max(least, min(200, int(seconds / max(time.perf_counter() - t0, 1e-6))))


def _op_name(o) -> str:
    lhs, rhs = o["lhs"].shape, o["rhs"].shape
    if o["primitive"] == "conv_general_dilated":
        dn = o["params"]["dimension_numbers"]
        k = [rhs[i] for i in dn.rhs_spec[2:]]
        cin, cout = rhs[dn.rhs_spec[1]], rhs[dn.rhs_spec[0]]
        st = o["params"]["window_strides"]
        return (f"conv {'x'.join(map(str, k))} {cin}->{cout} on "
                f"[{', '.join(map(str, lhs))}]" + (f" stride {st[0]}" if max(st) > 1 else ""))
    (lc, rc), (lb, rb) = o["params"]["dimension_numbers"]
    return f"dot [{', '.join(map(str, lhs))}] x [{', '.join(map(str, rhs))}]" + (
        f" (batch {list(lb)})" if lb else "")


# ---------------------------------------------------------------------------------------------

def stage_config(stage: str, scratch: str, total: int, log_every: int, clip_dir: str,
                 num_examples: int):
    from unclip_jax.train.config import load_config

    over = [f"data.cache_dir={os.path.join(scratch, 'data')}",
            f"data.num_examples={num_examples}", f"total_steps={total}",
            f"log_every={log_every}", "checkpoint.every=1000000", "checkpoint.async_save=False",
            "sample_every=0"]
    if stage in ("prior", "decoder"):
        over.append(f"clip_dir={clip_dir}")
    return load_config(os.path.join(HERE, "configs", f"{stage}.py") + ":size=demo", over)


def describe(cfg) -> str:
    """The shapes that decide a stage's cost, as its config says them."""
    m = cfg.model
    if cfg.stage == "clip":
        return (f"text {m.text.hidden_size} x {m.text.num_layers}, vision {m.vision.hidden_size} x "
                f"{m.vision.num_layers} at {m.vision.image_size} px / {m.vision.patch_size}")
    if cfg.stage == "prior":
        return f"{m.num_layers} layers x {m.num_heads} x {m.head_dim}, {m.num_text_tokens} tokens"
    u = m.unet if cfg.stage == "decoder" else m
    s = (f"{tuple(u.block_out_channels)} at {u.sample_size} px, {u.layers_per_block} res/level"
         f", patch {u.get('patch_size', 1)}")
    if cfg.stage == "decoder":
        s += f", {cfg.diffusion.prediction}"
    return s


def table(results) -> str:
    h = ("| stage | batch | GFLOP/step | JAX step ms | JAX loop ms (host overhead) | "
         "achieved GFLOP/s | roofline GFLOP/s (dominant shape) | torch step ms | "
         "torch/JAX ratio |\n|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        rf = r["roofline"]
        roof = f"{rf['gflops']:.0f} ({rf['name']})" if rf else "—"
        tm = r.get("torch_ms")
        rows.append(
            f"| {r['stage']} | {r['batch']} | {r['gflop']:.2f} | {r['step_ms']:.1f} | "
            f"{r['loop_ms']:.1f} ({r['host_ms']:+.1f}) | {r['achieved']:.1f} | {roof} | "
            + (f"{tm:.1f} | {tm / r['step_ms']:.2f}x |" if tm else "— | — |"))
    return h + "\n".join(rows)


def detail(results) -> str:
    out = ["| stage | step ms | update ms (optimizer + EMA + norms, alone) | grad ms (step - "
           "update) | its convs / matmuls, each shape alone, summed ms (share of the grad "
           "jaxpr's FLOPs timed) | the rest ms (step - update - convs / matmuls) | loop - step ms "
           "(paired) | host batches ms (alone) | params (leaves) | torch params | frozen CLIP "
           "share of FLOPs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fz = r.get("frozen_fwd_flops")
        out.append(
            f"| {r['stage']} | {r['step_ms']:.1f} | {r['update_ms']:.2f} | {r['grad_ms']:.1f} | "
            f"{r['matmuls_ms']:.1f} ({r['grad_ops_covered']:.0%}) | "
            f"{r['grad_ms'] - r['matmuls_ms']:.1f} | "
            f"{r['host_ms']:+.1f} | {r['batches_ms']:.2f} | "
            f"{r['params']:,} ({r['leaves']}) | "
            + (f"{r['torch_params']:,}" if r.get("torch_params") else "—") + " | "
            + (f"{fz / r['fwd_flops']:.0%}" if fz else "—") + " |")
    out += ["", "| stage | op (forward, batch included) | share of the step's FLOPs | runs/step "
            "| ms | GFLOP/s |", "|---|---|---|---|---|---|"]
    for r in results:
        for o in r["ops"]:
            share = f"{o['share']:.0%}" if o["share"] is not None else "—"
            cnt = f"{o['count']:g}" if o["count"] is not None else "—"
            out.append(f"| {r['stage']} | {o['name']} | {share} | {cnt} | {o['ms']:.3f} | "
                       f"{o['gflops']:.0f} |")
    return "\n".join(out)


def before_after(results) -> str:
    out = ["| stage | step ms, per-parameter state (before) | step ms, packed (after) | before / "
           "after, paired windows: median (range) | update ms before | update ms after | state "
           "buffers after | host batches ms, uncached tokens (before) | host batches ms (after) |",
           "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, d=1: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in results:
        b = r.get("before") or {}
        br = r.get("before_ratio")
        out.append(f"| {r['stage']} | {f(b.get('step'))} | {f(r['step_ms'])} | "
                   + (f"{br[0]:.3f} ({br[1]:.2f}-{br[2]:.2f}) | " if br else "— | ")
                   + f"{f(b.get('update'), 2)} | {f(r['update_ms'], 2)} | {r['state_buffers']} | "
                   + f"{f(b.get('host'), 2)} | {f(r['batches_ms'], 2)} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--steps", type=int, default=30,
                    help="measured steps per method and stage (split over --windows)")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--top-ops", type=int, default=3, help="dominant op shapes timed alone")
    ap.add_argument("--cover", type=float, default=0.95,
                    help="time the gradient jaxpr's conv / matmul shapes up to this share of "
                         "its FLOPs ...")
    ap.add_argument("--max-ops", type=int, default=40, help="... and at most this many shapes")
    ap.add_argument("--num-examples", type=int, default=512, help="shapes examples rendered")
    ap.add_argument("--workdir", default="", help="a workdir holding clip/ (else trained here)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--before", action="store_true",
                    help="also time the pre-fix step / update (per-parameter state) and host "
                         "batches (no token cache), interleaved (one more compile per stage)")
    ap.add_argument("--channels-last", action="store_true", help="torch UNets channels_last")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for torch's OpenMP threads unless set ('' = leave "
                         "OpenMP's default, active spinning: on cores shared with other jobs it "
                         "made torch's 2-thread step ~20x slower)")
    ap.add_argument("--out", default="", help="append the results as JSON lines here")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"unknown stage {s!r}; expected some of {STAGES}")

    if args.omp_wait_policy:  # before torch loads OpenMP
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    import jax
    import torch

    torch.set_num_threads(2)
    from unclip_jax.stages import build_stage
    from unclip_jax.train.trainer import train

    k = max(2, math.ceil(args.steps / args.windows))
    total = k * (1 + args.windows)
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind} x {jax.device_count()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}; "
          f"{args.windows} windows of {k} steps; load {_load()}",
          flush=True)
    results = []
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_stage_steps_") as scratch:
        clip_dir = os.path.join(args.workdir, "clip") if args.workdir else \
            os.path.join(scratch, "clip")
        if not args.workdir and "clip" not in stages and {"prior", "decoder"} & set(stages):
            cfg = stage_config("clip", scratch, 2, 1, clip_dir, args.num_examples)
            train(build_stage(cfg, scratch), cfg, scratch, progress=False)
        for name in STAGES:
            if name not in stages:
                continue
            t0 = time.time()
            cfg = stage_config(name, scratch, total, k, clip_dir, args.num_examples)
            work = scratch if name == "clip" and not args.workdir else os.path.join(scratch, "w")
            stage = build_stage(cfg, work)
            probe = Probe(stage, cfg, k=k, windows=args.windows, top_ops=args.top_ops,
                          torch_on=not args.no_torch, channels_last=args.channels_last,
                          before=args.before, cover=args.cover, max_ops=args.max_ops)
            train(stage, cfg, work, progress=False, on_log=probe.on_log)
            r = probe.result()
            r["config"] = describe(cfg)
            r["seconds"] = time.time() - t0
            results.append(r)
            print(f"[{name}] {r['config']}; batch {r['batch']}: step {r['step_ms']:.1f} ms, "
                  f"loop {r['loop_ms']:.1f} ms, grad {r['grad_ms']:.1f}, update "
                  f"{r['update_ms']:.2f}, host batches {r['batches_ms']:.2f}, torch "
                  f"{r.get('torch_ms') or float('nan'):.1f} ms; "
                  f"{r['gflop']:.2f} GFLOP/step; {r['seconds']:.0f} s (probe set-up "
                  f"{r.get('setup_s', 0):.0f} s); load {_load()}",
                  flush=True)
            if r.get("torch_params"):
                ours = r.get("params")
                print(f"[{name}] params: ours {ours:,}, torch {r['torch_params']:,}"
                      + ("" if ours == r["torch_params"] else "  (DIFFERENT)"), flush=True)
            print(f"[{name}] torch: {r.get('torch_what')}", flush=True)
            print(f"[{name}] state buffers {r['state_buffers']} (packed: {r['packed']}); grad "
                  f"jaxpr {r['grad_jaxpr_flops'] / 1e9:.2f} GFLOP in {r['grad_op_groups_all']} "
                  f"conv / matmul shapes, {r['grad_op_groups']} timed "
                  f"({r['grad_ops_covered']:.0%} of its FLOPs)", flush=True)
    print(f"\nload average at the end: {_load()}; total {time.time() - t_all:.0f} s\n")
    print(table(results))
    print()
    print(detail(results))
    if args.before:
        print()
        print(before_after(results))
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({k: v for k, v in r.items()}, default=str) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
