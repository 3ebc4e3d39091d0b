import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms.functional import pil_to_tensor
from util import write_random_images

from resnet_surgery import Source, history, load_model
from resnet_surgery.cli.options import build_preprocessing
from resnet_surgery.data import (
    CIFAR10_CLASSES,
    as_loader,
    build_transform,
    cache_root,
    cifar10_tensors,
    extract_cifar10,
    model_transform,
    preset_transform,
    split_batch,
)
from resnet_surgery.errors import SurgeryError
from resnet_surgery.history import record


@pytest.fixture(scope="module")
def cifar_test_dir(shared_data, tmp_path_factory):
    return extract_cifar10(shared_data, "test", tmp_path_factory.mktemp("cache"))


def test_extract_gives_an_image_folder(cifar_test_dir):
    assert sorted(d.name for d in cifar_test_dir.iterdir() if d.is_dir()) == list(CIFAR10_CLASSES)
    assert len(list((cifar_test_dir / "cat").glob("*.jpg"))) == 1000


def test_extract_runs_once(shared_data, cifar_test_dir, monkeypatch):
    import tarfile

    # A completed extraction is reused: the tar is not opened again.
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("extracted twice"))
    assert extract_cifar10(shared_data, "test", cifar_test_dir.parents[1]) == cifar_test_dir


def test_extract_redoes_a_half_extracted_folder(shared_data, tmp_path):
    half = tmp_path / "cifar10" / "test" / "cat"
    half.mkdir(parents=True)
    (half / "junk.jpg").write_bytes(b"not a jpeg")
    root = extract_cifar10(shared_data, "test", tmp_path)
    assert not (root / "cat" / "junk.jpg").exists()
    assert len(list((root / "dog").glob("*.jpg"))) == 1000


def test_extract_bad_split_and_missing_data(shared_data, tmp_path):
    with pytest.raises(SurgeryError, match="split"):
        extract_cifar10(shared_data, "val", tmp_path)
    with pytest.raises(SurgeryError, match="not found"):
        extract_cifar10(tmp_path / "nowhere", "test", tmp_path)


def test_cifar10_tensors_match_the_image_folder(shared_data, cifar_test_dir):
    images, labels = cifar10_tensors(shared_data, "test")
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.equal(labels.bincount(), torch.full((10,), 1000))
    # Tar order = sorted paths = ImageFolder order: the same pixels and label as torchvision's decode.
    ds = as_loader(cifar_test_dir, preset="cifar10").dataset
    path, label = ds.samples[1234]
    pil = pil_to_tensor(Image.open(path).convert("RGB"))
    assert label == labels[1234]
    assert (pil.int() - images[1234].int()).abs().max() <= 2  # JPEG decoders may round differently


def test_presets_output_shapes():
    big = Image.new("RGB", (500, 375), (120, 30, 200))
    small = Image.new("RGB", (32, 32), (120, 30, 200))
    assert preset_transform("imagenet")(big).shape == (3, 224, 224)
    assert preset_transform("cifar10")(small).shape == (3, 32, 32)
    assert preset_transform("cifar10", size=40)(small).shape == (3, 40, 40)
    x = build_transform(size=64, resize=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(small)
    assert x.shape == (3, 64, 64)
    assert torch.allclose(x[:, 0, 0], torch.tensor([120, 30, 200]) / 255 * 2 - 1, atol=1e-5)
    with pytest.raises(SurgeryError, match="preset"):
        preset_transform("mnist")


def test_as_loader_from_folder_with_subset(cifar_test_dir):
    loader = as_loader(cifar_test_dir, preset="cifar10", batch_size=8, num_images=20, seed=3)
    batches = list(loader)
    assert sum(len(split_batch(b)[0]) for b in batches) == 20
    images, labels = split_batch(batches[0])
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)
    # Same seed, same subset.
    again = split_batch(next(iter(as_loader(cifar_test_dir, preset="cifar10", batch_size=8, num_images=20, seed=3))))
    assert torch.equal(again[1], labels)


def test_as_loader_from_dataset_with_and_without_labels():
    x = torch.randn(10, 3, 8, 8)
    y = torch.arange(10)
    images, labels = split_batch(next(iter(as_loader(TensorDataset(x, y), batch_size=4))))
    assert torch.equal(images, x[:4]) and torch.equal(labels, y[:4])

    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return x[i]

    loader = as_loader(Unlabelled(), batch_size=4, num_images=6)
    batches = [split_batch(b) for b in loader]
    assert all(lab is None for _, lab in batches)
    assert sum(len(im) for im, _ in batches) == 6


def test_as_loader_passes_a_dataloader_through():
    dl = DataLoader(TensorDataset(torch.randn(10, 3, 8, 8)), batch_size=5)
    assert as_loader(dl) is dl
    images, labels = split_batch(next(iter(as_loader(dl, num_images=3))))
    assert images.shape == (3, 3, 8, 8) and labels is None


