"""The documentation: the generated copies equal what the code renders, every setting, signal,
exit code and command is documented, the README stays short, links resolve, and the version
is one."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import poolmgr
from poolmgr import cli, config, manpage, master, worker
from poolmgr.settings import SECTION_HELP, SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in (ROOT / "docs").glob("*.md")}

# Each generated copy, how the code renders it, and the command that regenerates it.
GENERATED = {
    "conf/poolmgr.8": (lambda: manpage.render(cli.build_parser()), ["--man"]),
    "conf/poolmgr.toml.5": (manpage.render_config, ["--man", "5"]),
    "docs/configuration.md": (manpage.configuration_markdown, ["--markdown"]),
    "conf/poolmgr.toml": (config.render_default, []),
    "conf/poolmgr.sample.toml": (config.render_sample, ["--sample"]),
}


@pytest.mark.parametrize("path", GENERATED)
def test_generated_copies_are_what_the_code_renders(path):
    render, options = GENERATED[path]
    command = " ".join(["poolmgr config", *options, ">", path])
    assert (ROOT / path).read_text() == render(), f"regenerate with: {command}"


def test_config_command_prints_the_generated_copies():
    """`poolmgr config --man` keeps printing poolmgr(8); `--man 5` and `--markdown` the others."""
    for path, (render, options) in GENERATED.items():
        result = subprocess.run([sys.executable, "-m", "poolmgr", "config", *options],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout == render(), (options, result.stderr)
    refused = subprocess.run([sys.executable, "-m", "poolmgr", "config", "--man", "7"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "invalid choice" in refused.stderr


@pytest.mark.parametrize("page", ["poolmgr.8", "poolmgr.toml.5"])
def test_man_pages_render_without_warnings(page):
    if not shutil.which("groff"):
        pytest.fail("groff is not installed (Debian package groff-base)")
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / "conf" / page)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""


def test_every_setting_is_in_the_references():
    reference = DOCS["configuration.md"]
    page = manpage.render_config()
    for setting in SETTINGS:
        start = reference.index(f"**[{setting.section}]**")
        end = reference.find("\n**[", start)
        section = reference[start:end if end != -1 else None]
        assert f"| `{setting.key}` |" in section, setting.name
        assert f"\\fB{setting.key}\\fR = " in page, setting.name


def test_reference_keeps_whole_section_introductions():
    for section, text in SECTION_HELP.items():
        intro = " ".join(line.strip() for line in text.splitlines())
        assert f"**[{section}]** {intro}\n" in DOCS["configuration.md"], section


def test_every_signal_the_master_and_workers_take_is_in_the_one_table():
    documented = {name for names, _ in manpage.SIGNALS for name in names}
    handled = {name.upper() for name in master.SIG_NAMES.values()} - {"CHLD"}
    assert documented == handled
    in_workers = {name for names, _ in manpage.WORKER_SIGNALS for name in names}
    assert worker.STACK_SIGNAL.name.removeprefix("SIG") in in_workers
    assert in_workers == {"TERM", "QUIT", "INT", "USR1", "USR2"}


def test_every_exit_code_is_in_the_one_table():
    codes = {int(code) for code, _ in manpage.EXIT_STATUS}
    assert codes == {0, 1, 2, cli.EXIT_NOT_RUNNING, cli.EXIT_CONFIG, cli.EXIT_TEMPFAIL,
                     cli.EXIT_USAGE}


def test_readme_and_man_page_are_made_from_the_tables():
    for table in (manpage.signals_markdown(), manpage.worker_signals_markdown(),
                  manpage.exit_status_markdown()):
        assert table in README, "paste in the output of: python3 -c 'from poolmgr import " \
                                "manpage as m; print(m.signals_markdown(), " \
                                "m.worker_signals_markdown(), m.exit_status_markdown())'"
    page = manpage.render(cli.build_parser())
    for names, _ in manpage.SIGNALS + manpage.WORKER_SIGNALS:
        assert ", ".join(f"\\fB{name}\\fR" for name in names) in page, names
    for code, _ in manpage.EXIT_STATUS:
        assert f".TP\n\\fB{code}\\fR\n" in page, code


def test_every_command_is_documented():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.choices and a.dest == "command").choices
    page = manpage.render(parser)
    for name in commands:
        assert f"`poolmgr {name}" in README, name
        assert f"\\fB{name}" in page, name


def test_readme_is_short_and_keeps_the_two_commands():
    assert len(README.splitlines()) <= 300
    for words in ["python3 -m pip install . && poolmgr run", "bash scripts/test.sh",
                  "## Behind Postfix", "## In front of Postfix", "## Signals",
                  "## Architecture: where things are", "poolmgr ctl", "poolmgr status"]:
        assert words in README, words
    for name in ("configuration.md", "operations.md", "benchmarks.md"):
        assert f"(docs/{name})" in README, name


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve():
    pages = {ROOT / "README.md": README, **{ROOT / "docs" / n: t for n, t in DOCS.items()}}
    broken = []
    for page, text in pages.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target}")
    assert broken == []


def test_version_is_one_and_has_release_notes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == poolmgr.__version__
    # The Debian package's version (native: poolmgr_VERSION_all.deb), from its last entry.
    debian = (ROOT / "debian" / "changelog").read_text().partition("\n")[0]
    assert debian.startswith(f"poolmgr ({poolmgr.__version__}) "), \
        "add an entry to debian/changelog: dch -v " + poolmgr.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(poolmgr.__version__)}\]", changelog, re.M)
    assert "## Unreleased" not in changelog and "third pass" not in changelog
