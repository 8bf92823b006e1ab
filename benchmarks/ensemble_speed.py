"""Training N same-shaped networks together (builders/ensemble.py) against one after another.

    python benchmarks/ensemble_speed.py [--nets 5] [--epochs 20] [--rounds 2] [--device cpu] [--record]
        [--forms grouped,channels_last,split]
    python benchmarks/ensemble_speed.py --count-ops [--nets 5] [--record]
    python benchmarks/ensemble_speed.py --augment-timing [--nets 5] [--device cuda] [--record]

The evaluation protocol's workload: ConvNet on a 100-image set (ipc 10, Fashion-MNIST-shaped random
images), batch 256, DSA ``color_crop_cutout_flip_scale_rotate``. Alternates sequential and together
(A, B, A, B); records wall seconds and, on the CPU, process CPU seconds of each, and which step
``train_together`` took (``together_mode``: ``"wide"`` for ConvNets, one grouped-convolution network).

``--forms`` (default ``grouped``) times each listed form of the wide step (``train_together``'s
``wide_form``, ``builders.wide_convnet.FORMS``) in every round after the sequential run (sequential, A, B,
C, sequential, A, B, C, ...) and records each one's median wall and CPU seconds and speedup over
sequential under ``by_form``; the old keys (``speedup_wall_median``, ``speedup_cpu_median``, runs of mode
``"together"``) are those of the first form listed, and a record of more than the default form is named
``ensemble_forms_...``.

``--count-ops`` times nothing: it counts the operators dispatched from Python (``aten::`` events
without an ``aten::`` parent in ``torch.profiler``; on a GPU each launches one or a few kernels, which
is what a launch-bound step pays for) in one training step of one network, of the N networks
together, with DSA and without, from the difference between 3 epochs and 1 of one step each; and in
the N networks' augmentation alone: one call per network, and the one pass ``train_together`` makes
(each network's own draw, applied in one call per family, ``Augmenter.apply_many``), and the fixed
sequence ``train_together`` now runs (``Augmenter.pack`` on the host, ``Augmenter.apply_packed``).

``--augment-timing`` times the N networks' augmentation of a batch of 256 alone (draws included):
``apply_many`` against ``pack`` + ``apply_packed``, alternated.

``--profile`` (after a warm-up of each) runs one network alone and the N together (in each of
``--forms``) for ``--epochs`` epochs under ``torch.profiler`` and records, per training step, the wall
time, the device's busy time and the host's, and each one's operators by device time (on a CPU, by host
time): where a step that is no longer launch-bound spends its time.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings

import click
import torch
from machine import (  # benchmarks/machine.py (scripts run from benchmarks/)
    cpu_name,
    device_name,
    provenance,
    write_record,
)
from profiler_events import device_busy_us, python_operators
from torch.profiler import ProfilerActivity, profile

from builders import transfer
from builders.augment import Augmenter
from builders.engine import resolve_device
from builders.ensemble import DEVICE_STEP, together_mode, train_together
from builders.evaluate import TrainSettings, label_loss, train_network
from builders.host_threads import limit_threads_for
from builders.networks import build_network
from builders.wide_convnet import check_form


@click.command()
@click.option("--nets", type=int, default=5, show_default=True)
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True)
@click.option("--model", default="ConvNet", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--record", is_flag=True)
@click.option("--count-ops", is_flag=True, help="Count the operators of one step instead of timing.")
@click.option("--augment-timing", is_flag=True, help="Time the N networks' augmentation alone.")
@click.option("--profile", "profile_steps", is_flag=True, help="Profile one network and N together instead.")
@click.option("--shapes", is_flag=True,
              help="With --profile: also record operator input shapes, and a table of operators by input shape "
                   "(which convolution a kernel serves; adds host time, so walls are not comparable to runs without).")
@click.option("--forms", "forms_text", default="grouped", show_default=True, metavar="FORM,FORM",
              help="Forms of the wide step to time (or profile) against sequential: grouped, channels_last, split.")
@click.option("--variants", "variants_text", default="", metavar="NAME,NAME",
              help="Also time sequential and the first form under each variant, interleaved: unpinned (host-to-GPU "
                   "copies from pageable memory, builders.transfer.PIN_HOST_COPIES off), cudnn_benchmark "
                   "(torch.backends.cudnn.benchmark on), compiled (every form also with wide_compile=True; each one's "
                   "first call, compilation included, is timed apart; sequential is not run again for it).")
@click.option("--threads", type=click.Choice(["cli", "keep"]), default="cli", show_default=True,
              help="CPU threads: as condensed-eval sets them for the device (one on a GPU), or torch's default.")
@click.option("--note", default="")
def main(nets: int, epochs: int, rounds: int, model: str, device: str, record: bool, count_ops: bool,
         augment_timing: bool, profile_steps: bool, shapes: bool, forms_text: str, variants_text: str,
         threads: str, note: str) -> None:
    """Time sequential vs together training of NETS networks."""
    if threads == "cli":
        limit_threads_for(resolve_device(device))
    try:
        forms = list(dict.fromkeys(check_form(f.strip()) for f in forms_text.split(",") if f.strip()))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--forms") from None
    if not forms:
        raise click.BadParameter("name at least one form", param_hint="--forms")
    variants = list(dict.fromkeys(v.strip() for v in variants_text.split(",") if v.strip()))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}",
                                 param_hint="--variants")
    if count_ops:
        _count_ops(nets, model, record, note)
        return
    if augment_timing:
        _augment_timing(nets, torch.device(device), rounds, record, note)
        return
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(100, 1, 28, 28, generator=g).to(dev)
    targets = torch.arange(10).repeat_interleave(10).to(dev)
    settings = TrainSettings(epochs=epochs, batch=256, augmenter=Augmenter("color_crop_cutout_flip_scale_rotate"))
    seeds = list(range(1, nets + 1))

    def fresh() -> list[torch.nn.Module]:
        return [build_network(model, 1, 10, (28, 28), seed=s).to(dev) for s in seeds]

    def sequential() -> None:
        for net, s in zip(fresh(), seeds):
            train_network(net, images, targets, settings, torch.Generator().manual_seed(s))

    def together(form: str, compiled: bool = False) -> None:
        train_together(fresh(), images, targets, settings, [torch.Generator().manual_seed(s) for s in seeds],
                       label_loss, wide_form=form, wide_compile=compiled)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for form in forms:  # warm-up (allocations, cuDNN's choices; vmap's first trace where it runs)
        together(form)
    first_compiled_call: dict[str, float] = {}
    for form in forms if "compiled" in variants else []:  # the compilation: once per process, form and shape
        sync()
        start = time.perf_counter()
        together(form, compiled=True)
        sync()
        first_compiled_call[form] = round(time.perf_counter() - start, 3)
    sequential()
    if profile_steps:
        one = fresh()[0]
        _profile(nets, model, dev, epochs, lambda: train_network(one, images, targets, settings,
                                                                 torch.Generator().manual_seed(seeds[0])),
                 together, images.shape[0], settings, forms, record, note, compiled="compiled" in variants,
                 shapes=shapes)
        return
    runs = []
    cases = [("sequential", None, sequential), *(("together", f, lambda f=f: together(f)) for f in forms)]
    for variant in variants:
        if variant == "compiled":  # changes the wide step alone: sequential's own runs serve
            cases += [("together_compiled", f, lambda f=f: together(f, compiled=True)) for f in forms]
            continue
        cases += [(f"sequential_{variant}", None, lambda v=variant: _under(v, sequential)),
                  (f"together_{variant}", forms[0], lambda v=variant: _under(v, lambda: together(forms[0])))]
    for r in range(rounds):
        for mode, form, fn in cases:
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            said = _warnings_of(fn)
            sync()
            runs.append({"mode": mode, **({"form": form} if form else {}), "round": r,
                         "wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3),
                         "load_average_1min": round(os.getloadavg()[0], 2), **({"warnings": said} if said else {})})
            click.echo(json.dumps(runs[-1]))

    def med(key: str, form: str | None = None, mode: str | None = None) -> float:
        mode = mode or ("sequential" if form is None else "together")
        return round(statistics.median(r[key] for r in runs if r.get("form") == form and r["mode"] == mode), 3)

    by_form = {form: {"wall_s_median": med("wall_s", form), "cpu_s_median": med("cpu_s", form),
                      "speedup_wall_median": round(med("wall_s") / med("wall_s", form), 3),
                      "speedup_cpu_median": round(med("cpu_s") / med("cpu_s", form), 3)} for form in forms}
    def sequential_mode(variant: str) -> str:
        return "sequential" if variant == "compiled" else f"sequential_{variant}"

    by_variant = {variant: {  # time under the variant / time as is (> 1: the variant is slower), and its speedup
        "form": forms[0],
        "sequential_wall_s_median": med("wall_s", mode=sequential_mode(variant)),
        "together_wall_s_median": med("wall_s", forms[0], f"together_{variant}"),
        "sequential_time_ratio_to_default": round(med("wall_s", mode=sequential_mode(variant)) / med("wall_s"), 3),
        "together_time_ratio_to_default": round(med("wall_s", forms[0], f"together_{variant}")
                                                / med("wall_s", forms[0]), 3),
        "speedup_wall_median": round(med("wall_s", mode=sequential_mode(variant))
                                     / med("wall_s", forms[0], f"together_{variant}"), 3),
        **({"first_call_wall_s": first_compiled_call[forms[0]]} if variant == "compiled" else {})}
        for variant in variants}
    if "compiled" in variants:  # each form compiled: its speedup, its time against itself uncompiled, its first call
        by_variant["compiled"]["by_form"] = {form: {
            "wall_s_median": med("wall_s", form, "together_compiled"),
            "speedup_wall_median": round(med("wall_s") / med("wall_s", form, "together_compiled"), 3),
            "time_ratio_to_uncompiled": round(med("wall_s", form, "together_compiled") / med("wall_s", form), 3),
            "first_call_wall_s": first_compiled_call[form]} for form in forms}
    result = {
        "benchmark": f"{nets} x {model} trained together vs sequentially", "epochs": epochs, "set": "100 images",
        "together_mode": together_mode(fresh()[0]),
        "forms": forms,
        "runs": runs,
        "speedup_wall_median": by_form[forms[0]]["speedup_wall_median"],  # the first form's (the old keys)
        "speedup_cpu_median": by_form[forms[0]]["speedup_cpu_median"],
        "sequential": {"wall_s_median": med("wall_s"), "cpu_s_median": med("cpu_s")},
        "by_form": by_form,
        **({"variants": by_variant} if variants else {}),
        **provenance("ensemble_speed.py", device_name(dev), note),
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        path = write_record(f"ensemble{'' if forms == ['grouped'] else '_forms'}_{nets}x{model}_{dev.type}", result)
        click.echo(f"recorded {path}")


#: What each ``--variants`` name changes for the runs under it.
VARIANTS = {"unpinned": "host-to-GPU copies from pageable memory (builders.transfer.PIN_HOST_COPIES off)",
            "cudnn_benchmark": "torch.backends.cudnn.benchmark on (cuDNN times its algorithms per shape)",
            "compiled": "the wide network through torch.compile (train_together(..., wide_compile=True))"}


def _warnings_of(fn) -> list[str]:
    """Run ``fn()``; the distinct warnings it gave (a record keeps them: a step that could not be captured as a CUDA
    graph says so in one, and ran eagerly)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return sorted({str(w.message) for w in caught})


