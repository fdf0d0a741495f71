"""Precomputed CLIP embeddings as the prior's training source (unclip_jax.data.clip_embeddings):
writing a set with hidden states, its embeddings.json record, check_embeddings and the
deterministic, resumable embedding_batches stream.  Numpy only (no TensorFlow), tiny sets."""

import json
import os

import ml_collections
import numpy as np
import pytest

from unclip_jax.data import clip_embeddings as C
from unclip_jax.data import embedding_sets as E

EMB, L, D = 6, 4, 3
SIZES = (7, 5)
MODEL = {"config": {"embed_dim": EMB, "text": {"width": D, "context_length": L}},
         "source": "/checkpoints/clip_tiny"}


def _shard_arrays(rng, n, float16):
    dt = np.float16 if float16 else np.float32
    mask = np.arange(L)[None] < rng.integers(1, L + 1, size=(n, 1))  # a prefix of real tokens
    return {"image_embed": rng.normal(size=(n, EMB)).astype(dt),
            "text_embed": rng.normal(size=(n, EMB)).astype(dt),
            "text_hidden": rng.normal(size=(n, L, D)).astype(dt),
            "text_mask": mask}


def _null(rng):
    return {"text_embed": rng.normal(size=EMB), "text_hidden": rng.normal(size=(L, D)),
            "text_mask": np.arange(L) < 2}


def _write_set(root, *, bad=()):
    """Two shards (float16 and float32) plus embeddings.json; ``bad`` = (shard, row, key) cells
    to poison with non-finite values.  Returns the rows written (float32, concatenated) and the
    null encoding."""
    rng = np.random.default_rng(0)
    shards = [_shard_arrays(rng, n, float16=(i == 0)) for i, n in enumerate(SIZES)]
    for i, r, key in bad:
        shards[i][key][r].flat[1] = np.nan if key == "text_hidden" else np.inf
    for i, s in enumerate(shards):
        E.write_embeddings(root, i, **s, captions=[f"caption {i}-{r}" for r in range(len(
            s["image_embed"]))])
    null = _null(rng)
    E.write_embeddings_info(root, {"model": MODEL, "embed_dim": EMB, "text_len": L,
                                   "text_width": D, "null": null, "count": sum(SIZES)})
    rows = {k: np.concatenate([s[k] for s in shards]).astype(
        bool if k == "text_mask" else np.float32) for k in shards[0]}
    return shards, rows, null


def _cfg(root):
    return ml_collections.ConfigDict({"source": "clip_embeddings", "path": str(root)})


def _take(root, n, **kw):
    it = E.embedding_batches(_cfg(root), **kw)
    return [next(it) for _ in range(n)]


def _row_of(rows, image_embed):
    """The index of the one written row whose image embedding is exactly ``image_embed``."""
    hits = np.flatnonzero((rows["image_embed"] == image_embed).all(axis=1))
    assert len(hits) == 1, hits
    return int(hits[0])


def test_write_embeddings_files_and_info(tmp_path):
    shards, rows, null = _write_set(tmp_path)
    for i, s in enumerate(shards):
        for key, kind in (("image_embed", "img_emb"), ("text_embed", "text_emb"),
                          ("text_hidden", "text_hidden"), ("text_mask", "text_mask")):
            a = np.load(tmp_path / kind / f"{kind}_{i}.npy")
            assert a.dtype == s[key].dtype  # float16 stays float16, masks are bool
            np.testing.assert_array_equal(a, s[key])
    assert [p[0] for p in C.list_embedding_shards(tmp_path)] == [0, 1]
    assert not list(tmp_path.rglob("*.tmp"))
    info = E.read_embeddings_info(tmp_path)
    assert info["model"] == MODEL and info["count"] == sum(SIZES)
    assert (info["embed_dim"], info["text_len"], info["text_width"]) == (EMB, L, D)
    assert set(info["null"]) == {"text_embed", "text_hidden", "text_mask"}
    np.testing.assert_array_equal(info["null"]["text_embed"], null["text_embed"].astype(np.float32))
    np.testing.assert_array_equal(info["null"]["text_hidden"],
                                  null["text_hidden"].astype(np.float32))
    assert info["null"]["text_mask"].dtype == bool
    np.testing.assert_array_equal(info["null"]["text_mask"], null["text_mask"])
    assert json.loads((tmp_path / E.INFO_FILE).read_text())["null"] == E.NULL_FILE
    # Bad input is refused before anything is written.
    rng = np.random.default_rng(1)
    s = _shard_arrays(rng, 3, False)
    with pytest.raises(ValueError, match="text_embed"):
        E.write_embeddings(tmp_path / "x", 0, image_embed=s["image_embed"],
                           text_embed=s["text_embed"][:2])
    with pytest.raises(ValueError, match="together"):
        E.write_embeddings(tmp_path / "x", 0, image_embed=s["image_embed"],
                           text_embed=s["text_embed"], text_hidden=s["text_hidden"])
    with pytest.raises(ValueError, match="text_mask"):
        E.write_embeddings(tmp_path / "x", 0, image_embed=s["image_embed"],
                           text_embed=s["text_embed"], text_hidden=s["text_hidden"],
                           text_mask=s["text_mask"][:, :2])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="null text_embed"):
        E.write_embeddings_info(tmp_path / "y", {"model": MODEL, "embed_dim": EMB + 1,
                                                 "text_len": L, "text_width": D, "null": null})


