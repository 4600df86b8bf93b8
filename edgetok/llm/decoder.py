"""A Hugging Face causal LM as one ONNX decoder with KV cache (prefill, decode and multi-token verify in
one graph), named as Optimum / onnxruntime-genai name them, and checked against PyTorch."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetok import hf
from edgetok.errors import EdgetokError
from edgetok.llm import alibi

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
INPUTS = ("input_ids", "attention_mask", "position_ids")
EMBEDS = "inputs_embeds"  # the first input of the embeds variant: a VLM's prompt, visual rows spliced in (edgetok.vlm)


@dataclass
class CausalLM:
    model: nn.Module
    source: str  # folder, or "folder (config only: random weights)", or "layer-skip:N of ..."
    weights: str
    _layout: tuple[int, int] | None = field(default=None, init=False, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def kv_heads(self) -> int:
        return self.cache_layout()[0]

    @property
    def head_size(self) -> int:
        return self.cache_layout()[1]

    def cache_layout(self) -> tuple[int, int]:
        """(heads, head size) of the KV cache, read from one token through the model, not guessed from config names:
        Falcon caches 1 head with multi_query, every attention head with new_decoder_architecture (its keys are
        broadcast before caching), and names neither num_key_value_heads (guessing the attention heads made the
        7B-style export fail: "Expected size 4 but got size 1")."""
        if self._layout is None:
            one = torch.zeros(1, 1, dtype=torch.long)
            with torch.no_grad():
                present = DecoderWithCache(self, reference=True)(one, torch.ones(1, 1, dtype=torch.long), one)[1:]
            layouts = {(t.shape[1], t.shape[3]) for t in present}
            if len(layouts) != 1:
                raise EdgetokError(f"{self.config.model_type} caches layers of different shapes ({sorted(layouts)}); "
                                   "one decoder graph needs one KV layout")
            self._layout = layouts.pop()
        return self._layout

    def shapes(self) -> dict:
        """genai_config-style dimensions."""
        c = self.config
        return {"num_hidden_layers": self.layers, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": self.kv_heads, "head_size": self.head_size, "hidden_size": c.hidden_size,
                "vocab_size": c.vocab_size, "model_type": c.model_type,
                # MPT names it max_seq_len: its ALiBi table has that many columns, so no longer sequence runs
                "max_position_embeddings": getattr(c, "max_position_embeddings", None) or getattr(c, "max_seq_len", None)}


def attention(config) -> str:
    """The transformers attention we export: eager (plain ops), except for Falcon with alibi=True, whose eager path
    in transformers 5.x adds the ALiBi bias twice (in the attention and again merged into the mask); its SDPA
    path adds it once, as the authors' Falcon-RW code does (softmax((QK^T + alibi)/sqrt(d) + mask))."""
    return "sdpa" if config.model_type == "falcon" and getattr(config, "alibi", False) else "eager"


def load_causal_lm(folder: str) -> CausalLM:
    """A local Hugging Face folder: with weights if present, else randomly initialised from config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own output stays one line per step
    path = Path(folder)
    if not path.is_dir():
        raise EdgetokError(f"model folder {folder} does not exist; give a local Hugging Face folder (config.json)")
    if not (path / "config.json").is_file():
        raise EdgetokError(f"{folder} has no config.json; give a Hugging Face causal-LM folder")
    try:
        config = AutoConfig.from_pretrained(path, **hf.LOCAL)
    except Exception as exc:
        raise hf.load_error(folder, "config.json", exc) from None
    has_weights = any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()
    try:
        if has_weights:
            model = AutoModelForCausalLM.from_pretrained(path, **hf.LOCAL, dtype=torch.float32,
                                                         attn_implementation=attention(config))
        else:
            torch.manual_seed(0)
            config._attn_implementation = attention(config)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as exc:
        raise hf.load_error(folder, "a causal LM transformers can load", exc) from None
    return CausalLM(model.float().eval(), str(path), str(path.resolve()) if has_weights else "random")


def layer_skip(target: CausalLM, n: int) -> CausalLM:
    """The target's first ``n`` layers with its own final norm and head: a draft with no second model."""
    if not 1 <= n < target.layers:
        raise EdgetokError(f"--draft layer-skip:{n} needs 1 <= N < {target.layers} (the target's layers)")
    model = copy.deepcopy(target.model)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = next(getattr(body, name) for name in ("layers", "h", "blocks") if hasattr(body, name))  # MPT: blocks
    del layers[n:]
    model.config.num_hidden_layers = n
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = model.config.layer_types[:n]
    return CausalLM(model.eval(), f"layer-skip:{n} of {target.source}", target.weights)


