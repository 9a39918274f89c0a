"""Datasets and the unpaired batch stream ``{"ct": batch, "mr": batch}``.

Each modality has its own cached dataset and its own endless, seeded sampler: every step draws an
independent CT batch and MR batch, the smaller modality simply starts its next shuffled pass sooner
(no epoch ends early), and the CT:MR ratio is the ratio of the configured batch sizes. Every sample's
randomness is seeded by its position in the stream, so the batches are the same for a seed whatever
the number of workers, and a resumed run continues with exactly the batches it would have had.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, ThreadDataLoader, list_data_collate
from monai.transforms import Compose
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from medmtl.config import ExperimentConfig
from medmtl.data.manifest import ManifestEntry, read_manifest
from medmtl.data.plan import Plan
from medmtl.data.transforms import cached_training_transforms, random_transforms
from medmtl.modality import MODALITIES, dicom_modality
from medmtl.errors import DataError

__all__ = [
    "Split", "split_cases", "EndlessSampler", "SeededSamples", "UnpairedBatches", "augment_device", "training_dataset",
    "build_training_stream", "load_split", "MODALITIES",
]



@dataclass
class Split:
    """Training, validation and (optional) test entries per modality, disjoint by case."""

    train: dict[str, list[ManifestEntry]]
    val: dict[str, list[ManifestEntry]]
    test: dict[str, list[ManifestEntry]] = field(default_factory=dict)

    @property
    def evaluation(self) -> dict[str, list[ManifestEntry]]:
        """Where final scores are reported: the test cases when there are any, else the validation cases."""
        return self.test if any(self.test.values()) else self.val


def _stable_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_cases(entries: list[ManifestEntry], *, val_fraction: float, seed: int, test_fraction: float = 0.0,
                label_budget: dict[str, int] | None = None) -> Split:
    """Split labelled entries by case (patient), per modality, reproducibly for a seed.

    Splitting by case keeps two series of one patient on the same side. Cases are ordered by a keyed
    hash of their id; the first ``test_fraction`` of them are test cases, the next ``val_fraction``
    validation cases, the rest training cases. Each modality keeps at least one training and one
    validation case (and one test case when ``test_fraction > 0``); too few labelled cases is an error.
    ``label_budget`` (modality -> k) keeps only the first k training cases of that order, so a scarce-label
    run and a full one share their validation and test cases exactly.
    """
    train: dict[str, list[ManifestEntry]] = {}
    val: dict[str, list[ManifestEntry]] = {}
    test: dict[str, list[ManifestEntry]] = {}
    for m in MODALITIES:
        labelled = [e for e in entries if e.modality == dicom_modality(m) and e.label is not None]
        cases = sorted({e.case_id for e in labelled}, key=lambda c: _stable_key(seed, c))
        need = 3 if test_fraction > 0 else 2
        if len(cases) < need:
            raise DataError(f"need at least {need} labelled {dicom_modality(m)} cases for a train/validation{'/test' if need == 3 else ''} split, "
                             f"found {len(cases)}; ingest more data or add labels" + (", or set data.test_fraction=0" if need == 3 else ""))
        n_test = min(len(cases) - 2, max(1, round(test_fraction * len(cases)))) if test_fraction > 0 else 0
        n_val = min(len(cases) - n_test - 1, max(1, round(val_fraction * len(cases))))
        test_cases, val_cases = set(cases[:n_test]), set(cases[n_test : n_test + n_val])
        test[m] = [e for e in labelled if e.case_id in test_cases]
        val[m] = [e for e in labelled if e.case_id in val_cases]
        train_cases = [c for c in cases if c not in val_cases | test_cases][: (label_budget or {}).get(m)]
        train[m] = [e for e in labelled if e.case_id in set(train_cases)]
    return Split(train=train, val=val, test=test)


class EndlessSampler(Sampler[tuple[int, int]]):
    """Yields ``(dataset index, stream position)`` forever: a fresh seeded permutation per pass.

    The permutation of pass ``p`` depends only on ``(seed, p)``; iteration starts at stream position
    :attr:`start`, so a resumed run continues the same order. The position travels with the index so
    that the sample's augmentation can be seeded from it (:class:`SeededSamples`). With several
    ranks, rank ``r`` takes positions ``r, r + world_size, ...`` of one global order (disjoint shards
    per pass); :attr:`start` counts this rank's samples.
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < 1:
            raise ValueError("EndlessSampler needs at least one item")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.start = 0

    def _perm(self, p: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = self.start * self.world_size + self.rank
        p_cached, perm = -1, None
        while True:
            p, i = divmod(pos, self.n)
            if p != p_cached:
                p_cached, perm = p, self._perm(p)
            yield int(perm[i]), pos
            pos += self.world_size


class SeededSamples(TorchDataset):
    """A dataset indexed by ``(index, position)``: item ``index`` with randomness seeded by the position.

    Before each item the random transforms are re-seeded from ``(seed, position)``, so a sample's
    patch and augmentation depend only on its place in the stream: not on the worker process that
    made it, not on what ran before it. Streams with 0, 1 or N workers, and a run resumed from
    :meth:`UnpairedBatches.state_dict`, therefore yield identical batches.
    """

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    @property
    def transform(self) -> Compose:
        """The wrapped dataset's transform chain."""
        return self.dataset.transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, position = key
        seed = int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0])
        self.dataset.transform.set_random_state(seed=seed)
        return self.dataset[index]


