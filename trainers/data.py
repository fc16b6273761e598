"""Data sets: Fashion-MNIST (IDX files), ImageNet-style folders, CIFAR, and synthetic tensors.

Every data set returns the same three splits (train, val, test) plus its shape facts, so model
building can default `in_chans`, `num_classes` and `img_size` from the data. The validation split
is carved from the training set by a seeded permutation: every worker and every trial of a sweep
sees the same split. Distributed sharding: `shard_loader` swaps in a DistributedSampler and keeps
every other loader setting (worker processes, pinned memory, prefetch), which Ray Train's own
`prepare_data_loader` would drop (trainers/worker.py `prepare_loader` uses it).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from trainers.errors import DataError
from trainers.image_files import image_folder

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset | None
    test: Dataset
    in_chans: int
    num_classes: int
    img_size: int


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: magic (0, 0, dtype 0x08, ndim), big-endian dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read as a (gzipped) IDX file: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


class ImageTensorDataset(Dataset):
    """uint8 images (N, H, W[, C]) + labels; `transform` maps a float (C, H, W) in [0, 1]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        imgs = torch.from_numpy(np.array(images, copy=True))
        self.images = imgs.unsqueeze(1) if imgs.ndim == 3 else imgs.permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div_(255)  # (C, H, W)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


