"""The realism benchmark: can a classifier tell a backend's synthetic tumours from a dataset's real ones?

Per seed, the preprocessed cases are split in two halves. The real tumours of half A are the reference. Each
contender is compared with them by the cross-validated AUC of a random forest (:func:`~nnunet_synth.evaluation.
realism.realism_auc`) on scale-free features in units of each lesion's tissue ring
(:func:`~nnunet_synth.evaluation.lesion_features.ring_features`):

* ``real``: the real tumours of half B, the floor (two halves of the same cohort at this sample size);
* a backend: synthetic tumours inserted by the lesion pipeline into the cases of half B, with the tumour texture
  (analytic) and the donor tumours (transplant) taken from half B only, so no synthetic lesion copies or was
  measured on a tumour it is compared with.

0.5 means indistinguishable; the floor shows how far above 0.5 two real samples already sit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import label as connected_components
from tqdm import tqdm

from nnunet_synth.evaluation.lesion_features import RING_FEATURES, ring_features
from nnunet_synth.evaluation.realism import realism_auc
from nnunet_synth.generators.appearance import ring_tissue
from nnunet_synth.synth_plan import SynthPlan

REAL = "real"
# contenders: name -> (backend, backend_params)
CONTENDERS = {
    "analytic": ("analytic", {"texture": "learned"}),
    "analytic-paper": ("analytic", {"texture": "paper"}),
    "transplant": ("transplant", {}),
}
INSERT_DRAWS = 20


@dataclass(frozen=True)
class Case:
    """A preprocessed case held in memory."""

    identifier: str
    data: np.ndarray
    seg: np.ndarray  # (*spatial) labels


def load_cases(dataset: str | int, configuration: str, plans_identifier: str, max_cases: int | None = None,
               seed: int = 0) -> tuple[SynthPlan, list[Case]]:
    """The dataset's synth plan and its preprocessed cases (a random subset of ``max_cases`` where given)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_synth.planning import load_synth_plan, preprocessed_dir

    plan = load_synth_plan(dataset, configuration, plans_identifier)
    base = preprocessed_dir(dataset)
    conf = PlansManager(load_json(base / f"{plans_identifier}.json")).get_configuration(configuration)
    folder = base / conf.data_identifier
    ds = infer_dataset_class(str(folder))(str(folder))
    identifiers = sorted(ds.identifiers)
    if max_cases is not None and len(identifiers) > max_cases:
        identifiers = sorted(np.random.default_rng(seed).choice(identifiers, max_cases, replace=False))
    cases = []
    for identifier in tqdm(identifiers, desc="realism: loading cases", unit="case"):
        data, seg, _, _ = ds.load_case(identifier)
        cases.append(Case(identifier, np.asarray(data, dtype=np.float32), np.asarray(seg[0])))
    return plan, cases


def around(data: np.ndarray, seg: np.ndarray, plan: SynthPlan) -> np.ndarray:
    """The voxels a lesion's ring is measured on, as everywhere (see :func:`~nnunet_synth.generators.appearance.
    ring_tissue`)."""
    channel = plan.tissue_channel
    return ring_tissue(data[channel], seg, plan.organ_label, plan.clip_floor)


def feature_names(plan: SynthPlan) -> list[str]:
    return [f"{ch.name}:{f}" for ch in plan.channels for f in RING_FEATURES]


def _vector(features: list[dict[str, float]]) -> np.ndarray:
    return np.array([channel[name] for channel in features for name in RING_FEATURES], dtype=np.float64)


def real_lesions(cases: list[Case], plan: SynthPlan, spacing: tuple[float, ...]) -> list[tuple[str, np.ndarray]]:
    """(case, feature vector) of every real tumour, counted as the synth plan counts them."""
    from nnunet_synth.planning import tumour_components

    out = []
    for case in cases:
        components, counted = tumour_components(case.seg == plan.tumour_label, spacing)
        for k, _ in counted:
            features = ring_features(case.data, components == k, around(case.data, case.seg, plan), spacing)
            if features is not None:
                out.append((case.identifier, _vector(features)))
    return out


def measured_texture(cases: list[Case], plan: SynthPlan, spacing: tuple[float, ...]):
    """The tumour texture of ``cases`` alone, measured as ``nnUNetv2_synth_plan`` measures it."""
    from nnunet_synth.planning import case_statistics, tumour_texture

    stats = []
    for case in cases:
        s = case_statistics(case.data, case.seg, spacing, plan.organ_label, plan.tumour_label,
                            clip_floor=plan.clip_floor)
        if s is not None:
            stats.append(dict(s, case=case.identifier))
    return tumour_texture(stats)


