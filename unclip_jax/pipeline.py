"""Text -> image with unCLIP: CLIP text encoder -> prior -> decoder -> upsampler cascade.

Every stage samples through the one jitted `lax.scan` sampler (`unclip_jax.diffusion.Sampler`);
classifier-free guidance is one batched call on [cond, uncond]. The pipeline holds the models'
configs and params and composes them; it is built from a diffusers UnCLIPPipeline or
UnCLIPImageVariationPipeline directory (`UnCLIPPipeline.from_diffusers`, with a CLIP image tower
as `pipe.clip` for the manipulations), from a workdir of trained stages (`from_workdir`) or from
components. The upsamplers run in order, each one step of the cascade (`unclip_jax.cascade`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import cascade
from unclip_jax.cascade import UpsamplerStep
from unclip_jax.ar_sampling import ARPriorComponent
from unclip_jax.compile_cache import enable_compilation_cache
from unclip_jax.convert.diffusers_pipeline import load_components
from unclip_jax.diffusion import GaussianDiffusion, Sampler, StageSampling
from unclip_jax.diffusion.sampler import fold_in_rows, is_key_batch, random_normal
from unclip_jax.images import to_uint8
from unclip_jax.models import decoder as decoder_lib
from unclip_jax.models import prior as prior_lib
from unclip_jax.models.clip import CLIPTextModelWithProjection
from unclip_jax.models.prior import denormalize_embedding
from unclip_jax.models.unet import super_res_denoiser, upsample_input

#: the priors `generate(..., prior=...)` can sample
PRIORS = ("diffusion", "ar")
#: the decoder's guidance scale when neither the call nor the stage names one (Karlo's)
DEFAULT_DECODER_GUIDANCE = 8.0
#: the prior's guidance scale when neither the call nor the stage names one (Karlo's)
DEFAULT_PRIOR_GUIDANCE = 4.0


@dataclasses.dataclass
class Component:
    """A diffusion model of the pipeline: its config, its params and how to sample it."""

    config: Any
    params: Any
    sampling: StageSampling


def check_text(text: str, what: str = "a prompt") -> str:
    """`text` if it can be tokenised: a str that is valid Unicode (a command-line word with bytes
    that are not UTF-8 arrives as a str with surrogate escapes, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        try:  # a byte smuggled in by the file system encoding's surrogateescape
            bad = os.fsencode(text[e.start:e.end])
        except UnicodeError:
            bad = b""
        where = (f"byte {bad[:4].hex(' ')}" if bad else f"{e.reason}") + f" at character {e.start}"
        raise ValueError(f"{what} {text!r} is not valid UTF-8 text ({where})".strip()) from None
    return text


def no_prior_message(path: str) -> str:
    """The one sentence for text-to-image asked of an UnCLIPImageVariationPipeline."""
    return (f"{path} is an UnCLIPImageVariationPipeline (image variations): it has no prior to "
            f"turn text into a CLIP image embedding, so it cannot make images from text; use it "
            f"for variations, interpolate and textdiff (e.g. `unclip-jax variations --pipeline "
            f"{path} --image IMG`), or load an UnCLIPPipeline directory (e.g. karlo-v1-alpha) "
            f"for text-to-image")


def _fold(rng, data):
    """fold_in for one key, or for each key of a batch of keys (one a row)."""
    return fold_in_rows(rng, data) if is_key_batch(rng) else jax.random.fold_in(rng, data)


def _validate(prompts, steps: dict[str, int], guidance: dict[str, float], num_images: int):
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a list of strings")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    for p in prompts:
        check_text(p)
    for name, n in steps.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    for name, g in guidance.items():
        try:
            g = float(g)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number >= 1, got {g!r}") from None
        if not math.isfinite(g) or g < 1.0:
            raise ValueError(f"{name} must be a finite number >= 1 (1 = no guidance), got {g!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images!r}")
    return list(prompts)


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _with_compute(config, params, dtype: str | None, attention_impl: str | None):
    """A model config + params set to compute (and hold params) in `dtype`, with the given
    attention implementation; None leaves that part as it is. Norms, softmax and timestep
    embeddings stay float32 inside the models."""
    changes = {}
    if dtype is not None:
        changes.update(dtype=dtype, param_dtype=dtype)
    if attention_impl is not None:
        changes["attention_impl"] = None if attention_impl == "xla" else attention_impl
    if not changes:
        return config, params
    if hasattr(config, "unet"):  # DecoderConfig: the dtype lives on its UNet
        config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, **changes))
    else:
        config = dataclasses.replace(config, **changes)
    if dtype is not None:
        dt = jnp.dtype(dtype)

        def cast(path, p):  # the prior's embedding statistics stay float32 (not weights)
            stat = any(getattr(k, "key", None) in ("clip_mean", "clip_std", "clip_norm")
                       for k in path)
            floating = jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating)
            return jnp.asarray(p, dt) if floating and not stat else p
        params = jax.tree_util.tree_map_with_path(cast, params)
    return config, params


