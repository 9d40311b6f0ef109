"""A small client for the admin API (what the CLI's apply/revert/patches use)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(RuntimeError):
    """A failed admin call, with the server's one-line reason."""


class AdminClient:
    def __init__(self, server: str | None = None, token: str | None = None, timeout: float = 600.0):
        self.server = (server or os.environ.get("EDIT_SERVE_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("EDIT_SERVE_ADMIN_TOKEN")
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {self.server}: {e}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text.strip()[:200] or response.reason_phrase
            raise ClientError(f"{response.status_code}: {message}")
        return response

    def apply(self, path: str | os.PathLike, guard: float | None = None) -> dict:
        """Upload and apply; with `guard`, only if retention and locality fall by at most it."""
        data = Path(path).read_bytes()
        return self._call("POST", "/v1/patches", content=data, params=_guard(guard),
                          headers={"content-type": "application/octet-stream"}).json()

    def dry_run(self, path: str | os.PathLike, guard: float | None = None) -> dict:
        """What the patch would do on the server (nothing is applied); with `guard`, also
        whether a guarded apply would refuse it."""
        data = Path(path).read_bytes()
        return self._call("POST", "/v1/patches", content=data, params={"dry_run": "true", **_guard(guard)},
                          headers={"content-type": "application/octet-stream"}).json()

    def revert(self, patch_id: str) -> dict:
        return self._call("DELETE", f"/v1/patches/{patch_id}").json()

    def drop(self, patch_id: str, requests: list[int]) -> dict:
        """Replace an active memory patch by one without the edits `requests` (indices)."""
        return self._call("POST", f"/v1/patches/{patch_id}/drop", json={"requests": requests}).json()

    def compact(self, tolerance: float, dry_run: bool = False, kind: str = "delta") -> dict:
        """Replace the active weight patches (`kind` "memory": memory patches) by one (see
        edit_serve.compaction)."""
        return self._call("POST", "/v1/patches/compact",
                          params={"tolerance": tolerance, "dry_run": str(dry_run).lower(), "kind": kind}).json()

    def edit(self, body: dict, download: bool = False) -> dict | bytes:
        """POST /v1/edits (`body`: method, requests, config, apply, eval); with `download`,
        the computed patch file instead of JSON (nothing applied)."""
        headers = {"accept": "application/octet-stream"} if download else {}
        response = self._call("POST", "/v1/edits", json=body, headers=headers)
        return response.content if download else response.json()

    def pending_edits(self) -> dict:
        """GET /v1/edits: the edits computing or waiting for their turn, oldest first."""
        return self._call("GET", "/v1/edits").json()

    def cancel_edit(self, number: int) -> dict:
        """DELETE /v1/edits/{number}: cancel an edit that waits for its turn, or stop the one
        being computed."""
        return self._call("DELETE", f"/v1/edits/{number}").json()

    def patches(self, requests: int | None = None) -> dict:
        """GET /v1/patches; `requests`: the most requests to list per patch (all when None)."""
        return self._call("GET", "/v1/patches", params={} if requests is None else {"requests": requests}).json()

    def patch(self, patch_id: str) -> dict:
        return self._call("GET", f"/v1/patches/{patch_id}").json()

    def digests(self, names: list[str]) -> dict:
        return self._call("GET", "/v1/weights/digest", params={"names": names}).json()

    def download(self, patch_id: str) -> bytes:
        return self._call("GET", f"/v1/patches/{patch_id}", params={"download": 1}).content


def _guard(guard: float | None) -> dict:
    return {} if guard is None else {"guard": guard}
