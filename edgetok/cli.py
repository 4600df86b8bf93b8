"""The `edgetok` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import click

from edgetok import __version__
from edgetok import recipe as recipes
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
    data = recipes.load(name, _say)
    values = recipes.section(data, "export", ViTExportOptions.fields() | {"kind"}, name)
    kind = values.pop("kind", "vit")
    if kind != "vit":
        raise EdgetokError(f"recipe {name}: export.kind {kind!r} is not supported; use 'vit'")
    for key in ("keep_layers", "ats_blocks"):
        if isinstance(values.get(key), str):
            values[key] = _ints(values[key])
    click.echo(summary(export_vit(ViTExportOptions(**values), _say)))


@export.command("vit")
@click.argument("model")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local .pth/.safetensors weights for a timm name.")
@click.option("--method", type=click.Choice(["none", "tome", "evit", "ats", "dtome", "pitome", "gtp", "zerotprune"]),
              default="none", show_default=True)
@click.option("--r", "r", type=int, help="ToMe/PiToMe: tokens merged in every block; zerotprune: tokens pruned; "
              "dtome: the mean its calibration aims at.")
@click.option("--r-schedule", help="ToMe: '(r, inflect)' e.g. '(16, -1)' (decreasing), or a per-block list '16,16,8'.")
@click.option("--keep-rate", type=float, help="EViT: fraction of non-prefix tokens kept at each keep layer, in (0, 1]; "
              "pitome/zerotprune: kept in every block.")
@click.option("--keep-layers", help="EViT: 0-based blocks that prune, e.g. 3,6,9 (default: depth/4, depth/2, 3depth/4).")
@click.option("--ats-blocks", help="ATS: 0-based blocks that sample, e.g. 3,4,...,11 (default: the model's own, else depth/4 to the last).")
@click.option("--ats-budget", type=float, help="ATS: tokens kept at most (with the class token), or a fraction (default 1.0).")
@click.option("--calibrate", type=click.Path(), help="dtome: image folder its per-block thresholds are calibrated on.")
@click.option("--cap", type=int, help="dtome: at most this many merges per image and block.")
@click.option("--propagate", help="gtp: tokens propagated and removed per block, e.g. 8, or a list 8,8,4.")
@click.option("--alpha", type=float, help="gtp: weight of the propagated tokens (default 0.1).")
@click.option("--graph", help="gtp: spatial (8 grid neighbours, default), semantic (8 most similar) or mixed.")
@click.option("--head-variance", help="zerotprune: LOW,HIGH variance of a head's N·score to be combined "
              "(default 0.01,0.7; 0,inf keeps every head).")
@click.option("--similarity-share", type=float, help="zerotprune: share of each block's r pruned by similarity (S stage) "
              "rather than importance, in [0, 1] (default 0.5).")
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
def export_vit_cmd(model, checkpoint, method, r, r_schedule, keep_rate, keep_layers, ats_blocks, ats_budget, calibrate,
                   cap, propagate, alpha, graph, head_variance, similarity_share, img_size, batch, opset,
                   allow_unsupported_ops, plugins, attention, attention_block, attention_mass, attention_keep,
                   output) -> None:
    """Export a timm ViT name or Hugging Face ViT folder MODEL with token reduction."""
    from edgetok.vit.export import ViTExportOptions, export_vit, summary

    opts = ViTExportOptions(
        model=model, checkpoint=checkpoint, method=method, r=r, r_schedule=r_schedule, keep_rate=keep_rate,
        keep_layers=_ints(keep_layers), ats_blocks=_ints(ats_blocks),
        ats_budget=int(ats_budget) if ats_budget is not None and ats_budget > 1 and ats_budget == int(ats_budget) else ats_budget,
        calibrate=calibrate, cap=cap, propagate=propagate, alpha=alpha, graph=graph,
        head_variance=head_variance, similarity_share=similarity_share, img_size=img_size, batch=batch,
        opset=opset, output=output,
        allow_unsupported_ops=allow_unsupported_ops, plugins=plugins, attention=attention,
        attention_block=attention_block, attention_mass=attention_mass, attention_keep=attention_keep,
    )
    click.echo(summary(export_vit(opts, _say)))


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
@click.option("--dla-core", type=int, help="Jetson: build for this DLA core (GPU fallback on).")
@click.option("--recipe", help="Build the ONNX of a recipe's export section with its build: section.")
@click.option("--allow-recipe-plugins", is_flag=True,
              help="Let the recipe's build.plugins load native libraries (otherwise only --plugins does).")
@click.option("--k", type=int, default=4, show_default=True,
              help="PAIR: draft tokens per round; the target's profile favours k + 1 tokens per call.")
@click.option("--tokens", type=int, default=16, show_default=True,
              help="PAIR: lookahead tree size; the tree variant's profile favours it.")
def build_engine_cmd(model, output, backend, precision, batch, shapes, workspace, opt_level, targets, timing_cache,
                     plugins, dla_core, recipe, allow_recipe_plugins, k, tokens) -> None:
    """Build a TensorRT or TensorRT-RTX engine from MODEL (.onnx) in a child process, or every decoder of a
    speculative-decoding pair folder (KV-cache shape profiles from its manifest)."""
    from edgetok.engine.build import build_engine, progress, summary
    from edgetok.engine.options import BuildOptions, parse_targets
    from edgetok.llm import engines

    values = dict(output=output, backend=backend, precision=precision, batch=batch, shapes=list(shapes),
                  workspace=workspace, opt_level=opt_level, targets=parse_targets(list(targets)),
                  timing_cache=timing_cache, plugins=list(plugins), dla_core=dla_core)
    values = {k: v for k, v in values.items() if v not in (None, [])}  # what the command line set
    if recipe:
        if model:
            raise EdgetokError("give either MODEL or --recipe, not both")
        model, values = _recipe_build(recipe, values, allow_recipe_plugins)
    elif not model:
        raise EdgetokError("give the ONNX model to build (e.g. edgetok-out/model.onnx) or --recipe NAME")
    elif engines.is_pair(model):
        with progress(sys.stderr.isatty()) as say:
            built = engines.build_pair(model, BuildOptions(onnx=model, **values), k, tokens, say)
        click.echo(engines.summary(built))
        return
    with progress(sys.stderr.isatty()) as say:
        report = build_engine(BuildOptions(onnx=model, **values), say, reuse=bool(recipe))
    click.echo(summary(report))


def _recipe_build(name: str, cli_values: dict, allow_plugins: bool = False) -> tuple[str, dict]:
    """The recipe's export output (exported first if missing) and its build: section under CLI flags."""
    from edgetok.engine.options import BuildOptions, parse_targets
    from edgetok.vit.export import ViTExportOptions, default_output

    data = recipes.load(name, _say)
    exported = recipes.section(data, "export", ViTExportOptions.fields() | {"kind"}, name)
    exported.pop("kind", None)
    export_opts = ViTExportOptions(**exported)
    onnx_path = Path(export_opts.output) if export_opts.output else default_output(export_opts)
    build = recipes.section(data, "build", set(BuildOptions.__dataclass_fields__) - {"onnx"}, name) \
        if "build" in data else {}
    if build.get("plugins") and not allow_plugins:
        raise EdgetokError(
            f"recipe {name} asks to load plugin libraries {build['plugins']}; native code loads only from --plugins "
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


def _ensure_quantized(data: dict, recipe: str, source: Path, echo: bool = False) -> Path:
    """The recipe's quantize: section applied to ``source``; reused when its sidecar says it is that."""
    from edgetok.vit.quantize import RECIPE_KEYS, QuantizeOptions, default_output, quantize, stale_reason
    from edgetok.vit.quantize import summary as quantize_summary

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
@click.option("--report-json", type=click.Path(dir_okay=False), help="Also write the JSON report exactly here.")
@click.option("--pair", is_flag=True, help="MODELS is one speculative-decoding pair folder: profile generation.")
@click.option("--k", type=int, default=4, show_default=True, help="--pair: tokens the draft proposes per round.")
@click.option("--adaptive-k", is_flag=True, help="--pair: adapt k to the acceptance.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="--pair: tokens per prompt.")
@click.option("--modes", help="--pair: speculative,lookahead,prompt-lookup (default: every one the pair offers).")
@click.option("--ngram", type=int, default=4, show_default=True, help="--pair lookahead / prompt-lookup: n-gram.")
@click.option("--branches", type=int, default=4, show_default=True, help="--pair lookahead: branches per call.")
@click.option("--tokens", type=int, default=16, show_default=True, help="--pair lookahead / prompt-lookup: tokens.")
def profile_cmd(models, backend, device, ep, batch, inputs, warmup, duration, iterations, rounds, threads, cuda_graphs,
                data_transfers, recipe, host, remote_timeout, output_dir, report_json, pair, k, adaptive_k,
                max_new_tokens, modes, ngram, branches, tokens) -> None:
    """Latency statistics (trtexec-grade) for one or more models, compared side by side."""
    from edgetok.profile.profiler import ProfileOptions, profile, summary, write_reports

    if pair:
        if host:
            raise EdgetokError("--pair --host is not supported yet; run edgetok profile --pair on the Jetson itself")
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
    if recipe:
        if models:
            raise EdgetokError("give either MODELS or --recipe, not both")
        models, labels, prof = _recipe_models(recipe)
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
        from edgetok import sidecar

        sidecar.write(report_json, result)
    click.echo(summary(result))
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
        sidecar.write(report_json, report)
    click.echo(markdown(report))


def _with_progress(work, total_seconds: float):
    """A progress bar over the timed seconds (stderr, only on a terminal)."""
    if not sys.stderr.isatty():
        return work(None)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("profiling", total=max(total_seconds, 1e-6))
        return work(lambda label, seconds: bar.update(task, advance=seconds, description=f"profiling {label}"))


def _recipe_models(recipe: str) -> tuple[list[str], list[str], dict]:
    from edgetok.vit.export import ViTExportOptions

    data = recipes.load(recipe, _say)
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


@cli.command("generate")
@click.argument("pair", type=click.Path())
@click.option("--prompt", help="Prompt text (needs the pair's tokenizer).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--mode", type=click.Choice(["target", "speculative", "lookahead", "prompt-lookup"]),
              default="speculative", show_default=True,
              help="lookahead / prompt-lookup: draft-free, proposals from the prompt and output so far.")
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
def generate_cmd(pair, prompt, prompt_ids, max_new_tokens, mode, k, ngram, branches, tokens, adaptive_k, temperature,
                 seed, draft_device, target_device, backend, as_json) -> None:
    """Generate with the target alone, with speculative decoding, or draft-free (lookahead, prompt lookup): lossless."""
    import json

    from edgetok.llm.runtime import generate

    ids = None
    if prompt_ids is not None:
        try:
            ids = [int(t) for t in prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise EdgetokError(f"--prompt-ids {prompt_ids!r} must be comma-separated integers") from None
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
    from edgetok.engine.options import parse_targets
    from edgetok.vit.quantize import QuantizeOptions, quantize, summary

    click.echo(summary(quantize(QuantizeOptions(model=model, calibrate=calibrate, mode=mode, samples=samples,
                                                output=output, targets=parse_targets(list(targets))), _say)))


@cli.command("compare")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(), help="ImageFolder the methods are evaluated on.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local weights when MODEL is a timm name.")
@click.option("--methods", default=",".join(("tome", "pitome", "zerotprune", "gtp", "evit")), show_default=True,
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
    from edgetok.profile.profiler import summary
    from edgetok.vit.comparison import CompareOptions, compare

    try:
        shares = [float(f) for f in fractions.split(",")]
    except ValueError:
        raise EdgetokError(f"--fractions {fractions!r} is not a list of numbers, e.g. 0.65,0.5") from None
    result = compare(CompareOptions(model=model, data=data, checkpoint=checkpoint, methods=methods.split(","),
                                    fractions=shares, batch=batch, duration_s=duration, rounds=rounds,
                                    output_dir=output_dir), _say)
    click.echo(summary(result).split("\n\n")[0])
    click.echo("wrote " + ", ".join(result["report_files"]))


@cli.command("eval")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(), help="ImageFolder: one subfolder of images per class.")
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--reference", help="Reference model (e.g. the dense ONNX): top-1 agreement and mean KL.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local weights when MODEL is a timm name.")
@click.option("--no-sidecar", is_flag=True, help="Do not record the result in the ONNX sidecar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model, data, batch, reference, checkpoint, no_sidecar, as_json) -> None:
    """Top-1/top-5 of MODEL (.onnx, engine or timm name) on an ImageFolder, with its own preprocessing."""
    import json

    from edgetok.vit.evaluate import EvalOptions, evaluate

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
    if result.get("tokens_kept"):
        line += "; tokens kept after blocks " + ", ".join(f"{b}: mean {t['mean']:.1f} [{t['min']}-{t['max']}]"
                                                          for b, t in result["tokens_kept"].items())
    if result.get("attention_kept"):
        kept = [t["mean"] for t in result["attention_kept"].values()]
        line += f"; attention block pairs kept: mean {sum(kept) / len(kept):.1%} over {len(kept)} blocks"
    if result.get("gmacs"):
        g = result["gmacs"]
        line += f"; GMACs per image: mean {g['mean']:.4f} [{g['min']:.4f}-{g['max']:.4f}]"
    if "reference" in result:
        ref = result["reference"]
        line += f"; vs {ref['model']}: top-1 agreement {ref['top1_agreement']:.2%}, mean KL {ref['mean_kl']:.4f}"
    click.echo(line)


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
    click.echo(summary(results))
    if not all(r.passed for r in results):
        raise click.exceptions.Exit(1)


@plugins.command("build")
@click.option("--arch", "archs", default="all", show_default=True,
              help="GPU architectures, e.g. sm87,sm110: sm87 Orin, sm110 Thor, sm86/sm89/sm120 RTX, sm90 H200.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write a bundle (.cubins.zip) here.")
def plugins_build_cmd(archs, output) -> None:
    """Compile every kernel ahead of time (no GPU needed) into cubins and a manifest."""
    from edgetok.plugins import cubins

    chosen = cubins.parse_archs(archs)
    if output and not output.endswith(".cubins.zip"):
        raise EdgetokError(f"-o {output} should end in .cubins.zip (engines and ONNX files look for NAME.cubins.zip "
                           "beside them)")
    if output:
        manifest = cubins.write_bundle(Path(output), chosen, _say)
    else:
        folder = cubins.build(chosen, _say)
        manifest = cubins.restrict(json.loads((folder / cubins.MANIFEST).read_text()), chosen)
        _say(f"cubins in {folder}")
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
        click.echo(f"error: internal error {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                   "(rerun with EDGETOK_DEBUG=1 for the traceback, and please report it)", err=True)
        return 1
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def run() -> None:
    sys.exit(main())
