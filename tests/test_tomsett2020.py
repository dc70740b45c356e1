"""Steps of notebook 01 (Tomsett et al. 2020) at smoke size, with asserted values."""

import pickle

import krippendorff
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

from study import config, metrics
from study.experiments import tomsett2020 as t
from study.findings import VERDICTS

VARIANTS = [t.Variant("dataset_mean", "pixel", "prob"), t.Variant("uniform", "pixel", "prob"),
            t.Variant("uniform", "patch", "logit"), t.Variant("blur", "pixel", "prob", "abs")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "CACHE_DIR", path)
        yield path


@pytest.fixture(scope="module")
def run(cache_dir):
    """The smoke pipeline on digits (2 epochs, width 8), 6 images, four variants, L = 8."""
    s = t.experiment_settings("smoke", "digits", n_images=6)
    bundle = t.load_dataset("digits", 0, s)
    model_run = t.train_model(bundle, s, seed=0, device="cpu")
    selection = t.select_images(bundle, model_run["model"], s["n_images"], "cpu")
    maps, skipped = t.compute_maps(model_run["model"], selection["images"], selection["predicted"], t.method_plan(s, 0))
    geo = t.geometry(bundle["image_size"], s["steps"])
    scores, curves = t.score_table(model_run["model"], selection["images"], selection["predicted"], selection["labels"],
                                   maps, VARIANTS, geo, dataset_mean=bundle["dataset_mean"], seed=0, progress=False)
    return {"s": s, "bundle": bundle, "model_run": model_run, "selection": selection, "maps": maps, "skipped": skipped,
            "geo": geo, "scores": scores, "curves": curves}


# ----------------------------------------------------------------------------- settings, variants, geometry

def test_profiles_give_the_documented_variant_grids():
    sizes = {p: len(t.settings_variants(t.experiment_settings(p))) for p in ("smoke", "quick", "paper")}
    assert sizes == {"smoke": 12, "quick": 10, "paper": 32}
    labels = [v.label for v in t.settings_variants(t.experiment_settings("paper"))]
    assert len(set(labels)) == 32 and labels[0] == "mean·pixel·prob" and "uniform·patch·logit·abs" in labels
    assert t.experiment_settings("quick", n_images=None)["n_images"] >= 100
    assert t.experiment_settings("paper")["n_images"] == 200


def test_settings_resolve_per_dataset_values_and_the_primary_score():
    assert t.experiment_settings("paper", "cifar10")["width"] == 32
    assert t.experiment_settings("paper", "digits")["width"] == 16
    assert t.experiment_settings("quick", "digits")["epochs"] == 15
    s = t.experiment_settings("quick", score="logit", abs_map=True)
    assert s["outputs"] == ["logit", "prob"] and s["signs"][0] == "abs"
    assert t.settings_variants(s)[0].label == "mean·pixel·logit·abs"
    with pytest.raises(ValueError, match="unknown dataset"):
        t.experiment_settings("quick", "imagenet")
    with pytest.raises(ValueError, match="score must be one of"):
        t.experiment_settings("quick", score="softmax")
    with pytest.raises(ValueError, match="unknown replacement"):
        t.Variant("mean", "pixel", "prob")


def test_geometry_follows_the_card_step_sizes():
    digits, cifar = t.geometry(16, 32), t.geometry(32, 32)
    assert (digits.pixels_per_step, digits.patch, digits.faithfulness_pixel_patch) == (4, 2, 1)
    assert (cifar.pixels_per_step, cifar.patch, cifar.faithfulness_pixel_patch) == (16, 4, 2)
    assert digits.steps * digits.pixels_per_step == 16 * 16 // 2  # L steps remove 50% of the pixels
    assert (digits.blur_sigma, digits.blur_kernel_size) == (2.0, 9)
    with pytest.raises(ValueError, match="choose another L"):
        t.geometry(16, 16)  # 8 px per step is not a square patch


# ----------------------------------------------------------------------------- data and model

