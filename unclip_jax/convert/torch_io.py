"""Reading PyTorch state dicts and writing them into Flax param trees, with shape checks, and
the way back (`ParamRecorder`, `invert`, `torch_state_dict`: the exporter's).

Nothing here imports torch at module import time: safetensors files are read with
`safetensors.numpy`; `.bin`/`.pt` files need torch and are loaded with `weights_only=True`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

StateDict = Mapping[str, np.ndarray]


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor does not fit the parameter it is meant for."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Load a state dict from a safetensors or torch file, or a directory holding one.

    A directory is searched for `model.safetensors`, `diffusion_pytorch_model.safetensors`,
    `pytorch_model.bin` and `diffusion_pytorch_model.bin` (sharded `*.safetensors` too).
    """
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        shards = [n for n in names if n.endswith(".safetensors")]
        if not shards:
            shards = [n for n in names if n.endswith(".bin") or n.endswith(".pt")]
        if not shards:
            raise FileNotFoundError(f"no .safetensors or .bin weights in {path}")
        out: dict[str, np.ndarray] = {}
        for n in shards:
            out.update(load_state_dict(os.path.join(path, n)))
        return out
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            try:
                return dict(load_file(path))
            except TypeError:  # bf16 tensors: numpy cannot hold them, go through torch
                from safetensors.torch import load_file as load_torch

                return {k: v.float().numpy() for k, v in load_torch(path).items()}
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}; "
                             f"{os.path.getsize(path)} bytes): truncated or not safetensors, "
                             f"copy or download it again") from None
    import pickle

    import torch  # only for .bin / .pt files

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message: a paragraph on weights_only, then the reason, then a link
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = lines[-2] if len(lines) >= 3 else (lines[-1] if lines else type(e).__name__)
        if "global" not in str(e).lower():  # no object refused: not a pickle of tensors at all
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({reason}): "
                             f"truncated or corrupt, copy or download it again") from None
        raise ValueError(f"{path} is refused as unsafe: torch.load(weights_only=True) would not "
                         f"load it as plain tensors ({reason}); unpickling it fully could run "
                         f"code, which is never done here. Convert a trusted copy to "
                         f"safetensors") from None
    except (RuntimeError, EOFError) as e:  # not a zip archive / cut short
        raise ValueError(f"{path} is not a readable PyTorch checkpoint "
                         f"({' '.join(str(e).split())[:160]}): truncated or corrupt, copy or "
                         f"download it again") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    return {k: v.detach().float().numpy() for k, v in sd.items()}


