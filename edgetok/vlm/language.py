"""A LLaVA's language side for ONNX: its language model and head as our KV-cache decoder taking ``inputs_embeds``
(edgetok.llm.decoder's embeds variant, so the visual rows can be spliced into the prompt), and its embedding
table as ``embedding.onnx`` (the runtime embeds every text token through it).

Why the embedding is a graph of its own: the decoder must take rows that are no token's embedding (the image's),
and keeping the table out of it lets the same decoder serve prefill, decode and tree verification unchanged.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetok.errors import EdgetokError
from edgetok.llm.decoder import CausalLM, check_decoder, check_exportable, export_decoder

EMBED_INPUT, EMBED_OUTPUT = "input_ids", "inputs_embeds"


def language_lm(model) -> CausalLM:
    """The LlavaForConditionalGeneration ``model``'s language model and head as a CausalLM of its text config's
    family (Llama, Qwen2, ...), sharing the modules (no copy of the weights), so every decoder family edgetok
    exports serves as a VLM's language model."""
    from transformers import AutoModelForCausalLM

    text = model.config.text_config
    with torch.device("meta"):  # only the wrapper: its body and head are the LLaVA's own
        causal = AutoModelForCausalLM.from_config(text)
    setattr(causal, causal.base_model_prefix, model.model.language_model)
    causal.lm_head = model.lm_head
    left = [name for name, t in [*causal.named_parameters(), *causal.named_buffers()] if t.is_meta]
    if left:
        raise EdgetokError(f"the language model {text.model_type} keeps {left[0]} outside its body and head; edgetok "
                           "cannot take it from the LLaVA model: please report this model")
    causal.config = text
    return CausalLM(causal.eval(), "language model of the LLaVA", "the LLaVA's")


class Embedding(nn.Module):
    """ids [B, S] -> the language model's input embeddings [B, S, hidden], exactly as LLaVA embeds its prompt
    (``get_input_embeddings()(input_ids)``; families that scale embeddings do it inside the decoder, on the
    embeds too)."""

    def __init__(self, lm: CausalLM):
        super().__init__()
        self.table = lm.model.get_input_embeddings()
        self.eval()

    def forward(self, input_ids):
        return self.table(input_ids)


def export_embedding(lm: CausalLM, path: Path, opset: int = 17) -> dict:
    """embedding.onnx, checked against PyTorch on ids the export never saw (a gather: equal bit for bit)."""
    from edgetok.onnx.validate import ort_session

    module = Embedding(lm)
    example = torch.randint(0, lm.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[EMBED_INPUT], output_names=[EMBED_OUTPUT],
                          dynamic_axes={EMBED_INPUT: {0: "batch", 1: "sequence"},
                                        EMBED_OUTPUT: {0: "batch", 1: "sequence"}})
    ids = torch.randint(0, lm.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(ids).numpy()
    got = ort_session(str(path)).run(None, {EMBED_INPUT: ids.numpy()})[0]
    diff = float(np.abs(want - got).max()) if want.shape == got.shape else float("inf")
    if diff != 0.0:
        raise EdgetokError(f"{path.name}: ONNX Runtime's embeddings differ from PyTorch's by {diff:.3g}; please report "
                           "this model")
    return {"backend": "onnxruntime-cpu", "max_abs_diff": diff, "passed": True}


def export_language(lm: CausalLM, folder: Path, opset: int = 17, say=lambda s: None) -> dict:
    """decoder/model.onnx and decoder/tree.onnx (embeds variants) with their checks against PyTorch: the
    manifest's ``decoder`` entry, in the fields of a spec-pair's ``target``."""
    from edgetok.llm.pair import TREE_MASK

    check_exportable(lm)
    (folder / "decoder").mkdir()
    say(f"exporting the language model as a KV-cache decoder taking inputs_embeds ({lm.layers} layers)")
    export_decoder(lm, folder / "decoder" / "model.onnx", opset, embeds=True)
    say("checking the decoder against PyTorch: prefill, decode, verify, crop-and-continue, other shapes")
    validation = check_decoder(lm, folder / "decoder" / "model.onnx", embeds=True)
    say("exporting its tree-verify variant (boolean [batch, 1, q, past + q] mask, explicit positions)")
    export_decoder(lm, folder / "decoder" / "tree.onnx", opset, tree=True, embeds=True)
    tree = check_decoder(lm, folder / "decoder" / "tree.onnx", tree=True, embeds=True)
    return {"file": "decoder/model.onnx", "source": lm.source, "weights": lm.weights, **lm.shapes(),
            "validation": validation, "inputs": "inputs_embeds",
            "tree": {"file": "decoder/tree.onnx", "attention_mask": TREE_MASK, "validation": tree}}
