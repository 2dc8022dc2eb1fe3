"""The command-line main job on its default and with bad input."""

import json
import subprocess
import sys

from jaxhicache.cli import main


def test_cli_default_prints_flash_stage_maps(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    info = json.loads(out.strip().splitlines()[-1])
    assert info["model"] == "deepseek-v4-flash" and info["pp"] == 2
    assert info["page_bytes"] == 9_158_208
    assert [s["layers"] for s in info["stages"]] == [[0, 21], [21, 43]]
    assert info["stages"][1]["c4_state_global_ids"] == list(range(22, 43, 2))
    assert sum(s["page_bytes"] for s in info["stages"]) == 9_158_208


def test_cli_partition_and_errors(capsys):
    assert main(["--pp", "4", "--partition", "11,11,11,10", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in info["stages"]] == [[0, 11], [11, 22], [22, 33], [33, 43]]
    assert main(["--pp", "4", "--partition", "11,11,11,11"]) == 2
    assert "sums to 44" in capsys.readouterr().err
    assert main(["--pp", "0"]) == 2


def test_module_entry_point_runs():
    r = subprocess.run(
        [sys.executable, "-m", "jaxhicache", "--model", "mini", "--pp", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(r.stdout)["pp"] == 3
