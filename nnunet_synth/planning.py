"""The synth plan: ``nnUNetSynthPlans.json`` beside ``nnUNetPlans.json``.

It records which label is the organ (placement region) and which the tumour, the size distribution of the
real tumours in mm, per-channel intensity priors of tumour against organ in nnU-Net's normalised space,
and the shape, placement and backend settings. Dataset-level settings sit at the top (edit them by hand
to change backend or shapes); statistics that depend on the configuration's resampling sit under
``configurations``. Statistics use all preprocessed cases, as nnU-Net's own fingerprint does.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from scipy.ndimage import label as connected_components
from tqdm import tqdm

from nnunet_synth.generators.shapes import SIZE_CLASSES, equivalent_diameter_mm

SYNTH_PLANS_FILE = "nnUNetSynthPlans.json"
ORGAN_WORDS = ("liver", "pancreas", "kidney", "breast", "brain", "organ", "lung", "prostate", "spleen", "tissue",
               "fibroglandular")
TUMOUR_WORDS = ("tumour", "tumor", "lesion", "cancer", "mass", "metasta", "nodule", "carcinoma", "hcc", "neoplasm")

# Label-free liver paper: tumour darker by U(65, 145)/255 of a 210 HU window, times a texture of mean ~0.525,
# i.e. a mean difference of about 27-63 HU.
CT_DEFAULT_CONTRAST_HU = (-63.0, -27.0)
# MRI has no absolute scale: default contrast in units of the organ's standard deviation (hypointense).
MRI_DEFAULT_CONTRAST_ORGAN_STD = (-2.0, -1.0)
MAX_CASES_FOR_STATISTICS = 100
# Datasets without an organ label (breast DCE): lesions go where seg is background and channel 0 lies in the
# band of intensities found within this distance of the real tumours (their surrounding tissue).
BAND_SHELL_MM = 10.0
BAND_PERCENTILES = (10, 90)
# Label fragments are not tumours: components below this size stay out of the size statistics.
MIN_TUMOUR_VOXELS = 8
MIN_TUMOUR_DIAMETER_MM = 3.0


class SynthPlanError(ValueError):
    """A dataset the synth plan cannot describe; the message says what to pass or fix."""


def preprocessed_dir(dataset: str | int) -> Path:
    """``nnUNet_preprocessed/DatasetNNN_Name`` for a dataset name or ID."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return Path(nnUNet_preprocessed.require()) / maybe_convert_to_dataset_name(dataset)


def guess_labels(labels: dict[str, int | list], organ_label: int | None = None,
                 tumour_label: int | None = None) -> tuple[int | None, int]:
    """Organ and tumour label values, from the names in dataset.json unless given.

    A dataset whose only foreground label is the tumour (breast DCE cohorts) gets organ None: placement
    then uses an intensity band of the tissue around real tumours (see :func:`configuration_statistics`).

    Raises:
        SynthPlanError: when a label cannot be identified; the message lists the labels and the flag to pass.
    """
    regions = {k: v for k, v in labels.items() if not isinstance(v, int)}
    if regions:
        raise SynthPlanError(f"dataset.json defines region labels {regions}: region-based training is not "
                             f"supported by the synth trainers; use integer labels")
    listing = ", ".join(f"{v}={k!r}" for k, v in labels.items())
    values = set(labels.values()) - {0}

    def pick(words: tuple[str, ...], given: int | None, what: str, flag: str) -> int:
        if given is not None:
            if given not in values:
                raise SynthPlanError(f"{flag} {given} is not a foreground label of this dataset ({listing})")
            return given
        hits = [v for k, v in labels.items() if v != 0 and any(w in k.lower() for w in words)]
        if len(hits) != 1:
            reason = "no label name matches" if not hits else f"several labels match ({hits})"
            raise SynthPlanError(f"cannot tell which label is the {what}: {reason} "
                                 f"{'/'.join(words[:6])}... Labels of this dataset: {listing}. Pass {flag} N.")
        return hits[0]

    tumour = pick(TUMOUR_WORDS, tumour_label, "tumour", "--tumour-label")
    if organ_label is None and values - {tumour, labels.get("ignore")} == set():
        return None, tumour
    organ = pick(ORGAN_WORDS, organ_label, "organ (placement region)", "--organ-label")
    if organ == tumour:
        raise SynthPlanError(f"organ and tumour label are both {organ}; pass --organ-label and --tumour-label")
    if labels.get("ignore") in (organ, tumour):
        raise SynthPlanError("the ignore label cannot be the organ or tumour label")
    return organ, tumour


