"""The real image datasets that condensed sets stand in for: their facts and their loaders."""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, SVHN, FashionMNIST
from torchvision.datasets.utils import download_and_extract_archive

from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets.constants import FASHION_MNIST_ENV, SYSTEM_FASHION_MNIST_DIR
from condensed_datasets.errors import SourceDataError, UnknownNameError


@dataclass(frozen=True)
class SourceInfo:
    """Facts about one real dataset: shape, classes, and the normalisation the papers use."""

    name: str
    channels: int
    image_size: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    display_name: str = ""  # as people write it: "Fashion-MNIST", "CIFAR-10"
    dataset_class: str = ""  # the Dataset class of this package: "CondensedFashionMNIST"
    hub_dataset: str = ""  # the card's source_datasets entry (the Hub's "extended|<dataset>" form)
    #: The card's default license: a condensed set is derived from the source's images and keeps its terms
    #: (MNIST and Fashion-MNIST: MIT, as on their Hub cards; CIFAR: none stated; SVHN, Tiny ImageNet:
    #: non-commercial research terms).
    license: str = "other"
    #: Images in the real train split (a coreset's ``indices`` are rows of it).
    train_size: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


_CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

# The 200 Tiny-ImageNet wnids in sorted order: the class order of ImageFolder over ``train/`` and of the
# dataset-condensation papers (class index = position in this list).
_TINYIMAGENET_WNIDS = (
    "n01443537 n01629819 n01641577 n01644900 n01698640 n01742172 n01768244 n01770393 n01774384 n01774750 "
    "n01784675 n01855672 n01882714 n01910747 n01917289 n01944390 n01945685 n01950731 n01983481 n01984695 "
    "n02002724 n02056570 n02058221 n02074367 n02085620 n02094433 n02099601 n02099712 n02106662 n02113799 "
    "n02123045 n02123394 n02124075 n02125311 n02129165 n02132136 n02165456 n02190166 n02206856 n02226429 "
    "n02231487 n02233338 n02236044 n02268443 n02279972 n02281406 n02321529 n02364673 n02395406 n02403003 "
    "n02410509 n02415577 n02423022 n02437312 n02480495 n02481823 n02486410 n02504458 n02509815 n02666196 "
    "n02669723 n02699494 n02730930 n02769748 n02788148 n02791270 n02793495 n02795169 n02802426 n02808440 "
    "n02814533 n02814860 n02815834 n02823428 n02837789 n02841315 n02843684 n02883205 n02892201 n02906734 "
    "n02909870 n02917067 n02927161 n02948072 n02950826 n02963159 n02977058 n02988304 n02999410 n03014705 "
    "n03026506 n03042490 n03085013 n03089624 n03100240 n03126707 n03160309 n03179701 n03201208 n03250847 "
    "n03255030 n03355925 n03388043 n03393912 n03400231 n03404251 n03424325 n03444034 n03447447 n03544143 "
    "n03584254 n03599486 n03617480 n03637318 n03649909 n03662601 n03670208 n03706229 n03733131 n03763968 "
    "n03770439 n03796401 n03804744 n03814639 n03837869 n03838899 n03854065 n03891332 n03902125 n03930313 "
    "n03937543 n03970156 n03976657 n03977966 n03980874 n03983396 n03992509 n04008634 n04023962 n04067472 "
    "n04070727 n04074963 n04099969 n04118538 n04133789 n04146614 n04149813 n04179913 n04251144 n04254777 "
    "n04259630 n04265275 n04275548 n04285008 n04311004 n04328186 n04356056 n04366367 n04371430 n04376876 "
    "n04398044 n04399382 n04417672 n04456115 n04465501 n04486054 n04487081 n04501370 n04507155 n04532106 "
    "n04532670 n04540053 n04560804 n04562935 n04596742 n04597913 n06596364 n07579787 n07583066 n07614500 "
    "n07615774 n07695742 n07711569 n07715103 n07720875 n07734744 n07747607 n07749582 n07753592 n07768694 "
    "n07871810 n07873807 n07875152 n07920052 n09193705 n09246464 n09256479 n09332890 n09428293 n12267677"
).split()

