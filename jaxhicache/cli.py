"""Command line: ``jaxhicache`` (or ``python -m jaxhicache``).

Subcommands::

    jaxhicache bench multiturn [...]        the main job: a multi-turn chat workload served
                                            with the cache off, then on (device, host, L3);
                                            a table, results.json and a PNG (models/multiturn.py)
    jaxhicache layer-map [...]              stage layer maps and per-stage byte budgets
    jaxhicache storage ls|stats|clear --store SPEC
                                            what an L3 store holds, per model / stage /
                                            page space; totals (``--verify`` reads every
                                            object); delete every jaxhicache object

``jaxhicache`` alone prints this help and exits 0. Bad arguments end with one line
``jaxhicache: error: ...`` on stderr naming the bad value and exit status 2.

The top of the import stack: the one place in ``jaxhicache`` that reaches into
``models``, lazily, inside ``bench multiturn``; the core library never imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import urllib.parse
from collections.abc import Sequence
from typing import NoReturn, final

from jaxhicache import compile_cache
from jaxhicache.layer_map import build_layer_maps
from jaxhicache.spec import ModelCacheSpec, PoolKind

__all__ = [
    "PRESETS",
    "StoredObject",
    "describe",
    "list_objects",
    "main",
    "open_store",
    "store_usage",
]

PRESETS = {
    "deepseek-v4-flash": ModelCacheSpec.deepseek_v4_flash,
    "tiny-faithful": lambda: ModelCacheSpec.tiny_dsv4(window=128, page_size=256, hca_ratio=128),
    "mini": ModelCacheSpec.tiny_dsv4,
}
"""Cache specs by ``--preset`` name: name -> a function returning the ModelCacheSpec."""

_ENUM_CHOICES = {
    "write_policy": ("write_through", "write_through_selective", "write_back"),
    "prefetch_policy": ("best_effort", "wait_complete", "timeout"),
}


class CliError(Exception):
    """A bad argument or an unusable input: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``jaxhicache: error: ...``."""

    def error(self, message: str) -> NoReturn:
        print(f"jaxhicache: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(lo: int, what: str):
    """An argparse type: an int ``>= lo``; the message names the bad text."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = lo - 1
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return n

    return parse


_count = _int_at_least(1, "a positive integer")
_seed = _int_at_least(0, "an integer >= 0")


