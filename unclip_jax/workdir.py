"""A trained stage on disk, and a whole trained stack: one record, one reader, one writer.

A workdir holds one directory a stage, ``WORKDIR/{clip,prior,decoder,upsampler}/``, each with
``config.json`` (the :class:`StageRecord`) and ``checkpoints/<step>/`` (Orbax); the upsampler
cascade continues in ``WORKDIR/upsampler2/``, ``upsampler3/``, ... (sampled in that order). The
trainer writes the record (``StageRecord.write``); everything that loads a stage reads it here:
the typed model config, the diffusion it was trained with and how to sample it
(:class:`StageSampling`), the data facts sampling needs (an upsampler's input size and
noise-augmentation level) and the paths it was trained against (tokenizer, CLIP). Records
written before this layout (version 1) are read too.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import DiffusionConfig, StageSampling
from unclip_jax.images import ClipPreprocess, clip_pixels
from unclip_jax.models.clip import (
    CLIPConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection)

RECORD_FILE = "config.json"
RECORD_VERSION = 2
STAGES = ("clip", "prior", "ar_prior", "decoder", "upsampler")
PATH_KEYS = ("tokenizer", "clip_dir")
#: what `load_stage(which=...)` reads of a checkpoint's training state
PARAM_TREES = ("ema_params", "params")


class RecordError(ValueError):
    """A stage record that cannot be read, or that describes another stage."""


def _model_config_class(stage: str):
    from unclip_jax.models.ar_prior import ARPriorConfig
    from unclip_jax.models.decoder import DecoderConfig
    from unclip_jax.models.prior import PriorConfig
    from unclip_jax.models.unet import UNetConfig

    return {"clip": CLIPConfig, "prior": PriorConfig, "ar_prior": ARPriorConfig,
            "decoder": DecoderConfig, "upsampler": UNetConfig}[stage]


def absolute_path(p: str) -> str:
    """A local path made absolute (a stage then loads from any directory); URLs and '' kept."""
    return os.path.abspath(p) if isinstance(p, str) and p and "://" not in p else p


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """What a trained stage is, written beside its checkpoints.

    stage:    clip | prior | decoder | upsampler
    model:    the model config as a dict (:meth:`model_config` types it)
    sampling: how it is sampled by default (None for CLIP)
    data:     data facts sampling needs (upsampler: low_res_size, degradation, noise_aug_max)
    paths:    tokenizer / clip_dir it was trained against, absolute
    train:    the whole training config, for the record
    init_from: where the step-0 parameters came from when they were imported
              (`config.init_from`; `unclip_jax.train.init_from`): the source's absolute path,
              its kind and what was taken; {} for a random init
    """

    stage: str
    model: dict
    sampling: StageSampling | None = None
    data: dict = dataclasses.field(default_factory=dict)
    paths: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)
    version: int = RECORD_VERSION
    init_from: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise RecordError(f"unknown stage {self.stage!r}; expected one of {STAGES}")
        object.__setattr__(self, "paths", {k: absolute_path(v) for k, v in self.paths.items()})

    def model_config(self):
        """The typed model config: CLIPConfig, PriorConfig, DecoderConfig or UNetConfig."""
        return _model_config_class(self.stage).from_dict(self.model)

    def identity(self) -> dict:
        """What must match for a checkpoint to be resumed: the stage, its model and diffusion."""
        return {"stage": self.stage, "model": self.model,
                "diffusion": None if self.sampling is None else self.sampling.diffusion.to_dict()}

    # -------------------------------------------------------------------------- JSON
    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["sampling"] = None if self.sampling is None else self.sampling.to_dict()
        return d

    @classmethod
    def from_json(cls, d: Any, source: str = "the stage record") -> "StageRecord":
        """Read a record of this layout or of version 1; a clear error for anything else."""
        if not isinstance(d, dict) or "stage" not in d or "model" not in d:
            raise RecordError(f"{source} is not a stage record (expected a JSON object with "
                              f"'stage' and 'model'): retrain the stage with `unclip-jax train`, "
                              f"or point at the directory of a stage trained here")
        version = d.get("version", 1)
        try:
            if version == 1:
                return _from_v1(d)
            if version != RECORD_VERSION:
                raise RecordError(f"record version {version} is newer than this unclip_jax reads "
                                  f"({RECORD_VERSION}): upgrade unclip_jax")
            sampling = d.get("sampling")
            rec = cls(stage=d["stage"], model=dict(d["model"]),
                      sampling=None if sampling is None else StageSampling.from_dict(sampling),
                      data=dict(d.get("data") or {}), paths=dict(d.get("paths") or {}),
                      train=dict(d.get("train") or {}), version=version,
                      init_from=dict(d.get("init_from") or {}))
            rec.model_config()  # fails here, not later, when the model config is unreadable
            return rec
        except RecordError as e:
            raise RecordError(f"{source}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise RecordError(f"{source} cannot be read as a {d.get('stage')!r} stage record "
                              f"({type(e).__name__}: {e}); retrain the stage") from None

    def write(self, stage_dir: str) -> str:
        """Write (atomically) WORKDIR/<stage>/config.json; returns its path."""
        path = os.path.join(stage_dir, RECORD_FILE)
        os.makedirs(stage_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=2, sort_keys=True, default=str)
        os.replace(tmp, path)
        return path


def _from_v1(d: dict) -> StageRecord:
    """The layout of the first trainer: {stage, model: {<net>: ..., diffusion, ...}, train}."""
    stage, model, train = d["stage"], d["model"], dict(d.get("train") or {})
    paths = {k: train[k] for k in PATH_KEYS if train.get(k)}
    if stage == "clip":
        return StageRecord("clip", dict(model), None, {}, paths, train, RECORD_VERSION)
    s = dict(train.get("sampling") or {})
    net = {"prior": "prior", "decoder": "decoder", "upsampler": "unet"}[stage]
    clip_x0 = model.get("clip_x0") if stage == "prior" else 1.0
    sampling = StageSampling(DiffusionConfig.from_dict(model["diffusion"]), clip_x0,
                             method=s.get("method", "ddpm"), eta=float(s.get("eta", 0.0)),
                             guidance=s.get("guidance"),
                             noise_level=int(model.get("noise_aug_level", 0)))
    data = {}
    if stage == "upsampler":
        aug = dict(train.get("upsample") or {})
        data = {"low_res_size": model.get("low_res_size"), "degradation": model.get("degradation"),
                "noise_aug_max": int(aug.get("noise_aug_max", 0))}
    rec = StageRecord(stage, dict(model[net]), sampling, data, paths, train, RECORD_VERSION)
    rec.model_config()
    return rec


def read_record(stage_dir: str, expect: str | None = None) -> StageRecord:
    """The record of the stage in `stage_dir`; `expect` names the stage that must be there."""
    path = os.path.join(stage_dir, RECORD_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {RECORD_FILE} in {stage_dir}: is it a trained stage?")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path} is not valid JSON ({e}); retrain the stage") from None
    rec = StageRecord.from_json(d, source=path)
    if expect is not None and rec.stage != expect:
        raise RecordError(f"{path} records a {rec.stage!r} stage where a {expect!r} stage "
                          f"belongs: are the stage directories swapped?")
    return rec


# ------------------------------------------------------------------------------ checkpoints
@dataclasses.dataclass
class TrainedStage:
    """A stage read from disk: its record, its (EMA) params as host arrays, the step."""

    record: StageRecord
    params: Any
    step: int

    @property
    def config(self):
        return self.record.model_config()

    @property
    def sampling(self) -> StageSampling | None:
        return self.record.sampling


def abstract_params(record: StageRecord):
    """The shapes and dtypes (jax.ShapeDtypeStruct) of the params of the model `record`
    describes, from its model config alone (jax.eval_shape: nothing is computed)."""
    import flax.linen as nn

    cfg = record.model_config()
    if record.stage == "clip":
        from unclip_jax.models.clip import init_params

        return init_params("clip", cfg)
    if record.stage == "prior":
        from unclip_jax.models.prior import init_params

        return init_params(cfg)
    if record.stage == "ar_prior":
        from unclip_jax.models.ar_prior import abstract_boxed_params

        return nn.meta.unbox(abstract_boxed_params(cfg))
    if record.stage == "decoder":
        from unclip_jax.models.decoder import Decoder, decoder_init_inputs

        model, args, kw = Decoder(cfg), decoder_init_inputs(cfg), {}
    else:
        from unclip_jax.models.unet import UNet, init_inputs

        x, t, kw = init_inputs(cfg)
        model, args = UNet(cfg), (x, t)
    return jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.key(0), *args, **kw))["params"])


def _tree_shapes(tree) -> dict[str, tuple]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def check_params_fit(params, record: StageRecord, what: str, record_path: str) -> None:
    """Raise RecordError naming the first tensor of `params` (read from `what`) whose presence
    or shape differs from the model the record at `record_path` describes."""
    want, got = _tree_shapes(abstract_params(record)), _tree_shapes(params)
    hint = (f"the checkpoint and {record_path} describe different models: retrain the stage, "
            f"or put back the {RECORD_FILE} it was trained with")
    for name in sorted(want):
        if name not in got:
            raise RecordError(f"{what} has no tensor {name}, which the {record.stage} model of "
                              f"{record_path} has; {hint}")
        if got[name] != want[name]:
            raise RecordError(f"{what}: tensor {name} has shape {got[name]}, but the "
                              f"{record.stage} model of {record_path} needs {want[name]}; {hint}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise RecordError(f"{what} has {len(extra)} tensors the {record.stage} model of "
                          f"{record_path} does not, e.g. {extra[0]}; {hint}")


def has_checkpoints(stage_dir: str) -> bool:
    ck = os.path.join(stage_dir, "checkpoints")
    return os.path.isdir(ck) and any(n.isdigit() for n in os.listdir(ck))


def load_stage(stage_dir: str, *, which: str = "ema_params",
               expect: str | None = None) -> TrainedStage:
    """The newest readable checkpoint of a trained stage; `which` is "ema_params" (what sampling
    uses) or "params". An unreadable newest checkpoint falls back to an older one, saying so.
    Params that do not fit the model the stage record describes (another architecture's
    config.json) are refused, naming the tensor."""
    import orbax.checkpoint as ocp

    if which not in PARAM_TREES:
        raise ValueError(f"which must be one of {', '.join(map(repr, PARAM_TREES))} (the "
                         f"parameter trees a checkpoint holds), got {which!r}")
    if expect is not None and expect not in STAGES:
        raise ValueError(f"expect must be a stage name, one of {', '.join(STAGES)}; "
                         f"got {expect!r}")
    record = read_record(stage_dir, expect)
    if "://" not in stage_dir:  # Orbax wants absolute local paths
        stage_dir = os.path.abspath(stage_dir)
    ckdir = os.path.join(stage_dir, "checkpoints")
    if not has_checkpoints(stage_dir):
        raise FileNotFoundError(f"{stage_dir} has no checkpoints yet")
    absl = logging.getLogger("absl")  # Orbax says at WARNING that a read-only manager is
    level = absl.level                 # read-only, once a line per load: not news to a reader
    absl.setLevel(logging.ERROR)
    try:
        mgr = ocp.CheckpointManager(ckdir, item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    finally:
        absl.setLevel(level)
    try:
        steps = sorted(mgr.all_steps(), reverse=True)
        last_err = None
        for step in steps:
            try:
                out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
            except Exception as e:  # noqa: BLE001 -- a partial write surfaces as many types
                print(f"warning: checkpoint at step {step} of {stage_dir} is unreadable "
                      f"({type(e).__name__}); trying an older one", flush=True)
                last_err = e
                continue
            if step != steps[0]:
                print(f"warning: loaded step {step} of {stage_dir}, not its newest ({steps[0]})",
                      flush=True)
            state = out["state"]
            tree = state[which] if isinstance(state, dict) else getattr(state, which)
            tree = jax.tree.map(np.asarray, tree)
            check_params_fit(tree, record, f"the checkpoint at step {step} of {stage_dir}",
                             os.path.join(stage_dir, RECORD_FILE))
            return TrainedStage(record, tree, int(step))
        raise FileNotFoundError(f"no readable checkpoint in {stage_dir}: {last_err}")
    finally:
        mgr.close()


# ------------------------------------------------------------------------------ frozen CLIP
@dataclasses.dataclass
class CLIPImageTower:
    """A CLIP vision tower with its projection and its preprocessing: uint8 images -> CLIP image
    embeddings. The image half of a `FrozenCLIP`, and on its own the `pipe.clip` of an imported
    pipeline (`load_image_tower`: a transformers CLIPModel / CLIPVisionModelWithProjection or a
    diffusers UnCLIPImageVariationPipeline's image encoder)."""

    config: CLIPVisionConfig          # with its projection_dim
    params: Any                       # {"vision_model", "visual_projection"}
    preprocess: ClipPreprocess
    source: str = ""

    def __post_init__(self):
        out = self.preprocess.output_shape()
        size = int(self.config.image_size)
        if out != (size, size):
            made = "images of the input's shape" if out is None else f"{out[0]}x{out[1]} pixels"
            raise ValueError(f"the CLIP preprocessing of {self.source or 'this tower'} makes "
                             f"{made}, but its vision tower takes {size}x{size}")

    @property
    def embed_dim(self) -> int:
        return int(self.config.projection_dim)

    def encode_image(self, vision_params, pixels):
        """CLIP's normalised pixels [B, S, S, 3] -> image embeddings [B, E] (unnormalised)."""
        out = CLIPVisionModelWithProjection(self.config).apply({"params": vision_params}, pixels)
        return out["image_embeds"]

    def encode_images_uint8(self, vision_params, images_uint8):
        """uint8 images [B, H, W, 3] (any size: preprocessed as `preprocess` says, on device)
        -> embeddings [B, E]."""
        return self.encode_image(vision_params, clip_pixels(images_uint8, self.preprocess))

    @functools.cached_property
    def _jitted_image_encoder(self):
        return jax.jit(self.encode_images_uint8)

    def embed_images(self, images_uint8, batch: int = 256) -> np.ndarray:
        """Host convenience: uint8 images [N, H, W, 3] -> float32 embeddings [N, E], jitted once
        (a shape), in chunks of `batch`."""
        images_uint8 = np.asarray(images_uint8)
        out = [np.asarray(self._jitted_image_encoder(self.params,
                                                     jnp.asarray(images_uint8[i:i + batch])))
               for i in range(0, len(images_uint8), batch)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)


@dataclasses.dataclass
class FrozenCLIP:
    """A trained CLIP split into its towers: configs, params and the tokenizer's location; its
    image half is `image_tower` (a `CLIPImageTower`)."""

    config: CLIPConfig
    text_params: Any
    vision_params: Any
    tokenizer_path: str | None
    source: str = ""
    #: how images become its pixels; None: `ClipPreprocess.for_size(image_size)` (a CLIP
    #: trained here); a transformers CLIP directory's preprocessor_config.json otherwise
    preprocess: ClipPreprocess | None = None

    @property
    def text_config(self):
        return self.config.text.replace(projection_dim=self.config.projection_dim)

    @property
    def vision_config(self):
        return self.config.vision.replace(projection_dim=self.config.projection_dim)

    @property
    def context_length(self) -> int:
        return int(self.config.text.max_position_embeddings)

    @property
    def embed_dim(self) -> int:
        return int(self.config.projection_dim)

    @functools.cached_property
    def image_tower(self) -> CLIPImageTower:
        pre = self.preprocess or ClipPreprocess.for_size(self.vision_config.image_size)
        return CLIPImageTower(self.vision_config, self.vision_params, pre, self.source)

    def encode_text(self, text_params, input_ids):
        """-> (text_embeds [B, E] unnormalised, last_hidden_state [B, L, D]); causal mask only."""
        out = CLIPTextModelWithProjection(self.text_config).apply({"params": text_params},
                                                                  input_ids)
        return out["text_embeds"], out["last_hidden_state"]

    def encode_image(self, vision_params, pixels):
        """CLIP's normalised pixels [B, S, S, 3] -> image embeddings [B, E] (unnormalised)."""
        return self.image_tower.encode_image(vision_params, pixels)

    def encode_images_uint8(self, vision_params, images_uint8):
        """uint8 images [B, H, W, 3] (any size: preprocessed as CLIP's pixels) -> [B, E]."""
        return self.image_tower.encode_images_uint8(vision_params, images_uint8)

    def embed_images(self, images_uint8, batch: int = 256) -> np.ndarray:
        """Host convenience: uint8 images [N, H, W, 3] -> float32 embeddings [N, E], jitted once,
        in chunks of `batch`."""
        return self.image_tower.embed_images(images_uint8, batch)

    def boxed_abstract(self):
        """Boxed abstract params {'text', 'vision'} (logical names for sharding)."""
        t, v = self.text_config, self.vision_config
        bt = jax.eval_shape(CLIPTextModelWithProjection(t).init, jax.random.key(0),
                            jnp.zeros((1, t.max_position_embeddings), jnp.int32))["params"]
        bv = jax.eval_shape(CLIPVisionModelWithProjection(v).init, jax.random.key(0),
                            jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32))["params"]
        return {"text": bt, "vision": bv}

    def description(self) -> dict:
        """What identifies this CLIP (recorded with embeddings made by it)."""
        return {"config": self.config.to_dict(), "source": self.source}


