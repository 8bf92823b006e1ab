"""The GPU figures of one lent device session, in priority order, within a time budget.

    python benchmarks/gpu_session.py --reference .gpu/DatasetCondensation --fashion-mnist .gpu/fashion-mnist
        [--budget 500] [--out $OUT]

Run from the repository root on a machine with a CUDA GPU; it installs nothing (the device has no
network): the reference checkout (VICO-UoE/DatasetCondensation) and the gzipped Fashion-MNIST files
travel with the working tree in an ignored folder. Each section is one of the benchmark scripts beside
this file, run with ``--record`` (records land in ``benchmarks/results/``) and a time limit; a section
is skipped when the budget left is too small for it. After every section the records written so far
and every section's log are packed into ``--out``/``records.tar.gz`` beside ``session.log`` (the device
tool's ``$OUT`` brings back only a few files), so a run cut short still brings back what it measured. A
section that outlasts its limit is stopped with its whole process group (the reference runs as a
grandchild). Sections, in order:

1. DM iteration time against the reference, Fashion-MNIST ipc 10 (``dm_vs_reference.py``; DM's
   default ``params.compile: auto`` compiles on a GPU);
2. the same on CIFAR-10-shaped generated images, ipc 10;
2a. the same with a third process each round, the package with ``OMP_NUM_THREADS=1`` (``--variant-env``): one
    package process in four ran DM 2x slower on an H100 with more CPU time per iteration (fifth session);
2b. DM's compiled iteration in fresh processes with inductor's caches cold and warm (``compile_cache.py``:
    on 2026-11-26 warm ran 2-3x slower; the package now compiles afresh off the CPU);
3. the Fashion-MNIST comparison with ``params.compile: false`` (one round);
3b. where DM's iterations spend their time, by default and uncompiled (``dm_profile.py``);
4. five ConvNets trained together against one after another (``ensemble_speed.py``), the same with each
   form of the wide step (``--forms grouped,channels_last,split``, section ``ensemble_forms``), and the
   profile of a step of each (``--profile``; grouped and channels_last); each form also compiled
   (``--variants compiled``: ``train_together(..., wide_compile=True)``, inductor free to pick NHWC-friendly
   norm kernels; each one's first call, the compilation included, timed apart; the
   session of 2026-11-26 10:44Z measured the variants ``unpinned`` and ``cudnn_benchmark``: no effect);
4b. five experts trained at once against one by one, one CIFAR-10-shaped epoch each, after one untimed run of
    each (``experts_speed.py --warmup 1``: the GPU's start-up costs stay out of the timed runs);
5. the quickstart built at fp32 and at bf16-real, two seeds each (``precision_check.py``);
6. DM against the reference on CIFAR-10-shaped images, ipc 50 (two rounds);
6b. DSA against the reference, Fashion-MNIST ipc 1, with ``params.compile`` true and false (one round each),
    with ``params.batch_classes`` true and false (two rounds each), and the compiled gradient's accuracy
    against float64 (``compiled_gradient_accuracy.py``);
7. peak memory of MTT at CIFAR-100 shape, ipc 10, unrolled vs constant (``tesla_memory.py``);
8. MTT memory at CIFAR-100 shape, ipc 50 (the recipe's 125 images per step);
9. a one-process ``torchrun`` build (NCCL on a GPU): a tiny DM Fashion-MNIST set whose metadata must
   say ``build.backend``;
10. a DM Fashion-MNIST ipc 10 build with the paper's evaluation, at as many of the paper's 20,000
    iterations as the budget left allows (the record says how many ran);
11. the paper rows named by ``--paper METHOD:IPC[:ITERATIONS]`` (e.g. ``dc:10,dsa:10,dm:50:5000``): each
    ``recipes/<method>_fashionmnist.yaml`` built at that ipc with its own evaluation (the recipe's iterations
    unless given: the record says when they were fewer), recorded as ``paper_<method>_fashionmnist_ipc<N>``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import click
from machine import RESULTS_ENV, results_dir, write_record  # benchmarks/machine.py (scripts run from benchmarks/)

REPO = Path(__file__).resolve().parent.parent

class Session:
    """Runs sections against one deadline and mirrors the log and new records to ``out``."""

    def __init__(self, out: Path, budget: float, python: str, only: set[str] | None = None) -> None:
        self.out, self.python, self.only = out, python, only
        self.deadline = time.monotonic() + budget
        self.results = results_dir()  # the sections inherit $BENCHMARK_RESULTS_DIR
        self.before = set(self.results.glob("*.json"))
        self.log = out / "session.log"
        self.logs = Path(tempfile.mkdtemp(prefix="gpu_session_logs_"))  # packed into records.tar.gz
        self.summary: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        click.echo(text)
        with open(self.log, "a") as handle:
            handle.write(text + "\n")

    def section(self, name: str, args: list[str], needs: float, limit: float, env: dict | None = None) -> int | None:
        """Run one benchmark script; skipped when not selected or less than ``needs`` seconds are left."""
        if self.only is not None and name not in self.only:
            return None
        if self.left() < needs:
            self.say(f"== {name}: skipped ({self.left():.0f} s left, {needs:.0f} s needed)")
            self.summary.append({"section": name, "skipped": True})
            return None
        limit = min(limit, self.left())
        self.say(f"== {name} (limit {limit:.0f} s): {' '.join(args)}")
        start = time.monotonic()
        log = self.logs / f"{name}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen([self.python, *args], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the script and the runs it started
                proc.wait()
                rc = -1
        wall = time.monotonic() - start
        tail = log.read_text(errors="replace").splitlines()[-6:]
        self.say(f"   rc {rc} ({'timed out' if rc == -1 else 'exit'}), {wall:.0f} s\n   " + "\n   ".join(tail))
        self.summary.append({"section": name, "rc": rc, "wall_s": round(wall, 1)})
        self.save()
        return rc

    def new_records(self) -> list[Path]:
        return sorted(set(self.results.glob("*.json")) - self.before)

    def save(self) -> None:
        """The records and section logs so far, as one archive in ``out`` (the device tool returns few files)."""
        tmp = self.out / "records.tar.gz.part"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in self.new_records():
                tar.add(path, arcname=path.name)
            for path in sorted(self.logs.glob("*.log")):
                tar.add(path, arcname=f"logs/{path.name}")
        tmp.replace(self.out / "records.tar.gz")


def environment(python: str) -> str:
    """Torch, CUDA and GPU as the device reports them."""
    code = ("import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, "
            "'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)")
    return subprocess.run([python, "-c", code], check=False, capture_output=True, text=True).stdout.strip()


def package_seconds_per_iteration(s: Session, prefix: str) -> float | None:
    """The package's median s/iteration from the Fashion-MNIST dm_vs_reference record written this session."""
    for path in s.new_records():
        if path.name.startswith(prefix) and path.name[len(prefix):len(prefix) + 1].isdigit():
            return json.loads(path.read_text()).get("package_s_per_iteration_median")
    return None


