"""One VQA request as every dataset in the package yields it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from PIL import Image


@dataclass
class VQASample:
    """A question about an image with its reference answers (VQA format: 10 answers).

    The image is loaded lazily through `image_loader` so a dataset of thousands costs no memory.
    """

    question: str
    answers: list[str]
    question_id: int | str
    dataset: str  # e.g. "synthvqa", "text_vqa", "coco_2014_vqa", "okvqa"
    image_loader: Callable[[], Image.Image] = field(repr=False)
    family: Optional[str] = None  # SynthVQA's question family; None for real datasets
    image_id: Optional[int | str] = None

    @property
    def image(self) -> Image.Image:
        return self.image_loader()


class ImageLoadError(RuntimeError):
    """A sample's image is missing or cannot be decoded; callers skip the sample and count it."""
