"""ADM UNet / unCLIP decoder / upsampler: parity with diffusers (float32 CPU), import errors."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.convert import diffusers_unet
from unclip_jax.convert.torch_io import CheckpointMismatchError
from unclip_jax.models import decoder as decoder_lib
from unclip_jax.models import unet as unet_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4

# Karlo's decoder family (UNet2DConditionModel), tiny.
DECODER_CONFIGS = {
    "karlo_like": dict(
        sample_size=8, in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24,
        attention_head_dim=8, resnet_time_scale_shift="scale_shift", class_embed_type="identity"),
    # three levels, attention at two, per-level head widths (diffusers' up-block indexing quirk),
    # 8 norm groups, explicit time embedding width
    "three_levels": dict(
        sample_size=16, in_channels=3, out_channels=6,
        down_block_types=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D",
                          "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D",
                        "SimpleCrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(16, 32, 32), layers_per_block=2, cross_attention_dim=20,
        attention_head_dim=(8, 16, 16), norm_num_groups=8, time_embedding_dim=48,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity"),
}

# Karlo's super-res family (UNet2DModel), tiny.
SUPER_RES_CONFIGS = {
    # diffusers' UnCLIP fast-test layout: default shift, mid attention with GroupNorm
    "fast_test": dict(
        sample_size=8, in_channels=6, out_channels=3, layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        block_out_channels=(32, 64)),
    # Karlo-like: scale-shift, no attention, learned variance, three levels
    "scale_shift": dict(
        sample_size=16, in_channels=6, out_channels=6, layers_per_block=2,
        down_block_types=("ResnetDownsampleBlock2D",) * 3,
        up_block_types=("ResnetUpsampleBlock2D",) * 3,
        block_out_channels=(16, 32, 32), norm_num_groups=8, resnet_time_scale_shift="scale_shift",
        add_attention=False),
    # conv samplers, scale-shift mid attention without GroupNorm, single head
    "conv_updown": dict(
        sample_size=8, in_channels=6, out_channels=3, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), norm_num_groups=8, resnet_time_scale_shift="scale_shift",
        attention_head_dim=None),
}


def _randomise(model, seed):
    """Random values for every parameter (zero-initialised conv_out / null embedding included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _sd(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _cmp(ours, theirs):
    diff = np.abs(np.asarray(ours) - np.asarray(theirs).transpose(0, 2, 3, 1)).max()
    assert diff <= TOL, diff
    return diff


def _cond_unet(name, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return _randomise(UNet2DConditionModel(**DECODER_CONFIGS[name]), seed)


def _text_proj(unet_kwargs, clip_dim, seed=0):
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(seed)
    m = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=clip_dim,
                            time_embed_dim=unet_kwargs.get("time_embedding_dim")
                            or 4 * unet_kwargs["block_out_channels"][0],
                            cross_attention_dim=unet_kwargs["cross_attention_dim"])
    return _randomise(m, seed + 1)


def _apply(model):
    return jax.jit(model.apply)


def _mask(rng, b, n):
    m = np.ones((b, n), bool)
    for i in range(b):
        m[i, rng.integers(2, n + 1):] = False  # padded tail, as from a tokenizer
    return m


# ----------------------------------------------------------------------------------------------
# (a) the decoder UNet

@pytest.mark.parametrize("name", sorted(DECODER_CONFIGS))
def test_cond_unet_parity(name):
    kw = DECODER_CONFIGS[name]
    tm = _cond_unet(name)
    cfg = diffusers_unet.unet_config_from_diffusers(dict(tm.config))
    params = diffusers_unet.convert_unet(_sd(tm), cfg)
    rng = np.random.default_rng(0)
    b, s, L = 2, kw["sample_size"], 6
    x = rng.standard_normal((b, 3, s, s)).astype(np.float32)
    t = np.array([3, 917])
    ctx = rng.standard_normal((b, L, kw["cross_attention_dim"])).astype(np.float32)
    mask = _mask(rng, b, L)
    tc = rng.standard_normal((b, cfg.emb_dim)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx),
                 class_labels=torch.from_numpy(tc), attention_mask=torch.from_numpy(mask)).sample.numpy()
    apply = _apply(unet_lib.UNet(cfg))
    run = lambda m: apply({"params": params}, _nhwc(x), jnp.asarray(t),  # noqa: E731
                          context=jnp.asarray(ctx), context_mask=jnp.asarray(m),
                          time_cond=jnp.asarray(tc))
    out = run(mask)
    assert out.shape == (b, s, s, 6)
    _cmp(out, ref)
    # the mask matters (masked tokens really are ignored)
    assert np.abs(np.asarray(run(np.ones_like(mask))) - np.asarray(out)).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# (b) the decoder: UnCLIPTextProjModel + UNet, conditional and classifier-free-guidance batches

def _pipeline_decoder_call(tm, tp, x, t, img, prompt, hid, mask, neg=None, neg_hid=None, neg_mask=None):
    """What UnCLIPPipeline does for one decoder step (with guidance when `neg` is given)."""
    import torch.nn.functional as F

    T = torch.from_numpy
    cfg = neg is not None
    if cfg:
        prompt = np.concatenate([neg, prompt])
        hid = np.concatenate([neg_hid, hid])
        mask = np.concatenate([neg_mask, mask])
        x = np.concatenate([x, x])
    with torch.no_grad():
        h, add = tp(image_embeddings=T(img), prompt_embeds=T(prompt), text_encoder_hidden_states=T(hid),
                    do_classifier_free_guidance=cfg)
        m = F.pad(T(mask), (tp.clip_extra_context_tokens, 0), value=True)
        return tm(T(x), torch.tensor(t), encoder_hidden_states=h, class_labels=add,
                  attention_mask=m).sample.numpy()


@pytest.mark.parametrize("name", sorted(DECODER_CONFIGS))
def test_decoder_parity(name, tmp_path):
    kw = DECODER_CONFIGS[name]
    clip_dim = 16
    tm, tp = _cond_unet(name, seed=3), _text_proj(kw, clip_dim, seed=4)
    if name == "karlo_like":  # also the save_pretrained loader
        tm.save_pretrained(tmp_path / "decoder")
        tp.save_pretrained(tmp_path / "text_proj")
        cfg, params = diffusers_unet.load_diffusers_decoder(str(tmp_path / "decoder"),
                                                            str(tmp_path / "text_proj"))
    else:
        cfg = diffusers_unet.decoder_config_from_diffusers(dict(tm.config), dict(tp.config))
        params = diffusers_unet.convert_decoder(_sd(tm), _sd(tp), cfg)
    assert cfg.clip_extra_context_tokens == 4 and cfg.clip_embed_dim == clip_dim
    assert cfg.unet.sample_size == kw["sample_size"]
    apply = _apply(decoder_lib.Decoder(cfg))
    rng = np.random.default_rng(1)
    b, s, L = 2, kw["sample_size"], 5
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    x, img, prompt, hid = f32(b, 3, s, s), f32(b, clip_dim), f32(b, clip_dim), f32(b, L, clip_dim)
    neg, neg_hid = f32(b, clip_dim), f32(b, L, clip_dim)
    mask, neg_mask = _mask(rng, b, L), np.zeros((b, L), bool)
    neg_mask[:, :2] = True  # the empty prompt: start and end tokens
    t = 17
    cat = lambda a, c: np.concatenate([a, c])  # noqa: E731
    J = jnp.asarray

    # guidance: [uncond (learned null embedding, empty prompt), cond]
    ref = _pipeline_decoder_call(tm, tp, x, t, img, prompt, hid, mask, neg, neg_hid, neg_mask)
    out = apply({"params": params}, _nhwc(cat(x, x)), jnp.full((2 * b,), t), J(cat(f32(b, clip_dim), img)),
                J(cat(neg, prompt)), J(cat(neg_hid, hid)), J(cat(neg_mask, mask)),
                null_image=J([True] * b + [False] * b))
    _cmp(out, ref)

    # conditional only (the pipeline without guidance), same shapes: no recompilation
    x2, img2 = cat(x, f32(b, 3, s, s)), cat(img, f32(b, clip_dim))
    ref = _pipeline_decoder_call(tm, tp, x2, t, img2, cat(prompt, neg), cat(hid, neg_hid),
                                 cat(mask, neg_mask))
    out = apply({"params": params}, _nhwc(x2), jnp.full((2 * b,), t), J(img2), J(cat(prompt, neg)),
                J(cat(hid, neg_hid)), J(cat(mask, neg_mask)), null_image=J([False] * (2 * b)))
    _cmp(out, ref)


# ----------------------------------------------------------------------------------------------
# (c) the super-resolution UNet

@pytest.mark.parametrize("name", sorted(SUPER_RES_CONFIGS))
def test_super_res_parity(name, tmp_path):
    from diffusers import UNet2DModel

    kw = SUPER_RES_CONFIGS[name]
    torch.manual_seed(0)
    tm = _randomise(UNet2DModel(**kw), 5)
    if name == "scale_shift":  # also the save_pretrained loader
        tm.save_pretrained(tmp_path / "sr")
        cfg, params = diffusers_unet.load_diffusers_unet(str(tmp_path / "sr"))
    else:
        cfg = diffusers_unet.unet_config_from_diffusers(dict(tm.config), class_name="UNet2DModel")
        params = diffusers_unet.convert_unet(_sd(tm), cfg)
    rng = np.random.default_rng(2)
    b, s = 2, kw["sample_size"]
    x = rng.standard_normal((b, 6, s, s)).astype(np.float32)
    t = np.array([999, 0])
    with torch.no_grad():
        ref = tm(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    out = _apply(unet_lib.UNet(cfg))({"params": params}, _nhwc(x), jnp.asarray(t))
    assert out.shape == (b, s, s, kw["out_channels"]) and cfg.sample_size == s
    _cmp(out, ref)


# ----------------------------------------------------------------------------------------------
# (d) the upsampler's low-res input

@pytest.mark.parametrize("src,dst", [((8, 8), (16, 16)), ((8, 8), (32, 32)), ((5, 7), (16, 12)),
                                     ((16, 16), (8, 8))])
def test_upsample_input_matches_pipeline(src, dst):
    import torch.nn.functional as F

    x = np.random.default_rng(3).uniform(-1, 1, (2, 3) + src).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=list(dst), mode="bicubic", align_corners=False,
                        antialias=True).numpy()
    out = unet_lib.upsample_input(_nhwc(x), dst)
    assert out.shape == (2,) + dst + (3,)
    _cmp(out, ref)
    ref = F.interpolate(torch.from_numpy(x), size=list(dst)).numpy()  # the MPS fallback
    _cmp(unet_lib.upsample_input(_nhwc(x), dst, method="nearest"), ref)


# ----------------------------------------------------------------------------------------------
# (e), (f) import errors

def test_wrong_shape_names_parameter_and_shapes():
    tm = _cond_unet("karlo_like")
    cfg = diffusers_unet.unet_config_from_diffusers(dict(tm.config))
    sd = _sd(tm)
    key = "down_blocks.1.attentions.0.to_q.weight"
    sd[key] = sd[key][:32]
    with pytest.raises(CheckpointMismatchError) as e:
        diffusers_unet.convert_unet(sd, cfg)
    msg = str(e.value)
    assert key in msg and "(32, 64)" in msg and "(64, 64)" in msg and "down_1/attn_0/to_q" in msg

    tp = _text_proj(DECODER_CONFIGS["karlo_like"], 16)
    dcfg = diffusers_unet.decoder_config_from_diffusers(dict(tm.config), dict(tp.config))
    tsd = _sd(tp)
    tsd["clip_extra_context_tokens_proj.weight"] = tsd["clip_extra_context_tokens_proj.weight"][:, :8]
    with pytest.raises(CheckpointMismatchError, match="clip_extra_context_tokens_proj.weight"):
        diffusers_unet.convert_decoder(_sd(tm), tsd, dcfg)


def test_missing_and_extra_tensors():
    tm = _cond_unet("karlo_like")
    cfg = diffusers_unet.unet_config_from_diffusers(dict(tm.config))
    sd = _sd(tm)
    del sd["conv_out.bias"]
    with pytest.raises(CheckpointMismatchError, match="conv_out.bias"):
        diffusers_unet.convert_unet(sd, cfg)
    sd = _sd(tm)
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointMismatchError, match="extra.weight"):
        diffusers_unet.convert_unet(sd, cfg)