def test_digits_model_learns_and_every_method_is_available(run):
    assert run["model_run"]["test_accuracy"] > 0.5  # 2 epochs at width 8; chance is 0.1
    assert list(run["maps"]) == list(t.METHODS) and run["skipped"] == {}
    assert run["bundle"]["dataset_mean"] == [pytest.approx(run["bundle"]["train"]["images"].mean(), abs=1e-6)]
    assert all(m.shape == (6, 1, 16, 16) for m in run["maps"].values())


def test_lrp_is_skipped_where_batch_norm_forbids_it():
    torch.manual_seed(0)
    model = t.build_model("synth_cifar", 3, 10, 32, width=4).eval()
    images = torch.rand(2, 3, 32, 32)
    maps, skipped = t.compute_maps(model, images, torch.tensor([1, 2]), {"gradient": {}, "lrp_epsilon": {}})
    assert list(maps) == ["gradient"] and list(skipped) == ["lrp_epsilon"] and "BatchNorm" in skipped["lrp_epsilon"]


def _write_cifar_fixture(folder, per_batch=6):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(x) for x in rng.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar10_path_reads_pickles_and_standardises_inside_the_model(tmp_path):
    _write_cifar_fixture(tmp_path / "cifar-10-batches-py")
    s = t.experiment_settings("smoke", "cifar10", n_train=None, n_valid=4, n_test=None)
    bundle = t.load_dataset("cifar10", 0, s, data_root=tmp_path, verify_cifar=False)
    assert bundle["train"]["images"].shape == (26, 3, 32, 32) and len(bundle["valid"]["labels"]) == 4
    assert len(bundle["test"]["labels"]) == 6 and (bundle["image_size"], bundle["channels"]) == (32, 3)
    assert np.allclose(bundle["dataset_mean"], bundle["train"]["images"].mean(axis=(0, 2, 3)), atol=1e-5)
    model = t.build_model("cifar10", 3, 10, 32, width=4).eval()
    assert isinstance(model[0], t.Standardise) and model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert torch.allclose(model[0](torch.tensor(t.CIFAR_MEAN).view(1, 3, 1, 1)), torch.zeros(1, 3, 1, 1))


def test_synth_cifar_path_is_rgb_32(cache_dir):
    s = t.experiment_settings("smoke", "synth_cifar", n_train=20, n_valid=10, n_test=10)
    bundle = t.load_dataset("synth_cifar", 0, s)
    assert bundle["train"]["images"].shape == (20, 3, 32, 32) and len(bundle["dataset_mean"]) == 3
    assert bundle["num_classes"] == 10


# ----------------------------------------------------------------------------- the long table

def test_long_table_has_every_row_and_no_nan(run):
    scores = run["scores"]
    assert len(scores) == 6 * len(t.METHODS) * len(t.METRICS) * len(VARIANTS)
    assert set(scores["method"]) == set(t.METHODS) and set(scores["metric"]) == set(t.METRICS)
    assert list(dict.fromkeys(scores["variant"])) == [v.label for v in VARIANTS]
    assert not scores["score"].isna().any()
    assert scores.groupby(["variant", "method", "metric"]).size().eq(6).all()
    curves = run["curves"]
    assert len(curves) == len(VARIANTS) * len(t.METHODS) * 2 * (run["geo"].steps + 1)
    assert curves["fraction_removed"].max() == pytest.approx(0.5)


def test_abpc_is_morf_minus_lerf_per_image(run):
    wide = run["scores"].pivot_table(index=["variant", "method", "image"], columns="metric", values="score")
    assert np.allclose(wide["abpc"], wide["aopc_morf"] - wide["aopc_lerf"], atol=1e-6)


def test_curves_start_at_the_unperturbed_score(run):
    start = run["curves"][run["curves"]["step"] == 0].groupby(["variant", "order"])["mean_score"].agg(["min", "max"])
    assert np.allclose(start["min"], start["max"], atol=1e-6)  # f(x) does not depend on the method


