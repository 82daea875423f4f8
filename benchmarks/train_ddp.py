"""One training process against torchrun's N processes with the same global batch, on a
real dataset: prints both loss curves, their largest relative difference, and time per epoch.

    .venv/bin/python benchmarks/train_ddp.py --data ../shared/data/flickr8k --epochs 2

Both runs read the same feature store (encode once with the same --backend first, or the
first run does it). On CPUs the processes use gloo; on a machine with N GPUs, --device cuda
gives one GPU per process.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(processes, args, out, batch_size):
    flags = ["train", "--data", args.data, "--out", out, "--epochs", args.epochs, "--batch-size", batch_size,
             "--device", args.device, "--backend", args.backend, "--workers", args.workers, "--seed", 0]
    if args.cache_dir:
        flags += ["--cache-dir", args.cache_dir]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "-m", "captioner"] if processes > 1 else [sys.executable, "-m", "captioner"]
    t0 = time.time()
    subprocess.run(launcher + [str(f) for f in flags], check=True, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return rows, time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cache-dir")
    args = p.parse_args()
    if args.batch_size % args.processes:
        p.error("--batch-size must be a multiple of --processes")
    with tempfile.TemporaryDirectory() as tmp:
        one, t_one = run(1, args, Path(tmp) / "one", args.batch_size)
        many, t_many = run(args.processes, args, Path(tmp) / "many", args.batch_size // args.processes)
    print(f"{'epoch':>5} | {'1 process: loss / val loss / val CIDEr':>40} | "
          f"{f'{args.processes} processes: loss / val loss / val CIDEr':>42} | s/epoch (1 / {args.processes})")
    worst = 0.0
    for a, b in zip(one, many, strict=True):
        for key in ("train_loss", "val_loss"):
            worst = max(worst, abs(b[key] - a[key]) / a[key])
        print(f"{a['epoch']:>5} | {a['train_loss']:>14.4f} {a['val_loss']:>10.4f} {a['val_CIDEr']:>13.4f} | "
              f"{b['train_loss']:>16.4f} {b['val_loss']:>10.4f} {b['val_CIDEr']:>13.4f} | "
              f"{a['epoch_time_s']:.0f} / {b['epoch_time_s']:.0f}")
    print(f"largest relative difference of the losses: {worst:.4%}")
    print(f"wall time: 1 process {t_one:.0f} s, {args.processes} processes {t_many:.0f} s "
          f"(global batch {args.batch_size}, {args.epochs} epochs, device {args.device})")


if __name__ == "__main__":
    main()
