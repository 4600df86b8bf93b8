"""Train the shipped speculative-decoding pair: a byte-level Llama target and a much smaller draft on the
Python standard library sources (present on every machine with Python), saved as Hugging Face folders.

    .venv/bin/python tools/train_spec_pair.py --out edgetok/assets/spec_pair --threads 1 [--target-minutes 33 --draft-minutes 8]

Both models share one byte-level tokenizer (256 byte tokens + <|endoftext|> + <|pad|>), so the pair is
vocabulary-compatible by construction. Weights are saved in fp16 to keep the folders small; edgetok
loads them in fp32. Training is time-boxed, so results depend a little on the machine's speed; the
script prints the held-out loss and next-byte accuracy it reached (of the saved fp16 weights) and writes
the command, the step counts and those numbers to each folder's TRAINING.txt.

The corpus is cleaned so that a model this small learns code rather than prose: character tables,
documentation data and files that are mostly string literals are left out, docstrings and comments are
removed, trailing whitespace is stripped and exact duplicates are dropped (before, a third of the bytes
were tables and prose, and greedy decoding looped in docstring English). Training windows start at
line starts, as prompts do: from random bytes the model could not tell a function's body from a
method's, and greedy decoding of a prompt like "def read_file(path):" collapsed into a run of spaces.

The draft (two layers, so that it can copy from its context as the target does when it repeats itself)
learns from the corpus and, for half of each batch, from the target's own greedy continuations of
prompts: in greedy speculative decoding it proposes against exactly that text.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import math
import re
import shlex
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS, PAD = "<|endoftext|>", "<|pad|>"
# Not code: tests, third-party packages, the IDLE app, codec tables, pydoc's topic texts, demos.
SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "encodings", "pydoc_data", "turtledemo", "ensurepip"}
MAX_STRING_SHARE = 0.4  # files with more of their bytes in string literals are data (html.entities, ...)
SEQ, BATCH = 256, 16


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: one token per byte, GPT-2's byte-to-unicode alphabet."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, PAD])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None,
                                   clean_up_tokenization_spaces=False)


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


def clean_source(src: str) -> str | None:
    """The module without docstrings and comments, trailing whitespace stripped; None when it doesn't
    parse (before or after) or is mostly string literals (a data table)."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return None
    lines = src.splitlines()
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)) or lines[first.lineno - 1][: first.col_offset].strip():
            continue
        indent = lines[first.lineno - 1][: first.col_offset]
        edits.append((first.lineno - 1, first.end_lineno, [indent + "pass"] if len(node.body) == 1 else []))
    for start, stop, keep in sorted(edits, reverse=True):
        lines[start:stop] = keep
    text = "\n".join(lines) + "\n"
    try:
        comments = [t.start for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
    except (SyntaxError, tokenize.TokenError):
        return None
    lines = text.split("\n")
    for row, col in reversed(comments):  # a comment runs to the end of its line
        lines[row - 1] = lines[row - 1][:col].rstrip() or None  # None: a comment-only line, dropped
    text = "\n".join(line.rstrip() for line in lines if line is not None)
    text = re.sub(r"\n{4,}", "\n\n\n", text).strip("\n") + "\n"
    try:
        ast.parse(text)
        strings = sum(len(t.string) for t in tokenize.generate_tokens(io.StringIO(text).readline)
                      if t.type == tokenize.STRING)
    except (SyntaxError, tokenize.TokenError):
        return None
    return None if strings > MAX_STRING_SHARE * len(text) else text


def corpus(max_bytes: int) -> bytes:
    """The standard library's cleaned .py files (see the module docstring) in a fixed order, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data, seen = bytearray(), set()
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        text = clean_source(path.read_text(encoding="utf-8", errors="replace"))
        digest = hashlib.sha1(text.encode()).digest() if text else None
        if text is None or digest in seen:
            continue
        seen.add(digest)
        data += text.encode() + b"\n"
        if len(data) >= max_bytes:
            break
    return bytes(data[:max_bytes])


def config(size: str, vocab: int, eos: int, pad: int) -> LlamaConfig:
    dims = {"target": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2),
            "draft": dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1)}[size]
    return LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=True,
                       eos_token_id=eos, pad_token_id=pad, bos_token_id=None, **dims)


def line_starts(data: torch.Tensor, seq: int) -> torch.Tensor:
    """Offsets just after a newline: every window starts at the beginning of a line, as a prompt does,
    so the model knows the column it starts in (a window from a random byte cannot tell whether
    `def f():` at its start is a function or an indented method)."""
    return torch.nonzero(data[: len(data) - seq - 1] == ord("\n")).flatten() + 1


@torch.no_grad()
def target_samples(teacher, data: torch.Tensor, seq: int, minutes: float, seed: int, pad: int,
                   batch: int = 32) -> torch.Tensor:
    """The target's greedy continuations of prompts cut at line starts (8 to 64 bytes), seq + 1 bytes each,
    generated for `minutes`: what a draft proposes against in greedy generation, loops included
    (sequence-level distillation)."""
    gen = torch.Generator().manual_seed(seed)
    starts = line_starts(data, seq)
    out, deadline = [], time.time() + minutes * 60
    while not out or time.time() < deadline:
        n = int(torch.randint(8, 65, (1,), generator=gen))
        prompts = torch.stack([data[i : i + n] for i in starts[torch.randint(0, len(starts), (batch,), generator=gen)]])
        out.append(teacher.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=seq + 1 - n,
                                    do_sample=False, eos_token_id=None, pad_token_id=pad))
    return torch.cat(out)


@torch.no_grad()
def agreement(model, samples: torch.Tensor, prompt_len: int = 64) -> float:
    """How often the model's next-byte argmax is the target's greedy byte, on the target's continuations
    (past the longest prompt): the per-token acceptance of greedy speculative decoding."""
    logits = model(input_ids=samples[:, :-1]).logits
    return (logits.argmax(-1)[:, prompt_len - 1 :] == samples[:, prompt_len:]).float().mean().item()


def train(model, data: torch.Tensor, minutes: float, seq: int, batch: int, lr: float, seed: int, teacher=None,
          bf16: bool = False, samples: torch.Tensor | None = None) -> int:
    """Next-byte cross-entropy; with a teacher, half of the loss is KL(teacher || model) on its
    distribution (the draft learns to agree with the target, which is what acceptance measures), and
    with samples, half of each batch is the target's own greedy text."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    starts = line_starts(data, seq)
    step, start = 0, time.time()
    while (elapsed := time.time() - start) < minutes * 60:
        idx = starts[torch.randint(0, len(starts), (batch,), generator=gen)]
        chunk = torch.stack([data[i : i + seq + 1] for i in idx])
        if samples is not None:
            chunk[batch // 2 :] = samples[torch.randint(0, len(samples), (batch - batch // 2,), generator=gen)]
        # Warm up, then cosine decay to a tenth over the time box (by elapsed time, so a slower
        # stretch on a shared machine cannot leave the schedule unfinished).
        warm = min(1.0, (step + 1) / 100)
        frac = elapsed / (minutes * 60)
        for group in opt.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            if teacher is not None:
                with torch.no_grad():
                    target_logp = teacher(input_ids=chunk[:, :-1]).logits.float().log_softmax(-1)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        if teacher is not None:
            kl = torch.nn.functional.kl_div(logits.log_softmax(-1), target_logp, log_target=True, reduction="batchmean")
            loss = 0.5 * loss + 0.5 * kl / seq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"  step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    return step


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int = 256, windows: int = 64) -> tuple[float, float]:
    model.eval()
    gen = torch.Generator().manual_seed(123)
    starts = line_starts(data, seq)
    idx = starts[torch.randint(0, len(starts), (windows,), generator=gen)]
    chunk = torch.stack([data[i : i + seq + 1] for i in idx])
    logits = model(input_ids=chunk[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()).item()
    acc = (logits.argmax(-1) == chunk[:, 1:]).float().mean().item()
    return loss, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="edgetok/assets/spec_pair")
    parser.add_argument("--target-minutes", type=float, default=33.0)
    parser.add_argument("--samples-minutes", type=float, default=2.0, help="time for the target's greedy "
                        "continuations the draft also learns from")
    parser.add_argument("--draft-minutes", type=float, default=8.0)
    parser.add_argument("--corpus-mb", type=float, default=16.0, help="cap on the cleaned corpus (it is ~5.4 MB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true", help="train in fp32 (bf16 autocast is used only where "
                        "the CPU has native bf16, AVX512-BF16 or AMX)")
    parser.add_argument("--only", choices=["target", "draft"], help="Train one model; the draft then distils from "
                        "the target already in --out.")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "tools/train_spec_pair.py", *sys.argv[1:]])
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bf16 = not args.no_bf16 and torch.cpu._is_avx512_bf16_supported()

    tokenizer = byte_tokenizer()
    raw = corpus(int(args.corpus_mb * 2**20))
    data = torch.tensor(list(raw), dtype=torch.long)  # token id == byte value
    split = int(len(data) * 0.95)
    train_data, held_out = data[:split], data[split:]
    print(f"corpus: {len(raw) / 2**20:.1f} MB of cleaned standard-library Python ({split} training bytes)")
    eos, pad = tokenizer.convert_tokens_to_ids([EOS, PAD])
    # The target first: the draft is distilled from it.
    for name, minutes, lr in [("target", args.target_minutes, 3e-3), ("draft", args.draft_minutes, 3e-3)]:
        if args.only and name != args.only:
            continue
        teacher = samples = None
        if name == "draft":
            teacher = LlamaForCausalLM.from_pretrained(Path(args.out) / "target", dtype=torch.float32).eval()
            start = time.time()
            samples = target_samples(teacher, train_data, SEQ, args.samples_minutes, seed=2, pad=pad)
            held_samples = target_samples(teacher, held_out, SEQ, 0, seed=3, pad=pad)
            print(f"target: {len(samples)} greedy continuations in {(time.time() - start) / 60:.1f} min", flush=True)
        model = LlamaForCausalLM(config(name, len(tokenizer), eos, pad))
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.2f} M parameters, training {minutes} min"
              + (" (distilled from the target)" if teacher is not None else ""), flush=True)
        start = time.time()
        steps = train(model, train_data, minutes, seq=SEQ, batch=BATCH, lr=lr, seed=1, teacher=teacher, bf16=bf16,
                      samples=samples)
        model.half()  # what is saved, and evaluated (in fp32, as edgetok loads it)
        loss, acc = evaluate(model.float(), held_out)
        agree = agreement(model, held_samples) if teacher is not None else None
        print(f"{name}: {steps} steps in {(time.time() - start) / 60:.1f} min, held-out loss {loss:.3f}, "
              f"next-byte accuracy {acc:.3f}" + (f", agreement with the target's greedy bytes {agree:.3f}" if agree is not None else ""),
              flush=True)
        folder = Path(args.out) / name
        model.half().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "TRAINING.txt").write_text(
            f"Trained by `{command}`\n"
            f"for {minutes} min on {args.threads} CPU thread(s): {steps} steps of {BATCH}x{SEQ} bytes, AdamW lr {lr} "
            f"(warm-up, cosine to a tenth), {'bf16 autocast' if bf16 else 'fp32'}"
            + (f", distilled from the target (half of each batch from its {len(samples)} greedy continuations, "
               f"generated in {args.samples_minutes} min)" if teacher is not None else "") + ", on "
            f"{len(raw) / 2**20:.1f} MB of the Python {sysconfig.get_python_version()} standard library, cleaned "
            f"(see the script's docstring; last 5% held out).\n"
            f"Held-out loss {loss:.3f}, next-byte accuracy {acc:.3f} (fp16 weights, 64 windows of 256 bytes from line starts)"
            + (f"; agreement with the target's greedy bytes {agree:.3f} (its continuations of 32 held-out prompts)"
               if teacher is not None else "") + ".\n")


if __name__ == "__main__":
    main()
