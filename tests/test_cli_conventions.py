"""Every ``nnUNetv2_synth_*`` command speaks nnU-Net's flags and has clean help.

Each command's parser is taken from the command itself (its console-script function, as pyproject.toml names it,
is called with ``ArgumentParser.parse_args`` intercepted), so a new command or option is checked without being
listed here. In-process and cheap: no command runs.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD_SPELLINGS = {"--device", "--num-parts", "--part"}
# commands whose -d names the dataset they create (their help says "creates"); everywhere else -d is an existing one
CREATES_A_DATASET = {"nnUNetv2_synth_phantom", "nnUNetv2_synth_bbox_dataset"}


def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: command name -> ``module:function``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _parser_of(target: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    module, function = target.split(":")
    entry = getattr(importlib.import_module(module), function)

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        m.setattr(sys, "argv", [target])
        with pytest.raises(_Captured) as captured:
            entry()
    return captured.value.parser


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, and each sub-command's as ``"<command> <sub-command>"``."""
    found = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, target in console_scripts().items():
            parser = _parser_of(target, monkeypatch)
            found[name] = parser
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    found.update({f"{name} {sub}": p for sub, p in action.choices.items()})
    return found


def _options(parser: argparse.ArgumentParser, visible: bool = True) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and (a.help != argparse.SUPPRESS) == visible
            and not isinstance(a, argparse._HelpAction)]


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help as ``--help`` renders it (default text appended, %-formatting applied)."""
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def test_every_command_is_found(parsers):
    assert set(console_scripts()) <= set(parsers)
    assert {name.split()[0] for name in parsers} == set(console_scripts())


def test_flags_are_spelled_as_nnunet_spells_them(parsers):
    for name, parser in parsers.items():
        visible = {s for a in _options(parser) for s in a.option_strings}
        assert not visible & OLD_SPELLINGS, (name, visible & OLD_SPELLINGS)
        for action in _options(parser):
            if "-o" in action.option_strings:  # always an output folder, never an ID
                assert action.type in (None, str, Path), (name, action.type)
            if "-np" in action.option_strings:
                from nnunetv2.configuration import default_num_processes

                assert action.default == default_num_processes, name
        if "-d" in {s for a in _options(parser) for s in a.option_strings}:
            d = next(a for a in _options(parser) if "-d" in a.option_strings)
            creates = name in CREATES_A_DATASET or name.startswith("nnUNetv2_synth_convert ")
            assert ("creates" in (d.help or "")) == creates, (name, d.help)


def test_the_device_flags_exist_where_a_device_is_chosen(parsers):
    for name in ("nnUNetv2_synth_generate", "nnUNetv2_synth_train_generator", "nnUNetv2_synth_bbox_pseudolabel",
                 "nnUNetv2_synth_quality"):
        assert any("-device" in a.option_strings for a in _options(parsers[name])), name
    generate = {s for a in _options(parsers["nnUNetv2_synth_generate"]) for s in a.option_strings}
    assert {"-num_parts", "-part_id"} <= generate


def test_every_argument_has_help(parsers):
    for name, parser in parsers.items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, (name, action.option_strings or action.dest)


def test_help_renders_cleanly(parsers):
    for name, parser in parsers.items():
        text = parser.format_help()
        assert "``" not in text and "%%" not in text, name
        assert "(default: None)" not in text, name
        for action in _options(parser):
            rendered = _help_of(parser, action)
            assert len(re.findall(r"\(default\b", rendered)) <= 1, (name, rendered)
            assert rendered.lower().count("default") <= 2, (name, rendered)  # e.g. "default: X ... by default"
            if action.required:
                assert "(default" not in rendered, (name, rendered)


def test_old_spellings_still_work_with_a_deprecation_line(parsers, capsys):
    args = parsers["nnUNetv2_synth_generate"].parse_args(["-d", "1", "-g", "analytic", "-n", "4", "--device", "cpu",
                                                          "--num-parts", "2", "--part", "1"])
    assert (args.device, args.num_parts, args.part_id) == ("cpu", 2, 1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all("is deprecated" in line for line in lines), lines
    assert "--part is deprecated and will be removed in the next release; use -part_id" in lines[2]
    defaults = parsers["nnUNetv2_synth_generate"].parse_args(["-d", "1", "-g", "analytic", "-n", "4"])
    assert (defaults.device, defaults.num_parts, defaults.part_id) == (None, 1, 0)
    assert capsys.readouterr().err == ""

    pseudo = parsers["nnUNetv2_synth_bbox_pseudolabel"]
    assert pseudo.parse_args(["-d", "5", "-i", "6", "-o", "7"]).output_id == 7
    assert "-o is deprecated" in capsys.readouterr().err
    assert pseudo.parse_args(["-d", "5", "-i", "6", "--output-id", "7", "-device", "cpu"]).device == "cpu"
    assert capsys.readouterr().err == ""


def test_pseudolabel_still_requires_the_output_id(capsys):
    from nnunet_synth.dataset_conversion.bbox import bbox_pseudolabel_main

    with pytest.raises(SystemExit) as exc:
        bbox_pseudolabel_main(["-d", "5", "-i", "6"])
    assert exc.value.code == 2 and "required: --output-id" in capsys.readouterr().err
