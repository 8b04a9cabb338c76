"""The study file (ambient_dist/study/config.py): names that stay inside the study directory,
sizes checked against the source before anything starts, and shard directories keyed on the
whole data plan (issue 20, cases 3, 4 and 7)."""
import pytest

from ambient_dist.study import StudyError, load_study
from ambient_dist.study.stages import make_run_shards
from helpers import TOY_STUDY, load_launcher, write_study


def refused(tmp_path, study: dict, message: str, check_source: bool = False):
    path = write_study(tmp_path, study)
    with pytest.raises(StudyError, match=message):
        load_study(path, out=str(tmp_path / "out"), check_source=check_source)
    assert load_launcher("study").main([str(path), "--out", str(tmp_path / "out"), "--check"]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".", "..", ".hidden", "a b", "x\\y",
                                  "-rf", "a" * 101])
def test_run_names_that_are_not_plain_names_are_refused(tmp_path, name):
    """Case 7: a run name is a directory name; one that could leave (or nest in) the study
    directory is refused by --check, naming the key."""
    message = r"runs\[1\]\.name: " + ("every run needs a name" if not name else "'.*' is not a plain name")
    refused(tmp_path, {**TOY_STUDY, "runs": [{"name": "ok"}, {"name": name}]}, message)


@pytest.mark.parametrize("name", ["../x", "a/b", ".."])
def test_study_names_that_are_not_plain_names_are_refused(tmp_path, name):
    """The study's name is the default study directory (studies/<name>)."""
    refused(tmp_path, {**TOY_STUDY, "name": name}, r"name: '.*' is not a plain name")


def test_plain_names_with_dots_are_accepted(tmp_path):
    _, specs = load_study(write_study(tmp_path, {**TOY_STUDY, "runs": [{"name": "ambient-0.5"},
                                                                     {"name": "tn_1+mask"}]}),
                          out=str(tmp_path / "out"), check_source=False)
    assert [s.run_dir.parent for s in specs] == [tmp_path / "out" / "runs"] * 2


@pytest.mark.parametrize("names, message", [
    (["a", "a"], "run names must be unique"),
    (["ddpm", "DDPM"], "must differ in more than letter case"),
])
def test_duplicate_run_names_are_refused(tmp_path, names, message):
    refused(tmp_path, {**TOY_STUDY, "runs": [{"name": n} for n in names]}, message)


def test_subset_sizes_beyond_the_source_are_refused_by_check(tmp_path):
    """Case 4: 59990 training + 16 held-out images do not fit in Fashion-MNIST's 60,000."""
    study = {**TOY_STUDY, "subset_sizes": [12, 59990],
             "data": {"source": "fashion-mnist", "heldout": 16},
             "evaluation": {**TOY_STUDY["evaluation"], "quality_reference": 16}}
    refused(tmp_path, study, r"subset_sizes: 59990 training images \+ data.heldout 16 held-out "
            r"images exceed the 60000 images of data.source 'fashion-mnist' \(the largest size "
            r"that fits is 59984\)", check_source=True)
    ok = {**study, "subset_sizes": [12, 59984]}
    load_study(write_study(tmp_path, ok), out=str(tmp_path / "out"))


def test_heldout_must_not_be_negative(tmp_path):
    refused(tmp_path, {**TOY_STUDY, "data": {"source": "fashion-mnist", "heldout": -1}},
            r"data.heldout: must be >= 0|evaluation\.")


def _shards_of(tmp_path, study: dict):
    _, specs = load_study(write_study(tmp_path, study, "s.yaml"), out=str(tmp_path / "out"),
                          check_source=False)
    return specs


# Every data setting the shard directory depends on: a study differing only in it.
DATA_CHANGES = {
    "data.resolution": {"runs": [{"name": "ddpm", "overrides": ["data.resolution=16"]}]},
    "data.channels": {"runs": [{"name": "ddpm", "overrides": ["data.channels=3"]}]},
    "data.heldout": {"data": {"source": "fashion-mnist", "heldout": 30}},
    "data.subset_seed": {"data": {"source": "fashion-mnist", "heldout": 24, "subset_seed": 1}},
    "data.source": {"data": {"source": "fashion-mnist-test", "heldout": 24}},
    "data.path": {"data": {"source": "idx", "path": "/usr/share/datasets/fashion-mnist", "heldout": 24}},
    "seed (the noise seed)": {"seeds": [1]},
    "sigma_tn": {"runs": [{"name": "ddpm", "sigma_tn": 0.25}]},
    "objective.form": {"runs": [{"name": "ddpm", "overrides": ["objective.form=vp"]}]},
    "subset size": {"subset_sizes": [14]},
}


@pytest.mark.parametrize("setting", sorted(DATA_CHANGES))
def test_runs_that_need_other_data_get_another_shard_directory(tmp_path, setting):
    """Case 3: the shard directory's name carries the digest of the whole data plan."""
    base = {**TOY_STUDY, "runs": [{"name": "ddpm"}]}
    a = _shards_of(tmp_path, base)[0]
    b = _shards_of(tmp_path, {**base, **DATA_CHANGES[setting]})[0]
    assert a.shards != b.shards and a.data_digest != b.data_digest
    assert a.shards.parent == b.shards.parent
    assert a.data_plan != b.data_plan


def test_masking_runs_share_shards_only_with_the_same_corruption(tmp_path):
    runs = [{"name": "m1", "method": "masking", "overrides": ["objective.mask_corruption=0.5"]},
            {"name": "m2", "method": "masking", "overrides": ["objective.mask_corruption=0.5"]},
            {"name": "m3", "method": "masking", "overrides": ["objective.mask_corruption=0.25"]},
            {"name": "plain"}]
    m1, m2, m3, plain = _shards_of(tmp_path, {**TOY_STUDY, "runs": runs})
    assert m1.shards == m2.shards
    assert len({m1.shards, m3.shards, plain.shards}) == 3


def test_runs_that_need_the_same_data_share_one_shard_directory(tmp_path):
    """Options that do not touch the data (the learning rate, say) keep one directory."""
    runs = [{"name": "a"}, {"name": "b", "overrides": ["optimizer.lr=0.002"]}]
    a, b = _shards_of(tmp_path, {**TOY_STUDY, "runs": runs})
    assert a.shards == b.shards


def test_a_resolution_override_gets_shards_of_that_resolution(tmp_path):
    """Case 3 end to end at the shard stage: two runs that differ in data.resolution each get
    shards of their own resolution (before, the second failed its manifest check)."""
    from ambient_dist.data import read_manifest
    from ambient_dist.data.shards import check_manifest
    study = {**TOY_STUDY, "runs": [{"name": "r8"}, {"name": "r16", "overrides": ["data.resolution=16"]}]}
    loaded, specs = load_study(write_study(tmp_path, study, "s.yaml"), out=str(tmp_path / "out"))
    for spec in specs:
        assert make_run_shards(loaded, spec, False) == "made"
        manifest = read_manifest(spec.shards)
        assert manifest["resolution"] == spec.config.data.resolution
        check_manifest(manifest, spec.config)     # what the trainer checks: no ConfigError
        assert make_run_shards(loaded, spec, False) == "reused"
