"""The `edgetok` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path

import click

from edgetok import __version__
from edgetok import recipe as recipes
from edgetok.errors import EdgetokError, os_error_message
from edgetok.vit import methods as method_registry
from edgetok.vit.methods import gtp as gtp_declaration


def _ints(value: str | None, option: str = "--keep-layers") -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise EdgetokError(f"{option} {value!r} must be comma-separated block indices, e.g. 3,6,9") from None


def _say(message: str) -> None:
    click.echo(f"· {message}", err=True)


# Early refusals: what needs no model is checked before torch is imported or a model loads, so that a typo
# costs a second, not the 10-20 s of loading one.
MAX_EXPORT_BATCH = 64  # edgetok.vit.export.MAX_EXPORT_BATCH, which imports torch (a test keeps them equal)
MIN_ATTENTION_BLOCK, MAX_ATTENTION_BLOCK = 16, 1024  # edgetok.plugins.block_sparse_attention's (a test, too)
MAX_GTP_ALPHA = gtp_declaration.MAX_ALPHA  # edgetok.vit.methods.gtp_torch.MAX_ALPHA (a test keeps them equal)


def _flag(key: str) -> str:
    """An export option as the command line spells it."""
    return "-o" if key == "output" else "--" + key.replace("_", "-")


def _recipe_key(recipe: str, section: str):
    """A recipe's option, for its refusals: ``recipe NAME: export --keep-rate`` (the key keep_rate)."""
    return lambda key: f"recipe {recipe}: {section} {_flag(key)}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_export_values(values, flag=_flag) -> None:
    """The export options (flags, or a recipe's export: section) that can be refused without the model."""
    if not isinstance(values, dict):
        return  # recipes.section says what is wrong with the section itself
    batch, checkpoint = values.get("batch"), values.get("checkpoint")
    method = values.get("method", "none")
    if isinstance(method, str):  # the method is known, no other method's option is given, each is in range
        given = {k: values.get(k) for k in method_registry.all_options() if k in values}
        method_registry.check_options(method, given, flag)
    if _number(batch) and not 1 <= batch <= MAX_EXPORT_BATCH:
        raise EdgetokError(f"{flag('batch')} {batch} is out of range: give 1..{MAX_EXPORT_BATCH}. The export batch is "
                           "only the example traced (the ONNX takes any batch; engines get theirs from build-engine "
                           "--batch), so a large one only costs memory")
    if isinstance(checkpoint, str) and not Path(checkpoint).is_file():
        what = "is a folder" if Path(checkpoint).is_dir() else "does not exist"
        raise EdgetokError(f"{flag('checkpoint')} {checkpoint} {what}; give a .pth or .safetensors file")
    if isinstance(values.get("output"), str) and Path(values["output"]).suffix != ".onnx":
        raise EdgetokError(f"{flag('output')} {values['output']} must end in .onnx")
    if isinstance(values.get("output"), str):
        _check_output_place(values["output"], flag("output"))
    _check_attention_values(values, flag)
    if values.get("method") == "dtome" and isinstance(values.get("calibrate"), str):
        _check_image_folder(values["calibrate"], flag("calibrate"), "train")


def _check_attention_values(values: dict, flag) -> None:
    """Every --attention-* option's range, before a model loads (the block against the model's token count is
    checked once the model is known: edgetok.vit.attention.Sparsity.check)."""
    block, mass, keep = values.get("attention_block"), values.get("attention_mass"), values.get("attention_keep")
    if _number(block) and not (isinstance(block, int) and MIN_ATTENTION_BLOCK <= block <= MAX_ATTENTION_BLOCK
                               and not block & (block - 1)):
        raise EdgetokError(f"{flag('attention_block')} {block} must be a power of two >= {MIN_ATTENTION_BLOCK} and <= "
                           f"{MAX_ATTENTION_BLOCK} (the kernel's tile .. one block for any ViT's tokens), e.g. 64")
    if _number(mass) and not 0 < mass <= 1:
        raise EdgetokError(f"{flag('attention_mass')} {mass} must be in (0, 1], e.g. 0.95 (1: dense)")
    if _number(keep) and not 0 <= keep <= 1:
        raise EdgetokError(f"{flag('attention_keep')} {keep} must be in (0, 1], a fraction of the key blocks (or 0: "
                           "select by --attention-mass)")
    if _number(keep) and keep > 0 and mass is not None:
        raise EdgetokError(f"give {flag('attention_keep')} or {flag('attention_mass')}, not both: a fraction of key "
                           "blocks replaces the mass (the mass would be ignored)")


def _check_output_place(path: str, option: str) -> None:
    """Where an output goes, before the work that makes it: not under a regular file, not in a kernel
    pseudo-filesystem (/proc, /sys), where creating it fails only after the export or build."""
    absolute = os.path.abspath(path)
    if absolute.split("/")[1:2] in (["proc"], ["sys"]):
        raise EdgetokError(f"{option} {path} is in /{absolute.split('/')[1]}, a kernel pseudo-filesystem where edgetok "
                           "cannot write; give an ordinary folder")
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise EdgetokError(f"{option} {path}: {folder} is a file, not a folder; choose another path")


def _check_image_folder(path: str, option: str, split: str) -> None:
    """An image folder to read (``split``: train to calibrate on, heldout to evaluate on); a missing digits
    split names the command that writes it."""
    folder = Path(path)
    if folder.is_dir():
        return
    what = "is not a folder: " + ("it is a file" if folder.exists() else "it does not exist")
    if "digits" in folder.name:
        fix = (f"write it with `edgetok data digits --split {split}"
               + ("" if folder == Path(f"edgetok-out/digits-{split}") else f" -o {path}") + "`")
    else:
        fix = "give an ImageFolder (one subfolder of images per class)" + (
            " of training images, not the ones you evaluate on" if split == "train" else "")
    raise EdgetokError(f"{option} {path} {what}; {fix}")


def _check_checkpoint(checkpoint: str | None) -> None:
    _check_export_values({"checkpoint": checkpoint})


def _gpu_problem() -> str | None:
    """Why no CUDA GPU can run anything here (None: the driver sees one), asked of the driver itself through
    ctypes: no torch import, no runtime, no model load before a GPU option is refused."""
    import ctypes

    try:
        driver = ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
    except OSError:
        return "no NVIDIA driver here (libcuda.so.1 is not found)"
    count = ctypes.c_int(0)
    status = driver.cuInit(0)
    if status == 0:
        status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0 or count.value < 1:
        return "the NVIDIA driver sees no GPU" + (f" (CUDA error {status})" if status else "")
    return None


def _require_gpu(device: str) -> None:
    problem = _gpu_problem()
    if problem:
        raise EdgetokError(f"--device {device}: {problem}; run on a machine with an NVIDIA GPU, or use --device cpu")


@click.group()
@click.version_option(__version__, prog_name="edgetok")
def cli() -> None:
    """Token-reduced transformers to TensorRT on NVIDIA edge and desktop GPUs."""


@cli.group(invoke_without_command=True)
@click.option("--recipe", help="Recipe YAML file or built-in name; with no subcommand and no recipe, runs 'default'.")
@click.pass_context
def export(ctx: click.Context, recipe: str | None) -> None:
    """Export a model to ONNX that TensorRT accepts, checked against PyTorch."""
    if ctx.invoked_subcommand is not None:
        if recipe:
            raise EdgetokError("give either --recipe or a subcommand (vit), not both")
        return
    name = recipe or recipes.DEFAULT
    data = recipes.load(name, _say)
    _check_export_values(data.get("export"), _recipe_key(name, "export"))
    from edgetok.vit.export import ViTExportOptions, export_vit, summary

    values = recipes.section(data, "export", ViTExportOptions.fields() | {"kind"}, name)
    kind = values.pop("kind", "vit")
    if kind != "vit":
        raise EdgetokError(f"recipe {name}: export.kind {kind!r} is not supported; use 'vit'")
    for key in [k for k, o in method_registry.all_options().items() if o.type == "ints"]:  # "3,6,9" in a recipe
        if isinstance(values.get(key), str):
            values[key] = _ints(values[key], _recipe_key(name, "export")(key))
    click.echo(summary(export_vit(ViTExportOptions(**values), _say)))


