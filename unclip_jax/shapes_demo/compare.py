"""`unclip-jax compare`: the paper's comparisons of priors (section 5.1, Figure 3), in miniature,
on a trained shapes-world stack.

Four ways of getting the decoder's image embedding from a caption, the same decoder, upsampler,
prompts and seeds for all:

  (a) diffusion_prior   the diffusion prior's sample (the stack's WORKDIR/prior)
  (b) ar_prior          the autoregressive prior's sample (WORKDIR/ar_prior)
  (c) text_embedding    no prior: the CLIP *text* embedding in place of the image embedding,
                        rescaled to the mean norm of real image embeddings (the decoder was
                        trained on raw image embeddings, whose norm differs)
  (d) caption_only      the decoder's learned null image embedding: conditioned on the caption
                        alone (GLIDE-like)

For each: faithfulness (csp: colour, shape and position right) of single-object, two-object
and held-out prompts, CLIP score, the cosine of the prior's embedding with the true image
embedding ((a), (b)), diversity (mean pairwise RMS pixel distance of four samples of one prompt,
0-255) and sampling time per image (a second, compiled run of the single-object set). Writes
compare.json, compare.md and compare.png (rows = variants, columns = the same prompts and
seeds) into the workdir.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.data import shapes
from unclip_jax.shapes_demo.evaluate import Evaluator, _norm, eval_sets, faithfulness

VARIANTS = ("diffusion_prior", "ar_prior", "text_embedding", "caption_only")
LABELS = {"diffusion_prior": "(a) diffusion prior", "ar_prior": "(b) AR prior",
          "text_embedding": "(c) no prior: text embedding",
          "caption_only": "(d) caption only"}


class Comparison:
    """Samples a pipeline (`UnCLIPPipeline.from_workdir`, with `pipe.clip`) through each
    variant's image embedding."""

    def __init__(self, pipe, *, seed: int = 0, batch: int = 64, steps=(25, 25, 7),
                 guidance=(None, None)):
        self.pipe, self.ev = pipe, Evaluator(pipe, batch=batch)
        # None: the diffusion prior's recorded scale, for both priors (compared at one scale)
        guidance = (self.ev.prior_guidance(guidance[0]), guidance[1])
        self.seed, self.batch, self.steps, self.guidance = seed, batch, steps, guidance
        # the mean norm of real image embeddings (train split), for variant (c)
        scenes = shapes.sample_scenes("train", 256, seed=seed + 1)
        real = self.ev.image_embeds(np.stack([shapes.render(s, 64) for s in scenes]))
        self.image_norm = float(np.mean(np.linalg.norm(real, axis=-1)))

    def embeddings(self, variant: str, cond, uncond, rng):
        """(image embeddings [N, E], null_image) for one chunk of prompts."""
        p = self.pipe
        if variant == "diffusion_prior":
            return p.sample_prior(cond, uncond, steps=self.steps[0], guidance=self.guidance[0],
                                  rng=rng, candidates=p.prior_candidates), False
        if variant == "ar_prior":
            return p.sample_ar_prior(cond, uncond, guidance=self.guidance[0], rng=rng,
                                     candidates=p.prior_candidates), False
        t = cond["text_embed"]
        if variant == "text_embedding":
            return t / jnp.linalg.norm(t, axis=-1, keepdims=True) * self.image_norm, False
        if variant == "caption_only":
            return jnp.zeros_like(t), True
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")

    def generate(self, variant: str, prompts, *, seed: int | None = None):
        """(uint8 final images [N, H, W, 3], image embeddings [N, E] or None) through the
        evaluator's chunked loop (`Evaluator.sample`): the same keys for every variant."""
        def embed(i, cond, uncond, rng):
            return self.embeddings(variant, cond, uncond, rng)

        final, _, zs = self.ev.sample(prompts, embed, seed=self.seed if seed is None else seed,
                                      steps=self.steps, guidance=self.guidance)
        own = variant in ("diffusion_prior", "ar_prior")  # the prior's embedding, not the text's
        return final, np.concatenate([np.asarray(z) for z in zs]) if own else None


def diversity(images, per_prompt: int) -> float:
    """Mean pairwise RMS distance (0-255) between the `per_prompt` consecutive samples of each
    prompt, over the prompts."""
    x = np.asarray(images, np.float64).reshape((-1, per_prompt) + np.shape(images)[1:])
    out = []
    for group in x:
        for i in range(per_prompt):
            for j in range(i + 1, per_prompt):
                out.append(np.sqrt(np.mean((group[i] - group[j]) ** 2)))
    return float(np.mean(out))


