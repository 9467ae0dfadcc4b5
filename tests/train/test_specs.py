"""Model configs from families, cards, config files and checkpoints; parameter and FLOPs info."""
import json

import pytest

import momoe
from momoe.models import MambaConfig, MoMaConfig, TransformerConfig
from momoe.train import FAMILIES, family_config, fit_to_vocab, load_model_config, model_info
from momoe.train.info import format_info


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reads_the_data(train_data, family):
    config = family_config(family, train_data.vocab, d_model=32, n_layer=4, n_heads=2, experts=3)
    train_data.vocab.check_model(config.vocab_size, config.modalities)
    assert config.vocab_size == train_data.vocab.size and config.modalities == list(train_data.vocab.names)
    model = momoe.build_model(config)
    assert model.num_parameters() > 0


def test_family_details(train_data):
    vocab = train_data.vocab
    assert family_config("moma", vocab, experts=2).experts_per_modality == [2, 2, 2]
    assert family_config("mot", vocab).modality_split and not family_config("transformer", vocab).modality_split
    assert family_config("mom-mamba", vocab).split == ["in_proj", "x_proj", "dt_proj", "out_proj"]
    assert family_config("mamba", vocab).split == []
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        family_config("gpt", vocab)


def test_load_model_config_from_card_file_and_checkpoint(train_data, tmp_path):
    card = load_model_config("moma-90m-4t4i")
    assert isinstance(card, MoMaConfig) and card.d_model == 512
    path = tmp_path / "config.json"
    config = family_config("mom-mamba", train_data.vocab, d_model=32, n_layer=2)
    path.write_text(json.dumps(config.to_dict()))
    assert load_model_config(str(path)) == config
    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps({"name": "mine", "config": config.to_dict()}))
    assert load_model_config(str(card_file)) == config
    momoe.build_model(config).save_pretrained(str(tmp_path / "ckpt"))
    assert load_model_config(str(tmp_path / "ckpt")) == config
    with pytest.raises(ValueError, match="not a zoo card"):
        load_model_config("no-such-card")
    path.write_text(json.dumps({**config.to_dict(), "d_modell": 3}))
    with pytest.raises(ValueError, match="unknown MambaConfig keys"):
        load_model_config(str(path))


def test_fit_to_vocab(train_data):
    card = load_model_config("mamba-37m-chameleon")  # text and image only
    with pytest.raises(ValueError, match="modalities"):
        fit_to_vocab(card, train_data.vocab)
    three = load_model_config("mamba-443m-three-modality")
    assert fit_to_vocab(three, train_data.vocab) == three  # 65,536 ids read the data's ids
    assert fit_to_vocab(three, train_data.vocab, resize=True).vocab_size == train_data.vocab.size
    with pytest.raises(ValueError, match="vocab_size"):
        fit_to_vocab(three.replace(vocab_size=10), train_data.vocab)


def test_model_info(train_data):
    dense = TransformerConfig(vocab_size=500, d_model=64, n_layer=2, n_heads=4, modalities=["text", "image"])
    info = model_info(dense, seq_len=128)
    assert info["total"] == momoe.build_model(dense).num_parameters()
    assert info["flops_per_token"] == momoe.flops_per_token(dense, 128)
    moma = model_info(load_model_config("moma-1.4b-4t4i"), seq_len=4096)  # counted without memory
    assert moma["total"] > 4 * moma["active_per_token"]["text"]
    mamba = MambaConfig(vocab_size=500, d_model=32, n_layer=2, modalities=["text"])
    assert "text" in format_info("m", model_info(mamba))
    mor = model_info(family_config("mor", train_data.vocab, d_model=32, n_heads=2))
    assert set(mor["flops_per_token"]) == {"text", "image", "speech"}
