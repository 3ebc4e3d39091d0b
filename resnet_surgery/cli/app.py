"""The `resnet-surgery` command line: every bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import json
import sys

import click

from ..errors import SurgeryError
from ..vocab import TARGET_SHORTCUTS, TARGET_VARIANTS


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
        except OSError as e:  # outputs are checked up front; this is the last line of defence
            click.echo(f"error: {e.strerror or e}: {e.filename or ''}", err=True)
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



def variant_options(fn):
    """--to, --shortcut, --exact and --prune-dead: what `convert` and `run` both take."""
    for option in reversed([
        click.option("--to", "to", type=click.Choice([v.value for v in TARGET_VARIANTS]), help="target variant"),
        click.option("--shortcut", type=click.Choice([s.value for s in TARGET_SHORTCUTS]),
                     help="projection shortcut type"),
        click.option("--exact", is_flag=True, help="only function-preserving rewrites (error if none exists)"),
        click.option("--prune-dead", is_flag=True,
                     help="remove computation on positions nobody reads (exact, v1 models)"),
    ]):
        fn = option(fn)
    return fn


def convert_summary(name: str, weights: str, converted, macs_before: int, macs_after: int,
                    probe: tuple[float, float] | None) -> str:
    """The readable result of a conversion (printed, and saved as summary.txt)."""
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
    lines += [f"note: {n}" for n in recipe.notices]
    return "\n".join(lines)


@main.command("inspect")
@model_argument
@weights_option
@size_option
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@user_errors
def inspect_command(model, weights, input_size, as_json):
    """Show MODEL's residual blocks, stride placement, shortcuts, MACs and dead computation."""
    from ..engine.inspect import inspect
    from ..store import load_model

    report = inspect(load_model(model, weights), (3, input_size, input_size))
    print_json(report.to_dict()) if as_json else click.echo(str(report))


@main.command("convert")
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
    from ..engine.inspect import count_macs
    from ..engine.probe import max_difference
    from ..engine.rewrite import convert
    from ..history import history
    from ..store import load_model, save

    check_writable(out, force)
    size = (3, input_size, input_size)
    source = load_model(model, weights)
    converted = convert(source, to, shortcut=shortcut, exact=exact, prune_dead=prune_dead, input_size=size, warn=False)
    part = history(converted).recipe.trunk  # a detection model: its trunk is what changed, and what to measure
    before, after = (count_macs(m.get_submodule(part) if part else m, size) for m in (source, converted))
    probe = max_difference(source, converted, size) if exact or prune_dead else None
    summary = convert_summary(model, weights, converted, before, after, probe)
    save(converted, out, force=force, summary=summary)
    if as_json:
        print_json({"out": out, "macs_before": before, "macs_after": after,
                    "max_abs_diff": probe[0] if probe else None, "recipe": history(converted).recipe.to_json()})
    else:
        click.echo(summary)
        click.echo(f"written: {out}/ (model.safetensors, recipe.json, summary.txt)")

def transplant_summary(source: str, source_weights: str, target: str, target_weights: str, moved) -> str:
    """The readable result of a transplant (printed, and saved as summary.txt)."""
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
    lines += [f"note: {n}" for n in recipe.notices]
    return "\n".join(lines)


@main.command("transplant")
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
    from ..engine.transplant import transplant
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


# --- latency command: bench (resnet_surgery.latency); export is with the deploy commands at the end ----

def parse_batches(ctx, param, value: str) -> list[int]:
    try:
        batches = [int(b) for b in value.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of positive integers, e.g. 1,8")
    return batches


@main.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--batch", "batches", default="1", show_default=True, callback=parse_batches,
              help="comma-separated batch sizes, e.g. 1,8")
@click.option("--threads", type=click.IntRange(1), help="intra-op threads  [default: every usable core]")
@click.option("--min-time", default=5.0, show_default=True, type=click.FloatRange(0),
              help="seconds of timing per batch size, at least (more until the 95% interval is within +-1%)")
