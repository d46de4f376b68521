import json

import pytest

from paper_lib.config import ConfigError
from paper_lib.organism import OrganismConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 0),
        ("num_attention_heads", 3),
        ("lr", -1.0),
        ("textbook_fraction", 1.5),
        ("trace_steps", (5, 2)),
        ("aime_steps", 1),
        ("math_level_steps", (1, 2, 3, 4, 5)),
        ("warmup_steps", 10_000),
    ],
)
def test_impossible_value_fails_at_construction_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        OrganismConfig(**{field: value})


def test_config_round_trips_through_config_json(tmp_path):
    cfg = OrganismConfig(seed=3, steps=123, trace_steps=(3, 7))
    path = cfg.save(tmp_path)
    assert json.loads(path.read_text())["class"] == "OrganismConfig"
    assert OrganismConfig.load(tmp_path) == cfg


def test_unknown_field_in_config_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"seed": 1, "not_a_field": 2}))
    with pytest.raises(ConfigError, match="not_a_field"):
        OrganismConfig.load(tmp_path)
