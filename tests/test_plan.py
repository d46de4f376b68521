"""The real-scale plan: its memory model reproduces the measured rows, and the README's commands fit the
hardware they name (parsed from the README itself), while changed parameters that cannot fit are refused."""

import pytest

from paper_lib import plan as plan_module
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
    return plan_module.readme_commands(README)


def test_every_real_scale_command_in_the_readme_fits_the_gpus_it_names():
    commands = readme_commands()
    assert {c[0][:2] for c in commands} >= {"01", "02", "03", "04", "05", "06"}
    for notebook, given, gpus, model in commands:
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
    assert "rank-1 LoRA training" in capsys.readouterr().out


def test_the_readme_cost_table_is_the_plan_of_its_own_commands():
    """One source: the table between the README's markers is what `make plan` prints for the README's
    commands, so a changed command, parameter or rate that is not carried into the README fails here."""
    assert plan_module.readme_block(README) == plan_module.readme_table(README)
    changed = README.replace("-p N_SAMPLES 8 ", "-p N_SAMPLES 16 ", 1)
    assert plan_module.readme_table(changed) != plan_module.readme_table(README)


def test_decode_is_planned_as_bound_by_memory_reads_and_training_by_the_measured_rate():
    from paper_lib.plan import compute_seconds, decode_seconds

    shape = QWEN25["32B"]
    # the reference row itself: 50M tokens at 2,150 tok/s on one H200
    assert compute_seconds(shape, 50e6, 3, "train") / 3600 == pytest.approx(50e6 / 2150 / 3600, rel=0.01)
    # one sequence at a time reads the 65.5 GB of weights a token: ~20 ms on an H200 at 70% of 4.8 TB/s
    seconds, batch = decode_seconds(shape, 1000, 1000, 1, 1, 141)
    assert batch == 1 and seconds / 1000 == pytest.approx(shape.params * 2 / (4.8e12 * 0.7), rel=0.05)
    # more sequences share each read of the weights; a longer context reads more cache a step
    fast, many = decode_seconds(shape, 1e6, 4000, 1000, 1, 141)
    slow, _ = decode_seconds(shape, 1e6, 16000, 1000, 1, 141)
    assert many > 1 and fast < seconds * 1000 and slow > fast


def test_a_local_judge_is_planned_on_its_own_gpus_and_the_sae_beside_the_splice():
    judge = {"JUDGE_URL": "http://127.0.0.1:8000/v1", "JUDGE_MODEL": "Qwen/Qwen2.5-72B-Instruct", "ROLE_SCORER": False}
    stages, refusals = plan("04", "Qwen/Qwen2.5-32B-Instruct", 1, 141, judge)
    served = next(s for s in stages if s.name.startswith("judge server"))
    assert not refusals and "CUDA_VISIBLE_DEVICES" in served.note and served.gpus == 0  # not the notebook's GPUs
    _, refusals = plan("04", "Qwen/Qwen2.5-32B-Instruct", 1, 80, judge, judge_gpus=1)  # a 72B judge on one 80 GB card
    assert refusals and "--judge-gpus" in refusals[0]
    stages, _ = plan("04", "Qwen/Qwen2.5-32B-Instruct", 1, 141, {**judge, "JUDGE_URL": "https://api.example.com/v1"})
    assert not [s for s in stages if s.name.startswith("judge")]  # a remote judge holds no GPU here
    stages, _ = plan("05", "Qwen/Qwen2.5-32B-Instruct", 1, 141, {})
    assert "SAE training" in [s.name for s in stages]
