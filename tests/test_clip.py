"""CLIP in Flax vs transformers (random weights, tiny shapes, float32, CPU), the HF weight
import, and the tokenizer wrapper. Nothing is downloaded."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unclip_jax.convert import hf_clip  # noqa: E402
from unclip_jax.convert.torch_io import CheckpointMismatchError  # noqa: E402
from unclip_jax.models import clip  # noqa: E402

TOL = 1e-4
VOCAB = 64

TEXT_SHAPES = [
    dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
         hidden_act="quick_gelu", projection_dim=16),
    dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
         hidden_act="gelu", projection_dim=24),
]
VISION_SHAPES = [
    dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
         hidden_act="quick_gelu", image_size=16, patch_size=4, projection_dim=16),
    dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
         hidden_act="gelu", image_size=24, patch_size=8, projection_dim=24),
]


def _hf_text_config(shape, eos_token_id=VOCAB - 1):
    return transformers.CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=12,
                                       eos_token_id=eos_token_id, bos_token_id=VOCAB - 2,
                                       pad_token_id=1, **shape)


def _hf_vision_config(shape):
    return transformers.CLIPVisionConfig(num_channels=3, **shape)


def _randomise(model, seed):
    """transformers initialises LayerNorms to (1, 0): perturb every tensor so they count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _save(model, path):
    model.save_pretrained(str(path))
    return str(path)


def _text_batch(eos, length=10):
    """A padded batch: rows of different lengths, BOS ... EOS then EOS padding (CLIP style),
    attention mask 1 on real tokens. Token ids stay below eos so argmax pooling is also valid."""
    rng = np.random.default_rng(0)
    lengths = [10, 4, 7]
    ids = np.full((len(lengths), length), eos, np.int64)
    mask = np.zeros((len(lengths), length), np.int64)
    for b, n in enumerate(lengths):
        ids[b, 0] = VOCAB - 2
        ids[b, 1:n - 1] = rng.integers(3, VOCAB - 2, size=n - 2)
        ids[b, n - 1] = eos
        mask[b, :n] = 1
    return ids, mask


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("shape", TEXT_SHAPES, ids=["h32_l2_quickgelu", "h48_l3_gelu"])
def test_text_parity(shape, tmp_path):
    torch.manual_seed(0)
    hf = _randomise(transformers.CLIPTextModelWithProjection(_hf_text_config(shape)), 1)
    kind, cfg, params = hf_clip.load_hf_clip(_save(hf, tmp_path / "text"))
    assert kind == "text" and isinstance(cfg, clip.CLIPTextConfig)
    assert cfg.projection_dim == shape["projection_dim"] and cfg.hidden_act == shape["hidden_act"]
    ids, mask = _text_batch(cfg.eos_token_id)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    model = clip.CLIPTextModelWithProjection(cfg)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32),
                               jnp.asarray(mask, jnp.int32))
    assert out["text_embeds"].shape == (3, shape["projection_dim"])
    assert _max_diff(out["text_embeds"], ref.text_embeds) <= TOL
    assert _max_diff(out["last_hidden_state"], ref.last_hidden_state) <= TOL
    # pooled output is the final-LN state at the first eos position
    first_eos = np.argmax(ids == cfg.eos_token_id, axis=1)
    np.testing.assert_allclose(out["pooled_output"],
                               np.asarray(out["last_hidden_state"])[np.arange(3), first_eos])
    # no mask: plain causal attention, same as transformers without a mask
    with torch.no_grad():
        ref2 = hf(input_ids=torch.from_numpy(ids))
    out2 = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    assert _max_diff(out2["text_embeds"], ref2.text_embeds) <= TOL
    assert _max_diff(out2["last_hidden_state"], ref2.last_hidden_state) <= TOL


