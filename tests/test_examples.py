"""Each script in examples/ runs end to end with `--tiny` (tiny random models, offline), in this process; they share
their option names, and none replaces an existing image without `--overwrite`."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(path.name for path in EXAMPLES.glob("*.py"))
# The options every example takes, with the meaning `flux-small-encoder generate` gives them.
SHARED_OPTIONS = {
    "--model", "--encoder", "--prompt", "--steps", "--guidance", "--height", "--width", "--seed", "--out",
    "--overwrite", "--offload", "--tiny",
}
# Options that make a tiny run exercise more of an example.
EXTRA_OPTIONS = {"lora_flux.py": ["--fuse"]}
compat = pytest.mark.compat


def example_main(script: str):
    return runpy.run_path(str(EXAMPLES / script), run_name="example")["main"]


def tiny_run(script: str):
    """The parameters of one `--tiny` run of `script`, marked as a compatibility claim."""
    options = EXTRA_OPTIONS.get(script, [])
    feature = " ".join([f"examples/{script}", "--tiny", *options])
    return pytest.param(script, options, marks=compat("Examples", feature), id=script)


@pytest.mark.parametrize("script, options", [tiny_run(script) for script in SCRIPTS])
def test_example_runs_tiny(script, options, tmp_path, capsys):
    out = tmp_path / "image.png"
    out.write_bytes(b"an older image")
    example_main(script)(["--tiny", "--out", str(out), "--overwrite", *options])
    assert Image.open(out).size == (32, 32)
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_refuses_to_replace_an_image(script, tmp_path, capsys):
    out = tmp_path / "image.png"
    out.write_bytes(b"an older image")
    with pytest.raises(SystemExit) as exit_info:
        example_main(script)(["--tiny", "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"{out} already exists: choose another --out, or pass --overwrite to replace it." in capsys.readouterr().err
    assert out.read_bytes() == b"an older image"


@pytest.mark.parametrize("script", SCRIPTS)
def test_examples_share_option_names(script, capsys):
    with pytest.raises(SystemExit):
        example_main(script)(["--help"])
    options = set(re.findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out))
    assert SHARED_OPTIONS <= options, f"{script} lacks {sorted(SHARED_OPTIONS - options)}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_refuses_an_out_it_cannot_write_before_building_anything(script, tmp_path, capsys, monkeypatch):
    from flux_small_encoder import tiny

    monkeypatch.setattr(tiny, "tiny_student", lambda *args, **kwargs: pytest.fail("a model was built"))
    for out, refusal in [
        (tmp_path / "absent" / "x.png", f"the folder of --out {tmp_path / 'absent' / 'x.png'} does not exist"),
        (tmp_path / "x.xyz", f"--out {tmp_path / 'x.xyz'} has the extension .xyz, which PIL writes no image format"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            example_main(script)(["--tiny", "--out", str(out)])
        assert exit_info.value.code == 2
        assert refusal in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
