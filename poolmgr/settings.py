"""Every configuration setting, declared once, in `settings.toml` beside this module.

Each `Setting` carries its section, key, kind, default, bounds, choices, former names and help
text. The loader (`config.load`), `poolmgr check` and the documented default config
(`conf/poolmgr.toml`, printed by `poolmgr config`) all follow from this table. Names follow
Postfix where Postfix has the concept, and amavisd where it has (`max_requests`, ports
10024/10025).
"""

__all__ = ["Setting", "SETTINGS", "SECTION_HELP"]

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    kind: str  # str int float bool duration size address listen optaddress cidrs strlist
    #            nexthop filter path log rules policies sites addresses redis sentinels
    #            domainmap regexps secret
    #            (config.CONVERTERS)
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # former names, still read (a config written for them works)

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


def _load() -> tuple[dict[str, str], tuple[Setting, ...]]:
    with open(Path(__file__).with_name("settings.toml"), "rb") as handle:
        sections = tomllib.load(handle)["section"]
    settings = tuple(
        Setting(section["name"], item["key"], item["kind"], item["default"], item["help"],
                item.get("min"), item.get("max"), tuple(item.get("choices", ())),
                tuple(item.get("aliases", ())))
        for section in sections for item in section["setting"])
    return {section["name"]: section["help"] for section in sections}, settings


SECTION_HELP, SETTINGS = _load()
