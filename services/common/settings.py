"""Settings of every command and stage: flags > environment > the `--config` TOML file > defaults.

argparse defines each flag once (type, choices, default, help) and parses the command line. From a parser's flags
this module builds a pydantic-settings model, one field per flag, and lets the library merge the sources, first
wins:
  1. the flags given on the command line (pydantic-settings' init source),
  2. the flag's environment variable, where it has one: the names diffmesh has always read (DIFFMESH_HOST,
     DIFFMESH_ENCODER_ADDR, ...), bound per flag with `bind_env`; no prefix rule, so `generate --model` (a model id)
     never reads the stages' DIFFMESH_MODEL (a directory),
  3. the TOML file named by `--config`, whose keys are the flags' names (`max_queue = 4`, or `max-queue`),
  4. the flag's default.
A value from the environment or the file goes through the flag's own `type` and `choices`, so it is checked as the
same text on the command line would be; a bad one fails in one line naming the flag and where the value came from.

Why argparse in front rather than pydantic-settings' CliSettingsSource: the flags need what argparse does well and
the CLI source does not model (`--compile [MODE]` with a const, repeatable `--route`/`--api-key`, argument groups,
metavars, the stages' flags passed through `diffmesh serve STAGE ...` and the gang launcher unchanged), and the
flags must stay where they are defined today (each module adds its own: TLS, gang, compile, tiling, metrics).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import BeforeValidator, Field, ValidationError, create_model
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as SourceError

CONFIG = "config"           # the flag naming the TOML file; a source, not a setting


class SettingsError(ValueError):
    """A setting is malformed or unknown: one line, naming the flag and where the value came from."""


class Resolved(argparse.Namespace):
    """A namespace whose values are already flags > env > file > defaults (resolving it again changes nothing)."""


class Parser(argparse.ArgumentParser):
    """argparse with each flag's default (and environment variable) in its help, and usage errors in one line:
    `PROG: error: MESSAGE`, exit status 2 (argparse prints the whole usage first, which buries the message)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X; env NAME)` to every flag's help, unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _is_setting(action) or text is argparse.SUPPRESS:
            return text
        if "%(default)" in text:      # argparse would show the sealed None
            shown = _shown(action, getattr(action, "setting_default", action.default))
            text = text.replace("%(default)s", str(shown).replace("%", "%%"))
        notes = []
        if getattr(action, "setting_required", action.required):
            notes.append("required")
        elif "default" not in text.lower():
            shown = _shown(action, getattr(action, "setting_default", action.default))
            if shown is not None:
                notes.append(f"default: {shown}")
        env = getattr(action, "env", None)
        if env and env not in text:
            notes.append(f"env {env}")
        if not notes:
            return text
        # argparse %-formats help strings: a literal % in a default must not be taken for a placeholder.
        added = "; ".join(notes).replace("%", "%%")
        if text.endswith(")"):     # "... (0 picks one)" -> "... (0 picks one; default: 0; env X)"
            return f"{text[:-1]}; {added})"
        return f"{text} ({added})"


def _shown(action: argparse.Action, value: Any) -> str | None:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "on" if value else "off"
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else '""'


def _is_setting(action: argparse.Action) -> bool:
    """A flag whose value is a setting (not --help, --version, a sub-command, or a positional)."""
    return bool(action.option_strings) and action.dest != argparse.SUPPRESS and not isinstance(
        action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))


def _settings_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    # argparse has no public list of a parser's actions; `_actions` is what its own help and parsing walk.
    return [action for action in parser._actions if _is_setting(action) and action.dest != CONFIG]


def bind_env(parser: argparse.ArgumentParser, **names: str) -> argparse.ArgumentParser:
    """Give flags (by dest) the environment variable each is also read from: `bind_env(p, host="DIFFMESH_HOST")`."""
    actions = {action.dest: action for action in parser._actions}
    for dest, name in names.items():
        if dest not in actions:
            raise KeyError(f"bind_env: {parser.prog} has no flag with dest {dest!r}")
        actions[dest].env = name
    return parser


def add_config_argument(parser: argparse.ArgumentParser, env: str | None = None) -> argparse.ArgumentParser:
    parser.add_argument(f"--{CONFIG}", metavar="FILE.toml",
                        help="TOML file of settings, its keys the flags' names (e.g. max_queue = 4); flags and "
                        "environment variables win over it (default: none)")
    return bind_env(parser, config=env) if env else parser


def file_only(parser: argparse.ArgumentParser, **fields: tuple[Any, Any]) -> argparse.ArgumentParser:
    """Settings the --config file may hold that are no flag: `name=(annotation, default)` (the gateway's
    [[models]] tables)."""
    parser.settings_file_only = {**getattr(parser, "settings_file_only", {}), **fields}
    return parser


def seal(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Move each flag's default from argparse into the settings (and its help), so that a flag not given parses as
    None: only what was given outranks the environment and the file. Required flags may come from the file too.
    Idempotent: flags added later are sealed by the next call."""
    for action in _settings_actions(parser):
        if hasattr(action, "setting_default"):
            continue
        action.setting_default, action.default = action.default, None
        action.setting_required, action.required = action.required, False
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = HelpFormatter
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> Resolved:
    """Parse `argv` and resolve every setting; a bad value from any source is a usage error (one line, exit 2)."""
    seal(parser)
    args = parser.parse_args(argv)
    try:
        return resolve(parser, args)
    except SettingsError as error:
        parser.error(str(error))
        raise   # parser.error exits; this keeps type checkers sure we return


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Resolved:
    """`args` (flags given: not None) completed from the environment, the --config file and the defaults."""
    if isinstance(args, Resolved):
        return args
    seal(parser)
    actions = _settings_actions(parser)
    given = {action.dest: getattr(args, action.dest) for action in actions
             if getattr(args, action.dest, None) is not None}
    path = getattr(args, CONFIG, None) or _config_env(parser)
    file_data = read_config_file(path) if path else {}
    model = _model(parser, actions)
    model.file_data = file_data
    try:
        settings = model(**given)
    except ValidationError as error:
        raise SettingsError(_describe(error, actions, given, file_data, path)) from None
    except SourceError as error:     # an environment variable that does not parse
        raise SettingsError(f"{error}: {error.__cause__}") from None
    resolved = Resolved(**vars(args))
    for name in type(settings).model_fields:
        setattr(resolved, name, getattr(settings, name))
    setattr(resolved, CONFIG, path)
    return resolved


def read_config_file(path: str) -> dict[str, Any]:
    """The file's settings, keys as flag dests (`max-queue` and `max_queue` alike); one-line errors."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = tomllib.load(f)
    except OSError as error:
        raise SettingsError(f"--config {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"--config {path}: not valid TOML: {error}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def _config_env(parser: argparse.ArgumentParser) -> str | None:
    action = next((action for action in parser._actions if action.dest == CONFIG), None)
    env = getattr(action, "env", None)
    return os.environ.get(env) or None if env else None


class FlagSettings(BaseSettings):
    """The base of every command's settings model (built from its parser by `_model`)."""

    model_config = SettingsConfigDict(
        case_sensitive=True,            # DIFFMESH_HOST, not diffmesh_host
        env_ignore_empty=True,          # an empty variable is unset, as it always was here
        extra="forbid",                 # an unknown key in the file is an error, not silently ignored
        coerce_numbers_to_str=True,     # `retention_age = 3600` as well as "1h"
        validate_default=True,          # a string default goes through the flag's type, as argparse does
        protected_namespaces=(),        # flags named model, model_name
    )
    file_data: ClassVar[dict[str, Any]] = {}

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: the flags given (init kwargs), each flag's environment variable, the --config file.
        return init_settings, FlagEnvSource(settings_cls), InitSettingsSource(settings_cls, dict(cls.file_data))


class FlagEnvSource(EnvSettingsSource):
    """Each flag's own environment variable (field's `env`), or none; a list flag's value is comma-separated."""

    def get_field_value(self, field, field_name: str) -> tuple[Any, str, bool]:
        name = (field.json_schema_extra or {}).get("env")
        return (self.env_vars.get(name) if name else None), field_name, False

    def prepare_field_value(self, field_name: str, field, value: Any, value_is_complex: bool) -> Any:
        if value is None:
            return None
        if (field.json_schema_extra or {}).get("many"):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


def _model(parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> type[FlagSettings]:
    fields: dict[str, Any] = {action.dest: _field(action) for action in actions}
    fields.update(getattr(parser, "settings_file_only", {}))
    name = "".join(part.capitalize() for part in parser.prog.replace("-", " ").split()) + "Settings"
    return create_model(name, __base__=FlagSettings, **fields)


def _field(action: argparse.Action) -> tuple[Any, Any]:
    flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
    many = not flag and (isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
                         or isinstance(action.nargs, int))
    if flag:
        annotation: Any = bool
    elif many:
        annotation = Annotated[list[_scalar(action)], NoDecode, BeforeValidator(_one_or_many)]
    else:
        annotation = _scalar(action)
    extra = {"env": getattr(action, "env", None), "many": many}
    default = ... if action.setting_required else action.setting_default
    return Optional[annotation], Field(default, json_schema_extra={k: v for k, v in extra.items() if v})


def _scalar(action: argparse.Action) -> Any:
    native = action.type in (None, str, int, float)
    if action.choices is not None:
        annotation: Any = Literal[tuple(action.choices)]
    else:
        annotation = (action.type or str) if native else Any
    if action.type not in (None, str) and (not native or action.choices is not None):
        annotation = Annotated[annotation, BeforeValidator(_through(action.type))]
    if action.nargs == argparse.OPTIONAL and action.const is not None:
        # `compile = true` in the file means the bare flag (its const); false, not given.
        annotation = Annotated[annotation, BeforeValidator(lambda v: action.const if v is True else
                                                           (None if v is False else v))]
    return annotation


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, (str, int, float)) else value


def _through(flag_type: Callable[[str], Any]) -> Callable[[Any], Any]:
    """A flag's own type, for text (and numbers) from the environment or the file. Values it already made (a flag
    parsed by argparse; lists, tables) pass as they are, so the type must map its own output's text to itself."""

    def convert(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return value
        try:
            return flag_type(value if isinstance(value, str) else str(value))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
            raise ValueError(str(error)) from None

    return convert


def _describe(error: ValidationError, actions: list[argparse.Action], given: dict[str, Any],
              file_data: dict[str, Any], path: str | None) -> str:
    flags = {action.dest: action for action in actions}
    problems = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else ""
        action = flags.get(name)
        flag = action.option_strings[-1] if action else name
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            problems.append(f"--config {path}: unknown setting {name!r} (the keys are the flags' names)")
            continue
        if item["type"] == "missing":
            problems.append(f"{flag} is required (on the command line or in the --config file)")
            continue
        env = getattr(action, "env", None)
        if name in given:
            where = f"{flag} {given[name]!r}"
        elif env and os.environ.get(env):
            where = f"{env}={os.environ[env]!r} (for {flag})"
        elif name in file_data:
            where = f"--config {path}: {name} = {file_data[name]!r}"
        else:
            where = f"the default of {flag}"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)


def wxh(text: str) -> tuple[int, int]:
    """An argparse type for sizes: "832x480" -> (832, 480)."""
    width, sep, height = str(text).strip().lower().partition("x")
    if not sep or not width.strip().isdecimal() or not height.strip().isdecimal():
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 832x480")
    return int(width), int(height)
