"""The README documents every setting, signal and command."""

from pathlib import Path

from poolmgr.config import render_reference
from poolmgr.settings import SETTINGS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_reference():
    missing = [s.name for s in SETTINGS if f"| `{s.key}` |" not in README]
    assert missing == []


def test_readme_reference_is_generated_from_the_settings():
    assert render_reference() in README, "regenerate with: poolmgr config --markdown"


def test_signals_and_commands_are_documented():
    for word in ["`TERM`", "`INT`", "`QUIT`", "`HUP`", "`TTIN`", "`TTOU`", "`USR1`",
                 "poolmgr run", "poolmgr check", "poolmgr status", "poolmgr ctl",
                 "bash scripts/test.sh", "python3 -m pip install . && poolmgr run"]:
        assert word in README, word


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


def test_reference_keeps_whole_section_introductions():
    from poolmgr.settings import SECTION_HELP

    for section, text in SECTION_HELP.items():
        intro = " ".join(line.strip() for line in text.splitlines())
        assert f"**[{section}]** {intro}\n" in README, section
