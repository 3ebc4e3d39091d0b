"""The `resnet-surgery` command line: every bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import json
import sys

import click

from .errors import SurgeryError


def user_errors(fn):
    """Turn SurgeryError (and missing files) into a one-line message and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except FileNotFoundError as e:
            click.echo(f"error: file not found: {e.filename or e}", err=True)
            sys.exit(2)

    return wrapper


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group()
@click.version_option(package_name="resnet-surgery")
def main():
    """Convert ResNets between downsampling designs (v1, v1.5, ResNet-D) and prove what that did."""


# --- engine commands: inspect, convert (resnet_surgery.blocks / rewrite) -------------------------

# --- export and latency commands: export, bench (resnet_surgery.export / latency) -----------------

# --- recovery commands: evaluate, calibrate, finetune (resnet_surgery.recovery) -------------------

# --- the whole pipeline: run --------------------------------------------------------------------
