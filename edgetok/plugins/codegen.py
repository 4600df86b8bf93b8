"""C++ sources generated from the plugin specs, their launch plans and a cubin bundle, for ``plugins/``.

The Python specs stay the single source of truth: what the C++ library (libedgetok_plugins.so) needs from
them is written here as data, never retyped. ``generate(out_dir, bundle_path)`` writes

- ``edgetok_generated.h``: per plugin its fields (name, type, default), inputs and outputs (rank, dtypes,
  size tensors), formats, and the output-shape rule as an expression table (traced from the spec's own
  ``output_shapes`` with symbolic dims and fields); per kernel its declared parameter types; and every
  integer constant of the plan and spec modules (block sizes, tile limits), which the C++ launch plans and
  checks use by name;
- ``edgetok_images.cpp``: per architecture of the bundle, the facts the launcher needs (target, assembler,
  the drivers cubin and PTX need; per kernel its entry, threads, shared memory, scratch sizes) and the
  cubins and NUL-terminated PTX, embedded with the assembler's ``.incbin`` from ``images/`` (a few MB of
  hex arrays would take minutes to compile);
- ``images/<arch>/<kernel>.{cubin,ptx}`` and ``generated.json`` (what was generated from what).

What is arbitrary Python (each ``_check`` and each ``plan``) is written once in C++ (plugins/<plugin>/) and
tested equal for every check case (tests/test_cpp_plugins.py): the checks' messages and the launches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgetok.plugins.spec import NAMESPACE, Dynamic, PluginError, specs

# Expression table opcodes (kept in step with plugins/common/shapes.h)
OP_INPUT, OP_CONST, OP_FIELD, OP_SUM, OP_SUB, OP_SIZE = range(6)

_DTYPES = {"float32": "kFLOAT", "float16": "kHALF", "bfloat16": "kBF16", "int32": "kINT32", "int64": "kINT64",
           "int8": "kINT8", "uint8": "kUINT8", "bool": "kBOOL"}
_FORMATS = {"linear": "kLINEAR"}
_PARAM_TYPES = {"i32": "kI32", "fp32": "kF32", "i64": "kI64"}  # pointers: kPtr


class _Sym:
    """A traced dimension: an input dim, a field, a constant, or a sum/difference of two of them."""

    def __init__(self, node: tuple):
        self.node = node

    @staticmethod
    def lift(value) -> _Sym:
        if isinstance(value, _Sym):
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise PluginError(f"a shape rule uses {value!r}: only ints, dims and fields with + and - can be generated")
        return _Sym((OP_CONST, int(value)))

    def __add__(self, other):
        return _Sym((OP_SUM, self.node, _Sym.lift(other).node))

    def __radd__(self, other):  # as the Python plugin's dims (tensorrt._Dim): the dim first
        return _Sym((OP_SUM, self.node, _Sym.lift(other).node))

    def __sub__(self, other):
        return _Sym((OP_SUB, self.node, _Sym.lift(other).node))

    def __rsub__(self, other):
        return _Sym((OP_SUB, _Sym.lift(other).node, self.node))

    def _refuse(self, *_):
        raise PluginError("a shape rule uses an operation other than + and -: extend edgetok.plugins.codegen "
                          "and plugins/common/shapes.h")

    __mul__ = __rmul__ = __floordiv__ = __truediv__ = __mod__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = _refuse
    __index__ = __int__ = _refuse


def _flatten(node: tuple, fields: list[str], out: list[int]) -> None:
    """Prefix encoding: [op, operands...] with sub-expressions inline."""
    op = node[0]
    out.append(op)
    if op == OP_INPUT:
        out += [node[1], node[2]]
    elif op == OP_CONST:
        out.append(node[1])
    elif op == OP_FIELD:
        out.append(fields.index(node[1]))
    elif op in (OP_SUM, OP_SUB):
        _flatten(node[1], fields, out)
        _flatten(node[2], fields, out)
    elif op == OP_SIZE:
        out.append(node[1])
        _flatten(node[2], fields, out)
        _flatten(node[3], fields, out)


def shape_program(spec) -> list[list[list[int]]]:
    """Per output, per dim, the prefix-encoded expression of the spec's shape rule over symbolic inputs and
    fields: what plugins/common/shapes.h evaluates with TensorRT's IExprBuilder."""
    dims = [[_Sym((OP_INPUT, i, j)) for j in range(t.rank)] for i, t in enumerate(spec.inputs)]
    names = [f.name for f in spec.fields]

    class Fields(dict):
        def __missing__(self, key):
            raise PluginError(f"{spec.name}: its shape rule reads field {key!r}, which the spec does not have")

    symbolic = Fields({n: _Sym((OP_FIELD, n)) for n in names})
    program = []
    for out, shape in zip(spec.outputs, spec.output_shapes(dims, symbolic)):
        if len(shape) != out.rank and not (out.size_tensor and not shape):
            raise PluginError(f"{spec.name}: output {out.name} has rank {out.rank} but its shape rule gives {len(shape)}")
        encoded = []
        for d in shape:
            node = (OP_SIZE, d.size_output, _Sym.lift(d.opt).node, _Sym.lift(d.upper).node) if isinstance(d, Dynamic) \
                else _Sym.lift(d).node
            flat: list[int] = []
            _flatten(node, names, flat)
            encoded.append(flat)
        program.append(encoded)
    return program