@click.option("--max-time", type=click.FloatRange(0), help="seconds per batch size at most  [default: 3 x --min-time]")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--plot", type=click.Path(dir_okay=False), help="write a PNG of the latency distributions")
@click.option("--force", is_flag=True, help="overwrite --plot if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@user_errors
def bench_command(models, batches, threads, min_time, max_time, device, plot, force, as_json):
    """Compare the latency of ONNX MODELS in onnxruntime; each is compared with the first."""
    from pathlib import Path

    from ..atomic import check_writable
    from ..deploy.latency import compare_latency

    if plot:
        check_writable(plot, force)
    if len({Path(m).resolve() for m in models}) != len(models):
        raise SurgeryError("the same file is given twice; pass each model once")
    stems = [Path(m).stem for m in models]
    names = stems if len(set(stems)) == len(stems) else [str(m) for m in models]
    report = compare_latency(dict(zip(names, models)), batch_sizes=batches, threads=threads, min_time_s=min_time,
                             max_time_s=max_time, device=device)
    if plot:
        report.plot(plot, force=force)
    print_json(report.to_dict()) if as_json else click.echo(str(report))
    if plot and not as_json:
        click.echo(f"plot written: {plot}")


# --- recovery commands: evaluate, calibrate, finetune (resnet_surgery.recovery) -------------------


def with_options(options):
    """Apply a list of click options in order."""

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


# --data and the preprocessing shared by evaluate, calibrate and finetune.
preprocessing_options = [
    click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
                 help="ImageFolder directory (<root>/<class>/<image>, labelled) or a folder of images (unlabelled)"),
    click.option("--preset", type=click.Choice(["imagenet", "cifar10"]),
                 help="imagenet: resize 256, crop 224, ImageNet mean/std; cifar10: 32x32, CIFAR-10 mean/std  "
                      "[default: the model's own (torchvision weights' transforms, timm's data config), else imagenet]"),
    click.option("--size", type=click.IntRange(8, 4096), help="final (centre-crop) size, overriding the preset"),
    click.option("--resize", type=click.IntRange(0, 4096), help="shorter side before the crop (0: straight to --size)"),
    click.option("--mean", help="normalisation mean, three comma-separated numbers"),
    click.option("--std", help="normalisation std, three comma-separated numbers"),
    click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="images per batch (per process)"),
]


def build_preprocessing(preset, size, resize, mean, std, model=None):
    """--preset and its overrides; with none of them, the preprocessing ``model``'s weights were published with."""
    from ..data import model_transform, preset_transform

    chosen = preset is not None or any(v is not None for v in (size, resize, mean, std))
    own = model_transform(model) if model is not None and not chosen else None
    if own is not None:
        return own

    def three(value, name):
        if value is None:
            return None
        try:
            numbers = tuple(float(v) for v in value.split(","))
        except ValueError:
            numbers = ()
        if len(numbers) != 3:
            raise SurgeryError(f"--{name} needs three comma-separated numbers (one per channel), got {value!r}")
        return numbers

    return preset_transform(preset or "imagenet", size=size, resize=resize, mean=three(mean, "mean"),
                            std=three(std, "std"))


skip_bad_images_option = click.option(
    "--skip-bad-images", is_flag=True,
    help="leave out images that cannot be decoded (each image is read once beforehand) and report them")


def image_loader(data, transform, batch_size, num_images, skip_bad_images, progress, seed=0):
    """The images of --data as the library would load them, less unreadable ones with --skip-bad-images."""
    from ..data import as_loader

    return as_loader(data, transform=transform, batch_size=batch_size, num_images=num_images, seed=seed,
                     skip_bad_images=skip_bad_images, progress=progress)


def skipped_line(loader) -> str:
    skipped = loader.skipped_images
    more = f", ... {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"skipped {len(skipped)} unreadable images ({', '.join(skipped[:3])}{more})\n" if skipped else ""


def is_rank0() -> bool:
    import os

    # Under torchrun every process runs the command; one of them speaks and writes.
    return os.environ.get("RANK", "0") == "0"


def load_original(spec, weights, converted):
    """--original (default: the source model recorded in the converted folder's recipe, with its weights)."""
    from ..history import history
    from ..store import load_model

    source = history(converted).recipe.source
    if spec is None:
        if not source.loadable:
            raise SurgeryError("the converted folder does not name a loadable source model; pass --original MODEL")
        spec = source.model
    if weights is None:
        weights = (source.weights or "none") if spec == source.model else "none"
    return load_model(spec, weights)


