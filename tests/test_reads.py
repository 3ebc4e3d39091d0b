"""What each downsampling conv reads: patterns as data against hand-computed arrays, the moved stride, text, PNG."""

import copy
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn
from util import CaffeResNet

import resnet_surgery as rs
from resnet_surgery.engine.layers import avgpool_shortcut
from resnet_surgery.engine.reads import axis_counts, read_counts

SIZE = (3, 64, 64)
EVEN = np.array([True, False] * 3)  # rows and columns 0, 2, 4 of a 6x6 patch


def every_other(n: int = 6) -> np.ndarray:
    return np.outer(EVEN[:n], EVEN[:n])


def test_1x1_stride2_reads_one_of_four():
    count = read_counts(nn.Conv2d(4, 4, 1, stride=2), 6, 6)
    assert (count > 0).tolist() == every_other().tolist()
    assert count.max() == 1 and (count > 0).mean() == 0.25


def test_3x3_stride2_reads_all_with_overlap():
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1)
    # Output i reads rows 2i-1, 2i, 2i+1: odd rows are read twice, even rows once (row 0 only by output 0).
    axis = np.array([1, 2, 1, 2, 1, 2])
    assert read_counts(conv, 12, 12)[:6, :6].tolist() == np.outer(axis, axis).tolist()
    # A 6x6 input ends with output 2 (rows 3, 4, 5): its last row is read once.
    edge = np.array([1, 2, 1, 2, 1, 1])
    assert read_counts(conv, 6, 6).tolist() == np.outer(edge, edge).tolist()


def test_avgpool_shortcut_reads_all_once():
    count = read_counts(avgpool_shortcut(2), 6, 6)
    assert count.tolist() == np.ones((6, 6), dtype=int).tolist()
    # ceil_mode at an odd size: the last row is a window of its own, so it is still read.
    assert axis_counts(7, 2, 2, ceil_mode=True).tolist() == [1] * 7
    assert axis_counts(7, 2, 2, ceil_mode=False).tolist() == [1] * 6 + [0]


def test_dilated_exact_form_reads_what_the_1x1_reads():
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2)
    for size in (6, 7, 12):
        one = read_counts(nn.Conv2d(4, 4, 1, stride=2), size, size)
        assert ((read_counts(conv, size, size) > 0) == (one > 0)).all()
    # Output i reads rows 2i-2, 2i, 2i+2: row 0 by outputs 0 and 1, each later even row by three outputs.
    axis = np.array([2, 0, 3, 0, 3, 0])
    assert read_counts(conv, 12, 12)[:6, :6].tolist() == np.outer(axis, axis).tolist()


@pytest.fixture(scope="module")
def resnet50_variants():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rs.SurgeryNotice)
        model = torchvision.models.resnet50().eval()
        v1 = rs.convert(model, "v1")
        return {"v1.5": model, "v1": v1, "d": rs.convert(model, "d"), "pruned v1": rs.convert(v1, prune_dead=True),
                "exact": rs.convert(v1, "v1.5", exact=True)}


def by_branch(site):
    return {c.branch: c for c in site.convs}


def test_resnet50_sites_and_moved_stride(resnet50_variants):
    v1 = resnet50_variants["v1"]
    sites = rs.site_reads(v1, rs.inspect(v1, SIZE))
    assert [s.block for s in sites] == ["layer2.0", "layer3.0", "layer4.0"]
    first = sites[0]
    assert first.before == "layer1.2" and first.dead_macs > 0
    assert first.moved_to == "stride 2 on layer2.0.conv1 = stride 2 on layer1.2.conv2"
    assert [(c.name, c.branch) for c in first.convs] == [("layer2.0.conv1", "main"),
                                                         ("layer2.0.downsample.0", "shortcut")]
    assert all(c.read.tolist() == every_other().tolist() and c.fraction == 0.25 for c in first.convs)

    d = by_branch(rs.site_reads(resnet50_variants["d"], rs.inspect(resnet50_variants["d"], SIZE))[0])
    assert d["shortcut"].kind == "AvgPool2d" and d["shortcut"].count.tolist() == np.ones((6, 6), int).tolist()
    assert d["main"].read.all() and d["main"].count.max() == 4

    exact = by_branch(rs.site_reads(resnet50_variants["exact"], rs.inspect(resnet50_variants["exact"], SIZE))[0])
    assert exact["main"].dilation == 2 and exact["main"].read.tolist() == every_other().tolist()

    original = rs.site_reads(resnet50_variants["v1.5"], rs.inspect(resnet50_variants["v1.5"], SIZE))
    assert all(s.dead_macs == 0 and s.moved_to is None for s in original)