class DecoderWithCache(nn.Module):
    """Flat tensors in and out, so one ONNX graph serves every phase: (ids, mask, positions, *past)
    -> (logits, *present). Past length 0 is prefill; sequence 1 is decode; k+1 is verify.

    ALiBi families (BLOOM, MPT, Falcon with alibi=True) take their biases from the keys' positions (alibi.py), so
    position_ids place the new tokens for them as for every other family. ``reference``: the model exactly as
    transformers runs it (ALiBi from the mask), what the exports are checked against. ``embeds``: the first input
    is ``inputs_embeds`` [B, S, hidden] instead of ids (the embeds variant: its rows need not come from the
    embedding table)."""

    def __init__(self, lm: CausalLM, reference: bool = False, embeds: bool = False):
        super().__init__()
        self.model = lm.model
        self.first = EMBEDS if embeds else INPUTS[0]
        self.layers = lm.layers
        params = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.alibi = lm.config.model_type if alibi.uses_alibi(lm.config) and not reference else None
        # In eval mode from the start: torch.onnx.export puts a module back in the mode it found it in, and a new
        # nn.Module is in training mode, which would switch the model's dropout on after the first export (GPT-2
        # and OPT have 0.1 dropouts: the checks then compared ONNX Runtime with a model dropping activations).
        self.eval()

    def forward(self, input_ids, attention_mask, position_ids, *past):
        return self._decode(input_ids, attention_mask, attention_mask, position_ids, past)

    def _decode(self, input_ids, attention_mask, visible, position_ids, past):
        """``attention_mask`` as the model takes it; ``visible`` as the caller gave it (where ALiBi finds the
        cache's positions)."""
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        positions = contextlib.nullcontext()
        if self.alibi:
            keys = alibi.key_positions(self.alibi, visible, position_ids, past[0].shape[2] if past else 0)
            positions = alibi.positions_from(self.model, keys)
        with positions:
            out = self.model(**{self.first: input_ids}, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{self.cache_kw: cache})
        present = out.get("cache") or out.get("past_key_values")
        flat = []
        for layer in present.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


class DecoderWithTree(DecoderWithCache):
    """The tree-verify variant: ``attention_mask`` is boolean [B, 1, q, past + q] (True: may attend) and the
    positions are explicit, so one forward scores several branches (each token sees the cache and its ancestors)."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        additive = torch.zeros(attention_mask.shape, dtype=torch.float32).masked_fill(
            attention_mask.logical_not(), torch.finfo(torch.float32).min)
        return self._decode(input_ids, additive, attention_mask, position_ids, past)


def causal_mask(batch: int, past: int, seq: int) -> torch.Tensor:
    """The tree variant's mask for a plain chain: row i sees the past and tokens 0..i."""
    rows = torch.arange(seq)[:, None] + past
    return (torch.arange(past + seq)[None, :] <= rows).expand(batch, 1, seq, past + seq).contiguous()


