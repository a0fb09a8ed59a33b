"""The pre-registered verdict thresholds: one JSON file fixed before a sweep runs.

``preregistration.json`` (next to this module) holds the matched-gain level, the "learned"
threshold, the noise margins, the bootstrap settings and every verdict threshold. A run copies it
into ``run.json`` with its sha256, so a report always judges with the thresholds that were fixed
before its runs, and says so; recipes carry their own pre-registered ``conjecture_lr``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rlsparse.errors import UsageError

PREREGISTRATION_SCHEMA_VERSION = 1
_REQUIRED = ("learned_gain", "matched_gain", "gain_tolerance", "noise_margin", "nll_margin", "bootstrap")


@dataclass(frozen=True)
class Preregistration:
    """Thresholds fixed before the sweep, with where they came from.

    Attributes:
        values: The file's JSON object (thresholds by finding, see ``preregistration.json``).
        sha256: Hash of the file's bytes as registered.
        source: The file it was read from, or "run.json" when taken from a run's record.
    """

    values: dict
    sha256: str
    source: str

    def __getitem__(self, key: str):
        return self.values[key]

    def to_json(self) -> dict:
        return {"values": self.values, "sha256": self.sha256, "source": self.source}

    @classmethod
    def from_json(cls, data: dict) -> "Preregistration":
        return cls(data["values"], data["sha256"], "run.json")


def default_path() -> Path:
    """The built-in ``preregistration.json``."""
    return Path(str(resources.files("rlsparse.lab") / "preregistration.json"))


def load_preregistration(path: str | os.PathLike | None = None) -> Preregistration:
    """Read and check a pre-registration file (default: the built-in one).

    Example:
        >>> load_preregistration()["matched_gain"]
        0.1
    """
    p = Path(path) if path else default_path()
    try:
        raw = p.read_bytes()
        values = json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"pre-registration {p} cannot be read as JSON ({exc}); restore the file") from None
    missing = [k for k in _REQUIRED if k not in values]
    if missing or values.get("schema_version", 0) > PREREGISTRATION_SCHEMA_VERSION:
        raise UsageError(f"pre-registration {p}: missing {missing} or schema_version "
                         f"{values.get('schema_version')} newer than {PREREGISTRATION_SCHEMA_VERSION}; fix the file")
    return Preregistration(values, hashlib.sha256(raw).hexdigest(), str(p))


def for_run(run: dict) -> Preregistration:
    """The thresholds a run was registered with (its ``run.json``), else the built-in file."""
    rec = run.get("preregistration")
    return Preregistration.from_json(rec) if rec else load_preregistration()
