"""Real VQA data: TextVQA 0.5.1, VQAv2 ("coco_2014_vqa") and OK-VQA from their official files.

Each dataset is read from its official layout under a root folder (the shared `data_root`, or a
per-dataset override); when the official JSON is absent, a Hugging Face `datasets` parquet export
under `<root>/<name>/` is read instead (needs pyarrow: pip install 'budgetvlm[parquet]').

    TextVQA_0.5.1_{train,val}.json                      {"data": [{question, question_id, image_id, answers x10}]}
    train_images/<image_id>.jpg                         TextVQA train and val images
    v2_OpenEnded_mscoco_{train2014,val2014}_questions.json, v2_mscoco_{train2014,val2014}_annotations.json
    OpenEnded_mscoco_{train2014,val2014}_questions.json, mscoco_{train2014,val2014}_annotations.json
    train2014/COCO_train2014_<image_id:012d>.jpg, val2014/COCO_val2014_<image_id:012d>.jpg

Images are opened only when a sample's image is read. An unreadable image raises ImageLoadError;
callers skip that sample and report it through record_skipped(), so skips are counted, not silent.
"""
from __future__ import annotations

import io
import json
import logging
import math
import numbers
import random
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from PIL import Image

from envs.data.sample import ImageLoadError, VQASample

logger = logging.getLogger(__name__)

# The official test splits publish no answers, and every sample here needs them for the reward.
SPLITS = ("train", "val")


@dataclass(frozen=True)
class _OfficialLayout:
    """File names of one dataset's official release; {split} / {coco} are filled per split."""

    questions: str
    annotations: str | None  # None: the answers sit in the questions file (TextVQA)
    image_folder: str
    image_file: str  # a format string of image_id once {coco} is filled

    def paths(self, root: Path, split: str) -> list[Path]:
        """Questions file, annotations file (if separate), image folder."""
        fields = {"split": split, "coco": f"{split}2014"}
        names = [self.questions, self.annotations, self.image_folder]
        return [root / name.format(**fields) for name in names if name is not None]

    def describe(self, split: str) -> str:
        fields = {"split": split, "coco": f"{split}2014"}
        names = [self.questions, self.annotations, f"{self.image_folder}/{self.image_file}"]
        return ", ".join(name.format(**fields) for name in names if name is not None)


_COCO_IMAGE = "COCO_{coco}_{{image_id:012d}}.jpg"
_LAYOUTS = {
    "text_vqa": _OfficialLayout("TextVQA_0.5.1_{split}.json", None, "train_images", "{{image_id}}.jpg"),
    "coco_2014_vqa": _OfficialLayout(
        "v2_OpenEnded_mscoco_{coco}_questions.json", "v2_mscoco_{coco}_annotations.json", "{coco}", _COCO_IMAGE
    ),
    "okvqa": _OfficialLayout(
        "OpenEnded_mscoco_{coco}_questions.json", "mscoco_{coco}_annotations.json", "{coco}", _COCO_IMAGE
    ),
}
DATASET_NAMES = tuple(_LAYOUTS)

# Hugging Face names the validation split "validation"; plain exports may say "val".
_PARQUET_SPLITS = {"train": ("train",), "val": ("validation", "val")}
_PARQUET_COLUMNS = ("question_id", "question", "answers", "image")

# Short-answer prompts, one per dataset; callers may override entries from their YAML config.
DEFAULT_PROMPT_TEMPLATES: dict[str, str] = {
    "text_vqa": "{question}\nAnswer the question using a single word or phrase.",
    "coco_2014_vqa": "{question}\nAnswer the question using a single word or phrase.",
    "okvqa": "{question}\nAnswer the question using a single word or phrase.",
    "synthvqa": "{question}\nAnswer the question using a single word or number.",
}


class _Record(NamedTuple):
    question_id: int | str
    image_id: int | str | None
    question: str
    answers: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Lazy images: small picklable callables, so a dataset can cross process boundaries.


class _FileImage:
    __slots__ = ("path", "dataset", "question_id")

    def __init__(self, path: str, dataset: str, question_id: int | str):
        self.path, self.dataset, self.question_id = path, dataset, question_id

    def __call__(self) -> Image.Image:
        try:
            with Image.open(self.path) as image:
                return image.convert("RGB")  # forces the decode inside the try
        except (OSError, Image.DecompressionBombError) as exc:
            raise ImageLoadError(
                f"cannot load image {self.path} for {self.dataset} question_id={self.question_id!r}: {exc}"
            ) from exc


class _ImageFolder:
    def __init__(self, dataset: str, folder: Path, file_format: str):
        self.dataset, self.folder, self.file_format = dataset, folder, file_format

    def loader(self, index: int, record: _Record) -> _FileImage:
        path = self.folder / self.file_format.format(image_id=record.image_id)
        return _FileImage(str(path), self.dataset, record.question_id)


