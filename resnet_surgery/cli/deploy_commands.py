"""Commands on ONNX files: export (fp32, int8), bench."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import SurgeryError
from .options import (
    build_preprocessing,
    image_options,
    int8_options,
    parse_batches,
    print_json,
    show_progress,
    size_option,
    user_errors,
    weights_option,
    with_options,
)

__all__ = ["bench_command", "export_command"]


@click.command("bench")
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
    from ..atomic import check_writable
    from ..deploy import compare_latency
    if plot:
        check_writable(plot, force)
    if len({Path(m).resolve() for m in models}) != len(models):
        raise SurgeryError("the same file is given twice; pass each model once")
    stems = [Path(m).stem for m in models]
    names = stems if len(set(stems)) == len(stems) else [str(m) for m in models]
    report = compare_latency(dict(zip(names, models)), batch_sizes=batches, threads=threads, min_time_s=min_time,
                             max_time_s=max_time, device=device, progress=show_progress(as_json))
    if plot:
        report.plot(plot, force=force)
    print_json(report.to_dict()) if as_json else click.echo(str(report))
    if plot and not as_json:
        click.echo(f"plot written: {plot}")

@click.command("export")
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
                   method, calibration_images, parity_images, min_agreement, per_tensor, activations,
                   full_range_weights, preset, size,
                   resize, mean, std, batch_size, force, as_json):
    """Export MODEL_OR_DIR (a model name or a folder written by `convert`) to ONNX, verified in onnxruntime.

    The file is kept only if onnxruntime matches PyTorch within the tolerance at batch 1 and 4. With --int8
    the verified fp32 file is quantized and --out is the int8 file, kept only if it agrees with fp32 on at
    least --min-agreement percent of held-out --calibration-data images.
    """
    from ..atomic import check_writable
    from ..deploy import ExportOptions, ParityError, QuantizeOptions, export_int8, export_onnx
    from ..store import load_model
    from ..zoo import exportable_part
    if int8 != bool(calibration_data):
        raise SurgeryError("--int8 needs --calibration-data DIR (images to calibrate on), and only --int8 takes it")
    out = check_writable(out, force)
    model = exportable_part(load_model(model_or_dir, weights), part)
    click.echo(f"exporting {model_or_dir}{f' ({part})' if part else ''} to {out} and checking it in onnxruntime ...",
               err=True)
    shape = (3, input_size, input_size)
    export = ExportOptions(dynamic_batch=not static_batch, opset=opset, atol=atol, rtol=rtol)

    def fp32_done(report):
        if not as_json:
            click.echo(str(report))
        click.echo(f"quantizing to int8, calibrated on {calibration_data} ...", err=True)

    try:
        if not int8:
            report = export_onnx(model, out, input_size=shape, options=export, force=force)
            print_json(report.to_dict()) if as_json else click.echo(str(report))
            return
        quantize = QuantizeOptions(per_channel=not per_tensor, method=method, activations=activations,
                                   reduce_range=not full_range_weights, num_images=calibration_images,
                                   parity_images=parity_images, min_agreement=min_agreement, batch_size=batch_size,
                                   transform=build_preprocessing(preset, size, resize, mean, std, model))
        report, int8_report = export_int8(model, out, calibration_data, input_size=shape, export=export,
                                          options=quantize, force=force, on_fp32=fp32_done,
                                          progress=show_progress(as_json))
    except ParityError as e:  # the fp32 file's, or the int8 file's (QuantizationError)
        print_json(e.report.to_dict()) if as_json else click.echo(str(e.report), err=True)
        raise
    if as_json:
        print_json({"fp32": report.to_dict(), "int8": int8_report.to_dict()})
    else:
        click.echo(str(int8_report))
