"""Library error messages name Python parameters (``allow_missing=True``); the CLI names its flags.

``as_flags`` rewrites the parameter spellings the library uses into the command's flags, so a
Python user reads ``pass allow_missing=True`` and a shell user reads ``pass --allow-missing``.
"""

from __future__ import annotations

import re

# parameter -> flag, where the flag is not simply the parameter with dashes
_RENAMED = {"mask_path": "--save-mask", "checkpoints": "--from-checkpoints"}
_PARAMS = ("allow_missing", "allow_resize", "compare_dtype", "tolerances", "tolerance", "mask_tolerance",
           "max_matrices", "include_embeddings", "layers", "device", "top_k", "rtol", "ray", "labels",
           "chunk_elements", "mask_path", "checkpoints")
_PATTERN = re.compile(r"(?<![\w-])(" + "|".join(sorted(_PARAMS, key=len, reverse=True)) + r")(=True\b|=|:)")


def flag(param: str) -> str:
    """The CLI flag of a library parameter."""
    return _RENAMED.get(param, "--" + param.replace("_", "-"))


def as_flags(message: str) -> str:
    """``message`` with ``param=True`` -> ``--param``, ``param=x`` -> ``--param x``, ``param:`` -> ``--param:``.

    Example:
        >>> as_flags("tensor sets differ; pass allow_missing=True to compare the common ones")
        'tensor sets differ; pass --allow-missing to compare the common ones'
    """
    def sub(m: re.Match) -> str:
        name, tail = m.group(1), m.group(2)
        if tail == "=True":
            return flag(name)
        return flag(name) + (" " if tail == "=" else ":")

    return _PATTERN.sub(sub, message)
