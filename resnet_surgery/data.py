"""Data loading shared by the project: CIFAR-10 from ../shared/data, preprocessing presets, and one
`as_loader` that accepts an ImageFolder directory, a Dataset or a DataLoader, with or without labels."""

from __future__ import annotations

import dataclasses
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .arguments import checked_arguments
from .atomic import atomic_dir, atomic_file
from .errors import SurgeryError, first_line

CIFAR10_SPLITS = ("train", "test")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Preprocessing presets: final size, resize before the centre crop (None: resize straight to size), mean, std.
PRESETS = {
    "imagenet": {"size": 224, "resize": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "cifar10": {"size": 32, "resize": None, "mean": CIFAR10_MEAN, "std": CIFAR10_STD},
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_DONE = ".complete"

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_SPLITS", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGE_SUFFIXES", "PRESETS", "BadImageError", "DataSpec", "ImageFiles", "as_dataset", "as_loader",
    "build_transform", "cache_root", "cifar10_tensors", "disjoint_subsets", "extract_cifar10", "held_out_split",
    "image_folder",
    "model_transform", "normalize_uint8", "preset_transform", "read_image", "split_batch", "transform_size",
    "without_bad_images",
]


def cache_root(path: str | os.PathLike | None = None) -> Path:
    """The user's cache folder: ``path``, else $RESNET_SURGERY_CACHE, else $XDG_CACHE_HOME/resnet-surgery,
    else ~/.cache/resnet-surgery (where torch keeps its own: never inside the installed package)."""
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = os.environ.get("RESNET_SURGERY_CACHE") or Path(base) / "resnet-surgery"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cifar_tar(shared_dir: str | os.PathLike, split: str) -> Path:
    if split not in CIFAR10_SPLITS:
        raise SurgeryError(f"unknown CIFAR-10 split {split!r}; choose one of {', '.join(CIFAR10_SPLITS)}")
    tar = Path(shared_dir) / "cifar10" / f"{split}.tar"
    if not tar.is_file():
        raise SurgeryError(f"{tar} not found; pass the shared data folder that holds cifar10/{split}.tar")
    return tar


@checked_arguments
def extract_cifar10(shared_dir: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract cifar10/<split>.tar once into the cache and return the ImageFolder root (<cache>/cifar10/<split>).

    A marker file is written after a complete extraction, so an interrupted one is redone.
    """
    tar = _cifar_tar(shared_dir, split)
    out = cache_root(cache_dir) / "cifar10"
    root = out / split
    if (root / _DONE).is_file():
        return root
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(root, force=True) as tmp:
        with tarfile.open(tar) as tf:
            tf.extractall(tmp, filter="data")
        # The tar holds <split>/<class>/NNNN.jpg: lift the classes up to the root.
        inner = tmp / split
        for d in inner.iterdir():
            d.rename(tmp / d.name)
        inner.rmdir()
        (tmp / _DONE).write_text(str(tar))
    return root


@checked_arguments
def cifar10_tensors(
    shared_dir: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All CIFAR-10 images of ``split`` as (uint8 N x 3 x 32 x 32, int64 labels), decoded once and cached.

    Labels are ImageFolder's indices (classes sorted alphabetically); images are in tar order.
    """
    from torchvision.io import decode_jpeg

    tar = _cifar_tar(shared_dir, split)
    cached = cache_root(cache_dir) / f"cifar10_{split}_uint8.pt"
    if cached.is_file():
        d = torch.load(cached, weights_only=True)
        return d["images"], d["labels"]
    datas, labels = [], []
    with tarfile.open(tar) as tf:
        for member in sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name):
            cls = Path(member.name).parent.name
            if Path(member.name).suffix.lower() not in (".jpg", ".jpeg") or cls not in CIFAR10_CLASSES:
                continue
            datas.append(torch.frombuffer(bytearray(tf.extractfile(member).read()), dtype=torch.uint8))
            labels.append(CIFAR10_CLASSES.index(cls))
    if not datas:
        raise SurgeryError(f"{tar} holds no <class>/*.jpg images")
    images = torch.stack([decode_jpeg(d, mode=_rgb_mode()) for d in datas])
    labels = torch.tensor(labels, dtype=torch.int64)
    with atomic_file(cached, force=True) as tmp:
        torch.save({"images": images, "labels": labels}, tmp)
    return images, labels


def _rgb_mode():
    from torchvision.io import ImageReadMode

    return ImageReadMode.RGB


def build_transform(
    size: int | Sequence[int] = 224,
    resize: int | None = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
):
    """PIL image -> normalised float tensor: resize (shorter side), centre crop ``size``, normalise.

    ``resize=None`` resizes straight to ``size`` (for images already about the right size, like CIFAR).
    """
    from torchvision import transforms as T

    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise SurgeryError(f"mean and std need three numbers (one per channel), std all positive; got mean {tuple(mean)} "
                           f"and std {tuple(std)}")
    steps = [T.Resize(resize), T.CenterCrop(size)] if resize else [T.Resize(size), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def preset_transform(preset: str = "imagenet", **overrides):
    """The transform of a named preset ("imagenet" or "cifar10"), with any of size/resize/mean/std overridden."""
    if preset not in PRESETS:
        raise SurgeryError(f"unknown preprocessing preset {preset!r}; choose one of {', '.join(PRESETS)}")
    opts = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return build_transform(**opts)


@checked_arguments
def model_transform(model):
    """The preprocessing ``model``'s weights were published with, or None when it is not known: torchvision
    enum weights carry theirs (``weights.transforms()``: resize 232 for IMAGENET1K_V2), timm models their
    data config, the CIFAR-10 zoo the cifar10 preset. Random or file weights and custom models: None."""
    from .history import history

    source = history(model).source
    if source is None:
        return None
    if source.kind == "timm":
        import timm.data

        return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    if source.kind == "zoo":  # the project's CIFAR-10 models were trained with it, at the side the zoo records
        return preset_transform("cifar10", size=getattr(model, "input_size", None))
    weights = source.weights or "none"
    if source.kind != "torchvision" or weights.lower() == "none" or Path(weights).suffix:
        return None  # random init or a local file: nothing says how its images were prepared
    import torchvision

    enum = torchvision.models.get_model_weights(source.model)
    return (enum.DEFAULT if weights == "DEFAULT" else enum[weights]).transforms()


def preprocessing(model, preset: str | None = None, transform=None):
    """The one rule by which image files become a model's input, the same from Python and the command line:
    ``transform`` when given, else ``preset``'s, else the preprocessing ``model``'s weights were published
    with (`model_transform`), else the imagenet preset.

    Args:
        model: the model the images are for (its source says how its weights were trained), or None.
        preset: "imagenet" or "cifar10", or None.
        transform: a torchvision transform, or None.

    Returns:
        The transform.
    """
    if transform is not None:
        return transform
    if preset is not None:
        return preset_transform(preset)
    return (model_transform(model) if model is not None else None) or preset_transform("imagenet")


def transform_size(transform) -> int | None:
    """The side of the images ``transform`` makes (its centre crop), or None when it does not say."""
    crop = getattr(transform, "crop_size", None)  # torchvision weights' ImageClassification
    if crop is None:
        from torchvision import transforms as T

        crops = [t for t in getattr(transform, "transforms", []) if isinstance(t, T.CenterCrop)]
        crop = crops[-1].size if crops else None
    if isinstance(crop, int):
        return crop
    return int(crop[0]) if crop else None


def normalize_uint8(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """uint8 N x 3 x H x W -> normalised float32 (the tensor path's equivalent of the cifar10 preset)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255 - m) / s


class BadImageError(SurgeryError):
    """An image file that cannot be decoded; ``.path`` names it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"cannot read image {path} ({reason}); delete or replace it, or pass --skip-bad-images "
                         "(skip_bad_images=True) to leave unreadable images out")
        self.path = str(path)


def read_image(path: str | os.PathLike):
    """torchvision's image loader (what ImageFolder uses), with an unreadable file as one BadImageError."""
    from PIL import UnidentifiedImageError
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image format PIL can read") from None
    except Exception as e:  # PIL raises many types for corrupt files (OSError, SyntaxError, ValueError, ...)
        raise BadImageError(path, first_line(e)) from None


class ImageFiles(Dataset):
    """The images of one flat folder, sorted by name, without labels (e.g. unlabelled calibration images)."""

    def __init__(self, files: Sequence[Path], transform):
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(read_image(self.files[index]))


def without_bad_images(dataset: Dataset, progress: bool = True) -> tuple[Dataset, list[str]]:
    """``dataset`` less the items whose image cannot be read (each is decoded once to find out), and their paths."""
    from tqdm import tqdm

    good, bad = [], []
    for i in tqdm(range(len(dataset)), desc="checking images", disable=not progress, leave=False):
        try:
            dataset[i]
        except BadImageError as e:
            bad.append(e.path)
        else:
            good.append(i)
    if not good:
        raise SurgeryError(f"none of the {len(bad)} images can be read (first: {bad[0]}); check the data folder")
    return (dataset if not bad else Subset(dataset, good)), bad


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_folder(path: str | os.PathLike, transform) -> Dataset:
    """torchvision ImageFolder (<root>/<class>/<image>, with labels), or a flat folder of images (no labels),
    with a clear error for a missing or empty folder."""
    from torchvision.datasets import ImageFolder

    path = Path(path)
    try:
        found = path.is_dir()
    except OSError as e:  # a name too long, a loop of links: not a folder to read either
        raise SurgeryError(f"data folder {str(path)[:200]} cannot be read ({e.strerror})") from None
    if not found:
        raise SurgeryError(f"data folder {str(path)[:200]} not found; pass a folder of images or an ImageFolder "
                           "(<root>/<class>/<image>)")
    flat = sorted(p for p in path.iterdir() if _is_image(p))
    if flat:
        return ImageFiles(flat, transform)
    try:
        return ImageFolder(str(path), transform=transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:
        # ImageFolder raises for no class folders or no images in them.
        raise SurgeryError(
            f"data folder {path} holds no images, neither directly nor in class sub-folders "
            f"(<root>/<class>/<image>{'|'.join(IMAGE_SUFFIXES)})"
        ) from e


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch from any loader -> (images, labels or None): accepts a tensor, or (images, labels, ...)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"], batch.get("label")
    raise SurgeryError(f"cannot read images from a batch of type {type(batch).__name__}; yield tensors or (image, label)")


def _subset(dataset: Dataset, num_images: int | None, seed: int) -> Dataset:
    if num_images is None:
        return dataset
    n = len(dataset)
    if num_images <= 0:
        raise SurgeryError(f"num_images must be positive, got {num_images}")
    if num_images >= n:
        return dataset
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:num_images].sort().values
    return Subset(dataset, idx.tolist())


@checked_arguments
def as_loader(
    data,
    *,
    preset: str = "imagenet",
    transform=None,
    batch_size: int = 64,
    num_images: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    skip_bad_images: bool = False,
    progress: bool = True,
) -> DataLoader:
    """A DataLoader over ``data``: an ImageFolder path (preprocessed with ``transform`` or ``preset``),
    a Dataset, or a DataLoader (both used as they are). ``num_images`` keeps a fixed seeded subset.
    An unreadable image is an error naming it; ``skip_bad_images`` leaves such images of a path out
    instead (each image of the subset is then decoded once beforehand) and lists them in the loader's
    ``skipped_images``.

    Batches may be image tensors or (images, labels); read them with `split_batch`.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise SurgeryError(f"batch_size (--batch-size) takes a positive integer, got {batch_size!r}")
    if isinstance(data, DataLoader):
        if num_images is None:
            return data
        # Keep the loader's own collate function and batch size; only take the subset.
        return DataLoader(
            _subset(data.dataset, num_images, seed),
            batch_size=data.batch_size or batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            collate_fn=data.collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )
    data = as_dataset(data, preset=preset, transform=transform, sized=False)
    subset, skipped = _subset(data, num_images, seed), []
    if skip_bad_images:
        subset, skipped = without_bad_images(subset, progress)
    loader = DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    loader.skipped_images = skipped
    return loader


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The images a step reads and how: the parameter group that `evaluate`, `calibrate` and `finetune` share.

    Args:
        data: an ImageFolder or flat-folder path, a Dataset or a DataLoader (see `as_loader`).
        preset: the preprocessing preset of a path ("imagenet" or "cifar10"), unless ``transform`` is given.
        transform: the preprocessing of a path's images (None: the preset's).
        num_images: a seeded random subset of that many images (None: all of them).
        batch_size: images per batch (per process under torchrun).
        seed: the seed of the subset (and of whatever else the step draws at random).
        progress: show progress bars.
    """

    data: object
    preset: str = "imagenet"
    transform: object = None
    num_images: int | None = None
    batch_size: int = 64
    seed: int = 0
    progress: bool = True

    def loader(self) -> DataLoader:
        """The DataLoader over these images, in order (see `as_loader`).

        Returns:
            DataLoader: batches of ``batch_size`` over the seeded subset of ``data``.
        """
        return as_loader(self.data, preset=self.preset, transform=self.transform, batch_size=self.batch_size,
                         num_images=self.num_images, seed=self.seed)


def as_dataset(data, *, preset: str = "imagenet", transform=None, sized: bool = True) -> Dataset:
    """The Dataset behind ``data``: an ImageFolder or flat-folder path (preprocessed with ``transform`` or
    ``preset``), a Dataset, or a DataLoader's dataset; an empty one is an error. ``sized=False`` also
    accepts a Dataset without ``__len__`` (an IterableDataset)."""
    if isinstance(data, DataLoader):
        data = data.dataset
    elif isinstance(data, (str, os.PathLike)):
        data = image_folder(data, transform or preset_transform(preset))
    if not isinstance(data, Dataset) or (sized and not hasattr(data, "__len__")):
        sized_text = "a sized torch Dataset" if sized else "a torch Dataset"
        raise SurgeryError(
            f"data must be an ImageFolder directory, {sized_text} or a DataLoader, not {type(data).__name__}"
        )
    if hasattr(data, "__len__") and len(data) == 0:
        raise SurgeryError("the dataset is empty; pass data with at least one image")
    return data


def disjoint_subsets(dataset: Dataset, sizes: Sequence[int | None], seed: int = 0) -> list[Dataset]:
    """Seeded random subsets of ``dataset`` that share no image, of the given sizes (None: all the rest).

    Sizes larger than what is left are cut down to it; a subset that would be empty is an error.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    subsets, start = [], 0
    for size in sizes:
        stop = len(order) if size is None else min(len(order), start + size)
        if stop <= start:
            raise SurgeryError(
                f"the dataset has {len(dataset)} images, too few for disjoint subsets of {list(sizes)}; "
                "pass more images or ask for fewer"
            )
        subsets.append(Subset(dataset, sorted(order[start:stop])))
        start = stop
    return subsets


def held_out_split(data, held_out_data=None, *, keep: int | None, hold: int | None, preset: str = "imagenet",
                   transform=None, seed: int = 0, too_few: str = "the data has one image") -> tuple[Dataset, Dataset]:
    """Images to work on and disjoint held-out images to check the work on, both seeded.

    Args:
        data: the images to work on (anything ``as_dataset`` takes).
        held_out_data: separate held-out images; None holds part of ``data`` out.
        keep: how many images to work on (None: all that are left).
        hold: how many held-out images (None: all of ``held_out_data``; with it None, it must be a number).
        preset: the preprocessing preset of a path.
        transform: the preprocessing of a path's images (None: the preset's).
        seed: seed of the subsets.
        too_few: the error when ``data`` alone has fewer than two images.

    Returns:
        (images to work on, held-out images).
    """
    dataset = as_dataset(data, preset=preset, transform=transform)
    if held_out_data is not None:
        held = as_dataset(held_out_data, preset=preset, transform=transform)
        kept = dataset if keep is None else disjoint_subsets(dataset, [keep], seed)[0]
        return kept, held if hold is None else disjoint_subsets(held, [hold], seed)[0]
    if len(dataset) < 2:
        raise SurgeryError(too_few)
    # Hold images out first, so a small folder still leaves both sides some.
    held, kept = disjoint_subsets(dataset, [min(hold, len(dataset) // 2), keep], seed)
    return kept, held
