"""Study storage: an optuna RDB storage with heartbeats, SQLite in the output folder by default.

Any optuna RDB URL (``postgresql://...``) lets workers on several machines share one study; each worker is an
ordinary process. Running trials write heartbeats; the next worker to start a trial marks a trial silent for
``heartbeat.grace`` seconds as failed, and ``RetryHeartbeatStaleTrialCallback`` enqueues its parameters again.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import sqlite3
import warnings
import zlib
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from quant.errors import InputError
from search.config import HeartbeatConfig


def _sqlite_connect(path: str) -> sqlite3.Connection:
    """WAL journal with synchronous=NORMAL: a killed process loses no committed trial (only a power cut could),
    readers do not block the writer, and a commit costs no fsync (10 ms each otherwise, ~20 per trial)."""
    connection = sqlite3.connect(path, timeout=60, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def database_url(url: str) -> str:
    """``postgresql://`` means psycopg (v3) to SQLAlchemy 2.1; use psycopg2 (the ``search`` extra) without it."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def shown_url(url: str) -> str:
    """The URL without its password (for logs and errors)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def open_storage(url: str, heartbeat: HeartbeatConfig) -> RDBStorage:
    """RDB storage with heartbeats and a retry of stale trials; creates the SQLite file's folder."""
    url = database_url(url)
    engine: dict[str, Any] = {"pool_pre_ping": True}
    path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else None
    if path is not None and path not in ("", ":memory:"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = {"creator": functools.partial(_sqlite_connect, path)}
    try:
        with warnings.catch_warnings():  # heartbeats and the retry callback are "experimental" since optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat.interval,
                grace_period=heartbeat.grace_seconds,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=heartbeat.max_retry),
            )
    except Exception as err:  # a bad URL, an unreachable server, a missing driver
        raise InputError(f"--storage {shown_url(url)!r}: {type(err).__name__}: {err}") from None


def worker_index(url: str, worker: int | None) -> int:
    """0 for a lone SQLite worker (deterministic); else distinct per process so workers sample differently."""
    if worker is not None:
        return worker
    if url.startswith("sqlite"):
        return 0
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 100_003
