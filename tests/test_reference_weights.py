"""save_pretrained / load_pretrained round trips (single file and shards) and loud failures."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nova_fast.reference import NOVAConfig, WeightMismatchError, build_model, load_pretrained, random_text_states, \
    save_pretrained
from nova_fast.reference.config import FLOW_IMAGE_SCHEDULER
from nova_fast.reference.weights import SchedulerGuessWarning

GEN = dict(num_latent_frames=2, num_ar_steps=4, num_diffusion_steps=3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    cfg = NOVAConfig.preset("tiny")
    return build_model(cfg).eval(), random_text_states(cfg, 1, torch.Generator().manual_seed(0))


def _generate(model, text):
    return model.generate_video(text, generator=torch.Generator().manual_seed(0), **GEN)


@pytest.mark.parametrize("shard", [None, 200_000])
def test_round_trip(tmp_path, tiny, shard):
    model, text = tiny
    save_pretrained(model, tmp_path, max_shard_size=shard)
    tdir = tmp_path / "transformer"
    files = sorted(os.listdir(tdir))
    if shard is None:
        assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    else:
        index = json.loads((tdir / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file() and (tmp_path / "model_index.json").is_file()
    loaded = load_pretrained(tmp_path)
    assert loaded.config.to_dict() == {**model.config.to_dict(), "name": loaded.config.name}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert torch.equal(_generate(model, text), _generate(loaded, text))
    # the transformer folder itself is accepted too
    assert torch.equal(load_pretrained(tdir).state_dict()["mask_embed.bos_token"], model.mask_embed.bos_token)


def test_dtype_and_scheduler_files(tmp_path, tiny):
    model, _ = tiny
    save_pretrained(model, tmp_path)
    half = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {t.dtype for t in half.state_dict().values()} == {torch.bfloat16}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(FLOW_IMAGE_SCHEDULER, shift=2.0)))
    (tmp_path / "model_index.json").write_text(json.dumps({"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    flow = load_pretrained(tmp_path)
    assert flow.scheduler.kind == "flow" and flow.scheduler.shift == 2.0


def test_wrong_shape_names_the_key(tmp_path, tiny):
    model, _ = tiny
    save_pretrained(model, tmp_path)
    path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["image_decoder.head.weight"] = torch.zeros(17, 128)
    save_file(state, path)
    with pytest.raises(WeightMismatchError, match=r"image_decoder\.head\.weight.*\(17, 128\).*\(16, 128\)"):
        load_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny):
    model, _ = tiny
    save_pretrained(model, tmp_path)
    path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["video_encoder.mixer.lora.weight"]
    state["video_encoder.blocks.9.attn.qkv.weight"] = torch.zeros(3)
    save_file(state, path)
    with pytest.raises(WeightMismatchError) as err:
        load_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing keys (1): video_encoder.mixer.lora.weight" in msg
    assert "unexpected keys (1): video_encoder.blocks.9.attn.qkv.weight" in msg


def test_missing_text_buffer_fails(tmp_path, tiny):
    model, _ = tiny
    save_pretrained(model, tmp_path, max_shard_size=100_000)
    tdir = tmp_path / "transformer"
    index = json.loads((tdir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = tdir / index["weight_map"]["text_embed.weight"]
    state = load_file(shard)
    del state["text_embed.weight"]
    save_file(state, shard)
    with pytest.raises(WeightMismatchError, match="text_embed.weight"):
        load_pretrained(tmp_path)


def test_no_folder_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nothing")


# ---------------------------------------------------------------- which scheduler loading chose, and why
def _saved_without_scheduler(tmp_path, model):
    save_pretrained(model, tmp_path)
    os.remove(tmp_path / "scheduler" / "scheduler_config.json")
    os.remove(tmp_path / "model_index.json")


def test_scheduler_from_the_files_is_recorded_without_warning(tmp_path, tiny, recwarn, caplog):
    model, _ = tiny
    save_pretrained(model, tmp_path)
    with caplog.at_level("INFO", logger="nova_fast.reference.weights"):
        loaded = load_pretrained(tmp_path)
    path = str(tmp_path / "scheduler" / "scheduler_config.json")
    assert loaded.scheduler_source == f"DDPMScheduler from {path}"
    assert loaded.scheduler_source in caplog.text
    assert not [w for w in recwarn if issubclass(w.category, SchedulerGuessWarning)]


def test_missing_scheduler_config_warns_and_says_what_it_chose(tmp_path, tiny):
    model, _ = tiny  # a video config: the default is DDPM
    _saved_without_scheduler(tmp_path, model)
    with pytest.warns(SchedulerGuessWarning, match=r"DDPMScheduler from the default for a video config \(guessed: no "):
        loaded = load_pretrained(tmp_path)
    assert loaded.scheduler.kind == "ddpm"
    assert loaded.scheduler_source.startswith("DDPMScheduler from the default for a video config (guessed: no ")
    assert "scheduler_config.json" in loaded.scheduler_source


def test_missing_scheduler_config_can_be_refused_or_supplied(tmp_path, tiny, recwarn):
    model, _ = tiny
    _saved_without_scheduler(tmp_path, model)
    with pytest.raises(FileNotFoundError, match="require_scheduler=True: no .*scheduler_config.json"):
        load_pretrained(tmp_path, require_scheduler=True)
    flow = load_pretrained(tmp_path, scheduler=dict(FLOW_IMAGE_SCHEDULER, shift=3.0), require_scheduler=True)
    assert flow.scheduler.kind == "flow" and flow.scheduler.shift == 3.0
    assert flow.scheduler_source == "FlowMatchEulerDiscreteScheduler from the scheduler= argument"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "scheduler_config.json").write_text(json.dumps(FLOW_IMAGE_SCHEDULER))
    from_folder = load_pretrained(tmp_path, scheduler=tmp_path / "elsewhere")
    assert from_folder.scheduler.kind == "flow" and str(tmp_path / "elsewhere") in from_folder.scheduler_source
    assert not [w for w in recwarn if issubclass(w.category, SchedulerGuessWarning)]


def test_class_named_only_by_model_index_is_a_guess(tmp_path, tiny):
    model, _ = tiny
    _saved_without_scheduler(tmp_path, model)
    index = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.warns(SchedulerGuessWarning, match="model_index.json names FlowMatchEulerDiscreteScheduler but there is no"):
        loaded = load_pretrained(tmp_path)
    assert loaded.scheduler.kind == "flow" and "guessed" in loaded.scheduler_source
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path, require_scheduler=True)


def test_set_scheduler_records_its_source():
    model = build_model(NOVAConfig.preset("tiny"))
    model.set_scheduler(FLOW_IMAGE_SCHEDULER)
    assert model.scheduler.kind == "flow" and model.scheduler_source == "set_scheduler()"


def test_scheduler_entry_of_the_transformer_config_is_named(tmp_path, tiny, recwarn):
    model, _ = tiny
    _saved_without_scheduler(tmp_path, model)
    cfg_path = tmp_path / "transformer" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "scheduler": FLOW_IMAGE_SCHEDULER}))
    loaded = load_pretrained(tmp_path, require_scheduler=True)
    assert loaded.scheduler.kind == "flow"
    assert loaded.scheduler_source == f"FlowMatchEulerDiscreteScheduler from the 'scheduler' entry of {cfg_path}"
    assert not [w for w in recwarn if issubclass(w.category, SchedulerGuessWarning)]
