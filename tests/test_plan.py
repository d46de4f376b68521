"""The real-scale plan: its memory model reproduces the measured rows, and the README's commands fit the
hardware they name (parsed from the README itself), while changed parameters that cannot fit are refused."""

import re
import shlex

import pytest

from paper_lib.paths import REPO_ROOT
from paper_lib.plan import CALIBRATION, QWEN25, GiB, main, plan, training_bytes

README = (REPO_ROOT / "README.md").read_text()
BENCHMARKS = (REPO_ROOT / "BENCHMARKS.md").read_text()


@pytest.mark.parametrize("row", CALIBRATION, ids=lambda r: f"{r[0]}-{r[1]}-ckpt{r[3]}-liger{r[4]}-fp32{r[5]}")
def test_the_memory_model_reproduces_every_measured_row(row):
    size, tokens, lora, checkpointing, liger, fp32, measured = row
    assert f"{measured}" in BENCHMARKS, f"{measured} GiB is not a row of BENCHMARKS.md"
    predicted = training_bytes(QWEN25[size], tokens, lora, checkpointing, liger, fp32_adapters=fp32) / GiB
    assert predicted == pytest.approx(measured, rel=0.15)


def test_shapes_match_the_published_sizes():
    assert QWEN25["32B"].params == pytest.approx(32.76e9, rel=0.01) and QWEN25["7B"].params == pytest.approx(7.62e9, rel=0.01)
    assert QWEN25["32B"].kv_bytes == 256 * 1024  # 256 KiB of KV cache a token


def readme_commands():
    """(notebook, parameters, GPUs) of every `run NN_...` command in the README, $REAL expanded; the GPUs
    are what the command names (processes or tensor parallelism), each an H200."""
    real = re.search(r'REAL="([^"]+)"', README).group(1)
    found = []
    for match in re.finditer(r"`run (\d\d_\w+) ([^`]+)`", README):
        words = shlex.split(match.group(2).replace("$REAL", real).replace("<judge>", "judge").replace("...", "x"))
        pairs = {words[i + 1]: words[i + 2] for i in range(len(words) - 2) if words[i] == "-p"}
        from paper_lib.run_notebooks import parse_parameters

        given = parse_parameters(list(pairs.items()))
        gpus = max(given.get("NUM_PROCESSES", 1), given.get("TENSOR_PARALLEL", 1))
        model = given.get("MODEL") or given.get("BASE_MODEL") or "Qwen/Qwen2.5-32B-Instruct"
        found.append((match.group(1), given, gpus, model))
    return found


def test_every_real_scale_command_in_the_readme_fits_the_gpus_it_names():
    commands = readme_commands()
    assert {c[0][:2] for c in commands} >= {"01", "02", "03", "04", "05", "06"}
    for notebook, given, gpus, model in commands:
        given = {k: v for k, v in given.items() if k not in ("MODEL", "BASE_MODEL")}
        stages, refusals = plan(notebook, model, gpus, 141, given)
        assert stages and not refusals, (notebook, refusals)


def test_a_command_changed_to_what_cannot_fit_is_refused_naming_the_parameter(capsys):
    args = ["05_train_sae", "--model", "Qwen/Qwen2.5-32B-Instruct", "--gpus", "1", "--gpu-gib", "141"]
    assert main(args + ["-p", "CACHE_TOKENS", "1048576"]) == 1  # the case: two caches of 256 GiB
    assert "CACHE_TOKENS" in capsys.readouterr().err
    readme_05 = [
        x for k, v in next(g for nb, g, _, _ in readme_commands() if nb == "05_train_sae").items() for x in ("-p", k, str(v))
    ]
    assert main(args + readme_05) == 0
    assert main(args + readme_05 + ["-p", "CACHE_TOKENS", "1048576"]) == 1
    assert "set CACHE_TOKENS to 131072" in capsys.readouterr().err
    assert main(args + readme_05 + ["-p", "BATCH_TOKENS", "131072"]) == 1  # prefill chunks of 131k tokens beside the caches
    assert (
        main(
            [
                "01",
                "--model",
                "Qwen/Qwen2.5-32B-Instruct",
                "--gpu-gib",
                "80",
                "-p",
                "MAX_LENGTH",
                "20000",
                "-p",
                "USE_LIGER",
                "True",
                "-p",
                "GRADIENT_CHECKPOINTING",
                "True",
                "-p",
                "PER_DEVICE_BATCH",
                "1",
                "-p",
                "TRAIN_FULL",
                "False",
            ]
        )
        == 1
    )
    assert "MAX_LENGTH" in capsys.readouterr().err


def test_a_notebook_on_a_gpu_box_refuses_what_will_not_fit_before_any_work(monkeypatch, capsys):
    import types

    import torch

    from paper_lib.params import notebook_defaults
    from paper_lib.plan import check_plan

    assert check_plan("01_train_rank1_lora", notebook_defaults("01_train_rank1_lora")) == []  # no CUDA: nothing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * GiB))
    params = notebook_defaults("01_train_rank1_lora") | {
        "MODEL": "Qwen/Qwen2.5-32B-Instruct",
        "MAX_LENGTH": 20000,
        "PER_DEVICE_BATCH": 1,
        "GRADIENT_CHECKPOINTING": True,
        "TRAIN_FULL": False,
    }
    with pytest.raises(MemoryError, match="MAX_LENGTH"):
        check_plan("01_train_rank1_lora", params)
    assert "rank-1 LoRA step" in capsys.readouterr().out
