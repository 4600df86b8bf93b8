"""`edgetok compare`: every fixed-count method matched to the same GMACs, exported, evaluated against dense and
profiled through the same path, in one table and one plot; bad requests are one line."""

import json

import pytest
from cli_assertions import assert_one_line_error, run_cli

from edgetok.workflows.comparison import METHODS, match


@pytest.mark.slow
def test_every_method_matches_deit_small_targets():
    """At 65 % and 50 % of DeiT-S's 4.60 GMACs (about 3.0 and 2.3) every method finds a setting within 3 %."""
    from edgetok.vit.flops import vit_macs
    from edgetok.vit.loading import load_vit
    from edgetok.vit.reduction import plan

    vit = load_vit("deit_small_patch16_224")
    dense = vit_macs(vit, plan(vit, None).tokens) / 1e9
    for fraction in (0.65, 0.5):
        for method in METHODS:
            setting, gmacs = match(vit, method, fraction * dense)
            assert abs(gmacs / (fraction * dense) - 1) < 0.03, (method, setting, gmacs)
    assert match(vit, "tome", 0.65 * dense)[0] == {"r": 11}  # 2.99 GMACs, as the recipes say


@pytest.mark.slow
def test_compare_on_the_reference_model(capsys, tmp_path):
    from edgetok.vit.digits import write_heldout_folder

    data = write_heldout_folder(tmp_path / "heldout")["path"]
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "compare", "edgetok_digits_vit", "--data", data, "--fractions", "0.65",
                                "--batch", "2", "--duration", "0.05", "--rounds", "1", "-o", str(out))
    assert code == 0, err
    report = json.loads((out / "profile.json").read_text())
    rows = report["comparison"]
    assert [r["name"].split(" ")[0] for r in rows] == ["dense", "tome", "pitome", "zerotprune", "gtp", "evit"]
    target = 0.65 * report["compare"]["dense_gmacs"]
    for r in rows[1:]:
        assert abs(r["gmacs"] / target - 1) < 0.1 and r["top1"] > 0.8 and r["agreement"] is not None
        assert r["flops_bound"] > 1.3
    assert rows[0]["agreement"] is None and "| agreement | KL |" in stdout
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG" and (out / "profile.md").is_file()
    assert len(list((out / "models").glob("*.onnx"))) == 6


@pytest.mark.parametrize("args,message", [
    (["--methods", "tome,ats"], "--methods ats: compare matches tome, pitome, zerotprune, gtp, evit"),
    (["--fractions", "1.2"], "--fractions 1.2 must be in (0, 1)"),
    (["--fractions", "a"], "--fractions 'a' is not a list of numbers"),
])
def test_bad_requests_are_one_line_and_write_nothing(capsys, tmp_path, args, message):
    from PIL import Image

    (tmp_path / "data" / "0").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "0" / "a.png")  # a valid folder: only the option is wrong
    code, _, err = run_cli(capsys, "compare", "edgetok_digits_vit", "--data", str(tmp_path / "data"), *args,
                           "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


# A profile's comparison rows as the plot reads them: the reference model's trade-off (README, reference_tradeoff.py),
# 20 models of 6 methods, crowded where the merging methods' top-1 ties at 97.59 %.
TRADEOFF = [("dense", "dense", 0.0483, 61.53, 97.59), ("tome r=2", "tome", 0.0434, 71.85, 97.59),
            ("tome r=4", "tome", 0.0386, 65.64, 97.59), ("tome r=6", "tome", 0.0338, 58.55, 97.59),
            ("tome r=8", "tome", 0.0292, 49.26, 97.40), ("pitome r=2", "pitome", 0.0434, 72.68, 97.59),
            ("pitome r=4", "pitome", 0.0386, 61.77, 97.59), ("pitome r=6", "pitome", 0.0338, 55.22, 97.40),
            ("pitome r=8", "pitome", 0.0292, 48.41, 97.22), ("zerotprune r=2", "zerotprune", 0.0434, 82.33, 96.85),
            ("zerotprune r=4", "zerotprune", 0.0386, 73.59, 95.55), ("zerotprune r=6", "zerotprune", 0.0338, 81.75, 95.55),
            ("zerotprune r=8", "zerotprune", 0.0292, 57.50, 94.62), ("gtp p=2", "gtp", 0.0434, 69.14, 97.59),
            ("gtp p=4", "gtp", 0.0386, 66.17, 97.59), ("gtp p=6", "gtp", 0.0338, 56.80, 97.40),
            ("gtp p=8", "gtp", 0.0292, 64.10, 97.22), ("evit 0.9", "evit", 0.0431, 61.91, 96.47),
            ("evit 0.7", "evit", 0.0318, 44.42, 94.62), ("evit 0.5", "evit", 0.0237, 34.58, 93.32)]


def _rows(points):
    return [{"name": n, "method": m, "gmacs": g, "median_ms": ms, "top1": t / 100, "speedup": points[0][3] / ms}
            for n, m, g, ms, t in points]


def _label_boxes(ax):
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    return [(t.get_text(), Text.get_window_extent(t, renderer)) for t in ax.texts]


@pytest.mark.parametrize("points", [TRADEOFF, TRADEOFF[:1] + [p for p in TRADEOFF if p[2] == 0.0292]])
def test_plot_colours_by_method_with_a_legend_and_labels_apart(points):
    """One colour per method, distinct between methods, named in the legend; every point labelled, no two
    labels' boxes (as the Agg renderer draws them) overlapping, each inside its panel."""
    import itertools

    import numpy as np

    from edgetok.profile.compare import figure

    table = _rows(points)
    fig = figure(table, "title")
    methods = list(dict.fromkeys(m for _, m, *_ in points))
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == methods
    for ax in fig.axes:
        colours = [c.get_facecolor() for c in ax.collections]
        assert len(colours) == len(methods) and all(len(np.unique(c, axis=0)) == 1 for c in colours)
        assert len({tuple(c[0]) for c in colours}) == len(methods)
        assert sorted(len(c.get_offsets()) for c in ax.collections) == sorted(
            sum(m == method for _, m, *_ in points) for method in methods)
        boxes = _label_boxes(ax)
        assert len(boxes) == len(points)
        frame = ax.get_window_extent(fig.canvas.get_renderer())
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
            assert not box_a.overlaps(box_b), (a, b)
        for name, box in boxes:
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name


@pytest.mark.parametrize("top1,expect_top", [([97.40, 97.59], None), ([99.8, 100.0], 100.0), ([100.0], 100.0),
                                             ([40.0, 99.0], None), ([0.0, 1.0], None)])
def test_top1_axis_is_capped_at_100_and_never_zooms_below_the_minimum_span(top1, expect_top):
    from edgetok.profile.compare import MIN_TOP1_SPAN, figure, top1_limits

    bottom, top = top1_limits(top1)
    assert 0 <= bottom and top <= 100 and top - bottom >= MIN_TOP1_SPAN
    assert bottom < min(top1) or bottom == 0 and min(top1) == 0
    assert max(top1) < top or top == 100 == max(top1)
    if expect_top is not None:
        assert top == expect_top
    table = [{"name": f"m{i}", "method": "tome", "gmacs": 1.0, "median_ms": 10.0 + i, "top1": t / 100, "speedup": 1.0}
             for i, t in enumerate(top1)]
    fig = figure(table, "title")
    assert fig.axes[1].get_ylim() == pytest.approx((bottom, top))
    assert f"at least {MIN_TOP1_SPAN:g}" in fig.axes[1].get_title()