def test_as_loader_errors(tmp_path):
    with pytest.raises(SurgeryError, match="not found"):
        as_loader(tmp_path / "missing")
    with pytest.raises(SurgeryError, match="no images"):
        as_loader(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(SurgeryError, match="no images"):
        as_loader(tmp_path)
    with pytest.raises(SurgeryError, match="empty"):
        as_loader(TensorDataset(torch.empty(0, 3)))
    with pytest.raises(SurgeryError, match="Dataset"):
        as_loader([1, 2, 3])
    with pytest.raises(SurgeryError, match="batch"):
        split_batch("text")


def test_a_flat_folder_of_real_imagenet_images_loads_without_labels(shared_data):
    import torchvision

    from resnet_surgery.recovery.evaluate import evaluate

    folder = shared_data / "imagenet-val"  # ten full-size validation images, no class folders
    images, labels = split_batch(next(iter(as_loader(folder, batch_size=4))))
    assert images.shape == (4, 3, 224, 224) and labels is None
    assert -3 < float(images.mean()) < 3 and float(images.std()) > 0.3  # normalised real pixels, not zeros
    model = torchvision.models.resnet18(weights=None).eval()
    report = evaluate(model, folder, reference=model, batch_size=5, progress=False)
    assert report.num_images == 10 and report.top1 is None and report.agreement == 100.0


def test_the_cache_is_the_users_not_the_packages(tmp_path, monkeypatch):
    monkeypatch.delenv("RESNET_SURGERY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "resnet-surgery" and cache_root().is_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "resnet-surgery"
    monkeypatch.setenv("RESNET_SURGERY_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert cache_root(tmp_path / "given") == tmp_path / "given"


def with_source(model, *source):
    return record(model, source=Source(*source))


def test_images_are_prepared_as_the_weights_were_published():
    r50 = torchvision.models.resnet50()
    v2 = model_transform(with_source(r50, "resnet50", "torchvision", "IMAGENET1K_V2"))
    assert v2.resize_size == [232] and v2.crop_size == [224]  # not the 256 of the imagenet preset
    assert model_transform(with_source(r50, "resnet50", "torchvision", "IMAGENET1K_V1")).resize_size == [256]
    assert model_transform(with_source(r50, "resnet50", "torchvision", "DEFAULT")).resize_size == [232]
    # Random or local weights, and models resnet-surgery did not load: the preset decides.
    assert model_transform(with_source(r50, "resnet50", "torchvision", "none")) is None
    assert model_transform(with_source(r50, "resnet50", "torchvision", "r50.pth")) is None
    assert model_transform(torchvision.models.resnet18()) is None
    timm_model = with_source(timm.create_model("resnet18"), "timm:resnet18", "timm", "none")
    resize = [t for t in model_transform(timm_model).transforms if type(t).__name__ == "Resize"][0]
    assert resize.size == 235 and resize.interpolation.value == "bicubic"  # crop_pct 0.95, timm's data config
    cifar = load_model("cifar10-resnet-v1", "DEFAULT")
    assert model_transform(cifar)(Image.new("RGB", (40, 40))).shape == (3, 32, 32)
    assert model_transform(converted_copy(cifar)) is not None


def converted_copy(model):
    """A converted model keeps its source, so its images are prepared like the original's."""
    import warnings

    from resnet_surgery import SurgeryNotice, convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryNotice)
        converted = convert(model, "v1.5", input_size=(3, 32, 32))
    assert history(converted).source == history(model).source
    return converted


def test_cli_preprocessing_takes_the_models_own_unless_told_otherwise():
    model = with_source(torchvision.models.resnet50(), "resnet50", "torchvision", "IMAGENET1K_V2")
    assert build_preprocessing(None, None, None, None, None, model).resize_size == [232]
    imagenet = build_preprocessing("imagenet", None, None, None, None, model)
    assert [type(t).__name__ for t in imagenet.transforms][:2] == ["Resize", "CenterCrop"]
    assert imagenet.transforms[0].size == 256
    assert build_preprocessing(None, 64, None, None, None, model).transforms[1].size == (64, 64)
    assert build_preprocessing(None, None, None, None, None, torchvision.models.resnet50()).transforms[0].size == 256


def test_a_data_spec_is_taken_wherever_images_go_in(tmp_path):
    """rs.DataSpec says how to read images once; evaluate, predict and the held-out split read it as it says."""
    import resnet_surgery as rs
    from resnet_surgery.data import held_out_split

    folder = write_random_images(tmp_path / "imgs" / "cat", 6, 32).parent
    model = rs.load_cifar_resnet("v1.5")
    spec = rs.DataSpec(folder, preset="cifar10", num_images=4, batch_size=2)
    by_spec = rs.predict(model, spec, progress=False)
    by_arguments = rs.predict(model, folder, preset="cifar10", num_images=4, progress=False)
    assert by_spec.shape == (4, 10) and torch.equal(by_spec, by_arguments)
    assert rs.evaluate(model, spec, progress=False).num_images == 4
    kept, held = held_out_split(spec, keep=None, hold=2)
    assert len(kept) == 2 and len(held) == 2
    imagenet = rs.predict(model, rs.DataSpec(folder, num_images=4), progress=False)  # another preset: other inputs
    assert not torch.equal(imagenet, by_spec)