SOURCES: dict[str, SourceInfo] = {
    info.name: info
    for info in (
        SourceInfo(
            "mnist", 1, 28,
            ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
             "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"),
            (0.1307,), (0.3081,),
            display_name="MNIST", train_size=60000, dataset_class="CondensedMNIST", hub_dataset="extended|mnist", license="mit",
        ),
        SourceInfo(
            "fashionmnist", 1, 28,
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            (0.2861,), (0.3530,),
            display_name="Fashion-MNIST", train_size=60000, dataset_class="CondensedFashionMNIST", hub_dataset="extended|fashion_mnist", license="mit",
        ),
        SourceInfo(
            "svhn", 3, 32, tuple(str(d) for d in range(10)),
            (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
            display_name="SVHN", train_size=73257, dataset_class="CondensedSVHN", hub_dataset="extended|svhn", license="other",
        ),
        SourceInfo(
            "cifar10", 3, 32,
            ("airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"),
            (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
            display_name="CIFAR-10", train_size=50000, dataset_class="CondensedCIFAR10", hub_dataset="extended|cifar10", license="unknown",
        ),
        SourceInfo(
            "cifar100", 3, 32, tuple(_CIFAR100_CLASSES),
            (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762),
            display_name="CIFAR-100", train_size=50000, dataset_class="CondensedCIFAR100", hub_dataset="extended|cifar100", license="unknown",
        ),
        SourceInfo(
            "tinyimagenet", 3, 64, tuple(_TINYIMAGENET_WNIDS),
            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
            display_name="Tiny ImageNet", train_size=100000, dataset_class="CondensedTinyImageNet", hub_dataset="extended|tiny-imagenet", license="other",
        ),
    )
}


def get_source(name: str) -> SourceInfo:
    """The facts of a source by name (lower case, as in file paths); ValueError lists the valid names."""
    key = str(name).lower().replace("-", "").replace("_", "")  # as paths.canonical_source spells it
    if key not in SOURCES:
        raise UnknownNameError(f"unknown source {name!r}; valid sources: {', '.join(SOURCES)}")
    return SOURCES[key]


# -- loading the real splits ---------------------------------------------------------------------

_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINYIMAGENET_FOLDER = "tiny-imagenet-200"
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
#: How to get missing real data, wherever the error surfaces: the library's flag and the command line's.
_HOW_TO_DOWNLOAD = ("You can use download=True (load_split, real_test_set) or condensed-build --download "
                    "to download it")


def load_split(
    name: str, root: str | os.PathLike, train: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of a real source under ``root``: images uint8 [N,C,H,W] and targets int64 [N].

    ``train=False`` is the test split (for Tiny-ImageNet, the labelled ``val`` split, as the papers use).
    Data is looked for where torchvision looks for it under ``root``; ``download=True`` fetches it
    with torchvision's own download code. Fashion-MNIST falls back to a system copy (see
    :func:`system_fashion_mnist_dir`). Missing data is a ``RuntimeError`` naming the path looked in;
    files that do not hold the source's images and labels are a SourceDataError too.
    """
    info = get_source(name)
    images, targets = _read_split(info, Path(root).expanduser(), train, download)
    return _checked_split(info, images, targets, Path(root).expanduser())


def _checked_split(info: SourceInfo, images: torch.Tensor, targets: torch.Tensor,
                   root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``images``/``targets`` if they are the source's: uint8 [N, *image_shape], int64 [N] in [0, classes)."""
    problem = None
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != info.image_shape or images.dim() != 4:
        problem = f"images are {images.dtype} {tuple(images.shape)}, expected uint8 [N, {', '.join(map(str, info.image_shape))}]"
    elif targets.dim() != 1 or targets.shape[0] != images.shape[0]:
        problem = f"{images.shape[0]} images but labels of shape {tuple(targets.shape)}"
    elif len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= info.num_classes):
        problem = f"labels range over [{int(targets.min())}, {int(targets.max())}], outside [0, {info.num_classes})"
    if problem:
        raise SourceDataError(f"{info.name}: the files under {root} do not hold the source's data ({problem}); "
                              "delete them and download (download=True) or copy them again")
    return images, targets