def test_text_legacy_eos_argmax_pooling(tmp_path):
    """eos_token_id == 2 (old configs): pool at argmax(input_ids), like transformers."""
    torch.manual_seed(0)
    hf = _randomise(transformers.CLIPTextModelWithProjection(
        _hf_text_config(TEXT_SHAPES[0], eos_token_id=2)), 2)
    kind, cfg, params = hf_clip.load_hf_clip(_save(hf, tmp_path / "legacy"))
    assert cfg.eos_token_id == 2
    ids, mask = _text_batch(VOCAB - 1)
    ids[1, 2] = VOCAB - 1  # an id equal to the max earlier in the row: argmax takes the first
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = jax.jit(clip.CLIPTextModelWithProjection(cfg).apply)(
        {"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert _max_diff(out["text_embeds"], ref.text_embeds) <= TOL


@pytest.mark.parametrize("shape", VISION_SHAPES, ids=["h32_p4_quickgelu", "h48_p8_gelu"])
def test_vision_parity(shape, tmp_path):
    torch.manual_seed(0)
    hf = _randomise(transformers.CLIPVisionModelWithProjection(_hf_vision_config(shape)), 3)
    kind, cfg, params = hf_clip.load_hf_clip(_save(hf, tmp_path / "vision"))
    assert kind == "vision" and isinstance(cfg, clip.CLIPVisionConfig)
    s = shape["image_size"]
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        ref = hf(pixel_values=x)
    out = jax.jit(clip.CLIPVisionModelWithProjection(cfg).apply)(
        {"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    assert _max_diff(out["image_embeds"], ref.image_embeds) <= TOL
    assert _max_diff(out["last_hidden_state"], ref.last_hidden_state) <= TOL


@pytest.mark.parametrize("ti,vi", [(0, 0), (1, 1)], ids=["small", "larger"])
def test_clip_model_parity(ti, vi, tmp_path):
    torch.manual_seed(0)
    tshape, vshape = dict(TEXT_SHAPES[ti]), dict(VISION_SHAPES[vi])
    proj = 20 + 4 * ti
    hf_cfg = transformers.CLIPConfig(text_config=_hf_text_config(tshape).to_dict(),
                                     vision_config=_hf_vision_config(vshape).to_dict(),
                                     projection_dim=proj, logit_scale_init_value=1.5)
    hf = _randomise(transformers.CLIPModel(hf_cfg), 4)
    path = _save(hf, tmp_path / "clip")
    kind, cfg, params = hf_clip.load_hf_clip(path)
    assert kind == "clip" and isinstance(cfg, clip.CLIPConfig) and cfg.projection_dim == proj
    assert clip.CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

    ids, mask = _text_batch(cfg.text.eos_token_id)
    s = vshape["image_size"]
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 pixel_values=x)
    model = clip.CLIPModel(cfg)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32),
                               jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(mask, jnp.int32))
    assert out["logits_per_text"].shape == (3, 2) and out["logits_per_image"].shape == (2, 3)
    assert _max_diff(out["logits_per_text"], ref.logits_per_text) <= TOL
    assert _max_diff(out["logits_per_image"], ref.logits_per_image) <= TOL
    assert _max_diff(out["text_embeds"], ref.text_embeds) <= TOL
    assert _max_diff(out["image_embeds"], ref.image_embeds) <= TOL

    if ti == 0:
        # one tower of a CLIPModel checkpoint, read on its own, matches the full model
        _, tcfg, tparams = hf_clip.load_hf_clip(path, kind="text")
        assert tcfg.projection_dim == proj
        t = jax.jit(clip.CLIPTextModelWithProjection(tcfg).apply)(
            {"params": tparams}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
        feats = jax.jit(lambda p, i, m: model.apply(
            {"params": p}, i, m, method=clip.CLIPModel.get_text_features))(
            params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
        np.testing.assert_allclose(t["text_embeds"], feats, atol=1e-6)
        _, vcfg, vparams = hf_clip.load_hf_clip(path, kind="vision")
        assert set(vparams) == {"vision_model", "visual_projection"}
        # our own init produces the same tree structure and shapes as the import
        abstract = clip.init_params("clip", cfg)
        assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)


def test_text_model_without_projection(tmp_path):
    torch.manual_seed(0)
    hf = _randomise(transformers.CLIPTextModel(_hf_text_config(TEXT_SHAPES[0])), 5)
    kind, cfg, params = hf_clip.load_hf_clip(_save(hf, tmp_path / "plain"))
    assert kind == "text" and cfg.projection_dim is None and "text_projection" not in params
    ids, mask = _text_batch(cfg.eos_token_id)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = jax.jit(clip.CLIPTextModelWithProjection(cfg).apply)(
        {"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert "text_embeds" not in out
    assert _max_diff(out["pooled_output"], ref.pooler_output) <= TOL
    # the same weights as a torch .bin (read with weights_only=True) import identically
    binpath = tmp_path / "bin"
    binpath.mkdir()
    (binpath / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    torch.save(hf.state_dict(), str(binpath / "pytorch_model.bin"))
    _, cfg2, params2 = hf_clip.load_hf_clip(str(binpath))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_wrong_size_checkpoint_raises(tmp_path):
    torch.manual_seed(0)
    hf = transformers.CLIPTextModelWithProjection(_hf_text_config(TEXT_SHAPES[1]))  # hidden 48
    path = _save(hf, tmp_path / "h48")
    with open(f"{path}/config.json") as f:
        hf_cfg = json.load(f)
    cfg = hf_clip.clip_config_from_hf(hf_cfg).replace(hidden_size=32, num_heads=2,
                                                       intermediate_size=37)
    from unclip_jax.convert.torch_io import load_state_dict
    with pytest.raises(CheckpointMismatchError) as e:
        hf_clip.convert_clip_text(load_state_dict(path), cfg)
    msg = str(e.value)
    assert "token_embedding" in msg and "(64, 48)" in msg and "(64, 32)" in msg
    # the loader with a config.json edited to say hidden 32 fails the same way
    hf_cfg.update(hidden_size=32, num_attention_heads=2, intermediate_size=37)
    with open(f"{path}/config.json", "w") as f:
        json.dump(hf_cfg, f)
    with pytest.raises(CheckpointMismatchError, match=r"48.*32"):
        hf_clip.load_hf_clip(path)


def test_configs_roundtrip_and_bf16():
    t = clip.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_layers=1,
                            num_heads=2, max_position_embeddings=8, eos_token_id=VOCAB - 1,
                            projection_dim=16, dtype="bfloat16")
    v = clip.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_layers=1, num_heads=2,
                              image_size=8, patch_size=4, projection_dim=16)
    for c in (t, v, clip.CLIPConfig(text=t, vision=v, projection_dim=16)):
        assert type(c).from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError):
        clip.CLIPTextConfig(hidden_size=30, num_heads=4)
    # bfloat16 compute, float32 params: outputs are float32 and finite
    params = clip.init_params("text", t, jax.random.PRNGKey(0))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    ids = jnp.full((2, 8), VOCAB - 1, jnp.int32)
    out = jax.jit(clip.CLIPTextModelWithProjection(t).apply)({"params": params}, ids)
    assert out["text_embeds"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out["text_embeds"])))
    # boxed init carries logical axis names
    boxed = clip.init_params("text", t, boxed=True)
    emb = boxed["text_model"]["token_embedding"]["embedding"]
    assert emb.names == ("vocab", "embed")


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_tokenizer_dir(tmp_path):
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    path = tmp_path / "tok"
    tok.save_pretrained(str(path))
    return str(path)


