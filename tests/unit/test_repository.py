"""The model repository: listing, versions, and refusals that name what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from inferd.errors import ConfigError, ModelLoadError, ModelNotFound
from inferd.models.repository import ModelRepository
from inferd.models.spec import load_spec

FEATURES = '["a", "b", "c", "d"]'


def write_model(root: Path, name: str, toml: str, versions: tuple[int, ...] = (1,)) -> Path:
    """``root/name`` with ``model.toml`` and a placeholder artifact in each version folder."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(toml, encoding="utf-8")
    for version in versions:
        (folder / str(version)).mkdir()
        (folder / str(version) / "model.joblib").write_bytes(b"placeholder")
    return folder


def minimal_toml(**extra: str) -> str:
    lines = [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join([*lines, "[input]", f"features = {FEATURES}"]) + "\n"


def test_demo_repository_lists_names_sorted(models_dir: Path) -> None:
    write_model(models_dir, "aardvark", minimal_toml())
    write_model(models_dir, "zebra", minimal_toml())

    assert ModelRepository(models_dir).names() == ["aardvark", "iris", "iris-forest", "zebra"]


def test_folders_without_model_toml_or_with_bad_names_are_not_listed(models_dir: Path) -> None:
    (models_dir / "scratch").mkdir()
    write_model(models_dir, ".hidden", minimal_toml())
    (models_dir / "notes.toml").write_text("x = 1\n")

    assert ModelRepository(models_dir).names() == ["iris", "iris-forest"]


def test_demo_entry(models_dir: Path) -> None:
    entry = ModelRepository(models_dir).get("iris")

    assert entry.name == "iris"
    assert entry.versions == (1,)
    assert entry.latest == 1
    assert entry.folder == models_dir.resolve() / "iris"
    assert entry.artifact(1) == models_dir.resolve() / "iris" / "1" / "model.joblib"
    assert entry.spec.runtime == "sklearn"
    assert entry.spec.n_features == 4
    assert entry.spec.output.labels == ["setosa", "versicolor", "virginica"]


def test_entries_returns_every_model(models_dir: Path) -> None:
    entries = ModelRepository(models_dir).entries()

    assert [e.name for e in entries] == ["iris", "iris-forest"]
    assert [e.name for e in ModelRepository(models_dir).entries(["iris-forest"])] == ["iris-forest"]


def test_highest_integer_version_is_latest(models_dir: Path) -> None:
    for version in (2, 10):
        shutil.copytree(models_dir / "iris" / "1", models_dir / "iris" / str(version))
    (models_dir / "iris" / "0").mkdir()  # not a version
    (models_dir / "iris" / "v11").mkdir()  # not a version

    entry = ModelRepository(models_dir).get("iris")

    assert entry.versions == (1, 2, 10)
    assert entry.latest == 10


def test_missing_repository_says_how_to_create_it(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "no-such-folder")

    with pytest.raises(ConfigError) as info:
        repo.names()

    assert "no-such-folder" in info.value.message
    assert "inferd models train-demo" in info.value.message
    with pytest.raises(ConfigError, match="inferd models train-demo"):
        repo.entries()


def test_unknown_model(models_dir: Path) -> None:
    with pytest.raises(ModelNotFound, match="'tulip'") as info:
        ModelRepository(models_dir).get("tulip")

    assert info.value.status_code == 404


@pytest.mark.parametrize("name", ["", "../iris", "iris/1", "/etc", ".iris", "-x", "a" * 65])
def test_invalid_model_name(models_dir: Path, name: str) -> None:
    with pytest.raises(ModelNotFound, match="is not a valid model name"):
        ModelRepository(models_dir).get(name)


def test_model_toml_with_bad_toml_names_the_file(models_dir: Path) -> None:
    path = models_dir / "iris" / "model.toml"
    path.write_text("runtime = \n[input\n", encoding="utf-8")

    with pytest.raises(ModelLoadError) as info:
        ModelRepository(models_dir).get("iris")

    assert str(path.resolve()) in info.value.message
    assert "cannot read" in info.value.message


def test_model_toml_with_an_unknown_key_names_file_and_key(models_dir: Path) -> None:
    path = models_dir / "iris" / "model.toml"
    path.write_text(path.read_text() + 'colour = "blue"\n', encoding="utf-8")

    with pytest.raises(ModelLoadError) as info:
        ModelRepository(models_dir).get("iris")

    assert str(path.resolve()) in info.value.message
    assert "colour" in info.value.message


def test_model_toml_with_a_typo_in_a_section_is_refused(models_dir: Path) -> None:
    write_model(models_dir, "typo", minimal_toml() + "[batching]\nmax_batch = 8\n")

    with pytest.raises(ModelLoadError, match=r"batching\.max_batch"):
        ModelRepository(models_dir).get("typo")


def test_model_toml_whose_name_differs_from_its_folder(models_dir: Path) -> None:
    folder = write_model(models_dir, "roses", minimal_toml(name='"tulips"'))

    with pytest.raises(ModelLoadError) as info:
        ModelRepository(models_dir).get("roses")

    assert str(folder.resolve() / "model.toml") in info.value.message
    assert "'tulips'" in info.value.message
    assert "must match its folder name" in info.value.message


def test_model_toml_example_of_the_wrong_length(models_dir: Path) -> None:
    folder = write_model(models_dir, "short", minimal_toml() + "example = [1.0, 2.0]\n")

    with pytest.raises(ModelLoadError) as info:
        ModelRepository(models_dir).get("short")

    assert str(folder.resolve() / "model.toml") in info.value.message
    assert "input.example has 2 values but input.features names 4" in info.value.message


def test_load_spec_fills_in_the_name_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "model.toml"
    path.write_text(minimal_toml(), encoding="utf-8")

    spec = load_spec(path, "plain")

    assert spec.name == "plain"
    assert spec.runtime == "sklearn"
    assert spec.task == "classification"
    assert spec.artifact_name == "model.joblib"
    assert spec.input.features == ["a", "b", "c", "d"]


def test_load_spec_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is missing") as info:
        load_spec(tmp_path / "model.toml", "gone")

    assert str(tmp_path / "model.toml") in info.value.message


def test_model_without_version_folders(models_dir: Path) -> None:
    folder = write_model(models_dir, "empty", minimal_toml(), versions=())
    (folder / "latest").mkdir()

    with pytest.raises(ModelLoadError, match="no version folder") as info:
        ModelRepository(models_dir).get("empty")

    assert "1/model.joblib" in info.value.message


def test_missing_artifact_in_the_highest_version_is_named(models_dir: Path) -> None:
    (models_dir / "iris" / "2").mkdir()

    with pytest.raises(ModelLoadError) as info:
        ModelRepository(models_dir).get("iris")

    expected = models_dir.resolve() / "iris" / "2" / "model.joblib"
    assert str(expected) in info.value.message
    assert "version 2" in info.value.message


def test_model_folder_symlinked_outside_the_repository_is_refused(
    models_dir: Path, tmp_path: Path
) -> None:
    outside = write_model(tmp_path / "elsewhere", "intruder", minimal_toml())
    (models_dir / "intruder").symlink_to(outside, target_is_directory=True)

    with pytest.raises(ModelLoadError, match="outside the model repository"):
        ModelRepository(models_dir).get("intruder")
    with pytest.raises(ModelLoadError, match="outside the model repository"):
        ModelRepository(models_dir).entries()


def test_artifact_symlinked_outside_the_repository_is_refused(
    models_dir: Path, tmp_path: Path
) -> None:
    stray = tmp_path / "stray.joblib"
    stray.write_bytes(b"placeholder")
    artifact = models_dir / "iris" / "1" / "model.joblib"
    artifact.unlink()
    artifact.symlink_to(stray)

    with pytest.raises(ModelLoadError, match="outside the model repository"):
        ModelRepository(models_dir).get("iris")


def test_symlink_that_stays_inside_the_repository_is_allowed(models_dir: Path) -> None:
    (models_dir / "flowers").symlink_to(models_dir / "iris", target_is_directory=True)

    entry = ModelRepository(models_dir).get("flowers")

    assert entry.name == "flowers"
    assert entry.folder == models_dir.resolve() / "iris"