def _read_split(info: SourceInfo, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`load_split` before its checks."""
    if info.name == "tinyimagenet":
        return _load_tinyimagenet(root, train, download)
    if info.name == "fashionmnist":
        return _load_fashion_mnist(root, train, download)
    if info.name == "mnist":

        ds = _torchvision_split(info.name, MNIST, root / "MNIST" / "raw", dict(root=root, train=train), download)
        return _mnist_tensors(ds)
    if info.name == "svhn":
        split = "train" if train else "test"
        try:
            ds = _torchvision_split(
                info.name, SVHN, root / f"{split}_32x32.mat", dict(root=root, split=split), download
            )
        except ImportError as exc:  # torchvision reads SVHN's .mat files with scipy
            raise ImportError(f"reading SVHN needs scipy ({exc}); install it with `pip install 'condensed-datasets[svhn]'` (or `pip install scipy`)") from exc
        return torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels).to(torch.int64)
    if info.name in ("cifar10", "cifar100"):

        cls = CIFAR10 if info.name == "cifar10" else CIFAR100
        ds = _torchvision_split(info.name, cls, root / cls.base_folder, dict(root=root, train=train), download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(ds.targets, dtype=torch.int64)
    raise UnknownNameError(f"no loader for source {info.name!r}")  # pragma: no cover - SOURCES and loaders agree


def _torchvision_split(name: str, cls: type, where: Path, kwargs: dict, download: bool):
    """Construct a torchvision dataset; its 'not found' error is re-raised naming the path looked in."""
    try:
        return cls(download=download, **kwargs)
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:  # torchvision's readers of damaged files
        if download:
            raise SourceDataError(f"{name}: could not download into {where}: {exc}") from exc
        raise SourceDataError(
            f"{name}: dataset not found or corrupted at {where}. {_HOW_TO_DOWNLOAD}"
        ) from exc


def _mnist_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-style ``data`` [N,H,W] uint8 and ``targets`` -> [N,1,H,W] uint8 and int64."""
    return ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64)


# -- Fashion-MNIST, with the system copy --------------------------------------------------------------


def system_fashion_mnist_dir() -> Path:
    """Folder holding a system copy of Fashion-MNIST's gzipped IDX files (env CONDENSED_FASHION_MNIST_DIR)."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or SYSTEM_FASHION_MNIST_DIR)


def _mnist_raw_complete(raw: Path) -> bool:
    return all((raw / f).is_file() for f in _MNIST_FILES)


def install_system_fashion_mnist(root: str | os.PathLike) -> bool:
    """Un-gzip the system copy of Fashion-MNIST into ``{root}/FashionMNIST/raw/``; False if there is none.

    Files already there are kept; each new file is written atomically, so concurrent callers are safe.
    """
    src = system_fashion_mnist_dir()
    if not all((src / f"{f}.gz").is_file() for f in _MNIST_FILES):
        return False
    raw = Path(root).expanduser() / "FashionMNIST" / "raw"
    for f in _MNIST_FILES:
        if not (raw / f).is_file():
            try:
                with gzip.open(src / f"{f}.gz", "rb") as handle:
                    data = handle.read()
            except (OSError, EOFError, zlib.error) as exc:  # not gzip, or cut short
                raise SourceDataError(f"fashionmnist: the system copy {src / f'{f}.gz'} is not a readable gzip file "
                                      f"({exc}); reinstall it, or set {FASHION_MNIST_ENV} to a good copy") from exc
            try:
                atomic_write_bytes(raw / f, data)
            except OSError as exc:  # a root that cannot be written, such as a read-only mount of shared data
                raise SourceDataError(f"fashionmnist: the system copy cannot be un-gzipped into {raw}: the folder "
                                      f"cannot be written ({exc.strerror}); pass a root folder you can write to, "
                                      "or put the un-gzipped IDX files there") from exc
    return True


def _load_fashion_mnist(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:

    raw = root / "FashionMNIST" / "raw"
    kwargs = dict(root=root, train=train)
    if not _mnist_raw_complete(raw):
        if download:
            try:
                return _mnist_tensors(FashionMNIST(download=True, **kwargs))
            except (RuntimeError, OSError) as exc:  # no network: fall back to the system copy
                if not install_system_fashion_mnist(root):
                    raise SourceDataError(
                        f"fashionmnist: could not download into {raw} ({exc}) and no system copy in "
                        f"{system_fashion_mnist_dir()} (set {FASHION_MNIST_ENV} to its folder)"
                    ) from exc
        elif not install_system_fashion_mnist(root):
            raise SourceDataError(
                f"fashionmnist: dataset not found at {raw}, nor a system copy in {system_fashion_mnist_dir()} "
                f"(set {FASHION_MNIST_ENV}). {_HOW_TO_DOWNLOAD}"
            )
    return _mnist_tensors(_torchvision_split("fashionmnist", FashionMNIST, raw, kwargs, download=False))


# -- Tiny-ImageNet ----------------------------------------------------------------------------------------


def _load_tinyimagenet(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny-ImageNet from the standard ``tiny-imagenet-200`` layout, decoded once and cached as safetensors."""
    base = root / TINYIMAGENET_FOLDER
    split = "train" if train else "val"
    if not _tiny_layout_complete(base, split) and download:

        download_and_extract_archive(TINYIMAGENET_URL, download_root=str(root), md5=TINYIMAGENET_MD5)
    if not _tiny_layout_complete(base, split):
        raise SourceDataError(
            f"tinyimagenet: dataset not found at {base} (expected wnids.txt, train/<wnid>/images/, "
            f"val/images/ and val/val_annotations.txt). {_HOW_TO_DOWNLOAD}"
        )
    wnids = tinyimagenet_wnids(base)
    cache = base / f"{split}_uint8.safetensors"
    cached = _read_tiny_cache(cache, wnids)
    if cached is not None:
        return cached
    files, labels = _tiny_listing(base, split, wnids)
    images = _decode_images(files, get_source("tinyimagenet").image_size)
    targets = torch.as_tensor(labels, dtype=torch.int64)
    _write_tiny_cache(cache, images, targets, wnids)
    return images, targets


