"""The one build loop every method runs in: progress, log, checkpoints, resume, NaN guard, evaluation, write."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from builders import distributed
from builders.augment import Augmenter
from builders.checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint
from builders.data import RealData
from builders.errors import BuildError, CheckpointError
from builders.evaluate import evaluate_set
from builders.methods.base import BuildContext, SetContents, no_status
from builders.networks import build_network, uses_batch_statistics
from builders.recipe import Recipe
from builders.registry import get_method
from builders.show import save_grid
from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets._version import __version__
from condensed_datasets.errors import CondensedDatasetsError
from condensed_datasets.format import CondensedSet, class_contiguous_labels
from condensed_datasets.paths import beside, set_path, subset_set_path


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BuildError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise BuildError(f"--device: unknown {name!r}; valid: auto, cpu, cuda")
    return torch.device(name)


@dataclass
class BuildPaths:
    """Where a build writes: the set, its checkpoint, its log and its image grid."""

    set: Path

    @classmethod
    def for_recipe(cls, recipe: Recipe, out_root: str | os.PathLike) -> "BuildPaths":
        if recipe.classes is not None:  # a set of some classes never takes the whole-source set's name
            return cls(subset_set_path(out_root, recipe.source, recipe.method, recipe.ipc, recipe.classes))
        return cls(set_path(out_root, recipe.source, recipe.method, recipe.ipc))

    @property
    def checkpoint(self) -> Path:
        return beside(self.set, ".checkpoint.safetensors")

    @property
    def log(self) -> Path:
        return beside(self.set, ".log.jsonl")

    @property
    def grid(self) -> Path:
        return beside(self.set, ".png")


def _reproducible_clock() -> float | None:
    """SOURCE_DATE_EPOCH, when set: timestamps come from it and durations are left out (same bytes); BuildError
    when it is not a whole number of seconds since 1970 that a date can be made of (the convention's format)."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if not value:
        return None
    try:
        seconds = int(value)
        _iso(seconds)
    except (ValueError, OverflowError, OSError):
        raise BuildError(f"SOURCE_DATE_EPOCH={value!r} is not a time: give the seconds since 1970 as a whole number "
                         "(as `date +%s` prints it), or unset it") from None
    return float(seconds)


class Engine:
    """Runs one recipe to a saved, evaluated condensed set."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        out_root: str | os.PathLike,
        device: str = "auto",
        resume: bool = False,
        overwrite: bool = False,
        evaluate: bool = True,
        progress: bool = True,
        data_root: str | os.PathLike | None = None,
        download: bool = False,
    ) -> None:
        self.recipe = recipe
        self.out_root = Path(out_root)
        self.data_root = Path(data_root if data_root is not None else out_root)
        self.device = distributed.local_device(resolve_device(device))  # torchrun: GPU LOCAL_RANK
        self.resume = resume
        self.overwrite = overwrite
        self.evaluate = evaluate
        self.progress = progress
        self.download = download
        self.paths = BuildPaths.for_recipe(recipe, self.out_root)
        self._test: RealData | None = None
        self._row_blocks: list[range] | None = None  # set when classes are split across ranks
        self._split = "none"  # torchrun: "classes" or "batches" when the work is split across ranks
        self._reduce_gradients = False  # torchrun: sum the state's gradients over ranks after every backward

    # -- pieces ----------------------------------------------------------------------------
    def _context(self) -> BuildContext:
        r = self.recipe
        real = RealData.from_source(r.source, self.data_root, train=True, device=self.device,
                                    per_class=r.real_per_class, download=self.download, classes=r.classes)
        augmenter = Augmenter(r.augment) if r.augment != "none" else None
        return BuildContext(r, real, self.device, torch.Generator().manual_seed(r.seed), augmenter,
                            out_root=self.out_root)

    def _test_split(self) -> RealData:
        if self._test is None:
            self._test = RealData.from_source(self.recipe.source, self.data_root, train=False,
                                              device=self.device, download=self.download,
                                              per_class=self.recipe.eval.test_per_class,
                                              classes=self.recipe.classes)
        return self._test

    def _log(self, entry: dict[str, Any]) -> None:
        if not distributed.current().is_main:
            return
        with open(self.paths.log, "a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def _truncate_log(self, iteration: int) -> None:
        """Keep the log lines of iterations up to ``iteration`` (a resumed build rewrites the rest)."""
        if not distributed.current().is_main or not self.paths.log.exists():
            return
        kept = [line for line in self.paths.log.read_text(errors="replace").splitlines()  # damaged bytes: dropped
                if line and _log_iteration(line) <= iteration]
        atomic_write_bytes(self.paths.log, ("\n".join(kept) + "\n" if kept else "").encode())

    def _evaluation(self, contents: SetContents, ctx: BuildContext) -> dict[str, Any]:
        r, ev = self.recipe, self.recipe.eval
        test = self._test_split()
        test.set_zca(ctx.real.zca)  # a set built in ZCA space is tested on whitened real images
        return evaluate_set(
            contents.images.to(self.device), class_contiguous_labels(ctx.num_classes, r.ipc),
            soft_labels=contents.soft_labels, lr=contents.lr, ipc=r.ipc, model=r.eval_model,
            models=ev.models, runs=ev.runs, epochs=ev.epochs, default_lr=ev.lr, batch=ev.batch,
            augment=r.eval_augment, seed=r.seed, train=ctx.real, test=test,
            random_baseline=ev.random_baseline, progress=self.progress, compile=ev.compile,
        )

    # -- the loop ----------------------------------------------------------------------------
    def run(self, on_iteration: Callable[[int, float], None] | None = None) -> CondensedSet:
        """Build, evaluate and save the set; returns it."""
        r = self.recipe
        world = distributed.current()
        if distributed.restarted():  # torchrun restarted the job: continue from the checkpoint, if any
            self.resume = True
        # rank 0's disk decides; every rank then fails alike (torchrun's report names whichever rank it sees first)
        refusal = distributed.broadcast_object(self._refusal() if world.is_main else None)
        if refusal is not None:
            raise BuildError(refusal)
        clock = _reproducible_clock()
        started = time.time()
        try:
            self.paths.set.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where a folder of the path should be, say
            raise BuildError(f"cannot create {self.paths.set.parent} ({exc.strerror}); pass --out with a "
                             "writable folder") from None
        self._check_writable()
        ctx = self._context()
        method = get_method(r.method)(ctx)
        self._split_work(method, ctx)
        start_iteration = 0
        if not method.iterative:
            contents = method.select()
            iterations_run = 0
        else:
            state = method.initial_state()
            optimizers = method.optimizers(state)
            # rank 0's disk decides (under torchrun the other ranks need not share it)
            if distributed.broadcast_object(self.resume and self.paths.checkpoint.exists()):
                start_iteration = self._restore(state, optimizers, ctx)
            elif self.paths.log.exists() and world.is_main:  # from scratch (--resume without a checkpoint too):
                self.paths.log.unlink()  # the lines of a run killed before its first checkpoint go with its state
            self._loop(method, state, optimizers, ctx, start_iteration, on_iteration)
            self._sync(state, optimizers)
            contents = method.finalize(state)
            iterations_run = r.iterations
        if not torch.isfinite(contents.images).all():
            raise BuildError("the final images contain NaN or inf; nothing was written")
        metadata: dict[str, Any] = {
            "recipe": r.to_dict(),
            "seed": r.seed,
            "normalization": ctx.real.space_normalization(),  # identity in ZCA space (raw pixels)
            "versions": {"condensed_datasets": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "device": self.device.type if clock is not None else _device_name(self.device),
            "build": {"iterations": iterations_run, "method": contents.metadata, **world.describe(),
                      "split": self._split,
                      "finished_at": _iso(clock if clock is not None else time.time())},
        }
        if r.classes is not None:
            metadata["class_subset"] = list(r.classes)
        if clock is None:
            metadata["build"]["wall_time_s"] = round(time.time() - started, 3)
        if self.evaluate:
            metadata["evaluation"] = self._evaluation(contents, ctx)
        cset = CondensedSet(
            contents.images.cpu(), class_contiguous_labels(ctx.num_classes, r.ipc),
            source=r.source, method=r.method, ipc=r.ipc, soft_labels=contents.soft_labels,
            lr=contents.lr, indices=contents.indices, metadata=metadata, zca=ctx.real.zca,
            storage=contents.storage, patch_mask=contents.patch_mask,
        )
        refusal = None
        if world.is_main:
            try:
                refusal = self._write(cset)
            except OSError as exc:  # rank 0 stops with its own error; the other ranks stop too, not wait for it
                distributed.broadcast_object(f"rank 0 could not write {self.paths.set} or its preview ({exc})")
                raise
        # every rank learns rank 0's outcome: each returns once the set is on disk, or fails alike
        refusal = distributed.broadcast_object(refusal)
        if refusal is not None:
            raise BuildError(refusal)
        return cset

    def _write(self, cset: CondensedSet) -> str | None:
        """Save the set and its preview; without --overwrite, never replace a set another process wrote while
        this one built: then nothing is written and the refusal's message is returned."""
        try:
            cset.save(self.paths.set, replace=self.overwrite)
        except FileExistsError:
            return self._appeared()
        save_grid(cset, self.paths.grid)
        return None

    def _check_writable(self) -> None:
        """Before any work: the output folder takes new files and no output path is a folder (BuildError)."""
        folder = self.paths.set.parent
        for path in (self.paths.set, self.paths.checkpoint, self.paths.log, self.paths.grid):
            if path.is_dir():
                raise BuildError(f"cannot write {path}: a folder is in the way; move it, or pass --out elsewhere")
        if self.paths.log.is_symlink():  # the log is appended to in place: a link would write where it points
            raise BuildError(f"cannot append to {self.paths.log}: it is a symbolic link (to "
                             f"{os.readlink(self.paths.log)}); remove it, or pass --out elsewhere")
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise BuildError(f"cannot write into {folder} ({exc}); pass --out with a writable folder") from None

    def _clobber_problem(self) -> str | None:
        """Why this build would replace a finished set or an unfinished build's checkpoint (never done unless
        asked to), or None."""
        if self.overwrite:
            return None
        if self.paths.set.exists():  # --resume continues an unfinished build; it never replaces a finished set
            return (f"{self.paths.set} already exists; pass --overwrite to replace it, "
                    "or --out to build somewhere else")
        if self.resume:
            return None
        if self.paths.checkpoint.exists():
            return (f"an earlier build left a checkpoint at {self.paths.checkpoint}; pass --resume to "
                    "continue it, or --overwrite to start over")
        return None

    def _refusal(self) -> str | None:
        """:meth:`_clobber_problem`; when it is a finished set without its preview (a build stopped between writing
        the two), the preview is drawn from the set on disk first (the set untouched) and the refusal says so."""
        problem = self._clobber_problem()
        if problem is None or not self.paths.set.is_file() or os.path.lexists(self.paths.grid):
            return problem
        try:
            save_grid(CondensedSet.load(self.paths.set), self.paths.grid)
        except (CondensedDatasetsError, OSError) as exc:
            return f"{problem} (its preview {self.paths.grid} is missing and could not be drawn from it: {exc})"
        return (f"{problem}. Its missing preview (a build stopped before writing it) was drawn from it: "
                f"{self.paths.grid}")

    def _appeared(self) -> str:
        """Why this build's set was not written: another process wrote one at its path meanwhile."""
        kept = (f"; this build's result is in {self.paths.checkpoint}: rerun with --resume --overwrite to write it "
                "instead" if self.paths.checkpoint.is_file() else "")
        return (f"{self.paths.set} appeared while this build ran (another process wrote it) and was kept; pass "
                f"--overwrite to replace it, or --out to build somewhere else{kept}")

    def _restore(self, state, optimizers, ctx: BuildContext) -> int:
        try:
            loaded = load_checkpoint(self.paths.checkpoint) if distributed.current().is_main else None
        except CheckpointError as exc:
            raise BuildError(str(exc)) from exc
        meta, tensors = distributed.broadcast_object(loaded)  # one reader; ranks need no shared disk
        if meta["iteration"] > self.recipe.iterations:
            raise BuildError(f"{self.paths.checkpoint} is at iteration {meta['iteration']}, past this recipe's "
                             f"{self.recipe.iterations} iterations; resume with --set iterations={meta['iteration']} "
                             "or more, or build without --resume to start over")
        saved, now = meta["recipe"], self.recipe.to_dict()
        ignore = {"iterations", "checkpoint_every", "eval", "root", "notes"}
        differ = sorted(k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k))
        if differ:
            raise BuildError(f"{self.paths.checkpoint} was made by a different recipe (keys {', '.join(differ)} "
                             "differ); resume with the same recipe, or build without --resume to start over")
        try:
            iteration = restore_checkpoint(meta, tensors, state=state, optimizers=optimizers, generator=ctx.generator)
        except CheckpointError as exc:
            raise BuildError(f"{self.paths.checkpoint}: {exc}") from exc
        self._truncate_log(iteration)
        return iteration

    def _checkpoint(self, iteration: int, state, optimizers, ctx: BuildContext) -> None:
        self._sync(state, optimizers)
        if not distributed.current().is_main:
            return
        save_checkpoint(self.paths.checkpoint, iteration=iteration, state=state, optimizers=optimizers,
                        generator=ctx.generator, recipe=self.recipe.to_dict())

    def _loop(self, method, state, optimizers, ctx: BuildContext, start: int, on_iteration) -> None:
        r = self.recipe
        t0 = time.perf_counter()
        bar = tqdm(range(start, r.iterations), initial=start, total=r.iterations,
                   # None: quiet when output is not a terminal; under torchrun only rank 0 shows it
                   disable=None if self.progress and distributed.current().is_main else True,
                   desc=f"{r.method} {r.source} ipc{r.ipc}", unit="it", dynamic_ncols=True)
        ctx.status_sink = bar.set_postfix_str
        for iteration in bar:
            total, steps = 0.0, 0
            for loss in method.losses(state, iteration):
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                # backward before the loss is read: on a GPU the host then queues the backward pass while the
                # forward runs, instead of waiting for it; the state is untouched until the optimisers step
                loss.backward()
                value = float(loss.detach())
                if self._split == "classes":  # each rank's loss holds its own classes' terms
                    value = distributed.all_reduce_sum(value)
                if not math.isfinite(value):
                    self._fail_nonfinite(iteration, "loss", state, optimizers, ctx, start, good=steps == 0)
                if self._reduce_gradients:  # each rank's gradients are its share: every rank steps with the sum
                    distributed.all_reduce_gradients([t for t in state.values() if t.requires_grad])
                for opt in optimizers.values():
                    opt.step()
                total += value
                steps += 1
            if not all(torch.isfinite(t).all() for t in state.values()):
                self._fail_nonfinite(iteration, "synthetic tensors", state, optimizers, ctx, start, good=False)
            done = iteration + 1
            self._log({"iteration": done, "loss": total, "time_s": round(time.perf_counter() - t0, 4)})
            bar.set_postfix(loss=f"{total:.4g}")
            if on_iteration is not None:
                on_iteration(done, total)
            if r.checkpoint_every and done % r.checkpoint_every == 0 and done < r.iterations:
                self._checkpoint(done, state, optimizers, ctx)
            if self.evaluate and r.eval.every and done % r.eval.every == 0 and done < r.iterations:
                self._sync(state, optimizers)
                self._log({"iteration": done, "eval": self._evaluation(method.finalize(state), ctx)})
        bar.close()
        ctx.status_sink = no_status
        if r.checkpoint_every:
            self._checkpoint(r.iterations, state, optimizers, ctx)

    # -- several processes (torchrun) --------------------------------------------------------
    def _split_work(self, method, ctx: BuildContext) -> None:
        """Under torchrun, split the method's work across ranks as it declares:

        - ``splits_classes`` (DM): each rank a block of classes and its rows of the set, exchanged at
          checkpoints and at the end; not with batch norm (which couples the classes in DM's forward);
        - ``gradient_split = "classes"`` (DC, DSA): each rank a block of classes' loss terms; the gradients
          are summed over ranks after every backward, so every rank steps (and trains its network) alike;
        - ``gradient_split = "batches"`` (MTT, DATM, TESLA): each rank a share of every student step's
          batch (``ctx.batch_shard``); gradients summed likewise; not with batch norm (whose batch
          statistics couple the samples of a step).

        Otherwise every rank computes the whole build (same result, no speed-up)."""
        world = distributed.current()
        split = getattr(method, "gradient_split", "")
        if not world.active or not (split or getattr(method, "splits_classes", False)):
            return
        if split not in ("", "classes", "batches"):
            raise BuildError(f"method {self.recipe.method}: unknown gradient_split {split!r}")
        if split != "classes":  # batch norm couples DM's classes and a student step's samples
            c, h, w = ctx.real.image_shape
            net = build_network(self.recipe.model, c, ctx.num_classes, (h, w), seed=0)
            if uses_batch_statistics(net):
                return
        if split == "batches":
            ctx.batch_shard = distributed.BatchShard(world)
            self._split, self._reduce_gradients = "batches", True
            return
        distributed.require_ranks_at_most(ctx.num_classes, "classes")
        ctx.owned_classes = tuple(distributed.owned_block(ctx.num_classes, world))
        self._split = "classes"
        if split == "classes":
            self._reduce_gradients = True
            return
        self._row_blocks = [range(b.start * ctx.ipc, b.stop * ctx.ipc)
                            for b in distributed.blocks(ctx.num_classes, world.world_size)]

    def _sync(self, state, optimizers) -> None:
        """Class split: every rank takes every other rank's rows of the state and the optimisers' buffers."""
        if self._row_blocks is None:
            return
        tensors = list(state.values())
        for opt in optimizers.values():
            for per_param in opt.state.values():
                tensors += [t for t in per_param.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
        for t in tensors:
            distributed.sync_rows(t, self._row_blocks)

    def _fail_nonfinite(self, iteration, what, state, optimizers, ctx, start, good: bool = True) -> None:
        """Stop with a clear error; when the state is still good, checkpoint it first."""
        if good and self.recipe.checkpoint_every and self._row_blocks is None:  # a split needs every rank
            self._checkpoint(iteration, state, optimizers, ctx)
        where = (f"last good checkpoint: {self.paths.checkpoint}" if self.paths.checkpoint.exists()
                 else "no checkpoint was written (set checkpoint_every)")
        raise BuildError(
            f"{what} became NaN or inf at iteration {iteration + 1}; {where}. "
            "Lower the method's learning rates (params.lr_img, ...) and build again, or --resume."
        )


def _log_iteration(line: str) -> float:
    """The iteration of a log line; inf for a line cut short by a killed process, or not a log entry at all
    (it is dropped)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    iteration = entry.get("iteration", 0) if isinstance(entry, dict) else None
    return iteration if isinstance(iteration, (int, float)) and not isinstance(iteration, bool) else math.inf


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}"


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
