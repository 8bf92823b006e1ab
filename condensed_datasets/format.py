"""The condensed-set file format: one safetensors file, metadata as sorted JSON under one key."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets.constants import FORMAT_VERSION, HEADER_LIMIT, METADATA_KEY, STORAGE_FORMAT_VERSION
from condensed_datasets.errors import CondensedSetError
from condensed_datasets.metadata_checks import metadata_problem
from condensed_datasets.metadata_checks import names_problem as _names_problem
from condensed_datasets.pixel_storage import STORED_TENSORS, StorageError, decode_images, encode_images, storage_problem
from condensed_datasets.sources import SOURCES, get_source
from condensed_datasets.zca import ZCA

_REQUIRED_TENSORS = {"images": torch.float32, "labels": torch.int64}
_OPTIONAL_TENSORS = {
    "soft_labels": torch.float32,
    "lr": torch.float32,
    "indices": torch.int64,
    # ZCA whitening that maps a normalised real image into the set's space (both or neither):
    # mean [D] and symmetric transform [D, D], D = C*H*W; metadata "zca" records its eps.
    "zca_mean": torch.float32,
    "zca_transform": torch.float32,
}
_ALL_TENSORS = {**_REQUIRED_TENSORS, **_OPTIONAL_TENSORS}


def class_contiguous_labels(num_classes: int, ipc: int) -> torch.Tensor:
    """Labels in the format's order: ``ipc`` of class 0, then class 1, ..."""
    return torch.arange(num_classes, dtype=torch.int64).repeat_interleave(ipc)


def encode_metadata(metadata: dict[str, Any]) -> str:
    """Sorted, strict JSON (no NaN), so the same metadata always gives the same bytes."""
    try:
        return json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CondensedSetError(f"metadata is not plain JSON (str, int, float, bool, list, dict): {exc}") from exc