def classifier_only(model):
    """``model`` for build_preprocessing's default, or None for a detection or segmentation model: its weights'
    transforms keep each image's own size (no batch), and the trunk it calibrates on takes a normalised batch
    (the imagenet preset's mean/std, as torchvision's detection transform uses)."""
    from ..history import history
    from ..zoo.registry import DETECTION_MODELS, SEGMENTATION_MODELS

    source = history(model).source
    return None if source is not None and source.model in DETECTION_MODELS + SEGMENTATION_MODELS else model


original_options = [
    click.option("--original", help="the unconverted model (default: the source recorded in DIR's recipe)"),
    click.option("--weights", help="weights of --original (default: those recorded in DIR's recipe, else none)"),
]


@main.command("evaluate")
@click.argument("model_or_dir")
@weights_option
@click.option("--reference", help="compare with this model or converted folder (top-1 agreement, KL)")
@click.option("--reference-weights", default="none", show_default=True, help="weights of --reference")
@with_options(preprocessing_options)
@click.option("--num-images", type=click.IntRange(1), help="evaluate a fixed random subset of this many images")
@skip_bad_images_option
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
@user_errors
def evaluate_command(model_or_dir, weights, reference, reference_weights, data, preset, size, resize, mean, std,
                     batch_size, num_images, skip_bad_images, as_json):
    """Top-1/top-5 of MODEL_OR_DIR on an ImageFolder, and its agreement with a --reference model."""
    from ..recovery.evaluate import evaluate
    from ..store import load_model

    model = load_model(model_or_dir, weights)
    ref = load_model(reference, reference_weights) if reference else None
    transform = build_preprocessing(preset, size, resize, mean, std, model)
    loader = image_loader(data, transform, batch_size, num_images, skip_bad_images, not as_json)
    report = evaluate(model, loader, reference=ref, progress=not as_json)
    if as_json:
        print_json({**report.to_dict(), "skipped_images": loader.skipped_images})
    else:
        click.echo(f"{skipped_line(loader)}{model_or_dir}: {report}")


@main.command("calibrate")
@click.argument("converted_dir", type=click.Path(exists=True, file_okay=False))
@with_options(original_options)
@with_options(preprocessing_options)
@click.option("--num-images", default=2048, show_default=True, type=click.IntRange(1),
              help="unlabelled calibration images (a fixed random subset of --data)")
@click.option("--steps", default="bn,reconstruct", show_default=True,
              help="calibration steps in order, comma-separated: bn, reconstruct, transfer")
@click.option("--iterations", default=500, show_default=True, type=click.IntRange(1),
              help="optimizer steps per rewritten block (reconstruct)")
@click.option("--lr", default=1e-2, show_default=True, type=click.FloatRange(0, min_open=True),
              help="peak Adam learning rate relative to each weight's RMS: 1e-2 moves it ~1%% a step (reconstruct)")
@click.option("--block-only", is_flag=True,
              help="reconstruct each rewritten block alone, not jointly with the block before it")
@click.option("--ridge", default=1e-3, show_default=True, type=click.FloatRange(0), help="relative ridge of the refit (transfer)")
@click.option("--seed", default=0, show_default=True, help="seed of the image subset and of the mini-batches")
@skip_bad_images_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@user_errors
def calibrate_command(converted_dir, original, weights, data, preset, size, resize, mean, std, batch_size,
                      num_images, steps, iterations, lr, block_only, ridge, seed, skip_bad_images, out, force, as_json):
    """Repair the approximate rewrites of a converted folder on unlabelled images: BatchNorm re-estimation, then
    block reconstruction (each rewritten block trained to reproduce the original block's output). A detection
    model is calibrated on its trunk (images normalised with the imagenet preset, --size sets their size) and,
    like a segmentation model, scored by the relative error of its outputs."""
    from ..atomic import check_writable
    from ..history import history
    from ..recovery.calibrate import calibrate
    from ..store import load, save

    check_writable(out, force)
    converted = load(converted_dir)
    source = load_original(original, weights, converted)
    transform = build_preprocessing(preset, size, resize, mean, std, classifier_only(source))
    loader = image_loader(data, transform, batch_size, num_images, skip_bad_images, not as_json, seed=seed)
    model = calibrate(converted, source, loader, num_images=None, steps=tuple(s.strip() for s in steps.split(",")),
                      iterations=iterations, lr=lr, previous=not block_only, ridge=ridge, seed=seed,
                      progress=not as_json)
    report = history(model).calibration
    save(model, out, force=force, summary=f"calibrated {converted_dir} on {data}\n{skipped_line(loader)}{report}")
    if as_json:
        print_json({"out": out, **report.to_dict(), "skipped_images": loader.skipped_images})
    else:
        click.echo(f"{skipped_line(loader)}{report}\nwritten: {out}/")