def synthetic_lesions(cases: list[Case], plan: SynthPlan, spacing: tuple[float, ...], count: int,
                      rng: np.random.Generator, templates: list | None = None) -> list[tuple[str, np.ndarray]]:
    """(case, feature vector) of ``count`` synthetic lesions inserted into ``cases`` in turn (whole cases)."""
    from nnunet_synth.generators import get_backend
    from nnunet_synth.generators.lesions import insert_tumours

    generator = get_backend(plan.backend)(plan)
    out: list[tuple[str, np.ndarray]] = []
    order = rng.permutation(len(cases))
    for i in range(4 * count):
        if len(out) >= count:
            break
        case = cases[order[i % len(cases)]]
        new_data, new_seg, lesions = insert_tumours(case.data, case.seg, spacing, plan, rng, generator=generator,
                                                    templates=templates, draws=INSERT_DRAWS)
        if not lesions:
            continue
        synthetic = (new_seg == plan.tumour_label) & (case.seg != plan.tumour_label)
        components, n = connected_components(synthetic, structure=np.ones((3,) * synthetic.ndim))
        for k in range(1, n + 1):
            features = ring_features(new_data, components == k, around(new_data, new_seg, plan), spacing)
            if features is not None and len(out) < count:
                out.append((case.identifier, _vector(features)))
    return out


def contender_plan(plan: SynthPlan, name: str, sources: list[Case], spacing: tuple[float, ...]
                   ) -> tuple[SynthPlan, list | None]:
    """The plan of a contender with its texture measured on ``sources`` only, and its templates from them."""
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}; expected one of {', '.join(CONTENDERS)}")
    backend, params = CONTENDERS[name]
    texture = measured_texture(sources, plan, spacing)
    plan = plan.with_backend(backend).replace(backend_params={**plan.backend_params, **params}, texture=texture
                                              ).validated(f"realism benchmark plan of {name}")
    templates = None
    if plan.shapes.deformation == "template":
        from nnunet_synth.generators.templates import case_templates

        templates = [t for case in sources for t in case_templates(case.data, case.seg, plan.tumour_label, spacing,
                                                                   plan.organ_label, case.identifier,
                                                                   plan.clip_floor)]
        if not templates:
            raise ValueError(f"{name}: the source half holds no real tumour to use as a template")
    return plan, templates


def compare(reference: list[tuple[str, np.ndarray]], other: list[tuple[str, np.ndarray]], names: list[str],
            seed: int, n_repeats: int) -> dict:
    """The realism AUC of ``other`` against the real ``reference`` (folds grouped by case)."""
    x = np.stack([v for _, v in reference] + [v for _, v in other])
    y = np.r_[np.zeros(len(reference), bool), np.ones(len(other), bool)]
    groups = [f"ref:{c}" for c, _ in reference] + [f"other:{c}" for c, _ in other]
    return realism_auc(x, y, groups, names, n_repeats=n_repeats, seed=seed, top_features=5)


def run_benchmark(plan: SynthPlan, cases: list[Case], contenders: list[str], seeds: list[int],
                  n_repeats: int = 2) -> dict:
    """AUC per seed of the floor (``real``) and of each contender against the real tumours of half A.

    Returns:
        ``{name: {"auc": [per seed], "top_features": Counter of top-5 features over seeds, "n": [(n_ref, n_other)]}}``
    """
    spacing = tuple(plan.spacing[-cases[0].seg.ndim:])
    names = feature_names(plan)
    results: dict[str, dict] = {n: {"auc": [], "top_features": Counter(), "n": []} for n in [REAL, *contenders]}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(cases))
        half_a = [cases[i] for i in order[: len(cases) // 2]]
        half_b = [cases[i] for i in order[len(cases) // 2:]]
        reference = real_lesions(half_a, plan, spacing)
        others = {REAL: real_lesions(half_b, plan, spacing)}
        for name in contenders:
            contender, templates = contender_plan(plan, name, half_b, spacing)
            others[name] = synthetic_lesions(half_b, contender, spacing, len(reference), rng, templates)
        for name, other in others.items():
            result = compare(reference, other, names, seed, n_repeats)
            results[name]["auc"].append(result["auc"])
            results[name]["n"].append((len(reference), len(other)))
            results[name]["top_features"].update(f["feature"] for f in result["top_features"])
    return results


def format_table(results: dict, title: str) -> str:
    """One table: AUC mean, spread and range over seeds, lesion counts and the features that separate most often."""
    lines = [title, f"{'contender':<16}{'AUC':>7}{'sd':>7}{'min':>7}{'max':>7}  {'n real/other':<14}top features"]
    for name, r in results.items():
        auc = np.asarray(r["auc"])
        n_ref = int(np.mean([a for a, _ in r["n"]]))
        n_other = int(np.mean([b for _, b in r["n"]]))
        top = ", ".join(f for f, _ in r["top_features"].most_common(4))
        lines.append(f"{name:<16}{auc.mean():7.3f}{auc.std():7.3f}{auc.min():7.3f}{auc.max():7.3f}  "
                     f"{f'{n_ref}/{n_other}':<14}{top}")
    return "\n".join(lines)
