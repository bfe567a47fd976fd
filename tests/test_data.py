"""Data: embedded MNIST-5k (split, cache), synthetic shapes, ImageFolder checks, mixup, class-count checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lab import data as D
from lab.errors import LabError
from lab.spec import AugmentSpec, DataSpec


@pytest.fixture(scope="module", autouse=True)
def lab_cache(tmp_path_factory):
    """Every test here caches under a private $LAB_CACHE, never in ~/.cache."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("lab-cache")
    mp.setenv("LAB_CACHE", str(cache))
    D._MEMO.clear()
    yield cache
    D._MEMO.clear()
    mp.undo()


def build(**kw) -> D.LabDataModule:
    dm = D.build_datamodule(DataSpec(**kw))
    dm.setup()
    return dm


# --------------------------------------------------------------------------- embedded


def test_embedded_cache_created_and_reused(lab_cache):
    D._MEMO.clear()
    x, y, info = D.load_mnist5k(memo=False)
    assert info["from"] in ("source", "cache")
    cache = Path(info["cache"])
    assert cache.is_file() and cache.parent == lab_cache and info["sha256"][:16] in cache.name
    assert x.shape == (5000, 28, 28) and x.dtype == torch.uint8 and int(x.max()) > 200
    assert y.shape == (5000,) and torch.equal(y.bincount(), torch.full((10,), 500))
    x2, y2, info2 = D.load_mnist5k(memo=False)
    assert info2["from"] == "cache" and info2["cache"] == str(cache)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    blob = torch.load(cache, weights_only=True)
    assert torch.equal(blob["images"], x) and torch.equal(blob["labels"], y)


def test_embedded_datamodule():
    dm = build(image_size=32, batch_size=32, augment=AugmentSpec(hflip=0.0))
    assert dm.num_classes == 10 and dm.in_chans == 3 and dm.image_size == 32
    assert dm.name.startswith("mnist5k") and "CC BY-SA 3.0" in dm.name
    assert dm.train_size + dm.val_size == 5000 and dm.val_size == 1000
    assert torch.equal(dm.train_set.labels.bincount(), torch.full((10,), 400))  # stratified
    assert dm.mixup_fn is None and dm.label_smoothing == 0.0
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey replicated to RGB
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (32, 3, 32, 32)
    lo, hi = -dm.mean[0] / dm.std[0], (1 - dm.mean[0]) / dm.std[0]  # normalised range
    assert xv.min() >= lo - 1e-4 and xv.max() <= hi + 1e-4 and abs(float(xv.mean())) < 0.5
    assert len(dm.train_dataloader()) == dm.train_size // 32  # drop_last
    dm.setup()  # idempotent
    assert dm.train_size == 4000


def test_embedded_split_deterministic():
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    assert torch.equal(a.train_index, b.train_index) and torch.equal(a.val_index, b.val_index)
    assert not torch.equal(a.val_index, c.val_index)
    assert len(set(a.train_index.tolist()) & set(a.val_index.tolist())) == 0
    va, vb = next(iter(a.val_dataloader()))[0], next(iter(b.val_dataloader()))[0]
    assert torch.equal(va, vb)  # eval transform is deterministic
    first = a.val_set.labels[: 10 * 32]  # validation order is mixed: a truncated eval sees all classes
    assert len(first.unique()) == 10
    d = build(seed=3, val_fraction=0.1)
    assert d.val_size == 500


