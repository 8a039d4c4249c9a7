"""The synth plan: ``nnUNetSynthPlans.json`` beside ``nnUNetPlans.json``.

It records which label is the organ (placement region) and which the tumour, the size distribution of the
real tumours in mm, per-channel intensity priors of tumour against organ in nnU-Net's normalised space,
and the shape, placement and backend settings. Dataset-level settings sit at the top (edit them by hand
to change backend or shapes); statistics that depend on the configuration's resampling sit under
``configurations``. Statistics use all preprocessed cases, as nnU-Net's own fingerprint does (a dataset whose
tumours are hidden behind the ignore label: the kept masks of one fold's training cases). A merged dataset's
healthy controls (``healthy_cases.json`` of its raw folder) become the plan's ``healthy_cases``. This module
measures and writes; :mod:`nnunet_synth.synth_plan` holds the typed, validated object that everything reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.ndimage import label as connected_components
from tqdm import tqdm

from nnunet_synth.files import creation_lock
from nnunet_synth.generators.appearance import QUANTILE_LEVELS, RING_MM, measure_tumour, ring_tissue
from nnunet_synth.generators.placement import PlacementRules
from nnunet_synth.generators.regions import BREAST_COHORTS, FGT_SMOOTHING_MM, measure_fgt, summarise_fgt
from nnunet_synth.generators.shapes import SIZE_CLASSES, equivalent_diameter_mm
from nnunet_synth.generators.splits import parse_fold
from nnunet_synth.synth_plan import (
    DEFAULT_PLANS_IDENTIFIER,
    DEFAULT_SEED,
    HEALTHY_CASES_FILE,
    SYNTH_PLANS_FILE,  # noqa: F401 - re-exported: the file name of the default plans
    ChannelPrior,
    ShapeSettings,
    SynthPlan,
    SynthPlanError,
    TissueRegion,
    TumourAppearance,
    TumourSizes,
    TumourTexture,
    _jsonable,
    flat_plan,
    read_synth_plans_file,
    synth_plan_file,
)

ORGAN_WORDS = ("liver", "pancreas", "kidney", "breast", "brain", "organ", "lung", "prostate", "spleen", "tissue",
               "fibroglandular")
TUMOUR_WORDS = ("tumour", "tumor", "lesion", "cancer", "mass", "metasta", "nodule", "carcinoma", "hcc", "neoplasm")

# Label-free liver paper: tumour darker by U(65, 145)/255 of a 210 HU window, times a texture of mean ~0.525,
# i.e. a mean difference of about 27-63 HU.
CT_DEFAULT_CONTRAST_HU = (-63.0, -27.0)
# MRI has no absolute scale: default contrast in units of the organ's standard deviation (hypointense).
MRI_DEFAULT_CONTRAST_ORGAN_STD = (-2.0, -1.0)
MAX_CASES_FOR_STATISTICS = 100
# Datasets without an organ label: lesions go in a smooth tissue region whose intensity range is measured in the
# unlabelled tissue within this distance of the real tumours (channel 0 smoothed at TISSUE_SMOOTHING_MM).
BAND_SHELL_MM = 10.0
TISSUE_PERCENTILES = (5, 95)
TISSUE_WIDENING = 0.25  # of the percentile range, on each side
TISSUE_SMOOTHING_MM = 2.0
# Label fragments are not tumours: components below these sizes stay out of the size statistics.
MIN_TUMOUR_VOXELS = 8
MIN_TUMOUR_DIAMETER_MM = 5.0
MIN_TUMOUR_SHARE = 0.1
MAX_TEXTURE_TUMOURS = 200  # appearance records kept in the plan
DEFAULT_EDGE_SIGMA_MM = 1.0

def preprocessed_dir(dataset: str | int) -> Path:
    """``nnUNet_preprocessed/DatasetNNN_Name`` for a dataset name or ID."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return Path(nnUNet_preprocessed.require()) / maybe_convert_to_dataset_name(dataset)


