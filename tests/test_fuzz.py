"""Fuzzing the files the tool reads back (Hypothesis): a valid input is made once, mutated case by case, fed
to the command that reads it, and the properties every command owes its user are checked on every case.

Properties: the command succeeds, or ends with exit code 2 and one line on stderr ("error: ...", after any
progress line); no traceback; nothing is written outside its --out (and nothing at all by a command without
one); nothing it wrote holds a NaN or infinity (JSON, safetensors, checkpoints, ONNX); no network access is
attempted (tests/offline.py); the input it read is left as it was; a library call raises SurgeryError and
nothing else. A new input is fuzzed by
adding a row to TARGETS. `make fuzz` runs the long profile (RESNET_SURGERY_FUZZ=long, a thousand cases per input, random
seeds); `make test` the short one (a dozen, derandomized: the same cases every run). A failing case Hypothesis finds is printed with its seed; fix it and add it as a test.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from offline import offline
from util import write_random_images

from resnet_surgery.cli import main
from resnet_surgery.errors import SurgeryError

PROFILE = os.environ.get("RESNET_SURGERY_FUZZ", "short")  # "short", "long" or a number of cases per input
EXAMPLES = {"short": 6, "long": 1000}.get(PROFILE) or int(PROFILE)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=PROFILE == "short",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


CASES: collections.Counter = collections.Counter()  # cases run per table row in this process


@pytest.fixture(scope="module", autouse=True)
def _case_counts():
    """With RESNET_SURGERY_FUZZ_COUNTS=PREFIX, each process writes its cases per row to PREFIX.<worker>.json
    (how the counts of a run are known: Hypothesis stops a row early when it has tried every case it can make)."""
    yield
    prefix = os.environ.get("RESNET_SURGERY_FUZZ_COUNTS")
    if prefix and CASES:
        Path(f"{prefix}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json").write_text(json.dumps(CASES, indent=1))


def fuzz(seconds: float):
    """FUZZ for a case that takes about ``seconds``: fewer of the slow ones (the short profile: a dozen seconds
    a table row at most; the long one: EXAMPLES / seconds, at least a tenth of EXAMPLES)."""
    if PROFILE == "short":
        return settings(FUZZ, max_examples=max(1, min(EXAMPLES, int(12 // max(seconds, 1.0)))))
    return settings(FUZZ, max_examples=max(EXAMPLES // 10, int(EXAMPLES / max(seconds, 1.0))))

# --- mutations ------------------------------------------------------------------------------------------------

ODD_TEXT = st.sampled_from(["", "..", "../../outside", "/etc/passwd", "a\x00b", "x" * 5000, "☃", "nan", " "])
ODD_NUMBER = st.sampled_from([0, -1, 1, 2**63, -(2**63), 1e308, float("nan"), float("inf"), -float("inf"), 0.5])
ODD_VALUE = st.one_of(st.none(), st.booleans(), ODD_NUMBER, ODD_TEXT, st.just([]), st.just({}),
                      st.lists(ODD_NUMBER, max_size=3), st.dictionaries(ODD_TEXT, ODD_NUMBER, max_size=2))


@st.composite
def mutated_bytes(draw, original: bytes) -> bytes:
    """``original`` truncated, bit-flipped, with bytes inserted, or a region overwritten."""
    data = bytearray(original)
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "overwrite", "empty"]))
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if kind == "truncate":
        return bytes(data[:at])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, max(0, len(data) - 1)))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "insert":
        return bytes(data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:])
    if kind == "overwrite":
        chunk = draw(st.sampled_from([b"99999999999999999999", b"\xff" * 8, b"\x00" * 16, b'"../../x"', b"-1"]))
        return bytes(data[:at] + chunk + data[at + len(chunk):])
    return b""


def _paths(value, prefix=()):
    """Every path (tuple of keys and indices) into nested dicts, lists and tuples (JSON, a checkpoint)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _change_one(draw, value, odd=lambda draw, old: draw(ODD_VALUE)) -> bool:
    """``value`` (nested dicts and lists) changed in place: one entry replaced by ``odd(draw, old)``, deleted, or
    a key added; False when the entry drawn sits in a tuple (nothing changed)."""
    path = draw(st.sampled_from([p for p in _paths(value) if p]))
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, tuple):
        return False
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace" or isinstance(parent, list):
        parent[path[-1]] = odd(draw, parent[path[-1]])
    elif action == "delete":
        del parent[path[-1]]
    else:
        parent[draw(ODD_TEXT)] = draw(ODD_VALUE)
    return True


@st.composite
def mutated_json(draw, original: bytes) -> bytes:
    """``original`` (JSON) with one value replaced by an odd one, a key deleted or added, or its bytes mutated."""
    if draw(st.booleans()):
        return draw(mutated_bytes(original))
    value = json.loads(original)
    _change_one(draw, value)
    return json.dumps(value, allow_nan=True).encode()


