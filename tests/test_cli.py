import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

import flux_small_encoder
from flux_small_encoder import hub, registry, training
from flux_small_encoder.cli import build_parser, hide_torchvision_fallback_notice, main
from flux_small_encoder.patching import find_encoder_slot
from flux_small_encoder.tiny import tiny_student


def one_line_error(capsys) -> str:
    """The one line a failed command printed on stderr (asserting it is one line, without a traceback)."""
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_list_shows_the_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "t5-base-distilled" in out and "LifuWang/DistillT5" in out and "google/t5-v1_1-xxl" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"flux-small-encoder {flux_small_encoder.__version__}\n"


def test_every_command_shows_examples_in_its_help(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert f"examples:\n  flux-small-encoder {name}" in capsys.readouterr().out, name


def test_train_help_lists_the_config_fields(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "shipped configs: tiny" in out and "  learning_rate (default: " in out


def test_demo_writes_an_image_offline(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    assert "DistilledT5EncoderModel" in capsys.readouterr().out


def test_generate_end_to_end_with_a_local_pipeline(pipeline_folder, seeded_hub, tmp_path):
    out = tmp_path / "cat.png"
    argv = ["generate", "a cat", "--model", str(pipeline_folder), "--encoder", "t5-base-distilled", "--out", str(out),
            "--steps", "2", "--height", "32", "--width", "32", "--dtype", "float32", "--device", "cpu"]
    assert main(argv) == 0
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)


@pytest.mark.parametrize("missing", ["model", "encoder"])
def test_generate_offline_names_the_missing_repo(missing, make_pipe, seeded_hub, tmp_path, capsys):
    model = tmp_path / "tiny-flux"
    make_pipe().save_pretrained(model)
    argv = {"model": ["--model", "black-forest-labs/FLUX.1-dev"], "encoder": ["--model", str(model), "--encoder",
            "someone/not-cached"]}[missing]
    assert main(["generate", "a cat", "--dtype", "float32", "--out", str(tmp_path / "cat.png"), *argv]) == 2
    repo = "black-forest-labs/FLUX.1-dev" if missing == "model" else "someone/not-cached"
    # Earlier lines are the libraries' own offline warnings (in a test session, also logging's complaint that its
    # handler still writes to an earlier test's closed capture).
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and f"hf download {repo}" in last_line


def test_generate_unknown_encoder_lists_names(tmp_path, capsys):
    assert main(["generate", "a cat", "--encoder", "t5-tiny", "--out", str(tmp_path / "cat.png")]) == 2
    assert "Registered names: t5-base-distilled" in one_line_error(capsys)


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_existing_image_is_not_overwritten_unasked(command, tmp_path, capsys):
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's own file")
    argv = [command, "--out", str(out)] if command == "demo" else [command, "a cat", "--out", str(out)]
    assert main(argv) == 2
    assert out.read_bytes() == b"the user's own file"
    assert "--overwrite" in one_line_error(capsys)


def test_demo_overwrites_when_asked(tmp_path):
    out = tmp_path / "demo.png"
    out.write_bytes(b"old")
    assert main(["demo", "--out", str(out), "--overwrite"]) == 0
    assert Image.open(out).size == (32, 32)



@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="the notice needs torchvision absent")
def test_the_command_hides_transformers_notice_about_torchvision_and_nothing_else(tmp_path):
    # A fresh process: transformers prints the notice once per process, when diffusers first imports the processors.
    code = "import sys; from flux_small_encoder.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", code, "demo", "--out", str(tmp_path / "demo.png")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "torchvision" not in run.stderr

    import logging

    hide_torchvision_fallback_notice()  # what `main` installed in that process, here
    logger = logging.getLogger("transformers.utils.import_utils")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        logger.warning("`XImageProcessor` requires torchvision (not installed); falling back to `XImageProcessorPil`")
        logger.warning("another notice")
    finally:
        logger.removeHandler(handler)
    assert [record.getMessage() for record in seen] == ["another notice"]


# --- the error boundary: one line on stderr, exit status 2 for the package's known errors, 1 for anything else -----


def _hub_http_error():
    http = pytest.importorskip("httpx2")  # huggingface_hub 2's HTTP client
    response = http.Response(403, request=http.Request("POST", "https://huggingface.co/api/repos/create"))
    return HfHubHTTPError("403 Forbidden: you have no write access to me/encoder.", response=response)


def _no_network_error():
    return pytest.importorskip("httpx2").ConnectError("[Errno -2] Name or service not known")


def _raise(error):
    def fail(*args, **kwargs):
        raise error

    return fail


def _missing_file(tmp_path, monkeypatch):
    return ["info", str(tmp_path / "absent.safetensors")], "No such file"


def _not_cached(tmp_path, monkeypatch):
    return ["download", "someone/absent"], "hf download someone/absent"


def _offline_mode(tmp_path, monkeypatch):
    tiny_student().save_pretrained(tmp_path / "student")
    return ["push", str(tmp_path / "student"), "me/encoder"], "(offline mode is on: HF_HUB_OFFLINE=1)"


def _no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "push_to_hub", _raise(_no_network_error()))
    return ["push", str(tmp_path), "me/encoder"], "ConnectError: [Errno -2]"


