"""Tests for data.py: the built-in data, CSV/TSV, img2dataset shards, the views and collate."""
import functools
import hashlib
import io
import logging
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data


class CharTokenizer:
    """Stand-in for tokenizer.Tokenizer while it is not importable: 1 = SOT, 2 = EOT, 0 = pad."""

    def __call__(self, texts, context_length=77):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1] + [3 + ord(ch) % 250 for ch in text][:context_length - 2] + [2]
            out[row, :len(ids)] = torch.tensor(ids)
        return out


def _word_shuffle(text, rng):
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def tokenizer():
    try:
        from tokenizer import Tokenizer
        return Tokenizer.openai()
    except (ImportError, AttributeError, OSError):
        return CharTokenizer()


@pytest.fixture(scope="module")
def text_aug():
    try:
        from eda import augment
        return augment
    except ImportError:
        return _word_shuffle


def _png(rgb=(200, 30, 30), size=(20, 12), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, fmt)
    return buf.getvalue()


def _digest(image):
    return hashlib.sha256(image.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- CSV / TSV

def test_tsv_with_custom_columns_resolves_relative_paths_and_skips_bad_rows(tmp_path, caplog):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "ok.png").write_bytes(_png((10, 200, 10)))
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"not an image at all")
    (tmp_path / "imgs" / "empty.png").write_bytes(_png())
    lines = ["path\tcaption", "imgs/ok.png\ta green box", "imgs/bad.jpg\tcorrupt",
             "imgs/missing.png\tnot there", "imgs/empty.png\t  "]
    (tmp_path / "t.tsv").write_text("\n".join(lines) + "\n")
    ds = data.CsvDataset(str(tmp_path / "t.tsv"), img_key="path", caption_key="caption")
    assert len(ds) == 4
    image, caption = ds[0]
    assert caption == "a green box" and image.getpixel((0, 0)) == (10, 200, 10)
    with caplog.at_level(logging.WARNING):
        assert ds[1] is None and ds[2] is None and ds[3] is None
    assert "bad.jpg" in caplog.text and "missing.png" in caplog.text
    with pytest.raises(ValueError, match="no column 'filepath'"):
        data.CsvDataset(str(tmp_path / "t.tsv"))


def test_csv_with_openclip_defaults_and_a_custom_separator(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "c.csv").write_text(f'filepath;title\n{tmp_path / "a.png"};"red; wide"\n')
    ds = data.CsvDataset(str(tmp_path / "c.csv"), sep=";")
    assert ds[0][1] == "red; wide" and ds[0][0].size == (20, 12)


# ----------------------------------------------------------------------------- shards

def _write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _make_shards(folder):
    jpg = _png((30, 60, 220), (16, 16), "JPEG")
    _write_shard(folder / "00000.tar", [
        ("000.jpg", _png((200, 30, 30))), ("000.txt", b"a red square"),
        ("001.jpg", b"\xff\xd8 corrupt"), ("001.txt", b"broken"),
        ("002.jpg", _png()),                                       # no caption file
        ("003.jpg", _png()), ("003.txt", b"   "),                  # empty caption
    ])
    _write_shard(folder / "00001.tar", [
        ("004.jpg", jpg), ("004.txt", "a blue caf\u00e9 sign".encode()), ("004.json", b"{}"),
        ("005.jpg", jpg[: len(jpg) // 2]), ("005.txt", b"truncated"),
        ("006.txt", b"caption without an image"),
    ])


def test_shards_map_style_skips_and_caches_the_index(tmp_path, monkeypatch, caplog):
    _make_shards(tmp_path)
    ds = data.ShardDataset(str(tmp_path))
    assert len(ds) == 7
    assert os.path.exists(tmp_path / "00000.tar.idx.json")
    image, caption = ds[0]
    assert caption == "a red square" and image.getpixel((3, 3)) == (200, 30, 30)
    image, caption = ds[4]
    assert caption == "a blue caf\u00e9 sign" and image.size == (16, 16)
    with caplog.at_level(logging.WARNING):
        assert [ds[i] is None for i in range(7)] == [False, True, True, True, False, True, True]
    assert "00000.tar:001.jpg" in caplog.text and "00001.tar:005.jpg" in caplog.text

    # a second open reads the cached index instead of scanning the tars again
    def no_scan(path):
        raise AssertionError(f"rescanned {path}")
    monkeypatch.setattr(data, "_scan_shard", no_scan)
    again = data.ShardDataset(str(tmp_path))
    assert np.array_equal(again.rows, ds.rows) and again[4][1] == caption
    # ... unless the shard changed
    scanned = []
    monkeypatch.setattr(data, "_scan_shard", lambda p: scanned.append(p) or [])
    with open(tmp_path / "00001.tar", "ab") as f:
        f.write(b"\0" * 512)
    assert len(data.ShardDataset(str(tmp_path))) == 4 and scanned == [str(tmp_path / "00001.tar")]


def test_shards_cut_download_and_read_only_folder(tmp_path, monkeypatch):
    _make_shards(tmp_path)
    whole = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(whole[:2565])  # cut inside 001.jpg's data
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError("ro")))
    ds = data.ShardDataset(str(tmp_path))
    assert not os.path.exists(tmp_path / "00000.tar.idx.json")  # kept in memory only
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert len(ds) == 2 + 3 and ds[0][1] == "a red square"
    assert ds[1] is None  # the truncated member


