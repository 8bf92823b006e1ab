"""A loopback HTTP server that speaks enough of the Hugging Face Hub protocol for the tests.

It serves dataset repositories from folders laid out as ``condensed-publish --to-dir`` writes them:
``{root}/{org}/{name}/`` holds the files of ``{org}/{name}`` at revision ``main``. Unmodified
``huggingface_hub`` code runs against it through ``HF_ENDPOINT``:

- ``HEAD``/``GET /datasets/{repo}/resolve/{revision}/{file}`` (``hf_hub_download``, ``get_hf_file_metadata``):
  ``X-Repo-Commit``, ``ETag`` (the git blob id), and for LFS files (``*.safetensors``) ``X-Linked-Etag``
  (the SHA-256) and ``X-Linked-Size``, as the Hub sends them; ``Range: bytes=N-`` is honoured;
- errors as the Hub reports them: 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound`` (the last with ``X-Repo-Commit``);
- ``GET /api/datasets/{repo}/tree/{revision}``, ``/refs``, ``/revision/{revision}`` (listings, repo info);
- the write side of ``HfApi``: ``POST /api/repos/create``, ``/api/validate-yaml``,
  ``/api/datasets/{repo}/preupload/{revision}`` (every file "regular") and ``/commit/{revision}``
  (NDJSON; honours ``parentCommit``), which write the files into the repository's folder.

A repository's commit id is a SHA-1 over its files' names and contents, so it changes with them. Only the
revision ``main`` (and the current commit id) exists. Every request is recorded in ``requests``.

Faults on demand: ``trickle = (n, seconds)`` sends a file body ``n`` bytes at a time with a pause between
(a stalled server); ``fail = {substring: status}`` answers every request whose path contains ``substring``
with that HTTP status (e.g. 500); ``redirect = {substring: location}`` answers every such request with a 307 to
``location`` (pointing back at the same path: a redirect loop).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_RESOLVE = re.compile(rf"^/datasets/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_TREE = re.compile(rf"^/api/datasets/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_REFS = re.compile(rf"^/api/datasets/{_REPO}/refs$")
_INFO = re.compile(rf"^/api/datasets/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_PREUPLOAD = re.compile(rf"^/api/datasets/{_REPO}/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(rf"^/api/datasets/{_REPO}/commit/(?P<rev>[^/]+)$")


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (what the Hub sends as ETag for files kept in plain git)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """The loopback hub: ``with HubServer(root) as hub: ...`` (``hub.endpoint`` is its base URL).

    ``lfs_hashes=False`` makes it answer like a server that knows no LFS ids (no ``X-Linked-Etag``), so
    clients must take the SHA-256 from elsewhere (``index.json``).
    """

    def __init__(self, root: str | os.PathLike, *, lfs_hashes: bool = True,
                 lfs_suffixes: tuple[str, ...] = (".safetensors",)) -> None:
        self.root = Path(root)
        self.lfs_hashes = lfs_hashes
        self.lfs_suffixes = lfs_suffixes
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict[str, Any]] = []
        self.connections: set[Any] = set()
        self.trickle: tuple[int, float] | None = None
        self.fail: dict[str, int] = {}
        self.redirect: dict[str, str] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hubserver", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting connections and cut the open (keep-alive) ones: the hub is unreachable from now on."""
        self._httpd.shutdown()
        self._httpd.server_close()
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what happened -------------------------------------------------------------------------------------
    def count(self, method: str, contains: str = "") -> int:
        """How many ``method`` requests had ``contains`` in their path."""
        return sum(1 for m, p in list(self.requests) if m == method and contains in p)

    def reset(self) -> None:
        self.requests.clear()

    # -- repositories ----------------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The repository's files (relative posix path -> bytes), hidden files left out."""
        folder = self.repo_dir(repo_id)
        out: dict[str, bytes] = {}
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                out[rel.as_posix()] = path.read_bytes()
        return out

    def commit_id(self, repo_id: str) -> str:
        digest = hashlib.sha1(b"repo " + repo_id.encode())
        for name, data in self.files(repo_id).items():
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return digest.hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(self.lfs_suffixes)


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default logging
            return

        def setup(self) -> None:
            super().setup()
            hub.connections.add(self.connection)

        def finish(self) -> None:
            hub.connections.discard(self.connection)
            super().finish()

        # -- plumbing ------------------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
            extra = {"X-Error-Message": message, **(headers or {})}
            if code:
                extra["X-Error-Code"] = code
            self._json(status, {"error": message}, extra)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _repo(self, repo_id: str) -> Path | None:
            folder = hub.repo_dir(repo_id)
            if folder.is_dir():
                return folder
            self._error(404, "RepoNotFound", "Repository not found")
            return None

        def _revision_ok(self, repo_id: str, rev: str) -> bool:
            if unquote(rev) in ("main", hub.commit_id(repo_id)):
                return True
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
            return False

        def _route(self) -> tuple[str, dict[str, list[str]]]:
            parts = urlsplit(self.path)
            hub.requests.append((self.command, parts.path))
            return parts.path, parse_qs(parts.query)

        def _failed(self, path: str) -> bool:
            status = next((s for key, s in hub.fail.items() if key in path), None)
            if status is not None:
                self._error(status, None, f"injected HTTP {status}")
            return status is not None

        def _send_slowly(self, status: int, data: bytes, headers: dict[str, str]) -> None:
            step, pause = hub.trickle
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for start in range(0, len(data), step):
                    self.wfile.write(data[start:start + step])
                    self.wfile.flush()
                    time.sleep(pause)
            except OSError:  # the client gave up
                self.close_connection = True

        # -- reads -------------------------------------------------------------------------------------------
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            path, query = self._route()
            if self._failed(path):
                return None
            location = next((loc for key, loc in hub.redirect.items() if key in path), None)
            if location is not None:
                return self._send(307, b"", {"Location": location})
            if m := _RESOLVE.match(path):
                return self._resolve(m["repo"], m["rev"], unquote(m["file"]))
            if m := _TREE.match(path):
                return self._tree(m["repo"], m["rev"], unquote(m["path"] or ""))
            if m := _REFS.match(path):
                if self._repo(m["repo"]) is not None:
                    commit = hub.commit_id(m["repo"])
                    self._json(200, {"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": commit}],
                                     "converts": [], "tags": []})
                return None
            if m := _INFO.match(path):
                return self._info(m["repo"], m["rev"] or "main")
            self._error(404, None, f"no route for {self.command} {path}")
            return None

        def _resolve(self, repo_id: str, rev: str, name: str) -> None:
            if self._repo(repo_id) is None or not self._revision_ok(repo_id, rev):
                return
            commit = hub.commit_id(repo_id)
            files = hub.files(repo_id)
            if name not in files:
                self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
                return
            data = files[name]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"}
            if hub.is_lfs(name) and hub.lfs_hashes:
                headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                headers["X-Linked-Size"] = str(len(data))
            status = 200
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if ranged and self.command == "GET":
                start = min(int(ranged[1]), len(data))
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                data, status = data[start:], 206
            if hub.trickle is not None and self.command == "GET" and hub.is_lfs(name):
                return self._send_slowly(status, data, headers)
            self._send(status, data, headers, content_type="application/octet-stream")

        def _entry(self, repo_id: str, name: str, data: bytes) -> dict[str, Any]:
            entry: dict[str, Any] = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
            if hub.is_lfs(name):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            return entry

        def _tree(self, repo_id: str, rev: str, sub: str) -> None:
            if self._repo(repo_id) is None or not self._revision_ok(repo_id, rev):
                return
            prefix = f"{sub.rstrip('/')}/" if sub else ""
            entries = [self._entry(repo_id, n, d) for n, d in hub.files(repo_id).items() if n.startswith(prefix)]
            self._json(200, entries)

        def _info(self, repo_id: str, rev: str) -> None:
            if self._repo(repo_id) is None or not self._revision_ok(repo_id, rev):
                return
            files = hub.files(repo_id)
            siblings = [{"rfilename": n, "size": len(d), "blobId": git_blob_id(d),
                         **({"lfs": {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                            if hub.is_lfs(n) else {})} for n, d in files.items()]
            self._json(200, {"id": repo_id, "author": repo_id.split("/")[0], "sha": hub.commit_id(repo_id),
                             "private": False, "disabled": False, "gated": False, "siblings": siblings, "tags": []})

        # -- writes ------------------------------------------------------------------------------------------
        def do_POST(self) -> None:  # noqa: N802
            path, query = self._route()
            body = self._body()
            if self._failed(path):
                return None
            if path == "/api/repos/create":
                return self._create(json.loads(body or b"{}"))
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body or b"{}"))
            if m := _PREUPLOAD.match(path):
                if self._repo(m["repo"]) is not None and self._revision_ok(m["repo"], m["rev"]):
                    files = json.loads(body)["files"]
                    self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files], "commitOid": hub.commit_id(m["repo"])})
                return None
            if m := _COMMIT.match(path):
                return self._commit(m["repo"], m["rev"], body)
            self._error(404, None, f"no route for POST {path}")
            return None

        def _create(self, payload: dict[str, Any]) -> None:
            if payload.get("type") != "dataset":
                self._error(400, None, "this loopback hub only holds dataset repositories")
                return
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            folder = hub.repo_dir(repo_id)
            if folder.is_dir():
                self._error(409, None, "You already created this dataset repo")
                return
            folder.mkdir(parents=True)
            self._json(200, {"url": f"{hub.endpoint}/datasets/{repo_id}", "name": repo_id,
                             "private": bool(payload.get("private"))})

        def _validate_yaml(self, payload: dict[str, Any]) -> None:
            content = payload.get("content", "")
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(match[1]) if match else {}
                if not isinstance(meta, dict):
                    raise ValueError("front matter is not a mapping")
            except (yaml.YAMLError, ValueError) as exc:
                self._json(400, {"errors": [{"message": str(exc)}], "warnings": []},
                           {"X-Error-Message": "Invalid metadata"})
                return
            self._json(200, {"errors": [], "warnings": []})

        def _commit(self, repo_id: str, rev: str, body: bytes) -> None:
            folder = self._repo(repo_id)
            if folder is None or not self._revision_ok(repo_id, rev):
                return
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next((ln["value"] for ln in lines if ln["key"] == "header"), {})
            parent = header.get("parentCommit")
            if parent is not None and parent != hub.commit_id(repo_id):
                self._error(412, None, "A commit has happened since. Please refresh and try again.")
                return
            written = []
            for line in lines:
                if line["key"] == "file":
                    value = line["value"]
                    content = value["content"]
                    data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    target = folder / value["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".commit.")
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(data)
                    os.replace(tmp, target)
                    written.append(value["path"])
                elif line["key"] != "header":
                    self._error(400, None, f"this loopback hub does not take {line['key']!r} operations")
                    return
            commit = hub.commit_id(repo_id)
            hub.commits.append({"repo_id": repo_id, "summary": header.get("summary"), "files": written,
                                "parent": parent, "commit": commit})
            self._json(200, {"commitUrl": f"{hub.endpoint}/datasets/{repo_id}/commit/{commit}",
                             "commitOid": commit, "pullRequestUrl": None})

    return Handler


def point_huggingface_hub_at(server: HubServer, monkeypatch: Any, hf_home: Path) -> None:
    """Point huggingface_hub (in this process) at ``server`` with an empty cache and token store under ``hf_home``.

    The environment is what the code under test reads at call time (``HF_ENDPOINT``, ``HF_HOME``,
    ``HF_HUB_OFFLINE``); huggingface_hub's import-time copies that matter are patched too (offline flag, token
    paths), and its once-a-process agent-registry fetch from ``constants.ENDPOINT`` is pre-empted.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN", "CONDENSED_DATASETS_ORG", "CONDENSED_DATASETS_EMBEDDED_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    try:
        from huggingface_hub.utils import _detect_agent
    except ImportError:
        return
    if hasattr(_detect_agent, "_registry"):
        monkeypatch.setattr(_detect_agent, "_registry", getattr(_detect_agent, "_EMPTY_REGISTRY", {}))


def go_offline(monkeypatch: Any) -> None:
    """``HF_HUB_OFFLINE=1`` as huggingface_hub sees it (environment and its import-time constant)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
