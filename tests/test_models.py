import pytest

from online_dpo.models import ModelError, load_tokenizer, resolve_model_path


def test_embedded_model_is_a_plain_safetensors_folder(embedded_model_path):
    from pathlib import Path

    folder = Path(embedded_model_path)
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    tok = load_tokenizer(embedded_model_path)
    assert tok.chat_template and tok.eos_token_id is not None
    assert resolve_model_path("embedded") == embedded_model_path


def test_unreachable_hub_id_fails_with_a_clear_message():
    with pytest.raises(ModelError) as e:
        resolve_model_path("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-org/no-such-model-xyz" in msg and "local folder" in msg


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        resolve_model_path(str(tmp_path / "empty"))
