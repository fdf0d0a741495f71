"""`config.init_from`: a stage's step-0 parameters imported from released or trained weights.

    unclip-jax train --config configs/prior.py:size=karlo --config.init_from=/path/karlo ...

SOURCE is a local directory ("" = random init), one of:

* a **diffusers UnCLIPPipeline** directory (e.g. kakaobrain/karlo-v1-alpha saved with
  `save_pretrained`): the prior stage takes `prior/` (its clip_mean / clip_std with it), the
  decoder stage `decoder/` with `text_proj/`, the upsampler stage `super_res_first/`.
  `DIR:COMPONENT` picks another component the stage can take — `DIR:super_res_last`, the
  pipeline's last super-resolution UNet (Karlo's 256 px final step) — and a component's own folder
  (`DIR/super_res_last`) says the same;
* a **transformers CLIP** directory (CLIPModel, `save_pretrained`): the clip stage (which also
  tokenises with the tokenizer saved there, unless `config.tokenizer` is given);
* a **stage trained here**: a stage directory (its `config.json` + `checkpoints/`; the newest
  checkpoint's EMA parameters) of the same kind of stage, or a workdir, whose stage of the same
  directory name is taken (`W:upsampler2` takes `W/upsampler2`). An AR prior takes its source's
  `codebook.npz` too.

The trainer (`train.trainer.train`) reads and checks the source before anything is written into
the stage directory: every tensor of the config's model must be in the source with its shape,
and nothing else (an `InitFromError` names the tensor and both shapes, or the missing / extra
tensor). The imported parameters are the step-0 parameters exactly (cast to the model's
param dtype) and the EMA; the optimizer state starts fresh; `Stage.post_init` (data statistics)
is not run, so statistics come from the source (the prior's clip_mean / clip_std). The stage
record (`config.json`, `StageRecord.init_from`) keeps what was taken. A resumed run restores its
checkpoint and never reads the source again.

One mechanism for every stage: `resolve` finds what a SOURCE is, `load` reads it through the
converters (`unclip_jax.convert`) or `workdir.load_stage`, `check_fit` compares it with the
config's model; the per-stage differences are the table `IMPORTS`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import numpy as np
from flax import traverse_util

from unclip_jax.workdir import RECORD_FILE, has_checkpoints

PIPELINE, TRANSFORMERS, STAGE = "diffusers_pipeline", "transformers_clip", "stage"
KIND_NAMES = {PIPELINE: "diffusers UnCLIPPipeline", TRANSFORMERS: "transformers CLIP",
              STAGE: "stage directory"}
#: what a stage directory source gives (the trained stage's EMA parameters, as sampling uses)
STAGE_PARAMS = "ema_params"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class InitFromError(ValueError):
    """config.init_from names no source this stage can take, or one that does not fit it."""


# ------------------------------------------------------------------------------ the table
def _pipeline_prior(root: str, component: str):
    from unclip_jax.convert.diffusers_prior import load_diffusers_prior

    sched = os.path.join(root, "prior_scheduler")
    cfg, params = load_diffusers_prior(os.path.join(root, component),
                                       sched if os.path.isdir(sched) else None)
    return cfg.to_dict(), params, [f"{component} (with its clip_mean / clip_std)"]


def _pipeline_decoder(root: str, component: str):
    from unclip_jax.convert.diffusers_unet import load_diffusers_decoder

    cfg, params = load_diffusers_decoder(os.path.join(root, component),
                                         os.path.join(root, "text_proj"))
    return cfg.to_dict(), params, [component, "text_proj"]


def _pipeline_unet(root: str, component: str):
    from unclip_jax.convert.diffusers_unet import load_diffusers_unet

    cfg, params = load_diffusers_unet(os.path.join(root, component))
    return cfg.to_dict(), params, [component]


def _transformers_clip(path: str):
    from unclip_jax.convert.hf_clip import load_hf_clip

    _, cfg, params = load_hf_clip(path, kind="clip")
    return cfg.to_dict(), params, ["CLIPModel (text and vision towers, projections, logit_scale)"]


@dataclasses.dataclass(frozen=True)
class StageImports:
    """What one stage can be initialised from (besides a stage of its own kind, which every
    stage takes): `pipeline` maps the diffusers UnCLIPPipeline components it can take to their
    loader (the first is the default), `transformers` says whether a transformers CLIP
    directory fits it, `files` are files of a source stage directory taken along."""

    pipeline: dict[str, Callable] = dataclasses.field(default_factory=dict)
    transformers: bool = False
    files: tuple[str, ...] = ()

    def kinds(self) -> list[str]:
        return ([PIPELINE] if self.pipeline else []) + ([TRANSFORMERS] if self.transformers
                                                        else []) + [STAGE]


IMPORTS: dict[str, StageImports] = {
    "clip": StageImports(transformers=True),
    "prior": StageImports(pipeline={"prior": _pipeline_prior}),
    "ar_prior": StageImports(files=("codebook.npz",)),
    "decoder": StageImports(pipeline={"decoder": _pipeline_decoder}),
    "upsampler": StageImports(pipeline={"super_res_first": _pipeline_unet,
                                        "super_res_last": _pipeline_unet}),
}


def _imports(stage: str) -> StageImports:
    if stage not in IMPORTS:
        raise InitFromError(f"config.init_from: the {stage!r} stage cannot be initialised from "
                            f"imported weights (stages that can: {', '.join(IMPORTS)})")
    return IMPORTS[stage]


def _what_fits(stage: str) -> str:
    imp, out = _imports(stage), []
    if imp.pipeline:
        comps = list(imp.pipeline)
        extra = (f"; DIR:{' / DIR:'.join(comps[1:])} for the other" if len(comps) > 1 else "")
        out.append(f"a diffusers UnCLIPPipeline directory (its {comps[0]}{extra})")
    if imp.transformers:
        out.append("a transformers CLIP directory (CLIPModel)")
    out.append(f"a {stage} stage directory trained here (config.json + checkpoints/) or a "
               f"workdir holding one")
    return ", ".join(out[:-1]) + (" or " if len(out) > 1 else "") + out[-1]


# ------------------------------------------------------------------------------ resolve
@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved SOURCE: the directory read (absolute), its kind (PIPELINE, TRANSFORMERS or
    STAGE) and, for a pipeline, the component taken."""

    spec: str
    path: str
    kind: str
    component: str = ""

    def describe(self) -> str:
        where = self.path if not self.component else f"{self.path} ({self.component})"
        return f"{KIND_NAMES[self.kind]} {where}"


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def _is_stage_dir(path: str) -> bool:
    d = _read_json(os.path.join(path, RECORD_FILE))
    return d is not None and "stage" in d and "model" in d