def _tensor_transforms(mean: tuple[float, ...], std: tuple[float, ...], size: int,
                       augment: bool) -> Callable:
    from torchvision.transforms import v2

    ops: list[Any] = []
    if augment:
        ops += [v2.RandomCrop(size, padding=max(size // 8, 1)), v2.RandomHorizontalFlip()]
    ops.append(v2.Normalize(mean, std))
    return v2.Compose(ops)


def _split_val(ds: Dataset, val_fraction: float, seed: int,
               val_ds: Dataset | None = None) -> tuple[Dataset, Dataset | None]:
    """Seeded train/val split; `val_ds` is the same data with eval transforms."""
    if val_fraction <= 0:
        return ds, None
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(len(ds) * val_fraction)))
    return Subset(ds, perm[n_val:]), Subset(val_ds if val_ds is not None else ds, perm[:n_val])


def fashion_mnist(root: str | None, cfg: Any, seed: int) -> DataSplits:
    folder = Path(root or FASHION_MNIST_DIR).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"data.root={str(folder)!r} does not exist. Fashion-MNIST is expected as the four IDX "
            f".gz files {sorted(FASHION_MNIST_FILES.values())}; on Debian/Ubuntu "
            "`sudo apt-get install dataset-fashion-mnist` puts them in "
            f"{FASHION_MNIST_DIR} (`make data` does it), or download them with torchvision's "
            "FashionMNIST(download=True) on an online machine and point data.root at them."
        )
    missing = [n for n in FASHION_MNIST_FILES.values() if not (folder / n).is_file()]
    if missing:
        raise DataError(f"data.root={str(folder)!r} lacks the Fashion-MNIST file(s) {missing}")
    a = {k: read_idx(folder / n) for k, n in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        imgs, labels = a[f"{split}_images"], a[f"{split}_labels"]
        if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
            raise DataError(f"{folder}: {split} images {imgs.shape} / labels {labels.shape} "
                            "are not (N, 28, 28) / (N,)")
    mean, std, size = (0.2860,), (0.3530,), a["train_images"].shape[1]
    train_tf = _tensor_transforms(mean, std, size, cfg.augment)
    eval_tf = _tensor_transforms(mean, std, size, False)
    train_all = ImageTensorDataset(a["train_images"], a["train_labels"], train_tf)
    train_eval = ImageTensorDataset(a["train_images"], a["train_labels"], eval_tf)
    train, val = _split_val(train_all, cfg.val_fraction, seed, train_eval)
    test = ImageTensorDataset(a["test_images"], a["test_labels"], eval_tf)
    return DataSplits(train, val, test, 1, 10, size)


def synthetic(root: str | None, cfg: Any, seed: int) -> DataSplits:
    """Learnable random data for tests: each class is a fixed random pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    n, size, classes = cfg.synthetic_size, 32, 4
    protos = torch.rand(classes, 3, size, size, generator=g)
    labels = torch.randint(0, classes, (n + n // 4,), generator=g)
    x = protos[labels] + 0.3 * torch.randn(len(labels), 3, size, size, generator=g)
    full = TensorDataset(x[:n], labels[:n])
    train, val = _split_val(full, cfg.val_fraction, seed)
    return DataSplits(train, val, TensorDataset(x[n:], labels[n:]), 3, classes, size)


FOLDER_CHANNELS = (1, 3)  # grayscale or RGB: what `in_chans` an image folder can be read as


def folder_channels(in_chans: int | None) -> int:
    """The channel count an image folder is read with: the model's `in_chans`, 3 by default.

    One message for every caller (model defaults, split building), so a bad value is refused
    the same way before Ray starts as on a worker."""
    if in_chans is None:
        return 3
    if in_chans not in FOLDER_CHANNELS:
        raise DataError(f"model.in_chans={in_chans} with data.dataset=imagefolder; allowed: 1 "
                        "(images read as grayscale) or 3 (read as RGB); unset means 3")
    return in_chans


def imagefolder(root: str | None, cfg: Any, seed: int, img_size: int | None = None,
                in_chans: int | None = None) -> DataSplits:
    """ImageNet-style `root/train/<class>/*.jpg` and `root/val/<class>/*.jpg` folders.

    Images are resized to the model's `img_size` (default 224) and read as `in_chans` channels
    (1: grayscale, 3: RGB), so any folder fits the model it is trained with."""
    from torchvision.transforms import v2

    if root is None:
        raise DataError("data.dataset=imagefolder needs data.root (a folder with train/ and val/)")
    folder = Path(root).expanduser()
    for sub in ("train", "val"):
        if not (folder / sub).is_dir():
            raise DataError(f"data.root={str(folder)!r} must hold {sub}/<class>/<images> folders")
    size, chans = img_size or 224, folder_channels(in_chans)
    if chans == 1:  # ImageNet's statistics averaged over its three channels
        color, mean, std = v2.Grayscale(num_output_channels=1), (0.449,), (0.226,)
    else:
        color, mean, std = v2.RGB(), IMAGENET_MEAN, IMAGENET_STD
    to_float = [color, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    train_tf = v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *to_float,
                           v2.Normalize(mean, std)])
    eval_tf = v2.Compose([v2.Resize(int(size / 0.875)), v2.CenterCrop(size), *to_float,
                          v2.Normalize(mean, std)])
    train_all = image_folder(folder, "train", train_tf if cfg.augment else eval_tf)
    train_eval = image_folder(folder, "train", eval_tf)
    train, val = _split_val(train_all, cfg.val_fraction, seed, train_eval)
    test = image_folder(folder, "val", eval_tf)
    if test.classes != train_all.classes:  # labels are class indices: both must agree
        raise DataError(f"data.root={str(folder)!r}: val/ holds classes {test.classes} but "
                        f"train/ holds {train_all.classes}; give both the same class folders")
    return DataSplits(train, val, test, chans, len(train_all.classes), size)


def _cifar(num_classes: int) -> Callable[..., DataSplits]:
    def build(root: str | None, cfg: Any, seed: int) -> DataSplits:
        from torchvision import datasets

        cls = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
        folder = str(Path(root or "~/.cache/cifar").expanduser())
        try:
            tr = cls(folder, train=True, download=cfg.download)
            te = cls(folder, train=False, download=cfg.download)
        except RuntimeError as e:
            raise DataError(f"CIFAR-{num_classes} not found in data.root={folder!r} ({e}); set "
                            "data.download=true on an online machine") from None
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        train_all = ImageTensorDataset(tr.data, np.array(tr.targets),
                                       _tensor_transforms(mean, std, 32, cfg.augment))
        train_eval = ImageTensorDataset(tr.data, np.array(tr.targets),
                                        _tensor_transforms(mean, std, 32, False))
        train, val = _split_val(train_all, cfg.val_fraction, seed, train_eval)
        test = ImageTensorDataset(te.data, np.array(te.targets),
                                  _tensor_transforms(mean, std, 32, False))
        return DataSplits(train, val, test, 3, num_classes, 32)

    return build


DATASETS: dict[str, Callable[..., DataSplits]] = {
    "fashion_mnist": fashion_mnist,
    "synthetic": synthetic,
    "imagefolder": imagefolder,
    "cifar10": _cifar(10),
    "cifar100": _cifar(100),
}


def _limit(ds: Dataset | None, n: int | None) -> Dataset | None:
    if ds is None or n is None or n >= len(ds):
        return ds
    return Subset(ds, range(n))


def build_splits(cfg: Any, img_size: int | None = None, in_chans: int | None = None
                 ) -> DataSplits:
    """Build the three splits named by a `DataConfig`, truncated to max_*_samples.

    `img_size` and `in_chans` are the model's (`model.img_size`, `model.in_chans`; None: the
    data set's own): an image folder is resized and converted to them, a data set of fixed shape
    refuses any other. The split is seeded by `cfg.split_seed`, not the run's seed: trials of a
    seed sweep share one split."""
    seed = cfg.split_seed
    if cfg.dataset not in DATASETS:
        raise DataError(f"data.dataset={cfg.dataset!r}; allowed: {sorted(DATASETS)}")
    build = DATASETS[cfg.dataset]
    if cfg.dataset == "imagefolder":
        s = build(cfg.root, cfg, seed, img_size, in_chans)
    else:
        _check_fixed(cfg.dataset, img_size, in_chans)
        s = build(cfg.root, cfg, seed)
    s.train = _limit(s.train, cfg.max_train_samples)
    s.val = _limit(s.val, cfg.max_eval_samples)
    s.test = _limit(s.test, cfg.max_eval_samples)
    return s


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, workers: int = 0,
                seed: int = 0, drop_last: bool = False, pin_memory: bool = False,
                persistent: bool | None = None) -> DataLoader:
    """A seeded DataLoader. `workers` loader processes, kept alive across epochs unless
    `persistent=False` (None: whenever there are workers); `pin_memory` for CUDA devices
    (`pin_memory_for`)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      drop_last=drop_last, generator=g, pin_memory=pin_memory,
                      persistent_workers=workers > 0 if persistent is None
                      else persistent and workers > 0)


