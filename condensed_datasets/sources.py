"""The real image datasets that condensed sets stand in for: their facts and their loaders."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceInfo:
    """Facts about one real dataset: shape, classes, and the normalisation the papers use."""

    name: str
    channels: int
    image_size: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

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

SOURCES: dict[str, SourceInfo] = {
    info.name: info
    for info in (
        SourceInfo(
            "mnist", 1, 28,
            ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
             "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"),
            (0.1307,), (0.3081,),
        ),
        SourceInfo(
            "fashionmnist", 1, 28,
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            (0.2861,), (0.3530,),
        ),
        SourceInfo(
            "svhn", 3, 32, tuple(str(d) for d in range(10)),
            (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
        ),
        SourceInfo(
            "cifar10", 3, 32,
            ("airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"),
            (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
        ),
        SourceInfo(
            "cifar100", 3, 32, tuple(_CIFAR100_CLASSES),
            (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762),
        ),
    )
}


def get_source(name: str) -> SourceInfo:
    """The facts of a source by name (lower case, as in file paths); ValueError lists the valid names."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in SOURCES:
        raise ValueError(f"unknown source {name!r}; valid sources: {', '.join(SOURCES)}")
    return SOURCES[key]
