"""Config: loading, overrides, every validation error with its message, saving."""
import glob
from pathlib import Path

import pytest
import yaml

from ambient_dist.config import ConfigError, load_config, save_config, to_dict, with_absolute_paths

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))


def _err(overrides, world_size=None, path=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, world_size=world_size)
    return str(e.value)


def test_every_shipped_config_loads():
    names = {Path(p).stem for p in SHIPPED}
    assert {"fashion-mnist-300", "cifar10-ddpmpp", "cifar10-ncsnpp", "ffhq64-ddpmpp",
            "ffhq64-ncsnpp", "imagenet64-adm"} <= names
    for p in SHIPPED:
        cfg = load_config(p, check_paths=False)
        assert cfg.name == Path(p).stem


def test_reference_settings_in_paper_configs():
    # shared spec objective.md section 7.
    for p in SHIPPED:
        if "fashion" in p or "laion" in p:  # laion-*: SD fine-tuning settings (docs/text.md)
            continue
        c = load_config(p, check_paths=False)
        assert c.optimizer.lr == 1e-4 and c.optimizer.betas == [0.9, 0.999]
        assert c.optimizer.eps == 1e-8 and c.optimizer.weight_decay == 0.01
        assert c.optimizer.lr_rampup_kimg == 10000
        assert c.train.ema_halflife_kimg == 500 and c.train.ema_rampup_ratio == 0.05
        assert c.train.batch == (512 if "imagenet" in p else 256)
    assert load_config(ROOT / "configs/imagenet64-adm.yaml", check_paths=False).data.num_classes == 1000
    assert load_config(ROOT / "configs/ffhq64-ddpmpp.yaml", check_paths=False).network.dropout == 0.05


def test_base_inheritance_and_overrides():
    c = load_config(ROOT / "configs/cifar10-ncsnpp.yaml", ["data.subset=1000", "network.channel_mult=[1,2]"],
                    check_paths=False)
    assert c.network.arch == "ncsnpp"          # from the file
    assert c.network.model_channels == 128     # inherited from its base
    assert c.data.subset == 1000               # override
    assert c.network.channel_mult == [1, 2]
    assert isinstance(c.objective.sigma_tn, float)


def test_unknown_key_names_key_and_suggests():
    msg = _err(["train.bach=3"])
    assert msg.startswith("train.bach: unknown key") and "'batch'" in msg
    assert "unknown key" in _err(["nosuchsection.x=1"])


def test_unknown_key_in_file_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("objective:\n  sigma_tm: 0.5\n")
    msg = _err([], path=f)
    assert "objective.sigma_tm: unknown key" in msg and "sigma_tn" in msg and str(f) in msg


def test_wrong_types():
    assert _err(["train.batch=abc"]) .startswith("train.batch: expected an integer")
    assert _err(["train.batch=2.5"]).startswith("train.batch: expected an integer")
    assert _err(["data.xflip=3"]).startswith("data.xflip: expected true or false")
    assert _err(["objective.sigma_tn=high"]).startswith("objective.sigma_tn: expected a number")
    assert "is not one of" in _err(["data.loader=magic"])
    assert _err(["network.channel_mult=5"]).startswith("network.channel_mult: expected a list")
    assert _err(["network.channel_mult=[1,x]"]).startswith("network.channel_mult[1]")


def test_negative_sigma_tn():
    assert _err(["objective.sigma_tn=-0.1"]).startswith("objective.sigma_tn: must be >= 0")
    assert load_config(None, ["objective.sigma_tn=0"]).objective.sigma_tn == 0.0


def test_batch_must_divide_over_ranks():
    msg = _err(["train.batch=10"], world_size=3)
    assert msg.startswith("train.batch:") and "does not divide over 3 ranks" in msg
    msg = _err(["train.batch=24", "train.batch_per_gpu=5"], world_size=2)
    assert "not a multiple of train.batch_per_gpu" in msg
    c = load_config(None, ["train.batch=24", "train.batch_per_gpu=4"], world_size=2)
    assert c.micro_batch(2) == 4 and c.accumulation_steps(2) == 3
    assert load_config(None, ["train.batch=24"], world_size=4).micro_batch(4) == 6