def _under(variant: str, fn) -> None:
    """``fn()`` under ``variant`` (:data:`VARIANTS`), the default restored after."""
    if variant == "unpinned":
        transfer.PIN_HOST_COPIES = False
        try:
            fn()
        finally:
            transfer.PIN_HOST_COPIES = True
    else:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=True,
                                        deterministic=torch.backends.cudnn.deterministic,
                                        allow_tf32=torch.backends.cudnn.allow_tf32):
            fn()


def _profile(nets: int, model: str, dev: torch.device, epochs: int, alone, together, images: int,
             settings: TrainSettings, forms: list[str], record: bool, note: str, compiled: bool = False,
             shapes: bool = False) -> None:
    """Per step of one network alone (``alone()``) and of the N together (``together(form, compiled)``) over
    ``images`` images in each of ``forms`` (keyed ``{N}_together``
    for the grouped form, ``{N}_together_{form}`` for another; with ``compiled``, each form compiled too,
    ``..._compiled``, after the warm-up compiled it): wall, device-busy and host time, and the
    operators by device time (host time on a CPU); with ``shapes``, also the operators grouped by input shape
    (``ops_by_shape``: a kernel's time counts under the operator that launched it)."""
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    steps = epochs * -(-images // settings.batch)
    cases = {"one_network": alone}
    for compiles in (False, True) if compiled else (False,):
        for form in forms:
            name = f"{nets}_together" + ("" if form == "grouped" else f"_{form}") + ("_compiled" if compiles else "")
            cases[name] = lambda form=form, compiles=compiles: together(form, compiles)
    result: dict = {"benchmark": f"profile: one {model} alone and {nets} together, per training step",
                    "epochs": epochs, "steps": steps, "set": f"{images} images", "forms": forms}
    for name, run in cases.items():
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities, record_shapes=shapes) as prof:
            start = time.perf_counter()
            said = _warnings_of(run)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        events = prof.key_averages()
        busy = device_busy_us(events) if cuda else 0.0
        result[name] = {
            "wall_ms_per_step": round(wall * 1000 / steps, 3),
            "device_busy_ms_per_step": round(busy / 1000 / steps, 3),
            "host_self_ms_per_step": round(sum(e.self_cpu_time_total for e in events) / 1000 / steps, 3),
            "table": events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20),
            **({"warnings": said} if said else {}),
        }
        if shapes:
            result[name]["ops_by_shape"] = prof.key_averages(group_by_input_shape=True).table(
                sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
        click.echo(f"{name}: " + json.dumps({k: v for k, v in result[name].items()
                                             if k not in ("table", "ops_by_shape")}))
        click.echo(result[name]["table"])
    result.update(provenance("ensemble_speed.py", device_name(dev), note))
    if record:
        stem = f"ensemble_profile{'' if forms == ['grouped'] else '_forms'}_{nets}x{model}_{dev.type}"
        click.echo(f"recorded {write_record(stem, result)}")


def _top_level_ops(fn, within: str | None = None) -> int:
    """Operators ``fn()`` dispatches from Python; with ``within``, only those under a ``record_function`` of that name."""
    with profile() as prof:
        fn()
    return python_operators(prof.events(), within)


def _count_ops(nets: int, model: str, record: bool, note: str) -> None:
    """Operators per training step: one network and N together (with DSA and without), and N networks'
    augmentation (separate calls, and the one pass of ``train_together``)."""
    augmenter = Augmenter("color_crop_cutout_flip_scale_rotate")
    images, targets = torch.rand(20, 1, 28, 28), torch.arange(10).repeat(2)
    seeds = list(range(1, nets + 1))

    def per_step(run, augment: Augmenter | None, within: str | None = None) -> float:
        """Epochs of one 20-image step each: 3 minus 1, halved."""
        return (_top_level_ops(lambda: run(3, augment), within) - _top_level_ops(lambda: run(1, augment), within)) / 2

    def single(epochs: int, augment: Augmenter | None) -> None:
        train_network(build_network(model, 1, 10, (28, 28), seed=1), images, targets,
                      TrainSettings(epochs=epochs, batch=20, augmenter=augment), torch.Generator().manual_seed(1))

    def together(epochs: int, augment: Augmenter | None) -> None:
        train_together([build_network(model, 1, 10, (28, 28), seed=s) for s in seeds], images, targets,
                       TrainSettings(epochs=epochs, batch=20, augmenter=augment),
                       [torch.Generator().manual_seed(s) for s in seeds], label_loss)

    def one_pass(generators: list[torch.Generator]) -> None:
        draws = [augmenter.sample(g, images.shape[0]) for g in generators]
        augmenter.apply_many([images] * len(draws), draws)

    def packed_pass(generators: list[torch.Generator]) -> tuple[int, int]:  # ops of (pack, apply_packed)
        draws = [augmenter.sample(g, images.shape[0]) for g in generators]
        packed = [None]
        pack_ops = _top_level_ops(lambda: packed.__setitem__(0, augmenter.pack(draws)))
        return pack_ops, _top_level_ops(lambda: augmenter.apply_packed(joined, packed[0]))

    joined = images.repeat(nets, 1, 1, 1)

    augment_ops = _top_level_ops(lambda: [augmenter(images, g) for g in (torch.Generator().manual_seed(s)
                                                                          for s in seeds)])
    augment_pass_ops = [_top_level_ops(lambda: one_pass([torch.Generator().manual_seed(100 * t + s) for s in seeds]))
                        for t in range(20)]  # the number of families among the N draws varies: a mean
    packed_ops = [packed_pass([torch.Generator().manual_seed(100 * t + s) for s in seeds]) for t in range(20)]
    one, many = per_step(single, augmenter), per_step(together, augmenter)
    on_device = per_step(together, augmenter, DEVICE_STEP)
    plain_one, plain_many = per_step(single, None), per_step(together, None)
    result = {
        "benchmark": f"operators per training step: 1 {model}, {nets} together, {nets} networks' augmentation",
        "together_mode": together_mode(build_network(model, 1, 10, (28, 28))),
        "ops_per_step_one_network": one, f"ops_per_step_{nets}_sequential": one * nets,
        f"ops_per_step_{nets}_together": many,
        "ratio_sequential_over_together": round(one * nets / many, 2),
        f"ops_per_step_{nets}_together_in_device_step": on_device,  # the part a CUDA graph can replay
        f"ops_per_step_{nets}_together_on_host": many - on_device,  # randperm, draws, pack, copies
        "ops_per_step_one_network_no_augmentation": plain_one,
        f"ops_per_step_{nets}_together_no_augmentation": plain_many,
        f"ops_augmentation_{nets}_networks_separate_calls": augment_ops,
        f"ops_augmentation_{nets}_networks_one_pass_mean_of_20_draws": statistics.fmean(augment_pass_ops),
        f"ops_augmentation_{nets}_networks_pack_on_host_of_20_draws": sorted({p for p, _ in packed_ops}),
        f"ops_augmentation_{nets}_networks_apply_packed_of_20_draws": sorted({a for _, a in packed_ops}),
        **provenance("ensemble_speed.py", f"cpu: {cpu_name()} (counts, not times)", note),
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        click.echo(f"recorded {write_record(f'ensemble_ops_{nets}x{model}_cpu', result)}")


def _augment_timing(nets: int, dev: torch.device, rounds: int, record: bool, note: str) -> None:
    """Seconds per call of N networks' augmentation of a batch of 256 each (draws on the host included):
    ``apply_many`` against ``pack`` + ``apply_packed``, alternated."""
    augmenter, batch, calls = Augmenter("color_crop_cutout_flip_scale_rotate"), 256, 200
    x = torch.rand(nets * batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(dev)
    generators = [torch.Generator().manual_seed(s) for s in range(1, nets + 1)]

    def many() -> None:
        augmenter.apply_many(x.split(batch), [augmenter.sample(g, batch) for g in generators])

    def packed() -> None:
        draws = [augmenter.sample(g, batch) for g in generators]
        augmenter.apply_packed(x, augmenter.pack(draws).to(dev, non_blocking=True))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for fn in (many, packed):  # warm-up
        fn()
    runs = []
    for r in range(rounds):
        for name, fn in (("apply_many", many), ("pack_apply_packed", packed)):
            sync()
            wall = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            runs.append({"mode": name, "round": r, "s_per_call": round((time.perf_counter() - wall) / calls, 6)})
            click.echo(json.dumps(runs[-1]))

    def med(mode: str) -> float:
        return statistics.median(r["s_per_call"] for r in runs if r["mode"] == mode)

    result = {
        "benchmark": f"augmentation of {nets} networks' batches of {batch} (28x28x1), DSA, draws included",
        "calls_per_run": calls, "runs": runs,
        "apply_many_over_packed_median": round(med("apply_many") / med("pack_apply_packed"), 3),
        **provenance("ensemble_speed.py", device_name(dev), note),
    }
    click.echo(json.dumps(result, indent=2))
    if record:
        click.echo(f"recorded {write_record(f'ensemble_augment_{nets}nets_{dev.type}', result)}")


if __name__ == "__main__":
    main()