ODD_DTYPES = ["F64", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F8_E4M3", "XX", ""]
ODD_SHAPES = [[], [0], [-1], [2**40], [2**62, 2**62], [1, 1, 1, 1, 1], [3.5], ["a"], None]
ODD_NAMES = ["", "..", "../../outside", "a/b", "/etc/passwd", "a\x00b", "x" * 5000, "__metadata__"]


@st.composite
def mutated_safetensors(draw, original: bytes) -> bytes:
    """``original`` (a safetensors file) with its header edited (a dtype, shape or offsets changed, a tensor
    renamed to a path, its length field wrong) or a tensor's values made NaN or infinite, or its bytes mutated."""
    kind = draw(st.sampled_from(["bytes", "dtype", "shape", "offsets", "name", "drop", "length", "nonfinite"]))
    if kind == "bytes":
        return draw(mutated_bytes(original))
    n = int.from_bytes(original[:8], "little")
    header, data = json.loads(original[8:8 + n]), bytearray(original[8 + n:])
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = header[name]
    if kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(ODD_DTYPES))
    elif kind == "shape":
        entry["shape"] = draw(st.sampled_from(ODD_SHAPES))
    elif kind == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = draw(st.sampled_from([[end, start], [start, len(data) + 8], [0, 0], [-1, end],
                                                      [start, 2**63], [start], "x"]))
    elif kind == "name":
        header[draw(st.sampled_from(ODD_NAMES))] = header.pop(name)
    elif kind == "drop":
        del header[name]
    elif kind == "nonfinite" and entry["dtype"] == "F32":
        start, end = entry["data_offsets"]
        value = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        count = draw(st.integers(1, max(1, (end - start) // 4)))
        data[start:start + 4 * count] = torch.full((count,), value).numpy().tobytes()
    text = json.dumps(header).encode()
    length = len(text) if kind != "length" else draw(st.sampled_from([0, 1, len(text) - 1, len(text) + 1, 2**63]))
    return length.to_bytes(8, "little") + text + bytes(data)


def _odd_tensor(draw, tensor: torch.Tensor):
    kind = draw(st.sampled_from(["nan", "inf", "shape", "dtype", "empty", "scalar"]))
    if kind in ("nan", "inf") and tensor.is_floating_point() and tensor.numel():
        tensor = tensor.clone()
        tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = float(kind)
        return tensor
    return {"shape": torch.zeros(tensor.numel() + 1), "dtype": tensor.to(torch.int64), "empty": torch.empty(0),
            "scalar": torch.tensor(1.0)}.get(kind, torch.tensor(float("nan")))


@st.composite
def mutated_checkpoint(draw, original: bytes) -> bytes:
    """``original`` (a torch.save file of nested dicts) with one entry replaced (a tensor made NaN, infinite, of
    another shape or dtype; a number, string or list made odd), deleted or added, or its bytes mutated."""
    import io

    if draw(st.booleans()):
        return draw(mutated_bytes(original))
    state = torch.load(io.BytesIO(original), weights_only=True)
    if not _change_one(draw, state, lambda draw, old: _odd_tensor(draw, old) if isinstance(old, torch.Tensor)
                       else draw(ODD_VALUE)):
        return draw(mutated_bytes(original))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


# --- what is fuzzed -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """One input the tool reads from outside.

    Args:
        make: writes a valid input under a folder (once per session) and returns the file to mutate.
        mutate: the strategy of mutated contents, given the valid file's bytes.
        command: the CLI arguments that read it ({root}: the folder holding it; {out}: an output folder), or
        call: a library call on the root folder that must succeed or raise SurgeryError.
        rebuilt: the input lives inside --out (a file the command wrote earlier), so the command may replace
            it: then it must be whole afterwards (valid JSON) rather than unchanged.
        seconds: about how long a case takes (the short profile runs fewer of the slow ones).
        apply: puts a drawn case in place (default: writes it, bytes, as the file ``make`` returned).
    """

    make: Callable[[Path], Path]
    mutate: Callable[[bytes], st.SearchStrategy]
    command: list[str] | None = None
    call: Callable[[Path], object] | None = None
    rebuilt: bool = False
    seconds: float = 1.0
    apply: Callable[[Path, object], None] = Path.write_bytes


def converted_folder(root: Path) -> Path:
    if (root / "conv" / "recipe.json").is_file():  # already there (copied from the pristine folder)
        return root / "conv"
    result = CliRunner().invoke(main, ["convert", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--to", "v1",
                                       "--input-size", "32", "--out", str(root / "conv")])
    assert result.exit_code == 0, result.output
    return root / "conv"


@functools.cache
def tiny_converted():
    """The converted model the recover checkpoint belongs to (built once; load_state copies it)."""
    from test_recovery import tiny_conversion

    return tiny_conversion("v1")[1]


def recover_checkpoint(root: Path) -> Path:
    from resnet_surgery.recovery.recover_report import RecoveryStage
    from resnet_surgery.recovery.recover_state import save_state

    stage = RecoveryStage("naive copy", "", 0.1, 0.1, 5.0, 90.0, 92.0, 0.1, True, 0.1, 0.1)
    save_state(root / "ckpt.pt", tiny_converted(), identity={"run": 1}, position=(1, 0), spent=(1.0, 1.0),
               stages=[stage], step_seconds={"features": 0.01}, measure_seconds=0.1)
    return root / "ckpt.pt"


def load_recover_checkpoint(root: Path):
    from resnet_surgery.recovery.recover_state import load_state

    return load_state(root / "ckpt.pt", tiny_converted(), {"run": 1})


def onnx_file(root: Path) -> Path:
    """The CIFAR model exported (parity-checked) once, and a copy to time it against."""
    if not (root / "a.onnx").is_file():
        result = CliRunner().invoke(main, ["export", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--input-size",
                                           "32", "--out", str(root / "a.onnx")])
        assert result.exit_code == 0, result.output
        shutil.copy(root / "a.onnx", root / "b.onnx")
    return root / "a.onnx"


def image_folder(root: Path) -> Path:
    return root / "images" / "cat" / "0.png"  # the pristine folder's


EXPLORE = ["explore", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--input-size", "32", "--data", "{root}/images",
           "--variants", "d", "--no-int8", "--stages", "bn", "--eval-images", "2", "--min-time", "0.02", "--threads",
           "1", "--out", "{root}/ex"]


def explore_result(root: Path) -> Path:
    """A finished explore folder (made once); its candidate d's result.json, which a rerun reads back."""
    if not (root / "ex" / "candidates" / "d" / "result.json").is_file():
        result = CliRunner().invoke(main, [a.format(root=root) for a in EXPLORE])
        assert result.exit_code == 0, result.output
    return root / "ex" / "candidates" / "d" / "result.json"


@functools.cache
def tiny_pair():
    """A tiny model and its v1 conversion, made once (the finetune checkpoint belongs to them)."""
    from test_recovery import tiny_conversion

    return tiny_conversion("v1")


@functools.cache
def tiny_images():
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(8, 3, 16, 16, generator=generator), torch.arange(8) % 10)


def _finetune(root: Path, resume: bool):
    from resnet_surgery.recovery import finetune

    original, converted = tiny_pair()
    return finetune(converted, original, tiny_images(), epochs=2, batch_size=4, checkpoint=root / "ft.pt",
                    resume=resume, force=not resume, progress=False)


def finetune_checkpoint(root: Path) -> Path:
    """The checkpoint a finished two-pass finetune of the tiny model leaves (its epoch, step and losses mutated
    make a resume continue)."""
    _finetune(root, resume=False)
    return root / "ft.pt"


def resume_finetune(root: Path):
    """finetune resumed from the (mutated) checkpoint: the model it returns is whole."""
    model = _finetune(root, resume=True)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def weights_file(suffix: str) -> Callable[[Path], Path]:
    """The committed CIFAR model's state_dict saved as a user's weights file (``--weights PATH``)."""
    def make(root: Path) -> Path:
        from safetensors.torch import save_file

        from resnet_surgery.zoo.cifar import load_cifar_resnet

        state = {k: v.contiguous() for k, v in load_cifar_resnet("v1.5").state_dict().items()}
        path = root / f"w{suffix}"
        save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
        return path

    return make


def image_root(root: Path) -> Path:
    return root / "images"


@st.composite
def odd_folder(draw, original) -> list:
    """Changes to an image folder: classes emptied or removed, files that are not images, a class folder that
    is a file or a link out of the folder, empty files, many classes, a nested folder."""
    kinds = ["empty class", "no classes", "not an image", "class is a file", "link out", "empty file",
             "many classes", "nested", "only one class", "hidden file"]
    return draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3, unique=True))


def change_folder(folder: Path, changes: list) -> None:
    for change in changes:
        if change == "empty class":
            for f in (folder / "cat").glob("*"):
                f.unlink()
        elif change == "no classes":
            shutil.rmtree(folder)
            folder.mkdir()
        elif change == "not an image":
            (folder / "dog").mkdir(parents=True, exist_ok=True)
            (folder / "dog" / "notes.txt").write_text("not an image")
            (folder / "dog" / "fake.png").write_text("not a png either")
        elif change == "class is a file" and (folder / "cat").is_dir():
            shutil.rmtree(folder / "cat")
            (folder / "cat").write_bytes(b"\x89PNG")
        elif change == "link out":
            (folder / "out").symlink_to("/etc", target_is_directory=True)
        elif change == "empty file":
            (folder / "dog" / "empty.png").parent.mkdir(parents=True, exist_ok=True)
            (folder / "dog" / "empty.png").write_bytes(b"")
        elif change == "many classes":
            for i in range(20):
                (folder / f"class{i:02d}").mkdir()
        elif change == "nested" and (folder / "dog").is_dir():
            shutil.copytree(folder / "dog", folder / "dog" / "inner")
        elif change == "only one class" and (folder / "dog").is_dir():
            shutil.rmtree(folder / "dog")
        elif change == "hidden file" and (folder / "dog").is_dir():
            (folder / "dog" / ".DS_Store").write_bytes(b"\x00\x00")


@functools.cache
def calibration_images():
    return torch.rand(4, 3, 32, 32)


def quantize(root: Path):
    """int8 of a (mutated) ONNX file with statistical parity on random images."""
    from torch.utils.data import TensorDataset

    from resnet_surgery.deploy.quantize import quantize_onnx

    images = TensorDataset(calibration_images())
    return quantize_onnx(root / "a.onnx", root / "q.onnx", images, num_images=4, parity_data=images, min_agreement=0,
                         progress=False)


@st.composite
def odd_image(draw, original: bytes) -> bytes:
    """An image file of an odd kind: grey, 16-bit, with alpha, a palette, one pixel, a long strip, large, or
    another format under the .png name."""
    import io

    from PIL import Image

    fmt, mode = draw(st.sampled_from([("PNG", m) for m in ("L", "LA", "I;16", "RGBA", "P", "1", "RGB")]
                                     + [("TIFF", m) for m in ("I", "F", "CMYK", "I;16")]
                                     + [(f, m) for f in ("BMP", "GIF", "JPEG") for m in ("L", "RGB")]))
    size = draw(st.sampled_from([(1, 1), (32, 32), (1, 4000), (4000, 1), (3, 2), (2500, 2500)]))
    image = Image.new(mode, size)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


