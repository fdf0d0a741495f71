"""The whole text-to-image pipeline against diffusers' UnCLIPPipeline with the same imported
weights, the same initial latents and the same per-step noise; bad input; the CLI."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from peers import nchw_to_nhwc, tiny_unclip_pipeline  # noqa: E402

STEPS = dict(prior=5, decoder=6, super_res=3)


@pytest.fixture(scope="module")
def peer_and_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("karlo_tiny"))
    pipe = tiny_unclip_pipeline(path, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe, path


@pytest.fixture(scope="module")
def peer_dir(peer_and_dir):
    return peer_and_dir[1]


@pytest.fixture(scope="module")
def ours(peer_dir):
    from unclip_jax.pipeline import UnCLIPPipeline

    return UnCLIPPipeline.from_diffusers(peer_dir, progress=False)


def _peer_noise(peer, steps, shapes, seed):
    """Replays the per-step noise diffusers draws from one generator: every prior step with
    t > 0, then every decoder step, then every super-res step (NHWC, zeros where t = 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for stage, sched in (("prior", peer.prior_scheduler), ("decoder", peer.decoder_scheduler),
                         ("super_res", peer.super_res_scheduler)):
        sched.set_timesteps(steps[stage])
        draws = []
        for t in sched.timesteps:
            z = torch.randn(shapes[stage], generator=g) if int(t) > 0 else torch.zeros(shapes[stage])
            draws.append(nchw_to_nhwc(z))
        out[stage] = np.stack(draws)
    return out


def _peer_images(peer, prompts, latents, guidance, steps=STEPS, seed=5):
    """diffusers' images [N, H, W, 3] for the given initial latents, its noise drawn from one
    generator seeded `seed` (what `_peer_noise` replays)."""
    return peer(prompts, prior_num_inference_steps=steps["prior"],
                decoder_num_inference_steps=steps["decoder"],
                super_res_num_inference_steps=steps["super_res"],
                generator=torch.Generator().manual_seed(seed), prior_latents=latents["prior"],
                decoder_latents=latents["decoder"], super_res_latents=latents["super_res"],
                prior_guidance_scale=guidance[0], decoder_guidance_scale=guidance[1],
                output_type="np").images


@pytest.mark.parametrize("prompts,guidance", [
    (["a red circle", "blue square!"], (4.0, 8.0)),
    (["", "a long prompt that gets cut by the context"], (2.5, 1.0)),
])
def test_pipeline_matches_diffusers(peer_and_dir, ours, prompts, guidance):
    import jax.numpy as jnp

    peer = peer_and_dir[0]  # (diffusers cannot reload its deprecated UnCLIPTextProjModel)
    n = len(prompts)
    d = peer.prior.config.embedding_dim
    ds, ss = peer.decoder.config.sample_size, peer.super_res_first.config.sample_size
    shapes = dict(prior=(n, d), decoder=(n, 3, ds, ds), super_res=(n, 3, ss, ss))
    g = torch.Generator().manual_seed(11)
    latents = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    out = _peer_images(peer, prompts, latents, guidance)
    noise = _peer_noise(peer, STEPS, shapes, 5)
    with pytest.warns(UserWarning, match="longer than the context") if "long" in prompts[1] \
            else _no_warning():
        res = ours.generate_float(
            prompts, prior_steps=STEPS["prior"], decoder_steps=STEPS["decoder"],
            super_res_steps=STEPS["super_res"], prior_guidance=guidance[0],
            decoder_guidance=guidance[1], prior_candidates=1,
            latents={k: jnp.asarray(nchw_to_nhwc(v)) for k, v in latents.items()},
            noise={k: jnp.asarray(v) for k, v in noise.items()}, coefficient_dtype="float32")
    got = np.asarray(res["images"])
    assert got.shape == out.shape == (n, ss, ss, 3)
    assert np.abs(got - out).max() <= 1e-3
    # the images are not trivially equal (e.g. all saturated): they vary across the picture
    assert out.std() > 0.05


class _no_warning:
    def __enter__(self):
        import warnings

        self._c = warnings.catch_warnings()
        self._c.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *a):
        self._c.__exit__(*a)


