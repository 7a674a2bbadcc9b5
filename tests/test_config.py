"""Config validation at the boundary: mappings -> frozen configs, errors naming the field path."""

import pytest

from engram.config import ConfigError, MemoryConfig, TrainConfig, TrialConfig, config_hash, from_dict, to_dict


def test_round_trip_and_yaml_style_numbers():
    config = from_dict(TrialConfig, {"model": {"memory": {"kind": "engram", "slots": "1e5"}},
                                     "train": {"tokens": "1e6"}})
    assert config.model.memory.slots == 100_000 and config.train.tokens == 1_000_000
    assert from_dict(TrialConfig, to_dict(config)) == config


def test_hash_is_stable_and_sensitive():
    a = TrialConfig()
    assert config_hash(a) == config_hash(TrialConfig())
    assert config_hash(a) != config_hash(a, "other-data")
    assert config_hash(a) != config_hash(from_dict(TrialConfig, {"model": {"d_model": 64}}))


@pytest.mark.parametrize("data, message", [
    ({"model": {"dmodel": 1}}, "trial.model.dmodel: unknown key"),
    ({"model": {"d_model": "wide"}}, "trial.model.d_model: expected an integer"),
    ({"model": {"d_model": 130}}, "trial.model.n_heads: expected a divisor"),
    ({"model": {"n_routed": 1}}, "trial.model.n_routed: expected at least top_k=2"),
    ({"model": {"memory": {"kind": "ram"}}}, "trial.model.memory.kind: expected one of engram, overencoding, none"),
    ({"model": {"memory": {"kind": "engram", "slots": 0}}}, "trial.model.memory.slots: expected a positive number"),
    ({"model": {"memory": {"kind": "engram", "slots": 10_000, "layers": [7]}}}, "trial.model.memory.layers"),
    ({"model": {"tie_embeddings": "yes"}}, "trial.model.tie_embeddings: expected true or false"),
    ({"train": {"steps": 10, "tokens": 100}}, "trial.train.steps/tokens/flops: expected exactly one horizon"),
    ({"train": {"lr": 0.1}}, "trial.train.steps/tokens/flops: expected exactly one horizon, got none"),
    ({"train": {"steps": 5, "schedule": "linear"}}, "trial.train.schedule: expected one of cosine, wsd"),
    ({"train": {"steps": 5, "precision": "fp16"}}, "trial.train.precision: expected one of auto, fp32, bf16"),
    ({"data": {"val_fraction": 0.9}}, "trial.data.val_fraction: expected a number in (0, 0.5)"),
    ({"data": []}, "trial.data: expected a mapping"),
])
def test_errors_name_the_field(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(TrialConfig, data, "trial")
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_memory_off_needs_no_slots():
    assert MemoryConfig(kind="none", slots=0).kind == "none"
    assert TrainConfig(flops=1e12).flops == 1e12


def test_balance_aux_parses_is_recorded_and_keeps_old_trial_ids_while_off():
    import hashlib
    import json

    config = from_dict(TrialConfig, {"model": {"balance_aux": "1e-2"}})
    assert config.model.balance_aux == 0.01 and to_dict(config)["model"]["balance_aux"] == 0.01
    assert from_dict(TrialConfig, to_dict(config)) == config
    assert TrialConfig().model.balance_aux is None  # off by default
    with pytest.raises(ConfigError, match=r"^trial\.model\.balance_aux: expected a positive number"):
        from_dict(TrialConfig, {"model": {"balance_aux": 0}}, "trial")
    # The hash of a config without the knob, as config_hash computed it before the field (and the OverEncoding-only
    # memory.overencoding_mean) existed.
    for plain in (to_dict(TrialConfig()), to_dict(from_dict(TrialConfig, {"data": {"corpus": "mix"}}))):
        del plain["model"]["balance_aux"], plain["model"]["balance_moments"]
        del plain["model"]["memory"]["overencoding_mean"], plain["data"]["split"]
        if plain["data"]["corpus"] != "mix":
            plain["data"] = {k: v for k, v in plain["data"].items()
                             if k not in ("knowledge_share", "mix_entities", "mix_seed")}
        text = json.dumps(plain, sort_keys=True, separators=(",", ":")) + "|" + "v9"
        before = hashlib.sha256(text.encode()).hexdigest()[:16]
        assert config_hash(from_dict(TrialConfig, plain), "v9") == before
    assert config_hash(config, "v9") != config_hash(TrialConfig(), "v9")


def test_split_enters_the_id_only_when_folders():
    assert TrialConfig().data.split == "documents"
    plain = to_dict(TrialConfig())
    assert config_hash(from_dict(TrialConfig, plain)) == config_hash(TrialConfig())
    folders = from_dict(TrialConfig, {"data": {"split": "folders"}})
    assert folders.data.split == "folders" and from_dict(TrialConfig, to_dict(folders)) == folders
    assert config_hash(folders) != config_hash(TrialConfig())
    with pytest.raises(ConfigError, match=r"^trial\.data\.split: expected one of documents, folders"):
        from_dict(TrialConfig, {"data": {"split": "chars"}}, "trial")
    with pytest.raises(ConfigError, match=r"^trial\.data\.split: the generated corpus 'mix' is split by documents"):
        from_dict(TrialConfig, {"data": {"corpus": "mix", "split": "folders"}}, "trial")


def test_balance_moments_parses_and_enters_the_id_only_when_set():
    config = from_dict(TrialConfig, {"model": {"balance_moments": "10"}})
    assert config.model.balance_moments == 10.0 and from_dict(TrialConfig, to_dict(config)) == config
    assert TrialConfig().model.balance_moments is None
    assert config_hash(from_dict(TrialConfig, {"model": {"balance_moments": None}})) == config_hash(TrialConfig())
    assert config_hash(config) != config_hash(TrialConfig())
    with pytest.raises(ConfigError, match=r"^trial\.model\.balance_moments: expected a positive number"):
        from_dict(TrialConfig, {"model": {"balance_moments": -1}}, "trial")


def test_overencoding_mean_enters_the_ids_of_overencoding_configs_only():
    engram = {"model": {"memory": {"kind": "engram", "slots": 1000}}}
    oe = {"model": {"memory": {"kind": "overencoding", "slots": 1000}}}
    assert config_hash(from_dict(TrialConfig, engram)) == config_hash(
        from_dict(TrialConfig, {"model": {"memory": {**engram["model"]["memory"], "overencoding_mean": True}}}))
    assert config_hash(from_dict(TrialConfig, oe)) != config_hash(
        from_dict(TrialConfig, {"model": {"memory": {**oe["model"]["memory"], "overencoding_mean": True}}}))
    assert from_dict(TrialConfig, oe).model.memory.overencoding_mean is False