AUTO_LOADER_WORKERS_CAP = 8  # past this, more loader processes rarely feed one GPU faster


def loader_workers(setting: int | str, cpus_per_worker: float, device: torch.device) -> int:
    """The loader processes of one Ray Train worker for `data.loader_workers`.

    An integer is taken as it is. "auto": on an accelerator (CUDA) the worker's CPUs
    (`scaling.cpus_per_worker`) minus one for the training process, at most
    AUTO_LOADER_WORKERS_CAP and at least 0; on the CPU 0, because the training process already
    runs `cpus_per_worker` compute threads and loader processes would only compete with them.
    """
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    return max(0, min(AUTO_LOADER_WORKERS_CAP, int(cpus_per_worker) - 1))


def pin_memory_for(device: torch.device) -> bool:
    """Page-locked batches only for CUDA: they make the host-to-GPU copy asynchronous; on the
    CPU they would only cost a copy."""
    return device.type == "cuda"


def shard_loader(loader: DataLoader, rank: int, world_size: int, seed: int = 0) -> DataLoader:
    """`loader` over this rank's shard: rebuilt with a DistributedSampler (shuffled when the
    loader shuffled, seeded with `seed`; reshuffled per epoch through `set_epoch`), every other
    setting kept (worker processes and their persistence, pinned memory, prefetch, generator,
    worker_init_fn, timeout, multiprocessing context). Ray Train's `prepare_data_loader`
    rebuilds the loader from a few of them only and drops `persistent_workers` and
    `prefetch_factor`. One rank, an IterableDataset or a loader that already has a
    DistributedSampler: returned as it is (one rank: the loader's seeded generator shuffles)."""
    if (world_size <= 1 or isinstance(loader.sampler, DistributedSampler)
            or isinstance(loader.dataset, IterableDataset)):
        return loader
    if loader.batch_size is None:
        raise ValueError("shard_loader needs a loader built with batch_size (no batch_sampler)")
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                 shuffle=not isinstance(loader.sampler, SequentialSampler),
                                 seed=seed)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, drop_last=loader.drop_last, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device, in_order=loader.in_order)


FIXED_SHAPES = {"fashion_mnist": (1, 10, 28), "synthetic": (3, 4, 32), "cifar10": (3, 10, 32),
                "cifar100": (3, 100, 32)}  # (in_chans, num_classes, img_size)


def _check_fixed(dataset: str, img_size: int | None, in_chans: int | None) -> None:
    """A data set of fixed shape is never resized: a model asking for another shape is refused."""
    chans, _, size = FIXED_SHAPES[dataset]
    if in_chans is not None and in_chans != chans:
        raise DataError(f"model.in_chans={in_chans} but data.dataset={dataset!r} has {chans} "
                        "channel(s); leave model.in_chans unset")
    if img_size is not None and img_size != size:
        raise DataError(f"model.img_size={img_size} but data.dataset={dataset!r} images are "
                        f"{size}x{size}; leave model.img_size unset")


def dataset_shape(cfg: Any, img_size: int | None = None, in_chans: int | None = None
                  ) -> tuple[int, int, int]:
    """(in_chans, num_classes, img_size) of a data set without loading it: used to default the
    model's shape and to validate the config before Ray starts. `img_size`/`in_chans` are the
    model's, as in `build_splits`: an image folder takes them, a fixed data set refuses others."""
    if cfg.dataset in FIXED_SHAPES:
        _check_fixed(cfg.dataset, img_size, in_chans)
        return FIXED_SHAPES[cfg.dataset]
    if cfg.root is None:
        raise DataError("data.dataset=imagefolder needs data.root (a folder with train/ and val/)")
    train = Path(cfg.root).expanduser() / "train"
    if not train.is_dir():
        raise DataError(f"data.root={cfg.root!r} must hold train/<class>/ and val/<class>/")
    classes = sum(1 for p in train.iterdir() if p.is_dir())
    return folder_channels(in_chans), classes, img_size or 224


def check_fits(splits: DataSplits, in_chans: int, img_size: int, num_classes: int) -> None:
    """Refuse a model that the data does not fit, from one real training sample: run before Ray
    starts, so a mismatch is one message instead of a failure in every worker."""
    try:
        x, _ = splits.train[0]
    except (OSError, ValueError) as e:  # e.g. PIL's UnidentifiedImageError
        raise DataError(f"cannot read the first training image: {type(e).__name__}: {e}") from None
    want = (in_chans, img_size, img_size)
    if tuple(x.shape) != want:
        raise DataError(f"the data's images are {tuple(x.shape)} (C, H, W) but the model takes "
                        f"{want} (model.in_chans, model.img_size, model.img_size); leave them "
                        "unset to follow the data, or set them to the data's shape")
    if num_classes < splits.num_classes:
        raise DataError(f"model.num_classes={num_classes} but the data has {splits.num_classes} "
                        f"classes; allowed: >= {splits.num_classes} (unset: the data's)")
