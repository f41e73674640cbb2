"""A Hugging Face Hub look-alike on loopback, for tests (HF_ENDPOINT points at it).

It answers what huggingface_hub 2.4 asks while pulling (read from its code):
  GET  /api/models/{repo}[/revision/{rev}]?blobs=True  model info: sha, siblings with sizes
  GET  /api/models/{repo}/tree/{rev}?recursive=True    file listing (snapshot_download)
  HEAD /{repo}/resolve/{rev}/{path}                    ETag, X-Repo-Commit, Content-Length
  GET  /{repo}/resolve/{rev}/{path}                    the bytes; `Range: bytes=N-` gives 206
LFS files (*.safetensors, ...) answer the resolve URL with a 302 to a second server on another
port, standing in for the CDN, with X-Linked-Etag / X-Linked-Size, as the Hub does; the bytes
come from `GET {cdn}/cdn/{repo}/{commit}/{path}`.
Errors carry X-Error-Code as the Hub does (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), which huggingface_hub turns into its typed errors.
Knobs: `drop_once[path] = n` closes the connection after n body bytes (once);
`fail[path] = status` answers that status for the file until cleared; `delay_s` slows bodies;
`hang = True` accepts connections and never answers (until cleared or stopped).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".onnx")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    # Gated: files need `Authorization: Bearer <token>`.
    token: str | None = None

    def add_commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        digest = hashlib.sha1(self.repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
        digest.update(str(len(self.commits)).encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha


def file_entry(path: str, data: bytes) -> dict[str, object]:
    entry: dict[str, object] = {"size": len(data), "oid": git_blob_sha(data)}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {
            "oid": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "pointerSize": 130,
        }
    return entry


def etag(path: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if path.endswith(LFS_SUFFIXES) else git_blob_sha(data)


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.drop_once: dict[str, int] = {}
        self.fail: dict[str, int] = {}
        self.delay_s = 0.0
        self.hang = False
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = ""
        self.cdn_url = ""

    def repo(self, repo_id: str) -> FakeRepo:
        return self.repos.setdefault(repo_id, FakeRepo(repo_id))

    def gets(self, path_suffix: str) -> list[str | None]:
        """Range headers of the file GETs whose URL ends with `path_suffix`."""
        with self._lock:
            return [
                r
                for m, p, r in self.log
                if m == "GET"
                and ("/resolve/" in p or p.startswith("/cdn/"))
                and p.endswith(path_suffix)
            ]

    def start(self) -> str:
        hub = self
        self._stopping.clear()

        class Handler(_Handler):
            fake = hub

        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        for server in self._servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        return self.url

    def stop(self) -> None:
        self._stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # --- helpers -------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.close_connection = True

    def _json(self, data: object) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        head: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {
            "X-Error-Code": code,
            "X-Error-Message": message,
            "Content-Type": "application/json",
        }
        headers.update(extra or {})
        self._send(status, json.dumps({"error": message}).encode(), headers, head)

    def _route(self, head: bool) -> None:
        split = urlsplit(self.path)
        raw = split.path.strip("/").split("/")
        parts = [unquote(p) for p in raw]
        with self.fake._lock:
            self.fake.log.append((self.command, split.path, self.headers.get("Range")))
        while self.fake.hang and not self.fake._stopping.wait(0.05):
            pass
        if self.fake._stopping.is_set():
            return
        if len(parts) >= 3 and parts[0] == "api" and parts[1] == "models":
            repo_id = "/".join(parts[2:4])
            rest = parts[4:]
            if not rest:
                return self._info(repo_id, "main")
            if rest[0] == "revision" and len(rest) == 2:
                return self._info(repo_id, rest[1])
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1])
        if len(parts) >= 5 and parts[0] == "cdn":
            return self._cdn("/".join(parts[1:3]), parts[3], "/".join(parts[4:]), head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        self._error(404, "NotFound", "no such route", head)

    def _commit(
        self, repo_id: str, revision: str, head: bool = False
    ) -> tuple[FakeRepo, str] | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        sha = repo.refs.get(revision, revision if revision in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, head)
            return None
        return repo, sha

    def _info(self, repo_id: str, revision: str) -> None:
        found = self._commit(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        siblings = []
        for path, data in sorted(repo.commits[sha].items()):
            entry = file_entry(path, data)
            sibling: dict[str, object] = {
                "rfilename": path,
                "size": entry["size"],
                "blobId": entry["oid"],
            }
            if "lfs" in entry:
                lfs = entry["lfs"]
                assert isinstance(lfs, dict)
                sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": 130}
            siblings.append(sibling)
        self._json(
            {
                "id": repo_id,
                "sha": sha,
                "private": False,
                "gated": "manual" if repo.token else False,
                "siblings": siblings,
            }
        )

    def _tree(self, repo_id: str, revision: str) -> None:
        found = self._commit(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        listing: list[dict[str, object]] = []
        folders = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
        for folder in folders:
            listing.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
        for path, data in sorted(files.items()):
            listing.append({"type": "file", "path": path, **file_entry(path, data)})
        self._json(listing)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        found = self._commit(repo_id, revision, head)
        if found is None:
            return
        repo, sha = found
        if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(
                401, "GatedRepo", "Access to model " + repo_id + " is restricted.", head
            )
        data = repo.commits[sha].get(path)
        if data is None:
            return self._error(
                404, "EntryNotFound", path + " does not exist", head, {"X-Repo-Commit": sha}
            )
        headers = {"ETag": f'"{git_blob_sha(data)}"', "X-Repo-Commit": sha}
        if path.endswith(LFS_SUFFIXES):
            headers["Location"] = f"{self.fake.cdn_url}/cdn/{repo.repo_id}/{sha}/{path}"
            headers["X-Linked-Etag"] = f'"{etag(path, data)}"'
            headers["X-Linked-Size"] = str(len(data))
            return self._send(302, b"", headers, head)
        self._body(path, data, headers, head)

    def _cdn(self, repo_id: str, sha: str, path: str, head: bool) -> None:
        repo = self.fake.repos.get(repo_id)
        data = repo.commits.get(sha, {}).get(path) if repo is not None else None
        if data is None:
            return self._send(404, b"NoSuchKey", {}, head)
        self._body(path, data, {"ETag": f'"{etag(path, data)}"'}, head)

    def _body(self, path: str, data: bytes, headers: dict[str, str], head: bool) -> None:
        """The file's bytes, honouring `Range: bytes=N-` and the failure knobs."""
        if path in self.fake.fail and not head:
            return self._error(self.fake.fail[path], "ServerError", "injected failure", head)
        headers = {**headers, "Accept-Ranges": "bytes"}
        if head:
            return self._send(200, data, headers, head=True)
        start = 0
        status = 200
        wanted = self.headers.get("Range")
        if wanted:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        cut = self.fake.drop_once.pop(path, None) if start == 0 else None
        chunk = 64 * 1024
        for offset in range(0, len(body), chunk):
            if cut is not None and offset + chunk > cut:
                self.wfile.write(body[offset:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body[offset : offset + chunk])
            if self.fake.delay_s:
                time.sleep(self.fake.delay_s)
