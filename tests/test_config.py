"""Config loading: strict keys, typed values, dotted overrides, cross-field checks, the CLI's --print-config."""
import pytest
import yaml

from clip_train.cli import main as train_main
from clip_train.config import Config, ConfigError, load_config, parse_override, to_yaml
from clip_train.registry import Registry
from project_paths import CONFIGS


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_file_then_overrides_take_precedence(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.01\ndata:\n  batch_size: 32\n")
    cfg = load_config(path, ["optim.lr=1e-3", "output_dir=runs/x"])
    assert cfg.optim.lr == pytest.approx(1e-3)          # command line beats the file
    assert cfg.data.batch_size == 32                    # the file beats the default
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # untouched default
    assert cfg.output_dir == "runs/x"


def test_unknown_key_names_it_and_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "optim:\n  learning_rate: 0.1\n"))
    message = str(err.value)
    assert "'optim.learning_rate'" in message and "lr" in message and "weight_decay" in message


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match="'optimizer'"):
        load_config(None, ["optimizer.lr=1"])


@pytest.mark.parametrize("override, fragment", [
    ("data.batch_size=abc", "expected int"),
    ("data.batch_size=1.5", "expected int"),
    ("data.resampled=maybe", "expected bool"),
    ("loss.kind=cosine", "softmax or sigmoid"),
    ("data.batch_size=1", "batch_size must be >= 2"),
    ("optim.min_lr=1", "min_lr"),
    ("optim", "key=value"),
])
def test_bad_values_are_refused_with_a_message(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_int_accepted_where_float_expected_and_scientific_notation():
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)
    cfg = load_config(None, ["optim.lr=1", "model.max_logit_scale=50"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0


def test_cross_field_resampled_needs_a_length():
    with pytest.raises(ConfigError, match="train_num_samples or train.steps"):
        load_config(None, ["data.resampled=true"])
    assert load_config(None, ["data.resampled=true", "train.steps=10"]).data.resampled


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: [unclosed\n"))


def test_to_yaml_round_trips_and_documents_every_field():
    cfg = load_config(None, ["optim.lr=0.004", "loss.kind=sigmoid"])
    text = to_yaml(cfg)
    assert all("  # " in line for line in text.splitlines() if not line.rstrip().endswith(":"))
    assert yaml.safe_load(text)["optim"]["lr"] == 0.004
    assert load_config(None, []).loss.kind == "softmax"


def test_print_config_cli(capsys):
    assert train_main(["--print-config", "optim.lr=0.5", "output_dir=somewhere"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["output_dir"] == "somewhere"


def test_cli_bad_override_is_one_line_and_exit_2(capsys):
    assert train_main(["--print-config", "optim.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clip-train: error: unknown config key 'optim.nope'") and "\n" not in err


def test_registry_refuses_duplicates_and_lists_names():
    reg = Registry("tower")
    reg.register("a")(object)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a")(object)
    with pytest.raises(KeyError, match="valid names: a"):
        reg.get("b")
    assert reg.names() == ["a"] and "a" in reg


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_recipe_passes_validation(recipe):
    """A recipe's own settings must not break a load-time rule (paths come from the command line)."""
    load_config(CONFIGS / recipe)
