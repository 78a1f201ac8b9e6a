"""CoTTA, TENT, BN and Source (issue 8): restore, EMA, the anchor gate, trained parameters, seeds, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engramlab.errors import EngramError
from engramlab.tta.methods import (
    TENT,
    CoTTA,
    CoTTASettings,
    ema_update_,
    make_tta_method,
    soft_cross_entropy,
    stochastic_restore_,
)
from engramlab.tta.study import TTAStudyOptions, run_tta_study
from engramlab.tta.vision import SmallResNet


@pytest.fixture()
def net() -> SmallResNet:
    torch.manual_seed(0)
    return SmallResNet(10, width=4)


def test_stochastic_restore_with_p_0_and_1_is_exact():
    params = {"w": torch.nn.Parameter(torch.randn(50, 7))}
    source = {"w": torch.randn(50, 7)}
    before = params["w"].detach().clone()
    stochastic_restore_(params, source, 0.0)
    assert torch.equal(params["w"], before)
    stochastic_restore_(params, source, 1.0)
    assert torch.equal(params["w"], source["w"])


def test_stochastic_restore_rate_matches_p():
    params = {"w": torch.nn.Parameter(torch.zeros(200_000))}
    stochastic_restore_(params, {"w": torch.ones(200_000)}, 0.01, torch.Generator().manual_seed(0))
    assert abs(float(params["w"].detach().mean()) - 0.01) < 0.0015


def test_ema_update_formula():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 0.9)
    for t, old, s in zip(teacher.parameters(), t0, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * s.detach())


def test_soft_cross_entropy_equals_hard_ce_for_one_hot_like_targets():
    student = torch.randn(4, 5)
    target = torch.full((4, 5), -1e4)
    labels = torch.tensor([0, 3, 1, 4])
    target[torch.arange(4), labels] = 0
    torch.testing.assert_close(soft_cross_entropy(student, target), torch.nn.functional.cross_entropy(student, labels))


def _anchor_confidence(method: CoTTA, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(method.anchor(x).softmax(1).max(1).values.mean())


def test_anchor_gate_switches_augmentation_at_the_threshold(net):
    x = torch.rand(8, 3, 32, 32)
    probe = make_tta_method("cotta", net, CoTTASettings(n_augmentations=2))
    confidence = _anchor_confidence(probe, x)
    above = make_tta_method("cotta", net, CoTTASettings(n_augmentations=2, threshold=min(1.0, confidence + 1e-4)))
    above.teacher_target(x)
    assert above.last_gate  # anchor less confident than the threshold: augment
    below = make_tta_method("cotta", net, CoTTASettings(n_augmentations=2, threshold=max(0.0, confidence - 1e-4)))
    target = below.teacher_target(x)
    assert not below.last_gate
    with torch.no_grad():
        torch.testing.assert_close(target, below.teacher(x))  # the plain teacher prediction
    no_aug = make_tta_method("cotta-no-aug", net, CoTTASettings(threshold=1.0))
    no_aug.teacher_target(x)
    assert not no_aug.last_gate


def test_tent_updates_only_bn_affine_parameters(net):
    tent = make_tta_method("tent", net)
    assert isinstance(tent, TENT)
    before = {n: p.detach().clone() for n, p in tent.model.named_parameters()}
    tent.adapt_and_predict(torch.rand(16, 3, 32, 32))
    changed = {n for n, p in tent.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".bn" in n or "stem.1" in n or "shortcut.1" in n for n in changed)
    assert not any(n.endswith("conv1.weight") or n.startswith("head") for n in changed)


def test_cotta_prediction_is_the_teacher_before_its_update_and_restore_keeps_source(net):
    method = make_tta_method("cotta", net, CoTTASettings(n_augmentations=2, threshold=0.0, restore_p=1.0))
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        expected = method.teacher(x)
    torch.testing.assert_close(method.adapt_and_predict(x), expected)
    for name, p in method.model.named_parameters():  # p = 1: every weight back at its source value
        torch.testing.assert_close(p.detach(), method.restore_source[name])


def test_bn_uses_test_batch_statistics(net):
    bn = make_tta_method("bn", net)
    source = make_tta_method("source", net)
    x = torch.rand(16, 3, 32, 32) * 0.2 + 0.7  # shifted inputs: batch statistics differ from the source ones
    assert not torch.allclose(bn.adapt_and_predict(x), source.adapt_and_predict(x))
    torch.testing.assert_close(bn.adapt_and_predict(x[:8]), bn.model(x[:8]).detach())


def _tiny_options(tmp_path, name: str, **kw) -> TTAStudyOptions:
    return TTAStudyOptions(
        methods=["bn", "tent", "cotta"],
        corruptions=["gaussian_noise", "fog"],
        n_images=40,
        batch_size=20,
        cotta=CoTTASettings(n_augmentations=2),
        out=tmp_path / name,
        **kw,
    )


def test_fixed_seed_gives_identical_errors(tmp_path):
    a = run_tta_study(_tiny_options(tmp_path, "a", rounds=2))
    b = run_tta_study(_tiny_options(tmp_path, "b", rounds=2))
    assert a["error_mean"] == b["error_mean"] and a["error_by_round"] == b["error_by_round"]
    assert len(a["error_by_round"]["cotta"]) == 2
    assert set(a["images_per_second"]) == {"bn", "tent", "cotta"}
    assert (tmp_path / "a" / "report.html").stat().st_size > 10_000


def test_cli_bad_data_dir_is_one_line_exit_2(tmp_path, cli):
    missing = tmp_path / "nope"
    code, _, err = cli(
        [
            "continual",
            "tta",
            "--data-dir",
            str(missing),
            "--source",
            str(tmp_path / "w.safetensors"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(missing) in err


def test_cli_unknown_method_and_data_dir_without_source(tmp_path, cli):
    for argv, needle in ((["--method", "sgd"], "sgd"), (["--data-dir", str(tmp_path)], "--source")):
        code, _, err = cli(["continual", "tta", *argv, "--out", str(tmp_path / "o")])
        assert code == 2 and needle in err


def test_cotta_settings_are_validated():
    with pytest.raises(EngramError, match="restore_p"):
        CoTTASettings(restore_p=1.5)
    with pytest.raises(EngramError):
        CoTTASettings(policy="nope")


def test_shipped_source_model_knows_clean_digits():
    from engramlab.tta.source_model import SHIPPED, accuracy, load_source, mnist_rgb32_split

    _, _, x_test, y_test = mnist_rgb32_split()
    assert accuracy(load_source(), x_test, y_test) > 0.95
    card = json.loads(Path(str(SHIPPED)).with_suffix(".json").read_text())
    assert card["clean_test_accuracy"] > 0.95


def test_robustbench_wrn_checkpoint_loads_with_weights_only(tmp_path):
    from engramlab.tta.source_model import load_source
    from engramlab.tta.wide_resnet import WideResNet

    torch.manual_seed(0)
    original = WideResNet(28, 10).eval()
    path = tmp_path / "Standard.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}}, path)
    loaded = load_source(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x))
    assert sum(p.numel() for p in loaded.parameters()) == 36_479_194  # RobustBench's Standard WRN-28-10
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(EngramError, match="WRN-28-10"):
        load_source(tmp_path / "bad.pt")


def test_threshold_from_source_is_the_quantile_of_batch_confidence(net):
    from engramlab.tta.methods import source_confidence_threshold
    from engramlab.tta.vision import configure_for_tta

    x = torch.rand(64, 3, 32, 32)
    value = source_confidence_threshold(net, x, batch_size=8, quantile=0.25)
    anchor = configure_for_tta(__import__("copy").deepcopy(net))
    with torch.no_grad():
        means = torch.stack([anchor(b).softmax(1).max(1).values.mean() for b in x.split(8)])
    assert value == pytest.approx(float(means.quantile(0.25)))


def test_cli_threshold_must_be_a_number_or_source(tmp_path, cli):
    code, _, err = cli(["continual", "tta", "--threshold", "high", "--out", str(tmp_path / "o")])
    assert code == 2 and "--threshold" in err


def test_cli_runs_on_a_cifar_c_folder_with_a_user_source_model(tmp_path, cli):
    import numpy as np

    from engramlab.data.corruptions import CORRUPTIONS
    from engramlab.tta.source_model import save_source

    data = tmp_path / "CIFAR-10-C"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in CORRUPTIONS:  # 5 severities x 4 images, the official layout
        np.save(data / f"{name}.npy", rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    np.save(data / "labels.npy", rng.integers(0, 10, 20))
    torch.manual_seed(0)
    weights = save_source(
        SmallResNet(10, width=4),
        {"architecture": "SmallResNet", "n_classes": 10, "recipe": {"width": 4, "blocks_per_stage": 1}},
        tmp_path / "source.safetensors",
    )
    out = tmp_path / "run"
    code, _, err = cli(
        [
            "continual",
            "tta",
            "--data-dir",
            str(data),
            "--source",
            str(weights),
            "--method",
            "bn,cotta",
            "--augmentations",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == str(data) and summary["cotta"]["threshold"] == 0.92  # paper values with --data-dir
    assert summary["cotta"]["policy"] == "cotta" and summary["steps"] == 15
    assert set(summary["error_mean"]) == {"bn", "cotta"}


def _cifar_c_folder(path: Path, names: list[str]) -> Path:
    """A CIFAR-10-C-layout folder holding only `names` (5 severities x 4 images each) and labels.npy."""
    import numpy as np

    path.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        np.save(path / f"{name}.npy", rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    np.save(path / "labels.npy", rng.integers(0, 10, 20))
    return path


def test_cli_corruptions_subset_on_a_data_dir_holding_only_those_files(tmp_path, cli):
    from engramlab.tta.source_model import save_source

    data = _cifar_c_folder(tmp_path / "C", ["fog", "contrast"])
    torch.manual_seed(0)
    weights = save_source(
        SmallResNet(10, width=4),
        {"architecture": "SmallResNet", "n_classes": 10, "recipe": {"width": 4, "blocks_per_stage": 1}},
        tmp_path / "source.safetensors",
    )
    common = ["continual", "tta", "--data-dir", str(data), "--source", str(weights), "--method", "bn", "--batch-size"]
    code, _, err = cli([*common, "4", "--corruptions", "contrast,fog", "--out", str(tmp_path / "run")])
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2  # one batch of 4 images per corruption
    import pyarrow.parquet as pq

    errors = pq.read_table(tmp_path / "run" / "errors.parquet").to_pylist()
    assert [e["corruption"] for e in errors] == ["contrast", "fog"]  # the order given
    code, _, err = cli([*common, "4", "--out", str(tmp_path / "all")])  # all 15 by default: the first is missing
    assert code == 2 and "gaussian_noise.npy" in err and len(err.strip().splitlines()) == 1


def test_cli_corruptions_names_every_unknown_one(tmp_path, cli):
    code, _, err = cli(["continual", "tta", "--corruptions", "fog,blurry,snow,rain", "--out", str(tmp_path / "o")])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'blurry', 'rain'" in err and "gaussian_noise" in err  # names the unknown ones and the valid choices
    for value, needle in ((",", "at least one"), ("fog,fog", "'fog' more than once")):
        code, _, err = cli(["continual", "tta", "--corruptions", value, "--out", str(tmp_path / "o")])
        assert code == 2 and needle in err
    assert not (tmp_path / "o").exists()


def test_cli_corruptions_subset_on_the_digits_stream(tmp_path, cli):
    out = tmp_path / "digits"
    code, _, err = cli(["continual", "tta", "--method", "bn", "--corruptions", "fog", "--out", str(out)])
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and set(summary["error_mean"]) == {"bn"}  # 1,000 digits, batch 200, one domain


def test_mixed_stream_of_a_subset_reports_the_subset_names(tmp_path):
    import pyarrow.parquet as pq

    opts = _tiny_options(tmp_path, "mixed", setting="mixed")
    opts.corruptions = ["fog", "contrast"]
    opts.methods = ["bn"]
    run_tta_study(opts)
    names = {e["corruption"] for e in pq.read_table(tmp_path / "mixed" / "errors.parquet").to_pylist()}
    assert names == {"fog", "contrast"}
