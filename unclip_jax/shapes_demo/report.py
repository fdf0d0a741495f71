"""The demo's Markdown report: the grid, the measurements and example images."""
from __future__ import annotations

import os

from unclip_jax.viz import save_grid


def _pct(x):
    return f"{100 * x:.0f}%"


def write_report(path: str, res: dict, grid: str = "grid.png") -> str:
    d = os.path.dirname(os.path.abspath(path))
    lines = ["# unclip_jax shapes demo", "",
             "A miniature unCLIP stack (BPE tokenizer, CLIP, diffusion prior, 32x32 decoder, "
             "32->64 upsampler) trained on CPU on the procedural shapes world, then sampled.", "",
             f"![generated images]({grid})", ""]
    if "sampling" in res:
        lines += ["Sampled with: " + "; ".join(f"{k} {v}" for k, v in res["sampling"].items())
                  + ".", ""]
    r = res["retrieval"]
    lines += ["## CLIP", "",
              "| zero-shot top-1 (test set) | |", "|---|---|",
              f"| text -> image | {_pct(r['clip_top1_text_to_image'])} |",
              f"| image -> text | {_pct(r['clip_top1_image_to_text'])} |", ""]
    p = res["prior"]
    lines += ["## Prior", "",
              "Mean cosine similarity with the true CLIP image embedding:", "",
              "| embedding | cosine |", "|---|---|",
              f"| sampled by the prior | {p['prior_cosine']:.3f} |",
              f"| the text embedding itself (baseline) | "
              f"{p['text_embedding_cosine_baseline']:.3f} |", ""]
    f, fd, ft = (res["faithfulness"], res["faithfulness_decoder_output"],
                 res["faithfulness_true_embedding"])
    lines += ["## Faithfulness", "",
              "Checked by the deterministic analyser of the shapes world (colour by nearest "
              "palette entry, shape from its moments, size from area, position from the "
              "centroid). **csp** = colour, shape and position all right (and the right number "
              "of objects); the demo's target is csp >= 80% for single-object prompts.", "",
              "| prompts | csp (64 px, full stack) | all incl. size | colour | shape | position "
              "| csp at 32 px (decoder) | csp, decoder fed the true image embedding | "
              "real images |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k in ("single", "two", "heldout"):
        lines.append(f"| {k} | **{_pct(f[k]['csp'])}** | {_pct(f[k]['all'])} | "
                     f"{_pct(f[k]['color'])} | {_pct(f[k]['shape'])} | {_pct(f[k]['position'])} "
                     f"| {_pct(fd[k]['csp'])} | {_pct(ft[k]['csp'])} | "
                     f"{_pct(f[k + '_real_images']['csp'])} |")
    cs = res["clip_score"]
    lines += ["", "## CLIP score", "", "100 x cosine(CLIP image, CLIP text) with this stack's "
              "CLIP:", "", "| prompts | generated | real images |", "|---|---|---|"]
    for k in ("single", "two", "heldout"):
        lines.append(f"| {k} | {cs[k]['generated']:.1f} | {cs[k]['real']:.1f} |")
    bn = res.get("background_noise")
    if bn:
        lines += ["", "## Background noise", "", "Mean absolute deviation of background pixels "
                  "from the flat background colour (0-255 grey levels; pixels within 2 of an "
                  "object excluded), single-object prompts:", "", "| generated | real images |",
                  "|---|---|", f"| {bn['generated']:.1f} | {bn['real']:.1f} |"]
    dg = res.get("diagnostics")
    if dg:
        lines += ["", "## Diagnostics: where an attribute is lost", "",
                  "Fraction of the variance of CLIP's embeddings (every single-object scene) that "
                  "each attribute explains -- the strength of that attribute's signal to the "
                  "decoder:", "", "| embedding | colour | shape | size | cell |",
                  "|---|---|---|---|---|"]
        for k, v in dg["salience"].items():
            lines.append(f"| {k} | {v['color']:.2f} | {v['shape']:.2f} | {v['size']:.2f} | "
                         f"{v['cell']:.2f} |")
        probe = dg.get("caption_shape_probe")
        if probe:
            lines += ["", "Shape read linearly from the text features (a ridge classifier fit on the "
                      "seen colour-shape pairs' captions; accuracy on the seen / held-out pairs' "
                      "captions):", "", "| features | seen | held-out |", "|---|---|---|"]
            for k, v in probe.items():
                lines.append(f"| {k.replace('_', ' ')} | {100 * v['seen']:.0f}% | "
                             f"{100 * v['heldout']:.0f}% |")
        lines += ["", "The decoder's one-step clean-image estimate from single-object test images "
                  "noised to step t (of 1000), fed their true embeddings and captions, read by "
                  "the analyser:", "", "| t | colour | shape | position | csp |",
                  "|---|---|---|---|---|"]
        for t, v in dg["denoising_probe"].items():
            lines.append(f"| {t} | {_pct(v['color'])} | {_pct(v['shape'])} | "
                         f"{_pct(v['position'])} | {_pct(v['csp'])} |")
    if "seconds" in res:
        lines += ["", "## Time (seconds)", "", "| part | s |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in res["seconds"].items()]
    imgs = res.get("_images", {})
    for k, (images, prompts) in imgs.items():
        name = f"samples_{k}.png"
        save_grid(os.path.join(d, name), images[:24], prompts[:24], cols=8, cell=96)
        lines += ["", f"### {k} prompts (first 24)", "", f"![{k}]({name})"]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