def _is_transformers_clip(path: str) -> bool:
    d = _read_json(os.path.join(path, "config.json"))
    if d is None or "_class_name" in d:  # diffusers models carry _class_name
        return False
    from unclip_jax.convert.hf_clip import hf_kind

    try:
        hf_kind(d)
    except ValueError:
        return False
    return True


def _split_spec(spec: str) -> tuple[str, str]:
    """"DIR" or "DIR:NAME" -> (DIR, NAME or ""); a path that exists as written is never split."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, ""
    head, _, tail = spec.rpartition(":")
    if head and _NAME.fullmatch(tail):
        return head, tail
    return spec, ""


def resolve(spec: str, stage: str, dir_name: str | None = None) -> Source:
    """What `spec` (config.init_from) names for `stage`, which trains into the directory
    `dir_name` (default the stage's name): a Source, or an InitFromError saying what fits."""
    if not isinstance(spec, str) or not spec.strip():
        raise InitFromError(f"config.init_from must be a directory (a source of weights), got "
                            f"{spec!r}")
    imp, dir_name = _imports(stage), dir_name or stage
    if "://" in spec:
        raise InitFromError(f"config.init_from {spec}: only local directories are read; copy "
                            f"the source to local disk first")
    path, selector = _split_spec(spec)
    if not os.path.exists(path):
        raise InitFromError(f"config.init_from {spec}: no such directory (give "
                            f"{_what_fits(stage)})")
    if not os.path.isdir(path):
        raise InitFromError(f"config.init_from {spec}: {path} is a file, not a directory "
                            f"(give {_what_fits(stage)})")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if (not selector and not os.path.exists(os.path.join(path, "model_index.json"))
            and os.path.exists(os.path.join(parent, "model_index.json"))
            and os.path.basename(path) in imp.pipeline):
        path, selector = parent, os.path.basename(path)  # DIR/super_res_last == DIR:super_res_last

    if os.path.exists(os.path.join(path, "model_index.json")):
        kind = PIPELINE
    elif _is_stage_dir(path):
        kind = STAGE
        if selector:
            raise InitFromError(f"config.init_from {spec}: {path} is a stage directory; a ':NAME' "
                                f"selector picks a stage of a workdir or a pipeline component")
    elif _is_transformers_clip(path):
        kind = TRANSFORMERS
        if selector:
            raise InitFromError(f"config.init_from {spec}: a transformers CLIP directory has no "
                                f"components to select")
    else:
        sub = os.path.join(path, selector or dir_name)
        if not _is_stage_dir(sub):
            what = (f"holds no stage {selector!r}" if selector else
                    f"is not a diffusers UnCLIPPipeline (no model_index.json), a transformers "
                    f"CLIP (config.json), a stage directory (config.json + checkpoints/), nor "
                    f"a workdir with a {dir_name}/ stage")
            raise InitFromError(f"config.init_from {spec}: {path} {what}; give "
                                f"{_what_fits(stage)}")
        path, kind = sub, STAGE

    if kind not in imp.kinds():
        raise InitFromError(f"config.init_from {spec}: the {stage} stage cannot be initialised "
                            f"from a {KIND_NAMES[kind]}; give {_what_fits(stage)}")
    component = ""
    if kind == PIPELINE:
        from unclip_jax.convert.diffusers_pipeline import NotAPipelineError, check_pipeline_dir

        try:
            check_pipeline_dir(path)
        except NotAPipelineError as e:
            raise InitFromError(f"config.init_from {spec}: {e}") from None
        component = selector or next(iter(imp.pipeline))
        if component not in imp.pipeline:
            raise InitFromError(f"config.init_from {spec}: the {stage} stage takes "
                                f"{' or '.join(imp.pipeline)} of a pipeline, not {component!r}")
        if not os.path.isdir(os.path.join(path, component)):
            raise InitFromError(f"config.init_from {spec}: the pipeline {path} has no "
                                f"{component}/ component")
    if kind == STAGE:
        held = (_read_json(os.path.join(path, RECORD_FILE)) or {}).get("stage")
        if held != stage:
            raise InitFromError(f"config.init_from {spec}: {path} holds a {held} stage, not a "
                                f"{stage} stage; give {_what_fits(stage)}")
    if kind == STAGE and not has_checkpoints(path):
        raise InitFromError(f"config.init_from {spec}: the stage directory {path} has no "
                            f"checkpoints yet (train it first)")
    return Source(spec, path, kind, component)


# ------------------------------------------------------------------------------ load
@dataclasses.dataclass
class Imported:
    """A source read: its parameters (host numpy arrays, our naming), its model config as a
    dict, and the record entry (what was taken)."""

    params: Any
    model: dict
    entry: dict


def load(source: Source, stage: str) -> Imported:
    """Read `source`'s parameters for `stage` (the converters check the source against its own
    config; `check_fit` then checks it against the config's model)."""
    from unclip_jax.convert.torch_io import CheckpointMismatchError

    imp = _imports(stage)
    entry: dict[str, Any] = {"spec": source.spec, "source": source.path, "kind": source.kind}
    try:
        if source.kind == PIPELINE:
            model, params, taken = imp.pipeline[source.component](source.path, source.component)
            entry["component"] = source.component
        elif source.kind == TRANSFORMERS:
            model, params, taken = _transformers_clip(source.path)
        else:
            from unclip_jax.workdir import load_stage

            st = load_stage(source.path, which=STAGE_PARAMS, expect=stage)
            model, params = dict(st.record.model), st.params
            taken = [f"{STAGE_PARAMS} of step {st.step}"] + [
                f for f in imp.files if os.path.exists(os.path.join(source.path, f))]
            entry["step"] = st.step
    except (CheckpointMismatchError, FileNotFoundError, ValueError) as e:
        raise InitFromError(f"config.init_from {source.spec}: the {KIND_NAMES[source.kind]} "
                            f"{source.path} cannot be read: {' '.join(str(e).split())}") from None
    entry["taken"] = taken
    params = _to_host(params)
    return Imported(params, model, entry)


def _to_host(tree):
    if isinstance(tree, dict):
        return {k: _to_host(v) for k, v in tree.items()}
    return np.asarray(tree)


# ------------------------------------------------------------------------------ fit
def _flat(tree) -> dict[str, Any]:
    """{'a/b': leaf} of a nested dict."""
    return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def _as_dict_tree(tree) -> dict:
    """A params tree (dicts / FrozenDicts of arrays or ShapeDtypeStructs) as plain dicts."""
    if hasattr(tree, "items"):
        return {k: _as_dict_tree(v) for k, v in tree.items()}
    return tree


def match_block_layout(params: dict, abstract: dict) -> dict:
    """Stack `blocks_0 ... blocks_{n-1}` into one `blocks` tree with a leading layer axis, or
    unstack it, wherever the model's tree (`abstract`) holds the other layout (the priors'
    `scan_layers`); anything else is returned as it is."""
    if not isinstance(params, dict) or not isinstance(abstract, dict):
        return params
    out = dict(params)
    per = sorted((k for k in params if re.fullmatch(r"blocks_\d+", k)),
                 key=lambda k: int(k.split("_")[1]))
    if "blocks" in abstract and "blocks" not in params and per:
        if [int(k.split("_")[1]) for k in per] == list(range(len(per))):
            import jax

            out = {k: v for k, v in params.items() if k not in per}
            out["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[params[k] for k in per])
    elif "blocks" in params and "blocks" not in abstract and any(
            re.fullmatch(r"blocks_\d+", k) for k in abstract):
        import jax

        n = jax.tree.leaves(params["blocks"])[0].shape[0]
        out = {k: v for k, v in params.items() if k != "blocks"}
        for i in range(n):
            out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    return {k: match_block_layout(v, abstract.get(k, {})) if isinstance(v, dict) else v
            for k, v in out.items()}


def check_fit(params: dict, abstract, what: str, model_name: str) -> dict:
    """`params` (host arrays) cast to the dtypes of `abstract` (the config's model: a tree of
    ShapeDtypeStructs), or one InitFromError naming the first tensor whose shape differs (both
    shapes), the first tensor the model has and the source lacks, and the first the source has
    and the model lacks (with how many of each)."""
    want = _flat(_as_dict_tree(abstract))
    got = _flat(params)
    shape = [n for n in sorted(want) if n in got and tuple(np.shape(got[n]))
             != tuple(want[n].shape)]
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if shape or missing or extra:
        parts = []
        if shape:
            n = shape[0]
            more = f" (and {len(shape) - 1} more tensors of other shapes)" if len(shape) > 1 else ""
            parts.append(f"tensor {n} has shape {tuple(np.shape(got[n]))} in the source but "
                         f"{tuple(want[n].shape)} in the {model_name}{more}")
        if missing:
            more = f" ({len(missing)} tensors in all)" if len(missing) > 1 else ""
            parts.append(f"the source has no tensor {missing[0]} (shape "
                         f"{tuple(want[missing[0]].shape)}), which the {model_name} has{more}")
        if extra:
            more = f" ({len(extra)} tensors in all)" if len(extra) > 1 else ""
            parts.append(f"the source has tensor {extra[0]} (shape "
                         f"{tuple(np.shape(got[extra[0]]))}), which the {model_name} has not"
                         f"{more}")
        raise InitFromError(f"{what} does not fit the {model_name}: " + "; ".join(parts)
                            + ". Make the config's model the source's (--config.model.*), or "
                              "init from a source of this model")
    return _unflat({n: np.asarray(got[n]).astype(want[n].dtype) for n in want})


#: model-config fields that change how a model is run or trained, not what it computes
_RUNTIME_FIELDS = {"dtype", "param_dtype", "attention_impl", "remat", "remat_policy",
                   "scan_layers", "dropout", "clip_x0", "logit_scale_init", "bos_token_id",
                   "pad_token_id"}


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def config_differences(source_model: dict, model: dict) -> list[str]:
    """The fields both model configs have whose values differ, runtime fields aside (fields
    that change no tensor's shape, e.g. an activation or a head size, but what is computed)."""
    a, b = _flat(source_model), _flat(model)
    return [f"{k}: {a[k]!r} in the source, {b[k]!r} in the config" for k in sorted(set(a) & set(b))
            if k.rsplit("/", 1)[-1] not in _RUNTIME_FIELDS and _norm(a[k]) != _norm(b[k])]


# ------------------------------------------------------------------------------ the trainer's calls
def import_params(spec: str, stage: str, dir_name: str, abstract_params, model: dict,
                  *, log: bool = True) -> tuple[dict, dict]:
    """Resolve, read and check `spec` for `stage` (training into `dir_name`) against the
    config's model (`abstract_params`: its ShapeDtypeStruct tree; `model`: its config dict, the
    stage record's). Returns (host params in the model's dtypes, the record entry)."""
    source = resolve(spec, stage, dir_name)
    got = load(source, stage)
    params = match_block_layout(got.params, _as_dict_tree(abstract_params))
    params = check_fit(params, abstract_params, f"config.init_from {source.describe()}",
                       f"{stage} model of this config")
    diffs = config_differences(got.model, model)
    entry = dict(got.entry, tensors=len(_flat(params)))
    if diffs:
        entry["config_differences"] = diffs
        if log:
            print(f"[{stage}] warning: init_from: the source's model config differs from this "
                  f"config's in fields that change no tensor's shape (training uses this "
                  f"config's): " + "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else ""),
                  flush=True)
    if log:
        print(f"[{stage}] step-0 parameters from {source.describe()}: "
              f"{', '.join(entry['taken'])} ({entry['tensors']} tensors)", flush=True)
    return params, entry


def place(host_params, shardings):
    """Host arrays -> global jax.Arrays with `shardings` (each process builds only the shards it
    holds, from the same host arrays)."""
    import jax

    return jax.tree.map(
        lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx, a=a: a[idx]),
        host_params, shardings)


def recorded_entry(stage_dir: str) -> dict:
    """The init_from entry of the record already in `stage_dir` ({} when none or unreadable):
    what a resumed run keeps in its record."""
    d = _read_json(os.path.join(stage_dir, RECORD_FILE))
    entry = (d or {}).get("init_from")
    return dict(entry) if isinstance(entry, dict) else {}


def source_tokenizer(spec: str, stage: str, dir_name: str, stage_dir: str | None = None) -> str:
    """The tokenizer that goes with the source's weights ('' when it names none): a
    transformers CLIP directory's own (when it holds one), a stage's recorded one. When
    `stage_dir` already holds checkpoints (a resumed run), its record's tokenizer, so the
    source is not read again."""
    if stage_dir and has_checkpoints(stage_dir):
        d = _read_json(os.path.join(stage_dir, RECORD_FILE)) or {}
        tok = (d.get("paths") or {}).get("tokenizer") or ""
        if tok:
            return tok
    source = resolve(spec, stage, dir_name)
    if source.kind == TRANSFORMERS:
        p = source.path
        files = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
        return p if any(os.path.exists(os.path.join(p, f)) for f in files) else ""
    if source.kind == STAGE:
        d = _read_json(os.path.join(source.path, RECORD_FILE)) or {}
        return (d.get("paths") or {}).get("tokenizer") or ""
    return ""


def source_file(spec: str, stage: str, dir_name: str, name: str) -> str:
    """The path of file `name` (one of the stage's `IMPORTS[stage].files`) in the source stage
    directory `spec` names, or an InitFromError when it has none."""
    source = resolve(spec, stage, dir_name)
    path = os.path.join(source.path, name)
    if source.kind != STAGE or not os.path.exists(path):
        raise InitFromError(f"config.init_from {spec}: the {stage} stage takes {name} from its "
                            f"source, and {source.describe()} has none")
    return path