PREPROCESSOR_FILE = "preprocessor_config.json"


def read_preprocess(directory: str) -> ClipPreprocess | None:
    """The CLIPImageProcessor steps of `directory`'s preprocessor_config.json, None without
    one."""
    path = os.path.join(directory, PREPROCESSOR_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CLIPImageProcessor config (a JSON object)")
    return ClipPreprocess.from_processor_config(d, path)


#: what `--clip` / `from_diffusers(clip=...)` take
IMAGE_TOWER_KINDS = ("a transformers CLIP (CLIPModel or CLIPVisionModelWithProjection) or an "
                     "UnCLIPImageVariationPipeline directory")


@dataclasses.dataclass(frozen=True)
class ImageTowerDirs:
    """Where an image tower's weights and preprocessing live, read from its configs alone."""

    path: str
    model_dir: str        # config.json + weights of the vision tower (or a whole CLIPModel)
    processor_dir: str    # where a preprocessor_config.json may be
    embed_dim: int        # its projection_dim


def check_image_tower_dir(path: str) -> ImageTowerDirs:
    """What `load_image_tower` would read, from the configs alone (nothing is loaded): a clear
    error for anything that is not a CLIP image tower with a projection."""
    from unclip_jax.convert.diffusers_pipeline import VARIATION_CLASS, check_pipeline_dir
    from unclip_jax.convert.hf_clip import clip_config_from_hf, hf_kind

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory: give {IMAGE_TOWER_KINDS}")
    if os.path.exists(os.path.join(path, "model_index.json")):
        info = check_pipeline_dir(path)
        if info.get("_class_name") != VARIATION_CLASS:
            raise ValueError(f"{path} holds a diffusers {info.get('_class_name')}, which has no "
                             f"CLIP image encoder: give {IMAGE_TOWER_KINDS}")
        model_dir = os.path.join(path, "image_encoder")
        processor_dir = os.path.join(path, "feature_extractor")
    else:
        model_dir = processor_dir = path
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} has no {os.path.relpath(cfg_path, path)}: give "
                                f"{IMAGE_TOWER_KINDS}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        kind = hf_kind(cfg)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path} is not a transformers CLIP config ({e})") from None
    if kind == "text":
        raise ValueError(f"{cfg_path} is a CLIP text model, not an image tower: give "
                         f"{IMAGE_TOWER_KINDS}")
    archs = cfg.get("architectures") or ()
    if kind == "vision" and archs and "CLIPVisionModelWithProjection" not in archs:
        raise ValueError(f"{cfg_path} is a {archs[0]} without the visual projection that makes "
                         f"CLIP image embeddings: give {IMAGE_TOWER_KINDS}")
    dim = clip_config_from_hf(cfg, kind="vision").projection_dim
    return ImageTowerDirs(path, model_dir, processor_dir, int(dim))


