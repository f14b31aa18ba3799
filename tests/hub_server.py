"""A small in-process stand-in for the Hugging Face Hub, for tests that push and pull with the real client.

There is no network in CI, so push -> load round trips run the real ``huggingface_hub`` (2.x) client and the
real ``transformers`` loaders against this server: stdlib ``http.server`` (``ThreadingHTTPServer``) in a daemon
thread on ``127.0.0.1`` and a random free port, everything held in memory. It implements exactly the calls that
client makes for the operations below (read from ``hf_api.py``, ``_commit_api.py``, ``lfs.py``,
``file_download.py`` and ``utils/_http.py`` of the installed client), nothing more:

Repositories (model, dataset and space repos; ids must be ``namespace/name``, a bare name is put under
``HubServer.user``):

* ``POST /api/repos/create`` -- body ``{"name", "organization", "visibility", "type"}``; 200 ``{"url"}``, or 409
  when the repo exists (``create_repo(exist_ok=True)`` relies on the 409). A new repo gets an initial commit
  holding the Hub's default ``.gitattributes`` (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.h5``, ``*.npy`` ... as
  LFS), as on the real Hub.
* ``GET /api/{type}s/{repo_id}`` and ``.../revision/{rev}`` -- repo info (``model_info``, ``repo_info``,
  ``resolve_revision``): ``id``, ``sha``, ``private``, ``lastModified``, ``siblings`` (with ``size``/``blobId``/
  ``lfs`` when ``?blobs=true``), and ``cardData``/``tags``/``library_name``/``pipeline_tag`` parsed from the YAML
  front matter of ``README.md``.
* ``GET /api/{type}s/{repo_id}/tree/{rev}[/{path}]?recursive=`` -- ``list_repo_tree`` / ``list_repo_files``
  entries (``type``, ``path``, ``oid``, ``size``, ``lfs``); one page, no ``Link`` header.
* ``GET /api/{type}s/{repo_id}/refs`` -- ``list_repo_refs`` (branches only, no tags).
* ``POST /api/{type}s/{repo_id}/branch/{branch}`` -- ``create_branch`` (``startingPoint`` optional; 409 if it exists).
* ``GET /api/whoami-v2`` -- a fixed user with a write token.
* ``POST /api/validate-yaml`` -- the client sends every ``README.md`` here before committing; 400 with
  ``{"errors": [...]}`` when the front matter is not valid YAML mapping.
* ``HEAD /api/telemetry/...`` -- 200, ignored.

Uploads (``create_commit``, ``upload_folder``, ``push_to_hub``):

* ``POST /api/{type}s/{repo_id}/preupload/{rev}`` -- says which files are ``regular`` and which ``lfs``: LFS when
  the path matches an LFS pattern of the repo's ``.gitattributes`` at that revision, when the file is larger than
  ``lfs_threshold`` (10 MiB, the Hub's rule), or when its 512-byte sample holds a NUL byte (binary). Also returns
  the ``oid`` of an already-present file (git SHA-1 for regular files, SHA-256 for LFS files), so the client skips
  unchanged files exactly as with the Hub.
* ``POST /{prefix}{repo_id}.git/info/lfs/objects/batch`` -- the LFS batch API, ``basic`` transfer only: for each
  object not yet stored it hands out ``actions.upload.href`` (a PUT URL on this server) and
  ``actions.verify.href``; objects already stored get no actions (the client then skips the upload).
* ``PUT /lfs/upload/{oid}`` -- the object's bytes (``Content-Length`` or chunked); rejected with 400 unless their
  SHA-256 equals ``oid``.
* ``POST /lfs/verify`` -- ``{"oid", "size"}``; 200 when stored with that size, else 404.
* ``POST /api/{type}s/{repo_id}/commit/{rev}`` -- the NDJSON commit payload: a ``header`` line (``summary``,
  ``description``, ``parentCommit``), then ``file`` (inline base64 content), ``lfsFile`` (``oid``/``size`` of an
  uploaded LFS object; 422 if it was never uploaded), ``deletedFile`` and ``deletedFolder`` lines. Commits only to
  an existing branch (404 ``RevisionNotFound`` otherwise, 412 on a stale ``parentCommit``); returns
  ``{"commitUrl", "commitOid", "pullRequestUrl"}``. ``create_pr`` is refused with 400.

Downloads (``hf_hub_download``, ``from_pretrained``, ``ModelCard.load``):

* ``HEAD`` and ``GET /{prefix}{repo_id}/resolve/{rev}/{path}`` -- served directly (no redirect is needed because
  the bytes live here) with ``X-Repo-Commit``, ``ETag`` (git SHA-1 for regular files, SHA-256 for LFS files, as the
  Hub's ``X-Linked-Etag``), ``Content-Length``, ``Accept-Ranges`` and single ``Range`` requests (206). Errors
  carry the Hub's ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, the latter
  with ``X-Repo-Commit`` so the client can cache the miss), which the client turns into its typed exceptions.

Revisions are branch names or (full or abbreviated) commit SHAs. Writes need ``Authorization: Bearer <token>``
(401 otherwise); private repos answer 404 ``RepoNotFound`` to requests without it. Anything else answers 404 with
an ``X-Error-Message`` naming the unimplemented route, and is recorded in ``HubServer.unhandled`` so a test can
assert the client made no call this server does not know. Every request is recorded in ``HubServer.requests``
as ``(method, path)``. ``hold_commits()``/``release_commits()`` park commit requests so a test can observe an
upload still in flight.

Xet storage is not implemented: the client must run with ``HF_HUB_DISABLE_XET=1`` (the ``hub_server`` fixture in
``conftest.py`` sets it), which makes it use the classic LFS path above.
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# The LFS patterns of the .gitattributes the Hub puts in every new model repo (the subset that matters here).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid``/``ETag`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    """One file in a commit: its bytes and whether the repo stores it in LFS."""

    content: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def git_oid(self) -> str:
        return git_blob_sha1(lfs_pointer(self.sha256, self.size) if self.lfs else self.content)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_sha1(self.content)


@dataclass
class Commit:
    sha: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, Blob]
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if len(revision) >= 7 and all(c in "0123456789abcdef" for c in revision):
            matches = [sha for sha in self.commits if sha.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        return None


class HubError(Exception):
    """An error response: status, X-Error-Code and message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _front_matter(text: str) -> dict | None:
    """The YAML metadata block of a README, or None when there is none. Raises yaml.YAMLError when invalid."""
    if not text.startswith("---"):
        return None
    parts = text.split("\n---", 1)
    if len(parts) < 2:
        return None
    data = yaml.safe_load(parts[0][3:])
    return data if isinstance(data, dict) else None


