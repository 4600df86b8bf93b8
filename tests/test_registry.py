"""The method registry (edgetok/vit/methods): every method declares its options once; the command line, the
export options, `compare` and `edgetok methods` derive from it; a third-party package adds a method through the
`edgetok.methods` entry point; and every option's range is refused before torch or a model loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_assertions import assert_one_line_error, run_cli

from edgetok.vit import methods

BUILTIN = {"none", "tome", "evit", "ats", "dtome", "pitome", "gtp", "zerotprune"}
PY_TYPES = {"int": int, "float": float, "str": str, "schedule": str, "ints": list}

# A child process that runs the CLI once per argument list (a JSON list of lists), reports each exit code and
# last stderr line, and whether torch, timm or a model loader was imported by then: any model load needs them.
REFUSE_ALL_IN_A_CHILD = """
import contextlib, io, json, sys
import edgetok.cli
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = edgetok.cli.main(args)
    results.append([code, err.getvalue()])
loaded = sorted(m for m in ("torch", "timm", "edgetok.vit.loading", "edgetok.vit.export") if m in sys.modules)
print(json.dumps({"results": results, "loaded": loaded}))
"""

DROPLAST = '''
"""A third-party token-reduction method, for edgetok's registry test: every block drops its last DROP tokens.

Torch-free at import (torch is imported by the step itself), as edgetok's own declarations are."""

from edgetok.vit.methods import Method, Option


class DropLast:
    name = "droplast"
    proportional_attention = False

    def __init__(self, drop):
        self.drop = drop

    def params(self, amounts):
        return {"drop": self.drop}

    def plan_layer(self, layer, tokens, prefix):
        drop = min(self.drop, tokens - prefix - 1)
        return (drop, tokens - drop) if drop > 0 else (0, tokens)

    def transform(self, amount, q, k, scale, prefix, class_token=True):
        if amount == 0:
            return None
        import torch

        from edgetok.vit.token_transform import TokenTransform

        batch, tokens = k.shape[0], k.shape[2]
        keep = torch.arange(tokens - amount, device=k.device).expand(batch, tokens - amount)
        return TokenTransform(keep=keep), None


