"""`edgetok export vit`: load, reduce, export, lint, validate, then publish ONNX and sidecar together."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgetok import atomic, sidecar
from edgetok.errors import EdgetokError
from edgetok.onnx.export import export_module, io_signature
from edgetok.onnx.lint import lint
from edgetok.onnx.validate import compare_with_torch
from edgetok.plugins.cubins import bundle_path
from edgetok.plugins.spec import uses
from edgetok.vit import methods
from edgetok.vit.flops import vit_macs
from edgetok.vit.loading import load_vit, weights_file
from edgetok.vit.reduction import plan, reduce_vit

INPUT_NAME = "pixel_values"
MAX_EXPORT_BATCH = 64  # the traced example; validation runs one more


@dataclass(init=False)
class ViTExportOptions:
    """What to export. The reduction is ``method`` plus ``method_options`` (the names its declaration in
    edgetok.vit.methods gives); they may also be passed as keyword arguments and read as attributes
    (``ViTExportOptions(method="tome", r=8).r``), as recipes and the command line do."""
    model: str = "deit_small_patch16_224"
    checkpoint: str | None = None
    method: str = "none"
    method_options: dict = field(default_factory=dict)
    img_size: int | None = None
    batch: int = 1
    opset: int = 17
    output: str | None = None
    allow_unsupported_ops: bool = False
    tolerance: float = 1e-3
    plugins: bool = False  # reduction steps that fit an edgetok plugin become one plugin node each
    # "biased" / "sparse": every block's attention as one plugin node; None: dense, but with --plugins the
    # blocks after the first reduction attend through SizeBiasedAttention
    attention: str | None = None
    attention_block: int | None = None  # "sparse": tokens per block (default 64)
    attention_mass: float | None = None  # "sparse": pooled softmax mass each query block keeps (default 0.95)
    attention_keep: float | None = None  # "sparse": or a fraction of key blocks to keep

    def __init__(self, method_options: dict | None = None, **values):
        own = {f.name for f in dataclasses.fields(self)} - {"method_options"}
        unknown = sorted(set(values) - own - set(methods.all_options()))
        if unknown:
            raise TypeError(f"ViTExportOptions got an unexpected keyword argument {unknown[0]!r}")
        for f in dataclasses.fields(self):
            if f.name != "method_options":
                setattr(self, f.name, values.get(f.name, f.default))
        self.method_options = {**(method_options or {}),
                               **{k: v for k, v in values.items() if k not in own and v is not None}}

    def __getattr__(self, name: str):
        if name != "method_options" and name in methods.all_options():
            return self.__dict__.get("method_options", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def fields(cls) -> set[str]:
        """The keys a recipe's export: section may hold: the options here and every method's."""
        return ({f.name for f in dataclasses.fields(cls)} - {"method_options"}) | set(methods.all_options())


def default_output(opts: ViTExportOptions) -> Path:
    stem = Path(opts.model).name if Path(opts.model).is_dir() else opts.model
    method = methods.get(opts.method)
    tag = method.tag(opts.method_options) if method.tag else opts.method
    if opts.plugins:
        tag += "_plugins"
    if opts.attention not in (None, "dense"):
        tag += f"_attn_{opts.attention}"
    return Path("edgetok-out") / f"{stem}_{tag}.onnx"


def sparsity_of(opts: ViTExportOptions):
    """The block-sparse attention's fields for ``--attention sparse`` (None otherwise); one line for sparse
    options given without it."""
    from edgetok.vit.attention import Sparsity

    given = {k: v for k, v in (("block", opts.attention_block), ("mass", opts.attention_mass),
                               ("keep", opts.attention_keep)) if v is not None}
    if opts.attention != "sparse":
        if given:
            raise EdgetokError(f"--attention-{next(iter(given))} is a block-sparse attention option; it needs "
                               "--attention sparse")
        return None
    return Sparsity(**given)


# What a sidecar's request records besides the method's options.
REQUEST_KEYS = ("model", "checkpoint", "method", "img_size", "plugins", "attention", "attention_block",
                "attention_mass", "attention_keep")


def _option_keys(method: str) -> list[str]:
    """The method options a request records: every built-in method's (None when not given, as sidecars
    written before the registry have them, so those still match), then the chosen method's own."""
    keys = list(dict.fromkeys(o.name for name in methods.BUILTIN for o in methods.get(name).options if o.cli))
    return keys + [o.name for o in methods.get(method).options if o.cli and o.name not in keys]