class CondensedSet:
    """A condensed set in memory: images, labels, optional soft labels / learned lr / coreset indices /
    ZCA whitening, metadata."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        source: str,
        method: str,
        ipc: int,
        soft_labels: torch.Tensor | None = None,
        lr: torch.Tensor | float | None = None,
        indices: torch.Tensor | None = None,
        metadata: dict[str, Any] | None = None,
        zca: ZCA | None = None,
        storage: dict[str, Any] | None = None,
        patch_mask: torch.Tensor | None = None,
    ) -> None:
        """``storage`` (see :mod:`condensed_datasets.pixel_storage`) writes real images as uint8 pixels
        (``{"images": "uint8"}``) or as kept patches (``{"images": "patches", "patch_size": p, "kept": k}``
        with ``patch_mask``, bool [N, rows, cols], True where kept); ``images`` stay float either way."""
        if metadata is not None and not isinstance(metadata, dict):
            raise CondensedSetError(f"metadata must be a mapping, got {type(metadata).__name__}")
        meta = dict(metadata or {})
        meta.pop("storage", None)
        if storage is not None:
            meta["storage"] = dict(storage)
            meta["format_version"] = STORAGE_FORMAT_VERSION
        if zca is not None:
            prior = meta.get("zca")
            meta["zca"] = {**(prior if isinstance(prior, dict) else {}), "eps": float(zca.eps)}
        problem = _names_problem(source, method, ipc)
        if problem:
            raise CondensedSetError(problem)
        meta["source"] = source.lower()
        meta["method"] = method
        meta["ipc"] = ipc
        meta.setdefault("format_version", FORMAT_VERSION)
        if "classes" not in meta and isinstance(meta.get("class_subset"), list) and meta["source"] in SOURCES:
            names = get_source(meta["source"]).classes  # a set of some of the source's classes names them
            meta["classes"] = [names[i] for i in meta["class_subset"] if isinstance(i, int) and 0 <= i < len(names)]
        if "classes" not in meta:
            if meta["source"] not in SOURCES:
                raise CondensedSetError(
                    f"source {source!r} is not a known source ({', '.join(SOURCES)}); "
                    "pass metadata={'classes': [...]} to name its classes"
                )
            meta["classes"] = list(get_source(meta["source"]).classes)
        if "normalization" not in meta and meta["source"] in SOURCES:
            info = get_source(meta["source"])
            meta["normalization"] = {"mean": list(info.mean), "std": list(info.std)}
        images = torch.as_tensor(images).detach().cpu().contiguous()
        meta["image_shape"] = list(images.shape[1:])
        if lr is not None:
            lr = torch.as_tensor(lr, dtype=torch.float32).detach().cpu().contiguous()
        tensors = {
            "images": images,
            "labels": torch.as_tensor(labels).detach().cpu().contiguous(),
            "soft_labels": None if soft_labels is None else torch.as_tensor(soft_labels).detach().cpu().contiguous(),
            "lr": lr,
            "indices": None if indices is None else torch.as_tensor(indices).detach().cpu().contiguous(),
            **(zca.tensors() if zca is not None else {}),
        }
        tensors = {k: v for k, v in tensors.items() if v is not None}
        problem = _first_problem(tensors, meta)
        if problem:
            raise CondensedSetError(problem)
        self.images: torch.Tensor = tensors["images"]
        self.labels: torch.Tensor = tensors["labels"]
        self.soft_labels: torch.Tensor | None = tensors.get("soft_labels")
        self.lr: torch.Tensor | None = tensors.get("lr")
        self.indices: torch.Tensor | None = tensors.get("indices")
        self.zca_mean: torch.Tensor | None = tensors.get("zca_mean")
        self.zca_transform: torch.Tensor | None = tensors.get("zca_transform")
        self.metadata: dict[str, Any] = json.loads(encode_metadata(meta))
        self.patch_mask: torch.Tensor | None = None if patch_mask is None else patch_mask.detach().cpu().contiguous()
        self._stored: dict[str, torch.Tensor] | None = None
        if storage is not None:
            if zca is not None:
                raise CondensedSetError("ZCA-whitened images are not pixels: store them as float32 (no storage)")
            try:
                self._stored = encode_images(self.images, self.metadata["storage"], self.metadata["normalization"],
                                             self.patch_mask)
            except StorageError as exc:
                raise CondensedSetError(str(exc)) from exc
        elif patch_mask is not None:
            raise CondensedSetError("a patch_mask needs storage={'images': 'patches', ...}")

    # -- derived facts -------------------------------------------------------------------
    @property
    def source(self) -> str:
        return self.metadata["source"]

    @property
    def method(self) -> str:
        return self.metadata["method"]

    @property
    def ipc(self) -> int:
        return self.metadata["ipc"]

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.metadata["classes"])

    @property
    def source_classes(self) -> list[int]:
        """The source class index of each label 0..k-1: ``class_subset`` when set, else 0..k-1."""
        subset = self.metadata.get("class_subset")
        return list(subset) if subset is not None else list(range(self.num_classes))

    @property
    def zca(self) -> ZCA | None:
        """The whitening that maps normalised real images into the set's space, or None."""
        if self.zca_mean is None or self.zca_transform is None:
            return None
        return ZCA.from_tensors(self.zca_mean, self.zca_transform, self.metadata["zca"]["eps"])

    @property
    def evaluation(self) -> dict[str, Any] | None:
        return self.metadata.get("evaluation")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"CondensedSet(source={self.source!r}, method={self.method!r}, ipc={self.ipc}, "
            f"images={tuple(self.images.shape)}, soft_labels={self.soft_labels is not None})"
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as they are written to the file."""
        out = {"images": self.images, "labels": self.labels}
        for name in _OPTIONAL_TENSORS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self._stored is not None:
            del out["images"]
            out.update(self._stored)
        return out

    def with_metadata(self, **updates: Any) -> "CondensedSet":
        """A copy whose metadata has ``updates`` merged in at the top level."""
        meta = {**self.metadata, **updates}
        return CondensedSet(
            self.images, self.labels, source=self.source, method=self.method, ipc=self.ipc,
            soft_labels=self.soft_labels, lr=self.lr, indices=self.indices, metadata=meta, zca=self.zca,
            storage=self.metadata.get("storage"), patch_mask=self.patch_mask,
        )

    # -- disk ----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The file's bytes: the same set always gives the same bytes."""
        return _safetensors_save(self.tensors(), metadata={METADATA_KEY: encode_metadata(self.metadata)})

    def save(self, path: str | os.PathLike, *, replace: bool = True) -> Path:
        """Write the set atomically (temporary file in the same folder, fsync, rename); ``replace=False``: only
        where no file is (FileExistsError otherwise, the file there untouched)."""
        return atomic_write_bytes(path, self.to_bytes(), replace=replace)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> "CondensedSet":
        """Parse and validate a file's bytes; ``name`` is used in error messages."""
        metadata = _read_header_metadata(data, name)
        try:
            tensors = _safetensors_load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise CondensedSetError(f"{name}: not a readable safetensors file ({exc})") from exc
        unknown = sorted(set(tensors) - set(_ALL_TENSORS) - STORED_TENSORS)
        if unknown:
            raise CondensedSetError(f"{name}: unexpected tensors {unknown}; valid: {sorted(_ALL_TENSORS)}")
        patch_mask = None
        problem = _header_problem(metadata)  # before decoding: the decoder reads the metadata's values
        if problem:
            raise CondensedSetError(f"{name}: {problem}")
        if "storage" in metadata:
            try:
                tensors["images"], patch_mask = decode_images(tensors, metadata)
            except (StorageError, TypeError) as exc:
                raise CondensedSetError(f"{name}: {exc}") from exc
            for stored in STORED_TENSORS:
                tensors.pop(stored, None)
        elif set(tensors) & STORED_TENSORS:
            raise CondensedSetError(f"{name}: tensors {sorted(set(tensors) & STORED_TENSORS)} need metadata 'storage'")
        problem = _first_problem(tensors, metadata)
        if problem:
            raise CondensedSetError(f"{name}: {problem}")
        return cls(
            tensors["images"], tensors["labels"], source=metadata["source"], method=metadata["method"],
            ipc=metadata["ipc"], soft_labels=tensors.get("soft_labels"), lr=tensors.get("lr"),
            indices=tensors.get("indices"), metadata=metadata,
            zca=ZCA.from_tensors(tensors["zca_mean"], tensors["zca_transform"], metadata["zca"]["eps"])
            if "zca_mean" in tensors else None,
            storage=metadata.get("storage"), patch_mask=patch_mask,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CondensedSet":
        """Read and validate a set; refuses anything that is not a well-formed condensed set."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no condensed set at {path}")
        return cls.from_bytes(path.read_bytes(), str(path))


def whole_set_problem(metadata: dict[str, Any], source: str, method: str, ipc: int) -> str | None:
    """Why the set of ``metadata`` is not the set of every class of ``source`` by ``method`` at ``ipc`` (what a
    file named ``{method}_ipc{ipc}.safetensors`` under ``condensed/{source}/`` must hold), or None."""
    if (metadata["source"], metadata["method"], metadata["ipc"]) != (source, method, ipc):
        return (f"holds source={metadata['source']!r} method={metadata['method']!r} ipc={metadata['ipc']}, not "
                f"source={source!r} method={method!r} ipc={ipc}")
    if metadata.get("class_subset") is not None:
        return (f"holds {source} classes {metadata['class_subset']} only, not all of them (a set of some "
                f"classes lives under condensed/{source}/classes/)")
    return None


def _parse_header(head: bytes, size: int, name: str) -> dict[str, str]:
    """Check a safetensors file's framing from its first bytes and total size (so nothing else is ever
    parsed); return its ``__metadata__`` map. ``head`` holds at least the 8-byte length and the header."""
    if len(head) < 8:
        raise CondensedSetError(f"{name}: file is truncated or empty ({size} bytes); not a safetensors file")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > HEADER_LIMIT or header_len > size - 8 or len(head) < 8 + header_len:
        raise CondensedSetError(
            f"{name}: not a safetensors file (its first 8 bytes give a header of {header_len} bytes "
            f"in a file of {size}); condensed sets are never pickles — rebuild or re-download it"
        )
    try:
        header = json.loads(head[8 : 8 + header_len].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError: also numbers of more than 4300 digits
        raise CondensedSetError(f"{name}: not a safetensors file (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CondensedSetError(f"{name}: not a safetensors file (header is not a JSON object)")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError, OverflowError) as exc:  # OverflowError: 1e400
            raise CondensedSetError(f"{name}: malformed safetensors header entry {key!r}") from exc
    if 8 + header_len + end != size:
        raise CondensedSetError(
            f"{name}: file is truncated or padded (tensor data needs {8 + header_len + end} bytes, "
            f"file has {size}); download or build it again"
        )
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CondensedSetError(f"{name}: malformed safetensors header (__metadata__ must map strings to strings)")
    return metadata


def read_safetensors_metadata(data: bytes, name: str) -> dict[str, str]:
    """Check a safetensors file's framing by hand (so nothing else is ever parsed); return its metadata map."""
    return _parse_header(data, len(data), name)


