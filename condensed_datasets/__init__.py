"""Condensed (distilled) image datasets as torchvision-style Dataset classes."""

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
    set_path,
)
from condensed_datasets.format import METHODS, CondensedSet, CondensedSetError
from condensed_datasets.sources import SOURCES, SourceInfo, get_source, load_split

__version__ = "0.1.0"

__all__ = [
    "CondensedCIFAR10",
    "CondensedCIFAR100",
    "CondensedFashionMNIST",
    "CondensedMNIST",
    "CondensedSVHN",
    "CondensedSet",
    "CondensedSetError",
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
