"""The autoregressive prior stage (the paper's section 2.2): cross-entropy on the quantised PCA
codes of the CLIP image embedding, predicted token by token after the caption's encodings, the
CLIP text embedding and the quantised z_i . z_t token; the text is replaced by the empty
prompt's 10% of the time (for classifier-free guidance).

CLIP is frozen and runs inside the step. The codebook (PCA + bucket edges,
`unclip_jax.models.ar_codes`) is fitted once, from `codebook.fit_batches` batches of the
training data, when the stage is first built; it is written to WORKDIR/ar_prior/codebook.npz
and read back on every later build (a resumed run, the pipeline), never refitted. An AR prior
initialised from another (`config.init_from`) takes that one's codebook instead. Its number of
components sets the model's sequence length, so it is part of the stage record's model config.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.ar_sampling import check_dot_quantiles
from unclip_jax.models import ar_codes
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models.ar_prior import ARPriorConfig
from unclip_jax.stages.conditioning import CLIPConditionedStage
from unclip_jax.train.stage import Stage
from unclip_jax.train.trainer import stage_dir_name
from unclip_jax.workdir import StageRecord

CODEBOOK_FILE = "codebook.npz"


def sampling_defaults(config) -> dict:
    """The recorded sampling defaults of an AR prior config (temperature, top_k, dot_quantiles),
    checked."""
    s = config.sampling
    out = {"temperature": float(s.temperature), "top_k": int(s.top_k) or None,
           "dot_quantiles": list(check_dot_quantiles(s.dot_quantiles))}
    ar_lib.check_sampling(out["temperature"], out["top_k"], int(config.model.num_buckets))
    return out


class ARPriorStage(CLIPConditionedStage, Stage):
    name = "ar_prior"

    def __init__(self, config, workdir=None):
        Stage.__init__(self, config)
        m = config.model.to_dict()
        self._setup_clip(config, workdir, int(m["embedding_dim"]), "embedding_dim")
        width = int(self.clip.text_config.hidden_size)
        if int(m["text_width"]) != width:
            raise ValueError(f"the AR prior's text_width {m['text_width']} differs from CLIP's "
                             f"text hidden size {width}")
        if int(m["num_text_tokens"]) != self.L:
            raise ValueError(f"the AR prior's num_text_tokens {m['num_text_tokens']} differs "
                             f"from CLIP's context length {self.L}")
        self.sampling = sampling_defaults(config)
        # where the trainer writes this stage (WORKDIR/ar_prior, or config.stage_dir)
        self.stage_dir = (os.path.join(workdir, stage_dir_name(config, self.name)) if workdir
                          else "")
        self.codebook = self._codebook(config, m)
        m["num_components"] = self.codebook.num_components
        self.cfg = ARPriorConfig.from_dict(m)

    # -- the codebook: fitted once, then read back -------------------------------------------
    def _codebook(self, config, m) -> ar_codes.Codebook:
        path = os.path.join(self.stage_dir, CODEBOOK_FILE) if self.stage_dir else ""
        want = dict(embed_dim=int(m["embedding_dim"]), num_buckets=int(m["num_buckets"]),
                    num_dot_buckets=int(m["num_dot_buckets"]))
        self._unwritten_codebook = False
        source = ""
        if not (path and os.path.exists(path)) and config.get("init_from"):
            # initialised from another AR prior: its codebook, written by write_files once the
            # trainer has checked the source's weights (nothing is written before)
            from unclip_jax.train import init_from

            source = init_from.source_file(config.init_from, self.name,
                                           stage_dir_name(config, self.name), CODEBOOK_FILE)
        if source or (path and os.path.exists(path)):
            cb = ar_codes.Codebook.load(source or path)
            got = dict(embed_dim=cb.embed_dim, num_buckets=cb.num_buckets,
                       num_dot_buckets=cb.num_dot_buckets)
            if got != want:
                hint = ("init from an AR prior of this config's sizes" if source else
                        "train into another workdir, or delete the stage directory")
                raise ValueError(f"{source or path} was fitted for {got}, but the config asks "
                                 f"for {want}: {hint}")
            self._unwritten_codebook = bool(source)
            return cb
        cb = self.fit_codebook(config)
        if path and jax.process_index() == 0:
            os.makedirs(self.stage_dir, exist_ok=True)
            cb.save(path)
        return cb

    def write_files(self, stage_dir):
        """The codebook taken from the config.init_from source, once the trainer has checked it."""
        if self._unwritten_codebook and jax.process_index() == 0:
            os.makedirs(stage_dir, exist_ok=True)
            self.codebook.save(os.path.join(stage_dir, CODEBOOK_FILE))
        self._unwritten_codebook = False

    def fit_codebook(self, config) -> ar_codes.Codebook:
        """PCA + buckets from the CLIP embeddings of `codebook.fit_batches` training batches
        (the same batches on every host: the fit is identical everywhere)."""
        enc_text = jax.jit(self.clip.encode_text)
        images, texts = [], []
        it = self.batches(batch_size=int(config.batch_size), seed=int(config.seed),
                          start_step=0, process_index=0, process_count=1)
        for _ in range(int(config.codebook.fit_batches)):
            batch, _ = next(it)
            images.append(self.clip.embed_images(batch["image"]))
            texts.append(np.asarray(enc_text(self.clip.text_params,
                                             jnp.asarray(batch["input_ids"]))[0]))
        c = config.codebook
        return ar_codes.fit_codebook(
            np.concatenate(images), np.concatenate(texts), variance=float(c.variance),
            num_components=int(c.num_components) or None,
            num_buckets=int(config.model.num_buckets),
            num_dot_buckets=int(config.model.num_dot_buckets))

    # -- model --------------------------------------------------------------------------------
    def model(self):
        return ar_lib.ARPrior(self.cfg)

    def record(self) -> StageRecord:
        data = {"codebook": CODEBOOK_FILE, "sampling": self.sampling,
                "explained_variance": float(np.sum(self.codebook.explained)),
                "source": str(self.config.data.source)}
        return StageRecord("ar_prior", self.cfg.to_dict(), None, data=data, paths=self.paths(),
                           train=self.config_json())

    def init_variables(self, rng, batch):
        b, c = batch["text_mask"].shape[0], self.cfg
        return self.model().init(rng, jnp.zeros((b, c.num_components), jnp.int32),
                                 jnp.zeros((b,), jnp.int32), jnp.zeros((b, c.embedding_dim)),
                                 jnp.zeros((b, self.L, c.text_width)),
                                 jnp.ones((b, self.L), bool))

    def targets(self, image, text):
        """(codes [B, K], dot bucket [B]) of CLIP image / text embeddings."""
        cos = jnp.sum(image * text, -1) / (jnp.linalg.norm(image, axis=-1)
                                          * jnp.linalg.norm(text, axis=-1) + 1e-8)
        return self.codebook.encode(image), self.codebook.encode_dot(cos)

    def loss(self, params, batch, rng, frozen):
        image, text, hidden = self.conditioning(frozen, batch)
        codes, dot = self.targets(image, text)
        k_drop, k_dropout = jax.random.split(rng)
        text, hidden, mask = self.drop_text(frozen, k_drop, float(self.config.cond_drop.text),
                                            text, hidden, batch["text_mask"])
        logits = self.model().apply({"params": params}, codes, dot, text, hidden, mask,
                                    train=True, rngs={"dropout": k_dropout})
        ce, acc = ar_lib.loss_fn(logits, codes)
        return jnp.mean(ce), {"token_accuracy": jnp.mean(acc)}


def make_stage(config, workdir=None):
    return ARPriorStage(config, workdir)
