"""A minimal, in-memory Hugging Face Hub for tests: the HTTP API that the real `huggingface_hub` client uses to
create a repo, upload one commit (regular files inline, large files through the LFS "basic" transfer) and download
it again (repo info, tree listing, `resolve`).

Written against huggingface_hub 2.4's client code (`hf_api.py`, `_commit_api.py`, `lfs.py`, `file_download.py`):

    POST /api/repos/create                                  create_repo
    POST /api/validate-yaml                                 create_commit, when README.md is committed
    POST /api/models/{repo}/preupload/{revision}            upload mode of each file: "regular" or "lfs"
    POST /{repo}.git/info/lfs/objects/batch                 LFS batch API -> our own upload href
    PUT  /lfs-objects/{oid}                                 LFS basic transfer (body may be chunked)
    POST /lfs-verify                                        LFS verify action
    POST /api/models/{repo}/commit/{revision}               the commit itself (ndjson)
    POST /api/models/{repo}/branch/{branch}                 create_branch
    GET  /api/agent-harnesses                               user-agent tagging registry (answered empty)
    GET  /api/models/{repo}[/revision/{revision}]           repo_info / model_info
    GET  /api/models/{repo}/tree/{revision}[/{path}]        list_repo_tree (one page)
    HEAD|GET /{repo}/resolve/{revision}/{path}              hf_hub_download

Xet storage (hf_xet's chunked CAS protocol) is not emulated: clients must run with `HF_HUB_DISABLE_XET=1`, and the
server never advertises Xet. It listens on 127.0.0.1 only, keeps everything in memory, caps request bodies,
and records every request so tests can assert what was (not) uploaded. Unknown routes answer 404 and are listed
in `unhandled`, so a test notices when the client starts using an endpoint this server does not know.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MAX_BODY_BYTES = 256 * 1024 * 1024
TOKEN = "hf_local_test_token"
USER = "tester"
# Files the real Hub stores in LFS by default (.gitattributes of a new repo), plus anything over 10 MB.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".model", ".gz", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024
REPO_RE = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a file, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # oid -> {path: content}
    lfs_paths: dict[str, set[str]] = field(default_factory=dict)  # oid -> paths stored as LFS in that commit


class LocalHub:
    """State of the fake Hub; `with LocalHub() as hub:` serves it at `hub.url` on a background thread."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.commit_count = 0
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- helpers for tests -----------------------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.branches.get(revision, revision)])

    def write_requests(self) -> list[tuple[str, str]]:
        """Requests that create or change anything (everything but reads)."""
        return [(m, p) for m, p in self.requests if m not in ("GET", "HEAD")]