def _method_flags(command):
    """``export vit``'s reduction flags, one per option the registered methods declare (edgetok.vit.methods):
    the help names the methods that take it; which method may take it is checked once, by check_options."""
    click_types = {"int": int, "float": float}
    for name, option in reversed(method_registry.all_options().items()):
        if not option.cli:
            continue
        owners = [m for m in method_registry.owners(name) if m.option(name).cli]
        helps = []
        for m in owners:
            o = m.option(name)
            extra = ", ".join(x for x in (f"in {o.range_text()}" if o.range else "",
                                          f"one of {', '.join(o.choices)}" if o.choices else "",
                                          f"default {o.default}" if o.default is not None else "") if x)
            helps.append(f"{m.name}: {o.help}" + (f" ({extra})" if extra else ""))
        command = click.option(option.flag, name, type=click_types.get(option.type, str), metavar=option.metavar,
                               help="; ".join(helps) + ".")(command)
    return command


def _method_values(method: str, given: dict) -> dict:
    """The method options given on the command line, parsed as the registry declares them (block lists, ATS's
    count); checked first, in one line each."""
    given = {k: v for k, v in given.items() if v is not None}
    for key in [k for k in given if method_registry.all_options()[k].type == "ints"]:
        given[key] = _ints(given[key], _flag(key))
    method_registry.check_options(method, given, _flag)
    chosen = method_registry.get(method)
    return {k: chosen.option(k).parse(v) if chosen.option(k).parse else v for k, v in given.items()}


@export.command("vit")
@click.argument("model")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local .pth/.safetensors weights for a timm name.")
@click.option("--method", default="none", show_default=True,
              help=f"Reduction method: {', '.join(method_registry.names())} (`edgetok methods` lists them with their options).")
@_method_flags
@click.option("--img-size", type=int, help="Input resolution (a multiple of the patch size).")
@click.option("--batch", type=int, default=1, show_default=True, help="Example batch for export (batch stays dynamic).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--allow-unsupported-ops", is_flag=True, help="Write the ONNX even if TensorRT would reject some nodes.")
@click.option("--plugins", is_flag=True, help="Each ToMe step as one edgetok::TokenMerge plugin node (fused kernel).")
@click.option("--attention", type=click.Choice(["dense", "biased", "sparse"]),
              help="biased: every block's attention as one edgetok::SizeBiasedAttention plugin node (+log(size)); "
                   "sparse: as one edgetok::BlockSparseAttention node (training-free block selection). Default: "
                   "dense; with --plugins, biased in the blocks after the first reduction.")
@click.option("--attention-block", type=int, help="sparse: tokens per block, a power of two >= 16 (default 64).")
@click.option("--attention-mass", type=float, help="sparse: pooled attention mass each query block keeps, in (0, 1] "
              "(default 0.95; 1 = dense).")
@click.option("--attention-keep", type=float, help="sparse: keep this fraction of key blocks instead of a mass.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output .onnx (default: edgetok-out/<model>_<method>.onnx).")
def export_vit_cmd(model, checkpoint, method, img_size, batch, opset, allow_unsupported_ops, plugins, attention,
                   attention_block, attention_mass, attention_keep, output, **method_options) -> None:
    """Export a timm ViT name or Hugging Face ViT folder MODEL with token reduction."""
    method_options = _method_values(method, method_options)
    _check_export_values(dict(batch=batch, checkpoint=checkpoint, output=output, method=method,
                              attention_block=attention_block, attention_mass=attention_mass,
                              attention_keep=attention_keep, **method_options))
    from edgetok.vit.export import ViTExportOptions, export_vit, summary

    opts = ViTExportOptions(
        model=model, checkpoint=checkpoint, method=method, method_options=method_options, img_size=img_size,
        batch=batch, opset=opset, output=output, allow_unsupported_ops=allow_unsupported_ops, plugins=plugins,
        attention=attention, attention_block=attention_block, attention_mass=attention_mass,
        attention_keep=attention_keep,
    )
    click.echo(summary(export_vit(opts, _say)))


