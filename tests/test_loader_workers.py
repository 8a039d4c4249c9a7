"""The synth transform in real data-loader worker processes: nnU-Net's loader under batchgenerators' multi-process
augmenter (what ``nnUNet_n_proc_DA=2`` runs), in a fresh interpreter per run as a training is.

Both workers crop the same patches (one loader seed), so whatever differs between their batches comes from the
transform's per-worker generator.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

SEED = 5
BATCHES_PER_WORKER = 3
WORKERS = 2


def _draw(dataset: str) -> dict:
    """Runs in the subprocess: BATCHES_PER_WORKER batches from each of WORKERS workers, then the counters."""
    import numpy as np
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_synth.injection import (
        OUTCOME_KEY,
        OutcomeDataLoader,
        SynthTumourTransform,
        achieved_rates,
        new_counters,
    )
    from nnunet_synth.planning import load_synth_plan, preprocessed_dir

    class FewBatches(OutcomeDataLoader):
        """nnU-Net's loader (with the outcomes of the Synth trainers) that makes a fixed number of batches per
        worker, then waits: every batch made is consumed, so the counters can be matched exactly."""

        made = 0

        def generate_train_batch(self) -> dict:
            while self.made == BATCHES_PER_WORKER:
                time.sleep(0.05)
            self.made += 1
            return dict(super().generate_train_batch(), pid=os.getpid())

    base = preprocessed_dir(dataset)
    plans = PlansManager(load_json(base / "nnUNetPlans.json"))
    configuration = plans.get_configuration("3d_fullres")
    folder = base / configuration.data_identifier
    data = infer_dataset_class(str(folder))(str(folder))
    patch = tuple(configuration.patch_size)

    def case_hashes() -> list[str]:
        return [hashlib.sha1(np.asarray(data.load_case(k)[0]).tobytes() + np.asarray(data.load_case(k)[1]).tobytes()
                             ).hexdigest() for k in sorted(data.identifiers)]

    before = case_hashes()
    counters = new_counters()
    transform = SynthTumourTransform(load_synth_plan(dataset, "3d_fullres"), 1.0, patch, SEED, counters)
    loader = FewBatches(data, 2, patch, patch, plans.get_label_manager(load_json(base / "dataset.json")),
                        transforms=ComposeTransforms([transform]))
    owns_crops = transform.owns_crops
    augmenter = NonDetMultiThreadedAugmenter(loader, None, WORKERS, 2, seeds=[SEED] * WORKERS, pin_memory=False)
    draws: dict[int, list] = {}
    outcomes = 0
    for _ in range(WORKERS * BATCHES_PER_WORKER):
        batch = augmenter.next()
        tumour = np.asarray(batch["target"] == load_synth_plan(dataset, "3d_fullres").tumour_label)
        draws.setdefault(int(batch["pid"]), []).append([hashlib.sha1(t.tobytes()).hexdigest() for t in tumour])
        outcomes += len(batch[OUTCOME_KEY])
    augmenter._finish(timeout=1)  # noqa: SLF001 - the workers wait in their loader; stop them now
    rows = counters[:, 0].tolist()
    return {"draws": sorted(draws.values()), "seen_per_row": rows[:WORKERS + 2],
            "seen": achieved_rates(counters)["seen"], "outcomes": outcomes, "owns_crops": owns_crops,
            "preprocessed_unchanged": case_hashes() == before}


def _run(dataset: int) -> dict:
    result = subprocess.run([sys.executable, __file__, str(dataset)], capture_output=True, encoding="utf-8",
                            errors="replace", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_workers_draw_their_own_tumours_reproducibly_and_count_into_shared_memory(phantom_healthy):
    first, second = _run(phantom_healthy), _run(phantom_healthy)
    assert len(first["draws"]) == WORKERS, "every worker made batches"
    one, other = first["draws"]
    assert one != other, "two workers drew the same tumours into the same patches"
    assert all(len(set(sample for batch in worker for sample in batch)) > 1 for worker in first["draws"])
    assert second["draws"] == first["draws"], "the same seed gave other tumours"
    samples = WORKERS * BATCHES_PER_WORKER * 2
    # the parent reads what each worker process added to the shared counters: one row per worker, none for itself
    assert first["seen_per_row"] == [0, *[BATCHES_PER_WORKER * 2] * WORKERS, 0], first["seen_per_row"]
    assert first["seen"] == first["outcomes"] == samples
    # blosc2 crops are fresh arrays, painted in place; nnU-Net's preprocessed cases stay as they were
    assert first["owns_crops"] and first["preprocessed_unchanged"]


if __name__ == "__main__":
    print(json.dumps(_draw(sys.argv[1])))
