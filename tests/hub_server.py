"""A minimal Hugging Face Hub-compatible HTTP server on loopback, for testing push and pull without the Hub.

No maintained, pip-installable Hub server supports uploads with ``huggingface_hub`` 2.x (``olah`` is a read-only
mirror; ``hf-local-hub`` needs a Go binary its wheel does not ship), so this module implements **only the endpoints
that** ``huggingface_hub`` **calls to create a model repo, commit small files and download them**:

* ``POST /api/repos/create`` — JSON ``{"name", "organization", "type"?, "visibility"?}``; 409 if it exists.
* ``GET /api/agent-harnesses`` — a registry the client fetches best-effort for its user-agent header; answered
  with an empty one.
* ``POST /api/validate-yaml`` — the client checks a ``README.md``'s front matter before committing it; this server
  only checks that it parses as a YAML mapping (the Hub also checks field values).
* ``POST /api/models/{repo_id}/preupload/{revision}`` — answers ``uploadMode: "regular"`` for every file, so the
  client sends file contents inline in the commit (no LFS or Xet transfer; see below).
* ``POST /api/models/{repo_id}/commit/{revision}`` — NDJSON: a ``header`` line, then ``file`` (base64 content),
  ``deletedFile`` or ``deletedFolder`` lines; answers ``{"commitUrl", "commitOid"}``.
* ``GET /api/models/{repo_id}/revision/{revision}`` — repo info (``id``, ``sha``, ``private``, ``siblings``); the client
  asks for it when a commit would change nothing, to return the current head instead.
* ``HEAD`` / ``GET /{repo_id}/resolve/{revision}/{path}`` — the file, with ``ETag`` (git blob sha1),
  ``X-Repo-Commit`` and ``Content-Length``; errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) as the Hub's do, so the client raises its usual exception types.

Writes need ``Authorization: Bearer <HubServer.token>`` (else 401, as the Hub answers). Every request is logged in
``HubServer.requests``; a request to any other endpoint gets 501 and is also recorded in ``HubServer.unhandled``, so a
test can assert that the client needed nothing more. Not implemented: LFS / Xet uploads (the real Hub stores
``*.safetensors`` through them), branches and pull requests, private-repo access rules, rate limits, and the
listing, tree and search APIs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

#: Branch every repo has; the only revision name accepted besides full commit hashes.
MAIN = "main"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content: what the Hub sends as a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One model repo: its commits in order, each a full snapshot ``{path: bytes}``."""

    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # [(commit oid, snapshot)]

    def snapshot(self, revision: str) -> dict[str, bytes] | None:
        """Files at ``revision`` (``main`` or a commit oid); ``None`` if there is no such revision."""
        if revision == MAIN:
            return self.commits[-1][1] if self.commits else {}
        return next((files for oid, files in self.commits if oid == revision), None)

    @property
    def head(self) -> str:
        """Commit oid of ``main`` (40 zeros before the first commit)."""
        return self.commits[-1][0] if self.commits else "0" * 40


