import os

import pytest

from resnet_surgery.atomic import atomic_dir, atomic_file
from resnet_surgery.errors import SurgeryError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_get_ordinary_permissions_not_private_temp_ones(tmp_path, umask_022):
    with atomic_file(tmp_path / "model.onnx") as tmp:
        tmp.write_text("x")
    with atomic_dir(tmp_path / "converted") as tmp:
        (tmp / "recipe.json").write_text("{}")
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "converted").stat().st_mode & 0o777 == 0o755


def test_failure_leaves_nothing_and_existing_output_needs_force(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.onnx") as tmp:
            tmp.write_text("half")
            raise RuntimeError("export failed")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("convert failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "b.onnx").write_text("old")
    with pytest.raises(SurgeryError, match="already exists; pass --force"):
        with atomic_file(tmp_path / "b.onnx"):
            pass
    with atomic_file(tmp_path / "b.onnx", force=True) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "b.onnx").read_text() == "new"
