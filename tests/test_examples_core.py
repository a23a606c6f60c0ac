from PIL import Image


def test_patch_flux_example_runs_tiny(tmp_path):
    import runpy

    namespace = runpy.run_path("examples/patch_flux.py", run_name="example")
    namespace["main"](["--tiny", "--out", str(tmp_path / "tiny.png")])
    assert Image.open(tmp_path / "tiny.png").size == (32, 32)
