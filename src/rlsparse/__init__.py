"""rlsparse: measure, compare, train and ship the sparse subnetworks that RL finetuning updates."""

from __future__ import annotations

__version__ = "0.1.0"