class _ParquetImage:
    __slots__ = ("path", "row_group", "row", "dataset", "question_id")

    def __init__(self, path: str, row_group: int, row: int, dataset: str, question_id: int | str):
        self.path, self.row_group, self.row = path, row_group, row
        self.dataset, self.question_id = dataset, question_id

    def __call__(self) -> Image.Image:
        import pyarrow.parquet as pq

        where = f"{self.path} (row group {self.row_group}, row {self.row})"
        try:
            # Only this row group's image column is read: the rest of the file stays on disk.
            table = pq.ParquetFile(self.path).read_row_group(self.row_group, columns=["image"])
            value = table.column("image")[self.row].as_py()
            data = value.get("bytes") if isinstance(value, dict) else value  # HF Image: {bytes, path}
            if not data:
                raise OSError("the image cell holds no bytes")
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # pyarrow errors are ValueError/OSError
            raise ImageLoadError(
                f"cannot load image {where} for {self.dataset} question_id={self.question_id!r}: {exc}"
            ) from exc


class _ParquetImages:
    def __init__(self, dataset: str, locations: list[tuple[str, int, int]]):
        self.dataset, self.locations = dataset, locations

    def loader(self, index: int, record: _Record) -> _ParquetImage:
        return _ParquetImage(*self.locations[index], self.dataset, record.question_id)


# ----------------------------------------------------------------------------------------------
# Datasets


class VQADataset(Sequence[VQASample]):
    """One split of one dataset. Holds questions and answers only; samples are built on access."""

    def __init__(
        self, name: str, split: str, source: str, records: list[_Record], images: _ImageFolder | _ParquetImages
    ):
        self.name, self.split, self.source = name, split, source
        self._records, self._images = records, images

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        record = self._records[index]
        return VQASample(
            question=record.question,
            answers=list(record.answers),
            question_id=record.question_id,
            dataset=self.name,
            image_loader=self._images.loader(index, record),
            image_id=record.image_id,
        )

    def __repr__(self) -> str:
        return f"VQADataset(name={self.name!r}, split={self.split!r}, size={len(self)}, source={self.source!r})"


def load_vqa_dataset(name: str, data_root: str | Path, split: str, root: str | Path | None = None) -> VQADataset:
    """Load split "train" or "val" of "text_vqa", "coco_2014_vqa" or "okvqa".

    Files are looked up under `root` when given, else under `data_root`. The official JSON layout
    wins; a parquet export under <root>/<name>/ is read only when the questions JSON is absent.
    """
    if name not in _LAYOUTS:
        raise ValueError(f"dataset name={name!r} is not known; expected one of {DATASET_NAMES}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not supported for {name}; expected one of {SPLITS}")
    base = Path(root if root is not None else data_root)
    layout = _LAYOUTS[name]
    paths = layout.paths(base, split)
    parquet_files = [] if paths[0].exists() else _parquet_files(base / name, split)
    if parquet_files:
        return _read_parquet(name, split, base / name, parquet_files)
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(
                f"{name} {split}: {path} does not exist. Expected the official layout under {base}: "
                f"{layout.describe(split)}; or a Hugging Face parquet export "
                f"{base / name}/[data/]{_PARQUET_SPLITS[split][0]}-*.parquet"
            )
    if layout.annotations is None:
        records = _read_textvqa(name, paths[0])
    else:
        records = _read_questions_and_annotations(name, paths[0], paths[1])
    image_format = layout.image_file.format(coco=f"{split}2014")
    images = _ImageFolder(name, paths[-1], image_format)
    return VQADataset(name, split, str(paths[0]), records, images)


def _read_json_list(path: Path, key: str) -> list:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a JSON object with a {key!r} list (official format); found {found}")
    return data[key]


def _field(entry: Any, name: str, path: Path, index: int) -> Any:
    if not isinstance(entry, dict) or name not in entry:
        found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{path}: entry {index} has no {name!r} field; found {found}")
    return entry[name]


def _answers(raw: Any, dataset: str, question_id: Any, source: Path | str) -> tuple[str, ...]:
    """Reference answers as strings, from a list of strings (TextVQA) or of {"answer": ...} dicts."""
    if not raw:
        raise ValueError(
            f"{dataset} question_id={question_id!r} in {source} has no answers; "
            f"train/val samples need reference answers for the reward"
        )
    answers = []
    for item in raw:
        answer = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(answer, str):
            raise ValueError(
                f"{dataset} question_id={question_id!r} in {source}: answer {item!r} is not a string "
                f"or an {{'answer': str}} object"
            )
        answers.append(sys.intern(answer))  # a few thousand distinct answers repeat across 10^5 questions
    return tuple(answers)


