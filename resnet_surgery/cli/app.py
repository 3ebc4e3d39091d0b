"""The `resnet-surgery` command line: every bad input is one line on stderr and exit code 2.

Each command parses its options, calls one library function and prints; the commands live in
model_commands, recover_commands, deploy_commands and workflow_commands, their shared options in options.
"""

from __future__ import annotations

import sys

import click

from .deploy_commands import bench_command, export_command
from .model_commands import convert_command, inspect_command, transplant_command
from .recover_commands import calibrate_command, evaluate_command, finetune_command, recover_command
from .workflow_commands import explore_command, run_command

__all__ = ["main"]


class _Commands(click.Group):
    """The command group, whose usage errors (a bad option value, a missing option) are one line too."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # A shell cannot pass a NUL byte, a Python caller can: os.stat would raise ValueError on such a path.
        if bad := [a for a in args if "\x00" in a]:
            raise click.UsageError(f"the argument {bad[0]!r} holds a NUL byte; no file name or value can", ctx)
        return super().parse_args(ctx, args)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:  # a caller that handles click's exceptions itself
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError":  # the bare command: its help, as click prints it
                click.echo(e.format_message(), err=True)
                sys.exit(2)
            message = " ".join(e.format_message().split()).rstrip(".")
            hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            click.echo(f"error: {message}{hint}", err=True)
            sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)  # as click's standalone mode ends: --help and --version too


@click.group(cls=_Commands)
@click.version_option(package_name="resnet-surgery")
def main():
    """Convert ResNets between downsampling designs (v1, v1.5, ResNet-D) and prove what that did."""


for command in (inspect_command, convert_command, transplant_command, bench_command, evaluate_command,
                calibrate_command, finetune_command, recover_command, run_command, export_command, explore_command):
    main.add_command(command)
