"""Every fixed-count method at matched GMACs (65 % and 50 % of dense), ONNX Runtime CPU, batch 1 and 8,
models interleaved: GMACs, measured speedup, speedup / FLOPs bound — on DeiT-S (random weights: speed only)
and on the reference digits model (speed, and top-1 and agreement with dense on its held-out digits).
The target: every fixed-count method >= 0.85 of its FLOPs bound at batch 8 on DeiT-S.

    .venv/bin/python bench/methods.py [--duration 2] [--rounds 3] [--skip-deit | --skip-digits]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from edgetok.profile.compare import markdown
from edgetok.profile.profiler import ProfileOptions, profile
from edgetok.workflows.comparison import METHODS, CompareOptions, _label, compare, match
from edgetok.vit.digits import NAME, write_heldout_folder
from edgetok.vit.export import ViTExportOptions, export_vit
from edgetok.vit.flops import vit_macs
from edgetok.vit.loading import load_vit
from edgetok.vit.reduction import plan

FRACTIONS = (0.65, 0.5)


def say(message: str) -> None:
    print(f"· {message}", file=sys.stderr, flush=True)


def deit_speed(tmp: Path, duration: float, rounds: int) -> None:
    vit = load_vit("deit_small_patch16_224")
    dense = vit_macs(vit, plan(vit, None).tokens) / 1e9
    models, labels = [str(tmp / "dense.onnx")], ["dense"]
    export_vit(ViTExportOptions(model="deit_small_patch16_224", output=models[0]))
    for fraction in FRACTIONS:
        for method in METHODS:
            setting, gmacs = match(vit, method, fraction * dense)
            path = str(tmp / f"{method}_{fraction}.onnx")
            say(f"exporting DeiT-S {_label(method, setting)}")
            export_vit(ViTExportOptions(model="deit_small_patch16_224", method=method, output=path, **setting))
            models.append(path)
            labels.append(f"{_label(method, setting)} ({gmacs:.2f} GMACs)")
    for batch in (8, 1):
        say(f"profiling {len(models)} DeiT-S models at batch {batch}")
        result = profile(ProfileOptions(models=models, labels=labels, batch=batch, duration_s=duration, rounds=rounds))
        print(f"\nDeiT-S (random weights), ONNX Runtime CPU, batch {batch}, {rounds} interleaved rounds, medians")
        print(markdown(result["comparison"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-deit", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_heldout_folder(tmp / "heldout")["path"]
        for batch in () if args.skip_digits else (8, 1):
            result = compare(CompareOptions(model=NAME, data=data, fractions=list(FRACTIONS), batch=batch,
                                            duration_s=args.duration, rounds=args.rounds,
                                            output_dir=str(tmp / f"digits_b{batch}")), say)
            print(f"\n{NAME}, 539 held-out digits, ONNX Runtime CPU, batch {batch}, {args.rounds} interleaved rounds")
            print(markdown(result["comparison"]))
        if not args.skip_deit:
            deit_speed(tmp, args.duration, args.rounds)


if __name__ == "__main__":
    main()
