"""NAS proxies as data: the ConvNet search space of the DC paper, result tables, rank correlations.

The DC paper (Zhao et al., ICLR 2021, its NAS experiment; used again by DSA, DM and FTD) searches 720
ConvNets: depth {1,2,3,4} x width {32,64,128,256} x activation {sigmoid, relu, leakyrelu} x normalisation
{none, batch, layer, instance, group} x pooling {none, max, avg}. Each architecture is trained on a
proxy (a condensed set) and, as ground truth, on real data; a proxy is judged by how well its ranking
agrees with the ground truth's (Spearman and Kendall over all and over the proxy's top k), the ground-
truth accuracy of the architecture it picks, and its search time.

```python
from condensed_datasets.nas import SearchSpace, rank_report

space = SearchSpace(depth=(2, 3), width=(32, 64))          # a sub-grid: 2 x 2 x 3 x 5 x 3 = 180
report = rank_report(proxy_table, truth_table)              # tables: lists of ArchitectureResult
```

Training the architectures is the builders' job (:func:`builders.nas.train_architectures`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

DEPTHS = (1, 2, 3, 4)
WIDTHS = (32, 64, 128, 256)
ACTIVATIONS = ("sigmoid", "relu", "leakyrelu")
NORMS = ("none", "batchnorm", "layernorm", "instancenorm", "groupnorm")
POOLINGS = ("none", "maxpooling", "avgpooling")
TOPS = (5, 10, 20)


@dataclass(frozen=True)
class Architecture:
    """One ConvNet of the space: ``depth`` x (conv3x3 -> norm -> act -> pooling), then a linear layer."""

    depth: int
    width: int
    act: str
    norm: str
    pooling: str

    @property
    def name(self) -> str:
        """``ConvNet-d3-w128-relu-instancenorm-avgpooling``: unique within the space, stable."""
        return f"ConvNet-d{self.depth}-w{self.width}-{self.act}-{self.norm}-{self.pooling}"

    def settings(self) -> dict[str, Any]:
        """Keyword arguments of ``builders.networks.ConvNet``."""
        return asdict(self)


@dataclass(frozen=True)
class SearchSpace:
    """A grid of ConvNets; the defaults are the DC paper's 720. Any axis may be narrowed (a sub-grid)."""

    depth: tuple[int, ...] = DEPTHS
    width: tuple[int, ...] = WIDTHS
    act: tuple[str, ...] = ACTIVATIONS
    norm: tuple[str, ...] = NORMS
    pooling: tuple[str, ...] = POOLINGS

    def __post_init__(self) -> None:
        valid = {"depth": DEPTHS, "width": WIDTHS, "act": ACTIVATIONS, "norm": NORMS, "pooling": POOLINGS}
        for axis, allowed in valid.items():
            values = tuple(getattr(self, axis))
            object.__setattr__(self, axis, values)
            bad = [v for v in values if v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                raise ValueError(f"SearchSpace {axis}={list(values)!r}: expected distinct values from "
                                 f"{list(allowed)}" + (f"; not valid: {bad}" if bad else ""))

    @classmethod
    def from_dict(cls, data: dict[str, Sequence[Any]] | None) -> "SearchSpace":
        """A space from a mapping of axes to lists (missing axes keep the full grid)."""
        data = dict(data or {})
        unknown = sorted(set(data) - {"depth", "width", "act", "norm", "pooling"})
        if unknown:
            raise ValueError(f"SearchSpace: unknown axes {unknown}; valid: depth, width, act, norm, pooling")
        return cls(**{k: tuple(v) for k, v in data.items()})

    def to_dict(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in asdict(self).items()}

    def architectures(self) -> list[Architecture]:
        """Every architecture of the grid, in a fixed order (depth, width, act, norm, pooling)."""
        return [Architecture(*combo) for combo in itertools.product(self.depth, self.width, self.act,
                                                                     self.norm, self.pooling)]

    def __len__(self) -> int:
        return len(self.depth) * len(self.width) * len(self.act) * len(self.norm) * len(self.pooling)


@dataclass
class ArchitectureResult:
    """One row of a result table: an architecture, its accuracy (percent) and its training time."""

    architecture: str
    accuracy: float
    time_s: float
    settings: dict[str, Any] = field(default_factory=dict)


# -- rank correlation ---------------------------------------------------------------------------------

def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ascending; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the (tie-averaged) ranks; NaN when a side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of one length >= 2, got {len(x)} and {len(y)}")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties counted as in scipy.stats.kendalltau); NaN when a side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"kendall needs two sequences of one length >= 2, got {len(x)} and {len(y)}")
    concordant = discordant = tied_x = tied_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tied_x += 1
            elif dy == 0:
                tied_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + tied_x) * (concordant + discordant + tied_y))
    return (concordant - discordant) / denom if denom > 0 else math.nan


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def rank_report(proxy: Sequence[ArchitectureResult], truth: Sequence[ArchitectureResult],
                tops: Sequence[int] = TOPS) -> dict[str, Any]:
    """How well ``proxy``'s ranking of the architectures agrees with ``truth``'s.

    Spearman and Kendall over all architectures and over the proxy's top k (the shortlist a search
    keeps; k in ``tops`` up to the table's size), the ground-truth accuracy of the proxy's pick beside
    the best there is (and the pick's ground-truth rank: 1 + the architectures better on real, so ties share
    it), and both tables' total times.
    Correlations that are undefined (a constant side) are None.
    """
    p = {r.architecture: r for r in proxy}
    t = {r.architecture: r for r in truth}
    if set(p) != set(t) or len(p) != len(proxy) or len(t) != len(truth):
        missing = sorted(set(p) ^ set(t))
        raise ValueError(f"the two tables must hold the same architectures once each; differ: {missing[:5]}")
    if len(p) < 2:
        raise ValueError("a rank correlation needs at least 2 architectures")
    names = sorted(p, key=lambda n: (-p[n].accuracy, n))  # the proxy's ranking, best first
    px = [p[n].accuracy for n in names]
    tx = [t[n].accuracy for n in names]
    report: dict[str, Any] = {
        "architectures": len(names),
        "spearman": _finite(spearman(px, tx)),
        "kendall": _finite(kendall(px, tx)),
        "top": {},
    }
    for k in tops:
        if 2 <= k <= len(names):
            report["top"][str(k)] = {"spearman": _finite(spearman(px[:k], tx[:k])),
                                     "kendall": _finite(kendall(px[:k], tx[:k]))}
    pick = names[0]
    best = t[min(t, key=lambda n: (-t[n].accuracy, n))]  # ties broken by name, as the proxy's pick
    report.update({
        "picked": pick,
        "picked_truth_accuracy": t[pick].accuracy,
        "picked_truth_rank": 1 + sum(r.accuracy > t[pick].accuracy for r in truth),  # ties share the best rank
        "best": best.architecture,
        "best_truth_accuracy": best.accuracy,
        "proxy_time_s": round(sum(r.time_s for r in proxy), 3),
        "truth_time_s": round(sum(r.time_s for r in truth), 3),
    })
    return report
