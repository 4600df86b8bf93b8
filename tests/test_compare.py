"""`edgetok compare`: every fixed-count method matched to the same GMACs, exported, evaluated against dense and
profiled through the same path, in one table and one plot; bad requests are one line."""

import json

import pytest
from cli_assertions import assert_one_line_error, run_cli

from edgetok.vit.comparison import METHODS, match


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
    (tmp_path / "data" / "0").mkdir(parents=True)
    code, _, err = run_cli(capsys, "compare", "edgetok_digits_vit", "--data", str(tmp_path / "data"), *args,
                           "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()
