import re
import subprocess
import sys

import pytest
from pydantic import ValidationError

from maxllm.config import ConfigError, load_config

from conftest import ROOT, TINY

BASE = ROOT / "configs" / "base.yml"


def test_base_sets_every_key_and_loads():
    cfg = load_config(BASE)
    assert cfg.model.family == "llama"
    assert cfg.mesh.fsdp == -1


def test_every_key_in_base_is_commented():
    in_rules = False
    for lineno, line in enumerate(BASE.read_text().splitlines(), 1):
        if re.match(r"^\s*rules:", line):
            in_rules = True  # the rules tables are explained by the comment above them
        elif re.match(r"^\S", line):
            in_rules = False
        leaf = re.match(r"^\s*(\w+):\s*[^\s#]", line)
        if leaf and not in_rules:
            assert "#" in line, f"base.yml:{lineno}: key {leaf.group(1)!r} has no comment"


def test_all_shipped_configs_load():
    for path in [*(ROOT / "configs").glob("*.yml"), TINY]:
        load_config(path)
    for preset in (ROOT / "configs" / "models").glob("*.yml"):
        load_config([BASE, preset])


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(TINY, ["train.steps=200", "train.lr=1e-3", "mesh.rules.params.embed=[fsdp,tensor]", "train.clip_grad_norm=null"])
    assert cfg.train.steps == 200
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.mesh.rules.params["embed"] == ["fsdp", "tensor"]
    assert cfg.train.clip_grad_norm is None


def test_base_chain_deep_merges(tmp_path):
    (tmp_path / "a.yml").write_text(f"base: {BASE}\ntrain: {{steps: 7, lr: 0.5}}\n")
    (tmp_path / "b.yml").write_text("base: a.yml\ntrain: {steps: 9}\n")
    cfg = load_config(tmp_path / "b.yml")
    assert (cfg.train.steps, cfg.train.lr, cfg.train.seed) == (9, 0.5, 0)


def test_base_loop_and_missing_file_are_errors(tmp_path):
    (tmp_path / "a.yml").write_text("base: b.yml\n")
    (tmp_path / "b.yml").write_text("base: a.yml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yml")
    (tmp_path / "c.yml").write_text("base: nowhere.yml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yml: config file not found \(named by `base:`"):
        load_config(tmp_path / "c.yml")


def test_unknown_key_names_path_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["train.stepz=3"])
    msg = str(e.value)
    assert "'train.stepz'" in msg and "did you mean 'train.steps'" in msg and "\n" not in msg


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match="'trian'.*did you mean 'train'"):
        load_config(TINY, ["trian.steps=3"])


def test_bad_type_and_bad_choice_name_key_and_allowed():
    with pytest.raises(ConfigError, match=r"'train.steps': Input should be a valid integer.*got 'many'"):
        load_config(TINY, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"'model.attention': Input should be 'xla', 'cudnn' or 'splash'"):
        load_config(TINY, ["model.attention=flash"])
    with pytest.raises(ConfigError, match=r"'mesh.rules'.*names mesh axis 'fdsp'"):
        load_config(TINY, ["mesh.rules.params.embed=fdsp"])
    with pytest.raises(ConfigError, match=r"'logging.every_steps': Input should be greater than 0"):
        load_config(TINY, ["logging.every_steps=0"])
    with pytest.raises(ConfigError, match=r"data.seq_len=4096 exceeds model.max_seq_len=256"):
        load_config(TINY, ["data.seq_len=4096"])


def test_missing_key_without_base(tmp_path):
    (tmp_path / "bare.yml").write_text("run: {name: x, output_dir: y}\n")
    with pytest.raises(ConfigError, match="'model' is missing"):
        load_config(tmp_path / "bare.yml")


def test_config_is_frozen():
    cfg = load_config(TINY)
    with pytest.raises(ValidationError):
        cfg.train.steps = 3


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "maxllm.train", "--config", str(TINY), *args],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'; did you mean 'train.steps'"),
        ("train.global_batch_size=lots", "config key 'train.global_batch_size': Input should be a valid integer"),
        ("mesh.tensor=8", "parameter layers/attn/wk: dimension 2 (kv_heads=2) does not divide mesh axis tensor=8"),
        ("mesh.tensor=3", "mesh.fsdp=-1 cannot fill 8 devices"),
    ],
)
def test_cli_errors_exit_nonzero_with_one_line(override, expected, tmp_path):
    result = _cli(override, f"run.output_dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, result.stderr
