"""Clients of a served recognition service (``jaxmia serve``), over HTTP.

- ``Client(url, key)``: one account, ``query(images)`` as ``Service.query`` answers, plus its
  records; with the administrator's key also accounts, every record and the ground truth.
- ``RemoteService(url, admin_key)``: what the cloning study needs of a service
  (``query(account, images)``, ``history()``, ``true_labels``, ``clients``, ``policy``) for
  a live server: it opens fresh accounts on first use and reads their ground truth as the
  administrator, so ``jaxmia clone --config.cloning.service=URL`` runs against it.
"""

from __future__ import annotations

import io
import secrets
from typing import Any

import numpy as np

from jaxmia.errors import JaxmiaError
from jaxmia.service import policy as service_lib


class ServiceError(JaxmiaError):
    """A request the server refused: ``status`` is its HTTP code, the message its error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def encode(images: np.ndarray) -> bytes:
    """Images as the .npy body of a query (float32, as the service sees them)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(images, np.float32), allow_pickle=False)
    return buf.getvalue()


class Client:
    """One account of a served recognition service.

    Args:
      url: the server, e.g. ``http://127.0.0.1:8000``.
      key: the account's API key.
      timeout: seconds per request.
    """

    def __init__(self, url: str, key: str, *, timeout: float = 120.0):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise JaxmiaError(f"service URL {url!r}: expected http://HOST:PORT or https://...")
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ServiceError(0, f"service {self.url}: {type(e).__name__}: {e}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = r.text.strip()[:200]
            raise ServiceError(r.status_code, f"service {self.url}{path}: {message}")
        return r.json()

    def query(self, images: np.ndarray) -> service_lib.Answers:
        """The service's answers to a batch of images in [0, 1]. # [b, h, w, c]"""
        reply = self._request(
            "POST", "/v1/query", content=encode(images),
            headers={"Content-Type": "application/x-npy"},
        )  # fmt: skip
        return service_lib.Answers(
            labels=np.asarray(reply["labels"], np.int32),
            top_labels=_maybe(reply, "top_labels", np.int32),
            probabilities=_maybe(reply, "probabilities", np.float32),
            indices=np.asarray(reply["indices"], np.int64),
        )

    def policy(self) -> dict[str, Any]:
        """{"policy": ..., "image_shape": [h, w, c], "classes": n}."""
        return self._request("GET", "/v1/policy")

    def records(self, *, after: int = -1, limit: int = 1000, client: str | None = None) -> list:
        """This account's stored queries after index ``after`` (an administrator: everyone's,
        or ``client``'s, with the ground truth)."""
        params: dict[str, Any] = {"after": after, "limit": limit}
        if client is not None:
            params["client"] = client
        return self._request("GET", "/v1/records", params=params)["records"]

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    # -- the administrator's ---------------------------------------------------------------------

    def add_client(self, name: str, budget: int | None = None) -> str:
        """A new account's API key."""
        body = {"name": name} | ({"budget": budget} if budget is not None else {})
        return self._request("POST", "/v1/clients", json=body)["key"]

    def clients(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/clients")["clients"]

    def truth(self, images: np.ndarray) -> np.ndarray:
        """The recognizer's unaltered top-1, unrecorded. # [b]"""
        reply = self._request(
            "POST", "/v1/truth", content=encode(images),
            headers={"Content-Type": "application/x-npy"},
        )  # fmt: skip
        return np.asarray(reply["labels"], np.int32)


def _maybe(reply: dict, name: str, dtype) -> np.ndarray | None:
    return np.asarray(reply[name], dtype) if name in reply else None


class RemoteService:
    """A live server seen as the cloning study's service (see the module docstring).

    Args:
      url: the server.
      admin_key: its administrator's key (opens accounts, reads their ground truth).
      budget: each account's own budget (0: unlimited; None: the server's policy).
      prefix: account names are ``prefix + account``; default a fresh random one, so that
        every RemoteService starts with accounts (and client-scoped histories) of its own.
    """

    def __init__(
        self, url: str, admin_key: str, *, budget: int | None = None, prefix: str | None = None
    ):
        self.admin = Client(url, admin_key)
        info = self.admin.policy()
        fields = dict(info["policy"])
        fields["buckets"] = tuple(fields["buckets"])
        self.policy = service_lib.Policy(**fields)
        self.image_shape = tuple(info["image_shape"])
        self.num_classes = int(info["classes"])
        self.url, self.budget = url, budget
        self.prefix = prefix if prefix is not None else f"clone-{secrets.token_hex(4)}-"
        self._accounts: dict[str, Client] = {}
        self._rows: list[dict] = []
        self._after = -1

    def close(self) -> None:
        for c in self._accounts.values():
            c.close()
        self.admin.close()

    def query(self, account: str, images: np.ndarray) -> service_lib.Answers:
        if account not in self._accounts:
            key = self.admin.add_client(self.prefix + account, self.budget)
            self._accounts[account] = Client(self.url, key)
        return self._accounts[account].query(images)

    def history(self) -> dict[str, np.ndarray]:
        """This service's accounts' queries in order, as ``Service.history`` columns."""
        names = {self.prefix + a for a in self._accounts}
        while True:
            page = self.admin.records(after=self._after, limit=10_000)
            if not page:
                break
            self._after = page[-1]["index"]
            self._rows += [r for r in page if r["client"] in names]
        rows = self._rows
        clients = list(dict.fromkeys(r["client"] for r in rows))
        return {
            "client": np.array([clients.index(r["client"]) for r in rows], np.int32),
            "index": np.array([r["index"] for r in rows], np.int64),
            "true_label": np.array([r["true_label"] for r in rows], np.int32),
            "answer": np.array([r["answer"] for r in rows], np.int32),
            "altered": np.array([r["altered"] for r in rows], bool),
            "duplicate": np.array([r["duplicate"] for r in rows], bool),
            "hash": np.array([int(r["hash"], 16) for r in rows], np.uint64),
            "client_names": np.array(clients, dtype=object),
        }

    def true_labels(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [self.admin.truth(images[i : i + 256]) for i in range(0, len(images), 256)]
        )

    @property
    def clients(self) -> dict[str, service_lib.Client]:
        mine = {self.prefix + a: a for a in self._accounts}
        return {
            mine[c["name"]]: service_lib.Client(c["queries"], c["duplicates"])
            for c in self.admin.clients()
            if c["name"] in mine
        }