@cli.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON (what the docs' method table reads).")
def methods_cmd(as_json: bool) -> None:
    """List the reduction methods: options, types, defaults, ranges, paper, reference code and departures."""
    described = method_registry.describe()
    if as_json:
        click.echo(json.dumps({"methods": described}, indent=2))
        return
    for m in described:
        click.echo(f"{m['name']}: {m['summary']}")
        for key in ("paper", "reference"):
            if m[key]:
                click.echo(f"  {key:<10} {m[key]}")
        for o in m["options"]:
            click.echo(f"  {o['flag']:<20} {o['type']:<8} " + ", ".join(x for x in (
                f"default {o['default']}" if o["default"] is not None else "",
                f"in {o['range']['text']}" if o["range"] else "",
                f"one of {', '.join(o['choices'])}" if o["choices"] else "") if x) + f"  {o['help']}")
        for d in m["departures"]:
            click.echo(f"  departs    {d}")


@cli.command("build-engine")
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Engine file (default: MODEL.<backend>.<precision>.engine).")
@click.option("--backend", help="auto (default), tensorrt or tensorrt-rtx.")
@click.option("--precision", help="fp32 (default), fp16 or bf16.")
@click.option("--batch", help="Batch profile MIN:OPT:MAX (default: from the export sidecar).")
@click.option("--shapes", multiple=True, help="Per-input profile name:MIN:OPT:MAX, shapes like 8x3x224x224.")
@click.option("--workspace", type=int, help="Workspace limit in MiB.")
@click.option("--opt-level", type=click.IntRange(0, 5), help="Builder optimization level 0-5.")
@click.option("--target", "targets", multiple=True, help="TensorRT-RTX compute capabilities, e.g. sm86,sm89,sm120.")
@click.option("--timing-cache", type=click.Path(dir_okay=False),
              help="TensorRT: timing cache to load/save; RTX: runtime cache for the JIT.")
@click.option("--plugins", multiple=True, help="Plugin library (.so) to load; repeatable.")
@click.option("--plugin-lib", type=click.Path(dir_okay=False),
              help="edgetok's C++ plugin library for the graph's edgetok nodes (default: the one `edgetok plugins "
                   "build --lib` wrote for this platform, if any).")
@click.option("--python-plugins", is_flag=True,
              help="Build edgetok's plugin nodes with the Python plugin classes (development; Python runtimes only).")
@click.option("--serialize-plugins", is_flag=True,
              help="Put the C++ plugin library into the engine (TensorRT's plugins to serialize): the engine alone runs.")
@click.option("--dla-core", type=int, help="Jetson: build for this DLA core (GPU fallback on).")
@click.option("--recipe", help="Build the ONNX of a recipe's export section with its build: section.")
@click.option("--allow-recipe-plugins", is_flag=True,
              help="Let the recipe's build.plugins load native libraries (otherwise only --plugins does).")
@click.option("--k", type=int, default=4, show_default=True,
              help="PAIR: draft tokens per round; the target's profile favours k + 1 tokens per call.")
@click.option("--tokens", type=int, default=16, show_default=True,
              help="PAIR or VLM folder: lookahead tree size; the tree variant's profile favours it.")
def build_engine_cmd(model, output, backend, precision, batch, shapes, workspace, opt_level, targets, timing_cache,
                     plugins, plugin_lib, python_plugins, serialize_plugins, dla_core, recipe, allow_recipe_plugins, k,
                     tokens) -> None:
    """Build a TensorRT or TensorRT-RTX engine from MODEL (.onnx) in a child process, or every decoder of a
    speculative-decoding pair folder (KV-cache shape profiles from its manifest), or every graph of a VLM folder
    from `export vlm` (vision tower(s), embedding, decoders)."""
    from edgetok.engine.build import build_engine, progress, summary
    from edgetok.engine.options import BuildOptions, parse_targets
    from edgetok.llm import engines

    if output:
        _check_output_place(output, "-o")  # /proc, /sys or under a file: refused before the build, not after
    values = dict(output=output, backend=backend, precision=precision, batch=batch, shapes=list(shapes),
                  workspace=workspace, opt_level=opt_level, targets=parse_targets(list(targets)),
                  timing_cache=timing_cache, plugins=list(plugins), dla_core=dla_core, plugin_lib=plugin_lib,
                  python_plugins=python_plugins or None, serialize_plugins=serialize_plugins or None)
    values = {k: v for k, v in values.items() if v not in (None, [])}  # what the command line set
    if recipe:
        if model:
            raise EdgetokError("give either MODEL or --recipe, not both")
        model, values = _recipe_build(recipe, values, allow_recipe_plugins)
    elif not model:
        raise EdgetokError("give the ONNX model to build (e.g. edgetok-out/model.onnx) or --recipe NAME")
    elif _is_vlm_folder(model):
        _build_vlm(model, values, tokens)
        return
    elif engines.is_pair(model):
        if values.get("precision", "fp32") != "fp32":
            raise EdgetokError(f"--precision {values['precision']}: build-engine PAIR builds fp32 engines only (the fp16 "
                               "conversion of these decoders is a graph ONNX Runtime will not load); drop --precision")
        with progress(sys.stderr.isatty()) as say:
            built = engines.build_pair(model, BuildOptions(onnx=model, **values), k, tokens, say)
        click.echo(engines.summary(built))
        return
    with progress(sys.stderr.isatty()) as say:
        report = build_engine(BuildOptions(onnx=model, **values), say, reuse=bool(recipe))
    click.echo(summary(report))


def _is_vlm_folder(path: str) -> bool:
    from edgetok.vlm.export import is_vlm

    return is_vlm(path)


def _build_vlm(folder: str, values: dict, tokens: int) -> None:
    """build-engine DIR for a VLM folder (edgetok.vlm.engines): its towers, embedding and decoders."""
    from edgetok.engine.build import progress
    from edgetok.engine.options import BuildOptions
    from edgetok.vlm import engines

    if click.get_current_context().get_parameter_source("k") != click.core.ParameterSource.DEFAULT:
        raise EdgetokError("--k is a pair's draft tokens per round; a VLM folder has no draft (its decoders favour "
                           "one token, the tree --tokens): drop --k")
    options = BuildOptions(onnx=folder, **values)
    engines.check_request(options, tokens)
    with progress(sys.stderr.isatty()) as say:
        built = engines.build_vlm(folder, options, tokens, say)
    click.echo(engines.summary(built))


def _recipe_build(name: str, cli_values: dict, allow_plugins: bool = False) -> tuple[str, dict]:
    """The recipe's export output (exported first if missing) and its build: section under CLI flags."""
    data = recipes.load(name, _say)
    _check_recipe_paths(data, name)
    from edgetok.engine.options import BuildOptions, parse_targets
    from edgetok.vit.export import ViTExportOptions, default_output

    exported = recipes.section(data, "export", ViTExportOptions.fields() | {"kind"}, name)
    exported.pop("kind", None)
    export_opts = ViTExportOptions(**exported)
    onnx_path = Path(export_opts.output) if export_opts.output else default_output(export_opts)
    build = recipes.section(data, "build", set(BuildOptions.__dataclass_fields__) - {"onnx"}, name) \
        if "build" in data else {}
    if (build.get("plugins") or build.get("plugin_lib")) and not allow_plugins:
        raise EdgetokError(
            f"recipe {name} asks to load plugin libraries {build.get('plugins') or build['plugin_lib']}; native code "
            "loads only from --plugins or --plugin-lib "
            "on the command line, or pass --allow-recipe-plugins if you trust this recipe"
        )
    if "targets" in build:
        build["targets"] = parse_targets(build["targets"] if isinstance(build["targets"], list) else [build["targets"]])
    merged = {**build, **cli_values}  # flags given on the command line win over the recipe
    _ensure_export(export_opts, onnx_path, f"recipe {name}", echo=True)
    if "quantize" in data:  # the engine is built from the quantized model
        onnx_path = _ensure_quantized(data, name, onnx_path, echo=True)
        if "targets" in data["quantize"] and "targets" not in merged:
            merged["targets"] = parse_targets(list(data["quantize"]["targets"]))
    return str(onnx_path), merged


def _check_recipe_paths(data: dict, recipe: str) -> None:
    """A recipe's export and quantize values that need no model, before anything is imported or exported."""
    _check_export_values(data.get("export"), _recipe_key(recipe, "export"))
    calibrate = (data.get("quantize") or {}).get("calibrate") if isinstance(data.get("quantize"), dict) else None
    if isinstance(calibrate, str):
        _check_image_folder(calibrate, _recipe_key(recipe, "quantize")("calibrate"), "train")


def _ensure_quantized(data: dict, recipe: str, source: Path, echo: bool = False) -> Path:
    """The recipe's quantize: section applied to ``source``; reused when its sidecar says it is that."""
    from edgetok.workflows.quantize import RECIPE_KEYS, QuantizeOptions, default_output, quantize, stale_reason
    from edgetok.workflows.quantize import summary as quantize_summary

    values = dict(recipes.section(data, "quantize", RECIPE_KEYS, recipe))
    if "calibrate" not in values:
        raise EdgetokError(f"recipe {recipe}: quantize.calibrate is missing: the image folder to calibrate on")
    values["targets"] = list(values.get("targets") or [])
    opts = QuantizeOptions(model=str(source), **values)
    out = Path(opts.output) if opts.output else default_output(opts)
    why = stale_reason(opts)
    if why is None:
        _say(f"reusing {out}: its sidecar matches recipe {recipe}'s quantize section")
        return out
    _say(f"quantizing {source} -> {out} for recipe {recipe}" + ("" if why == "missing" else f": {why}"))
    record = quantize(opts, _say)
    if echo:
        click.echo(quantize_summary(record))
    return out


def _ensure_export(opts, out: Path, label: str, echo: bool = False) -> None:
    """Reuse the ONNX at ``out`` only if its sidecar says it is this export (model, weights, reduction)."""
    from edgetok.vit.export import export_vit, stale_reason
    from edgetok.vit.export import summary as export_summary

    why = stale_reason(out, opts)
    if why is None:
        _say(f"reusing {out}: its sidecar matches {label}")
        return
    _say(f"exporting {label} -> {out}" if why == "missing" else f"re-exporting {out} for {label}: {why}")
    data = export_vit(opts, _say)
    if echo:
        click.echo(export_summary(data))


@cli.command("profile")
@click.argument("models", nargs=-1)
@click.option("--backend", help="auto (default: by file type), onnxruntime, tensorrt, tensorrt-rtx or torch.")
@click.option("--device", help="cpu (default), cuda or jetson.")
@click.option("--ep", type=click.Choice(["cpu", "cuda", "tensorrt", "tensorrt-rtx"]),
              help="ONNX Runtime execution provider (default: cpu, or cuda on a GPU device).")
@click.option("--batch", type=int, help="Batch size (default: 1, or the engine's opt profile).")
@click.option("--inputs", type=click.Path(), help=".npz with one array per input, or an image folder (the first "
              "--batch images, preprocessed as exported; default: random, seeded).")
@click.option("--warmup", type=float, help="Warm-up time in ms (default 200).")
@click.option("--duration", type=float, help="Timed seconds per model, at least (default 3).")
@click.option("--iterations", type=int, help="Timed iterations per model, at least (default 10).")
@click.option("--rounds", type=int, help="Interleave models over this many rounds (default 1).")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads (default 0: all cores).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None, help="GPU runners: replay inference as a CUDA graph.")
@click.option("--data-transfers/--no-data-transfers", default=None, help="Engines: time H2D/D2H copies (trtexec default by version).")
@click.option("--recipe", help="Profile a recipe's export (or its profile.sweep variants), exporting what is missing.")
@click.option("--host", help="Profile on a remote Jetson over ssh ([user@]host[:port], or a ~/.ssh/config Host); "
              "the report comes back here.")