def _constants(module) -> dict[str, int]:
    """The module's public integer constants (block sizes, limits): the names C++ plans and checks use."""
    return {k: int(v) for k, v in sorted(vars(module).items())
            if k.isupper() and not k.startswith("_") and isinstance(v, int) and not isinstance(v, bool)}


def _c_string(text: str) -> str:
    return json.dumps(text)  # JSON escapes are valid C escapes for the ASCII we write


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _header(all_specs: dict) -> str:
    import importlib

    from edgetok.plugins import kernels as kernels_pkg

    lines = ["// Generated by edgetok.plugins.codegen from the plugin specs: do not edit.",
             "#pragma once", "#include \"common/tables.h\"", "", "namespace edgetok", "{", "namespace gen", "{",
             f"constexpr char const* kNamespace = {_c_string(NAMESPACE)};", ""]
    kernel_index = 0
    for name, spec in all_specs.items():
        plan = kernels_pkg.module(spec)
        ident = _ident(name)
        lines.append(f"// {name}: {spec.doc}")
        lines.append(f"namespace {ident}")
        lines.append("{")
        constants: dict[str, int] = {}
        for mod in (spec.output_shapes.__module__, plan.__name__):
            for k, v in _constants(importlib.import_module(mod)).items():
                if constants.setdefault(k, v) != v:
                    raise PluginError(f"{name}: constant {k} is {constants[k]} in one module and {v} in {mod}")
        lines += [f"constexpr int64_t {k} = {v};" for k, v in constants.items()]
        for i, kernel in enumerate(plan.KERNELS):
            lines.append(f"constexpr int32_t K_{kernel.name} = {i};  // index into this plugin's kernels")
            for k, v in kernel.constexprs.items():
                lines.append(f"constexpr int64_t {kernel.name}_{k} = {int(v)};")
        fields = ", ".join(f"{{{_c_string(f.name)}, {'true' if f.type is int else 'false'}, {float(f.default)!r}}}"
                           for f in spec.fields)
        lines.append(f"constexpr FieldDef kFields[] = {{{fields}}};")

        def tensors(ts):
            rows = []
            for t in ts:
                dtypes = ", ".join(f"nvinfer1::DataType::{_DTYPES[d]}" for d in t.dtypes)
                rows.append(f"{{{_c_string(t.name)}, {t.rank}, {{{dtypes}}}, {len(t.dtypes)}, "
                            f"{'true' if t.size_tensor else 'false'}}}")
            return ", ".join(rows)

        lines.append(f"constexpr TensorDef kInputs[] = {{{tensors(spec.inputs)}}};")
        lines.append(f"constexpr TensorDef kOutputs[] = {{{tensors(spec.outputs)}}};")
        formats = ", ".join(f"nvinfer1::TensorFormat::{_FORMATS[f]}" for f in spec.formats)
        lines.append(f"constexpr nvinfer1::TensorFormat kFormats[] = {{{formats}}};")
        program, offsets, flat = shape_program(spec), [], []
        for out in program:
            row = []
            for expr in out:
                row.append(len(flat))
                flat += expr
            offsets.append(row)
        lines.append(f"constexpr int64_t kShapeCode[] = {{{', '.join(map(str, flat)) or '0'}}};")
        for o, row in enumerate(offsets):
            lines.append(f"constexpr int32_t kShape{o}[] = {{{', '.join(map(str, row)) or '0'}}};")
        lines.append(f"constexpr ShapeRule kShapes[] = {{{', '.join(f'{{kShape{o}, {len(r)}}}' for o, r in enumerate(offsets))}}};")
        params = []
        for kernel in plan.KERNELS:
            types = ", ".join("ParamType::kPtr" if t.startswith("*") else f"ParamType::{_PARAM_TYPES[t]}"
                              for _, t in kernel.params)
            lines.append(f"constexpr ParamType kParams_{kernel.name}[] = {{{types}}};")
            params.append(f"{{{_c_string(kernel.name)}, kParams_{kernel.name}, {len(kernel.params)}, {kernel_index}}}")
            kernel_index += 1
        lines.append(f"constexpr KernelDef kKernels[] = {{{', '.join(params)}}};")
        lines.append(f"constexpr PluginDef kPlugin = {{{_c_string(name)}, {_c_string(spec.version)}, kFields, "
                     f"{len(spec.fields)}, kInputs, {len(spec.inputs)}, kOutputs, {len(spec.outputs)}, kFormats, "
                     f"{len(spec.formats)}, kShapeCode, kShapes, kKernels, {len(plan.KERNELS)}}};")
        lines.append(f"}} // namespace {ident}")
        lines.append("")
    lines.append(f"constexpr int32_t kKernelCount = {kernel_index};  // kernels of all plugins: the image tables' width")
    lines += ["} // namespace gen", "} // namespace edgetok", ""]
    return "\n".join(lines)


