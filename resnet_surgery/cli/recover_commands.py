"""Commands that measure and recover accuracy: evaluate, calibrate, finetune, and recover (all of them to a target)."""

from __future__ import annotations

from pathlib import Path

import click

from ..defaults import EVAL_IMAGES, RECONSTRUCT_ITERATIONS, RECONSTRUCT_LR, RECOVER_STAGES
from .options import (
    build_preprocessing,
    duration,
    image_loader,
    is_rank0,
    original_options,
    preprocessing_options,
    print_json,
    show_progress,
    skip_bad_images_option,
    skipped_line,
    user_errors,
    weights_option,
    with_options,
)

__all__ = ["calibrate_command", "evaluate_command", "finetune_command", "recover_command"]


@click.command("evaluate")
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
    from ..recovery import evaluate
    from ..store import load_model
    model = load_model(model_or_dir, weights)
    ref = load_model(reference, reference_weights) if reference else None
    transform = build_preprocessing(preset, size, resize, mean, std, model)
    loader = image_loader(data, transform, batch_size, num_images, skip_bad_images, show_progress(as_json))
    report = evaluate(model, loader, reference=ref, progress=show_progress(as_json))
    if as_json:
        print_json({**report.to_dict(), "skipped_images": loader.skipped_images})
    else:
        click.echo(f"{skipped_line(loader)}{model_or_dir}: {report}")


@click.command("calibrate")
@click.argument("converted_dir", type=click.Path(exists=True, file_okay=False))
@with_options(original_options)
@with_options(preprocessing_options)
@click.option("--num-images", default=2048, show_default=True, type=click.IntRange(1),
              help="unlabelled calibration images (a fixed random subset of --data)")
@click.option("--steps", default="bn,reconstruct", show_default=True,
              help="calibration steps in order, comma-separated: bn, reconstruct, transfer")
@click.option("--iterations", type=click.IntRange(1),
              help=f"optimizer steps per rewritten block (reconstruct) [default: {RECONSTRUCT_ITERATIONS}, fewer for "
                   "a block whose MACs make that cost minutes: 20-70 for ResNet-50's at 224 px]")
@click.option("--lr", default=RECONSTRUCT_LR, show_default=True, type=click.FloatRange(0, min_open=True),
              help="peak Adam learning rate relative to each weight's RMS: 3e-2 moves it ~3%% a step; cut to a "
                   "third whenever the held-back error rises (reconstruct)")
@click.option("--block-only", is_flag=True,
              help="reconstruct each rewritten block alone, not jointly with the block before it")
@click.option("--after", default=0, show_default=True, type=click.IntRange(0),
              help="also reconstruct up to this many blocks after each rewritten block with it (reconstruct)")
@click.option("--bf16", is_flag=True, help="reconstruct under bfloat16 autocast (CPUs with AVX-512 BF16/AMX, GPUs)")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="run the passes and reconstruction in channels-last memory format (faster on CPUs)")
@click.option("--ridge", default=1e-3, show_default=True, type=click.FloatRange(0), help="relative ridge of the refit (transfer)")
@click.option("--seed", default=0, show_default=True, help="seed of the image subset and of the mini-batches")
@skip_bad_images_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@user_errors
def calibrate_command(converted_dir, original, weights, data, preset, size, resize, mean, std, batch_size,
                      num_images, steps, iterations, lr, block_only, after, bf16, channels_last, ridge, seed,
                      skip_bad_images, out, force, as_json):
    """Repair the approximate rewrites of a converted folder on unlabelled images: BatchNorm re-estimation, then
    block reconstruction (each rewritten block trained to reproduce the original block's output). A detection
    model is calibrated on its trunk (images normalised with the imagenet preset, --size sets their size) and,
    like a segmentation model, scored by the relative error of its outputs."""
    from ..atomic import check_writable
    from ..history import history
    from ..recovery import calibrate
    from ..store import load, load_original, save
    from ..zoo import classifier_only
    check_writable(out, force)
    converted = load(converted_dir)
    source = load_original(converted, original, weights)
    transform = build_preprocessing(preset, size, resize, mean, std, classifier_only(source))
    loader = image_loader(data, transform, batch_size, num_images, skip_bad_images, show_progress(as_json),
                          seed=seed)
    model = calibrate(converted, source, loader, num_images=None, steps=tuple(s.strip() for s in steps.split(",")),
                      iterations=iterations, lr=lr, previous=not block_only, ridge=ridge, seed=seed,
                      after=after, bf16=bf16, channels_last=channels_last, progress=show_progress(as_json))
    report = history(model).calibration
    save(model, out, force=force, summary=f"calibrated {converted_dir} on {data}\n{skipped_line(loader)}{report}")
    if as_json:
        print_json({"out": out, **report.to_dict(), "skipped_images": loader.skipped_images})
    else:
        click.echo(f"{skipped_line(loader)}{report}\nwritten: {out}/")