@click.option("--remote-timeout", type=float, metavar="SECONDS",
              help="--host: stop the remote profile (and remove its folder) after this many seconds (default 3600).")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default="edgetok-out/profile", show_default=True,
              help="Where profile.json, profile.md and profile.png go.")
@click.option("--report-json", type=click.Path(dir_okay=False), help="Also write the JSON report exactly here "
              "(- or a stream such as /dev/stdout: written into it, the summary then goes to stderr).")
@click.option("--pair", is_flag=True, help="MODELS is one speculative-decoding pair folder: profile generation.")
@click.option("--k", type=int, default=4, show_default=True, help="--pair: tokens the draft proposes per round.")
@click.option("--adaptive-k", is_flag=True, help="--pair: adapt k to the acceptance.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="--pair: tokens per prompt.")
@click.option("--modes", help="--pair: speculative,lookahead,prompt-lookup (default: every one the pair offers).")
@click.option("--ngram", type=int, default=4, show_default=True, help="--pair lookahead / prompt-lookup: n-gram.")
@click.option("--branches", type=int, default=4, show_default=True, help="--pair lookahead: branches per call.")
@click.option("--tokens", type=int, default=16, show_default=True, help="--pair lookahead / prompt-lookup: tokens.")
@click.option("--vlm", is_flag=True, help="MODELS is one VLM folder (`export vlm`): vision, time to first token, decode "
              "rate and KV cache, dense vs reduced tower (--image; --max-new-tokens, --iterations generations per "
              "tower, default 3; --backend onnxruntime or tensorrt).")
@click.option("--image", type=click.Path(dir_okay=False), help="--vlm: the image the generations see.")
@click.option("--prompt", help="--vlm: the prompt (its image token marks the image; default: the image token and "
              "seeded text ids).")
@click.option("--prompt-ids", help="--vlm: the prompt as comma-separated token ids.")
def profile_cmd(models, backend, device, ep, batch, inputs, warmup, duration, iterations, rounds, threads, cuda_graphs,
                data_transfers, recipe, host, remote_timeout, output_dir, report_json, pair, k, adaptive_k,
                max_new_tokens, modes, ngram, branches, tokens, vlm, image, prompt, prompt_ids) -> None:
    """Latency statistics (trtexec-grade) for one or more models, compared side by side."""
    from edgetok.profile.profiler import ProfileOptions, profile, summary, write_reports

    if report_json:
        from edgetok import atomic

        atomic.check_report(report_json)  # a link or a folder there: refused before the timing, not after
        if not (atomic.to_stdout(report_json) or atomic.is_stream(report_json)):
            _check_output_place(report_json, "--report-json")
    _check_output_place(str(Path(output_dir) / "profile.json"), "-o")  # where the reports go, before the timing
    if (image or prompt or prompt_ids) and not vlm:
        given = "--image" if image else "--prompt" if prompt else "--prompt-ids"
        raise EdgetokError(f"{given} is for --vlm (a VLM folder's profile); add --vlm, or drop {given}")
    if not vlm and len(models) == 1 and _is_vlm_folder(models[0]):
        raise EdgetokError(f"{models[0]} is a VLM folder; profile it with --vlm --image IMG")
    if vlm:
        _profile_vlm(models, image, prompt, _prompt_ids(prompt_ids), max_new_tokens, iterations, threads or 0,
                     backend or "onnxruntime", device, host, pair, Path(output_dir), report_json)
        return
    if pair:
        if host:
            raise EdgetokError("--pair --host is not supported yet; run edgetok profile --pair on the Jetson itself")
        if device == "cuda":
            _require_gpu(device)
        _profile_pair(models, k, adaptive_k, max_new_tokens, device, threads or 0, Path(output_dir), report_json,
                      modes.split(",") if modes else None, ngram, branches, tokens, backend or "onnxruntime")
        return
    if remote_timeout is not None and not host:
        raise EdgetokError(f"--remote-timeout {remote_timeout:g} applies only with --host; drop it, or add --host")
    if host:  # before a recipe exports anything
        from edgetok.profile.remote import check_remote_timeout, parse_host

        parse_host(host)
        if remote_timeout is not None:
            check_remote_timeout(remote_timeout)
    given = {"backend": backend, "device": device, "batch": batch, "warmup_ms": warmup, "duration_s": duration,
             "iterations": iterations, "rounds": rounds, "threads": threads}
    given = {key: value for key, value in given.items() if value is not None}  # what the command line set
    labels: list[str] = []
    data = {}
    if recipe:
        if models:
            raise EdgetokError("give either MODELS or --recipe, not both")
        data = recipes.load(recipe, _say)
        _check_recipe_paths(data, recipe)
    if not host:  # before a recipe exports anything; a remote machine is checked there
        planned = data.get("profile") if isinstance(data.get("profile"), dict) else {}
        _check_gpu_options(device or planned.get("device") or "cpu", backend or planned.get("backend") or "auto",
                           ["recipe.onnx"] if recipe else list(models), cuda_graphs)  # a recipe profiles ONNX
    if recipe:
        models, labels, prof = _recipe_models(recipe, data)
        renamed = {"duration": "duration_s", "warmup": "warmup_ms"}
        given = {**{renamed.get(key, key): value for key, value in prof.items()}, **given}  # flags win
    opts = ProfileOptions(models=list(models), ep=ep, inputs=inputs, cuda_graphs=cuda_graphs,
                          data_transfers=data_transfers, labels=labels, **given)
    if host:
        from edgetok.profile.remote import profile_remote

        result = profile_remote(host, opts, remote_timeout, device_given="device" in given)
    else:
        result = _with_progress(lambda tick: profile(opts, tick), len(models) * opts.duration_s)
    paths = write_reports(result, Path(output_dir))
    if report_json:
        from edgetok import atomic

        atomic.write_report(report_json, json.dumps(result, indent=2) + "\n")  # `-`: stdout holds the JSON alone
    click.echo(summary(result), err=bool(report_json) and atomic.to_stdout(report_json))
    _say(f"reports: {', '.join(str(p) for p in paths)}")


def _profile_pair(models, k, adaptive_k, max_new_tokens, device, threads: int, out_dir: Path, report_json,
                  modes=None, ngram=4, branches=4, tokens=16, backend="onnxruntime") -> None:
    from edgetok import atomic, sidecar
    from edgetok.llm.profile import markdown, profile_pair

    if len(models) != 1:
        raise EdgetokError("--pair profiles one pair folder (from `edgetok export spec-pair`)")
    if k < 1:
        raise EdgetokError(f"--k {k} must be >= 1")
    dev = "cuda" if device == "cuda" else "cpu"  # both models on one device here; generate can split them
    report = profile_pair(models[0], k, max_new_tokens, adaptive_k=adaptive_k, draft_device=dev, target_device=dev,
                          target_threads=threads, modes=modes, ngram=ngram, branches=branches, tokens=tokens,
                          backend=backend)
    out_dir.mkdir(parents=True, exist_ok=True)
    sidecar.write(out_dir / "pair_profile.json", report)
    atomic.write_text(out_dir / "pair_profile.md", f"# edgetok pair profile\n\n{markdown(report)}\n")
    if report_json:
        atomic.write_report(report_json, json.dumps(report, indent=2) + "\n")
    click.echo(markdown(report), err=bool(report_json) and atomic.to_stdout(report_json))


def _profile_vlm(models, image, prompt, prompt_ids, max_new_tokens, iterations, threads: int, backend: str, device,
                 host, pair, out_dir: Path, report_json) -> None:
    """profile --vlm (edgetok.vlm.profile): dense against reduced tower for one image."""
    from edgetok import atomic, sidecar
    from edgetok.vlm.export import is_vlm

    if len(models) != 1 or pair or host or device not in (None, "cpu"):
        raise EdgetokError("--vlm profiles one VLM folder (from `edgetok export vlm`) here, on the CPU (--backend "
                           "tensorrt: its engines on this machine's GPU); drop --pair/--host/--device")
    if image is None:
        raise EdgetokError(f"--vlm needs --image IMG: the image the profiled generations of {models[0]} see")
    if not is_vlm(models[0]):
        raise EdgetokError(f"--vlm: {models[0]} is not a VLM folder (no edgetok_vlm.json); export one with "
                           "`edgetok export vlm MODEL -o DIR`")
    from edgetok.vlm.profile import markdown, profile_vlm

    report = profile_vlm(models[0], image, max_new_tokens, iterations or 3, threads, backend, prompt, prompt_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    sidecar.write(out_dir / "vlm_profile.json", report)
    atomic.write_text(out_dir / "vlm_profile.md", f"# edgetok VLM profile\n\n{markdown(report)}\n")
    if report_json:
        atomic.write_report(report_json, json.dumps(report, indent=2) + "\n")
    click.echo(markdown(report), err=bool(report_json) and atomic.to_stdout(report_json))


def _with_progress(work, total_seconds: float):
    """A progress bar over the timed seconds (stderr, only on a terminal)."""
    if not sys.stderr.isatty():
        return work(None)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("profiling", total=max(total_seconds, 1e-6))
        return work(lambda label, seconds: bar.update(task, advance=seconds, description=f"profiling {label}"))


def _check_gpu_options(device: str, backend: str, models: list[str], cuda_graphs: bool | None) -> None:
    """--device and --cuda-graphs against the runners the models get and this machine, before a runtime is
    imported or a model loads."""
    from edgetok.runtime.runners import ENGINE_SUFFIXES

    kinds = {"engine" if Path(m).suffix in ENGINE_SUFFIXES else "onnx" if m.endswith(".onnx") else "name"
             for m in models}
    if cuda_graphs and device == "cpu":
        raise EdgetokError("--cuda-graphs replays GPU work and --device cpu runs none: drop --cuda-graphs, or profile "
                           "with --device cuda")
    if cuda_graphs and (backend == "onnxruntime" or backend == "auto" and "onnx" in kinds):
        raise EdgetokError("--cuda-graphs: ONNX Runtime runs without CUDA graphs here (edgetok captures engines and "
                           "--backend torch): drop --cuda-graphs, or profile an engine from `edgetok build-engine`")
    if device == "cuda" and (backend == "torch" or backend == "auto" and "name" in kinds):
        _require_gpu(device)  # PyTorch would load the model first; the other runners ask for the GPU up front


def _recipe_models(recipe: str, data: dict) -> tuple[list[str], list[str], dict]:
    from edgetok.vit.export import ViTExportOptions

    variants, prof = recipes.profile_plan(data, recipe)
    models, labels = [], []
    for label, values in variants:
        _ensure_export(ViTExportOptions(**values), Path(values["output"]), f"recipe {recipe} ({label})")
        if "quantize" in data:  # each variant's own quantized file, beside its export
            values = {**values, "output": str(_ensure_quantized(
                {**data, "quantize": {**data["quantize"], "output": None}}, recipe, Path(values["output"])))}
        models.append(values["output"])
        labels.append(label)
    return models, labels, prof


@export.command("spec-pair")
@click.option("--target", required=True, help="Local Hugging Face causal-LM folder (weights, or config.json only).")
@click.option("--draft", required=True, help="Draft folder sharing the target's vocabulary, layer-skip:N, or none "
              "(the target alone, for --mode lookahead / prompt-lookup).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="New folder for the pair.")
def export_spec_pair_cmd(target, draft, output) -> None:
    """Export a draft/target pair of causal LMs as KV-cache ONNX decoders, checked against PyTorch."""
    from edgetok.llm.pair import export_pair, summary

    click.echo(summary(export_pair(target, draft, output, _say)))


@export.command("vlm")
@click.argument("model")
@click.option("--method", default="none", show_default=True,
              help=f"Visual-token reduction inside the vision tower: {', '.join(method_registry.names())} "
                   "(`edgetok methods` lists them with their options).")
@_method_flags
@click.option("--max-length", type=int, help="Longest prompt (visual tokens included) plus answer, in tokens "
              "(default: the language model's positions).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="New folder for the VLM.")
def export_vlm_cmd(model, method, max_length, opset, output, **method_options) -> None:
    """Export a Hugging Face LLaVA folder MODEL: a token-reduced vision tower, the embedding table and the language
    model as KV-cache decoders taking embeddings, checked end to end against PyTorch."""
    method_options = _method_values(method, method_options)
    _check_output_place(str(Path(output) / "edgetok_vlm.json"), "-o")
    if method == "dtome" and isinstance(method_options.get("calibrate"), str):
        _check_image_folder(method_options["calibrate"], "--calibrate", "train")
    from edgetok.vlm.export import VlmExportOptions, export_vlm, summary

    click.echo(summary(export_vlm(VlmExportOptions(model=model, output=output, method=method,
                                                   method_options=method_options, max_length=max_length,
                                                   opset=opset), _say)))


@cli.command("generate")
@click.argument("pair", type=click.Path())
@click.option("--image", type=click.Path(dir_okay=False),
              help="A VLM folder (`export vlm`): the image; the prompt's image token marks where it goes.")
@click.option("--prompt", help="Prompt text (needs the pair's tokenizer).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--mode", type=click.Choice(["target", "speculative", "lookahead", "prompt-lookup"]),
              help="Default: speculative, or lookahead for a pair without a draft (--draft none). "
                   "lookahead / prompt-lookup: draft-free, proposals from the prompt and output so far.")
@click.option("--k", type=int, default=4, show_default=True, help="Tokens the draft proposes per round.")
@click.option("--ngram", type=int, default=4, show_default=True,
              help="lookahead / prompt-lookup: the longest tail of the text matched against what came before.")
@click.option("--branches", type=int, default=4, show_default=True, help="lookahead: branches verified per call.")
@click.option("--tokens", type=int, default=16, show_default=True,
              help="lookahead: proposed tokens per call (all branches); prompt-lookup: the chain's length.")
@click.option("--adaptive-k", is_flag=True, help="Grow k after a clean sweep, shrink it after an early miss.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; > 0: sampling.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--draft-device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--target-device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt: the engines of `edgetok build-engine PAIR` (a CUDA GPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
def generate_cmd(pair, image, prompt, prompt_ids, max_new_tokens, mode, k, ngram, branches, tokens, adaptive_k,
                 temperature, seed, draft_device, target_device, backend, as_json) -> None:
    """Generate with the target alone, with speculative decoding, or draft-free (lookahead, prompt lookup): lossless.
    PAIR may be a VLM folder from `export vlm`, with --image."""
    import json

    from edgetok.llm.pair import default_mode, read_manifest
    from edgetok.llm.runtime import generate

    if seed < 0:
        raise EdgetokError(f"--seed {seed} must be >= 0 (a NumPy random seed), e.g. 0")
    from edgetok.vlm.export import is_vlm

    if is_vlm(pair) or image is not None:
        _generate_vlm(pair, image, prompt, prompt_ids, max_new_tokens, mode, k, adaptive_k, ngram, branches, tokens,
                      temperature, seed, draft_device, target_device, backend, as_json)
        return
    if mode is None:
        mode = default_mode(read_manifest(pair))
        if mode != "speculative":
            _say(f"--mode {mode}: {pair} has no draft model (exported with --draft none)")
    ids = _prompt_ids(prompt_ids)
    result = generate(pair, prompt, ids, max_new_tokens, mode, k, temperature, seed, draft_device, target_device,
                      adaptive_k, ngram, branches, tokens, backend)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(result.get("text", " ".join(map(str, result["tokens"]))))
    rate = result["decode_tokens_per_s"]
    extra = (f", acceptance {result['acceptance_rate']:.2f}, {result['mean_tokens_per_round']:.2f} tokens/round"
             if mode != "target" and result["proposed"] else ", nothing proposed" if mode != "target" else "")
    _say(f"{result['new_tokens']} tokens, {rate:.1f} tok/s ({mode}{extra})")


def _prompt_ids(prompt_ids: str | None) -> list[int] | None:
    if prompt_ids is None:
        return None
    try:
        return [int(t) for t in prompt_ids.replace(" ", "").split(",") if t]
    except ValueError:
        raise EdgetokError(f"--prompt-ids {prompt_ids!r} must be comma-separated integers") from None


def _generate_vlm(folder, image, prompt, prompt_ids, max_new_tokens, mode, k, adaptive_k, ngram, branches, tokens,
                  temperature, seed, draft_device, target_device, backend, as_json) -> None:
    """`generate` of a VLM folder: the image's visual tokens spliced at the prompt's image token, then the
    language decoder alone or draft-free (edgetok.vlm.runtime)."""
    from edgetok.vlm.export import is_vlm, read_manifest

    if not is_vlm(folder):
        raise EdgetokError(f"--image needs a VLM folder from `edgetok export vlm`; {folder} is not one")
    if image is None:
        raise EdgetokError(f"{folder} is a VLM folder: give --image IMG (and a prompt holding the image token)")
    given = [flag for flag, on in (("--k", k != 4), ("--adaptive-k", adaptive_k), ("--draft-device", draft_device != "cpu"),
                                   ("--target-device", target_device != "cpu"), ("--backend", backend != "onnxruntime"))
             if on]
    if given:
        raise EdgetokError(f"{given[0]} does not apply to a VLM folder (no draft model; ONNX Runtime on the CPU); drop it")
    if mode == "speculative":
        raise EdgetokError(f"--mode speculative needs a draft model and {folder} (a VLM) has none; use --mode target, "
                           "lookahead or prompt-lookup")
    ids = _prompt_ids(prompt_ids)
    if mode is None:
        mode = "lookahead"
        read_manifest(folder)  # a damaged folder is refused before the message below
        _say(f"--mode {mode}: {folder} is a VLM folder (no draft model)")
    from edgetok.vlm.runtime import generate

    result = generate(folder, image, prompt, ids, max_new_tokens, mode, temperature, seed, ngram, branches, tokens)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(result.get("text", " ".join(map(str, result["tokens"]))))
    rate = result["decode_tokens_per_s"]
    extra = (f", acceptance {result['acceptance_rate']:.2f}" if mode != "target" and result["proposed"] else
             ", nothing proposed" if mode != "target" else "")
    _say(f"{result['visual_tokens']} visual tokens; {result['new_tokens']} tokens, {rate:.1f} tok/s ({mode}{extra})")


@cli.command("quantize")
@click.argument("model", type=click.Path())
@click.option("--mode", default="int8", show_default=True,
              help="int8 (ONNX Runtime's quantizer) or fp8 (NVIDIA Model Optimizer, SM 8.9+), Q/DQ.")
@click.option("--target", "targets", multiple=True, help="GPUs the model is for, e.g. sm87 (Orin), sm89; fp8 refuses "
              "those below SM 8.9.")
@click.option("--calibrate", required=True, type=click.Path(),
              help="ImageFolder of training-style images to calibrate on (not the evaluation set).")
@click.option("--samples", type=int, default=256, show_default=True, help="Calibration images (spread over the folder).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output .onnx (default: MODEL_<mode>.onnx).")
def quantize_cmd(model, mode, calibrate, samples, output, targets) -> None:
    """Quantize an edgetok ViT export's own layers to INT8 or FP8 Q/DQ, every reduction step left in float."""
    if not Path(model).exists():
        raise EdgetokError(f"{model} does not exist; quantize an `edgetok export vit` output, e.g. "
                           "edgetok-out/digits_vit_tome_r8.onnx from `edgetok export`")
    _check_image_folder(calibrate, "--calibrate", "train")
    if output:
        _check_output_place(output, "-o")
    from edgetok.engine.options import parse_targets
    from edgetok.workflows.quantize import QuantizeOptions, quantize, summary

    click.echo(summary(quantize(QuantizeOptions(model=model, calibrate=calibrate, mode=mode, samples=samples,
                                                output=output, targets=parse_targets(list(targets))), _say)))


@cli.command("compare")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(), help="ImageFolder the methods are evaluated on.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local weights when MODEL is a timm name.")
@click.option("--methods", default=",".join(method_registry.comparable()), show_default=True,
              help="Fixed-count methods to match (comma-separated).")
@click.option("--fractions", default="0.65,0.5", show_default=True,
              help="GMACs targets as shares of the dense model's (DeiT-S: 3.0 and 2.3 GMACs).")
@click.option("--batch", type=int, default=8, show_default=True, help="Profiling batch.")
@click.option("--duration", type=float, default=2.0, show_default=True, help="Timed seconds per model and round.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Interleaved profiling rounds.")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default="edgetok-out/compare", show_default=True)
def compare_cmd(model, data, checkpoint, methods, fractions, batch, duration, rounds, output_dir) -> None:
    """Every fixed-count method on MODEL at matched GMACs: exported, evaluated against dense and profiled
    through the same path, in one table (profile.md, and printed) and one plot (profile.png)."""
    _check_checkpoint(checkpoint)
    _check_image_folder(data, "--data", "heldout")
    try:
        shares = [float(f) for f in fractions.split(",")]
    except ValueError:
        raise EdgetokError(f"--fractions {fractions!r} is not a list of numbers, e.g. 0.65,0.5") from None
    _check_compare_values(data, methods.split(","), shares, batch, duration, rounds)
    _check_output_place(str(Path(output_dir) / "profile.json"), "-o")
    from edgetok.profile.profiler import summary
    from edgetok.workflows.comparison import CompareOptions, compare

    result = compare(CompareOptions(model=model, data=data, checkpoint=checkpoint, methods=methods.split(","),
                                    fractions=shares, batch=batch, duration_s=duration, rounds=rounds,
                                    output_dir=output_dir), _say)
    click.echo(summary(result).split("\n\n")[0])
    click.echo("wrote " + ", ".join(result["report_files"]))


def _check_compare_values(data: str, methods: list[str], shares: list[float], batch: int, duration: float,
                          rounds: int) -> None:
    """compare's options and its images, before the variants are exported and evaluated (minutes)."""
    from edgetok.workflows.comparison import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EdgetokError(f"--methods {','.join(unknown)}: compare matches {', '.join(METHODS)} (ATS and dtome keep a "
                           "count that follows the image: evaluate them with edgetok eval)")
    bad = [f for f in shares if not 0 < f < 1]
    if bad:
        raise EdgetokError(f"--fractions {bad[0]} must be in (0, 1): a share of the dense model's GMACs, e.g. 0.65")
    if batch < 1:
        raise EdgetokError(f"--batch {batch} must be >= 1 (the profiling batch), e.g. 8")
    if not 0 <= duration < math.inf:
        raise EdgetokError(f"--duration {duration} must be a finite number of seconds >= 0, e.g. 2")
    if rounds < 1:
        raise EdgetokError(f"--rounds {rounds} must be >= 1, e.g. 3")
    from edgetok.images import walk

    walk(data, "--data")  # an empty folder, a class without images, a link loop: refused in one line


@cli.command("tune")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(), help="ImageFolder the accuracy is measured on.")
@click.option("--calibrate", type=click.Path(), help="ImageFolder of training-style images: int8/fp8 calibration, dtome.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local weights when MODEL is a timm name.")
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="Accuracy loss allowed, in points of --metric against the dense export.")
@click.option("--metric", type=click.Choice(["top1", "agreement"]), default="top1", show_default=True,
              help="top1: top-1 below the dense export's; agreement: top-1 disagreement with the dense export.")
@click.option("--target", default="cpu", show_default=True,
              help="cpu (ONNX Runtime here) or the GPU architecture the devices offer as a Ray resource, e.g. sm87.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch the latency is measured at.")
@click.option("--trials", type=int, help="Trials in all, reruns included (default 32, or unlimited with --time).")
@click.option("--time", "time_limit", help="Start no new trial after this long, e.g. 2h, 30m, 90s.")
@click.option("--methods", help="Methods to search (default: all; dtome with --calibrate). `edgetok methods` lists them.")
@click.option("--precision", help="fp32,fp16,int8,fp8 (default: fp32 [+fp16 for an engine target] [+int8 with --calibrate]).")
@click.option("--attention", default="dense", show_default=True, help="dense,sparse: attention kinds to search.")
@click.option("--plugins", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="edgetok plugin nodes: auto searches both for an engine target (off for cpu).")
@click.option("--address", help="Join this Ray cluster (HOST:PORT of `ray start --head`, or ray://HOST:PORT); "
              "default: a local instance, loopback only.")
@click.option("--workers", type=int, help="CPU tasks at once (default: the cluster's CPUs).")
@click.option("--duration", type=float, default=2.0, show_default=True, help="Timed seconds per profile.")
@click.option("--target-timeout", type=float, default=120.0, show_default=True, metavar="SECONDS",
              help="How long to wait for a node offering --target before giving up.")
@click.option("--cpu-stand-in", is_flag=True, help="A node offering --target without a GPU profiles on its CPU "
              "(ONNX Runtime), recorded as a stand-in: tries a fleet's plumbing without devices.")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default="edgetok-out/tune", show_default=True,
              help="The study (study.db, resumable), tune.json, pareto.md/png, best.yaml and every trial's files.")
