"""Every Python block of README.md runs, in order, in one namespace: the documented
usage is the tested usage."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 2


def test_readme_python_blocks_run():
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(_blocks()):
        code = compile(block, f"README.md block {i}", "exec")
        exec(code, namespace)
    # what the blocks claim in their comments, checked once more from outside
    assert namespace["spec"].page_bytes() == 9_158_208
    stats = namespace["cache"].stats()
    assert stats["requests"] == 2 and stats["device_hit_tokens"] == 48
    engine = namespace["engine"]
    assert engine.idle and len(engine.done) == 3
    for c in engine.done.values():  # the engine's answers are the uncached answers
        want, _ = engine.uncached(c.prompt, 6)
        assert list(c.generated) == list(want)


def test_readme_setup_commands_are_the_main_job_and_ci_test_command():
    text = README.read_text()
    setup = re.search(r"## Set-up.*?```bash\n(.*?)```", text, flags=re.S).group(1).splitlines()
    assert len(setup) == 2
    assert setup[0].endswith("jaxhicache bench multiturn")
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert setup[1] in ci  # CI calls exactly the README's test command