def _our_metadata(raw_map: dict[str, str], name: str) -> dict[str, Any]:
    """Our metadata (the JSON under METADATA_KEY) from a safetensors metadata map."""
    raw = raw_map.get(METADATA_KEY)
    if raw is None:
        raise CondensedSetError(f"{name}: safetensors file without '{METADATA_KEY}' metadata; not a condensed set")
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: also numbers of more than 4300 digits
        raise CondensedSetError(f"{name}: '{METADATA_KEY}' metadata is not JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise CondensedSetError(f"{name}: '{METADATA_KEY}' metadata is not a JSON object")
    return metadata


def _read_header_metadata(data: bytes, name: str) -> dict[str, Any]:
    """Our metadata of a safetensors file's bytes."""
    return _our_metadata(read_safetensors_metadata(data, name), name)


def read_file_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Our metadata of a set file, reading only its header (never the tensors)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) == 8:
            (header_len,) = struct.unpack("<Q", head)
            head += handle.read(min(header_len, HEADER_LIMIT))
    metadata = _our_metadata(_parse_header(head, size, str(path)), str(path))
    problem = _header_problem(metadata)
    if problem:
        raise CondensedSetError(f"{path}: {problem}")
    return metadata


def _header_problem(meta: dict[str, Any]) -> str | None:
    """The first way a set's metadata breaks the format's types and names (its storage block included), or None."""
    return metadata_problem(meta) or (storage_problem(meta["storage"]) if "storage" in meta else None)


