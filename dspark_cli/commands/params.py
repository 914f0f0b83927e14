"""Path and text options shared by the commands. An empty value is refused (exit 2) rather than read
as the current directory or the default, and a path is not checked for permissions while parsing:
typer's check would make an unreadable path a usage error (2), where README says 3."""

from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup

from dspark_cli.errors import EXIT_USAGE, UsageError


def _text(name: str):
    def parse(value: str) -> str:
        if not value.strip():
            raise UsageError(f"{name}: empty value")
        return value
    return parse


def _path(name: str):
    def parse(value) -> Path:
        if isinstance(value, Path):  # a default, not typed by the user
            return value
        if value == "":
            raise UsageError(f"{name}: empty path")
        return Path(value)
    return parse


def path_option(default, *names: str, **kwargs):
    return typer.Option(default, *names, parser=_path(names[0]), metavar="PATH", **kwargs)


def text_option(default, *names: str, **kwargs):
    return typer.Option(default, *names, parser=_text(names[0]), metavar="TEXT", **kwargs)


def path_argument(default, name: str, **kwargs):
    return typer.Argument(default, parser=_path(name), metavar=name, **kwargs)


def text_argument(default, name: str, **kwargs):
    return typer.Argument(default, parser=_text(name), metavar=name, **kwargs)


def flag_option(*names: str, **kwargs):
    """An on/off flag: no value after it, and none shown in --help (typer would show `<bool>`)."""
    return typer.Option(False, *names, metavar="", **kwargs)


def _plain_help(base: type) -> type:
    """`base` whose --help shows no value type (typer 0.29 shows its flag's, `<bool>`, on every screen)
    and whose named arguments show their name alone (typer 0.29 adds `<str>` after ENGINE)."""
    class PlainHelp(base):
        def get_help_option(self, ctx):
            option = super().get_help_option(ctx)
            if option is not None:
                option.metavar = ""
            return option

        def get_params(self, ctx):
            params = super().get_params(ctx)
            for param in params:
                if param.param_type_name == "argument" and param.metavar:
                    param.display_type_rich = lambda ctx: None  # the metavar (ENGINE, PATH) says it
            return params
    return PlainHelp


_PLAIN_HELP_GROUP, _PLAIN_HELP_COMMAND = _plain_help(TyperGroup), _plain_help(TyperCommand)


def plain_help_typer(**kwargs) -> typer.Typer:
    """typer.Typer whose group and commands show --help as flag_option shows a flag."""
    group = typer.Typer(cls=_PLAIN_HELP_GROUP, **kwargs)
    command = group.command

    def plain_help_command(*args, **options):
        return command(*args, **{"cls": _PLAIN_HELP_COMMAND, **options})

    group.command = plain_help_command
    return group


def command_group(**kwargs) -> typer.Typer:
    """A typer group that, called without a command, prints its help and exits 2 (bad usage). Not
    no_args_is_help: under click < 8.2 (typer < 0.26 takes the installed click) that exits 0."""
    group = plain_help_typer(**kwargs)

    @group.callback(invoke_without_command=True)
    def _help_without_command(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None:
            text = ctx.get_help()  # with rich, typer prints the help itself and returns ""
            if text:
                typer.echo(text)
            raise typer.Exit(EXIT_USAGE)

    return group