def test_pruned_sites_sit_where_the_stride_moved(resnet50_variants):
    pruned = resnet50_variants["pruned v1"]
    sites = rs.site_reads(pruned, rs.inspect(pruned, SIZE))
    first = by_branch(sites[0])
    assert first["main"].name == "layer1.2.conv2" and first["main"].read.all()
    assert first["shortcut"].kind == "Subsample" and first["shortcut"].read.tolist() == every_other().tolist()
    assert "add_2 (layer1.2)" in rs.grid_text(sites)


def test_grid_text_rows(resnet50_variants):
    v1 = resnet50_variants["v1"]
    text = rs.inspect(v1, SIZE).grid(v1)
    lines = text.splitlines()
    assert lines[0].startswith("layer2.0: the block before (layer1.2) spends")
    assert lines[1].strip() == "stride 2 on layer2.0.conv1 = stride 2 on layer1.2.conv2"
    assert "1x1/s2 reads 25%" in lines[3]
    # The two patterns of a site side by side: each position's read count, 1 . 1 . 1 ., then a row nobody reads.
    assert lines[4].split() == ["1", "."] * 6 and lines[5].split() == ["."] * 12
    # layer2.0 and layer3.0: 3 such rows per 6x6 pattern, 2 patterns each; layer4.0's input is 4x4 at 64x64.
    assert text.count("1 . 1 . 1 .") == 2 * 3 * 2
    assert lines[-4:] == ["  1 . 1 .            1 . 1 .", "  . . . .            . . . ."] * 2


def test_custom_caffe_resnet():
    model = CaffeResNet(v1=True).eval()
    sites = rs.site_reads(model, rs.inspect(model, (3, 32, 32)))
    assert [s.block for s in sites] == ["res3.0", "res4.0"]
    assert sites[0].moved_to == "stride 2 on res3.0.branch2a = stride 2 on res2.1.branch2b"
    assert {c.name for c in sites[0].convs} == {"res3.0.branch2a", "res3.0.branch1.0"}


def test_timm_resnet_d():
    model = timm.create_model("resnet26d", pretrained=False).eval()
    sites = rs.site_reads(model, rs.inspect(model, SIZE))
    assert len(sites) == 3
    shortcut = by_branch(sites[0])["shortcut"]
    assert shortcut.kind == "AvgPool2d" and shortcut.read.all() and shortcut.count.max() == 1
    assert all(s.moved_to is None for s in sites)


def test_report_of_another_model_is_refused(resnet50_variants):
    with pytest.raises(rs.SurgeryError, match="not of this model"):
        rs.site_reads(CaffeResNet().eval(), rs.inspect(resnet50_variants["v1"], SIZE))


def test_plot_writes_png_and_changes_nothing(tmp_path, resnet50_variants):
    v1, d = resnet50_variants["v1"], resnet50_variants["d"]
    v1.train()  # BatchNorm in training mode would count batches and move its statistics if anything ran it so
    before = {k: v.clone() for k, v in v1.state_dict().items()}
    report = rs.inspect(v1, SIZE)
    report.grid(v1)
    path = report.plot(tmp_path / "sites.png", v1, compare=[d], labels=["v1", "d"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    after = v1.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert v1.training and all(m.training for m in v1.modules())
    v1.eval()


def test_plot_sites_of_one_model(tmp_path):
    model = CaffeResNet(v1=True).eval()
    state = copy.deepcopy(model.state_dict())
    path = rs.plot_sites(rs.site_reads(model, rs.inspect(model, (3, 32, 32))), tmp_path / "one.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_cli_inspect_grid_and_plot(tmp_path):
    from click.testing import CliRunner

    from resnet_surgery.cli import main

    png = tmp_path / "sites.png"
    args = ["inspect", "cifar10-resnet-v1", "--input-size", "32", "--grid", "--plot", str(png),
            "--compare", "cifar10-resnet-v1.5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "stride 2 on layer2.0.conv1 = stride 2 on layer1." in result.output
    assert "1 . 1 . 1 ." in result.output and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(main, args)  # an existing --plot is kept without --force
    assert again.exit_code == 2 and "--force" in again.output
    alone = CliRunner().invoke(main, ["inspect", "cifar10-resnet-v1", "--compare", "cifar10-resnet-v1.5"])
    assert alone.exit_code == 2 and "--compare goes with --plot" in alone.output