def _items(data_dir: Path, entries: list[ManifestEntry]) -> list[dict]:
    return [{"image": str(data_dir / e.image), "label": str(data_dir / e.label), "case_id": e.case_id} for e in entries]


class UnpairedBatches:
    """Iterator of ``{"ct": {"image": (B_ct,1,X,Y,Z), "label": (B_ct,1,X,Y,Z)}, "mr": {...}}``, one per step.

    Each modality is an endless stream of its own, so the smaller dataset simply starts its next
    shuffled pass sooner and no epoch ends early; the CT:MR sampling ratio is the ratio of the
    batch sizes (``train.batch_size``). :meth:`state_dict` counts the samples *consumed* (not those
    prefetched by workers), so a resume continues exactly after the last batch used.
    """

    def __init__(self, loaders: dict[str, DataLoader], samplers: dict[str, EndlessSampler]) -> None:
        self.loaders, self.samplers = loaders, samplers
        self.consumed = {m: 0 for m in loaders}
        self._iters: dict[str, Iterator] = {}

    def __iter__(self) -> "UnpairedBatches":
        return self

    def __next__(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for m, loader in self.loaders.items():
            if m not in self._iters:
                self.samplers[m].start = self.consumed[m]
                self._iters[m] = iter(loader)
            out[m] = next(self._iters[m])
            self.consumed[m] += loader.batch_size
        return out

    def state_dict(self) -> dict:
        """Samples consumed per modality: ``{"ct": {"drawn": n}, "mr": {"drawn": n}}``."""
        return {m: {"drawn": n} for m, n in self.consumed.items()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state[m]["drawn"]`` samples of each modality (prefetched batches are dropped)."""
        for m in self.loaders:
            self.consumed[m] = int(state[m]["drawn"])
        self._iters.clear()


def batch_size(cfg: ExperimentConfig, plan: Plan, modality: str) -> int:
    """Patches per step of ``modality``: ``train.batch_size`` when set, else the (resolved) plan's."""
    return cfg.train.batch_size[modality] if cfg.train.batch_size is not None else int(plan.for_modality(modality).batch_size)


def augment_device(cfg: ExperimentConfig) -> torch.device | None:
    """Where the random part runs: the GPU when CUDA is used and ``data.augment_on_device``; else ``None`` (CPU workers)."""
    if cfg.data.augment_on_device and cfg.train.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def training_dataset(cfg: ExperimentConfig, plan: Plan, entries: list[ManifestEntry], *, data_dir: str | Path, modality: str,
                     device: torch.device | None = None) -> Dataset:
    """The training dataset of one modality: cached deterministic part (``data.cache``) plus the random part.

    ``copy_cache=False``: the random part never writes into its input (the patch crop is a view, every
    later transform makes new tensors), so the cached volume need not be copied at every step;
    ``tests/data/test_transforms.py`` checks that the cache is unchanged after sampling.
    """
    chain = Compose(cached_training_transforms(cfg, plan, modality, device=device) + random_transforms(cfg, plan, modality))
    items = _items(Path(data_dir), entries)
    if cfg.data.cache == "memory":
        return CacheDataset(items, transform=chain, cache_rate=1.0, num_workers=None, progress=False, copy_cache=False)
    return Dataset(items, transform=chain)


def build_training_stream(cfg: ExperimentConfig, plan: Plan, split: Split, *, data_dir: str | Path, rank: int = 0, world_size: int = 1,
                          device: torch.device | str | None = "auto") -> UnpairedBatches:
    """Cached datasets (deterministic part) plus random patch sampling, one endless loader per modality.

    Args:
        cfg: the experiment (batch sizes, workers, cache, augmentation).
        plan: the dataset plan (spacing, intensities, patch size).
        split: training entries per modality.
        data_dir: the ingested dataset folder.
        rank: this process's rank; world_size: number of processes (disjoint sample shards).
        device: where the cached tensors live and the random part runs: ``"auto"`` =
            :func:`augment_device`; ``None`` = CPU in ``data.num_workers`` worker processes; a device =
            ``ToDeviced`` after the cached part and a thread loader without worker processes (CUDA
            tensors cannot be shared with worker processes).
    """
    device = augment_device(cfg) if device == "auto" else (torch.device(device) if device is not None else None)
    loaders, samplers = {}, {}
    for k, m in enumerate(MODALITIES):
        ds = training_dataset(cfg, plan, split.train[m], data_dir=data_dir, modality=m, device=device)
        samplers[m] = EndlessSampler(len(ds), seed=cfg.seed * 2 + k, rank=rank, world_size=world_size)
        seeded = SeededSamples(ds, seed=cfg.seed * 2 + k)
        if device is not None:
            loaders[m] = ThreadDataLoader(seeded, batch_size=batch_size(cfg, plan, m), sampler=samplers[m], num_workers=0,
                                          collate_fn=list_data_collate)
        else:
            loaders[m] = DataLoader(
                seeded, batch_size=batch_size(cfg, plan, m), sampler=samplers[m], num_workers=cfg.data.num_workers,
                collate_fn=list_data_collate, pin_memory=torch.cuda.is_available(), persistent_workers=cfg.data.num_workers > 0,
            )
    return UnpairedBatches(loaders, samplers)


def load_split(cfg: ExperimentConfig) -> tuple[Path, Split]:
    """Read the manifest under ``cfg.data.root`` and split it (errors name the file)."""
    data_dir = Path(cfg.data.root)
    entries = read_manifest(data_dir)
    return data_dir, split_cases(entries, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction, seed=cfg.seed,
                                 label_budget=cfg.data.label_budget)