class HubServer:
    """The in-memory Hub. ``with HubServer() as hub: ... hub.endpoint ...``; see the module docstring."""

    user = "hf-scfm-tester"

    def __init__(self, token: str = "hf_scfm_dummy_token", lfs_threshold: int = 10 * 1024 * 1024):
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._commits_open = threading.Event()
        self._commits_open.set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # ---- helpers for tests -----------------------------------------------------------------------------------
    def hold_commits(self) -> None:
        """Make commit requests wait (outside the lock) until :meth:`release_commits`: lets a test observe a
        push that is still in flight."""
        self._commits_open.clear()

    def release_commits(self) -> None:
        self._commits_open.set()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, Blob]:
        """The files of ``repo_id`` at ``revision`` (path -> Blob), for assertions."""
        repo = self.repos[(repo_type, repo_id)]
        commit = repo.resolve(revision)
        if commit is None:
            raise KeyError(f"no revision {revision!r} in {repo_id}")
        return dict(commit.files)

    # ---- state changes (called with the lock held) ------------------------------------------------------------
    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, Blob], summary: str, description: str):
        listing = json.dumps(
            {"parent": parent, "summary": summary, "n": len(repo.commits),
             "files": {p: b.git_oid for p, b in sorted(files.items())}},
            sort_keys=True,
        )
        sha = hashlib.sha1(listing.encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent, summary, description, files, _now())
        return sha

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private)
        sha = self._new_commit(repo, None, {".gitattributes": Blob(DEFAULT_GITATTRIBUTES.encode(), False)},
                               "initial commit", "")
        repo.branches["main"] = sha
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def is_lfs_path(self, commit: Commit, path: str, size: int, sample: bytes) -> bool:
        attributes = commit.files.get(".gitattributes")
        patterns = []
        if attributes is not None:
            for line in attributes.content.decode(errors="replace").splitlines():
                fields = line.split()
                if len(fields) >= 2 and "filter=lfs" in fields[1:]:
                    patterns.append(fields[0])
        name = path.rsplit("/", 1)[-1]
        for pattern in patterns:
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(path, pattern):
                return True
        return size > self.lfs_threshold or b"\0" in sample


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer  # set by HubServer.start

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    # ---- plumbing --------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return self._raw_body

    def _read_body(self) -> bytes:
        """Read the whole request body up front (so an early error never leaves bytes on a kept-alive socket)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json",
              head_only: bool = False, length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head_only:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None, content_type="application/json"):
        self._send(status, json.dumps(data).encode(), headers, content_type)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.server_hub.token}"

    def _require_write(self):
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.server_hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str):
        hub = self.server_hub
        url = urlsplit(self.path)
        hub.requests.append((method, url.path))
        self._raw_body = self._read_body() if method in ("POST", "PUT") else b""
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        raw = url.path.strip("/").split("/")  # segments still percent-encoded (revisions are quoted with safe="")
        if method == "POST" and "/commit/" in url.path:
            hub._commits_open.wait(timeout=60)
        try:
            with hub.lock:
                handled = self._route(method, raw, query)
            if not handled:
                hub.unhandled.append((method, url.path))
                raise HubError(404, f"not implemented by tests/hub_server.py: {method} {url.path}")
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, b"" if method == "HEAD" else json.dumps({"error": err.message}).encode(),
                       headers, head_only=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ---- routing ---------------------------------------------------------------------------------------------
    def _route(self, method: str, seg: list[str], query: dict) -> bool:
        if seg[:1] == ["api"]:
            return self._route_api(method, seg[1:], query)
        if seg[:1] == ["lfs"]:
            return self._route_lfs(method, seg[1:])
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 4 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(seg[0])}/{unquote(seg[1])}"
            self._resolve(method, repo_type, repo_id, unquote(seg[3]), unquote("/".join(seg[4:])))
            return True
        if len(seg) >= 2 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            if method != "POST":
                return False
            self._lfs_batch(repo_type, f"{unquote(seg[0])}/{unquote(seg[1])[:-4]}")
            return True
        return False

    def _route_api(self, method: str, seg: list[str], query: dict) -> bool:
        if seg == ["repos", "create"] and method == "POST":
            self._create_repo()
            return True
        if seg == ["validate-yaml"] and method == "POST":
            self._validate_yaml()
            return True
        if seg == ["whoami-v2"] and method == "GET":
            self._json(200, {"type": "user", "name": self.server_hub.user, "orgs": [],
                             "auth": {"accessToken": {"displayName": "dummy", "role": "write"}}})
            return True
        if seg[:1] == ["telemetry"]:
            self._send(200)
            return True
        if len(seg) < 3 or seg[0] not in REPO_TYPES:
            return False
        repo_type, repo_id, rest = REPO_TYPES[seg[0]], f"{unquote(seg[1])}/{unquote(seg[2])}", seg[3:]
        if method == "GET" and not rest:
            self._repo_info(repo_type, repo_id, None, query)
        elif method == "GET" and len(rest) == 2 and rest[0] == "revision":
            self._repo_info(repo_type, repo_id, unquote(rest[1]), query)
        elif method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            self._tree(repo_type, repo_id, unquote(rest[1]), unquote("/".join(rest[2:])), query)
        elif method == "GET" and rest == ["refs"]:
            self._refs(repo_type, repo_id)
        elif method == "POST" and len(rest) == 2 and rest[0] == "branch":
            self._create_branch(repo_type, repo_id, unquote(rest[1]))
        elif method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            self._preupload(repo_type, repo_id, unquote(rest[1]), query)
        elif method == "POST" and len(rest) == 2 and rest[0] == "commit":
            self._commit_endpoint(repo_type, repo_id, unquote(rest[1]), query)
        else:
            return False
        return True

    def _route_lfs(self, method: str, seg: list[str]) -> bool:
        hub = self.server_hub
        if method == "PUT" and len(seg) == 2 and seg[0] == "upload":
            oid, body = seg[1], self._body()
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, f"uploaded bytes do not hash to {oid}")
            hub.lfs_store[oid] = body
            self._send(200, headers={"ETag": f'"{oid}"'})
            return True
        if method == "POST" and seg == ["verify"]:
            self._require_write()
            data = json.loads(self._body())
            stored = hub.lfs_store.get(data["oid"])
            if stored is None or len(stored) != data["size"]:
                raise HubError(404, f"LFS object {data['oid']} of size {data['size']} not found")
            self._json(200, {"success": True})
            return True
        return False

    # ---- endpoints -------------------------------------------------------------------------------------------
    def _create_repo(self):
        self._require_write()
        data = json.loads(self._body())
        repo_type = data.get("type") or "model"
        repo_id = f"{data.get('organization') or self.server_hub.user}/{data['name']}"
        url = f"{self.server_hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.server_hub.repos:
            self._json(409, {"error": "You already created this repo", "url": url})
            return
        self.server_hub.create_repo(repo_type, repo_id, private=data.get("visibility") == "private")
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self):
        data = json.loads(self._body())
        try:
            if data.get("content", "").startswith("---"):
                parts = data["content"].split("\n---", 1)
                if len(parts) < 2:
                    raise yaml.YAMLError("front matter not closed by '---'")
                meta = yaml.safe_load(parts[0][3:])
                if meta is not None and not isinstance(meta, dict):
                    raise yaml.YAMLError("front matter is not a mapping")
        except yaml.YAMLError as err:
            self._json(400, {"errors": [{"message": f"Invalid YAML metadata: {err}"}], "warnings": []})
            return
        self._json(200, {"errors": [], "warnings": []})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None, query: dict):
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision or "main")
        blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {"size": blob.size, "sha256": blob.sha256,
                                      "pointerSize": len(lfs_pointer(blob.sha256, blob.size))}
            siblings.append(sibling)
        info = {"id": repo_id, "_id": repo_id, "author": repo_id.split("/")[0], "sha": commit.sha,
                "private": repo.private, "disabled": False, "gated": False, "lastModified": commit.date,
                "createdAt": repo.commits[min(repo.commits, key=lambda s: repo.commits[s].date)].date,
                "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}
        readme = commit.files.get("README.md")
        if readme is not None:
            try:
                meta = _front_matter(readme.content.decode())
            except yaml.YAMLError:
                meta = None
            if meta:
                info["cardData"] = meta
                info["tags"] = list(meta.get("tags") or [])
                for key in ("library_name", "pipeline_tag"):
                    if key in meta:
                        info[key] = meta[key]
        self._json(200, info)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, query: dict):
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound",
                           {"X-Repo-Commit": commit.sha})
        entries, folders = [], set()
        for file_path, blob in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder,
                                    "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0})
            if recursive or len(parts) == 1:
                entry = {"type": "file", "path": file_path, "oid": blob.git_oid, "size": blob.size}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size,
                                    "pointerSize": len(lfs_pointer(blob.sha256, blob.size))}
                entries.append(entry)
        self._json(200, entries)

    def _refs(self, repo_type: str, repo_id: str):
        repo = self._repo(repo_type, repo_id)
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                    for name, sha in sorted(repo.branches.items())]
        self._json(200, {"branches": branches, "tags": [], "converts": []})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str):
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        body = self._body()
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        repo.branches[branch] = self._commit(repo, start).sha
        self._json(200, {})

    def _preupload(self, repo_type: str, repo_id: str, revision: str, query: dict):
        self._require_write()
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        data = json.loads(self._body())
        files = []
        for item in data.get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            lfs = self.server_hub.is_lfs_path(commit, item["path"], int(item["size"]), sample)
            existing = commit.files.get(item["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if lfs else git_blob_sha1(existing.content)
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, repo_type: str, repo_id: str):
        self._require_write()
        self._repo(repo_type, repo_id)
        data = json.loads(self._body())
        if data.get("operation") != "upload":
            raise HubError(400, "only the 'upload' LFS operation is implemented")
        if "basic" not in data.get("transfers", ["basic"]):
            raise HubError(400, "only the 'basic' LFS transfer is implemented")
        base = self.server_hub.endpoint
        objects = []
        for obj in data.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            stored = self.server_hub.lfs_store.get(obj["oid"])
            if stored is None or len(stored) != obj["size"]:
                entry["actions"] = {
                    "upload": {"href": f"{base}/lfs/upload/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{base}/lfs/verify", "header": {}},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _commit_endpoint(self, repo_type: str, repo_id: str, revision: str, query: dict):
        self._require_write()
        hub = self.server_hub
        repo = self._repo(repo_type, repo_id)
        if query.get("create_pr"):
            raise HubError(400, "create_pr is not implemented by tests/hub_server.py")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to an existing branch)", "RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and not head.sha.startswith(parent):
            raise HubError(412, f"A commit has happened since {parent}: head of {revision} is {head.sha}")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')}")
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                content = hub.lfs_store.get(value["oid"])
                if content is None or ("size" in value and len(content) != value["size"]):
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = Blob(content, lfs=True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(prefix)]:
                    del files[path]
            else:
                raise HubError(400, f"commit operation {key!r} is not implemented by tests/hub_server.py")
        sha = hub._new_commit(repo, head.sha, files, header.get("summary", ""), header.get("description", ""))
        repo.branches[revision] = sha
        prefix = URL_PREFIX[repo_type]
        self._json(200, {"success": True, "commitOid": sha, "pullRequestUrl": None,
                         "commitUrl": f"{hub.endpoint}/{prefix}{repo_id}/commit/{sha}"})

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str):
        repo = self._repo(repo_type, repo_id)
        commit = self._commit(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.etag}"', "X-Linked-Size": str(blob.size)})
        content, status = blob.content, 200
        byte_range = self.headers.get("Range")
        if byte_range and byte_range.startswith("bytes=") and "," not in byte_range:
            start_text, _, end_text = byte_range[len("bytes="):].partition("-")
            if start_text:
                start = int(start_text)
                end = min(int(end_text), blob.size - 1) if end_text else blob.size - 1
            else:
                start, end = max(blob.size - int(end_text), 0), blob.size - 1
            if start >= blob.size:
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{blob.size}"})
            content, status = content[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        self._send(status, content, headers, content_type="application/octet-stream", head_only=method == "HEAD",
                   length=len(content))