def _pick_label(labels: dict[str, int | list], words: tuple[str, ...], given: int | None, what: str,
                flag: str) -> int:
    """The label value named by one of ``words`` (or ``given``, checked); errors list the labels and the flag."""
    listing = ", ".join(f"{v}={k!r}" for k, v in labels.items())
    if given is not None:
        if given not in set(labels.values()) - {0}:
            raise SynthPlanError(f"{flag} {given} is not a foreground label of this dataset ({listing})")
        return given
    hits = [v for k, v in labels.items() if v != 0 and any(w in k.lower() for w in words)]
    if len(hits) != 1:
        reason = "no label name matches" if not hits else f"several labels match ({hits})"
        raise SynthPlanError(f"cannot tell which label is the {what}: {reason} "
                             f"{'/'.join(words[:6])}... Labels of this dataset: {listing}. Pass {flag} N.")
    return hits[0]


def guess_tumour_label(labels: dict[str, int | list], tumour_label: int | None = None) -> int:
    """The tumour label value, from the names in dataset.json unless given (see :func:`guess_labels`)."""
    return _pick_label(labels, TUMOUR_WORDS, tumour_label, "tumour", "--tumour-label")


def guess_labels(labels: dict[str, int | list], organ_label: int | None = None,
                 tumour_label: int | None = None) -> tuple[int | None, int]:
    """Organ and tumour label values, from the names in dataset.json unless given.

    A dataset whose only foreground label is the tumour (breast DCE cohorts) gets organ None: placement
    then uses a tissue region like the tissue around real tumours (see :func:`case_statistics` and
    :func:`nnunet_synth.generators.lesions.tissue_region`).

    Raises:
        SynthPlanError: when a label cannot be identified; the message lists the labels and the flag to pass.
    """
    regions = {k: v for k, v in labels.items() if not isinstance(v, int)}
    if regions:
        raise SynthPlanError(f"dataset.json defines region labels {regions}: region-based training is not "
                             f"supported by the synth trainers; use integer labels")
    values = set(labels.values()) - {0}
    tumour = guess_tumour_label(labels, tumour_label)
    if organ_label is None and values - {tumour, labels.get("ignore")} == set():
        return None, tumour
    organ = _pick_label(labels, ORGAN_WORDS, organ_label, "organ (placement region)", "--organ-label")
    if organ == tumour:
        raise SynthPlanError(f"organ and tumour label are both {organ}; pass --organ-label and --tumour-label")
    if labels.get("ignore") in (organ, tumour):
        raise SynthPlanError("the ignore label cannot be the organ or tumour label")
    return organ, tumour


def tumour_components(tumour: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, list[tuple[int, float]]]:
    """The tumours of one case, counted as clinically meant: connected components (full connectivity) of at least
    ``MIN_TUMOUR_DIAMETER_MM`` equivalent diameter and at least ``MIN_TUMOUR_SHARE`` of the case's largest
    component (label fragments and satellite specks of a multi-class annotation are part of their tumour).

    Returns:
        (the component labels, (label, equivalent diameter in mm) of every counted tumour).
    """
    components, n = connected_components(tumour, structure=np.ones((3,) * tumour.ndim))
    if not n:
        return components, []
    sizes = np.bincount(components.ravel())[1:]
    keep = np.flatnonzero((sizes >= MIN_TUMOUR_SHARE * sizes.max()) & (sizes >= MIN_TUMOUR_VOXELS)) + 1
    counted = [(int(k), equivalent_diameter_mm(int(sizes[k - 1]), spacing)) for k in keep]
    return components, [(k, d) for k, d in counted if d >= MIN_TUMOUR_DIAMETER_MM]


def count_tumours(tumour: np.ndarray, spacing: tuple[float, ...]) -> list[float]:
    """Equivalent diameters (mm) of the tumours of one case (see :func:`tumour_components`)."""
    return [d for _, d in tumour_components(tumour, spacing)[1]]


TUMOUR_RULE = (f"connected components of >= {MIN_TUMOUR_DIAMETER_MM} mm equivalent diameter and >= "
               f"{MIN_TUMOUR_SHARE:.0%} of their case's largest tumour")


def tumour_sizes(diameters: list[float], cases: int) -> TumourSizes:
    """Quartiles of equivalent diameters and a radius per quartile class (the pancreas paper's method)."""
    if not diameters:
        return TumourSizes(rule=TUMOUR_RULE)
    d = np.sort(np.asarray(diameters))
    q = np.percentile(d, [25, 50, 75])
    groups = np.array_split(d, 4) if d.size >= 4 else [d] * 4
    return TumourSizes(count=int(d.size), cases=cases, rule=TUMOUR_RULE,
                       equivalent_diameter_mm={"min": float(d[0]), "q25": float(q[0]), "median": float(q[1]),
                                               "q75": float(q[2]), "max": float(d[-1])},
                       class_radius_mm={c: float(np.median(g) / 2) for c, g in zip(SIZE_CLASSES, groups)})