class HubServer:
    """The test Hub: ``with HubServer() as hub:`` serves on ``hub.endpoint`` (``http://127.0.0.1:<free port>``).

    ``hub.repos[repo_id]`` holds what was pushed; ``hub.files(repo_id)`` is ``main``'s snapshot.
    """

    def __init__(self, token: str = "hf_test_token") -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.unhandled: list[tuple[str, str]] = []  # requests to endpoints this server does not implement
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="test-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port: later connections are refused."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """``{path: content}`` on ``main`` of ``repo_id``."""
        return dict(self.repos[repo_id].snapshot(MAIN))

    # -- request handling (called from server threads) ------------------------------------------------------
    def _create_repo(self, body: dict, authorized: bool) -> tuple[int, dict, dict]:
        if not authorized:
            return _error(401, "Invalid credentials in Authorization header")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if body.get("type", "model") != "model":
            return _error(400, "This test server only hosts model repos")
        with self._lock:
            if repo_id in self.repos:
                return _error(409, "You already created this model repo", {"url": f"{self.endpoint}/{repo_id}"})
            self.repos[repo_id] = Repo(private=body.get("visibility") == "private")
        return 200, {}, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    @staticmethod
    def _validate_yaml(body: dict) -> tuple[int, dict, dict]:
        content = body.get("content", "")
        if not content.startswith("---\n"):
            return 200, {}, {"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(content[4:].split("\n---", 1)[0])
        except yaml.YAMLError as err:
            return 400, {"X-Error-Code": "BadRequest"}, {"errors": [{"message": f"Invalid YAML: {err}"}]}
        if not isinstance(metadata, dict):
            return 400, {"X-Error-Code": "BadRequest"}, {"errors": [{"message": "YAML metadata must be a mapping"}]}
        return 200, {}, {"errors": [], "warnings": []}

    def _preupload(self, repo: Repo, body: dict) -> tuple[int, dict, dict]:
        current = repo.snapshot(MAIN)
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None,
            }
            for f in body["files"]
        ]
        return 200, {}, {"files": files, "commitOid": repo.head}

    def _commit(self, repo_id: str, repo: Repo, raw: bytes) -> tuple[int, dict, dict]:
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return _error(400, "The commit payload must start with a header line")
        with self._lock:
            files = dict(repo.snapshot(MAIN))
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                else:  # lfsFile: this server never asks for LFS uploads, so it cannot hold their content
                    return _error(400, f"Commit operation {key!r} is not supported by this test server")
            oid = hashlib.sha1(f"{repo_id}:{len(repo.commits)}:{lines[0]['value']}".encode()).hexdigest()
            repo.commits.append((oid, files))
        return 200, {}, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid}

    def _snapshot(self, repo_id: str, revision: str):
        """``(repo, {path: bytes})`` of ``repo_id`` at ``revision``, or ``(None, error response)``."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, _error(404, "Repository not found", code="RepoNotFound")
        files = repo.snapshot(revision)
        if files is None:
            return None, _error(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return repo, files

    def _repo_info(self, repo_id: str, revision: str) -> tuple[int, dict, dict]:
        repo, files = self._snapshot(repo_id, revision)
        if repo is None:
            return files
        info = {"id": repo_id, "sha": repo.head if revision == MAIN else revision, "private": repo.private}
        return 200, {}, {**info, "siblings": [{"rfilename": path} for path in sorted(files)]}

    def _resolve(self, repo_id: str, revision: str, path: str) -> tuple[int, dict, bytes | dict]:
        repo, files = self._snapshot(repo_id, revision)
        if repo is None:
            return files
        if path not in files:
            return _error(404, "Entry not found", code="EntryNotFound")
        data = files[path]
        oid = repo.head if revision == MAIN else revision
        return 200, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": oid}, data


def _error(status: int, message: str, body: dict | None = None, code: str | None = None) -> tuple[int, dict, dict]:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return status, headers, {"error": message, **(body or {})}


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, headers: dict, payload: bytes | dict, head_only: bool = False) -> None:
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            if not isinstance(payload, bytes):
                self.send_header("Content-Type", "application/json")
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def _route(self, method: str) -> None:
            path = urlsplit(self.path).path
            hub.requests.append((method, path))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            authorized = self.headers.get("Authorization") == f"Bearer {hub.token}"
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._send(*hub._create_repo(json.loads(raw), authorized))
            if method == "GET" and parts == ["api", "agent-harnesses"]:
                return self._send(200, {}, {"standardEnvVars": [], "harnesses": {}})
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return self._send(*hub._validate_yaml(json.loads(raw)))
            if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"]:
                repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                if action in ("preupload", "commit"):
                    repo = hub.repos.get(repo_id)
                    if not authorized:
                        return self._send(*_error(401, "Invalid credentials in Authorization header"))
                    if repo is None:
                        return self._send(*_error(404, "Repository not found", code="RepoNotFound"))
                    if revision != MAIN:
                        return self._send(*_error(404, f"Invalid rev id: {revision}", code="RevisionNotFound"))
                    if action == "preupload":
                        return self._send(*hub._preupload(repo, json.loads(raw)))
                    return self._send(*hub._commit(repo_id, repo, raw))
            if method == "GET" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
                return self._send(*hub._repo_info(f"{parts[2]}/{parts[3]}", parts[5]))
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                status, headers, payload = hub._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
                return self._send(status, headers, payload, head_only=method == "HEAD")
            hub.unhandled.append((method, path))
            self._send(*_error(501, f"{method} {path} is not implemented by the test Hub server"))

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

    return Handler