@pytest.mark.parametrize("change,needle", [
    (dict(down_block_types=("ResnetDownsampleBlock2D", "CrossAttnDownBlock2D")), "CrossAttnDownBlock2D"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "UNetMidBlock2DCrossAttn"),
    (dict(up_block_types=("SimpleCrossAttnUpBlock2D", "AttnUpBlock2D")), "AttnUpBlock2D"),
    (dict(addition_embed_type="text"), "addition_embed_type"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(only_cross_attention=True), "only_cross_attention"),
])
def test_unsupported_config_raises(change, needle):
    cfg = dict(DECODER_CONFIGS["karlo_like"], _class_name="UNet2DConditionModel", **change)
    with pytest.raises(ValueError, match=needle):
        diffusers_unet.unet_config_from_diffusers(cfg)


def test_unsupported_super_res_block_raises(tmp_path):
    cfg = dict(SUPER_RES_CONFIGS["fast_test"], _class_name="UNet2DModel",
               down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        diffusers_unet.load_diffusers_unet(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# our own features

def test_config_roundtrip_and_features():
    cfg = unet_lib.UNetConfig(in_channels=6, out_channels=3, block_out_channels=(16, 32),
                              layers_per_block=1, attention_head_dim=8, norm_groups=8,
                              noise_level_cond=True, dropout=0.1, remat=True)
    assert unet_lib.UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    dcfg = decoder_lib.DecoderConfig(unet=unet_lib.UNetConfig(block_out_channels=(16, 32), norm_groups=8,
                                                           attention_head_dim=8, context_dim=12,
                                                           time_cond=True), clip_embed_dim=10)
    assert decoder_lib.DecoderConfig.from_dict(json.loads(json.dumps(dcfg.to_dict()))) == dcfg

    model = unet_lib.UNet(cfg)
    x, t, kw = unet_lib.init_inputs(cfg, batch=2, size=8)
    variables = jax.jit(model.init)(jax.random.key(0), x, t, **kw)
    # logical axis names on the params
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["conv_in"]["kernel"]) == ("conv_height", "conv_width", "conv_in", "conv_out")
    assert tuple(specs["time_embed"]["linear_1"]["dense"]["kernel"]) == ("embed", "mlp")
    # noise level changes the output; dropout is active only when training
    apply = jax.jit(model.apply, static_argnames=("train",))
    a = apply(variables, x, t, noise_level=jnp.array([0, 0]))
    b = apply(variables, x, t, noise_level=jnp.array([0, 300]))
    assert np.allclose(a[0], b[0]) and not np.allclose(a[1], b[1])
    c = apply(variables, x, t, noise_level=jnp.array([0, 0]), train=True,
                    rngs={"dropout": jax.random.key(1)})
    assert c.shape == a.shape
    with pytest.raises(ValueError, match="divisible"):
        model.apply(variables, jnp.zeros((1, 7, 7, 6)), t[:1], noise_level=t[:1])


def test_coord_input():
    """coord_input appends (y, x) pixel-centre coordinates in [-1, 1] to conv_in's input: with
    those two kernel rows zeroed the net equals the plain net on the same other weights."""
    g = unet_lib.coordinate_channels(2, 4, 8)
    assert g.shape == (2, 4, 8, 2)
    np.testing.assert_allclose(g[0, :, 0, 0], [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(g[1, 0, :, 1], (np.arange(8) + 0.5) / 4 - 1)
    base = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                attention_head_dim=8, norm_groups=8)
    plain, coord = unet_lib.UNetConfig(**base), unet_lib.UNetConfig(**base, coord_input=True)
    x, t, _ = unet_lib.init_inputs(plain, batch=2, size=8)
    x = jax.random.normal(jax.random.key(3), x.shape)
    v = nn.unbox(unet_lib.UNet(coord).init(jax.random.key(0), x, t))
    k = v["params"]["conv_in"]["kernel"]
    assert k.shape[2] == 5

    def with_conv_in(kernel):
        conv_in = {**v["params"]["conv_in"], "kernel": kernel}
        return {"params": {**v["params"], "conv_in": conv_in}}

    zeroed, v_plain = with_conv_in(k.at[:, :, 3:].set(0.0)), with_conv_in(k[:, :, :3])
    want = unet_lib.UNet(plain).apply(v_plain, x, t)
    np.testing.assert_allclose(unet_lib.UNet(coord).apply(zeroed, x, t), want, atol=1e-5)
    assert not np.allclose(unet_lib.UNet(coord).apply(v, x, t), want, atol=1e-3)


def test_patch_size_folds_pixels_into_channels_and_back():
    """patch_size p: space_to_depth puts pixel (p i + dy, p j + dx, c) at patch (i, j), channel
    (dy p + dx) C + c; depth_to_space inverts it; a patched UNet maps [B, H, W, 3] to
    [B, H, W, out] and its conv_in sees 3 p^2 (+ 2 p^2 coordinate) channels."""
    from unclip_jax.models.unet import depth_to_space, space_to_depth

    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    y = np.asarray(space_to_depth(jnp.asarray(x), 2))
    assert y.shape == (2, 4, 6, 12)
    for (i, j, dy, dx, c) in [(0, 0, 0, 0, 0), (3, 5, 1, 0, 2), (2, 1, 1, 1, 1)]:
        assert y[1, i, j, (dy * 2 + dx) * 3 + c] == x[1, 2 * i + dy, 2 * j + dx, c]
    np.testing.assert_array_equal(np.asarray(depth_to_space(jnp.asarray(y), 2)), x)
    cfg = unet_lib.UNetConfig(block_out_channels=(16, 32), layers_per_block=1, norm_groups=8,
                     attention_levels=(False, True), attention_head_dim=8, patch_size=2,
                     coord_input=True, context_dim=8)
    x, t, kw = unet_lib.init_inputs(cfg, batch=2, size=16)
    variables = nn.unbox(unet_lib.UNet(cfg).init(jax.random.key(0), x, t, **kw))
    assert variables["params"]["conv_in"]["kernel"].shape[2] == (3 + 2) * 4
    assert unet_lib.UNet(cfg).apply(variables, x, t, **kw).shape == (2, 16, 16, cfg.out_channels)
    with pytest.raises(ValueError, match="not divisible by 4"):
        unet_lib.UNet(cfg).apply(variables, jnp.zeros((1, 10, 10, 3)), t[:1], **{
            k: v[:1] for k, v in kw.items()})


def test_output_skip_adds_the_last_input_channels_to_the_output():
    """output_skip k: out[..., :k] = network + x[..., -k:]; with conv_out zeroed the UNet returns
    exactly the skipped input (an upsampler's bicubic image) and zeros elsewhere."""
    cfg = unet_lib.UNetConfig(in_channels=6, out_channels=3, block_out_channels=(16, 32),
                              layers_per_block=1, norm_groups=8, attention_levels=(False, False),
                              mid_block="resnets", output_skip=3)
    x, t, kw = unet_lib.init_inputs(cfg, batch=2, size=8)
    x = jax.random.normal(jax.random.key(1), x.shape)
    params = nn.unbox(unet_lib.UNet(cfg).init(jax.random.key(0), x, t, **kw))["params"]
    full = unet_lib.UNet(cfg).apply({"params": params}, x, t, **kw)
    plain = unet_lib.UNet(dataclasses.replace(cfg, output_skip=0)).apply(
        {"params": params}, x, t, **kw)
    np.testing.assert_allclose(np.asarray(full), np.asarray(plain + x[..., 3:]), atol=1e-6)
    params = dict(params, conv_out=jax.tree.map(jnp.zeros_like, params["conv_out"]))
    np.testing.assert_array_equal(
        np.asarray(unet_lib.UNet(cfg).apply({"params": params}, x, t, **kw)), np.asarray(x[..., 3:]))
    with pytest.raises(ValueError, match="output_skip"):
        unet_lib.UNetConfig(in_channels=6, out_channels=3, output_skip=4)
