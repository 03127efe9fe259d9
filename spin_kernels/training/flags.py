"""Command-line flags for the config sections, made by ``transformers.HfArgumentParser``.

Each subcommand parses the sections it uses (``SectionParser(sections=...)``): one flag per
field (``--max-length``), its help from the field's metadata, its choices from ``Literal``
annotations. Three things are ours, on top of HF's parser:

* values parse into the field's type with errors that name the flag and the field
  (``--beta (training.beta): expected float, got str 'abc'``), ``none`` for optional fields and
  comma lists; ranges are checked by the sections themselves (``Section.__post_init__``);
* booleans are ``--x`` / ``--no-x`` (``argparse.BooleanOptionalAction``), so an optional bool
  (``--fsdp``) has three states: on, off, unset;
* a flag that is not given stays out of the namespace, so the YAML file of ``--config`` (and a
  command's own defaults, e.g. the demo's) keep their values: defaults < YAML < flags
  (``config_from_args``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
from typing import Any, Literal, Union, get_args, get_origin

from transformers import HfArgumentParser

from .config import SECTIONS, ConfigError, SpinConfig, config_from_dict, load_yaml, type_name

#: The section that owns each field name (names are unique across sections).
OWNER = {f.name: sec for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def parse_text(text: str, tp: Any, name: str) -> Any:
    """One command-line string as the annotation ``tp``: ``none`` for optional fields, ints,
    floats (``5e-7``), comma-separated lists, one of a ``Literal``'s strings."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) < len(get_args(tp)) and text.strip().lower() in ("none", "null"):
            return None
        # Several types (a value or a per-iteration list; a count or a bool): a list when the text
        # has a comma, else the first scalar that parses (numbers before bools).
        lists = [a for a in inner if get_origin(a) is list]
        scalars = sorted((a for a in inner if a not in lists), key=lambda a: a is bool)
        errors = []
        for arg in (lists + scalars) if "," in text else (scalars + lists):
            try:
                return parse_text(text, arg, name)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]  # the error of the reading the text suggests (the value's, without a comma)
    if origin is list:
        return [parse_text(part.strip(), get_args(tp)[0], f"{name}[{i}]") for i, part in enumerate(text.split(","))]
    if origin is Literal:
        if text not in get_args(tp):
            raise ConfigError(f"{name}: expected {type_name(tp)}, got {text!r}")
        return text
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{name}: expected {type_name(tp)}, got str {text!r}") from None
    if tp is bool:
        low = text.strip().lower()
        if low not in ("true", "false", "yes", "no"):
            raise ConfigError(f"{name}: expected bool, got {text!r}")
        return low in ("true", "yes")
    return text


class SectionParser(HfArgumentParser):
    """The flags of the config ``sections`` ({section: field names, or None for all of them}),
    ``--config YAML``, and any ``extra`` dataclasses (e.g. the demo's), with the defaults shown
    in --help taken from ``base``. A value that does not parse raises ConfigError (naming the flag
    and the field); argparse's own errors (an unknown flag, a missing value) exit as usual."""

    def __init__(self, sections: dict[str, tuple[str, ...] | None] | None = None, *, base: Any = None,
                 extra: tuple[Any, ...] = (), **kwargs: Any):
        self._spin_only = dict(sections or {})
        self._spin_bad_value: str | None = None
        self._spin_base = base if base is not None else SpinConfig()
        self._spin_extra = {type(obj): obj for obj in extra}
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__([SECTIONS[s] for s in self._spin_only] + list(self._spin_extra), **kwargs)
        if self._spin_only:
            self.add_argument("--config", metavar="YAML", help="YAML file with sections " + ", ".join(SECTIONS)
                              + " (nested mappings of the fields below); flags override it")

    def _add_dataclass_arguments(self, dtype: Any) -> None:
        self._spin_section = getattr(dtype, "SECTION", "")
        self._spin_defaults = self._spin_extra.get(dtype) or getattr(self._spin_base, self._spin_section)
        super()._add_dataclass_arguments(dtype)

    def _parse_dataclass_field(self, parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        only = self._spin_only.get(self._spin_section)
        if only is not None and field.name not in only:
            return
        hint = field.type  # resolved by HfArgumentParser
        default = getattr(self._spin_defaults, field.name)
        shown = ("required" if field.metadata.get("required") else "default: none") if default is None \
            else f"default: {default}"
        text = f"{field.metadata.get('help', '')} ({shown})"
        flag = "--" + field.name.replace("_", "-")
        if hint is bool or hint == (bool | None):  # --x / --no-x; an optional bool stays unset when absent
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, dest=field.name,
                                default=argparse.SUPPRESS, help=text)
            return
        shadow = dataclasses.field(default=default, metadata={"help": text, "metavar": field.metadata.get(
            "metavar") or _metavar(hint)})
        # HfArgumentParser takes X and Optional[X]; a value-or-list field (X | list[X]) is parsed
        # by parse_text alone.
        plain = get_origin(hint) not in (Union, types.UnionType) or len(
            [a for a in get_args(hint) if a is not type(None)]) == 1
        shadow.name, shadow.type = field.name, hint if plain and get_origin(hint) is not list else str
        super()._parse_dataclass_field(parser, shadow)
        action = parser._actions[-1]
        if "const" in field.metadata:  # the flag alone means this value (--include-previous = 1)
            action.nargs, action.const = "?", field.metadata["const"]
        for alias in [o for o in action.option_strings if "_" in o]:  # one spelling: --max-length
            action.option_strings.remove(alias)
            parser._option_string_actions.pop(alias)
        action.type = self._parser_of(hint, f"{flag} ({self._spin_section}.{field.name})")
        action.choices, action.default, action.required = None, argparse.SUPPRESS, False

    def _parser_of(self, hint: Any, name: str):
        def parse(text: str) -> Any:
            try:
                return parse_text(text, hint, name)
            except ConfigError as exc:
                self._spin_bad_value = str(exc)
                raise argparse.ArgumentTypeError(str(exc)) from None
        return parse

    def error(self, message: str):
        bad = self._spin_bad_value
        if bad is not None:
            self._spin_bad_value = None
            raise ConfigError(bad)
        if message.startswith("unrecognized arguments:"):
            flags = [s for a in self._actions for s in a.option_strings]
            hints = [f"{w} (did you mean {m[0]}?)" for w in message.split(":", 1)[1].split() if w.startswith("--")
                     and (m := difflib.get_close_matches(w.split("=")[0], flags, n=1))]
            message += "".join(f"; {h}" for h in hints)
        return super().error(message)


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


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace, base: SpinConfig | None = None) -> SpinConfig:
    """Defaults < ``base`` < the YAML file of ``--config`` < the flags given on the command line."""
    cfg = base or SpinConfig()
    if getattr(args, "config", None):
        cfg = config_from_dict(load_yaml(args.config), cfg)
    cfg = dataclasses.replace(cfg)
    for sec, cls in SECTIONS.items():
        given = _given(args, cls)
        if given:
            setattr(cfg, sec, dataclasses.replace(getattr(cfg, sec), **given))  # checked in __post_init__
    return cfg


def section_from_args(args: argparse.Namespace, obj: Any) -> Any:
    """A copy of the dataclass ``obj`` with its flags given on the command line applied."""
    return dataclasses.replace(obj, **_given(args, type(obj)))


__all__ = ["OWNER", "SectionParser", "config_from_args", "parse_text", "section_from_args"]