def _hub_refuses(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "push_to_hub", _raise(_hub_http_error()))
    return ["push", str(tmp_path), "me/encoder"], "HfHubHTTPError: 403 Forbidden"


def _bad_config_value(tmp_path, monkeypatch):
    return ["train", "--config", "tiny", "objective=kl"], "objective='kl' is not one of"


def _yaml_python_tag(tmp_path, monkeypatch):
    (tmp_path / "evil.yaml").write_text('model: !!python/object/apply:os.system ["echo pwned"]\n')
    return ["train", "--config", str(tmp_path / "evil.yaml")], (
        "evil.yaml, line 1, column 8: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'; correct the YAML there.")


def _missing_out_folder(tmp_path, monkeypatch):
    return ["demo", "--out", str(tmp_path / "absent" / "demo.png")], "does not exist"


def _malformed_prompt_file(tmp_path, monkeypatch):
    (tmp_path / "p.jsonl").write_text('"ok"\n{broken\n')
    argv = ["cache-teacher", "--config", "tiny", "--out", str(tmp_path / "cache"), f"train_data=[{tmp_path}/p.jsonl]"]
    return argv, "p.jsonl"


def _training_diverged(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "train", _raise(training.TrainingDivergedError("the loss is nan at step 3")))
    return ["train", "--config", "tiny", f"output_dir={tmp_path}"], "the loss is nan at step 3"


def _launch_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "call", lambda command: 1)
    return ["train", "--config", "tiny", "--num-processes", "2", f"output_dir={tmp_path}"], "(exit status 1)"


def _no_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return ["generate", "a cat", "--device", "cuda", "--out", str(tmp_path / "cat.png")], "--device cuda: no CUDA"


def _package_type_check(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "list_pretrained", lambda: find_encoder_slot(object))
    return ["list"], "object is not a supported pipeline"


KNOWN_ERRORS = [
    _missing_file, _not_cached, _offline_mode, _no_network, _hub_refuses, _bad_config_value, _yaml_python_tag,
    _missing_out_folder, _malformed_prompt_file, _training_diverged, _launch_failed, _no_cuda, _package_type_check,
]


@pytest.mark.parametrize("case", KNOWN_ERRORS, ids=lambda case: case.__name__.strip("_"))
def test_known_error_is_one_line_with_status_2(case, tmp_path, monkeypatch, capsys):
    argv, expected = case(tmp_path, monkeypatch)
    capsys.readouterr()  # what setting up the case printed
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert line.startswith("error: ") and expected in line


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyError("boom")], ids=["RuntimeError", "KeyError"])
def test_unexpected_error_is_one_line_with_status_1(error, monkeypatch, capsys):
    monkeypatch.setattr(registry, "list_pretrained", _raise(error))
    assert main(["list"]) == 1
    line = one_line_error(capsys)
    assert line.startswith(f"error: unexpected {type(error).__name__}: ") and "boom" in line and "--traceback" in line


def test_a_known_error_from_elsewhere_says_where_it_came_from_and_how_to_see_more(monkeypatch, capsys):
    monkeypatch.setattr(registry, "list_pretrained", _raise(ValueError("bad value")))
    assert main(["list"]) == 2
    assert one_line_error(capsys) == (
        "error: bad value (raised in tests.test_cli; run again with --traceback to see where it happened)"
    )


