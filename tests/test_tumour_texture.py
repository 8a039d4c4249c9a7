"""The tumour texture the synth plan measures, the analytic backend that reproduces it, and the realism benchmark
on phantoms (the benchmark on the real BraTS sample is in test_real_mri.py)."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from nnunet_synth.evaluation.lesion_features import ring_features
from nnunet_synth.evaluation.realism_benchmark import Case, run_benchmark
from nnunet_synth.generators.appearance import edge_weight, measure_tumour, signed_distance
from nnunet_synth.phantom import PhantomConfig, make_case
from nnunet_synth.planning import case_statistics, summarise_statistics
from nnunet_synth.synth_plan import SynthPlan

SPACING = (2.0, 0.8, 0.8)


def textured_tumour(texture_mm: float, edge_mm: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sphere of radius 15 mm whose texture is Gaussian-filtered noise (sd 1, scale ``texture_mm``) on a mean of
    4 ring units, with a normal-CDF edge of width ``edge_mm``, in white-noise tissue; intensities x50 + 100."""
    rng = np.random.default_rng(seed)
    shape = (40, 100, 100)
    zz, yy, xx = np.indices(shape)
    r = np.sqrt(((zz - 20) * SPACING[0]) ** 2 + ((yy - 50) * SPACING[1]) ** 2 + ((xx - 50) * SPACING[2]) ** 2)
    mask = r <= 15
    smooth = gaussian_filter(rng.standard_normal(shape), texture_mm / np.asarray(SPACING))
    smooth = (smooth - smooth[mask].mean()) / smooth[mask].std()
    weight = edge_weight(signed_distance(mask, SPACING), edge_mm)
    image = weight * (4 + smooth) + (1 - weight) * rng.standard_normal(shape)
    return (50 * image + 100)[None].astype(np.float32), mask, smooth


@pytest.mark.parametrize("texture_mm,edge_mm", [(1.0, 0.6), (2.0, 1.0), (3.0, 1.5)])
def test_measured_texture_recovers_scale_quantiles_and_edge(texture_mm, edge_mm):
    image, mask, _ = textured_tumour(texture_mm, edge_mm, seed=int(10 * texture_mm))
    m = measure_tumour(image, mask, ~mask, SPACING)
    assert m["texture_sigma_mm"] == pytest.approx(texture_mm, rel=0.2)
    assert m["nugget"] < 0.2
    assert m["edge_sigma_mm"] == pytest.approx(edge_mm, rel=0.25)
    assert abs(m["edge_offset_mm"]) < 0.4
    # interior quantiles of 4 + N(0, 1) in ring units (the ring is N(0, 1))
    expected = 4 + np.array([-2.33, -1.64, -1.28, -0.67, 0.0, 0.67, 1.28, 1.64, 2.33])
    np.testing.assert_allclose(m["quantiles"][0], expected, atol=0.35)


def test_measured_texture_is_in_ring_units_whatever_the_intensity_scale():
    image, mask, _ = textured_tumour(2.0, 1.0, seed=0)
    a = measure_tumour(image, mask, ~mask, SPACING)
    b = measure_tumour(image * 0.01 - 7, mask, ~mask, SPACING)
    np.testing.assert_allclose(a["quantiles"], b["quantiles"], atol=1e-6)
    assert a["texture_sigma_mm"] == pytest.approx(b["texture_sigma_mm"], rel=1e-6)


def phantom_cases(n: int, seed: int, config: PhantomConfig = PhantomConfig()) -> tuple[SynthPlan, list[Case]]:
    """In-memory CT phantom cases and the synth plan measured on them (as nnUNetv2_synth_plan would)."""
    rng = np.random.default_rng(seed)
    cases = [Case(f"phantom_{i:03d}", *make_case(rng, "CT", config=config)) for i in range(n)]
    stats = [dict(case_statistics(c.data, c.seg, (3.0, 1.5, 1.5), 1, 2), case=c.identifier) for c in cases]
    summary = summarise_statistics(stats, ["CT"], ["ZScoreNormalization"], None, 1)
    plan = SynthPlan(dataset_name="phantom", configuration="3d_fullres", spacing=(3.0, 1.5, 1.5), tumour_label=2,
                     organ_label=1, labels={"background": 0, "organ": 1, "tumour": 2}, **summary)
    return plan.replace(shapes={"size_preset": "quartile"}).validated("phantom"), cases


def test_plan_records_the_phantom_texture_and_the_analytic_backend_reproduces_it():
    from nnunet_synth.generators.lesions import insert_tumours
    from nnunet_synth.planning import format_plan

    plan, cases = phantom_cases(6, seed=3)
    texture = plan.texture
    assert texture is not None and len(texture.tumours) >= 6
    assert {t.case for t in texture.tumours} <= {c.identifier for c in cases}
    # phantom tumours: 70 HU darker than the organ, whose noise sd is about 12.6 HU: about -5.5 ring units
    assert -6.5 < np.median([t.quantiles[0][4] for t in texture.tumours]) < -4.5
    assert "texture of" in format_plan(plan) and "ring units" in format_plan(plan)
    rng = np.random.default_rng(0)
    medians = []
    for case in cases:
        new, seg, lesions = insert_tumours(case.data, case.seg, None, plan, rng, draws=5)
        synthetic = (seg == 2) & (case.seg != 2)
        if lesions:
            medians.append(ring_features(new, synthetic, seg == 1, plan.spacing)[0]["z_p50"])
    assert len(medians) >= 3
    assert -6.8 < np.median(medians) < -4.0, medians


def test_learned_texture_is_harder_to_tell_from_real_than_the_papers():
    # tumours with a smooth texture of known scale (3 mm) and strength (twice the tissue noise)
    plan, cases = phantom_cases(16, seed=1, config=PhantomConfig(tumour_texture_mm=3.0, tumour_texture_sd=2.0))
    assert 2.0 < plan.texture.median("texture_sigma_mm") < 6.0
    results = run_benchmark(plan, cases, ["analytic", "analytic-paper"], seeds=[0, 1], n_repeats=1)
    learned, paper = np.mean(results["analytic"]["auc"]), np.mean(results["analytic-paper"]["auc"])
    assert learned < paper - 0.05, (learned, paper)
    assert all(n_other > 0 for _, n_other in results["analytic"]["n"])


def test_realism_features_are_the_same_in_raw_and_normalised_units():
    image, mask, _ = textured_tumour(2.0, 1.0, seed=1)
    raw = ring_features(image, mask, ~mask, SPACING)[0]
    normalised = ring_features((image - 130.0) / 47.0, mask, ~mask, SPACING)[0]
    assert raw.keys() == normalised.keys()
    for key in raw:
        assert raw[key] == pytest.approx(normalised[key], rel=1e-6, abs=1e-9), key
