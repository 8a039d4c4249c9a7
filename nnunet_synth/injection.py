"""The transform that puts synthetic tumours into nnU-Net's training samples.

:class:`SynthTumourTransform` is inserted at index 0 of nnU-Net's training transforms: after the data
loader's crop of the enlarged patch and before spatial and intensity augmentation, so synthetic lesions are
rotated, scaled, noised and mirrored like real ones. It is a top-level, picklable class that holds no
reference to the trainer; it draws from its own numpy Generator, seeded per data-loader worker.

Healthy controls first: where the synth plan lists ``healthy_cases`` (a merged dataset's healthy scans, as the
pancreas paper inserts into), :class:`OutcomeDataLoader` hands the transform each sample's case identifier, and a
sample of a healthy case is chosen with probability ``min(1, p / h)``, any other with ``max(0, (p - h) / (1 - h))``,
``h`` being the share of drawn samples that come from healthy cases: the expected synthetic share stays ``p``.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_synth.generators import get_backend
from nnunet_synth.generators.lesions import insert_tumours

if TYPE_CHECKING:
    from nnunet_synth.synth_plan import SynthPlan

# counters per worker row: samples seen, samples with a synthetic tumour, samples where nothing fitted
SEEN, SYNTHETIC, SKIPPED = 0, 1, 2
MAX_WORKER_ROWS = 64
# what the transform did to one sample (see SynthTumourTransform.take_outcomes)
NOT_CHOSEN, INSERTED, NOTHING_FITTED = 0, 1, 2
PENDING_OUTCOMES = 4096  # outcomes kept until taken (a batch's worth is taken after each batch)
OUTCOME_KEY = "synth_outcome"  # the key of a training batch that holds one outcome per sample


def worker_index() -> int:
    """0 in the main process, k for the k-th child process a parent started (batchgenerators' workers).

    multiprocessing numbers children in start order, so the index is the same from run to run.
    """
    identity = multiprocessing.current_process()._identity  # noqa: SLF001 - the only stable worker number
    return identity[-1] if identity else 0


def new_counters() -> torch.Tensor:
    """Counters in shared memory: data-loader workers (fork or spawn) add to the tensor the trainer reads."""
    return torch.zeros((MAX_WORKER_ROWS, 3), dtype=torch.int64).share_memory_()


class SynthTumourTransform(BasicTransform):
    """With probability ``p`` per sample, inserts the synthetic tumours of one sample into the central window.

    The lesions come from the lesion pipeline (:func:`nnunet_synth.generators.lesions.insert_tumours`): inside
    the organ label (or, without one, whole inside the tissue region), away from real tumours, never on voxels
    labelled -1 (outside the image) or the ignore label. Only segmentation channel 0 gets the tumour label; the
    image changes only inside the lesions.

    Args:
        synth_plan: the validated synth plan (see :func:`nnunet_synth.planning.load_synth_plan`).
        probability: chance that a sample carries a synthetic tumour.
        final_patch_size: nnU-Net's patch size; lesion centres lie in this central window.
        seed: base seed; each worker draws from ``default_rng([seed, worker_index()])``.
        counters: shared (rows, 3) int64 tensor of seen/synthetic/skipped counts, see :func:`new_counters`.
        templates: real tumour masks of the training fold (deformation ``template``).
    """

    def __init__(self, synth_plan: SynthPlan, probability: float, final_patch_size: tuple[int, ...] | None,
                 seed: int, counters: torch.Tensor | None = None, templates: list[np.ndarray] | None = None):
        super().__init__()
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"synthetic-tumour probability must be in [0, 1], got {probability}")
        if synth_plan.shapes.deformation == "template" and not templates:
            raise ValueError("deformation 'template' needs the training fold's template masks (none given)")
        self.plan = synth_plan
        # in shared memory so a trainer can change it mid-training (real-only fine-tuning) in every worker
        self.probability = torch.full((1,), float(probability), dtype=torch.float64).share_memory_()
        self.templates = templates
        self.final_patch_size = None if final_patch_size is None else tuple(int(s) for s in final_patch_size)
        self.seed = seed
        self.counters = counters if counters is not None else new_counters()
        self.generator = get_backend(synth_plan.backend)(synth_plan)
        self._rng: np.random.Generator | None = None
        self._rng_pid: int | None = None
        self._outcomes: deque[int] = deque(maxlen=PENDING_OUTCOMES)
        self.healthy: frozenset[str] = frozenset()
        self.healthy_share = 0.0
        self._keys: deque[str] = deque()

    def prefer_cases(self, healthy: Iterable[str], share: float) -> None:
        """Insert into the ``healthy`` cases first (see the module docstring).

        Args:
            healthy: identifiers of the healthy-control cases among the loader's cases.
            share: probability that a drawn sample comes from one of them (their sampling mass).
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share of healthy samples must be in [0, 1], got {share}")
        self.healthy, self.healthy_share = frozenset(str(c) for c in healthy), float(share)

    def set_batch_keys(self, keys: Iterable[str]) -> None:
        """The case identifiers of the next samples, in the order the transform will see them (the loader's batch)."""
        self._keys = deque(str(k) for k in keys)

    def case_probabilities(self) -> tuple[float, float]:
        """The chances of a synthetic tumour in a sample of a healthy case and in one of any other case: healthy
        cases first, so that the expected share over all samples is the probability."""
        p, h = float(self.probability[0]), self.healthy_share
        if not self.healthy or h <= 0.0 or h >= 1.0:
            return p, p
        return min(1.0, p / h), max(0.0, (p - h) / (1.0 - h))

    def sample_probability(self, identifier: str | None) -> float:
        """The chance that a sample of case ``identifier`` (None: unknown) gets a synthetic tumour."""
        if identifier is None:
            return float(self.probability[0])
        healthy, other = self.case_probabilities()
        return healthy if identifier in self.healthy else other

    @property
    def rng(self) -> np.random.Generator:
        # A forked worker inherits the parent's generator state: reseed once per process, by worker number.
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = np.random.default_rng([self.seed, worker_index()])
            self._rng_pid = os.getpid()
        return self._rng

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_rng"] = state["_rng_pid"] = None
        state["_outcomes"] = deque(maxlen=PENDING_OUTCOMES)
        state["_keys"] = deque()
        return state

    def take_outcomes(self) -> list[int]:
        """What this process's calls did since the last take (:data:`NOT_CHOSEN`, :data:`INSERTED` or
        :data:`NOTHING_FITTED` per sample, in order); the loader attaches them to its batch, so the trainer counts
        the samples its training step consumes (the shared counters also count what the workers prefetched)."""
        outcomes = list(self._outcomes)
        self._outcomes.clear()
        return outcomes

    def __call__(self, **data_dict) -> dict:
        rng = self.rng
        row = self.counters[worker_index() % MAX_WORKER_ROWS]
        row[SEEN] += 1
        identifier = self._keys.popleft() if self._keys else None
        if rng.uniform() >= self.sample_probability(identifier):
            self._outcomes.append(NOT_CHOSEN)
            return data_dict
        image, seg = self.insert(data_dict["image"], data_dict["segmentation"], rng)
        if image is None:
            row[SKIPPED] += 1
            self._outcomes.append(NOTHING_FITTED)
            return data_dict
        row[SYNTHETIC] += 1
        self._outcomes.append(INSERTED)
        data_dict["image"], data_dict["segmentation"] = image, seg
        return data_dict

    def insert(self, image: torch.Tensor, segmentation: torch.Tensor, rng: np.random.Generator
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Inserts the lesions of one synthetic sample (one, or several where the size class says so).

        Returns new tensors, or (None, None) when no lesion fits. The inputs are never written to: the
        loader's crop may be a view of nnU-Net's preprocessed arrays.
        """
        new_image, new_seg, lesions = insert_tumours(image.numpy(), segmentation.numpy(), None, self.plan, rng,
                                                     generator=self.generator, templates=self.templates,
                                                     window=self.final_patch_size)
        if not lesions:
            return None, None
        return torch.from_numpy(new_image), torch.from_numpy(new_seg)


class OutcomeDataLoader(nnUNetDataLoader):
    """nnU-Net's training loader whose batches also hold :data:`OUTCOME_KEY`: per sample, what the
    :class:`SynthTumourTransform` among its transforms did (it runs in the same worker process, once per sample, in
    batch order). The Synth trainers count the samples their training step consumes from it, not the ones the
    loader workers prefetched at start or resume.

    It also tells the transform each sample's case, and which of its cases are the plan's healthy controls with
    their share of the drawn samples, so that synthetic tumours go into healthy cases first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        synth = self.synth_transform
        if synth is not None and synth.plan.healthy_cases:
            listed = set(synth.plan.healthy_cases)
            is_healthy = np.array([i in listed for i in self.indices], dtype=bool)
            weights = (np.full(len(self.indices), 1.0 / max(1, len(self.indices))) if self.sampling_probabilities
                       is None else np.asarray(self.sampling_probabilities, dtype=float))
            synth.prefer_cases(np.asarray(self.indices)[is_healthy].tolist(),
                               float(np.clip(weights[is_healthy].sum() / weights.sum(), 0.0, 1.0)))

    @property
    def synth_transform(self) -> SynthTumourTransform | None:
        return next((t for t in getattr(self.transforms, "transforms", []) if isinstance(t, SynthTumourTransform)),
                    None)

    def get_indices(self):
        keys = super().get_indices()
        synth = self.synth_transform
        if synth is not None:
            synth.set_batch_keys(keys)
        return keys

    def generate_train_batch(self) -> dict:
        synth = self.synth_transform
        if synth is not None:
            synth.take_outcomes()  # none left from an interrupted batch
        batch = super().generate_train_batch()
        if synth is not None:
            batch[OUTCOME_KEY] = torch.as_tensor(synth.take_outcomes(), dtype=torch.int64)
        return batch


def achieved_rates(counters: torch.Tensor) -> dict[str, int]:
    """Totals over all workers."""
    total = counters.sum(0)
    return {"seen": int(total[SEEN]), "synthetic": int(total[SYNTHETIC]), "skipped": int(total[SKIPPED])}