def test_missing_files():
    assert _err(["data.shards=/no/such/dir"]).startswith("data.shards: directory /no/such/dir does not exist")
    assert "does not exist" in _err(["distributed.deepspeed_config=/no/such.json"])
    assert "does not exist" in _err(["evaluation.dinov2_path=/no/dinov2"])
    assert _err([], path="/no/such/config.yaml").startswith("config file /no/such/config.yaml: not found")
    # --describe needs no data: path checks can be turned off explicitly.
    assert load_config(None, ["data.shards=/no/such/dir"], check_paths=False).data.shards == "/no/such/dir"


def test_other_semantic_checks():
    assert _err(["data.resolution=30"]).startswith("data.resolution:")
    assert _err(["data.resolution=8", "network.channel_mult=[1,2,2,2,2]"]).startswith("network.channel_mult:")
    assert _err(["optimizer.betas=[0.9]"]).startswith("optimizer.betas:")
    assert _err(["network.dropout=1.5"]).startswith("network.dropout:")
    assert _err(["sampling.sigma_min=100"]).startswith("sampling.sigma_min:")
    assert _err(["distributed.zero_stage=4"]).startswith("distributed.zero_stage:")
    assert _err(["objective.t_n=1000"]).startswith("objective.t_n:")


def test_bad_yaml_and_override_syntax(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train: [1, 2\n")
    assert "not valid YAML" in _err([], path=f)
    assert "expected section.key=value" in _err(["train.batch"])


def test_save_and_reload_is_identical(tmp_path):
    c = load_config(ROOT / "configs/ffhq64-ncsnpp.yaml", ["objective.sigma_tn=2"], check_paths=False)
    path = save_config(c, tmp_path / "run")
    again = load_config(path, check_paths=False)
    # identical, with the relative path options saved absolute (they name the same files)
    from ambient_dist.config import with_absolute_paths
    assert to_dict(again) == to_dict(with_absolute_paths(c)) and again.data.shards.startswith("/")
    assert again.fingerprint() == with_absolute_paths(c).fingerprint()
    assert yaml.safe_load(path.read_text())["objective"]["sigma_tn"] == 2.0
    assert load_config(path, ["objective.sigma_tn=1"], check_paths=False).fingerprint() != c.fingerprint()


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 (PyYAML) reads 1e9 as a string; the config accepts it as the number it means.
    c = load_config(None, ["train.total_kimg=1e3", "optimizer.lr=5e-6", "objective.sigma_tn=2E-1"])
    assert c.train.total_kimg == 1000.0 and c.optimizer.lr == 5e-6 and c.objective.sigma_tn == 0.2
    assert _err(["optimizer.lr=1e"]).startswith("optimizer.lr: expected a number")


def test_baseline_methods_are_validated():
    """objective.method: each impossible combination is refused naming the key to change."""
    base = ["objective.sigma_tn=0"]
    assert load_config(None, base + ["objective.method=masking"]).objective.method == "masking"
    cases = [
        (["objective.method=noise_only", "objective.sigma_tn=0"], "objective.sigma_tn: must be > 0"),
        (["objective.method=masking", "objective.sigma_tn=0.5"], "objective.sigma_tn: must be 0"),
        (base + ["objective.method=masking", "objective.mask_corruption=1.0"], "objective.mask_corruption"),
        (base + ["objective.method=masking", "objective.mask_delta=-0.1"], "objective.mask_delta"),
        (base + ["objective.method=masking", "augment.p=0.1", "network.augment_dim=8"], "augment.p"),
        (base + ["objective.method=masking", "data.loader=dali"], "data.loader"),
        (base + ["objective.method=masking", "objective.kernel=triton"], "objective.kernel"),
        (["objective.method=noise_only", "objective.form=vp"], "objective.method"),
        (["objective.method=copying"], "objective.method"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_deepspeed_zero_stage_0_with_bf16_is_refused_naming_the_key():
    # DeepSpeed raises NotImplementedError (grad_accum_dtype) deep inside its initialize for
    # this pair; validation refuses it first. tests/test_engine_deepspeed_backend.py runs the others.
    ds = ["distributed.engine=deepspeed", "train.precision=bf16"]
    message = ("distributed.zero_stage: 0 cannot be combined with train.precision=bf16: DeepSpeed "
               "keeps fp32 master weights and accumulates bf16 gradients in fp32 only under ZeRO; "
               "use distributed.zero_stage=1 (or 2, 3), or train.precision=fp32 [overrides]")
    assert _err(ds + ["distributed.zero_stage=0"]) == message
    for stage in (1, 2, 3):
        assert load_config(None, ds + [f"distributed.zero_stage={stage}"]).distributed.zero_stage == stage
    assert load_config(None, ["distributed.engine=deepspeed", "distributed.zero_stage=0"])
    # The plain engine ignores zero_stage; a user DeepSpeed JSON replaces the config we build.
    assert load_config(None, ["train.precision=bf16", "distributed.zero_stage=0"])
    user_json = ROOT / "configs" / "deepspeed" / "zero3.json"
    assert load_config(None, ds + ["distributed.zero_stage=0", f"distributed.deepspeed_config={user_json}"])


def test_task_resolves_from_the_model_path_and_is_validated(tmp_path):
    # Configs written before the field (no `task`) resolve to what they train.
    assert load_config(None, check_paths=False).task == "image"
    text = ["text.model_path=models/sd", "objective.form=latent_v", "data.xflip=false"]
    assert load_config(None, text, check_paths=False).task == "text"
    with pytest.raises(ConfigError, match="^task: 'text' fine-tunes a Stable Diffusion U-Net"):
        load_config(None, ["task=text"], check_paths=False)
    with pytest.raises(ConfigError, match="^task: 'image' trains our own networks"):
        load_config(None, ["task=image", *text], check_paths=False)
    with pytest.raises(ConfigError, match="task"):
        load_config(None, ["task=banana"], check_paths=False)
    # The resolved task is saved with the run, so config.yaml says what was trained.
    save_config(load_config(None, check_paths=False), tmp_path)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["task"] == "image"


def test_a_saved_config_names_the_same_paths_from_any_working_directory(tmp_path, monkeypatch):
    """Issue 22 case 3: a run's config.yaml held data.shards as typed (relative), so read from
    another directory it named other shards. Every path option is saved absolute, with the
    typed value beside it (a comment heading config.yaml)."""
    from ambient_dist.config import PATH_OPTIONS, typed_paths, with_absolute_paths
    work = tmp_path / "work"
    (work / "fm64").mkdir(parents=True)
    (work / "inc.pt").write_bytes(b"x")
    monkeypatch.chdir(work)
    c = load_config(None, ["data.shards=fm64", "train.run_root=runs", "evaluation.inception_path=./inc.pt",
                           "text.prompts=../abs-elsewhere.txt"], check_paths=False)
    assert typed_paths(c) == {"data.shards": "fm64", "train.run_root": "runs",
                              "evaluation.inception_path": "./inc.pt", "text.prompts": "../abs-elsewhere.txt"}
    path = save_config(c, tmp_path / "run")
    text = path.read_text()
    assert text.startswith(f"# Paths as typed, relative to {work}") and "#   data.shards: fm64\n" in text
    other = tmp_path / "other"
    (other / "fm64").mkdir(parents=True)  # other shards of the same name, elsewhere
    monkeypatch.chdir(other)
    again = load_config(path, check_paths=False)
    assert again.data.shards == str(work / "fm64") and again.train.run_root == str(work / "runs")
    assert again.evaluation.inception_path == str(work / "inc.pt")
    assert again.text.prompts == str(tmp_path / "abs-elsewhere.txt")
    assert again.text.model_path == "" and typed_paths(again) == {}  # empty stays empty
    assert with_absolute_paths(again) == again  # idempotent
    assert set(typed_paths(c)) <= set(PATH_OPTIONS)

# Values YAML would change (comments, anchors, tags, yes/no, octal, null, documents, flow
# syntax, trailing ':' or quotes): a str field keeps each literally (issue 22, case 4).
LITERAL_STRINGS = ["W/exp #2/runs", "data/exp #2/shards", "a: b", "x:", "'quoted'", '"dq"',
                   "it's", "&anchor", "*alias", "!tag x", "!!int 3", "yes", "no", "on", "off",
                   "true", "null", "~", "1e3", "010", "0x1F", "12", "---", "a\n---\nb", "...",
                   "[1, 2]", "{a: 1}", " padded ", "%TAG", "@x", "`x`", "|", ">", "#", "a #b"]


@pytest.mark.parametrize("key", ["train.run_root", "data.shards", "name", "description",
                                 "text.prompts", "evaluation.dinov2_path"])
def test_override_of_a_str_field_is_taken_literally(key, tmp_path):
    section, _, field = key.rpartition(".")
    for text in LITERAL_STRINGS:
        cfg = load_config(None, [f"{key}={text}"], check_paths=False)
        got = getattr(getattr(cfg, section) if section else cfg, field)
        assert got == text, (key, text, got)
        # config.yaml reads back the same value (PyYAML quotes what needs it; a path option
        # comes back absolute, the same text joined to the working directory).
        again = load_config(save_config(cfg, tmp_path / "run"), check_paths=False)
        assert to_dict(again) == to_dict(with_absolute_paths(cfg)), text


def test_override_values_are_parsed_strictly_by_type():
    ok = {"train.batch=64": ("train", "batch", 64), "train.seed=010": ("train", "seed", 10),
          "train.seed=-3": ("train", "seed", -3), "train.batch= 64 ": ("train", "batch", 64),
          "optimizer.lr=1e-4": ("optimizer", "lr", 1e-4), "optimizer.lr=5E-6": ("optimizer", "lr", 5e-6),
          "optimizer.lr=.5": ("optimizer", "lr", 0.5), "objective.sigma_tn=2": ("objective", "sigma_tn", 2.0),
          "sampling.S_max=inf": ("sampling", "S_max", float("inf")),
          "sampling.S_max=.inf": ("sampling", "S_max", float("inf")),
          "data.xflip=True": ("data", "xflip", True), "data.xflip=false": ("data", "xflip", False),
          "network.channel_mult=[1, 2]": ("network", "channel_mult", [1, 2]),
          "evaluation.thresholds=[0.9,.95]": ("evaluation", "thresholds", [0.9, 0.95]),
          "augment.transforms=['yflip', \"scale\", rotate90]": ("augment", "transforms",
                                                                ["yflip", "scale", "rotate90"]),
          "augment.transforms=[]": ("augment", "transforms", [])}
    for override, (section, field, want) in ok.items():
        got = getattr(getattr(load_config(None, [override], check_paths=False), section), field)
        assert got == want and type(got) is type(want), (override, got)
    refused = {
        "train.batch=64 # per rank": "train.batch: expected an integer, got '64 # per rank'",
        "train.batch=0x40": "train.batch: expected an integer", "train.batch=1e3": "train.batch: expected an integer",
        "train.batch=64abc": "train.batch: expected an integer", "train.batch=6_4": "train.batch: expected an integer",
        "train.batch=~": "train.batch: expected an integer", "train.batch=": "train.batch: expected an integer",
        "train.batch=64\n---\n32": "train.batch: expected an integer",
        "train.batch=&a 64": "train.batch: expected an integer",
        "train.batch=!!int 64": "train.batch: expected an integer",
        "optimizer.lr=1e-4 # small": "optimizer.lr: expected a number",
        "optimizer.lr=nan": "optimizer.lr: expected a number", "optimizer.lr=.nan": "optimizer.lr: expected a number",
        "optimizer.lr=1e-4:": "optimizer.lr: expected a number", "optimizer.lr='1e-4'": "optimizer.lr: expected a number",
        "data.xflip=yes": "data.xflip: expected true or false", "data.xflip=on": "data.xflip: expected true or false",
        "data.xflip=1": "data.xflip: expected true or false",
        "data.xflip=true # flip": "data.xflip: expected true or false",
        "network.channel_mult=[1,2] # two": "network.channel_mult: expected a list of int",
        "network.channel_mult=[1,2": "network.channel_mult: expected a list of int",
        "network.channel_mult=1,2": "network.channel_mult: expected a list of int",
        "network.channel_mult=[1,,2]": "network.channel_mult[1]: empty item",
        "network.channel_mult=[1,2 #,3]": "network.channel_mult[1]: expected an integer",
        "data.loader=webdataset # 8 workers": "data.loader: 'webdataset # 8 workers' is not one of",
        "data=x": "data: is a section, not a value",
    }
    for override, message in refused.items():
        assert _err([override]).startswith(message), (override, _err([override]))


def test_a_yaml_file_value_read_as_another_type_is_refused_for_a_str_field(tmp_path):
    """In a config file YAML's own rules apply (a comment is a comment); a str field that YAML
    turned into a bool, number, null or date is refused naming the key, with the fix."""
    for text, got in (("yes", "True"), ("010", "8"), ("~", "None"), ("2024-01-01", "datetime.date(2024, 1, 1)")):
        f = tmp_path / "c.yaml"
        f.write_text(f"train:\n  run_root: {text}\n")
        msg = _err([], path=f)
        assert msg.startswith(f"train.run_root: expected a string, got {got} (YAML reads that "
                              "unquoted text as a ") and msg.endswith(f"; quote it) [{f}]"), msg
        f.write_text(f"train:\n  run_root: '{text}'\n")
        assert load_config(f, check_paths=False).train.run_root == text
