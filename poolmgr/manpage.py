"""The man page poolmgr(8), generated from the argparse parser and the settings table.

`render(parser)` writes roff (man(7) macros): the commands and their options as the parser
declares them, the signals, exit status, files and environment, and every setting with its
default and help, as the README's reference has them. `poolmgr config --man` prints it; the
shipped conf/poolmgr.8 must equal it (a test checks).
"""

__all__ = ["render"]

import argparse

from . import __version__
from .config import SYSTEM_CONFIG, SYSTEM_PATHS, toml_value
from .settings import SECTION_HELP, SETTINGS

SIGNALS = (
    ("TERM", "graceful stop: stop accepting, let SMTP sessions finish (up to "
             "master.graceful_timeout), then stop the scanner pool; exit 0"),
    ("INT, QUIT", "fast stop: workers exit at once; exit 0"),
    ("HUP", "re-read the configuration and replace every worker gracefully; the listening "
            "sockets stay open. An invalid configuration is logged and the running one kept"),
    ("TTIN, TTOU", "SMTP pool +1 / -1"),
    ("USR1", "reopen the log file (after logrotate)"),
)
EXIT_STATUS = (
    ("0", "success"),
    ("1", "a runtime failure: cannot bind, master unreachable, request refused, stop timed out"),
    ("2", "a usage error"),
    ("3", "status: the master is not running"),
    ("78", "an invalid configuration (EX_CONFIG), from every command that loads one"),
)


def _text(text: str) -> str:
    """Roff-safe running text: backslashes escaped, no line starting with a control character."""
    text = " ".join(str(text).split()).replace("\\", "\\e")
    return "\\&" + text if text.startswith((".", "'")) else text


def _option(action: argparse.Action) -> str:
    names = ", ".join("\\fB" + name.replace("-", "\\-") + "\\fR"
                      for name in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
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


def _settings() -> list[str]:
    lines, current = [], None
    for setting in SETTINGS:
        if setting.section != current:
            current = setting.section
            lines += [".SS", f"[{current}]", _text(SECTION_HELP[current])]
        if setting.key.endswith("_mode"):
            default = f"0o{setting.default:o}"
        else:
            default = toml_value(setting.default)
        lines += [".TP", f"\\fB{setting.key}\\fR = {_text(default)}", _text(setting.help)]
    return lines


def render(parser: argparse.ArgumentParser) -> str:
    system = ", ".join(f"{name} {value}" for name, value in SYSTEM_PATHS.items())
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
        ".SH SIGNALS", _text("Sent to the master (the pid in master.pidfile):"),
    ]
    for name, text in SIGNALS:
        lines += [".TP", f"\\fB{name}\\fR", _text(text)]
    lines += [".SH EXIT STATUS"]
    for code, text in EXIT_STATUS:
        lines += [".TP", f"\\fB{code}\\fR", _text(text)]
    lines += [
        ".SH FILES", ".TP", f"\\fI{SYSTEM_CONFIG}\\fR",
        _text("the configuration when neither -c nor POOLMGR_CONFIG names one. Relative paths "
              "in a configuration file are taken from its directory. A file in this directory "
              f"gets the system layout's defaults: {system}."),
        ".SH ENVIRONMENT", ".TP", "\\fBPOOLMGR_CONFIG\\fR",
        _text("the configuration file when -c is not given"),
        ".TP", "\\fBNOTIFY_SOCKET\\fR, \\fBWATCHDOG_USEC\\fR, \\fBWATCHDOG_PID\\fR",
        _text("set by systemd (Type=notify): the master sends READY=1 once both pools serve, "
              "RELOADING=1 and READY=1 around a reload, STOPPING=1, STATUS= with the pool "
              "sizes and storm phase, and WATCHDOG=1 at half the watchdog interval"),
        ".SH CONFIGURATION",
        _text("A TOML file; every key, with its default ('poolmgr config' prints them all, "
              "'poolmgr config \\-n' those a file changes). Durations: \"300s\", \"5m\", "
              "\"500ms\". Sizes: \"25M\", \"10k\"."),
        *_settings(),
        ".SH SEE ALSO", "\\fBpostfix\\fR(1), \\fBpostscreen\\fR(8), \\fBmaster\\fR(8), "
                        "\\fBsystemd.service\\fR(5)",
    ]
    return "\n".join(lines) + "\n"