class _Handler(BaseHTTPRequestHandler):
    state: LocalHub
    protocol_version = "HTTP/1.1"
    timeout = 30  # a stalled client cannot hold a thread forever

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- plumbing --------------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise ValueError("request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ValueError("request body too large")
        return self.rfile.read(length)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._error(401, "Invalid credentials in Authorization header")
        return False

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        with self.state.lock:
            self.state.requests.append((self.command, path))
        try:
            # Read the whole body before answering, even when the answer is an error: a body left unread on a
            # kept-alive connection would be parsed as the next request.
            self.body = self._body()
            for method, pattern, handler in ROUTES:
                match = re.fullmatch(pattern, path)
                if method == self.command and match:
                    return handler(self, query=query, **match.groupdict())
            with self.state.lock:
                self.state.unhandled.append((self.command, path))
            self._error(404, f"no route for {self.command} {path}")
        except ValueError as error:  # malformed or oversized request
            self.close_connection = True
            self._error(400, str(error))

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _repo(self, repo_id: str, revision: str | None = None) -> tuple[Repo, str] | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if repo.private and not self._authorized():
            return None
        revision = revision or "main"
        commit = repo.branches.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return repo, commit

    # -- write endpoints -------------------------------------------------------------------------------------------

    def create_repo(self, query) -> None:
        if not self._authorized():
            return
        payload = json.loads(self.body)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._error(409, "You already created this model repo")
            # A new Hub repo has one commit holding .gitattributes; an empty first commit keeps this simple.
            oid = hashlib.sha1(f"init {repo_id} {time.time()}".encode()).hexdigest()
            repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            repo.commits[oid], repo.lfs_paths[oid], repo.branches["main"] = {}, set(), oid
            self.state.repos[repo_id] = repo
        self._json(200, {"url": f"{self.state.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, query) -> None:
        payload = json.loads(self.body)
        if not isinstance(payload.get("content"), str):
            return self._json(400, {"errors": [{"message": "content must be a string"}]})
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, query, repo, revision) -> None:
        if not self._authorized() or self._repo(repo, revision) is None:
            return
        files = json.loads(self.body)["files"]
        answer = [{"path": f["path"], "shouldIgnore": False, "oid": None,
                   "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE else "regular"}
                  for f in files]
        self._json(200, {"files": answer, "commitOid": self.state.repos[repo].branches.get(revision)})

    def lfs_batch(self, query, repo) -> None:
        if not self._authorized() or self._repo(repo) is None:
            return
        payload = json.loads(self.body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise ValueError("only the LFS 'basic' upload transfer is supported")
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.state.lfs_objects:  # known content: no actions, the client skips it
                entry["actions"] = {
                    "upload": {"href": f"{self.state.url}/lfs-objects/{item['oid']}"},
                    "verify": {"href": f"{self.state.url}/lfs-verify"},
                }
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, query, oid) -> None:
        content = self.body
        if hashlib.sha256(content).hexdigest() != oid:
            raise ValueError(f"uploaded content does not match its sha256 {oid}")
        with self.state.lock:
            self.state.lfs_objects[oid] = content
        self._send(200)

    def lfs_verify(self, query) -> None:
        payload = json.loads(self.body)
        content = self.state.lfs_objects.get(payload["oid"])
        if content is None or len(content) != payload["size"]:
            return self._error(404, f"LFS object {payload['oid']} was not uploaded")
        self._json(200, {})

    def commit(self, query, repo, revision) -> None:
        if not self._authorized():
            return
        found = self._repo(repo, revision)
        if found is None:
            return
        repo_state, parent = found
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        files = dict(repo_state.commits[parent])
        lfs_paths = set(repo_state.lfs_paths[parent])
        summary = ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs_paths.discard(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.state.lfs_objects:
                    return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = self.state.lfs_objects[value["oid"]]
                lfs_paths.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                prefix = value["path"].rstrip("/")
                for name in [n for n in files if n == prefix or n.startswith(prefix + "/")]:
                    files.pop(name)
                    lfs_paths.discard(name)
            else:
                raise ValueError(f"unsupported commit operation {key!r}")
        oid = hashlib.sha1(f"{parent} {summary} {sorted(files)} {time.time()}".encode()).hexdigest()
        with self.state.lock:
            repo_state.commits[oid], repo_state.lfs_paths[oid] = files, lfs_paths
            repo_state.branches[revision] = oid
            self.state.commit_count += 1
        self._json(200, {"commitUrl": f"{self.state.url}/{repo}/commit/{oid}", "commitOid": oid,
                         "success": True, "pullRequestUrl": None})

    def create_branch(self, query, repo, branch) -> None:
        if not self._authorized():
            return
        found = self._repo(repo)
        if found is None:
            return
        repo_state, head = found
        if branch in repo_state.branches:
            return self._error(409, f"Reference {branch} already exists")
        repo_state.branches[branch] = head
        self._json(200, {})

    # -- read endpoints --------------------------------------------------------------------------------------------

    def agent_harnesses(self, query) -> None:
        # The client fetches this registry once to tag its user agent; an empty one disables that detection.
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def repo_info(self, query, repo, revision=None) -> None:
        found = self._repo(repo, revision)
        if found is None:
            return
        repo_state, commit = found
        siblings = [{"rfilename": name} for name in sorted(repo_state.commits[commit])]
        self._json(200, {"id": repo, "modelId": repo, "sha": commit, "private": repo_state.private,
                         "siblings": siblings, "tags": [], "library_name": "transformers"})

    def tree(self, query, repo, revision, path=None) -> None:
        found = self._repo(repo, revision)
        if found is None:
            return
        repo_state, commit = found
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = (path.strip("/") + "/") if path else ""
        entries, folders = [], set()
        for name, content in sorted(repo_state.commits[commit].items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest:
                parts = rest.split("/")
                depth = len(parts) - 1 if recursive else 1
                for i in range(1, depth + 1):
                    folders.add(prefix + "/".join(parts[:i]))
                if not recursive:
                    continue
            entry = {"type": "file", "path": name, "size": len(content), "oid": git_blob_oid(content)}
            if name in repo_state.lfs_paths[commit]:
                entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                    for f in sorted(folders)]
        self._json(200, entries)

    def resolve(self, query, repo, revision, path) -> None:
        found = self._repo(repo, revision)
        if found is None:
            return
        repo_state, commit = found
        content = repo_state.commits[commit].get(path)
        if content is None:
            self.send_response(404)
            for key, value in {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                               "X-Repo-Commit": commit, "Content-Length": "0"}.items():
                self.send_header(key, value)
            self.end_headers()
            return
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_oid(content)}"', "Accept-Ranges": "bytes"}
        if path in repo_state.lfs_paths[commit]:
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(content).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(content))
        status, body = 200, content
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged and self.command == "GET":  # resumed downloads
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else len(content) - 1
            status, body = 206, content[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send(status, body, headers, content_type="application/octet-stream")


ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{REPO_RE}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    ("POST", rf"/{REPO_RE}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", _Handler.lfs_upload),
    ("POST", r"/lfs-verify", _Handler.lfs_verify),
    ("POST", rf"/api/models/{REPO_RE}/commit/(?P<revision>[^/]+)", _Handler.commit),
    ("POST", rf"/api/models/{REPO_RE}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("GET", r"/api/agent-harnesses", _Handler.agent_harnesses),
    ("GET", rf"/api/models/{REPO_RE}", _Handler.repo_info),
    ("GET", rf"/api/models/{REPO_RE}/revision/(?P<revision>[^/]+)", _Handler.repo_info),
    ("GET", rf"/api/models/{REPO_RE}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", _Handler.tree),
    ("HEAD", rf"/{REPO_RE}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve),
    ("GET", rf"/{REPO_RE}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve),
]
