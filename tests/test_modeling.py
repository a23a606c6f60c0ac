import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, T5EncoderModel
from transformers.modeling_outputs import BaseModelOutput

from flux_small_encoder import DistilledT5Config, DistilledT5EncoderModel
from flux_small_encoder.tiny import tiny_t5_config


def _reference_forward(model: DistilledT5EncoderModel, ids: torch.Tensor) -> torch.Tensor:
    """A plain T5EncoderModel followed by Linear-ReLU-Linear, on the same weights."""
    t5 = T5EncoderModel(model.encoder.config).eval()
    t5.load_state_dict(model.encoder.state_dict())
    first, second = model.final_projection[0].weight, model.final_projection[3].weight
    hidden = t5(ids).last_hidden_state
    return torch.relu(hidden @ first.T) @ second.T


def test_loads_public_layout_completely(public_checkpoint):
    model, report = DistilledT5EncoderModel.from_pretrained(public_checkpoint, output_loading_info=True)
    assert report["missing_keys"] == set() and report["unexpected_keys"] == set()
    assert report["mismatched_keys"] == set() and report["error_msgs"] == []
    assert isinstance(model.config, DistilledT5Config)
    assert model.config.project_in_dim == 16 and model.config.project_out_dim == 32
    file_keys = set(load_file(public_checkpoint / "model.safetensors"))
    assert file_keys == set(model.state_dict()) - {"encoder.encoder.embed_tokens.weight"}  # stored once, tied


def test_output_equals_t5_plus_projector(student):
    ids = torch.randint(0, 320, (2, 11))
    out = student(ids, output_hidden_states=False)
    assert isinstance(out, BaseModelOutput)
    assert out[0] is out.last_hidden_state
    assert out[0].shape == (2, 11, 32)
    torch.testing.assert_close(out[0], _reference_forward(student, ids), atol=1e-5, rtol=0)


def test_attention_mask_is_honoured(student):
    ids = torch.randint(3, 320, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    masked = student(ids, attention_mask=mask)[0]
    changed = ids.clone()
    changed[0, 5:] = 7  # padding content must not matter when masked out
    torch.testing.assert_close(masked[:, :5], student(changed, attention_mask=mask)[0][:, :5])
    assert not torch.allclose(masked[:, :5], student(ids)[0][:, :5])


def test_save_keeps_key_layout_and_round_trips(student, tmp_path):
    student.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert {"encoder.shared.weight", "final_projection.0.weight", "final_projection.3.weight"} <= keys
    assert all(key.startswith(("encoder.shared.", "encoder.encoder.", "final_projection.")) for key in keys)
    reloaded = DistilledT5EncoderModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 320, (1, 5))
    torch.testing.assert_close(reloaded(ids)[0], student(ids)[0])
    assert type(AutoModel.from_pretrained(tmp_path)) is DistilledT5EncoderModel


def test_float16_keeps_wo_in_float32_and_stays_finite(public_checkpoint):
    model = DistilledT5EncoderModel.from_pretrained(public_checkpoint, dtype=torch.float16)
    assert model.dtype == torch.float16
    assert model.encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    out = model(torch.randint(0, 320, (1, 9)))[0]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_bfloat16(public_checkpoint):
    model = DistilledT5EncoderModel.from_pretrained(public_checkpoint, dtype=torch.bfloat16)
    out = model(torch.randint(0, 320, (1, 9)))[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_plain_t5_checkpoint_is_refused_with_a_fix(tmp_path):
    T5EncoderModel(tiny_t5_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_t5_encoder"):
        DistilledT5EncoderModel.from_pretrained(tmp_path)


def test_from_t5_encoder_builds_fresh_student(tmp_path):
    t5 = T5EncoderModel(tiny_t5_config(d_model=24, d_kv=6)).eval()
    t5.save_pretrained(tmp_path)
    student = DistilledT5EncoderModel.from_t5_encoder(str(tmp_path), project_out_dim=40).eval()
    assert student.config.project_in_dim == 24 and student.config.project_out_dim == 40
    for key, value in t5.state_dict().items():
        torch.testing.assert_close(student.encoder.state_dict()[key], value)
    out = student(torch.randint(0, 320, (1, 6)))[0]
    assert out.shape == (1, 6, 40) and torch.isfinite(out).all() and out.abs().sum() > 0


def test_config_rejects_mismatched_projector_input():
    with pytest.raises(ValueError, match="project_in_dim"):
        DistilledT5Config(d_model=16, project_in_dim=32)
