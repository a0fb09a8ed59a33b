"""Reading checkpoints: one index for every layout, one chunked reader, atomic writers."""

from rlsparse.io.checkpoint import Checkpoint, TensorInfo
from rlsparse.io.reader import TensorReader

__all__ = ["Checkpoint", "TensorInfo", "TensorReader"]