def to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torch tensors (or arrays) -> float32 numpy arrays."""
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):
            v = v.detach().float().cpu().numpy()
        out[k] = np.asarray(v)
    return out


# Layout transforms from torch to flax.
def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def conv2d(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out]."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def identity(w: np.ndarray) -> np.ndarray:
    return w


# ... and back (the exporter: unclip_jax/convert/export_diffusers.py).
def linear_to_torch(k: np.ndarray) -> np.ndarray:
    """flax Dense kernel [in, out] -> torch Linear weight [out, in]."""
    return np.ascontiguousarray(np.asarray(k).T)


def conv2d_to_torch(k: np.ndarray) -> np.ndarray:
    """flax Conv kernel [kh, kw, in, out] -> torch Conv2d weight [out, in, kh, kw]."""
    return np.ascontiguousarray(np.asarray(k).transpose(3, 2, 0, 1))


class Layout:
    """A layout transform from torch to flax that knows its inverse: `Layout(forward, inverse,
    name)` is called like `linear` (torch tensor -> flax param) and `invert(layout)` gives
    `inverse` (flax param -> torch tensor). For the converters' reshapes and permutations, so
    that every entry a converter writes can be written back."""

    def __init__(self, forward: Callable, inverse: Callable, name: str):
        self.forward, self.inverse, self.name = forward, inverse, name

    def __call__(self, a: np.ndarray) -> np.ndarray:
        return self.forward(a)

    def __repr__(self) -> str:
        return f"Layout({self.name})"


_INVERSES = {linear: linear_to_torch, conv2d: conv2d_to_torch, identity: identity}


def invert(transform: Callable) -> Callable:
    """The flax -> torch inverse of a layout transform (linear, conv2d, identity or a Layout)."""
    if isinstance(transform, Layout):
        return transform.inverse
    try:
        return _INVERSES[transform]
    except (KeyError, TypeError):
        raise TypeError(f"the layout transform {transform!r} has no known inverse: give it one "
                        f"as a torch_io.Layout") from None


class ParamRecorder:
    """Stands in for a ParamWriter in the converters' writer-taking helpers and records what
    they write: `entries`, a list of (flax path, torch key, transform, value). `value` is not
    None for a computed entry (no torch tensor behind it); `get` is not offered (a helper that
    reads tensors itself cannot be inverted from its record)."""

    def __init__(self):
        self.entries: list[tuple[tuple[str, ...], str | None, Callable, Any]] = []

    def set(self, path: tuple[str, ...], key: str | None, transform: Callable = identity,
            value: np.ndarray | None = None) -> None:
        self.entries.append((tuple(path), key, transform, value))


def torch_state_dict(params: Mapping[str, Any], entries,
                     what: str = "params") -> dict[str, np.ndarray]:
    """Our param tree -> the torch state dict (float32 numpy) that `entries` (a
    ParamRecorder's) read it from: every recorded tensor inverted back to its torch layout.
    Computed entries are skipped. Every leaf of `params` must be written by exactly one entry
    and every key by one, else CheckpointMismatchError names it (nothing is dropped silently)."""
    out: dict[str, np.ndarray] = {}
    covered: set[tuple[str, ...]] = set()
    for path, key, transform, value in entries:
        if value is not None or key is None:
            covered.add(path)
            continue
        node: Any = params
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                raise CheckpointMismatchError(f"{what}: no parameter {'/'.join(path)} (for "
                                              f"'{key}')")
            node = node[p]
        if key in out:
            raise CheckpointMismatchError(f"{what}: '{key}' is written twice (the second time "
                                          f"from {'/'.join(path)})")
        out[key] = np.ascontiguousarray(invert(transform)(np.asarray(_unbox(node), np.float32)))
        covered.add(path)
    missing = ["/".join(p) for p in _leaf_paths(params) if p not in covered]
    if missing:
        raise CheckpointMismatchError(f"{what}: {len(missing)} parameters have no torch key, "
                                      f"e.g. {', '.join(missing[:5])}")
    return out


class ParamWriter:
    """Writes torch tensors into a (nested dict) param tree, checking every shape.

    `writer.set(("block_0", "dense", "kernel"), "blocks.0.fc.weight", linear)` takes the torch
    tensor, transforms it and places it at that path; a path or key that does not exist, or a
    shape that differs from the parameter's, raises CheckpointMismatchError naming both. At the
    end `writer.finish()` checks that every parameter was written and (optionally) every
    checkpoint key used.
    """

    def __init__(self, params: Mapping[str, Any], state_dict: StateDict, what: str = "checkpoint"):
        self._template = params
        self._sd = state_dict
        self._what = what
        self._out: dict[str, Any] = {}
        self._used: set[str] = set()

    def get(self, key: str) -> np.ndarray:
        if key not in self._sd:
            raise CheckpointMismatchError(f"{self._what}: missing tensor '{key}'")
        self._used.add(key)
        return np.asarray(self._sd[key])

    def has(self, key: str) -> bool:
        return key in self._sd

    def set(self, path: tuple[str, ...], key: str | None, transform: Callable = identity,
            value: np.ndarray | None = None) -> None:
        node: Any = self._template
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                raise CheckpointMismatchError(
                    f"{self._what}: parameter {'/'.join(path)} does not exist in the model"
                    f" (while importing '{key}')")
            node = node[p]
        src = self.get(key) if value is None else np.asarray(value)
        arr = transform(src)
        want = tuple(np.shape(_unbox(node)))
        if tuple(arr.shape) != want:
            raise CheckpointMismatchError(
                f"{self._what}: '{key}' has shape {tuple(src.shape)} (-> {tuple(arr.shape)}) but "
                f"parameter {'/'.join(path)} has shape {want}")
        dst = self._out
        for p in path[:-1]:
            dst = dst.setdefault(p, {})
        dst[path[-1]] = arr.astype(np.float32)

    def finish(self, strict_unused: bool = True, ignore_unused: Callable[[str], bool] | None = None):
        missing = [
            "/".join(p) for p in _leaf_paths(self._template) if not _has_path(self._out, p)
        ]
        if missing:
            raise CheckpointMismatchError(
                f"{self._what}: {len(missing)} parameters not found in the checkpoint, e.g. "
                + ", ".join(missing[:5]))
        if strict_unused:
            unused = [k for k in self._sd if k not in self._used
                      and not (ignore_unused and ignore_unused(k))]
            if unused:
                raise CheckpointMismatchError(
                    f"{self._what}: {len(unused)} checkpoint tensors were not used, e.g. "
                    + ", ".join(sorted(unused)[:5]))
        return self._out


def _unbox(x):
    return x.unbox() if hasattr(x, "unbox") else x


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaf_paths(v, prefix + (k,))
    else:
        yield prefix


def _has_path(tree, path):
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return False
        tree = tree[p]
    return True
