"""The shapes world as a TFDS dataset ('unclip_shapes') and as plain numpy arrays.

The TFDS builder generates everything locally through :func:`unclip_jax.data.shapes.generate`
(no downloads, no manual_dir).  TensorFlow Datasets is imported lazily: the builder classes are
created on first use (``shapes_tfds.UnclipShapes`` / ``shapes_tfds.ShapesConfig`` or
:func:`get_builder`), so importing this module -- and :func:`as_numpy` -- stays TF-free.

Example::

    from unclip_jax.data import shapes_tfds
    builder = shapes_tfds.get_builder("/tmp/tfds", train_size=2000, test_size=200, heldout_size=200)
    builder.download_and_prepare()
    ds = builder.as_dataset(split="train")          # image uint8 [64,64,3], caption, captions, scene

    batch = shapes_tfds.as_numpy("train", 256, seed=0)   # no TFDS: {'image': [256,64,64,3], ...}
"""

from __future__ import annotations

import functools
import json

import numpy as np

from unclip_jax.data import shapes as S

NAME = "unclip_shapes"
VERSION = "1.0.0"
_VERSION = VERSION
#: Default split sizes of the 'default' config.
DEFAULT_SIZES = {"train": 20000, "test": 1000, "heldout": 1000}


def as_numpy(split: str, n: int, seed: int = 0, image_size: int = 64) -> dict:
    """The first ``n`` examples of ``split`` (see :func:`shapes.generate`) stacked into arrays:
    ``image`` uint8 [n, S, S, 3], ``caption`` str [n], ``scene`` str [n] (JSON), and ``captions``
    (a list of n lists: the number of templates varies)."""
    exs = list(S.generate(split, n, seed=seed, image_size=image_size))
    images = (np.stack([e["image"] for e in exs]) if exs
              else np.zeros((0, image_size, image_size, 3), np.uint8))
    return {
        "image": images,
        "caption": np.array([e["caption"] for e in exs], dtype=str),
        "captions": [e["captions"] for e in exs],
        "scene": np.array([json.dumps(e["scene"], sort_keys=True) for e in exs], dtype=str),
    }


@functools.lru_cache(maxsize=None)
def _classes():
    """Define (once: TFDS registers builders by name) the config and builder classes."""
    import dataclasses

    import tensorflow_datasets as tfds

    @dataclasses.dataclass
    class ShapesConfig(tfds.core.BuilderConfig):
        """Split sizes, image size and seed of an 'unclip_shapes' build."""

        train_size: int = DEFAULT_SIZES["train"]
        test_size: int = DEFAULT_SIZES["test"]
        heldout_size: int = DEFAULT_SIZES["heldout"]
        image_size: int = 64
        seed: int = 0

    class UnclipShapes(tfds.core.GeneratorBasedBuilder):
        """Procedural captioned shapes (unclip_jax.data.shapes): built locally, never downloaded.

        Splits: 'train' and 'test' (seen colour-shape pairs, independent streams) and 'heldout'
        (every scene contains one of shapes.HELDOUT_PAIRS, which train/test never show).
        """

        name = NAME
        VERSION = tfds.core.Version(_VERSION)
        RELEASE_NOTES = {"1.0.0": "Initial release."}
        BUILDER_CONFIGS = [
            ShapesConfig(name="default", description="20000 / 1000 / 1000 examples at 64x64."),
            ShapesConfig(name="small", description="2000 / 200 / 200 examples at 64x64.",
                         train_size=2000, test_size=200, heldout_size=200),
        ]
        DEFAULT_CONFIG_NAME = "default"


        def _info(self):
            s = self.builder_config.image_size
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(s, s, 3), dtype=np.uint8),
                    "caption": tfds.features.Text(),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "scene": tfds.features.Text(),  # JSON of shapes.Scene.to_dict()
                }),
                supervised_keys=("image", "caption"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            cfg = self.builder_config
            sizes = {"train": cfg.train_size, "test": cfg.test_size, "heldout": cfg.heldout_size}
            return {split: self._generate_examples(split, n) for split, n in sizes.items()}

        def _generate_examples(self, split, n):
            cfg = self.builder_config
            for i, ex in enumerate(S.generate(split, n, seed=cfg.seed, image_size=cfg.image_size)):
                yield i, {
                    "image": ex["image"],
                    "caption": ex["caption"],
                    "captions": ex["captions"],
                    "scene": json.dumps(ex["scene"], sort_keys=True),
                }

    return ShapesConfig, UnclipShapes


def get_builder(data_dir: str | None = None, config: str | None = None, **config_kwargs):
    """An ``unclip_shapes`` builder (not yet prepared: call ``download_and_prepare()``, which only
    generates).  ``config`` names a predefined config ('default', 'small'); keyword arguments
    (train_size, test_size, heldout_size, image_size, seed) make a custom one, named after them."""
    ShapesConfig, UnclipShapes = _classes()
    if config_kwargs:
        if config is not None:
            raise ValueError("give either a config name or config keyword arguments")
        merged = {"train_size": DEFAULT_SIZES["train"], "test_size": DEFAULT_SIZES["test"],
                  "heldout_size": DEFAULT_SIZES["heldout"], "image_size": 64, "seed": 0}
        merged.update(config_kwargs)
        name = "custom_{train_size}_{test_size}_{heldout_size}_s{image_size}_seed{seed}".format(**merged)
        cfg = ShapesConfig(name=name, **merged)
    else:
        cfg = config or UnclipShapes.DEFAULT_CONFIG_NAME
    return UnclipShapes(data_dir=data_dir, config=cfg)


def __getattr__(name):
    if name == "ShapesConfig":
        return _classes()[0]
    if name == "UnclipShapes":
        return _classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NAME", "VERSION", "DEFAULT_SIZES", "as_numpy", "get_builder", "ShapesConfig",
           "UnclipShapes"]
