"""The `resnet-surgery` command line: every bad input is one line on stderr and exit code 2.

Each command parses its options, calls one library function and prints; the commands live in
model_commands, recover_commands, deploy_commands and workflow_commands, their shared options in options.
"""

from __future__ import annotations

import click

from .deploy_commands import bench_command, export_command
from .model_commands import convert_command, inspect_command, transplant_command
from .recover_commands import calibrate_command, evaluate_command, finetune_command, recover_command
from .workflow_commands import explore_command, run_command

__all__ = ["main"]


@click.group()
@click.version_option(package_name="resnet-surgery")
def main():
    """Convert ResNets between downsampling designs (v1, v1.5, ResNet-D) and prove what that did."""


for command in (inspect_command, convert_command, transplant_command, bench_command, evaluate_command,
                calibrate_command, finetune_command, recover_command, run_command, export_command, explore_command):
    main.add_command(command)
