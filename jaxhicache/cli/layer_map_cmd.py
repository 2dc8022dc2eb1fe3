"""``jaxhicache layer-map``: stage layer maps and per-stage pool byte budgets of a
cache spec preset at a PP size (a table, then one JSON line; ``--json``: the line only)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from jaxhicache.cli.common import CliError, count
from jaxhicache.layer_map import build_layer_maps
from jaxhicache.spec import KVFormat, ModelCacheSpec, PageSpace, PoolKind

__all__ = ["PRESETS", "add_parser", "describe", "run"]

PRESETS = {
    "deepseek-v4-flash": ModelCacheSpec.deepseek_v4_flash,
    "tiny-faithful": lambda: ModelCacheSpec.tiny_dsv4(window=128, page_size=256, hca_ratio=128),
    "mini": ModelCacheSpec.tiny_dsv4,
    "deepseek-v3.2": ModelCacheSpec.deepseek_v3_2,
    "deepseek-v3.2-fp8": lambda: ModelCacheSpec.deepseek_v3_2(KVFormat.FP8_MLA),
    "glm5": ModelCacheSpec.glm5,
    "glm5-fp8": lambda: ModelCacheSpec.glm5(KVFormat.FP8_MLA),
    "glm5.2": ModelCacheSpec.glm5_2,
    "glm5.2-fp8": lambda: ModelCacheSpec.glm5_2(KVFormat.FP8_MLA),
    "tiny-mla": ModelCacheSpec.tiny_mla,
    "qwen3-next-80b-a3b": ModelCacheSpec.qwen3_next_80b_a3b,
    "tiny-hybrid": ModelCacheSpec.tiny_hybrid,
}
"""Cache specs by ``--model`` name: name -> a function returning the ModelCacheSpec."""


def _parse_partition(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise CliError(f"--partition must be comma-separated ints, got {text!r}") from None


def describe(
    spec: ModelCacheSpec,
    pp: int,
    partition: Sequence[int] | None,
    pages: int,
    state_slots: int = 64,
) -> dict:
    """Stage maps and byte budgets as a JSON-friendly dict.

    The device budget assumes one SWA page per full page when the spec has SWA
    sub-pools (the upper bound) and counts the stage-padded allocation.

    Args:
      spec: the cache spec (a :data:`PRESETS` value called, or any spec).
      pp: pipeline stages.
      partition: layer count per stage, or ``None`` for the default split.
      pages: device full pages to size the budget for.
      state_slots: device snapshot slots to size the budget for (specs with
        recurrent states only).

    Returns:
      A dict with the keys ``model``, ``pp``, ``page_size``, ``row_bytes``
      (per kind), ``page_bytes``, ``kv_bytes_per_token``, ``snapshot_bytes``,
      ``pages``, ``swa_pages``, ``state_slots`` (0 for a spec without that
      space) and ``stages``, one dict per stage with ``rank``, ``layers``
      (``[start, end]``), ``layer_counts`` (per kind), ``c4_state_global_ids``,
      ``subpool_global_ids`` (global layers per kind, for the kinds only some
      of the stage's layers have), ``page_bytes``, ``kv_bytes_per_token``,
      ``snapshot_bytes`` and ``device_bytes_padded``. The byte figures are the
      whole model's at the top level, the stage's own layers' in a stage.

    Raises:
      ValueError: a bad ``pp``, ``partition`` or ``pages`` (from
        :func:`jaxhicache.layer_map.build_layer_maps` and
        :func:`jaxhicache.pools.device.device_bytes_per_stage`).
    """
    from jaxhicache.pools.device import device_bytes_per_stage

    maps = build_layer_maps(spec, pp, partition)
    # one SWA page per full page is the upper bound; MLA / MHA specs have no SWA pools
    swa_pages = pages if any(k.page_space is PageSpace.SWA for k in spec.kinds()) else 0
    slots = state_slots if any(k.page_space is PageSpace.STATE for k in spec.kinds()) else 0
    dev = device_bytes_per_stage(spec, maps, pages, swa_pages, slots, padded=True)
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
                # sub-pools some layers of the stage lack: their rows by global id
                "subpool_global_ids": {
                    k.value: m.subpool_to_global(k).tolist()
                    for k in spec.kinds()
                    if 0 < m.num_layers_of(k) < m.num_local_layers
                },
                "page_bytes": spec.page_bytes(m),
                "kv_bytes_per_token": spec.page_bytes(m) // spec.page_size,
                "snapshot_bytes": spec.snapshot_bytes(m),
                "device_bytes_padded": dev_bytes,
            }
        )
    return {
        "model": spec.name,
        "pp": pp,
        "page_size": spec.page_size,
        "row_bytes": {k.value: spec.row_bytes(k) for k in spec.kinds()},
        "page_bytes": spec.page_bytes(),
        "kv_bytes_per_token": spec.page_bytes() // spec.page_size,
        "snapshot_bytes": spec.snapshot_bytes(),
        "pages": pages,
        "swa_pages": swa_pages,
        "state_slots": slots,
        "stages": stages,
    }


def run(args) -> int:
    """Runs ``jaxhicache layer-map``; returns the exit status.

    Prints the table (unless ``--json``), then :func:`describe`'s dict as one
    JSON line.

    Args:
      args: the parsed ``layer-map`` arguments (``model``, ``pp``,
        ``partition``, ``pages``, ``json``).

    Returns:
      0.

    Raises:
      CliError: ``--partition`` is not comma-separated integers, or the maps
        cannot be built (the ``ValueError``'s message).
    """
    try:
        info = describe(
            PRESETS[args.model](),
            args.pp,
            _parse_partition(args.partition),
            args.pages,
            args.state_slots,
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
    swa = f" + {info['swa_pages']} SWA pages" if info["swa_pages"] else ""
    if info["snapshot_bytes"]:
        per = ", ".join(f"{s['snapshot_bytes']:,}" for s in info["stages"])
        print(
            f"KV bytes per token={info['kv_bytes_per_token']:,}  "
            f"state bytes per snapshot={info['snapshot_bytes']:,} (per stage: {per})"
        )
    slots = f" + {info['state_slots']} snapshot slots" if info["state_slots"] else ""
    print(f"(device GiB for {info['pages']} full pages{swa}{slots}, stage-padded)")
    for s in info["stages"]:
        for kind, ids in s["subpool_global_ids"].items():
            print(f"stage {s['rank']} {kind} rows hold global layers {ids}")


def add_parser(sub) -> None:
    """Adds the ``layer-map`` command to the top-level subparsers ``sub``.

    Args:
      sub: what ``add_subparsers`` returned for the top-level parser; the new
        parser's ``run`` default is :func:`run`.
    """

    lm = sub.add_parser(
        "layer-map",
        help="stage layer maps and per-stage pool byte budgets",
        description="Stage layer maps and per-stage device byte budgets of a model at a PP size.",
    )
    lm.add_argument("--model", choices=sorted(PRESETS), default="deepseek-v4-flash")
    lm.add_argument("--pp", type=count, default=2, help="pipeline-parallel size (default 2)")
    lm.add_argument("--partition", default=None, help="explicit layers per stage, e.g. 10,11,11,11")
    lm.add_argument("--pages", type=count, default=1024, help="device pages to size the budget for")
    lm.add_argument(
        "--state-slots",
        type=count,
        default=64,
        help="device snapshot slots to size the budget for (recurrent hybrids; default 64)",
    )
    lm.add_argument("--json", action="store_true", help="print one JSON object only")
    lm.set_defaults(run=run)
