"""Property-based tests: whatever a stranger's file holds, the loader and the index parser either accept it as
valid (and everything downstream then works) or raise the format's own error; nothing else escapes."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from builders.cli import format_evaluation
from builders.publish import build_card
from builders.show import to_pixels
from condensed_datasets import catalogue
from condensed_datasets.datasets import SetSpace
from condensed_datasets.errors import CondensedSetError, IndexFormatError
from condensed_datasets.format import METADATA_KEY, CondensedSet, read_file_metadata

BOUNDED = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
_GOOD = CondensedSet(torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(10),
                     source="fashionmnist", method="dm", ipc=1, soft_labels=torch.zeros(10, 10), lr=0.01,
                     indices=torch.arange(10),
                     metadata={"evaluation": {"model": "ConvNet", "accuracy_mean": 80.0, "accuracy_std": 1.0,
                                              "runs": 2, "epochs": 3}, "recipe": {"model": "ConvNet"}, "seed": 0})
_META_KEYS = ["format_version", "source", "method", "ipc", "classes", "image_shape", "normalization",
              "evaluation", "recipe", "seed", "zca", "recipe_file", "build", "versions", "other"]
_NAMES = ["images", "labels", "soft_labels", "lr", "indices", "zca_mean", "zca_transform", "extra"]
_DTYPES = [torch.float32, torch.int64, torch.float16, torch.uint8]
_FILLS = [0.0, 1.0, -1.0, 60_000.0, float("nan"), float("inf")]


@st.composite
def metadata(draw: st.DrawFn) -> Any:
    """A valid set's metadata with a few keys replaced, removed or added, or any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    meta = json.loads(json.dumps(_GOOD.metadata))
    for key in draw(st.lists(st.sampled_from(_META_KEYS), max_size=3)):
        if draw(st.booleans()):
            meta.pop(key, None)
        else:
            meta[key] = draw(JSON)
    return meta


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """The valid set's tensors with a few replaced by tensors of any small shape, dtype and fill, or removed."""
    out = dict(_GOOD.tensors())
    for name in draw(st.lists(st.sampled_from(_NAMES), max_size=2)):
        if draw(st.booleans()):
            out.pop(name, None)
            continue
        shape = draw(st.lists(st.integers(0, 12), max_size=4))
        dtype = draw(st.sampled_from(_DTYPES))
        fill = draw(st.sampled_from(_FILLS))
        if not dtype.is_floating_point and not math.isfinite(fill):
            fill = 0.0  # NaN and inf have no integer form
        out[name] = torch.full(shape, fill).to(dtype)
    return out


def _valid_downstream(cset: CondensedSet) -> None:
    """What listings, the CLI, repr and the Dataset classes do with an accepted set."""
    assert CondensedSet.from_bytes(cset.to_bytes()).to_bytes() == cset.to_bytes()
    format_evaluation(cset.evaluation)
    entry = catalogue.index_entry(cset.metadata, sha256="0" * 64, size=1)
    assert catalogue.index_entry_problem(f"{cset.method}_ipc{cset.ipc}.safetensors", entry) is None
    SetSpace(cset.metadata, zca=cset.zca)
    to_pixels(cset)
    repr(cset)


@BOUNDED
@given(meta=metadata(), content=tensors())
def test_any_header_and_tensors_load_as_a_valid_set_or_raise_the_formats_error(
        tmp_path_factory: Any, meta: Any, content: dict[str, torch.Tensor]) -> None:
    data = st_save(content, metadata={METADATA_KEY: json.dumps(meta)})
    try:
        cset = CondensedSet.from_bytes(data)
    except CondensedSetError:
        cset = None
    path = tmp_path_factory.getbasetemp() / "property_dm_ipc1.safetensors"  # one scratch file, rewritten
    path.write_bytes(data)
    try:
        read_file_metadata(path)
    except CondensedSetError:
        assert cset is None  # what loads also lists
    if cset is not None:
        _valid_downstream(cset)


@BOUNDED
@given(raw=st.binary(max_size=200))
def test_any_bytes_load_or_raise_the_formats_error(raw: bytes) -> None:
    try:
        CondensedSet.from_bytes(raw)
    except CondensedSetError:
        pass


_FILES = ["dm_ipc1.safetensors", "dm_ipc10.safetensors", "mtt_ipc1.safetensors", "../x.safetensors", "index.json"]


def _good_entry() -> dict[str, Any]:
    data = _GOOD.to_bytes()
    return catalogue.index_entry(_GOOD.metadata, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


@st.composite
def index_documents(draw: st.DrawFn) -> Any:
    """Index documents: valid entries with a few fields changed, arbitrary entries and file names, or any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    files: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(_FILES) | st.text(max_size=8), max_size=4)):
        entry: Any = _good_entry()
        if draw(st.booleans()):
            for key in draw(st.lists(st.sampled_from(sorted(entry) + ["x"]), max_size=2)):
                entry[key] = draw(JSON)
        elif draw(st.booleans()):
            entry = draw(JSON)
        files[name] = entry
    doc: dict[str, Any] = {"index_version": draw(st.sampled_from([1, 2, "1", None])), "files": files}
    return doc


@BOUNDED
@given(doc=index_documents())
def test_any_index_parses_to_usable_entries_or_raises_the_index_error(doc: Any) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            index = catalogue.parse_index(json.dumps(doc).encode())
        except IndexFormatError:
            return
    for name, entry in index["files"].items():
        assert catalogue.index_entry_problem(name, entry) is None
    rows = catalogue.index_listing(index, where="hub", location="org/condensed-fashionmnist")
    assert len(rows) == len(index["files"])
    build_card(index, "org/condensed-fashionmnist")


@BOUNDED
@given(raw=st.binary(max_size=200))
def test_any_bytes_as_an_index_parse_or_raise_the_index_error(raw: bytes) -> None:
    try:
        catalogue.parse_index(raw)
    except IndexFormatError:
        pass
