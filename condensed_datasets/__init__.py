"""Condensed (distilled) image datasets as torchvision-style Dataset classes."""

from condensed_datasets._version import __version__
from condensed_datasets.constants import METHODS
from condensed_datasets.datasets import (
    CondensedCIFAR10,
    CondensedCIFAR100,
    CondensedFashionMNIST,
    CondensedMNIST,
    CondensedSVHN,
    CondensedTinyImageNet,
    CondensedVisionDataset,
    SetSpace,
    available_sets,
)
from condensed_datasets.errors import (
    CondensedDatasetsError,
    CondensedSetError,
    HubError,
    SetNotFoundError,
    SourceDataError,
    UnknownNameError,
)
from condensed_datasets.format import CondensedSet
from condensed_datasets.paths import set_path
from condensed_datasets.sources import SOURCES, SourceInfo, get_source, load_split

__all__ = [
    "CondensedCIFAR10",
    "CondensedCIFAR100",
    "CondensedFashionMNIST",
    "CondensedMNIST",
    "CondensedSVHN",
    "CondensedDatasetsError",
    "CondensedSet",
    "CondensedSetError",
    "HubError",
    "SetNotFoundError",
    "SourceDataError",
    "UnknownNameError",
    "CondensedTinyImageNet",
    "CondensedVisionDataset",
    "METHODS",
    "SOURCES",
    "SetSpace",
    "SourceInfo",
    "available_sets",
    "get_source",
    "load_split",
    "set_path",
    "__version__",
]