def load_image_tower(path: str, **overrides) -> CLIPImageTower:
    """The CLIP image tower of a transformers CLIPModel or CLIPVisionModelWithProjection
    directory (save_pretrained), or of a diffusers UnCLIPImageVariationPipeline directory (its
    image_encoder and feature_extractor), preprocessing as its preprocessor_config.json says
    (transformers' CLIPImageProcessor defaults at the tower's image size without one).
    `overrides` (dtype, param_dtype, attention_impl) go to the tower's config."""
    from unclip_jax.convert.hf_clip import load_hf_clip

    dirs = check_image_tower_dir(path)
    _, config, params = load_hf_clip(dirs.model_dir, kind="vision", **overrides)
    if config.projection_dim is None:
        raise ValueError(f"{dirs.model_dir} holds no visual_projection (a CLIPVisionModel): "
                         f"give {IMAGE_TOWER_KINDS}")
    size = int(config.image_size)
    pre = read_preprocess(dirs.processor_dir) or ClipPreprocess(size=size, crop=(size, size))
    return CLIPImageTower(config, params, pre, source=absolute_path(path))


def load_frozen_clip(path: str) -> FrozenCLIP:
    """A CLIP from our CLIP stage's directory (its EMA params) or a transformers CLIPModel dir."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no CLIP at {path}: train it first with "
                                f"`unclip-jax train --config configs/clip.py ...`")
    if os.path.exists(os.path.join(path, RECORD_FILE)) and has_checkpoints(path):
        st = load_stage(path, expect="clip")
        config, params = st.config, st.params
        tok = st.record.paths.get("tokenizer") or None
        preprocess = None
    else:
        from unclip_jax.convert.hf_clip import load_hf_clip

        _, config, params = load_hf_clip(path, kind="clip")
        tok = path if os.path.exists(os.path.join(path, "tokenizer_config.json")) else None
        preprocess = read_preprocess(path)
    text = {"text_model": params["text_model"], "text_projection": params["text_projection"]}
    vision = {"vision_model": params["vision_model"],
              "visual_projection": params["visual_projection"]}
    return FrozenCLIP(config, text, vision, tok, source=absolute_path(path),
                      preprocess=preprocess)


# ------------------------------------------------------------------------------ a whole stack
@dataclasses.dataclass
class Stack:
    """Every stage of a workdir, loaded: the tokenizer, CLIP, prior, decoder and the upsampler
    cascade (`upsamplers`, in sampling order; `upsampler` is the first)."""

    tokenizer: Any
    clip: FrozenCLIP
    prior: TrainedStage
    decoder: TrainedStage
    upsamplers: list[TrainedStage] = dataclasses.field(default_factory=list)

    @property
    def upsampler(self) -> TrainedStage | None:
        return self.upsamplers[0] if self.upsamplers else None


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def upsampler_dir_name(j: int) -> str:
    """The directory of cascade step j under a workdir: upsampler, upsampler2, upsampler3, ..."""
    return "upsampler" if j == 0 else f"upsampler{j + 1}"


def upsampler_chain(workdir: str) -> list[str]:
    """The upsampler directories of a workdir in cascade order: upsampler, then upsampler2,
    upsampler3, ... while they exist. A later one past a missing one is refused (it would be
    silently left out)."""
    names = [upsampler_dir_name(0)]
    while os.path.isdir(stage_dir(workdir, upsampler_dir_name(len(names)))):
        names.append(upsampler_dir_name(len(names)))
    try:
        entries = os.listdir(workdir)
    except OSError:
        entries = []
    stray = sorted(int(m.group(1)) for m in map(re.compile(r"upsampler([1-9][0-9]*)").fullmatch,
                                                entries)
                   if m and int(m.group(1)) > len(names) and os.path.isdir(
                       stage_dir(workdir, m.group(0))))
    if stray:
        missing = upsampler_dir_name(len(names))
        raise RecordError(f"{workdir} has upsampler{stray[0]}/ but no {missing}/: the cascade "
                          f"runs upsampler, upsampler2, upsampler3, ... in order; train "
                          f"{missing} (--config.stage_dir={missing}) or rename the directories")
    return names


def _train_hint(workdir: str, name: str, stage: str) -> str:
    where = "" if name == stage else f" --config.stage_dir={name}"
    return (f"`unclip-jax train --config configs/{stage}.py:size=...{where} "
            f"--workdir {workdir}`")


def load_stack(workdir: str, *, upsampler: bool = True) -> Stack:
    """Load WORKDIR/{clip,prior,decoder}/ and, with `upsampler`, the cascade WORKDIR/upsampler,
    upsampler2, ... (EMA params); a missing stage is named with the command that trains it.
    Every stage's record and the tokenizer are read first, so a swapped, garbled or missing one,
    or an upsampler chain whose sizes do not follow on, fails before any checkpoint is read or
    anything compiled."""
    from unclip_jax.cascade import check_chain
    from unclip_jax.data.tokenizer import load_tokenizer

    def need(name, stage=None):
        d = stage_dir(workdir, name)
        if not has_checkpoints(d):
            raise FileNotFoundError(f"{workdir} has no trained {name} stage: train it with "
                                    f"{_train_hint(workdir, name, stage or name)}")
        return d

    records = {s: read_record(need(s), expect=s) for s in ("clip", "prior", "decoder")}
    ups = upsampler_chain(workdir) if upsampler else []
    up_records = [read_record(need(u, "upsampler"), expect="upsampler") for u in ups]
    check_chain(records["decoder"].model_config().unet.sample_size,
                [(f"{workdir}/{u}", r.data.get("low_res_size"), r.model_config().sample_size)
                 for u, r in zip(ups, up_records)], error=RecordError)
    tok_path = records["clip"].paths.get("tokenizer")
    if not tok_path:
        raise RecordError(f"the CLIP stage in {workdir} records no tokenizer")
    tokenizer = load_tokenizer(tok_path)
    clip = load_frozen_clip(need("clip"))
    prior = load_stage(need("prior"), expect="prior")
    decoder = load_stage(need("decoder"), expect="decoder")
    chain = [load_stage(need(u, "upsampler"), expect="upsampler") for u in ups]
    return Stack(tokenizer, clip, prior, decoder, chain)
