"""Measurements of a trained shapes-world stack (`unclip-jax eval`): CLIP retrieval, the prior's
embeddings, faithfulness of generated images (by the deterministic analyser), CLIP score; and two
diagnostics that say where an attribute is lost: how much of CLIP's embedding variance each
attribute explains, and what the decoder makes of noised real images at fixed noise levels."""
from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.data import shapes
from unclip_jax.diffusion import GaussianDiffusion
from unclip_jax.images import to_model_range, to_uint8
from unclip_jax.shapes_demo import analyse


def _norm(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


#: Attributes of a single-object scene, as :func:`attribute_salience` reports them.
ATTRIBUTES = ("color", "shape", "size", "cell")
#: Noise levels (steps of the 1000-step process) of :meth:`Evaluator.denoising_probe`.
PROBE_STEPS = (100, 300, 500, 700)


def variance_explained(embeds, labels) -> float:
    """Fraction of the variance of the unit-normalised rows of `embeds` [N, D] that a categorical
    `labels` [N] explains: between-group over total sum of squares (one-way ANOVA's R^2)."""
    e = _norm(embeds)
    e = e - e.mean(0)
    labels = np.asarray(labels)
    between = sum(np.sum(labels == v) * np.sum(e[labels == v].mean(0) ** 2)
                  for v in np.unique(labels))
    return float(between / max(np.sum(e ** 2), 1e-30))


def heldout_probe(features, labels, heldout, ridge: float = 1.0) -> dict[str, float]:
    """Does a linear read-out of `labels` learned on the seen rows carry over to the held-out
    ones? A ridge classifier (one-hot targets, features standardised on the seen rows) fit on
    the rows where `heldout` [N] is False, top-1 accuracy on both parts: {'seen', 'heldout'}.
    `features` [N, ...] are flattened per row."""
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    labels, heldout = np.asarray(labels), np.asarray(heldout, bool)
    if heldout.all() or not heldout.any():
        raise ValueError("heldout_probe needs both seen and held-out rows")
    seen = ~heldout
    classes = np.unique(labels[seen])
    x = (x - x[seen].mean(0)) / (x[seen].std(0) + 1e-6)
    y = (labels[seen][:, None] == classes[None]).astype(np.float64)
    a = x[seen]
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ y)
    pred = classes[np.argmax(x @ w, axis=1)]
    return {"seen": float(np.mean(pred[seen] == labels[seen])),
            "heldout": float(np.mean(pred[heldout] == labels[heldout]))}


def single_object_scenes() -> list:
    """Every single-object scene of the world (colours x shapes x sizes x cells), held-out
    colour-shape pairs included."""
    return [shapes.Scene((shapes.ShapeObject(sh, c, sz, cell),)) for c in shapes.COLORS
            for sh in shapes.SHAPES for sz in shapes.SIZES for cell in shapes.CELLS]


