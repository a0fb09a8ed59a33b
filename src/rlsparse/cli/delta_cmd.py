"""``rlsparse delta pack | apply | inspect``: parse, validate, one library call, print."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("delta", help="lossless sparse patches: pack a finetune against its base, apply, inspect",
                       description="Ship a finetuned model as a small lossless patch against its base.")
    dsub = p.add_subparsers(dest="delta_command", metavar="ACTION")
    dsub.required = True

    pk = dsub.add_parser("pack", help="write the patch that turns BASE into FINETUNED",
                         description="Code every changed element of FINETUNED against BASE (lossless, streaming).")
    pk.add_argument("base", help="base checkpoint: HF folder, .safetensors/.bin file")
    pk.add_argument("finetuned", help="finetuned checkpoint")
    pk.add_argument("-o", "--output", required=True, metavar="PATCH", help="patch file (or folder of shards) to write")
    pk.add_argument("--overwrite", action="store_true", help="replace an existing PATCH")
    pk.add_argument("--no-files", action="store_true", help="do not copy config/tokenizer files into the patch")
    pk.add_argument("--shard-size", default="5GB",
                    help="a patch with more coded data than this is written as a folder of shards (an index and "
                         "patch-0000k-of-0000N.rlpatch), e.g. 2GB; 0: always one file (default: %(default)s)")
    pk.add_argument("--workers", type=int, default=2, help="coding processes or threads (default: %(default)s)")
    pk.add_argument("--parallel", choices=("auto", "threads", "processes"), default="auto",
                    help="code in forked processes (one core each), in threads (one GIL: faster only for small "
                         "models) or auto: processes from 64 MiB of checkpoint up (default: %(default)s)")
    pk.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    pk.add_argument("--chunk-elements", type=int, default=None, help=argparse_suppress())
    pk.set_defaults(func=run_pack)

    ap = dsub.add_parser("apply", help="rebuild the finetuned model from BASE and PATCH",
                         description="Write BASE + PATCH as a Hugging Face folder, bit-identical to the finetuned model.")
    ap.add_argument("base", help="the base checkpoint the patch was packed against")
    ap.add_argument("patch", help="patch file (or folder of shards) from `rlsparse delta pack`")
    ap.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (must not exist)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT once the new one is complete")
    ap.add_argument("--max-shard-size", default="5GB", help="largest weight shard, e.g. 500MB (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="decoding processes or threads (default: %(default)s)")
    ap.add_argument("--parallel", choices=("auto", "threads", "processes"), default="auto",
                    help="decode in forked processes (one core each), in threads (one GIL: faster only for small "
                         "models) or auto: processes from 64 MiB of checkpoint up (default: %(default)s)")
    ap.add_argument("--writes", choices=("auto", "direct", "cached"), default="auto",
                    help="write the weights' whole pages with O_DIRECT (no page-cache copy), through the page "
                         "cache, or auto: O_DIRECT from 512 MiB of weights up (default: %(default)s)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    ap.set_defaults(func=run_apply)

    ins = dsub.add_parser("inspect", help="what a patch holds: per tensor encoding, density, bytes")
    ins.add_argument("patch", help="patch file or folder of shards")
    ins.add_argument("--json", nargs="?", const="-", metavar="PATH", help="print (or write to PATH) versioned JSON")
    ins.add_argument("--all", action="store_true", help="list every tensor (default: the 20 largest)")
    ins.set_defaults(func=run_inspect)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def _size(text: str, flag: str = "--max-shard-size") -> int:
    from rlsparse.errors import UsageError

    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * f)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a size such as 500MB or 5GB") from None


def _workers(n: int) -> None:
    from rlsparse.errors import UsageError

    if n < 1:
        raise UsageError(f"--workers {n}: expected at least 1")


def run_pack(args) -> int:
    from pathlib import Path

    import rlsparse.delta
    from rlsparse.errors import OutputError, UsageError

    _workers(args.workers)
    if Path(args.output).exists() and not args.overwrite:
        raise OutputError(f"{args.output}: already exists; choose another path or pass --overwrite")
    kwargs = {}
    if args.chunk_elements is not None:
        if args.chunk_elements < 8:
            raise UsageError("--chunk-elements must be at least 8")
        kwargs["chunk_elements"] = args.chunk_elements
    shard_bytes = _size(args.shard_size, "--shard-size")
    if shard_bytes < 0:
        raise UsageError(f"--shard-size {args.shard_size}: expected a size of at least 0")
    res = rlsparse.delta.pack(args.base, args.finetuned, args.output, workers=args.workers, files=not args.no_files,
                              progress=not args.quiet and sys.stderr.isatty(), shard_bytes=shard_bytes or None,
                              parallel=args.parallel, **kwargs)
    if not args.quiet:
        full = res.manifest.stats["finetuned_bytes"]
        density = res.changed / res.numel if res.numel else 0.0
        form = "" if res.path is None or not res.path.is_dir() else \
            f" (a folder of {sum(1 for p in res.path.glob('patch-*.rlpatch'))} shards)"
        print(f"wrote {args.output}{form}: {res.patch_bytes:,} bytes ({full / max(res.patch_bytes, 1):.1f}x smaller than "
              f"the {full:,}-byte weights); {res.changed:,} of {res.numel:,} elements changed ({density:.3%}); "
              f"{res.seconds:.1f} s")
    return 0


def run_apply(args) -> int:
    import rlsparse.delta

    _workers(args.workers)
    res = rlsparse.delta.apply(args.base, args.patch, args.output, overwrite=args.overwrite,
                               max_shard_bytes=_size(args.max_shard_size), workers=args.workers,
                               progress=not args.quiet and sys.stderr.isatty(), parallel=args.parallel,
                               direct={"auto": None, "direct": True, "cached": False}[args.writes])
    if not args.quiet:
        print(f"wrote {res.path}: {res.tensors} tensors, {res.bytes_written:,} bytes in {res.shards} shard(s), "
              f"every hash verified{', written with O_DIRECT' if res.direct else ''}; {res.seconds:.1f} s")
    return 0


def run_inspect(args) -> int:
    import json

    import rlsparse.delta

    doc = rlsparse.delta.inspect(args.patch)
    if args.json == "-":
        print(json.dumps(doc, indent=2))
        return 0
    if args.json:
        from rlsparse.io.atomic import write_json

        write_json(args.json, doc)
    _table(doc, show_all=args.all)
    return 0


def _table(doc: dict, show_all: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    tot = doc["total"]
    tensors = sorted(doc["tensors"], key=lambda t: -t["bytes"])
    shown = tensors if show_all else tensors[:20]
    table = Table(title=f"{doc['patch']['path']}: {len(tensors)} tensors"
                        + ("" if show_all or len(tensors) <= 20 else " (20 largest; --all for every one)"))
    for col in ("tensor", "action", "dtype", "shape", "density", "bytes", "bits/changed", "encodings"):
        table.add_column(col, justify="left" if col in ("tensor", "action", "dtype", "encodings") else "right")
    for t in shown:
        table.add_row(t["name"], t["action"], str(t["dtype"]), "x".join(map(str, t["shape"] or [])) or "scalar",
                      "" if t["density"] is None else f"{t['density']:.3%}", f"{t['bytes']:,}",
                      "" if t["bits_per_changed"] is None else f"{t['bits_per_changed']:.2f}",
                      ", ".join(f"{k} x{v}" for k, v in t["encodings"].items()))
    console.print(table)
    density = "n/a" if tot["density"] is None else f"{tot['density']:.3%}"
    ratio = "n/a" if not tot["ratio"] else f"{tot['ratio']:.1f}x"
    console.print(f"changed {tot['changed']:,} of {tot['numel']:,} elements ({density}); coded {tot['coded_bytes']:,} "
                  f"bytes + {tot['file_bytes']:,} bytes of files; weights {tot['finetuned_bytes']:,} bytes ({ratio} "
                  f"smaller); actions {tot['actions']}")
    for f in doc["files"]:
        console.print(f"file {f['name']}: {f['size']:,} bytes (stored {f['stored']:,})")