def test_embedding_batches_read_back_exactly(tmp_path):
    _, rows, _ = _write_set(tmp_path)
    seen = set()
    for batch, skipped in _take(tmp_path, 30, batch_size=4, seed=0, start_step=0):
        assert skipped == 0
        assert set(batch) == {"image_embed", "text_embed", "text_hidden", "text_mask"}
        assert batch["image_embed"].shape == (4, EMB) and batch["image_embed"].dtype == np.float32
        assert batch["text_embed"].shape == (4, EMB) and batch["text_embed"].dtype == np.float32
        assert batch["text_hidden"].shape == (4, L, D)
        assert batch["text_hidden"].dtype == np.float32
        assert batch["text_mask"].shape == (4, L) and batch["text_mask"].dtype == bool
        for b in range(4):
            r = _row_of(rows, batch["image_embed"][b])
            seen.add(r)
            for k in ("text_embed", "text_hidden", "text_mask"):  # the row's own, exactly
                np.testing.assert_array_equal(batch[k][b], rows[k][r])
    assert seen == set(range(sum(SIZES)))  # rows of both shards, every one of them


def test_embedding_batches_resume_and_processes(tmp_path):
    _write_set(tmp_path)
    full = _take(tmp_path, 10, batch_size=4, seed=3, start_step=0)
    resumed = _take(tmp_path, 4, batch_size=4, seed=3, start_step=6)
    for (a, sa), (b, sb) in zip(full[6:], resumed):
        assert sa == sb
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = _take(tmp_path, 1, batch_size=4, seed=4, start_step=0)[0][0]
    assert not np.array_equal(other["image_embed"], full[0][0]["image_embed"])
    # Two processes of 2 rows each read the two halves of the one-process batch of 4.
    parts = [_take(tmp_path, 10, batch_size=2, seed=3, start_step=0, process_index=p,
                   process_count=2) for p in range(2)]
    for step in range(10):
        for k in full[step][0]:
            np.testing.assert_array_equal(
                np.concatenate([parts[0][step][0][k], parts[1][step][0][k]]), full[step][0][k])


def test_embedding_batches_skip_and_count_non_finite_rows(tmp_path):
    bad = [(0, 2, "text_hidden"), (1, 1, "text_embed"), (1, 4, "image_embed")]
    _, rows, _ = _write_set(tmp_path, bad=bad)
    bad_rows = {SIZES[0] * i + r for i, r, _ in bad}
    good = np.setdiff1d(np.arange(sum(SIZES)), sorted(bad_rows))
    one = _take(tmp_path, 40, batch_size=4, seed=1, start_step=0)
    two = [_take(tmp_path, 40, batch_size=2, seed=1, start_step=0, process_index=p,
                 process_count=2) for p in range(2)]
    total = 0
    for step, (batch, skipped) in enumerate(one):
        for k in ("image_embed", "text_embed", "text_hidden"):
            assert np.isfinite(batch[k]).all()
        for b in range(4):
            assert _row_of(rows, batch["image_embed"][b]) in good
        # the count travels with the rows: the processes' counts add up to the whole batch's
        assert skipped == two[0][step][1] + two[1][step][1]
        total += skipped
    # 3 of 12 rows are bad: ~40 of the 160 draws hit one (and are redrawn, counted).
    assert 15 <= total <= 80
    resumed = _take(tmp_path, 5, batch_size=4, seed=1, start_step=35)
    assert [s for _, s in resumed] == [s for _, s in one[35:]]


