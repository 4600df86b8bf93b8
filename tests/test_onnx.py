"""Exported graphs: TensorRT-parsable ops only, dynamic batch, and equal to PyTorch in ONNX Runtime."""

import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper

from edgetok.onnx.export import export_module
from edgetok.onnx.lint import lint
from edgetok.onnx.validate import compare_with_torch
from edgetok.vit.loading import from_hf, from_timm
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import reduce_vit

CASES = {
    "dense": dict(name="none"),
    "tome_r4": dict(name="tome", r=4),
    "tome_decreasing": dict(name="tome", r_schedule="(4, -1)"),
    "evit_0.6": dict(name="evit", keep_rate=0.6, keep_layers=[1, 2]),
}


def _tiny_timm(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=96, depth=3, embed_dim=96,
                              num_heads=3, num_classes=10, **kwargs)
    return from_timm(model, "tiny-deit")


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_onnx_matches_pytorch_at_two_batch_sizes(tmp_path, case):
    vit = _tiny_timm()
    spec = dict(CASES[case])
    reduce_vit(vit, make_method(spec.pop("name"), vit.depth, **spec))
    path = tmp_path / "m.onnx"
    model = export_module(vit.module, torch.randn(1, 3, 96, 96), path, "pixel_values", ["logits"])
    assert lint(model) == []
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"ScatterElements", "ScatterND", "NonZero"}
    gen = torch.Generator().manual_seed(3)
    for batch in (2, 5):
        result = compare_with_torch(str(path), vit.module, torch.randn(batch, 3, 96, 96, generator=gen))
        assert result.passed and result.max_abs_diff < 1e-4 and result.top1_agreement == 1.0, result


@pytest.mark.parametrize("method", [dict(name="tome", r=8), dict(name="evit", keep_rate=0.5, keep_layers=[0])])
def test_hf_encoder_onnx_matches_pytorch(tmp_path, method):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128)
    vit = from_hf(ViTModel(config), "hf")
    spec = dict(method)
    reduce_vit(vit, make_method(spec.pop("name"), vit.depth, **spec))
    path = tmp_path / "hf.onnx"
    export_module(vit.module, torch.randn(1, 3, 32, 32), path, "pixel_values", vit.output_names)
    result = compare_with_torch(str(path), vit.module, torch.randn(3, 3, 32, 32), classifier=False)
    assert result.passed and result.max_abs_diff < 1e-4


def _graph_with(node, extra_inputs=()):
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, [4, 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 3])
    graph = helper.make_graph([node], "g", [data, *extra_inputs], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_lint_rejects_scatter_elements_with_reduction():
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [4, 3])
    upd = helper.make_tensor_value_info("upd", TensorProto.FLOAT, [4, 3])
    node = helper.make_node("ScatterElements", ["data", "idx", "upd"], ["out"], name="merge/scatter_add",
                            axis=0, reduction="add")
    model = _graph_with(node, [idx, upd])
    onnx.checker.check_model(model)
    findings = lint(model)
    assert [(f.node, f.op_type) for f in findings] == [("merge/scatter_add", "ScatterElements")]
    assert "reduction='add'" in findings[0].reason


@pytest.mark.parametrize("k, flagged", [(3840, False), (3841, True)])
def test_lint_flags_topk_beyond_tensorrts_k_limit(k, flagged):
    """TensorRT-RTX 1.7 builds TopK with K = 3840 and refuses 3841 (GTP's θ on DeiT-S below 0.91 would)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])
    values = helper.make_tensor_value_info("values", TensorProto.FLOAT, [1, k])
    indices = helper.make_tensor_value_info("indices", TensorProto.INT64, [1, k])
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="attn/topk", largest=0)
    graph = helper.make_graph([node], "g", [x], [values, indices],
                              initializer=[helper.make_tensor("k", TensorProto.INT64, [1], [k])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    findings = lint(model)
    assert bool(findings) == flagged
    if flagged:
        assert findings[0].op_type == "TopK" and "K=3841" in findings[0].reason and "3840" in findings[0].reason


def test_lint_accepts_scatter_without_reduction_and_finds_nonzero_in_subgraphs():
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [4, 3])
    upd = helper.make_tensor_value_info("upd", TensorProto.FLOAT, [4, 3])
    plain = helper.make_node("ScatterElements", ["data", "idx", "upd"], ["out"], axis=0)
    assert lint(_graph_with(plain, [idx, upd])) == []

    inner_out = helper.make_tensor_value_info("nz", TensorProto.INT64, None)
    branch = helper.make_graph([helper.make_node("NonZero", ["data"], ["nz"], name="inner_nonzero")], "b", [],
                               [inner_out])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    if_node = helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch)
    findings = lint(_graph_with(if_node, [cond]))
    assert [f.node for f in findings] == ["inner_nonzero", "inner_nonzero"]


def test_lint_catches_what_torch_exports_for_scatter_reduce(tmp_path):
    class ScatterMerge(torch.nn.Module):  # ToMe's reference merge
        def forward(self, x):
            idx = torch.zeros_like(x, dtype=torch.int64)
            return x.new_zeros(1, x.shape[1]).scatter_reduce(0, idx[:1], x[:1], reduce="sum")

    path = tmp_path / "s.onnx"
    torch.onnx.export(ScatterMerge(), (torch.randn(2, 3),), str(path), dynamo=False, opset_version=17)
    assert [f.op_type for f in lint(onnx.load(str(path)))] == ["ScatterElements"]


def test_per_tensor_external_data_is_consolidated_into_one_file(tmp_path):
    from edgetok.onnx.export import consolidate_external_data, uses_external_data

    vit = _tiny_timm()
    path = tmp_path / "big.onnx"
    export_module(vit.module, torch.randn(1, 3, 96, 96), path, "pixel_values", ["logits"])
    # What the exporter writes for a model over 2 GB: one external file per tensor.
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(tmp_path.iterdir())) > 10
    model = consolidate_external_data(path)
    assert uses_external_data(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    result = compare_with_torch(str(path), vit.module, torch.randn(2, 3, 96, 96))
    assert result.passed and result.max_abs_diff < 1e-4


def test_validation_fails_on_non_finite_outputs(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)) * float("nan")

    path = tmp_path / "nan.onnx"
    export_module(Broken(), torch.randn(1, 3, 8, 8), path, "pixel_values", ["logits"])
    result = compare_with_torch(str(path), Broken(), torch.randn(2, 3, 8, 8))
    assert not result.passed