def test_generate_uint8_and_candidates(ours):
    imgs = ours.generate(["red circle", "green"], seed=3, prior_steps=3, decoder_steps=3,
                         super_res_steps=2, num_images_per_prompt=2)
    assert imgs.dtype == np.uint8 and imgs.shape == (4, 16, 16, 3)
    again = ours.generate(["red circle", "green"], seed=3, prior_steps=3, decoder_steps=3,
                          super_res_steps=2, num_images_per_prompt=2)
    np.testing.assert_array_equal(imgs, again)  # deterministic by seed
    other = ours.generate(["red circle", "green"], seed=4, prior_steps=3, decoder_steps=3,
                          super_res_steps=2, num_images_per_prompt=2)
    assert np.abs(imgs.astype(int) - other).max() > 0


def test_prior_keeps_the_candidate_closest_to_the_text():
    import jax.numpy as jnp

    from unclip_jax.pipeline import _pick_closest

    text = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    cands = jnp.array([[[0.0, 3.0], [2.0, 0.1]], [[0.0, 3.0], [2.0, 0.1]]])
    np.testing.assert_allclose(np.asarray(_pick_closest(cands, text)), [[2.0, 0.1], [0.0, 3.0]])


@pytest.mark.parametrize("kw,msg", [
    (dict(prior_guidance=float("nan")), "prior_guidance must be a finite number >= 1"),
    (dict(decoder_guidance=0.5), "decoder_guidance must be a finite number >= 1"),
    (dict(prior_steps=0), "prior_steps must be a positive integer"),
    (dict(super_res_steps=-1), "super_res_steps must be a positive integer"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
])
def test_bad_generate_arguments(ours, kw, msg):
    with pytest.raises(ValueError, match=msg):
        ours.generate(["x"], **kw)


def test_not_a_pipeline_directory(tmp_path):
    from unclip_jax.convert.diffusers_pipeline import NotAPipelineError
    from unclip_jax.pipeline import UnCLIPPipeline

    with pytest.raises(NotAPipelineError, match="no model_index.json"):
        UnCLIPPipeline.from_diffusers(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(NotAPipelineError, match="not an UnCLIPPipeline"):
        UnCLIPPipeline.from_diffusers(str(tmp_path))


def test_cli_sample_writes_a_grid(peer_dir, tmp_path, capsys):
    from PIL import Image

    from unclip_jax.cli import main

    out = tmp_path / "grid.png"
    rc = main(["sample", "--pipeline", peer_dir, "--prompt", "a red circle", "--prompt", "blue",
               "--num", "2", "--seed", "1", "--out", str(out), "--prior-steps", "2",
               "--decoder-steps", "2", "--super-res-steps", "2", "--quiet"])
    assert rc == 0
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 32
    assert "wrote 4 images (16x16)" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from unclip_jax.cli import main

    rc = main(["sample", "--pipeline", str(tmp_path), "--prompt", "x", "--out",
               str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "not a diffusers pipeline directory" in err
    assert not (tmp_path / "g.png").exists()


def test_bfloat16_pipeline_tracks_float32(peer_dir, ours):
    """dtype='bfloat16' runs every network in bf16 with bf16 weights: the same pipeline up to
    bf16 rounding (relative error ~1e-2 on the stages' outputs), float32 sampler arithmetic."""
    from unclip_jax.pipeline import UnCLIPPipeline

    bf = UnCLIPPipeline.from_diffusers(peer_dir, progress=False, dtype="bfloat16")
    leaves = jax_leaves(bf.decoder.params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert bf.prior.params["clip_std"].dtype == jnp.float32  # statistics, not weights
    assert bf.decoder.config.unet.dtype == "bfloat16" and bf.text_config.dtype == "bfloat16"
    # one call of each network: bf16 rounding (2^-8 per op, ~1e-2 through the layers), no more
    cond, uncond = ours.text_conditioning(["red circle", "a blue square"])
    cond_bf, _ = bf.text_conditioning(["red circle", "a blue square"])
    assert 1e-4 < _rel(cond_bf["text_hidden"], cond["text_hidden"]) < 5e-2
    ks = jax.random.split(jax.random.key(0), 5)
    t = jnp.array([999, 400])
    emb = jax.random.normal(ks[0], (2, cond["text_embed"].shape[1]))
    z = jax.random.normal(ks[1], (2, emb.shape[1]))
    assert 1e-4 < _rel(bf._prior_fn(bf.prior.params, z, t, cond),
                       ours._prior_fn(ours.prior.params, z, t, cond)) < 5e-2
    dc, _ = ours._decoder_inputs(emb, cond, uncond)
    x = jax.random.normal(ks[2], (2, 8, 8, 3))
    assert 1e-4 < _rel(bf._decoder_fn(bf.decoder.params, x, t, dc),
                       ours._decoder_fn(ours.decoder.params, x, t, dc)) < 5e-2
    xs = jax.random.normal(ks[3], (2, 16, 16, 3))
    low = {"low_res": jax.random.normal(ks[4], (2, 16, 16, 3))}
    sr = lambda p: p._sr_first_fn(p.super_res_first.params, xs, t, low)  # noqa: E731
    assert 1e-4 < _rel(sr(bf), sr(ours)) < 5e-2
    # the whole pipeline: finite, and the prior's output close. (Guided sampling compounds the
    # rounding through these random, far-from-smooth networks: the decoder's images drift 15-70%
    # in 4 steps, so they are not compared.)
    kw = dict(seed=5, prior_steps=4, decoder_steps=4, super_res_steps=2, prior_candidates=1)
    ref = ours.generate_float(["red circle", "a blue square"], **kw)
    out = bf.generate_float(["red circle", "a blue square"], **kw)
    assert all(np.isfinite(np.asarray(out[k])).all() for k in ("image_embeds", "low_res", "images"))
    assert _rel(out["image_embeds"], ref["image_embeds"]) < 5e-2
    with pytest.raises(ValueError, match="dtype"):
        UnCLIPPipeline.from_diffusers(peer_dir, dtype="int8")


def jax_leaves(tree):
    return jax.tree.leaves(tree)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_data_parallel_sampling_equals_one_device(peer_dir, ours):
    """data_parallel=True splits the batch over the local devices (8 virtual CPU devices here):
    the same images as one device, the latents really sharded."""
    from unclip_jax.pipeline import UnCLIPPipeline

    assert jax.local_device_count() == 8  # conftest
    dp = UnCLIPPipeline.from_diffusers(peer_dir, progress=False, data_parallel=True)
    kw = dict(seed=2, prior_steps=3, decoder_steps=3, super_res_steps=2, prior_candidates=1,
              prior_guidance=4.0, decoder_guidance=4.0)
    prompts = ["red circle", "a blue square", "green", "a big thing"] * 2
    ref = ours.generate_float(prompts, **kw)
    out = dp.generate_float(prompts, **kw)
    assert len(out["low_res"].sharding.device_set) == 8
    # per-device programs round differently (one decoder call: ~6e-6); the random super-res
    # network's x0 clipping turns that into visible flips, so its images are not compared
    for key in ("image_embeds", "low_res"):
        np.testing.assert_allclose(out[key], ref[key], atol=1e-4, rtol=1e-4)
    # a batch that does not split evenly runs on one device: the same program, the same bits
    odd = dp.generate_float(prompts[:3], **kw)
    np.testing.assert_array_equal(odd["images"], ours.generate_float(prompts[:3], **kw)["images"])