def _images(bundle, out: Path, all_specs: dict) -> tuple[str, dict]:
    """edgetok_images.cpp and the image files; the kernels in the header's global order."""
    from edgetok.plugins import kernels as kernels_pkg

    # Bundle.open has checked each kernel's parameters against its spec (declared, then the hidden scratch
    # pointers, which the C++ launcher appends)
    order = [k.name for spec in all_specs.values() for k in kernels_pkg.module(spec).KERNELS]
    archs = bundle.archs
    manifest = bundle.manifest
    asm, rows, arch_rows = [], [], []
    for a, arch in enumerate(archs):
        info = manifest["archs"][arch]
        arch_rows.append(f"{{{_c_string(arch)}, {int(arch[2:])}, {_c_string(info.get('target', ''))}, "
                         f"{_c_string(info.get('assembler', ''))}, {int(info.get('cubin_driver') or 0)}, "
                         f"{int(info.get('ptx_driver') or 0)}, {'true' if 'ptx_driver' in info else 'false'}}}")
        for k, name in enumerate(order):
            entry = bundle.kernel(name)["archs"].get(arch)
            if entry is None:
                raise PluginError(f"{bundle.path} has no {name} for {arch}; rebuild it with `edgetok plugins build`")
            folder = out / "images" / arch
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.cubin").write_bytes(bundle.cubin(name, arch))
            has_ptx = bool(entry.get("ptx"))
            if has_ptx:
                (folder / f"{name}.ptx").write_bytes(bundle.ptx(name, arch))
            sym = f"edgetok_img_{arch}_{name}"
            for kind, present in (("cubin", True), ("ptx", has_ptx)):
                if present:
                    asm.append(f'    ".global {sym}_{kind}\\n.hidden {sym}_{kind}\\n.balign 16\\n{sym}_{kind}:\\n'
                               f'.incbin \\"images/{arch}/{name}.{kind}\\"\\n"')
            rows.append(f"{{{a}, {k}, {_c_string(entry.get('entry') or name)}, {32 * int(entry.get('num_warps', 4))}, "
                        f"{int(entry.get('shared', 0))}, {int(entry.get('global_scratch_size', 0))}, "
                        f"{int(entry.get('profile_scratch_size', 0))}, {sym}_cubin, "
                        f"{(sym + '_ptx') if has_ptx else 'nullptr'}}}")
    externs = []
    for a, arch in enumerate(archs):
        for name in order:
            sym = f"edgetok_img_{arch}_{name}"
            externs.append(f"extern \"C\" unsigned char const {sym}_cubin[];")
            if bundle.kernel(name)["archs"][arch].get("ptx"):
                externs.append(f"extern \"C\" unsigned char const {sym}_ptx[];")
    text = "\n".join([
        "// Generated by edgetok.plugins.codegen from a cubin bundle: do not edit.",
        "// Build with the generated folder on the assembler's include path (-Wa,-I<dir>) for .incbin.",
        "#include \"common/tables.h\"", "",
        "__asm__(\".section .rodata\\n\"", *asm, "    \".previous\\n\");", "",
        *externs, "",
        "namespace edgetok", "{", "namespace gen", "{",
        f"extern ArchDef const kArchs[] = {{{', '.join(arch_rows) or '{}'}}};",
        f"extern int32_t const kArchCount = {len(archs)};",
        f"extern ImageDef const kImages[] = {{{', '.join(rows) or '{}'}}};",
        f"extern int32_t const kImageCount = {len(rows)};",
        f"extern char const* const kBundleSource = {_c_string(str(manifest.get('source', '')))};",
        f"extern char const* const kTriton = {_c_string(str(manifest.get('triton', '')))};",
        "} // namespace gen", "} // namespace edgetok", ""])
    return text, {"archs": archs, "kernels": order}


def generate(out_dir, bundle_path) -> dict:
    """Write the generated C++ of every plugin and the images of the cubin bundle at ``bundle_path`` into
    ``out_dir`` (created; files replaced); returns what was written ({"archs", "kernels", "source", ...}).
    Build plugins/ with ``-DEDGETOK_GENERATED_DIR=<out_dir>``."""
    from edgetok.plugins.cubins import Bundle

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.open(bundle_path)
    if not bundle.archs:
        raise PluginError(f"{bundle_path} holds no architecture; build it with `edgetok plugins build --arch ...`")
    all_specs = specs()
    (out / "edgetok_generated.h").write_text(_header(all_specs))
    images, facts = _images(bundle, out, all_specs)
    (out / "edgetok_images.cpp").write_text(images)
    facts |= {"format": 1, "plugins": list(all_specs), "source": bundle.manifest.get("source"),
              "triton": bundle.manifest.get("triton"),
              "bundle_sha256": hashlib.sha256(Path(bundle_path).read_bytes()).hexdigest()}
    (out / "generated.json").write_text(json.dumps(facts, indent=1))
    return facts
