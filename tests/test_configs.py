"""Config loading, overrides and their errors; every config file loads."""

import pathlib

import ml_collections
import pytest

from fundax import configlib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

# (file, variant) pairs: every config file with each of its variants.
ALL_CONFIGS = [
    ("main.py", None), ("main.py", "tiny"), ("main.py", "test"),
    ("data.py", None), ("data.py", "phantom_tiny"), ("data.py", "phantom_512"),
    ("data.py", "eyepacs"), ("data.py", "odir5k"),
    ("vae.py", None), ("vae.py", "tiny"), ("vae.py", "base"),
    ("ldm.py", None), ("ldm.py", "tiny"), ("ldm.py", "base"),
    ("sd15_fundus.py", None), ("sd15_fundus.py", "eyepacs"),
    ("selector.py", None), ("selector.py", "tiny"), ("selector.py", "eyeq"),
    ("evaluator.py", None), ("evaluator.py", "tiny"),
    ("rlhf.py", None), ("rlhf.py", "tiny"), ("rlhf.py", "tiny_long"),
    ("rlhf.py", "test"),
]


def test_every_config_file_is_listed():
  files = {p.name for p in CONFIG_DIR.glob("*.py")} - {"__init__.py"}
  assert files == {name for name, _ in ALL_CONFIGS}
  assert set(configlib.shipped_configs()) == {name[:-3] for name, _ in ALL_CONFIGS}


@pytest.mark.parametrize("name,arg", ALL_CONFIGS)
def test_configs_load_locked(name, arg):
  spec = str(CONFIG_DIR / name) + (f":{arg}" if arg else "")
  config = configlib.load_config(spec)
  assert isinstance(config, ml_collections.ConfigDict)
  with pytest.raises(AttributeError):
    config.not_a_field = 1  # locked: new fields are refused


@pytest.mark.parametrize("spec", ["main:tiny", "configs/main.py:tiny"])
def test_shipped_config_found_from_any_directory(tmp_path, monkeypatch, spec):
  monkeypatch.chdir(tmp_path)  # not the repo: the shipped configs (fundax.configs)
  assert configlib.load_config(spec).data.resolution == 64


def test_config_file_path_comes_before_a_shipped_name(tmp_path, monkeypatch):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "main.py").write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  return ml_collections.ConfigDict({'mine': arg})\n")
  monkeypatch.chdir(tmp_path)
  assert configlib.load_config("configs/main.py:x").mine == "x"
  assert "data" in configlib.load_config("main:tiny")


def test_unknown_config_lists_the_shipped_ones(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="nothere.*main"):
    configlib.load_config("nothere:tiny")


def test_overrides_apply_with_types():
  config = configlib.load_config("configs/main.py:tiny")
  configlib.apply_overrides(config, ["data.resolution=96", "data.with_masks=False",
                                     "data.data_dir=/tmp/x", "seed=3"])
  assert config.data.resolution == 96 and config.data.with_masks is False
  assert config.data.data_dir == "/tmp/x" and config.seed == 3


def test_float_field_accepts_int_literal():
  config = ml_collections.ConfigDict({"lr": 0.1})
  configlib.apply_overrides(config, ["lr=1"])
  assert config.lr == 1.0 and isinstance(config.lr, float)


@pytest.mark.parametrize("override,message", [
    ("data.resolutin=96", "no field 'data.resolutin'"),
    ("nope.x=1", "no field 'nope'"),
    ("data.resolution=big", "data.resolution=big"),
    ("data.resolution", "must look like"),
])
def test_bad_overrides_fail_clearly(override, message):
  config = configlib.load_config("configs/main.py:tiny")
  before = config.to_dict()
  with pytest.raises(configlib.ConfigError, match=message):
    configlib.apply_overrides(config, [override])
  assert config.to_dict() == before


def test_split_config_args():
  rest, overrides = configlib.split_config_args(
      ["main", "--config.a.b=1", "--workdir", "w", "--config.c", "x y"])
  assert rest == ["main", "--workdir", "w"]
  assert overrides == ["a.b=1", "c=x y"]
  with pytest.raises(configlib.ConfigError, match="needs a value"):
    configlib.split_config_args(["--config.a"])


def test_missing_config_file_named():
  with pytest.raises(FileNotFoundError, match="configs/nothere.py"):
    configlib.load_config("configs/nothere.py")


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match="variants"):
    configlib.load_config("configs/main.py:huge")


def test_phantom_captions_fit_the_text_length_of_the_configs_trained_on_them():
  """Truncation cuts a caption's tail, which is where the grade and lesions often are: the
  configs that train on phantom captions hold every style of them whole."""
  from fundax.data import captions, phantom  # pylint: disable=g-import-not-at-top
  from fundax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_lib.make_tokenizer(None)
  longest = max(len(tokenizer(text)["input_ids"]) for seed in range(60)
                for text in captions.captions(phantom.generate(seed=seed, resolution=64).labels))
  assert longest > 77  # the sampled cases include long captions (so the check means something)
  lengths = {"main.py:tiny ldm": configlib.load_config("configs/main.py:tiny").ldm.max_length,
             "ldm.py": configlib.load_config("configs/ldm.py").max_length,
             "ldm.py:base": configlib.load_config("configs/ldm.py:base").max_length,
             "selector.py:tiny": configlib.load_config("configs/selector.py:tiny").max_length,
             "selector.py": configlib.load_config("configs/selector.py").max_length}
  assert {name: n for name, n in lengths.items() if n < longest} == {}, longest
