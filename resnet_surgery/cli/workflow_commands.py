"""Commands that run whole workflows: run (convert, recover, export, time), explore (which variant to deploy)."""

from __future__ import annotations

import click

from ..defaults import EXPLORE_STAGES, RECOVER_STAGES
from .options import (
    build_preprocessing,
    duration,
    for_the_shell,
    model_argument,
    parse_batches,
    preprocessing_options,
    print_json,
    show_progress,
    size_option,
    user_errors,
    variant_options,
    weights_option,
    with_options,
)

__all__ = ["explore_command", "run_command"]


@click.command("run")
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
@click.option("--recover", "recover_data", type=click.Path(exists=True, file_okay=False),
              help="images for `recover` (BN, calibration, feature mimicking, fine-tuning with labels), instead of "
                   "--calibrate and --finetune")
@click.option("--target", type=float, help="--recover: stop once the gap to the original is at most this many points")
@click.option("--budget", callback=duration, help="--recover: wall time it may take (90s, 30m, 1h30m)")
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
                num_images, iterations, epochs, objective, finetune_steps, recover_data, target, budget, batches,
                threads, min_time, out, force, as_json):
    """The whole job: convert MODEL, export original and converted to ONNX with parity, compare latency."""
    from ..workflows import RunOptions, run_pipeline
    options = RunOptions(to=to, shortcut=shortcut, exact=exact, prune_dead=prune_dead, weights=weights,
                         input_size=input_size, calibrate_data=calibrate_data, finetune_data=finetune_data,
                         recover_data=recover_data, preset=preset, num_images=num_images, iterations=iterations,
                         epochs=epochs, objective=objective, finetune_steps=finetune_steps, target=target,
                         budget=budget, batch_sizes=batches, threads=threads, min_time_s=min_time)
    result = run_pipeline(model, out, options=options, force=force, progress=show_progress(as_json),
                          echo=lambda line: click.echo(for_the_shell(line)))
    if as_json:
        print_json(result.to_dict())
        return
    click.echo(str(result))
    click.echo(f"written: {out}/ (converted/, original.onnx, converted.onnx, latency.json, latency.png, report.json)")

@click.command("explore")
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
@click.option("--stages", default=",".join(EXPLORE_STAGES), show_default=True,
              help="recover's stages for each candidate, comma-separated, from " + ",".join(RECOVER_STAGES)
              + " (bn alone is the cheap one, when only latency matters)")
@click.option("--target", type=float, help="stop recovering a candidate once its gap to the original is at most "
              "this many points (as recover's --target)")
@click.option("--budget", callback=duration, help="wall time each candidate's recovery may take: 90s, 30m "
              "[default: none]")
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
                    input_size, variants, int8, calibrate_images, stages, target, budget, quant_images,
                    min_agreement, batches, threads, min_time, max_time, out, force, as_json):
    """Which variant of MODEL to deploy: every reachable variant recovered on --data, exported with parity,
    optionally int8, evaluated on held-out images and timed in one run; a table, explore.json and explore.png."""
    from ..store import load_model
    from ..workflows import check_explore_out, explore
    check_explore_out(out)
    original = load_model(model, weights)
    transform = build_preprocessing(preset, size, resize, mean, std, original)
    report = explore(original, data, eval_data=eval_data, input_size=input_size,
                     variants=[v.strip() for v in variants.split(",")] if variants else None, int8=int8,
                     calibrate_images=calibrate_images, stages=[s.strip() for s in stages.split(",") if s.strip()],
                     target=target, budget=budget, eval_images=eval_images,
                     quant_images=quant_images, min_agreement=min_agreement, batch_sizes=batches, threads=threads,
                     min_time_s=min_time, max_time_s=max_time, out=out, force=force, batch_size=batch_size,
                     preset=preset or "imagenet", transform=transform, progress=show_progress(as_json))
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(str(report))
        click.echo(f"written: {out}/ (explore.json, explore.png, candidates/)")