@pytest.mark.parametrize("variant", VARIANTS[::2], ids=lambda v: v.label)
def test_shared_drops_give_the_engines_faithfulness(run, variant):
    model, sel, geo = run["model_run"]["model"], run["selection"], run["geo"]
    patch = geo.faithfulness_pixel_patch if variant.granularity == "pixel" else geo.patch
    value = metrics.make_replacement(sel["images"], variant.replacement, dataset_mean=run["bundle"]["dataset_mean"], seed=0)
    table = run["scores"][(run["scores"]["variant"] == variant.label) & (run["scores"]["metric"] == "faithfulness")]
    for method in ("random", "gradient", "integrated_gradients", "lrp_epsilon"):
        saliency = run["maps"][method]
        engine = metrics.faithfulness(model, sel["images"], saliency, sel["predicted"], patch=patch, replacement=value,
                                      output=variant.output, on_constant="nan")
        ours = table[table["method"] == method].sort_values("image")["score"].to_numpy()
        assert np.allclose(ours, torch.nan_to_num(engine, nan=0.0).numpy(), atol=1e-5), method


def test_single_feature_copies_differ_in_one_feature_linear_oracle():
    """Card §7.3 / 7.11 on f(x) = w·x: drop_i = w_i (x_i − b_i), and r = w ⊙ (x − b) has faithfulness 1 (−r: −1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3, bias=False)).eval()
    images, targets = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    baseline = torch.full((1, 1, 1, 1), 0.3)
    scores = t.single_feature_scores(model, images, targets, patch=1, replacement=baseline, output="logit")
    weights = model[1].weight[targets].reshape(4, 1, 8, 8).detach()
    oracle = weights * (images - baseline)
    assert torch.allclose(scores[:, :1] - scores[:, 1:], oracle.reshape(4, -1), atol=1e-5)
    assert torch.allclose(t.faithfulness_from_scores(oracle, scores, 1), torch.ones(4))
    assert torch.allclose(t.faithfulness_from_scores(-oracle, scores, 1), -torch.ones(4))
    patched = t.single_feature_scores(model, images, targets, patch=2, replacement=baseline, output="logit")
    assert torch.allclose(patched[:, :1] - patched[:, 1:], t.feature_relevance(oracle, 2), atol=1e-5)


def test_score_table_is_deterministic_and_cached(run, cache_dir):
    args = (run["model_run"]["model"], run["selection"]["images"], run["selection"]["predicted"],
            run["selection"]["labels"], run["maps"], VARIANTS[1:2], run["geo"])
    kwargs = {"dataset_mean": run["bundle"]["dataset_mean"], "seed": 0, "progress": False}
    first, _ = t.score_table(*args, **kwargs)  # uniform·pixel·prob
    second, _ = t.score_table(*args, **kwargs)
    pd.testing.assert_frame_equal(first, second)
    expected = run["scores"][run["scores"]["variant"] == VARIANTS[1].label].reset_index(drop=True)
    assert np.array_equal(first["score"].to_numpy(), expected["score"].to_numpy())
    cold = t.cached_score_table(*args, **kwargs)
    warm = t.cached_score_table(*args, **kwargs)
    assert (cold[2], warm[2]) == (False, True)
    assert np.array_equal(warm[0]["score"].to_numpy(), first["score"].to_numpy())
    assert list(warm[0]["method"]) == list(first["method"])


# ----------------------------------------------------------------------------- analyses

def test_alpha_equals_krippendorff_on_ranks_recomputed_from_the_table(run):
    alphas = t.alpha_table(run["scores"], n_boot=10, seed=0)
    assert len(alphas) == len(t.METRICS) * len(VARIANTS) * 2
    for row in alphas.itertuples():
        part = run["scores"][(run["scores"]["metric"] == row.metric) & (run["scores"]["variant"] == row.variant)]
        matrix = part.pivot(index="image", columns="method", values="score")
        if row.methods == t.WITHOUT_RANDOM:
            matrix = matrix.drop(columns="random")
        sign = 1 if t.HIGHER_IS_BETTER[row.metric] else -1
        ranks = stats.rankdata(sign * matrix.to_numpy(), axis=1)
        expected = krippendorff.alpha(reliability_data=ranks, level_of_measurement="ordinal")
        assert row.alpha == pytest.approx(expected, abs=1e-12)
        assert row.n_methods == (len(t.METHODS) - (row.methods == t.WITHOUT_RANDOM))
        assert row.low <= row.high


def test_rankings_are_permutations_and_ranks_follow_the_aligned_means(run):
    summary = t.method_summary(run["scores"])
    for (_, metric), part in summary.groupby(["variant", "metric"]):
        assert sorted(part["rank"]) == list(range(1, len(t.METHODS) + 1))
        best = part.sort_values("mean", ascending=not t.HIGHER_IS_BETTER[metric]).iloc[0]
        assert best["rank"] == 1
    ranks = t.per_image_ranks(run["scores"])
    assert ranks.groupby(["variant", "metric", "image"])["rank"].sum().eq(sum(range(1, len(t.METHODS) + 1))).all()


def test_correlation_tables_are_symmetric_aligned_and_per_pair(run):
    matrices = t.inter_method_matrices(run["scores"])
    for matrix in matrices.values():
        values = matrix.to_numpy()
        assert np.allclose(values, values.T, equal_nan=True) and np.allclose(np.diag(values), 1)
    consistency = t.internal_consistency_table(run["scores"])
    assert len(consistency) == len(VARIANTS) * len(t.METHODS) * 6
    # sign alignment (card §7.7): a lower-is-better copy of MoRF is perfectly consistent with MoRF
    morf = run["scores"][run["scores"]["metric"] == "aopc_morf"]
    copy = morf.assign(metric="aopc_lerf", score=-morf["score"])
    doubled = pd.concat([morf, copy, run["scores"][run["scores"]["metric"].isin(["abpc", "faithfulness"])]])
    pair = t.internal_consistency_table(doubled)
    assert np.allclose(pair[(pair["metric_a"] == "aopc_morf") & (pair["metric_b"] == "aopc_lerf")]["rho"].dropna(), 1.0)


def test_replacement_sensitivity_compares_like_with_like():
    rng = np.random.default_rng(0)
    rows = []
    for replacement, noise in (("dataset_mean", 0.0), ("uniform", 0.0), ("zero", 1.0)):
        base = np.arange(10.0)
        score = base + noise * rng.normal(size=10) * 100
        rows.append(pd.DataFrame({"image": range(10), "label": 0, "method": "gradient", "metric": "aopc_morf",
                                  "variant": replacement, "replacement": replacement, "granularity": "pixel",
                                  "output": "prob", "sign": "signed", "score": score}))
    sens = t.replacement_sensitivity(pd.concat(rows)).set_index("replacement")["rho"]
    assert sens["uniform"] == pytest.approx(1.0) and sens["zero"] < 0.9


def test_findings_and_card_comparisons_are_computed(run):
    results = t.analyse(run["scores"], VARIANTS, n_boot=10, seed=0)
    rows = t.findings(results)
    assert len(rows) == 8 and {r["paper"] for r in rows} == {"n/a"}
    assert all(r["verdict"] in VERDICTS and "[rule:" in r["this_run"] for r in rows)
    alpha = t.pilot_alpha_comparison(run["scores"], VARIANTS)
    assert len(alpha) == 8 and set(alpha["paper"]) == {"n/a"} and set(alpha["replacement"]) == {"mean", "uniform"}
    chosen = (alpha["metric"] == "Faithfulness") & (alpha["replacement"] == "uniform")
    assert alpha.loc[chosen, "project pilot"].item() == "0.453 / 0.370"
    numbers = t.pilot_numbers_comparison(results, VARIANTS, 0.9, 6)
    assert set(numbers["paper"]) == {"n/a"} and numbers.loc[1, "this run"] == "6"
    assert list(t.quirk_choices(run["s"], run["geo"])["quirk"][:10]) == [f"Q{i}" for i in range(1, 11)]
