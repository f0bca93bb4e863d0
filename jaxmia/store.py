"""The recognition service's persistent store: accounts and every answered query, in SQLite.

One file (``service.db``) in WAL mode: the server writes each request's queries in one
transaction before it answers, and readers (the records endpoints) never block the writer.
With ``synchronous=NORMAL`` a committed transaction survives the server's process being
killed (the operating system holds it); ``durable=True`` (``synchronous=FULL``) also survives
the machine losing power, at an fsync per request.

What is kept:
- ``clients``: name, the SHA-256 of its API key (the keys are 256-bit random tokens, so a fast
  hash suffices: nothing to brute-force), its own budget (NULL: the policy's), whether it is an
  administrator, and ``cid``, the service's number for it, given at its first query (the
  service salts its coins with it, so a restart must give it the same).
- ``queries``: per image, in order, the service's index, client, perceptual hash, coin token,
  true label, answer, whether the answer was altered on purpose, whether it was flagged as a
  near-duplicate, when, and (embedding detector) the recognizer's features.
From these the service rebuilds its accounts and near-duplicate index on start
(``jaxmia.service.Service``).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from jaxmia.errors import JaxmiaError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
  name TEXT PRIMARY KEY,
  key_hash TEXT UNIQUE,
  budget INTEGER,
  admin INTEGER NOT NULL DEFAULT 0,
  cid INTEGER UNIQUE,
  created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS queries (
  idx INTEGER PRIMARY KEY,
  cid INTEGER NOT NULL,
  hash INTEGER NOT NULL,
  token INTEGER NOT NULL,
  true_label INTEGER NOT NULL,
  answer INTEGER NOT NULL,
  altered INTEGER NOT NULL,
  duplicate INTEGER NOT NULL,
  time REAL NOT NULL,
  features BLOB
);
CREATE INDEX IF NOT EXISTS queries_cid ON queries (cid, idx);
"""
COLUMNS = ("idx", "cid", "hash", "token", "true_label", "answer", "altered", "duplicate")


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return secrets.token_urlsafe(32)


def _signed(u: np.ndarray) -> list[int]:
    """uint64 as SQLite's signed 64-bit integers (the same bits)."""
    return np.asarray(u, np.uint64).view(np.int64).tolist()


