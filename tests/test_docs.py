"""The docs name what exists: every `python -m MODULE` in README.md and docs/ is a module of this
repository (or pytest), every file path they give is there, and every `--mode` they pass to the
trainer is one of its modes. Cheap (no import, no process); the commands themselves are run by
the tests of each feature."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Named in docs/benchmarks.md for the numbers it measured before it was retired, and said so.
RETIRED = {"benchmarks.e2_step"}
PATH = re.compile(r"\b((?:e2_jax|tests|benchmarks|launch|configs)/[\w/.-]+\.(?:py|sh|sbatch|ipynb|txt))\b")


def _texts():
    return [(doc.relative_to(ROOT), doc.read_text()) for doc in DOCS]


def test_every_python_m_in_the_docs_is_a_module_here():
    missing = []
    for doc, text in _texts():
        for module in set(re.findall(r"python -m ([A-Za-z_][\w.]*\w)(?![.\w<])", text)):
            if module == "pytest" or module in RETIRED:
                continue
            base = ROOT / module.replace(".", "/")
            if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
                missing.append(f"{doc}: python -m {module}")
    assert not missing, missing
    assert all(f"benchmarks.{m.split('.')[1]}" in (ROOT / "docs" / "benchmarks.md").read_text() for m in RETIRED)


def test_every_path_in_the_docs_exists():
    missing = sorted({f"{doc}: {path}" for doc, text in _texts() for path in PATH.findall(text)
                      if not (ROOT / path).exists() and path.replace("benchmarks/", "benchmarks.")[:-3] not in RETIRED})
    assert not missing, missing


def test_the_trainers_modes_in_the_docs_are_its_modes():
    from e2_jax import main

    modes = {m for _, text in _texts() for m in re.findall(r"e2_jax\.main\b[^\n`]*--mode[= ](\w+)", text)}
    assert modes and modes <= set(main.MODES), modes - set(main.MODES)