@click.command()
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--fashion-mnist", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of the four gzipped Fashion-MNIST IDX files.")
@click.option("--budget", type=float, default=500, show_default=True, help="Seconds for all sections together.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=lambda: os.environ.get("OUT", "gpu_session_out"), help="Where logs and records go ($OUT).")
@click.option("--python", default=sys.executable, show_default=True)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--reference-pythonpath", default="", help="Extra PYTHONPATH for the reference (e.g. scipy).")
@click.option("--smoke", is_flag=True, help="Tiny counts everywhere: checks this script, measures nothing.")
@click.option("--only", default="", metavar="NAME,NAME",
              help="Run only these sections (names as the log prints them; 'paper_dm_fashionmnist_ipc10' for the "
                   "paper row); all when empty.")
@click.option("--paper", "paper_rows", default="", metavar="METHOD:IPC[:ITERATIONS],...",
              help="Paper rows to build last, in order, each a section of its own (see 11 above).")
def main(reference: Path, fashion_mnist: Path, budget: float, out: Path, python: str, device: str,
         reference_pythonpath: str, smoke: bool, only: str, paper_rows: str) -> None:
    """Measure the GPU figures of issues 11 and 17 within BUDGET seconds."""
    rows = parse_paper_rows(paper_rows)
    out.mkdir(parents=True, exist_ok=True)
    if smoke:  # measures nothing: its records go to a temporary folder, never benchmarks/results/
        os.environ[RESULTS_ENV] = tempfile.mkdtemp(prefix="gpu_session_smoke_records_")
    selected = {name.strip() for name in only.split(",") if name.strip()} or None
    if selected is not None:  # a row asked for by --paper runs whatever --only says
        selected |= {paper_section(method, ipc) for method, ipc, _ in rows}
    s = Session(out, budget, python, selected)
    os.environ["CONDENSED_FASHION_MNIST_DIR"] = str(fashion_mnist.resolve())
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ["PYTHONPATH"] = str(REPO)  # the scripts import the package from this checkout
    s.say(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {environment(python)}")
    bench = "benchmarks"
    counts = ({"warmup": "1", "timed": "1", "rounds": "1", "epochs": "1", "steps": "2", "images": "200",
               "images50": "300", "batch_syn": "30", "paper_min": 1}
              if smoke else {"warmup": "5", "timed": "30", "rounds": "2", "epochs": "300", "steps": "20,40,80",
                             "images": "1000", "images50": "5000", "batch_syn": "125", "paper_min": 500})
    dm = [f"{bench}/dm_vs_reference.py", "--reference", str(reference), "--device", device, "--record",
          "--warmup", counts["warmup"], "--timed", counts["timed"], "--reference-pythonpath", reference_pythonpath]
    s.section("dm_fashionmnist_ipc10", [*dm, "--rounds", counts["rounds"]], needs=60, limit=170)
    s.section("dm_cifar10_ipc10", [*dm, "--source", "cifar10-generated", "--rounds", counts["rounds"]],
              needs=60, limit=170)
    # DM's slow mode was torch's intra-op threads (sixth session, OMP_NUM_THREADS=1: 6.5x against 4.3x); the
    # package now sets one thread at run time off the CPU: that, against torch's default pool (the variant)
    s.section("dm_cifar10_ipc10_keep_threads", [*dm, "--source", "cifar10-generated", "--rounds", counts["rounds"],
                                                "--variant-env", "CONDENSED_DATASETS_KEEP_THREADS=1"],
              needs=90, limit=260)
    s.section("compile_cache", [f"{bench}/compile_cache.py", "--device", device, "--record",
                                "--warmup", "1" if smoke else "4", "--iterations", "2" if smoke else "16"],
              needs=60, limit=200)  # 4 fresh processes, each compiling or loading, about 30 s each on an H100
    s.section("dm_fashionmnist_ipc10_uncompiled", [*dm, "--rounds", "1", "--set", "params.compile=false"],
              needs=60, limit=200)  # params.compile's default, auto, compiles on a GPU: this row without it
    profile = [f"{bench}/dm_profile.py", "recipes/dm_fashionmnist.yaml", "--device", device, "--record",
               "--warmup", counts["warmup"], "--iterations", counts["timed"], "--rows", "30"]
    s.section("dm_profile", profile, needs=40, limit=90)
    s.section("dm_profile_uncompiled", [*profile, "--set", "params.compile=false", "--tag", "uncompiled"],
              needs=60, limit=150)
    s.section("ensemble", [f"{bench}/ensemble_speed.py", "--device", device, "--nets", "5",
                           "--epochs", counts["epochs"], "--rounds", counts["rounds"], "--record"], needs=30, limit=90)
    # sequential + 3 forms, each warmed up once and timed per round: about 2.5x the section above
    s.section("ensemble_forms", [f"{bench}/ensemble_speed.py", "--device", device, "--nets", "5",
                                 "--epochs", counts["epochs"], "--rounds", counts["rounds"],
                                 "--forms", "grouped,channels_last,split", "--variants", "compiled", "--record"],
              needs=60, limit=240)  # and grouped with wide_compile=True (its compilation timed apart)
    s.section("ensemble_profile", [f"{bench}/ensemble_speed.py", "--device", device, "--nets", "5", "--profile",
                                   "--forms", "grouped,channels_last", "--variants", "compiled",
                                   "--epochs", "2" if smoke else "100", "--record"], needs=30, limit=180)
    s.section("experts", [f"{bench}/experts_speed.py", "--device", device, "--experts", "5", "--epochs", "1",
                          "--per-class", "20" if smoke else "5000", "--rounds", "1" if smoke else "2", "--warmup", "1",
                          "--record"],
              needs=40, limit=150)  # 5 experts at once against one by one, a CIFAR-10-shaped epoch each
    precision_smoke = ["--set", "iterations=2", "--set", "eval.runs=1", "--set", "eval.epochs=2",
                       "--set", "params.batch_real=8"] if smoke else []
    s.section("precision_quickstart", [f"{bench}/precision_check.py", "--device", device, "--record",
                                       *precision_smoke], needs=60, limit=200)
    s.section("dm_cifar10_ipc50", [*dm, "--source", "cifar10-generated", "--ipc", "50", "--rounds", counts["rounds"]],
              needs=60, limit=200)
    # DC/DSA's params.compile off the CPU (measured in the fifth session: compiled 0.202, uncompiled 0.161 s/it)
    for setting in ("true", "false"):
        s.section(f"dsa_fashionmnist_ipc1_compile_{setting}",
                  [*dm, "--method", "dsa", "--ipc", "1", "--rounds", "1", "--set", f"params.compile={setting}"],
                  needs=60, limit=200)
    # DC/DSA's params.batch_classes: every class matched in one pass (auto: on, off the CPU) against class by class
    for setting in ("true", "false"):
        s.section(f"dsa_fashionmnist_ipc1_batch_classes_{setting}",
                  [*dm, "--method", "dsa", "--ipc", "1", "--rounds", counts["rounds"], "--set",
                   f"params.batch_classes={setting}"], needs=60, limit=200)
    s.section("compiled_gradient_accuracy", [f"{bench}/compiled_gradient_accuracy.py", "--device", device,
                                             "--record", "--seeds", "2" if smoke else "8"], needs=30, limit=120)
    mtt = [f"{bench}/tesla_memory.py", "--device", device, "--model", "ConvNet", "--classes", "100",
           "--steps", counts["steps"], "--record", "--child-timeout", "60"]
    s.section("mtt_memory_cifar100_ipc10", [*mtt, "--images", counts["images"], "--tag", "cifar100_ipc10"],
              needs=40, limit=150)
    s.section("mtt_memory_cifar100_ipc50", [*mtt, "--images", counts["images50"], "--batch-syn", counts["batch_syn"],
                                            "--tag", f"cifar100_ipc50_batch{counts['batch_syn']}"], needs=40, limit=120)
    torchrun_out = Path("/tmp/gpu_session_torchrun")
    shutil.rmtree(torchrun_out, ignore_errors=True)
    s.section("torchrun_dm_one_process", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                          "--no-python", python, "-c",
                                          "from builders.cli import build_command; build_command()",
                                          "recipes/dm_fashionmnist.yaml", "--device", device, "--quiet", "--no-eval",
                                          "--out", str(torchrun_out), "--set", "ipc=1", "--set", "iterations=20"],
              needs=40, limit=90)
    for path in sorted(torchrun_out.glob("condensed/fashionmnist/*.safetensors")):
        s.say(f"   {path.name}: build = {json.dumps(read_metadata(path, python).get('build'))[:600]}")
    per_it = package_seconds_per_iteration(s, f"dm_vs_reference_{device}_")
    eval_allowance = 120.0  # 5 + 5 evaluation runs of 1000 epochs on 100 images, and the test passes
    if per_it:
        iterations = int(min(20000, max(0.0, s.left() - eval_allowance - 30) / per_it))
        if iterations >= counts["paper_min"]:
            s.say(f"paper row: {iterations} of 20000 iterations fit ({per_it:.4f} s/it measured above)")
            paper_row(s, "dm", 10, iterations, device, smoke, needs=eval_allowance + 60)
        else:
            s.say(f"paper row: skipped ({s.left():.0f} s left)")
    else:
        s.say("paper row: skipped (no DM s/iteration measured this session)")
    for method, ipc, iterations in rows:
        paper_row(s, method, ipc, iterations, device, smoke, needs=60)
    s.say(json.dumps(s.summary))
    s.save()


def paper_row(s: Session, method: str, ipc: int, iterations: int | None, device: str, smoke: bool,
              needs: float) -> None:
    """Build ``recipes/<method>_fashionmnist.yaml`` at ``ipc`` (its own iterations unless given) with its
    evaluation, as section :func:`paper_section`, and record the row."""
    recipe = REPO / "recipes" / f"{method}_fashionmnist.yaml"
    build_out = Path(tempfile.mkdtemp(prefix=f"gpu_session_{method}_ipc{ipc}_"))
    args = ["-c", "from builders.cli import build_command; build_command()", str(recipe.relative_to(REPO)),
            "--device", device, "--quiet", "--out", str(build_out), "--set", f"ipc={ipc}",
            "--set", "checkpoint_every=0",
            *(["--set", f"iterations={iterations}"] if iterations is not None else []),
            *(["--set", "eval.runs=1", "--set", "eval.epochs=2"] if smoke else [])]
    if s.section(paper_section(method, ipc), args, needs=needs, limit=s.left()) is not None:
        record_paper_row(build_out, method, ipc, iterations, recipe_iterations(recipe), device, s)


def read_metadata(path: Path, python: str) -> dict:
    """A set file's metadata, read by the package (in a child: this script imports none of it)."""
    code = ("import json, sys; from condensed_datasets.format import read_file_metadata; "
            "print(json.dumps(read_file_metadata(sys.argv[1])))")
    done = subprocess.run([python, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, check=False)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-400:]}


