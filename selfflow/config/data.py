"""The ``data`` section: which images (or latents, pairs, a synthetic set) a run trains on, and how they are read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from selfflow.config.fields import check_choice
from selfflow.errors import ConfigError


DATA_NAMES = ("digits", "mnist", "fashion-mnist", "idx", "folder", "npz", "latents", "pairs", "synth", "webdataset", "hf")  # selfflow.data.load_dataset
STREAMED_DATA = ("folder", "webdataset", "hf")  # listed once, decoded per batch (selfflow.data.source)
CROPS = ("center", "resize", "random")  # selfflow.data.preprocess
BAD_IMAGE_POLICIES = ("error", "skip")
DATA_SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion-mnist | idx | folder | npz | latents
    path: Optional[str] = None  # folder (mnist, fashion-mnist, idx, folder, latents) or file (npz)
    split: str = "train"  # train | test | all
    image_size: Optional[int] = None  # resize to this size; None keeps the native size
    channels: Optional[int] = None  # folder data: 1 or 3; None infers it
    class_conditional: bool = True
    # Streamed sources (folder | webdataset | hf) only:
    crop: Optional[str] = None  # center (ADM; the default) | resize (squash) | random (ADM random crop + flip)
    on_bad_image: str = "error"  # error: stop naming the file | skip: leave it out (a warning names it)
    image_column: Optional[str] = None  # hf: the image column (default image); webdataset: the image's extension
    label_column: Optional[str] = None  # hf: the label column (default label); webdataset: the label's extension (cls)

    def validate(self, where: str) -> None:
        check_choice(self.name, DATA_NAMES, f"{where}.name")
        check_choice(self.split, DATA_SPLITS, f"{where}.split")
        if self.name == "digits" and self.path is not None:
            raise ConfigError(f"{where}.path: the digits set is bundled with scikit-learn and takes no path, got {self.path!r}")
        if self.name != "digits" and not self.path:
            raise ConfigError(f"{where}.path: data.name={self.name} needs a path")
        if self.name in ("latents", "pairs", "synth") and (self.image_size is not None or self.channels is not None):
            raise ConfigError(f"{where}: {self.name} are used as stored; leave {where}.image_size and {where}.channels unset")
        if self.image_size is not None and self.image_size <= 0:
            raise ConfigError(f"{where}.image_size must be positive, got {self.image_size}")
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"{where}.channels must be 1 or 3, got {self.channels}")
        if self.crop is not None:
            check_choice(self.crop, CROPS, f"{where}.crop")
        check_choice(self.on_bad_image, BAD_IMAGE_POLICIES, f"{where}.on_bad_image")
        streamed_only = {"crop": self.crop, "image_column": self.image_column, "label_column": self.label_column,
                         "on_bad_image": None if self.on_bad_image == "error" else self.on_bad_image}
        given = [f"{where}.{key}" for key, value in streamed_only.items() if value is not None]
        if given and self.name not in STREAMED_DATA:
            raise ConfigError(f"{', '.join(given)}: for data.name {' | '.join(STREAMED_DATA)} only, not {self.name}")
        if self.name == "folder" and (self.image_column is not None or self.label_column is not None):
            raise ConfigError(f"{where}.image_column / label_column: a folder's labels are its class sub-folders; leave them unset")