class Evaluator:
    """Evaluates a pipeline built by `UnCLIPPipeline.from_workdir` (which carries `pipe.clip`)."""

    def __init__(self, pipe, batch: int = 64):
        if getattr(pipe, "clip", None) is None:
            raise ValueError("evaluation needs the CLIP image tower: build the pipeline with "
                             "UnCLIPPipeline.from_workdir")
        self.pipe = pipe
        self.clip = pipe.clip
        self.batch = batch

    def image_embeds(self, images_uint8) -> np.ndarray:
        return self.clip.embed_images(images_uint8)

    def text_embeds(self, prompts) -> np.ndarray:
        out = [np.asarray(self.pipe.encode_text(prompts[i:i + 256])["text_embed"])
               for i in range(0, len(prompts), 256)]
        return np.concatenate(out)

    # ---------------------------------------------------------------------------------------
    def retrieval(self, images, captions) -> dict[str, float]:
        """Zero-shot top-1 over a set of (image, canonical caption) pairs. A hit is a retrieved
        item whose caption equals the query's (the world has duplicate scenes)."""
        ie, te = _norm(self.image_embeds(images)), _norm(self.text_embeds(list(captions)))
        caps = np.asarray(captions)
        block = 1024  # the [N, N] similarities a block of rows at a time: memory O(N)
        t2i_idx = np.concatenate([np.argmax(te[i:i + block] @ ie.T, axis=1)
                                  for i in range(0, len(te), block)])
        i2t_idx = np.concatenate([np.argmax(ie[i:i + block] @ te.T, axis=1)
                                  for i in range(0, len(ie), block)])
        t2i = np.mean(caps[t2i_idx] == caps)
        i2t = np.mean(caps[i2t_idx] == caps)
        return {"clip_top1_text_to_image": float(t2i), "clip_top1_image_to_text": float(i2t)}

    def prior_guidance(self, guidance) -> float:
        """A prior guidance scale, None: the prior's recorded default."""
        return self.pipe.prior_guidance_default() if guidance is None else float(guidance)

    def prior_similarity(self, images, captions, *, seed=0, steps=25, guidance=None,
                         candidates=1) -> dict[str, float]:
        """Mean cosine of the prior's sampled image embeddings with the true ones, against the
        baseline of using the text embedding itself (guidance None: the prior's default)."""
        guidance = self.prior_guidance(guidance)
        true = _norm(self.image_embeds(images))
        outs, texts = [], []
        for i in range(0, len(captions), self.batch):
            cond, uncond = self.pipe.text_conditioning(list(captions[i:i + self.batch]))
            z = self.pipe.sample_prior(cond, uncond, steps=steps, guidance=guidance,
                                       rng=jax.random.fold_in(jax.random.key(seed), i),
                                       candidates=candidates)
            outs.append(np.asarray(z))
            texts.append(np.asarray(cond["text_embed"]))
        z, t = _norm(np.concatenate(outs)), _norm(np.concatenate(texts))
        return {"prior_cosine": float(np.mean(np.sum(z * true, -1))),
                "text_embedding_cosine_baseline": float(np.mean(np.sum(t * true, -1)))}

    def sample(self, prompts, embed, *, seed=0, steps=(25, 25, 7), guidance=(None, None),
               upsample: bool = True):
        """The chunked sampling loop every measurement shares: for each chunk of `batch` prompts
        (chunk i draws from fold_in(key(seed), i)), `embed(i, cond, uncond, rng)` gives the
        decoder's (image embeddings [b, E], null_image); the decoder and the upsamplers follow
        (`upsample=False`: not the upsamplers; the final images are then None).
        Returns (uint8 final images, uint8 decoder images, [image embeddings per chunk])."""
        finals, lows, embeds = [], [], []
        for i in range(0, len(prompts), self.batch):
            chunk = list(prompts[i:i + self.batch])
            rng = jax.random.fold_in(jax.random.key(seed), i)
            cond, uncond = self.pipe.text_conditioning(chunk)
            z, null = embed(i, cond, uncond, jax.random.fold_in(rng, 0))
            low = self.pipe.sample_decoder(z, cond, uncond, steps=steps[1], guidance=guidance[1],
                                           rng=jax.random.fold_in(rng, 1), null_image=null)
            lows.append(to_uint8(low * 0.5 + 0.5))
            if upsample and self.pipe.super_res_first is not None:
                finals.append(to_uint8(self.pipe.sample_super_res(low, steps=steps[2],
                                                             rng=jax.random.fold_in(rng, 2))))
            elif upsample:
                finals.append(lows[-1])
            embeds.append(z)
        return (np.concatenate(finals) if upsample else None), np.concatenate(lows), embeds

    def generate(self, prompts, *, seed=0, steps=(25, 25, 7), guidance=(None, None),
                 true_images=None, upsample: bool = True):
        """Generated (final, decoder) uint8 images for prompts; with `true_images` the decoder is
        fed the real images' CLIP embeddings instead of the prior's. Guidance None: the stage's
        recorded default. `upsample=False`: the decoder's images only (final None)."""
        guidance = (self.prior_guidance(guidance[0]), guidance[1])
        def embed(i, cond, uncond, rng):
            if true_images is not None:
                return jnp.asarray(self.image_embeds(true_images[i:i + self.batch])), False
            return self.pipe.sample_prior(cond, uncond, steps=steps[0], guidance=guidance[0],
                                          rng=rng, candidates=self.pipe.prior_candidates), False

        final, low, _ = self.sample(prompts, embed, seed=seed, steps=steps, guidance=guidance,
                                    upsample=upsample)
        return final, low

    def attribute_salience(self) -> dict[str, dict[str, float]]:
        """How much of the variance of CLIP's image / text embeddings, over every single-object
        scene, each attribute explains (:func:`variance_explained`). An attribute that explains
        little is a weak signal for a decoder conditioned on these embeddings."""
        scenes = single_object_scenes()
        ie = self.image_embeds(np.stack([shapes.render(s, 64) for s in scenes]))
        te = self.text_embeds([shapes.canonical_caption(s) for s in scenes])
        out = {}
        for name, e in (("image", ie), ("text", te)):
            out[name] = {a: variance_explained(e, [getattr(s.objects[0], a) for s in scenes])
                         for a in ATTRIBUTES}
        return out

    def caption_shape_probe(self) -> dict[str, dict[str, float]]:
        """Whether the text features the decoder reads carry the shape of held-out colour-shape
        pairs: :func:`heldout_probe` of the shape on the canonical captions of every
        single-object scene, fit on the seen pairs, from CLIP's last hidden states (all
        tokens, flattened; their mean over the caption's tokens) and its pooled text
        embedding."""
        scenes = single_object_scenes()
        caps = [shapes.canonical_caption(s) for s in scenes]
        shape = [s.objects[0].shape for s in scenes]
        held = [s.has_heldout for s in scenes]
        text = self.pipe.encode_text(caps)
        hidden, mask = np.asarray(text["text_hidden"]), np.asarray(text["text_mask"], bool)
        mean = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        return {"hidden_all_tokens": heldout_probe(hidden, shape, held),
                "hidden_mean": heldout_probe(mean, shape, held),
                "text_embed": heldout_probe(np.asarray(text["text_embed"]), shape, held)}

    def denoising_probe(self, images, scenes, prompts, *, ts=PROBE_STEPS, seed=0
                        ) -> dict[str, dict[str, float]]:
        """Faithfulness of the decoder's one-step clean-image estimate from real images noised to
        step t (fed their true CLIP image embeddings and captions), per t: the noise level at
        which an attribute stops being recovered is where sampling has to decide it."""
        size = self.pipe.decoder.config.unet.sample_size
        x0 = to_model_range(jnp.asarray(images), size)
        z = jnp.asarray(self.image_embeds(images))
        diff = GaussianDiffusion(self.pipe.decoder.sampling.diffusion)
        prompts, b = list(prompts), self.batch
        out = {}
        for t in ts:
            noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), int(t)), x0.shape)
            preds = []
            for i in range(0, x0.shape[0], b):  # the network on `batch` images at a time
                cond, _ = self.pipe.text_conditioning(prompts[i:i + b])
                tt = jnp.full((min(b, x0.shape[0] - i),), int(t), jnp.int32)
                xt = diff.q_sample(x0[i:i + b], tt, noise[i:i + b])
                preds.append(np.asarray(self.pipe.predict_decoder_x0(xt, tt, z[i:i + b], cond)))
            pred = np.concatenate(preds)
            out[str(int(t))] = faithfulness(to_uint8(pred * 0.5 + 0.5), scenes)
        return out

    def clip_score(self, images, prompts) -> float:
        """100 x mean cosine between CLIP image and text embeddings (CLIPScore without the clip
        at 0), with this stack's own CLIP."""
        ie, te = _norm(self.image_embeds(images)), _norm(self.text_embeds(list(prompts)))
        return float(100 * np.mean(np.sum(ie * te, -1)))