def _read_textvqa(name: str, path: Path) -> list[_Record]:
    records = []
    for i, entry in enumerate(_read_json_list(path, "data")):
        question_id = _field(entry, "question_id", path, i)
        answers = _answers(entry.get("answers"), name, question_id, path)
        records.append(_Record(question_id, _field(entry, "image_id", path, i), _field(entry, "question", path, i), answers))
    return records


def _read_questions_and_annotations(name: str, questions_path: Path, annotations_path: Path) -> list[_Record]:
    annotations = _read_json_list(annotations_path, "annotations")
    answers_by_id = {
        _field(a, "question_id", annotations_path, i): a.get("answers") for i, a in enumerate(annotations)
    }
    del annotations  # the official VQAv2 train annotations are ~300 MB of JSON
    records = []
    for i, entry in enumerate(_read_json_list(questions_path, "questions")):
        question_id = _field(entry, "question_id", questions_path, i)
        image_id = _field(entry, "image_id", questions_path, i)
        if not isinstance(image_id, int):
            raise ValueError(f"{questions_path}: entry {i} has image_id={image_id!r}; expected an int (COCO id)")
        answers = _answers(answers_by_id.get(question_id), name, question_id, annotations_path)
        records.append(_Record(question_id, image_id, _field(entry, "question", questions_path, i), answers))
    return records


def _parquet_files(folder: Path, split: str) -> list[Path]:
    if not folder.is_dir():
        return []
    prefixes = _PARQUET_SPLITS[split]
    return sorted(
        p for p in folder.rglob("*.parquet")
        if any(p.name == f"{s}.parquet" or p.name.startswith(f"{s}-") for s in prefixes)
    )


def _read_parquet(name: str, split: str, folder: Path, files: list[Path]) -> VQADataset:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            f"{name} {split}: found parquet files ({files[0]}, ...) but reading them needs pyarrow; "
            f"install it with pip install 'budgetvlm[parquet]', or provide the official JSON layout"
        ) from exc
    records: list[_Record] = []
    locations: list[tuple[str, int, int]] = []
    for path in files:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
        missing = [c for c in _PARQUET_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(_PARQUET_COLUMNS)}, found {columns}")
        wanted = [c for c in ("question_id", "image_id", "question", "answers") if c in columns]
        for group in range(parquet.num_row_groups):
            for row, entry in enumerate(parquet.read_row_group(group, columns=wanted).to_pylist()):
                answers = _answers(entry["answers"], name, entry["question_id"], path)
                records.append(_Record(entry["question_id"], entry.get("image_id"), entry["question"], answers))
                locations.append((str(path), group, row))
    return VQADataset(name, split, str(folder), records, _ParquetImages(name, locations))


# ----------------------------------------------------------------------------------------------
# Mixtures


def mix_datasets(
    datasets: Mapping[str, Sequence[VQASample]],
    weights: Mapping[str, float] | None = None,
    num_samples: int | None = None,
    seed: int = 0,
) -> list[VQASample]:
    """A shuffled mixture of `datasets` in which no sample repeats.

    weights: each dataset's share of the mixture, normalised to sum 1; they must name exactly the
        datasets (0 leaves one out). None means proportional to size: every dataset gives the same
        fraction of itself, and with num_samples=None the mixture is the union of all samples.
    num_samples: cap on the total. The total is the largest the weights allow without repeating a
        sample (a small dataset with a large weight limits it), capped at num_samples; a warning
        says when that is below num_samples.
    seed: each dataset's subset is drawn with a generator seeded by (seed, dataset name), so adding
        a dataset leaves the others' picks unchanged; the mixture is then shuffled with `seed`.
    """
    if not datasets:
        raise ValueError("datasets is empty; expected at least one named dataset")
    sizes = {name: len(ds) for name, ds in datasets.items()}
    shares = _shares(sizes, weights)
    capacity = min(Fraction(sizes[name]) / share for name, share in shares.items() if share > 0)
    total = math.floor(capacity)
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples={num_samples!r}: expected None or an int >= 0")
        if num_samples > total:
            logger.warning(
                "mix_datasets: num_samples=%d but sizes %s with weights %s allow %d samples without repeats; using %d",
                num_samples, sizes, dict(weights) if weights is not None else "proportional to size", total, total,
            )
        total = min(total, num_samples)
    counts = _apportion(total, shares)
    picked = []
    for name in sorted(datasets):
        rng = random.Random(f"{seed}:{name}")
        picked.extend((name, index) for index in rng.sample(range(sizes[name]), counts[name]))
    random.Random(seed).shuffle(picked)
    return [datasets[name][index] for name, index in picked]


