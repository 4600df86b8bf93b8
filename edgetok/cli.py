"""The `edgetok` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edgetok import __version__, recipe as recipes
from edgetok.errors import EdgetokError


def _ints(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise EdgetokError(f"--keep-layers {value!r} must be comma-separated block indices, e.g. 3,6,9") from None


def _say(message: str) -> None:
    click.echo(f"· {message}", err=True)


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
    from edgetok.vit.export import ViTExportOptions, export_vit, summary

    name = recipe or recipes.DEFAULT
    data = recipes.load(name)
    values = recipes.section(data, "export", ViTExportOptions.fields() | {"kind"}, name)
    kind = values.pop("kind", "vit")
    if kind != "vit":
        raise EdgetokError(f"recipe {name}: export.kind {kind!r} is not supported; use 'vit'")
    if isinstance(values.get("keep_layers"), str):
        values["keep_layers"] = _ints(values["keep_layers"])
    _say(f"recipe {name}")
    click.echo(summary(export_vit(ViTExportOptions(**values), _say)))


@export.command("vit")
@click.argument("model")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local .pth/.safetensors weights for a timm name.")
@click.option("--method", type=click.Choice(["none", "tome", "evit"]), default="none", show_default=True)
@click.option("--r", "r", type=int, help="ToMe: tokens merged in every block.")
@click.option("--r-schedule", help="ToMe: '(r, inflect)' e.g. '(16, -1)' (decreasing), or a per-block list '16,16,8'.")
@click.option("--keep-rate", type=float, help="EViT: fraction of non-prefix tokens kept at each keep layer, in (0, 1].")
@click.option("--keep-layers", help="EViT: 0-based blocks that prune, e.g. 3,6,9 (default: depth/4, depth/2, 3depth/4).")
@click.option("--img-size", type=int, help="Input resolution (a multiple of the patch size).")
@click.option("--batch", type=int, default=1, show_default=True, help="Example batch for export (batch stays dynamic).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--allow-unsupported-ops", is_flag=True, help="Write the ONNX even if TensorRT would reject some nodes.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output .onnx (default: edgetok-out/<model>_<method>.onnx).")
def export_vit_cmd(model, checkpoint, method, r, r_schedule, keep_rate, keep_layers, img_size, batch, opset,
                   allow_unsupported_ops, output) -> None:
    """Export a timm ViT name or Hugging Face ViT folder MODEL with token reduction."""
    from edgetok.vit.export import ViTExportOptions, export_vit, summary

    opts = ViTExportOptions(
        model=model, checkpoint=checkpoint, method=method, r=r, r_schedule=r_schedule, keep_rate=keep_rate,
        keep_layers=_ints(keep_layers), img_size=img_size, batch=batch, opset=opset, output=output,
        allow_unsupported_ops=allow_unsupported_ops,
    )
    click.echo(summary(export_vit(opts, _say)))


@cli.command("build-engine")
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Engine file (default: MODEL.<backend>.<precision>.engine).")
@click.option("--backend", default="auto", show_default=True, help="auto, tensorrt or tensorrt-rtx.")
@click.option("--precision", default="fp32", show_default=True, help="fp32, fp16 or bf16.")
@click.option("--batch", help="Batch profile MIN:OPT:MAX (default: from the export sidecar).")
@click.option("--shapes", multiple=True, help="Per-input profile name:MIN:OPT:MAX, shapes like 8x3x224x224.")
@click.option("--workspace", type=int, help="Workspace limit in MiB.")
@click.option("--opt-level", type=click.IntRange(0, 5), help="Builder optimization level 0-5.")
@click.option("--target", "targets", multiple=True, help="TensorRT-RTX compute capabilities, e.g. sm86,sm89,sm120.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT: timing cache to load/save; RTX: runtime cache for the JIT.")
@click.option("--plugins", multiple=True, help="Plugin library (.so) to load; repeatable.")
@click.option("--dla-core", type=int, help="Jetson: build for this DLA core (GPU fallback on).")
@click.option("--recipe", help="Build the ONNX of a recipe's export section with its build: section.")
def build_engine_cmd(model, output, backend, precision, batch, shapes, workspace, opt_level, targets, timing_cache,
                     plugins, dla_core, recipe) -> None:
    """Build a TensorRT or TensorRT-RTX engine from MODEL (.onnx) in a child process."""
    from edgetok.engine.build import build_engine, progress, summary
    from edgetok.engine.options import BuildOptions, parse_targets

    values = dict(output=output, backend=backend, precision=precision, batch=batch, shapes=list(shapes),
                  workspace=workspace, opt_level=opt_level, targets=parse_targets(list(targets)),
                  timing_cache=timing_cache, plugins=list(plugins), dla_core=dla_core)
    if recipe:
        if model:
            raise EdgetokError("give either MODEL or --recipe, not both")
        model, values = _recipe_build(recipe, values)
    elif not model:
        raise EdgetokError("give the ONNX model to build (e.g. edgetok-out/model.onnx) or --recipe NAME")
    with progress(sys.stderr.isatty()) as say:
        report = build_engine(BuildOptions(onnx=model, **values), say)
    click.echo(summary(report))


def _recipe_build(name: str, cli_values: dict) -> tuple[str, dict]:
    """The recipe's export output (exported first if missing) and its build: section under CLI flags."""
    from edgetok.engine.options import BuildOptions, parse_targets
    from edgetok.vit.export import ViTExportOptions, default_output, export_vit

    data = recipes.load(name)
    exported = recipes.section(data, "export", ViTExportOptions.fields() | {"kind"}, name)
    exported.pop("kind", None)
    export_opts = ViTExportOptions(**exported)
    onnx_path = Path(export_opts.output) if export_opts.output else default_output(export_opts)
    build = recipes.section(data, "build", set(BuildOptions.__dataclass_fields__) - {"onnx"}, name) \
        if "build" in data else {}
    if "targets" in build:
        build["targets"] = parse_targets(build["targets"] if isinstance(build["targets"], list) else [build["targets"]])
    defaults = BuildOptions(onnx="")
    merged = dict(build)
    for key, value in cli_values.items():  # flags given on the command line win over the recipe
        if value != getattr(defaults, key) and value not in (None, []):
            merged[key] = value
    if not onnx_path.is_file():
        _say(f"{onnx_path} is missing: exporting recipe {name} first")
        click.echo(summary_export(export_vit(export_opts, _say)))
    return str(onnx_path), merged


def summary_export(data: dict) -> str:
    from edgetok.vit.export import summary

    return summary(data)


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure is one line on stderr and a non-zero exit, never a traceback."""
    try:
        cli.main(args=argv, prog_name="edgetok", standalone_mode=False)
    except EdgetokError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        click.echo(f"error: {exc.format_message()} (see --help)", err=True)
        return 2
    except click.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except Exception as exc:  # a bug: still one line, the traceback on request
        if os.environ.get("EDGETOK_DEBUG"):
            raise
        click.echo(f"error: internal error {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                   "(rerun with EDGETOK_DEBUG=1 for the traceback, and please report it)", err=True)
        return 1
    return 0


def run() -> None:
    sys.exit(main())