def tune_cmd(model, data, calibrate, checkpoint, max_drop, metric, target, batch, trials, time_limit, methods,
             precision, attention, plugins, address, workers, duration, target_timeout, cpu_stand_in,
             output_dir) -> None:
    """Search token reduction, attention, precision and plugins for the fastest MODEL on --target that loses at
    most --max-drop points; trials run on Ray (resumable: rerun the same command to continue)."""
    from edgetok.tune import space

    if not 0 <= max_drop < math.inf:
        raise EdgetokError(f"--max-drop {max_drop:g} must be a finite number of points >= 0, e.g. 1.0")
    target = space.parse_target(target)
    chosen = space.parse_methods(methods, calibrate)
    precisions = space.parse_precisions(precision, target, calibrate)
    attentions = space.parse_attention(attention)
    plugin_choices = space.plugin_choices(plugins, target)
    seconds = space.parse_duration(time_limit)
    if trials is not None and seconds is not None:
        raise EdgetokError("give --trials or --time, not both")
    for flag, value, low in (("--trials", trials, 1), ("--batch", batch, 1), ("--workers", workers, 1)):
        if value is not None and value < low:
            raise EdgetokError(f"{flag} {value} must be >= {low}")
    if not 0 <= duration < math.inf or not 0 < target_timeout < math.inf:
        raise EdgetokError(f"--duration {duration:g} must be >= 0 and --target-timeout {target_timeout:g} > 0 seconds")
    _check_checkpoint(checkpoint)
    _check_image_folder(data, "--data", "heldout")
    if calibrate:
        _check_image_folder(calibrate, "--calibrate", "train")
    _check_output_place(str(Path(output_dir) / "tune.json"), "-o")
    if address:
        from edgetok.tune.fleet import check_reachable

        check_reachable(address)  # before Ray: one line after a short timeout, not Ray's minute of retries
    from edgetok.tune import report
    from edgetok.tune.study import TuneOptions, run_study

    opts = TuneOptions(model=model, data=data, calibrate=calibrate, checkpoint=checkpoint, max_drop=max_drop,
                       metric=metric, target=target, batch=batch, trials=trials, time_s=seconds, methods=chosen,
                       precisions=precisions, attentions=attentions, plugins=plugin_choices, address=address,
                       output_dir=output_dir, workers=workers, duration_s=duration, target_timeout_s=target_timeout,
                       cpu_stand_in=cpu_stand_in)
    import signal

    terminated = []

    def on_sigterm(signum, frame):  # Ray's calls turn what a handler raises into KeyboardInterrupt: remember it
        terminated.append(signum)
        _on_sigterm(signum, frame)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # main() restores the previous handler
    try:
        records = run_study(opts, _say, _progress_line())
    except KeyboardInterrupt as exc:  # the study keeps what finished: say so, not "nothing was written"
        term = isinstance(exc, Terminated) or bool(terminated)
        click.echo(f"error: {'terminated (SIGTERM)' if term else 'aborted'}; the finished trials are kept in "
                   f"{Path(output_dir) / 'study.db'}: rerun the same command to continue", err=True)
        raise click.exceptions.Exit(143 if term else 130) from None
    click.echo(report.markdown(records, opts), nl=False)
    top = report.best(records)
    click.echo(f"wrote {output_dir}/tune.json, pareto.md, pareto.png"
               + (f", best.yaml (trial {top['number']}: {top['label']})" if top else
                  f"; no trial within --max-drop {max_drop:g} was profiled, so no best.yaml"))