def _shares(sizes: Mapping[str, int], weights: Mapping[str, float] | None) -> dict[str, Fraction]:
    """Exact normalised shares (fractions avoid rounding a dataset past its size)."""
    if weights is None:
        raw = {name: Fraction(size) for name, size in sizes.items()}
        if not any(raw.values()):
            raise ValueError(f"every dataset is empty (sizes {dict(sizes)}); nothing to mix")
    else:
        if set(weights) != set(sizes):
            raise ValueError(
                f"weights name {sorted(weights)} but the datasets are {sorted(sizes)}; expected exactly the same names"
            )
        raw = {}
        for name, weight in weights.items():
            if not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weights[{name!r}]={weight!r}: expected a finite number >= 0")
            if weight > 0 and sizes[name] == 0:
                raise ValueError(f"dataset {name!r} is empty but weights[{name!r}]={weight}; give it weight 0")
            raw[name] = Fraction(float(weight))
        if not any(raw.values()):
            raise ValueError(f"weights={dict(weights)} are all 0; expected at least one positive weight")
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


def _apportion(total: int, shares: Mapping[str, Fraction]) -> dict[str, int]:
    """Split `total` by `shares` (largest remainder; ties go to the alphabetically earlier name)."""
    exact = {name: total * share for name, share in shares.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    left = total - sum(counts.values())
    by_remainder = sorted(sorted(exact), key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[:left]:
        counts[name] += 1
    return counts


def load_vqa_mixture(
    dataset_names: Iterable[str],
    data_root: str | Path,
    split: str,
    weights: Mapping[str, float] | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    roots: Mapping[str, str | Path] | None = None,
) -> list[VQASample]:
    """load_vqa_dataset for each name (root from `roots`, else `data_root`), then mix_datasets."""
    if isinstance(dataset_names, str):
        raise ValueError(f"dataset_names={dataset_names!r}: expected a list of names, not one string")
    names = list(dataset_names)
    if len(set(names)) != len(names):
        raise ValueError(f"dataset_names={names} repeats a name")
    roots = dict(roots or {})
    if set(roots) - set(names):
        raise ValueError(f"roots name {sorted(set(roots) - set(names))}, which are not in dataset_names={names}")
    datasets = {name: load_vqa_dataset(name, data_root, split, root=roots.get(name)) for name in names}
    return mix_datasets(datasets, weights, num_samples, seed)


# ----------------------------------------------------------------------------------------------
# Prompts


def format_prompt(sample: VQASample, templates: Mapping[str, str] | None = None) -> str:
    """The model prompt for `sample`: its dataset's template (overrides first) with {question} filled."""
    merged = {**DEFAULT_PROMPT_TEMPLATES, **(templates or {})}
    template = merged.get(sample.dataset)
    if template is None:
        raise ValueError(f"no prompt template for dataset {sample.dataset!r}; templates exist for {sorted(merged)}")
    if "{question}" not in template:
        raise ValueError(f"prompt template for {sample.dataset!r} has no {{question}} placeholder: {template!r}")
    # str.replace, not str.format: templates from YAML may hold other braces.
    return template.replace("{question}", sample.question)


# ----------------------------------------------------------------------------------------------
# Skipped samples: callers catch ImageLoadError, call record_skipped and move on.

_skip_lock = threading.Lock()
_skipped: Counter[str] = Counter()


def record_skipped(sample: VQASample, reason: str | BaseException) -> int:
    """Count a skipped sample; the first skip is logged as a warning, later ones at debug level.
    Returns the total skipped so far."""
    with _skip_lock:
        _skipped[sample.dataset] += 1
        total = sum(_skipped.values())
    if total == 1:
        logger.warning(
            "skipping %s question_id=%r: %s (further skips are counted: skipped_count(), log_skip_summary())",
            sample.dataset, sample.question_id, reason,
        )
    else:
        logger.debug("skipping %s question_id=%r: %s", sample.dataset, sample.question_id, reason)
    return total


def skipped_count(dataset: str | None = None) -> int:
    """Samples skipped so far, in all datasets or in one."""
    with _skip_lock:
        return sum(_skipped.values()) if dataset is None else _skipped[dataset]


def skipped_by_dataset() -> dict[str, int]:
    with _skip_lock:
        return dict(_skipped)


def log_skip_summary() -> int:
    """Log one warning with the skip counts per dataset (if any); returns the total."""
    counts = skipped_by_dataset()
    total = sum(counts.values())
    if total:
        logger.warning("skipped %d sample(s) with unreadable images: %s", total, counts)
    return total


def reset_skipped() -> None:
    with _skip_lock:
        _skipped.clear()
