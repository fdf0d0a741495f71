"""Diffusion core: schedules, Gaussian diffusion math and the one jitted lax.scan sampler."""
from unclip_jax.diffusion.gaussian import DiffusionConfig, GaussianDiffusion, loss_options
from unclip_jax.diffusion.sampler import (
    Sampler, SamplingConfig, StageSampling, StepPlan, StepRule, build_inversion_plan, build_plan,
    sample_loop)
from unclip_jax.diffusion.schedule import NoiseSchedule, make_betas, sampling_timesteps

__all__ = [
    "DiffusionConfig", "GaussianDiffusion", "NoiseSchedule", "Sampler", "SamplingConfig",
    "StageSampling", "StepPlan", "StepRule", "build_inversion_plan", "build_plan",
    "loss_options", "make_betas", "sample_loop", "sampling_timesteps",
]
