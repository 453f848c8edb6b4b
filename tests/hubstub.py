"""A stand-in for the Hugging Face hub on 127.0.0.1: just the endpoints huggingface_hub calls for ``whoami``,
``create_repo``, ``model_info`` and ``upload_folder`` over plain HTTP (preupload, validate-yaml, the LFS batch API
with basic PUT transfers and verify, and the NDJSON commit), holding what it receives in memory.

``HubStub.fail[(method, path prefix)] = status`` makes matching requests fail with that status (a commit that
fails after the LFS files went up, say). Uploads go through the legacy LFS path: tests turn hf_xet off, whose
storage protocol this stand-in does not speak.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import yaml

USER, ORG = "me", "my-org"


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class HubStub:
    def __init__(self, token: str = "hf_test_token") -> None:
        self.token, self.repos, self.lfs = token, {}, {}
        self.fail: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                stub.handle(self, "GET")

            def do_POST(self) -> None:
                stub.handle(self, "POST")

            def do_PUT(self) -> None:
                stub.handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- plumbing --------------------------------------------------------------------------------------------------

    @staticmethod
    def body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(h.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    h.rfile.readline()
                    return data
                data += h.rfile.read(size)
                h.rfile.readline()
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, payload: Any = None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(h.path).path
        data = self.body(h)
        with self.lock:
            self.requests.append((method, path))
        for (m, prefix), status in self.fail.items():
            if m == method and path.startswith(prefix):
                return self.reply(h, status, {"error": f"stand-in told to fail {method} {prefix}"})
        if h.headers.get("Authorization") != f"Bearer {self.token}" and not path.startswith("/lfs/"):
            return self.reply(h, 401, {"error": "Invalid credentials in Authorization header"})
        try:
            status, payload = self.route(method, path, data)
        except Exception as exc:  # a request the stand-in does not understand: visible in the test's output
            status, payload = 400, {"error": f"stand-in: {type(exc).__name__}: {exc}"}
        self.reply(h, status, payload)

    # --- the hub ---------------------------------------------------------------------------------------------------

    def route(self, method: str, path: str, data: bytes) -> tuple[int, Any]:
        if (method, path) == ("GET", "/api/whoami-v2"):
            return 200, {
                "type": "user",
                "name": USER,
                "orgs": [{"name": ORG}],
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            }
        if (method, path) == ("POST", "/api/repos/create"):
            body = json.loads(data)
            repo_id = f"{body.get('organization') or USER}/{body['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo"}
            self.repos[repo_id] = Repo(private=body.get("visibility", "public") == "private")
            return 200, {"url": f"{self.url}/{repo_id}"}
        if (method, path) == ("POST", "/api/validate-yaml"):
            content = json.loads(data)["content"]
            if content.startswith("---"):
                meta = yaml.safe_load(content.split("---")[1])
                if not isinstance(meta, dict):
                    return 400, {"errors": [{"message": "metadata is not a mapping"}]}
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and path.endswith("/info/lfs/objects/batch"):
            objects = json.loads(data)["objects"]
            return 200, {
                "transfer": "basic",
                "objects": [
                    {
                        "oid": o["oid"],
                        "size": o["size"],
                        "actions": {
                            "upload": {"href": f"{self.url}/lfs/{o['oid']}"},
                            "verify": {"href": f"{self.url}/lfs/verify"},
                        },
                    }
                    for o in objects
                ],
            }
        if (method, path) == ("POST", "/lfs/verify"):
            body = json.loads(data)
            ok = len(self.lfs.get(body["oid"], b"")) == body["size"]
            return (200, {}) if ok else (404, {"error": "object not uploaded"})
        if method == "PUT" and path.startswith("/lfs/"):
            oid = path.removeprefix("/lfs/")
            if hashlib.sha256(data).hexdigest() != oid:
                return 400, {"error": "sha256 does not match the oid"}
            self.lfs[oid] = data
            return 200, {}
        if path.startswith("/api/models/"):
            return self.model_route(method, path.removeprefix("/api/models/"), data)
        return 404, {"error": f"stand-in has no {method} {path}"}

    def model_route(self, method: str, rest: str, data: bytes) -> tuple[int, Any]:
        parts = rest.split("/")
        repo_id, action = "/".join(parts[:2]), parts[2] if len(parts) > 2 else ""
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}
        if method == "GET" and action in ("", "revision"):
            return 200, {"id": repo_id, "private": repo.private, "sha": (repo.commits or ["0" * 40])[-1]}
        if method == "POST" and action == "preupload":
            files = json.loads(data)["files"]
            return 200, {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                        "shouldIgnore": False,
                    }
                    for f in files
                ]
            }
        if method == "POST" and action == "commit":
            return self.commit(repo_id, repo, data)
        return 404, {"error": f"stand-in has no {method} /api/models/{rest}"}

    def commit(self, repo_id: str, repo: Repo, data: bytes) -> tuple[int, Any]:
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "the commit payload starts with its header"}
        staged = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                staged[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 400, {"error": f"LFS object {value['oid']} was never uploaded"}
                staged[value["path"]] = self.lfs[value["oid"]]
            else:
                return 400, {"error": f"unexpected {line['key']}"}
        repo.files.update(staged)
        oid = hashlib.sha1(data).hexdigest()
        repo.commits.append(oid)
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}
