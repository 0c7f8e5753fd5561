"""A loopback stand-in for the Hugging Face Hub: just the endpoints `huggingface_hub` calls for `prmkit push`.

Stdlib only, threaded, bound to 127.0.0.1 on a free port. Every file is answered with ``uploadMode: "regular"``, so
content travels base64 in the commit's NDJSON and no LFS or Xet service is needed. The server keeps each branch's
files in memory and records every commit, so tests can assert exactly what arrived.

    with HubServer(token="hf_test", user="alice", orgs=["acme"]) as hub:
        env["HF_ENDPOINT"] = hub.url
        ...
        assert len(hub.commits) == 1
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    shas: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    prs: int = 0


class HubServer:
    def __init__(
        self, token: str = "hf_test_token", user: str = "alice", orgs: list[str] | None = None, role: str = "write"
    ):
        self.token = token
        self.user = user
        self.orgs = list(orgs or [])
        self.role = role
        self.existing_orgs: set[str] = set(self.orgs)
        """Organisations that exist; those outside `orgs` exist but the user is not a member."""
        self.forbidden: set[str] = set()
        """Repos the user can read but not write (answered 403 on preupload and commit)."""
        self.canned: dict[str, tuple[int, object]] = {}
        """Fixed answers by request path, before any other handling: (status, dict sent as JSON or str as HTML)."""
        self.repos: dict[str, Repo] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- test helpers -------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add_repo(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        repo = Repo(private=private)
        repo.branches["main"] = dict(files or {})
        self.repos[repo_id] = repo
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[revision]

    def start(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- behaviour ----------------------------------------------------------------------------------------------------
    def may_write(self, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0]
        return repo_id not in self.forbidden and namespace in (self.user, *self.orgs) and self.role != "read"

    def commit(self, repo_id: str, revision: str, lines: list[dict], create_pr: bool) -> dict:
        repo = self.repos[repo_id]
        header = lines[0]["value"]
        files, deleted = {}, []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            else:
                raise ValueError(f"unsupported commit line {key!r}")
        target = revision
        if create_pr:
            repo.prs += 1
            target = f"refs/pr/{repo.prs}"
            repo.branches[target] = dict(repo.branches[revision])
        tree = repo.branches[target]
        for path in deleted:
            tree.pop(path, None)
        tree.update(files)
        oid = hashlib.sha1(json.dumps([repo_id, target, len(self.commits), sorted(tree)]).encode()).hexdigest()
        repo.shas[target] = oid
        self.commits.append(
            {
                "repo_id": repo_id,
                "revision": target,
                "summary": header.get("summary"),
                "description": header.get("description"),
                "files": files,
                "deleted": deleted,
                "create_pr": create_pr,
            }
        )
        return {
            "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": f"{self.url}/{repo_id}/discussions/{repo.prs}" if create_pr else None,
        }


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        # -- plumbing -------------------------------------------------------------------------------------------------
        def _send(self, status: int, body: object = None, error_code: str | None = None) -> None:
            html = isinstance(body, str)  # what a proxy or a captive portal answers instead of the Hub
            data = body.encode() if html else json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if html else "application/json")
            self.send_header("Content-Length", str(len(data)))
            if error_code:
                self.send_header("X-Error-Code", error_code)
            if isinstance(body, dict) and "error" in body and status >= 400:
                self.send_header("X-Error-Message", body["error"])
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _dispatch(self, method: str) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            body = self._body()
            with hub.lock:
                hub.requests.append((method, path))
                if path in hub.canned:
                    return self._send(*hub.canned[path])
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                try:
                    self._route(method, path, query, body)
                except Exception as exc:  # a server bug must show up as a failed request, not a hang
                    self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

        def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
            seg = [unquote(s) for s in path.strip("/").split("/")]
            if method == "GET" and path == "/api/whoami-v2":
                return self._send(
                    200,
                    {
                        "type": "user",
                        "name": hub.user,
                        "orgs": [{"name": o} for o in hub.orgs],
                        "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": hub.role}},
                    },
                )
            if method == "POST" and path == "/api/validate-yaml":
                return self._send(200, {})
            if method == "POST" and path == "/api/repos/create":
                return self._create(json.loads(body))
            if seg[:2] == ["api", "organizations"] and len(seg) == 4 and seg[3] == "overview":
                if seg[2] in hub.existing_orgs:
                    return self._send(200, {"name": seg[2], "fullname": seg[2]})
                return self._send(404, {"error": "Organization not found"})
            if seg[:2] != ["api", "models"] or len(seg) < 4:
                return self._send(404, {"error": "Not found"})
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            repo = hub.repos.get(repo_id)
            if repo is None or (
                repo.private and not repo_id.startswith(f"{hub.user}/") and repo_id.split("/")[0] not in hub.orgs
            ):
                return self._send(404, {"error": "Repository not found"}, "RepoNotFound")
            verb = rest[0] if rest else "info"
            revision = rest[1] if len(rest) > 1 else "main"
            if verb in ("info", "revision", "tree") and revision not in repo.branches:
                return self._send(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
            if method == "GET" and verb in ("info", "revision"):
                return self._send(
                    200,
                    {
                        "id": repo_id,
                        "private": repo.private,
                        "sha": repo.shas.get(revision),
                        "siblings": [{"rfilename": p} for p in sorted(repo.branches[revision])],
                    },
                )
            if method == "GET" and verb == "tree":
                files = repo.branches[revision]
                return self._send(
                    200,
                    [
                        {"type": "file", "path": p, "size": len(d), "oid": git_blob_sha1(d)}
                        for p, d in sorted(files.items())
                    ],
                )
            if method == "POST" and verb == "branch":
                if revision in repo.branches:
                    return self._send(409, {"error": "Reference already exists"})
                if not hub.may_write(repo_id):
                    return self._send(403, {"error": "You don't have the rights to create a branch"})
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[revision] = dict(repo.branches[start])
                repo.shas[revision] = repo.shas[start]
                return self._send(200, {})
            if method == "POST" and verb in ("preupload", "commit"):
                if not hub.may_write(repo_id):
                    return self._send(403, {"error": f"You don't have the rights to write to {repo_id}"})
                if revision not in repo.branches:
                    return self._send(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
                if verb == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                create_pr = query.get("create_pr", ["0"])[0] == "1"
                return self._send(200, hub.commit(repo_id, revision, lines, create_pr))
            return self._send(404, {"error": f"Not found: {method} {path}"})

        def _create(self, payload: dict) -> None:
            namespace = payload.get("organization") or hub.user
            repo_id = f"{namespace}/{payload['name']}"
            if namespace != hub.user and namespace not in hub.orgs:
                return self._send(
                    403, {"error": f'You don\'t have the rights to create a model under the namespace "{namespace}"'}
                )
            if hub.role == "read":
                return self._send(403, {"error": "You don't have the rights to create a model (read token)"})
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            hub.add_repo(repo_id, private=private)
            return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    return Handler
