"""docs/papers.md (the four papers against the code) names only things that exist.

Every backticked module path (``nnunet_synth/...py``, a folder, ``docs/...md``) or dotted module name
(``nnunet_synth.x.y``), every backticked trainer class (``nnUNetTrainer...``, brace lists such as
``nnUNetTrainerSynth{2,5}SD`` expanded), every ``nnUNetv2_synth_*`` command and the long flags of a backticked
command line must exist in the repository, so that a rename cannot leave the page silently wrong. Files are read,
nothing is imported beyond the standard library: the test takes well under a second.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "papers.md"
PACKAGE = ROOT / "nnunet_synth"
PAPERS = ("Luna et al.", "SynBT", "Peng et al.", "Quinton et al.")
TABLE_HEADER = ("Element", "Paper", "Implementation", "Differences (reason)")

SPAN = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"(?<![\w./-])((?:nnunet_synth|docs|tests|benchmarks)/[\w./-]*)")
DOTTED = re.compile(r"(?<![\w./])nnunet_synth(?:\.\w+)+")
TRAINER = re.compile(r"\bnnUNetTrainer\w*")
COMMAND = re.compile(r"\bnnUNetv2_synth_\w+")
LONG_FLAG = re.compile(r"(?<!\S)(--[a-z][a-z0-9-]*)")
BRACES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@cache
def _spans() -> tuple[str, ...]:
    return tuple(SPAN.findall(_text(DOC)))


@cache
def _sources() -> dict[Path, str]:
    return {p: _text(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _expand(span: str) -> list[str]:
    """``a{1,2}b`` -> ``a1b``, ``a2b`` (nested and repeated lists too)."""
    match = BRACES.search(span)
    if match is None:
        return [span]
    head, tail = span[:match.start()], span[match.end():]
    return [e for choice in match.group(1).split(",") for e in _expand(head + choice.strip() + tail)]


@cache
def _package_classes() -> frozenset[str]:
    return frozenset(name for src in _sources().values() for name in re.findall(r"^class (\w+)", src, re.M))


@cache
def _exported_trainers() -> frozenset[str]:
    tree = ast.parse(_text(PACKAGE / "trainers" / "__init__.py"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return frozenset(ast.literal_eval(node.value))
    return frozenset()


@cache
def _nnunet_trainers() -> frozenset[str]:
    """Trainer classes of nnU-Net's own tree (found by reading its files; nnU-Net is not imported)."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    tree = Path(next(iter(spec.submodule_search_locations))) / "training" / "nnUNetTrainer"
    return frozenset(name for p in tree.rglob("*.py") for name in re.findall(r"^class (\w+)", _text(p), re.M))


@cache
def _scripts() -> frozenset[str]:
    text = _text(ROOT / "pyproject.toml")
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return frozenset(re.findall(r"^(\w+)\s*=", section, re.M))


def _module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _dotted_exists(dotted: str) -> bool:
    """``nnunet_synth.a.b`` is a module, or a module followed by names its source defines or re-exports."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module = _module_file(parts[:split])
        if module is not None:
            source = _text(module)
            return all(re.search(rf"\b{re.escape(name)}\b", source) for name in parts[split:])
    return False


def test_doc_has_one_table_per_paper():
    text = _text(DOC)
    sections = re.split(r"^## ", text, flags=re.M)
    header = "| " + " | ".join(TABLE_HEADER) + " |"
    for paper in PAPERS:
        found = [s for s in sections if s.startswith(paper) or s.split("\n", 1)[0].startswith(paper)]
        assert found, f"docs/papers.md has no '## {paper} ...' section"
        section = found[0]
        assert header in section, f"the {paper} section has no table with the columns {TABLE_HEADER}"
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
        body = rows[1:]
        assert len(body) >= 8, f"the {paper} table has only {len(body)} rows"
        for row in body:
            cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
            assert len(cells) == len(TABLE_HEADER) and all(cells), f"{paper}: malformed row {row[:80]!r}"


def test_cited_paths_exist():
    paths = {m.rstrip(".,;:") for span in _spans() for m in PATH.findall(span)}
    assert any(p.startswith("nnunet_synth/") for p in paths), "no module path found: did the parser break?"
    missing = sorted(p for p in paths if not (ROOT / p).exists() or (p.endswith("/") and not (ROOT / p).is_dir()))
    assert not missing, f"docs/papers.md cites paths that do not exist: {missing}"


def test_cited_dotted_modules_exist():
    names = {m for span in _spans() for m in DOTTED.findall(span)}
    missing = sorted(n for n in names if not _dotted_exists(n))
    assert not missing, f"docs/papers.md cites modules or names that do not exist: {missing}"


def test_cited_trainers_exist():
    names = {t for span in _spans() for expanded in _expand(span) for t in TRAINER.findall(expanded)}
    assert len(names) > 20, f"only {len(names)} trainer names found: did the parser break?"
    ours = _exported_trainers() | _package_classes()
    missing = sorted(n for n in names if n not in ours and n not in _nnunet_trainers())
    assert not missing, (f"docs/papers.md cites trainers that neither nnunet_synth.trainers nor nnU-Net define: "
                         f"{missing}")
    # a trainer of this package that is cited must be one nnU-Net can find through nnUNet_extTrainer
    defined_here = {n for n in names if n in _package_classes() and n.startswith("nnUNetTrainer")}
    hidden = sorted(defined_here - _exported_trainers())
    assert not hidden, f"docs/papers.md cites trainers missing from nnunet_synth.trainers.__all__: {hidden}"


def test_cited_commands_and_flags_exist():
    spans = _spans()
    commands = {c for span in spans for c in COMMAND.findall(span)}
    assert commands, "no nnUNetv2_synth_* command found: did the parser break?"
    unknown = sorted(commands - _scripts())
    assert not unknown, f"docs/papers.md cites commands that pyproject.toml does not install: {unknown}"
    sources = "\n".join(_sources().values())
    flags = {f for span in spans if span.startswith("nnUNetv2_synth_") for f in LONG_FLAG.findall(span)}
    missing = sorted(f for f in flags if f'"{f}"' not in sources)
    assert not missing, f"docs/papers.md cites command-line flags that no command defines: {missing}"


@pytest.mark.parametrize("path", ["README.md", "docs/generators.md", "CHANGELOG.md"])
def test_pointers_to_the_page(path):
    assert "papers.md" in _text(ROOT / path), f"{path} does not point to docs/papers.md"


def test_brace_expansion():
    assert _expand("nnUNetTrainerSynth{2,5}SD") == ["nnUNetTrainerSynth2SD", "nnUNetTrainerSynth5SD"]
    assert _expand("a{1,2}b{x,y}") == ["a1bx", "a1by", "a2bx", "a2by"]
    assert _expand("no braces") == ["no braces"]
