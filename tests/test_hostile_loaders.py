"""Hostile input to the consumer side, found by an audit: crafted set headers (numbers JSON allows but Python
cannot hold, storage blocks of the wrong types), names that end in a newline, folders and links where files
go, damaged real-data files, and hub step memories of the wrong classes. Each must be the package's own
error naming the problem (or, for a constructor argument of the wrong type, a TypeError naming it); nothing
is written outside the root or under a set's final name unless it is right."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from hubserver import HubServer, go_offline
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save as st_save

from condensed_datasets import CondensedFashionMNIST, catalogue, hub, paths, sources
from condensed_datasets.continual import ClassIncrementalBuffer
from condensed_datasets.errors import (
    CondensedSetError,
    HubError,
    HubIntegrityError,
    IndexFormatError,
    SetNotFoundError,
    SkippedEntryWarning,
    SourceDataError,
    UnknownNameError,
)
from condensed_datasets.format import METADATA_KEY, CondensedSet, read_file_metadata
from condensed_datasets.metadata_checks import is_number
from condensed_datasets.paths import set_path
from condensed_datasets.sources import load_split

BOUNDED = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REPO = "org/condensed-fashionmnist"
HUGE_INT = "1" * 5000  # JSON allows it; Python refuses to parse an int of more than 4300 digits (ValueError)


def make_cset(seed: int = 0) -> CondensedSet:
    g = torch.Generator().manual_seed(seed)
    return CondensedSet(torch.randn(10, 1, 28, 28, generator=g), torch.arange(10), source="fashionmnist",
                        method="dm", ipc=1)


def with_metadata_text(text: str, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """A safetensors file whose metadata JSON is ``text`` exactly (a stranger's file, never validated)."""
    return st_save(tensors if tensors is not None else make_cset().tensors(), metadata={METADATA_KEY: text})


def framed(header: bytes, body: bytes = b"") -> bytes:
    """Bytes framed as safetensors frames them: 8-byte little-endian header length, header, body."""
    return struct.pack("<Q", len(header)) + header + body


# -- 1. names that end in a newline ----------------------------------------------------------------------
@pytest.mark.parametrize("check, value", [
    (lambda v: paths.check_name(v, "method"), "dm\n"), (lambda v: paths.check_name(v, "source"), "fashionmnist\n"),
    (paths.check_repo_id, "org/condensed-fashionmnist\n"), (paths.check_revision, "main\n"),
])
def test_a_name_with_a_trailing_newline_is_refused(check: Any, value: str) -> None:
    with pytest.raises(UnknownNameError):  # "$" matched before a final "\n"
        check(value)


def test_a_set_or_index_entry_named_with_a_trailing_newline_is_refused() -> None:
    assert paths.parse_set_filename("dm_ipc1.safetensors\n") is None
    meta = {**make_cset().metadata, "method": "user_x\n"}
    with pytest.raises(CondensedSetError, match="not a valid name"):
        CondensedSet.from_bytes(with_metadata_text(json.dumps(meta)))
    data = make_cset().to_bytes()
    entry = catalogue.index_entry(make_cset().metadata, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    assert catalogue.index_entry_problem("dm_ipc1.safetensors\n", entry) is not None
    assert catalogue.index_entry_problem("dm_ipc1.safetensors", {**entry, "sha256": entry["sha256"] + "\n"})


# -- 2. numbers JSON allows but Python cannot hold ------------------------------------------------------
def test_numbers_python_cannot_hold_are_the_formats_and_the_indexs_errors(tmp_path: Path) -> None:
    good = json.dumps(make_cset().metadata)
    path = tmp_path / "dm_ipc1.safetensors"
    for text in (good[:-1] + f',"seed":{HUGE_INT}}}', good[:-1] + f',"other":[{HUGE_INT}]}}'):
        path.write_bytes(with_metadata_text(text))
        with pytest.raises(CondensedSetError, match="not JSON"):
            CondensedSet.load(path)
        with pytest.raises(CondensedSetError, match="not JSON"):
            read_file_metadata(path)
    with pytest.raises(IndexFormatError, match="not JSON"):
        catalogue.parse_index(f'{{"index_version": 1, "files": {{}}, "x": {HUGE_INT}}}'.encode())
    # an int too large for a float is not a finite number (math.isfinite raised OverflowError)
    assert not is_number(10 ** 400)
    meta = {**make_cset().metadata, "evaluation": {"accuracy_mean": 10 ** 400}}
    with pytest.raises(CondensedSetError, match="accuracy_mean must be a finite number"):
        CondensedSet.from_bytes(with_metadata_text(json.dumps(meta)))
    data = make_cset().to_bytes()
    entry = catalogue.index_entry(make_cset().metadata, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    assert "not a finite number" in catalogue.index_entry_problem("dm_ipc1.safetensors",
                                                                  {**entry, "accuracy_mean": 10 ** 400})


_TOKENS = ["0", "1", "-1", "8", "1e400", "-1e400", "NaN", "Infinity", "1.5", HUGE_INT, '"x"', '"F32"', '"U8"',
           "null", "true", "[]", "{}", "[0]", "[0, 4]", "[0, 1e400]", '["0", "4"]', "[1, 1]",
           "[" * 3000 + "]" * 3000, '{"a": "b"}']


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A safetensors file framed correctly around a header whose values are raw JSON tokens (numbers out of
    Python's reach, NaN, deep nesting, wrong types) or a few bytes that are not UTF-8."""
    token = st.sampled_from(_TOKENS)
    entries = []
    for name in draw(st.lists(st.sampled_from(["images", "labels", "x"]), max_size=2, unique=True)):
        entries.append(f'"{name}": {{"dtype": {draw(token)}, "shape": {draw(token)}, '
                       f'"data_offsets": {draw(token)}}}')
    if draw(st.booleans()):
        entries.append(f'"__metadata__": {{"{METADATA_KEY}": {draw(token)}}}')
    text = ("{" + ", ".join(entries) + "}").encode()
    if draw(st.integers(0, 5)) == 0:
        text = text[:1] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + text[1:]
    return framed(text, b"\0" * draw(st.sampled_from([0, 4, 8])))


@BOUNDED
@given(data=headers())
@example(data=framed(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}'))
@example(data=framed(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + HUGE_INT.encode() + b']}}'))
def test_any_framed_header_is_a_set_or_the_formats_error(tmp_path_factory: Any, data: bytes) -> None:
    with pytest.raises(CondensedSetError):  # none of these headers frames a whole set
        CondensedSet.from_bytes(data)
    path = tmp_path_factory.getbasetemp() / "hostile_header_dm_ipc1.safetensors"  # one scratch file, rewritten
    path.write_bytes(data)
    with pytest.raises(CondensedSetError):
        read_file_metadata(path)


# -- 3. stored-pixel blocks are checked before they are decoded ----------------------------------------------
def _patch_tensors(n: int = 10, kept: int = 1, p: int = 4, mask_bytes: int = 7) -> dict[str, torch.Tensor]:
    return {"labels": torch.arange(10)[:n] if n <= 10 else torch.zeros(n, dtype=torch.int64),
            "patches": torch.zeros(n, kept, 1, p, p, dtype=torch.uint8),
            "patch_mask": torch.zeros(n, mask_bytes, dtype=torch.uint8)}


def _stored(storage: Any, tensors: dict[str, torch.Tensor] | None = None, **changes: Any) -> bytes:
    meta = {**make_cset().metadata, "format_version": 2, "storage": storage, **changes}
    return with_metadata_text(json.dumps(meta), tensors if tensors is not None else _patch_tensors())


_UINT8 = {"labels": torch.arange(10), "images": torch.zeros(10, 1, 28, 28, dtype=torch.uint8)}
STORAGE_CASES = {
    # was RuntimeError (unpack_mask could not reshape 0 rows)
    "no images": (_stored({"images": "patches", "patch_size": 4, "kept": 1}, _patch_tensors(n=0))),
    # was KeyError 'mean'
    "normalization without mean": _stored({"images": "uint8"}, _UINT8, normalization={}),
    # was ValueError from torch.tensor
    "normalization of strings": _stored({"images": "uint8"}, _UINT8, normalization={"mean": ["a"], "std": [1]}),
    # was OverflowError
    "normalization too large for a float": _stored({"images": "uint8"}, _UINT8,
                                                   normalization={"mean": [10 ** 400], "std": [1]}),
    # keeps no patch, or 1 of 196: decoding would make far more pixels than the file holds (was accepted)
    "kept 0": _stored({"images": "patches", "patch_size": 2, "kept": 0}, _patch_tensors(kept=0, p=2, mask_bytes=25)),
    "kept 1 of 196": _stored({"images": "patches", "patch_size": 2, "kept": 1},
                             {**_patch_tensors(p=2, mask_bytes=25),
                              "patch_mask": torch.tensor([[1] + [0] * 24] * 10, dtype=torch.uint8)}),
}
# were CondensedSetErrors with the TypeError's words ("not all arguments converted during string formatting",
# "slice indices must be integers"): now the message names the field
MISLEADING_CASES = {
    "patch_size a string": ("patch_size", _stored({"images": "patches", "patch_size": "4", "kept": 1})),
    "patch_size a float": ("patch_size", _stored({"images": "patches", "patch_size": 4.0, "kept": 1})),
    "image_shape of strings": ("image_shape", _stored({"images": "patches", "patch_size": 4, "kept": 1},
                                                      image_shape=[1, "28", "28"])),
    "image_shape of floats": ("image_shape", _stored({"images": "patches", "patch_size": 4, "kept": 1},
                                                     image_shape=[1, 28.0, 28.0])),
    "storage a list": ("metadata 'storage'", _stored([])),
}


@pytest.mark.parametrize("name", sorted(STORAGE_CASES))
def test_stored_pixel_blocks_of_the_wrong_types_are_the_formats_error(name: str) -> None:
    with pytest.raises(CondensedSetError):
        CondensedSet.from_bytes(STORAGE_CASES[name])


@pytest.mark.parametrize("name", sorted(MISLEADING_CASES))
def test_stored_pixel_blocks_of_the_wrong_types_are_named_in_the_error(name: str) -> None:
    field, data = MISLEADING_CASES[name]
    with pytest.raises(CondensedSetError, match=field):
        CondensedSet.from_bytes(data)


def test_a_patch_dropped_set_still_round_trips() -> None:
    mask = torch.zeros(10, 7, 7, dtype=torch.bool)
    mask[:, :3] = True  # 21 of 49 patches kept
    images = torch.where(mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1),
                         (torch.arange(10 * 784).reshape(10, 1, 28, 28) % 256 / 255.0 - 0.2861) / 0.3530, 0.0)
    cset = CondensedSet(images, torch.arange(10), source="fashionmnist", method="dq", ipc=1,
                        storage={"images": "patches", "patch_size": 4, "kept": 21}, patch_mask=mask)
    back = CondensedSet.from_bytes(cset.to_bytes())
    assert torch.equal(back.images, cset.images) and torch.equal(back.patch_mask, mask)
    one = torch.zeros(10, 14, 14, dtype=torch.bool)
    one[:, 0, 0] = True  # 1 of 196 2x2 patches: a file the loader would refuse is never written
    with pytest.raises(CondensedSetError, match="under 1/64"):
        CondensedSet(images * 0, torch.arange(10), source="fashionmnist", method="dq", ipc=1,
                     storage={"images": "patches", "patch_size": 2, "kept": 1}, patch_mask=one)


_SMALL_JSON = st.none() | st.booleans() | st.integers(-3, 40) | st.sampled_from([4.0, 1e300, "4", "uint8", "patches"])


@BOUNDED
@given(storage=st.one_of(_SMALL_JSON, st.dictionaries(st.sampled_from(["images", "patch_size", "kept", "x"]),
                                                      _SMALL_JSON, max_size=4)),
       n=st.sampled_from([0, 1, 10]), kept=st.integers(0, 3), p=st.sampled_from([1, 2, 4, 7]),
       mask_bytes=st.integers(0, 8), shape=st.sampled_from([None, [1, 28, 28], [1, 28, 0], [1, "28", 28]]))
@example(storage={"images": "patches", "patch_size": 4, "kept": 1}, n=0, kept=1, p=4, mask_bytes=7, shape=None)
def test_any_storage_block_loads_or_is_the_formats_error(storage: Any, n: int, kept: int, p: int, mask_bytes: int,
                                                        shape: Any) -> None:
    changes = {} if shape is None else {"image_shape": shape}
    try:
        CondensedSet.from_bytes(_stored(storage, _patch_tensors(n, kept, p, mask_bytes), **changes))
    except CondensedSetError:
        pass


# -- 4. folders and links where files go -----------------------------------------------------------------------
def _serve(server: HubServer) -> bytes:
    folder = server.repo_dir(REPO)
    folder.mkdir(parents=True, exist_ok=True)
    data = make_cset().to_bytes()
    (folder / "dm_ipc1.safetensors").write_bytes(data)
    return data


def test_a_lock_file_that_is_a_link_or_a_folder_is_a_hub_error_and_nothing_outside_is_touched(
        tmp_path: Path, server: HubServer) -> None:
    _serve(server)
    victim = tmp_path / "precious.txt"
    victim.write_text("mine")
    for kind in ("link", "folder"):
        root = tmp_path / kind
        lock = set_path(root, "fashionmnist", "dm", 1).parent / ".dm_ipc1.safetensors.lock"
        lock.parent.mkdir(parents=True)
        lock.symlink_to(victim) if kind == "link" else lock.mkdir()
        with pytest.raises(HubError, match="cannot take the download lock"):  # was a bare OSError
            hub.download_set(root, "fashionmnist", "dm", 1, repo_id=REPO)
        assert not set_path(root, "fashionmnist", "dm", 1).exists()
    assert victim.read_text() == "mine"


def test_a_folder_where_the_set_goes_or_a_root_that_is_a_file_is_a_clear_error(
        tmp_path: Path, server: HubServer) -> None:
    _serve(server)
    path = set_path(tmp_path / "root", "fashionmnist", "dm", 1)
    path.mkdir(parents=True)
    for download in (False, True):  # was "not found at <path>" / IsADirectoryError after the download
        with pytest.raises(SetNotFoundError, match="is not a file"):
            CondensedFashionMNIST(tmp_path / "root", "dm", 1, download=download, repo_id=REPO)
    with pytest.raises(HubError, match="is not a file"):
        hub.download_set(tmp_path / "root", "fashionmnist", "dm", 1, repo_id=REPO)
    assert path.is_dir() and list(path.iterdir()) == []
    afile = tmp_path / "afile"
    afile.write_text("x")
    for download in (False, True):  # was "not found" / NotADirectoryError
        with pytest.raises(SetNotFoundError, match="is a file, not a folder"):
            CondensedFashionMNIST(afile, "dm", 1, download=download, repo_id=REPO)
    with pytest.raises(HubError, match="cannot make the folder"):  # was NotADirectoryError
        hub.download_set(afile, "fashionmnist", "dm", 1, repo_id=REPO)
    assert afile.read_text() == "x"
    with pytest.raises(TypeError, match="root must be a folder path"):
        CondensedFashionMNIST(None, "dm", 1)  # type: ignore[arg-type]


def test_a_deeply_nested_download_record_is_no_record(tmp_path: Path, server: HubServer) -> None:
    data = _serve(server)
    path = set_path(tmp_path, "fashionmnist", "dm", 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    hub.record_path(path).write_text("[" * 100_000 + "]" * 100_000)
    assert hub.read_record(path) is None  # was RecursionError
    ds = CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert len(ds) == 10 and path.read_bytes() == data


def test_a_file_that_changes_between_the_hubs_answer_and_the_download_writes_nothing(
        tmp_path: Path, server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(server)
    other = make_cset(seed=1).to_bytes()
    asked = hub.remote_file

    def then_change(*args: Any, **kwargs: Any) -> hub.RemoteFile:
        answer = asked(*args, **kwargs)
        (server.repo_dir(REPO) / "dm_ipc1.safetensors").write_bytes(other[:-100])  # other size, other hash
        return answer

    monkeypatch.setattr(hub, "remote_file", then_change)
    with pytest.raises(HubError):
        hub.download_set(tmp_path, "fashionmnist", "dm", 1, repo_id=REPO)
    left = sorted(p.name for p in (tmp_path / "condensed" / "fashionmnist").iterdir())
    assert left == [".dm_ipc1.safetensors.lock"]


def test_a_redirect_loop_is_a_hub_error_and_writes_nothing(tmp_path: Path, server: HubServer) -> None:
    _serve(server)
    (server.repo_dir(REPO) / "index.json").write_text(json.dumps({"index_version": 1, "files": {}}))
    for name in ("dm_ipc1.safetensors", "index.json"):
        loop = f"/datasets/{REPO}/resolve/main/{name}"
        server.redirect = {loop: loop}
        with pytest.raises(HubError, match="TooManyRedirects"):  # was httpx2.TooManyRedirects
            hub.download_set(tmp_path, "fashionmnist", "dm", 1, repo_id=REPO) if name != "index.json" \
                else hub.list_repo(REPO)
    assert not set_path(tmp_path, "fashionmnist", "dm", 1).exists()


def test_a_refusal_other_than_not_found_is_a_hub_error(tmp_path: Path, server: HubServer) -> None:
    _serve(server)  # no index.json: listing reads the file list
    server.fail = {"/resolve/main/dm_ipc1.safetensors": 403, "/tree/": 403}
    with pytest.raises(HubError, match="HTTP 403"):  # was huggingface_hub's HfHubHTTPError
        hub.download_set(tmp_path, "fashionmnist", "dm", 1, repo_id=REPO)
    with pytest.raises(HubError, match="HTTP 403"):
        hub.list_repo(REPO)
    assert not set_path(tmp_path, "fashionmnist", "dm", 1).exists()


def test_offline_a_damaged_cache_entry_is_a_hub_error(tmp_path: Path, server: HubServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(server)
    hub.download_set(tmp_path / "first", "fashionmnist", "dm", 1, repo_id=REPO)
    go_offline(monkeypatch)
    (snapshot,) = Path(hub.hub_cache_dir()).rglob("snapshots/*/dm_ipc1.safetensors")
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"not a set")
    snapshot.unlink()
    snapshot.symlink_to(victim)  # a cache entry that points outside the cache
    with pytest.raises(HubError, match="not a valid condensed set"):
        CondensedFashionMNIST(tmp_path / "second", "dm", 1, download=True, repo_id=REPO)
    assert victim.read_bytes() == b"not a set"
    snapshot.unlink()
    snapshot.mkdir()  # a folder where the cached file should be
    with pytest.raises(HubError, match="cannot be read"):  # was IsADirectoryError
        CondensedFashionMNIST(tmp_path / "second", "dm", 1, download=True, repo_id=REPO)
    assert not set_path(tmp_path / "second", "fashionmnist", "dm", 1).exists()


# -- 5. damaged real-data files -------------------------------------------------------------------------------
def _idx(dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload


def _fmnist_root(root: Path, images: bytes, labels: bytes) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    good_images, good_labels = _idx((2, 28, 28), bytes(2 * 784)), _idx((2,), bytes([0, 1]))
    for split, (x, y) in {"train": (good_images, good_labels), "t10k": (images, labels)}.items():
        (raw / f"{split}-images-idx3-ubyte").write_bytes(x)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(y)
    return root


FMNIST_CASES = {
    "empty images file": (b"", _idx((2,), bytes(2))),  # was ValueError
    "labels file as images": (_idx((2,), bytes(2)), _idx((2,), bytes(2))),  # was ValueError
    "fewer labels than images": (_idx((3, 28, 28), bytes(3 * 784)), _idx((2,), bytes(2))),  # was accepted
    "a label past the classes": (_idx((2, 28, 28), bytes(2 * 784)), _idx((2,), bytes([0, 200]))),  # was accepted
    "images of another size": (_idx((2, 32, 32), bytes(2 * 1024)), _idx((2,), bytes(2))),  # was accepted
}


@pytest.mark.parametrize("name", sorted(FMNIST_CASES))
def test_damaged_fashion_mnist_files_are_a_source_data_error(tmp_path: Path, name: str) -> None:
    images, labels = FMNIST_CASES[name]
    root = _fmnist_root(tmp_path, images, labels)
    with pytest.raises(SourceDataError, match=str(root)):
        load_split("fashionmnist", root, train=False)
    x, y = load_split("fashionmnist", root, train=True)  # the sound split still loads
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [0, 1]


@pytest.mark.parametrize("content", [gzip.compress(b"x" * 100)[:20], b"not gzip"])
def test_a_damaged_system_copy_is_a_source_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      content: bytes) -> None:
    system = tmp_path / "system"
    system.mkdir()
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        (system / f"{f}.gz").write_bytes(content)
    monkeypatch.setenv("CONDENSED_FASHION_MNIST_DIR", str(system))
    with pytest.raises(SourceDataError, match="not a readable gzip file"):  # was EOFError / BadGzipFile
        load_split("fashionmnist", tmp_path / "root", train=False)
    assert not (tmp_path / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def _png(size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (1, 2, 3)).save(out, "PNG")
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's opening)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b""))


def _tiny(root: Path, *, image: bytes = b"", wnids: bytes = b"n01443537\n",
          annotations: bytes = b"val_0.png\tn01443537\t0\t0\t63\t63\n") -> Path:
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "train").mkdir()
    (base / "wnids.txt").write_bytes(wnids)
    (base / "val" / "images" / "val_0.png").write_bytes(image or _png())
    (base / "val" / "val_annotations.txt").write_bytes(annotations)
    return root


TINY_CASES = {
    "decompression bomb": dict(image=_png_claiming(40_000, 40_000)),  # was PIL's DecompressionBombError
    "wnids not UTF-8": dict(wnids=b"\xff\xfe\n"),  # was UnicodeDecodeError
    "annotations not UTF-8": dict(annotations=b"\xff\tn01443537\n"),  # was UnicodeDecodeError
    # {outside}: a valid image outside the dataset's folder, which was read as one of its images
    "annotation climbing out": dict(annotations=b"../../../../../outside.png\tn01443537\n"),
    "annotation absolute": dict(annotations=b"{outside}\tn01443537\n"),
    "wnid with a separator": dict(wnids=b"n01443537\n../../x\n"),
}


@pytest.mark.parametrize("name", sorted(TINY_CASES))
def test_hostile_tiny_imagenet_files_are_a_source_data_error(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png())
    case = {k: v.replace(b"{outside}", str(outside).encode()) for k, v in TINY_CASES[name].items()}
    root = _tiny(tmp_path / "a" / "b", **case)  # images in {root}/tiny-imagenet-200/val/images/
    with pytest.raises(SourceDataError):
        load_split("tinyimagenet", root, train=False)
    assert not (root / "tiny-imagenet-200" / "val_uint8.safetensors").exists()


def test_a_sound_miniature_tiny_imagenet_still_loads(tmp_path: Path) -> None:
    x, y = load_split("tinyimagenet", _tiny(tmp_path), train=False)
    assert x.shape == (1, 3, 64, 64) and y.tolist() == [0]


# -- 6. a stranger's MAE folder for refilling dropped patches -------------------------------------------------
class _NotATensor:
    """Pickled into a weights file: the weights-only unpickler refuses it (and never runs it)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("never printed",))


def test_a_pickled_mae_folder_with_more_than_tensors_is_refused_clearly(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from condensed_datasets.mae_refill import load_mae

    config = transformers.ViTMAEConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=16, decoder_hidden_size=16,
                                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                       decoder_intermediate_size=16)
    config.save_pretrained(tmp_path)
    torch.save({"x": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="not readable"):  # was pickle.UnpicklingError
        load_mae(tmp_path)


# -- 7. class-incremental step memories from the hub; the buffer's arguments --------------------------------------
def test_a_step_memory_of_other_classes_from_the_hub_is_never_written(tmp_path: Path, server: HubServer) -> None:
    repo = "someone/condensed-fashionmnist"
    folder = server.repo_dir(repo) / "classes"
    folder.mkdir(parents=True)
    wrong = CondensedSet(torch.zeros(2, 1, 28, 28), torch.arange(2), source="fashionmnist", method="dm", ipc=1,
                         metadata={"class_subset": [4, 9]})
    (folder / "dm_ipc1_c2-8.safetensors").write_bytes(wrong.to_bytes())  # step 0 is classes [2, 8]
    buffer = ClassIncrementalBuffer("fashionmnist", "dm", 1, steps=5, order_seed=0, root=tmp_path / "data",
                                    download=True, repo_id=repo)
    with pytest.raises(SetNotFoundError, match=r"classes \[4, 9\], not step 0's"):
        buffer.memory(0)
    assert not buffer.path(0).exists()  # was written, then refused on every later use


@pytest.mark.parametrize("kwargs", [{"ipc": "10"}, {"ipc": True}, {"ipc": 1.7}, {"ipc": "x"}, {"steps": "2"},
                                    {"steps": 2.5}])
def test_buffer_arguments_of_the_wrong_type_are_refused_not_coerced(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    args = {"source": "fashionmnist", "method": "dm", "ipc": 1, "steps": 5, "root": tmp_path, **kwargs}
    with pytest.raises(UnknownNameError):  # ipc 1.7 was 1, "10" was 10; "x", "2" and 2.5 raised builtins
        ClassIncrementalBuffer(**args)


def test_an_index_over_the_limit_is_refused_before_it_is_read(tmp_path: Path, server: HubServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    document = json.dumps({"index_version": 1, "files": {}, "padding": "x" * 200})  # a valid index of ~250 bytes
    monkeypatch.setattr(catalogue, "INDEX_LIMIT", 100)  # stands for the 64 MiB limit
    folder = tmp_path / "published"
    folder.mkdir()
    (folder / "index.json").write_text(document)
    with pytest.raises(IndexFormatError, match="over the 100-byte limit"):
        catalogue.list_folder(folder)
    _serve(server)
    (server.repo_dir(REPO) / "index.json").write_text(document)
    with pytest.raises(IndexFormatError, match="over the 100-byte limit"):
        hub.fetch_index(REPO)
    monkeypatch.setattr(catalogue, "INDEX_LIMIT", 1000)
    assert hub.fetch_index(REPO)["files"] == {}  # under the limit: read as before


# -- 8. a read-only root; files that do not hold the set their name says -------------------------------------------
class _ReadOnlyFolderLock:
    """The download lock of a folder on a read-only mount (shared data): taking it fails as the filesystem does."""

    def __init__(self, lock_file: str, timeout: float = -1) -> None:
        self.lock_file = lock_file

    def acquire(self) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), self.lock_file)

    def release(self) -> None:
        raise AssertionError("never taken")


def test_a_downloaded_set_on_a_read_only_root_loads_with_download_true(tmp_path: Path, server: HubServer,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(server)
    path = CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO).path  # while it was writable
    before = {p: p.read_bytes() for p in path.parent.iterdir()}
    monkeypatch.setattr(hub, "FileLock", _ReadOnlyFolderLock)
    for offline in (False, True):  # was HubError "cannot take the download lock ...: remove it and retry"
        if offline:
            go_offline(monkeypatch)
        assert len(CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)) == 10
    path.write_bytes(b"\x00" * 64)  # a broken copy cannot be replaced there: the error says why
    with pytest.raises(HubError, match="cannot be written.*a root folder you can write to"):
        CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    with pytest.raises(HubError, match="cannot be written.*a root folder you can write to"):
        CondensedFashionMNIST(tmp_path, "dm", 2, download=True, repo_id=REPO)
    assert sorted(path.parent.iterdir()) == sorted(before)


def test_the_real_test_split_on_a_read_only_root_is_a_source_data_error(tmp_path: Path, make_set: Any,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "system"
    system.mkdir()
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        (system / f"{f}.gz").write_bytes(gzip.compress(b"x" * 100))
    monkeypatch.setenv("CONDENSED_FASHION_MNIST_DIR", str(system))
    make_set(tmp_path / "root", "fashionmnist")

    def read_only(path: Any, data: bytes, **kwargs: Any) -> Path:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(sources, "atomic_write_bytes", read_only)
    with pytest.raises(SourceDataError, match="cannot be written.*a root folder you can write to"):  # was OSError
        CondensedFashionMNIST(tmp_path / "root", "dm", 1).real_test_set()


def test_a_set_of_some_classes_under_a_whole_sets_name_on_the_hub_is_never_written(tmp_path: Path,
                                                                                    server: HubServer) -> None:
    folder = server.repo_dir(REPO)
    folder.mkdir(parents=True)
    subset = CondensedSet(torch.zeros(2, 1, 28, 28), torch.arange(2), source="fashionmnist", method="dm", ipc=1,
                          metadata={"class_subset": [7, 3]})
    (folder / "dm_ipc1.safetensors").write_bytes(subset.to_bytes())
    with pytest.raises(HubIntegrityError, match=r"classes \[7, 3\] only"):  # was written and loaded as the whole set
        CondensedFashionMNIST(tmp_path, "dm", 1, download=True, repo_id=REPO)
    assert not set_path(tmp_path, "fashionmnist", "dm", 1).exists()


def test_a_file_whose_header_disagrees_with_its_name_is_left_out_of_listings(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDENSED_DATASETS_EMBEDDED_DIR", str(tmp_path / "no-embedded-sets"))
    misnamed = CondensedSet(torch.zeros(20, 1, 28, 28), torch.arange(10).repeat_interleave(2), source="fashionmnist",
                            method="dc", ipc=2).save(set_path(tmp_path, "fashionmnist", "dm", 3))
    subset = CondensedSet(torch.zeros(2, 1, 28, 28), torch.arange(2), source="fashionmnist", method="dm", ipc=1,
                          metadata={"class_subset": [7, 3]}).save(set_path(tmp_path, "fashionmnist", "dm", 1))
    with pytest.warns(SkippedEntryWarning) as caught:  # were listed as dc ipc 2 (file dm_ipc3) and dm ipc 1,
        assert catalogue.list_local(tmp_path, "fashionmnist") == []  # which no Dataset could load by those names
        assert catalogue.list_folder(misnamed.parent) == []
    text = " ".join(str(w.message) for w in caught)
    assert str(misnamed) in text and "method='dc' ipc=2" in text and str(subset) in text and "[7, 3] only" in text
    with pytest.warns(SkippedEntryWarning), pytest.raises(SetNotFoundError, match="present for fashionmnist: none"):
        CondensedFashionMNIST(tmp_path, "dc", 2)  # was "no dc set with ipc 2 ...; available ipcs for dc: 2"