def test_embedded_resizes():
    dm = build(image_size=48, batch_size=8, eval_batch_size=16)
    x, _ = next(iter(dm.train_dataloader()))
    xv, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 48, 48) and xv.shape == (16, 3, 48, 48)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_learnable_and_deterministic():
    x, y = D.make_synthetic(512, 10, seed=0)
    assert x.shape == (512, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(y.bincount(), torch.tensor([52, 52] + [51] * 8))
    x2, y2 = D.make_synthetic(512, 10, seed=0)
    x3, _ = D.make_synthetic(512, 10, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    m = x.float().mean((2, 3))  # per-image mean colour
    centroids = torch.stack([m[y == c].mean(0) for c in range(10)])
    dist = torch.cdist(centroids, centroids) + 1e9 * torch.eye(10)
    assert dist.min() > 5  # classes differ in mean colour (0..255 scale)
    acc = (torch.cdist(m, centroids).argmin(1) == y).float().mean()
    assert acc > 0.4  # nearest-centroid on mean colour alone, chance is 0.1

    dm = build(dataset="synthetic", synthetic_size=256, num_classes=4, image_size=16, batch_size=16, seed=2)
    assert dm.num_classes == 4 and dm.train_size + dm.val_size == 256 and dm.name.startswith("synthetic")
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 3, 16, 16) and int(yb.max()) < 4
    dm2 = build(dataset="synthetic", synthetic_size=256, num_classes=4, image_size=16, batch_size=16, seed=2)
    assert torch.equal(next(iter(dm.val_dataloader()))[0], next(iter(dm2.val_dataloader()))[0])
    torch.manual_seed(0)
    b1 = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    b2 = next(iter(dm2.train_dataloader()))
    assert torch.equal(b1[1], b2[1]) and torch.equal(b1[0], b2[0])  # shuffle + augmentation reproducible


def test_synthetic_with_workers_and_full_augmentation():
    aug = AugmentSpec(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, color_jitter=0.4, scale=(0.5, 1.0))
    dm = build(
        dataset="synthetic", synthetic_size=64, num_classes=2, image_size=24, batch_size=8, num_workers=1, augment=aug
    )
    loader = dm.train_dataloader()
    assert loader.persistent_workers and not loader.pin_memory and loader.drop_last
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 24, 24) and torch.isfinite(x).all()


# --------------------------------------------------------------------------- mixup / class counts / spec checks


def test_mixup_soft_targets():
    dm = build(
        dataset="synthetic",
        synthetic_size=64,
        num_classes=5,
        batch_size=8,
        augment=AugmentSpec(mixup=0.8, cutmix=1.0, label_smoothing=0.1),
    )
    fn = dm.mixup_fn
    assert fn is not None and dm.mixup_fn is fn
    x, y = next(iter(dm.train_dataloader()))
    xm, t = fn(x, y)
    assert xm.shape == x.shape and t.shape == (8, 5)
    assert torch.allclose(t.sum(1), torch.ones(8)) and t.min() > 0  # smoothed, soft
    cut = build(dataset="synthetic", synthetic_size=64, num_classes=5, batch_size=8, augment=AugmentSpec(cutmix=1.0))
    assert cut.mixup_fn is not None


def test_num_classes_expected_mismatch():
    with pytest.raises(LabError) as e:
        D.build_datamodule(DataSpec(), num_classes_expected=1000, spec_file="exp.yaml")
    assert e.value.path == "model.num_classes" and e.value.file == "exp.yaml"
    assert "model.num_classes" in str(e.value) and "1000" in str(e.value) and "10 classes" in str(e.value)
    D.build_datamodule(DataSpec(), num_classes_expected=10)
    D.build_datamodule(DataSpec(dataset="synthetic", num_classes=7), num_classes_expected=7)
    with pytest.raises(LabError, match="model.num_classes"):
        D.build_datamodule(DataSpec(dataset="synthetic", num_classes=7), num_classes_expected=10)


@pytest.mark.parametrize(
    "kw, path, words",
    [
        (dict(batch_size=63, augment=AugmentSpec(mixup=0.2)), "data.batch_size", "even"),
        (dict(batch_size=4096), "data.batch_size", "larger than the training set"),
        (dict(augment=AugmentSpec(auto_augment="nonsense")), "data.augment.auto_augment", "auto-augment policy"),
        (dict(dataset="synthetic", synthetic_size=16, num_classes=10), "data.synthetic_size", "cannot hold"),
        (dict(num_classes=5), "data.num_classes", "10 classes"),
    ],
)
def test_spec_errors(kw, path, words):
    with pytest.raises(LabError) as e:
        D.build_datamodule(DataSpec(**kw), spec_file="s.yaml")
    assert e.value.path == path and words in e.value.message and str(e.value).startswith("s.yaml: " + path)