@main.command("finetune")
@click.argument("converted_dir", type=click.Path(exists=True, file_okay=False))
@with_options(original_options)
@with_options(preprocessing_options)
@click.option("--objective", type=click.Choice(["logits", "features", "both"]), default="logits", show_default=True,
              help="logits: distillation; features: match the original's feature map before global pooling (MiR), "
                   "classifier frozen; both: the sum")
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(1))
@click.option("--steps", type=click.IntRange(1), help="optimizer steps instead of --epochs (as many passes as they need)")
@click.option("--augment", type=click.Choice(["auto", "none", "cifar", "imagenet"]), default="auto", show_default=True,
              help="per-image augmentation; auto: for features/both, cifar up to 64x64 images, else imagenet; "
                   "none for logits")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="peak learning rate [default: sgd 0.01, adamw 3e-4]")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]),
              help="[default: sgd for --objective logits, adamw for features/both]")
@click.option("--freeze", type=click.Choice(["none", "rewritten"]), default="none", show_default=True,
              help="rewritten: train only the blocks the conversion rewrote")
@click.option("--temperature", default=4.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--alpha", default=0.9, show_default=True, type=click.FloatRange(0, 1),
              help="weight of distillation against cross-entropy (when --data has labels)")
@click.option("--num-images", type=click.IntRange(1), help="train on a fixed random subset of this many images")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast (about 2x faster on CPUs with AVX-512 BF16)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--resume", is_flag=True, help="continue from the checkpoint beside --out (<out>.checkpoint.pt)")
@click.option("--force", is_flag=True, help="overwrite --out and start over from a stale checkpoint")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
@user_errors
def finetune_command(converted_dir, original, weights, data, preset, size, resize, mean, std, batch_size, objective,
                     epochs, steps, augment, lr, optimizer, freeze, temperature, alpha, num_images, bf16, out, resume,
                     force, as_json):
    """Fine-tune a converted folder to reproduce the original (its logits, or its features before global pooling);
    a checkpoint after each pass over the data.

    Runs unchanged on several processes: torchrun --nproc_per_node N $(which resnet-surgery) finetune ...
    """
    from pathlib import Path

    from ..atomic import check_writable
    from ..history import history
    from ..recovery.finetune import finetune
    from ..store import load, save

    check_writable(out, force)
    checkpoint = Path(out).with_name(Path(out).name + ".checkpoint.pt")
    converted = load(converted_dir)
    source = load_original(original, weights, converted)
    transform = build_preprocessing(preset, size, resize, mean, std, source)
    model = finetune(converted, source, data, objective=objective, epochs=epochs, steps=steps,
                     augment=augment, lr=lr, optimizer=optimizer, temperature=temperature,
                     alpha=alpha, freeze=freeze, checkpoint=checkpoint, resume=resume, force=force,
                     num_images=num_images, batch_size=batch_size, transform=transform, bf16=bf16,
                     progress=not as_json)
    if not is_rank0():
        return
    report = history(model).finetune
    save(model, out, force=force, summary=f"fine-tuned {converted_dir} on {data}\n{report}")
    checkpoint.unlink(missing_ok=True)  # the finished folder replaces it
    print_json({"out": out, **report.to_dict()}) if as_json else click.echo(f"{report}\nwritten: {out}/")


# --- the whole pipeline: run --------------------------------------------------------------------


