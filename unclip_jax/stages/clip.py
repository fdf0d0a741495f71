"""The CLIP stage: a symmetric contrastive loss with a learnable temperature, logits over the
global batch (the jitted step sees the whole sharded batch)."""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.data.sources import image_text_batches
from unclip_jax.images import clip_pixels
from unclip_jax.models.clip import CLIPConfig, CLIPModel, clip_loss
from unclip_jax.stages.conditioning import tokenize_captions
from unclip_jax.train.stage import Stage
from unclip_jax.workdir import StageRecord


class CLIPStage(Stage):
    name = "clip"

    def __init__(self, config, workdir=None):
        super().__init__(config)
        self.cfg = CLIPConfig.from_dict(config.model.to_dict())
        self._tokenizer = None
        self._copy_tokenizer = False
        if not config.get("tokenizer") and config.get("init_from"):
            # imported weights tokenise with their own tokenizer (a transformers CLIP
            # directory's, a trained stage's recorded one), copied into the stage directory by
            # write_files; a resumed run takes its recorded one (that copy)
            from unclip_jax.train import init_from
            from unclip_jax.train.trainer import stage_dir_name
            from unclip_jax.workdir import has_checkpoints

            name = stage_dir_name(config, self.name)
            mine = os.path.join(workdir, name) if workdir else None
            tok = init_from.source_tokenizer(config.init_from, self.name, name, mine)
            if tok:
                config.tokenizer = tok
                self._copy_tokenizer = not (mine and has_checkpoints(mine))
            else:
                print(f"[clip] warning: config.init_from {config.init_from} names no tokenizer "
                      f"that goes with its weights: token ids come from config.tokenizer or a "
                      f"new shapes tokenizer", flush=True)
        if not config.get("tokenizer"):
            # No tokenizer given: on the shapes source, train a byte-level BPE on the shapes
            # captions into WORKDIR/tokenizer (reused when there), and record its absolute path
            # in config.tokenizer, so the stage record (config.json 'train.tokenizer') names it.
            source = config.data.source
            how = ("train one on your captions with unclip_jax.data.tokenizer.train_tokenizer("
                   "captions, DIR) (or use a transformers CLIP tokenizer directory) and pass "
                   "--config.tokenizer=DIR")
            if source != "shapes":
                raise ValueError(f"the CLIP stage needs config.tokenizer (a tokenizer directory) "
                                 f"for data.source={source!r}: {how}")
            if not workdir:
                raise ValueError("the CLIP stage trains its shapes tokenizer into "
                                 "WORKDIR/tokenizer: give it a workdir, or set config.tokenizer "
                                 f"({how})")
            import tempfile

            from unclip_jax.data import shapes
            from unclip_jax.data.tokenizer import train_tokenizer

            path = os.path.abspath(os.path.join(workdir, "tokenizer"))
            if not os.path.exists(os.path.join(path, "tokenizer.json")):
                scenes = shapes.sample_scenes("train", int(config.data.num_examples),
                                              seed=int(config.data.get("seed", 0)))
                caps = [c for sc in scenes for c in shapes.captions(sc)]
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = tempfile.mkdtemp(prefix=".tokenizer.", dir=os.path.dirname(path))
                train_tokenizer(caps, tmp, vocab_size=int(self.cfg.text.vocab_size),
                                context_length=int(self.cfg.text.max_position_embeddings))
                try:  # atomic: processes sharing the workdir each train the same tokenizer
                    os.rename(tmp, path)
                except OSError:
                    if not os.path.exists(os.path.join(path, "tokenizer.json")):
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)
                print(f"[clip] trained a BPE tokenizer on {len(caps)} shapes captions into "
                      f"{path}", flush=True)
            config.tokenizer = path
        self.tokenizer  # noqa: B018 -- read it now: a missing or garbled one fails before compiling

    def write_files(self, stage_dir):
        """The tokenizer of a config.init_from source, copied into STAGE_DIR/tokenizer (its
        files, not the source's weights), so the stage never needs the source again."""
        if not self._copy_tokenizer:
            return
        src, dest = self.config.tokenizer, os.path.abspath(os.path.join(stage_dir, "tokenizer"))
        if jax.process_index() == 0 and not os.path.exists(dest):
            os.makedirs(stage_dir, exist_ok=True)
            tmp = dest + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for n in os.listdir(src):
                if os.path.isfile(os.path.join(src, n)) and n != "config.json" and not \
                        n.endswith((".safetensors", ".bin", ".pt", ".msgpack", ".h5")):
                    shutil.copy2(os.path.join(src, n), os.path.join(tmp, n))
            os.rename(tmp, dest)
        self.config.tokenizer = dest
        self._copy_tokenizer = False

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from unclip_jax.data.tokenizer import load_tokenizer

            if not self.config.tokenizer:
                raise ValueError("the CLIP stage needs config.tokenizer (a tokenizer directory)")
            self._tokenizer = load_tokenizer(self.config.tokenizer)
        return self._tokenizer

    def model(self):
        return CLIPModel(self.cfg)

    def record(self) -> StageRecord:
        return StageRecord("clip", self.cfg.to_dict(), None,
                           paths={"tokenizer": self.config.tokenizer}, train=self.config_json())

    def init_variables(self, rng, batch):
        pixels = clip_pixels(jnp.asarray(batch["image"]), self.cfg.vision.image_size)
        return self.model().init(rng, jnp.asarray(batch["input_ids"]), pixels)

    def dummy_batch(self, batch_size):
        s = int(self.config.data.image_size)
        return {"image": np.zeros((batch_size, s, s, 3), np.uint8),
                "input_ids": np.zeros((batch_size, self.cfg.text.max_position_embeddings),
                                      np.int32)}

    def loss(self, params, batch, rng, frozen):
        pixels = clip_pixels(batch["image"], self.cfg.vision.image_size)
        out = self.model().apply({"params": params}, batch["input_ids"], pixels)
        logits = out["logits_per_text"]
        loss = clip_loss(logits)
        labels = jnp.arange(logits.shape[0])
        acc_t2i = jnp.mean(jnp.argmax(logits, axis=1) == labels)
        acc_i2t = jnp.mean(jnp.argmax(logits, axis=0) == labels)
        return loss, {"acc_text_to_image": acc_t2i, "acc_image_to_text": acc_i2t,
                      "logit_scale": out["logit_scale"]}

    def batches(self, *, batch_size, seed, start_step, process_index, process_count):
        L = self.cfg.text.max_position_embeddings
        for raw, skipped in image_text_batches(
                self.config.data, image_size=int(self.config.data.image_size),
                batch_size=batch_size, seed=seed, start_step=start_step,
                process_index=process_index, process_count=process_count):
            ids, _ = tokenize_captions(self.tokenizer, raw["caption"], L)
            yield {"image": raw["image"], "input_ids": ids}, skipped


def make_stage(config, workdir=None):
    return CLIPStage(config, workdir)
