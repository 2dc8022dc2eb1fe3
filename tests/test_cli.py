"""The command line: help, ``layer-map``, and one-line errors for bad arguments.

``bench multiturn`` end to end and ``storage`` on the store it wrote are in
``tests/test_multiturn.py``.
"""

import json
import os
import subprocess
import sys

import pytest

from jaxhicache.cli import main


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxhicache")
    for command in ("bench", "layer-map", "storage"):
        assert command in out
    assert "jaxhicache bench multiturn" in out


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["--help"], "usage: jaxhicache [-h]"),
        (["bench", "--help"], "usage: jaxhicache bench [-h]"),
        (["bench", "multiturn", "--help"], "usage: jaxhicache bench multiturn [-h]"),
        (["layer-map", "--help"], "usage: jaxhicache layer-map [-h]"),
        (["storage", "--help"], "usage: jaxhicache storage [-h]"),
        (["storage", "ls", "--help"], "usage: jaxhicache storage ls [-h]"),
        (["storage", "stats", "--help"], "usage: jaxhicache storage stats [-h]"),
        (["storage", "clear", "--help"], "usage: jaxhicache storage clear [-h]"),
    ],
)
def test_help_of_every_command(argv, usage, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(usage)


def test_multiturn_help_lists_its_options(capsys):
    assert main(["bench", "multiturn", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in (
        "--model", "--pp", "--tp", "--device-pages", "--host-pages", "--host-ratio",
        "--write-policy", "--prefetch-policy", "--store", "--clients", "--turns", "--seed",
        "--out", "--quick", "--two-pass",
    ):  # fmt: skip
        assert opt in out, opt


def test_layer_map_prints_flash_stage_maps(capsys):
    assert main(["layer-map"]) == 0
    out = capsys.readouterr().out
    assert "stage" in out.splitlines()[2]  # the table before the JSON line
    info = json.loads(out.strip().splitlines()[-1])
    assert info["model"] == "deepseek-v4-flash" and info["pp"] == 2
    assert info["page_bytes"] == 9_158_208
    assert [s["layers"] for s in info["stages"]] == [[0, 21], [21, 43]]
    assert info["stages"][1]["c4_state_global_ids"] == list(range(22, 43, 2))
    assert sum(s["page_bytes"] for s in info["stages"]) == 9_158_208


def test_layer_map_partition_and_errors(capsys):
    assert main(["layer-map", "--pp", "4", "--partition", "11,11,11,10", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in info["stages"]] == [[0, 11], [11, 22], [22, 33], [33, 43]]
    assert main(["layer-map", "--pp", "4", "--partition", "11,11,11,11"]) == 2
    err = capsys.readouterr().err
    assert "sums to 44" in err and len(err.strip().splitlines()) == 1


def _one_line_error(argv, capsys, *needles):
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("jaxhicache: error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["bench", "multiturn", "--model", "huge"], ["--model", "'huge'"]),
        (["bench", "multiturn", "--clients", "-1"], ["--clients", "'-1'"]),
        (["bench", "multiturn", "--turns", "0"], ["--turns", "'0'"]),
        (["bench", "multiturn", "--device-pages", "-4"], ["--device-pages", "'-4'"]),
        (["bench", "multiturn", "--host-ratio", "-2"], ["--host-ratio", "'-2'"]),
        (["bench", "multiturn", "--seed", "-3"], ["--seed", "'-3'"]),
        (["bench", "multiturn", "--write-policy", "sometimes"], ["'sometimes'"]),
        (["bench", "multiturn", "--host-pages", "4", "--host-ratio", "2"], ["--host-ratio"]),
        (["bench", "multiturn", "--two-pass", "--concurrency", "2"], ["--two-pass", "sequential"]),
        (["bench"], ["multiturn"]),
        (["layer-map", "--pp", "0"], ["--pp", "'0'"]),
        (["layer-map", "--partition", "a,b"], ["'a,b'"]),
        (["storage", "ls"], ["--store"]),
        (["frobnicate"], ["'frobnicate'"]),
    ],
)
def test_bad_arguments_end_with_one_line(argv, needles, capsys):
    _one_line_error(argv, capsys, *needles)


def test_pp_the_devices_cannot_host(capsys):
    # tests run on 8 CPU devices (conftest): 16 stages do not fit, and the tiny
    # model's 4 layers cannot be split over 8 stages
    _one_line_error(["bench", "multiturn", "--pp", "16"], capsys, "--pp 16", "8 cpu device")
    _one_line_error(["bench", "multiturn", "--pp", "4", "--tp", "4"], capsys, "16 devices")
    _one_line_error(["bench", "multiturn", "--model", "tiny", "--pp", "8"], capsys, "--pp 8")


def test_device_pages_too_small_for_the_workload(capsys):
    _one_line_error(
        ["bench", "multiturn", "--model", "tiny", "--device-pages", "3"], capsys, "device_pages=3"
    )


def test_stores_that_cannot_be_opened(tmp_path, capsys):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    _one_line_error(
        ["bench", "multiturn", "--model", "tiny", "--store", str(a_file)], capsys, str(a_file)
    )
    bad_driver = '{"driver": "no-such-driver"}'
    _one_line_error(["bench", "multiturn", "--store", bad_driver], capsys, "no-such-driver")
    _one_line_error(["bench", "multiturn", "--store", '{"driver": '], capsys, "JSON")
    missing = str(tmp_path / "missing")
    for action in ("ls", "stats", "clear"):
        _one_line_error(["storage", action, "--store", missing], capsys, missing)
    assert not (tmp_path / "missing").exists()  # inspecting never creates a store


def test_open_store_picks_the_backend(tmp_path):
    from jaxhicache.cli import open_store
    from jaxhicache.storage import FileBackend, TensorStoreBackend

    with open_store(str(tmp_path / "a")) as a:
        assert type(a) is FileBackend and a.root == str(tmp_path / "a")
    spec = json.dumps({"driver": "file", "path": str(tmp_path / "b")})
    with open_store(spec) as b:
        assert type(b) is TensorStoreBackend and b.spec["driver"] == "file"
    with open_store("memory://") as c:
        assert type(c) is TensorStoreBackend and c.spec["driver"] == "memory"


def test_module_entry_point_help_and_layer_map():
    r = subprocess.run(
        [sys.executable, "-m", "jaxhicache", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert r.stdout.startswith("usage: jaxhicache") and "bench" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "jaxhicache", "layer-map", "--model", "mini", "--pp", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(r.stdout)["pp"] == 3
    r = subprocess.run(
        [sys.executable, "-m", "jaxhicache", "bench", "multiturn", "--clients", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "jaxhicache: error: argument --clients: must be a positive integer, got '0'"
    ]


def _bench_tiny(tmp_path, name, *flags, env=None):
    """``jaxhicache bench multiturn`` on the smallest workload, in a fresh process (so no
    program is already compiled in memory)."""
    out = tmp_path / name
    argv = [
        sys.executable, "-m", "jaxhicache", "bench", "multiturn", "--model", "tiny",
        "--clients", "1", "--turns", "1", "--probe-reps", "1", "--no-progress",
        "--out", str(out), *flags,
    ]  # fmt: skip
    run_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=run_env)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_bench_uses_a_persistent_compile_cache_unless_told_not_to(tmp_path):
    default = tmp_path / "default-cache"
    env = {"JAXHICACHE_COMPILE_CACHE_DIR": str(default)}
    off = _bench_tiny(tmp_path, "off", "--no-compile-cache", env=env)
    assert "compile cache: off" in off.splitlines()[0]
    assert not default.exists()  # nothing written anywhere we know of
    on = _bench_tiny(tmp_path, "on", env=env)
    assert on.splitlines()[0].startswith(f"compile cache: {default} ")
    entries = [n for n in os.listdir(default) if not n.startswith(".")]
    assert len(entries) >= 5, entries  # the job's programs
    json.loads(on.strip().splitlines()[-1])  # the job's JSON line is still last


def test_compile_cache_flags_exclude_each_other_and_check_the_path(tmp_path, capsys):
    assert main(["bench", "multiturn", "--compile-cache", "x", "--no-compile-cache"]) == 2
    assert "--no-compile-cache" in capsys.readouterr().err
    a_file = tmp_path / "f"
    a_file.write_text("x")
    argv = ["bench", "multiturn", "--model", "tiny", "--clients", "1", "--turns", "1"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--compile-cache", str(a_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxhicache: error: --compile-cache") and str(a_file) in err


def test_bench_model_choices_are_the_presets():
    """``--model``'s choices (kept in the CLI so its parser imports no model code) are
    the job's presets, every family included."""
    from jaxhicache.cli.bench_cmd import MODEL_PRESETS
    from models.multiturn_presets import ModelPreset

    assert tuple(p.value for p in ModelPreset) == MODEL_PRESETS
    assert {"mla", "mla-tiny", "hybrid", "hybrid-tiny"} <= set(MODEL_PRESETS)
