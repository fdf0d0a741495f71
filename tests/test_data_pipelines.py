"""Real-data input pipelines (unclip_jax.data.pipelines) and TFDS builders (tfds_builders).

Everything is made here, tiny, in tmp_path: two webdataset tar shards (5 examples each, one
corrupt JPEG, one empty caption), an image folder and clip-retrieval .npy embedding shards.
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import clip_embeddings as E
from unclip_jax.data import embedding_sets as ES
from unclip_jax.data import fs
from unclip_jax.data import pipelines as P

S = 8  # output image size


def _image_bytes(color, fmt="JPEG", size=(16, 12), mode="RGB"):
    im = Image.new(mode, size, color)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# Shard 0: the empty caption comes first (charged to the next valid example); shard 1: the corrupt
# JPEG comes last (after the last valid example of the stream: flushed at the end).
CORRUPT_KEY, EMPTY_KEY = "00001.tar/000000009", "00000.tar/000000000"


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    for shard in range(2):
        samples = []
        for j in range(5):
            idx = shard * 5 + j
            key = f"{idx:09d}"
            jpg = _image_bytes((20 * idx, 100, 200))
            txt = f"  a picture number {idx} "
            if shard == 0 and j == 0:
                txt = "   \n"
            if shard == 1 and j == 4:
                jpg = b"\xff\xd8\xff\xe0 this is not a jpeg" + jpg[40:60]
            samples.append((key, {"jpg": jpg, "txt": txt,
                                  "json": {"key": key, "caption": txt, "status": "success"}}))
        P.write_webdataset_shard(str(root / f"{shard:05d}.tar"), samples)
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 5}))
    return root


ALL_VALID = {f"{s:05d}.tar/{i:09d}" for s in range(2) for i in range(s * 5, s * 5 + 5)} - {
    CORRUPT_KEY, EMPTY_KEY}


def _collect(ds):
    return list(P.as_numpy_iterator(ds))


def test_webdataset_pairs_decode_skip_and_count(wds):
    ds = P.webdataset_pairs(str(wds), image_size=S, shuffle_files=False)
    spec = ds.element_spec
    assert spec["image"].shape == (S, S, 3) and spec["image"].dtype.name == "uint8"
    exs = _collect(ds)
    keys = [e["key"].decode() for e in exs]
    assert set(keys) == ALL_VALID and len(keys) == 8
    assert sum(int(e["skipped"]) for e in exs) == 2  # exact, including the trailing corrupt one
    for e in exs:
        assert e["image"].shape == (S, S, 3) and e["image"].dtype == np.uint8
        assert e["valid"]
        idx = int(e["key"].decode().split("/")[1])
        assert e["caption"].decode() == f"a picture number {idx}"  # stripped
        assert abs(int(e["image"][S // 2, S // 2, 1]) - 100) <= 8  # the colour survives
    # The empty caption (first) is charged to the first kept example, the corrupt JPEG (last of
    # the stream) to the last one.
    assert exs[0]["skipped"] == 1 and exs[-1]["skipped"] == 1
    # Without dropping: all 10, `valid` tells which, `skipped` is 1 exactly for those.
    everything = _collect(P.webdataset_pairs([str(wds / "00000.tar"), str(wds / "00001.tar")],
                                             image_size=S, drop_invalid=False))
    assert len(everything) == 10
    bad = {e["key"].decode() for e in everything if not e["valid"]}
    assert bad == {CORRUPT_KEY, EMPTY_KEY}
    assert all(int(e["skipped"]) == (not e["valid"]) for e in everything)


def test_webdataset_processes_are_disjoint(wds):
    parts = []
    for i in range(2):
        exs = _collect(P.webdataset_pairs(str(wds / "*.tar"), image_size=S, process_index=i,
                                          process_count=2, seed=3))
        parts.append(({e["key"].decode() for e in exs}, sum(int(e["skipped"]) for e in exs)))
    (k0, s0), (k1, s1) = parts
    assert not k0 & k1 and k0 | k1 == ALL_VALID
    assert (s0, s1) == (1, 1)
    with pytest.raises(ValueError):  # 2 shards cannot feed 3 processes
        P.webdataset_pairs(str(wds), image_size=S, process_index=2, process_count=3)
    assert P.list_shards(str(wds / "{00000..00001}.tar")) == P.list_shards(str(wds))


def test_fs_helpers(wds, tmp_path):
    assert fs.brace_expand("d/{08..10}.tar") == ["d/08.tar", "d/09.tar", "d/10.tar"]
    assert fs.brace_expand("{1..2}/{0..1}") == ["1/0", "1/1", "2/0", "2/1"]
    shards = [str(wds / "00000.tar"), str(wds / "00001.tar")]
    assert fs.list_shards(str(wds)) == shards == fs.list_shards(str(wds / "*.tar"))
    assert fs.list_shards(str(wds / "{00000..00005}.tar")) == shards  # missing names dropped
    assert P.list_shards is fs.list_shards
    with pytest.raises(FileNotFoundError):
        fs.list_shards(str(tmp_path / "*.tar"))
    assert not fs.is_remote(str(wds)) and fs.is_remote("gs://bucket/x.tar")
    fs.makedirs(tmp_path / "a" / "b")
    fs.write_bytes(tmp_path / "a" / "b" / "f.bin", b"\x00data")
    assert fs.read_bytes(tmp_path / "a" / "b" / "f.bin") == b"\x00data"
    assert fs.exists(tmp_path / "a" / "b" / "f.bin") and fs.isdir(tmp_path / "a")
    assert not fs.exists(tmp_path / "a" / "b" / "f.bin.tmp")  # written via a renamed tmp file
    assert [f for _, _, fl in fs.walk(tmp_path / "a") for f in fl] == ["f.bin"]


def test_truncated_shard_does_not_crash(wds, tmp_path):
    data = (wds / "00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    exs = _collect(P.webdataset_pairs(str(tmp_path / "cut.tar"), image_size=S))
    assert 1 <= len(exs) < 5  # what was readable; no exception


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    (root / "sub").mkdir()
    (root / "a.jpg").write_bytes(_image_bytes((255, 0, 0)))
    (root / "a.txt").write_text("a red thing\n")
    (root / "sub" / "b.png").write_bytes(_image_bytes((0, 0, 0, 0), "PNG", (10, 20), "RGBA"))
    (root / "sub" / "b.txt").write_text("transparent")
    (root / "c.webp").write_bytes(_image_bytes((0, 255, 0), "WEBP"))
    (root / "c.txt").write_text("green")
    (root / "d.jpg").write_bytes(b"garbage")  # corrupt
    (root / "d.txt").write_text("corrupt")
    (root / "e.png").write_bytes(_image_bytes((0, 0, 255), "PNG"))  # no caption file
    (root / "f.png").write_bytes(_image_bytes((0, 0, 255), "PNG"))
    (root / "f.txt").write_text(" \t ")  # whitespace caption
    (root / "notes.md").write_text("ignored")
    return root


def test_folder_pairs(folder):
    exs = _collect(P.folder_pairs(str(folder), image_size=S, seed=1))
    by_key = {e["key"].decode(): e for e in exs}
    assert set(by_key) == {"a.jpg", os.path.join("sub", "b.png"), "c.webp"}
    assert sum(int(e["skipped"]) for e in exs) == 3
    assert by_key["a.jpg"]["caption"] == b"a red thing"
    assert by_key["a.jpg"]["image"][0, 0, 0] > 200 and by_key["a.jpg"]["image"][0, 0, 2] < 50
    assert (by_key[os.path.join("sub", "b.png")]["image"] == 255).all()  # alpha on white
    assert by_key["c.webp"]["image"][4, 4, 1] > 200
    # Two processes: disjoint, complete, counts add up.
    parts = [_collect(P.folder_pairs(folder, image_size=S, process_index=i, process_count=2))
             for i in range(2)]
    keys = [{e["key"].decode() for e in p} for p in parts]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == set(by_key)
    assert sum(int(e["skipped"]) for p in parts for e in p) == 3


def test_decode_image_centre_crop():
    im = Image.new("RGB", (30, 10), (0, 0, 255))
    im.paste((255, 0, 0), (10, 0, 20, 10))  # red centre square, blue sides
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out = P.decode_image(buf.getvalue(), 4)
    assert out.shape == (4, 4, 3) and (out[..., 0] > 200).all() and (out[..., 2] < 50).all()
    assert P.decode_image(b"", 4) is None and P.decode_image(b"nope", 4) is None


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir()
    rng = np.random.default_rng(0)
    sizes = {0: 5, 1: 3, 2: 4}
    rows = {}
    for i, n in sizes.items():
        img = rng.normal(size=(n, 6)).astype(np.float16)
        txt = rng.normal(size=(n, 6)).astype(np.float32 if i == 1 else np.float16)
        if i == 0:
            img[2, 3] = np.nan
        if i == 2:
            txt[0, 0] = np.inf
            img[1, 5] = -np.inf
        np.save(root / "img_emb" / f"img_emb_{i}.npy", img)
        np.save(root / "text_emb" / f"text_emb_{i}.npy", txt)
        rows[i] = (img, txt)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for i, n in sizes.items():
            pq.write_table(pa.table({"caption": [f" caption {i}-{r}" for r in range(n)],
                                     "url": ["x"] * n}),
                           str(root / "metadata" / f"metadata_{i}.parquet"))
    except ImportError:
        pass
    return root, rows


@pytest.mark.parametrize("chunk", [4096, 2])  # 2: rows split over chunks, one all-invalid
def test_clip_embedding_pairs(emb, chunk, monkeypatch):
    monkeypatch.setattr(E, "_FINITE_CHUNK", chunk)
    root, rows = emb
    bad = {"0/2", "2/0", "2/1"}
    exs = _collect(E.clip_embedding_pairs(str(root), shuffle_files=False))
    assert len(exs) == 12 - 3 and sum(int(e["skipped"]) for e in exs) == 3
    assert [int(e["skipped"]) for e in exs][:3] == [0, 1, 0]  # row 0/2 is charged to row 0/1
    for e in exs:
        i, r = map(int, e["key"].decode().split("/"))
        assert e["image_embed"].dtype == np.float32 and e["image_embed"].shape == (6,)
        np.testing.assert_array_equal(e["image_embed"], rows[i][0][r].astype(np.float32))
        np.testing.assert_array_equal(e["text_embed"], rows[i][1][r].astype(np.float32))
    assert {e["key"].decode() for e in exs}.isdisjoint(bad)
    parts = [_collect(E.clip_embedding_pairs(root, process_index=i, process_count=2, seed=5))
             for i in range(2)]
    keys = [{e["key"].decode() for e in p} for p in parts]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == {e["key"].decode() for e in exs}
    assert [sum(int(e["skipped"]) for e in p) for p in parts] == [3, 0]  # shards 0,2 / 1
    every = _collect(E.clip_embedding_pairs(root, drop_invalid=False, shuffle_files=False))
    assert len(every) == 12
    assert {e["key"].decode() for e in every if not e["valid"]} == bad
    assert all(int(e["skipped"]) == (not e["valid"]) for e in every)
    assert all(np.isfinite(e["image_embed"]).all() for e in every)


def test_clip_embedding_captions(emb):
    pytest.importorskip("pyarrow")
    root, _ = emb
    exs = _collect(E.clip_embedding_pairs(root, caption_column="caption"))
    assert len(exs) == 9
    for e in exs:
        i, r = e["key"].decode().split("/")
        assert e["caption"].decode() == f"caption {i}-{r}"


@pytest.mark.parametrize("pyarrow", [True, False])  # False: captions as metadata_{i}.json
def test_written_embeddings_read_by_clip_embedding_pairs(tmp_path, pyarrow, monkeypatch):
    """A set from write_embeddings (with hidden states) stays a clip-retrieval set: the tf.data
    reader gets its embeddings and captions back exactly."""
    import sys

    if pyarrow:
        pytest.importorskip("pyarrow")
    else:
        monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    rng = np.random.default_rng(3)
    written = {}
    for i, n in enumerate((3, 2)):
        img, txt = rng.normal(size=(n, 5)).astype(np.float16), rng.normal(size=(n, 5))
        paths = ES.write_embeddings(tmp_path, i, image_embed=img, text_embed=txt,
                                   text_hidden=rng.normal(size=(n, 4, 2)),
                                   text_mask=np.ones((n, 4), bool),
                                   captions=[f" cap {i}/{r}" for r in range(n)])
        assert paths["metadata"].endswith(".parquet" if pyarrow else ".json")
        for r in range(n):
            written[f"{i}/{r}"] = (img[r].astype(np.float32), txt[r].astype(np.float32))
    exs = _collect(E.clip_embedding_pairs(tmp_path, shuffle_files=False, caption_column="caption"))
    assert {e["key"].decode() for e in exs} == set(written)
    for e in exs:
        key = e["key"].decode()
        np.testing.assert_array_equal(e["image_embed"], written[key][0])
        np.testing.assert_array_equal(e["text_embed"], written[key][1])
        assert e["caption"].decode() == f"cap {key}"


def test_batched_sizes_and_determinism(wds):
    def keys(seed, n_batches=6):
        ds = P.batched(P.webdataset_pairs(str(wds), image_size=S, seed=seed), 4,
                       process_count=2, shuffle_buffer=8, seed=seed)
        out = []
        for _, b in zip(range(n_batches), P.as_numpy_iterator(ds)):
            assert b["image"].shape == (2, S, S, 3) and b["skipped"].shape == (2,)
            out.append(tuple(k.decode() for k in b["key"]))
        return out

    a, b, c = keys(0), keys(0), keys(1)
    assert a == b and a != c
    first_pass = [k for batch in a[:4] for k in batch]
    assert sorted(first_pass) == sorted(ALL_VALID)  # one pass = every valid example once
    once = _collect(P.batched(P.webdataset_pairs(str(wds), image_size=S), 3, repeat=False,
                              drop_remainder=False, shuffle_buffer=0))
    assert [len(x["key"]) for x in once] == [3, 3, 2]
    assert sum(P.skipped_count(x) for x in once) == 2
    with pytest.raises(ValueError):
        P.batched(P.webdataset_pairs(str(wds), image_size=S), 5, process_count=2)


def test_to_global_arrays_one_device():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batch = {"image": np.arange(2 * S * S * 3, dtype=np.uint8).reshape(2, S, S, 3),
             "skipped": np.array([0, 2], np.int32), "valid": np.array([True, True]),
             "caption": np.array([b"a", b"b"], dtype=object)}
    out = P.to_global_arrays(batch, sharding)
    assert set(out) == {"image", "skipped", "valid"}  # strings stay on the host
    for k, v in out.items():
        assert isinstance(v, jax.Array) and v.sharding == sharding
        np.testing.assert_array_equal(np.asarray(v), batch[k])
    assert int(out["skipped"].sum()) == 2


def test_tfds_builders(wds, folder, tmp_path):
    from unclip_jax.data import tfds_builders as B

    builder = B.WebdatasetPairs(data_dir=str(tmp_path), config=B.WebdatasetPairsConfig(
        name="tiny_wds", source=str(wds), image_size=S))
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 8
    assert builder.info.metadata["skipped_examples"] == 2
    exs = _collect(builder.as_dataset(split="train"))
    assert {e["key"].decode() for e in exs} == ALL_VALID
    assert all(e["image"].shape == (S, S, 3) and e["caption"].startswith(b"a picture")
               for e in exs)
    # Reloaded from disk: the count is in the stored metadata.
    again = B.WebdatasetPairs(data_dir=str(tmp_path), config=B.WebdatasetPairsConfig(
        name="tiny_wds", source=str(wds), image_size=S))
    assert again.info.metadata["skipped_examples"] == 2
    # Per host: tfds.even_splits, disjoint and complete.
    parts = [{e["key"].decode() for e in _collect(B.as_pairs_dataset(again, process_index=i,
                                                                     process_count=2))}
             for i in range(2)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == ALL_VALID

    fb = B.get_builder("folder", str(folder), data_dir=str(tmp_path), image_size=S)
    fb.download_and_prepare()
    assert fb.info.splits["train"].num_examples == 3
    assert fb.info.metadata["skipped_examples"] == 3
    fexs = _collect(fb.as_dataset(split="train"))
    assert {e["caption"] for e in fexs} == {b"a red thing", b"transparent", b"green"}


def test_tfds_source_matches_folder_source(folder, tmp_path):
    """data.source='tfds' prepares the folder as a TFDS dataset on first use and yields the same
    images and captions as data.source='folder'; it resumes at any step."""
    import ml_collections

    from unclip_jax.data.sources import SOURCES, image_text_batches

    assert "tfds" in SOURCES and "clip_embeddings" in SOURCES

    def take(cfg, n, start_step=0):
        it = image_text_batches(ml_collections.ConfigDict(cfg), image_size=S, batch_size=3,
                                seed=0, start_step=start_step)
        return [next(it) for _ in range(n)]

    def pass_of(batch):  # 3 valid examples, batches of 3: the first batch is one whole pass
        return sorted((c, im.tobytes()) for c, im in zip(batch["caption"], batch["image"]))

    base = {"path": str(folder), "shuffle_buffer": 16}
    (ref, ref_skipped), = take({**base, "source": "folder"}, 1)
    assert ref_skipped == 3  # corrupt, caption-less and blank-caption images
    tfds_cfg = {**base, "source": "tfds", "tfds_builder": "folder", "tfds_dir": str(tmp_path)}
    got = take(tfds_cfg, 5)
    assert pass_of(got[0][0]) == pass_of(ref)
    assert sorted(got[0][0]["caption"]) == ["a red thing", "green", "transparent"]
    assert all(b["image"].shape == (3, S, S, 3) and b["image"].dtype == np.uint8
               and skipped == 0 for b, skipped in got)  # skips were counted when preparing
    assert list(tmp_path.iterdir())  # prepared under data.tfds_dir
    # Read back from the prepared dataset, resumed at step 2: the batches of steps 2..4.
    resumed = take(tfds_cfg, 3, start_step=2)
    for (a, _), (b, _) in zip(got[2:], resumed):
        assert a["caption"] == b["caption"]
        np.testing.assert_array_equal(a["image"], b["image"])
    # The builder kind is found from the path when not given (a folder without .tar shards).
    auto, = take({**tfds_cfg, "tfds_builder": ""}, 1)
    assert pass_of(auto[0]) == pass_of(ref)
    with pytest.raises(ValueError, match="carries no images.*prior"):
        take({**base, "source": "clip_embeddings"}, 1)


def test_tokenize_captions_cache_matches_uncached(shapes_tokenizer):
    """The per-caption token cache of the training batches returns exactly what tokenizing the
    batch afresh does: repeats, order, truncation at the context length, other lengths."""
    from unclip_jax.data.tokenizer import load_tokenizer, tokenize
    from unclip_jax.stages import conditioning as C

    tok = load_tokenizer(shapes_tokenizer)
    caps = ["a red circle", "", "a blue square on the left " * 6, "a red circle", "two shapes"]
    for L in (24, 8):
        for _ in range(2):  # cold, then every row from the cache
            ids, mask = C.tokenize_captions(tok, caps, L)
            with pytest.warns(UserWarning):
                ref_ids, ref_mask = tokenize(tok, caps, L)
            assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (5, L)
            np.testing.assert_array_equal(ids, ref_ids)
            np.testing.assert_array_equal(mask, ref_mask.astype(bool))
    assert (24, "a red circle") in C._TOKEN_CACHE[tok]