def faithfulness(images, scenes) -> dict[str, float]:
    """Analyser scores; `csp` = colour, shape and position all right (the demo's target)."""
    rows = [analyse.check(im, sc) for im, sc in zip(images, scenes)]
    out = {k: float(np.mean([r[k] for r in rows])) for k in analyse.CHECK_KEYS}
    out["csp"] = float(np.mean([r["color"] and r["shape"] and r["position"] and r["binding"]
                                and r["count"] for r in rows]))
    return out


def eval_sets(n_single: int, n_two: int, n_heldout: int, seed: int = 0):
    """Test-split scenes with one object, with two, and held-out-pair scenes (canonical
    captions), rendered at 64 px."""
    def take(split, want_objects, n):
        out = []
        scenes = shapes.sample_scenes(split, 40 * n + 100, seed=seed)
        for sc in scenes:
            if want_objects is None or len(sc.objects) == want_objects:
                out.append(sc)
            if len(out) == n:
                break
        return out

    sets = {"single": take("test", 1, n_single), "two": take("test", 2, n_two),
            "heldout": take("heldout", None, n_heldout)}
    return {k: dict(scenes=v, prompts=[shapes.canonical_caption(s) for s in v],
                    images=np.stack([shapes.render(s, 64) for s in v]))
            for k, v in sets.items()}