def _tumour_sizes(diameters: list[float]) -> dict:
    """Quartiles of equivalent diameters and a radius per quartile class (the pancreas paper's method)."""
    if not diameters:
        return {"count": 0}
    d = np.sort(np.asarray(diameters))
    q = np.percentile(d, [25, 50, 75])
    groups = np.array_split(d, 4) if d.size >= 4 else [d] * 4
    return {
        "count": int(d.size),
        "equivalent_diameter_mm": {"min": float(d[0]), "q25": float(q[0]), "median": float(q[1]),
                                   "q75": float(q[2]), "max": float(d[-1])},
        "class_radius_mm": {c: float(np.median(g) / 2) for c, g in zip(SIZE_CLASSES, groups)},
    }


def _channel_priors(plans: dict, configuration: dict, dataset_json: dict, stats: list[dict]) -> list[dict]:
    """Per-channel contrast range of tumour minus organ in normalised units, from data or modality defaults."""
    channels = []
    for c, name in sorted(dataset_json["channel_names"].items(), key=lambda kv: int(kv[0])):
        c = int(c)
        scheme = configuration["normalization_schemes"][c]
        organ_mean = float(np.mean([s["organ_mean"][c] for s in stats]))
        organ_std = float(np.mean([s["organ_std"][c] for s in stats]))
        contrasts = [s["tumour_mean"][c] - s["organ_mean"][c] for s in stats if s["tumour_mean"] is not None]
        clip = None
        props = plans.get("foreground_intensity_properties_per_channel", {}).get(str(c))
        if scheme == "CTNormalization" and props:
            clip = [(props["percentile_00_5"] - props["mean"]) / props["std"],
                    (props["percentile_99_5"] - props["mean"]) / props["std"]]
        if contrasts:
            lo, hi = np.percentile(contrasts, [10, 90])
            if hi - lo < 0.2 * abs(np.mean(contrasts)):  # one or two cases: widen to +-20%
                mid = float(np.mean(contrasts))
                lo, hi = mid - 0.2 * abs(mid), mid + 0.2 * abs(mid)
            source = f"real tumours ({len(contrasts)} cases): 10th-90th percentile of tumour minus organ mean"
        elif scheme == "CTNormalization" and props:
            lo, hi = (np.array(CT_DEFAULT_CONTRAST_HU) / props["std"])
            source = f"CT default: {CT_DEFAULT_CONTRAST_HU} HU through CTNormalization (std {props['std']:.1f} HU)"
        else:
            lo, hi = np.array(MRI_DEFAULT_CONTRAST_ORGAN_STD) * organ_std
            source = f"default: {MRI_DEFAULT_CONTRAST_ORGAN_STD} x organ standard deviation ({organ_std:.3f})"
        channels.append({"name": name, "normalization": scheme, "organ_mean": organ_mean, "organ_std": organ_std,
                         "contrast_range": [float(lo), float(hi)], "contrast_source": source,
                         "clip": None if clip is None else [float(v) for v in clip]})
    return channels


