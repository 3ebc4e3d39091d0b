"""Charts people can read: explore's numbered points never print over each other, and a PNG is written."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from resnet_surgery.workflows.explore import Candidate, ExploreReport  # noqa: E402
from resnet_surgery.workflows.explore_plot import _number  # noqa: E402


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_numbers_of_clustered_points_do_not_overlap():
    # ResNet-50's explore: every candidate at 100% agreement, several within 0.03 of each other in latency.
    xy = [(0.29, 100.0), (0.31, 100.0), (0.32, 100.0), (0.30, 100.0), (0.33, 100.0), (0.35, 100.0),
          (0.90, 100.0), (0.95, 100.0), (1.0, 100.0), (1.0, 100.0)]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(*zip(*xy), "o")
    ax.margins(0.12)
    fig.tight_layout()
    _number(ax, xy)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    plt.close(fig)
    assert len(boxes) == len(xy)
    clashes = [(i + 1, j + 1) for i in range(len(boxes)) for j in range(i) if overlaps(boxes[i], boxes[j])]
    assert not clashes, clashes


def test_explore_chart_is_written(tmp_path):
    def candidate(name, precision, ratio, top1):
        lat = {"p50_ms": 1.0, "p90_ms": 1.1, "ratio": ratio, "ratio_low": ratio - 0.01, "ratio_high": ratio + 0.01}
        return {"name": name, "precision": precision, "status": "ok", "eval": {"top1": top1, "agreement": 100.0},
                "latency": {"1": lat}, "pareto": {"1": ratio < 0.5}}

    report = ExploreReport(model="m", metric="top1", settings={"eval_images": 10},
                           candidates=[Candidate.from_dict(c) for c in (candidate("original", "fp32", 1.0, 85.0),
                                                                         candidate("v1", "fp32", 0.9, 84.0),
                                                                         candidate("original-int8", "int8", 0.3, 84.9))],
                           latency={"batch_sizes": [1], "machine": {}, "settings": {}}, seconds=1.0)
    path = report.plot(tmp_path / "explore.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