@main.command("run")
@model_argument
@variant_options
@weights_option
@size_option
@click.option("--calibrate", "calibrate_data", type=click.Path(exists=True, file_okay=False),
              help="ImageFolder of unlabelled images: re-estimate BatchNorm and reconstruct the rewritten blocks")
@click.option("--finetune", "finetune_data", type=click.Path(exists=True, file_okay=False),
              help="ImageFolder for distillation fine-tuning from the original")
@click.option("--preset", type=click.Choice(["imagenet", "cifar10"]),
              help="preprocessing of --calibrate/--finetune images  [default: the model's own, else imagenet]")
@click.option("--num-images", default=2048, show_default=True, type=click.IntRange(1), help="calibration images")
@click.option("--iterations", type=click.IntRange(1), help="block reconstruction steps per block [default: calibrate's]")
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(1), help="fine-tuning epochs")
@click.option("--objective", type=click.Choice(["logits", "features", "both"]), default="logits", show_default=True,
              help="what fine-tuning matches: the original's logits, its features before global pooling, or both")
@click.option("--finetune-steps", type=click.IntRange(1), help="fine-tuning optimizer steps instead of --epochs")
@click.option("--batch", "batches", default="1", show_default=True, callback=parse_batches,
              help="batch sizes to time, e.g. 1,8")
@click.option("--threads", type=click.IntRange(1), help="onnxruntime intra-op threads (default: all cores)")
@click.option("--min-time", default=5.0, show_default=True, type=click.FloatRange(0),
              help="seconds of timing per batch size")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
@user_errors
def run_command(model, to, shortcut, exact, prune_dead, weights, input_size, calibrate_data, finetune_data, preset,
                num_images, iterations, epochs, objective, finetune_steps, batches, threads, min_time, out, force, as_json):
    """The whole job: convert MODEL, export original and converted to ONNX with parity, compare latency."""
    from ..workflows.pipeline import run_pipeline

    result = run_pipeline(model, to=to, shortcut=shortcut, exact=exact, prune_dead=prune_dead, weights=weights,
                          out=out, force=force, input_size=input_size, calibrate_data=calibrate_data,
                          finetune_data=finetune_data, preset=preset, num_images=num_images, iterations=iterations,
                          epochs=epochs, objective=objective, finetune_steps=finetune_steps, augment="auto",
                          batch_sizes=batches, threads=threads, min_time_s=min_time, echo=click.echo)
    if as_json:
        print_json({k: v for k, v in result.items() if k != "latency_table"})
        return
    macs = result["macs"]
    click.echo(f"{model}: {result['variants'][0]} -> {result['variants'][1]}, MACs {macs['original'] / 1e9:.3f} G -> "
               f"{macs['converted'] / 1e9:.3f} G ({macs['converted'] / macs['original'] - 1:+.1%}), "
               + ("exact" if result["exact"] else "changes the function"))
    for name, p in result["parity"].items():
        click.echo(f"ONNX parity {name}: max |diff| {p.get('max_abs_diff', '?')}, passed {p.get('passed', '?')}")
    click.echo(result["latency_table"])
    click.echo(f"written: {out}/ (converted/, original.onnx, converted.onnx, latency.json, latency.png, report.json)")


# --- deploy commands: export (fp32, int8), explore (resnet_surgery.export / quantize / explore) ----

# Preprocessing of image folders, as evaluate/calibrate/finetune take it (without their --data).
image_options = preprocessing_options[1:]

int8_options = [
    click.option("--int8", is_flag=True, help="quantize to int8 (onnxruntime static QDQ) after the fp32 export"),
    click.option("--calibration-data", type=click.Path(exists=True, file_okay=False),
                 help="--int8: ImageFolder or folder of images whose activation ranges set the int8 scales"),
    click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
                 show_default=True, help="--int8: how activation ranges are calibrated"),
    click.option("--calibration-images", default=512, show_default=True, type=click.IntRange(1),
                 help="--int8: calibration images (a fixed random subset)"),
    click.option("--parity-images", default=512, show_default=True, type=click.IntRange(1),
                 help="--int8: held-out images (never used for calibration) for agreement with fp32"),
    click.option("--min-agreement", default=98.0, show_default=True, type=click.FloatRange(0, 100),
                 help="--int8: keep the int8 file only if its top-1 agrees with fp32 on this percent of images"),
    click.option("--per-tensor", is_flag=True, help="--int8: one weight scale per tensor instead of per channel"),
    click.option("--activations", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
                 help="--int8: activation type (uint8 with int8 weights is the fast form on x86 CPUs)"),
]


