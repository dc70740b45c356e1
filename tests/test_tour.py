"""The tour's trained model: what its cache key holds."""
from study import config
from study.experiments import tour


def test_the_tour_model_is_keyed_by_its_training_settings_only(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    first = tour.train_tour_model("smoke", 0, device="cpu")
    assert not first["from_cache"]
    # a larger test split or more explained / scored images reuse the trained model ...
    again = tour.train_tour_model("smoke", 0, device="cpu", n_test=first["settings"]["n_test"] + 8,
                                  n_scored=first["settings"]["n_scored"] + 1, n_explain=1)
    assert again["from_cache"] and len(again["splits"]["test"]["labels"]) == first["settings"]["n_test"] + 8
    # ... while a training setting or another seed retrains
    assert not tour.train_tour_model("smoke", 0, device="cpu", epochs=first["settings"]["epochs"] + 1)["from_cache"]
    assert not tour.train_tour_model("smoke", 1, device="cpu")["from_cache"]
