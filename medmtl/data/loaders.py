"""Datasets and the unpaired batch stream ``{"ct": batch, "mr": batch}``.

Each modality has its own cached dataset and its own endless, seeded sampler: every step draws an
independent CT batch and MR batch, the smaller modality simply starts its next shuffled pass sooner
(no epoch ends early), and the CT:MR ratio is the ratio of the configured batch sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
from monai.transforms import Compose
from torch.utils.data import Sampler

from medmtl.config import ExperimentConfig
from medmtl.data.manifest import ManifestEntry, read_manifest
from medmtl.data.plan import Plan
from medmtl.data.transforms import deterministic_transforms, random_transforms

__all__ = ["Split", "split_cases", "EndlessSampler", "UnpairedBatches", "build_training_stream", "MODALITIES"]

MODALITIES = ("ct", "mr")


@dataclass
class Split:
    """Training and held-out entries per modality (held-out = validation and final evaluation)."""

    train: dict[str, list[ManifestEntry]]
    val: dict[str, list[ManifestEntry]]


def _stable_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_cases(entries: list[ManifestEntry], *, val_fraction: float, seed: int) -> Split:
    """Split labelled entries by case (patient), per modality, reproducibly for a seed.

    Splitting by case keeps two series of one patient on the same side. Each modality keeps at least
    one training and one held-out case; fewer than two labelled cases of a modality is an error.
    """
    train: dict[str, list[ManifestEntry]] = {}
    val: dict[str, list[ManifestEntry]] = {}
    for m in MODALITIES:
        labelled = [e for e in entries if e.modality == m.upper() and e.label is not None]
        cases = sorted({e.case_id for e in labelled}, key=lambda c: _stable_key(seed, c))
        if len(cases) < 2:
            raise ValueError(f"need at least 2 labelled {m.upper()} cases for a train/held-out split, found {len(cases)}; ingest more data or add labels")
        n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
        val_cases = set(cases[:n_val])
        val[m] = [e for e in labelled if e.case_id in val_cases]
        train[m] = [e for e in labelled if e.case_id not in val_cases]
    return Split(train=train, val=val)


class EndlessSampler(Sampler[int]):
    """Yields dataset indices forever: a fresh seeded permutation per pass.

    The permutation of pass ``p`` depends only on ``(seed, p)``, and :meth:`state_dict` records how
    many indices were drawn, so a resumed run continues the same order.
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.drawn = 0

    def _perm(self, p: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        # Ranks take interleaved positions of one global order, so shards are disjoint per pass.
        pos = self.drawn * self.world_size + self.rank
        while True:
            p, i = divmod(pos, self.n)
            # count before yielding: a generator resumes only when the next index is asked for
            self.drawn += 1
            pos += self.world_size
            yield int(self._perm(p)[i])

    def state_dict(self) -> dict:
        """Indices drawn so far (enough to resume the same order)."""
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["drawn"]`` indices."""
        self.drawn = int(state["drawn"])


def _items(data_dir: Path, entries: list[ManifestEntry]) -> list[dict]:
    return [{"image": str(data_dir / e.image), "label": str(data_dir / e.label), "case_id": e.case_id} for e in entries]


class UnpairedBatches:
    """Iterator of ``{"ct": {"image": (B,1,X,Y,Z), "label": (B,1,X,Y,Z)}, "mr": {...}}``, one per step."""

    def __init__(self, loaders: dict[str, DataLoader], samplers: dict[str, EndlessSampler]) -> None:
        self.loaders, self.samplers = loaders, samplers
        self._iters: dict[str, Iterator] = {}

    def __iter__(self) -> "UnpairedBatches":
        return self

    def __next__(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for m, loader in self.loaders.items():
            if m not in self._iters:
                self._iters[m] = iter(loader)
            out[m] = next(self._iters[m])
        return out

    def state_dict(self) -> dict:
        """Sampler positions per modality."""
        return {m: s.state_dict() for m, s in self.samplers.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore sampler positions (call before the first batch is drawn)."""
        for m, s in self.samplers.items():
            s.load_state_dict(state[m])


def build_training_stream(cfg: ExperimentConfig, plan: Plan, split: Split, *, data_dir: str | Path, rank: int = 0, world_size: int = 1) -> UnpairedBatches:
    """Cached datasets (deterministic part) plus random patch sampling, one endless loader per modality."""
    data_dir = Path(data_dir)
    loaders, samplers = {}, {}
    for k, m in enumerate(MODALITIES):
        chain = deterministic_transforms(cfg, plan, m) + random_transforms(cfg, m)
        items = _items(data_dir, split.train[m])
        if cfg.data.cache == "memory":
            ds = CacheDataset(items, transform=Compose(chain), cache_rate=1.0, num_workers=None, progress=False, copy_cache=True)
        else:
            ds = Dataset(items, transform=Compose(chain))
        ds.transform.set_random_state(seed=cfg.seed + 7919 * (k + 1) + 104729 * rank)
        samplers[m] = EndlessSampler(len(items), seed=cfg.seed * 2 + k, rank=rank, world_size=world_size)
        loaders[m] = DataLoader(
            ds, batch_size=cfg.train.batch_size[m], sampler=samplers[m], num_workers=cfg.data.num_workers,
            collate_fn=list_data_collate, pin_memory=torch.cuda.is_available(), persistent_workers=cfg.data.num_workers > 0,
        )
    return UnpairedBatches(loaders, samplers)


def load_split(cfg: ExperimentConfig) -> tuple[Path, Split]:
    """Read the manifest under ``cfg.data.root`` and split it (errors name the file)."""
    data_dir = Path(cfg.data.root)
    entries = read_manifest(data_dir)
    return data_dir, split_cases(entries, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