def evaluate(pipe, *, n_single=64, n_two=32, n_heldout=32, seed=0, steps=(25, 25, 7),
             guidance=(None, None), batch: int = 64) -> dict[str, Any]:
    """All the measurements, as a nested dict (also the generated images under '_images').
    Guidance None: each stage's recorded default.
    Sampling runs `batch` prompts at a time (each chunk from its own key: the numbers are
    those of this batch size); every set holds its images in memory."""
    for name, n in (("n_single", n_single), ("n_two", n_two), ("n_heldout", n_heldout),
                    ("batch", batch)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    ev = Evaluator(pipe, batch=batch)
    guidance = (ev.prior_guidance(guidance[0]), guidance[1])
    sets = eval_sets(n_single, n_two, n_heldout, seed)
    allimg = np.concatenate([s["images"] for s in sets.values()])
    allcap = sum((s["prompts"] for s in sets.values()), [])
    dec = pipe.decoder.sampling
    res: dict[str, Any] = {"sampling": {
        "prior": f"{steps[0]} steps, guidance {guidance[0]:g}",
        "decoder": f"{dec.method.upper()} {steps[1]} steps"
                   + (f" (eta {dec.eta:g})" if dec.method == "ddim" else "")
                   + f", guidance {pipe.decoder_guidance_default if guidance[1] is None else guidance[1]:g}",
        "upsampler": f"{steps[2]} steps"}}
    res["retrieval"] = ev.retrieval(allimg, allcap)
    res["prior"] = ev.prior_similarity(allimg, allcap, seed=seed, steps=steps[0],
                                       guidance=guidance[0])
    res["faithfulness"], res["faithfulness_decoder_output"] = {}, {}
    res["faithfulness_true_embedding"], res["clip_score"] = {}, {}
    images = {}
    for name, s in sets.items():
        final, low = ev.generate(s["prompts"], seed=seed, steps=steps, guidance=guidance)
        _, low_true = ev.generate(s["prompts"], seed=seed, steps=steps, guidance=guidance,
                                  true_images=s["images"], upsample=False)
        res["faithfulness"][name] = faithfulness(final, s["scenes"])
        res["faithfulness_decoder_output"][name] = faithfulness(low, s["scenes"])
        res["faithfulness_true_embedding"][name] = faithfulness(low_true, s["scenes"])
        res["faithfulness"][name + "_real_images"] = faithfulness(s["images"], s["scenes"])
        res["clip_score"][name] = {"generated": ev.clip_score(final, s["prompts"]),
                                   "real": ev.clip_score(s["images"], s["prompts"])}
        images[name] = (final, s["prompts"])
    res["background_noise"] = {"generated": background_noise(images["single"][0]),
                               "real": background_noise(sets["single"]["images"])}
    res["diagnostics"] = {
        "salience": ev.attribute_salience(),
        "caption_shape_probe": ev.caption_shape_probe(),
        "denoising_probe": ev.denoising_probe(sets["single"]["images"], sets["single"]["scenes"],
                                              sets["single"]["prompts"], seed=seed)}
    res["_images"] = images
    return res


def background_noise(images) -> float:
    """Mean over images of :func:`analyse.background_noise` (0-255 grey levels): how far the
    background of the images is from the world's flat background colour."""
    values = [analyse.background_noise(im) for im in images]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def write_json(path: str, res: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f, indent=2)