def tumour_shell(tumour: np.ndarray, seg: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Unlabelled voxels within ``BAND_SHELL_MM`` of a tumour: the tissue tumours of this dataset sit in."""
    return (seg == 0) & (distance_transform_edt(~tumour, sampling=spacing) <= BAND_SHELL_MM)


def case_statistics(data: np.ndarray, seg: np.ndarray, spacing: tuple[float, ...], organ_label: int | None,
                    tumour_label: int, volume_spacing: tuple[float, ...] | None = None,
                    clip_floor: float | None = None, patch_size: tuple[int, ...] | None = None) -> dict | None:
    """Intensity and size statistics of one case (C, *spatial) with labels (*spatial).

    Without an organ label the unlabelled tissue within ``BAND_SHELL_MM`` of real tumours stands in for the
    organ, and the smoothed channel-0 intensities found there give the tissue region's range.

    ``volume_spacing``: the spacing of all axes of ``seg`` where ``spacing`` has the in-plane ones only (2d
    configurations store 3D cases); the tumours' appearance is measured with it. ``clip_floor``: the CT window's
    floor of channel 0, whose voxels stay out of the tumours' rings (see
    :func:`~nnunet_synth.generators.appearance.ring_tissue`). Without an organ label the case's fibroglandular
    tissue statistics are measured too (:func:`~nnunet_synth.generators.regions.measure_fgt`; the breast size also
    in a window of ``patch_size``).

    Returns:
        A dict of per-channel means/stds, tumour diameters and tissue percentiles; None when the case has no
        placement region (no organ voxel, or no tumour to find the tissue around).
    """
    tumour = seg == tumour_label
    tissue = fgt = None
    volume_spacing = tuple(spacing) if volume_spacing is None else tuple(volume_spacing)
    if organ_label is None:
        if not tumour.any():
            return None
        organ = tumour_shell(tumour, seg, spacing)
        smooth = gaussian_filter(data[0].astype(np.float32), TISSUE_SMOOTHING_MM / np.asarray(spacing))
        if organ.any():  # the central range of the tissue, widened: a lesion needs room, not the typical voxel only
            lo, hi = np.percentile(smooth[organ], TISSUE_PERCENTILES)
            tissue = [float(lo - TISSUE_WIDENING * (hi - lo)), float(hi + TISSUE_WIDENING * (hi - lo))]
        if len(volume_spacing) == seg.ndim:  # fibroglandular tissue: the breast plans' placement region
            same = FGT_SMOOTHING_MM == TISSUE_SMOOTHING_MM and len(spacing) == seg.ndim
            fgt_smooth = smooth if same else gaussian_filter(data[0].astype(np.float32),
                                                             FGT_SMOOTHING_MM / np.asarray(volume_spacing))
            fgt = measure_fgt(data[0], fgt_smooth, seg, volume_spacing, organ, patch_size)
    else:
        organ = seg == organ_label
    if not organ.any():
        return None
    components, counted = tumour_components(tumour, spacing)
    # a tumour's ring is the organ around it, or without an organ label the unlabelled tissue (not fill)
    around = ring_tissue(data[0], seg, organ_label, clip_floor)
    appearance = [measure_tumour(data, components == k, around, volume_spacing) for k, _ in counted]
    return {"organ_mean": [float(ch[organ].mean()) for ch in data],
            "organ_std": [float(ch[organ].std()) for ch in data],
            "tumour_mean": [float(ch[tumour].mean()) for ch in data] if tumour.any() else None,
            "diameters": [d for _, d in counted], "tissue": tissue, "fgt": fgt,
            "appearance": [a for a in appearance if a is not None]}


def channel_priors(stats: list[dict], channel_names: list[str], schemes: list[str], intensity_properties: dict | None,
                   organ_label: int | None) -> tuple[ChannelPrior, ...]:
    """Per-channel contrast range of tumour minus organ (or surrounding tissue) in normalised units, from the
    real tumours or modality defaults."""
    around = "organ" if organ_label is not None else "surrounding tissue"
    channels = []
    for c, (name, scheme) in enumerate(zip(channel_names, schemes)):
        organ_mean = float(np.mean([s["organ_mean"][c] for s in stats]))
        organ_std = float(np.mean([s["organ_std"][c] for s in stats]))
        contrasts = [s["tumour_mean"][c] - s["organ_mean"][c] for s in stats if s["tumour_mean"] is not None]
        clip = None
        props = (intensity_properties or {}).get(str(c))
        if scheme == "CTNormalization" and props:
            clip = ((props["percentile_00_5"] - props["mean"]) / props["std"],
                    (props["percentile_99_5"] - props["mean"]) / props["std"])
        if contrasts:
            lo, hi = np.percentile(contrasts, [10, 90])
            if hi - lo < 0.2 * abs(np.mean(contrasts)):  # one or two cases: widen to +-20%
                mid = float(np.mean(contrasts))
                lo, hi = mid - 0.2 * abs(mid), mid + 0.2 * abs(mid)
            source = f"real tumours ({len(contrasts)} cases): 10th-90th percentile of tumour minus {around} mean"
        elif scheme == "CTNormalization" and props:
            lo, hi = (np.array(CT_DEFAULT_CONTRAST_HU) / props["std"])
            source = f"CT default: {CT_DEFAULT_CONTRAST_HU} HU through CTNormalization (std {props['std']:.1f} HU)"
        else:
            lo, hi = np.array(MRI_DEFAULT_CONTRAST_ORGAN_STD) * organ_std
            source = f"default: {MRI_DEFAULT_CONTRAST_ORGAN_STD} x {around} standard deviation ({organ_std:.3f})"
        channels.append(ChannelPrior(name=name, normalization=scheme, organ_mean=organ_mean, organ_std=organ_std,
                                     contrast_range=(float(lo), float(hi)), contrast_source=source,
                                     clip=None if clip is None else (float(clip[0]), float(clip[1]))))
    return tuple(channels)


def summarise_statistics(stats: list[dict], channel_names: list[str], schemes: list[str],
                         intensity_properties: dict | None, organ_label: int | None) -> dict:
    """The statistics fields of a :class:`SynthPlan` (channels, tumour_sizes, tissue, fgt, texture) from per-case
    statistics."""
    tissue = fgt = None
    if organ_label is None:
        ranges = [s["tissue"] for s in stats if s["tissue"] is not None]
        tissue = TissueRegion(channel=0, range=tuple(float(v) for v in np.mean(ranges, axis=0)),
                              smoothing_mm=TISSUE_SMOOTHING_MM,
                              source=f"{TISSUE_PERCENTILES} percentiles, widened by {TISSUE_WIDENING:.0%} each "
                                     f"side, of channel 0 (smoothed {TISSUE_SMOOTHING_MM} mm) within "
                                     f"{BAND_SHELL_MM} mm of real tumours, unlabelled voxels")
        fgt = summarise_fgt([s.get("fgt") for s in stats])
    diameters = [d for s in stats for d in s["diameters"]]
    return {"channels": channel_priors(stats, channel_names, schemes, intensity_properties, organ_label),
            "tumour_sizes": tumour_sizes(diameters, sum(1 for s in stats if s["diameters"])), "tissue": tissue,
            "fgt": fgt, "texture": tumour_texture(stats)}


def tumour_texture(stats: list[dict]) -> TumourTexture | None:
    """The real tumours' appearance records (None without real tumours). A texture scale or edge that one tumour
    does not show (too faint, too small) is the median of the others; a dataset where none shows an edge gets
    ``DEFAULT_EDGE_SIGMA_MM``."""
    records = [dict(a, case=s.get("case", "")) for s in stats for a in s.get("appearance", [])][:MAX_TEXTURE_TUMOURS]
    if not records:
        return None
    fallback = {"texture_sigma_mm": 1.0, "nugget": 0.0, "edge_sigma_mm": DEFAULT_EDGE_SIGMA_MM, "edge_offset_mm": 0.0}
    for key, default in fallback.items():
        measured = [r[key] for r in records if np.isfinite(r[key])]
        for r in records:
            if not np.isfinite(r[key]):
                r[key] = float(np.median(measured)) if measured else default
    tumours = tuple(TumourAppearance(case=r["case"], quantiles=tuple(tuple(q) for q in r["quantiles"]),
                                     texture_sigma_mm=float(r["texture_sigma_mm"]), nugget=float(r["nugget"]),
                                     edge_sigma_mm=float(r["edge_sigma_mm"]),
                                     edge_offset_mm=float(r["edge_offset_mm"])) for r in records)
    return TumourTexture(levels=QUANTILE_LEVELS, tumours=tumours,
                         source=f"{len(tumours)} real tumours: intensities in units of the tissue ring "
                                f"{RING_MM[0]}-{RING_MM[1]} mm outside each (median, IQR/1.349), texture scale from "
                                f"the in-plane autocorrelation, edge from a normal-CDF fit across the border")


def configuration_statistics(dataset: str | int, configuration: str, organ_label: int | None, tumour_label: int,
                             plans_identifier: str = DEFAULT_PLANS_IDENTIFIER, seed: int = 0,
                             fold: int | str = 0) -> dict:
    """Spacing, tumour sizes, intensity priors (and tissue region) from the configuration's preprocessed cases,
    in the JSON form stored under ``configurations.<name>``.

    A dataset with hidden tumours (:mod:`~nnunet_synth.dataset_conversion.hidden_tumours`) is measured on the
    kept tumour masks of ``fold``'s training cases only (its validation cases' tumours are what a transfer
    benchmark scores); other datasets on all cases, as nnU-Net's fingerprint.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_synth.dataset_conversion.hidden_tumours import HiddenTumourLabels
    from nnunet_synth.generators.splits import split_cases

    base = preprocessed_dir(dataset)
    plans = load_json(base / f"{plans_identifier}.json")
    dataset_json = load_json(base / "dataset.json")
    conf = PlansManager(plans).get_configuration(configuration)
    folder = base / conf.data_identifier
    if not folder.is_dir():
        raise SynthPlanError(f"{folder} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset} "
                             f"-c {configuration} first")
    ds = infer_dataset_class(str(folder))(str(folder))
    hidden = HiddenTumourLabels.of(base, plans_identifier, configuration)
    identifiers = sorted(ds.identifiers) if hidden is None else \
        split_cases(dataset, configuration, fold, plans_identifier)[0]
    rng = np.random.default_rng(seed)
    if len(identifiers) > MAX_CASES_FOR_STATISTICS:
        identifiers = sorted(rng.choice(identifiers, MAX_CASES_FOR_STATISTICS, replace=False))
    spacing = tuple(float(s) for s in conf.spacing)
    stats = []
    props = (plans.get("foreground_intensity_properties_per_channel") or {}).get("0")
    floor = (props["percentile_00_5"] - props["mean"]) / props["std"] if props and \
        conf.normalization_schemes[0] == "CTNormalization" else None
    for identifier in tqdm(identifiers, desc=f"synth plan: statistics of {configuration}", unit="case"):
        data, seg, _, _ = ds.load_case(identifier)
        data, seg = np.asarray(data), np.asarray(seg[0] if hidden is None else hidden.segmentation(identifier, seg)[0])
        # a 2d configuration stores 3D cases: their through-plane spacing is the dataset's median one
        volume_spacing = spacing if len(spacing) == seg.ndim else (
            *plans["original_median_spacing_after_transp"][:seg.ndim - len(spacing)], *spacing)
        case = case_statistics(data, seg, spacing[-seg.ndim:], organ_label, tumour_label, volume_spacing, floor,
                               tuple(conf.patch_size) if len(spacing) == seg.ndim else None)
        if case is not None:
            stats.append(dict(case, case=identifier))
    if not stats:
        what = f"the organ label {organ_label}" if organ_label is not None else "a real tumour (needed to " \
            "find the tissue around tumours, as this dataset has no organ label)"
        raise SynthPlanError(f"no preprocessed case of {base.name} ({configuration}) contains {what}; "
                             f"pass the right --organ-label")
    channels = [name for _, name in sorted(dataset_json["channel_names"].items(), key=lambda kv: int(kv[0]))]
    summary = summarise_statistics(stats, channels, conf.normalization_schemes,
                                   plans.get("foreground_intensity_properties_per_channel"), organ_label)
    tissue, texture, fgt = summary["tissue"], summary["texture"], summary["fgt"]
    return _jsonable({"spacing": list(spacing), "tumour_sizes": dataclasses.asdict(summary["tumour_sizes"]),
                      "intensity": {"channels": [dataclasses.asdict(c) for c in summary["channels"]]},
                      "tissue": None if tissue is None else dataclasses.asdict(tissue),
                      "fgt": None if fgt is None else dataclasses.asdict(fgt),
                      "texture": None if texture is None else dataclasses.asdict(texture),
                      "statistics_fold": None if hidden is None else fold})


