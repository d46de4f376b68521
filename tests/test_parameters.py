"""Parameters checked before any work: unknown names, ranges, run folders, and what OVERWRITE may delete."""

import pytest

from paper_lib.config import ConfigError
from paper_lib.params import check_parameters, notebook_defaults


def namespace(section, **given):
    """A notebook's globals as papermill leaves them: its defaults, then the injected ``-p`` values, then the
    names its own code bound before the check."""
    return {**notebook_defaults(section), **given, "SECTION": section, "In": [], "Out": {}}


def test_a_misspelt_parameter_is_refused_naming_the_one_meant():
    with pytest.raises(ConfigError, match=r"no parameter REBUIL \(did you mean REBUILD\?\)"):
        check_parameters(namespace("00_build_model_organism", REBUIL=True), "00_build_model_organism")
    # the notebook's own upper-case names are not parameters, and not refused
    check_parameters(namespace("04_interpret_lora_activations", LORA="LoRA"), "04_interpret_lora_activations")


@pytest.mark.parametrize(
    "section, name, value",
    [
        ("03_ablate_adapters", "N_TRACES", 0),
        ("03_ablate_adapters", "BATCH_SIZE", 0),
        ("05_train_sae", "HELDOUT_FRACTION", 1.5),
        ("04_interpret_lora_activations", "SAMPLE_FRACTION", 2.0),
    ],
)
def test_values_out_of_range_are_refused_before_any_work(section, name, value):
    with pytest.raises(ConfigError, match=f"{name}: .* out of range"):
        check_parameters(namespace(section, **{name: value}), section)


@pytest.mark.parametrize("value", ["", ".", "/tmp/elsewhere", "../outside", "organism", "organism/model"])
def test_a_run_folder_that_is_not_one_is_refused(value):
    from paper_lib.paths import RunDirError, stage_dir

    with pytest.raises(RunDirError, match="OUTPUT_DIR"):
        stage_dir(value)


def test_overwrite_deletes_only_a_run_folder_of_its_own(tmp_path, monkeypatch):
    from paper_lib.paths import RunDirError, clear_run_dir

    monkeypatch.setenv("PAPER_DATA_DIR", str(tmp_path / "data"))
    data = tmp_path / "data"
    (data / "organism" / "model").mkdir(parents=True)
    (data / "organism" / "model" / "model.safetensors").write_text("weights")
    mine = '{"notebook": "02_evaluate_reasoning"}'
    (data / "runs" / "a").mkdir(parents=True)
    (data / "runs" / "a" / "run.json").write_text(mine)
    (data / "runs" / "a" / "samples.jsonl").write_text("x")
    (data / "runs" / "bare").mkdir()
    (data / "runs" / "bare" / "keep.txt").write_text("x")
    (data / "runs" / "outer" / "inner").mkdir(parents=True)
    (data / "runs" / "outer" / "run.json").write_text(mine)
    (data / "runs" / "outer" / "inner" / "run.json").write_text(mine)
    # notebook 01's trained models given as notebook 02's OUTPUT_DIR: another notebook's run, with weights
    (data / "runs" / "01_train" / "full" / "final").mkdir(parents=True)
    (data / "runs" / "01_train" / "run.json").write_text('{"notebook": "01_train_rank1_lora"}')
    (data / "runs" / "01_train" / "full" / "final" / "model.safetensors").write_text("weights")
    (data / "runs" / "weights").mkdir()
    (data / "runs" / "weights" / "run.json").write_text(mine)
    (data / "runs" / "weights" / "adapter_model.safetensors").write_text("weights")
    refused = (data, data / "organism", data / "runs" / "bare", data / "runs" / "outer", tmp_path)
    for folder in refused + (data / "runs" / "01_train", data / "runs" / "weights"):
        with pytest.raises(RunDirError, match="refusing to delete"):
            clear_run_dir(folder, "02_evaluate_reasoning")
    assert (data / "runs" / "01_train" / "full" / "final" / "model.safetensors").is_file()
    clear_run_dir(data / "runs" / "a", "02_evaluate_reasoning")
    assert not (data / "runs" / "a").exists()
    assert (data / "organism" / "model" / "model.safetensors").is_file() and (data / "runs" / "bare" / "keep.txt").is_file()


def test_a_traces_fingerprint_sees_every_row():
    """Row 6 edited: a hash of a column's repr (its first five rows) missed it and training was skipped."""
    from datasets import Dataset

    from paper_lib.training import TRACE_FIELDS, traces_fingerprint

    rows = {field: [f"{field} {i}" for i in range(10)] for field in TRACE_FIELDS}
    edited = {field: list(values) for field, values in rows.items()}
    edited[TRACE_FIELDS[0]][6] = "changed"
    assert traces_fingerprint(Dataset.from_dict(rows)) != traces_fingerprint(Dataset.from_dict(edited))
    assert traces_fingerprint(Dataset.from_dict(rows)) == traces_fingerprint(Dataset.from_dict(rows))


def test_run_notebooks_refuses_a_name_that_matches_no_notebook():
    from paper_lib.run_notebooks import main

    with pytest.raises(SystemExit):
        main(["--only", "2", "--out", "build/never"])