# --------------------------------------------------------------------------- imagefolder


def make_tree(root: Path, classes=("cat", "dog", "fox"), n=(4, 2), size=20) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), n):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                arr = (torch.rand(size, size + 3 * i, 3, generator=g) * 255).to(torch.uint8).numpy()
                ext, mode = ("png", "RGB") if (i + ci) % 2 else ("jpg", "RGB")
                img = Image.fromarray(arr, mode)
                if i == 1:
                    img = img.convert("L")  # a grayscale image must still come out RGB
                img.save(d / f"{i}.{ext}")
    return root


def test_imagefolder_loads_and_batches(tmp_path):
    root = make_tree(tmp_path / "tree")
    dm = D.build_datamodule(
        DataSpec(
            dataset="imagefolder",
            root=str(root),
            image_size=16,
            batch_size=4,
            augment=AugmentSpec(re_prob=0.25, color_jitter=0.4),
        ),
        num_classes_expected=3,
    )
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "fox"]
    assert dm.train_size == 12 and dm.val_size == 6 and dm.in_chans == 3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.shape == (4,)
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 16, 16)
    assert len(dm.train_dataloader()) == 3
    aa = D.build_datamodule(
        DataSpec(
            dataset="imagefolder",
            root=str(root),
            image_size=16,
            batch_size=4,
            augment=AugmentSpec(auto_augment="rand-m9-mstd0.5-inc1"),
        )
    )
    assert next(iter(aa.train_dataloader()))[0].shape == (4, 3, 16, 16)


def _if_error(root: Path, **kw) -> LabError:
    with pytest.raises(LabError) as e:
        D.build_datamodule(
            DataSpec(dataset="imagefolder", root=str(root), image_size=16, batch_size=2, **kw), spec_file="if.yaml"
        )
    assert e.value.path == "data.root" and "data.root" in str(e.value)
    return e.value


def test_imagefolder_errors(tmp_path):
    assert "not found" in _if_error(tmp_path / "nope").message

    root = make_tree(tmp_path / "noval")
    import shutil

    shutil.rmtree(root / "val")
    assert "no val/ directory" in _if_error(root).message

    root = make_tree(tmp_path / "empty")
    (root / "train" / "owl").mkdir()
    (root / "val" / "owl").mkdir()
    (root / "val" / "owl" / "notes.txt").write_text("not an image")
    msg = _if_error(root).message
    assert "empty class" in msg and "owl" in msg

    root = make_tree(tmp_path / "mismatch")
    shutil.rmtree(root / "val" / "fox")
    msg = _if_error(root).message
    assert "differ" in msg and "fox" in msg and "only in train/" in msg

    root = tmp_path / "noclasses"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    assert "no class directories" in _if_error(root).message

    root = make_tree(tmp_path / "ok")
    with pytest.raises(LabError) as e:
        D.build_datamodule(DataSpec(dataset="imagefolder", root=str(root)), num_classes_expected=1000)
    assert e.value.path == "model.num_classes" and "3 classes" in e.value.message


def test_rand_augment_at_full_magnitude_never_kills_a_worker():
    """timm's 'inc1' posterize at level 10 asks Pillow for 0 bits, which Pillow rejects; the lab
    caps the level just under 10 so an ImageNet-style policy survives every draw."""
    import random

    from lab.data import tensor_transform
    from lab.spec import AugmentSpec

    random.seed(0)
    torch.manual_seed(0)
    t = tensor_transform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), AugmentSpec(auto_augment="rand-m10-n3-inc1"))
    x = torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)
    for _ in range(150):
        assert t(x).shape == (3, 16, 16)