def parse_paper_rows(text: str) -> list[tuple[str, int, int | None]]:
    """``--paper``'s ``METHOD:IPC[:ITERATIONS]`` items, each a recipe ``recipes/<method>_fashionmnist.yaml``."""
    rows = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        method = fields[0].lower()
        try:
            numbers = [int(f) for f in fields[1:]]
        except ValueError:
            numbers = []
        if (not re.fullmatch(r"[a-z0-9_]+", method) or not 1 < len(fields) < 4 or len(numbers) != len(fields) - 1
                or min(numbers) < 1):
            raise click.BadParameter(f"{item!r}: write METHOD:IPC or METHOD:IPC:ITERATIONS (a recipe's method name, "
                                     "positive whole numbers)",
                                     param_hint="--paper")
        if not (REPO / "recipes" / f"{method}_fashionmnist.yaml").is_file():
            raise click.BadParameter(f"{item!r}: no recipes/{method}_fashionmnist.yaml", param_hint="--paper")
        rows.append((method, numbers[0], numbers[1] if len(numbers) == 2 else None))
    return rows


def paper_section(method: str, ipc: int) -> str:
    return f"paper_{method}_fashionmnist_ipc{ipc}"


def recipe_iterations(recipe: Path) -> int | None:
    """The recipe's own ``iterations:`` (a top-level line), read without importing the package."""
    found = re.search(r"^iterations:\s*(\d+)\s*(#.*)?$", recipe.read_text(), re.MULTILINE)
    return int(found.group(1)) if found else None


