"""Command-line flags of the config sections, on ``transformers.HfArgumentParser``'s public API.

HfArgumentParser makes the flags from a *flag view* of each section (``flag_view``: the section's
fields, each ``str | None`` or ``bool | None``, None meaning "not given") and parses them
(``parse_args_into_dataclasses``); the texts given are read by the type walker of YAML and flag
text (``config.parse_value``) and applied over the YAML file of ``--config`` and the defaults
(defaults < YAML < flags). The sections check their ranges when built, so every error names the
flag and the field (``--beta (training.beta): expected float, got str 'abc'``). Two argparse
Actions give one spelling per flag and ``--x`` / ``--no-x`` booleans (so ``--fsdp`` has three
states); an unknown flag gets "did you mean".
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from transformers import HfArgumentParser

from .config import SECTIONS, SpinConfig, config_from_dict, load_yaml, parse_value


class Flag(argparse.Action):
    """A value flag, spelled one way (``--max-length``; HfArgumentParser also offers
    ``--max_length``); stores the text, which ``parse_value`` reads."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__([s for s in option_strings if "_" not in s], dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)


class Switch(argparse.Action):
    """``--x`` / ``--no-x`` for a bool field; absent, the field keeps its YAML or default value."""

    def __init__(self, option_strings: list[str], dest: str, type: Any = None, **kwargs: Any):
        flag = next(s for s in option_strings if "_" not in s)  # the bool itself takes no text: no type
        super().__init__([flag, "--no-" + flag[2:]], dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, not option_string.startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _metavar(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):  # a value, none, or a per-iteration list: the value's
        inner = [a for a in get_args(tp) if a is not type(None) and get_origin(a) is not list]
        return _metavar(inner[0]) if len(inner) == 1 else "VALUE"
    if origin is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    if origin is list:
        return _metavar(get_args(tp)[0]) + "[,...]"
    return {int: "N", float: "X", str: "STR"}.get(tp, "VALUE")


def flag_view(cls: type, only: tuple[str, ...] | None = None, defaults: Any = None) -> type:
    """The dataclass HfArgumentParser makes the flags of section ``cls`` from (its fields ``only``,
    all by default), every field None unless given; --help shows the values of ``defaults``."""
    defaults = defaults if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        value, hint = getattr(defaults, f.name), hints[f.name]
        shown = f"default: {value}" if value is not None else "required" if f.metadata.get("required") \
            else "default: none"
        meta: dict[str, Any] = {"help": f"{f.metadata.get('help', '')} ({shown})"}
        if hint in (bool, bool | None):
            specs.append((f.name, bool | None, dataclasses.field(default=None, metadata={**meta, "action": Switch})))
            continue
        meta.update(action=Flag, metavar=f.metadata.get("metavar") or _metavar(hint))
        if "const" in f.metadata:  # the flag alone means this value (--include-previous: 1)
            meta.update(nargs="?", const=str(f.metadata["const"]))
        specs.append((f.name, str | None, dataclasses.field(default=None, metadata=meta)))
    # _argument_group_name: HfArgumentParser's documented hook that groups --help by section
    return dataclasses.make_dataclass(f"{cls.__name__}Flags", specs,
                                      namespace={"_argument_group_name": f"{cls.SECTION} options"})


def apply_flags(obj: Any, given: Mapping[str, Any]) -> Any:
    """A copy of the section ``obj`` with the flags ``given`` ({field: text, or None where not
    given}) read as its fields' types; the copy checks its ranges when built."""
    hints = typing.get_type_hints(type(obj))
    values = {f.name: parse_value(given[f.name], hints[f.name],
                                  f"--{f.name.replace('_', '-')} ({obj.SECTION}.{f.name})", text=True)
              for f in dataclasses.fields(obj) if given.get(f.name) is not None}
    return dataclasses.replace(obj, **values) if values else obj


class SectionParser(HfArgumentParser):
    """The flags of the config ``sections`` ({section: field names, or None for all of them}),
    ``--config YAML``, and those of any ``extra`` section objects (e.g. the demo's), with the
    defaults shown in --help taken from ``base`` and the ``extra`` objects. ``parse_args_and_config``
    parses; a value that does not read as its type raises ConfigError (``apply_flags``);
    argparse's own errors (an unknown flag, with "did you mean", a missing value) exit as usual."""

    def __init__(self, sections: dict[str, tuple[str, ...] | None] | None = None, *, base: Any = None,
                 extra: tuple[Any, ...] = (), **kwargs: Any):
        self.base, self.extra = base if base is not None else SpinConfig(), tuple(extra)
        views = [flag_view(SECTIONS[s], only, getattr(self.base, s)) for s, only in (sections or {}).items()]
        views += [flag_view(type(obj), None, obj) for obj in self.extra]
        flags = {f.name.replace("_", "-"): f.metadata["action"] for view in views for f in dataclasses.fields(view)}
        self.flag_names = ["--config", *(f"--{n}" for n in flags), *(f"--no-{n}" for n, a in flags.items() if a is Switch)]
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(views, **kwargs)
        if sections:
            self.add_argument("--config", metavar="YAML", help="YAML file with sections " + ", ".join(SECTIONS)
                              + " (nested mappings of the fields below); flags override it")

    def parse_args_and_config(self, args: list[str] | None = None) -> tuple[Any, ...]:
        """TrlParser's shape: ``(SpinConfig, *extra objects, Namespace of the other arguments)``, each
        over its defaults (``base``, the ``extra`` objects), the YAML file of ``--config`` and the
        flags given, in that order of priority. An unknown flag close to one of ours is taken for a
        typo of it ("did you mean")."""
        *views, rest = self.parse_args_into_dataclasses(args, return_remaining_strings=True, look_for_args_file=False)
        if rest:
            hints = [f"{w} (did you mean {m[0]}?)" for w in rest if w.startswith("--")
                     and (m := difflib.get_close_matches(w.split("=")[0], self.flag_names, n=1))]
            self.error(f"unrecognized arguments: {' '.join(rest)}" + "".join(f"; {h}" for h in hints))
        other = views.pop() if views and isinstance(views[-1], argparse.Namespace) else argparse.Namespace()
        given = {k: v for view in views for k, v in vars(view).items()}
        cfg = self.base
        if getattr(other, "config", None):
            cfg = config_from_dict(load_yaml(other.config), cfg)
        cfg = dataclasses.replace(cfg, **{sec: apply_flags(getattr(cfg, sec), given) for sec in SECTIONS})
        return (cfg, *[apply_flags(obj, given) for obj in self.extra], other)


__all__ = ["Flag", "SectionParser", "Switch", "apply_flags", "flag_view"]