@click.command("finetune")
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
@click.option("--channels-last", is_flag=True, help="train in channels-last memory format")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--resume", is_flag=True, help="continue from the checkpoint beside --out (<out>.checkpoint.pt)")
@click.option("--force", is_flag=True, help="overwrite --out and start over from a stale checkpoint")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
@user_errors
def finetune_command(converted_dir, original, weights, data, preset, size, resize, mean, std, batch_size, objective,
                     epochs, steps, augment, lr, optimizer, freeze, temperature, alpha, num_images, bf16,
                     channels_last, out, resume, force, as_json):
    """Fine-tune a converted folder to reproduce the original (its logits, or its features before global pooling);
    a checkpoint after each pass over the data.

    Runs unchanged on several processes: torchrun --nproc_per_node N $(which resnet-surgery) finetune ...
    """
    from ..atomic import check_writable
    from ..history import history
    from ..recovery import finetune
    from ..store import load, load_original, save
    check_writable(out, force)
    checkpoint = Path(out).with_name(Path(out).name + ".checkpoint.pt")
    converted = load(converted_dir)
    source = load_original(converted, original, weights)
    transform = build_preprocessing(preset, size, resize, mean, std, source)
    model = finetune(converted, source, data, objective=objective, epochs=epochs, steps=steps,
                     augment=augment, lr=lr, optimizer=optimizer, temperature=temperature,
                     alpha=alpha, freeze=freeze, checkpoint=checkpoint, resume=resume, force=force,
                     num_images=num_images, batch_size=batch_size, transform=transform, bf16=bf16,
                     channels_last=channels_last, progress=show_progress(as_json))
    if not is_rank0():
        return
    report = history(model).finetune
    save(model, out, force=force, summary=f"fine-tuned {converted_dir} on {data}\n{report}")
    checkpoint.unlink(missing_ok=True)  # the finished folder replaces it
    print_json({"out": out, **report.to_dict()}) if as_json else click.echo(f"{report}\nwritten: {out}/")


# --- the whole pipeline: run --------------------------------------------------------------------


@click.command("recover")
@click.argument("converted_dir", type=click.Path(exists=True, file_okay=False))
@with_options(original_options)
@with_options(preprocessing_options)
@click.option("--target", type=float, help="stop once the gap to the original is at most this many points: top-1 "
              "points with labels (class folders), else the % of images classified otherwise than by the original")
@click.option("--budget", callback=duration, help="wall time the whole recovery may take: 90s, 30m, 1h30m "
              "(a stage in flight stops at a step boundary) [default: none]")
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False),
              help="held-back images to judge every stage on (default: --eval-images of --data, never trained on)")
@click.option("--eval-images", default=EVAL_IMAGES, show_default=True, type=click.IntRange(1),
              help="held-back images taken from --data (or from --eval-data)")
@click.option("--calibrate-images", default=2048, show_default=True, type=click.IntRange(1),
              help="images calibration and feature mimicking use")
@click.option("--iterations", type=click.IntRange(1), help="reconstruction steps per block [default: calibrate's]")
@click.option("--stages", default=",".join(RECOVER_STAGES), show_default=True,
              help="the stages to run (always in this order), comma-separated; finetune needs labels")
@click.option("--no-labels", is_flag=True, help="ignore the class folders: judge by agreement, skip fine-tuning")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast (CPUs with AVX-512 BF16/AMX, GPUs)")
@click.option("--seed", default=0, show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), help="write a PNG of the gap after every stage against time")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--resume", is_flag=True, help="continue from the checkpoint beside --out (<out>.recover.pt)")
@click.option("--force", is_flag=True, help="overwrite --out and start over from an existing checkpoint")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table (stage lines go to stderr)")
@user_errors
def recover_command(converted_dir, original, weights, data, preset, size, resize, mean, std, batch_size, target,
                    budget, eval_data, eval_images, calibrate_images, iterations, stages, no_labels, bf16, seed, plot, out,
                    resume, force, as_json):
    """Get the accuracy back in one command: BatchNorm, calibration, feature mimicking while it pays, then
    fine-tuning with labels, judged on held-back images after each stage, until --target is met, --budget is
    spent or the last stage stops paying. A stage that leaves the model worse is undone."""
    from ..atomic import check_writable
    from ..history import history
    from ..recovery import RecoverOptions, recover
    from ..store import load, load_original, save
    check_writable(out, force)
    if plot is not None:
        check_writable(plot, force)
    checkpoint = Path(out).with_name(Path(out).name + ".recover.pt")
    converted = load(converted_dir)
    source = load_original(converted, original, weights)
    transform = build_preprocessing(preset, size, resize, mean, std, source)
    options = RecoverOptions(eval_images=eval_images, eval_data=eval_data, calibrate_images=calibrate_images,
                             iterations=iterations,
                             stages=tuple(s.strip() for s in stages.split(",") if s.strip()), labels=not no_labels,
                             batch_size=batch_size, transform=transform, seed=seed, bf16=bf16)
    echo = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    model = recover(converted, source, data, target=target, budget=budget, options=options,
                    checkpoint=checkpoint, resume=resume, force=force, progress=show_progress(as_json), echo=echo)
    report = history(model).recovery
    save(model, out, force=force, summary=f"recovered {converted_dir} on {data}\n{report}")
    if plot is not None:
        report.plot(plot, force=force)
    if as_json:
        print_json({"out": out, **report.to_dict()})
    else:
        click.echo(f"{report}\nwritten: {out}/" + (f" and {plot}" if plot else ""))