def test_tokenizer_pads_truncates_and_warns_once(tiny_tokenizer_dir):
    from unclip_jax.data.tokenizer import load_tokenizer, tokenize

    tok = load_tokenizer(tiny_tokenizer_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # short prompts: no warning at all
        ids, mask = tokenize(tok, ["ab", "a b c"], context_length=8)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 8)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # "ab" -> a, b</w>; "a b c" -> a</w> b</w> c</w>
    assert ids[0, :4].tolist() == [bos, tok.convert_tokens_to_ids("a"),
                                   tok.convert_tokens_to_ids("b</w>"), eos]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert mask[1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert (ids[0, 4:] == tok.pad_token_id).all()

    long = " ".join("abcdefghij")
    with pytest.warns(UserWarning, match="truncated") as rec:
        ids, mask = tokenize(tok, [long, "ab", long + " k"], context_length=6)
    assert len([w for w in rec if issubclass(w.category, UserWarning)
                and "truncated" in str(w.message)]) == 1
    assert "2 of 3" in str(rec[0].message)
    assert ids.shape == (3, 6) and mask[0].tolist() == [1] * 6
    assert ids[0, 0] == bos and ids[0, -1] == eos  # special tokens survive truncation


# ---------------------------------------------------------------------------------------------
# The CLIP stage's tokenizer
# ---------------------------------------------------------------------------------------------
def _tiny_clip_config(*overrides):
    import os

    from unclip_jax.train.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config(os.path.join(root, "configs", "clip.py") + ":size=tiny",
                       ["data.num_examples=40", *overrides])


def test_clip_stage_on_shapes_trains_its_tokenizer(tmp_path, monkeypatch):
    """A new user's `train --config configs/clip.py:size=tiny --workdir W` has no tokenizer: on
    the shapes source the stage trains one into W/tokenizer and the stage record names it."""
    import os

    from unclip_jax.data import shapes
    from unclip_jax.data.tokenizer import tokenize
    from unclip_jax.stages.clip import make_stage

    monkeypatch.chdir(tmp_path)
    cfg = _tiny_clip_config()
    assert cfg.tokenizer == "" and cfg.data.source == "shapes"
    stage = make_stage(cfg, "w")  # a relative workdir: the recorded path is absolute
    path = os.path.join(str(tmp_path), "w", "tokenizer")
    assert cfg.tokenizer == path and os.path.exists(os.path.join(path, "tokenizer.json"))
    assert stage.record().paths["tokenizer"] == path
    vocab, L = stage.cfg.text.vocab_size, stage.cfg.text.max_position_embeddings
    tok = stage.tokenizer
    cap = shapes.captions(shapes.sample_scenes("train", 1, seed=0)[0])[0]
    ids, mask = tokenize(tok, [cap], L)
    n = int(mask[0].sum())
    assert ids.shape == (1, L) and 3 <= n < L
    assert 0 <= ids.min() and ids.max() < vocab
    assert ids[0, 0] == tok.bos_token_id and ids[0, n - 1] == tok.eos_token_id
    assert tok.decode(ids[0, 1:n - 1]).strip() == cap.lower()
    assert n - 2 < len(cap.split()) * 2  # merged words, not a byte per character
    # a second stage (a resumed run) reuses the tokenizer
    before = os.path.getmtime(os.path.join(path, "tokenizer.json"))
    cfg2 = _tiny_clip_config()
    make_stage(cfg2, "w")
    assert cfg2.tokenizer == path
    assert os.path.getmtime(os.path.join(path, "tokenizer.json")) == before


def test_clip_stage_without_tokenizer_on_other_sources_says_how_to_get_one(tmp_path):
    from unclip_jax.stages.clip import make_stage

    cfg = _tiny_clip_config("data.source=folder", f"data.path={tmp_path}")
    with pytest.raises(ValueError, match=r"config\.tokenizer.*'folder'.*train_tokenizer"):
        make_stage(cfg, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
