"""Fuzzing the files the tool reads back (Hypothesis): a valid input is made once, mutated case by case, fed
to the command that reads it, and the properties every command owes its user are checked on every case.

Properties: the command succeeds, or ends with exit code 2 and one line on stderr ("error: ..."); no
traceback; nothing is written outside its --out (and nothing at all by a command without one); the input
it read is left as it was; a library call raises SurgeryError and nothing else. A new input is fuzzed by
adding a row to TARGETS. `make fuzz` runs the long profile (RESNET_SURGERY_FUZZ=long, a thousand cases per input, random
seeds); `make test` the short one (a dozen, derandomized: the same cases every run). A failing case Hypothesis finds is printed with its seed; fix it and add it as a test.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from util import write_random_images

from resnet_surgery.cli import main
from resnet_surgery.errors import SurgeryError

PROFILE = os.environ.get("RESNET_SURGERY_FUZZ", "short")  # "short", "long" or a number of cases per input
EXAMPLES = {"short": 12, "long": 1000}.get(PROFILE) or int(PROFILE)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=PROFILE == "short",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

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
    """Every path (tuple of keys and indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_json(draw, original: bytes) -> bytes:
    """``original`` (JSON) with one value replaced by an odd one, a key deleted or added, or its bytes mutated."""
    if draw(st.booleans()):
        return draw(mutated_bytes(original))
    value = json.loads(original)
    paths = [p for p in _paths(value) if p]
    path = draw(st.sampled_from(paths))
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace" or isinstance(parent, list):
        parent[path[-1]] = draw(ODD_VALUE)
    elif action == "delete":
        del parent[path[-1]]
    else:
        parent[draw(ODD_TEXT)] = draw(ODD_VALUE)
    return json.dumps(value, allow_nan=True).encode()


# --- what is fuzzed -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """One input the tool reads from outside.

    Args:
        make: writes a valid input under a folder (once per session) and returns the file to mutate.
        mutate: the strategy of mutated contents, given the valid file's bytes.
        command: the CLI arguments that read it ({root}: the folder holding it; {out}: an output folder), or
        call: a library call on the root folder that must succeed or raise SurgeryError.
    """

    make: Callable[[Path], Path]
    mutate: Callable[[bytes], st.SearchStrategy]
    command: list[str] | None = None
    call: Callable[[Path], object] | None = None


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
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    after = _files(root)
    assert after.get(str(case.relative_to(root))) == before.get(str(case.relative_to(root))), "the input changed"
    new = {p for p in set(after) - set(before) if not p.startswith("out/") and not p.startswith("out" + os.sep)}
    assert not new, f"written outside --out: {sorted(new)}"
    if result.exit_code == 2:
        assert not out.exists(), "a refused run left --out behind"


@pytest.mark.parametrize("name", list(TARGETS))
def test_a_mutated_input_is_refused_in_one_line_or_read(name, pristine, tmp_path_factory):
    target = TARGETS[name]
    base = tmp_path_factory.mktemp("base")
    shutil.copytree(pristine, base, dirs_exist_ok=True)
    relative = target.make(base).relative_to(base)  # the valid input, beside everything the commands read
    original = (base / relative).read_bytes()

    @FUZZ
    @given(content=target.mutate(original))
    def case(content):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            shutil.copytree(base, root, dirs_exist_ok=True)
            (root / relative).write_bytes(content)
            if target.call is None:
                _check_command(target, root, root / relative)
                return
            try:
                target.call(root)
            except SurgeryError as e:
                assert "\n" not in str(e), str(e)

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