TARGETS = {
    "recipe.json": Target(lambda r: converted_folder(r) / "recipe.json", mutated_json,
                          command=["inspect", "{root}/conv", "--input-size", "32", "--json"]),
    "model.safetensors": Target(lambda r: converted_folder(r) / "model.safetensors", mutated_bytes,
                                command=["evaluate", "{root}/conv", "--data", "{root}/images", "--num-images", "2"]),
    "a recover checkpoint": Target(recover_checkpoint, mutated_bytes, call=load_recover_checkpoint),
    "an image": Target(image_folder, mutated_bytes,
                       command=["evaluate", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--data", "{root}/images"]),
    "an ONNX file, for bench": Target(onnx_file, mutated_bytes,
                                      command=["bench", "{root}/a.onnx", "{root}/b.onnx", "--threads", "1",
                                               "--min-time", "0.02", "--max-time", "0.1"]),
    "an image, for calibrate": Target(image_folder, mutated_bytes,
                                      command=["calibrate", "{root}/conv", "--data", "{root}/images", "--steps", "bn",
                                               "--out", "{out}"]),
    "an odd image (grey, 16-bit, alpha, tiny, huge)": Target(
        image_folder, odd_image, command=["evaluate", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--preset",
                                          "cifar10", "--data", "{root}/images"]),
    "explore's result.json, read back by a rerun": Target(explore_result, mutated_json, command=EXPLORE, rebuilt=True,
                                                              seconds=14.0),
    "an ONNX file, for quantize_onnx": Target(onnx_file, mutated_bytes, call=quantize),
    "model.safetensors, its header and tensors": Target(
        lambda r: converted_folder(r) / "model.safetensors", mutated_safetensors,
        command=["evaluate", "{root}/conv", "--data", "{root}/images", "--num-images", "2"]),
    "a recover checkpoint, its contents": Target(recover_checkpoint, mutated_checkpoint, call=load_recover_checkpoint),
    "a finetune checkpoint, resumed": Target(finetune_checkpoint, mutated_checkpoint, call=resume_finetune),
    "a weights file (.pt)": Target(weights_file(".pt"), mutated_checkpoint,
                                   command=["evaluate", "cifar10-resnet-v1.5", "--weights", "{root}/w.pt", "--data",
                                            "{root}/images", "--num-images", "2"]),
    "a weights file (.safetensors)": Target(weights_file(".safetensors"), mutated_safetensors,
                                            command=["convert", "cifar10-resnet-v1.5", "--weights",
                                                     "{root}/w.safetensors", "--to", "v1", "--input-size", "32",
                                                     "--out", "{out}"]),
    "an image folder (empty, not images, links out)": Target(
        image_root, odd_folder, apply=change_folder,
        command=["calibrate", "{root}/conv", "--data", "{root}/images", "--steps", "bn", "--out", "{out}"]),
}


@pytest.fixture(scope="module")
def pristine():
    """Every target's valid input, made once, in one folder the cases copy."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    converted_folder(root)
    onnx_file(root)
    write_random_images(root / "images" / "cat", 3, 32)
    write_random_images(root / "images" / "dog", 3, 32, seed=1)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _written(before: dict[str, bytes], after: dict[str, bytes]) -> list[str]:
    """The files new or changed between two ``_files`` snapshots (temporary .names left by an interrupt aside)."""
    return [p for p, data in after.items()
            if before.get(p) != data and not any(part.startswith(".") for part in Path(p).parts)]


def _not_finite(root: Path, paths) -> list[str]:
    """Those of ``paths`` (under ``root``) that hold a NaN or an infinity, or do not read back as their format."""
    import math

    import numpy as np
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import load_file

    def finite(value) -> bool:
        if isinstance(value, torch.Tensor):
            return not value.is_floating_point() or bool(torch.isfinite(value).all())
        if isinstance(value, float):
            return math.isfinite(value)
        if isinstance(value, dict):
            return all(finite(v) for v in value.values())
        if isinstance(value, list | tuple):
            return all(finite(v) for v in value)
        return True

    def refuse(text):
        raise ValueError(f"non-finite JSON number {text}")

    bad = []
    for p in paths:
        path = root / p
        try:
            if path.suffix == ".json":
                ok = finite(json.loads(path.read_text(), parse_constant=refuse))
            elif path.suffix == ".safetensors":
                ok = finite(load_file(path))
            elif path.suffix in (".pt", ".ckpt"):
                ok = finite(torch.load(path, weights_only=True))
            elif path.suffix == ".onnx":
                graph = onnx.load(str(path)).graph
                constants = [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
                ok = all(np.isfinite(a).all() for a in map(numpy_helper.to_array, [*graph.initializer, *constants])
                         if a.dtype.kind == "f")
            else:
                continue
        except Exception as e:  # noqa: BLE001 - a file the tool wrote that does not read back is a finding too
            ok, p = False, f"{p} ({type(e).__name__}: {str(e)[:100]})"
        if not ok:
            bad.append(p)
    return bad


def _one_error_line(stderr: str) -> bool:
    """One "error: ..." line, ending stderr (a progress line such as "exporting ..." may come before it)."""
    lines = stderr.strip().splitlines()
    return bool(lines) and lines[-1].startswith("error: ") and stderr.count("error: ") == 1 and stderr.endswith("\n")


def _check_command(target: Target, root: Path, case: Path) -> None:
    out = root / "out"
    args = [a.format(root=root, out=out) for a in target.command]
    before = _files(root)
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{args} raised {type(result.exception).__name__}: {result.exception}"
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert _one_error_line(result.stderr), result.stderr
    after = _files(root)
    key = str(case.relative_to(root))
    written = [p for p in _written(before, after) if p != key]  # a mutated input reused as it was is not written
    assert not (bad := _not_finite(root, written)), f"{args} wrote non-finite or unreadable {bad}"
    if target.rebuilt:  # read back from inside its --out: reused as it was, or rebuilt whole
        if after.get(key) != before.get(key):
            json.loads(after[key])
        before = {p: v for p, v in before.items() if not p.startswith("ex" + os.sep)}
        after = {p: v for p, v in after.items() if not p.startswith("ex" + os.sep)}
    else:  # every input, the mutated one included, is as it was
        changed = [p for p in before if not p.startswith("out") and after.get(p) != before[p]]
        assert not changed, f"{args} changed its inputs: {changed}"
    new = {p for p in set(after) - set(before) if not p.startswith("out/") and not p.startswith("out" + os.sep)}
    assert not new, f"written outside --out: {sorted(new)}"
    if result.exit_code == 2 and not target.rebuilt:
        assert not out.exists(), "a refused run left --out behind"


@pytest.mark.parametrize("name", list(TARGETS))
def test_a_mutated_input_is_refused_in_one_line_or_read(name, pristine, tmp_path_factory):
    target = TARGETS[name]
    base = tmp_path_factory.mktemp("base")
    shutil.copytree(pristine, base, dirs_exist_ok=True)
    relative = target.make(base).relative_to(base)  # the valid input, beside everything the commands read
    original = (base / relative).read_bytes() if (base / relative).is_file() else None  # None: a folder

    @fuzz(target.seconds)
    @given(content=target.mutate(original))
    def case(content):
        CASES[f"file: {name}"] += 1
        with tempfile.TemporaryDirectory() as tmp, offline():
            root = Path(tmp)
            shutil.copytree(base, root, dirs_exist_ok=True)
            target.apply(root / relative, content)
            if target.call is None:
                _check_command(target, root, root / relative)
            else:
                _check_call(target, root)

    case()


def _loaded_models() -> list:
    """The models the call rows load checkpoints into or start from (a failure must leave them as they were)."""
    return [tiny_converted(), *tiny_pair()]


def _check_call(target: Target, root: Path) -> None:
    states = [_state(m) for m in _loaded_models()]
    before = _files(root)
    try:
        target.call(root)
    except SurgeryError as e:
        assert "\n" not in str(e), str(e)
        assert not (new := _written(before, _files(root))), f"a refused call wrote {new}"
    assert not (bad := _not_finite(root, _written(before, _files(root)))), f"wrote non-finite or unreadable {bad}"
    for model, state in zip(_loaded_models(), states):
        after = model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in state.items()), "the call changed a model it was given"


# --- every option of every command ----------------------------------------------------------------------------


@dataclasses.dataclass
class Command:
    """A valid, cheap invocation of one command, whose options the fuzzer varies.

    Args:
        args: the arguments ({root}: the folder of valid inputs; {out}: an output path inside it).
        seconds: a case still running after this long accepted its options and is doing the work: it is
            interrupted there (what it left is then checked: nothing half-written beside --out).
    """

    args: list[str]
    seconds: float = 5.0


C32 = ["cifar10-resnet-v1.5", "--input-size", "32"]
COMMANDS = {
    "inspect": Command(["inspect", *C32]),
    "convert": Command(["convert", *C32, "--to", "v1", "--out", "{out}"]),
    "transplant": Command(["transplant", "cifar10-resnet-v1.5", "--into", "cifar10-resnet-v1", "--input-size", "32",
                           "--out", "{out}"]),
    "evaluate": Command(["evaluate", "{root}/conv", "--data", "{root}/images", "--num-images", "2"]),
    # an interrupt inside torch.export's tracing can abort the process: these commands get time to finish
    "export": Command(["export", "{root}/conv", "--input-size", "32", "--out", "{out}.onnx"], 30.0),
    "calibrate": Command(["calibrate", "{root}/conv", "--data", "{root}/images", "--steps", "bn", "--out", "{out}"]),
    "finetune": Command(["finetune", "{root}/conv", "--data", "{root}/images", "--steps", "2", "--batch-size", "2",
                         "--out", "{out}"]),
    "recover": Command(["recover", "{root}/conv", "--data", "{root}/images", "--stages", "bn", "--eval-images", "2",
                        "--out", "{out}"]),
    "bench": Command(["bench", "{root}/a.onnx", "{root}/b.onnx", "--threads", "1", "--min-time", "0.02",
                      "--max-time", "0.1"]),
    "run": Command(["run", *C32, "--to", "d", "--min-time", "0.02", "--threads", "1", "--out", "{out}"], 40.0),
    "explore": Command(["explore", *C32, "--data", "{root}/images", "--variants", "d", "--no-int8", "--stages", "bn",
                        "--eval-images", "2", "--min-time", "0.02", "--threads", "1", "--out", "{out}"], 40.0),
}

ODD_ARGUMENT = ["", "-1", "0", "1", "2", "0.5", "nan", "inf", "-inf", "1e308", "9223372036854775808", "abc",
                "1,,8", ",", "0s", "-5m", "30m", "a\x00b", "x" * 300, "☃", "--json"]
ODD_PATH = ["", "{root}/new", "{root}/conv", "{root}/images", "{root}/images/cat/0.png", "{root}/a.onnx",
            "{root}/a\x00b", "{root}/" + "x" * 300, "{root}/conv/recipe.json/x"]


def option_values(option) -> st.SearchStrategy:
    """Odd values for one click option, by its type (valid choices among them)."""
    import click

    if isinstance(option.type, click.Path):
        return st.sampled_from(ODD_PATH)
    if isinstance(option.type, click.Choice):
        return st.sampled_from([*option.type.choices, *ODD_ARGUMENT])
    return st.sampled_from(ODD_ARGUMENT)


ODD_MODEL = ["resnet-nope", "timm:no_such_model", "cifar10-resnet-v9", "{root}/conv/model.safetensors", "{root}",
             "{root}/images/cat", "{root}/b.onnx"]


@st.composite
def mutated_options(draw, command, args: list[str]) -> tuple[dict[int, str], list[str]]:
    """Odd values for ``command``'s positional arguments (by their place in ``args``) and for one or two of its
    options (flags set): (replaced positions, extra options); at least one of the two."""
    import click

    positions = range(1, next(i for i, a in enumerate([*args, "--"]) if a.startswith("--")))
    replaced = draw(st.dictionaries(st.sampled_from(list(positions)), st.sampled_from(ODD_PATH + ODD_MODEL),
                                    max_size=1)) if positions else {}
    options = [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]
    chosen = draw(st.lists(st.sampled_from(options), min_size=0 if replaced else 1, max_size=2,
                           unique_by=lambda o: o.name))
    extra = []
    for option in chosen:
        name = draw(st.sampled_from([o for o in option.opts + option.secondary_opts if o.startswith("--")]))
        extra += [name] if option.is_flag else [name, draw(option_values(option))]
    return replaced, extra


class _TooLong(BaseException):
    """Raised by the alarm in a case that accepted its options and is still working (not an Exception, so that
    nothing inside the command catches it: its cleanup runs as on Ctrl-C)."""


def _invoke(args: list[str], seconds: float):
    """The CLI's result, or None when the case ran past ``seconds`` (interrupted there)."""
    try:
        return _within(seconds, lambda: CliRunner().invoke(main, args))
    except _TooLong:
        return None


@pytest.mark.parametrize("name", list(COMMANDS))
def test_odd_options_are_refused_in_one_line_or_taken(name, pristine, tmp_path_factory):
    command = COMMANDS[name]
    base = tmp_path_factory.mktemp("base")
    shutil.copytree(pristine, base, dirs_exist_ok=True)
    click_command = main.commands[name]

    @fuzz(command.seconds / 3)  # most cases end in an error long before the limit
    @given(change=mutated_options(click_command, command.args))
    def case(change):
        replaced, extra = change
        CASES[f"options: {name}"] += 1
        with tempfile.TemporaryDirectory() as tmp, offline():
            root = Path(tmp)
            shutil.copytree(base, root, dirs_exist_ok=True)
            out = root / "out"
            given_args = [replaced.get(i, a) for i, a in enumerate(command.args)]
            args = [a.format(root=root, out=out) for a in given_args + extra]
            before = _files(root)
            result = _invoke(args, command.seconds)
            after = _files(root)
            # with --force an input named as an output (--plot a.onnx) is replaced by what it names: new files only
            written = [p for p in _written(before, after) if "--force" not in extra or p not in before]
            assert not (bad := _not_finite(root, written)), f"{args} wrote non-finite or unreadable {bad}"
            if "--force" not in extra:  # --force with an input as --out may replace it: that is what it is for
                changed = [p for p in before if not p.startswith("out") and after.get(p) != before[p]]
                assert not changed, f"{args} changed its inputs: {changed}"
            new = [p for p in set(after) - set(before) if not p.startswith("out")]
            if result is None:  # interrupted while working (as by Ctrl-C): its temporary files are gone too
                left = [p for p in after if p not in before and any(part.startswith(".") for part in Path(p).parts)]
                assert not left and not new, f"interrupted, {args} left {sorted(left + new)}"
                return
            assert result.exception is None or isinstance(result.exception, SystemExit), \
                f"{args} raised {type(result.exception).__name__}: {result.exception}"
            assert result.exit_code in (0, 2), (args, result.exit_code, result.output)
            assert "Traceback" not in result.output
            if result.exit_code == 2:
                assert _one_error_line(result.stderr), (args, result.stderr)
                assert not [p for p in after if p.startswith("out")] or "--force" in extra or \
                    {p for p in after if p.startswith("out")} <= set(before), f"a refused {args} left --out behind"
            allowed = {"--plot", "--out", "--reads-plot", "--save-plot"}  # options that name an output file
            if not any(e in allowed for e in extra):
                assert not new, f"{args} wrote outside --out: {sorted(new)}"

    case()


# --- every argument of the Python API ---------------------------------------------------------------------------


@functools.cache
def python_inputs():
    """A trained model, its v1 conversion and six labelled 32x32 images, made once (cases never change them)."""
    from torch.utils.data import TensorDataset

    from resnet_surgery.engine.rewrite import convert
    from resnet_surgery.zoo.cifar import load_cifar_resnet

    original = load_cifar_resnet("v1.5")
    converted = convert(original, "v1", input_size=(3, 32, 32), warn=False)
    return original, converted, TensorDataset(torch.randn(6, 3, 32, 32), torch.arange(6) % 10)


def _onnx_pair(root: Path) -> dict:
    return {"a": root / "a.onnx", "b": root / "b.onnx"}


def _traced(model):
    from resnet_surgery.engine.blocks import trace

    return trace(model)


# name -> the keyword arguments of a cheap valid call, given (the inputs, the root folder): every argument, the
# required ones too, is varied by name. "function.argument": the fields of that argument's class are varied.
PYTHON_CALLS = {
    "convert": lambda i, root: {"model": i[0], "to": "v1", "input_size": (3, 32, 32)},
    "inspect": lambda i, root: {"model": i[0], "input_size": (3, 32, 32)},
    "evaluate": lambda i, root: {"model": i[1], "data": i[2], "reference": None, "progress": False},
    "calibrate": lambda i, root: {"converted": i[1], "original": i[0], "data": i[2], "num_images": 4,
                                  "steps": ("bn", "reconstruct"), "iterations": 2, "progress": False},
    "finetune": lambda i, root: {"converted": i[1], "original": i[0], "data": i[2], "steps": 2, "batch_size": 2,
                                 "progress": False},
    "recover": lambda i, root: {"converted": i[1], "original": i[0], "data": i[2], "echo": lambda line: None,
                                "target": 1.0, "progress": False},
    "export_onnx": lambda i, root: {"model": i[1], "path": root / "x.onnx", "input_size": (3, 32, 32)},
    "compare_latency": lambda i, root: {"models": _onnx_pair(root), "threads": 1, "min_time_s": 0.02,
                                        "max_time_s": 0.1, "min_rounds": 2, "progress": False},
    "quantize_onnx": lambda i, root: {"fp32_onnx": root / "a.onnx", "out": root / "q.onnx", "calibration_data": i[2],
                                      "num_images": 3, "parity_images": 3, "min_agreement": 0.0, "progress": False},
    "export_int8": lambda i, root: {"model": i[1], "out": root / "q.onnx", "calibration_data": i[2],
                                    "input_size": (3, 32, 32), "num_images": 3, "parity_images": 3,
                                    "min_agreement": 0.0, "progress": False},
    "export_int8.export": lambda i, root: {"model": i[1], "out": root / "q.onnx", "calibration_data": i[2],
                                           "input_size": (3, 32, 32), "num_images": 3, "parity_images": 3,
                                           "min_agreement": 0.0, "progress": False},
    "run_pipeline": lambda i, root: {"model": "cifar10-resnet-v1.5", "out": root / "run", "echo": lambda line: None,
                                     "to": "d", "input_size": 32, "min_time_s": 0.02, "threads": 1, "progress": False},
    "explore": lambda i, root: {"model": i[0], "data": i[2], "input_size": 32, "out": root / "ex", "variants": ("d",),
                                "int8": False, "stages": ("bn",), "eval_images": 2, "min_time_s": 0.02, "threads": 1,
                                "progress": False},
    "transplant": lambda i, root: {"source": i[0], "target": i[1], "input_size": (3, 32, 32), "warn": False},
    "max_difference": lambda i, root: {"a": i[0], "b": i[1], "input_size": (3, 32, 32)},
    "count_macs": lambda i, root: {"model": i[1], "input_size": (3, 32, 32)},
    "predict": lambda i, root: {"model": i[1], "data": i[2], "progress": False},
    "save": lambda i, root: {"model": i[1], "out": root / "saved"},
    "load": lambda i, root: {"folder": root / "conv"},
    "load_model": lambda i, root: {"spec": "cifar10-resnet-v1.5", "weights": "DEFAULT"},
    "load_original": lambda i, root: {"converted": i[1]},
    "read_recipe": lambda i, root: {"path": root / "conv" / "recipe.json"},
    "apply_recipe": lambda i, root: {"model": i[0], "recipe": root / "conv" / "recipe.json"},
    "onnx_input_shape": lambda i, root: {"path": root / "a.onnx"},
    "as_loader": lambda i, root: {"data": root / "images", "preset": "cifar10", "batch_size": 2, "progress": False},
    "preprocessing": lambda i, root: {"model": i[0], "preset": "cifar10"},
    "model_transform": lambda i, root: {"model": i[0]},
    "split_batch": lambda i, root: {"batch": next(iter(torch.utils.data.DataLoader(i[2], batch_size=2)))},
    "trace": lambda i, root: {"model": i[0]},
    "find_blocks": lambda i, root: {"gm": _traced(i[0])},
    "find_trunk": lambda i, root: {"model": i[0]},
    "prune_dead_compute": lambda i, root: {"model": i[1]},
    "site_reads": lambda i, root: {"model": i[1], "report": _report(i[1])},
    "grid_text": lambda i, root: {"sites": _sites(i[1])},
    "plot_sites": lambda i, root: {"columns": _sites(i[1]), "path": root / "p.png"},
    "pareto_front": lambda i, root: {"points": [(1.0, 2.0), (2.0, 1.0), (3.0, 3.0)]},
    "ratio_ci": lambda i, root: {"a": [1.0, 1.1, 0.9], "b": [1.0, 1.0, 1.2]},
    "cifar_resnet": lambda i, root: {"widths": (4, 4, 4), "blocks": (1, 1, 1)},
    "load_cifar_resnet": lambda i, root: {"layout": "v1"},
    "history": lambda i, root: {"model": i[1]},
    "extract_cifar10": lambda i, root: {"shared_dir": root / "no-shared", "split": "test", "cache_dir": root / "c"},
    "cifar10_tensors": lambda i, root: {"shared_dir": root / "no-shared", "split": "test", "cache_dir": root / "c"},
}
# a row whose varied arguments are the fields of one argument's class: row -> (argument, class name)
VARIED = {"export_int8.export": ("export", "ExportOptions")}
# the public functions no row calls, and why
NOT_CALLED = {}


# a call still working after this many seconds took its arguments (an interrupt inside torch.export's tracing can
# abort the process: the calls that export get time to finish)
CALL_SECONDS = {"run_pipeline": 60.0, "explore": 60.0, "export_int8": 30.0, "export_int8.export": 30.0,
                "export_onnx": 30.0}


@functools.cache
def _report(model):
    """inspect's report of ``model`` at 32x32 (site_reads takes it)."""
    return rs_api().inspect(model, input_size=(3, 32, 32))


@functools.cache
def _sites(model):
    return rs_api().site_reads(model, _report(model))


ODD_PYTHON = st.one_of(ODD_VALUE, st.sampled_from([(3, 32), (0, 0, 0), (3, -1, 32), (3, 2**40, 32), "v2", ("bn",),
                                                   ["bn", "bm"], b"x", 1j, (1, 0), {"a": "/etc/passwd"}]))
# paths for arguments that name a file or folder: odd, but inside the case's folder ({root}; the cases run there)
ODD_PYTHON_PATH = st.sampled_from(["{root}/new", "{root}/conv", "{root}/images", "{root}/images/cat/0.png",
                                   "{root}/a.onnx", "{root}/a\x00b", "{root}/" + "x" * 300,
                                   "{root}/conv/recipe.json/x", "", None, 3, b"x", ["{root}/new"]])
DOCUMENTED = (SurgeryError, TypeError)  # the package's errors, and TypeError for an argument of the wrong type
PACKAGE = Path(importlib.util.find_spec("resnet_surgery").origin).parent


def rs_api():
    import resnet_surgery

    return resnet_surgery


def _varied(name: str):
    """What row ``name`` varies the arguments of: the public function, or the class of the argument VARIED names."""
    return getattr(rs_api(), VARIED[name][1] if name in VARIED else name.split(".")[0])


@st.composite
def odd_arguments(draw, function) -> dict:
    """One or two of ``function``'s arguments (required ones too, by name) given odd values: paths (an argument
    annotated PathLike) odd paths inside the case's folder."""
    import inspect

    parameters = inspect.signature(function).parameters
    names = {n: p.annotation for n, p in parameters.items()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    options = parameters.get("options")
    if options is not None and any(p.kind is p.VAR_KEYWORD for p in parameters.values()):  # fields as keywords
        cls = getattr(rs_api(), str(options.annotation).split(" |")[0], None)
        names |= {f.name: f.type for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    names = {n: a for n, a in names.items() if n not in ("progress", "echo", "force", "resume")}
    chosen = draw(st.lists(st.sampled_from(sorted(names)), min_size=1, max_size=2, unique=True))
    return {n: draw(ODD_PYTHON_PATH if "PathLike" in str(names[n]) else ODD_PYTHON) for n in chosen}


def _at(value, root: Path):
    """``value`` with "{root}" in its strings made the case's folder."""
    if isinstance(value, str):
        return value.replace("{root}", str(root))
    if isinstance(value, list):
        return [_at(v, root) for v in value]
    return value


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _raised_by_the_package(error: BaseException) -> bool:
    """Whether ``error`` was raised in the package's own code (a check), not deep in torch or numpy."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).is_relative_to(PACKAGE)


@pytest.mark.parametrize("name", list(PYTHON_CALLS))
def test_odd_python_arguments_raise_a_documented_error_and_change_no_model(name, pristine, tmp_path_factory):
    function = getattr(rs_api(), name.split(".")[0])
    inputs = python_inputs()
    base = tmp_path_factory.mktemp("base")
    shutil.copytree(pristine, base, dirs_exist_ok=True)

    @fuzz(2.0)
    @given(odd=odd_arguments(_varied(name)))
    def case(odd):
        CASES[f"python: {name}"] += 1
        states = [_state(m) for m in inputs[:2]]
        with tempfile.TemporaryDirectory() as tmp, offline():
            root = Path(tmp)
            shutil.copytree(base, root, dirs_exist_ok=True)
            before = _files(root)
            odd = {k: _at(v, root) for k, v in odd.items()}
            cwd = os.getcwd()
            os.chdir(root)  # a relative path lands inside the case's folder
            try:
                if name in VARIED:
                    argument, cls = VARIED[name]
                    kwargs = {**PYTHON_CALLS[name](inputs, root), argument: _varied(name)(**odd)}
                else:
                    kwargs = {**PYTHON_CALLS[name](inputs, root), **odd}
                _within(CALL_SECONDS.get(name, 10.0), lambda: function(**kwargs))
            except _TooLong:
                pass  # took the arguments and was working
            except DOCUMENTED as e:
                assert str(e) and "\n" not in str(e).strip(), f"{name}({odd!r:.300}): {e!r:.300}"
                assert isinstance(e, SurgeryError) or _raised_by_the_package(e), \
                    f"{name}({odd!r:.300}): a TypeError from outside the package: {e!r:.300}"
                assert not (new := _written(before, _files(root))), f"{name}({odd!r:.300}) failed but wrote {new}"
            except Exception as e:  # noqa: BLE001 - any other error is the finding
                pytest.fail(f"{name}({odd!r:.300}) raised {type(e).__name__}: {str(e)[:300]}")
            finally:
                os.chdir(cwd)
            bad = _not_finite(root, _written(before, _files(root)))
            assert not bad, f"{name}({odd!r:.300}) wrote non-finite or unreadable {bad}"
        for model, state in zip(inputs[:2], states):
            after = model.state_dict()
            assert all(torch.equal(v, after[k]) for k, v in state.items()), f"{name}({odd}) changed its input model"

    case()


def test_every_public_function_and_command_is_fuzzed():
    """A new command or public function is fuzzed by a row in COMMANDS or PYTHON_CALLS: forgetting it fails here."""
    import inspect

    public = {n for n in rs_api().__all__ if inspect.isfunction(getattr(rs_api(), n))}
    called = {n.split(".")[0] for n in PYTHON_CALLS}
    assert public - called == set(NOT_CALLED), f"public functions with no PYTHON_CALLS row: {public - called - set(NOT_CALLED)}"
    assert set(COMMANDS) == set(main.commands), f"commands with no COMMANDS row: {set(main.commands) - set(COMMANDS)}"


def _within(seconds: float, fn):
    """``fn()``, interrupted with _TooLong after ``seconds``."""
    import signal

    def alarm(signum, frame):
        raise _TooLong

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- killed at a random point -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Kill:
    """A command killed (SIGKILL, from this process) at a random point of its work, then run again. The kill
    falls between 40% and 95% of the time a whole run takes, measured first on this machine (the first seconds
    are Python starting and importing torch).

    Args:
        args: the command ({root}, {out} as in COMMANDS).
        output: "folder" (a model folder), "file" (an ONNX file at {out}.onnx) or "explore" (candidate folders).
        resume: the option that continues a killed run when it left a checkpoint (None: run it again).
        checkpoint: the checkpoint's name beside --out.
    """

    args: list[str]
    output: str = "folder"
    resume: str | None = None
    checkpoint: str = "out.checkpoint.pt"


KILLS = {
    "convert": Kill(["convert", *C32, "--weights", "DEFAULT", "--to", "v1", "--out", "{out}"]),
    "calibrate": Kill(["calibrate", "{root}/conv", "--data", "{root}/images", "--iterations", "40", "--out", "{out}"]),
    "finetune": Kill(["finetune", "{root}/conv", "--data", "{root}/images", "--steps", "30", "--batch-size", "2",
                      "--out", "{out}"], resume="--resume"),
    "recover": Kill(["recover", "{root}/conv", "--data", "{root}/images", "--stages", "bn,calibrate",
                     "--iterations", "30", "--eval-images", "2", "--out", "{out}"], resume="--resume",
                    checkpoint="out.recover.pt"),
    "export": Kill(["export", "{root}/conv", "--input-size", "32", "--out", "{out}.onnx"], output="file"),
    "explore": Kill(["explore", *C32, "--weights", "DEFAULT", "--data", "{root}/images", "--variants", "d",
                     "--no-int8", "--stages", "bn", "--eval-images", "2", "--min-time", "0.05", "--threads", "1",
                     "--out", "{out}"], output="explore"),
}
# the CLI in a child process, offline (tests/offline.py): each network attempt is appended to $RESNET_SURGERY_NETWORK_LOG
CLI = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import offline; "
       "offline.install(); from resnet_surgery.cli import main; main()"]


def _complete(kill: Kill, out: Path) -> str | None:
    """What is wrong with what a (killed or finished) run left at ``out``; None when it is absent or whole."""
    import onnx

    from resnet_surgery.store import load

    try:
        if kill.output == "file":
            if (out.parent / (out.name + ".onnx")).exists():
                onnx.checker.check_model(onnx.load(str(out.parent / (out.name + ".onnx"))))
        elif kill.output == "folder":
            if out.exists():
                load(out)
        else:
            for folder in (out / "candidates").glob("[!.]*") if out.exists() else []:  # .*: temporary
                json.loads((folder / "result.json").read_text())
                onnx.checker.check_model(onnx.load(str(folder / "model.onnx")))
    except Exception as e:  # noqa: BLE001 - any failure to read it back is the finding
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KILLS))
def test_a_killed_run_leaves_nothing_partial_and_the_next_run_finishes(name, pristine, tmp_path_factory):
    import re
    import signal
    import subprocess
    import time

    kill = KILLS[name]
    base = tmp_path_factory.mktemp("base")
    shutil.copytree(pristine, base, dirs_exist_ok=True)
    times = []
    for _ in range(2):  # how long a whole run takes here (the faster of two: the first fills caches)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(base, tmp, dirs_exist_ok=True)
            start = time.perf_counter()
            whole = subprocess.run(CLI + [a.format(root=tmp, out=Path(tmp) / "out") for a in kill.args],
                                   capture_output=True, text=True, timeout=300,
                                   env={**os.environ, "RESNET_SURGERY_NETWORK_LOG": tmp + ".network"})
            times.append(time.perf_counter() - start)
            assert whole.returncode == 0, whole.stderr[-2000:]
            assert not Path(tmp + ".network").exists(), "network access attempted"
    seconds = min(times)

    @settings(FUZZ, max_examples=max(1, EXAMPLES // 12) if PROFILE != "short" else 1)
    @given(fraction=st.floats(0.4, 0.95), over=st.booleans() if kill.output != "explore" else st.just(False))
    def case(fraction, over):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            shutil.copytree(base, root, dirs_exist_ok=True)
            out = root / "out"
            args = [a.format(root=root, out=out) for a in kill.args]
            if over:  # a previous output, replaced with --force: the kill must leave it whole (or the new one)
                shutil.copytree(root / "conv", out) if kill.output == "folder" else \
                    shutil.copy(root / "a.onnx", root / "out.onnx")
                args.append("--force")
            before = _files(root)
            log = Path(tmp + ".network")
            env = {**os.environ, "RESNET_SURGERY_NETWORK_LOG": str(log)}
            proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            time.sleep(fraction * seconds)
            proc.kill()
            killed = proc.wait() == -signal.SIGKILL
            CASES[f"kill: {name}" if killed else f"finished before its kill: {name}"] += 1
            assert killed or proc.returncode == 0, f"the run to kill failed first ({proc.returncode})"
            assert (problem := _complete(kill, out)) is None, f"killed at {fraction:.2f}: {problem}"
            if over:
                assert out.exists() or (root / "out.onnx").exists(), "a killed --force run lost the previous output"
            assert all(_files(root).get(p) == before[p] for p in before if not p.startswith("out")), \
                "a killed run changed its inputs"
            again = list(args)
            resumed = False
            if kill.output != "explore" and (out.exists() or (root / "out.onnx").exists()):
                again.append("--force")  # a whole output the killed run finished: replaced
            elif kill.resume and (root / kill.checkpoint).exists():
                again.append(kill.resume)  # the killed run's checkpoint: continued
                resumed = True
            result = subprocess.run(CLI + again, capture_output=True, text=True, timeout=300, env=env)
            assert result.returncode == 0, f"killed at {fraction:.2f}, then {again}: {result.stderr[-2000:]}"
            assert _complete(kill, out) is None and (out.exists() or (root / "out.onnx").exists())
            if resumed:  # it went on from the checkpoint (finetune's summary counts the epochs done before it)
                assert not (root / kill.checkpoint).exists(), "a finished resume left its checkpoint"
                if name == "finetune":
                    done = re.search(r"epochs (\d+)->", (out / "summary.txt").read_text())
                    assert done and int(done.group(1)) > 0, "the resumed finetune started over"
            assert not (bad := _not_finite(root, _written(before, _files(root)))), f"non-finite or unreadable {bad}"
            assert not log.exists(), f"network access attempted: {log.read_text()}"
            left = [p for p in _files(root) if any(part.startswith(".") for part in Path(p).parts)]
            assert not left, f"killed at {fraction:.2f}: the next run left the killed run's temporary files {left}"

    case()


# --- what the fuzzing found, one test each ---------------------------------------------------------------------


def test_a_checkpoint_whose_zip_header_lost_a_bit_is_one_error(tmp_path):
    """Found by fuzzing: "PK" -> "QK" leaves the zip's central directory intact (so it still counts as a zip),
    and torch.load's legacy unpickler then failed with IndexError: pop from empty list."""
    from resnet_surgery.zoo.weights import torch_load

    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(3)}, path)
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SurgeryError, match="not a readable PyTorch checkpoint"):
        torch_load(path)


def test_a_usage_error_is_one_line_naming_the_help():
    """Found by fuzzing the options: click's own usage errors (a bad value, a missing option) were four lines
    (usage, hint, blank, error)."""
    for args, needle in ((["inspect", "resnet18", "--input-size", ""], "Invalid value for '--input-size'"),
                         (["convert", "resnet18"], "Missing option '--out'"),
                         (["nosuch"], "No such command 'nosuch'")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {needle}") and "--help`" in result.stderr, result.stderr
    assert CliRunner().invoke(main, ["--version"]).exit_code == 0


def test_a_nul_byte_in_an_argument_is_one_line():
    """Found by fuzzing the options: `run --calibrate 'a<NUL>b'` raised ValueError (embedded null byte) from
    click's path check."""
    result = CliRunner().invoke(main, ["run", "resnet18", "--to", "v1", "--calibrate", "a\x00b", "--out", "x"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "holds a NUL byte" in result.stderr


def test_found_by_the_long_run_each_is_one_line(tmp_path, pristine, monkeypatch):
    """Found by a run of 150 cases a row: a recipe.json whose input_size was 10^22 (inspect raised TypeError
    deep inside), `finetune --lr 1e308` (torch's optimizer overflowed float32), `bench --batch 2^63`
    (numpy's shape limit), compare_latency(seed=-1) (numpy's generator), and an ONNX file, damaged so that
    onnxruntime failed inside quantize_onnx's parity run (its own exception type came through)."""
    import resnet_surgery as rs
    quantize_module = importlib.import_module("resnet_surgery.deploy.quantize")

    root, damaged = tmp_path / "r", tmp_path / "d"
    shutil.copytree(pristine, root)
    shutil.copytree(pristine / "conv", damaged)
    data = json.loads((damaged / "recipe.json").read_text())
    data["options"]["input_size"] = [3, 10**22, 32]
    (damaged / "recipe.json").write_text(json.dumps(data))
    for args, needle in (
            (["inspect", str(damaged), "--json"], "input_size must be 3 integers"),
            (["finetune", str(root / "conv"), "--data", str(root / "images"), "--lr", "1e308", "--out", "x"], "lr must"),
            (["bench", str(root / "a.onnx"), "--batch", str(2**63)], "batch sizes must be positive integers up to")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and _one_error_line(result.stderr) and needle in result.stderr, result.output
    with pytest.raises(SurgeryError, match="seed must be >= 0"):
        rs.compare_latency({"a": root / "a.onnx"}, seed=-1, progress=False)

    class Fail(Exception):  # onnxruntime's own exception types are not SurgeryError
        pass

    def fails(*args):
        raise Fail("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Invalid input shape: {32,32}\nmore")

    monkeypatch.setattr(quantize_module, "_measured_parity", fails)
    with pytest.raises(SurgeryError, match="onnxruntime could not run .*INVALID_ARGUMENT"):
        quantize(root)


def test_found_by_the_second_long_run_each_is_one_line(pristine):
    """Found by the second run of 150 cases a row: an ONNX file whose node type no longer decoded as text
    (bench raised TypeError: the parser gave bytes), batch_size=2^63 (islice's limit inside the DataLoader) and
    iterations=2^63 (a C integer overflowed)."""
    import onnx

    from resnet_surgery.deploy.onnxfile import is_quantized

    proto = onnx.load(str(pristine / "a.onnx"))

    class Node:  # what the protobuf parser gave for the damaged node: its type as bytes
        op_type = b"Q\xffLinearConv"

    assert is_quantized(type("P", (), {"graph": type("G", (), {"node": [*proto.graph.node, Node()]})})()) is False
    original, converted, data = python_inputs()
    with pytest.raises(SurgeryError, match="batch_size .* from 1 to 65536"):
        rs_api().evaluate(converted, data, batch_size=2**63, progress=False)
    with pytest.raises(SurgeryError, match="iterations from 1 to"):
        rs_api().calibrate(converted, original, data, iterations=2**63, progress=False)


# --- the harness's own checks can fail --------------------------------------------------------------------------


def test_the_checks_catch_a_non_finite_file_and_a_network_attempt(tmp_path):
    import socket

    from safetensors.torch import save_file

    (tmp_path / "a.json").write_text('{"top1": NaN}')
    (tmp_path / "b.json").write_text('{"top1": 1e999}')
    (tmp_path / "ok.json").write_text('{"top1": 1.5}')
    save_file({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "m.safetensors")
    torch.save({"w": torch.tensor([float("nan")])}, tmp_path / "c.pt")
    (tmp_path / "cut.onnx").write_bytes(b"\x08\x07\x12")
    bad = _not_finite(tmp_path, ["a.json", "b.json", "ok.json", "m.safetensors", "c.pt", "cut.onnx"])
    assert [b.split(" ")[0] for b in bad] == ["a.json", "b.json", "m.safetensors", "c.pt", "cut.onnx"], bad
    with pytest.raises(AssertionError, match="network access attempted: .*getaddrinfo"), offline():
        with pytest.raises(OSError, match="network access is off"):
            socket.create_connection(("example.com", 80), timeout=0.1)
    left, right = socket.socketpair(socket.AF_UNIX)  # local sockets (DataLoader workers) stay allowed
    with offline():
        left.sendall(b"x")
        assert right.recv(1) == b"x"
    left.close(), right.close()


def test_found_by_fuzzing_the_new_python_calls_each_is_one_error(pristine, tmp_path):
    """Found by 30 cases a row of the Python calls added to PYTHON_CALLS: export_int8(batch_size=-1) (the
    DataLoader's ValueError) and max_difference(batch=-1) (torch's RuntimeError, a negative dimension)."""
    original, converted, data = python_inputs()
    with pytest.raises(SurgeryError, match="batch_size takes an integer from 1 to"):
        rs_api().export_int8(converted, tmp_path / "q.onnx", data, input_size=(3, 32, 32), batch_size=-1)
    with pytest.raises(SurgeryError, match="min_agreement takes a percentage"):
        rs_api().quantize_onnx(pristine / "a.onnx", tmp_path / "q.onnx", data, min_agreement=float("nan"))
    with pytest.raises(SurgeryError, match="batch takes an integer from 1 to"):
        rs_api().max_difference(original, converted, (3, 32, 32), batch=-1)
    assert not (tmp_path / "q.onnx").exists()


def test_found_by_the_run_of_300_a_row_an_onnx_file_that_loads_but_does_not_run_is_one_error(pristine, tmp_path):
    """Found by the run of 300 cases a row: a bit flip that set a Conv's group to 0 leaves a file onnxruntime
    loads but cannot run; bench's timing and quantize_onnx's image check let onnxruntime's own Fail through."""
    import onnx

    proto = onnx.load(str(pristine / "a.onnx"))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "group").i = 0
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    result = CliRunner().invoke(main, ["bench", str(pristine / "a.onnx"), str(tmp_path / "bad.onnx"), "--threads", "1",
                                       "--min-time", "0.02", "--max-time", "0.1"])
    assert result.exit_code == 2 and _one_error_line(result.stderr), result.output
    assert "onnxruntime could not run bad at batch 1" in result.stderr
    original, converted, data = python_inputs()
    with pytest.raises(SurgeryError, match="onnxruntime could not run .*bad.onnx"):
        rs_api().quantize_onnx(tmp_path / "bad.onnx", tmp_path / "q.onnx", data, num_images=3, parity_images=3)
    assert not (tmp_path / "q.onnx").exists()


def test_found_by_200_cases_a_row_of_the_python_calls_threads_past_a_c_int_is_one_error(pristine):
    """Found by 200 cases a row of the Python calls: compare_latency(threads=2^63) reached onnxruntime's
    SessionOptions, whose TypeError spans several lines."""
    with pytest.raises(SurgeryError, match="threads from 1 to 4096"):
        rs_api().compare_latency({"a": pristine / "a.onnx"}, threads=2**63, progress=False)
    result = CliRunner().invoke(main, ["bench", str(pristine / "a.onnx"), "--threads", str(2**63)])
    assert result.exit_code == 2 and _one_error_line(result.stderr), result.output



def test_found_by_a_kill_a_resumed_run_with_no_step_left_writes_no_nan():
    """Found by the second run of 300 a row (the non-finite check): finetune killed after its last epoch's
    checkpoint, then resumed, took no step, and wrote loss_start/loss_end NaN (a mean of no losses) into
    recipe.json. Such a run has no loss (null); every JSON the tool writes turns a NaN into null."""
    from resnet_surgery.recovery import FinetuneReport
    from resnet_surgery.utils import json_text

    report = FinetuneReport(epochs=10, start_epoch=10, steps=0, images=0, world_size=1, distill_losses=[],
                            epoch_losses=[], cpu_seconds=0.0, wall_seconds=0.0, checkpoint=None, error_before=1.2,
                            error_after=0.1)
    assert report.to_dict()["loss_start"] is None and "no step left" in str(report)
    assert json.loads(json_text(report.to_dict()))["loss_end"] is None
    assert json.loads(json_text({"a": [float("nan"), float("inf"), 1.5]})) == {"a": [None, None, 1.5]}


def test_found_by_the_counted_run_of_250_a_row_a_size_the_model_does_not_take_is_one_error():
    """Found by the counted run of 250 cases a row: count_macs(input_size=[1, 1, 1]) let torch's RuntimeError (a
    channel count the first conv does not take) through; inspect's shape propagation did the same."""
    original, converted, data = python_inputs()
    for call in (lambda: rs_api().count_macs(converted, [1, 1, 1]), lambda: rs_api().inspect(converted, (1, 32, 32))):
        with pytest.raises(SurgeryError, match="does not run on a 1x.* input .*pass the input size it takes"):
            call()


def test_found_by_the_checkpoint_contents_a_finetune_checkpoint_with_odd_values_is_one_error(tmp_path):
    """Found by mutating the checkpoints' contents (not only their bytes): a finetune checkpoint whose "model"
    was None let load_state_dict's TypeError through; counters out of range and NaN weights resumed."""
    finetune_checkpoint(tmp_path)
    state = torch.load(tmp_path / "ft.pt", weights_only=True)
    for key, value, message in [("model", None, "holds no model weights"), ("epoch", -1, "counters out of range"),
                                ("step", 2.5, "counters out of range"), ("epoch", 99, "counters out of range")]:
        torch.save({**state, key: value}, tmp_path / "ft.pt")
        with pytest.raises(SurgeryError, match=message):
            resume_finetune(tmp_path)
    weights = {k: v.clone() for k, v in state["model"].items()}
    next(v for v in weights.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save({**state, "model": weights}, tmp_path / "ft.pt")
    with pytest.raises(SurgeryError, match="non-finite weights"):
        resume_finetune(tmp_path)


def test_found_by_the_safetensors_headers_a_weights_file_with_nan_is_refused_and_nothing_is_saved(pristine, tmp_path):
    """Found by mutating a weights file's tensors: convert --weights FILE with a NaN in it wrote a model folder
    holding the NaN (exit 0). A weights file or folder with NaN is refused when loaded, and save() refuses a
    model with NaN weights."""
    from safetensors.torch import save_file

    weights_file(".safetensors")(tmp_path)
    state = {k: v.clone() for k, v in rs_api().load_cifar_resnet("v1.5").state_dict().items()}
    state["fc.weight"][0, 0] = float("inf")
    save_file(state, tmp_path / "w.safetensors")
    result = CliRunner().invoke(main, ["convert", "cifar10-resnet-v1.5", "--weights", str(tmp_path / "w.safetensors"),
                                       "--to", "v1", "--input-size", "32", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and _one_error_line(result.stderr), result.output
    assert "holds NaN or infinite values (fc.weight)" in result.stderr and not (tmp_path / "out").exists()
    converted = rs_api().convert(rs_api().load_cifar_resnet("v1.5"), "v1", input_size=(3, 32, 32), warn=False)
    with torch.no_grad():
        converted.fc.bias[0] = float("nan")
    with pytest.raises(SurgeryError, match=r"NaN or infinite weights \(fc.bias\); nothing was written"):
        rs_api().save(converted, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_found_by_fuzzing_required_arguments_unusable_paths_and_missing_models_are_one_error(tmp_path):
    """Found once PYTHON_CALLS varied the required arguments too: a path with a name over 255 bytes let the
    OSError "File name too long" through load/read_recipe/onnx_input_shape; find_blocks(None),
    find_trunk(None), site_reads(model, None) and finetune(original=None) raised AttributeError."""
    for call in (rs_api().load, rs_api().read_recipe, rs_api().onnx_input_shape):
        with pytest.raises(SurgeryError, match="longer than this system allows"):
            call(tmp_path / ("x" * 300))
        with pytest.raises(SurgeryError, match="holds a NUL character"):
            call(str(tmp_path / "a\x00b"))
    original, converted, data = python_inputs()
    for call, name in [(lambda: rs_api().find_blocks(None), "gm"), (lambda: rs_api().find_trunk(None), "model"),
                       (lambda: rs_api().site_reads(converted, None), "report"),
                       (lambda: rs_api().finetune(converted, None, data, steps=1), "original")]:
        with pytest.raises(TypeError, match=f"{name} takes"):
            call()


def test_found_by_the_run_of_200_a_row_a_checkpoint_under_a_file_is_one_error(pristine, tmp_path):
    """Found by the counted run of 200 a row: recover(checkpoint="<a file>/x") let NotADirectoryError through
    when it wrote its first checkpoint (finetune checked its checkpoint's path before any work; recover now too)."""
    original, converted, data = python_inputs()
    with pytest.raises(SurgeryError, match="is a file, not a folder"):
        rs_api().recover(converted, original, data, checkpoint=pristine / "a.onnx" / "x", progress=False,
                         echo=lambda line: None)
