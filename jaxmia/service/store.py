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
(``jaxmia.service.policy.Service``).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time
import unicodedata
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
# Client names: ASCII letters, digits and . _ @ + - after NFKC, so that no name hides control
# characters, a right-to-left override or a look-alike of another (Cyrillic "\u0430dmin").
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
MAX_BUDGET = 2**62  # SQLite integers are 64-bit; far beyond any real budget


class StoreError(JaxmiaError):
    """The store could not write or read (a full disk, a broken file): the service's fault,
    not the request's."""


def client_name(name: object) -> str:
    """A client name as stored: NFKC-normalised, checked against ``NAME``.

    Raises:
      JaxmiaError: not a string, or (after normalising) not 1 to 128 of ``[A-Za-z0-9._@+-]``
        starting with a letter or digit.
    """
    if not isinstance(name, str):
        raise JaxmiaError(f"client name: expected a string, got {type(name).__name__}")
    norm = unicodedata.normalize("NFKC", name)
    if not NAME.fullmatch(norm):
        raise JaxmiaError(
            f"client name {ascii(name)[:80]}: expected 1 to 128 of the characters "
            "A-Z a-z 0-9 . _ @ + - (starting with a letter or digit)"
        )
    return norm


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    return secrets.token_urlsafe(32)


def _signed(u: np.ndarray) -> list[int]:
    """uint64 as SQLite's signed 64-bit integers (the same bits)."""
    return np.asarray(u, np.uint64).view(np.int64).tolist()


class Store:
    """The SQLite store of one service (thread-safe: one connection behind a lock).

    The database and its WAL are created readable by their owner only (0600): they hold every
    query's true label. A write that fails raises ``StoreError`` naming SQLite's cause and
    leaves the store as it was.

    Args:
      path: the database file (created with its tables if absent).
      durable: fsync every transaction (``synchronous=FULL``) instead of at checkpoints.
    """

    def __init__(self, path: str | Path, *, durable: bool = False):
        self.path = Path(path)
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            # SQLite gives the -wal and -shm files the database's mode; older ones are narrowed.
            for p in (
                self.path,
                *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm")),
            ):
                if p.exists():
                    os.chmod(p, 0o600)
        except OSError as e:
            raise JaxmiaError(f"service store {self.path}: cannot create it ({e})") from None
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
        # Every key's account, in memory: the server checks a key on its event loop, which
        # must never wait for the lock while a batch is being written.
        self._keys = {
            h: (name, bool(a))
            for h, name, a in self._db.execute(
                "SELECT key_hash, name, admin FROM clients WHERE key_hash IS NOT NULL"
            )
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- accounts ------------------------------------------------------------------------------

    def add_client(self, name: str, *, budget: int | None = None, admin: bool = False) -> str:
        """Creates an account and returns its API key (shown once: only its hash is kept).

        Args:
          name: normalised by ``client_name``; a name that differs from a taken one only in
            case is taken.

        Raises:
          JaxmiaError: the name is taken or not a valid name, or the budget is not an integer
            in 0..2^62.
        """
        name = client_name(name)
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= MAX_BUDGET
        ):
            raise JaxmiaError(
                f"client budget: expected an integer in 0..2^62 (0: unlimited), got {budget!r}"
            )
        key = new_key()
        with self._lock:
            taken = self._db.execute(
                "SELECT name FROM clients WHERE lower(name) = lower(?)", (name,)
            ).fetchone()
            if taken is not None:
                raise JaxmiaError(f"client name {name!r}: already taken (as {taken[0]!r})")
            try:
                self._db.execute(
                    "INSERT INTO clients (name, key_hash, budget, admin, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (name, hash_key(key), budget, int(admin), time.time()),
                )
            except sqlite3.IntegrityError:
                raise JaxmiaError(f"client name {name!r}: already taken") from None
            except sqlite3.Error as e:
                raise StoreError(f"service store {self.path}: {e}") from None
            self._keys[hash_key(key)] = (name, admin)
        return key

    def client_for_key(self, key: str) -> tuple[str, bool] | None:
        """(name, admin) of the account with this API key, or None."""
        return self._keys.get(hash_key(key))

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
            try:
                self._db.execute("BEGIN IMMEDIATE")
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
            except BaseException as e:
                # SQLite has already rolled back after some errors (a full disk at COMMIT): a
                # second ROLLBACK would raise "cannot rollback" and hide the cause.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise StoreError(f"service store {self.path}: {e}") from None
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
