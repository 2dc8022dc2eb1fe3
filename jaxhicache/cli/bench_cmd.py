"""``jaxhicache bench multiturn``: the main job (``models/multiturn.py``, imported
lazily: the one place in ``jaxhicache`` that reaches into ``models``). Validates
every argument first (one-line errors), runs the job, prints its table, the files
it wrote and one JSON line."""

from __future__ import annotations

import dataclasses
import json

from jaxhicache import compile_cache
from jaxhicache.cli.common import ENUM_CHOICES, CliError, count, one_line, ratio, seed
from jaxhicache.cli.storage_cmd import open_store, store_usage

__all__ = ["MODEL_PRESETS", "add_parser", "run"]

# the values of models.multiturn_presets.ModelPreset (kept here so that building the
# parser imports no model code; tests/test_cli.py checks they agree)
MODEL_PRESETS = ("bench", "small", "tiny", "mla", "mla-tiny", "hybrid", "hybrid-tiny")


def run(args) -> int:
    """Validates everything (one-line errors), then runs the job and prints its table.

    The workload is the preset's (``--model``: a family and size, else ``small``
    with ``--quick`` and ``bench`` without), with each workload flag given
    overriding its field. After
    the table it prints the files written (with ``--out``) and one JSON summary
    line. The store, if any, is closed however the job ends.

    Args:
      args: the parsed ``bench multiturn`` arguments.

    Returns:
      0.

    Raises:
      CliError: an argument the job's configuration or ``--compile-cache``
        refuses (the ``ValueError``'s message on one line), or a ``--store``
        that cannot be opened.
    """
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
            store_latency_ms=args.store_latency_ms,
            l3_cost_model=not args.no_l3_cost_model,
            l3_pages_per_object=args.l3_pages_per_object,
            probe_reps=args.probe_reps,
            out_dir=args.out,
            quick=args.quick,
            concurrency=args.concurrency,
            think_ms=args.think_ms,
            two_pass=args.two_pass,
        )
        mt.check(config)
        cache = compile_cache.cli_cache(args)  # JAX's persistent cache, on by default
        if args.store is not None:
            store = open_store(args.store)
    except ValueError as e:
        raise CliError(one_line(e)) from None
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


def add_parser(sub) -> None:
    """Adds the ``bench`` command (``bench multiturn``) to the top-level subparsers ``sub``.

    Args:
      sub: what ``add_subparsers`` returned for the top-level parser; the
        ``multiturn`` parser's ``run`` default is :func:`run`.
    """

    bench = sub.add_parser("bench", help="benchmarks (the main job: `bench multiturn`)")
    bsub = bench.add_subparsers(dest="bench", metavar="{multiturn}", required=True)
    m = bsub.add_parser(
        "multiturn",
        help="the main job: a multi-turn chat workload with the cache off, then on",
        description=(
            "Replays a synthetic multi-turn chat workload through a tiny model's serving "
            "loop (--model: the DSV4, MLA + DSA or recurrent hybrid family) twice (cache off, then on with device, host and L3 tiers), after warming every "
            "program shape up; prints a table and one JSON line, writes results.json and "
            "multiturn.png into --out."
        ),
    )
    m.add_argument(
        "--model",
        choices=MODEL_PRESETS,
        default=None,
        help="model preset: DSV4 bench (default), small (default with --quick), tiny; "
        "MLA + DSA mla, mla-tiny; recurrent hybrid hybrid, hybrid-tiny; the *tiny presets "
        "are the tests' models",
    )
    m.add_argument("--pp", type=count, default=1, help="pipeline stages (default 1)")
    m.add_argument("--tp", type=count, default=1, help="tensor-parallel size (default 1)")
    m.add_argument(
        "--device-pages",
        type=count,
        default=None,
        help="device (L1) pages (default: ~35%% of the working set)",
    )
    host = m.add_mutually_exclusive_group()
    host.add_argument(
        "--host-pages",
        type=count,
        default=None,
        help="host (L2) pages (default: ~70%% of the working set)",
    )
    host.add_argument(
        "--host-ratio", type=ratio, default=None, help="host pages as a multiple of device pages"
    )
    m.add_argument("--write-policy", choices=ENUM_CHOICES["write_policy"], default="write_through")
    m.add_argument("--prefetch-policy", choices=ENUM_CHOICES["prefetch_policy"], default="timeout")
    m.add_argument(
        "--store",
        default=None,
        help="L3: a directory (FileBackend) or a tensorstore kvstore JSON spec / URL "
        "(TensorStoreBackend); default: a temporary directory, removed afterwards",
    )
    m.add_argument(
        "--store-latency-ms",
        type=ratio,
        default=0.0,
        help="add this many ms to every L3 object request (an object store's round trip, "
        "simulated over --store; default 0)",
    )
    m.add_argument(
        "--l3-pages-per-object",
        type=count,
        default=None,
        help="full-space pages per L3 object (default: 256 tokens' worth on an s3, gcs or "
        "http store, else 1)",
    )
    m.add_argument(
        "--no-l3-cost-model",
        action="store_true",
        help="serve every L3 hit, even where the cost model estimates recomputing it is "
        "faster (StorageConfig.cost_model=False)",
    )
    m.add_argument("--clients", type=count, default=None, help="concurrent conversations")
    m.add_argument("--turns", type=count, default=None, help="turns per conversation")
    m.add_argument("--system-prompts", type=count, default=None, help="distinct system prompts")
    m.add_argument("--system-prompt-len", type=count, default=None, help="tokens per system prompt")
    m.add_argument("--user-tokens", type=count, default=None, help="mean user tokens per turn")
    m.add_argument("--gen-tokens", type=count, default=None, help="mean generated tokens per turn")
    m.add_argument("--seed", type=seed, default=0, help="workload seed (default 0)")
    m.add_argument("--probe-reps", type=count, default=3, help="L3 probes (one client each)")
    m.add_argument(
        "--out", default="multiturn_out", help="output directory (default ./multiturn_out)"
    )
    m.add_argument(
        "--quick", action="store_true", help="small model, 3 clients x 3 turns (about a minute)"
    )
    m.add_argument(
        "--concurrency",
        type=count,
        default=None,
        help="clients in flight at once "
        "(continuous-batching engine; default: one request after another)",
    )
    m.add_argument(
        "--think-ms",
        type=ratio,
        default=0.0,
        help="with --concurrency: pause between a client's answer and its next turn (ms)",
    )
    m.add_argument(
        "--two-pass",
        action="store_true",
        help="after the cache-on pass, flush device and host (L3 kept) and serve the same "
        "traffic again: L3 hit fraction, TTFT vs cache off, tokens vs cache off",
    )
    m.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    compile_cache.add_cli_flags(m)
    m.set_defaults(run=run)
