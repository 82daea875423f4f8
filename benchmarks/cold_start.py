"""One photo, cold: `captioner caption one.jpg` against `python -c "import torch"`.

Each run is a fresh process, as a user's is: the two commands alternate `--runs` times so
that both see the same machine, and the medians are compared. `--before-root DIR...` adds
the same command run from other checkouts of the project (an older commit, say), with this
one's Python, to show what a change gained.

    .venv/bin/python benchmarks/cold_start.py [--runs 5] [--image examples/astronaut.jpg]
        [--before-root /tmp/before]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall_time(command, root):
    """Seconds one fresh process takes, run from `root` with that checkout's package first."""
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.perf_counter()
    subprocess.run(command, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "astronaut.jpg")
    parser.add_argument("--before-root", type=Path, nargs="*", default=[],
                        help="other checkouts of the project to time the same command from")
    args = parser.parse_args()

    image = str(args.image.resolve())
    commands = {"python -c 'import torch'": ([sys.executable, "-c", "import torch"], ROOT),
                "captioner caption one.jpg": ([sys.executable, "-m", "captioner", "caption", image], ROOT)}
    for root in args.before_root:
        commands[f"captioner caption one.jpg ({root})"] = ([sys.executable, "-m", "captioner", "caption", image],
                                                          root.resolve())
    for command, root in commands.values():  # once each, unmeasured: files into the page cache
        wall_time(command, root)
    times = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, (command, root) in commands.items():
            times[name].append(wall_time(command, root))

    torch_median = statistics.median(times["python -c 'import torch'"])
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:<45s}: median {median:.2f} s (min {min(runs):.2f}, max {max(runs):.2f}), "
              f"{median / torch_median:.2f}x import torch")


if __name__ == "__main__":
    main()
