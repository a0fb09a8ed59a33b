"""``rlsparse.diff``: which parameters finetuning changed."""

from __future__ import annotations

import os
from typing import Sequence

from rlsparse.errors import UsageError
from rlsparse.io import dtypes
from rlsparse.io.atomic import check_writable
from rlsparse.diff.tolerance import DEFAULT_TOLERANCES, PAPER_TOLERANCE, parse_tolerances
from rlsparse.io.checkpoint import Checkpoint



def diff(base: str | os.PathLike | Checkpoint, finetuned: str | os.PathLike | Checkpoint, *,
         tolerances: Sequence[float | str] = DEFAULT_TOLERANCES, mask_path: str | os.PathLike | None = None,
         mask_tolerance: float | str = PAPER_TOLERANCE, allow_missing: bool = False, allow_resize: bool = False,
         compare_dtype: str | None = None, progress: bool = False, chunk_elements: int | None = None,
         ray: str | None = None):
    """Count, per tensor and in aggregate, the elements that changed between two checkpoints.

    Streams both checkpoints chunk by chunk (bounded memory), counting changes at every
    tolerance in one pass, and optionally writes the subnetwork mask (changed at
    ``mask_tolerance``) in the rlsparse mask format.

    Args:
        base: The checkpoint before finetuning (folder, file, hub id or opened Checkpoint).
        finetuned: The checkpoint after finetuning.
        tolerances: ``|new - old| > t`` counts as changed; numbers or strings. Results are keyed
            canonically ("1e-05" for 1e-5 or "1e-5") and answer to any spelling. 0 means value
            inequality.
        mask_path: Where to write the mask (atomically); None for no mask.
        mask_tolerance: The tolerance that defines the mask (added to the sweep if absent).
        allow_missing: Compare the common tensors when the sets differ (else MismatchError).
        allow_resize: Compare the common leading rows when dim 0 differs (resized vocabulary).
        compare_dtype: Cast both sides to this dtype (e.g. "bf16") before comparing.
        progress: Show a progress bar with bytes/s and ETA on stderr.
        chunk_elements: Elements per chunk (memory bound); default 1M.
        ray: Run on a Ray cluster at this address ("local": this machine's cluster, started if
            none runs); workers read the checkpoints from the same paths. The result and the
            mask file are bit-identical to a local run. None runs here.

    Returns:
        DiffResult.

    Example:
        >>> r = rlsparse.diff("sft", "dpo", mask_path="dpo.mask.safetensors")
        >>> print(f"{r.total.sparsity(1e-5):.1%}")
    """
    from rlsparse.diff.distributed import ray_runner
    from rlsparse.diff.engine import DEFAULT_CHUNK_ELEMENTS, run
    from rlsparse.diff.plan import plan as make_plan
    from rlsparse.diff.result import DiffResult
    from rlsparse.report.progress import progress_bar

    labels, values = parse_tolerances(tolerances, "tolerances")
    mask_label, mask_value = parse_tolerances([mask_tolerance], "mask_tolerance")
    if mask_path is not None:
        check_writable(mask_path)
        if mask_value[0] not in values:
            labels.append(mask_label[0])
            values.append(mask_value[0])
    code = None
    if compare_dtype is not None:
        try:
            code = dtypes.parse_user_dtype(compare_dtype)
        except ValueError:
            raise UsageError(f"compare_dtype={compare_dtype!r} is not a float dtype; use bf16, fp16 or fp32") from None
    a = base if isinstance(base, Checkpoint) else Checkpoint.open(base)
    b = finetuned if isinstance(finetuned, Checkpoint) else Checkpoint.open(finetuned)
    p = make_plan(a, b, allow_missing=allow_missing, allow_resize=allow_resize, compare_dtype=compare_dtype)
    with progress_bar(p.bytes_to_read, "diff", enabled=progress) as advance:
        stats, nbytes, elapsed = run(
            p, values, labels, mask_path=mask_path, mask_tolerance=mask_value[0] if mask_path else None,
            mask_meta={"base": a.source, "finetuned": b.source}, compare_dtype=code,
            chunk_elements=chunk_elements or DEFAULT_CHUNK_ELEMENTS, advance=advance,
            execute=None if ray is None else ray_runner(ray))
    inputs = {side: {"source": ck.source, "layout": ck.layout, "tensors": len(ck.tensors), "bytes": ck.total_bytes,
                     "prefixes_stripped": p.prefixes.get(side, [])} for side, ck in (("base", a), ("finetuned", b))}
    options = {"mask_path": str(mask_path) if mask_path else None,
               "mask_tolerance": mask_label[0] if mask_path else None, "allow_missing": allow_missing,
               "allow_resize": allow_resize, "compare_dtype": code}
    return DiffResult(base=a.source, finetuned=b.source, labels=labels, tolerances=values, tensors=stats,
                      notes=p.notes, only_in_base=p.only_in_base, only_in_finetuned=p.only_in_finetuned,
                      inputs=inputs, options=options, elapsed_s=elapsed, bytes_read=nbytes)