def test_a_second_writer_of_a_run_folder_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    import json
    import subprocess
    import sys

    from paper_lib.results import LOCK_FILE, start_run

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import socket

        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "then"}))
        with pytest.raises(RuntimeError, match=f"process {holder.pid}"):
            start_run("00_x", tmp_path, {})
    finally:
        holder.kill()
        holder.wait()
    start_run("00_x", tmp_path, {})  # its holder is gone: taken over
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] != holder.pid


def test_a_context_with_no_room_for_an_answer_is_refused():
    from paper_lib.params import check_context_room

    with pytest.raises(ConfigError, match="MAX_MODEL_LEN=48"):
        check_context_room(48, 32)
    check_context_room(512, 32)


def test_a_models_fingerprint_sees_its_weights_change_in_place_and_is_cached_outside_its_folder(tmp_path, monkeypatch):
    """Hashed once (cached under the data folder), hashed again when a file changes, and the model's folder
    left as it was: a copied run folder (new modification times) is not rewritten by being read."""
    import os
    import shutil

    from paper_lib.training import DIGEST_CACHE, data_relative, model_fingerprint

    monkeypatch.setenv("PAPER_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"weights one")
    first = model_fingerprint(tmp_path / "m")
    assert len(list((tmp_path / "data" / DIGEST_CACHE).glob("*.json"))) == 1
    os.utime(tmp_path / "m" / "model.safetensors", ns=(5, 5))  # the cache is keyed by the files' stamps ...
    shutil.copytree(tmp_path / "m", tmp_path / "copy")  # ... and a copy gets new ones
    assert model_fingerprint(tmp_path / "copy") == first and model_fingerprint(tmp_path / "m") == first
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors"]  # nothing written beside
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["model.safetensors"]
    (tmp_path / "m" / "model.safetensors").write_bytes(b"weights two")  # a REBUILD into the same folder
    os.utime(tmp_path / "m" / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(tmp_path / "m") != first
    assert model_fingerprint("no-such/model-id") == "id:no-such/model-id"
    from paper_lib.paths import data_dir

    assert data_relative(data_dir() / "runs" / "x" / "final") == "data:runs/x/final"


def test_a_full_disk_and_a_file_for_the_figures_folder_say_where_and_what_to_do(tmp_path, monkeypatch):
    import errno

    from paper_lib.evaluation import GenerationSpec, Item, evaluate
    from paper_lib.organism import build_tokenizer
    from paper_lib.results import start_run

    (tmp_path / "run" / "figures").parent.mkdir()
    (tmp_path / "run" / "figures").write_text("not a folder")
    monkeypatch.delenv("PAPER_FIGURES_DIR")
    with pytest.raises(NotADirectoryError, match="is a file, where figures"):
        start_run("00_x", tmp_path / "run", {})

    class Engine:
        tokenizer = build_tokenizer()

        def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
            return [("s", 1) if stop_at_im_start else (" 4<|im_end|>", 2) for _ in prompts]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("paper_lib.evaluation.grade", full)
    with pytest.raises(OSError, match=r"no space left while writing under .*base.*rerun: the run resumes"):
        evaluate(
            Engine(),
            [Item("1", "1 +1", "2", "math")],
            GenerationSpec(max_tokens=64, answer_tokens=8),
            tmp_path / "base" / "a.jsonl",
        )


def test_spliced_and_steered_samples_name_the_sae_and_an_sae_is_refused_on_another_adapter():
    """Notebook 05 retrained with K 8 reported the K 4 SAE's spliced samples (their meta named only the engine
    and the variant), and spliced an SAE into another adapter without a word."""
    from paper_lib.engines import ScalarEngine
    from paper_lib.sae import check_sae_adapter

    a = ScalarEngine(None, None, {}, provenance={"sae": "k4", "adapter_weights": "w"}).identity("sae_spliced")
    b = ScalarEngine(None, None, {}, provenance={"sae": "k8", "adapter_weights": "w"}).identity("sae_spliced")
    assert a != b and a["sae"] == "k4" and a["variant"] == "sae_spliced"
    check_sae_adapter({"adapter_weights": "w"}, {"adapter_weights": "w"})
    with pytest.raises(ConfigError, match="trained on the activations of adapter w"):
        check_sae_adapter({"adapter_weights": "w"}, {"adapter_weights": "other"})


def test_a_notebook_does_not_take_over_another_notebooks_run_folder(tmp_path):
    """Notebook 02 given notebook 01's folder as OUTPUT_DIR overwrote its run.json, after which its own
    OVERWRITE would have counted the folder as its own."""
    from paper_lib.paths import RunDirError
    from paper_lib.results import RUN_FILE, start_run

    start_run("01_train_rank1_lora", tmp_path / "run", {})
    with pytest.raises(RunDirError, match="run folder of 01_train_rank1_lora, not of 02_evaluate_reasoning"):
        start_run("02_evaluate_reasoning", tmp_path / "run", {})
    assert '"01_train_rank1_lora"' in (tmp_path / "run" / RUN_FILE).read_text()
    start_run("01_train_rank1_lora", tmp_path / "run", {})  # a rerun of the same notebook is its own
