"""The machine image's cache key: the recipe's digest is stable, and changes with anything the image is made of."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from infra.machine import image
from infra.machine.image import PACKAGES, ImageRecipe


@pytest.fixture
def standins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the stand-ins the recipe reads instead of the repository's."""
    copy = tmp_path / "standins"
    shutil.copytree(image.STANDINS, copy)
    monkeypatch.setattr(image, "STANDINS", copy)
    return copy


def test_the_same_recipe_has_the_same_digest() -> None:
    digest = ImageRecipe().digest()

    assert digest == ImageRecipe().digest()
    assert digest == ImageRecipe("bookworm", "http://deb.debian.org/debian", PACKAGES).digest()
    assert len(digest) == 16
    assert set(digest) <= set("0123456789abcdef")


def test_the_order_packages_are_listed_in_does_not_matter() -> None:
    assert ImageRecipe(packages=tuple(reversed(PACKAGES))).digest() == ImageRecipe().digest()


@pytest.mark.parametrize(
    "changed",
    [
        ImageRecipe(suite="trixie"),
        ImageRecipe(mirror="http://mirror.example/debian"),
        ImageRecipe(packages=(*PACKAGES, "vim-tiny")),
        ImageRecipe(packages=PACKAGES[:-1]),
    ],
)
def test_a_changed_suite_mirror_or_package_set_changes_the_digest(changed: ImageRecipe) -> None:
    assert changed.digest() != ImageRecipe().digest()


def test_the_digest_depends_on_the_stand_ins_content_not_their_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_repository = ImageRecipe().digest()
    shutil.copytree(image.STANDINS, tmp_path / "elsewhere")
    monkeypatch.setattr(image, "STANDINS", tmp_path / "elsewhere")

    assert ImageRecipe().digest() == in_repository


@pytest.mark.parametrize("name", ["docker.py", "nvidia-smi"])
def test_a_changed_stand_in_changes_the_digest(standins: Path, name: str) -> None:
    before = ImageRecipe().digest()

    with (standins / name).open("a") as f:
        f.write("\n# changed\n")

    assert ImageRecipe().digest() != before


def test_the_image_holds_the_stand_ins_as_executables(standins: Path) -> None:
    (standins / "nvidia-smi").write_text("#!/bin/sh\necho changed\n")

    files = ImageRecipe().files()

    assert files["/usr/local/bin/nvidia-smi"] == (b"#!/bin/sh\necho changed\n", 0o755)
    assert files["/usr/local/bin/docker"] == ((standins / "docker.py").read_bytes(), 0o755)