class Store:
    """The SQLite store of one service (thread-safe: one connection behind a lock).

    Args:
      path: the database file (created with its tables if absent).
      durable: fsync every transaction (``synchronous=FULL``) instead of at checkpoints.
    """

    def __init__(self, path: str | Path, *, durable: bool = False):
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise JaxmiaError(
                f"service store {self.path}: not a jaxmia service database ({e})"
            ) from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- accounts ------------------------------------------------------------------------------

    def add_client(self, name: str, *, budget: int | None = None, admin: bool = False) -> str:
        """Creates an account and returns its API key (shown once: only its hash is kept).

        Raises:
          JaxmiaError: the name is taken, empty or too long.
        """
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise JaxmiaError(f"client name: expected 1 to 128 characters, got {name!r}")
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise JaxmiaError(
                f"client budget: expected an integer >= 0 (0: unlimited), got {budget!r}"
            )
        key = new_key()
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO clients (name, key_hash, budget, admin, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (name, hash_key(key), budget, int(admin), time.time()),
                )
            except sqlite3.IntegrityError:
                raise JaxmiaError(f"client name {name!r}: already taken") from None
        return key

    def client_for_key(self, key: str) -> tuple[str, bool] | None:
        """(name, admin) of the account with this API key, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT name, admin FROM clients WHERE key_hash = ?", (hash_key(key),)
            ).fetchone()
        return None if row is None else (row[0], bool(row[1]))

    def clients(self) -> list[dict]:
        """Every account: name, budget (None: the policy's), admin, cid (None: no query yet)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, budget, admin, cid FROM clients ORDER BY created, name"
            ).fetchall()
        return [{"name": n, "budget": b, "admin": bool(a), "cid": c} for n, b, a, c in rows]

    # -- queries -------------------------------------------------------------------------------

    def append(
        self, client: str, cid: int, rows: dict[str, np.ndarray], features: np.ndarray | None
    ) -> None:
        """One request's queries, in one transaction (all or none), the client's cid with them.

        Args:
          rows: the ``COLUMNS`` as arrays # each [b]
          features: the recognizer's features (embedding detector) # [b, d], or None.
        """
        b = len(rows["idx"])
        now = time.time()
        blobs = (
            [np.asarray(f, np.float32).tobytes() for f in features]
            if features is not None
            else [None] * b
        )
        data = list(
            zip(
                np.asarray(rows["idx"]).tolist(),
                [cid] * b,
                _signed(rows["hash"]),
                _signed(rows["token"]),
                np.asarray(rows["true_label"]).tolist(),
                np.asarray(rows["answer"]).tolist(),
                np.asarray(rows["altered"], int).tolist(),
                np.asarray(rows["duplicate"], int).tolist(),
                [now] * b,
                blobs,
                strict=True,
            )
        )
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO clients (name, created) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (client, now),
                )
                self._db.execute(
                    "UPDATE clients SET cid = ? WHERE name = ? AND cid IS NULL", (cid, client)
                )
                self._db.executemany(
                    f"INSERT INTO queries ({', '.join(COLUMNS)}, time, features) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    data,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def history(self, *, features: bool = False) -> dict[str, np.ndarray]:
        """Every stored query in order, as the service's columns (``COLUMNS``, ``time``,
        ``client_names`` by cid, and ``features`` # [queries, d] if asked and stored)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(COLUMNS)}, time FROM queries ORDER BY idx"
            ).fetchall()
            names = self._db.execute(
                "SELECT cid, name FROM clients WHERE cid IS NOT NULL ORDER BY cid"
            ).fetchall()
            blobs = (
                self._db.execute("SELECT features FROM queries ORDER BY idx").fetchall()
                if features
                else []
            )
        cols = np.array(rows, np.int64).reshape(-1, len(COLUMNS) + 1) if rows else None
        out = {}
        for i, name in enumerate(COLUMNS):
            v = cols[:, i] if cols is not None else np.zeros(0, np.int64)
            out[name] = v.view(np.uint64) if name in ("hash", "token") else v
        out["time"] = np.array([r[-1] for r in rows], np.float64)
        out["client_names"] = np.array([n for _, n in names], dtype=object)
        if [c for c, _ in names] != list(range(len(names))):
            raise JaxmiaError(f"service store {self.path}: client numbers are not 0..n-1")
        if features:
            out["features"] = (
                np.stack([np.frombuffer(b, np.float32) for (b,) in blobs if b is not None])
                if any(b is not None for (b,) in blobs)
                else np.zeros((0, 0), np.float32)
            )
        return out

    def records(self, client: str | None, *, after: int = -1, limit: int = 1000) -> list[dict]:
        """Stored queries after index ``after`` (all clients' if ``client`` is None), at most
        ``limit``, with everything stored but the features."""
        sql = (
            "SELECT q.idx, c.name, q.hash, q.true_label, q.answer, q.altered, q.duplicate, "
            "q.time FROM queries q JOIN clients c ON c.cid = q.cid WHERE q.idx > ?"
        )
        args: list = [after]
        if client is not None:
            sql += " AND c.name = ?"
            args.append(client)
        sql += " ORDER BY q.idx LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        keys = ("index", "client", "hash", "true_label", "answer", "altered", "duplicate", "time")
        out = []
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["hash"] = f"{d['hash'] & (2**64 - 1):016x}"
            d["altered"], d["duplicate"] = bool(d["altered"]), bool(d["duplicate"])
            out.append(d)
        return out

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM queries").fetchone()[0]