# ----------------------------------------------------------------------------- views, collate

def test_transform_sizes_and_constants():
    image = Image.new("RGB", (100, 80), (255, 255, 255))
    for make in (data.eval_transform, data.clip_image_transform, data.declip_image_transform):
        assert make(64)(image).shape == (3, 64, 64)
    white = data.eval_transform(32)(image)[:, 0, 0]
    mean, std = torch.tensor(data.OPENAI_MEAN), torch.tensor(data.OPENAI_STD)
    assert torch.allclose(white, (1 - mean) / std)
    # Appendix B's blur at 224 px; scaled with the side, so 64 px gets 2/7 of it
    view = data.declip_image_transform(224)
    assert view.kernel == 23 and view.sigma == pytest.approx((0.1, 2.0))
    view = data.declip_image_transform(64)
    assert view.kernel == 7 and view.sigma == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))


def test_declip_view_applies_what_it_sampled():
    """sample() then apply() is the view; an identity draw gives the eval transform's pixels."""
    image = data.SyntheticCaptions(size=1)[0][0]
    view = data.declip_image_transform(64)
    torch.manual_seed(3)
    x = view(image)
    torch.manual_seed(3)
    assert torch.equal(view.apply(image, view.sample(image)), x)
    identity = dict(crop=(0, 0, 64, 64), jitter=None, gray=False, sigma=None, flip=False)
    assert torch.allclose(view.apply(image, identity), data.eval_transform(64)(image), atol=1e-6)
    gray = view.apply(image, dict(identity, gray=True))
    assert torch.allclose(gray[0] * data.OPENAI_STD[0] + data.OPENAI_MEAN[0],
                          gray[2] * data.OPENAI_STD[2] + data.OPENAI_MEAN[2], atol=1e-6)
    flipped = view.apply(image, dict(identity, flip=True))
    assert torch.equal(flipped, view.apply(image, identity).flip(-1))


