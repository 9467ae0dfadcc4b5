"""Zoo cards (models/<name>.json): every card loads, builds on the meta device and has the parameter
counts it claims; Mixture-of-Mamba cards split all four projections and a token of any modality uses
exactly the parameters of the card's dense baseline."""
import dataclasses
import json

import pytest
import torch

import momoe
from momoe.models import MambaConfig, config_from_dict
from momoe.models.registry import read_card

CARDS = momoe.list_cards()
MOM_CARDS = [n for n in CARDS if n.startswith("mom-mamba-")]
ALL_SPLIT = ["in_proj", "x_proj", "dt_proj", "out_proj"]
REL_TOL = 0.03
CARD_KEYS = {"name", "family", "paper", "config", "expected_params"}


def build_meta(name: str):
    with torch.device("meta"):
        return momoe.build_model(momoe.load_card(name))


def test_zoo_is_not_empty():
    assert CARDS, "no zoo cards found (models/*.json)"
    assert MOM_CARDS, "no Mixture-of-Mamba cards in the zoo"


@pytest.mark.parametrize("name", CARDS)
def test_card_schema(name):
    card = read_card(name)
    assert set(card) == CARD_KEYS, f"{name}: keys {sorted(card)}"
    assert card["name"] == name
    assert card["family"] == card["config"]["model_type"]
    assert {"title", "arxiv", "setting", "notes"} <= set(card["paper"])
    assert {"total", "active_per_token", "source"} <= set(card["expected_params"])
    # The card's config is exactly a config's dict form: every field written, nothing unknown.
    assert momoe.load_card(name).to_dict() == card["config"]


@pytest.mark.parametrize("name", CARDS)
def test_card_builds_and_matches_expected_params(name):
    expected = read_card(name)["expected_params"]
    model = build_meta(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = momoe.count_parameters(model)
    assert counts["total"] == pytest.approx(expected["total"], rel=REL_TOL), name
    assert set(counts["active_per_token"]) == set(model.config.modalities)
    for modality, active in counts["active_per_token"].items():
        assert active == pytest.approx(expected["active_per_token"], rel=REL_TOL), f"{name} ({modality})"


def test_unknown_config_key_is_rejected(tmp_path):
    card = read_card(CARDS[0])
    card["config"]["n_layers"] = 24  # a typo of n_layer
    path = tmp_path / "bad-card.json"
    path.write_text(json.dumps(card))
    data = json.loads(path.read_text())["config"]
    with pytest.raises(ValueError, match="unknown [A-Za-z]+Config keys"):
        config_from_dict(data)


@pytest.mark.parametrize("name", MOM_CARDS)
def test_mixture_of_mamba_card(name):
    cfg = momoe.load_card(name)
    assert isinstance(cfg, MambaConfig) and cfg.is_mixture
    assert cfg.split == ALL_SPLIT, f"{name}: split {cfg.split}"
    baseline = name[len("mom-"):]
    assert baseline in CARDS, f"{name}: no dense baseline card {baseline!r}"
    dense_cfg = momoe.load_card(baseline)
    assert dense_cfg.split == [] and not dense_cfg.split_ssm
    # Same model but for the per-modality parameters.
    assert dataclasses.replace(cfg, split=[], split_ssm=False) == dense_cfg
    assert read_card(name)["paper"]["setting"] == read_card(baseline)["paper"]["setting"]

    # A token counts one slice of every per-modality parameter (and with split_ssm one slice of A_log,
    # D and the dt bias, as many as the dense model's single copy), so it uses exactly as many
    # parameters as the dense baseline has.
    dense_total = momoe.count_parameters(build_meta(baseline))["total"]
    for modality, active in momoe.count_parameters(build_meta(name))["active_per_token"].items():
        assert active == dense_total, f"{name} ({modality}): active {active}, dense total {dense_total}"


MOMA_CARDS = [n for n in CARDS if n.startswith("moma-") and not n.endswith("-dense")]


@pytest.mark.parametrize("name", MOMA_CARDS)
def test_moma_cards_are_compute_matched_to_their_dense_model(name):
    """MoMa Table 1: 'architectures listed in the same row are compute-matched with the same amount of active
    FLOPs per token' (expert choice at capacity 1/|E_M|; MoD models deeper to make up for skipped tokens)."""
    dense = "moma-" + name.split("-")[1] + "-dense"
    assert dense in CARDS
    for modality, flops in momoe.flops_per_token(name, 4096).items():
        assert flops == pytest.approx(momoe.flops_per_token(dense, 4096)[modality], rel=0.05), f"{name} ({modality})"
