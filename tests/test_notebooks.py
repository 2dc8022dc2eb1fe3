"""The notebooks run top to bottom in a fresh ``python3`` kernel (nbclient; CPU, 8 fake
devices, matplotlib Agg) and print what they claim; the committed files carry no outputs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="the test extra: pip install -e '.[test]'")

DIR = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 300
KERNEL = "python3"


def _number(out: str, label: str) -> float:
    m = re.search(re.escape(label) + r"\s*([-+0-9.eE]+)", out)
    assert m, f"no {label!r} line in the notebook's output:\n{out}"
    return float(m.group(1))


def _check_stage_layer_maps(out: str) -> None:
    assert "page bytes (all layers): 9,158,208" in out
    assert _number(out, "stage maps checked:") == 1 + 2 + 4 + 8
    m = re.search(r"PP bug: wrong layer on (\d+) of (\d+) lookups on stages > 0", out)
    assert m, out
    wrong, total = map(int, m.groups())
    assert wrong == total > 0
    assert out.count("ValueError:") == 2  # both wrong-space ids refused


def _check_hierarchical_cache(out: str) -> None:
    m = re.search(r"hits per tier: device=(\d+) host=(\d+) storage=(\d+)", out)
    assert m, out
    assert all(int(n) > 0 for n in m.groups()), m.group(0)
    assert _number(out, "max |logit diff| vs recompute:") <= 1e-4
    assert _number(out, 'jaxhicache_cached_tokens_total{tier="storage"}') > 0


def _check_recurrent_states(out: str) -> None:
    m = re.search(r"hits per tier: device=(\d+) host=(\d+)", out)
    assert m, out
    assert all(int(n) > 0 for n in m.groups()), m.group(0)
    assert _number(out, "max |logit diff| vs recompute:") <= 1e-4
    assert "snapshot: 33,792 bytes, KV: 512 bytes per token" in out


CHECKS = {
    "01_stage_layer_maps.ipynb": _check_stage_layer_maps,
    "02_hierarchical_cache.ipynb": _check_hierarchical_cache,
    "03_recurrent_states.ipynb": _check_recurrent_states,
}


def _stdout(nb) -> str:
    return "".join(
        o.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if o.output_type == "stream" and o.name == "stdout"
    )


def test_every_notebook_is_checked():
    assert sorted(p.name for p in DIR.glob("*.ipynb")) == sorted(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cell"
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{name}: code cells {dirty} carry outputs (clear them before committing)"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs_top_to_bottom(name):
    nb = nbformat.read(DIR / name, as_version=4)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg"}
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(DIR)}},  # the kernel's working directory
    )
    client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback
    check = CHECKS[name]  # asserts on what the notebook printed
    check(_stdout(nb))
