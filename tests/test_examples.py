"""Each script in examples/ runs end to end with `--tiny` (tiny random models, offline), in this process."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
compat = pytest.mark.compat


@pytest.mark.parametrize(
    "script, options",
    [
        pytest.param("controlnet_flux.py", [], marks=compat("Examples", "examples/controlnet_flux.py --tiny")),
        pytest.param("lora_flux.py", ["--fuse"], marks=compat("Examples", "examples/lora_flux.py --tiny --fuse")),
        pytest.param("sd3_student.py", [], marks=compat("Examples", "examples/sd3_student.py --tiny")),
    ],
)
def test_example_runs_tiny(script, options, tmp_path, capsys):
    main = runpy.run_path(str(EXAMPLES / script))["main"]
    output = tmp_path / "image.png"
    main(["--tiny", "--output", str(output), *options])
    assert Image.open(output).size == (32, 32)
    assert f"saved {output}" in capsys.readouterr().out