def export_request(opts: ViTExportOptions) -> dict:
    """What an export was made from (model, weights, reduction), as recorded in its sidecar."""
    req = {k: getattr(opts, k) for k in REQUEST_KEYS}
    req.update({k: opts.method_options.get(k) for k in _option_keys(opts.method)})
    if opts.method == "pitome":  # the variant it resolves to, so an export from before the option (protected) is stale
        req["pitome_variant"] = opts.pitome_variant or "reference"
    if Path(opts.model).is_dir():
        req["model"] = str(Path(opts.model).resolve())
    if opts.checkpoint:
        req["checkpoint"] = str(Path(opts.checkpoint).resolve())
    weights = weights_file(opts.model, opts.checkpoint)
    req["weights_sha256"] = sidecar.file_sha256(weights) if weights and weights.is_file() else None
    return json.loads(json.dumps(req))  # tuples become lists, as in the sidecar


def stale_reason(out: Path, opts: ViTExportOptions) -> str | None:
    """Why the ONNX at ``out`` is not what ``opts`` would export (None: it is, reuse it)."""
    if not out.is_file():
        return "missing"
    recorded, why = sidecar.request_mismatch(sidecar.sidecar_path(out), export_request(opts), "sidecar")
    if why:
        return why
    if (recorded.get("onnx") or {}).get("sha256") != sidecar.file_sha256(out):
        return "the ONNX changed after its export"
    if recorded.get("plugins"):
        import onnx

        from edgetok.onnx.lint import unnamespaced_plugin_nodes

        if unnamespaced_plugin_nodes(onnx.load(str(out), load_external_data=False)):
            return "its plugin nodes lack plugin_namespace (exported before edgetok wrote it)"
    return None