def default_region(dataset_json: dict, organ_label: int | None) -> str | None:
    """The default placement region: ``fgt`` for breast cohorts without organ label (the SynBT paper's placement in
    fibroglandular tissue; ``cohort`` of dataset.json, see :data:`~nnunet_synth.generators.regions.BREAST_COHORTS`),
    else None (the organ label, or the tissue around real tumours)."""
    cohort = (dataset_json.get("nnunet_synth") or {}).get("cohort")
    return "fgt" if organ_label is None and cohort in BREAST_COHORTS else None


def default_plan(dataset_json: dict, dataset_name: str, plans_identifier: str, organ_label: int | None,
                 tumour_label: int) -> dict:
    """Dataset-level settings with their defaults (edit the JSON to change them)."""
    return {
        "dataset_name": dataset_name,
        "plans_identifier": plans_identifier,
        "labels": dataset_json["labels"],
        "organ_label": organ_label,
        "tumour_label": tumour_label,
        "backend": "analytic",
        "backend_params": {},
        "shapes": dataclasses.asdict(ShapeSettings()),
        "placement": dataclasses.asdict(PlacementRules()),
        "placement_region": default_region(dataset_json, organ_label),
        "seed": DEFAULT_SEED,
        "configurations": {},
    }


def read_healthy_cases(dataset_name: str, identifiers: list[str], dataset_json: dict | None = None
                       ) -> list[str] | None:
    """The healthy-control cases of a dataset: ``healthy_cases.json`` of its raw folder (``nnUNet_raw/<name>``,
    written by ``nnUNetv2_synth_convert merge``), checked against the preprocessed ``identifiers``.

    Returns:
        The sorted identifiers, or None where the file is absent (or ``nnUNet_raw`` unset): the plan keeps what it
        holds. A dataset.json that names the file (``healthy_cases_file``) without it being found gets a warning.

    Raises:
        SynthPlanError: the file is not a JSON list of strings, or names cases that were not preprocessed.
    """
    from nnunet_synth.dataset_conversion.common import _nnunet_path

    raw = _nnunet_path("nnUNet_raw")
    path = Path(raw) / dataset_name / HEALTHY_CASES_FILE if raw else None
    if path is None or not path.is_file():
        if dataset_json is not None and dataset_json.get("healthy_cases_file"):
            warnings.warn(f"dataset.json of {dataset_name} lists its healthy controls in "
                          f"{dataset_json['healthy_cases_file']}, which is not at {path or '$nnUNet_raw (unset)'}: "
                          f"the synth plan keeps the healthy cases it holds", stacklevel=2)
        return None
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SynthPlanError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
        raise SynthPlanError(f"{path}: expected a JSON list of case identifiers, got {str(listed)[:200]}")
    unknown = sorted(set(listed) - set(identifiers))
    if unknown:
        raise SynthPlanError(f"{path}: {len(unknown)} healthy case(s) are not among the {len(identifiers)} "
                             f"preprocessed cases of {dataset_name}: {unknown[:10]}")
    return sorted(set(listed))