def export_part(model, part):
    """The submodule --part of ``model``; a whole torchvision detection model is refused, naming --part backbone."""
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    if part:
        try:
            return model.get_submodule(part)
        except AttributeError:
            children = ", ".join(name for name, _ in model.named_children())
            raise SurgeryError(f"{type(model).__name__} has no submodule {part!r}; its parts are: {children}") from None
    if isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS)):
        raise SurgeryError(f"{type(model).__name__} takes a list of images and returns boxes per image, which this "
                           "export (one image tensor in, verified tensors out) does not cover: export its trunk with "
                           "--part backbone (the ResNet and its feature pyramid)")
    return model


@main.command("export")
@click.argument("model_or_dir")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the .onnx file to write")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's)")
@click.option("--static-batch", is_flag=True, help="fix the batch axis to 1 instead of leaving it dynamic")
@click.option("--part", help="export this submodule only, e.g. backbone (a detection model's backbone with its "
                             "feature pyramid; parity on every level)")
@weights_option
@size_option
@click.option("--atol", default=1e-4, show_default=True, type=click.FloatRange(0), help="parity: absolute tolerance")
@click.option("--rtol", default=1e-3, show_default=True, type=click.FloatRange(0),
              help="parity: tolerance relative to the largest |logit|")
@with_options(int8_options)
@with_options(image_options)
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print the parity report as JSON")
@user_errors
def export_command(model_or_dir, out, opset, static_batch, part, weights, input_size, atol, rtol, int8, calibration_data,
                   method, calibration_images, parity_images, min_agreement, per_tensor, activations, preset, size,
                   resize, mean, std, batch_size, force, as_json):
    """Export MODEL_OR_DIR (a model name or a folder written by `convert`) to ONNX, verified in onnxruntime.

    The file is kept only if onnxruntime matches PyTorch within the tolerance at batch 1 and 4. With --int8
    the verified fp32 file is quantized and --out is the int8 file, kept only if it agrees with fp32 on at
    least --min-agreement percent of held-out --calibration-data images.
    """
    import tempfile
    from pathlib import Path

    from ..atomic import check_writable, output_errors, temp_prefix
    from ..deploy.export import ParityError, export_onnx
    from ..deploy.quantize import QuantizationError, quantize_onnx
    from ..store import load_model

    if int8 != bool(calibration_data):
        raise SurgeryError("--int8 needs --calibration-data DIR (images to calibrate on), and only --int8 takes it")
    out = check_writable(out, force)
    model = export_part(load_model(model_or_dir, weights), part)
    click.echo(f"exporting {model_or_dir}{f' ({part})' if part else ''} to {out} and checking it in onnxruntime ...",
               err=True)
    if int8:  # the fp32 file is staged beside --out, under a name a later run cleans up if this one is killed
        with output_errors(out):
            out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(out), suffix=".export", dir=out.parent if int8 else None) as work:
        fp32_out = Path(work) / "fp32.onnx" if int8 else out
        try:
            report = export_onnx(model, fp32_out, input_size=(3, input_size, input_size),
                                 dynamic_batch=not static_batch, opset=opset, atol=atol, rtol=rtol, force=force)
        except ParityError as e:
            print_json(e.report.to_dict()) if as_json else click.echo(str(e.report), err=True)
            raise
        if not int8:
            print_json(report.to_dict()) if as_json else click.echo(str(report))
            return
        if not as_json:
            click.echo(str(report))
        click.echo(f"quantizing to int8, calibrated on {calibration_data} ...", err=True)
        try:
            int8_report = quantize_onnx(fp32_out, out, calibration_data, per_channel=not per_tensor, method=method,
                                        activations=activations, num_images=calibration_images, parity_images=parity_images,
                                        min_agreement=min_agreement, batch_size=batch_size, force=force,
                                        transform=build_preprocessing(preset, size, resize, mean, std, model),
                                        progress=not as_json)
        except QuantizationError as e:
            print_json(e.report.to_dict()) if as_json else click.echo(str(e.report), err=True)
            raise
    if as_json:
        print_json({"fp32": report.to_dict(), "int8": int8_report.to_dict()})
    else:
        click.echo(str(int8_report))



