"""``jaxhicache storage ls|stats|clear --store SPEC``: what an L3 store holds, per
model / stage / page space; totals (``--verify`` reads and checks every object);
delete every jaxhicache object. ``open_store`` also opens ``bench multiturn --store``."""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.parse
from typing import final

from jaxhicache.cli.common import CliError, one_line

__all__ = ["StoredObject", "add_parser", "list_objects", "open_store", "run", "store_usage"]


def open_store(spec: str, *, must_exist: bool = False):
    """The L3 backend a ``--store`` value names.

    A JSON object (``{"driver": "file", "path": ...}``, ``{"driver": "s3", ...}``) or a
    kvstore URL (``memory://``, ``s3://bucket/prefix``) opens a ``TensorStoreBackend``;
    anything else is a directory for a ``FileBackend`` (``must_exist``: it must already
    be one, so that inspecting never creates it). ``CliError`` names the value otherwise.

    Args:
      spec: the ``--store`` text (surrounding whitespace ignored).
      must_exist: refuse a directory that does not exist (``storage``'s
        commands) instead of creating it (``bench multiturn``).

    Returns:
      The opened backend; the caller closes it.

    Raises:
      CliError: ``spec`` is empty; a kvstore spec without ``tensorstore``
        installed, or one that fails to open (bad JSON, unknown driver,
        unreachable store); a missing directory with ``must_exist``; or a
        directory that cannot be opened.
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
            raise CliError(f"--store {spec!r} cannot be opened: {one_line(e)}") from None
    if must_exist and not os.path.isdir(text):
        raise CliError(f"--store {spec!r}: no such directory")
    try:
        return FileBackend(text)
    except OSError as e:
        raise CliError(f"--store {spec!r} cannot be opened: {one_line(e)}") from None


@final
@dataclasses.dataclass(frozen=True)
class StoredObject:
    """One object of a store: its key (relative to the store root) and its size in bytes.

    Attributes:
      key: the object's key, ``/``-separated, starting ``jaxhicache/``.
      size: its length in bytes.
    """

    key: str
    size: int

    def group(self) -> tuple[str, ...]:
        """``(model id, format, layers, tp, unit)`` parsed from the key.

        The key shape is ``jaxhicache/<version>/<model>/<format>/layers-<a>-<b>
        [/tp-<r>-of-<n>]/<unit>/<xx>/<hash>`` (``jaxhicache/storage/README.md``).

        Returns:
          The model id (percent-decoded), the format segment, ``"<a>-<b>"``, the
          tp segment (``""`` without one) and the unit; ``("?", "?", "?", "",
          "?")`` for a key of another shape.
        """
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

    Args:
      backend: a ``FileBackend`` or ``TensorStoreBackend``.

    Returns:
      ``(objects sorted by key, stray)``: ``stray`` counts the ``*.tmp`` files a
      ``FileBackend`` left from interrupted writes (always 0 for a kvstore).

    Raises:
      CliError: ``backend`` is of another type.
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
    """What a store holds, in total and per namespace and unit.

    Args:
      backend: a ``FileBackend`` or ``TensorStoreBackend``.

    Returns:
      A dict with the keys ``objects``, ``bytes``, ``stray_tmp`` and ``groups``,
      a list of dicts with ``model``, ``format``, ``layers``, ``tp``, ``unit``,
      ``objects`` and ``bytes``, sorted by :meth:`StoredObject.group`.

    Raises:
      CliError: as :func:`list_objects` raises it.
    """
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


def run(args) -> int:
    """Runs ``jaxhicache storage ACTION``; returns the exit status.

    ``ls``: :func:`store_usage` (and, with ``--keys``, every key and size);
    ``stats``: totals per unit and model (``--verify``: every object read and
    checked); ``clear``: every object deleted, counted before and after. Each
    prints a table unless ``--json``, then one JSON line. The store is closed on
    every path.

    Args:
      args: the parsed ``storage`` arguments (``action``, ``store``, ``json``,
        and ``keys`` / ``verify`` for ``ls`` / ``stats``).

    Returns:
      0.

    Raises:
      CliError: the store cannot be opened (:func:`open_store` with
        ``must_exist``), or ``clear`` reports a failure.
    """
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


def add_parser(sub) -> None:
    """Adds the ``storage`` command to the top-level subparsers ``sub``.

    Args:
      sub: what ``add_subparsers`` returned for the top-level parser; each
        action's parser has :func:`run` as its ``run`` default.
    """

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
        a.set_defaults(run=run)
