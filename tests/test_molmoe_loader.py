"""Loading a published-layout checkpoint: shards, and every bad input named before any compute."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from envs.backends.molmoe import load, model as molmoe_model
from molmoe_fixture import FIXTURE, copy_checkpoint, requires_fixture

pytestmark = requires_fixture


@pytest.fixture(scope="module")
def state():
    return load_file(str(FIXTURE / "model.safetensors"))


def with_state(tmp_path, state):
    ckpt = copy_checkpoint(tmp_path / "ckpt", skip=("model.safetensors",))
    save_file(state, str(ckpt / "model.safetensors"))
    return ckpt


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fails the test if any tensor is read: bad keys must be reported from the file headers alone."""
    def forbidden(*args, **kwargs):
        raise AssertionError("weights were read before the key check failed")

    monkeypatch.setattr(molmoe_model, "read_weights", forbidden)


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path, state):
    ckpt = copy_checkpoint(tmp_path / "sharded", skip=("model.safetensors",))
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(ckpt / name))
    weight_map = {k: name for name, part in halves.items() for k in part}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded, _ = load(ckpt)
    single, _ = load(FIXTURE)
    for (name, a), (_, b) in zip(sorted(sharded.state_dict().items()), sorted(single.state_dict().items())):
        assert torch.equal(a, b), name

    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"weights shard .*model-00002-of-00002\.safetensors .* for key"):
        load(ckpt)


@pytest.mark.parametrize("missing, message", [
    ("config.json", r"model config file .*config\.json does not exist"),
    ("preprocessor_config.json", r"preprocessor config file .*preprocessor_config\.json does not exist"),
    ("tokenizer.json", r"tokenizer file .*tokenizer\.json does not exist"),
    ("model.safetensors", r"no weights: expected model\.safetensors or model\.safetensors\.index\.json"),
])
def test_missing_file_is_named(tmp_path, missing, message):
    ckpt = copy_checkpoint(tmp_path / "ckpt", skip=(missing,))
    with pytest.raises(FileNotFoundError, match=message):
        load(ckpt)


@pytest.mark.parametrize("field, value, message", [
    ("model_type", "olmoe", r"config\.json: model_type='olmoe', expected 'molmo'"),
    ("weight_tying", True, r"config\.json: field weight_tying=True is not supported by this port"),
    ("image_pooling_2d", "attention-2wide", r"field image_pooling_2d='attention-2wide' is not supported"),
    ("d_model", None, r"config\.json: field d_model is missing"),
])
def test_config_of_another_model_is_refused(tmp_path, field, value, message):
    ckpt = copy_checkpoint(tmp_path / "ckpt")
    data = json.loads((ckpt / "config.json").read_text())
    data[field] = value
    (ckpt / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load(ckpt)


def test_unexpected_missing_and_misshaped_keys_are_all_named(tmp_path, state, no_weight_reads):
    bad = dict(state)
    bad["model.transformer.blocks.0.attn.extra.weight"] = torch.zeros(3)
    del bad["model.transformer.blocks.1.attn.q_norm.weight"]
    bad["model.vision_backbone.pad_embed"] = torch.zeros(2, 63, dtype=torch.bfloat16)
    with pytest.raises(ValueError) as err:
        load(with_state(tmp_path, bad))
    text = str(err.value)
    assert "config.json: the weights do not match the config" in text
    assert "unexpected keys (1): ['model.transformer.blocks.0.attn.extra.weight (in model.safetensors)']" in text
    assert "missing keys (1): ['model.transformer.blocks.1.attn.q_norm.weight']" in text
    assert "mis-shaped keys (1): ['model.vision_backbone.pad_embed: [2, 63] in model.safetensors, expected [2, 64]']" in text


def test_a_config_that_disagrees_with_the_weights_names_the_keys(tmp_path, no_weight_reads):
    ckpt = copy_checkpoint(tmp_path / "ckpt")
    data = json.loads((ckpt / "config.json").read_text())
    data["n_layers"] = 5
    (ckpt / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): \['model\.transformer\.blocks\.4\.attn\.att_proj\.weight'"):
        load(ckpt)


def test_unreadable_weights_are_named(tmp_path):
    ckpt = copy_checkpoint(tmp_path / "ckpt", skip=("model.safetensors",))
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"weights file .*model\.safetensors cannot be read"):
        load(ckpt)


def test_random_checkpoint_in_the_published_layout_loads(tmp_path):
    """The GPU benchmarks' random checkpoints: sharded with an index, every published key, loadable."""
    from envs.backends.molmoe import MolmoEConfig, published_shapes, write_random_checkpoint

    ckpt = copy_checkpoint(tmp_path / "random", skip=("model.safetensors",))
    cfg = MolmoEConfig.load(ckpt)
    write_random_checkpoint(cfg, ckpt, seed=1, shard_bytes=2 << 20)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(published_shapes(cfg)) and len(set(index.values())) > 1
    model, _ = load(ckpt)
    assert torch.equal(model.ln_f.weight, torch.ones(32))
    assert model.layers[0].mlp.experts.gate_up_proj.std() > 0


def test_molmoe_1b_sizes_give_the_published_shapes(tmp_path):
    """MolmoE-1B's sizes on the fixture's config: the real model's geometry (nothing allocated)."""
    from envs.backends.molmoe import MolmoEConfig, published_shapes
    from envs.backends.molmoe.config import molmoe_1b_config

    ckpt = copy_checkpoint(tmp_path / "full", skip=("model.safetensors",))
    (ckpt / "config.json").write_text(json.dumps(molmoe_1b_config(json.loads((FIXTURE / "config.json").read_text()))))
    shapes = published_shapes(MolmoEConfig.load(ckpt))
    assert shapes["model.transformer.blocks.15.mlp.experts.63.gate_proj.weight"] == (1024, 2048)
    assert shapes["model.vision_backbone.image_pooling_2d.wq.weight"] == (1024, 2048)
    assert shapes["model.vision_backbone.image_vit.transformer.resblocks.22.feed_forward.w1.weight"] == (4096, 1024)
    total = sum(math.prod(s) for s in shapes.values())
    assert 7.0e9 < total < 7.5e9  # OLMoE-1B-7B (6.9B) + the ViT-L/14 tower + connector


def test_build_random_checkpoint_takes_the_template_files(tmp_path):
    """The random-checkpoint builder (at the fixture's sizes here; MolmoE-1B's are 14 GB)."""
    from envs.backends.molmoe import build_random_checkpoint, load

    build_random_checkpoint(tmp_path / "random", FIXTURE, full_size=False)
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "random" / name).read_bytes() == (FIXTURE / name).read_bytes()
    model, tokenizer = load(tmp_path / "random")
    assert model.cfg.n_layers == 4 and tokenizer.eos_id == 50279
    fixture, _ = load(FIXTURE)
    assert not torch.equal(model.layers[0].mlp.gate.weight, fixture.layers[0].mlp.gate.weight)