def test_a_refusal_the_package_raised_prints_as_written(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.safetensors")]) == 2
    assert one_line_error(capsys) == f"error: No such file: '{tmp_path / 'absent.safetensors'}'."


def test_type_error_inside_the_package_but_not_raised_by_it_is_unexpected(monkeypatch, capsys):
    from flux_small_encoder.messages import few

    monkeypatch.setattr(registry, "list_pretrained", lambda: few(5))  # a bug: `few` slices its argument
    assert main(["list"]) == 1
    assert one_line_error(capsys).startswith("error: unexpected TypeError: ")


def test_type_error_of_a_bug_is_unexpected(monkeypatch, capsys):
    monkeypatch.setattr(registry, "list_pretrained", lambda: len(5))
    assert main(["list"]) == 1
    assert one_line_error(capsys).startswith("error: unexpected TypeError: ")


@pytest.mark.parametrize("argv", [["--traceback", "list"], ["list", "--traceback"]])
def test_traceback_option_lets_the_error_through(argv, monkeypatch):
    monkeypatch.setattr(registry, "list_pretrained", _raise(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


def test_interrupt_exits_130(monkeypatch, capsys):
    monkeypatch.setattr(registry, "list_pretrained", _raise(KeyboardInterrupt()))
    assert main(["list"]) == 130
    assert one_line_error(capsys) == "interrupted"


def test_usage_errors_stay_argparse_s(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "argument --steps: 0 is not a positive whole number" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "compare"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "abc"])
def test_a_guidance_that_is_not_a_finite_number_of_at_least_0_is_a_usage_error(command, value, tmp_path, capsys):
    argv = ["generate", "a cat"] if command == "generate" else ["compare", "--tiny"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--guidance", value, "--out", str(tmp_path / "out.png")])
    assert exit_.value.code == 2
    assert "--guidance" in capsys.readouterr().err


def test_verify_cache_checks_every_shard_and_names_a_damaged_one(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--config", "tiny", "--out", str(cache), "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert main(["verify-cache", str(cache)]) == 0
    assert "every shard matches its checksums" in capsys.readouterr().out
    shard = next(cache.glob("embeddings-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one bit of the last embedding's last value, the file's size unchanged
    shard.write_bytes(bytes(data))
    assert main(["verify-cache", str(cache)]) == 2
    assert f"{shard} does not match its checksum" in one_line_error(capsys)


# --- arguments refused while parsing, before anything loads ----------------------------------------------------------


def usage_error(argv, capsys) -> str:
    """What argparse printed for `argv`, a usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_a_prompt_that_is_not_utf8_is_a_usage_error(command, tmp_path, capsys):
    """Bytes that are not UTF-8 reach Python as lone surrogates (`printf 'a\\xff'` gives 'a\\udcff'), which no
    tokenizer takes."""
    prompt = "cat\udcff"
    argv = ["generate", prompt] if command == "generate" else ["demo", "--prompt", prompt]
    err = usage_error([*argv, "--out", str(tmp_path / "out.png")], capsys)
    assert "prompt" in err and "is not valid UTF-8 text (byte 0xff at character 3)" in err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("argv", [
    ["generate", "a cat", "--height", "8208"], ["generate", "a cat", "--width", "160000"],
    ["compare", "--tiny", "--size", "8208"],
])
def test_an_image_side_above_8192_is_a_usage_error(argv, tmp_path, capsys):
    assert "use at most 8192" in usage_error([*argv, "--out", str(tmp_path / "out.png")], capsys)


def test_compare_size_is_a_multiple_of_16_as_generate_s(tmp_path, capsys):
    err = usage_error(["compare", "--tiny", "--size", "17", "--out", str(tmp_path / "report")], capsys)
    assert "argument --size: 17 is not a multiple of 16, which FLUX needs: use 16 or 32" in err


@pytest.mark.parametrize("argv, expected", [
    (["generate", "a cat", "--seed", "99999999999999999999999"], "is out of range: a seed is a whole number from 0"),
    (["generate", "a cat", "--seed", "-1"], "is out of range"),
    (["compare", "--tiny", "--seeds", "99999999999999999999999"], "is out of range"),
    (["compare", "--tiny", "--seeds", "1,,2"], "'1,,2' has an empty item"),
    (["compare", "--tiny", "--seeds", "1,1"], "'1,1' gives the seed 1 more than once"),
    (["compare", "--tiny", "--seeds", "1,x"], "'x' is not a whole number"),
])
def test_a_seed_out_of_range_empty_or_repeated_is_a_usage_error(argv, expected, tmp_path, capsys):
    assert expected in usage_error([*argv, "--out", str(tmp_path / "out")], capsys)


def test_compare_takes_seeds_in_range(tmp_path):
    from flux_small_encoder.cli.options import seed_list

    assert seed_list(" 0, 1 ,9223372036854775807") == [0, 1, 2**63 - 1]


def _allocator_error():
    return RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 100000000000000 bytes. Error code 12 (Cannot allocate memory)")


def _cuda_error():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                  "79.10 GiB of which 1.5 GiB is free. See documentation for Memory Management")


@pytest.mark.parametrize("error, size", [(_allocator_error, "90.9 TB"), (_cuda_error, "20.00 GiB")],
                         ids=["cpu", "cuda"])
def test_out_of_memory_is_one_line_with_the_size_and_the_fix(error, size, monkeypatch, capsys):
    monkeypatch.setattr(registry, "list_pretrained", _raise(error()))
    assert main(["list"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"error: out of memory (tried to allocate {size}): make the images smaller")
    assert "--vram" in line and "--offload" in line and "unexpected" not in line


@pytest.mark.parametrize("option", ["--encoders", "--prompts"])
@pytest.mark.parametrize("value", ["", ",,,"])
def test_compare_refuses_an_empty_list_given_explicitly(option, value, tmp_path, capsys):
    assert main(["compare", "--tiny", option, value, "--out", str(tmp_path / "report")]) == 2
    expected = "--encoders names no candidate" if option == "--encoders" else "error: no prompts in"
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "report").exists()


def test_compare_refuses_offload_on_cpu_as_generate_does(tmp_path, capsys):
    for argv in (["generate", "a cat", "--out", str(tmp_path / "cat.png")], ["compare", "--tiny", "--out",
                                                                             str(tmp_path / "report")]):
        assert main([*argv, "--offload", "--device", "cpu"]) == 2
        assert "--offload moves each model to an accelerator" in one_line_error(capsys)
