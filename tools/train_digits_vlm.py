"""Train edgetok's reference VLM (edgetok/assets/digits_vlm): a tiny LLaVA answering questions about 2×2 grids
of scikit-learn digits, on 2 CPU cores, seeded and deterministic for a given thread count.

    .venv/bin/python tools/train_digits_vlm.py [--steps 1000] [--batch 24] [--threads 2]

The vision tower starts as the shipped digits ViT (edgetok/assets/digits_vit, converted to CLIP: see
edgetok.vlm.digits.clip_tower_state); projector and language model start at a seeded init (std
edgetok.vlm.digits.INIT). Every batch is fresh grids of the digits ViT's *training* digits, all 8 questions
about each; the loss is on the answer token and <eos> only. Each grid's image tokens go through the language
model once, their KV cache shared by its 8 questions (``loss_of``: the same loss as LLaVA's forward, a fifth
of the compute). The held-out digits (`edgetok data digits-vlm`) are never trained on. Weights are saved in
fp16 (loaded in fp32); the held-out accuracy recorded in TRAINING.json is that of the saved folder, measured as
`edgetok eval` measures it in PyTorch: greedy generation through transformers' processor and generate.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from edgetok.vlm import digits
from edgetok.vlm.evaluate import FIRST, torch_answers, read_data, score


def batch(cells, labels, pool, tok, size: int, rng: np.random.Generator):
    """``size`` fresh grids from the digit indices ``pool``, every question about each: pixel values [size, 3, 32,
    32] (the processor's normalisation, done on the array), input ids and labels [size * 8, 69] (-100 but the
    answer and <eos>), the questions of grid i in rows 8i..8i+7."""
    idx = rng.choice(pool, size=(size, 4))
    pixels = digits.grid_pixels(cells[idx]).astype(np.float32) / 255.0
    pixel_values = torch.from_numpy((pixels - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1).contiguous()
    image = [tok.convert_tokens_to_ids(digits.IMAGE)] * (digits.GRID // 4) ** 2
    ids, targets = [], []
    for row in idx:
        for name in digits.QUESTIONS:
            question = tok(name, add_special_tokens=False).input_ids
            reply = [tok.convert_tokens_to_ids(digits.answer(name, labels[row])), tok.eos_token_id]
            ids.append(image + question + reply)
            targets.append([-100] * (len(image) + len(question)) + reply)
    return pixel_values, torch.tensor(ids), torch.tensor(targets)


def loss_of(model, pixel_values, ids, targets, keep=None):
    """LLaVA's forward and loss, computed as the causal model allows: each grid's tower and its 64 visual tokens
    through the language model run once, their KV cache shared by the grid's 8 questions (a question's tokens
    see the same prefix either way), then the questions' tokens on that cache. The same loss as
    ``model(input_ids, pixel_values, labels=...)``, at a fifth of the language model's tokens."""
    config = model.config
    per_grid = len(ids) // len(pixel_values)
    features = model.model.get_image_features(pixel_values=pixel_values,
                                              vision_feature_layer=config.vision_feature_layer,
                                              vision_feature_select_strategy=config.vision_feature_select_strategy)
    prefix = torch.stack(list(features.pooler_output))  # [grids, 64, hidden]: the image tokens open every prompt
    n = prefix.shape[1]
    assert bool((ids[:, :n] == config.image_token_id).all()) and not bool((ids[:, n:] == config.image_token_id).any())
    if keep is not None:  # [grids, k] visual tokens each grid keeps, in order: the prompt gets k image tokens
        prefix = torch.stack([prefix[g, rows] for g, rows in enumerate(keep)])
    k = prefix.shape[1]
    lm = model.model.language_model
    cache = lm(inputs_embeds=prefix, use_cache=True).cache
    cache.batch_repeat_interleave(per_grid)
    rest = ids[:, n:]
    positions = torch.arange(k, k + rest.shape[1]).expand(len(ids), -1)
    hidden = lm(inputs_embeds=lm.embed_tokens(rest), cache=cache, position_ids=positions,
                use_cache=True).last_hidden_state
    logits = model.lm_head(hidden)
    # position t predicts token t + 1: the prefix's last row predicts the first question token, never a target
    labels = targets[:, n + 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=24, help="grids per step (8 questions each)")
    parser.add_argument("--lr", type=float, default=1e-3, help="projector and language model")
    parser.add_argument("--tower-lr", type=float, default=5e-4, help="vision tower (starts trained)")
    parser.add_argument("--drop-share", type=float, default=0.5, help="share of steps whose grids keep a random "
                        "subset of their visual tokens (in order), so the model reads a cell from the tokens' content, "
                        "not from how far they sit from the question: a reduced tower gives fewer tokens")
    parser.add_argument("--min-keep", type=int, default=12, help="fewest visual tokens a dropping step keeps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(digits.ASSET))
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "tools/train_digits_vlm.py", *sys.argv[1:]])
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    tok = digits.tokenizer()
    model = digits.initial_model(tok, seed=0)
    cells, labels = digits.digit_cells()
    from edgetok.vit.digits import split_indices

    train_pool, _ = split_indices(len(labels))
    tower = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    opt = torch.optim.AdamW([{"params": tower, "lr": args.tower_lr}, {"params": rest, "lr": args.lr}],
                            weight_decay=0.01)
    base = [g["lr"] for g in opt.param_groups]
    rng = np.random.default_rng(0)
    start = time.time()
    model.train()
    for step in range(args.steps):
        warm = min(1.0, (step + 1) / 100)  # warm up, then cosine to zero
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        pixel_values, ids, targets = batch(cells, labels, train_pool, tok, args.batch, rng)
        keep = None
        if args.drop_share and rng.random() < args.drop_share:  # fewer visual tokens: the answer must come from the tokens' content
            count = int(rng.integers(args.min_keep, 64))
            keep = torch.from_numpy(np.sort(np.stack([rng.permutation(64)[:count] for _ in range(args.batch)]), 1))
        loss = loss_of(model, pixel_values, ids, targets, keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    train_seconds = round(time.time() - start, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().half().save_pretrained(out)  # fp16 storage; loaded in fp32
    processor = digits.processor()
    processor.save_pretrained(out)  # tokenizer + processor_config.json: AutoProcessor loads the folder
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json: AutoImageProcessor too

    with tempfile.TemporaryDirectory() as tmp:  # measure as users will: the written split, the saved folder
        data = Path(tmp) / "heldout"
        digits.write_data(data, "heldout")
        rows = read_data(str(data))
        answers = torch_answers(out, data, rows)
    full, first = score(rows, answers), score(rows[:FIRST], answers[:FIRST])
    per_question = {q: score([r for r in rows if r["question"] == q],
                             [a for r, a in zip(rows, answers) if r["question"] == q])
                    for q in digits.QUESTIONS}
    record = {
        "command": command,
        "model": "LlavaForConditionalGeneration: CLIP tower from edgetok_digits_vit (6 layers, width 96, 64 "
                 f"patches + CLS), {model.config.text_config.num_hidden_layers}-layer Llama (hidden "
                 f"{model.config.text_config.hidden_size}), word-level tokenizer ({len(tok)} tokens)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "why": "feature layer -1: the tower has only 6 layers and all of them were trained as the digits ViT, so "
               "every layer runs and a reduction method has all 6 to act in (-2 would drop a sixth of the tower); "
               "'default' drops the CLS row as LLaVA does, so the 64 visual tokens are the patches, one per 4x4 "
               "pixels, and a method that loses a cell's tokens loses that cell's answer",
        "prompt": digits.prompt("QUESTION"), "questions": list(digits.QUESTIONS),
        "initializer_range": digits.INIT,
        "steps": args.steps, "grids_per_step": args.batch, "questions_per_step": args.batch * len(digits.QUESTIONS),
        "lr": args.lr, "tower_lr": args.tower_lr, "threads": args.threads, "drop_share": args.drop_share,
        "min_keep": args.min_keep,
        "train_seconds": train_seconds,
        "train_digits": int(len(train_pool)), "heldout_grids": len(digits.split_grids("heldout")),
        "heldout_questions": len(rows),
        "heldout_accuracy": full,
        "heldout_accuracy_by_question": per_question,
        f"heldout_accuracy_first_{FIRST}": first,
        "measured": "greedy generation in PyTorch (float32 of the saved fp16 weights), LlavaProcessor on the PNGs "
                    "of `edgetok data digits-vlm`; an answer is right when the text before <eos> equals it",
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