def compare(pipe, *, variants=VARIANTS, n_single: int = 64, n_two: int = 32,
            n_heldout: int = 32, n_diversity: int = 8, per_prompt: int = 4, grid_prompts: int = 8,
            seed: int = 0, batch: int = 64, progress: bool = True) -> dict[str, Any]:
    """Every variant's measurements, as a nested dict ('_grid': the grid's images and
    captions)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; expected some of {VARIANTS}")
    if "ar_prior" in variants and getattr(pipe, "ar_prior", None) is None:
        raise ValueError("variant ar_prior needs an AR prior in the workdir: train it with "
                         "`unclip-jax train --config configs/ar_prior.py:size=demo --workdir W`")
    cmp = Comparison(pipe, seed=seed, batch=batch)
    sets = eval_sets(n_single, n_two, n_heldout, seed)
    div_prompts = [p for p in sets["single"]["prompts"][:n_diversity] for _ in range(per_prompt)]
    grid_p = sets["single"]["prompts"][:grid_prompts]
    res: dict[str, Any] = {"n": {"single": n_single, "two": n_two, "heldout": n_heldout,
                                 "diversity_prompts": n_diversity, "per_prompt": per_prompt},
                           "seed": seed, "variants": {}}
    grid_images, grid_caps = [], []
    for v in variants:
        t0 = time.time()
        r: dict[str, Any] = {"label": LABELS[v], "faithfulness": {}, "clip_score": {}}
        cos = []
        for name, s in sets.items():
            images, z = cmp.generate(v, s["prompts"])
            f = faithfulness(images, s["scenes"])
            r["faithfulness"][name] = {"csp": f["csp"], "color": f["color"],
                                       "shape": f["shape"], "position": f["position"]}
            r["clip_score"][name] = cmp.ev.clip_score(images, s["prompts"])
            if z is not None:
                true = _norm(cmp.ev.image_embeds(s["images"]))
                cos.append(np.sum(_norm(z) * true, -1))
        r["prior_cosine"] = float(np.mean(np.concatenate(cos))) if cos else None
        div, _ = cmp.generate(v, div_prompts, seed=seed + 1)
        r["diversity"] = diversity(div, per_prompt)
        t = time.time()  # compiled now: the single-object set again, timed
        jax.block_until_ready(cmp.generate(v, sets["single"]["prompts"])[0])
        r["seconds_per_image"] = (time.time() - t) / n_single
        g, _ = cmp.generate(v, grid_p)
        grid_images.append(g)
        grid_caps += [f"{LABELS[v]}: {p}" for p in grid_p]
        r["seconds_total"] = time.time() - t0
        res["variants"][v] = r
        if progress:
            print(f"[compare] {LABELS[v]}: csp single {r['faithfulness']['single']['csp']:.2f} "
                  f"two {r['faithfulness']['two']['csp']:.2f} heldout "
                  f"{r['faithfulness']['heldout']['csp']:.2f}, {r['seconds_total']:.0f}s",
                  flush=True)
    res["real_images"] = {name: faithfulness(s["images"], s["scenes"])["csp"]
                          for name, s in sets.items()}
    res["real_images_clip_score"] = cmp.ev.clip_score(sets["single"]["images"],
                                                      sets["single"]["prompts"])
    res["_grid"] = (np.concatenate(grid_images), grid_caps)
    return res


def _pct(x):
    return f"{100 * x:.0f}%"


def table(res: dict) -> str:
    """The comparison as a Markdown table."""
    n = res["n"]
    lines = [f"| variant | csp single (n={n['single']}) | csp two (n={n['two']}) | "
             f"csp held-out (n={n['heldout']}) | CLIP score single | prior cosine | "
             f"diversity ({n['diversity_prompts']} prompts x {n['per_prompt']}) | s / image |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["variants"].values():
        f = r["faithfulness"]
        cos = "—" if r["prior_cosine"] is None else f"{r['prior_cosine']:.3f}"
        lines.append(f"| {r['label']} | {_pct(f['single']['csp'])} | {_pct(f['two']['csp'])} "
                     f"| {_pct(f['heldout']['csp'])} | {r['clip_score']['single']:.1f} | {cos} "
                     f"| {r['diversity']:.1f} | {r['seconds_per_image']:.3f} |")
    ri = res["real_images"]
    lines.append(f"| real images | {_pct(ri['single'])} | {_pct(ri['two'])} | "
                 f"{_pct(ri['heldout'])} | {res['real_images_clip_score']:.1f} | | | |")
    return "\n".join(lines)


def write_outputs(workdir: str, res: dict) -> dict[str, str]:
    """compare.json, compare.md and compare.png in `workdir`; returns their paths."""
    from unclip_jax.viz import save_grid

    paths = {k: os.path.join(workdir, f"compare.{k}") for k in ("json", "md", "png")}
    images, caps = res["_grid"]
    cols = len(caps) // max(1, len(res["variants"]))
    save_grid(paths["png"], images, caps, cols=cols, cell=96,
              title="unclip_jax: the priors compared (rows: variants; columns: the same "
                    "prompts and seeds)")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f, indent=2)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("# The priors compared (shapes world)\n\n" + table(res) + "\n\n"
                "![the variants](compare.png)\n")
    return paths