def record_paper_row(build_out: Path, method: str, ipc: int, iterations: int | None, paper_iterations: int | None,
                     device: str, s: Session) -> None:
    """The built set's evaluation, as a record in benchmarks/results/."""
    sets = sorted(build_out.glob("condensed/fashionmnist/*.safetensors"))
    sets = [p for p in sets if not p.name.endswith(".checkpoint.safetensors")]
    if not sets:
        s.say(f"{paper_section(method, ipc)}: no set was written")
        return
    meta = read_metadata(sets[0], s.python)
    ran = (meta.get("build") or {}).get("iterations", iterations)
    evaluation = meta.get("evaluation") or {}
    record = {
        "benchmark": f"paper row: {method.upper()} Fashion-MNIST ipc {ipc}, the recipe's evaluation "
                     f"({evaluation.get('model')}, {evaluation.get('runs')} runs x {evaluation.get('epochs')} epochs)",
        "recipe": f"recipes/{method}_fashionmnist.yaml", "ipc": ipc,
        "iterations": ran, "paper_iterations": paper_iterations,
        "shortened": bool(paper_iterations and isinstance(ran, int) and ran < paper_iterations),
        "evaluation": meta.get("evaluation"), "build": meta.get("build"),
        "command": f"python benchmarks/gpu_session.py (section {paper_section(method, ipc)}"
                   + (f", --set iterations={iterations})" if iterations is not None else ")"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = write_record(f"{paper_section(method, ipc)}_{device}", record)
    s.say(f"paper row recorded: {path.name}: {json.dumps(meta.get('evaluation'))[:400]}")
    s.save()


if __name__ == "__main__":
    main()