def io_names(layers: int, embeds: bool = False) -> tuple[list[str], list[str]]:
    past = [name % i for i in range(layers) for name in (PAST_KEY, PAST_VALUE)]
    present = [name % i for i in range(layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
    return [EMBEDS if embeds else INPUTS[0], *INPUTS[1:], *past], ["logits", *present]


def _first(lm: CausalLM, ids: torch.Tensor, embeds: bool) -> torch.Tensor:
    """The first input for ``ids``: the ids, or (embeds variant) their rows of the model's own embedding table,
    so the checks run at the magnitudes the model sees."""
    if not embeds:
        return ids
    with torch.no_grad():
        return lm.model.get_input_embeddings()(ids).detach()


def _example(lm: CausalLM, batch: int, seq: int, past_len: int, seed: int = 0, embeds: bool = False):
    gen = torch.Generator().manual_seed(seed)
    ids = _first(lm, torch.randint(0, lm.config.vocab_size, (batch, seq), generator=gen), embeds)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = []
    for _ in range(lm.layers):
        for _ in range(2):
            past.append(torch.randn(batch, lm.kv_heads, past_len, lm.head_size, generator=gen))
    return ids, mask, pos, past


def check_exportable(lm: CausalLM) -> None:
    """Refuse, in one line naming the model type and why, the families one graph with explicit positions cannot
    serve (checked before anything is traced)."""
    kind = lm.config.model_type
    if alibi.uses_alibi(lm.config):  # positions set through alibi.py
        return
    params = inspect.signature(lm.model.forward).parameters
    if "position_ids" not in params:
        raise EdgetokError(f"{kind} cannot be exported as a KV-cache decoder: its forward takes no position_ids and "
                           f"it is none of the ALiBi families whose positions edgetok sets ({', '.join(alibi.FAMILIES)}); "
                           "verifying k tokens or a tree needs them")
    if getattr(lm.config, "alibi", False):
        raise EdgetokError(f"{kind} with alibi=True cannot be exported as a KV-cache decoder: ALiBi biases come from the "
                           "mask, not position_ids, so a tree's branches would see the wrong distances")


def export_decoder(lm: CausalLM, path: Path, opset: int = 17, tree: bool = False, embeds: bool = False) -> None:
    """TorchScript-based export, traced with batch 2, sequence 3 and a past of 4 (a past of 0 or a
    size-1 axis would be specialised away); every axis that varies is named. ``tree``: the tree-verify variant
    (DecoderWithTree); ``embeds``: ``inputs_embeds`` in place of ``input_ids``."""
    inputs, outputs = io_names(lm.layers, embeds)
    mask_axes = {0: "batch", 2: "sequence", 3: "total_sequence"} if tree else {0: "batch", 1: "total_sequence"}
    axes = {inputs[0]: {0: "batch", 1: "sequence"}, "attention_mask": mask_axes,
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for name in inputs[3:]:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total_sequence"}
    check_exportable(lm)
    ids, mask, pos, past = _example(lm, batch=2, seq=3, past_len=4, embeds=embeds)
    if tree:
        mask = causal_mask(2, 4, 3)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export((DecoderWithTree if tree else DecoderWithCache)(lm, embeds=embeds), (ids, mask, pos, *past), str(path),
                              dynamo=False, opset_version=opset, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes)
    except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EdgetokError(f"{lm.config.model_type} could not be exported as a KV-cache decoder: {reason}") from None
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        if not isinstance(dims[0], str):
            raise EdgetokError(f"export fixed the batch of {value.name} to {dims[0]}; please report this model")


def check_decoder(lm: CausalLM, path: Path, tolerance: float = 1e-4, tree: bool = False,
                  embeds: bool = False) -> dict:
    """ONNX Runtime vs PyTorch on every phase, at a batch and lengths the export never saw (the tree variant
    with the causal 4-D mask of each phase, and PyTorch given the plain mask: the variant must equal the model).
    ``embeds``: the embeds variant, fed the embedding rows of the same random ids."""
    from edgetok.onnx.validate import ort_session

    session = ort_session(str(path))
    wrapper = DecoderWithCache(lm, reference=True, embeds=embeds)
    inputs, _ = io_names(lm.layers, embeds)
    results = {}

    def both(ids, mask, pos, past):
        if tree:
            feed = dict(zip(inputs, [t.numpy() for t in (ids, causal_mask(ids.shape[0], past[0].shape[2],
                                                                          ids.shape[1]), pos, *past)]))
            with torch.no_grad():
                ref = [t.numpy() for t in wrapper(ids, mask, pos, *past)]
            return ref, session.run(None, feed)
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(ids, mask, pos, *past)]
        feed = dict(zip(inputs, [t.numpy() for t in (ids, mask, pos, *past)]))
        got = session.run(None, feed)
        return ref, got

    def record(name, ref, got):
        if any(r.shape != g.shape for r, g in zip(ref, got)):
            raise EdgetokError(f"{path.name}: {name} output shapes differ from PyTorch; the export fixed a shape")
        results[name] = max(float(np.abs(r - g).max()) for r, g in zip(ref, got))

    batch = 3
    ids, mask, pos, past = _example(lm, batch, seq=6, past_len=0, seed=1, embeds=embeds)  # prefill
    ref, got = both(ids, mask, pos, past)
    record("prefill", ref, got)
    cache = [torch.from_numpy(a) for a in got[1:]]
    length = 6
    for name, seq in [("decode", 1), ("verify_k+1", 5)]:
        ids = _first(lm, torch.randint(0, lm.config.vocab_size, (batch, seq),
                                       generator=torch.Generator().manual_seed(seq)), embeds)
        mask = torch.ones(batch, length + seq, dtype=torch.long)
        pos = torch.arange(length, length + seq).expand(batch, seq).contiguous()
        ref, got = both(ids, mask, pos, cache)
        record(name, ref, got)
        cache = [torch.from_numpy(a) for a in got[1:]]
        length += seq
    keep = length - 3  # reject the last three verified tokens, then continue from there
    cropped = [c[:, :, :keep].contiguous() for c in cache]
    ids = _first(lm, torch.randint(0, lm.config.vocab_size, (batch, 2), generator=torch.Generator().manual_seed(7)),
                 embeds)
    mask = torch.ones(batch, keep + 2, dtype=torch.long)
    pos = torch.arange(keep, keep + 2).expand(batch, 2).contiguous()
    ref, got = both(ids, mask, pos, cropped)
    record("crop_and_continue", ref, got)
    ids, mask, pos, past = _example(lm, batch=1, seq=11, past_len=9, seed=2, embeds=embeds)  # other batch, lengths
    ref, got = both(ids, mask, pos, past)
    record("other_shapes", ref, got)
    worst = max(results.values())
    if worst > tolerance:
        bad = max(results, key=results.get)
        raise EdgetokError(f"{path.name}: ONNX Runtime differs from PyTorch by {worst:.3g} in {bad} (> {tolerance}); "
                           "please report this model")
    return {"backend": "onnxruntime-cpu", "max_abs_diff": results, "tolerance": tolerance, "passed": True}