def export_vit(opts: ViTExportOptions, say: Callable[[str], None] = lambda s: None) -> dict:
    """Run the whole export; returns the sidecar. Nothing is written unless every check passes."""
    if not 1 <= opts.batch <= MAX_EXPORT_BATCH:
        raise EdgetokError(
            f"--batch {opts.batch} is out of range: give 1..{MAX_EXPORT_BATCH}. The export batch is only the example "
            "traced (the ONNX takes any batch; engines get theirs from build-engine --batch), so a large one "
            "only costs memory"
        )
    out = Path(opts.output) if opts.output else default_output(opts)
    if out.suffix != ".onnx":
        raise EdgetokError(f"-o {out} must end in .onnx")

    methods.check_options(opts.method, opts.method_options)  # before the model loads
    if opts.method == "dtome" and opts.calibrate is None:
        raise EdgetokError("--method dtome needs --calibrate DIR: an image folder (one subfolder per class) on which "
                           "its per-block thresholds are calibrated (not the images you evaluate on), e.g. edgetok-out/digits-train from "
                           "`edgetok data digits --split train`")

    say(f"loading {opts.model}")
    vit = load_vit(opts.model, opts.checkpoint, opts.img_size)
    if vit.weights == "random":
        say("no weights given: the model is randomly initialised (weights: random)")
    method = methods.make_method(opts.method, vit.depth, tokens=vit.num_tokens, defaults=vit.method_defaults,
                         **opts.method_options)
    dense = plan(vit, None)
    if opts.plugins and method is not None and not hasattr(method, "plugin_step") and not hasattr(method, "reduce"):
        say(f"--plugins: no edgetok plugin fits {method.name}'s step yet; it stays standard ONNX ops")
    sparsity = sparsity_of(opts)
    attention = opts.attention or ("biased_after_reduction" if opts.plugins and method is not None else "dense")
    reduced = reduce_vit(vit, method, plugins=opts.plugins, attention=attention, sparsity=sparsity)
    if opts.method == "dtome":
        from edgetok.vit.methods.dtome_torch import calibrate

        say(f"calibrating dtome's thresholds on {opts.calibrate}")
        calibrate(vit, method, opts.calibrate)
        reduced = plan(vit, method)  # the thresholds and the measured merges go into the sidecar

    shape = (vit.in_chans, vit.img_size, vit.img_size)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(opts.batch, *shape, generator=gen)
    check_inputs = torch.randn(opts.batch + 1, *shape, generator=gen)  # a batch the export never saw

    with atomic.staging_dir(out) as stage:
        staged = stage / out.name
        say(f"exporting ONNX (opset {opts.opset}, dynamic batch)")
        model = export_module(vit.module, example, staged, INPUT_NAME, vit.output_names, opts.opset)
        findings = lint(model)
        plugin_uses = uses(model)  # what build-engine, profile and eval must register to run this graph
        if findings and not opts.allow_unsupported_ops:
            raise EdgetokError(
                f"the graph has {len(findings)} node(s) TensorRT rejects: {findings[0]}"
                + (f" and {len(findings) - 1} more" if len(findings) > 1 else "")
                + "; pass --allow-unsupported-ops to write it anyway"
            )
        say(f"validating in ONNX Runtime (CPU) at batch {len(check_inputs)}")
        comparison = compare_with_torch(
            str(staged), vit.module, check_inputs, opts.tolerance, classifier=vit.output_names == ["logits"]
        )
        if not comparison.passed:
            raise EdgetokError(
                f"ONNX Runtime differs from PyTorch by {comparison.max_abs_diff:.3g} (> {opts.tolerance}); "
                "the export is wrong, please report it with the model name and options"
            )
        dense_macs, reduced_macs = vit_macs(vit, dense.tokens), vit_macs(vit, reduced.tokens)
        data = sidecar.stamp({
            "kind": "vit",
            "onnx": {
                "file": out.name,
                "opset": opts.opset,
                "export_batch": opts.batch,
                "dynamic_batch": True,
                "batch_profile": [1, opts.batch, max(opts.batch, 32)],  # build-engine's default min/opt/max
                "external_data": any(p.suffix != ".onnx" for p in stage.iterdir()),
                **io_signature(model),
            },
            "model": {
                "name": vit.name, "family": vit.family, "weights": vit.weights,
                "checkpoint": opts.checkpoint, "img_size": vit.img_size, "patch_size": vit.patch_size,
                "in_chans": vit.in_chans, "prefix_tokens": vit.prefix_tokens, "embed_dim": vit.embed_dim,
                "depth": vit.depth, "num_heads": vit.num_heads, "num_classes": vit.num_classes,
                "attn_dim": vit.attn_dim, "mlp_hidden": vit.mlp_hidden,
                "head": vit.head,
            },
            "input_shape": ["batch", *shape],
            "preprocessing": vit.preprocessing,
            "reduction": {
                "method": reduced.method,
                **({"data_dependent": True} if getattr(method, "data_dependent", False) else {}),
                **reduced.params,
                "attention": attention,
                **({"attention_sparsity": dataclasses.asdict(sparsity)} if sparsity else {}),
                "tokens_per_layer": [list(t) for t in reduced.tokens],
            },
            "flops": {
                "dense_gmacs": round(dense_macs / 1e9, 4),
                "reduced_gmacs": round(reduced_macs / 1e9, 4),
                "speedup_bound": round(dense_macs / reduced_macs, 4),
            },
            "lint": {"unsupported_ops": [str(f) for f in findings]},
            "plugins": plugin_uses,
            "validation": comparison.as_dict(),
            "versions": sidecar.versions("torch", "timm", "transformers", "onnx", "onnxruntime"),
        })
        if plugin_uses:
            data["cubins"] = _kernel_bundle(stage / bundle_path(out.name).name, say)
        data["onnx"].update(sidecar.model_hashes(staged))  # the .onnx and its external data file, if any
        data["request"] = export_request(opts)
        sidecar.write(stage / sidecar.sidecar_path(out).name, data)
        with sidecar.locked(out):  # an eval recording accuracy must not write the old sidecar over this one
            if sidecar.keep_accuracy(out, data):
                sidecar.write(stage / sidecar.sidecar_path(out).name, data)
                say("the ONNX is byte-identical to the one it replaces: its recorded accuracy is kept")
            atomic.publish(stage, out.parent)
    data["path"] = str(out)
    return data


