"""Model loading from directories, organisms and the HF cache; the CLI's commands and its bad-input errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import transformers

from conftest import run_cli, tiny_model
from engramlab.errors import EngramError
from engramlab.models import load_model
from engramlab.models.loading import resolve_ref
from engramlab.models.tiny import tiny_model as engramlab_tiny


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 99)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_load_model_from_directory_matches_original(family, tmp_path):
    original = tiny_model(family)
    original.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", with_tokenizer=False)
    ids = torch.randint(2, 99, (2, 5))
    assert torch.equal(loaded.model(input_ids=ids).logits, original(input_ids=ids).logits)
    assert loaded.spec.family == family
    assert not loaded.model.training


def test_tokenizer_is_left_padded(saved_llama):
    loaded = load_model(str(saved_llama), device="cpu")
    assert loaded.tokenizer.padding_side == "left"
    batch = loaded.tokenizer(["w2 w3 w4", "w5"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1].tolist() == [0, 0, 1]


def test_hub_id_resolves_from_local_cache(saved_llama, tmp_path, monkeypatch):
    """A Hub id loads from the local HF cache layout without any network access."""
    snapshot = tmp_path / "models--someorg--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in saved_llama.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "models--someorg--tiny" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _source, path = resolve_ref("someorg/tiny")
    assert path == snapshot
    assert load_model("someorg/tiny", device="cpu").spec.family == "llama"
    with pytest.raises(EngramError, match="pass --download"):
        resolve_ref("someorg/absent")


def test_pickle_only_checkpoint_loads_with_weights_only(tmp_path):
    original = tiny_model("llama")
    original.config.save_pretrained(tmp_path)
    torch.save(original.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_model(str(tmp_path), device="cpu", with_tokenizer=False)
    ids = torch.randint(2, 99, (1, 4))
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, original(input_ids=ids).logits)


class _Payload:
    """An arbitrary object: unpickling it would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused(tmp_path, capsys):
    tiny_model("llama").config.save_pretrained(tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload()}, f)
    code, out, err = run_cli(["models", "info", str(tmp_path)], capsys)
    assert code == 2
    assert "pwned" not in out
    assert "safely" in err and str(tmp_path) in err


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such directory"),
        (lambda p: p.mkdir(), "no config.json"),
        (lambda p: (p.mkdir(), tiny_model("llama").config.save_pretrained(p)), "has no weights"),
        (
            lambda p: (p.mkdir(), engramlab_tiny("hrm_text").save_pretrained(p)),  # two stacks of layers: refused
            "hrm_text: cannot tell the decoder layers apart",
        ),
        (
            lambda p: (
                p.mkdir(),
                tiny_model("llama").config.save_pretrained(p),
                (p / "model.safetensors").write_bytes(b"not a safetensors file"),
            ),
            "cannot load the weights",
        ),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{broken")), "config.json:1: malformed JSON"),
    ],
    ids=["missing", "no-config", "no-weights", "unsupported-arch", "corrupt-weights", "broken-config"],
)
def test_bad_model_input_gives_exit_2_and_one_line(tmp_path, capsys, setup, message):
    target = tmp_path / "model"
    setup(target)
    capsys.readouterr()  # drop what the setup printed (save_pretrained's progress bar)
    code, _out, err = run_cli(["models", "info", str(target)], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_unshipped_organism_is_explained(capsys):
    code, _, err = run_cli(["models", "info", "organism:no-such-organism"], capsys)
    assert code == 2 and "organism:no-such-organism is not shipped" in err


def test_bad_device_and_dtype(saved_llama, capsys):
    code, _, err = run_cli(["models", "info", str(saved_llama), "--dtype", "float8"], capsys)
    assert code == 2 and "--dtype" in err
    code, _, err = run_cli(["models", "info", str(saved_llama), "--device", "tpu9"], capsys)
    assert code == 2 and "--device" in err


def test_help_lists_command_groups(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for group in ("models", "organisms", "relations", "decode", "posttrain", "continual", "tour"):
        assert group in out


def test_models_info_reports_architecture(saved_llama, capsys):
    code, out, _ = run_cli(["models", "info", str(saved_llama), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["family"] == "llama" and info["n_layers"] == 2
    assert info["units_per_layer"]["mlp.act"] == 37 and info["units_total"]["mlp.up"] == 74
    assert info["parameters"] == sum(p.numel() for p in tiny_model("llama").parameters())
    assert sum(info["parameters_by_part"].values()) == info["parameters"]
    code, out, _ = run_cli(["models", "info", str(saved_llama)], capsys)
    assert code == 0 and "mlp.act" in out


def test_tour_writes_page_and_summary_and_refuses_overwrite(saved_llama, tmp_path, capsys):
    out = tmp_path / "tour"
    code, _stdout, err = run_cli(
        ["tour", "--model", str(saved_llama), "--out", str(out), "--device", "cpu", "--only", "model"], capsys
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["model"]["n_layers"] == 2
    page = (out / "index.html").read_text()
    assert "Parameters by part" in page and "cdn." not in page.split("<body>")[1]
    code, _, err = run_cli(["tour", "--model", str(saved_llama), "--out", str(out), "--only", "model"], capsys)
    assert code == 2 and "--overwrite" in err
    code, _, _ = run_cli(
        ["tour", "--model", str(saved_llama), "--out", str(out), "--overwrite", "--only", "model"], capsys
    )
    assert code == 0
    code, _, err = run_cli(["tour", "--out", str(tmp_path / "t2"), "--only", "nope"], capsys)
    assert code == 2 and "not a tour step" in err


def test_tour_reports_a_failed_step_and_exits_1(saved_llama, tmp_path, capsys):
    out = tmp_path / "tour"
    code, stdout, _ = run_cli(
        ["tour", "--model", str(saved_llama), "--out", str(out), "--device", "cpu", "--only", "relations"], capsys
    )
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert "does not know any requested relation" in summary["steps"]["relations"]["error"]
    assert "relations: failed" in stdout
