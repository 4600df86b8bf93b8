"""Train edgetok's reference ViT (``edgetok_digits_vit``) on scikit-learn's digits, in about a minute on
2 CPU cores, and record its held-out accuracy as `edgetok eval` measures it.

    .venv/bin/python tools/train_digits_vit.py [--epochs 60]

Writes edgetok/assets/digits_vit/model.safetensors and TRAINING.json. The held-out split (30 %, fixed)
is never trained on; `edgetok data digits` writes it as an ImageFolder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.data import create_transform
from torchvision import transforms

from edgetok.vit import digits
from edgetok.workflows.evaluate import EvalOptions, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    images, labels = digits.digit_images()
    train_idx, held_idx = digits.split_indices(len(images))
    cfg = {k: v for k, v in digits.DATA_CONFIG.items()}
    to_tensor = create_transform(**cfg, is_training=False)
    augment = transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    x = torch.stack([to_tensor(images[i]) for i in train_idx])
    y = torch.tensor(labels[train_idx])

    model = timm.create_model(digits.NAME)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps_per_epoch = (len(x) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.1)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x))
        for b in range(steps_per_epoch):
            idx = order[b * 64 : (b + 1) * 64]
            batch = torch.stack([augment(img) for img in x[idx]])
            loss = torch.nn.functional.cross_entropy(model(batch), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    digits.ASSET.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(digits.WEIGHTS))

    with tempfile.TemporaryDirectory() as tmp:  # measure exactly as users will: PNG folder + edgetok eval
        folder = Path(tmp) / "heldout"
        digits.write_heldout_folder(folder)
        result = evaluate(EvalOptions(model=digits.NAME, data=str(folder), write_sidecar=False))
    record = {"model": digits.NAME, "epochs": args.epochs, "train_images": len(train_idx),
              "heldout_images": len(held_idx), "heldout_top1": result["top1"], "heldout_top5": result["top5"],
              "train_seconds": round(time.time() - start, 1), "torch": torch.__version__, "timm": timm.__version__}
    (digits.ASSET / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