def test_image_text_views_are_a_function_of_seed_epoch_index(text_aug):
    base = data.SyntheticCaptions(size=50)
    make = lambda seed: data.ImageText(base, data.declip_image_transform(64), views=2,
                                       text_aug=text_aug, seed=seed)
    a, b = make(0), make(0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    x = a[7]
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched
    y = b[7]
    assert torch.equal(x["image"], y["image"]) and torch.equal(x["image_aug"], y["image_aug"])
    assert x["text"] == base.caption(7) and x["text_aug"] == y["text_aug"]
    assert not torch.equal(x["image"], x["image_aug"])
    b.set_epoch(1)
    assert not torch.equal(b[7]["image"], x["image"])
    assert not torch.equal(make(1)[7]["image"], x["image"])
    single = data.ImageText(base, data.clip_image_transform(64))[3]
    assert set(single) == {"image", "text", "n_skipped"}


def test_collate_sums_skipped_counts(tokenizer):
    item = {"image": torch.zeros(3, 8, 8), "image_aug": torch.ones(3, 8, 8),
            "text": "a red circle", "text_aug": "red a circle", "n_skipped": 0}
    out = data.collate([item, dict(item, n_skipped=2), dict(item, n_skipped=1)], tokenizer,
                       context_length=16)
    assert out["n_skipped"] == 3
    assert out["image"].shape == out["image_aug"].shape == (3, 3, 8, 8)
    assert out["ids"].shape == out["ids_aug"].shape == (3, 16) and out["ids"].dtype == torch.long
    assert torch.equal(out["ids"][0], tokenizer(["a red circle"], context_length=16)[0])
    pickle.loads(pickle.dumps(functools.partial(data.collate, tokenizer=tokenizer,
                                                context_length=16)))


def test_unusable_samples_are_replaced_deterministically(tmp_path):
    """Batches keep their size (DDP all-gathers them): a bad sample is swapped for another one
    chosen from (seed, epoch, index), the same on every run, and counted."""
    _make_shards(tmp_path)
    base = data.ShardDataset(str(tmp_path))
    bad = [i for i in range(len(base)) if base[i] is None]
    ds = data.ImageText(base, data.clip_image_transform(16), seed=3)
    again = data.ImageText(data.ShardDataset(str(tmp_path)), data.clip_image_transform(16), seed=3)
    for i in bad:
        x, y = ds[i], again[i]
        assert x["n_skipped"] >= 1 and x["text"] and torch.equal(x["image"], y["image"])
    good = next(i for i in range(len(base)) if base[i] is not None)
    assert ds[good]["n_skipped"] == 0 and ds[good]["text"] == base[good][1]


def test_loader_batches_do_not_depend_on_worker_count(tmp_path, tokenizer, text_aug):
    _make_shards(tmp_path)
    ds = data.ImageText(data.ShardDataset(str(tmp_path)), data.declip_image_transform(16),
                        views=2, text_aug=text_aug, seed=5)
    ds.set_epoch(2)
    ds[0]  # opens a file in this process: workers must not reuse the handle
    collate = functools.partial(data.collate, tokenizer=tokenizer, context_length=12)
    runs = [list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=w, collate_fn=collate))
            for w in (0, 2)]
    assert [b["n_skipped"] > 0 for b in runs[0]] == [True, True]  # 5 of the 7 samples are bad
    assert [len(b["ids"]) for b in runs[0]] == [4, 3]
    for b0, b2 in zip(*runs):
        assert b0.keys() == b2.keys() and b0["n_skipped"] == b2["n_skipped"]
        assert all(torch.equal(b0[k], b2[k]) for k in b0 if k != "n_skipped")


# ----------------------------------------------------------------------------- build_dataset

def test_build_dataset_resolves_names_and_explains_missing_cc3m(tmp_path):
    assert isinstance(data.build_dataset("builtin", split="eval"), data.SyntheticCaptions)
    assert data.build_dataset("builtin", image_size=32, size=10)[0][0].size == (32, 32)
    (tmp_path / "shards").mkdir()
    _make_shards(tmp_path / "shards")
    assert len(data.build_dataset("shards", data_root=str(tmp_path))) == 7
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.png").write_bytes(_png())
    (tmp_path / "mine" / "train.csv").write_text("filepath,title\na.png,hello\n")
    assert data.build_dataset("mine", data_root=str(tmp_path))[0][1] == "hello"
    assert len(data.build_dataset(str(tmp_path / "mine" / "train.csv"))) == 1
    (tmp_path / "cc3m").mkdir()  # present but empty, then absent: the same advice
    for root in (str(tmp_path), str(tmp_path / "nowhere")):
        with pytest.raises(FileNotFoundError) as err:
            data.build_dataset("cc3m", data_root=root)
        message = str(err.value)
        assert "\n" not in message and "img2dataset --url_list" in message and "cc3m" in message