def tinyimagenet_wnids(base: str | os.PathLike) -> list[str]:
    """The class wnids of a ``tiny-imagenet-200`` folder, from its ``wnids.txt``, sorted (index = class)."""
    path = Path(base) / "wnids.txt"
    wnids = sorted({line.strip() for line in _read_text(path).splitlines() if line.strip()})
    if not wnids:
        raise SourceDataError(f"tinyimagenet: {path} lists no classes")
    bad = [w for w in wnids if not _plain_name(w)]
    if bad:
        raise SourceDataError(f"tinyimagenet: {path} lists {bad[0]!r}, not a folder name (a class is a wnid "
                              "such as n01443537)")
    return wnids


def _read_text(path: Path) -> str:
    """A text file of the layout; SourceDataError when it is not UTF-8."""
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceDataError(f"tinyimagenet: {path} is not a UTF-8 text file ({exc}); download it again") from exc


def _plain_name(name: str) -> bool:
    """A single file or folder name: no separator, not '.' or '..' (so it stays inside its folder)."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _tiny_layout_complete(base: Path, split: str) -> bool:
    if not (base / "wnids.txt").is_file():
        return False
    if split == "train":
        return (base / "train").is_dir()
    return (base / "val" / "val_annotations.txt").is_file() and (base / "val" / "images").is_dir()


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in _IMAGE_SUFFIXES


def _tiny_listing(base: Path, split: str, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """Image files and class indices of a split, ordered by class, then file name."""
    index = {w: i for i, w in enumerate(wnids)}
    rows: list[tuple[int, str, Path]] = []
    if split == "train":
        for wnid in wnids:
            folder = base / "train" / wnid / "images"
            if not folder.is_dir():
                raise SourceDataError(f"tinyimagenet: class {wnid} from wnids.txt has no folder {folder}")
            rows += [(index[wnid], p.name, p) for p in folder.iterdir() if _is_image(p)]
    else:
        annotations = base / "val" / "val_annotations.txt"
        for number, line in enumerate(_read_text(annotations).splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise SourceDataError(f"tinyimagenet: {annotations} line {number} names no class from wnids.txt: {line!r}")
            if not _plain_name(fields[0]):
                raise SourceDataError(f"tinyimagenet: {annotations} line {number} names {fields[0]!r}, not a file "
                                      "of val/images/")
            rows.append((index[fields[1]], fields[0], base / "val" / "images" / fields[0]))
    if not rows:
        raise SourceDataError(f"tinyimagenet: no images found for split {split!r} under {base}")
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows], [r[0] for r in rows]


def _decode_images(files: list[Path], size: int) -> torch.Tensor:
    """Decode image files to one uint8 [N,3,size,size] tensor (grayscale images become RGB)."""

    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                array = np.array(img.convert("RGB"), dtype=np.uint8)
        except (OSError, Image.DecompressionBombError) as exc:
            raise SourceDataError(f"tinyimagenet: cannot decode {path}: {exc}") from exc
        if array.shape != (size, size, 3):
            raise SourceDataError(f"tinyimagenet: {path} is {array.shape[1]}x{array.shape[0]}, expected {size}x{size}")
        out[i] = torch.from_numpy(array).permute(2, 0, 1)
    return out


def _read_tiny_cache(path: Path, wnids: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached decode, or None when there is none or it does not match (then it is rebuilt)."""


    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if json.loads(meta.get("wnids", "null")) != wnids:
                return None
            images, targets = handle.get_tensor("images"), handle.get_tensor("targets")
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    if images.dtype != torch.uint8 or targets.dtype != torch.int64 or images.shape[0] != targets.shape[0]:
        return None
    return images, targets


def _write_tiny_cache(path: Path, images: torch.Tensor, targets: torch.Tensor, wnids: list[str]) -> None:
    """Write the decode cache atomically (temporary file, then rename)."""


    atomic_write_bytes(path, save({"images": images.contiguous(), "targets": targets.contiguous()},
                                  metadata={"wnids": json.dumps(wnids)}))
