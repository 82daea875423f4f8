"""A wheel built from the repository captions with the shipped model, without the source tree."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_the_default_weights(tmp_path, photos):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, timeout=300)
    [wheel] = wheels.glob("captioner-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    photos["cat"].save(tmp_path / "cat.jpg")
    code = ("import captioner, sys; from captioner import Captioner; "
            f"assert captioner.__file__.startswith({str(target)!r}), captioner.__file__; "
            "print(Captioner.from_pretrained(device='cpu').caption('cat.jpg')['caption'])")
    # Run from elsewhere, with the installed copy first on the path: no source tree to fall back on.
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "cat" in proc.stdout.split()