def band_region(channel: np.ndarray, seg: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Placement region of a dataset without organ label: unlabelled voxels whose intensity is in the band."""
    return (seg == 0) & (channel >= band[0]) & (channel <= band[1])


def _tumour_shell(tumour: np.ndarray, seg: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Unlabelled voxels within BAND_SHELL_MM of a tumour: the tissue tumours of this dataset sit in."""
    from scipy.ndimage import distance_transform_edt

    return (seg == 0) & (distance_transform_edt(~tumour, sampling=spacing) <= BAND_SHELL_MM)


def configuration_statistics(dataset: str | int, configuration: str, organ_label: int | None, tumour_label: int,
                             plans_identifier: str = "nnUNetPlans", seed: int = 0) -> dict:
    """Spacing, tumour sizes and intensity priors from the configuration's preprocessed cases."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    base = preprocessed_dir(dataset)
    plans = load_json(base / f"{plans_identifier}.json")
    dataset_json = load_json(base / "dataset.json")
    conf = PlansManager(plans).get_configuration(configuration)
    folder = base / conf.data_identifier
    if not folder.is_dir():
        raise SynthPlanError(f"{folder} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset} "
                             f"-c {configuration} first")
    ds = infer_dataset_class(str(folder))(str(folder))
    identifiers = sorted(ds.identifiers)
    rng = np.random.default_rng(seed)
    if len(identifiers) > MAX_CASES_FOR_STATISTICS:
        identifiers = sorted(rng.choice(identifiers, MAX_CASES_FOR_STATISTICS, replace=False))
    spacing = tuple(float(s) for s in conf.spacing)
    stats, diameters, bands = [], [], []
    for identifier in tqdm(identifiers, desc=f"synth plan: statistics of {configuration}", unit="case"):
        data, seg, _, _ = ds.load_case(identifier)
        data, seg = np.asarray(data), np.asarray(seg[0])
        case_spacing = spacing[-seg.ndim:]
        tumour = seg == tumour_label
        if organ_label is None:  # the tissue around real tumours stands in for the organ
            if not tumour.any():
                continue
            organ = _tumour_shell(tumour, seg, case_spacing)
            bands.append(np.percentile(data[0][organ], BAND_PERCENTILES))
        else:
            organ = seg == organ_label
        if not organ.any():
            continue
        components, n = connected_components(tumour)
        if n:
            sizes = np.bincount(components.ravel())[1:]
            diameters += [d for d in (equivalent_diameter_mm(int(v), case_spacing) for v in sizes
                                      if v >= MIN_TUMOUR_VOXELS) if d >= MIN_TUMOUR_DIAMETER_MM]
        stats.append({
            "organ_mean": [float(ch[organ].mean()) for ch in data],
            "organ_std": [float(ch[organ].std()) for ch in data],
            "tumour_mean": [float(ch[tumour].mean()) for ch in data] if tumour.any() else None,
        })
    if not stats:
        what = f"the organ label {organ_label}" if organ_label is not None else "a real tumour (needed to " \
            "find the intensity band of the tissue around tumours, as this dataset has no organ label)"
        raise SynthPlanError(f"no preprocessed case of {base.name} ({configuration}) contains {what}; "
                             f"pass the right --organ-label")
    result = {"spacing": list(spacing), "tumour_sizes": _tumour_sizes(diameters),
              "intensity": {"channels": _channel_priors(plans, conf.configuration, dataset_json, stats)}}
    if organ_label is None:
        result["intensity_band"] = {"channel": 0, "range": [float(v) for v in np.mean(bands, axis=0)],
                                    "source": f"{BAND_PERCENTILES} percentiles of channel 0 within "
                                              f"{BAND_SHELL_MM} mm of real tumours, unlabelled voxels"}
    return result


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
        "shapes": {"size_preset": "labelfree", "size_class": "any", "deformation": "elastic"},
        "placement": {"margin_mm": 2.0, "gap_mm": 2.0, "min_inside": 0.8},
        "seed": 12345,
        "configurations": {},
    }


def write_json_atomic(obj: dict | list, path: Path) -> None:
    """Writes JSON to a temporary file and renames it, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def plan_synth(dataset: str | int, configuration: str = "3d_fullres", organ_label: int | None = None,
               tumour_label: int | None = None, plans_identifier: str = "nnUNetPlans") -> Path:
    """Creates or updates ``nnUNetSynthPlans.json`` for one configuration.

    Returns:
        Path of the written synth plan.
    """
    base = preprocessed_dir(dataset)
    if not (base / f"{plans_identifier}.json").is_file():
        raise SynthPlanError(f"{base / f'{plans_identifier}.json'} not found: run nnUNetv2_plan_and_preprocess "
                             f"-d {dataset} first")
    dataset_json = load_json(base / "dataset.json")
    path = base / SYNTH_PLANS_FILE
    plan = load_json(path) if path.is_file() else None
    if plan is None or organ_label is not None or tumour_label is not None:
        organ, tumour = guess_labels(dataset_json["labels"], organ_label, tumour_label)
        if plan is None:
            plan = default_plan(dataset_json, base.name, plans_identifier, organ, tumour)
        plan.update(organ_label=organ, tumour_label=tumour)
    stats = configuration_statistics(dataset, configuration, plan["organ_label"], plan["tumour_label"],
                                     plans_identifier, plan["seed"])
    if stats["tumour_sizes"]["count"] >= 4 and plan["shapes"]["size_preset"] == "labelfree":
        plan["shapes"]["size_preset"] = "quartile"
    if stats["tumour_sizes"]["count"] == 0 and plan["shapes"]["size_preset"] == "quartile":
        warnings.warn(f"{base.name} has no real tumours: size preset 'quartile' falls back to 'labelfree'",
                      stacklevel=2)
        plan["shapes"]["size_preset"] = "labelfree"
    plan["configurations"][configuration] = stats
    write_json_atomic(plan, path)
    return path


def load_synth_plan(dataset: str | int, configuration: str, plans_identifier: str = "nnUNetPlans",
                    create: bool = True) -> dict:
    """The flat plan a trainer uses: dataset-level settings merged with the configuration's statistics.

    Creates the plan (or its configuration section) with defaults when ``create`` is set and none exists.
    """
    path = preprocessed_dir(dataset) / SYNTH_PLANS_FILE
    plan = load_json(path) if path.is_file() else None
    if plan is None or configuration not in plan.get("configurations", {}):
        if not create:
            raise FileNotFoundError(f"no synth plan for {configuration} in {path}: run nnUNetv2_synth_plan "
                                    f"-d {dataset} -c {configuration}")
        plan = load_json(plan_synth(dataset, configuration, plans_identifier=plans_identifier))
    flat = {k: v for k, v in plan.items() if k != "configurations"}
    flat.update(configuration=configuration, **plan["configurations"][configuration])
    return flat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_synth_plan", description="Write nnUNetSynthPlans.json "
                                     "(organ/tumour labels, tumour sizes, intensity priors) for a dataset.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or ID")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("--organ-label", type=int, help="label value of the organ (placement region)")
    parser.add_argument("--tumour-label", type=int, help="label value of the tumour")
    args = parser.parse_args(argv)
    try:
        path = plan_synth(args.dataset, args.configuration, args.organ_label, args.tumour_label, args.plans)
    except SynthPlanError as e:
        parser.exit(2, f"nnUNetv2_synth_plan: error: {e}\n")
    plan = load_synth_plan(args.dataset, args.configuration, args.plans, create=False)
    print(f"wrote {path}")
    print(format_plan(plan))


def format_plan(plan: dict) -> str:
    """A short human-readable summary of a flat synth plan (for the console and the training log)."""
    sizes = plan["tumour_sizes"]
    region = f"organ label {plan['organ_label']}" if plan["organ_label"] is not None else \
        f"no organ label: intensity band {plan['intensity_band']['range']} of channel 0"
    lines = [f"synth plan of {plan['dataset_name']} ({plan['configuration']}): {region}, "
             f"tumour label {plan['tumour_label']}, backend {plan['backend']}",
             f"  shapes: {plan['shapes']}; placement: {plan['placement']}",
             f"  real tumours: {sizes['count']}" + (f", equivalent diameter mm {sizes['equivalent_diameter_mm']}"
                                                    if sizes["count"] else " (label-free: modality defaults)")]
    for ch in plan["intensity"]["channels"]:
        lo, hi = ch["contrast_range"]
        lines.append(f"  channel {ch['name']} ({ch['normalization']}): contrast [{lo:.3f}, {hi:.3f}] "
                     f"normalised units; {ch['contrast_source']}")
    return "\n".join(lines)
