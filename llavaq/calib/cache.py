"""The session cache: everything calibration learned, so exports never run the model again.

Layout (one directory per session)::

    <cache_dir>/<session_id>/
        manifest.json              identity (model fingerprint, calibration inputs, recipe), progress
        stage-<name>.safetensors   per layer: smoothing scales/shifts, observer states, input
                                   scale/offset per quantized Linear, float per-channel min/max and
                                   a sample of activation rows per Linear input
        streams/<n>/               hidden states after n layers, one file per sample and stream
                                   (only while incomplete: the resume point; see calib/streams.py)

Safetensors + JSON only, never pickle. Every file is written to a temporary name and renamed, so
an interrupted calibration leaves a consistent cache that resumes at the first unfinished layer.

Integrity: the manifest records the sha256 of every stage file (``files``) and of its own canonical JSON
(``checksum``); both are checked on every read, so a flipped bit, a stage file swapped with another or a
hand-edited manifest is refused in one line. ``weights_sha256`` is the full digest of every checkpoint byte
calibration read (:meth:`llavaq.model.checkpoint.Checkpoint.weights_sha256`): an export refuses a cache made
from other weights even where the sampled fingerprint agrees. One calibration writes a session at a time
(an advisory lock beside it, :mod:`llavaq.locks`, held from ``create_or_resume`` to ``release``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from llavaq import __version__, locks
from llavaq.errors import CacheError
from llavaq.files import atomic_save_tensors, atomic_write_bytes

CACHE_FORMAT = "llavaq-session-cache"
CACHE_VERSION = 2  # 2: checksums (files, checksum, weights_sha256)


def default_cache_dir() -> Path:
    env = os.environ.get("LLAVAQ_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llavaq"


def session_id(fingerprint: dict, samples_digest: str, calibration: dict) -> str:
    blob = json.dumps([fingerprint, samples_digest, calibration], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``checksum`` key."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class SessionCache:
    """A directory holding one calibration session."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._lock = ExitStack()
        #: set by the caller before a calibration: the full weights digest, recorded by :meth:`finish`
        self.weights_digest: Callable[[], str] | None = None

    def release(self) -> None:
        """Give up the writer's lock taken by :meth:`create_or_resume` (idempotent)."""
        self._lock.close()

    def __enter__(self) -> SessionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create_or_resume(cls, cache_dir: Path, identity: dict[str, Any]) -> SessionCache:
        sid = session_id(identity["fingerprint"], identity["calibration"]["samples_digest"],
                         identity["recipe_calibration"])
        path = Path(cache_dir) / sid
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create cache directory {path.parent} ({e.strerror})") from None
        lock = ExitStack()
        lock.enter_context(locks.exclusive(path, f"session cache {path}"))
        try:
            cache = cls._open_or_new(path, identity)
        except BaseException:
            lock.close()
            raise
        cache._lock = lock
        return cache

    @classmethod
    def _open_or_new(cls, path: Path, identity: dict[str, Any]) -> SessionCache:
        if (path / "manifest.json").exists():
            cache = cls.load(path)
            if cache.manifest.get("fingerprint") == identity["fingerprint"]:
                return cache
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create cache directory {path} ({e.strerror})") from None
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "llavaq_version": __version__,
            **identity,
            "stages_done": [],
            "files": {},
            "complete": False,
            "forward_passes": 0,
        }
        cache = cls(path, manifest)
        cache.save_manifest()
        return cache

    @classmethod
    def load(cls, path: str | Path) -> SessionCache:
        path = Path(path)
        mf = path / "manifest.json"
        if not path.exists():
            raise CacheError(f"cache {path} does not exist")
        if not mf.is_file():
            raise CacheError(f"{path} is not a llavaq session cache (no manifest.json)")
        try:
            manifest = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CacheError(f"{mf}: corrupted cache manifest; delete {path} and run calibrate again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            raise CacheError(f"{mf}: not a llavaq session cache manifest")
        if manifest.get("version") != CACHE_VERSION:
            raise CacheError(
                f"{mf}: cache format version {manifest.get('version')} (llavaq {manifest.get('llavaq_version')}) "
                f"is not supported by llavaq {__version__} (version {CACHE_VERSION}); delete {path} and run "
                "calibrate again"
            )
        if manifest.get("checksum") != manifest_checksum(manifest) or not isinstance(manifest.get("files"), dict):
            raise CacheError(f"{mf}: checksum mismatch (the manifest was edited or corrupted); delete {path} and "
                             "run calibrate again")
        return cls(path, manifest)

    # ------------------------------------------------------------------ identity checks
    def check_model(self, fingerprint: dict[str, str], model_path: Path) -> None:
        mine = self.manifest.get("fingerprint", {})
        for part, label in (("layout", "tensor names/shapes"), ("config", "config.json"), ("weights", "weights")):
            if mine.get(part) != fingerprint.get(part):
                raise CacheError(
                    f"cache {self.path} was made for another model ({label} differ from {model_path}; "
                    f"cache model: {self.manifest.get('model_path')}); run calibrate for this model and "
                    "export with the cache it prints"
                )

    def check_weights(self, weights_sha256: str, model_path: Path) -> None:
        """Refuse (one line) a cache calibrated on other weights: the full digest of every tensor byte."""
        mine = self.manifest.get("weights_sha256")
        if mine != weights_sha256:
            raise CacheError(
                f"cache {self.path} was made for another model (the weights of {model_path} differ from those "
                f"calibrated: sha256 {str(weights_sha256)[:16]} vs {str(mine)[:16]}); run calibrate for this model "
                "and export with the cache it prints"
            )

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    # ------------------------------------------------------------------ stages
    def stage_file(self, stage: str) -> Path:
        return self.path / f"stage-{stage}.safetensors"

    def write_stage(
        self,
        stage: str,
        tensors: dict[str, torch.Tensor],
        forward_passes: int,
        seal_streams: Callable[[int], None] | None = None,
    ) -> None:
        """Record a finished stage: its tensors, then the streams after it, then the manifest.

        The order makes every interruption safe: the manifest never lists a stage whose record or
        following streams are missing, and the sealed streams say which stage they follow
        (``seal_streams(stages_done)``), so a resume never feeds a layer the wrong hidden states.
        """
        digest = atomic_save_tensors(self.stage_file(stage), tensors)
        self.manifest.setdefault("files", {})[self.stage_file(stage).name] = digest
        if seal_streams is not None:
            seal_streams(len(self.manifest["stages_done"]) + (stage not in self.manifest["stages_done"]))
        if stage not in self.manifest["stages_done"]:
            self.manifest["stages_done"].append(stage)
        self.manifest["forward_passes"] = forward_passes
        self.save_manifest()

    def read_stage(self, stage: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        f = self.stage_file(stage)
        if stage not in self.manifest.get("stages_done", []):
            raise CacheError(f"cache {self.path} has no data for {stage}; run calibrate to complete it")
        if not f.is_file():
            raise CacheError(f"{f} is missing from the cache; delete {self.path} and run calibrate again")
        try:
            data = f.read_bytes()
        except OSError as e:
            raise CacheError(f"{f}: cannot read ({e.strerror}); delete {self.path} and run calibrate again") from None
        if hashlib.sha256(data).hexdigest() != self.manifest.get("files", {}).get(f.name):
            raise CacheError(f"{f}: corrupted cache file (sha256 differs from the manifest's: changed, truncated or "
                             f"swapped); delete {self.path} and run calibrate again")
        try:
            return load(data)
        except Exception:
            raise CacheError(f"{f}: corrupted cache file; delete {self.path} and run calibrate again") from None

    def finish(self, forward_passes: int) -> None:
        if self.weights_digest is not None:
            self.manifest["weights_sha256"] = self.weights_digest()
        self.manifest["complete"] = True
        self.manifest["forward_passes"] = forward_passes
        self.save_manifest()
        shutil.rmtree(self.path / "streams", ignore_errors=True)
        (self.path / "streams.safetensors").unlink(missing_ok=True)  # the single resume file of earlier versions

    def save_manifest(self) -> None:
        self.manifest["checksum"] = manifest_checksum(self.manifest)
        atomic_write_bytes(self.path / "manifest.json", json.dumps(self.manifest, indent=2).encode())