def _progress_line():
    """The live line on stderr: rewritten in place on a terminal, a new line per change otherwise."""
    last = [None]
    tty = sys.stderr.isatty()

    def show(line: str) -> None:
        if line == last[0]:
            return
        last[0] = line
        click.echo(("\r\033[K" if tty else "") + line, err=True, nl=not tty)

    return show


@cli.command("eval")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(), help="ImageFolder: one subfolder of images per class "
              "(a VLM: a folder with questions.jsonl, as `edgetok data digits-vlm` writes).")
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--reference", help="Reference model (e.g. the dense ONNX): top-1 agreement and mean KL.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local weights when MODEL is a timm name.")
@click.option("--no-sidecar", is_flag=True, help="Do not record the result in the ONNX sidecar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model, data, batch, reference, checkpoint, no_sidecar, as_json) -> None:
    """Top-1/top-5 of MODEL (.onnx, engine or timm name) on an ImageFolder, with its own preprocessing; for a
    VLM (an `export vlm` folder, or a Hugging Face LLaVA folder in PyTorch), answer accuracy by greedy generation."""
    from edgetok.vlm.evaluate import folder_kind

    if folder_kind(model):
        _eval_vlm(model, data, batch, reference, checkpoint, as_json)
        return
    _check_checkpoint(checkpoint)
    _check_image_folder(data, "--data", "heldout")
    import json

    from edgetok.workflows.evaluate import EvalOptions, evaluate

    opts = EvalOptions(model=model, data=data, batch=batch, reference=reference, write_sidecar=not no_sidecar,
                       checkpoint=checkpoint)
    result = _with_count_progress(lambda tick: evaluate(opts, tick))
    if result.get("not_recorded"):
        _say(result["not_recorded"])
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    line = f"{model}: top-1 {result['top1']:.2%}"
    line += f", top-5 {result['top5']:.2%}" if result["top5"] is not None else ""
    line += f" on {result['samples']} images ({result['classes']} classes)"
    if result.get("skipped"):  # links back into the folder, repeats, special files: read once, by real location
        skipped = result["skipped"]
        line += f", {skipped} {'link or repeat' if skipped == 1 else 'links or repeats'} passed over"
    if result.get("tokens_kept"):
        line += "; tokens kept after blocks " + ", ".join(f"{b}: mean {t['mean']:.1f} [{t['min']}-{t['max']}]"
                                                          for b, t in result["tokens_kept"].items())
    if result.get("attention_kept"):
        kept = result["attention_kept"]
        line += (f"; attention block pairs kept: mean {sum(t['mean'] for t in kept.values()) / len(kept):.1%} "
                 "(per block: " + ", ".join(f"{b}: {t['mean']:.1%} [{t['min']:.1%}-{t['max']:.1%}]"
                                             for b, t in kept.items()) + ")")
    if result.get("gmacs"):
        g = result["gmacs"]
        line += f"; GMACs per image: mean {g['mean']:.4f} [{g['min']:.4f}-{g['max']:.4f}]"
    if "reference" in result:
        ref = result["reference"]
        line += f"; vs {ref['model']}: top-1 agreement {ref['top1_agreement']:.2%}, mean KL {ref['mean_kl']:.4f}"
    click.echo(line)


def _eval_vlm(model, data, batch, reference, checkpoint, as_json) -> None:
    """`eval` of a VLM folder: answer accuracy and visual tokens (edgetok.vlm.evaluate)."""
    for given, flag in ((reference, "--reference"), (checkpoint, "--checkpoint")):
        if given:
            raise EdgetokError(f"{flag} applies to a ViT; {model} is a VLM folder, evaluated on its own weights")
    from edgetok.vlm.evaluate import evaluate, read_data

    read_data(data)  # a missing or malformed questions file: one line, before any model loads
    result = _with_count_progress(lambda tick: evaluate(model, data, batch, tick))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    tokens = result["visual_tokens"]
    click.echo(f"{model}: answer accuracy {result['accuracy']:.2%} on {result['questions']} questions about "
               f"{result['images']} images ({result['backend']}); visual tokens per image: mean {tokens['mean']:g} "
               f"[{tokens['min']}-{tokens['max']}]")


def _with_count_progress(work):
    if not sys.stderr.isatty():
        return work(None)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        return work(lambda done, total: bar.update(task, completed=done, total=total))


@cli.group()
def data() -> None:
    """Datasets edgetok can write without a download."""


@data.command("digits")
@click.option("--split", type=click.Choice(["heldout", "train"]), default="heldout", show_default=True,
              help="heldout: for accuracy; train: the images the model learned from, for calibrating (dtome).")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Folder (default: edgetok-out/digits-<split>).")
def data_digits_cmd(split, output) -> None:
    """A split of the reference ViT's scikit-learn digits, as an ImageFolder."""
    from edgetok.vit.digits import write_heldout_folder

    info = write_heldout_folder(output or f"edgetok-out/digits-{split}", split)
    click.echo(f"wrote {info['images']} images in {info['classes']} class folders to {info['path']}")


@data.command("digits-vlm")
@click.option("--split", type=click.Choice(["heldout", "train"]), default="heldout", show_default=True,
              help="heldout: for accuracy; train: the digits the reference VLM learned from, for calibrating (dtome "
                   "--calibrate DIR).")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Folder (default: edgetok-out/digits-vlm-<split>).")
def data_digits_vlm_cmd(split, output) -> None:
    """Grids of four scikit-learn digits and questions about them (questions.jsonl), for the reference VLM."""
    from edgetok.vlm.digits import write_data

    info = write_data(output or f"edgetok-out/digits-vlm-{split}", split)
    click.echo(f"wrote {info['images']} images and {info['questions']} questions to {info['path']}")


@cli.group()
def plugins() -> None:
    """edgetok's TensorRT plugins: specs, kernels checked against references, cubins built ahead of time."""


@plugins.command("list")
def plugins_list_cmd() -> None:
    """Every plugin spec and which of its implementations exist here."""
    from edgetok.plugins.inventory import describe

    click.echo(describe())


@plugins.command("check")
@click.option("--device", default="cpu", show_default=True, help="cpu (Triton's interpreter) or cuda (a GPU).")
def plugins_check_cmd(device) -> None:
    """Run every kernel against its reference on random and adversarial inputs; exit 1 on a mismatch."""
    from edgetok.plugins.check import run_checks, summary

    results = run_checks(device, _say)
    click.echo(summary(results, device))
    if not all(r.passed for r in results):
        raise click.exceptions.Exit(1)


@plugins.command("build")
@click.option("--arch", "archs", default="all", show_default=True,
              help="GPU architectures, e.g. sm87,sm110: sm87 Orin, sm110 Thor, sm86/sm89/sm120 RTX, sm90 H200.")
@click.option("-o", "--output", type=click.Path(), help="Also write a bundle (.cubins.zip) here; with --lib, the "
              "folder for libedgetok_plugins.so (default: $EDGETOK_CACHE/plugins/<platform>, where build-engine looks).")
@click.option("--lib", is_flag=True, help="Build the C++ plugin library libedgetok_plugins.so (host g++, no nvcc) "
              "for trtexec, Triton Server, DeepStream, C++ programs and edgetok build-engine.")
@click.option("--platform", "target_platform", type=click.Choice(["x86_64", "aarch64"]),
              help="--lib: the CPU the library runs on (default: this machine's); aarch64 cross-compiles for Jetson.")
@click.option("--tensorrt-include", type=click.Path(file_okay=False),
              help="--lib: TensorRT's include folder (default: $TENSORRT_INCLUDE_DIR, an installed TensorRT, "
                   "else the 10.14 headers tools/setup.sh unpacked).")
def plugins_build_cmd(archs, output, lib, target_platform, tensorrt_include) -> None:
    """Compile every kernel ahead of time (no GPU needed) into cubins and a manifest; with --lib, also the C++
    plugin library that embeds them."""
    from edgetok.plugins import cubins

    if lib:
        from edgetok.plugins import library

        click.echo(library.describe(library.build(output, cubins.parse_archs(archs), target_platform,
                                                  tensorrt_include, _say)))
        return
    if target_platform or tensorrt_include:
        raise EdgetokError("--platform and --tensorrt-include choose how the C++ library is built; add --lib")
    chosen = cubins.parse_archs(archs)
    if output and not output.endswith(".cubins.zip"):
        raise EdgetokError(f"-o {output} should end in .cubins.zip (engines and ONNX files look for NAME.cubins.zip "
                           "beside them)")
    if output:
        manifest = cubins.write_bundle(Path(output), chosen, _say)
    else:
        folder = cubins.build(chosen, _say)
        manifest = cubins.restrict(json.loads((folder / cubins.MANIFEST).read_text()), chosen)
        _say(f"cubins in the cache {folder}; no bundle written: -o NAME.cubins.zip writes one to put beside an "
             "ONNX or engine")
    click.echo(cubins.describe(manifest))


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: unwinding runs every cleanup (staging folders, worker processes)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure is one line on stderr and a non-zero exit, never a traceback."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    try:
        # Without standalone mode click returns (not raises) the code of a command's click Exit.
        code = cli.main(args=argv, prog_name="edgetok", standalone_mode=False)
    except EdgetokError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        click.echo(f"error: {exc.format_message()} (see --help)", err=True)
        return 2
    except (click.Abort, Terminated) as exc:  # click turns Ctrl-C and SIGTERM into Abort
        if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated):
            click.echo("error: terminated (SIGTERM); nothing was written", err=True)
            return 143
        click.echo("error: aborted", err=True)
        return 130
    except Exception as exc:  # a bug: still one line, the traceback on request
        if os.environ.get("EDGETOK_DEBUG"):
            raise
        ordinary = os_error_message(exc) if isinstance(exc, OSError) else None
        if ordinary:  # a folder we may not write, a file in the way, a full disk: the user's to fix
            click.echo(f"error: {ordinary}", err=True)
            return 1
        click.echo(f"error: internal error {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                   "(rerun with EDGETOK_DEBUG=1 for the traceback, and please report it)", err=True)
        return 1
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def run() -> None:
    sys.exit(main())
