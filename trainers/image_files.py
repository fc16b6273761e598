"""Reading a user's image folder: a loader whose failure names the file, class folders
checked with a message naming data.root, and every image's header opened before Ray starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from trainers.errors import DataError


def load_image(path: str) -> Any:
    """torchvision's loader, with a failure that names the file (a truncated or foreign file
    found while training)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from None


def image_folder(folder: Path, sub: str, transform: Any) -> Dataset:
    from torchvision import datasets

    try:
        return datasets.ImageFolder(folder / sub, transform, loader=load_image)
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise DataError(f"data.root={str(folder)!r}: {sub}/ {e} (expected {sub}/<class>/<images>"
                        f" with at least one image per class)") from None


def verify_image_folder(root: str | Path) -> int:
    """Open every image's header under root/{train,val}/<class>/ (no decoding): a file that is
    not an image is named here, before Ray starts, instead of failing a worker mid-epoch.
    Returns the number of images checked."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    bad, n = [], 0
    for path in sorted(Path(root).expanduser().glob("*/*/*")):
        if path.parent.parent.name not in ("train", "val") or not path.is_file() or \
                not path.name.lower().endswith(IMG_EXTENSIONS):
            continue
        n += 1
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018 - the header is parsed on open; size proves it
        except (OSError, ValueError) as e:
            bad.append(f"{path} ({type(e).__name__})")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DataError(f"data.root={str(root)!r}: {len(bad)} of {n} image file(s) cannot be "
                        f"read as images: {shown}. Remove or replace them")
    return n