def _first_problem(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str | None:
    """The first way ``tensors`` and ``meta`` break the format, or None."""
    problem = _header_problem(meta)
    if problem:
        return problem
    subset_problem = _class_subset_problem(meta)
    if subset_problem:
        return subset_problem
    for name, dtype in _REQUIRED_TENSORS.items():
        if name not in tensors:
            return f"missing tensor {name!r}"
    for name, dtype in _ALL_TENSORS.items():
        if name in tensors and tensors[name].dtype != dtype:
            return f"tensor {name!r} has dtype {tensors[name].dtype}, expected {dtype}"
    images, labels = tensors["images"], tensors["labels"]
    if images.dim() != 4 or min(images.shape[1:], default=0) < 1:
        return f"images must be [N,C,H,W] with C, H, W >= 1, got shape {tuple(images.shape)}"
    info = SOURCES.get(meta["source"])
    if info is not None and images.shape[1] != info.channels:
        return f"{info.name} images have {info.channels} channel(s), the file's have {images.shape[1]}"
    norm = meta.get("normalization")
    if norm is not None and len(norm["mean"]) != images.shape[1]:
        return (f"normalization has {len(norm['mean'])} channels, the images have {images.shape[1]}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        return f"labels must be [N] with N={images.shape[0]}, got shape {tuple(labels.shape)}"
    shape = meta.get("image_shape")
    if shape is not None and list(images.shape[1:]) != list(shape):
        return f"images have shape {list(images.shape[1:])} per image, metadata says {shape}"
    k, ipc, n = len(meta["classes"]), meta["ipc"], images.shape[0]
    if n != k * ipc:
        return f"{n} images, but {k} classes x ipc {ipc} = {k * ipc}"
    if n and (labels.min() < 0 or labels.max() >= k):
        return f"labels out of range [0, {k}): min {int(labels.min())}, max {int(labels.max())}"
    if not torch.equal(labels, class_contiguous_labels(k, ipc)):
        return f"labels are not class-contiguous (expected {ipc} of class 0, then class 1, ...)"
    if not torch.isfinite(images).all():
        return "images contain NaN or inf"
    soft = tensors.get("soft_labels")
    if soft is not None and (soft.dim() != 2 or tuple(soft.shape) != (n, k)):
        return f"soft_labels must be [N, K] = [{n}, {k}], got {tuple(soft.shape)}"
    if soft is not None and not torch.isfinite(soft).all():
        return "soft_labels contain NaN or inf"
    lr = tensors.get("lr")
    if lr is not None and (lr.dim() > 1 or lr.numel() == 0):
        return f"lr must be a scalar or 1-D (one per step), got shape {tuple(lr.shape)}"
    if lr is not None and not torch.isfinite(lr).all():
        return "lr contains NaN or inf"
    indices = tensors.get("indices")
    if indices is not None and tuple(indices.shape) != (n,):
        return f"indices must be [N] = [{n}], got {tuple(indices.shape)}"
    limit = info.train_size if info is not None and info.train_size else None
    if indices is not None and n and (indices.min() < 0 or (limit is not None and indices.max() >= limit)):
        return (f"indices must be rows of the real train split, in [0, {limit if limit else 'N'}): "
                f"min {int(indices.min())}, max {int(indices.max())}")
    return _zca_problem(tensors, meta, math.prod(images.shape[1:]))


def _zca_problem(tensors: dict[str, torch.Tensor], meta: dict[str, Any], d: int) -> str | None:
    """The first way the optional ZCA tensors and metadata break the format, or None."""
    mean, transform, info = tensors.get("zca_mean"), tensors.get("zca_transform"), meta.get("zca")
    if mean is None and transform is None:
        if info is not None:
            return "metadata 'zca' is set but the tensors zca_mean / zca_transform are missing"
        return None
    if mean is None or transform is None:
        return "zca_mean and zca_transform come together: the file has only one of them"
    if tuple(mean.shape) != (d,):
        return f"zca_mean must be [D] = [{d}] (C*H*W of the images), got {tuple(mean.shape)}"
    if tuple(transform.shape) != (d, d):
        return f"zca_transform must be [D, D] = [{d}, {d}], got {tuple(transform.shape)}"
    if not (torch.isfinite(mean).all() and torch.isfinite(transform).all()):
        return "zca_mean / zca_transform contain NaN or inf"
    eps = info.get("eps") if isinstance(info, dict) else None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        return f"metadata 'zca' must be a mapping with a positive 'eps', got {info!r}"
    return None


def _class_subset_problem(meta: dict[str, Any]) -> str | None:
    """The first way the optional ``class_subset`` breaks the format, or None.

    A set of some of its source's classes lists their source indices in ``class_subset`` (distinct,
    in the order of the set's labels 0..k-1); its ``classes`` are those classes' names.
    """
    subset = meta.get("class_subset")
    if subset is None:
        return None
    if not isinstance(subset, list) or not subset or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in subset
    ):
        return f"metadata 'class_subset' must be a non-empty list of source class indices (ints >= 0), got {subset!r}"
    if len(set(subset)) != len(subset):
        return f"metadata 'class_subset' lists a class twice: {subset}"
    source = meta.get("source")
    names = get_source(source).classes if source in SOURCES else None
    if names is not None and max(subset) >= len(names):
        return f"metadata 'class_subset' has index {max(subset)}, but {source} has {len(names)} classes"
    if len(subset) != len(meta["classes"]):
        return (f"metadata 'class_subset' has {len(subset)} classes but 'classes' names {len(meta['classes'])}; "
                "they must match (label j is source class class_subset[j])")
    if names is not None:
        if [names[i] for i in subset] != list(meta["classes"]):
            return "metadata 'classes' are not the names of the source classes listed in 'class_subset'"
    return None
