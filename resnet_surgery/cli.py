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

model_argument = click.argument("model")
weights_option = click.option("--weights", default="none", show_default=True,
                              help="torchvision enum name (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2), none, or a "
                                   ".pth/.pt/.safetensors state_dict")
size_option = click.option("--input-size", default=224, show_default=True, type=click.IntRange(8, 4096),
                           help="square input size used for shapes, MACs and probes")


def convert_summary(name: str, weights: str, converted, macs_before: int, macs_after: int,
                    probe: tuple[float, float] | None) -> str:
    """The readable result of a conversion (printed, and saved as summary.txt)."""
    from .report import table

    recipe = converted.resnet_surgery_recipe
    records = recipe["rewrites"]
    lines = [f"{name} (weights {weights}): {recipe['variant_before']} -> {recipe['variant_after']}, "
             f"{len(records)} rewrites ({sum(not r['exact'] for r in records)} change the function)"]
    if records:
        lines += table([("block", "rewrite", "exact")] +
                       [(r["block"], r["op"], "yes" if r["exact"] else "NO") for r in records])
    change = (macs_after - macs_before) / macs_before
    lines.append(f"MACs: {macs_before / 1e9:.3f} G -> {macs_after / 1e9:.3f} G ({change:+.1%})")
    if probe is not None:
        lines.append(f"max |difference| on a probe input: {probe[0]:.3g} (max |logit| {probe[1]:.3g}, "
                     f"relative {probe[0] / max(probe[1], 1e-12):.2g})")
    lines += [f"note: {n}" for n in recipe["notices"]]
    return "\n".join(lines)


@main.command("inspect")
@model_argument
@weights_option
@size_option
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@user_errors
def inspect_command(model, weights, input_size, as_json):
    """Show MODEL's residual blocks, stride placement, shortcuts, MACs and dead computation."""
    from .models import load_model
    from .report import inspect

    report = inspect(load_model(model, weights), (3, input_size, input_size))
    print_json(report.to_dict()) if as_json else click.echo(str(report))


@main.command("convert")
@model_argument
@click.option("--to", "to", type=click.Choice(["v1", "v1.5", "d"]), help="target variant")
@click.option("--shortcut", type=click.Choice(["avgpool", "conv1x1", "conv3x3"]), help="projection shortcut type")
@click.option("--exact", is_flag=True, help="only function-preserving rewrites (error if none exists)")
@click.option("--prune-dead", is_flag=True, help="remove computation on positions nobody reads (exact, v1 models)")
@weights_option
@size_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@user_errors
def convert_command(model, to, shortcut, exact, prune_dead, weights, input_size, out, force, as_json):
    """Convert MODEL to another downsampling variant and write it to --out."""
    import warnings

    from .atomic import check_writable
    from .models import load_model
    from .recipe import save
    from .report import count_macs
    from .rewrite import SurgeryNotice, convert, max_difference

    check_writable(out, force)
    size = (3, input_size, input_size)
    source = load_model(model, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryNotice)
        converted = convert(source, to, shortcut=shortcut, exact=exact, prune_dead=prune_dead, input_size=size)
    before, after = count_macs(source, size), count_macs(converted, size)
    probe = max_difference(source, converted, size) if exact or prune_dead else None
    summary = convert_summary(model, weights, converted, before, after, probe)
    save(converted, out, force=force, summary=summary)
    if as_json:
        print_json({"out": out, "macs_before": before, "macs_after": after,
                    "max_abs_diff": probe[0] if probe else None, "recipe": converted.resnet_surgery_recipe})
    else:
        click.echo(summary)
        click.echo(f"written: {out}/ (model.safetensors, recipe.json, summary.txt)")

# --- export and latency commands: export, bench (resnet_surgery.export / latency) -----------------

# --- recovery commands: evaluate, calibrate, finetune (resnet_surgery.recovery) -------------------

# --- the whole pipeline: run --------------------------------------------------------------------
