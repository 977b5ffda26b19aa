"""The README's Python snippets run, in order, as a user would paste them."""

import importlib.util
import os
import re
import textwrap
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
# Sections whose snippets need an optional extra: the module it provides.
NEEDS = {"## Quantized base (QLoRA)": "torchao"}


def snippets() -> list[tuple[str, str]]:
    """(the ``## `` section heading above it, code) for every Python snippet, in order."""
    text = README.read_text()
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        start = text.rfind("\n## ", 0, match.start()) + 1
        found.append((text[start : text.index("\n", start)], textwrap.dedent(match.group(1))))  # in a list: indented
    return found


def test_readme_snippets_run(tmp_path):
    blocks = snippets()
    assert len(blocks) >= 5 and set(NEEDS) <= {heading for heading, _ in blocks}
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for heading, block in blocks:
            if heading in NEEDS and importlib.util.find_spec(NEEDS[heading]) is None:
                continue  # the extra is not installed here (CI installs it)
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
        if torch.distributed.is_initialized():  # the FSDP2 snippet's one-process group
            torch.distributed.destroy_process_group()
    assert (tmp_path / "run.lora.safetensors").exists()


def test_readme_quick_start_is_two_commands():
    text = README.read_text()
    quick = re.search(r"## Quick start\n.*?```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(quick) == 2
    assert quick[0].endswith("python examples/train.py")
    assert quick[1].endswith("python -m pytest")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest\n" in ci and 'pip install --quiet -e ".[dev]"' in ci


def test_reliability_figures_are_the_test_suites():
    from test_bad_inputs import CASES
    from test_fuzz import MUTATIONS
    from test_kill import TRIALS
    from test_properties import MAX_EXAMPLES

    text = README.read_text()
    section = text[text.index("## Reliability and security") : text.index("## Hydra")]
    assert f"- {len(CASES)} bad inputs" in section
    assert f"- {MUTATIONS} random and structured mutations" in section
    assert f"- {TRIALS} trials of `kill -9`" in section
    assert f"over {MAX_EXAMPLES} random models each" in section


def test_communication_table_is_what_the_command_prints(capsys):
    from test_benchmarks import _load

    text = README.read_text()
    block = re.search(r"<!-- communication:start -->\n```text\n(.*?)```\n<!-- communication:end -->", text, re.S).group(1)
    _load("communication").main([])
    assert capsys.readouterr().out == block