METHOD = Method(
    name="droplast",
    summary="Drop the last DROP tokens in every block.",
    options=(Option("drop", "int", "tokens dropped from the end of every block", default=1, range=(1, 32),
                    searchable=True, metavar="N"),),
    build=lambda depth, options, model: DropLast(options.get("drop", 1)),
    tag=lambda options: f"droplast_d{options.get('drop', 1)}",
    knob=lambda depth: [{"drop": d} for d in range(1, 33)],
    knob_label="d={drop}",
)
'''


def _methods_json(env=None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "edgetok", "methods", "--json"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _bad_values(option) -> list:
    """Values just outside the option's declared domain (as the CLI would parse them)."""
    cast = PY_TYPES[option["type"]] if option["type"] in ("int", "float") else None
    bad = []
    if option["range"]:
        low, high, bounds = option["range"]["low"], option["range"]["high"], option["range"]["bounds"]
        bad.append(cast(low) if bounds[0] == "(" else cast(low) - 1)
        if high is not None:
            bad.append(cast(high) if bounds[1] == ")" else cast(high) + (1 if cast is int else 0.5))
    if option["choices"]:
        bad.append("nope")
    return bad


def test_methods_json_lists_every_method_with_typed_options():
    listed = _methods_json()["methods"]
    assert BUILTIN <= {m["name"] for m in listed}
    assert listed == json.loads(json.dumps(methods.describe()))  # the command prints what the library returns
    for m in listed:
        assert m["summary"] and isinstance(m["departures"], list)
        if m["name"] != "none":
            assert m["paper"] and m["reference"] and m["options"], m["name"]
        for o in m["options"]:
            assert o["type"] in PY_TYPES and o["flag"] == "--" + o["name"].replace("_", "-") and o["help"]
            if o["default"] is not None:
                assert isinstance(o["default"], PY_TYPES[o["type"]]), (m["name"], o)
            if o["range"]:
                assert o["range"]["high"] is None or o["range"]["low"] < o["range"]["high"], o
            if o["choices"]:
                assert o["default"] is None or o["default"] in o["choices"]
    gtp = next(m for m in listed if m["name"] == "gtp")
    assert any("P = 0" in d for d in gtp["departures"])  # the README's departures, with the reason


def test_every_options_range_is_refused_in_one_line_before_torch_or_a_model(tmp_path):
    cases = []
    for m in methods.describe():
        for o in m["options"]:
            for value in _bad_values(o):
                cases.append((["export", "vit", "edgetok_digits_vit", "--method", m["name"], o["flag"], str(value),
                               "-o", str(tmp_path / "x.onnx")], f"{o['flag']} {value!r}" if isinstance(value, str)
                              else f"{o['flag']} {value}"))
    # domains a range cannot say: a count or a fraction, a bounded weight, block indices
    for method, flag, value, needle in (("ats", "--ats-budget", "1.5", "--ats-budget 1.5 must be a token count"),
                                        ("gtp", "--alpha", "2.0", "--alpha 2.0 is out of range: give a value in [0, 1]"),
                                        ("evit", "--keep-layers", "3,-1", "--keep-layers [3, -1] must be 0-based")):
        cases.append((["export", "vit", "edgetok_digits_vit", "--method", method, flag, value], needle))
    # ranges of every kind (open, closed, half-open, int and float) and choices
    assert len(cases) >= 15 and {"--keep-rate", "--r", "--sparsity", "--graph", "--cap"} <= {a[5] for a, _ in cases}
    proc = subprocess.run([sys.executable, "-c", REFUSE_ALL_IN_A_CHILD, json.dumps([a for a, _ in cases])],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [], report["loaded"]  # nothing that loads a model was imported
    for (args, needle), (code, err) in zip(cases, report["results"]):
        assert_one_line_error(code, err, needle)
    assert not list(tmp_path.iterdir())


def test_another_methods_option_is_refused_by_one_generic_check(capsys, tmp_path):
    """Every option given to every method that does not declare it: one line naming the flag and what the
    method takes, before any model loads."""
    registered = {m.name: m for m in map(methods.get, methods.names())}
    for name, method in registered.items():
        for option, declared in methods.all_options().items():
            if method.option(option) is not None or not declared.cli:
                continue
            value = "1" if declared.type in ("int", "float", "schedule", "ints") else "spatial"
            code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", name, declared.flag,
                                   value, "-o", str(tmp_path / "x.onnx"))
            assert_one_line_error(code, err, declared.flag, f"--method {name} takes")
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "tome", "--keep-rate", "0.5")
    assert_one_line_error(code, err, "--keep-rate is an option of PiToMe, Zero-TPrune, EViT (--method "
                          "pitome/zerotprune/evit), not of ToMe; --method tome takes --r N and --r-schedule")
    assert not list(tmp_path.iterdir())


def test_export_options_keep_method_options_as_keywords():
    from edgetok.vit.export import ViTExportOptions, default_output

    opts = ViTExportOptions(model="m", method="tome", r=8)
    assert (opts.method_options, opts.r, opts.keep_rate) == ({"r": 8}, 8, None)
    assert opts == ViTExportOptions(model="m", method="tome", method_options={"r": 8})
    assert default_output(opts) == Path("edgetok-out/m_tome_r8.onnx")
    assert {"r", "keep_rate", "propagate", "pitome_variant", "batch"} <= ViTExportOptions.fields()
    with pytest.raises(TypeError, match="'ratio'"):
        ViTExportOptions(model="m", ratio=0.5)


def _install(tmp_path: Path) -> dict:
    """The method as a package in a folder of its own: module, dist-info and its entry point; no edgetok file
    changes. Returns the environment a child process finds it in."""
    site = tmp_path / "site"
    (site / "edgetok_droplast-0.1.dist-info").mkdir(parents=True)
    (site / "edgetok_droplast.py").write_text(DROPLAST)
    (site / "edgetok_droplast-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: edgetok-droplast\nVersion: 0.1\n")
    (site / "edgetok_droplast-0.1.dist-info" / "entry_points.txt").write_text(
        "[edgetok.methods]\ndroplast = edgetok_droplast:METHOD\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "PYTHONWARNINGS": "ignore"}


def test_an_entry_point_method_is_listed_and_range_checked_without_torch(tmp_path, monkeypatch):
    env = _install(tmp_path)
    listed = {m["name"]: m for m in _methods_json(env)["methods"]}
    assert listed["droplast"]["source"] == "edgetok-droplast"
    assert [o["flag"] for o in listed["droplast"]["options"]] == ["--drop"]
    args = [["export", "vit", "edgetok_digits_vit", "--method", "droplast", "--drop", "40"],
            ["export", "vit", "edgetok_digits_vit", "--method", "tome", "--drop", "2"],
            ["export", "vit", "--help"]]
    proc = subprocess.run([sys.executable, "-c", REFUSE_ALL_IN_A_CHILD, json.dumps(args)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    (code, err), (code2, err2), _ = report["results"]
    assert_one_line_error(code, err, "--drop 40 is out of range: give a value in [1, 32]")
    assert_one_line_error(code2, err2, "--drop is a droplast option; it needs --method droplast")
    help_text = proc.stdout
    assert "--drop N" in help_text and "droplast: tokens dropped" in help_text
    # in this process, too: the registry finds it once the package is on the path, and forgets it after
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    methods.reload()
    try:
        assert "droplast" in methods.comparable()
    finally:
        monkeypatch.undo()
        methods.reload()
    assert "droplast" not in methods.names()


@pytest.mark.slow
def test_an_entry_point_method_exports_evaluates_and_compares(tmp_path):
    env = _install(tmp_path)
    edgetok = [sys.executable, "-m", "edgetok"]

    def run(*args):
        proc = subprocess.run([*edgetok, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    run("data", "digits", "-o", "heldout")
    said = run("export", "vit", "edgetok_digits_vit", "--method", "droplast", "--drop", "4", "-o", "d.onnx")
    side = json.loads((tmp_path / "d.edgetok.json").read_text())
    assert side["reduction"]["method"] == "droplast" and side["request"]["drop"] == 4
    assert [t[1] for t in side["reduction"]["tokens_per_layer"]] == [61, 57, 53, 49, 45, 41]  # 65 tokens, 6 blocks
    assert "method     droplast" in said
    run("export", "vit", "edgetok_digits_vit", "-o", "dense.onnx")
    evaluated = run("eval", "d.onnx", "--data", "heldout", "--reference", "dense.onnx")
    assert "top-1" in evaluated
    assert "accuracy" in json.loads((tmp_path / "d.edgetok.json").read_text())
    run("compare", "edgetok_digits_vit", "--data", "heldout", "--methods", "tome,droplast", "--fractions", "0.65",
        "--batch", "2", "--duration", "0.05", "--rounds", "1", "-o", "cmp")
    rows = json.loads((tmp_path / "cmp" / "profile.json").read_text())["comparison"]
    assert [r["name"].split(" ")[0] for r in rows] == ["dense", "tome", "droplast"]
    assert rows[2]["top1"] is not None and rows[2]["agreement"] is not None
