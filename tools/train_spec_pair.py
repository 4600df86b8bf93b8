"""Train the shipped speculative-decoding pair: a byte-level Llama target and a much smaller draft on the
Python standard library sources (present on every machine with Python), saved as Hugging Face folders.

    .venv/bin/python tools/train_spec_pair.py --out edgetok/assets/spec_pair [--target-minutes 9 --draft-minutes 6]

Both models share one byte-level tokenizer (256 byte tokens + <|endoftext|> + <|pad|>), so the pair is
vocabulary-compatible by construction. Weights are saved in fp16 to keep the folders small; edgetok
loads them in fp32. Training is time-boxed, so results depend a little on the machine's speed; the
script prints the held-out loss and next-byte accuracy it reached.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS, PAD = "<|endoftext|>", "<|pad|>"


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


def corpus(max_bytes: int) -> bytes:
    """The standard library's .py files in a fixed order (tests excluded), up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "test" in rel or "tests" in rel or "site-packages" in rel or "idlelib" in rel:
            continue
        data += path.read_bytes() + b"\n"
        if len(data) >= max_bytes:
            break
    return bytes(data[:max_bytes])


def config(size: str, vocab: int, eos: int, pad: int) -> LlamaConfig:
    dims = {"target": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2),
            "draft": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1)}[size]
    return LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=True,
                       eos_token_id=eos, pad_token_id=pad, bos_token_id=None, **dims)


def train(model, data: torch.Tensor, minutes: float, seq: int, batch: int, lr: float, seed: int, teacher=None) -> int:
    """Next-byte cross-entropy; with a teacher, half of the loss is KL(teacher || model) on its
    distribution (the draft learns to agree with the target, which is what acceptance measures)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    deadline = time.time() + minutes * 60
    step, est_steps = 0, None
    start = time.time()
    while time.time() < deadline:
        idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([data[i : i + seq + 1] for i in idx])
        # Warm up, then cosine decay over the steps the time box is expected to allow.
        warm = min(1.0, (step + 1) / 50)
        frac = min(1.0, step / est_steps) if est_steps else 0.0
        for group in opt.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        if teacher is not None:
            with torch.no_grad():
                target_logp = teacher(input_ids=chunk[:, :-1]).logits.log_softmax(-1)
            kl = torch.nn.functional.kl_div(logits.log_softmax(-1), target_logp, log_target=True, reduction="batchmean")
            loss = 0.5 * loss + 0.5 * kl / seq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step == 20:
            est_steps = int(minutes * 60 / ((time.time() - start) / 20))
        if step % 100 == 0:
            print(f"  step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    return step


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int = 256, windows: int = 64) -> tuple[float, float]:
    model.eval()
    gen = torch.Generator().manual_seed(123)
    idx = torch.randint(0, len(data) - seq - 1, (windows,), generator=gen)
    chunk = torch.stack([data[i : i + seq + 1] for i in idx])
    logits = model(input_ids=chunk[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()).item()
    acc = (logits.argmax(-1) == chunk[:, 1:]).float().mean().item()
    return loss, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="edgetok/assets/spec_pair")
    parser.add_argument("--target-minutes", type=float, default=9.0)
    parser.add_argument("--draft-minutes", type=float, default=6.0)
    parser.add_argument("--corpus-mb", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["target", "draft"], help="Train one model; the draft then distils from "
                        "the target already in --out.")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    tokenizer = byte_tokenizer()
    raw = corpus(int(args.corpus_mb * 2**20))
    data = torch.tensor(list(raw), dtype=torch.long)  # token id == byte value
    split = int(len(data) * 0.95)
    train_data, held_out = data[:split], data[split:]
    print(f"corpus: {len(raw) / 2**20:.1f} MB of standard-library Python ({split} training bytes)")
    eos, pad = tokenizer.convert_tokens_to_ids([EOS, PAD])
    # The target first: the draft is distilled from it.
    for name, minutes, lr in [("target", args.target_minutes, 2e-3), ("draft", args.draft_minutes, 3e-3)]:
        if args.only and name != args.only:
            continue
        teacher = None
        if name == "draft":
            teacher = LlamaForCausalLM.from_pretrained(Path(args.out) / "target", dtype=torch.float32).eval()
        model = LlamaForCausalLM(config(name, len(tokenizer), eos, pad))
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.2f} M parameters, training {minutes} min"
              + (" (distilled from the target)" if teacher is not None else ""), flush=True)
        steps = train(model, train_data, minutes, seq=128, batch=32, lr=lr, seed=1, teacher=teacher)
        loss, acc = evaluate(model, held_out)
        print(f"{name}: {steps} steps, held-out loss {loss:.3f}, next-byte accuracy {acc:.3f}", flush=True)
        folder = Path(args.out) / name
        model.half().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "TRAINING.txt").write_text(
            f"Trained by tools/train_spec_pair.py for {minutes} min ({steps} steps of 32x128 bytes"
            f"{', distilled from the target' if teacher is not None else ''}) on "
            f"{len(raw) / 2**20:.1f} MB of the Python {sysconfig.get_python_version()} standard library.\n"
            f"Held-out loss {loss:.3f}, next-byte accuracy {acc:.3f}.\n")


if __name__ == "__main__":
    main()