def write_json_atomic(obj: dict | list, path: Path) -> None:
    """Writes JSON to a temporary file and renames it, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def plan_synth(dataset: str | int, configuration: str = "3d_fullres", organ_label: int | None = None,
               tumour_label: int | None = None, plans_identifier: str = DEFAULT_PLANS_IDENTIFIER,
               overwrite: bool = False, fold: int | str = 0) -> Path:
    """Creates or updates the synth plan of ``plans_identifier`` for one configuration.

    An existing file keeps its hand edits and gets fresh statistics; ``overwrite`` rebuilds it from the dataset
    whatever it holds (also an unreadable file). ``fold`` matters for datasets with hidden tumours only: their
    statistics come from its training cases (see :func:`configuration_statistics`).

    Returns:
        Path of the written synth plan.
    """
    base = preprocessed_dir(dataset)
    if not (base / f"{plans_identifier}.json").is_file():
        raise SynthPlanError(f"{base / f'{plans_identifier}.json'} not found: run nnUNetv2_plan_and_preprocess "
                             f"-d {dataset} first")
    dataset_json = load_json(base / "dataset.json")
    path = synth_plan_file(base, plans_identifier)
    plan = read_synth_plans_file(path) if path.is_file() and not overwrite else None
    if plan is None or organ_label is not None or tumour_label is not None:
        organ, tumour = guess_labels(dataset_json["labels"], organ_label, tumour_label)
        if plan is None:
            plan = default_plan(dataset_json, base.name, plans_identifier, organ, tumour)
        elif organ != plan.get("organ_label"):  # the region follows a changed organ label
            plan["placement_region"] = default_region(dataset_json, organ)
        plan.update(organ_label=organ, tumour_label=tumour)
    # plans written before the FGT region: breast cohorts get it (a hand-set value, also null, stays)
    plan.setdefault("placement_region", default_region(dataset_json, plan["organ_label"]))
    stats = configuration_statistics(dataset, configuration, plan["organ_label"], plan["tumour_label"],
                                     plans_identifier, plan["seed"], fold)
    # the healthy controls (merged datasets): preferred insertion targets; a plan keeps its list without the raw file
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = base / PlansManager(load_json(base / f"{plans_identifier}.json")).get_configuration(
        configuration).data_identifier
    healthy = read_healthy_cases(base.name, sorted(f.stem for f in folder.glob("*.pkl")), dataset_json)
    if healthy is not None:
        plan["healthy_cases"] = healthy
    shapes = plan.setdefault("shapes", {})
    count = stats["tumour_sizes"]["count"]
    if count >= 4 and shapes.get("size_preset") == "labelfree":
        shapes["size_preset"] = "quartile"
    if count == 0 and shapes.get("size_preset") == "quartile":
        warnings.warn(f"{base.name} has no real tumours: size preset 'quartile' falls back to 'labelfree'",
                      stacklevel=2)
        shapes["size_preset"] = "labelfree"
    plan["configurations"][configuration] = stats
    plan.pop("intensity_band", None)
    for conf in plan["configurations"].values():
        conf.pop("intensity_band", None)
    SynthPlan.from_dict(flat_plan(plan, configuration), str(path)).validated(str(path), dataset_json)
    write_json_atomic(plan, path)
    return path


def load_synth_plan(dataset: str | int, configuration: str, plans_identifier: str = DEFAULT_PLANS_IDENTIFIER,
                    create: bool = True, fold: int | str = 0) -> SynthPlan:
    """The validated plan of one configuration: dataset-level settings merged with its statistics.

    Creates the plan (or its configuration section) with defaults when ``create`` is set and none exists (with
    the statistics of ``fold``'s training cases where the dataset hides its tumours).

    Raises:
        SynthPlanError: an unreadable file, or a key that does not fit the dataset (naming file, key and value).
    """
    base = preprocessed_dir(dataset)
    path = synth_plan_file(base, plans_identifier)
    raw = read_synth_plans_file(path) if path.is_file() else None
    if raw is None or configuration not in raw["configurations"]:
        if not create:
            raise SynthPlanError(f"no synth plan for {configuration} in {path}: run nnUNetv2_synth_plan "
                                 f"-d {dataset} -c {configuration}" + (f" -p {plans_identifier}" if plans_identifier
                                                                       != DEFAULT_PLANS_IDENTIFIER else ""))
        with creation_lock(path):  # one creator: the folds and DDP ranks starting together find it made
            raw = read_synth_plans_file(path) if path.is_file() else None
            if raw is None or configuration not in raw["configurations"]:
                raw = read_synth_plans_file(plan_synth(dataset, configuration, plans_identifier=plans_identifier,
                                                       fold=fold))
    dataset_json = load_json(base / "dataset.json")
    return SynthPlan.from_dict(flat_plan(raw, configuration), str(path)).validated(str(path), dataset_json)


def main(argv: list[str] | None = None) -> None:
    from nnunet_synth.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_plan", formatter_class=HelpFormatter, description="Write "
                                     "the synth plan (organ/tumour labels, tumour sizes, intensity priors) for a "
                                     "dataset.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or ID")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS_IDENTIFIER, help="plans identifier")
    parser.add_argument("--organ-label", type=int, help="label value of the organ (placement region)")
    parser.add_argument("--tumour-label", type=int, help="label value of the tumour")
    parser.add_argument("--overwrite", action="store_true", help="rebuild the plan from the dataset, dropping "
                        "hand edits (also repairs an unreadable file)")
    parser.add_argument("-f", "--fold", type=parse_fold, default=0,
                        help="datasets with hidden tumours: measure the kept tumour masks of this fold's training "
                             "cases only (others use all cases)")
    args = parser.parse_args(argv)
    # in turn with trainers creating the plan, so that neither loses the other's configuration section
    with creation_lock(synth_plan_file(preprocessed_dir(args.dataset), args.plans)):
        path = plan_synth(args.dataset, args.configuration, args.organ_label, args.tumour_label, args.plans,
                          overwrite=args.overwrite, fold=args.fold)
    plan = load_synth_plan(args.dataset, args.configuration, args.plans, create=False)
    print(f"wrote {path}")
    print(format_plan(plan))


def format_plan(plan: SynthPlan) -> str:
    """A short human-readable summary of a synth plan (for the console and the training log)."""
    sizes = plan.tumour_sizes
    if plan.organ_label is not None:
        region, around = f"organ label {plan.organ_label}", "organ"
    elif plan.region_kind == "fgt":
        fgt = plan.fgt
        region = (f"no organ label: fibroglandular tissue of channel {fgt.channel} in {list(fgt.range)} (smoothed "
                  f"{fgt.smoothing_mm} mm) inside the body (above {fgt.body_threshold:.3f}, {fgt.skin_margin_mm} mm "
                  f"of skin left out), lesions placed whole")
        if plan.shapes.deformation == "template" and fgt.breast_size_mm:
            region += (f"; templates scaled by the breast size over the training median ({fgt.breast_size_mm:.0f} mm "
                       f"whole case, {fgt.breast_size_patch_mm or float('nan'):.0f} mm in a patch)")
        around = "surrounding tissue"
    else:
        region = (f"no organ label: tissue region of channel {plan.tissue.channel} in {list(plan.tissue.range)} "
                  f"(smoothed {plan.tissue.smoothing_mm} mm), lesions placed whole")
        around = "surrounding tissue"
    lines = [f"synth plan of {plan.dataset_name} ({plan.configuration}, {plan.plans_identifier}): {region}, "
             f"tumour label {plan.tumour_label}, backend {plan.backend}"
             + ("" if plan.statistics_fold is None else f"; real tumours hidden (ignore label {plan.ignore_label}), "
                f"statistics from the kept masks of fold {plan.statistics_fold}'s training cases"),
             f"  shapes: {dataclasses.asdict(plan.shapes)}; placement: {dataclasses.asdict(plan.placement)}"]
    if plan.organ_label is None and plan.region_kind == "fgt":
        lines.append(f"  fibroglandular tissue: {plan.fgt.source}")
    if plan.healthy_cases:
        lines.append(f"  healthy controls: {len(plan.healthy_cases)} cases, preferred as insertion targets")
    if sizes.count:
        lines.append(f"  real tumours: {sizes.count} in {sizes.cases} cases ({sizes.rule}), equivalent diameter mm "
                     f"{ {k: round(v, 1) for k, v in sizes.equivalent_diameter_mm.items()} }")
    else:
        lines.append("  real tumours: 0 (label-free: modality defaults)")
    texture = plan.texture
    if texture is not None:
        lines.append(f"  texture of {len(texture.tumours)} real tumours ({texture.source}); median scale "
                     f"{texture.median('texture_sigma_mm'):.2f} mm, white share {texture.median('nugget'):.2f}, edge "
                     f"width {texture.median('edge_sigma_mm'):.2f} mm centred {texture.median('edge_offset_mm'):+.2f} "
                     f"mm inside the border")
        for c, ch in enumerate(plan.channels):
            q = dict(zip(texture.levels, texture.median_quantiles(c)))
            lines.append(f"  channel {ch.name}: median tumour quantiles in ring units "
                         f"{ {round(k, 2): round(v, 2) for k, v in q.items()} }")
    else:
        lines.append("  texture: no real tumours measured, the label-free paper's texture")
    for ch in plan.channels:
        lo, hi = ch.contrast_range
        lines.append(f"  channel {ch.name} ({ch.normalization}): tumour minus {around} [{lo:.3f}, {hi:.3f}] "
                     f"normalised units; {ch.contrast_source}")
    return "\n".join(lines)
