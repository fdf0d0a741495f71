"""TFDS builders for local image-caption data: ``WebdatasetPairs`` and ``ImageFolderPairs``.

Both turn a source directory into a prepared TFDS dataset (one ``'train'`` split of ``image``
uint8 [S, S, 3], ``caption`` text, ``key`` text) with the decoding and skipping rules of
:mod:`unclip_jax.data.pipelines`: undecodable images, missing members and empty captions are not
emitted, and their number is stored in the dataset info metadata
(``builder.info.metadata["skipped_examples"]``, also logged at generation time).  Nothing is
ever downloaded; the source is named by the builder config.

Example::

    from unclip_jax.data import tfds_builders as B
    builder = B.WebdatasetPairs(data_dir="/tmp/tfds", config=B.WebdatasetPairsConfig(
        name="laion_64", source="/data/laion", image_size=64))
    builder.download_and_prepare()
    print(builder.info.metadata["skipped_examples"])
    ds = B.as_pairs_dataset(builder, process_index=jax.process_index(),
                            process_count=jax.process_count())     # tfds.even_splits per host

The config name identifies the prepared data: a different source or image size wants a
different name (or data_dir).  TFDS is imported lazily -- the classes are made on first use
(``tfds_builders.WebdatasetPairs`` etc. or :func:`get_builder`), so importing this module is cheap.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from unclip_jax.data import fs
from unclip_jax.data import pipelines as P

log = logging.getLogger(__name__)

VERSION = "1.0.0"
_VERSION = VERSION


@functools.lru_cache(maxsize=None)
def _classes():
    """Define the config and builder classes once (TFDS registers builders by name)."""
    import dataclasses

    import tensorflow_datasets as tfds

    fs.tensorflow()  # TensorFlow off the GPU before TFDS touches it

    @dataclasses.dataclass
    class PairsConfig(tfds.core.BuilderConfig):
        """Where the source data is and how to decode it.

        Attributes:
          source: the source directory (or, for webdataset, a glob / ``{a..b}`` range of shards).
          image_size: side of the square images (centre crop + resize).
          caption_ext: extension of the caption member / file.
          encoding_format: how TFDS stores the images ('png' or 'jpeg').
        """

        source: str = ""
        image_size: int = 64
        caption_ext: str = "txt"
        encoding_format: str = "png"

    @dataclasses.dataclass
    class WebdatasetPairsConfig(PairsConfig):
        """Config of :class:`WebdatasetPairs`."""

    @dataclasses.dataclass
    class ImageFolderPairsConfig(PairsConfig):
        """Config of :class:`ImageFolderPairs`."""

    class _PairsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(_VERSION)
        RELEASE_NOTES = {"1.0.0": "Initial release."}


        def _info(self):
            s = self.builder_config.image_size
            fmt = self.builder_config.encoding_format
            return self.dataset_info_from_configs(
                description=self.__class__.__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(s, s, 3), dtype=np.uint8,
                                                 encoding_format=fmt),
                    "caption": tfds.features.Text(),
                    "key": tfds.features.Text(),
                }),
                supervised_keys=("image", "caption"),
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            if not self.builder_config.source:
                raise ValueError(f"{self.name}: the builder config names no `source`")
            return {"train": self._generate_examples()}

        def _examples(self):
            """Yield ``(key, image bytes or None, caption bytes or None)`` in source order."""
            raise NotImplementedError

        def _generate_examples(self):
            cfg = self.builder_config
            skipped = total = 0
            for key, image_bytes, caption in self._examples():
                total += 1
                image, text, valid = P.decode_pair(image_bytes, caption, cfg.image_size)
                if not valid:
                    skipped += 1
                    continue
                yield key, {"image": image, "caption": text, "key": key}
            self.info.metadata["skipped_examples"] = skipped
            self.info.metadata["source_examples"] = total
            log.info("%s/%s: %d of %d source examples skipped (undecodable image, missing member "
                     "or empty caption)", self.name, cfg.name, skipped, total)

    class WebdatasetPairs(_PairsBuilder):
        """Image-caption pairs from webdataset tar shards (the layout img2dataset writes);
        invalid examples are skipped and counted in ``info.metadata['skipped_examples']``."""

        name = "webdataset_pairs"
        BUILDER_CONFIGS = []

        def _examples(self):
            cfg = self.builder_config
            for path in fs.list_shards(cfg.source):
                shard = os.path.basename(path)
                for s in P.iter_webdataset_samples(path, caption_ext=cfg.caption_ext):
                    image = s["image"] if s["caption"] is not None else None
                    yield f"{shard}/{s['key']}", image, s["caption"]

    class ImageFolderPairs(_PairsBuilder):
        """Image-caption pairs from a folder of images each with a caption file of the same stem;
        invalid examples are skipped and counted in ``info.metadata['skipped_examples']``."""

        name = "image_folder_pairs"
        BUILDER_CONFIGS = []

        def _examples(self):
            cfg = self.builder_config
            root = os.fspath(cfg.source)
            for image_path, caption_path in P.list_image_folder(root, cfg.caption_ext):
                key = os.path.relpath(image_path, root)
                try:
                    caption = fs.read_bytes(caption_path) if caption_path else None
                    data = fs.read_bytes(image_path) if P.decode_caption(caption) else None
                except OSError:
                    caption, data = None, None
                yield key, data, caption

    return WebdatasetPairsConfig, ImageFolderPairsConfig, WebdatasetPairs, ImageFolderPairs


def get_builder(kind: str, source: str, *, data_dir: str | None = None, name: str | None = None,
                image_size: int = 64, **config_kwargs):
    """A (not yet prepared) ``'webdataset'`` or ``'folder'`` builder for ``source``; the config
    name defaults to ``"{basename of source}_{image_size}"``."""
    wcfg, fcfg, wb, fb = _classes()
    cfg_cls, builder_cls = {"webdataset": (wcfg, wb), "folder": (fcfg, fb)}[kind]
    if name is None:
        base = os.path.basename(os.path.normpath(os.fspath(source))) or "source"
        name = "".join(c if c.isalnum() or c in "_-" else "_" for c in base) + f"_{image_size}"
    cfg = cfg_cls(name=name, source=os.fspath(source), image_size=image_size, **config_kwargs)
    return builder_cls(data_dir=data_dir, config=cfg)


def as_pairs_dataset(builder, *, process_index: int = 0, process_count: int = 1,
                     shuffle_files: bool = True, seed: int = 0):
    """This process's part of a prepared builder's 'train' split
    (``tfds.even_splits('train', process_count)[process_index]``) in the pipelines' format:
    ``image``, ``caption``, ``key``, ``valid`` (True) and ``skipped`` (0: the skipped examples
    were counted when the dataset was built), ready for :func:`pipelines.batched`."""
    import tensorflow_datasets as tfds

    tf = fs.tensorflow()
    split = tfds.even_splits("train", n=process_count)[process_index]
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_files,
                            read_config=tfds.ReadConfig(shuffle_seed=seed))
    return ds.map(lambda ex: {**ex, "valid": tf.constant(True),
                              P.SKIPPED_KEY: tf.constant(0, tf.int32)})


def __getattr__(name):
    names = ("WebdatasetPairsConfig", "ImageFolderPairsConfig", "WebdatasetPairs",
             "ImageFolderPairs")
    if name in names:
        return _classes()[names.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["VERSION", "WebdatasetPairsConfig", "ImageFolderPairsConfig", "WebdatasetPairs",
           "ImageFolderPairs", "get_builder", "as_pairs_dataset"]
