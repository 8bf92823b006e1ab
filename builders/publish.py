"""Publish condensed sets: to a hub dataset repository (one commit) or to a folder with the same layout.

A repository (or folder) holds, for one source:

- the sets, ``{method}_ipc{ipc}.safetensors``;
- ``index.json``: the machine-readable catalogue, one entry per file (source, method, ipc, sha256, size,
  accuracy_mean, accuracy_std, improvement_over_random, format_version, ...; see
  :func:`condensed_datasets.catalogue.index_entry`), sorted and byte-stable;
- ``README.md``: the dataset card, YAML front matter (task, tags, source dataset, size, license,
  ``viewer: false``) and a table of every set in the repository, built from ``index.json`` alone.

Publishing reads the target's current ``index.json``, adds (or replaces) the set's entry and writes the set,
the index and the card together: on the hub in one ``create_commit`` (``parent_commit`` pinned to the
revision that was read, so a concurrent publisher is refused instead of lost), in a folder atomically per file
under a lock. The same bytes again is a no-op; different bytes under the same name need ``force``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock
from filelock import Timeout as LockTimeout
from huggingface_hub import CommitOperationAdd, HfApi

from builders.errors import PublishConflict, PublishError
from condensed_datasets import hub
from condensed_datasets._atomic import atomic_write_bytes
from condensed_datasets.catalogue import default_repo_id, index_entry, index_to_bytes, make_index, read_index, sort_key
from condensed_datasets.constants import (
    CARD_NAME,
    DEFAULT_REVISION,
    HUB_INDEX_NAME,
    LOCK_TIMEOUT_S,
    METHOD_DISPLAY_NAMES,
)
from condensed_datasets.errors import HubNotFoundError, IndexFormatError, UnknownNameError
from condensed_datasets.format import CondensedSet
from condensed_datasets.paths import check_repo_id, check_revision, set_filename
from condensed_datasets.sources import SOURCES

__all__ = [
    "PublishConflict",
    "PublishError",
    "PublishPlan",
    "PublishResult",
    "build_card",
    "commit_operations",
    "plan_publish",
    "publish_to_dir",
    "publish_to_hub",
]

PROJECT = "condensed-datasets"



@dataclass
class PublishPlan:
    """What publishing one set changes: the files to write (path in repo -> bytes), the new index and card.

    ``status``: ``"new"`` (the file is not there yet), ``"replace"`` (different bytes, forced),
    ``"index"`` (same bytes already there but missing from the index: only index and card change) or
    ``"unchanged"`` (same bytes and index entry: nothing to do, ``files`` is empty).
    """

    filename: str
    sha256: str
    size: int
    status: str
    index: dict[str, Any]
    card: str
    files: dict[str, bytes] = field(default_factory=dict)
    previous_sha256: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.files)

    def describe(self) -> str:
        """Human summary: the files the commit/write carries, with sizes and SHA-256."""
        if not self.files:
            return f"{self.filename}: already published with the same bytes (sha256 {self.sha256}); nothing to do"
        lines = [f"{self.filename}: {self.status}" + (f" (was sha256 {self.previous_sha256})"
                                                      if self.status == "replace" else "")]
        for path, data in self.files.items():
            lines.append(f"  {path}  {len(data)} bytes  sha256 {hashlib.sha256(data).hexdigest()}")
        return "\n".join(lines)


@dataclass
class PublishResult:
    """What happened: the plan, where it went, and the commit URL (hub) or written paths (folder)."""

    plan: PublishPlan
    target: str
    dry_run: bool
    commit_url: str | None = None
    written: list[Path] = field(default_factory=list)


# -- the pure part: index, card, operations ---------------------------------------------------------------------
def _check_repo_id(repo_id: str) -> str:
    try:
        return check_repo_id(repo_id)
    except UnknownNameError as exc:
        raise PublishError(f"repository id must look like ORG/NAME: {exc}") from None


def plan_publish(
    set_bytes: bytes,
    existing_index: dict[str, Any] | None,
    *,
    repo_id: str,
    existing_sha256: str | None = None,
    force: bool = False,
    license: str | None = None,
    name: str = "<set>",
    folder: str | os.PathLike | None = None,
) -> PublishPlan:
    """Plan publishing the set ``set_bytes`` into a repository whose current ``index.json`` is ``existing_index``.

    ``existing_sha256`` is the SHA-256 of the file already at the set's name in the target, when known
    (else the index entry's is used). Raises PublishConflict when different bytes are there and not ``force``,
    PublishError when the repository holds another source's sets. ``name`` is used in error messages; ``folder``,
    when publishing into one, is named in them instead of the repository.
    """
    cset = CondensedSet.from_bytes(set_bytes, name)
    filename = set_filename(cset.method, cset.ipc)
    sha = hashlib.sha256(set_bytes).hexdigest()
    files = dict((existing_index or {}).get("files") or {})
    others = sorted({str(e.get("source")) for e in files.values()} - {cset.source})
    if others:
        held = f"holds {', '.join(map(str, others))} sets; one repository holds one source"
        if folder is not None:
            raise PublishError(f"{folder} {held} (and so does a published folder): publish {cset.source} sets into "
                               "another folder")
        default = default_repo_id(cset.source)
        elsewhere = "another repository named for it" if repo_id == default else f"{default} (or another repository)"
        raise PublishError(f"{repo_id} {held}: publish {cset.source} sets to {elsewhere}")
    previous = files.get(filename)
    there = existing_sha256 or (previous or {}).get("sha256")
    if there == sha:
        status = "unchanged" if previous is not None and previous.get("sha256") == sha else "index"
    elif there is not None and not force:
        raise PublishConflict(
            f"{repo_id} already has a different {filename} (sha256 {there}; this one is {sha}); "
            "pass --force (force=True) to replace it"
        )
    else:
        status = "replace" if there is not None else "new"
    files[filename] = index_entry(cset.metadata, sha256=sha, size=len(set_bytes))
    index = make_index(files)
    card = build_card(index, repo_id, license=license)
    out: dict[str, bytes] = {}
    if status in ("new", "replace"):
        out[filename] = set_bytes
    if status != "unchanged":
        out[HUB_INDEX_NAME] = index_to_bytes(index)
        out[CARD_NAME] = card.encode("utf-8")
    return PublishPlan(filename=filename, sha256=sha, size=len(set_bytes), status=status, index=index, card=card,
                       files=out, previous_sha256=there if status == "replace" else None)


def commit_operations(plan: PublishPlan) -> list[Any]:
    """The ``huggingface_hub.CommitOperationAdd`` list of the plan's commit (set, index.json, README.md)."""
    return [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in plan.files.items()]


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "10M<n<100M"


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "–" if value is None else format(float(value), spec)


def _accuracy(entry: dict[str, Any]) -> str:
    if entry.get("accuracy_mean") is None:
        return "not evaluated"
    text = _fmt(entry["accuracy_mean"])
    return text + (f" ± {_fmt(entry['accuracy_std'])}" if entry.get("accuracy_std") is not None else "")


def _evaluation(entry: dict[str, Any]) -> str:
    ev = entry.get("evaluation") or {}
    parts = [str(ev["model"])] if ev.get("model") else []
    if ev.get("runs"):
        parts.append(f"{ev['runs']} runs" + (f" × {ev['epochs']} epochs" if ev.get("epochs") else ""))
    return ", ".join(parts) or "–"


def _recipe(entry: dict[str, Any]) -> str:
    recipe = entry.get("recipe") or {}
    parts = [str(recipe[k]) for k in ("name",) if recipe.get(k)]
    if recipe.get("model"):
        parts.append(str(recipe["model"]))
    if recipe.get("iterations") is not None:
        parts.append(f"{recipe['iterations']} iterations")
    if recipe.get("seed") is not None:
        parts.append(f"seed {recipe['seed']}")
    text = ", ".join(parts) or "–"
    if recipe.get("file"):
        text += f" (`{recipe['file']}`)"
    return text


def build_card(index: dict[str, Any], repo_id: str, *, license: str | None = None) -> str:
    """The dataset card (README.md) of a repository whose ``index.json`` is ``index``: front matter + table."""
    entries = sorted(({**e, "file": f} for f, e in index["files"].items()), key=sort_key)
    sources = sorted({e["source"] for e in entries})
    source = sources[0] if sources else repo_id.rsplit("/", 1)[-1].removeprefix("condensed-")
    info = SOURCES.get(source)
    pretty = info.display_name if info else source
    total = sum(int(e.get("num_images") or 0) for e in entries)
    front = {
        "pretty_name": f"Condensed {pretty}",
        "license": license or (info.license if info else "other"),
        "task_categories": ["image-classification"],
        "tags": ["dataset-distillation", "dataset-condensation", "synthetic", PROJECT],
        "source_datasets": [info.hub_dataset if info else source],
        "size_categories": [_size_category(total)],
        "viewer": False,
    }
    rows = [
        "| File | Method | IPC | Images | Accuracy (%) | Random real (%) | Improvement (points) "
        "| Evaluation | Recipe |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for e in entries:
        gain = e.get("improvement_over_random")
        improvement = "–" if gain is None else f"{float(gain):+.2f}"
        rows.append(
            f"| `{e['file']}` | {METHOD_DISPLAY_NAMES.get(e['method'], e['method'])} | {e['ipc']} | "
            f"{e.get('num_images', '–')} | {_accuracy(e)} | {_fmt(e.get('random_accuracy_mean'))} | {improvement} | "
            f"{_evaluation(e)} | {_recipe(e)} |"
        )
    if not entries:
        rows.append("| – | – | – | – | – | – | – | – | – |")
    example = entries[-1] if entries else {"method": "dm", "ipc": 10}
    cls = info.dataset_class if info else "CondensedFashionMNIST"
    repo_arg = "" if info and repo_id == default_repo_id(source) else f', repo_id="{repo_id}"'
    body = f"""# Condensed {pretty}

Condensed (distilled) training sets of {pretty}: a few synthetic or selected images per class that train a
network almost as well as the full training split. Made and evaluated with the Python package `{PROJECT}`;
every file carries its full recipe and evaluation in its metadata.

## Sets

Accuracy: mean ± std over the evaluation runs of a network trained on the set alone, tested on the real
{pretty} test split. Random real: the same protocol on as many randomly chosen real images per class.

{chr(10).join(rows)}

## Use

```python
from condensed_datasets import {cls}

train = {cls}("data", method="{example['method']}", ipc={example['ipc']}, download=True{repo_arg})
image, target = train[0]      # float tensor [C,H,W] in the set's space
test = train.real_test_set()  # the real test split, mapped into the same space
```

The download lands in `data/condensed/{source}/` and is checked against this repository's SHA-256.

## Files

- `{{method}}_ipc{{ipc}}.safetensors`: one set per file (safetensors, never pickle): `images` float32
  [N,C,H,W] (class-contiguous: `ipc` of class 0, then class 1, ...), `labels` int64 [N], optional
  `soft_labels`, `lr`, `indices` and ZCA whitening (`zca_mean`, `zca_transform`); the metadata key
  `condensed_datasets` holds the recipe, seed, versions, normalisation and the evaluation (protocol,
  per-run accuracies).
- `index.json`: the machine-readable catalogue of this repository: per file its source, method, ipc,
  sha256, size, accuracy_mean, accuracy_std, improvement_over_random and format_version.

## Reproduce

Each set's recipe is in its metadata (`CondensedSet.load(path).metadata["recipe"]`); rebuild one with
`condensed-build recipes/<method>_{source}.yaml --set ipc=<ipc>` and check it with `condensed-eval`.
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body


# -- the hub --------------------------------------------------------------------------------------------------
def publish_to_hub(
    set_file: str | os.PathLike,
    repo_id: str | None = None,
    *,
    revision: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    force: bool = False,
    license: str | None = None,
    api: Any = None,
) -> PublishResult:
    """Publish ``set_file`` to the hub dataset repository ``repo_id`` (default ``{org}/condensed-{source}``).

    One commit carries the set, ``index.json`` and ``README.md``; the repository is created when missing
    (``private`` applies then), the branch ``revision`` too. ``dry_run`` reads the repository but changes
    nothing. ``api`` is an ``HfApi`` (default: one for ``$HF_ENDPOINT`` with the saved token).
    """
    data = Path(set_file).read_bytes()
    cset = CondensedSet.from_bytes(data, str(set_file))
    repo_id = _check_repo_id(repo_id or default_repo_id(cset.source))
    try:
        rev = check_revision(DEFAULT_REVISION if revision is None else revision)
    except UnknownNameError as exc:
        raise PublishError(str(exc)) from None
    api = api or HfApi(endpoint=hub.hub_endpoint())
    filename = set_filename(cset.method, cset.ipc)

    repo_exists, branch_exists, parent = True, True, None
    try:
        info = api.repo_info(repo_id, repo_type="dataset", revision=rev)
        parent = info.sha
    except hub.RepositoryNotFoundError:
        repo_exists = branch_exists = False
    except hub.RevisionNotFoundError:
        branch_exists = False
    except hub.network_errors() as exc:
        raise PublishError(f"cannot reach the hub at {hub.hub_endpoint()} ({type(exc).__name__}: {exc})") from exc
    existing_index, existing_sha = None, None
    if branch_exists:
        pinned = parent or rev
        try:
            existing_index = hub.fetch_index(repo_id, pinned)
        except HubNotFoundError:
            existing_index = None
        try:
            existing_sha = hub.remote_file(repo_id, filename, pinned).sha256
        except HubNotFoundError:
            existing_sha = None
    plan = plan_publish(data, existing_index, repo_id=repo_id, existing_sha256=existing_sha, force=force,
                        license=license, name=str(set_file))
    target = repo_id if rev == DEFAULT_REVISION else f"{repo_id}@{rev}"
    result = PublishResult(plan=plan, target=target, dry_run=dry_run)
    if dry_run or not plan.changed:
        return result
    verb = {"new": "Add", "replace": "Replace", "index": "Index"}[plan.status]
    try:
        if not repo_exists:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if not branch_exists and rev != DEFAULT_REVISION:
            api.create_branch(repo_id, repo_type="dataset", branch=rev, exist_ok=True)
        info = api.create_commit(
            repo_id, commit_operations(plan), repo_type="dataset", revision=rev,
            commit_message=f"{verb} {plan.filename}",
            commit_description=f"{verb} {plan.filename} (sha256 {plan.sha256}); update {HUB_INDEX_NAME} and "
                               f"{CARD_NAME}.",
            parent_commit=parent if branch_exists else None,
        )
    except hub.HfHubHTTPError as exc:
        raise _refused_commit(exc, target) from None
    except hub.network_errors() as exc:
        raise PublishError(f"cannot reach the hub at {hub.hub_endpoint()} ({type(exc).__name__}: {exc}); nothing "
                           f"was committed to {target}") from exc
    result.commit_url = getattr(info, "commit_url", None) or str(info)
    return result


def _refused_commit(exc: BaseException, target: str) -> PublishError:
    """The PublishError for an HTTP refusal of the publish's writes: a PublishConflict when another commit reached
    the branch after it was read (HTTP 409/412), else one naming the status and the token to check."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if status in (409, 412):
        return PublishConflict(f"another commit reached {target} after this publish read it (HTTP {status}); "
                               "nothing was committed: run the publish again (it reads the repository anew)")
    return PublishError(f"{hub.hub_endpoint()} refused the commit to {target} (HTTP {status}: {first}); nothing "
                        "was committed: check that your token (HF_TOKEN, or `hf auth login`) may write to it, "
                        "and the repository id")


# -- a folder ---------------------------------------------------------------------------------------------------
def publish_to_dir(
    set_file: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    license: str | None = None,
) -> PublishResult:
    """Publish ``set_file`` into ``folder`` laid out as a hub repository (a mirror, an air-gapped site).

    Same rules as the hub: reads ``folder/index.json``, no-op for the same bytes, ``force`` for different
    ones. Each file is written atomically (set, then ``index.json``, then ``README.md``) under a lock file
    (``folder/.publish.lock``). ``repo_id`` names the repository in the card (default ``{org}/condensed-{source}``).
    """
    data = Path(set_file).read_bytes()
    cset = CondensedSet.from_bytes(data, str(set_file))
    repo_id = _check_repo_id(repo_id or default_repo_id(cset.source))
    folder = Path(folder).expanduser()
    target = str(folder)
    lock_path = folder / ".publish.lock"

    def plan() -> PublishPlan:
        index_path = folder / HUB_INDEX_NAME
        try:
            existing = read_index(index_path) if index_path.is_file() else None
        except IndexFormatError as exc:
            raise PublishError(f"{exc}; publishing updates that index: repair it, move it away (the folder is then "
                               "indexed anew from this set), or publish into another folder") from None
        current = folder / set_filename(cset.method, cset.ipc)
        sha = hashlib.sha256(current.read_bytes()).hexdigest() if current.is_file() else None
        planned = plan_publish(data, existing, repo_id=repo_id, existing_sha256=sha, force=force, license=license,
                               name=str(set_file), folder=folder)
        for path in [folder / name for name in planned.files] + [lock_path]:
            if path.exists() and not path.is_file():
                raise PublishError(f"{path} is in the way: it is not a file (a folder or other entry); nothing was "
                                   "written: move it away and publish again")
        card_path = folder / CARD_NAME
        if (existing is None and not force and CARD_NAME in planned.files and card_path.is_file()
                and card_path.read_bytes() != planned.files[CARD_NAME]):  # someone's own README, not a card of ours
            raise PublishConflict(f"{card_path} exists but {folder} has no {HUB_INDEX_NAME}: it is not a published "
                                  f"folder, and publishing would replace that {CARD_NAME} with the dataset card; "
                                  "choose an empty or published folder, or pass --force (force=True) to replace it")
        return planned

    if dry_run:
        return PublishResult(plan=plan(), target=target, dry_run=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way, or a folder that cannot be written
        raise PublishError(f"cannot create {folder} ({exc.strerror}); pass --to-dir a folder you can write "
                           "to") from None
    lock = FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except LockTimeout:
        raise PublishError(f"another publish into {folder} has held its lock for over {LOCK_TIMEOUT_S:.0f} s "
                           f"(lock {lock.lock_file}); if none is running, delete the lock file and retry") from None
    except OSError as exc:  # a folder or a symbolic link where the lock goes, or a folder that cannot be written
        raise PublishError(f"cannot take the publish lock {lock.lock_file} ({exc.strerror}); it must be a plain file "
                           "or absent in a folder you can write: move it away and publish again") from None
    try:
        result = PublishResult(plan=plan(), target=target, dry_run=False)
        for path, content in result.plan.files.items():
            try:
                result.written.append(atomic_write_bytes(folder / path, content))
            except OSError as exc:
                raise PublishError(f"cannot write {folder / path} ({exc.strerror}); {len(result.written)} of "
                                   f"{len(result.plan.files)} files were written: make room or fix the folder and "
                                   "publish again (it completes the folder)") from None
    finally:
        lock.release()
    return result