@main.command("explore")
@model_argument
@weights_option
@with_options(preprocessing_options)
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False),
              help="labelled held-out ImageFolder for top-1 [default: hold out --eval-images of --data]")
@click.option("--eval-images", type=click.IntRange(1),
              help="held-out images to evaluate on  [default: all of --eval-data, else 1000 of --data]")
@click.option("--input-size", type=click.IntRange(8, 4096), help="model input size  [default: --size, else the crop of the preprocessing]")
@click.option("--variants", help="comma-separated candidates besides the original  [default: all of v1,v1.5,d,v1-pruned,v1.5-exact]")
@click.option("--int8/--no-int8", default=True, show_default=True, help="also quantize every candidate to int8")
@click.option("--calibrate-images", default=2048, show_default=True, type=click.IntRange(1),
              help="images that calibrate each approximate rewrite")
@click.option("--calibrate-steps", default="bn,reconstruct", show_default=True,
              help="calibration steps, comma-separated (bn alone is the cheap one, when only latency matters)")
@click.option("--finetune-steps", default=0, show_default=True, type=click.IntRange(0),
              help="distillation fine-tuning steps after calibration (0: none)")
@click.option("--quant-images", default=512, show_default=True, type=click.IntRange(1), help="int8 calibration images")
@click.option("--min-agreement", default=98.0, show_default=True, type=click.FloatRange(0, 100),
              help="drop an int8 candidate whose top-1 agrees with its fp32 file on fewer held-out images (percent)")
@click.option("--batch", "batches", default="1", show_default=True, callback=parse_batches,
              help="comma-separated batch sizes to time, e.g. 1,8")
@click.option("--threads", type=click.IntRange(1), help="onnxruntime intra-op threads  [default: every usable core]")
@click.option("--min-time", default=5.0, show_default=True, type=click.FloatRange(0), help="seconds of timing per batch size")
@click.option("--max-time", type=click.FloatRange(0), help="seconds per batch size at most  [default: 3 x --min-time]")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="output folder; a rerun with the same folder reuses every finished candidate")
@click.option("--force", is_flag=True, help="rebuild finished candidates instead of reusing them")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of the table")
@user_errors
def explore_command(model, weights, data, preset, size, resize, mean, std, batch_size, eval_data, eval_images,
                    input_size, variants, int8, calibrate_images, calibrate_steps, finetune_steps, quant_images,
                    min_agreement, batches, threads, min_time, max_time, out, force, as_json):
    """Which variant of MODEL to deploy: every reachable variant recovered on --data, exported with parity,
    optionally int8, evaluated on held-out images and timed in one run; a table, explore.json and explore.png."""
    from ..data import PRESETS, transform_size
    from ..store import load_model
    from ..workflows.explore import check_explore_out, explore

    check_explore_out(out)
    original = load_model(model, weights)
    transform = build_preprocessing(preset, size, resize, mean, std, original)
    side = input_size or transform_size(transform) or PRESETS[preset or "imagenet"]["size"]
    report = explore(original, data, eval_data=eval_data, input_size=(3, side, side),
                     variants=[v.strip() for v in variants.split(",")] if variants else None, int8=int8,
                     calibrate_images=calibrate_images, calibrate_steps=[s.strip() for s in calibrate_steps.split(",")],
                     finetune_steps=finetune_steps, eval_images=eval_images,
                     quant_images=quant_images, min_agreement=min_agreement, batch_sizes=batches, threads=threads,
                     min_time_s=min_time, max_time_s=max_time, out=out, force=force, batch_size=batch_size,
                     preset=preset or "imagenet", transform=transform, progress=not as_json)
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(str(report))
        click.echo(f"written: {out}/ (explore.json, explore.png, candidates/)")
