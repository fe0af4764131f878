"""Typed config loading: every shipped config loads; unknown keys, wrong types and bad files fail clearly."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config, parse_override


@pytest.mark.parametrize("name", ["tiny", "small", "flash", "pro"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert len(cfg.model.layer_types) == cfg.model.num_layers
    assert cfg.train.global_batch % cfg.train.micro_batch == 0


def test_flash_and_pro_numbers_match_the_reference():
    f, p = load_config("flash").model, load_config("pro").model
    assert (f.num_layers, f.hidden_size, f.num_heads, f.n_routed_experts, f.index_topk) == (43, 4096, 64, 256, 512)
    assert (p.num_layers, p.hidden_size, p.num_heads, p.n_routed_experts, p.index_topk) == (61, 7168, 128, 384, 1024)
    assert f.layer_types.count("csa") == 21 and f.layer_types.count("hca") == 20
    assert p.layer_types.count("csa") == 30 and p.layer_types.count("hca") == 31
    assert f.routed_scaling_factor == 1.5 and p.routed_scaling_factor == 2.5


def test_overrides_apply_with_types():
    cfg = load_config(
        "tiny", ["train.steps=7", "parallel.tp=2", "model.yarn.enabled=false", "run.dir=/tmp/x", "train.lr=1e-3"]
    )
    assert cfg.train.steps == 7 and cfg.parallel.tp == 2 and cfg.model.yarn.enabled is False
    assert cfg.run.dir == "/tmp/x" and cfg.train.lr == pytest.approx(1e-3)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'stpes'.*did you mean 'steps'"):
        load_config("tiny", ["train.stpes=3"])


def test_unknown_section_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*did you mean 'train'"):
        load_config("tiny", ["trian.steps=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        load_config("tiny", ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"model\.attention_mode: 'fast' is not one of"):
        load_config("tiny", ["model.attention_mode=fast"])


def test_semantic_validation():
    with pytest.raises(ConfigError, match="layer_types has 4 entries but model.num_layers=5"):
        load_config("tiny", ["model.num_layers=5"])
    with pytest.raises(ConfigError, match="global_batch=6 not divisible by train.micro_batch=4"):
        load_config("tiny", ["train.global_batch=6"])


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"config 'tinny' not found.*did you mean 'tiny'"):
        load_config("tinny")
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(notmap))


def test_base_inheritance(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny\ntrain: {steps: 11}\n")
    cfg = load_config(str(child))
    assert cfg.train.steps == 11 and cfg.model.hidden_size == load_config("tiny").model.hidden_size


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="key must be section.key"):
        parse_override("steps=3")
