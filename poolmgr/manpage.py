"""The reference pages, generated from the argparse parser and the settings table.

`render(parser)` writes poolmgr(8) in roff (man(7) macros): the commands and their options as
the parser declares them, the signals, exit status, files and environment. `render_config()`
writes poolmgr.toml(5): every setting with its default and help, section by section.
`configuration_markdown()` is the same reference as Markdown (docs/configuration.md).
`poolmgr config --man [8|5]` and `poolmgr config --markdown` print them; the shipped copies
(conf/poolmgr.8, conf/poolmgr.toml.5, docs/configuration.md) must equal them (tests check).

The signals and exit codes are written once, here (`SIGNALS`, `WORKER_SIGNALS`,
`EXIT_STATUS`); the man page and the README's tables (`signals_markdown`,
`worker_signals_markdown`, `exit_status_markdown`) are made from them, and tests check that
the master's `handle_<name>` signals and the CLI's exit codes are all in them. Their text marks
code with `backticks`: kept in Markdown, bold in roff.
"""

__all__ = ["render", "SIGNALS", "WORKER_SIGNALS", "EXIT_STATUS", "render_config",
           "configuration_markdown", "signals_markdown", "worker_signals_markdown",
           "exit_status_markdown"]

import argparse
import re

from . import __version__
from .config import SYSTEM_CONFIG, SYSTEM_PATHS, render_reference, toml_value
from .settings import SECTION_HELP, SETTINGS

# Sent to the master (the pid in master.pidfile): master.py's handle_<name>.
SIGNALS = (
    (("TERM",), "graceful stop: stop accepting, let SMTP sessions finish (up to "
                "`master.graceful_timeout`), then stop the scanner pool once its last hand-offs "
                "are done; exit 0"),
    (("INT", "QUIT"), "fast stop: workers exit at once; exit 0"),
    (("HUP",), "re-read the config and replace every worker gracefully; the listening sockets "
               "stay open, so no connection is refused. An invalid config is logged and the "
               "running one kept"),
    (("TTIN", "TTOU"), "SMTP pool +1 / -1 (never more scanner workers than SMTP workers)"),
    (("USR1",), "reopen the log file (after logrotate) and pass the signal on to the workers"),
    (("USR2",), "upgrade poolmgr itself (gunicorn's convention): a new master is started from "
                "the installed code and inherits the listening sockets; once both of its pools "
                "serve, it writes the pidfile, takes the control socket and stops the old master "
                "gracefully (under systemd, the old one hands over `MAINPID`). No connection is "
                "refused during the switch"),
)
# Sent to one worker (its pid in ps: `poolmgr: smtp worker 3 [412 sessions]`): worker.py.
WORKER_SIGNALS = (
    (("TERM",), "drain: stop accepting, finish the sessions (or the message) in hand, exit; "
                "the master sends it on stop, reload and retire"),
    (("QUIT",), "exit at once"),
    (("INT",), "ignored: a Ctrl-C in a terminal reaches the whole process group, and the "
               "master stops the pools"),
    (("USR1",), "reopen the log file"),
    (("USR2",), "write the worker's Python stack (every thread) to stderr, the journal under "
                "systemd, and serve on. The master sends it to a worker it finds hung (no "
                "heartbeat for `master.worker_timeout`) half a second before it kills it, so the "
                "log says where the worker hung"),
)
EXIT_STATUS = (
    ("0", "success"),
    ("1", "a runtime failure: cannot bind, master unreachable, request refused, `stop` timed "
          "out"),
    ("2", "a usage error"),
    ("3", "from `status`: the master is not running (LSB)"),
    ("64", "from `scan`: `--policy` names no policy bank (`EX_USAGE`)"),
    ("75", "from `scan`: a check could not answer (`EX_TEMPFAIL`); `scan` also exits 1 for "
           "spam and 2 for a virus or banned contents"),
    ("78", "an invalid configuration (`EX_CONFIG`, as systemd and sysexits.h use it), from "
           "every command that loads one: `run` refuses it with the same messages as `check`"),
)

_CODE = re.compile(r"`([^`]*)`")


def _text(text: str) -> str:
    """Roff-safe running text: backslashes escaped, `code` in bold, no line starting with a
    control character."""
    text = " ".join(str(text).split()).replace("\\", "\\e")
    text = _CODE.sub(lambda m: f"\\fB{m.group(1)}\\fR", text)
    return "\\&" + text if text.startswith((".", "'")) else text


