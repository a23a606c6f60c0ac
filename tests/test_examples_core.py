import runpy
from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_patch_flux_example_runs_tiny(tmp_path):
    namespace = runpy.run_path(str(EXAMPLES / "patch_flux.py"), run_name="example")
    namespace["main"](["--tiny", "--out", str(tmp_path / "tiny.png")])
    assert Image.open(tmp_path / "tiny.png").size == (32, 32)