def _kernel_bundle(path: Path, say: Callable[[str], None]) -> dict | None:
    """The plugins' cubins for every target architecture, beside the ONNX: build-engine carries them to the
    engine, also on a machine without Triton (a Jetson). Compiled once per Triton version, then cached."""
    import importlib.util

    from edgetok.plugins import cubins

    if importlib.util.find_spec("triton") is None:
        say("no Triton here: the plugin kernels are not compiled; run `edgetok plugins build -o "
            f"{path.name}` on a machine with Triton (x86 with torch) and put it beside the ONNX")
        return None
    from edgetok.engine.build import cubins_source

    say(cubins_source(list(cubins.ARCHS)))
    manifest = cubins.write_bundle(path, cubins.ARCHS, lambda s: None)
    return {"file": path.name, "archs": [a for a in cubins.ARCHS if a in manifest["archs"]], "triton": manifest["triton"],
            "kernels": sorted(manifest["kernels"])}


def summary(data: dict) -> str:
    red, fl, val = data["reduction"], data["flops"], data["validation"]
    tokens = [t[1] for t in red["tokens_per_layer"]]
    return "\n".join([
        f"wrote {data['path']} (+ {sidecar.sidecar_path(data['path']).name})",
        f"  model      {data['model']['name']} ({data['model']['family']}, weights: {data['model']['weights']})",
        f"  head       {data['model'].get('head') or ', '.join(o['name'] for o in data['onnx']['outputs'])}",
        *([f"  method     {red['method']}  tokens follow the image (at most {red['tokens_per_layer'][0][0]}): "
           "edgetok eval reports the tokens kept per block",
           *([f"  blocks     {','.join(map(str, red['ats_blocks']))} ({red['ats_blocks_from']})"] if "ats_blocks" in red else []),
           f"  GMACs      {fl['dense_gmacs']:.3f} dense; reduced: per image"] if red.get("data_dependent") else [
            f"  method     {red['method']}  tokens {red['tokens_per_layer'][0][0]} -> {tokens[-1]} "
            f"(per block: {','.join(map(str, tokens))})",
            f"  GMACs      {fl['dense_gmacs']:.3f} dense -> {fl['reduced_gmacs']:.3f}  (FLOPs speedup bound "
            f"{fl['speedup_bound']:.2f}x)"]),
        *([f"  attention  {red['attention']}: every block's attention is one SizeBiasedAttention node (flash style, "
           "+log(size) on the keys)"] if red.get("attention") == "biased" else []),
        *(["  attention  every block after the first reduction attends through one SizeBiasedAttention node"]
          if red.get("attention") == "biased_after_reduction" else []),
        *([f"  attention  sparse: every block's attention is one BlockSparseAttention node (block "
           f"{red['attention_sparsity']['block']}, " + (f"keep {red['attention_sparsity']['keep']}" if
                                                       red['attention_sparsity']['keep'] else
                                                       f"mass {red['attention_sparsity']['mass']}")
           + "): edgetok eval reports the blocks kept"] if red.get("attention") == "sparse" else []),
        *(["  plugins    " + ", ".join(f"{p['name']} x{p['nodes']}" for p in data["plugins"])
           + " (edgetok v1: ONNX Runtime runs their references; build-engine the fused kernels)"] if data.get("plugins") else []),
        *([f"  kernels    {data['cubins']['file']}: {len(data['cubins']['kernels'])} Triton kernels as cubins for "
           + ", ".join(data["cubins"]["archs"])] if data.get("cubins") else []),
        f"  validated  ONNX Runtime vs PyTorch at batch {val['batch']}: max |diff| {val['max_abs_diff']:.2e}, "
        f"cosine {val['cosine']:.6f}" + (f", top-1 agreement {val['top1_agreement']:.0%}" if val["top1_agreement"] is not None else ""),
    ])
