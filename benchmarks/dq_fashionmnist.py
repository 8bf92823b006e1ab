"""DQ on Fashion-MNIST: GraphCut bin time per 6,000-image class, bytes on disk, and DQ vs random / herding /
k-center accuracy under the evaluation protocol's code (bounded for a shared CPU; see --help).

Stage ``features``: train one extractor on the whole train split, embed every image, bin every class
(timed), write the features, bins and on-disk sizes. Stage ``eval``: per seed, select with every method
from those features and train/test fresh networks with :func:`builders.evaluate.evaluate_images`.

    PYTHONPATH=. python benchmarks/dq_fashionmnist.py features --root data --work /tmp/dq/bench
    PYTHONPATH=. python benchmarks/dq_fashionmnist.py eval --root data --work /tmp/dq/bench --ipc 10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py (scripts run from benchmarks/)
from safetensors.torch import load_file, save_file

from builders.data import RealData
from builders.evaluate import TrainSettings, evaluate_images, train_network
from builders.extractor import embeddings, gradcam
from builders.graphcut import CosineSimilarity, graphcut_bins
from builders.methods.coreset import herding_select, kcenter_select
from builders.methods.dq import auto_patch_size, kept_patches, sample_bins, top_patch_mask
from builders.networks import build_network
from condensed_datasets.format import CondensedSet, class_contiguous_labels
from condensed_datasets.pixel_storage import expand_mask


def features_stage(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    real = RealData.from_source("fashionmnist", args.root, train=True, per_class=args.per_class)
    c, h, w = real.image_shape
    net = build_network(args.extractor, c, real.num_classes, (h, w), seed=args.extractor_seed)
    started = time.perf_counter()
    everything = torch.arange(len(real))
    train_network(net, real.rows(everything), real.labels,
                  TrainSettings(epochs=args.extractor_epochs, lr=args.extractor_lr, batch=256),
                  torch.Generator().manual_seed(args.extractor_seed))
    train_s = time.perf_counter() - started
    feats, grads = embeddings(net.eval(), real.rows, everything, real.labels)
    tensors = {"features": feats.contiguous(), "loss_grads": grads.contiguous()}
    for k in range(real.num_classes):
        pool = real.class_indices[k]
        bins = graphcut_bins(CosineSimilarity.gradient_embedding(grads[pool], feats[pool]), args.bins)
        for b, rows in enumerate(bins):
            tensors[f"bin_{k}_{b}"] = pool[rows].contiguous()
    save_file(tensors, str(work / "features.safetensors"))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(work / "extractor.safetensors"))
    # bin generation for one whole 6,000-image class (class 0 of the full split): dense, then chunked
    full = RealData.from_source("fashionmnist", args.root, train=True)
    pool = full.class_indices[0]
    f0, g0 = embeddings(net, full.rows, pool, full.labels)
    sim = CosineSimilarity.gradient_embedding(g0, f0)
    timings = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        dense = graphcut_bins(sim, args.bins)
        timings.append(round(time.perf_counter() - t0, 3))
    t0 = time.perf_counter()
    chunked = graphcut_bins(sim, args.bins, memory_bytes=0)
    chunked_s = round(time.perf_counter() - t0, 3)
    same = all(torch.equal(a, b) for a, b in zip(dense, chunked))
    sizes = _bytes_on_disk(real, net, tensors, args)
    record = {
        "what": f"DQ GraphCut bin generation for one Fashion-MNIST class ({len(pool)} images, {args.bins} bins, "
                f"gradient embedding of {args.extractor}: K=10 + D={feats.shape[1]}): dense similarity (n x n "
                "fits the 1 GiB default), and the chunked path (memory_bytes=0: columns computed per pick)",
        "command": "PYTHONPATH=. python benchmarks/dq_fashionmnist.py features " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items()) if k not in ("stage", "func")),
        "device": f"cpu: {cpu_name()}, 2 cores shared with ~6 other agents (noisy), "
                  f"torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "extractor": {"network": args.extractor, "epochs": args.extractor_epochs, "lr": args.extractor_lr,
                      "batch": 256, "seed": args.extractor_seed, "trained_on": f"first {args.per_class} train "
                      "images per class", "train_seconds": round(train_s, 1)},
        "bins_seconds_6000_dense": timings,
        "bins_seconds_6000_chunked": chunked_s,
        "chunked_same_bins_as_dense": same,
        "bytes_on_disk": sizes,
    }
    (work / "features.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(json.dumps(record, indent=2, sort_keys=True))


def _dq_positions(real: RealData, tensors: dict[str, torch.Tensor], bins: int, ipc: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([sample_bins([tensors[f"bin_{k}_{b}"] for b in range(bins)], ipc, g)
                      for k in range(real.num_classes)])


def _bytes_on_disk(real: RealData, net, tensors, args) -> dict[str, dict[str, int]]:
    out = {}
    for ipc in (10, 50):
        pos = _dq_positions(real, tensors, args.bins, ipc, 0)
        images = real.rows(pos)
        labels = class_contiguous_labels(real.num_classes, ipc)
        common = dict(source="fashionmnist", method="dq", ipc=ipc, indices=pos)
        patches = {"images": "patches"}
        size = auto_patch_size(*images.shape[2:])
        keep = kept_patches((images.shape[2] // size) * (images.shape[3] // size), 0.2)
        mask = top_patch_mask(gradcam(net, images, real.labels[pos]), size, keep)
        dropped = torch.where(expand_mask(mask, size).unsqueeze(1), images, 0.0)
        out[f"ipc{ipc}"] = {
            "float32": len(CondensedSet(images, labels, **common).to_bytes()),
            "uint8": len(CondensedSet(images, labels, storage={"images": "uint8"}, **common).to_bytes()),
            "patches_drop0.2": len(CondensedSet(dropped, labels, patch_mask=mask, **common,
                                                storage={**patches, "patch_size": size, "kept": keep}).to_bytes()),
        }
    return out


def eval_stage(args: argparse.Namespace) -> None:
    work = Path(args.work)
    tensors = load_file(str(work / "features.safetensors"))
    real = RealData.from_source("fashionmnist", args.root, train=True, per_class=args.per_class)
    test = RealData.from_source("fashionmnist", args.root, train=False, per_class=args.test_per_class)
    feats = tensors["features"]
    settings = TrainSettings(epochs=args.epochs, lr=0.01, batch=256)
    labels = class_contiguous_labels(real.num_classes, args.ipc)
    results: dict[str, dict[str, float]] = {}
    out = work / f"eval_ipc{args.ipc}_seeds{'-'.join(map(str, args.seeds))}.json"
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        picks = {
            "random": real.random_class_balanced(args.ipc, g),
            "herding": torch.cat([p[herding_select(feats[p], args.ipc)] for p in real.class_indices]),
            "kcenter": torch.cat([p[kcenter_select(feats[p], args.ipc)] for p in real.class_indices]),
            "dq": _dq_positions(real, tensors, args.bins, args.ipc, seed),
        }
        for method, pos in picks.items():
            acc = evaluate_images(real.rows(pos), labels, model=args.model, settings=settings, test=test,
                                  seeds=[seed * 1000 + 17])
            results.setdefault(method, {})[str(seed)] = acc[0]
            print(f"ipc {args.ipc} seed {seed} {method}: {acc[0]:.2f}", flush=True)
            _write_eval(out, args, settings, test, results)


def _write_eval(out: Path, args: argparse.Namespace, settings: TrainSettings, test: RealData,
                results: dict[str, dict[str, float]]) -> None:
    summary = {m: {"accuracies": r, "mean": round(statistics.fmean(r.values()), 2),
                   "std": round(statistics.pstdev(r.values()), 2)} for m, r in results.items()}
    record = {
        "what": f"Fashion-MNIST ipc {args.ipc}: DQ vs random vs herding vs k-center, one evaluation run per seed",
        "command": f"PYTHONPATH=. python benchmarks/dq_fashionmnist.py eval --ipc {args.ipc} --seeds "
                   f"{' '.join(map(str, args.seeds))} --epochs {args.epochs} --model {args.model} "
                   f"--test-per-class {args.test_per_class} --per-class {args.per_class}",
        "device": f"cpu: {cpu_name()}, 2 cores shared with ~6 other agents",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "protocol": {**settings.describe(), "model": args.model, "test": f"{len(test)} test images "
                     f"({args.test_per_class} per class)", "net_seed": "seed * 1000 + 17"},
        "pool": f"first {args.per_class} train images per class",
        "selection": "herding/k-center on the extractor's embed() features; DQ on its gradient embedding, "
                     "10 GraphCut bins per class, sampling seeded by the seed; random seeded by the seed",
        "results": summary,
    }
    out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    f = sub.add_parser("features")
    f.add_argument("--root", required=True)
    f.add_argument("--work", required=True)
    f.add_argument("--extractor", default="ConvNetW32")
    f.add_argument("--extractor-epochs", type=int, default=1)
    f.add_argument("--extractor-lr", type=float, default=0.01)
    f.add_argument("--extractor-seed", type=int, default=0)
    f.add_argument("--bins", type=int, default=10)
    f.add_argument("--per-class", type=int, default=1000, help="selection pool and extractor data: first N per class")
    f.add_argument("--repeats", type=int, default=2)
    f.set_defaults(func=features_stage)
    e = sub.add_parser("eval")
    e.add_argument("--root", required=True)
    e.add_argument("--work", required=True)
    e.add_argument("--ipc", type=int, required=True)
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    e.add_argument("--epochs", type=int, default=50)
    e.add_argument("--model", default="ConvNetW32")
    e.add_argument("--bins", type=int, default=10)
    e.add_argument("--test-per-class", type=int, default=500)
    e.add_argument("--per-class", type=int, default=1000, help="selection pool: first N train images per class")
    e.set_defaults(func=eval_stage)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