def _ratio(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        r = float("nan")
    if not r > 0 or r == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return r


def _parse_partition(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise CliError(f"--partition must be comma-separated ints, got {text!r}") from None


# ------------------------------------------------------------------ layer-map
def describe(spec: ModelCacheSpec, pp: int, partition: Sequence[int] | None, pages: int) -> dict:
    """Stage maps and byte budgets as a JSON-friendly dict."""
    from jaxhicache.pools.device import device_bytes_per_stage

    maps = build_layer_maps(spec, pp, partition)
    swa_pages = pages  # one SWA page per full page is the upper bound
    dev = device_bytes_per_stage(spec, maps, pages, swa_pages, padded=True)
    stages = []
    for m, dev_bytes in zip(maps, dev, strict=True):
        stages.append(
            {
                "rank": m.pp_rank,
                "layers": [m.start_layer, m.end_layer],
                "layer_counts": {k.value: m.num_layers_of(k) for k in spec.kinds()},
                "c4_state_global_ids": (
                    m.subpool_to_global(PoolKind.C4_STATE).tolist()
                    if PoolKind.C4_STATE in spec.kinds()
                    else []
                ),
                "page_bytes": spec.page_bytes(m),
                "device_bytes_padded": dev_bytes,
            }
        )
    return {
        "model": spec.name,
        "pp": pp,
        "page_size": spec.page_size,
        "row_bytes": {k.value: spec.row_bytes(k) for k in spec.kinds()},
        "page_bytes": spec.page_bytes(),
        "pages": pages,
        "stages": stages,
    }


def _layer_map(args) -> int:
    try:
        info = describe(
            PRESETS[args.model](), args.pp, _parse_partition(args.partition), args.pages
        )
    except ValueError as e:
        raise CliError(str(e)) from None
    if not args.json:
        _print_layer_table(info)
    print(json.dumps(info))
    return 0


def _print_layer_table(info: dict) -> None:
    kinds = list(info["row_bytes"])
    print(
        f"{info['model']}  pp={info['pp']}  page={info['page_size']} tokens  "
        f"page bytes (all layers)={info['page_bytes']:,}"
    )
    print("row bytes per layer: " + ", ".join(f"{k}={v:,}" for k, v in info["row_bytes"].items()))
    head = f"{'stage':>5} {'layers':>10} " + " ".join(f"{k:>16}" for k in kinds)
    print(head + f" {'page bytes':>12} {'device GiB':>11}")
    for s in info["stages"]:
        counts = " ".join(f"{s['layer_counts'][k]:>16}" for k in kinds)
        rng = f"[{s['layers'][0]},{s['layers'][1]})"
        gib = s["device_bytes_padded"] / 2**30
        print(f"{s['rank']:>5} {rng:>10} {counts} {s['page_bytes']:>12,} {gib:>11.2f}")
    print(f"(device GiB for {info['pages']} full pages + {info['pages']} SWA pages, stage-padded)")


# -------------------------------------------------------------------- storage
def open_store(spec: str, *, must_exist: bool = False):
    """The L3 backend a ``--store`` value names.

    A JSON object (``{"driver": "file", "path": ...}``, ``{"driver": "s3", ...}``) or a
    kvstore URL (``memory://``, ``s3://bucket/prefix``) opens a ``TensorStoreBackend``;
    anything else is a directory for a ``FileBackend`` (``must_exist``: it must already
    be one, so that inspecting never creates it). ``CliError`` names the value otherwise.
    """
    from jaxhicache.storage import FileBackend

    text = spec.strip()
    if not text:
        raise CliError("--store is empty: give a directory or a tensorstore kvstore JSON spec")
    if text.startswith("{") or "://" in text:
        try:
            from jaxhicache.storage import TensorStoreBackend

            return TensorStoreBackend(text)
        except ImportError as e:
            raise CliError(f"--store {spec!r} needs tensorstore ({e})") from None
        except Exception as e:  # invalid JSON, unknown driver, unreachable store
            raise CliError(f"--store {spec!r} cannot be opened: {_one_line(e)}") from None
    if must_exist and not os.path.isdir(text):
        raise CliError(f"--store {spec!r}: no such directory")
    try:
        return FileBackend(text)
    except OSError as e:
        raise CliError(f"--store {spec!r} cannot be opened: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@final
@dataclasses.dataclass(frozen=True)
class StoredObject:
    """One object of a store: its key (relative to the store root) and its size in bytes."""

    key: str
    size: int

    def group(self) -> tuple[str, ...]:
        """``(model id, format, layers, tp, unit)`` parsed from the key (see
        ``jaxhicache/storage/README.md``); ``("?", ...)`` for a key of another shape."""
        parts = self.key.split("/")
        if len(parts) not in (8, 9) or parts[0] != "jaxhicache":
            return ("?", "?", "?", "", "?")
        model, fmt, layers = urllib.parse.unquote(parts[2]), parts[3], parts[4]
        tp = parts[5] if len(parts) == 9 else ""
        return (model, fmt, layers.removeprefix("layers-"), tp, parts[-3])


def list_objects(backend) -> tuple[list[StoredObject], int]:
    """Every object under ``jaxhicache/`` and the count of stray temporary files.

    ``FileBackend``: a walk of its directory; ``TensorStoreBackend``: the kvstore's
    ``list`` over the ``jaxhicache/`` range, then one read per object for its size.
    """
    from jaxhicache.storage import FileBackend, TensorStoreBackend

    if isinstance(backend, FileBackend):
        base = os.path.join(backend.root, "jaxhicache")
        out, stray = [], 0
        for d, _dirs, files in os.walk(base):
            for f in files:
                path = os.path.join(d, f)
                if f.endswith(".tmp"):
                    stray += 1
                    continue
                key = os.path.relpath(path, backend.root).replace(os.sep, "/")
                out.append(StoredObject(key, os.path.getsize(path)))
        return sorted(out, key=lambda o: o.key), stray
    if isinstance(backend, TensorStoreBackend):
        import tensorstore as ts

        kv = backend.kvstore
        sep = "/" if kv.path and not kv.path.endswith("/") else ""
        keys = kv.list(ts.KvStore.KeyRange(sep + "jaxhicache/", sep + "jaxhicache0")).result()
        reads = [(k, kv.read(k)) for k in keys]
        out = [
            StoredObject(k.decode()[len(sep) :], len(r.result().value))
            for k, r in reads
            if r.result().state == "value"
        ]
        return sorted(out, key=lambda o: o.key), 0
    raise CliError(f"cannot list a {type(backend).__name__}")


def store_usage(backend) -> dict:
    """``{objects, bytes, stray_tmp, groups: [{model, format, layers, tp, unit, objects, bytes}]}``."""
    objs, stray = list_objects(backend)
    groups: dict[tuple, list[int]] = {}
    for o in objs:
        g = groups.setdefault(o.group(), [0, 0])
        g[0] += 1
        g[1] += o.size
    names = ("model", "format", "layers", "tp", "unit")
    return {
        "objects": len(objs),
        "bytes": sum(o.size for o in objs),
        "stray_tmp": stray,
        "groups": [
            dict(zip(names, k, strict=True), objects=v[0], bytes=v[1])
            for k, v in sorted(groups.items())
        ],
    }


def _verify(backend, objs: list[StoredObject]) -> dict:
    """Reads every object and checks it (header, own key, length, checksum)."""
    from jaxhicache.storage import FileBackend
    from jaxhicache.storage.format import IntegrityError, decode

    bad: dict[str, int] = {}
    for o in objs:
        if isinstance(backend, FileBackend):
            with open(os.path.join(backend.root, o.key), "rb") as f:
                blob = f.read()
        else:
            kv = backend.kvstore
            sep = "/" if kv.path and not kv.path.endswith("/") else ""
            blob = kv.read(sep + o.key).result().value
        try:
            decode(o.key, blob)
        except IntegrityError as e:
            bad[e.reason] = bad.get(e.reason, 0) + 1
    return {"checked": len(objs), "ok": len(objs) - sum(bad.values()), "failed": bad}


def _storage(args) -> int:
    backend = open_store(args.store, must_exist=True)
    try:
        if args.action == "clear":
            before = store_usage(backend)
            if not backend.clear():
                raise CliError(f"--store {args.store!r}: clearing failed (see the store's errors)")
            after = store_usage(backend)
            out = {
                "store": args.store,
                "deleted_objects": before["objects"] - after["objects"],
                "deleted_bytes": before["bytes"] - after["bytes"],
                "objects_left": after["objects"],
            }
            if not args.json:
                print(
                    f"{args.store}: deleted {out['deleted_objects']:,} objects "
                    f"({out['deleted_bytes']:,} bytes); {out['objects_left']} left"
                )
            print(json.dumps(out))
            return 0
        usage = store_usage(backend)
        usage["store"] = args.store
        if args.action == "stats":
            models = sorted({g["model"] for g in usage["groups"]})
            stats = {
                "store": args.store,
                "objects": usage["objects"],
                "bytes": usage["bytes"],
                "stray_tmp": usage["stray_tmp"],
                "models": len(models),
                "namespaces": len(
                    {(g["model"], g["format"], g["layers"], g["tp"]) for g in usage["groups"]}
                ),
                "by_unit": _sum_by(usage["groups"], "unit"),
                "by_model": _sum_by(usage["groups"], "model"),
            }
            if args.verify:
                stats["verify"] = _verify(backend, list_objects(backend)[0])
            if not args.json:
                _print_stats(stats)
            print(json.dumps(stats))
            return 0
        if not args.json:
            _print_ls(usage)
            if args.keys:
                for o in list_objects(backend)[0]:
                    print(f"{o.size:>12,}  {o.key}")
        print(json.dumps(usage))
        return 0
    finally:
        backend.close()


def _sum_by(groups: list[dict], field: str) -> dict:
    out: dict[str, dict] = {}
    for g in groups:
        s = out.setdefault(g[field], {"objects": 0, "bytes": 0})
        s["objects"] += g["objects"]
        s["bytes"] += g["bytes"]
    return out


def _print_ls(usage: dict) -> None:
    print(f"{usage['store']}: {usage['objects']:,} objects, {usage['bytes']:,} bytes")
    head = f"{'model':<36} {'format':<28} {'layers':>8} {'tp':>8} {'unit':>5} {'objects':>9} {'bytes':>14}"
    print(head)
    for g in usage["groups"]:
        print(
            f"{g['model']:<36} {g['format']:<28} {g['layers']:>8} {g['tp'] or '-':>8} "
            f"{g['unit']:>5} {g['objects']:>9,} {g['bytes']:>14,}"
        )


def _print_stats(s: dict) -> None:
    print(
        f"{s['store']}: {s['objects']:,} objects, {s['bytes']:,} bytes, {s['models']} model ids, "
        f"{s['namespaces']} stage namespaces, {s['stray_tmp']} stray temporary files"
    )
    for unit, v in s["by_unit"].items():
        print(f"  unit {unit:<6} {v['objects']:>9,} objects {v['bytes']:>14,} bytes")
    if "verify" in s:
        v = s["verify"]
        print(f"  verified {v['checked']:,}: {v['ok']:,} ok, failed {v['failed'] or 'none'}")


# --------------------------------------------------------------------- bench
def _multiturn(args) -> int:
    """Validates everything (one-line errors), then runs the job and prints its table."""
    from jaxhicache.cache import PrefetchPolicy, WritePolicy
    from models import multiturn as mt

    preset = mt.ModelPreset(args.model or ("small" if args.quick else "bench"))
    base = preset.workload(args.seed, quick=args.quick)
    fields = (
        "clients",
        "turns",
        "system_prompts",
        "system_prompt_len",
        "user_tokens",
        "gen_tokens",
    )
    given = {f: vars(args)[f] for f in fields if vars(args)[f] is not None}
    store = None
    try:
        config = mt.MultiturnConfig(
            preset=preset,
            workload=dataclasses.replace(base, **given),
            pp=args.pp,
            tp=args.tp,
            device_pages=args.device_pages,
            host_pages=args.host_pages,
            host_ratio=args.host_ratio,
            write_policy=WritePolicy(args.write_policy),
            prefetch_policy=PrefetchPolicy(args.prefetch_policy),
            store=args.store,
            probe_reps=args.probe_reps,
            out_dir=args.out,
            quick=args.quick,
            concurrency=args.concurrency,
            think_ms=args.think_ms,
        )
        mt.check(config)
        cache = compile_cache.cli_cache(args)  # JAX's persistent cache, on by default
        if args.store is not None:
            store = open_store(args.store)
    except ValueError as e:
        raise CliError(_one_line(e)) from None
    try:
        with cache:
            results = mt.run_multiturn(
                config, store=store, progress=not args.no_progress, store_usage=store_usage
            )
    finally:
        if store is not None:
            store.close()
    print(mt.format_table(results))
    if args.out is not None:
        print(f"wrote {results['files']['results']} and {results['files']['plot']}")
    print(json.dumps(mt.summary(results)))
    return 0


# ---------------------------------------------------------------------- main
def _build_parser() -> _Parser:
    p = _Parser(
        prog="jaxhicache",
        description=(
            "jaxhicache: a hierarchical prefix KV cache (device / host / storage) for JAX "
            "serving.\n\nThe main job: `jaxhicache bench multiturn` (`--quick`: about a minute)."
        ),
        epilog="`jaxhicache` alone prints this help; `jaxhicache COMMAND --help` for each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="{bench,layer-map,storage}")

    bench = sub.add_parser("bench", help="benchmarks (the main job: `bench multiturn`)")
    bsub = bench.add_subparsers(dest="bench", metavar="{multiturn}", required=True)
    m = bsub.add_parser(
        "multiturn",
        help="the main job: a multi-turn chat workload with the cache off, then on",
        description=(
            "Replays a synthetic multi-turn chat workload through the tiny DSV4 model's serving "
            "loop twice (cache off, then on with device, host and L3 tiers), after warming every "
            "program shape up; prints a table and one JSON line, writes results.json and "
            "multiturn.png into --out."
        ),
    )
    m.add_argument(
        "--model",
        choices=("bench", "small", "tiny"),
        default=None,
        help="model preset (default bench; small with --quick; tiny: the tests' model)",
    )
    m.add_argument("--pp", type=_count, default=1, help="pipeline stages (default 1)")
    m.add_argument("--tp", type=_count, default=1, help="tensor-parallel size (default 1)")
    m.add_argument(
        "--device-pages",
        type=_count,
        default=None,
        help="device (L1) pages (default: ~35%% of the working set)",
    )
    host = m.add_mutually_exclusive_group()
    host.add_argument(
        "--host-pages",
        type=_count,
        default=None,
        help="host (L2) pages (default: ~70%% of the working set)",
    )
    host.add_argument(
        "--host-ratio", type=_ratio, default=None, help="host pages as a multiple of device pages"
    )
    m.add_argument("--write-policy", choices=_ENUM_CHOICES["write_policy"], default="write_through")
    m.add_argument("--prefetch-policy", choices=_ENUM_CHOICES["prefetch_policy"], default="timeout")
    m.add_argument(
        "--store",
        default=None,
        help="L3: a directory (FileBackend) or a tensorstore kvstore JSON spec / URL "
        "(TensorStoreBackend); default: a temporary directory, removed afterwards",
    )
    m.add_argument("--clients", type=_count, default=None, help="concurrent conversations")
    m.add_argument("--turns", type=_count, default=None, help="turns per conversation")
    m.add_argument("--system-prompts", type=_count, default=None, help="distinct system prompts")
    m.add_argument(
        "--system-prompt-len", type=_count, default=None, help="tokens per system prompt"
    )
    m.add_argument("--user-tokens", type=_count, default=None, help="mean user tokens per turn")
    m.add_argument("--gen-tokens", type=_count, default=None, help="mean generated tokens per turn")
    m.add_argument("--seed", type=_seed, default=0, help="workload seed (default 0)")
    m.add_argument("--probe-reps", type=_count, default=3, help="L3 probes (one client each)")
    m.add_argument(
        "--out", default="multiturn_out", help="output directory (default ./multiturn_out)"
    )
    m.add_argument(
        "--quick", action="store_true", help="small model, 3 clients x 3 turns (about a minute)"
    )
    m.add_argument(
        "--concurrency",
        type=_count,
        default=None,
        help="clients in flight at once "
        "(continuous-batching engine; default: one request after another)",
    )
    m.add_argument(
        "--think-ms",
        type=_ratio,
        default=0.0,
        help="with --concurrency: pause between a client's answer and its next turn (ms)",
    )
    m.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    compile_cache.add_cli_flags(m)
    m.set_defaults(run=_multiturn)

    lm = sub.add_parser(
        "layer-map",
        help="stage layer maps and per-stage pool byte budgets",
        description="Stage layer maps and per-stage device byte budgets of a model at a PP size.",
    )
    lm.add_argument("--model", choices=sorted(PRESETS), default="deepseek-v4-flash")
    lm.add_argument("--pp", type=_count, default=2, help="pipeline-parallel size (default 2)")
    lm.add_argument("--partition", default=None, help="explicit layers per stage, e.g. 10,11,11,11")
    lm.add_argument(
        "--pages", type=_count, default=1024, help="device pages to size the budget for"
    )
    lm.add_argument("--json", action="store_true", help="print one JSON object only")
    lm.set_defaults(run=_layer_map)

    st = sub.add_parser(
        "storage",
        help="inspect or clear an L3 store",
        description="Inspect (ls, stats) or clear an L3 store.",
    )
    ssub = st.add_subparsers(dest="action", metavar="{ls,stats,clear}", required=True)
    for name, text in (
        ("ls", "objects and bytes per model, format, stage layers and page space"),
        ("stats", "totals per page space and model (--verify: read and check every object)"),
        ("clear", "delete every jaxhicache object of the store"),
    ):
        a = ssub.add_parser(name, help=text, description=text)
        a.add_argument(
            "--store",
            required=True,
            help="a directory (FileBackend) or a tensorstore kvstore JSON spec / URL",
        )
        a.add_argument("--json", action="store_true", help="print one JSON object only")
        if name == "ls":
            a.add_argument("--keys", action="store_true", help="also list every object key")
        if name == "stats":
            a.add_argument("--verify", action="store_true", help="read and check every object")
        a.set_defaults(run=_storage)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jaxhicache`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2)
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except CliError as e:
        print(f"jaxhicache: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stdout = None
        return 0


if __name__ == "__main__":
    sys.exit(main())