def test_check_embeddings_accepts_and_refuses(tmp_path):
    _write_set(tmp_path)
    info = E.check_embeddings(tmp_path, embed_dim=EMB, text_len=L, text_width=D, model=MODEL)
    assert info["model"] == MODEL
    # the model dict compares after a JSON round trip (tuples are lists)
    E.check_embeddings(tmp_path, embed_dim=EMB, model=json.loads(json.dumps(MODEL)))
    with pytest.raises(ValueError, match=r"record embed_dim=6.*this run's CLIP has "
                                         r"embed_dim=8.*re-embed the set with this CLIP"):
        E.check_embeddings(tmp_path, embed_dim=8)
    with pytest.raises(ValueError, match=r"text_width=3.*text_width=5"):
        E.check_embeddings(tmp_path, embed_dim=EMB, text_len=L, text_width=5)
    with pytest.raises(ValueError, match=r"text_len=4.*text_len=7"):
        E.check_embeddings(tmp_path, embed_dim=EMB, text_len=7)
    other = {**MODEL, "source": "/checkpoints/clip_other"}
    with pytest.raises(ValueError) as e:
        E.check_embeddings(tmp_path, embed_dim=EMB, model=other)
    msg = str(e.value)
    assert "another CLIP" in msg and str(tmp_path) in msg and "['source']" in msg
    assert "clip_tiny" in msg and "clip_other" in msg and "re-embed" in msg
    # A shard that disagrees with the record (another CLIP's rows added later) is found too.
    E.write_embeddings(tmp_path, 2, image_embed=np.zeros((2, 8)), text_embed=np.zeros((2, 8)))
    with pytest.raises(ValueError, match="shard 2 has E = 8"):
        E.check_embeddings(tmp_path, embed_dim=EMB)


def test_plain_clip_retrieval_set(tmp_path):
    """clip-retrieval output (img_emb + text_emb only, no embeddings.json): accepted for the
    widths, refused when the hidden states are needed."""
    rng = np.random.default_rng(2)
    for sub in ("img_emb", "text_emb"):
        os.makedirs(tmp_path / sub)
    for i, n in enumerate(SIZES):
        np.save(tmp_path / "img_emb" / f"img_emb_{i}.npy", rng.normal(size=(n, EMB)).astype("f2"))
        np.save(tmp_path / "text_emb" / f"text_emb_{i}.npy", rng.normal(size=(n, EMB)).astype("f2"))
    assert E.check_embeddings(tmp_path, embed_dim=EMB) == {}
    E.check_embeddings(tmp_path, embed_dim=EMB, model=MODEL)  # nothing recorded to compare
    with pytest.raises(ValueError, match=r"embed_dim=6 in their shards.*no embeddings.json.*"
                                         r"embed_dim=8"):
        E.check_embeddings(tmp_path, embed_dim=8)
    with pytest.raises(ValueError, match=r"no text hidden states.*plain clip-retrieval.*"
                                         r"re-embed the set with this CLIP"):
        E.check_embeddings(tmp_path, embed_dim=EMB, text_len=L, text_width=D)
    with pytest.raises(ValueError, match="no text hidden states"):
        next(E.embedding_batches(_cfg(tmp_path), batch_size=2, seed=0, start_step=0))
    with pytest.raises(FileNotFoundError, match="embeddings.json"):
        E.read_embeddings_info(tmp_path)
    # A set recorded without hidden states is refused for them too.
    E.write_embeddings_info(tmp_path, {"model": MODEL, "embed_dim": EMB, "text_len": None,
                                       "text_width": None,
                                       "null": {"text_embed": np.zeros(EMB)}})
    E.check_embeddings(tmp_path, embed_dim=EMB, model=MODEL)
    with pytest.raises(ValueError, match=r"no text hidden states.*records text_len"):
        E.check_embeddings(tmp_path, embed_dim=EMB, text_len=L)
    with pytest.raises(ValueError, match="clip_embeddings"):
        next(E.embedding_batches(ml_collections.ConfigDict({"source": "folder",
                                                            "path": str(tmp_path)}),
                                 batch_size=2, seed=0, start_step=0))
