"""What the commands share: options, their parsing, one-line errors and output."""

from __future__ import annotations

import functools
import os
import re
import sys

import click

from ..errors import SurgeryError
from ..vocab import TARGET_SHORTCUTS, TARGET_VARIANTS

__all__ = ["build_preprocessing", "image_loader", "image_options", "int8_options", "is_rank0", "model_argument",
           "duration", "for_the_shell", "original_options", "parse_batches", "show_progress", "preprocessing_options", "print_json", "size_option",
           "skip_bad_images_option", "skipped_line", "user_errors", "variant_options", "weights_option",
           "with_options"]


def user_errors(fn):
    """Turn SurgeryError (and missing files) into a one-line message and exit code 2, no traceback.

    Args:
        fn: a command's function.

    Returns:
        The wrapped function.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
            click.echo(f"error: {for_the_shell(str(e))}", err=True)
            sys.exit(2)
        except FileNotFoundError as e:
            click.echo(f"error: file not found: {e.filename or e}", err=True)
            sys.exit(2)
        except OSError as e:  # outputs are checked up front; this is the last line of defence
            click.echo(f"error: {e.strerror or e}: {e.filename or ''}", err=True)
            sys.exit(2)

    return wrapper


def for_the_shell(text: str) -> str:
    """A library message as the shell user needs it: the Python spellings beside the options dropped
    ("--force (force=True)" -> "--force", "`resnet-surgery recover` (Python: resnet_surgery.recover())" ->
    "`resnet-surgery recover`").

    Args:
        text: the message.

    Returns:
        The message without its Python asides.
    """
    text = re.sub(r"(--[\w-]+) \(\w+=True\)", r"\1", text)  # only an option's own alias: "(weights_only=True)" stays
    return re.sub(r" \(Python: [\w.]+\(\)\)", "", text)


def print_json(obj) -> None:
    """Print ``obj`` as indented JSON (anything JSON cannot hold as its str, a NaN or infinity as null).

    Args:
        obj: the data.
    """
    from ..utils import json_text  # imports torch: only once there is something to print

    click.echo(json_text(obj), nl=False)



model_argument = click.argument("model")
weights_option = click.option("--weights", default="none", show_default=True,
                              help="torchvision enum name (DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2), none, or a "
                                   ".pth/.pt/.safetensors state_dict")
size_option = click.option("--input-size", default=224, show_default=True, type=click.IntRange(8, 4096),
                           help="square input size used for shapes, MACs and probes")


def variant_options(fn):
    """--to, --shortcut, --exact and --prune-dead: what `convert` and `run` both take.

    Args:
        fn: a command's function.

    Returns:
        ``fn`` with the options.
    """
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


def parse_batches(ctx, param, value: str) -> list[int]:
    """--batch's callback: a comma-separated list of positive batch sizes.

    Args:
        ctx: click's context.
        param: the option.
        value: what was given, e.g. "1,8".

    Returns:
        The batch sizes.
    """
    try:
        batches = [int(b) for b in value.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of positive integers, e.g. 1,8")
    return batches


def with_options(options):
    """Apply a list of click options in order.

    Args:
        options: click options (decorators).

    Returns:
        A decorator.
    """

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


def show_progress(as_json: bool = False) -> bool:
    """Progress bars only on a terminal and never beside --json: in a saved log a bar is lines of escape codes.

    Args:
        as_json: whether the command prints JSON.

    Returns:
        Whether to show progress bars.
    """
    return not as_json and sys.stderr.isatty()


def duration(ctx, param, value: str | None) -> float | None:
    """A click callback: "90s", "30m", "1h30m", "2h" or plain seconds -> seconds (None stays None).

    Args:
        ctx: click's context.
        param: the option.
        value: what was typed.

    Returns:
        The seconds, or None.
    """
    if value is None:
        return None
    text = value.strip().lower()
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
    if not text or match is None or not any(match.groups()):
        raise click.BadParameter(f"{value!r} is not a duration; write it as 90s, 30m, 1h30m or a number of seconds")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise click.BadParameter(f"{value!r} is no time at all; give a budget above zero")
    return total


def build_preprocessing(preset, size, resize, mean, std, model=None):
    """--preset and its overrides; with none of them, the preprocessing ``model``'s weights were published with.

    Args:
        preset: "imagenet", "cifar10" or None.
        size: the final (centre-crop) size, or None.
        resize: the shorter side before the crop, or None.
        mean: three comma-separated numbers, or None.
        std: three comma-separated numbers, or None.
        model: the model whose own preprocessing is the default, or None.

    Returns:
        The transform.
    """
    from ..data import preprocessing, preset_transform
    if preset is None and all(v is None for v in (size, resize, mean, std)):
        return preprocessing(model)  # the library's rule: the model's own, else imagenet's

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
    """The images of --data as the library would load them, less unreadable ones with --skip-bad-images.

    Args:
        data: the image folder.
        transform: its preprocessing.
        batch_size: images per batch.
        num_images: a fixed random subset of this many, or None for all.
        skip_bad_images: leave out images that cannot be decoded.
        progress: show a progress bar while checking images.
        seed: seed of the subset.

    Returns:
        The DataLoader (its ``skipped_images`` lists what was left out).
    """
    from ..data import as_loader
    return as_loader(data, transform=transform, batch_size=batch_size, num_images=num_images, seed=seed,
                     skip_bad_images=skip_bad_images, progress=progress)


def skipped_line(loader) -> str:
    """The line that reports skipped unreadable images ("" when none were).

    Args:
        loader: a loader from `image_loader`.

    Returns:
        The line with its newline, or "".
    """
    skipped = loader.skipped_images
    more = f", ... {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"skipped {len(skipped)} unreadable images ({', '.join(skipped[:3])}{more})\n" if skipped else ""


def is_rank0() -> bool:
    """Whether this process speaks and writes: under torchrun every process runs the command, rank 0 of them does.

    Returns:
        True outside torchrun.
    """
    return os.environ.get("RANK", "0") == "0"


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
    click.option("--full-range-weights", is_flag=True,
                 help="--int8: 8-bit weights instead of 7 (reduce_range); they may saturate on CPUs without AVX-512 VNNI"),
]

original_options = [
    click.option("--original", help="the unconverted model (default: the source recorded in DIR's recipe)"),
    click.option("--weights", help="weights of --original (default: those recorded in DIR's recipe, else none)"),
]