class UnCLIPPipeline:
    """unCLIP text-to-image.

    >>> pipe = UnCLIPPipeline.from_diffusers("path/to/karlo")   # a local diffusers directory
    >>> images = pipe.generate(["a red cube"], seed=0)           # uint8 [N, H, W, 3]

    `dtype="bfloat16"` computes every network in bf16 with bf16 weights (norms, softmax and the
    sampler's arithmetic stay float32): the fast path on GPUs and TPUs. `attention_impl="cudnn"`
    uses cuDNN's fused attention on NVIDIA GPUs (bf16/fp16 only).

    The upsamplers form a cascade, `pipe.upsamplers` (a list of `UpsamplerStep`): step 0 is
    `super_res_first` (with Karlo's `super_res_last` for its final timestep, or given as an
    UpsamplerStep), the steps of `more_upsamplers` (Components or UpsamplerSteps) follow in
    order; `image_size` is the last step's.
    """

    def __init__(self, tokenizer, text_encoder: tuple[Any, Any], prior: Component | None,
                 decoder: Component, super_res_first: Component | UpsamplerStep | None,
                 super_res_last: Component | None = None, *,
                 more_upsamplers: Sequence[Component | UpsamplerStep] = (),
                 prior_candidates: int = 2, progress: bool = True, dtype: str | None = None,
                 attention_impl: str | None = None, data_parallel: bool = False,
                 ar_prior: ARPriorComponent | None = None):
        if dtype is not None and dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")
        if attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_impl must be None, 'xla' or 'cudnn', got {attention_impl!r}")
        # compile once per machine (unclip_jax.compile_cache: off with
        # UNCLIP_JAX_COMPILATION_CACHE=0; a cache dir JAX already has is kept)
        enable_compilation_cache()

        def cast(stage):
            if stage is None:
                return None
            cfg, params = _with_compute(stage.config, stage.params, dtype, attention_impl)
            return Component(cfg, params, stage.sampling)

        text_encoder = _with_compute(*text_encoder, dtype, attention_impl)
        prior, decoder = cast(prior), cast(decoder)
        chain = _cascade(super_res_first, super_res_last, more_upsamplers)
        chain = [UpsamplerStep(cast(u.first), cast(u.last), u.low_res_size) for u in chain]
        cascade.check_chain(decoder.config.unet.sample_size,
                            [(f"upsampler step {j}", u.low_res_size, u.sample_size)
                             for j, u in enumerate(chain)])
        self.dtype = dtype or "float32"
        # data-parallel sampling: the batch split over this process's devices, params replicated
        self._mesh = None
        if data_parallel and jax.local_device_count() > 1:
            self._mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("batch",))
        self._replicated: dict[str, Any] = {}
        self.tokenizer = tokenizer
        self.text_config, self.text_params = text_encoder
        self.prior, self.decoder = prior, decoder
        if ar_prior is not None:  # the autoregressive prior: generate(..., prior="ar")
            cfg, params = _with_compute(ar_prior.config, ar_prior.params, dtype, attention_impl)
            ar_prior = dataclasses.replace(ar_prior, config=cfg, params=params)
        self.ar_prior = ar_prior
        self.upsamplers: list[UpsamplerStep] = chain
        self.prior_candidates = prior_candidates
        self.progress = progress
        self.context_length = min(int(self.text_config.max_position_embeddings),
                                  int(getattr(tokenizer, "model_max_length", 10 ** 9)))
        self._samplers: dict[tuple, Sampler] = {}
        # model functions are built once, so each sampler's jitted loop compiles once
        text_model = CLIPTextModelWithProjection(self.text_config)
        self._encode = jax.jit(lambda p, ids: text_model.apply({"params": p}, ids))
        # no prior (an UnCLIPImageVariationPipeline): the manipulations only; text-to-image
        # says why not (`no_prior_reason`)
        self._prior_fn = None if prior is None else prior_lib.denoiser(prior.config)
        self.no_prior_reason = "this pipeline has no prior, so it cannot make images from text"
        self.clip = None  # the CLIP image tower (embed_images), for the manipulations
        self._decoder_fn = decoder_lib.denoiser(decoder.config)
        dec_diffusion = GaussianDiffusion(decoder.sampling.diffusion)
        self._decoder_x0 = jax.jit(lambda p, x, t, c: dec_diffusion.p_mean_variance(
            self._decoder_fn(p, x, t, c), x, t, clip_x0=decoder.sampling.clip_x0)["x0"])
        # (first, last) denoisers of each cascade step; step 0's also as _sr_first_fn / _last_fn
        self._sr_fns = [(super_res_denoiser(u.first.config),
                         None if u.last is None else super_res_denoiser(u.last.config))
                        for u in chain]
        self._sr_first_fn, self._sr_last_fn = self._sr_fns[0] if chain else (None, None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_diffusers(cls, path: str, clip=None, **kw) -> "UnCLIPPipeline":
        """Load a diffusers UnCLIPPipeline or UnCLIPImageVariationPipeline directory saved on
        disk (nothing is downloaded).

        `clip`, the CLIP image tower the manipulations (`unclip_jax.manipulate`) and reranking
        need, becomes `pipe.clip`: a transformers CLIPModel or CLIPVisionModelWithProjection
        directory, an UnCLIPImageVariationPipeline directory (its image_encoder and
        feature_extractor), or a tower object with `embed_images`. An
        UnCLIPImageVariationPipeline `path` brings its own (used unless `clip` is given); it has
        no prior, so text-to-image (`generate`) refuses it while the manipulations run. A tower
        whose embedding width is not the decoder's is refused before anything is loaded.
        """
        from unclip_jax.convert.diffusers_pipeline import (VARIATION_CLASS, check_pipeline_dir,
                                                           decoder_clip_dim)
        from unclip_jax.workdir import check_image_tower_dir, load_image_tower

        enable_compilation_cache()  # before anything is read or its first programs compile
        variation = check_pipeline_dir(path)["_class_name"] == VARIATION_CLASS
        if clip is None and variation:
            clip = path
        want = None if clip is None else decoder_clip_dim(path)
        if isinstance(clip, (str, os.PathLike)):
            clip = os.fspath(clip)
            got = check_image_tower_dir(clip).embed_dim
            where = f"the CLIP image tower of {clip}"
        elif clip is not None:
            got, where = getattr(clip, "embed_dim", None), "the CLIP image tower given"
        if clip is not None and got is not None and int(got) != want:
            raise ValueError(f"{where} makes {got}-dim image embeddings, but the decoder of "
                             f"{path} takes {want}-dim CLIP image embeddings")
        c = load_components(path)
        last = c["super_res_last"]
        prior = None if c["prior"] is None else Component(*c["prior"], c["prior_sampling"])
        pipe = cls(
            c["tokenizer"], c["text_encoder"], prior,
            Component(*c["decoder"], c["decoder_sampling"]),
            Component(*c["super_res_first"], c["super_res_sampling"]),
            Component(*last, c["super_res_sampling"]) if last is not None else None, **kw)
        if prior is None:
            pipe.no_prior_reason = no_prior_message(path)
        if isinstance(clip, str):
            tower_kw = {} if kw.get("dtype") is None else dict(dtype=kw["dtype"],
                                                               param_dtype=kw["dtype"])
            if kw.get("attention_impl") not in (None, "xla"):
                tower_kw["attention_impl"] = kw["attention_impl"]
            clip = load_image_tower(clip, **tower_kw)
        pipe.clip = clip
        return pipe

    @classmethod
    def from_workdir(cls, workdir: str, *, upsampler: bool = True, **kw) -> "UnCLIPPipeline":
        """Build from stages trained here: WORKDIR/{clip,prior,decoder}/ and the upsampler
        cascade WORKDIR/upsampler, upsampler2, ... (EMA params), each sampled as its stage
        record says (`unclip_jax.workdir`); `upsampler=False`: no upsampler at all.

        The CLIP vision tower is kept as `pipe.clip` (for evaluation and image manipulations);
        a trained WORKDIR/ar_prior/ is loaded as `pipe.ar_prior` (`generate(..., prior="ar")`).
        """
        from unclip_jax.workdir import has_checkpoints, load_stack, stage_dir

        enable_compilation_cache()  # before the checkpoints' restore compiles anything
        st = load_stack(workdir, upsampler=upsampler)
        part = lambda s: Component(s.config, s.params, s.sampling)  # noqa: E731
        chain = [UpsamplerStep(part(u), None, u.record.data.get("low_res_size"))
                 for u in st.upsamplers]
        ar_dir = stage_dir(workdir, "ar_prior")
        ar = ARPriorComponent.from_stage_dir(ar_dir) if has_checkpoints(ar_dir) else None
        pipe = cls(st.tokenizer, (st.clip.text_config, st.clip.text_params), part(st.prior),
                   part(st.decoder), chain[0] if chain else None,
                   more_upsamplers=chain[1:], ar_prior=ar, **kw)
        pipe.clip = st.clip
        return pipe

    @property
    def super_res_first(self) -> Component | None:
        """The (first) network of the cascade's step 0; None without upsamplers."""
        return self.upsamplers[0].first if self.upsamplers else None

    @property
    def super_res_last(self) -> Component | None:
        """Karlo's network for the final timestep of step 0, if it has one."""
        return self.upsamplers[0].last if self.upsamplers else None

    @property
    def image_size(self) -> int:
        """The side of the images made: the last upsampler's, else the decoder's."""
        if not self.upsamplers:
            return self.decoder.config.unet.sample_size
        return self.upsamplers[-1].sample_size

    def prior_guidance_default(self, prior: str = "diffusion") -> float:
        """The prior's guidance scale when none is given: what the diffusion prior's stage
        records (`sampling.guidance` of its config), else 4 (Karlo's); the AR prior: 4."""
        g = self.prior.sampling.guidance if prior == "diffusion" and self.prior else None
        return DEFAULT_PRIOR_GUIDANCE if g is None else float(g)

    @property
    def decoder_guidance_default(self) -> float:
        """The decoder's guidance scale when none is given: what its stage records, else 8
        (Karlo's)."""
        g = self.decoder.sampling.guidance
        return DEFAULT_DECODER_GUIDANCE if g is None else float(g)

    # ------------------------------------------------------------------ pieces
    def _sampler(self, stage: str, steps: int, coefficient_dtype: str, method: str | None = None,
                 eta: float | None = None, clip: bool = True, step: int = 0,
                 spacing: str = "even") -> Sampler:
        """The stage's sampler ("super_res": that of cascade step `step`); method / eta None:
        the stage's defaults (StageSampling)."""
        sampling = (self.upsamplers[step].sampling if stage == "super_res"
                    else {"prior": self.prior, "decoder": self.decoder}[stage].sampling)
        key = (stage, step, steps, coefficient_dtype, method, eta, clip, spacing)
        if key not in self._samplers:
            if stage == "super_res":
                last_t = int(Sampler.for_stage(None, sampling, steps).timesteps[-1])
                fn, label = self._super_res_fn(step, last_t), cascade.step_name(step)
            else:
                fn, label = {"prior": self._prior_fn, "decoder": self._decoder_fn}[stage], stage
            self._samplers[key] = Sampler.for_stage(
                fn, sampling, steps, method=method, eta=eta, clip=clip,
                coefficient_dtype=coefficient_dtype, progress=label if self.progress else False,
                spacing=spacing)
        return self._samplers[key]

    def _run(self, name: str, sampler: Sampler, params, x, cond, uncond=None, **kw):
        """Call a stage's sampler; with data_parallel (and a batch that splits evenly) the
        latents and the conditioning are sharded over the local devices along the batch and the
        params replicated, so the one jitted loop runs data-parallel."""
        mesh = self._mesh
        if mesh is None or x.shape[0] % mesh.size:
            return sampler(params, x, cond, uncond, **kw)
        from jax.sharding import NamedSharding, PartitionSpec as P

        if name not in self._replicated:
            self._replicated[name] = jax.device_put(params, NamedSharding(mesh, P()))
        rows = NamedSharding(mesh, P("batch"))
        put = lambda t: None if t is None else jax.device_put(t, rows)  # noqa: E731
        if kw.get("noise") is not None:
            kw["noise"] = jax.device_put(kw["noise"], NamedSharding(mesh, P(None, "batch")))
        if kw.get("rng") is not None:
            kw["rng"] = jax.device_put(kw["rng"], NamedSharding(mesh, P()))
        return sampler(self._replicated[name], put(x), put(cond), put(uncond), **kw)

    def _super_res_fn(self, step: int, last_t: int):
        first, last = self._sr_fns[step]
        if last is None:
            return lambda params, x, t, c: first(params["first"], x, t, c)

        def fn(params, x, t, c):
            # diffusers/Karlo: super_res_last takes the final step, super_res_first the others
            return jax.lax.cond(t[0] == last_t, lambda: last(params["last"], x, t, c),
                                lambda: first(params["first"], x, t, c))
        return fn

    def encode_text(self, prompts: Sequence[str]):
        """Tokenise and encode -> dict(text_embed [B, E], text_hidden [B, L, D], text_mask [B, L]).

        Prompts longer than the context are truncated with one warning. The text encoder sees the
        causal mask only (as CLIP was trained and as Karlo calls it); the padding mask is returned
        for the prior and the decoder.
        """
        from unclip_jax.data.tokenizer import tokenize

        ids, mask = tokenize(self.tokenizer, list(prompts), self.context_length)
        out = self._encode(self.text_params, jnp.asarray(ids))
        return dict(text_embed=out["text_embeds"], text_hidden=out["last_hidden_state"],
                    text_mask=jnp.asarray(mask, bool))

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: str | Sequence[str], *, seed: int = 0, prior_steps: int = 25,
                 decoder_steps: int = 25, super_res_steps: int | Sequence[int] = 7,
                 prior_guidance: float | None = None, decoder_guidance: float | None = None,
                 num_images_per_prompt: int = 1,
                 super_res_method: str | Sequence[str | None] | None = None,
                 prior: str = "diffusion", ar_temperature: float | None = None,
                 ar_top_k: int | None = None) -> np.ndarray:
        """Images for the prompts, uint8 [len(prompts) * num_images_per_prompt, H, W, 3].

        `prior_guidance` / `decoder_guidance` None: the stage's recorded default
        (`prior_guidance_default(prior)`, `decoder_guidance_default`).
        `super_res_steps`: one int for every upsampler step, or one per step (the paper: 27, 15);
        `super_res_method`: None (each step's recorded method), 'ddpm' / 'ddim' for every step,
        or one per step (None entries: the record's).
        `prior`: "diffusion" (WORKDIR/prior) or "ar" (the autoregressive prior, `pipe.ar_prior`,
        guided by `prior_guidance` too; `ar_temperature` / `ar_top_k` None: its recorded
        defaults; `prior_steps` is the diffusion prior's)."""
        out = self.generate_float(prompts, seed=seed, prior_steps=prior_steps,
                                  decoder_steps=decoder_steps, super_res_steps=super_res_steps,
                                  prior_guidance=prior_guidance,
                                  decoder_guidance=decoder_guidance,
                                  num_images_per_prompt=num_images_per_prompt,
                                  super_res_method=super_res_method, prior=prior,
                                  ar_temperature=ar_temperature, ar_top_k=ar_top_k)
        return _uint8_images(out["images"])

    def generate_batches(self, prompts: str | Sequence[str], *, num_images_per_prompt: int = 1,
                         batch_size: int = 8, seed: int = 0, prior_steps: int = 25,
                         decoder_steps: int = 25, super_res_steps: int | Sequence[int] = 7,
                         prior_guidance: float | None = None, decoder_guidance: float | None = None,
                         super_res_method: str | Sequence[str | None] | None = None,
                         prior: str = "diffusion", ar_temperature: float | None = None,
                         ar_top_k: int | None = None):
        """The images of `generate`'s request made `batch_size` at a time: yields (start, uint8
        images [b, H, W, 3]) in generate()'s order (each prompt's images together), so memory
        stays flat however many images are asked for.

        Image i of that order is drawn from its own key, `fold_in(key(seed), i)` (initial latents
        and every step's noise, per row), so the images do not depend on `batch_size`: chunked
        output equals one big batch for the same seed (up to the float rounding of batched
        matrix products). That is another draw than `generate`'s, which draws a batch at once.
        Every chunk runs at one batch size (the last is padded), so each stage compiles once.
        """
        prompts, prior_guidance, decoder_guidance = self._checked_request(
            prompts, prior_steps, decoder_steps, super_res_steps, prior_guidance,
            decoder_guidance, num_images_per_prompt, super_res_method, prior, ar_temperature,
            ar_top_k)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        total = len(prompts) * int(num_images_per_prompt)
        b = min(int(batch_size), total)
        base = jax.random.key(seed)
        kw = dict(prior_steps=prior_steps, decoder_steps=decoder_steps,
                  super_res_steps=super_res_steps, prior_guidance=prior_guidance,
                  decoder_guidance=decoder_guidance, super_res_method=super_res_method,
                  prior=prior, ar_temperature=ar_temperature, ar_top_k=ar_top_k)

        def chunks():  # a generator inside: the checks above run at the call, not at next()
            for start in range(0, total, b):
                n = min(b, total - start)
                index = np.arange(start, start + b).clip(max=start + n - 1)  # pad: the last
                rows = [prompts[i // num_images_per_prompt] for i in index]
                keys = jax.vmap(jax.random.fold_in, (None, 0))(
                    base, jnp.asarray(index, jnp.uint32))
                out = self.generate_float(rows, row_keys=keys, **kw)
                yield start, _uint8_images(np.asarray(out["images"])[:n])
        return chunks()

    def _checked_request(self, prompts, prior_steps, decoder_steps, super_res_steps,
                         prior_guidance, decoder_guidance, num_images_per_prompt,
                         super_res_method=None, prior="diffusion", ar_temperature=None,
                         ar_top_k=None):
        """(validated prompts, prior guidance, decoder guidance), the guidance scales that are
        None filled in with the stages' recorded defaults."""
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {', '.join(map(repr, PRIORS))}, got {prior!r}")
        if prior == "diffusion" and self.prior is None:
            raise ValueError(self.no_prior_reason)
        if prior == "ar":
            if self.ar_prior is None:
                raise ValueError("this pipeline has no AR prior: train one into the workdir with "
                                 "`unclip-jax train --config configs/ar_prior.py:size=... "
                                 "--workdir W`")
            self.ar_prior.options(ar_temperature, ar_top_k)
        if decoder_guidance is None:
            decoder_guidance = self.decoder_guidance_default
        if prior_guidance is None:
            prior_guidance = self.prior_guidance_default(prior)
        prompts = _validate(prompts, dict(prior_steps=prior_steps, decoder_steps=decoder_steps),
                            dict(prior_guidance=prior_guidance, decoder_guidance=decoder_guidance),
                            num_images_per_prompt)
        cascade.steps_per_step(super_res_steps, len(self.upsamplers))
        cascade.methods_per_step(super_res_method, len(self.upsamplers))
        return prompts, prior_guidance, decoder_guidance

    def generate_float(self, prompts, *, seed: int = 0, prior_steps: int = 25,
                       decoder_steps: int = 25, super_res_steps: int | Sequence[int] = 7,
                       prior_guidance: float | None = None, decoder_guidance: float | None = None,
                       num_images_per_prompt: int = 1, prior_candidates: int | None = None,
                       latents: dict | None = None, noise: dict | None = None,
                       coefficient_dtype: str = "float64", row_keys=None,
                       super_res_method: str | Sequence[str | None] | None = None,
                       prior: str = "diffusion", ar_temperature: float | None = None,
                       ar_top_k: int | None = None) -> dict[str, Any]:
        """The whole pipeline in float: returns dict(images [N, H, W, 3] in [0, 1],
        image_embeds [N, E], low_res [N, h, w, 3] in [-1, 1]).

        `latents` / `noise` (dicts keyed 'prior', 'decoder', 'super_res') replace the initial
        latents and the per-step noise that are otherwise drawn from `seed` — used to compare
        with a reference implementation step for step ('super_res': step 0's array, or a list
        with one entry per cascade step, see `sample_super_res`). `coefficient_dtype="float32"`
        reproduces diffusers' float32 scheduler arithmetic (see SamplingConfig). `row_keys`, a
        batch of keys [N] (one an image), replaces `seed`: each image then draws its latents and
        noise from its own key, whatever the batch around it (`generate_batches`).
        `super_res_steps` / `super_res_method` / `prior` / `ar_*`: as in `generate`.
        """
        prompts, prior_guidance, decoder_guidance = self._checked_request(
            prompts, prior_steps, decoder_steps, super_res_steps, prior_guidance,
            decoder_guidance, num_images_per_prompt, super_res_method, prior, ar_temperature,
            ar_top_k)
        k = self.prior_candidates if prior_candidates is None else prior_candidates
        if k < 1:
            raise ValueError(f"prior_candidates must be >= 1, got {k}")
        latents, noise = latents or {}, noise or {}
        if row_keys is None:
            rng = jax.random.key(seed)
        else:
            rng = jnp.asarray(row_keys)
            n = len(prompts) * num_images_per_prompt
            if not is_key_batch(rng) or rng.shape != (n,):
                raise ValueError(f"row_keys must be a batch of {n} keys (one an image), got "
                                 f"{getattr(rng, 'dtype', type(rng))} of shape {rng.shape}")
        keys = [_fold(rng, i) for i in range(3)]
        cond, uncond = self.text_conditioning(prompts, num_images_per_prompt)
        guided = prior_guidance > 1.0 or decoder_guidance > 1.0  # as diffusers decides
        if prior == "ar":
            image_embeds = self.sample_ar_prior(
                cond, uncond if guided else None, guidance=prior_guidance if guided else 1.0,
                rng=keys[0], candidates=k, temperature=ar_temperature, top_k=ar_top_k)
        else:
            image_embeds = self.sample_prior(
                cond, uncond if guided else None, steps=prior_steps,
                guidance=prior_guidance if guided else 1.0, rng=keys[0], candidates=k,
                latents=latents.get("prior"), noise=noise.get("prior"),
                coefficient_dtype=coefficient_dtype)
        low_res = self.sample_decoder(
            image_embeds, cond, uncond if guided else None, steps=decoder_steps,
            guidance=decoder_guidance if guided else 1.0, rng=keys[1],
            latents=latents.get("decoder"), noise=noise.get("decoder"),
            coefficient_dtype=coefficient_dtype)
        if not self.upsamplers:
            images = low_res * 0.5 + 0.5
        else:
            images = self.sample_super_res(low_res, steps=super_res_steps,
                                           method=super_res_method, rng=keys[2],
                                           latents=latents.get("super_res"),
                                           noise=noise.get("super_res"),
                                           coefficient_dtype=coefficient_dtype)
        return dict(images=images, image_embeds=image_embeds, low_res=low_res)

    # ------------------------------------------------------------------ the stages
    def text_conditioning(self, prompts: Sequence[str], repeats: int = 1):
        """(cond, uncond) dicts of text_embed / text_hidden / text_mask, each row repeated
        `repeats` times; uncond is the empty prompt's encoding."""
        text = self.encode_text(prompts)
        null = self.encode_text([""])
        n = len(prompts) * repeats
        cond = {k: jnp.repeat(v, repeats, axis=0) for k, v in text.items()}
        uncond = {k: jnp.broadcast_to(v, (n,) + v.shape[1:]) for k, v in null.items()}
        return cond, uncond

    def sample_prior(self, cond, uncond=None, *, steps: int = 25, guidance: float = 4.0, rng,
                     candidates: int = 1, latents=None, noise=None,
                     coefficient_dtype: str = "float64"):
        """CLIP image embeddings [N, E] for the text conditioning; with candidates k > 1 the one
        closest to the text embedding of k draws is kept (the paper)."""
        if self.prior is None:
            raise ValueError(self.no_prior_reason)
        pcfg = self.prior.config
        n = cond["text_embed"].shape[0]
        k = candidates
        sampler = self._sampler("prior", steps, coefficient_dtype)
        x = latents
        step_rng = _candidate_keys(_fold(rng, 1), k)
        if x is None:
            if is_key_batch(rng):
                x = jax.vmap(lambda r: jax.random.normal(r, (k, pcfg.out_dim)))(
                    _fold(rng, 0)).reshape(n * k, pcfg.out_dim)
            else:
                x = jax.random.normal(jax.random.fold_in(rng, 0), (n * k, pcfg.out_dim))
        elif k != 1:
            raise ValueError("explicit prior latents need prior_candidates=1")
        z = self._run("prior", sampler, self.prior.params, x, _repeat_rows(cond, k),
                      _repeat_rows(uncond, k), rng=step_rng, guidance_scale=guidance,
                      noise=noise)
        z = denormalize_embedding(z, pcfg, self.prior.params)
        return _pick_closest(z.reshape(n, k, -1), cond["text_embed"]) if k > 1 else z

    def sample_ar_prior(self, cond, uncond=None, *, guidance: float = 4.0, rng,
                        candidates: int = 1, temperature: float | None = None,
                        top_k: int | None = None, dot_quantiles=None):
        """CLIP image embeddings [N, E] from the autoregressive prior (`ARPriorComponent.sample`:
        a dot-product bucket from the recorded quantile range, codes from the KV-cached sampler,
        the codebook's decode); with candidates k > 1 the one closest to the text embedding of k
        draws is kept, as for the diffusion prior."""
        if self.ar_prior is None:
            raise ValueError("this pipeline has no AR prior (train configs/ar_prior.py into the "
                             "workdir)")
        n, k = cond["text_embed"].shape[0], candidates
        z = self.ar_prior.sample(_repeat_rows(cond, k), _repeat_rows(uncond, k),
                                 guidance=guidance, rng=_candidate_keys(rng, k),
                                 temperature=temperature, top_k=top_k,
                                 dot_quantiles=dot_quantiles)
        return _pick_closest(z.reshape(n, k, -1), cond["text_embed"]) if k > 1 else z

    def _decoder_inputs(self, image_embeds, cond, uncond, null_image: bool = False):
        dc, du = decoder_lib.guided_cond(image_embeds, cond, uncond)
        if null_image:  # conditioned on the caption alone: the learned null image embedding
            dc = dict(dc, null_image=jnp.ones_like(dc["null_image"]))
        return dc, du

    def sample_decoder(self, image_embeds, cond, uncond=None, *, steps: int = 25,
                       guidance: float | None = None, rng=None, latents=None, noise=None,
                       method: str | None = None, eta: float | None = None, clip: bool = True,
                       coefficient_dtype: str = "float64", null_image: bool = False,
                       spacing: str = "even"):
        """Decoder images [N, h, w, 3] in [-1, 1] for CLIP image embeddings (+ text).
        guidance / method / eta None: the decoder's defaults (StageSampling). `clip=False`
        samples without clipping x0 (to mirror an unclipped DDIM inversion). `null_image`:
        the conditional branch too gets the learned null image embedding (`image_embeds`
        unused): the caption alone conditions the image, GLIDE-like. `spacing`: of the
        timesteps (`schedule.sampling_timesteps`; the manipulations' DDIM takes "leading")."""
        if guidance is None:
            guidance = self.decoder_guidance_default
        dcfg = self.decoder.config.unet
        n = image_embeds.shape[0]
        sampler = self._sampler("decoder", steps, coefficient_dtype, method, eta, clip,
                                spacing=spacing)
        x = latents
        if x is None:
            x = random_normal(_fold(rng, 0), (n, dcfg.sample_size, dcfg.sample_size, 3))
        dc, du = self._decoder_inputs(image_embeds, cond, uncond, null_image)
        x = self._run("decoder", sampler, self.decoder.params, x, dc, du,
                      rng=_fold(rng, 1), guidance_scale=guidance, noise=noise)
        return jnp.clip(x, -1.0, 1.0)

    def predict_decoder_x0(self, x_t, t, image_embeds, cond):
        """The decoder's one-step estimate of the clean image from `x_t` [N, h, w, 3] at step `t`
        ([N] ints of the full process) for CLIP image embeddings (+ text), unguided, clipped as
        its sampler clips: what the network believes the image is at that noise level."""
        size = self.decoder.config.unet.sample_size
        if tuple(x_t.shape[1:3]) != (size, size):
            raise ValueError(f"the decoder works at {size}x{size}; got x_t of shape {x_t.shape}")
        dc, _ = self._decoder_inputs(image_embeds, cond, None)
        return self._decoder_x0(self.decoder.params, x_t, jnp.asarray(t), dc)

    def invert_decoder(self, images, image_embeds, cond, *, steps: int = 25,
                       spacing: str = "even"):
        """DDIM inversion of decoder-resolution images [N, h, w, 3] in [-1, 1] to their x_T,
        conditioned on their CLIP image embeddings (unguided, deterministic), over the
        timesteps `sample_decoder(..., steps=steps, spacing=spacing)` decodes them back on."""
        sampler = self._sampler("decoder", steps, "float64", "ddim", 0.0, clip=False,
                                spacing=spacing)
        dc, _ = self._decoder_inputs(image_embeds, cond, None)
        return sampler.invert(self.decoder.params, images, dc)

    def sample_super_res(self, low_res, *, steps: int | Sequence[int] = 7,
                         method: str | Sequence[str | None] | None = None, rng=None,
                         latents=None, noise=None, coefficient_dtype: str = "float64"):
        """Upsample decoder images [N, h, w, 3] in [-1, 1] through the whole cascade -> images
        [N, H, W, 3] in [0, 1]. `steps` / `method`: one for every step or one per step (method
        None: each step's record). `latents` / `noise`: None, step 0's array, or one entry per
        step. Step j draws from `cascade.step_key(rng, j)` (step 0 from `rng` itself)."""
        n = len(self.upsamplers)
        if n == 0:
            raise ValueError("this pipeline has no upsampler")
        steps = cascade.steps_per_step(steps, n, "steps")
        methods = cascade.methods_per_step(method, n, "method")
        latents = cascade.arrays_per_step(latents, n, "latents")
        noise = cascade.arrays_per_step(noise, n, "noise")
        rng = jax.random.key(0) if rng is None else rng
        x = low_res
        for j in range(n):  # the cascade's steps (each one jitted scan over its timesteps)
            x = self.sample_upsampler(j, x, steps=steps[j], method=methods[j],
                                      rng=cascade.step_key(rng, j), latents=latents[j],
                                      noise=noise[j], coefficient_dtype=coefficient_dtype)
        return jnp.clip(x * 0.5 + 0.5, 0.0, 1.0)

    def sample_upsampler(self, step: int, low_res, *, steps: int = 7, method: str | None = None,
                         rng=None, latents=None, noise=None, coefficient_dtype: str = "float64"):
        """One cascade step: images [N, h, w, 3] in [-1, 1] -> [N, H, W, 3] in [-1, 1], sampled
        as the step's record says (`method` None) or with 'ddpm' / 'ddim'. An upsampler trained
        with noise augmentation sees its input noised to the level its stage records (noise from
        fold_in(rng, 2)) and that level as conditioning."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) \
                or not 0 <= step < len(self.upsamplers):
            raise ValueError(f"step must be a cascade step, 0 to {len(self.upsamplers) - 1}, "
                             f"got {step!r}")
        up = self.upsamplers[step]
        if up.low_res_size is not None and tuple(low_res.shape[1:3]) != (up.low_res_size,) * 2:
            raise ValueError(f"upsampler step {step} takes {up.low_res_size}x{up.low_res_size} "
                             f"images, got an input of shape {tuple(low_res.shape)}")
        size = up.sample_size
        n = low_res.shape[0]
        sampler = self._sampler("super_res", steps, coefficient_dtype, method, step=step)
        x = latents
        if x is None:
            x = random_normal(_fold(rng, 0), (n, size, size, 3))
        cond = {}
        if up.noise_level_cond:
            # trained with noise augmentation: the low-res input noised to the recorded level,
            # which the network is told (Imagen's / the paper's conditioning augmentation)
            level = int(up.sampling.noise_level)
            if level:
                diffusion = GaussianDiffusion(up.sampling.diffusion)
                low_res = diffusion.q_sample(
                    low_res, jnp.full((n,), level, jnp.int32),
                    random_normal(_fold(rng, 2), low_res.shape))
            cond["noise_level"] = jnp.full((n,), level, jnp.int32)
        cond["low_res"] = upsample_input(low_res, size, "bicubic")
        x = self._run(cascade.step_name(step), sampler, up.params, x, cond,
                      rng=_fold(rng, 1), noise=noise)
        return jnp.clip(x, -1.0, 1.0)


def _cascade(first, last, more) -> list[UpsamplerStep]:
    """The upsampler steps of the constructor's arguments, in order."""
    if first is None:
        if last is not None or len(more):
            raise ValueError("super_res_last / more_upsamplers need a super_res_first (the "
                             "cascade's step 0)")
        return []
    if isinstance(first, UpsamplerStep):
        if last is not None:
            raise ValueError("super_res_first given as an UpsamplerStep holds its own last "
                             "network: pass super_res_last=None")
        steps = [first]
    else:
        steps = [UpsamplerStep(first, last)]
    return steps + [u if isinstance(u, UpsamplerStep) else UpsamplerStep(u) for u in more]


def _uint8_images(images) -> np.ndarray:
    """Float images in [0, 1] -> uint8, non-finite pixels black with one warning."""
    images = np.asarray(images)
    bad = ~np.isfinite(images)
    if bad.any():
        warnings.warn(f"{bad.any(axis=(1, 2, 3)).sum()} of {len(images)} images have "
                      "non-finite pixels (shown black): the weights overflow somewhere",
                      RuntimeWarning, stacklevel=3)
        images = np.where(bad, 0.0, images)
    return to_uint8(images)


def _repeat_rows(tree, k: int):
    """Each row of a conditioning dict repeated k times (the k candidates of a prompt); None
    stays None."""
    return None if tree is None else {key: jnp.repeat(v, k, axis=0) for key, v in tree.items()}


def _candidate_keys(rng, k: int):
    """For a batch of row keys [n] and k > 1 candidates: [n * k] keys, fold_in(row key, c) for
    candidate c (each candidate its own draw); one key, or k = 1, is returned as it is."""
    if not is_key_batch(rng) or k == 1:
        return rng
    return jax.vmap(lambda r: jax.vmap(lambda c: jax.random.fold_in(r, c))(
        jnp.arange(k)))(rng).reshape(-1)


def _pick_closest(candidates, text_embed):
    """[N, k, E] candidates -> [N, E]: the one with the highest cosine similarity to the text
    embedding (the paper draws 2 and keeps the higher dot product)."""
    c = candidates / jnp.linalg.norm(candidates, axis=-1, keepdims=True)
    t = text_embed / jnp.linalg.norm(text_embed, axis=-1, keepdims=True)
    best = jnp.argmax(jnp.einsum("nke,ne->nk", c, t), axis=1)
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]