def _option(action: argparse.Action) -> str:
    names = ", ".join("\\fB" + name.replace("-", "\\-") + "\\fR"
                      for name in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if action.nargs == "?":
        return f"{names} [\\fI{_text(metavar)}\\fR]"
    return f"{names} \\fI{_text(metavar)}\\fR"


def _positional(action: argparse.Action) -> str:
    if action.choices:
        words = "|".join(map(str, action.choices))
    else:
        words = action.metavar or action.dest
    return f"[{words}]" if action.nargs == "?" else words


COMMON = ("--config", "--socket")  # options of several commands: under OPTIONS, once


def _common(parser: argparse.ArgumentParser) -> list[str]:
    found: dict[str, argparse.Action] = {}
    for group in parser._subparsers._group_actions:
        for sub in group.choices.values():
            for action in sub._actions:
                for name in set(action.option_strings) & set(COMMON):
                    found.setdefault(name, action)
    return [line for name in COMMON if name in found
            for line in (".TP", _option(found[name]), _text(found[name].help))]


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    lines = []
    for group in parser._subparsers._group_actions if parser._subparsers else ():
        helps = {a.dest: a.help for a in group._choices_actions}
        for name, sub in group.choices.items():
            words = [prefix + name] + [_positional(a) for a in sub._actions
                                       if not a.option_strings and
                                       not isinstance(a, argparse._SubParsersAction)]
            if sub._subparsers:
                lines += _commands(sub, f"{prefix}{name} ")
                continue
            lines += [".TP", f"\\fB{_text(' '.join(words))}\\fR", _text(helps.get(name, ""))]
            for action in sub._actions:
                if action.option_strings and action.help != argparse.SUPPRESS and \
                        not isinstance(action, argparse._HelpAction) and \
                        not set(action.option_strings) & set(COMMON):
                    lines += [".RS", ".TP", _option(action), _text(action.help or ""), ".RE"]
    return lines


def _default(setting) -> str:
    if setting.key.endswith("_mode"):
        return f"0o{setting.default:o}"
    return toml_value(setting.default)


def _settings() -> list[str]:
    lines, current = [], None
    for setting in SETTINGS:
        if setting.section != current:
            current = setting.section
            lines += [".SS", f"[{current}]", _text(SECTION_HELP[current])]
        lines += [".TP", f"\\fB{setting.key}\\fR = {_text(_default(setting))}",
                  _text(setting.help)]
    return lines


def _signals(table) -> list[str]:
    lines = []
    for names, text in table:
        lines += [".TP", ", ".join(f"\\fB{name}\\fR" for name in names), _text(text)]
    return lines


def _system_layout() -> str:
    return ", ".join(f"{name} {value}" for name, value in SYSTEM_PATHS.items())


def render(parser: argparse.ArgumentParser) -> str:
    """poolmgr(8): commands, options, signals, exit status, files, environment."""
    lines = [
        f'.TH POOLMGR 8 "" "poolmgr {__version__}" "System Manager\'s Manual"',
        ".SH NAME", "poolmgr \\- prefork SMTP listener pool manager",
        ".SH SYNOPSIS", "\\fBpoolmgr\\fR \\fIcommand\\fR [\\fB\\-c\\fR \\fIFILE\\fR] "
                        "[\\fIoptions\\fR]",
        ".SH DESCRIPTION", _text(parser.description),
        ".PP", _text("One master binds the listening sockets and supervises two pools of "
                     "workers: SMTP workers on the public port, which shed nuisance connections "
                     "postscreen-style, and content-scanner workers, an after-queue content "
                     "filter. It follows Postfix's conventions, and speaks systemd's notify "
                     "protocol when NOTIFY_SOCKET is set."),
        ".SH OPTIONS", *_common(parser),
        ".SH COMMANDS", *_commands(parser, ""),
        ".SH SIGNALS", ".SS Master", _text("Sent to the master (the pid in `master.pidfile`):"),
        *_signals(SIGNALS),
        ".SS Workers", _text("Sent to one worker (its pid and role in ps, e.g. `poolmgr: smtp "
                             "worker 3 [412 sessions]`):"),
        *_signals(WORKER_SIGNALS),
        ".SH EXIT STATUS",
    ]
    for code, text in EXIT_STATUS:
        lines += [".TP", f"\\fB{code}\\fR", _text(text)]
    lines += [
        ".SH FILES", ".TP", f"\\fI{SYSTEM_CONFIG}\\fR",
        _text("the configuration when neither -c nor POOLMGR_CONFIG names one; its format and "
              "every setting are in poolmgr.toml(5)."),
        ".SH ENVIRONMENT", ".TP", "\\fBPOOLMGR_CONFIG\\fR",
        _text("the configuration file when -c is not given"),
        ".TP", "\\fBNOTIFY_SOCKET\\fR, \\fBWATCHDOG_USEC\\fR, \\fBWATCHDOG_PID\\fR",
        _text("set by systemd (Type=notify): the master sends READY=1 once both pools serve, "
              "RELOADING=1 and READY=1 around a reload, STOPPING=1, STATUS= with the pool "
              "sizes and storm phase, and WATCHDOG=1 at half the watchdog interval"),
        ".TP", "\\fBLISTEN_FDS\\fR, \\fBLISTEN_PID\\fR",
        _text("set by systemd's socket activation (a poolmgr.socket unit): the master takes "
              "the sockets it is handed for the addresses they are bound to, and binds only "
              "the others"),
        ".SH CONFIGURATION",
        _text("A TOML file, described with every setting and its default in poolmgr.toml(5). "
              "`poolmgr config` prints them all, `poolmgr config -n` those a file changes, "
              "`poolmgr check` validates a file."),
        ".SH SEE ALSO", "\\fBpoolmgr.toml\\fR(5), \\fBpostfix\\fR(1), \\fBpostscreen\\fR(8), "
                        "\\fBmaster\\fR(8), \\fBsystemd.service\\fR(5)",
    ]
    return "\n".join(lines) + "\n"


def render_config() -> str:
    """poolmgr.toml(5): the file's format, where it is looked up, and every setting."""
    lines = [
        f'.TH POOLMGR.TOML 5 "" "poolmgr {__version__}" "File Formats Manual"',
        ".SH NAME", "poolmgr.toml \\- poolmgr configuration file",
        ".SH SYNOPSIS", f"\\fI{SYSTEM_CONFIG}\\fR",
        ".SH DESCRIPTION",
        _text("poolmgr(8) reads one TOML file: -c FILE, else $POOLMGR_CONFIG, else "
              f"{SYSTEM_CONFIG} if it exists, else its embedded defaults (the master's "
              "'daemon started' line names the one it read). Put in the file only what you "
              "change: `poolmgr config -n` lists it, `poolmgr config` prints every key with "
              "its default, `poolmgr check` validates a file (exit 78 if invalid)."),
        ".PP",
        _text("Durations are written \"300s\", \"5m\", \"500ms\"; sizes \"25M\", \"10k\" or "
              "bytes. Unknown keys are errors naming the file and the key; a former name of a "
              "key still works. A relative path is taken from the file's directory (with no "
              "file, from the working directory). A file in "
              f"{SYSTEM_CONFIG.rpartition('/')[0]}/ gets the system layout's defaults: "
              f"{_system_layout()}."),
        ".PP",
        _text("A reload (SIGHUP, `poolmgr reload`) reads the file again; an invalid file is "
              "logged and the running configuration kept. Changing smtp.listen, "
              "scanner.listen, master.control_socket or master.pidfile needs a restart."),
        ".SH SETTINGS", *_settings(),
        ".SH FILES", ".TP", f"\\fI{SYSTEM_CONFIG}\\fR", _text("the system configuration"),
        ".SH SEE ALSO", "\\fBpoolmgr\\fR(8), \\fBpostconf\\fR(5)",
    ]
    return "\n".join(lines) + "\n"


CONFIGURATION_INTRO = """\
# Configuration reference

Generated from `poolmgr/settings.toml` by `poolmgr config --markdown`; do not edit by hand.
The same reference is the man page poolmgr.toml(5) (`conf/poolmgr.toml.5`), and the documented
default configuration is `conf/poolmgr.toml` (every key, commented; `poolmgr config` prints it).

The configuration is looked up as `-c FILE`, `$POOLMGR_CONFIG`,
`{system}`, then the embedded defaults. Put in the file only what you change
(`poolmgr config -n` lists it; `poolmgr check` validates it). Durations are written `"300s"`,
`"5m"`, `"500ms"`; sizes `"25M"`, `"10k"` or bytes. Unknown keys are errors. A relative path is
taken from the file's directory (with no file, from the working directory). A file in
`{system_dir}/` gets the system layout's defaults:

{layout}
"""


def configuration_markdown() -> str:
    """docs/configuration.md: an introduction, then every setting, section by section."""
    layout = "\n".join(f"- `{name}` = `{value}`" for name, value in SYSTEM_PATHS.items())
    return CONFIGURATION_INTRO.format(system=SYSTEM_CONFIG, layout=layout,
                                      system_dir=SYSTEM_CONFIG.rpartition("/")[0]) + \
        render_reference()


def _markdown_table(head: str, rows) -> str:
    lines = [head, "|---|---|"]
    for names, text in rows:
        if isinstance(names, tuple):
            names = ", ".join(f"`{name}`" for name in names)
        lines.append(f"| {names} | {text} |")
    return "\n".join(lines) + "\n"


def signals_markdown() -> str:
    return _markdown_table("| signal to the master | effect |", SIGNALS)


def worker_signals_markdown() -> str:
    return _markdown_table("| signal to a worker | effect |", WORKER_SIGNALS)


def exit_status_markdown() -> str:
    return _markdown_table("| exit | meaning |", EXIT_STATUS)
