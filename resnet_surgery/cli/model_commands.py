"""Commands on models: inspect, convert, transplant."""

from __future__ import annotations

import click

from .options import (
    for_the_shell,
    model_argument,
    print_json,
    size_option,
    user_errors,
    variant_options,
    weights_option,
)

__all__ = ["convert_command", "convert_summary", "inspect_command", "transplant_command", "transplant_summary"]


def convert_summary(name: str, weights: str, converted, macs_before: int, macs_after: int,
                    probe: tuple[float, float] | None) -> str:
    """The readable result of a conversion (printed, and saved as summary.txt).

    Args:
        name: the model as given.
        weights: its weights as given.
        converted: the converted model.
        macs_before: MACs per image before (of the trunk for a detection model).
        macs_after: MACs per image after.
        probe: (max |difference|, max |output|) on a probe input, or None.

    Returns:
        The text.
    """
    from ..history import history
    from ..utils import table
    recipe = history(converted).recipe
    records = recipe.rewrites
    lines = [f"{name} (weights {weights}): {recipe.variant_before} -> {recipe.variant_after}, "
             f"{len(records)} rewrites ({sum(not r.exact for r in records)} change the function)"]
    if records:
        lines += table([("block", "rewrite", "exact")] +
                       [(r.block, str(r.op), "yes" if r.exact else "NO") for r in records])
    change = (macs_after - macs_before) / macs_before
    part = f" (trunk {recipe.trunk})" if recipe.trunk else ""
    lines.append(f"MACs{part}: {macs_before / 1e9:.3f} G -> {macs_after / 1e9:.3f} G ({change:+.1%})")
    if probe is not None:
        lines.append(f"max |difference| on a probe input: {probe[0]:.3g} (max |logit| {probe[1]:.3g}, "
                     f"relative {probe[0] / max(probe[1], 1e-12):.2g})")
    lines += [f"note: {for_the_shell(n)}" for n in recipe.notices]
    return "\n".join(lines)


@click.command("inspect")
@model_argument
@weights_option
@size_option
@click.option("--grid", is_flag=True, help="also print what each downsampling conv reads: how many output positions read each input position (.: never)")
@click.option("--plot", type=click.Path(dir_okay=False), help="write a PNG of what each downsampling conv reads")
@click.option("--compare", multiple=True, metavar="MODEL",
              help="with --plot: another model (a name, built with random weights, or a folder) in a column beside it")
@click.option("--force", is_flag=True, help="overwrite --plot if it exists")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@user_errors
def inspect_command(model, weights, input_size, grid, plot, compare, force, as_json):
    """Show MODEL's residual blocks, stride placement, shortcuts, MACs and dead computation."""
    from ..atomic import check_writable
    from ..engine import inspect
    from ..store import load_model
    if compare and not plot:
        raise click.UsageError("--compare goes with --plot PATH")
    if plot:
        check_writable(plot, force)
    size = (3, input_size, input_size)
    loaded = load_model(model, weights)
    report = inspect(loaded, size)
    text = report.grid(loaded) if grid else None
    if plot:
        report.plot(plot, loaded, compare=[load_model(m) for m in compare], force=force)
    if as_json:
        print_json({**report.to_dict(), **({"grid": text} if grid else {}), **({"plot": plot} if plot else {})})
        return
    click.echo(str(report))
    if grid:
        click.echo("\nwhat each downsampling conv reads (top-left patch of its input; each position: how many outputs read it, .: never):\n"
                   + text)
    if plot:
        click.echo(f"plot written: {plot}")


@click.command("convert")
@model_argument
@variant_options
@weights_option
@size_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@user_errors
def convert_command(model, to, shortcut, exact, prune_dead, weights, input_size, out, force, as_json):
    """Convert MODEL to another downsampling variant and write it to --out."""
    from ..atomic import check_writable
    from ..store import save
    from ..workflows import convert_model
    check_writable(out, force)
    # The probe when one was asked for: an exact rewrite (or pruning) is expected to keep the function.
    done = convert_model(model, weights, to=to, shortcut=shortcut, exact=exact, prune_dead=prune_dead,
                         input_size=input_size, probe=exact or prune_dead)
    summary = convert_summary(model, weights, done.converted, done.macs_before, done.macs_after, done.probe)
    save(done.converted, out, force=force, summary=summary)
    if as_json:
        print_json({"out": out, "macs_before": done.macs_before, "macs_after": done.macs_after,
                    "max_abs_diff": done.probe[0] if done.probe else None, "recipe": done.recipe.to_json()})
    else:
        click.echo(summary)
        click.echo(f"written: {out}/ (model.safetensors, recipe.json, summary.txt)")


def transplant_summary(source: str, source_weights: str, target: str, target_weights: str, moved) -> str:
    """The readable result of a transplant (printed, and saved as summary.txt).

    Args:
        source: the source model as given.
        source_weights: its weights as given.
        target: the --into model as given.
        target_weights: its weights as given.
        moved: the transplanted model.

    Returns:
        The text.
    """
    from ..history import history
    from ..utils import table
    recipe = history(moved).recipe
    t = recipe.transplant
    blocks = sum(s["section"].startswith("block") for s in t["sections"])
    lines = [f"{source} (weights {source_weights}) into {target} (weights {target_weights}): {blocks} blocks, "
             f"{len(t['modules'])} modules, {t['tensors']} tensors copied by structure"]
    lines += table([("section", "source", "target", "modules")] +
                   [(s["section"], s["source"], s["target"], str(s["modules"])) for s in t["sections"]])
    if recipe.rewrites:
        lines.append(f"target converted first: {recipe.variant_before} -> {recipe.variant_after}, "
                     f"{len(recipe.rewrites)} rewrites ({', '.join(sorted({str(r.op) for r in recipe.rewrites}))})")
    probe = t["probe"]
    if probe is None:
        lines.append("outputs not compared: --no-head keeps the target's own head")
    else:
        lines.append(f"max |difference| from the source on a probe input: {probe['max_abs_diff']:.3g} (max |logit| "
                     f"{probe['max_abs']:.3g}, relative {probe['max_abs_diff'] / max(probe['max_abs'], 1e-12):.2g})")
    lines += [f"note: {for_the_shell(n)}" for n in recipe.notices]
    return "\n".join(lines)


@click.command("transplant")
@click.argument("source")
@click.option("--into", "target", required=True, help="the model whose class and layout receive SOURCE's weights")
@weights_option
@click.option("--into-weights", default="none", show_default=True, help="weights of --into (as --weights)")
@click.option("--no-head", is_flag=True, help="copy only the trunk: keep --into's classifier (e.g. other classes)")
@size_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@user_errors
def transplant_command(source, target, weights, into_weights, no_head, input_size, out, force, as_json):
    """Copy SOURCE's weights into the layout of --into (another implementation of the same network), matched
    by structure rather than names, converting --into's stride placement or shortcuts to SOURCE's if they differ."""
    from ..atomic import check_writable
    from ..engine import transplant
    from ..history import history
    from ..store import load_model, save
    check_writable(out, force)
    size = (3, input_size, input_size)
    src, tgt = load_model(source, weights), load_model(target, into_weights)
    moved = transplant(src, tgt, head=not no_head, input_size=size, warn=False)  # the summary lists them as notes
    summary = transplant_summary(source, weights, target, into_weights, moved)
    save(moved, out, force=force, summary=summary)
    if as_json:
        print_json({"out": out, "recipe": history(moved).recipe.to_json()})
    else:
        click.echo(summary)
        click.echo(f"written: {out}/ (model.safetensors, recipe.json, summary.txt)")
