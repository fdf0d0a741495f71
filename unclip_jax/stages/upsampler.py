"""The upsampler stage: eps MSE of a UNet that sees the corrupted low-resolution image, resized up
and concatenated on channels. Trained on random crops (the paper: 1/4 of the target area) — the
network is convolutional, so it samples at full size. Optional noise augmentation of the
low-resolution input, whose level conditions the network."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.data.sources import image_text_batches
from unclip_jax.diffusion import DiffusionConfig, GaussianDiffusion, StageSampling, loss_options
from unclip_jax.images import to_model_range
from unclip_jax.models.unet import UNet, UNetConfig, super_res_denoiser, upsample_input
from unclip_jax.stages import degrade
from unclip_jax.train.stage import Stage
from unclip_jax.workdir import StageRecord


class UpsamplerStage(Stage):
    name = "upsampler"

    def __init__(self, config, workdir=None):
        super().__init__(config)
        self.cfg = UNetConfig.from_dict(config.model.to_dict())
        self.diffusion = GaussianDiffusion(DiffusionConfig.from_dict(config.diffusion.to_dict()))
        u = config.upsample
        self.out_size, self.in_size = int(self.cfg.sample_size), int(u.low_res_size)
        if self.out_size % self.in_size:
            raise ValueError(f"upsampler output {self.out_size} is not a multiple of its input "
                             f"{self.in_size}")
        self.crop = int(u.crop_size) or self.out_size
        if self.cfg.in_channels != 2 * 3:
            raise ValueError("an upsampler UNet takes [x_t, low-res] concatenated: in_channels=6")
        if bool(u.noise_aug_max) != self.cfg.noise_level_cond:
            raise ValueError("noise augmentation (upsample.noise_aug_max > 0) and the model's "
                             "noise_level_cond must go together")
        level = int(u.get("sample_noise_level", 0))
        if not 0 <= level < max(1, int(u.noise_aug_max)):
            raise ValueError(f"upsample.sample_noise_level {level} must lie in "
                             f"[0, noise_aug_max={int(u.noise_aug_max)})")
        self._denoise = super_res_denoiser(self.cfg)
        self._loss_kw = loss_options(config.loss)

    def model(self):
        return UNet(self.cfg)

    def record(self) -> StageRecord:
        u = self.config.upsample
        s = self.config.get("sampling") or {}
        sampling = StageSampling(self.diffusion.config, 1.0, method=s.get("method", "ddpm"),
                                 eta=float(s.get("eta", 0.0)),
                                 noise_level=int(u.get("sample_noise_level", 0)))
        data = {"low_res_size": self.in_size, "degradation": str(u.degradation),
                "noise_aug_max": int(u.noise_aug_max)}
        return StageRecord("upsampler", self.cfg.to_dict(), sampling, data=data,
                           train=self.config_json())

    def init_variables(self, rng, batch):
        b = batch["hr"].shape[0]
        kw = {"noise_level": jnp.zeros((b,), jnp.int32)} if self.cfg.noise_level_cond else {}
        return self.model().init(rng, jnp.zeros((b, self.crop, self.crop, 6)),
                                 jnp.zeros((b,), jnp.int32), **kw)

    def loss(self, params, batch, rng, frozen):
        x0 = to_model_range(batch["hr"])
        lr = to_model_range(batch["lr"])
        b = x0.shape[0]
        keys = jax.random.split(rng, 5)  # timestep, noise, aug level, aug noise, dropout
        cond = {}
        aug_max = int(self.config.upsample.noise_aug_max)
        if aug_max:
            level = jax.random.randint(keys[2], (b,), 0, aug_max)
            lr = self.diffusion.q_sample(lr, level, jax.random.normal(keys[3], lr.shape))
            cond["noise_level"] = level
        cond["low_res"] = upsample_input(lr, self.crop, "bicubic")
        loss, aux = self.diffusion.training_loss(self._denoise, params, x0, cond,
                                                 keys[jnp.array([0, 1, 4])], **self._loss_kw)
        return jnp.mean(loss), {k: jnp.mean(v) for k, v in aux.items()}

    def dummy_batch(self, batch_size):
        c, lc = self.crop, self.crop * self.in_size // self.out_size
        return {"hr": np.zeros((batch_size, c, c, 3), np.uint8),
                "lr": np.zeros((batch_size, lc, lc, 3), np.uint8)}

    def batches(self, *, batch_size, seed, start_step, process_index, process_count):
        u = self.config.upsample
        factor = self.out_size // self.in_size
        step = start_step
        for raw, skipped in image_text_batches(
                self.config.data, image_size=self.out_size, batch_size=batch_size, seed=seed,
                start_step=start_step, process_index=process_index,
                process_count=process_count):
            hr, lr = [], []
            for j, img in enumerate(raw["image"]):  # one rng per global example
                row = process_index * batch_size + j
                rng = np.random.default_rng(np.random.SeedSequence([seed, step, row, 0xD6]))
                crop = degrade.random_crop(img, self.crop, rng)
                hr.append(crop)
                lr.append(degrade.low_res(crop, self.crop // factor, u.degradation, rng,
                                          tuple(u.blur_sigma)))
            step += 1
            yield {"hr": np.stack(hr), "lr": np.stack(lr)}, skipped


def make_stage(config, workdir=None):
    return UpsamplerStage(config, workdir)
